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
use crate::warden::{Warden, WardenCheck, WardenConfig};

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

/// What one batch became.
pub struct BatchPlan<D: Domain> {
    pub partition: u32,
    /// Last offset covered by this plan; `None` if the plan covers nothing (halted on
    /// its first record).
    pub last_offset: Option<u64>,
    /// Outputs decided by the Usher itself (malformed, replay, conflict, full, version).
    pub outputs: Vec<EncodedOutput>,
    /// Messages for the shards, in the order each shard must receive them.
    pub messages: Vec<(ShardId, ShardMessage<D>)>,
    /// Set when the Usher halted inside this batch; later batches are refused.
    pub halted: Option<Halted>,
}

pub struct Usher<D: Domain> {
    config: UsherConfig,
    warden: Warden,
    router: Router<D::EntityKey>,
    stream_time_ms: StreamTimeMs,
    version: Version,
    next_offset: u64,
    halted: Option<Halted>,
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
        }
    }

    /// Resumes at `next_offset` (recovery seeds the Warden and version separately).
    pub fn with_next_offset(mut self, next_offset: u64) -> Self {
        self.next_offset = next_offset;
        self
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
        self.plan_decoded(records.iter().map(|record| {
            assert_eq!(record.partition, partition, "an Usher serves one partition");
            Decoded {
                offset: record.offset,
                timestamp_ms: record.timestamp_ms,
                envelope: Envelope::<D>::decode(&record.payload),
            }
        }))
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
        let mut events: Vec<Event<D>> = Vec::with_capacity(records.size_hint().0);
        let mut last_offset = None;

        for record in records {
            assert_eq!(record.offset, self.next_offset, "records arrive with dense offsets");
            // spec: Usher.StreamTimeIsMaxTimestamp
            self.stream_time_ms = self.stream_time_ms.max(record.timestamp_ms);
            self.warden.advance(record.offset, self.stream_time_ms);

            let envelope = match record.envelope {
                Ok(envelope) => envelope,
                Err(error) => {
                    // spec: Usher.MalformedRecordRejected
                    outputs.push(self.usher_output(record.offset, Verdict::Malformed { reason: error.to_string() }));
                    self.next_offset += 1;
                    last_offset = Some(record.offset);
                    continue;
                }
            };
            let check = self.warden.check(key_fingerprint(&envelope.key), envelope.payload_digest(), record.offset);
            let verdict = match check {
                WardenCheck::Replay { original_offset } => Some(Verdict::Replay { original_offset }),
                WardenCheck::Conflict { original_offset } => Some(Verdict::Conflict { original_offset }),
                WardenCheck::Full => Some(Verdict::WardenFull),
                WardenCheck::New => None,
            };
            if let Some(verdict) = verdict {
                outputs.push(self.usher_output(record.offset, verdict));
                self.next_offset += 1;
                last_offset = Some(record.offset);
                continue;
            }
            match envelope.command {
                Command::Admin(AdminCommand::ActivateVersion { version }) => {
                    if !D::supports(version) {
                        // spec: Versioning.UnknownVersionHalts
                        let halted = Halted {
                            offset: record.offset,
                            reason: format!(
                                "the log activates domain version {version}, which this binary lacks (it supports {:?}); \
                                 deploy a binary that knows it, then restart",
                                D::SUPPORTED_VERSIONS
                            ),
                        };
                        self.halted = Some(halted);
                        break;
                    }
                    // spec: Versioning.ActivateAtNextOffset
                    self.version = version;
                    outputs.push(self.usher_output(record.offset, Verdict::VersionActivated { version }));
                }
                Command::Domain(command) => {
                    events.push(Event {
                        partition,
                        offset: record.offset,
                        stream_time_ms: self.stream_time_ms,
                        version: self.version,
                        command,
                    });
                }
            }
            self.next_offset += 1;
            last_offset = Some(record.offset);
        }

        let messages = match last_offset {
            Some(last) => self.dispatch(events, last),
            None => Vec::new(),
        };
        Ok(BatchPlan { partition, last_offset, outputs, messages, halted: self.halted.clone() })
    }

    fn dispatch(&mut self, events: Vec<Event<D>>, last_offset: u64) -> Vec<(ShardId, ShardMessage<D>)> {
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

        // spec: Usher.BatchEndToEveryShard
        for shard in 0..shard_count {
            messages.push((shard, ShardMessage::BatchEnd { partition, last_offset }));
        }
        messages
    }
}
