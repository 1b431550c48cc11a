//! `tribunal`: the engine binary. Everything lives in the library; see `cli`.

/// Outputs are allocated on one thread and freed on another (the shard that certifies
/// them, the publisher that writes them): glibc's malloc serialises those frees on the
/// allocating arena's lock (a futex per contended free), mimalloc hands them back
/// without one.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long freed memory stays with the process before it goes back to the kernel. Set
/// explicitly: it is mimalloc v3's default, and v2's 10 ms gave back and faulted in again
/// the buffers every batch reuses.
const ALLOCATOR_PURGE_DELAY_MS: std::ffi::c_long = 1_000;
/// `mi_option_purge_delay` in mimalloc v3's `mi_option_t` (the bindings name no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // SAFETY: sets a plain option value; mimalloc reads options on its own schedule and
    // this runs before any thread other than main exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS) };
    tribunal::cli::main()
}
