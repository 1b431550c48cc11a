//! Usher, sans-IO part: turns a batch of log records into shard messages
//! (spec: `specs/usher.allium`, `specs/warden.allium`, `specs/versioning.allium`).
//!
//! The IO shell (reading the local log or Kafka, feeding channels) lives in the engine;
//! this state machine only decides. For one partition it: decodes each record, advances
//! stream time, applies admin commands, asks the Warden, routes the new events with
//! union-find and emits, per shard and in batch order, a pre-warm request, the
//! components (or the lend requests of cross-shard ones) and a batch-end marker.

use crate::arbiter::{shard_of, Component, ComponentId, ShardMessage};
use crate::digest::key_fingerprint;
use crate::domain::{Domain, StreamTimeMs, Version};
use crate::envelope::{AdminCommand, Command, DecodeError, Envelope};
use crate::output::{encode_output, EncodedOutput, Verdict};
use crate::router::{Placement, Router, ShardId, MAX_SHARDS};
use serde::{Deserialize, Serialize};

use crate::warden::{Warden, WardenCheck, WardenConfig, WardenSnapshot, WardenSnapshotError};

/// Most records an Usher plans as one batch: its readers (the local log's, the Kafka
/// source's) hand it at most this many at once, and the snapshot cadence's bound counts it.
pub const MAX_BATCH_RECORDS: usize = 4_096;

/// One record of the input log, as the log gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub partition: u32,
    pub offset: u64,
    /// The log's timestamp (Kafka's or the local log's), which drives stream time.
    pub timestamp_ms: u64,
    pub payload: Vec<u8>,
}

/// A record after decoding.
pub struct Decoded<D: Domain> {
    pub offset: u64,
    pub timestamp_ms: u64,
    pub envelope: Result<Envelope<D>, DecodeError>,
}

/// A new event, ready for evaluation.
#[derive(Debug, Clone)]
pub struct Event<D: Domain> {
    pub partition: u32,
    pub offset: u64,
    pub stream_time_ms: StreamTimeMs,
    pub version: Version,
    pub command: D::Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsherConfig {
    pub partition: u32,
    pub shard_count: u16,
    pub warden: WardenConfig,
    /// Domain version in force before any `activate_version` command.
    pub initial_version: Version,
}

/// Why an Usher stopped: it never guesses past a command it cannot honour
/// (spec: Versioning.UnknownVersionHalts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("halted at offset {offset}: {reason}")]
pub struct Halted {
    pub offset: u64,
    pub reason: String,
}

/// Why [`Usher::restore`] refused a snapshot read from disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsherSnapshotError {
    #[error("snapshot of partition {found} for partition {expected}")]
    WrongPartition { found: u32, expected: u32 },
    #[error("snapshot at domain version {0}, which this binary lacks")]
    UnsupportedVersion(Version),
    #[error(transparent)]
    Warden(#[from] WardenSnapshotError),
}

/// Why [`Usher::apply_delta`] refused a journal read from disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    #[error("journal of partition {found} for partition {expected}")]
    WrongPartition { found: u32, expected: u32 },
    #[error("journal covers {first_offset}..={last_offset}, expected to start at {expected}")]
    Misplaced { first_offset: u64, last_offset: u64, expected: u64 },
    #[error("journal {first_offset}..={last_offset} is out of order or outside its batch")]
    OutOfOrder { first_offset: u64, last_offset: u64 },
    #[error("journal switches to domain version {0}, which this binary lacks")]
    UnsupportedVersion(Version),
    #[error("journal records a key at offset {offset} that was not new")]
    KeyNotNew { offset: u64 },
    #[error("journal ends at the last possible offset")]
    EndsAtLastOffset,
}

/// What one batch did to the Usher's own state: enough to rebuild the Warden,
/// stream time and version exactly (spec: Recovery.WardenRebuilt). It rides on the
/// home shard's batch-end marker in the Ledger.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UsherDelta {
    pub partition: u32,
    pub first_offset: u64,
    pub last_offset: u64,
    /// (offset, stream time) wherever stream time rose.
    pub time_steps: Vec<(u64, StreamTimeMs)>,
    /// (offset, key fingerprint, payload digest) of every key the Warden recorded.
    pub recorded: Vec<(u64, u128, u64)>,
    pub version_after: Version,
}

/// The Usher's whole state at a batch-end marker, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsherSnapshot {
    pub partition: u32,
    pub next_offset: u64,
    pub stream_time_ms: StreamTimeMs,
    pub version: Version,
    pub warden: WardenSnapshot,
}

/// What one batch became.
pub struct BatchPlan<D: Domain> {
    pub partition: u32,
    /// Last offset covered by this plan; `None` if the plan covers nothing (halted on
    /// its first record).
    pub last_offset: Option<u64>,
    /// Messages for the shards, in the order each shard must receive them. The
    /// outputs the Usher decided itself go to the home shard as `Decided`.
    pub messages: Vec<(ShardId, ShardMessage<D>)>,
    /// The Usher's state at this batch's marker, when a snapshot was requested.
    pub snapshot: Option<UsherSnapshot>,
    /// Set when the Usher halted inside this batch; later batches are refused.
    pub halted: Option<Halted>,
}

/// What [`Usher::plan_decoded`] did with one record.
enum RecordStep {
    /// Before `next_offset`: a redelivery, skipped.
    Redelivered,
    /// Answered or turned into an event; `next_offset` moves past it.
    Planned,
    /// The Usher halted at or before this record; the batch ends.
    Halted,
}

/// Messages for the shards, each with its destination, in order.
pub type Messages<D> = Vec<(ShardId, ShardMessage<D>)>;

/// The shard that holds a partition's Usher, its decided outputs and its journal.
pub fn home_shard(partition: u32, shard_count: u16) -> ShardId {
    (partition % u32::from(shard_count)) as ShardId
}

pub struct Usher<D: Domain> {
    config: UsherConfig,
    warden: Warden,
    router: Router<D::EntityKey>,
    stream_time_ms: StreamTimeMs,
    version: Version,
    next_offset: u64,
    halted: Option<Halted>,
    snapshot_requested: bool,
    delta: UsherDelta,
    keys_scratch: Vec<D::EntityKey>,
}

impl<D: Domain> Usher<D> {
    pub fn new(config: UsherConfig) -> Self {
        assert!(config.shard_count >= 1 && (config.shard_count as usize) <= MAX_SHARDS);
        assert!(D::supports(config.initial_version), "initial version must be supported");
        Self {
            config,
            warden: Warden::new(config.warden),
            router: Router::new(),
            stream_time_ms: 0,
            version: config.initial_version,
            next_offset: 0,
            halted: None,
            snapshot_requested: false,
            delta: UsherDelta::default(),
            keys_scratch: Vec::new(),
        }
    }

    /// Asks for a snapshot at the end of the next batch that covers any record.
    pub fn request_snapshot(&mut self) {
        self.snapshot_requested = true;
    }

    pub fn snapshot(&self) -> UsherSnapshot {
        UsherSnapshot {
            partition: self.config.partition,
            next_offset: self.next_offset,
            stream_time_ms: self.stream_time_ms,
            version: self.version,
            warden: self.warden.snapshot(),
        }
    }

    /// Restores the state a snapshot captured. Snapshots come from disk: checked.
    pub fn restore(&mut self, snapshot: &UsherSnapshot) -> Result<(), UsherSnapshotError> {
        if snapshot.partition != self.config.partition {
            return Err(UsherSnapshotError::WrongPartition {
                found: snapshot.partition,
                expected: self.config.partition,
            });
        }
        if !D::supports(snapshot.version) {
            return Err(UsherSnapshotError::UnsupportedVersion(snapshot.version));
        }
        self.warden = Warden::from_snapshot(self.config.warden, &snapshot.warden)?;
        self.next_offset = snapshot.next_offset;
        self.stream_time_ms = snapshot.stream_time_ms;
        self.version = snapshot.version;
        Ok(())
    }

    /// Replays one batch's journal (spec: Recovery.WardenRebuilt). Journals are applied
    /// in order, starting right after the snapshot (or at offset 0). A journal comes
    /// from disk, so it is checked before anything is applied.
    pub fn apply_delta(&mut self, delta: &UsherDelta) -> Result<(), JournalError> {
        if delta.partition != self.config.partition {
            return Err(JournalError::WrongPartition { found: delta.partition, expected: self.config.partition });
        }
        if delta.first_offset != self.next_offset || delta.last_offset < delta.first_offset {
            return Err(JournalError::Misplaced {
                first_offset: delta.first_offset,
                last_offset: delta.last_offset,
                expected: self.next_offset,
            });
        }
        let in_batch = |offset: u64| (delta.first_offset..=delta.last_offset).contains(&offset);
        let increasing_steps = delta.time_steps.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1);
        let increasing_keys = delta.recorded.windows(2).all(|w| w[0].0 < w[1].0);
        if !increasing_steps
            || !increasing_keys
            || !delta.time_steps.iter().all(|s| in_batch(s.0))
            || !delta.recorded.iter().all(|r| in_batch(r.0))
            || delta.time_steps.first().is_some_and(|s| s.1 <= self.stream_time_ms)
        {
            return Err(JournalError::OutOfOrder { first_offset: delta.first_offset, last_offset: delta.last_offset });
        }
        if !D::supports(delta.version_after) {
            return Err(JournalError::UnsupportedVersion(delta.version_after));
        }
        // Advance the Warden at every offset where stream time rose or a key was
        // recorded, in offset order: the same calls that changed it the first time.
        let mut steps = delta.time_steps.iter().copied().peekable();
        let mut recorded = delta.recorded.iter().copied().peekable();
        loop {
            let offset = match (steps.peek(), recorded.peek()) {
                (None, None) => break,
                (Some(step), None) => step.0,
                (None, Some(key)) => key.0,
                (Some(step), Some(key)) => step.0.min(key.0),
            };
            if let Some((_, time)) = steps.next_if(|step| step.0 == offset) {
                self.stream_time_ms = time;
            }
            self.warden.advance(offset, self.stream_time_ms);
            if let Some((_, fingerprint, digest)) = recorded.next_if(|key| key.0 == offset) {
                if self.warden.check(fingerprint, digest, offset) != WardenCheck::New {
                    return Err(JournalError::KeyNotNew { offset });
                }
            }
        }
        self.version = delta.version_after;
        self.next_offset = delta.last_offset.checked_add(1).ok_or(JournalError::EndsAtLastOffset)?;
        Ok(())
    }

    pub fn partition(&self) -> u32 {
        self.config.partition
    }

    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn stream_time_ms(&self) -> StreamTimeMs {
        self.stream_time_ms
    }

    pub fn warden(&self) -> &Warden {
        &self.warden
    }

    pub fn halted(&self) -> Option<&Halted> {
        self.halted.as_ref()
    }

    fn usher_output(&self, offset: u64, verdict: Verdict) -> EncodedOutput {
        encode_output(self.config.partition, offset, verdict.as_ref(), &[], &mut Vec::new())
    }

    /// Plans one batch. `records` must continue the partition at `next_offset` with
    /// dense offsets.
    pub fn plan(&mut self, records: &[Record]) -> Result<BatchPlan<D>, Halted> {
        let partition = self.config.partition;
        // A record of another partition is a wiring fault upstream: plan what comes
        // before it, then halt there (spec: Usher.OffsetGapHalts).
        let foreign = records.iter().position(|r| r.partition != partition);
        let ours = &records[..foreign.unwrap_or(records.len())];
        let mut plan = self.plan_decoded(ours.iter().map(|record| Decoded {
            offset: record.offset,
            timestamp_ms: record.timestamp_ms,
            envelope: Envelope::<D>::decode(&record.payload),
        }))?;
        if let (Some(i), None) = (foreign, &plan.halted) {
            let record = &records[i];
            self.halt(
                self.next_offset,
                format!("a record of partition {} reached the Usher of partition {partition}", record.partition),
            );
            plan.halted = self.halted.clone();
        }
        Ok(plan)
    }

    /// Stops this Usher at `offset`: nothing at or after it is journaled, planned or
    /// answered (spec: Versioning.UnknownVersionHalts, Usher.OffsetGapHalts).
    fn halt(&mut self, offset: u64, reason: String) {
        self.delta.time_steps.retain(|step| step.0 < offset);
        self.delta.recorded.retain(|key| key.0 < offset);
        self.halted = Some(Halted { offset, reason });
    }

    /// Plans one batch of records already decoded (the decode may run elsewhere, or
    /// be skipped by a benchmark of the core).
    pub fn plan_decoded(&mut self, records: impl IntoIterator<Item = Decoded<D>>) -> Result<BatchPlan<D>, Halted> {
        if let Some(halted) = &self.halted {
            return Err(halted.clone());
        }
        let partition = self.config.partition;
        let records = records.into_iter();
        let mut outputs = Vec::new();
        self.delta = UsherDelta { partition, first_offset: self.next_offset, ..UsherDelta::default() };
        let mut events: Vec<Event<D>> = Vec::with_capacity(records.size_hint().0);
        let mut last_offset = None;

        for record in records {
            let offset = record.offset;
            match self.plan_record(record, &mut outputs, &mut events) {
                RecordStep::Redelivered => continue,
                RecordStep::Halted => break,
                RecordStep::Planned => {
                    self.next_offset += 1;
                    last_offset = Some(offset);
                }
            }
        }
        Ok(self.finish_plan(events, outputs, last_offset))
    }

    /// Plans one record at or past `next_offset`: an Usher verdict goes to `outputs`,
    /// a new domain event to `events`. Leaves `next_offset` to the caller.
    fn plan_record(
        &mut self,
        record: Decoded<D>,
        outputs: &mut Vec<EncodedOutput>,
        events: &mut Vec<Event<D>>,
    ) -> RecordStep {
        if record.offset < self.next_offset {
            // spec: Usher.RedeliveredRecordIgnored — a redelivery after a seek or reconnect.
            return RecordStep::Redelivered;
        }
        if record.offset > self.next_offset {
            // spec: Usher.OffsetGapHalts — never guess past a hole in the log.
            let reason = format!("gap in the log: expected offset {}, got {}", self.next_offset, record.offset);
            self.halt(self.next_offset, reason);
            return RecordStep::Halted;
        }
        // spec: Usher.StreamTimeIsMaxTimestamp
        if record.timestamp_ms > self.stream_time_ms {
            self.stream_time_ms = self.stream_time_ms.max(record.timestamp_ms);
            self.delta.time_steps.push((record.offset, self.stream_time_ms));
        }
        self.warden.advance(record.offset, self.stream_time_ms);

        let envelope = match record.envelope {
            Ok(envelope) => envelope,
            Err(error) => {
                // spec: Usher.MalformedRecordRejected
                outputs.push(self.usher_output(record.offset, Verdict::Malformed { reason: error.code().to_owned() }));
                return RecordStep::Planned;
            }
        };
        if let Some(verdict) = self.warden_verdict(&envelope, record.offset) {
            outputs.push(self.usher_output(record.offset, verdict));
            return RecordStep::Planned;
        }
        match envelope.command {
            Command::Admin(AdminCommand::ActivateVersion { version }) => {
                if !D::supports(version) {
                    // spec: Versioning.UnknownVersionHalts
                    let reason = format!(
                        "the log activates domain version {version}, which this binary lacks (it supports {:?}); \
                         deploy a binary that knows it, then restart",
                        D::SUPPORTED_VERSIONS
                    );
                    self.halt(record.offset, reason);
                    return RecordStep::Halted;
                }
                // spec: Versioning.ActivateAtNextOffset
                self.version = version;
                outputs.push(self.usher_output(record.offset, Verdict::VersionActivated { version }));
            }
            Command::Domain(command) => {
                events.push(Event {
                    partition: self.config.partition,
                    offset: record.offset,
                    stream_time_ms: self.stream_time_ms,
                    version: self.version,
                    command,
                });
            }
        }
        RecordStep::Planned
    }

    /// Asks the Warden about a record's key, journaling a new one; the Usher's own
    /// verdict for a replay, a conflict or a full Warden, `None` for a new key.
    fn warden_verdict(&mut self, envelope: &Envelope<D>, offset: u64) -> Option<Verdict> {
        let fingerprint = key_fingerprint(&envelope.key);
        let payload_digest = envelope.payload_digest();
        let check = self.warden.check(fingerprint, payload_digest, offset);
        if check == WardenCheck::New {
            self.delta.recorded.push((offset, fingerprint, payload_digest));
        }
        match check {
            WardenCheck::Replay { original_offset } => Some(Verdict::Replay { original_offset }),
            WardenCheck::Conflict { original_offset } => Some(Verdict::Conflict { original_offset }),
            WardenCheck::Full => Some(Verdict::WardenFull),
            WardenCheck::New => None,
        }
    }

    /// Closes the batch's journal, takes a requested snapshot and dispatches the
    /// batch's events and decided outputs to the shards.
    fn finish_plan(
        &mut self,
        events: Vec<Event<D>>,
        outputs: Vec<EncodedOutput>,
        last_offset: Option<u64>,
    ) -> BatchPlan<D> {
        let partition = self.config.partition;
        self.delta.version_after = self.version;
        let mut snapshot = None;
        let messages = match last_offset {
            Some(last) => {
                self.delta.last_offset = last;
                // A halted batch's state includes the halting record: no snapshot of it.
                let take_snapshot = self.halted.is_none() && std::mem::take(&mut self.snapshot_requested);
                if take_snapshot {
                    snapshot = Some(self.snapshot());
                }
                self.dispatch(events, outputs, last, take_snapshot)
            }
            None => Vec::new(),
        };
        BatchPlan { partition, last_offset, messages, snapshot, halted: self.halted.clone() }
    }

    fn dispatch(
        &mut self,
        events: Vec<Event<D>>,
        decided: Vec<EncodedOutput>,
        last_offset: u64,
        snapshot: bool,
    ) -> Vec<(ShardId, ShardMessage<D>)> {
        let mut messages = match self.dispatch_per_shard(events) {
            Ok(messages) => messages,
            Err(events) => self.dispatch_routed(events),
        };
        let partition = self.config.partition;
        let shard_count = self.config.shard_count;
        let home = home_shard(partition, shard_count);
        if !decided.is_empty() {
            messages.push((home, ShardMessage::Decided { outputs: decided }));
        }
        // spec: Usher.BatchEndToEveryShard
        for shard in 0..shard_count {
            let usher = (shard == home).then(|| std::mem::take(&mut self.delta));
            messages.push((shard, ShardMessage::BatchEnd { partition, last_offset, usher, snapshot }));
        }
        messages
    }

    /// spec: Usher.ComponentsPerShardWhenNoneSpans — when no event of the batch spans
    /// shards, each shard's events form one component in log order, without the
    /// router. Gives the events back when one does span shards.
    fn dispatch_per_shard(&mut self, events: Vec<Event<D>>) -> Result<Messages<D>, Vec<Event<D>>> {
        let partition = self.config.partition;
        let shard_count = self.config.shard_count;
        let mut keys = std::mem::take(&mut self.keys_scratch);
        let mut prewarm: Vec<Vec<D::EntityKey>> = vec![Vec::new(); shard_count as usize];
        let mut shard_of_event: Vec<ShardId> = Vec::with_capacity(events.len());
        for event in &events {
            keys.clear();
            D::entities(&event.command, &mut keys);
            assert!(!keys.is_empty() && keys.len() <= D::MAX_ENTITIES_PER_COMMAND);
            let shard = shard_of::<D>(&keys[0], shard_count);
            if keys[1..].iter().any(|k| shard_of::<D>(k, shard_count) != shard) {
                self.keys_scratch = keys;
                return Err(events);
            }
            shard_of_event.push(shard);
            // spec: Usher.PrewarmBeforeDispatch (duplicates are harmless: it is a hint)
            prewarm[shard as usize].append(&mut keys);
        }
        self.keys_scratch = keys;
        let mut per_shard: Vec<Vec<Event<D>>> = (0..shard_count).map(|_| Vec::new()).collect();
        for (event, shard) in events.into_iter().zip(shard_of_event) {
            per_shard[shard as usize].push(event);
        }
        let mut messages = Vec::with_capacity(2 * shard_count as usize + 2);
        for (shard, keys) in prewarm.into_iter().enumerate() {
            if !keys.is_empty() {
                messages.push((shard as ShardId, ShardMessage::Prewarm { partition, keys }));
            }
        }
        for (shard, events) in per_shard.into_iter().enumerate() {
            if let Some(first) = events.first() {
                let id = ComponentId { partition, first_offset: first.offset };
                let component = Component { id, placement: Placement::Single(shard as ShardId), events };
                messages.push((shard as ShardId, ShardMessage::Run(component)));
            }
        }
        Ok(messages)
    }

    fn dispatch_routed(&mut self, events: Vec<Event<D>>) -> Vec<(ShardId, ShardMessage<D>)> {
        let partition = self.config.partition;
        let shard_count = self.config.shard_count;
        self.router.route(
            events.len(),
            |i, out| {
                D::entities(&events[i].command, out);
                assert!(!out.is_empty() && out.len() <= D::MAX_ENTITIES_PER_COMMAND);
            },
            |k| shard_of::<D>(k, shard_count),
        );
        let router = &self.router;
        let routing = router.routing();
        let mut messages = Vec::with_capacity(routing.components.len() + 2 * shard_count as usize);

        // spec: Usher.PrewarmBeforeDispatch
        let mut prewarm: Vec<Vec<D::EntityKey>> = vec![Vec::new(); shard_count as usize];
        for &node in &routing.nodes {
            prewarm[router.shard_of(node) as usize].push(router.key(node).clone());
        }
        for (shard, keys) in prewarm.into_iter().enumerate() {
            if !keys.is_empty() {
                messages.push((shard as ShardId, ShardMessage::Prewarm { partition, keys }));
            }
        }

        let mut slots: Vec<Option<Event<D>>> = events.into_iter().map(Some).collect();
        for routed in &routing.components {
            let component_events: Vec<Event<D>> = routing
                .events_of(routed)
                .iter()
                .map(|&i| slots[i as usize].take().expect("each event is in exactly one component"))
                .collect();
            let id = ComponentId { partition, first_offset: component_events[0].offset };
            if let Placement::Cross { coordinator, shards } = routed.placement {
                for lender in shards.iter().filter(|s| *s != coordinator) {
                    let keys: Vec<D::EntityKey> = routing
                        .nodes_of(routed)
                        .iter()
                        .filter(|&&n| router.shard_of(n) == lender)
                        .map(|&n| router.key(n).clone())
                        .collect();
                    messages.push((lender, ShardMessage::Lend { component: id, coordinator, keys }));
                }
            }
            let evaluator = routed.placement.evaluator();
            let component = Component { id, placement: routed.placement, events: component_events };
            messages.push((evaluator, ShardMessage::Run(component)));
        }

        messages
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Inventory;

    fn usher(partition: u32) -> Usher<Inventory> {
        Usher::new(UsherConfig { partition, shard_count: 1, warden: WardenConfig::default(), initial_version: 1 })
    }

    #[test]
    fn a_misplaced_snapshot_or_journal_is_refused_with_its_kind_and_message() {
        let error = usher(2).restore(&usher(1).snapshot()).unwrap_err();
        assert_eq!(error, UsherSnapshotError::WrongPartition { found: 1, expected: 2 });
        assert_eq!(error.to_string(), "snapshot of partition 1 for partition 2");
        let delta = UsherDelta { partition: 2, first_offset: 5, last_offset: 6, ..UsherDelta::default() };
        let error = usher(2).apply_delta(&delta).unwrap_err();
        assert_eq!(error, JournalError::Misplaced { first_offset: 5, last_offset: 6, expected: 0 });
        assert_eq!(error.to_string(), "journal covers 5..=6, expected to start at 0");
    }
}
