//! One shard's core: the Arbiter, the messages it stages for other shards, and the Ledger
//! records its effects become. The engine's shard task and the simulator both drive it,
//! so the translation from effects to Ledger records exists once (spec: specs/ledger.allium,
//! Ledger.RecordAppended, Ledger.BatchEndMarkerAppended).
//!
//! Nothing an output says leaves the shard before its record is durable
//! (spec: Clerk.OwnCopyRecorded, Ledger.RecordDurableAfterSync). That is a type here, not
//! a convention: the records, markers and outputs since the last commit come out as an
//! [`Unsynced`] commit, and the only way to its outputs and durable markers is
//! [`Unsynced::persist`], which writes every byte through a [`LedgerStore`] and returns
//! only after the store's write-and-sync of the last byte returned. In the manner of
//! raft-rs's `persisted_messages`.

use std::ops::Range;

use crate::arbiter::{Arbiter, EntityStates, ShardEffect, ShardMessage};
use crate::domain::Domain;
use crate::ledger::{encode_record, LedgerRecord};
use crate::output::EncodedOutput;
use crate::router::ShardId;

/// Bytes the pending-records buffer starts with (and keeps, recycled).
const PENDING_BYTES_CAPACITY: usize = 1 << 20;

/// A snapshot this shard owes at a batch-end marker: its entities of the partition as of
/// the marker, and where the marker's record ends in the commit's bytes
/// (spec: Ledger.SnapshotAtMarker).
pub struct SnapshotPoint<D: Domain> {
    pub partition: u32,
    pub marker_offset: u64,
    pub entities: EntityStates<D>,
    end_in_bytes: usize,
}

/// Where a commit's bytes go. The engine's is the shard's DMA segment writer; the
/// simulator's is memory.
#[allow(async_fn_in_trait, reason = "driven on one thread (a glommio executor or the simulator); no Send bound wanted")]
pub trait LedgerStore<D: Domain> {
    type Error;

    /// Writes `bytes` after what is already written and returns only once they are durable
    /// (one fdatasync: group commit).
    async fn write_and_sync(&mut self, bytes: &[u8]) -> Result<(), Self::Error>;

    /// Everything up to and including `point`'s marker is durable: write the shard's
    /// snapshot part and start a new segment (spec: Ledger.SnapshotAtMarker).
    async fn snapshot(&mut self, point: SnapshotPoint<D>) -> Result<(), Self::Error>;
}

/// Records, markers and outputs appended since the last commit. Not durable yet: its
/// outputs and markers are reachable only through [`Unsynced::persist`].
pub struct Unsynced<D: Domain> {
    bytes: Vec<u8>,
    marks: Vec<(u32, u64)>,
    snapshots: Vec<SnapshotPoint<D>>,
    outputs: Vec<EncodedOutput>,
}

/// What a commit made durable: the batch-end markers (per partition, the last offset) in
/// order, and the outputs that may now be compared.
pub struct Durable {
    pub marks: Vec<(u32, u64)>,
    pub outputs: Vec<EncodedOutput>,
    /// The commit's byte buffer, emptied, for [`ShardCore::recycle`].
    pub buffer: Vec<u8>,
}

impl<D: Domain> Unsynced<D> {
    fn new(bytes: Vec<u8>) -> Self {
        Self { bytes, marks: Vec::new(), snapshots: Vec::new(), outputs: Vec::new() }
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The encoded records, as they go to the Ledger.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Writes the commit through `store`: up to each snapshot marker, the part, then the
    /// rest; every byte is durable before the outputs and markers are handed back
    /// (spec: Ledger.GroupCommitAtBatchEnd, Ledger.RecordDurableAfterSync).
    pub async fn persist<S: LedgerStore<D>>(self, store: &mut S) -> Result<Durable, S::Error> {
        let Unsynced { mut bytes, marks, snapshots, outputs } = self;
        let mut committed = 0;
        for point in snapshots {
            assert!(point.end_in_bytes >= committed && point.end_in_bytes <= bytes.len(), "markers in order");
            store.write_and_sync(&bytes[committed..point.end_in_bytes]).await?;
            committed = point.end_in_bytes;
            store.snapshot(point).await?;
        }
        if committed < bytes.len() {
            store.write_and_sync(&bytes[committed..]).await?;
        }
        bytes.clear();
        Ok(Durable { marks, outputs, buffer: bytes })
    }
}

/// A shard's state machine and its Ledger staging. Sans-IO: messages in; staged
/// messages for other shards and [`Unsynced`] commits out.
pub struct ShardCore<D: Domain> {
    arbiter: Arbiter<D>,
    /// Messages for other shards since the last [`ShardCore::drain_staged`], per
    /// destination, in order.
    staged: Vec<Vec<ShardMessage<D>>>,
    staged_count: usize,
    pending: Unsynced<D>,
    /// The buffer the next commit's records go into: a persisted commit's, given back.
    spare: Vec<u8>,
    effects: Vec<ShardEffect<D>>,
}

impl<D: Domain> ShardCore<D> {
    pub fn new(arbiter: Arbiter<D>, shard_count: u16) -> Self {
        assert!(arbiter.shard() < shard_count, "the shard is one of the instance's");
        Self {
            arbiter,
            staged: (0..shard_count).map(|_| Vec::new()).collect(),
            staged_count: 0,
            pending: Unsynced::new(Vec::with_capacity(PENDING_BYTES_CAPACITY)),
            spare: Vec::with_capacity(PENDING_BYTES_CAPACITY),
            effects: Vec::new(),
        }
    }

    pub fn shard(&self) -> ShardId {
        self.arbiter.shard()
    }

    pub fn arbiter(&self) -> &Arbiter<D> {
        &self.arbiter
    }

    /// A message for shard `to`: handled here when it is this shard, staged otherwise.
    pub fn dispatch(&mut self, to: ShardId, message: ShardMessage<D>) {
        if to == self.shard() {
            self.handle(message);
        } else {
            self.stage(to, message);
        }
    }

    /// Hands a message to the Arbiter and turns its effects into Ledger records and staged
    /// messages. Never blocks, so any task of the shard may call it.
    pub fn handle(&mut self, message: ShardMessage<D>) {
        self.arbiter.handle(message);
        let mut effects = std::mem::take(&mut self.effects);
        effects.extend(self.arbiter.drain_effects());
        for effect in effects.drain(..) {
            match effect {
                ShardEffect::Send { to, message } => self.stage(to, message),
                ShardEffect::Output { output, changes } => self.append_entry(output, changes.into_vec()),
                ShardEffect::BatchDone { partition, last_offset, usher, snapshot } => {
                    // spec: Ledger.BatchEndMarkerAppended
                    let record =
                        LedgerRecord::<D>::BatchEnd { partition, last_offset, usher, snapshot: snapshot.is_some() };
                    encode_record(&record, &mut self.pending.bytes).expect("a batch journal fits the record bound");
                    self.pending.marks.push((partition, last_offset));
                    if let Some(entities) = snapshot {
                        let end_in_bytes = self.pending.bytes.len();
                        let point = SnapshotPoint { partition, marker_offset: last_offset, entities, end_in_bytes };
                        self.pending.snapshots.push(point);
                    }
                }
            }
        }
        self.effects = effects;
    }

    /// spec: Ledger.RecordAppended — the output's bytes are moved into the record and back,
    /// never copied.
    fn append_entry(&mut self, output: EncodedOutput, deltas: EntityStates<D>) {
        let EncodedOutput { partition, offset, bytes, digest } = output;
        let record = LedgerRecord::<D>::Entry { partition, offset, output: bytes, deltas };
        encode_record(&record, &mut self.pending.bytes).expect("an entry record fits the record bound");
        let LedgerRecord::Entry { output: bytes, .. } = record else { unreachable!("built as an entry") };
        self.pending.outputs.push(EncodedOutput { partition, offset, bytes, digest });
    }

    fn stage(&mut self, to: ShardId, message: ShardMessage<D>) {
        assert!(to != self.shard(), "a shard does not message itself");
        self.staged[to as usize].push(message);
        self.staged_count += 1;
    }

    /// Messages staged since the last call, in total.
    pub fn staged_count(&self) -> usize {
        self.staged_count
    }

    /// Takes the staged messages: one wire per destination that has any, in order.
    pub fn drain_staged(&mut self) -> impl Iterator<Item = (ShardId, Vec<ShardMessage<D>>)> + '_ {
        self.staged_count = 0;
        self.staged
            .iter_mut()
            .enumerate()
            .filter(|(_, wire)| !wire.is_empty())
            .map(|(to, wire)| (to as ShardId, std::mem::take(wire)))
    }

    /// A batch-end marker was appended since the last commit was taken: commit now
    /// (records without a marker wait for theirs).
    pub fn commit_due(&self) -> bool {
        !self.pending.marks.is_empty()
    }

    /// Takes everything appended since the last commit.
    pub fn take_commit(&mut self) -> Unsynced<D> {
        let fresh = Unsynced::new(std::mem::take(&mut self.spare));
        std::mem::replace(&mut self.pending, fresh)
    }

    /// Gives a persisted commit's buffer back: the commit after next writes into it, so
    /// records are never copied into a buffer that grows from nothing.
    pub fn recycle(&mut self, buffer: Vec<u8>) {
        debug_assert!(buffer.is_empty(), "a recycled buffer is empty");
        if self.spare.capacity() < buffer.capacity() {
            self.spare = buffer;
        }
    }

    /// Bytes appended since the last commit (for bounds and tests).
    pub fn pending_bytes(&self) -> Range<usize> {
        0..self.pending.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::*;
    use crate::inventory::Inventory;
    use crate::ledger::scan;
    use crate::usher::{Record, Usher, UsherConfig};
    use crate::warden::WardenConfig;

    /// A store in memory that records what it was asked, in order.
    #[derive(Default)]
    struct Memory {
        bytes: Vec<u8>,
        steps: Vec<String>,
    }

    impl LedgerStore<Inventory> for Memory {
        type Error = Infallible;

        async fn write_and_sync(&mut self, bytes: &[u8]) -> Result<(), Infallible> {
            self.bytes.extend_from_slice(bytes);
            self.steps.push(format!("sync {}", self.bytes.len()));
            Ok(())
        }

        async fn snapshot(&mut self, point: SnapshotPoint<Inventory>) -> Result<(), Infallible> {
            self.steps.push(format!("snapshot {} at {}", point.marker_offset, self.bytes.len()));
            Ok(())
        }
    }

    fn ready<T>(future: impl Future<Output = T>) -> T {
        match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(value) => value,
            Poll::Pending => unreachable!("the memory store never waits"),
        }
    }

    fn record(offset: u64, json: &str) -> Record {
        Record { partition: 0, offset, timestamp_ms: 1, payload: json.as_bytes().to_vec() }
    }

    /// One shard, one batch of adjustments, planned by a real Usher.
    fn one_batch(core: &mut ShardCore<Inventory>, first: u64, count: u64, snapshot: bool) {
        let config = UsherConfig { partition: 0, shard_count: 1, warden: WardenConfig::default(), initial_version: 1 };
        let mut usher = Usher::<Inventory>::new(config);
        let records: Vec<Record> = (0..first + count)
            .map(|o| {
                let json = format!(
                    r#"{{"v":1,"key":"k{o}","command":{{"type":"adjust","sku":"S","warehouse":"W","delta":1}}}}"#
                );
                record(o, &json)
            })
            .collect();
        if first > 0 {
            usher.plan(&records[..first as usize]).unwrap(); // only to move the Usher on
        }
        if snapshot {
            usher.request_snapshot();
        }
        for (to, message) in usher.plan(&records[first as usize..]).unwrap().messages {
            core.dispatch(to, message);
        }
    }

    #[test]
    fn outputs_and_markers_come_out_only_after_every_byte_is_synced() {
        // spec: Ledger.RecordDurableAfterSync
        // spec: Clerk.OwnCopyRecorded
        let mut core = ShardCore::new(Arbiter::<Inventory>::new(0, 1), 1);
        one_batch(&mut core, 0, 3, false);
        assert!(core.commit_due());
        let commit = core.take_commit();
        assert!(!core.commit_due(), "taken");
        let written = commit.bytes().to_vec();
        let mut store = Memory::default();
        let durable = ready(commit.persist(&mut store)).unwrap();
        assert_eq!(store.bytes, written, "every byte went through the store");
        assert_eq!(store.steps, vec![format!("sync {}", written.len())], "one sync: group commit");
        assert_eq!(durable.marks, vec![(0, 2)]);
        assert_eq!(durable.outputs.iter().map(|o| o.offset).collect::<Vec<_>>(), vec![0, 1, 2]);
        let (records, _) = scan::<Inventory>(&store.bytes);
        assert_eq!(records.len(), 4, "three entries and the batch-end marker");
    }

    #[test]
    fn a_snapshot_part_is_written_after_its_marker_is_synced() {
        // spec: Ledger.SnapshotAtMarker
        let mut core = ShardCore::new(Arbiter::<Inventory>::new(0, 1), 1);
        one_batch(&mut core, 0, 2, true);
        let marker_end = core.pending_bytes().end;
        one_batch(&mut core, 2, 2, false);
        let commit = core.take_commit();
        let total = commit.bytes().len();
        let mut store = Memory::default();
        let durable = ready(commit.persist(&mut store)).unwrap();
        let expected =
            vec![format!("sync {marker_end}"), format!("snapshot 1 at {marker_end}"), format!("sync {total}")];
        assert_eq!(store.steps, expected);
        assert_eq!(durable.marks, vec![(0, 1), (0, 3)]);
    }

    #[test]
    fn a_failed_sync_hands_nothing_out() {
        struct Broken;
        impl LedgerStore<Inventory> for Broken {
            type Error = &'static str;
            async fn write_and_sync(&mut self, _: &[u8]) -> Result<(), &'static str> {
                Err("disk gone")
            }
            async fn snapshot(&mut self, _: SnapshotPoint<Inventory>) -> Result<(), &'static str> {
                Ok(())
            }
        }
        let mut core = ShardCore::new(Arbiter::<Inventory>::new(0, 1), 1);
        one_batch(&mut core, 0, 1, false);
        assert_eq!(ready(core.take_commit().persist(&mut Broken)).err(), Some("disk gone"));
    }

    #[test]
    fn messages_for_other_shards_are_staged_per_destination_in_order() {
        let mut core = ShardCore::new(Arbiter::<Inventory>::new(0, 3), 3);
        let marker = |last_offset| ShardMessage::BatchEnd { partition: 0, last_offset, usher: None, snapshot: false };
        core.dispatch(2, marker(0));
        core.dispatch(1, marker(0));
        core.dispatch(2, marker(1));
        assert_eq!(core.staged_count(), 3);
        let wires: Vec<(ShardId, usize)> = core.drain_staged().map(|(to, wire)| (to, wire.len())).collect();
        assert_eq!(wires, vec![(1, 1), (2, 2)]);
        assert_eq!(core.staged_count(), 0);
        assert_eq!(core.drain_staged().count(), 0);
    }
}
