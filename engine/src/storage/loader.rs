//! Reading a data directory's Ledger back: the committed snapshots and every shard's
//! scanned segments. One loader for the node's recovery and for `tribunal inspect`
//! (spec: Recovery.RecoveryStarts, Recovery.SnapshotLoaded), so the two cannot drift.

use std::collections::BTreeMap;

use anyhow::Context;
use tribunal_shards::domain::Domain;
use tribunal_shards::ledger::LedgerRecord;
use tribunal_shards::recovery::{recover, PartitionSnapshot, Recovered, ShardLog};
use tribunal_shards::usher::UsherConfig;

use super::{read_logs, read_manifest, read_snapshot, Layout, Manifest};

/// A data directory's Ledger as read from disk, before recovery.
pub struct LedgerOnDisk<D: Domain> {
    pub manifest: Manifest,
    snapshot: BTreeMap<u32, PartitionSnapshot<D>>,
    logs: Vec<ShardLog<D>>,
}

impl<D: Domain> LedgerOnDisk<D> {
    /// Reads the manifest, the snapshot parts it names and every segment of every shard.
    pub fn read(layout: &Layout, shard_count: u16) -> anyhow::Result<Self> {
        let manifest = read_manifest(layout, shard_count)?;
        let snapshot = read_snapshot::<D>(layout, &manifest).context("loading the snapshot")?;
        let logs = read_logs::<D>(layout, shard_count)?;
        Ok(Self { manifest, snapshot, logs })
    }

    /// Every output the segments hold, as (partition, offset, canonical bytes), shard by
    /// shard in segment order (not offset order; records past the durable watermark
    /// included: recovery has not cut them yet).
    pub fn outputs(&self) -> impl Iterator<Item = (u32, u64, &[u8])> {
        self.logs.iter().flat_map(|l| &l.segments).flat_map(|s| &s.records).filter_map(|scanned| {
            match &scanned.record {
                LedgerRecord::Entry { partition, offset, output, .. } => Some((*partition, *offset, output.as_slice())),
                LedgerRecord::BatchEnd { .. } => None,
            }
        })
    }

    /// Per partition, the committed snapshot's marker.
    pub fn snapshot_markers(&self) -> BTreeMap<u32, u64> {
        self.snapshot.iter().map(|(p, s)| (*p, s.marker_offset)).collect()
    }

    /// Rebuilds the shards and Ushers (spec: Recovery.*); the manifest comes back too.
    pub fn recover(
        self,
        shard_count: u16,
        usher_config: impl Fn(u32) -> UsherConfig,
    ) -> anyhow::Result<(Manifest, Recovered<D>)> {
        let recovered =
            recover(shard_count, usher_config, self.logs, self.snapshot).context("recovering the Ledger")?;
        Ok((self.manifest, recovered))
    }
}
