//! Deterministic single-thread simulator of one instance: an Usher per partition and
//! one Arbiter per shard, joined by FIFO channels whose delivery order is shuffled by a
//! seeded PRNG.
//!
//! Real shards run concurrently and their messages interleave arbitrarily; the only
//! ordering the engine relies on is FIFO per (sender, receiver) channel. The simulator
//! keeps exactly that and randomises the rest, so a property test that varies the
//! seed explores thread timings, and a failure replays from its seed.

use std::collections::{BTreeMap, VecDeque};

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use crate::arbiter::{Arbiter, ShardMessage};
use crate::domain::Domain;
use crate::output::EncodedOutput;
use crate::registrar::combine_partition_digests;
use crate::shard_core::{LedgerStore, ShardCore, SnapshotPoint};
use crate::usher::{BatchPlan, Decoded, Halted, Record, Usher, UsherConfig};
use crate::warden::WardenConfig;

pub use crate::prng::SplitMix64;

#[derive(Debug, Clone, Copy)]
pub struct SimulatorConfig {
    pub shard_count: u16,
    pub warden: WardenConfig,
    pub initial_version: u32,
    /// Seeds the delivery order.
    pub seed: u64,
    /// Keep every output and check that each offset has exactly one. Benchmarks turn
    /// it off and only count outputs, as the Ledger shell would hand them on.
    pub keep_outputs: bool,
}

impl SimulatorConfig {
    pub fn new(shard_count: u16, warden: WardenConfig, seed: u64) -> Self {
        Self { shard_count, warden, initial_version: 1, seed, keep_outputs: true }
    }
}

pub struct Simulator<D: Domain> {
    config: SimulatorConfig,
    ushers: BTreeMap<u32, Usher<D>>,
    /// The same core the engine's shard tasks drive.
    cores: Vec<ShardCore<D>>,
    /// `channels[from * n + to]` between shards.
    channels: Vec<VecDeque<ShardMessage<D>>>,
    /// One channel from each partition's Usher to each shard: separate FIFOs, so two
    /// partitions' messages interleave differently on different shards, as they do
    /// over real channels.
    usher_channels: BTreeMap<u32, Vec<VecDeque<ShardMessage<D>>>>,
    rng: SplitMix64,
    outputs: BTreeMap<(u32, u64), EncodedOutput>,
    /// Per shard, per partition: the last batch-end marker reached.
    batch_done: Vec<BTreeMap<u32, u64>>,
    outputs_seen: u64,
    /// Per shard, the Ledger bytes its commits wrote, when recording.
    ledgers: Option<Vec<Vec<u8>>>,
}

/// A shard's Ledger in memory: kept when recording, dropped otherwise. Never waits.
struct MemoryLedger<'a>(Option<&'a mut Vec<u8>>);

impl<D: Domain> LedgerStore<D> for MemoryLedger<'_> {
    type Error = Infallible;

    async fn write_and_sync(&mut self, bytes: &[u8]) -> Result<(), Infallible> {
        if let Some(ledger) = &mut self.0 {
            ledger.extend_from_slice(bytes);
        }
        Ok(())
    }

    async fn snapshot(&mut self, _point: SnapshotPoint<D>) -> Result<(), Infallible> {
        Ok(())
    }
}

/// Runs a future that never waits (the memory Ledger's) to its end.
fn at_once<T>(future: impl Future<Output = T>) -> T {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(value) => value,
        Poll::Pending => unreachable!("the memory Ledger never waits"),
    }
}

impl<D: Domain> Simulator<D> {
    pub fn new(config: SimulatorConfig) -> Self {
        let n = config.shard_count as usize;
        Self {
            config,
            ushers: BTreeMap::new(),
            cores: (0..config.shard_count)
                .map(|s| ShardCore::new(Arbiter::new(s, config.shard_count), config.shard_count))
                .collect(),
            channels: (0..n * n).map(|_| VecDeque::new()).collect(),
            usher_channels: BTreeMap::new(),
            rng: SplitMix64(config.seed),
            outputs: BTreeMap::new(),
            batch_done: vec![BTreeMap::new(); n],
            outputs_seen: 0,
            ledgers: None,
        }
    }

    /// Frames every shard's effects into an in-memory Ledger, exactly as the IO shell
    /// writes them, so tests can cut it anywhere and recover from it.
    pub fn with_ledgers(mut self) -> Self {
        self.ledgers = Some(vec![Vec::new(); self.config.shard_count as usize]);
        self
    }

    /// Starts from recovered state (the Ledger, if recording, starts empty: it is
    /// what is written after the restart).
    pub fn from_recovered(config: SimulatorConfig, recovered: crate::recovery::Recovered<D>) -> Self {
        let mut sim = Self::new(config);
        assert_eq!(recovered.arbiters.len(), config.shard_count as usize);
        sim.cores = recovered.arbiters.into_iter().map(|arbiter| ShardCore::new(arbiter, config.shard_count)).collect();
        sim.ushers = recovered.ushers;
        sim
    }

    /// The recorded Ledger bytes of each shard.
    pub fn ledgers(&self) -> Option<&[Vec<u8>]> {
        self.ledgers.as_deref()
    }

    fn usher(&mut self, partition: u32) -> &mut Usher<D> {
        let config = self.config;
        self.ushers.entry(partition).or_insert_with(|| {
            Usher::new(UsherConfig {
                partition,
                shard_count: config.shard_count,
                warden: config.warden,
                initial_version: config.initial_version,
            })
        })
    }

    /// Processes one batch of one partition to completion.
    pub fn process_batch(&mut self, records: &[Record]) -> Result<(), Halted> {
        let Some(first) = records.first() else { return Ok(()) };
        let partition = first.partition;
        let plan = self.usher(partition).plan(records)?;
        self.execute(plan, first.offset)
    }

    /// Same as [`Simulator::process_batch`] for records decoded beforehand.
    pub fn process_decoded(&mut self, partition: u32, records: Vec<Decoded<D>>) -> Result<(), Halted> {
        let Some(first) = records.first() else { return Ok(()) };
        let first_offset = first.offset;
        let plan = self.usher(partition).plan_decoded(records)?;
        self.execute(plan, first_offset)
    }

    /// Plans a batch and hands its messages to the channels without delivering any:
    /// several batches of several partitions can then be in flight at once, as on
    /// real shards. [`Simulator::deliver_some`] and [`Simulator::drain`] deliver.
    pub fn enqueue_batch(&mut self, records: &[Record]) -> Result<(), Halted> {
        let Some(first) = records.first() else { return Ok(()) };
        let partition = first.partition;
        let plan = self.usher(partition).plan(records)?;
        let halted = plan.halted.clone();
        self.enqueue(plan);
        halted.map_or(Ok(()), Err)
    }

    fn enqueue(&mut self, plan: BatchPlan<D>) {
        let n = self.config.shard_count as usize;
        let channels =
            self.usher_channels.entry(plan.partition).or_insert_with(|| (0..n).map(|_| VecDeque::new()).collect());
        for (to, message) in plan.messages {
            channels[to as usize].push_back(message);
        }
    }

    fn execute(&mut self, plan: BatchPlan<D>, first_offset: u64) -> Result<(), Halted> {
        let partition = plan.partition;
        let last_offset = plan.last_offset;
        let halted = plan.halted.clone();
        self.enqueue(plan);
        self.drain();
        if let Some(last) = last_offset {
            for (shard, done) in self.batch_done.iter().enumerate() {
                assert_eq!(done.get(&partition), Some(&last), "shard {shard} did not finish the batch");
            }
            if self.config.keep_outputs {
                for offset in first_offset..=last {
                    assert!(self.outputs.contains_key(&(partition, offset)), "no output for offset {offset}");
                }
            }
        }
        halted.map_or(Ok(()), Err)
    }

    /// Outputs produced so far, kept or not.
    pub fn outputs_seen(&self) -> u64 {
        self.outputs_seen
    }

    fn record_output(&mut self, output: EncodedOutput) {
        self.outputs_seen += 1;
        if !self.config.keep_outputs {
            return;
        }
        let previous = self.outputs.insert((output.partition, output.offset), output);
        assert!(previous.is_none(), "exactly one output per offset");
    }

    /// Delivers up to `count` messages, each from a non-empty channel chosen at
    /// random. Returns how many were delivered.
    pub fn deliver_some(&mut self, count: usize) -> usize {
        let n = self.config.shard_count as usize;
        let mut ready: Vec<(Option<u32>, usize)> = Vec::new();
        for delivered in 0..count {
            ready.clear();
            ready.extend((0..self.channels.len()).filter(|&c| !self.channels[c].is_empty()).map(|c| (None, c)));
            for (partition, channels) in &self.usher_channels {
                ready.extend((0..n).filter(|&to| !channels[to].is_empty()).map(|to| (Some(*partition), to)));
            }
            if ready.is_empty() {
                return delivered;
            }
            let (usher, channel) = ready[(self.rng.next_u64() % ready.len() as u64) as usize];
            let (to, message) = match usher {
                Some(partition) => {
                    let queue = &mut self.usher_channels.get_mut(&partition).expect("ready")[channel];
                    (channel, queue.pop_front().expect("ready channel"))
                }
                None => (channel % n, self.channels[channel].pop_front().expect("ready channel")),
            };
            self.cores[to].handle(message);
            self.after_handling(to);
        }
        count
    }

    /// Moves what shard `from` staged onto its channels, and commits its Ledger records
    /// once a batch-end marker is among them, as the engine's Ledger task does: outputs
    /// and markers count only once durable.
    fn after_handling(&mut self, from: usize) {
        let n = self.config.shard_count as usize;
        for (to, wire) in self.cores[from].drain_staged() {
            self.channels[from * n + to as usize].extend(wire);
        }
        if !self.cores[from].commit_due() {
            return;
        }
        let commit = self.cores[from].take_commit();
        let mut store = MemoryLedger(self.ledgers.as_mut().map(|l| &mut l[from]));
        let Ok(durable) = at_once(commit.persist(&mut store));
        self.cores[from].recycle(durable.buffer);
        for output in durable.outputs {
            self.record_output(output);
        }
        for (partition, last_offset) in durable.marks {
            self.batch_done[from].insert(partition, last_offset);
        }
    }

    /// Delivers every message; then every shard must be idle (a shard that is not is
    /// stuck: a deadlock or a lost message).
    pub fn drain(&mut self) {
        while self.deliver_some(usize::MAX) > 0 {}
        for core in &self.cores {
            assert!(core.arbiter().is_idle(), "shard {} is stuck after delivery", core.shard());
            assert!(!core.commit_due(), "shard {} has an uncommitted marker", core.shard());
        }
    }

    pub fn outputs(&self) -> &BTreeMap<(u32, u64), EncodedOutput> {
        &self.outputs
    }

    /// Digest of `partition`'s state: the sum of the shards' digests.
    pub fn partition_digest(&self, partition: u32) -> u128 {
        self.cores.iter().fold(0u128, |acc, c| acc.wrapping_add(c.arbiter().registrar().digest(partition)))
    }

    /// Digest of the whole instance state.
    pub fn state_digest(&self) -> u128 {
        let partitions = self.cores.iter().map(|c| c.arbiter().registrar().partition_count()).max().unwrap_or(0);
        let per: Vec<_> = (0..partitions).map(|p| (p, self.partition_digest(p))).collect();
        combine_partition_digests(&per)
    }

    /// All non-default entities of `partition`, sorted.
    pub fn entities(&self, partition: u32) -> Vec<(D::EntityKey, D::State)> {
        let mut all: Vec<_> =
            self.cores.iter().flat_map(|c| c.arbiter().registrar().entities_sorted(partition)).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}
