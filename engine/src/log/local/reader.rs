//! A reader that tails the log and never reads past the committed head.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use tribunal_shards::envelope::MAX_RECORD_BYTES;
use tribunal_shards::usher::Record;

use super::format::{Head, HeadFile};
use super::*;

/// Reads the committed records of a local log in order, from any process. Never blocks:
/// [`LocalLogReader::poll`] returns what is committed now.
pub struct LocalLogReader {
    pub(super) dir: PathBuf,
    pub(super) head_file: HeadFile,
    /// The newest commit this reader has read: the head never goes back from it.
    pub(super) head_sequence: u64,
    pub(super) segment_base_offset: u64,
    pub(super) segment_path: PathBuf,
    pub(super) segment_file: File,
    /// Size of the current segment once the head has moved past it; it is sealed then.
    pub(super) sealed_size_bytes: Option<u64>,
    /// Where the next record starts in the current segment.
    pub(super) position_bytes: u64,
    pub(super) next_offset: u64,
    pub(super) previous_timestamp_ms: u64,
    /// Read-ahead: bytes `[window_start_bytes, window_start_bytes + window.len())` of
    /// the current segment, never past the committed limit it was read under. One
    /// pread per window instead of two per record (measured: a fifth of the engine's
    /// time went to per-record preads).
    pub(super) window: Vec<u8>,
    pub(super) window_start_bytes: u64,
    /// The current segment marks batch ends (format 3), per the last head read.
    pub(super) marked: bool,
}

/// Largest read-ahead.
const WINDOW_BYTES: u64 = 1 << 20;

impl LocalLogReader {
    pub(super) fn open_segment(
        dir: &Path,
        base_offset: u64,
        head_file: HeadFile,
        head_sequence: u64,
    ) -> Result<LocalLogReader> {
        let segment_path = segment_path(dir, base_offset);
        let segment_file = File::open(&segment_path).map_err(io_error("opening", &segment_path))?;
        Ok(LocalLogReader {
            dir: dir.to_path_buf(),
            head_file,
            head_sequence,
            segment_base_offset: base_offset,
            segment_path,
            segment_file,
            sealed_size_bytes: None,
            position_bytes: 0,
            next_offset: base_offset,
            previous_timestamp_ms: 0,
            window: Vec::new(),
            window_start_bytes: 0,
            marked: false,
        })
    }

    /// `len_bytes` bytes at `position_bytes`, all below `limit_bytes`, from the window,
    /// refilling it with one read (up to the limit) when it does not hold them.
    pub(super) fn read_window(&mut self, position_bytes: u64, len_bytes: u64, limit_bytes: u64) -> Result<&[u8]> {
        assert!(position_bytes + len_bytes <= limit_bytes, "callers check the committed limit");
        let window_end = self.window_start_bytes + self.window.len() as u64;
        if position_bytes < self.window_start_bytes || position_bytes + len_bytes > window_end {
            let read_bytes = (limit_bytes - position_bytes).min(WINDOW_BYTES.max(len_bytes));
            self.window.resize(read_bytes as usize, 0);
            self.segment_file
                .read_exact_at(&mut self.window, position_bytes)
                .map_err(io_error("reading", &self.segment_path))?;
            self.window_start_bytes = position_bytes;
        }
        let start = (position_bytes - self.window_start_bytes) as usize;
        Ok(&self.window[start..start + len_bytes as usize])
    }

    /// The offset of the next record this reader returns.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Appends up to `max_records` committed records to `out` (partition 0) and returns
    /// how many; 0 when there is nothing new. On an error, `out` keeps the records read
    /// before it, and the reader stays at the record that failed.
    pub fn poll(&mut self, max_records: usize, out: &mut Vec<Record>) -> Result<usize> {
        let head = self.head_file.read_unlocked(self.head_sequence)?;
        self.head_sequence = head.sequence;
        let mut count = 0;
        while count < max_records {
            let Some(record) = self.read_next(&head)? else { break };
            out.push(record);
            count += 1;
        }
        Ok(count)
    }

    /// The next record committed by `head`, or `None` at its end.
    pub(super) fn read_next(&mut self, head: &Head) -> Result<Option<Record>> {
        match self.readable_limit_bytes(head)? {
            Some(limit_bytes) => self.read_record(limit_bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Moves on to the next segment as sealed ones are read to their end. Returns the
    /// current segment's read limit if a record starts at `position_bytes`, or `None` at
    /// the end of what `head` commits.
    pub(super) fn readable_limit_bytes(&mut self, head: &Head) -> Result<Option<u64>> {
        loop {
            // A segment's framing never changes once it holds a record: an upgrade marks
            // only segments from the next offset on.
            self.marked = head.marks(self.segment_base_offset);
            let limit_bytes = self.limit_bytes(head)?;
            if self.position_bytes < limit_bytes {
                return Ok(Some(limit_bytes));
            }
            if self.sealed_size_bytes.is_none() {
                if self.next_offset != head.next_offset {
                    let reason = format!(
                        "the head commits offsets up to {} but the segment holds records up to {}",
                        head.next_offset, self.next_offset
                    );
                    return Err(inconsistent(&self.segment_path, reason));
                }
                return Ok(None);
            }
            // The end of a sealed segment: the next one is named by the next offset.
            if self.next_offset == self.segment_base_offset {
                return Err(inconsistent(&self.segment_path, "a sealed segment is empty".into()));
            }
            let previous_timestamp_ms = self.previous_timestamp_ms;
            let head_file = std::mem::replace(&mut self.head_file, HeadFile::reader(&self.dir));
            *self = LocalLogReader::open_segment(&self.dir, self.next_offset, head_file, self.head_sequence)?;
            self.previous_timestamp_ms = previous_timestamp_ms;
        }
    }

    /// How far the current segment may be read: the committed size for the head segment,
    /// the file size for a sealed one.
    pub(super) fn limit_bytes(&mut self, head: &Head) -> Result<u64> {
        if let Some(size_bytes) = self.sealed_size_bytes {
            return Ok(size_bytes);
        }
        if head.segment_base_offset < self.segment_base_offset || head.next_offset < self.next_offset {
            let reason = format!(
                "the head (next offset {}, segment {}) is behind this reader (offset {}, segment {}); was the log replaced?",
                head.next_offset, head.segment_base_offset, self.next_offset, self.segment_base_offset
            );
            return Err(inconsistent(&self.dir, reason));
        }
        if head.segment_base_offset == self.segment_base_offset {
            if head.segment_size_bytes < self.position_bytes {
                let reason = format!("the head commits {} bytes, less than already read", head.segment_size_bytes);
                return Err(inconsistent(&self.segment_path, reason));
            }
            return Ok(head.segment_size_bytes);
        }
        let metadata = self.segment_file.metadata().map_err(io_error("reading metadata of", &self.segment_path))?;
        self.sealed_size_bytes = Some(metadata.len());
        Ok(metadata.len())
    }

    pub(super) fn corrupt(&self, position_bytes: u64, reason: String) -> LocalLogError {
        LocalLogError::CorruptRecord {
            segment: self.segment_path.clone(),
            position_bytes,
            offset: self.next_offset,
            reason,
        }
    }

    /// Reads the header of the record at `position_bytes`, which is below `limit_bytes`,
    /// and checks that the record fits below the limit. Returns it with its size.
    pub(super) fn read_header(&mut self, limit_bytes: u64) -> Result<(RecordHeader, u64)> {
        assert!(self.position_bytes < limit_bytes);
        let position_bytes = self.position_bytes;
        let remaining_bytes = limit_bytes - position_bytes;
        if remaining_bytes < RECORD_HEADER_SIZE_BYTES {
            let reason = format!("{remaining_bytes} bytes before the end, too few for a record header");
            return Err(self.corrupt(position_bytes, reason));
        }
        let marked = self.marked;
        let bytes = self.read_window(position_bytes, RECORD_HEADER_SIZE_BYTES, limit_bytes)?;
        let header = RecordHeader::decode(bytes.try_into().expect("16-byte slice"), marked);
        if header.len as usize > MAX_RECORD_BYTES {
            let reason = format!("length {} is more than the {MAX_RECORD_BYTES}-byte limit", header.len);
            return Err(self.corrupt(position_bytes, reason));
        }
        let record_size_bytes = RECORD_HEADER_SIZE_BYTES + u64::from(header.len);
        if record_size_bytes > remaining_bytes {
            let reason = format!(
                "a {record_size_bytes}-byte record runs past the end of the committed data at byte {limit_bytes}"
            );
            return Err(self.corrupt(position_bytes, reason));
        }
        Ok((header, record_size_bytes))
    }

    /// Reads and checks the whole record at `position_bytes`, which is below `limit_bytes`.
    pub(super) fn read_record(&mut self, limit_bytes: u64) -> Result<Record> {
        let position_bytes = self.position_bytes;
        let (header, record_size_bytes) = self.read_header(limit_bytes)?;
        let payload =
            self.read_window(position_bytes + RECORD_HEADER_SIZE_BYTES, u64::from(header.len), limit_bytes)?.to_vec();
        let computed_crc = record_crc(header.len_field, header.timestamp_ms, &payload);
        if computed_crc != header.crc {
            let reason = format!("checksum mismatch (stored {:#010x}, computed {computed_crc:#010x})", header.crc);
            return Err(self.corrupt(position_bytes, reason));
        }
        if header.timestamp_ms < self.previous_timestamp_ms {
            let reason = format!(
                "timestamp {} ms is before the previous record's {} ms",
                header.timestamp_ms, self.previous_timestamp_ms
            );
            return Err(self.corrupt(position_bytes, reason));
        }
        let record = Record { partition: 0, offset: self.next_offset, timestamp_ms: header.timestamp_ms, payload };
        self.position_bytes += record_size_bytes;
        self.next_offset += 1;
        self.previous_timestamp_ms = header.timestamp_ms;
        Ok(record)
    }
}

pub(super) struct RecordHeader {
    /// The payload's length, without the mark.
    pub(super) len: u32,
    /// Marked framing: the length field as written, which the CRC covers.
    pub(super) len_field: Option<u32>,
    pub(super) crc: u32,
    pub(super) timestamp_ms: u64,
}

impl RecordHeader {
    pub(super) fn decode(bytes: &[u8; RECORD_HEADER_SIZE_BYTES as usize], marked: bool) -> RecordHeader {
        let field = u32::from_le_bytes(bytes[0..4].try_into().expect("4-byte slice"));
        RecordHeader {
            len: if marked { field & !BATCH_END_MARK } else { field },
            len_field: marked.then_some(field),
            crc: u32::from_le_bytes(bytes[4..8].try_into().expect("4-byte slice")),
            timestamp_ms: u64::from_le_bytes(bytes[8..16].try_into().expect("8-byte slice")),
        }
    }

    /// The last record of its batch (marked framing only).
    pub(super) fn batch_end(&self) -> bool {
        self.len_field.is_some_and(|field| field & BATCH_END_MARK != 0)
    }
}
