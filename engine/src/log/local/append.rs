//! An appender's writer: records after the committed end, rolling segments at the size
//! bound, each segment written to fdatasynced before the head commits them.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use tribunal_shards::envelope::MAX_RECORD_BYTES;

use super::format::Format;
use super::*;

/// Writes one batch after the committed end, rolling segments as it goes.
pub(super) struct SegmentWriter<'a> {
    pub(super) dir: &'a Path,
    pub(super) path: PathBuf,
    pub(super) file: File,
    /// Where the batch has got to (uncommitted until the head is written).
    pub(super) head: Head,
    /// Encoded records not yet written; they belong at `head.segment_size_bytes - buffer.len()`.
    pub(super) buffer: Vec<u8>,
    pub(super) created_segment: bool,
    /// fdatasyncs and directory fsyncs issued so far.
    pub(super) syncs: u64,
}

impl<'a> SegmentWriter<'a> {
    /// A writer after `head`, on its segment `file` (opened for writing by the repair),
    /// buffering at most `buffer_bytes` (the batch's size, up to the write buffer's).
    pub(super) fn new(dir: &'a Path, head: Head, file: File, buffer_bytes: usize) -> Self {
        SegmentWriter {
            dir,
            path: segment_path(dir, head.segment_base_offset),
            file,
            head,
            buffer: Vec::with_capacity(buffer_bytes),
            created_segment: false,
            syncs: 0,
        }
    }

    /// Buffers one record; `batch_end` on the batch's last one, which format 3 marks.
    pub(super) fn push(
        &mut self,
        payload: &[u8],
        timestamp_ms: u64,
        segment_max_size_bytes: u64,
        batch_end: bool,
    ) -> Result<()> {
        assert!(payload.len() <= MAX_RECORD_BYTES);
        let record_size_bytes = RECORD_HEADER_SIZE_BYTES + payload.len() as u64;
        // After an upgrade to format 3, a segment of the old framing is not written again.
        let framed_other_way = self.head.format == Format::Marked && !self.head.marks(self.head.segment_base_offset);
        let full = self.head.segment_size_bytes + record_size_bytes > segment_max_size_bytes;
        if self.head.segment_size_bytes > 0 && (full || framed_other_way) {
            self.roll()?;
        }
        let marked = self.head.marks(self.head.segment_base_offset);
        encode_record(&mut self.buffer, payload, timestamp_ms, marked.then_some(batch_end));
        self.head.segment_size_bytes += record_size_bytes;
        self.head.next_offset += 1;
        if self.buffer.len() >= WRITE_BUFFER_SIZE_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    pub(super) fn flush(&mut self) -> Result<()> {
        let position_bytes = self.head.segment_size_bytes - self.buffer.len() as u64;
        self.file.write_all_at(&self.buffer, position_bytes).map_err(io_error("writing", &self.path))?;
        self.buffer.clear();
        Ok(())
    }

    pub(super) fn sync(&mut self) -> Result<()> {
        self.flush()?;
        self.syncs += 1;
        self.file.sync_data().map_err(io_error("syncing", &self.path))
    }

    /// Seals the current segment (its file size is now its committed size) and starts
    /// the next one, named by the next offset.
    pub(super) fn roll(&mut self) -> Result<()> {
        self.sync()?;
        let base_offset = self.head.next_offset;
        self.path = segment_path(self.dir, base_offset);
        // `truncate`: an earlier crashed appender may have left a file of this name.
        self.file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.path)
            .map_err(io_error("creating", &self.path))?;
        self.head.segment_base_offset = base_offset;
        self.head.segment_size_bytes = 0;
        self.created_segment = true;
        Ok(())
    }

    /// Makes the written records durable; returns the head that commits them and how many
    /// syncs the batch took.
    pub(super) fn finish(mut self) -> Result<(Head, u64)> {
        self.sync()?;
        if self.created_segment {
            self.syncs += 1;
            sync_dir(self.dir)?;
        }
        Ok((self.head, self.syncs))
    }
}
