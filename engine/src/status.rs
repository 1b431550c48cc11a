//! An instance's status, typed: what the node writes to `status.json` every 200 ms and
//! hands the Gateway (`/v1/cluster`, `/healthz`, `/metrics`). Fields are read by name
//! in Rust, never by string key; the JSON is the operators' and tests' view of it.

use serde::Serialize;

use crate::clerk::status::FederationStatus;

/// The instance's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Reading and replaying the Ledger: nothing is advertised (spec: Recovery.NoWatermarkBeforeReady).
    #[default]
    Recovering,
    Ready,
    /// `--stop-at-end` finished.
    Stopped,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Recovering => "recovering",
            Phase::Ready => "ready",
            Phase::Stopped => "stopped",
        })
    }
}

/// `status.json`: what an operator or a test can read while the instance runs.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct NodeStatus {
    pub phase: Phase,
    /// Recovered, and (Kafka) the broker answers (spec: KafkaLog.BrokerLossRetries).
    pub ready: bool,
    pub shards: u16,
    /// Partition 0's, the default partition's; every partition's is in `partitions`.
    /// Absent before recovery completes (spec: Recovery.NoWatermarkBeforeReady) or while
    /// nothing is durable.
    pub durable_watermark: Option<u64>,
    pub next_offset: Option<u64>,
    pub partitions: Vec<PartitionStatus>,
    /// Kafka only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_connected: Option<bool>,
    /// Kafka only: the last error consuming the commands topic, until every partition
    /// delivers again (spec: KafkaLog.NoSilentReset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_error: Option<String>,
    pub ledger_syncs: u64,
    pub uptime_ms: u128,
    /// Time from start to ready: reading and replaying the Ledger, cutting, starting shards.
    pub recovery_ms: Option<u128>,
    /// The Clerk and the peer links: certified watermarks, peers, faults, quarantines
    /// (null until the Clerk's first snapshot).
    pub federation: Option<FederationStatus>,
    /// Records planned since this process became ready, and for how long it has been.
    pub records_processed: u64,
    pub processing_ms: u128,
    /// What the last recovery replayed (absent while recovering).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoveryFigures>,
}

/// What recovery replayed, against its bound (spec: Recovery.RecoveryReported).
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq, Eq)]
pub struct RecoveryFigures {
    /// Ledger entries applied past the snapshot markers, every partition.
    pub replayed_entries: u64,
    /// `--snapshot-every`; 0: snapshots are off.
    pub snapshot_every: u64,
    /// The most a recovery replays per partition: `snapshot_every` plus one batch
    /// (spec: Recovery.ReplayBoundedBySnapshotCadence); absent when snapshots are off.
    pub replay_bound_per_partition: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Default, PartialEq, Eq)]
pub struct PartitionStatus {
    pub partition: u32,
    pub durable_watermark: Option<u64>,
    pub next_offset: u64,
    /// Every offset up to it is certified (absent before the Clerk is ready).
    pub certified_watermark: Option<u64>,
    /// The last offset known published on the outputs topic or log.
    pub published_watermark: Option<u64>,
    /// The marker of the partition's committed snapshot.
    pub snapshot_marker: Option<u64>,
}

impl NodeStatus {
    /// Before recovery is done.
    pub fn recovering(shards: u16) -> Self {
        Self { phase: Phase::Recovering, shards, ..Self::default() }
    }

    /// Why the instance does not serve, or `None` when it does (spec: Gateway.NotReadyRefuses).
    /// A self-quarantined instance does not answer: its own outputs are not to be trusted.
    pub fn not_ready_reason(&self) -> Option<String> {
        let self_quarantined = self.federation.as_ref().is_some_and(|f| f.quarantined);
        if self.phase != Phase::Ready {
            Some(format!("phase {}", self.phase))
        } else if self.broker_connected == Some(false) {
            Some("the Kafka broker cannot be reached".into())
        } else if let Some(error) = &self.source_error {
            Some(format!("reading the log: {error}"))
        } else if self_quarantined {
            Some("this instance quarantined itself (its outputs differed from the certified ones)".into())
        } else if !self.ready {
            Some("the Clerk is not ready yet".into())
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_keeps_the_field_names_operators_and_tests_read() {
        let status = NodeStatus { phase: Phase::Ready, ready: true, shards: 2, ..NodeStatus::default() };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["phase"], "ready");
        assert_eq!(json["shards"], 2);
        assert!(json.get("broker_connected").is_none(), "Kafka only");
        assert!(json.get("recovery").is_none(), "absent while recovering");
        assert_eq!(serde_json::to_value(NodeStatus::recovering(1)).unwrap()["phase"], "recovering");
    }

    #[test]
    fn not_ready_says_why_in_order_of_importance() {
        // spec: Gateway.NotReadyRefuses
        let ready = NodeStatus { phase: Phase::Ready, ready: true, ..NodeStatus::default() };
        assert_eq!(ready.not_ready_reason(), None);
        let broker = NodeStatus { broker_connected: Some(false), ..ready.clone() };
        assert_eq!(broker.not_ready_reason().as_deref(), Some("the Kafka broker cannot be reached"));
        let federation = FederationStatus { quarantined: true, ..FederationStatus::default() };
        let quarantined = NodeStatus { federation: Some(federation), ..ready.clone() };
        assert!(quarantined.not_ready_reason().unwrap().contains("quarantined itself"));
        assert_eq!(NodeStatus::recovering(1).not_ready_reason().as_deref(), Some("phase recovering"));
    }
}
