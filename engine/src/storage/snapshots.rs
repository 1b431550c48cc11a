//! Snapshots (spec: Ledger.SnapshotAtMarker, Ledger.SnapshotCommitted): each part its
//! own CRC'd file, and the manifest that commits them, written last.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tribunal_shards::domain::Domain;
use tribunal_shards::router::ShardId;

use super::{write_atomically, Layout};

/// Creates the directory a part at `path` goes in, durably: a new snapshot directory is
/// an entry of `snapshots/`, which is synced too, so the part cannot vanish with it.
pub fn create_part_dir(path: &Path) -> io::Result<()> {
    let dir = path.parent().expect("parts live in a directory");
    if !dir.is_dir() {
        fs::create_dir_all(dir)?;
        if let Some(parent) = dir.parent() {
            fs::File::open(parent)?.sync_all()?;
        }
    }
    Ok(())
}

/// A snapshot part on disk: `[crc32c of payload: u32 LE][postcard payload]`.
pub fn write_part<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let payload = postcard::to_stdvec(value).map_err(|e| io::Error::other(e.to_string()))?;
    let mut bytes = Vec::with_capacity(4 + payload.len());
    bytes.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    bytes.extend_from_slice(&payload);
    write_atomically(path, &bytes)
}

/// Reads a part written by [`write_part`]; a bad CRC or payload is an error, never a panic.
pub fn read_part<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    anyhow::ensure!(bytes.len() >= 4, "{}: too short to be a snapshot part", path.display());
    let (crc, payload) = bytes.split_at(4);
    anyhow::ensure!(
        u32::from_le_bytes(crc.try_into().expect("4 bytes")) == crc32c::crc32c(payload),
        "{}: checksum mismatch",
        path.display()
    );
    postcard::from_bytes(payload).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The committed snapshots, one per partition at most: written last, after every part
/// is durable, and atomically (spec: Ledger.SnapshotCommitted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub shard_count: u16,
    pub partitions: Vec<PartitionManifest>,
}

/// A partition's latest complete snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionManifest {
    pub partition: u32,
    pub marker_offset: u64,
    /// Per shard, the first segment started after the marker's batch-end record: every
    /// earlier segment holds only records of this partition at or below the marker.
    pub first_kept_segments: Vec<u64>,
}

impl Manifest {
    pub fn get(&self, partition: u32) -> Option<&PartitionManifest> {
        self.partitions.iter().find(|p| p.partition == partition)
    }

    /// Records `entry` as its partition's snapshot, replacing an older one.
    pub fn set(&mut self, entry: PartitionManifest) {
        assert_eq!(entry.first_kept_segments.len(), self.shard_count as usize, "one kept segment per shard");
        self.partitions.retain(|p| p.partition != entry.partition);
        self.partitions.push(entry);
        self.partitions.sort_by_key(|p| p.partition);
    }

    /// Segments of `shard` below the returned number hold no record that a committed
    /// snapshot does not cover, so they may be deleted (spec: Ledger.SegmentsBelowSnapshotDeleted).
    ///
    /// `next_offsets[p]` is the next offset partition p's Usher will plan (0: it never
    /// planned one, so p has no records). `published_ends[p]`, when publishing, is one
    /// past the last output of p on the outputs topic: outputs not yet published must
    /// stay readable for the restart (spec: Publisher.ResumeFromOutputTopic).
    pub fn deletable_below(&self, shard: ShardId, next_offsets: &[u64], published_ends: Option<&[u64]>) -> u64 {
        // Never at or past the newest roll: the segment being written is after it.
        let mut bound = self.partitions.iter().map(|p| p.first_kept_segments[shard as usize]).max().unwrap_or(0);
        for (partition, &next_offset) in next_offsets.iter().enumerate() {
            if next_offset == 0 {
                continue;
            }
            let Some(snapshot) = self.get(partition as u32) else {
                return 0; // records that no snapshot covers may be anywhere
            };
            if published_ends.is_some_and(|ends| ends[partition] <= snapshot.marker_offset) {
                return 0;
            }
            if next_offset == snapshot.marker_offset + 1 {
                continue; // idle since its snapshot: none of its records is past the marker
            }
            bound = bound.min(snapshot.first_kept_segments[shard as usize]);
        }
        bound
    }
}

impl Layout {
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    pub fn snapshot_dir(&self, partition: u32, marker_offset: u64) -> PathBuf {
        self.snapshots_dir().join(format!("p{partition}-{marker_offset:020}"))
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.snapshots_dir().join("MANIFEST")
    }

    pub fn shard_part_path(&self, partition: u32, marker_offset: u64, shard: ShardId) -> PathBuf {
        self.snapshot_dir(partition, marker_offset).join(format!("shard-{shard:03}.part"))
    }

    pub fn usher_part_path(&self, partition: u32, marker_offset: u64) -> PathBuf {
        self.snapshot_dir(partition, marker_offset).join("usher.part")
    }
}

/// Reads the manifest; none yet is an empty one.
pub fn read_manifest(layout: &Layout, shard_count: u16) -> anyhow::Result<Manifest> {
    let manifest: Manifest = match fs::read(layout.manifest_path()) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("snapshot manifest: {e}"))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Manifest { shard_count, partitions: Vec::new() }),
        Err(e) => anyhow::bail!("reading the snapshot manifest: {e}"),
    };
    anyhow::ensure!(manifest.shard_count == shard_count, "the snapshot was taken with {} shards", manifest.shard_count);
    for entry in &manifest.partitions {
        anyhow::ensure!(
            entry.first_kept_segments.len() == shard_count as usize,
            "snapshot manifest: partition {} lists {} shards",
            entry.partition,
            entry.first_kept_segments.len()
        );
    }
    Ok(manifest)
}

/// Loads every partition's committed snapshot (spec: Recovery.SnapshotLoaded). A manifest
/// whose parts do not read back is an error: never start from partial state
/// (spec: Recovery.CorruptSnapshotRefused).
pub fn read_snapshot<D: Domain>(
    layout: &Layout,
    manifest: &Manifest,
) -> anyhow::Result<std::collections::BTreeMap<u32, tribunal_shards::recovery::PartitionSnapshot<D>>> {
    let mut snapshots = std::collections::BTreeMap::new();
    for entry in &manifest.partitions {
        let (p, m) = (entry.partition, entry.marker_offset);
        let usher = read_part(&layout.usher_part_path(p, m))?;
        let mut entities = Vec::new();
        for shard in 0..manifest.shard_count {
            let part: Vec<(D::EntityKey, D::State)> = read_part(&layout.shard_part_path(p, m, shard))?;
            entities.extend(part);
        }
        snapshots.insert(p, tribunal_shards::recovery::PartitionSnapshot { marker_offset: m, usher, entities });
    }
    Ok(snapshots)
}

/// After `partition`'s snapshot at `marker_offset` is committed: its older snapshots go.
/// Only older ones: a newer one may be being written right now.
pub fn delete_older_snapshots(layout: &Layout, partition: u32, marker_offset: u64) -> io::Result<()> {
    let prefix = format!("p{partition}-");
    for entry in fs::read_dir(layout.snapshots_dir())? {
        let path = entry?.path();
        let marker = path.file_name().and_then(|n| n.to_str()?.strip_prefix(&prefix)?.parse::<u64>().ok());
        if path.is_dir() && marker.is_some_and(|m| m < marker_offset) {
            fs::remove_dir_all(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(entries: &[(u32, u64, [u64; 2])]) -> Manifest {
        let mut manifest = Manifest { shard_count: 2, partitions: Vec::new() };
        for &(partition, marker_offset, kept) in entries {
            manifest.set(PartitionManifest { partition, marker_offset, first_kept_segments: kept.to_vec() });
        }
        manifest
    }

    #[test]
    fn deletion_stops_at_the_partition_whose_records_are_least_covered() {
        // spec: Ledger.SegmentsBelowSnapshotDeleted
        let m = manifest(&[(0, 99, [5, 3]), (1, 49, [2, 4])]);
        assert_eq!(m.deletable_below(0, &[150, 80], None), 2);
        assert_eq!(m.deletable_below(1, &[150, 80], None), 3);
    }

    #[test]
    fn a_partition_idle_since_its_snapshot_or_without_records_does_not_hold_deletion_back() {
        let m = manifest(&[(0, 99, [5, 3]), (1, 49, [2, 4])]);
        assert_eq!(m.deletable_below(0, &[150, 50], None), 5, "partition 1 has nothing past its marker");
        assert_eq!(m.deletable_below(0, &[150, 80, 0], None), 2, "partition 2 never had a record");
    }

    #[test]
    fn records_without_a_snapshot_or_unpublished_outputs_block_deletion() {
        let m = manifest(&[(0, 99, [5, 3])]);
        assert_eq!(m.deletable_below(0, &[150, 7], None), 0, "partition 1 has records and no snapshot");
        assert_eq!(m.deletable_below(0, &[150], Some(&[99])), 0, "the marker's output is not published");
        assert_eq!(m.deletable_below(0, &[150], Some(&[100])), 5);
        assert_eq!(Manifest::default().deletable_below(0, &[], None), 0);
    }
}
