//! The node's side of its status: built from the shared atomics every status interval,
//! written to `status.json` and handed to the Gateway.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tracing::warn;

use super::shared::Shared;
use crate::clerk::ClerkShared;
use crate::gateway::NodeProbe;
use crate::log::kafka::KafkaShared;
use crate::status::{NodeStatus, PartitionStatus, Phase, RecoveryFigures};
use crate::storage::{self, Layout};

/// Writes `status.json`; a failure is logged, never fatal.
pub(super) fn write_status(layout: &Layout, status: &NodeStatus) {
    let bytes = serde_json::to_vec_pretty(status).expect("status serialises");
    if let Err(e) = storage::replace_file(&layout.status_path(), &bytes) {
        warn!("could not write {}: {e}", layout.status_path().display());
    }
}

/// What the Gateway answers with: ready, or why not (spec: Gateway.NotReadyRefuses).
pub(super) fn update_probe(probe: &NodeProbe, status: &NodeStatus) {
    let reason = status.not_ready_reason().unwrap_or_default();
    *probe.not_ready_reason.lock().expect("not poisoned") = reason.clone();
    *probe.status.lock().expect("not poisoned") = status.clone();
    probe.ready.store(reason.is_empty(), Ordering::Release);
}

/// Everything a running node's status is made from.
pub(super) struct StatusSources {
    pub shared: Arc<Shared>,
    pub clerk: Arc<ClerkShared>,
    pub kafka: Option<Arc<KafkaShared>>,
    pub shards: u16,
    /// Per partition, where the input resumed at start.
    pub resume: Vec<u64>,
    pub started: Instant,
    pub ready_at: Instant,
    pub recovery_ms: u128,
    pub recovery: RecoveryFigures,
}

impl StatusSources {
    pub fn status(&self, phase: Phase) -> NodeStatus {
        let (shared, clerk) = (&self.shared, &self.clerk);
        let next_offsets = shared.next_offsets();
        let broker_connected = self.kafka.as_ref().map(|k| k.broker_connected.load(Ordering::Relaxed));
        let source_error = self.kafka.as_ref().and_then(|k| k.source_error());
        let clerk_ready = clerk.ready.load(Ordering::Acquire);
        let partitions: Vec<PartitionStatus> = (0..shared.partitions)
            .map(|p| PartitionStatus {
                partition: p,
                durable_watermark: shared.durable_end(p).checked_sub(1),
                next_offset: next_offsets[p as usize],
                certified_watermark: if clerk_ready { clerk.certified_end(p).checked_sub(1) } else { None },
                published_watermark: clerk.published_known[p as usize].load(Ordering::Acquire).checked_sub(1),
                snapshot_marker: shared.snapshot_covered_end[p as usize].load(Ordering::Acquire).checked_sub(1),
            })
            .collect();
        NodeStatus {
            phase,
            ready: phase == Phase::Ready && clerk_ready && broker_connected != Some(false) && source_error.is_none(),
            shards: self.shards,
            durable_watermark: partitions[0].durable_watermark,
            next_offset: Some(next_offsets[0]),
            partitions,
            broker_connected,
            source_error,
            ledger_syncs: shared.syncs.iter().map(|s| s.load(Ordering::Relaxed)).sum(),
            uptime_ms: self.started.elapsed().as_millis(),
            recovery_ms: Some(self.recovery_ms),
            federation: clerk.status.lock().expect("not poisoned").clone(),
            records_processed: next_offsets.iter().zip(&self.resume).map(|(n, r)| n - r).sum(),
            processing_ms: self.ready_at.elapsed().as_millis(),
            recovery: Some(self.recovery),
        }
    }
}
