//! What the shard executors (the Clerk runs on the last one's) and the main thread share, and the
//! events the shards send the main thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tribunal_shards::router::ShardId;

use crate::clerk::ClerkShared;

/// Shared between the executors and the main thread: watermarks (durable offset + 1,
/// 0 = none), sync counts, backpressure counters and the stop flag.
pub(super) struct Shared {
    pub partitions: u32,
    /// Index `shard * partitions + partition`.
    pub durable: Vec<AtomicU64>,
    pub syncs: Vec<AtomicU64>,
    /// Per partition, the next offset its Usher will plan.
    pub next_offset: Vec<AtomicU64>,
    /// Messages between shards sent and not yet delivered (the Ushers' backpressure).
    pub in_flight: AtomicU64,
    pub stop: AtomicBool,
    /// Per partition: snapshot at the next batch (another partition took one).
    pub snapshot_wanted: Vec<AtomicBool>,
    /// Per partition: the committed snapshot's marker + 1 (0: none), set by the main
    /// thread at each manifest commit (spec: Ledger.CadenceAdvancesOnCommit).
    pub snapshot_covered_end: Vec<AtomicU64>,
    pub clerk: Arc<ClerkShared>,
    pub copy_window: u64,
}

impl Shared {
    /// Instance durable watermark (+1) of `partition`: the minimum over shards
    /// (spec: Ledger.InstanceDurableWatermark).
    pub fn durable_end(&self, partition: u32) -> u64 {
        let p = self.partitions as usize;
        self.durable.iter().skip(partition as usize).step_by(p).map(|d| d.load(Ordering::Acquire)).min().unwrap_or(0)
    }

    /// Shard `shard`'s durable end of `partition` is now `end` (spec: Ledger.ShardDurableWatermark).
    pub fn set_durable(&self, shard: ShardId, partition: u32, end: u64) {
        let index = shard as usize * self.partitions as usize + partition as usize;
        self.durable[index].store(end, Ordering::Release);
    }

    /// Whether everything the Usher of `partition` has read is durable.
    pub fn reads_durable(&self, partition: u32) -> bool {
        self.durable_end(partition) >= self.next_offset[partition as usize].load(Ordering::Acquire)
    }

    pub fn next_offsets(&self) -> Vec<u64> {
        self.next_offset.iter().map(|n| n.load(Ordering::Acquire)).collect()
    }

    /// Per partition, the end below which the Ledger's outputs are no longer needed: the
    /// persisted certified checkpoint, and what is known published while anyone publishes.
    pub fn outputs_needed_from(&self, persisted_certified: &[u64]) -> Vec<u64> {
        let publishing = self.clerk.publisher_exists.load(Ordering::Acquire);
        (0..self.partitions as usize)
            .map(|p| {
                let published = self.clerk.published_known[p].load(Ordering::Acquire);
                persisted_certified[p].min(if publishing { published } else { u64::MAX })
            })
            .collect()
    }

    /// `--stop-at-end`: every durable output is certified here and by every eligible peer,
    /// and published when anyone publishes (spec: Clerk.StopAtEnd). Leaving earlier could
    /// take away the copy a peer still needs.
    pub fn all_settled(&self) -> bool {
        let clerk = &self.clerk;
        (0..self.partitions).all(|p| {
            let end = self.durable_end(p);
            let published_ok = !clerk.publisher_exists.load(Ordering::Acquire)
                || clerk.published_known[p as usize].load(Ordering::Acquire) >= end;
            clerk.certified_end(p) >= end
                && clerk.peers_certified_end[p as usize].load(Ordering::Acquire) >= end
                && published_ok
        })
    }
}

/// What a shard tells the main thread.
pub(super) enum Event {
    Started,
    Failed(ShardId, String),
    /// The partition's Usher reached the end with everything durable (`--stop-at-end`).
    Finished(u32),
    /// A snapshot part of `partition` at `marker_offset` is durable: the Usher's (`shard`
    /// None) or a shard's, whose segments before `first_kept_segment` hold only records
    /// of the partition at or below the marker.
    SnapshotPart {
        partition: u32,
        marker_offset: u64,
        shard: Option<ShardId>,
        first_kept_segment: u64,
    },
}
