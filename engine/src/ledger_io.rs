//! Ledger, IO shell (spec: `specs/ledger.allium`): where the segments live, reading
//! them back at start-up, cutting torn or non-durable tails, and the glommio DMA
//! writer that does group commit (one fdatasync per commit, never one per event).
//!
//! Reading at recovery uses std IO on the main thread before the shards start: it is
//! one sequential pass, and nothing else runs yet. Writing uses glommio's `DmaFile`
//! (O_DIRECT through io_uring) on the shard's own core; each commit zero-pads the last
//! partial block, which the scan treats as a clean end.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use glommio::io::OpenOptions;
use serde::{Deserialize, Serialize};
use tribunal_shards::domain::Domain;
use tribunal_shards::ledger::scan;
use tribunal_shards::recovery::{Cut, SegmentScan, ShardLog};
use tribunal_shards::router::ShardId;

/// A segment is closed and a new one started past this size.
pub const MAX_SEGMENT_BYTES: u64 = 64 << 20;

/// Paths inside `--data-dir`.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

/// What a data directory was created for; a restart with another shard count would
/// put entities on other shards than the Ledger recorded, so it is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub format: u32,
    pub shard_count: u16,
}

const FORMAT: u32 = 1;

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn shard_dir(&self, shard: ShardId) -> PathBuf {
        self.root.join("ledger").join(format!("shard-{shard:03}"))
    }

    pub fn segment_path(&self, shard: ShardId, segment: u64) -> PathBuf {
        self.shard_dir(shard).join(format!("{segment:010}.seg"))
    }

    pub fn status_path(&self) -> PathBuf {
        self.root.join("status.json")
    }

    fn meta_path(&self) -> PathBuf {
        self.root.join("meta.json")
    }

    /// Reads `meta.json`; `None` for a directory never used.
    pub fn read_meta(&self) -> anyhow::Result<Option<Meta>> {
        match fs::read(self.meta_path()) {
            Ok(bytes) => Ok(Some(
                serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", self.meta_path().display()))?,
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("reading {}: {e}", self.meta_path().display())),
        }
    }

    /// Creates the directories and `meta.json`, or checks them against `shard_count`.
    pub fn prepare(&self, shard_count: u16) -> anyhow::Result<()> {
        match self.read_meta()? {
            Some(meta) if meta.format != FORMAT => {
                anyhow::bail!("{} has data format {}, this binary writes {FORMAT}", self.root.display(), meta.format)
            }
            Some(meta) if meta.shard_count != shard_count => anyhow::bail!(
                "{} was written by {} shard(s); run with {} core(s) (--cores) or use a fresh --data-dir",
                self.root.display(),
                meta.shard_count,
                meta.shard_count
            ),
            Some(_) => {}
            None => {
                fs::create_dir_all(&self.root)?;
                let meta = Meta { format: FORMAT, shard_count };
                write_atomically(&self.meta_path(), &serde_json::to_vec_pretty(&meta)?)?;
            }
        }
        for shard in 0..shard_count {
            fs::create_dir_all(self.shard_dir(shard))?;
        }
        Ok(())
    }

    /// Segment numbers of a shard, ascending.
    pub fn segments(&self, shard: ShardId) -> io::Result<Vec<u64>> {
        let mut segments = Vec::new();
        let dir = match fs::read_dir(self.shard_dir(shard)) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(segments),
            Err(e) => return Err(e),
        };
        for entry in dir {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(number) = name.strip_suffix(".seg").and_then(|n| n.parse::<u64>().ok()) {
                segments.push(number);
            }
        }
        segments.sort_unstable();
        Ok(segments)
    }
}

/// Writes a small file so that it is either wholly old or wholly new after a crash.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut file = fs::File::create(&tmp)?;
        io::Write::write_all(&mut file, bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Replaces a small file so that a reader sees it wholly old or wholly new, without making
/// it durable: for files that are rewritten every few hundred milliseconds and worthless
/// after a crash (`status.json`). Two fsyncs each time cost the disk that the Ledger and the
/// log need (about 30 fsyncs/s for a 3-instance cluster on one host).
pub fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

/// Reads and scans every segment of every shard (spec: Recovery.RecoveryStarts).
pub fn read_logs<D: Domain>(layout: &Layout, shard_count: u16) -> anyhow::Result<Vec<ShardLog<D>>> {
    let mut logs = Vec::with_capacity(shard_count as usize);
    for shard in 0..shard_count {
        let mut segments = Vec::new();
        for segment in layout.segments(shard)? {
            let path = layout.segment_path(shard, segment);
            let bytes = fs::read(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            let (records, end) = scan::<D>(&bytes);
            segments.push(SegmentScan { segment, records, end });
        }
        logs.push(ShardLog { shard, segments });
    }
    Ok(logs)
}

/// Cuts a shard's log where recovery said: keep the segment up to the position,
/// delete the shard's later segments (spec: Recovery.TornTailTruncated).
pub fn apply_cut(layout: &Layout, cut: &Cut) -> io::Result<()> {
    let path = layout.segment_path(cut.shard, cut.segment);
    let file = fs::OpenOptions::new().write(true).open(&path)?;
    file.set_len(cut.position as u64)?;
    file.sync_all()?;
    for later in layout.segments(cut.shard)?.into_iter().filter(|s| *s > cut.segment) {
        fs::remove_file(layout.segment_path(cut.shard, later))?;
    }
    fs::File::open(layout.shard_dir(cut.shard))?.sync_all()
}

/// Direct IO writes whole, aligned blocks.
const BLOCK_BYTES: usize = 4096;

/// Appends to a shard's current segment with group commit.
///
/// Not glommio's `DmaStreamWriter`: its `sync()` writes the whole recycled buffer past
/// the logical end, so the tail of a segment could hold stale bytes of earlier
/// records (measured here), which a scan might read as valid. This writer keeps the
/// segment's last partial block in memory and, on each commit, rewrites that block
/// plus the new bytes, zero-padded to the block size, at the block's position, then
/// issues one fdatasync. Past the logical end there are only zeros.
pub struct SegmentWriter {
    layout: Layout,
    shard: ShardId,
    segment: u64,
    file: glommio::io::DmaFile,
    /// Position of the first byte of `tail` in the file (block-aligned).
    tail_position: u64,
    /// The bytes of the last, partial block.
    tail: Vec<u8>,
    /// fdatasyncs issued (for the status and benchmarks).
    pub syncs: u64,
}

impl SegmentWriter {
    /// Starts a new segment after the shard's existing ones: a restarted process never
    /// appends into a segment a previous one wrote.
    pub async fn open(layout: &Layout, shard: ShardId) -> io::Result<Self> {
        let segment = layout.segments(shard)?.last().map_or(0, |last| last + 1);
        let file = Self::create(layout, shard, segment).await?;
        Ok(Self { layout: layout.clone(), shard, segment, file, tail_position: 0, tail: Vec::new(), syncs: 0 })
    }

    async fn create(layout: &Layout, shard: ShardId, segment: u64) -> io::Result<glommio::io::DmaFile> {
        let path = layout.segment_path(shard, segment);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .dma_open(&path)
            .await
            .map_err(|e| io::Error::other(format!("creating {}: {e}", path.display())))?;
        fs::File::open(layout.shard_dir(shard))?.sync_all()?;
        Ok(file)
    }

    /// Writes `bytes` and makes them durable with one fdatasync (spec: Ledger.GroupCommitAtBatchEnd).
    pub async fn commit(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.tail_position + self.tail.len() as u64 >= MAX_SEGMENT_BYTES {
            self.roll().await?;
        }
        let total = self.tail.len() + bytes.len();
        let padded = total.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        let mut buffer = self.file.alloc_dma_buffer(padded);
        let out = buffer.as_bytes_mut();
        out[..self.tail.len()].copy_from_slice(&self.tail);
        out[self.tail.len()..total].copy_from_slice(bytes);
        out[total..].fill(0);
        let written =
            self.file.write_at(buffer, self.tail_position).await.map_err(|e| io::Error::other(e.to_string()))?;
        if written != padded {
            return Err(io::Error::other(format!("short write: {written} of {padded} bytes")));
        }
        self.file.fdatasync().await.map_err(|e| io::Error::other(e.to_string()))?;
        self.syncs += 1;
        // Keep the last partial block for the next commit.
        let whole_blocks = total / BLOCK_BYTES * BLOCK_BYTES;
        let mut tail = std::mem::take(&mut self.tail);
        tail.extend_from_slice(bytes);
        tail.drain(..whole_blocks);
        self.tail = tail;
        self.tail_position += whole_blocks as u64;
        Ok(())
    }

    /// The segment being written.
    pub fn segment(&self) -> u64 {
        self.segment
    }

    /// Closes the current segment and starts the next (spec: Ledger.SegmentRolled).
    pub async fn roll(&mut self) -> io::Result<()> {
        let next = Self::create(&self.layout, self.shard, self.segment + 1).await?;
        let old = std::mem::replace(&mut self.file, next);
        old.close().await.map_err(|e| io::Error::other(e.to_string()))?;
        self.segment += 1;
        self.tail_position = 0;
        self.tail.clear();
        Ok(())
    }
}

/// glommio's polled-IO probe can wrongly decide that this disk polls, and reads then
/// fail with EOPNOTSUPP (MACHINE-NOTES). Opening one small file with DMA before any
/// other IO in the executor makes it cache "no polling".
pub async fn settle_io_probe(layout: &Layout, shard: ShardId) -> io::Result<()> {
    let path = layout.shard_dir(shard).join(".probe");
    fs::write(&path, [0u8; 512])?;
    let file = glommio::io::DmaFile::open(&path).await.map_err(|e| io::Error::other(e.to_string()))?;
    file.close().await.map_err(|e| io::Error::other(e.to_string()))?;
    fs::remove_file(&path)
}

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

/// Deletes the segments of `shard` below `bound` (from [`Manifest::deletable_below`]);
/// returns how many.
pub fn delete_segments_below(layout: &Layout, shard: ShardId, bound: u64) -> io::Result<usize> {
    let doomed: Vec<u64> = layout.segments(shard)?.into_iter().filter(|s| *s < bound).collect();
    for &segment in &doomed {
        fs::remove_file(layout.segment_path(shard, segment))?;
    }
    if !doomed.is_empty() {
        fs::File::open(layout.shard_dir(shard))?.sync_all()?;
    }
    Ok(doomed.len())
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
