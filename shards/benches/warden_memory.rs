//! Warden memory per entry, measured with a counting global allocator.
//!
//! Target: <= 48 bytes per entry at 3,000,000 entries. Two measurements:
//! 1. fill: 3,000,000 distinct keys inside one TTL (10k keys/s of stream time, TTL
//!    5 min), bytes allocated / live entries;
//! 2. steady state: 6,000,000 further keys at the same rate, so keys expire and are
//!    swept as new ones arrive; the peak of bytes / live entries over that run.
//!
//! Also prints the allocator's high-water mark (the sweep's transient buffer of live
//! entries included) and the insert rate. Run with
//! `cargo bench -p tribunal-shards --bench warden_memory`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tribunal_shards::digest::key_fingerprint;
use tribunal_shards::warden::{Warden, WardenCheck, WardenConfig};

struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
/// High-water mark of ALLOCATED, so transient buffers (the sweep's) are counted too.
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(size: usize) {
    let now = ALLOCATED.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grew(new_size);
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const KEYS_PER_SECOND: u64 = 10_000;
const TTL_MS: u64 = 300_000;
const FILL: u64 = 3_000_000;

fn main() {
    // Cargo passes `--bench`; there are no options.
    let baseline = ALLOCATED.load(Ordering::Relaxed);
    let mut warden = Warden::new(WardenConfig { ttl_ms: TTL_MS, max_entries: 3_500_000 });
    let started = Instant::now();
    let mut offset = 0u64;
    let insert = |warden: &mut Warden, offset: u64| {
        // Stream time from the arrival rate; keys are fingerprints of distinct strings.
        warden.advance(offset, offset * 1_000 / KEYS_PER_SECOND);
        let key = key_fingerprint(&format!("req-{offset:012}"));
        assert_eq!(warden.check(key, offset, offset), WardenCheck::New);
    };
    while offset < FILL {
        insert(&mut warden, offset);
        offset += 1;
    }
    let fill_secs = started.elapsed().as_secs_f64();
    let bytes = ALLOCATED.load(Ordering::Relaxed) - baseline;
    let live = warden.live_entries();
    println!("warden fill: {live} live entries, {bytes} bytes, {:.1} bytes/entry", bytes as f64 / live as f64);
    println!("warden fill: {:.2} M inserts/s", FILL as f64 / fill_secs / 1e6);

    let mut peak = 0f64;
    PEAK.store(ALLOCATED.load(Ordering::Relaxed), Ordering::Relaxed);
    let started = Instant::now();
    while offset < 3 * FILL {
        insert(&mut warden, offset);
        offset += 1;
        if offset % 10_000 == 0 {
            let per_entry = (ALLOCATED.load(Ordering::Relaxed) - baseline) as f64 / warden.live_entries() as f64;
            peak = peak.max(per_entry);
        }
    }
    let steady_secs = started.elapsed().as_secs_f64();
    let transient = (PEAK.load(Ordering::Relaxed) - baseline) as f64 / warden.live_entries() as f64;
    println!(
        "warden steady state: {} live entries, peak {:.1} bytes/live entry over {} inserts ({:.2} M inserts/s)",
        warden.live_entries(),
        peak,
        2 * FILL,
        2.0 * FILL as f64 / steady_secs / 1e6
    );
    println!(
        "warden steady state: high-water mark including the sweep's transient buffer {transient:.1} bytes/live entry"
    );
}
