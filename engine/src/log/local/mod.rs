//! The embedded local log: the single-host input log behind `--log local:DIR`.
//!
//! One partition (0), offsets dense from 0. Several processes on the host may append at
//! once, and readers in other processes tail the log while they do. std IO only: the
//! engine's Usher polls a [`LocalLogReader`] from its own thread.
//!
//! # On disk
//!
//! ```text
//! DIR/lock                       flock(2)ed by an appender for the whole of a batch
//! DIR/head                       the commit point (below), two slots rewritten in place
//! DIR/00000000000000000000.seg   segments, named by the offset of their first record
//! DIR/00000000000000001742.seg
//! ```
//!
//! A segment is a plain sequence of records, with no file header:
//! `[len: u32 LE][crc32c: u32 LE][timestamp_ms: u64 LE][payload: len bytes]`. A record's
//! offset is its index in the log, so it is not stored: it is the segment's first offset
//! plus the record's index in it. In format 3 (every new log), bit 31 of `len` marks the
//! last record of each batch, and the CRC32C covers the `len` field as written, the
//! timestamp and the payload. Format 2 (an older release's log, until `upgrade`) has no
//! mark and its CRC covers the timestamp and the payload; an upgraded log keeps its format
//! 2 segments and marks from the next segment on (`marked_from_offset` in the head).
//!
//! The head file is 8 KiB: two 4 KiB slots, so that a torn write of one slot's sector
//! cannot reach the other. A slot is `[magic "TRBHEAD3"][sequence u64][next_offset u64]
//! [segment_base_offset u64][segment_size_bytes u64][last_timestamp_ms u64]
//! [marked_from_offset u64][synced u64][crc32c u32]`, little-endian, the CRC over the 64
//! bytes before it, then zeros (format 2: `TRBHEAD2`, without the two fields before the
//! CRC). The valid slot with the higher sequence is the head. It names the last segment
//! and how many of its bytes are committed. A 44-byte head of the first format
//! (`TRBHEAD1`) is read as commit 0 and rewritten in format 2 by the first appender that
//! opens the log.
//!
//! # Why a head file
//!
//! The bytes of a segment past its committed length can be anything: a batch being
//! written right now, or the torn remains of an appender that crashed. A record's CRC
//! cannot tell "not written yet" from "corrupt", and scanning for the end would make every
//! appender read the whole last segment. So the commit point is explicit: readers read
//! the head and never read past its committed length (not even into a read-ahead buffer,
//! because those bytes may later be truncated and rewritten), and an appender finds the
//! next offset, the end of the segment and the last timestamp without reading any record.
//!
//! # Commit protocol (all of it under the lock)
//!
//! 1. Read the head. Repair: in format 3, walk forward from the committed length over
//!    whole marked batches and commit them (synced) if there are any: they were left by an
//!    appender that died, or by a head write lost with the power. Then truncate the head
//!    segment back to its committed length (and fsync, since a later reader infers the
//!    length of a sealed segment from its file size), and delete every segment named after
//!    the head segment. Those are the uncommitted rolls of a crashed appender; left in
//!    place, one could be mistaken for the segment holding some offset. Opening the log
//!    runs the same repair, so that a reader opened after a power loss finds its offsets.
//! 2. Write the batch after the committed end. A segment rolls when the next record would
//!    take it past the size bound (a record never spans segments, and a segment is never
//!    left empty). Each segment written to is fdatasynced; the directory is fsynced if a
//!    segment was created, so the new names are durable before the head refers to them.
//! 3. Commit. Format 2: write the head, as the next commit number, into the slot the
//!    current head is not in, and fdatasync it. Format 3: write it into the slot that does
//!    not hold the last synced commit (the current head's slot if that is unsynced, the
//!    other one if it is synced), and fdatasync it only if the batch created a segment, so
//!    that a lagging head never names an older segment than the batches it lost. Only then
//!    are the offsets returned.
//!
//! The batch is durable from the segment's sync, and visible from the head's write: a
//! reader never sees a record that is not durable. One fdatasync per append instead of two
//! saves about 100 µs of CPU per append on the machines Tribunal is measured on.
//!
//! Why two slots in place rather than replacing a file: replacing (`head.tmp`, fsync,
//! rename, directory fsync) costs two more syncs per batch, each an ext4 journal commit.
//! The head file never changes size, so its fdatasync, when there is one, writes one
//! block and no metadata. A crash during a slot write leaves the slot torn, hence invalid,
//! and the other slot wins: in format 2 the previous commit, and in format 3 the last
//! synced one, which the repair walks forward from. Readers take no lock: a slot caught
//! mid-write fails its CRC and the other slot is an older commit, which a reader that has
//! seen a newer one reads again; and a segment behind the head segment is sealed (never
//! written again), so its file size is its committed size.
//!
//! Timestamps are the appender's wall clock (like Kafka's LogAppendTime), one per batch,
//! clamped to be no earlier than the previous batch's (kept in the head): the log is the
//! source of stream time, and stream time must not step back with the clock.

mod append;
mod format;
mod reader;
pub mod watch;

pub use reader::LocalLogReader;

use append::SegmentWriter;
use format::{Format, Head, HeadFile, HeadRead};

use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use tribunal_shards::envelope::MAX_RECORD_BYTES;

/// Where a segment rolls by default (the next record would take it past this size).
pub const DEFAULT_SEGMENT_MAX_SIZE_BYTES: u64 = 64 * 1024 * 1024;
/// Allowed segment size bounds. Small ones are for tests.
pub const SEGMENT_MAX_SIZE_BYTES_RANGE: std::ops::RangeInclusive<u64> = 1024..=(1 << 40);
/// Largest batch one `append` takes (headers included), so that a batch is bounded in
/// memory and in the time the lock is held.
pub const MAX_BATCH_SIZE_BYTES: u64 = 1 << 30;
/// `len`, `crc32c`, `timestamp_ms`.
pub const RECORD_HEADER_SIZE_BYTES: u64 = 16;

/// Format 3's head.
const HEAD_V3_MAGIC: [u8; 8] = *b"TRBHEAD3";
/// Format 2's head: the same slots, without `marked_from_offset` and `synced`.
const HEAD_V2_MAGIC: [u8; 8] = *b"TRBHEAD2";
/// Bytes of a slot that carry data (52 in format 2); the rest of the slot is zeros.
const HEAD_SLOT_USED_BYTES: usize = 68;
const HEAD_SLOT_SIZE_BYTES: u64 = 4096;
const HEAD_FILE_SIZE_BYTES: u64 = 2 * HEAD_SLOT_SIZE_BYTES;
/// The first format: one 44-byte head, replaced by rename. Read, then upgraded.
const HEAD_V1_MAGIC: [u8; 8] = *b"TRBHEAD1";
const HEAD_V1_SIZE_BYTES: usize = 44;
/// How long a reader (no lock) goes on reading the head while a slot reads torn, the head
/// is older than one it has already seen, or no slot is valid: a slot caught mid-write.
const HEAD_READ_PATIENCE: std::time::Duration = std::time::Duration::from_millis(100);
/// Looks that only yield the processor before the reader starts sleeping between them.
const HEAD_READ_SPINS: u32 = 64;
const HEAD_READ_BACKOFF: std::time::Duration = std::time::Duration::from_micros(50);
const HEAD_FILE: &str = "head";
const HEAD_TEMP_FILE: &str = "head.tmp";
const LOCK_FILE: &str = "lock";
const SEGMENT_SUFFIX: &str = ".seg";
const SEGMENT_NAME_DIGITS: usize = 20;
/// An appender writes a segment in chunks of about this size.
const WRITE_BUFFER_SIZE_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LocalLogError {
    #[error("{context} {}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("corrupt record at byte {position_bytes} of segment {} (offset {offset}): {reason}", segment.display())]
    CorruptRecord { segment: PathBuf, position_bytes: u64, offset: u64, reason: String },
    #[error("corrupt head file {}: {reason}", path.display())]
    CorruptHead { path: PathBuf, reason: String },
    /// The files disagree with each other: committed bytes missing, a segment gone, or a
    /// head that moved backwards (the directory was replaced under a reader).
    #[error("inconsistent log at {}: {reason}", path.display())]
    Inconsistent { path: PathBuf, reason: String },
    #[error("record {index} of the batch is {size_bytes} bytes, more than the {MAX_RECORD_BYTES}-byte limit")]
    RecordTooLarge { index: usize, size_bytes: usize },
    #[error("batch is {size_bytes} bytes, more than the {MAX_BATCH_SIZE_BYTES}-byte limit")]
    BatchTooLarge { size_bytes: u64 },
    #[error("offset {from_offset} is past the end of the log (next offset {end_offset})")]
    OffsetOutOfRange { from_offset: u64, end_offset: u64 },
}

type Result<T, E = LocalLogError> = std::result::Result<T, E>;

fn io_error<'a>(context: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LocalLogError + 'a {
    move |source| LocalLogError::Io { context, path: path.to_path_buf(), source }
}

fn inconsistent(path: &Path, reason: String) -> LocalLogError {
    LocalLogError::Inconsistent { path: path.to_path_buf(), reason }
}

fn segment_path(dir: &Path, base_offset: u64) -> PathBuf {
    dir.join(format!("{base_offset:0width$}{SEGMENT_SUFFIX}", width = SEGMENT_NAME_DIGITS))
}

/// The first offsets of the segment files in `dir`, sorted. Other files are ignored.
fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error("listing", dir))? {
        let entry = entry.map_err(io_error("listing", dir))?;
        let name = entry.file_name();
        let Some(digits) = name.to_str().and_then(|name| name.strip_suffix(SEGMENT_SUFFIX)) else { continue };
        if digits.len() == SEGMENT_NAME_DIGITS && digits.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(base) = digits.parse::<u64>() {
                bases.push(base);
            }
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("syncing directory", dir))
}

fn wall_clock_ms() -> u64 {
    // A clock before 1970 reads as 0; `append` clamps to the previous timestamp anyway.
    let elapsed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}

/// Bit 31 of a format 3 record's length field: the last record of its batch.
const BATCH_END_MARK: u32 = 1 << 31;

/// A record's CRC32C: over the timestamp and the payload, and in marked framing first over
/// the length field as written (`Some(field)`), so that a flipped mark is caught.
fn record_crc(len_field: Option<u32>, timestamp_ms: u64, payload: &[u8]) -> u32 {
    let crc = len_field.map_or(0, |field| crc32c::crc32c(&field.to_le_bytes()));
    crc32c::crc32c_append(crc32c::crc32c_append(crc, &timestamp_ms.to_le_bytes()), payload)
}

/// Appends one encoded record to `out`: plain framing when `batch_end` is `None`, marked
/// framing (with the batch-end mark if `Some(true)`) otherwise.
fn encode_record(out: &mut Vec<u8>, payload: &[u8], timestamp_ms: u64, batch_end: Option<bool>) {
    let len = u32::try_from(payload.len()).expect("bounded by MAX_RECORD_BYTES");
    let len_field = if batch_end == Some(true) { len | BATCH_END_MARK } else { len };
    let crc = record_crc(batch_end.map(|_| len_field), timestamp_ms, payload);
    out.extend_from_slice(&len_field.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    out.extend_from_slice(payload);
}
/// A handle on a local log directory, for appending and for creating readers.
pub struct LocalLog {
    dir: PathBuf,
    appending: Mutex<Appending>,
    segment_max_size_bytes: u64,
    /// Syncs (fdatasync, fsync) this handle's appends issued, for `/metrics`.
    syncs: Arc<AtomicU64>,
}

/// What only the holder of the append lock touches.
struct Appending {
    /// flock(2)ed around each batch. flock belongs to the open file description, so two
    /// threads of this process sharing it would both get in; the mutex serialises them.
    lock_file: File,
    head_file: HeadFile,
}

impl LocalLog {
    /// Opens the log in `dir`, creating the directory and an empty log if needed.
    pub fn open(dir: impl Into<PathBuf>) -> Result<LocalLog> {
        Self::open_with(dir, DEFAULT_SEGMENT_MAX_SIZE_BYTES)
    }

    /// Like [`LocalLog::open`], with the size at which this handle's appends roll a segment.
    /// Appenders with different bounds may share a log: the bound is not part of the format.
    pub fn open_with(dir: impl Into<PathBuf>, segment_max_size_bytes: u64) -> Result<LocalLog> {
        assert!(
            SEGMENT_MAX_SIZE_BYTES_RANGE.contains(&segment_max_size_bytes),
            "segment bound {segment_max_size_bytes}"
        );
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_error("creating directory", &dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_error("opening", &lock_path))?;
        let head_file = HeadFile::appender(&dir);
        let appending = Mutex::new(Appending { lock_file, head_file });
        let log = LocalLog { dir, appending, segment_max_size_bytes, syncs: Arc::default() };
        log.locked(|head_file| log.create_or_upgrade(head_file))?;
        Ok(log)
    }

    /// Counts the syncs this handle's appends issue (the segment's, the directory's and the
    /// head's), for `/metrics`.
    pub fn sync_counter(&self) -> Arc<AtomicU64> {
        self.syncs.clone()
    }

    /// The offset the next appended record will get.
    pub fn end_offset(&self) -> Result<u64> {
        Ok(HeadFile::reader(&self.dir).read_unlocked(0)?.next_offset)
    }

    /// Appends `payloads` as one batch: all of them or none, at consecutive offsets, all
    /// with the same timestamp. Returns their offsets once they are durable.
    pub fn append(&self, payloads: &[Vec<u8>]) -> Result<Range<u64>> {
        let mut batch_size_bytes: u64 = 0;
        for (index, payload) in payloads.iter().enumerate() {
            if payload.len() > MAX_RECORD_BYTES {
                return Err(LocalLogError::RecordTooLarge { index, size_bytes: payload.len() });
            }
            batch_size_bytes += RECORD_HEADER_SIZE_BYTES + payload.len() as u64;
        }
        if batch_size_bytes > MAX_BATCH_SIZE_BYTES {
            return Err(LocalLogError::BatchTooLarge { size_bytes: batch_size_bytes });
        }
        if payloads.is_empty() {
            let end_offset = self.end_offset()?;
            return Ok(end_offset..end_offset);
        }
        self.locked(|head_file| {
            let head = self.read_head_locked(head_file)?;
            let (segment, head) = self.repair(head_file, head)?;
            let timestamp_ms = head.last_timestamp_ms.max(wall_clock_ms());
            let buffer_bytes = (batch_size_bytes as usize).min(WRITE_BUFFER_SIZE_BYTES);
            let mut writer = SegmentWriter::new(&self.dir, head, segment, buffer_bytes);
            for (index, payload) in payloads.iter().enumerate() {
                let batch_end = index + 1 == payloads.len();
                writer.push(payload, timestamp_ms, self.segment_max_size_bytes, batch_end)?;
            }
            let (written, syncs) = writer.finish()?;
            // Format 3: the segment's sync made the batch durable; the head is a hint,
            // synced only when it names a new segment (TailBatchesAdopted never looks
            // past the segment a lagging head names).
            let created_segment = written.segment_base_offset != head.segment_base_offset;
            let synced = head.format == Format::Plain || created_segment;
            let committed = Head { last_timestamp_ms: timestamp_ms, sequence: head.sequence + 1, synced, ..written };
            assert_eq!(committed.next_offset, head.next_offset + payloads.len() as u64);
            let head_syncs = head_file.commit(&committed)?;
            self.syncs.fetch_add(syncs + head_syncs, Ordering::Relaxed);
            Ok(head.next_offset..committed.next_offset)
        })
    }

    /// Switches the log to format 3 (one fdatasync per append) if it is in format 2, and
    /// says whether it did. Only once every process that opens the log can read format 3:
    /// an older binary refuses the new head.
    pub fn upgrade(&self) -> Result<bool> {
        self.locked(|head_file| {
            let head = self.read_head_locked(head_file)?;
            if head.format == Format::Marked {
                return Ok(false);
            }
            let (_, head) = self.repair(head_file, head)?;
            // The next batch rolls, so the head segment keeps its plain framing.
            let upgraded = Head {
                sequence: head.sequence + 1,
                format: Format::Marked,
                marked_from_offset: head.next_offset,
                synced: true,
                ..head
            };
            head_file.commit(&upgraded)?;
            // Twice, so that no format 2 slot is left for an older binary to take for the
            // head (and append to in format 2): it refuses the log at once instead.
            head_file.commit(&Head { sequence: upgraded.sequence + 1, ..upgraded })?;
            Ok(true)
        })
    }

    /// Reads the head under the lock. A head of the first format (an older binary rewrote
    /// it since this handle opened) is rewritten in format 2 first, since a slot can only
    /// be committed into a whole two-slot file.
    fn read_head_locked(&self, head_file: &mut HeadFile) -> Result<Head> {
        match head_file.read_locked()? {
            HeadRead::Current(head) => Ok(head),
            HeadRead::FirstFormat(head) => {
                head.create_file(&self.dir)?;
                Ok(head)
            }
        }
    }

    /// A reader positioned at `from_offset` (at most the current end offset).
    pub fn reader(&self, from_offset: u64) -> Result<LocalLogReader> {
        let mut head_file = HeadFile::reader(&self.dir);
        let head = head_file.read_unlocked(0)?;
        if from_offset > head.next_offset {
            return Err(LocalLogError::OffsetOutOfRange { from_offset, end_offset: head.next_offset });
        }
        // Segments past the head segment are a crashed appender's leftovers: not ours.
        let base_offset = list_segments(&self.dir)?
            .into_iter()
            .filter(|&base| base <= from_offset && base <= head.segment_base_offset)
            .max()
            .ok_or_else(|| inconsistent(&self.dir, format!("no segment file holds offset {from_offset}")))?;
        let mut reader = LocalLogReader::open_segment(&self.dir, base_offset, head_file, head.sequence)?;
        // Skipping reads headers only: a damaged payload before `from_offset` is not
        // this reader's concern.
        while reader.next_offset < from_offset {
            let Some(limit_bytes) = reader.readable_limit_bytes(&head)? else {
                let reason = format!("the head commits offset {from_offset} but the segments end before it");
                return Err(inconsistent(&self.dir, reason));
            };
            let (header, _) = reader.read_header(limit_bytes)?;
            reader.position_bytes += RECORD_HEADER_SIZE_BYTES + u64::from(header.len);
            reader.next_offset += 1;
        }
        Ok(reader)
    }

    fn locked<T>(&self, f: impl FnOnce(&mut HeadFile) -> Result<T>) -> Result<T> {
        let lock_path = self.dir.join(LOCK_FILE);
        let mut appending = self.appending.lock().unwrap_or_else(PoisonError::into_inner);
        let Appending { lock_file, head_file } = &mut *appending;
        fs4::fs_std::FileExt::lock_exclusive(&*lock_file).map_err(io_error("locking", &lock_path))?;
        let result = f(head_file);
        let unlocked = fs4::fs_std::FileExt::unlock(&*lock_file).map_err(io_error("unlocking", &lock_path));
        let value = result?;
        unlocked?;
        Ok(value)
    }

    /// Under the lock: the first opener writes the empty log, a head of the first format
    /// is rewritten in format 2, and whatever a crashed appender left is repaired, so that
    /// a reader opened next finds every batch that was durable.
    fn create_or_upgrade(&self, head_file: &mut HeadFile) -> Result<()> {
        if self.dir.join(HEAD_FILE).exists() {
            let head = self.read_head_locked(head_file)?;
            let (_, head) = self.repair(head_file, head)?;
            // A slot torn by a power loss (and not overwritten by a commit of the repair,
            // which would have gone there): commit the head again over it, so that readers,
            // which wait while a slot reads torn, stop waiting.
            if head_file.saw_torn_slot() {
                let syncs = head_file.commit(&Head { sequence: head.sequence + 1, synced: true, ..head })?;
                self.syncs.fetch_add(syncs, Ordering::Relaxed);
            }
            return Ok(());
        }
        // Without a head, any segment with data is a log that lost its commit point:
        // starting afresh over it would silently drop records.
        for base in list_segments(&self.dir)? {
            let path = segment_path(&self.dir, base);
            let size_bytes = fs::metadata(&path).map_err(io_error("reading metadata of", &path))?.len();
            if size_bytes > 0 {
                return Err(inconsistent(&self.dir, format!("{} has data but there is no head file", path.display())));
            }
        }
        let path = segment_path(&self.dir, 0);
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(&path);
        file.and_then(|file| file.sync_all()).map_err(io_error("creating", &path))?;
        sync_dir(&self.dir)?;
        Head::EMPTY.create_file(&self.dir)
    }

    /// Under the lock: adopts the whole batches past a format 3 head (TailBatchesAdopted),
    /// then undoes whatever a crashed appender left past the commit point. Returns the head
    /// segment, opened for writing, and the head the batch goes on from.
    fn repair(&self, head_file: &mut HeadFile, head: Head) -> Result<(File, Head)> {
        let open = |head: &Head| -> Result<(PathBuf, File, u64)> {
            let path = segment_path(&self.dir, head.segment_base_offset);
            let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io_error("opening", &path))?;
            let size_bytes = file.metadata().map_err(io_error("reading metadata of", &path))?.len();
            Ok((path, file, size_bytes))
        };
        let (mut path, mut file, mut size_bytes) = open(&head)?;
        if size_bytes < head.segment_size_bytes {
            let reason = format!("{size_bytes} bytes, but the head commits {} of them", head.segment_size_bytes);
            return Err(inconsistent(&path, reason));
        }
        let mut head = head;
        let mut later_segments = list_segments(&self.dir)?;
        later_segments.retain(|&base| base > head.segment_base_offset);
        let past_head = size_bytes > head.segment_size_bytes || !later_segments.is_empty();
        if past_head && head.marks(head.segment_base_offset) {
            if let Some(adopted) = self.adopt_tail(head_file, &head, &file)? {
                if adopted.segment_base_offset != head.segment_base_offset {
                    (path, file, size_bytes) = open(&adopted)?;
                    later_segments.retain(|&base| base > adopted.segment_base_offset);
                }
                head = adopted;
            }
        }
        if size_bytes > head.segment_size_bytes {
            file.set_len(head.segment_size_bytes).map_err(io_error("truncating the torn tail of", &path))?;
            file.sync_all().map_err(io_error("syncing", &path))?;
        }
        for &base in &later_segments {
            let stale = segment_path(&self.dir, base);
            fs::remove_file(&stale).map_err(io_error("removing uncommitted segment", &stale))?;
        }
        // A commit does not sync the directory, so the removals are made durable here
        // (rare: only after an appender crashed mid-roll).
        if !later_segments.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok((file, head))
    }

    /// Commits the whole batches past `head` (format 3), if there are any, and returns the
    /// head that does. What was found is made durable first: the appender that wrote it
    /// may have died before its syncs.
    fn adopt_tail(&self, head_file: &mut HeadFile, head: &Head, head_segment: &File) -> Result<Option<Head>> {
        let Some(adopted) = walk_whole_batches(&self.dir, head_segment, head)? else { return Ok(None) };
        let mut syncs = 0;
        for base in list_segments(&self.dir)? {
            if (head.segment_base_offset..=adopted.segment_base_offset).contains(&base) {
                let path = segment_path(&self.dir, base);
                let file = File::open(&path).map_err(io_error("opening", &path))?;
                file.sync_data().map_err(io_error("syncing", &path))?;
                syncs += 1;
            }
        }
        if adopted.segment_base_offset != head.segment_base_offset {
            sync_dir(&self.dir)?; // the names of the segments the walk went into
            syncs += 1;
        }
        syncs += head_file.commit(&adopted)?;
        self.syncs.fetch_add(syncs, Ordering::Relaxed);
        tracing::warn!(
            dir = %self.dir.display(),
            from_offset = head.next_offset,
            to_offset = adopted.next_offset,
            "adopted whole batches past the head (an appender died, or the head lagged after a power loss)"
        );
        Ok(Some(adopted))
    }
}

/// Walks a format 3 log from the head's committed end over whole batches: records with a
/// valid header and CRC, timestamps not before the head's, one timestamp per batch, the
/// batch's last record marked. At the exact end of a segment the walk goes on in the
/// segment named by the next offset, if there is one (a roll, in a batch or between two).
/// Returns the head
/// (synced, one commit on) that commits the last whole batch found, or `None`. Stops at
/// the first byte that does not continue a whole batch: a torn tail, which the repair cuts.
fn walk_whole_batches(dir: &Path, head_segment: &File, head: &Head) -> Result<Option<Head>> {
    let mut walk = Walk {
        head: *head,
        segment_base_offset: head.segment_base_offset,
        position_bytes: head.segment_size_bytes,
        next_offset: head.next_offset,
        batch_timestamp_ms: None,
        found: None,
        payload: Vec::with_capacity(MAX_RECORD_BYTES),
    };
    let mut rolled_into: Option<File> = None;
    loop {
        let path = segment_path(dir, walk.segment_base_offset);
        if !walk.segment(rolled_into.as_ref().unwrap_or(head_segment), &path)? {
            return Ok(walk.found);
        }
        let next_path = segment_path(dir, walk.next_offset);
        match File::open(&next_path) {
            Ok(file) => rolled_into = Some(file),
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(walk.found),
            Err(error) => return Err(io_error("opening", &next_path)(error)),
        }
        walk.segment_base_offset = walk.next_offset;
        walk.position_bytes = 0;
    }
}

/// Where [`walk_whole_batches`] has got to.
struct Walk {
    head: Head,
    segment_base_offset: u64,
    position_bytes: u64,
    next_offset: u64,
    /// The timestamp of the batch being walked, from its first record; `None` between
    /// batches.
    batch_timestamp_ms: Option<u64>,
    /// The head that commits the last whole batch so far.
    found: Option<Head>,
    payload: Vec<u8>,
}

impl Walk {
    /// Walks one segment from `position_bytes`. Returns whether it ended exactly at the end
    /// of the file, on a record boundary (rather than at a torn or invalid record).
    fn segment(&mut self, file: &File, path: &Path) -> Result<bool> {
        use std::io::{BufRead as _, BufReader, ErrorKind, Read as _, Seek as _, SeekFrom};
        let mut input = BufReader::with_capacity(MAX_RECORD_BYTES + RECORD_HEADER_SIZE_BYTES as usize, file);
        input.seek(SeekFrom::Start(self.position_bytes)).map_err(io_error("reading", path))?;
        loop {
            if input.fill_buf().map_err(io_error("reading", path))?.is_empty() {
                return Ok(true);
            }
            let mut header_bytes = [0u8; RECORD_HEADER_SIZE_BYTES as usize];
            match input.read_exact(&mut header_bytes) {
                Err(error) if error.kind() == ErrorKind::UnexpectedEof => return Ok(false),
                other => other.map_err(io_error("reading", path))?,
            }
            let header = reader::RecordHeader::decode(&header_bytes, true);
            let floor_ms = self.found.map_or(self.head.last_timestamp_ms, |found| found.last_timestamp_ms);
            let same_batch = self.batch_timestamp_ms.is_none_or(|batch_ms| batch_ms == header.timestamp_ms);
            if header.len as usize > MAX_RECORD_BYTES || header.timestamp_ms < floor_ms || !same_batch {
                return Ok(false);
            }
            self.payload.resize(header.len as usize, 0);
            match input.read_exact(&mut self.payload) {
                Err(error) if error.kind() == ErrorKind::UnexpectedEof => return Ok(false),
                other => other.map_err(io_error("reading", path))?,
            }
            if record_crc(header.len_field, header.timestamp_ms, &self.payload) != header.crc {
                return Ok(false);
            }
            self.position_bytes += RECORD_HEADER_SIZE_BYTES + u64::from(header.len);
            self.next_offset += 1;
            self.batch_timestamp_ms = Some(header.timestamp_ms);
            if header.batch_end() {
                self.found = Some(Head {
                    sequence: self.head.sequence + 1,
                    next_offset: self.next_offset,
                    segment_base_offset: self.segment_base_offset,
                    segment_size_bytes: self.position_bytes,
                    last_timestamp_ms: header.timestamp_ms,
                    synced: true,
                    ..self.head
                });
                self.batch_timestamp_ms = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt as _;

    use tribunal_shards::usher::Record;

    fn payloads(prefix: &str, count: usize) -> Vec<Vec<u8>> {
        (0..count).map(|i| format!("{prefix}-{i}").into_bytes()).collect()
    }

    fn read_all(log: &LocalLog, from_offset: u64) -> Vec<Record> {
        let mut reader = log.reader(from_offset).unwrap();
        let mut out = Vec::new();
        while reader.poll(7, &mut out).unwrap() > 0 {}
        out
    }

    #[test]
    fn reader_tails_appends_across_segment_rolls() {
        let dir = tempfile::tempdir().unwrap();
        let log = LocalLog::open_with(dir.path(), 1024).unwrap();
        let mut reader = log.reader(0).unwrap();
        let mut out = Vec::new();
        assert_eq!(reader.poll(100, &mut out).unwrap(), 0);

        assert_eq!(log.append(&payloads("a", 2)).unwrap(), 0..2);
        assert_eq!(reader.poll(100, &mut out).unwrap(), 2);
        assert_eq!(reader.poll(100, &mut out).unwrap(), 0);

        // About 60 bytes a record: 200 records need a dozen 1 KiB segments.
        let big: Vec<Vec<u8>> = (0..200).map(|i| format!("{i:0>44}").into_bytes()).collect();
        assert_eq!(log.append(&big).unwrap(), 2..202);
        assert!(list_segments(dir.path()).unwrap().len() > 10);
        while reader.poll(13, &mut out).unwrap() > 0 {}
        assert_eq!(out.len(), 202);
        for (index, record) in out.iter().enumerate() {
            assert_eq!(record.offset, index as u64);
            assert_eq!(record.partition, 0);
        }
        assert_eq!(out[2..].iter().map(|r| r.payload.clone()).collect::<Vec<_>>(), big);
        assert!(out.windows(2).all(|w| w[0].timestamp_ms <= w[1].timestamp_ms));
        assert_eq!(log.end_offset().unwrap(), 202);

        // Every start offset, including one at a segment boundary and the end.
        for from_offset in [0, 1, 2, 57, 201, 202] {
            let tail = read_all(&log, from_offset);
            assert_eq!(tail.len() as u64, 202 - from_offset);
            assert!(tail.iter().zip(from_offset..).all(|(record, offset)| record.offset == offset));
        }
        for base in list_segments(dir.path()).unwrap() {
            assert_eq!(read_all(&log, base)[0].offset, base);
        }
        assert!(matches!(log.reader(203), Err(LocalLogError::OffsetOutOfRange { from_offset: 203, end_offset: 202 })));
    }

    #[test]
    fn timestamps_never_go_back_when_the_clock_does() {
        let dir = tempfile::tempdir().unwrap();
        let log = LocalLog::open(dir.path()).unwrap();
        log.append(&payloads("a", 1)).unwrap();
        // Pretend an earlier batch was stamped far in the future (a clock stepped back since).
        let mut head = HeadFile::reader(dir.path()).read_unlocked(0).unwrap();
        let future_ms = wall_clock_ms() + 1_000_000_000;
        head.last_timestamp_ms = future_ms;
        head.sequence += 1;
        HeadFile::appender(dir.path()).commit(&head).unwrap();
        log.append(&payloads("b", 2)).unwrap();
        let records = read_all(&log, 0);
        assert!(records[0].timestamp_ms < future_ms);
        assert_eq!(records[1].timestamp_ms, future_ms);
        assert_eq!(records[2].timestamp_ms, future_ms);
    }

    #[test]
    fn an_oversized_record_refuses_the_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let log = LocalLog::open(dir.path()).unwrap();
        let batch = vec![b"ok".to_vec(), vec![b'x'; MAX_RECORD_BYTES + 1]];
        let error = log.append(&batch).unwrap_err();
        assert!(matches!(error, LocalLogError::RecordTooLarge { index: 1, .. }), "{error}");
        assert_eq!(log.end_offset().unwrap(), 0);
        // The largest allowed record fits, even in a segment smaller than it.
        let small = LocalLog::open_with(dir.path(), 1024).unwrap();
        assert_eq!(small.append(&[vec![b'x'; MAX_RECORD_BYTES], b"y".to_vec()]).unwrap(), 0..2);
        assert_eq!(read_all(&log, 0)[0].payload.len(), MAX_RECORD_BYTES);
        assert_eq!(list_segments(dir.path()).unwrap(), vec![0, 1]);
    }

    #[test]
    fn uncommitted_bytes_are_never_read_and_the_next_append_removes_them() {
        let dir = tempfile::tempdir().unwrap();
        let log = LocalLog::open_with(dir.path(), 1024).unwrap();
        log.append(&payloads("a", 3)).unwrap();
        let mut reader = log.reader(0).unwrap();
        let mut out = Vec::new();
        assert_eq!(reader.poll(100, &mut out).unwrap(), 3);

        // A crashed appender: a well-formed record past the commit point, and a rolled
        // segment that no head ever named.
        let segment = segment_path(dir.path(), 0);
        let committed_size_bytes = fs::metadata(&segment).unwrap().len();
        let mut bytes = fs::read(&segment).unwrap();
        bytes.extend_from_within(..19);
        fs::write(&segment, &bytes).unwrap();
        fs::write(segment_path(dir.path(), 4), b"stale").unwrap();
        assert_eq!(reader.poll(100, &mut out).unwrap(), 0);
        assert_eq!(read_all(&log, 0).len(), 3);

        log.append(&payloads("b", 1)).unwrap();
        assert!(!segment_path(dir.path(), 4).exists());
        assert_eq!(fs::metadata(&segment).unwrap().len(), committed_size_bytes + 19);
        assert_eq!(reader.poll(100, &mut out).unwrap(), 1);
        assert_eq!(out[3].payload, b"b-0");
    }

    #[test]
    fn appenders_in_threads_and_handles_of_one_process_exclude_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let shared = LocalLog::open_with(dir.path(), 2048).unwrap();
        let ranges = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let (shared, ranges, dir) = (&shared, &ranges, dir.path());
                scope.spawn(move || {
                    // Half the threads share one handle, half open their own.
                    let own = LocalLog::open_with(dir, 2048).unwrap();
                    let log = if thread % 2 == 0 { shared } else { &own };
                    for batch in 0..20 {
                        let range = log.append(&payloads(&format!("t{thread}-b{batch}"), 3)).unwrap();
                        ranges.lock().unwrap().push(range);
                    }
                });
            }
        });
        let mut ranges = ranges.into_inner().unwrap();
        ranges.sort_by_key(|range| range.start);
        assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
        let records = read_all(&shared, 0);
        assert_eq!(records.len(), 240);
        let mut seen: Vec<_> = records.iter().map(|r| r.payload.clone()).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 240);
    }

    #[test]
    fn a_reader_tails_while_appenders_write() {
        let dir = tempfile::tempdir().unwrap();
        let log = LocalLog::open_with(dir.path(), 1024).unwrap();
        let mut reader = log.reader(0).unwrap();
        let mut out = Vec::new();
        std::thread::scope(|scope| {
            for thread in 0..3 {
                let dir = dir.path();
                scope.spawn(move || {
                    let log = LocalLog::open_with(dir, 1024).unwrap();
                    for batch in 0..30 {
                        log.append(&payloads(&format!("t{thread}-b{batch}"), 2)).unwrap();
                    }
                });
            }
            while out.len() < 180 {
                reader.poll(5, &mut out).unwrap();
                std::thread::yield_now();
            }
        });
        assert_eq!(reader.poll(5, &mut out).unwrap(), 0);
        assert!(out.iter().zip(0..).all(|(record, offset)| record.offset == offset));
        assert!(out.windows(2).all(|w| w[0].timestamp_ms <= w[1].timestamp_ms));
        let mut seen: Vec<_> = out.iter().map(|r| r.payload.clone()).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 180);
    }

    fn damage_slot(dir: &Path, slot: u64) {
        let file = OpenOptions::new().read(true).write(true).open(dir.join(HEAD_FILE)).unwrap();
        let at = slot * HEAD_SLOT_SIZE_BYTES + 17;
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 1], at).unwrap();
    }

    /// An empty log in format 2, as an older binary made it.
    fn plain_log(dir: &Path, segment_max_size_bytes: u64) -> LocalLog {
        drop(LocalLog::open(dir).unwrap());
        Head { format: Format::Plain, ..Head::EMPTY }.create_file(dir).unwrap();
        LocalLog::open_with(dir, segment_max_size_bytes).unwrap()
    }

    fn slots(dir: &Path) -> [Head; 2] {
        let bytes = fs::read(dir.join(HEAD_FILE)).unwrap();
        assert_eq!(bytes.len() as u64, HEAD_FILE_SIZE_BYTES);
        [0, 1].map(|slot| {
            let at = (slot * HEAD_SLOT_SIZE_BYTES) as usize;
            Head::decode_slot(bytes[at..at + HEAD_SLOT_USED_BYTES].try_into().unwrap(), slot).unwrap()
        })
    }

    fn slots_of_new_log(dir: &Path) -> Head {
        let bytes = fs::read(dir.join(HEAD_FILE)).unwrap();
        assert!(bytes[HEAD_SLOT_SIZE_BYTES as usize..].iter().all(|b| *b == 0), "slot 1 never written");
        Head::decode_slot(bytes[..HEAD_SLOT_USED_BYTES].try_into().unwrap(), 0).unwrap()
    }

    fn names(records: Vec<Record>) -> Vec<String> {
        records.into_iter().map(|r| String::from_utf8(r.payload).unwrap()).collect()
    }

    // spec: LocalLog.HeadCommitted (format 2: commit n goes to slot n mod 2, in place, synced)
    #[test]
    fn format_2_commits_alternate_between_the_two_slots() {
        let dir = tempfile::tempdir().unwrap();
        let log = plain_log(dir.path(), DEFAULT_SEGMENT_MAX_SIZE_BYTES);
        let inode = |dir: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(dir.join(HEAD_FILE)).unwrap());
        let created_inode = inode(dir.path());
        for sequence in 1..=3u64 {
            let syncs_before = log.sync_counter().load(Ordering::Relaxed);
            log.append(&payloads("a", 1)).unwrap();
            assert_eq!(log.sync_counter().load(Ordering::Relaxed) - syncs_before, 2, "the segment's and the head's");
            for (slot, decoded) in slots(dir.path()).into_iter().enumerate() {
                let expected = if slot as u64 == sequence % 2 { sequence } else { sequence - 1 };
                assert_eq!(
                    (decoded.sequence, decoded.next_offset, decoded.format),
                    (expected, expected, Format::Plain)
                );
            }
        }
        assert_eq!(inode(dir.path()), created_inode, "the head is rewritten in place, never replaced");
    }

    // spec: LocalLog.HeadCommitted (format 3: one sync per append; the slot not written keeps the last synced commit)
    // spec: LocalLog.EmptyLogCreated (a new log is format 3)
    #[test]
    fn format_3_appends_sync_once_and_keep_a_synced_commit_in_the_other_slot() {
        let dir = tempfile::tempdir().unwrap();
        let log = LocalLog::open_with(dir.path(), 1024).unwrap();
        assert_eq!(slots_of_new_log(dir.path()).format, Format::Marked);
        let syncs = log.sync_counter();
        for sequence in 1..=3u64 {
            let syncs_before = syncs.load(Ordering::Relaxed);
            log.append(&payloads("a", 1)).unwrap();
            // The first commit after a synced one syncs the head file first (its writer
            // may have died before the sync), then never again until the next synced one.
            let expected = if sequence == 1 { 2 } else { 1 };
            assert_eq!(syncs.load(Ordering::Relaxed) - syncs_before, expected, "the segment's only");
            let [zero, one] = slots(dir.path());
            assert_eq!((zero.sequence, zero.synced), (0, true), "commit 0 stays, synced");
            assert_eq!((one.sequence, one.next_offset, one.synced), (sequence, sequence, false));
        }
        // A batch that rolls a segment is committed synced, over the unsynced slot.
        let big: Vec<Vec<u8>> = (0..40).map(|i| format!("{i:0>44}").into_bytes()).collect();
        log.append(&big).unwrap();
        let [zero, one] = slots(dir.path());
        assert_eq!((zero.sequence, one.sequence, one.synced), (0, 4, true));
        assert_ne!(one.segment_base_offset, 0);
        // The next unsynced commit goes to the other slot, keeping commit 4.
        log.append(&payloads("b", 1)).unwrap();
        let [zero, one] = slots(dir.path());
        assert_eq!((zero.sequence, zero.synced, one.sequence, one.synced), (5, false, 4, true));
        assert_eq!(read_all(&log, 0).len(), 44);
    }

    // spec: LocalLog.AppenderDied (format 2: a torn head slot: the previous commit wins, the batch never happened)
    #[test]
    fn format_2_a_torn_head_slot_leaves_the_previous_commit() {
        let dir = tempfile::tempdir().unwrap();
        let log = plain_log(dir.path(), DEFAULT_SEGMENT_MAX_SIZE_BYTES);
        log.append(&payloads("a", 2)).unwrap(); // commit 1, slot 1
        log.append(&payloads("b", 2)).unwrap(); // commit 2, slot 0
        log.append(&payloads("c", 2)).unwrap(); // commit 3, slot 1
        damage_slot(dir.path(), 1);
        assert_eq!(names(read_all(&log, 0)), ["a-0", "a-1", "b-0", "b-1"]);
        // The next append repairs c's bytes away and commits over the torn slot.
        assert_eq!(log.append(&payloads("d", 1)).unwrap(), 4..5);
        assert_eq!(names(read_all(&log, 0)), ["a-0", "a-1", "b-0", "b-1", "d-0"]);
    }

    // spec: LocalLog.TailBatchesAdopted (a head that lags its segment, as after a power loss, is walked forward over whole batches only)
    #[test]
    fn a_lagging_head_is_walked_forward_over_whole_batches_and_a_torn_one_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let log = LocalLog::open(dir.path()).unwrap();
        log.append(&payloads("a", 1)).unwrap();
        let lagging_head = fs::read(dir.path().join(HEAD_FILE)).unwrap();
        log.append(&payloads("b", 2)).unwrap();
        log.append(&payloads("c", 3)).unwrap();
        let last_timestamp_ms = HeadFile::reader(dir.path()).read_unlocked(0).unwrap().last_timestamp_ms;
        drop(log);

        // Power lost: the head's last writes never reached the disk, and a batch was cut
        // short (two records of three, the last one without its mark).
        fs::write(dir.path().join(HEAD_FILE), &lagging_head).unwrap();
        let segment = segment_path(dir.path(), 0);
        let committed_size_bytes = fs::metadata(&segment).unwrap().len();
        let mut torn = Vec::new();
        encode_record(&mut torn, b"d-0", last_timestamp_ms, Some(false));
        encode_record(&mut torn, b"d-1", last_timestamp_ms, Some(false));
        let file = OpenOptions::new().append(true).open(&segment).unwrap();
        std::io::Write::write_all(&mut &file, &torn).unwrap();
        assert_eq!(HeadFile::reader(dir.path()).read_unlocked(0).unwrap().next_offset, 1, "the head lags");

        // Opening the log repairs it: every whole batch is back, the torn one is gone.
        let log = LocalLog::open(dir.path()).unwrap();
        assert_eq!(names(read_all(&log, 0)), ["a-0", "b-0", "b-1", "c-0", "c-1", "c-2"]);
        assert_eq!(fs::metadata(&segment).unwrap().len(), committed_size_bytes);
        let head = HeadFile::reader(dir.path()).read_unlocked(0).unwrap();
        assert_eq!((head.next_offset, head.last_timestamp_ms, head.synced), (6, last_timestamp_ms, true));
        assert_eq!(log.append(&payloads("e", 1)).unwrap(), 6..7);
    }

    // spec: LocalLog.TailBatchesAdopted (a damaged or out-of-order record ends the walk: what follows is cut)
    // spec: LocalLogFormat.RecordFraming (the CRC covers the mark)
    #[test]
    fn the_walk_stops_at_a_bad_crc_a_flipped_mark_or_a_bad_timestamp() {
        for damage in ["crc", "mark", "timestamp", "below the head"] {
            let dir = tempfile::tempdir().unwrap();
            let log = LocalLog::open(dir.path()).unwrap();
            log.append(&payloads("a", 1)).unwrap();
            let head = HeadFile::reader(dir.path()).read_unlocked(0).unwrap();
            let ms = head.last_timestamp_ms;
            let mut tail = Vec::new();
            encode_record(&mut tail, b"b-0", ms, Some(true)); // a whole batch: adopted
            let whole_size_bytes = head.segment_size_bytes + tail.len() as u64;
            let at = tail.len();
            encode_record(&mut tail, b"c-0", ms + 1, Some(false));
            encode_record(&mut tail, b"c-1", ms + 1, Some(true));
            match damage {
                "crc" => tail[at + 16] ^= 1,
                "mark" => tail[at + 3] ^= 0x80, // marks c-0 as a batch end without its CRC knowing
                "below the head" => {
                    tail.truncate(at);
                    encode_record(&mut tail, b"c-0", ms - 1, Some(true));
                }
                _ => {
                    let len = tail.len();
                    tail.truncate(len - 19);
                    encode_record(&mut tail, b"c-1", ms + 2, Some(true));
                }
            }
            let segment = segment_path(dir.path(), 0);
            let file = OpenOptions::new().append(true).open(&segment).unwrap();
            std::io::Write::write_all(&mut &file, &tail).unwrap();
            drop(log);
            let log = LocalLog::open(dir.path()).unwrap();
            assert_eq!(names(read_all(&log, 0)), ["a-0", "b-0"], "{damage}");
            assert_eq!(fs::metadata(&segment).unwrap().len(), whole_size_bytes, "{damage}");
        }
    }

    // spec: LocalLog.HeadCommitted (format 3: a torn unsynced slot leaves the synced one, whose batches the walk finds again)
    // spec: LocalLog.AppenderDied (format 3: whole batches past a valid head are adopted, not cut)
    #[test]
    fn format_3_a_torn_head_slot_leaves_the_synced_commit_and_the_walk_recovers_every_batch() {
        let dir = tempfile::tempdir().unwrap();
        let log = LocalLog::open(dir.path()).unwrap();
        for prefix in ["a", "b", "c"] {
            log.append(&payloads(prefix, 2)).unwrap(); // commits 1..=3, all in slot 1, unsynced
        }
        damage_slot(dir.path(), 1);
        // Through the append's repair, not only at opening.
        assert_eq!(log.append(&payloads("d", 1)).unwrap(), 6..7);
        assert_eq!(names(read_all(&log, 0)), ["a-0", "a-1", "b-0", "b-1", "c-0", "c-1", "d-0"]);
        // The adoption (commit 1 again, one past the head it walked from) went into the
        // torn slot, synced; commit 0 stayed until then, and d's commit went beside it.
        let [zero, one] = slots(dir.path());
        assert_eq!((zero.sequence, zero.synced, one.sequence, one.synced), (2, false, 1, true));
        assert_eq!((one.next_offset, zero.next_offset), (6, 7));
    }

    // spec: LocalLog.HeadCommitted (format 3: with the synced slot damaged, the next commit goes there, synced)
    #[test]
    fn format_3_a_damaged_synced_slot_is_replaced_before_the_unsynced_one_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let log = LocalLog::open(dir.path()).unwrap();
        log.append(&payloads("a", 1)).unwrap(); // commit 1, slot 1, unsynced
        damage_slot(dir.path(), 0); // commit 0, the synced one
        log.append(&payloads("b", 1)).unwrap();
        let [zero, one] = slots(dir.path());
        assert_eq!((zero.sequence, zero.synced), (2, true), "the damaged slot, synced");
        assert_eq!((one.sequence, one.synced), (1, false), "the only valid slot was left alone");
        log.append(&payloads("c", 1)).unwrap();
        let [zero, one] = slots(dir.path());
        assert_eq!((zero.sequence, one.sequence, one.synced), (2, 3, false));
        assert_eq!(names(read_all(&log, 0)), ["a-0", "b-0", "c-0"]);
    }

    // spec: LocalLog.TailBatchesAdopted (the walk goes on into the segment a roll created, whose synced head was lost)
    #[test]
    fn the_walk_follows_a_batch_into_the_segment_its_roll_created() {
        let dir = tempfile::tempdir().unwrap();
        let log = LocalLog::open_with(dir.path(), 1024).unwrap();
        log.append(&payloads("a", 1)).unwrap();
        let lagging_head = fs::read(dir.path().join(HEAD_FILE)).unwrap();
        // About 60 bytes a record: this batch fills segment 0 and goes on in later ones.
        let big: Vec<Vec<u8>> = (0..40).map(|i| format!("{i:0>44}").into_bytes()).collect();
        log.append(&big).unwrap();
        log.append(&payloads("b", 2)).unwrap();
        let segments = list_segments(dir.path()).unwrap();
        assert!(segments.len() >= 3, "{segments:?}");
        drop(log);

        // The power went before any head write after commit 1 reached the disk.
        fs::write(dir.path().join(HEAD_FILE), &lagging_head).unwrap();
        let log = LocalLog::open_with(dir.path(), 1024).unwrap();
        let records = names(read_all(&log, 0));
        assert_eq!(records.len(), 43);
        assert_eq!(records[41..], ["b-0", "b-1"]);
        assert_eq!(list_segments(dir.path()).unwrap(), segments, "no segment was cut");
        let head = HeadFile::reader(dir.path()).read_unlocked(0).unwrap();
        assert_eq!((head.segment_base_offset, head.next_offset), (*segments.last().unwrap(), 43));
    }

    // spec: LocalLog.CorruptRecordStopsReader (a flipped mark in committed data is a CRC mismatch)
    #[test]
    fn a_flipped_mark_in_committed_data_is_a_corrupt_record() {
        let dir = tempfile::tempdir().unwrap();
        let log = LocalLog::open(dir.path()).unwrap();
        log.append(&payloads("a", 2)).unwrap();
        let file = OpenOptions::new().read(true).write(true).open(segment_path(dir.path(), 0)).unwrap();
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, 3).unwrap(); // the high byte of a-0's length field
        file.write_all_at(&[byte[0] ^ 0x80], 3).unwrap();
        let mut reader = log.reader(0).unwrap();
        let error = reader.poll(10, &mut Vec::new()).unwrap_err();
        assert!(matches!(error, LocalLogError::CorruptRecord { offset: 0, .. }), "{error}");
        assert!(error.to_string().contains("checksum mismatch"), "{error}");
    }

    // spec: LocalLog.LogUpgraded (format 2 to 3 by an explicit upgrade, in both slots)
    // spec: LocalLog.RecordPushed (the first batch after an upgrade starts a marked segment)
    #[test]
    fn an_upgraded_log_keeps_its_plain_segments_and_marks_from_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let log = plain_log(dir.path(), DEFAULT_SEGMENT_MAX_SIZE_BYTES);
        log.append(&payloads("a", 3)).unwrap();
        let mut reader = log.reader(0).unwrap();
        let mut out = Vec::new();
        assert_eq!(reader.poll(100, &mut out).unwrap(), 3);
        assert!(LocalLog::open(dir.path()).is_ok(), "opening does not upgrade");
        assert_eq!(HeadFile::reader(dir.path()).read_unlocked(0).unwrap().format, Format::Plain);

        assert!(log.upgrade().unwrap());
        assert!(slots(dir.path()).iter().all(|head| head.format == Format::Marked), "no format 2 slot is left");
        assert!(!log.upgrade().unwrap(), "a format 3 log is left alone");
        let head = HeadFile::reader(dir.path()).read_unlocked(0).unwrap();
        assert_eq!((head.format, head.marked_from_offset, head.synced), (Format::Marked, 3, true));
        assert_eq!(log.append(&payloads("b", 2)).unwrap(), 3..5);
        assert_eq!(list_segments(dir.path()).unwrap(), [0, 3], "the first batch after the upgrade rolls");
        log.append(&payloads("c", 1)).unwrap(); // after a synced commit: two syncs
        let syncs_before = log.sync_counter().load(Ordering::Relaxed);
        log.append(&payloads("d", 1)).unwrap();
        assert_eq!(log.sync_counter().load(Ordering::Relaxed) - syncs_before, 1);

        // A reader from before the upgrade goes on across it; a new one reads both framings.
        assert_eq!(reader.poll(100, &mut out).unwrap(), 4);
        assert_eq!(names(out), ["a-0", "a-1", "a-2", "b-0", "b-1", "c-0", "d-0"]);
        assert_eq!(names(read_all(&log, 1)), ["a-1", "a-2", "b-0", "b-1", "c-0", "d-0"]);
    }

    // spec: LocalLogFormat.HeadLayout (a head with no valid slot is refused, never reset)
    #[test]
    fn a_damaged_head_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let log = LocalLog::open(dir.path()).unwrap();
        log.append(&payloads("a", 1)).unwrap();
        damage_slot(dir.path(), 0);
        damage_slot(dir.path(), 1);
        let error = log.append(&payloads("b", 1)).unwrap_err();
        assert!(error.to_string().contains("no valid slot"), "{error}");
        assert!(error.to_string().contains("checksum mismatch"), "{error}");
        assert!(matches!(log.reader(0), Err(LocalLogError::CorruptHead { .. })));
        let path = dir.path().join(HEAD_FILE);
        fs::write(&path, [0u8; 10]).unwrap();
        assert!(matches!(log.reader(0), Err(LocalLogError::CorruptHead { .. })));
        assert!(matches!(LocalLog::open(dir.path()), Err(LocalLogError::CorruptHead { .. })));
    }

    // spec: LocalLogFormat.HeadLayout (a 44-byte head of the first format is read, then upgraded)
    #[test]
    fn a_first_format_head_is_read_and_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let log = plain_log(dir.path(), DEFAULT_SEGMENT_MAX_SIZE_BYTES);
        log.append(&payloads("a", 3)).unwrap();
        let head = HeadFile::reader(dir.path()).read_unlocked(0).unwrap();
        let mut v1 = [0u8; HEAD_V1_SIZE_BYTES];
        v1[0..8].copy_from_slice(&HEAD_V1_MAGIC);
        v1[8..16].copy_from_slice(&head.next_offset.to_le_bytes());
        v1[16..24].copy_from_slice(&head.segment_base_offset.to_le_bytes());
        v1[24..32].copy_from_slice(&head.segment_size_bytes.to_le_bytes());
        v1[32..40].copy_from_slice(&head.last_timestamp_ms.to_le_bytes());
        let crc = crc32c::crc32c(&v1[..40]);
        v1[40..44].copy_from_slice(&crc.to_le_bytes());
        fs::write(dir.path().join(HEAD_FILE), v1).unwrap();
        drop(log);

        assert_eq!(HeadFile::reader(dir.path()).read_unlocked(0).unwrap(), Head { sequence: 0, ..head });
        let log = LocalLog::open(dir.path()).unwrap();
        assert_eq!(fs::metadata(dir.path().join(HEAD_FILE)).unwrap().len(), HEAD_FILE_SIZE_BYTES);
        assert_eq!(read_all(&log, 0).len(), 3);
        assert_eq!(log.append(&payloads("b", 2)).unwrap(), 3..5);
        assert_eq!(read_all(&log, 0).last().unwrap().payload, b"b-1");
        drop(log);

        let mut bad = v1;
        bad[9] ^= 1;
        fs::write(dir.path().join(HEAD_FILE), bad).unwrap();
        let error = LocalLog::open(dir.path()).err().unwrap();
        assert!(error.to_string().contains("checksum mismatch"), "{error}");
    }

    #[test]
    fn a_missing_head_over_existing_data_is_not_silently_reset() {
        let dir = tempfile::tempdir().unwrap();
        LocalLog::open(dir.path()).unwrap().append(&payloads("a", 1)).unwrap();
        fs::remove_file(dir.path().join(HEAD_FILE)).unwrap();
        let error = LocalLog::open(dir.path()).err().unwrap();
        assert!(error.to_string().contains("no head file"), "{error}");
    }
}
