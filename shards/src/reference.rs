//! Sequential reference interpreter: the obviously-correct model the engine is checked
//! against (the guarding test of docs/design.md §3).
//!
//! It shares only the domain logic and the output encoding with the engine. It has no
//! shards, no router, no loans and its own idempotency table with eager expiry, so a
//! bug in the Warden, the router or the Arbiter shows up as a different output digest.

use std::collections::{BTreeMap, VecDeque};

use crate::domain::{Decision, Domain, Version};
use crate::envelope::{AdminCommand, Command, Envelope};
use crate::output::{EncodedOutput, Output, Verdict};
use crate::registrar::combine_partition_digests;
use crate::usher::{Halted, Record};
use crate::warden::WardenConfig;

struct KeyEntry {
    payload_digest: u64,
    offset: u64,
}

struct Partition<D: Domain> {
    stream_time_ms: u64,
    version: Version,
    keys: BTreeMap<String, KeyEntry>,
    /// (recorded_at, key, offset) in insertion order, for eager expiry.
    recorded: VecDeque<(u64, String, u64)>,
    state: BTreeMap<D::EntityKey, D::State>,
    next_offset: u64,
    halted: Option<Halted>,
}

impl<D: Domain> Partition<D> {
    /// A partition before its first record.
    fn new(initial_version: Version) -> Self {
        Self {
            stream_time_ms: 0,
            version: initial_version,
            keys: BTreeMap::new(),
            recorded: VecDeque::new(),
            state: BTreeMap::new(),
            next_offset: 0,
            halted: None,
        }
    }

    /// Moves stream time to `timestamp_ms` if later, then forgets every key recorded
    /// `ttl_ms` or more before it (eager expiry).
    fn advance(&mut self, timestamp_ms: u64, ttl_ms: u64) {
        self.stream_time_ms = self.stream_time_ms.max(timestamp_ms);
        while let Some((recorded_at, key, offset)) = self.recorded.front() {
            if self.stream_time_ms - recorded_at < ttl_ms {
                break;
            }
            if self.keys.get(key).is_some_and(|e| e.offset == *offset) {
                self.keys.remove(key);
            }
            self.recorded.pop_front();
        }
    }

    /// The idempotency answer for a known key (replay or conflict) or a full table;
    /// `None` when the key is new and there is room for it.
    fn key_verdict(&self, key: &str, digest: u64, max_entries: u64) -> Option<Verdict> {
        if let Some(entry) = self.keys.get(key) {
            let original_offset = entry.offset;
            return Some(if entry.payload_digest == digest {
                Verdict::Replay { original_offset }
            } else {
                Verdict::Conflict { original_offset }
            });
        }
        (self.keys.len() as u64 >= max_entries).then_some(Verdict::WardenFull)
    }

    /// Evaluates a domain command against this partition's state, keeping the new
    /// states if accepted; the verdict and the output body.
    fn evaluate(&mut self, command: &D::Command) -> (Verdict, Vec<u8>) {
        let mut keys = Vec::new();
        D::entities(command, &mut keys);
        let mut states: Vec<D::State> = keys.iter().map(|k| self.state.get(k).copied().unwrap_or_default()).collect();
        let mut body = Vec::new();
        let decision = D::evaluate(self.version, &keys, &mut states, command, self.stream_time_ms, &mut body);
        let verdict = match decision {
            Decision::Accepted => {
                for (key, state) in keys.into_iter().zip(states) {
                    if state == D::State::default() {
                        self.state.remove(&key);
                    } else {
                        self.state.insert(key, state);
                    }
                }
                Verdict::Accepted { version: self.version }
            }
            Decision::Rejected(code) => Verdict::Rejected { version: self.version, code: code.to_string() },
        };
        (verdict, body)
    }
}

pub struct Reference<D: Domain> {
    warden: WardenConfig,
    initial_version: Version,
    partitions: BTreeMap<u32, Partition<D>>,
}

impl<D: Domain> Reference<D> {
    pub fn new(warden: WardenConfig, initial_version: Version) -> Self {
        Self { warden, initial_version, partitions: BTreeMap::new() }
    }

    /// Applies one record and returns its output.
    pub fn apply(&mut self, record: &Record) -> Result<EncodedOutput, Halted> {
        let warden = self.warden;
        let initial_version = self.initial_version;
        let p = self.partitions.entry(record.partition).or_insert_with(|| Partition::new(initial_version));
        if let Some(halted) = &p.halted {
            return Err(halted.clone());
        }
        assert_eq!(record.offset, p.next_offset);
        p.advance(record.timestamp_ms, warden.ttl_ms);
        let output = |verdict: Verdict, body: Vec<u8>| {
            Output { partition: record.partition, offset: record.offset, verdict, body }.encode()
        };
        let envelope = match Envelope::<D>::decode(&record.payload) {
            Ok(envelope) => envelope,
            Err(error) => {
                p.next_offset += 1;
                return Ok(output(Verdict::Malformed { reason: error.code().to_owned() }, Vec::new()));
            }
        };
        let digest = envelope.payload_digest();
        if let Some(verdict) = p.key_verdict(&envelope.key, digest, warden.max_entries) {
            p.next_offset += 1;
            return Ok(output(verdict, Vec::new()));
        }
        if let Command::Admin(AdminCommand::ActivateVersion { version }) = &envelope.command {
            if !D::supports(*version) {
                let halted = Halted { offset: record.offset, reason: format!("unsupported version {version}") };
                p.halted = Some(halted.clone());
                return Err(halted);
            }
        }
        p.keys.insert(envelope.key.clone(), KeyEntry { payload_digest: digest, offset: record.offset });
        p.recorded.push_back((p.stream_time_ms, envelope.key.clone(), record.offset));
        p.next_offset += 1;
        match envelope.command {
            Command::Admin(AdminCommand::ActivateVersion { version }) => {
                p.version = version;
                Ok(output(Verdict::VersionActivated { version }, Vec::new()))
            }
            Command::Domain(command) => {
                let (verdict, body) = p.evaluate(&command);
                Ok(output(verdict, body))
            }
        }
    }

    pub fn entities(&self, partition: u32) -> Vec<(D::EntityKey, D::State)> {
        self.partitions
            .get(&partition)
            .map(|p| p.state.iter().map(|(k, s)| (k.clone(), *s)).collect())
            .unwrap_or_default()
    }

    pub fn partition_digest(&self, partition: u32) -> u128 {
        self.partitions
            .get(&partition)
            .map_or(0, |p| p.state.iter().fold(0u128, |acc, (k, s)| acc.wrapping_add(D::entity_digest(k, s))))
    }

    pub fn state_digest(&self) -> u128 {
        let per: Vec<_> = self.partitions.keys().map(|p| (*p, self.partition_digest(*p))).collect();
        combine_partition_digests(&per)
    }
}
