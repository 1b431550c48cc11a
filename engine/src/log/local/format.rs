//! The local log's head file: two CRC'd slots rewritten in place, the newest valid one
//! the commit point (see the module above for the format and why).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::*;

/// How a log's segments are framed and its head is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    /// Format 2: no batch marks; every commit fdatasyncs the head.
    Plain,
    /// Format 3: segments from `marked_from_offset` on mark each batch's last record, and
    /// the head is synced only when a batch created a segment or a repair moved it.
    Marked,
}

/// The commit point: everything below it is durable and visible, nothing above it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Head {
    /// Commit number. In format 2 the head lives in slot `sequence % 2`.
    pub(super) sequence: u64,
    /// The offset the next record will get; also the number of records in the log.
    pub(super) next_offset: u64,
    /// First offset of the last segment, the only one that can still grow.
    pub(super) segment_base_offset: u64,
    /// Committed bytes of that segment.
    pub(super) segment_size_bytes: u64,
    /// Timestamp of the last batch, the floor for the next one's.
    pub(super) last_timestamp_ms: u64,
    pub(super) format: Format,
    /// Format 3: segments whose first offset is at least this carry batch-end marks.
    pub(super) marked_from_offset: u64,
    /// Format 3: this commit was fdatasynced when it was written (format 2: always).
    pub(super) synced: bool,
}

pub(super) fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8-byte slice"))
}

pub(super) fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4-byte slice"))
}

/// Checks a head's magic and its CRC32C, which is stored at `crc_at` over the bytes before it.
pub(super) fn check_framing(bytes: &[u8], magic: &[u8; 8], crc_at: usize) -> Result<(), String> {
    if bytes[0..8] != *magic {
        return Err("bad magic (not a Tribunal local log head, or another format version)".into());
    }
    let stored_crc = u32_at(bytes, crc_at);
    let computed_crc = crc32c::crc32c(&bytes[..crc_at]);
    if stored_crc != computed_crc {
        return Err(format!("checksum mismatch (stored {stored_crc:#010x}, computed {computed_crc:#010x})"));
    }
    Ok(())
}

impl Format {
    /// A slot's magic, and where its CRC sits (over the bytes before it).
    fn slot_layout(self) -> ([u8; 8], usize) {
        match self {
            Format::Plain => (HEAD_V2_MAGIC, 48),
            Format::Marked => (HEAD_V3_MAGIC, 64),
        }
    }
}

impl Head {
    /// A new log: format 3, empty, synced.
    pub(super) const EMPTY: Head = Head {
        sequence: 0,
        next_offset: 0,
        segment_base_offset: 0,
        segment_size_bytes: 0,
        last_timestamp_ms: 0,
        format: Format::Marked,
        marked_from_offset: 0,
        synced: true,
    };

    /// Whether the segment starting at `base_offset` marks batch ends.
    pub(super) fn marks(&self, base_offset: u64) -> bool {
        self.format == Format::Marked && base_offset >= self.marked_from_offset
    }

    pub(super) fn encode_slot(&self) -> [u8; HEAD_SLOT_USED_BYTES] {
        let mut bytes = [0u8; HEAD_SLOT_USED_BYTES];
        let (magic, crc_at) = self.format.slot_layout();
        bytes[0..8].copy_from_slice(&magic);
        bytes[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.next_offset.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.segment_base_offset.to_le_bytes());
        bytes[32..40].copy_from_slice(&self.segment_size_bytes.to_le_bytes());
        bytes[40..48].copy_from_slice(&self.last_timestamp_ms.to_le_bytes());
        if self.format == Format::Marked {
            bytes[48..56].copy_from_slice(&self.marked_from_offset.to_le_bytes());
            bytes[56..64].copy_from_slice(&u64::from(self.synced).to_le_bytes());
        }
        let crc = crc32c::crc32c(&bytes[..crc_at]);
        bytes[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// The whole head file with this head in slot `slot` and zeros in the other.
    pub(super) fn encode_file(&self, slot: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; HEAD_FILE_SIZE_BYTES as usize];
        let at = (slot * HEAD_SLOT_SIZE_BYTES) as usize;
        bytes[at..at + HEAD_SLOT_USED_BYTES].copy_from_slice(&self.encode_slot());
        bytes
    }

    /// Decodes slot `slot`; an error says why the slot is not a valid head.
    pub(super) fn decode_slot(bytes: &[u8; HEAD_SLOT_USED_BYTES], slot: u64) -> Result<Head, String> {
        let format = if bytes[0..8] == HEAD_V2_MAGIC { Format::Plain } else { Format::Marked };
        let (magic, crc_at) = format.slot_layout();
        check_framing(bytes, &magic, crc_at)?;
        let mut head = Head {
            sequence: u64_at(bytes, 8),
            next_offset: u64_at(bytes, 16),
            segment_base_offset: u64_at(bytes, 24),
            segment_size_bytes: u64_at(bytes, 32),
            last_timestamp_ms: u64_at(bytes, 40),
            format,
            marked_from_offset: 0,
            synced: true,
        };
        if format == Format::Plain {
            if head.sequence % 2 != slot {
                return Err(format!("commit {} does not belong in slot {slot}", head.sequence));
            }
        } else {
            head.marked_from_offset = u64_at(bytes, 48);
            head.synced = match u64_at(bytes, 56) {
                0 => false,
                1 => true,
                other => return Err(format!("synced is {other}, not 0 or 1")),
            };
        }
        head.check_plausible()?;
        Ok(head)
    }

    pub(super) fn decode_v1(bytes: &[u8; HEAD_V1_SIZE_BYTES]) -> Result<Head, String> {
        check_framing(bytes, &HEAD_V1_MAGIC, 40)?;
        let head = Head {
            sequence: 0,
            next_offset: u64_at(bytes, 8),
            segment_base_offset: u64_at(bytes, 16),
            segment_size_bytes: u64_at(bytes, 24),
            last_timestamp_ms: u64_at(bytes, 32),
            format: Format::Plain,
            marked_from_offset: 0,
            synced: true,
        };
        head.check_plausible()?;
        Ok(head)
    }

    pub(super) fn check_plausible(&self) -> Result<(), String> {
        // A segment holds at least one record unless it is the empty log's first one.
        let records = self.next_offset.checked_sub(self.segment_base_offset);
        let plausible = match records {
            None => false,
            Some(0) => self.segment_size_bytes == 0,
            Some(records) => self.segment_size_bytes >= records.saturating_mul(RECORD_HEADER_SIZE_BYTES),
        };
        // An upgrade marks from the next offset on: a later segment, or the empty head one.
        let marked_from_plausible =
            self.marked_from_offset <= self.segment_base_offset || self.marked_from_offset == self.next_offset;
        if plausible && (self.format == Format::Plain || marked_from_plausible) {
            Ok(())
        } else {
            Err(format!("impossible contents {self:?}"))
        }
    }

    /// Makes a head file holding `self` appear whole: written aside, synced, renamed into
    /// place, directory synced. Only for creating or upgrading one, under the append lock.
    pub(super) fn create_file(&self, dir: &Path) -> Result<()> {
        let temp_path = dir.join(HEAD_TEMP_FILE);
        let path = dir.join(HEAD_FILE);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp_path)
            .map_err(io_error("creating", &temp_path))?;
        let slot = if self.format == Format::Plain { self.sequence % 2 } else { 0 };
        file.write_all_at(&self.encode_file(slot), 0).map_err(io_error("writing", &temp_path))?;
        file.sync_all().map_err(io_error("syncing", &temp_path))?;
        fs::rename(&temp_path, &path).map_err(io_error("renaming over", &path))?;
        sync_dir(dir)
    }
}

pub(super) fn open_head<'a>(file: &'a mut Option<File>, path: &Path, writable: bool) -> Result<&'a File> {
    if file.is_none() {
        let opened = OpenOptions::new().read(true).write(writable).open(path);
        *file = Some(opened.map_err(io_error("opening", path))?);
    }
    Ok(file.as_ref().expect("opened above"))
}

/// Reads the head file from its start into `buffer`: one pread for a file of a known size
/// (the first format's, this one's, or longer), otherwise until the end of the file (a
/// short read), retrying an interrupted one.
fn read_head_bytes(file: &File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut read_bytes = 0;
    loop {
        match file.read_at(&mut buffer[read_bytes..], read_bytes as u64) {
            Ok(0) => return Ok(read_bytes),
            Ok(n) => read_bytes += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let known = [HEAD_V1_SIZE_BYTES, HEAD_FILE_SIZE_BYTES as usize, buffer.len()];
        if known.contains(&read_bytes) {
            return Ok(read_bytes);
        }
    }
}

/// Where the head was found, and what a format 3 commit needs to know about it.
#[derive(Debug, Clone, Copy)]
pub(super) struct CurrentSlot {
    sequence: u64,
    slot: u64,
    /// A format 3 commit that was not synced: the next commit may overwrite it.
    unsynced: bool,
    /// The other slot holds a valid commit.
    other_valid: bool,
    /// The other slot is invalid but not all zeros: a torn write, or damage.
    other_torn: bool,
}

impl CurrentSlot {
    fn of(head: &Head, slot: u64, other_valid: bool, other_torn: bool) -> CurrentSlot {
        let unsynced = head.format == Format::Marked && !head.synced;
        CurrentSlot { sequence: head.sequence, slot, unsynced, other_valid, other_torn }
    }
}

/// What one read of the head file found.
pub(super) enum HeadRead {
    Current(Head),
    /// A head of the first format, which an appender rewrites.
    FirstFormat(Head),
}

/// The head file, kept open: it is rewritten in place, so one handle sees every commit
/// (except across the one-time upgrade from the first format, after which it reopens).
pub(super) struct HeadFile {
    pub(super) path: PathBuf,
    pub(super) file: Option<File>,
    /// Opened for writing too: an appender's handle.
    pub(super) writable: bool,
    /// The head's slot at the last read or commit. A format 3 commit chooses its slot by
    /// it, so under the lock the head is read first (`read_locked`).
    pub(super) current: Option<CurrentSlot>,
}

impl HeadFile {
    pub(super) fn reader(dir: &Path) -> HeadFile {
        HeadFile { path: dir.join(HEAD_FILE), file: None, writable: false, current: None }
    }

    pub(super) fn appender(dir: &Path) -> HeadFile {
        HeadFile { path: dir.join(HEAD_FILE), file: None, writable: true, current: None }
    }

    pub(super) fn corrupt(&self, reason: String) -> LocalLogError {
        LocalLogError::CorruptHead { path: self.path.clone(), reason }
    }

    /// One read of the head: a single pread of the whole file (and one byte more, so a
    /// longer file shows), since every poll of every reader reads it. A read of another
    /// length (a file of another size) is looked at with its metadata, for the error.
    pub(super) fn read_once(&mut self) -> Result<HeadRead> {
        let file = open_head(&mut self.file, &self.path, self.writable)?;
        let mut whole = [0u8; HEAD_FILE_SIZE_BYTES as usize + 1];
        let read_bytes = read_head_bytes(file, &mut whole).map_err(io_error("reading", &self.path))?;
        if read_bytes == HEAD_V1_SIZE_BYTES {
            // The upgrade replaces the file: read the new one next time.
            self.file = None;
            self.current = None;
            let v1: &[u8; HEAD_V1_SIZE_BYTES] = whole[..HEAD_V1_SIZE_BYTES].try_into().expect("read");
            let head = Head::decode_v1(v1).map_err(|reason| self.corrupt(reason))?;
            return Ok(HeadRead::FirstFormat(head));
        }
        if read_bytes != HEAD_FILE_SIZE_BYTES as usize {
            let size_bytes = file.metadata().map_err(io_error("reading metadata of", &self.path))?.len();
            return Err(self.corrupt(format!("{size_bytes} bytes, expected {HEAD_FILE_SIZE_BYTES}")));
        }
        let mut newest: Option<(Head, u64)> = None;
        let mut reasons = Vec::new();
        let mut never_written_slots = 0;
        for slot in 0..2 {
            let at = (slot * HEAD_SLOT_SIZE_BYTES) as usize;
            let bytes: &[u8; HEAD_SLOT_USED_BYTES] =
                whole[at..at + HEAD_SLOT_USED_BYTES].try_into().expect("in the file");
            match Head::decode_slot(bytes, slot) {
                Ok(head) if newest.is_none_or(|(newest, _)| head.sequence > newest.sequence) => {
                    newest = Some((head, slot));
                }
                Ok(_) => {}
                Err(reason) => {
                    never_written_slots += usize::from(bytes.iter().all(|b| *b == 0));
                    reasons.push(format!("slot {slot}: {reason}"));
                }
            }
        }
        match newest {
            Some((head, slot)) => {
                let torn = reasons.len() > never_written_slots;
                self.current = Some(CurrentSlot::of(&head, slot, reasons.is_empty(), torn));
                // A new log's slot 1 is zeros beside commit 0: never written, not torn.
                let new_log = head.sequence == 0 && never_written_slots == reasons.len();
                if self.writable && !reasons.is_empty() && !new_log {
                    // Under the lock: a commit torn by a crash, or damage. Either way the
                    // newest valid commit is the head; say so, since damage would roll back.
                    tracing::warn!(path = %self.path.display(), reasons = %reasons.join("; "), sequence = head.sequence, "a head slot is invalid; using the other");
                }
                Ok(HeadRead::Current(head))
            }
            None => Err(self.corrupt(format!("no valid slot ({})", reasons.join("; ")))),
        }
    }

    /// Reads the head under the append lock, where nothing writes it: an invalid slot
    /// beside a valid one is a commit torn by a crash, which the next commit overwrites.
    pub(super) fn read_locked(&mut self) -> Result<HeadRead> {
        self.read_once()
    }

    /// Whether the last read found a slot torn (invalid, and not all zeros).
    pub(super) fn saw_torn_slot(&self) -> bool {
        self.current.is_some_and(|current| current.other_torn)
    }

    /// Reads the head without the lock, expecting commit `min_sequence` or a later one. A
    /// slot being written reads as invalid, and the other slot holds an older commit (in
    /// format 3 maybe much older: the last synced one), so while a slot reads torn or the
    /// head is behind `min_sequence` the head is read again, for up to
    /// `HEAD_READ_PATIENCE`, before what was read stands (a torn slot left by a power loss
    /// stays torn only until the next opening of the log, whose repair rewrites it).
    pub(super) fn read_unlocked(&mut self, min_sequence: u64) -> Result<Head> {
        let mut attempt: u32 = 0;
        let mut started: Option<Instant> = None;
        loop {
            let outcome = match self.read_once() {
                Ok(HeadRead::Current(head) | HeadRead::FirstFormat(head)) if head.sequence >= min_sequence => {
                    if !self.saw_torn_slot() {
                        return Ok(head);
                    }
                    Ok(head)
                }
                Ok(HeadRead::Current(head) | HeadRead::FirstFormat(head)) => Err(inconsistent(
                    &self.path,
                    format!(
                        "the head went back from commit {min_sequence} to commit {}; was the log replaced?",
                        head.sequence
                    ),
                )),
                Err(error @ LocalLogError::CorruptHead { .. }) => Err(error),
                Err(error) => return Err(error),
            };
            let started = *started.get_or_insert_with(Instant::now);
            if started.elapsed() >= HEAD_READ_PATIENCE {
                return outcome;
            }
            // A writer is mid-copy: usually done by the next look, unless it was preempted.
            attempt += 1;
            if attempt < HEAD_READ_SPINS {
                std::thread::yield_now();
            } else {
                std::thread::sleep(HEAD_READ_BACKOFF);
            }
        }
    }

    /// Commits `head`, one past the head last read (`read_locked`, in the same hold of the
    /// append lock). Format 2: into slot `sequence % 2`, then synced. Format 3: see
    /// [`HeadFile::marked_slot`]; synced if `head.synced` or if the slot rule needs it.
    /// Returns the syncs issued.
    pub(super) fn commit(&mut self, head: &Head) -> Result<u64> {
        assert!(self.writable, "only an appender commits");
        let mut head = *head;
        let mut syncs = 0;
        let slot = match head.format {
            Format::Plain => head.sequence % 2,
            Format::Marked => {
                let (slot, must_sync, synced_first) = self.marked_slot(&head)?;
                head.synced |= must_sync;
                syncs += u64::from(synced_first);
                slot
            }
        };
        assert!(head.format == Format::Marked || head.synced, "format 2 commits are always synced");
        // Until the write (and its sync, if any) is done, the slots are not known.
        self.current = None;
        let file = open_head(&mut self.file, &self.path, self.writable)?;
        file.write_all_at(&head.encode_slot(), slot * HEAD_SLOT_SIZE_BYTES).map_err(io_error("writing", &self.path))?;
        if head.synced {
            file.sync_data().map_err(io_error("syncing", &self.path))?;
            syncs += 1;
        }
        self.current = Some(CurrentSlot::of(&head, slot, true, false));
        Ok(syncs)
    }

    /// Format 3's slot rule: the slot not written must hold a synced commit. Returns the
    /// slot, whether this commit must be synced, and whether the head file was synced
    /// first.
    /// - The current head is unsynced and the other slot valid (a synced commit): write
    ///   over the current head.
    /// - The current head is unsynced and the other slot invalid (damaged or torn): write
    ///   the other slot, and sync it, since no synced commit is left.
    /// - The current head is synced, or format 2: write the other slot, after syncing the
    ///   head file, since the flag was written before its sync and its writer may have died
    ///   in between (and a format 2 head is only durable after its sync too).
    fn marked_slot(&mut self, head: &Head) -> Result<(u64, bool, bool)> {
        if self.current.is_none() {
            self.read_locked()?;
        }
        let Some(current) = self.current else {
            return Err(inconsistent(&self.path, "the head changed format while the lock was held".into()));
        };
        if head.sequence != current.sequence + 1 {
            let reason = format!("commit {} does not follow commit {}", head.sequence, current.sequence);
            return Err(inconsistent(&self.path, reason));
        }
        if current.unsynced {
            return Ok(if current.other_valid {
                (current.slot, false, false)
            } else {
                (1 - current.slot, true, false)
            });
        }
        let file = open_head(&mut self.file, &self.path, self.writable)?;
        file.sync_data().map_err(io_error("syncing", &self.path))?;
        Ok((1 - current.slot, false, true))
    }
}
