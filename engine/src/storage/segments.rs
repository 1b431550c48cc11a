//! The Ledger's segments (spec: `specs/ledger.allium`): reading them back at start-up,
//! cutting torn or non-durable tails, deleting what snapshots cover, and the glommio DMA
//! writer that does group commit (one fdatasync per commit, never one per event). Each
//! commit zero-pads the last partial block, which the scan treats as a clean end.

use std::fs;
use std::io;

use glommio::io::OpenOptions;
use tribunal_shards::domain::Domain;
use tribunal_shards::ledger::scan;
use tribunal_shards::recovery::{Cut, SegmentScan, ShardLog};
use tribunal_shards::router::ShardId;

use super::Layout;

/// A segment is closed and a new one started past this size.
pub const MAX_SEGMENT_BYTES: u64 = 64 << 20;

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
/// fail with EOPNOTSUPP (docs/findings.md). Opening one small file with DMA before any
/// other IO in the executor makes it cache "no polling".
pub async fn settle_io_probe(layout: &Layout, shard: ShardId) -> io::Result<()> {
    let path = layout.shard_dir(shard).join(".probe");
    fs::write(&path, [0u8; 512])?;
    let file = glommio::io::DmaFile::open(&path).await.map_err(|e| io::Error::other(e.to_string()))?;
    file.close().await.map_err(|e| io::Error::other(e.to_string()))?;
    fs::remove_file(&path)
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
