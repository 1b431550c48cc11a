//! The main thread once the shards run: status every 200 ms, the certified checkpoint
//! every second, snapshot commits as their parts arrive, segment deletion, failures,
//! and `--stop-at-end`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Context;
use tracing::{error, info};
use tribunal_shards::router::ShardId;

use super::recover::commit_snapshot;
use super::shared::{Event, Shared};
use super::status::{update_probe, write_status, StatusSources};
use super::STATUS_INTERVAL;
use crate::clerk::ClerkShared;
use crate::gateway::NodeProbe;
use crate::log::kafka::KafkaShared;
use crate::publish::local::LocalSink;
use crate::status::{NodeStatus, Phase};
use crate::storage::{self, checkpoint, Layout, Manifest};

/// How often the certified checkpoint is persisted.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// How often `--stop-at-end` looks whether everything has settled, once every partition
/// has finished.
const SETTLE_POLL: Duration = Duration::from_millis(10);

/// Per snapshot: the parts that are durable, by shard (None: the Usher's), with the
/// first segment kept after the marker.
type Parts = BTreeMap<Option<ShardId>, u64>;

pub(super) struct Supervisor {
    pub layout: Layout,
    pub manifest: Manifest,
    pub shared: Arc<Shared>,
    pub clerk: Arc<ClerkShared>,
    pub kafka: Option<Arc<KafkaShared>>,
    pub local_sink: Option<LocalSink>,
    pub probe: Arc<NodeProbe>,
    pub status: StatusSources,
    pub shard_count: usize,
    /// The certified ends last made durable: deletion never passes them.
    pub persisted_certified: Vec<u64>,
}

/// `status.json` is rewritten when something in it changed, and at least this often (its
/// clocks move); an idle instance does not rewrite a file five times a second.
const STATUS_REWRITE_IDLE: Duration = Duration::from_secs(1);

/// What the loop keeps between rounds.
#[derive(Default)]
struct Progress {
    /// The last status written, its clocks zeroed, and when.
    written_status: Option<(NodeStatus, Instant)>,
    /// Since when the status has not changed (an idle instance looks less often).
    unchanged_since: Option<Instant>,
    snapshot_parts: BTreeMap<(u32, u64), Parts>,
    finished: BTreeSet<u32>,
    /// Deletion waits for certification and publication, so it is retried until nothing
    /// is left to delete.
    deletion_pending: bool,
}

impl Progress {
    /// How often the status is looked at: every `STATUS_INTERVAL`, and every
    /// `STATUS_REWRITE_IDLE` once nothing has changed for that long.
    fn status_interval(&self) -> Duration {
        match self.unchanged_since {
            Some(since) if since.elapsed() >= STATUS_REWRITE_IDLE => STATUS_REWRITE_IDLE,
            _ => STATUS_INTERVAL,
        }
    }

    /// Whether `status` should be written now; if so, it counts as written.
    fn status_due(&mut self, status: &NodeStatus) -> bool {
        let mut timeless = NodeStatus { uptime_ms: 0, processing_ms: 0, ..status.clone() };
        // Heartbeats move the link counters even when nothing else happens.
        if let Some(links) = timeless.federation.as_mut().and_then(|f| f.links.as_mut()) {
            *links = crate::clerk::LinksStatus::default();
        }
        let changed = self.written_status.as_ref().is_none_or(|(last, _)| *last != timeless);
        let due = changed || self.written_status.as_ref().is_some_and(|(_, at)| at.elapsed() >= STATUS_REWRITE_IDLE);
        if changed {
            self.unchanged_since = None;
        } else if self.unchanged_since.is_none() {
            self.unchanged_since = Some(Instant::now());
        }
        if due {
            self.written_status = Some((timeless, Instant::now()));
        }
        due
    }
}

impl Supervisor {
    /// Runs until a failure (an error) or, with `--stop-at-end`, until every partition has
    /// finished and settled, then exits the process.
    pub fn run(mut self, events: &mpsc::Receiver<Event>, early: Vec<Event>) -> anyhow::Result<()> {
        let mut early = early.into_iter();
        let mut progress = Progress { deletion_pending: !self.manifest.partitions.is_empty(), ..Progress::default() };
        let (mut last_status, mut last_checkpoint) = (Instant::now() - STATUS_INTERVAL, Instant::now());
        let partitions = self.shared.partitions as usize;
        loop {
            if last_status.elapsed() >= progress.status_interval() {
                last_status = Instant::now();
                self.tick(&mut progress, &mut last_checkpoint)?;
            }
            // A snapshot being written is finished first: the next start counts from it.
            let all_finished = progress.finished.len() == partitions;
            if all_finished && progress.snapshot_parts.is_empty() && self.shared.all_settled() {
                break;
            }
            let wait = if all_finished { SETTLE_POLL } else { progress.status_interval() };
            let event = match early.next() {
                Some(event) => Ok(event),
                None => events.recv_timeout(wait),
            };
            match event {
                Ok(event) => self.handle(event, &mut progress)?,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => anyhow::bail!("every shard stopped"),
            }
        }
        self.stop()
    }

    /// Status, failures, the checkpoint and pending deletion.
    fn tick(&mut self, progress: &mut Progress, last_checkpoint: &mut Instant) -> anyhow::Result<()> {
        let current = self.status.status(Phase::Ready);
        if progress.status_due(&current) {
            write_status(&self.layout, &current);
        }
        update_probe(&self.probe, &current);
        if let Some(failure) = self.kafka.as_ref().and_then(|k| k.failure()) {
            anyhow::bail!("{failure}");
        }
        if let Some(failure) = self.clerk.failure.lock().expect("not poisoned").clone() {
            anyhow::bail!("the Clerk failed: {failure}");
        }
        if let Some(failure) = self.local_sink.as_ref().and_then(|s| s.failure.lock().expect("not poisoned").clone()) {
            anyhow::bail!("{failure}");
        }
        if last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL {
            *last_checkpoint = Instant::now();
            let now = self.certified_ends();
            if now != self.persisted_certified {
                checkpoint::write_certified(&self.layout, &now)?;
                self.persisted_certified = now;
                progress.deletion_pending |= !self.manifest.partitions.is_empty();
            }
        }
        if progress.deletion_pending {
            progress.deletion_pending = self.delete_covered_segments(&self.persisted_certified)?;
        }
        Ok(())
    }

    fn handle(&mut self, event: Event, progress: &mut Progress) -> anyhow::Result<()> {
        match event {
            Event::Failed(shard, error) => {
                error!(shard, "{error}");
                anyhow::bail!("shard {shard} failed: {error}");
            }
            Event::Finished(partition) => {
                progress.finished.insert(partition);
            }
            Event::SnapshotPart { partition, marker_offset, shard, first_kept_segment } => {
                let parts = progress.snapshot_parts.entry((partition, marker_offset)).or_default();
                let repeated = parts.insert(shard, first_kept_segment).is_some();
                assert!(!repeated, "one part per shard and the Usher's");
                if parts.len() == self.shard_count + 1 {
                    let parts: Vec<_> = parts.iter().map(|(shard, first_kept)| (*shard, *first_kept)).collect();
                    commit_snapshot(&self.layout, &mut self.manifest, partition, marker_offset, &parts)?;
                    self.shared.snapshot_covered_end[partition as usize].fetch_max(marker_offset + 1, Ordering::AcqRel);
                    progress.snapshot_parts.retain(|(p, m), _| *p != partition || *m > marker_offset);
                    progress.deletion_pending = self.delete_covered_segments(&self.persisted_certified)?;
                }
            }
            Event::Started => {}
        }
        Ok(())
    }

    /// `--stop-at-end`: the last checkpoint, deletion and status, then the process exits.
    fn stop(self) -> anyhow::Result<()> {
        let _ = self.clerk.fresh_status();
        self.shared.stop.store(true, Ordering::Release);
        let now = self.certified_ends();
        checkpoint::write_certified(&self.layout, &now)?;
        if !self.manifest.partitions.is_empty() {
            self.delete_covered_segments(&now)?;
        }
        write_status(&self.layout, &self.status.status(Phase::Stopped));
        let watermarks: Vec<Option<u64>> =
            (0..self.shared.partitions).map(|p| self.shared.durable_end(p).checked_sub(1)).collect();
        let elapsed_ms = self.status.started.elapsed().as_millis() as u64;
        info!(durable_watermarks = ?watermarks, elapsed_ms, "every record is certified; stopping");
        // Everything is durable; the executors hold nothing that needs a clean shutdown.
        std::process::exit(0);
    }

    fn certified_ends(&self) -> Vec<u64> {
        (0..self.shared.partitions).map(|p| self.clerk.certified_end(p)).collect()
    }

    /// Deletes what the committed snapshots cover (spec: Ledger.SegmentsBelowSnapshotDeleted).
    /// Returns whether a later pass might delete more (publication still behind a marker).
    fn delete_covered_segments(&self, persisted_certified: &[u64]) -> anyhow::Result<bool> {
        let next_offsets = self.shared.next_offsets();
        let needed_from = self.shared.outputs_needed_from(persisted_certified);
        let mut waiting = false;
        for shard in 0..self.manifest.shard_count {
            let bound = self.manifest.deletable_below(shard, &next_offsets, Some(&needed_from));
            let deleted = storage::delete_segments_below(&self.layout, shard, bound).context("deleting segments")?;
            if deleted > 0 {
                info!(shard, deleted, below = bound, "deleted Ledger segments the snapshots cover");
            }
            // Nothing deletable yet: certification or publication may still be behind a marker.
            waiting |= bound == 0;
        }
        Ok(waiting)
    }
}
