//! Which cores the shards run on, checked before anything starts, so that a bad
//! `--cores` or a low memlock limit is a clear start-up error, not a hang or a panic
//! inside an executor.

use thiserror::Error;

/// glommio needs at least this much locked memory per executor; the Ledger's
/// registered buffers (`io_memory`) come on top (docs/findings.md: 1 MiB registers fully
/// on 2 shards under the 8 MiB limit here).
pub const MEMLOCK_PER_SHARD_BYTES: u64 = 512 * 1024;
pub const IO_MEMORY_PER_SHARD_BYTES: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum CoreError {
    #[error("invalid --cores {spec:?}: {reason} (use a list like 0,1 or 0-3)")]
    Syntax { spec: String, reason: String },
    #[error("core {core} is not allowed for this process (allowed: {allowed:?}; see taskset/cgroups)")]
    NotAllowed { core: usize, allowed: Vec<usize> },
    #[error("sched_getaffinity failed: {0}")]
    Affinity(std::io::Error),
    #[error(
        "RLIMIT_MEMLOCK is {limit_bytes} bytes; {shards} shard(s) need at least {needed_bytes} \
         (raise it with `ulimit -l`, in a container with `ulimits: memlock` in its compose file or \
         `docker run --ulimit memlock=BYTES`, or run fewer cores)"
    )]
    Memlock { limit_bytes: u64, shards: usize, needed_bytes: u64 },
    #[error(
        "io_uring is not available to this process (io_uring_setup: {0}). The shards run on io_uring: \
         on Linux 5.8 or later it must be allowed; in a container, allow io_uring_setup, io_uring_enter \
         and io_uring_register in its seccomp profile (`security_opt: [seccomp=docker/seccomp-io_uring.json]` \
         in a compose file, or `docker run --security-opt seccomp=...`)"
    )]
    IoUring(std::io::Error),
    #[error("{0} cores requested; at most {max} shards per instance", max = tribunal_shards::router::MAX_SHARDS)]
    TooMany(usize),
}

/// Cores this process may run on.
pub fn allowed_cores() -> Result<Vec<usize>, CoreError> {
    // SAFETY: `set` is a plain bit set owned by this frame; the kernel fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(CoreError::Affinity(std::io::Error::last_os_error()));
    }
    Ok((0..libc::CPU_SETSIZE as usize).filter(|c| unsafe { libc::CPU_ISSET(*c, &set) }).collect())
}

/// Parses `0,1`, `0-3` or `0,2-3`; `None` means every allowed core.
pub fn select(spec: Option<&str>) -> Result<Vec<usize>, CoreError> {
    let allowed = allowed_cores()?;
    let Some(spec) = spec else { return check_count(allowed) };
    let syntax = |reason: &str| CoreError::Syntax { spec: spec.to_owned(), reason: reason.to_owned() };
    let mut cores = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        let (low, high) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let low: usize = low.parse().map_err(|_| syntax("not a number"))?;
        let high: usize = high.parse().map_err(|_| syntax("not a number"))?;
        if low > high || high - low > 1024 {
            return Err(syntax("bad range"));
        }
        cores.extend(low..=high);
    }
    let mut seen = cores.clone();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != cores.len() {
        return Err(syntax("a core is listed twice"));
    }
    if cores.is_empty() {
        return Err(syntax("empty"));
    }
    if let Some(core) = cores.iter().find(|c| !allowed.contains(c)) {
        return Err(CoreError::NotAllowed { core: *core, allowed });
    }
    check_count(cores)
}

fn check_count(cores: Vec<usize>) -> Result<Vec<usize>, CoreError> {
    if cores.len() > tribunal_shards::router::MAX_SHARDS {
        return Err(CoreError::TooMany(cores.len()));
    }
    Ok(cores)
}

/// Checks that this process may set up an io_uring (a seccomp profile, such as newer Docker
/// versions' default, can forbid it), so that this is a clear start-up error rather than a
/// panic inside an executor.
pub fn check_io_uring() -> Result<(), CoreError> {
    // struct io_uring_params is 120 bytes; zeroed asks for nothing special.
    let mut params = [0u64; 15];
    // SAFETY: io_uring_setup writes at most sizeof(struct io_uring_params) into `params`,
    // which this frame owns; the fd it returns is closed at once.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(CoreError::IoUring(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is the ring this call created, owned by nothing else.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

/// Checks RLIMIT_MEMLOCK against what `shards` executors need.
pub fn check_memlock(shards: usize) -> Result<(), CoreError> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is a plain struct owned by this frame.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    if rc != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return Ok(());
    }
    let needed_bytes = shards as u64 * (MEMLOCK_PER_SHARD_BYTES + IO_MEMORY_PER_SHARD_BYTES as u64);
    if limit.rlim_cur < needed_bytes {
        return Err(CoreError::Memlock { limit_bytes: limit.rlim_cur, shards, needed_bytes });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_ranges() {
        let allowed = allowed_cores().unwrap();
        assert!(!allowed.is_empty());
        assert_eq!(select(Some("0")).unwrap(), vec![0]);
        assert!(matches!(select(Some("x")), Err(CoreError::Syntax { .. })));
        assert!(matches!(select(Some("0,0")), Err(CoreError::Syntax { .. })));
        assert!(matches!(select(Some("3-1")), Err(CoreError::Syntax { .. })));
        assert!(matches!(select(Some("4000")), Err(CoreError::NotAllowed { core: 4000, .. })));
        assert_eq!(select(None).unwrap(), allowed);
    }
}
