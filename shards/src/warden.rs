//! Warden: idempotency within a TTL of *stream time* (spec: `specs/warden.allium`).
//!
//! One Warden per partition, held by that partition's Usher. It answers, for each
//! record's idempotency key: new, replay of the original, conflicting reuse, or full.
//!
//! Memory is the constraint (about 3,000,000 live keys at 10k/s with a 5-minute TTL),
//! so an entry is 28 bytes and holds no time: stream time never decreases along the
//! log, so "recorded more than a TTL ago" is the same as "recorded before a cutoff
//! offset". A short queue of time points (first offset at which stream time took a
//! value) turns the TTL into that cutoff. An entry is live iff its offset is at or
//! above the cutoff; expired entries are removed lazily by a sweep whose timing has
//! no effect on any answer, so answers are deterministic.

use std::collections::VecDeque;

use std::hash::BuildHasher;

use hashbrown::HashTable;

use crate::domain::StreamTimeMs;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WardenConfig {
    /// How long, in stream time, a key keeps its answer.
    pub ttl_ms: u64,
    /// Most live keys; a new key beyond it gets a deterministic `Full` answer.
    pub max_entries: u64,
}

impl Default for WardenConfig {
    fn default() -> Self {
        // 3,500,000 keeps 10k/s x 5 min inside 2^22 hash buckets (about 140 MB).
        Self { ttl_ms: 300_000, max_entries: 3_500_000 }
    }
}

/// What the Warden says about one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WardenCheck {
    /// Unknown or expired key: recorded now; the event proceeds.
    New,
    /// Live key, same payload: answer with the output at `original_offset`.
    Replay { original_offset: u64 },
    /// Live key, different payload: a conflict; the entry is unchanged.
    Conflict { original_offset: u64 },
    /// `max_entries` live keys: nothing recorded.
    Full,
}

/// Why [`Warden::from_snapshot`] refused a snapshot read from disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WardenSnapshotError {
    #[error("time points are missing or out of order")]
    PointsOutOfOrder,
    #[error("a time point counts more keys than were recorded")]
    PointOvercounts,
    #[error("entry at offset {offset} is outside the live window")]
    EntryOutsideWindow { offset: u64 },
    #[error("key at offset {offset} is listed twice")]
    KeyListedTwice { offset: u64 },
    #[error("the live-key count does not match the entries")]
    LiveCountMismatch,
}

/// One remembered key, 28 bytes (align 4): a 96-bit key fingerprint (at 3,000,000
/// live keys the chance that two share one is about 6 in 10^17), the 64-bit payload
/// digest and the 64-bit original offset. With hashbrown's control byte at a load of
/// 3,000,000 / 2^22 that is 40.5 bytes per entry (target: <= 48).
#[derive(Debug, Clone, Copy)]
struct Entry {
    key: [u32; 3],
    payload_digest: [u32; 2],
    original_offset: [u32; 2],
}

const _: () = assert!(std::mem::size_of::<Entry>() == 28);

fn split64(value: u64) -> [u32; 2] {
    [value as u32, (value >> 32) as u32]
}

fn join64(parts: [u32; 2]) -> u64 {
    u64::from(parts[0]) | (u64::from(parts[1]) << 32)
}

/// The 96 bits of a fingerprint the Warden keeps; the low 64 are also the table hash.
fn key_bits(fingerprint: u128) -> [u32; 3] {
    [fingerprint as u32, (fingerprint >> 32) as u32, (fingerprint >> 64) as u32]
}

impl Entry {
    fn payload_digest(&self) -> u64 {
        join64(self.payload_digest)
    }

    fn original_offset(&self) -> u64 {
        join64(self.original_offset)
    }
}

/// Records at offsets >= `first_offset` (up to the next point) have stream time
/// `stream_time_ms`. `inserted_before` counts keys recorded before this point, so
/// live keys = `inserted_total - front.inserted_before` without a scan.
#[derive(Debug, Clone, Copy)]
struct TimePoint {
    first_offset: u64,
    stream_time_ms: StreamTimeMs,
    inserted_before: u64,
}

/// The Warden's live state, for snapshots. Expired entries are left out.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WardenSnapshot {
    /// (96 key bits, payload digest, original offset) of each live entry.
    pub entries: Vec<([u32; 3], u64, u64)>,
    /// (first offset, stream time, keys recorded before) of each time point.
    pub points: Vec<(u64, StreamTimeMs, u64)>,
    pub inserted_total: u64,
    pub last_offset: Option<u64>,
}

/// The table is this many parts, each grown and swept on its own, so that no check moves
/// more than 1/64 of the entries (spec: Warden.BoundedPause).
const TABLE_PARTS: usize = 64;

/// The placement-hash bits that choose a part: below hashbrown's control byte (the top 7
/// bits) and above any bucket index a part reaches (2^16 buckets at 3,500,000 keys).
fn part_of(hash: u64) -> usize {
    (hash >> 51) as usize % TABLE_PARTS
}

pub struct Warden {
    config: WardenConfig,
    /// The table of entries, in `TABLE_PARTS` parts chosen by [`part_of`].
    parts: Box<[HashTable<Entry>]>,
    /// Per-process random seed for table placement. Keys are chosen by clients, and
    /// placing by their unkeyed fingerprint would let a client pick keys that share a
    /// probe chain (measured: quadratic inserts). Placement never reaches an answer,
    /// so a random seed costs no determinism.
    placement: hashbrown::DefaultHashBuilder,
    points: VecDeque<TimePoint>,
    inserted_total: u64,
    last_offset: Option<u64>,
}

impl Warden {
    pub fn new(config: WardenConfig) -> Self {
        assert!(config.ttl_ms > 0, "a zero TTL would make every key expire at once");
        assert!(config.max_entries > 0);
        Self {
            config,
            parts: (0..TABLE_PARTS).map(|_| HashTable::new()).collect(),
            placement: hashbrown::DefaultHashBuilder::default(),
            points: VecDeque::new(),
            inserted_total: 0,
            last_offset: None,
        }
    }

    pub fn config(&self) -> WardenConfig {
        self.config
    }

    fn place(&self, key: &[u32; 3]) -> u64 {
        self.placement.hash_one(key)
    }

    /// The live state, entries sorted by offset so the bytes do not depend on table
    /// layout or seed.
    pub fn snapshot(&self) -> WardenSnapshot {
        let cutoff = self.points.front().map_or(0, |p| p.first_offset);
        let mut entries: Vec<_> = self
            .parts
            .iter()
            .flat_map(HashTable::iter)
            .filter(|e| e.original_offset() >= cutoff)
            .map(|e| (e.key, e.payload_digest(), e.original_offset()))
            .collect();
        entries.sort_unstable_by_key(|e| e.2);
        WardenSnapshot {
            entries,
            points: self.points.iter().map(|p| (p.first_offset, p.stream_time_ms, p.inserted_before)).collect(),
            inserted_total: self.inserted_total,
            last_offset: self.last_offset,
        }
    }

    /// Rebuilds a Warden from a snapshot taken with the same configuration. The
    /// snapshot comes from disk, so it is checked, not trusted.
    pub fn from_snapshot(config: WardenConfig, snapshot: &WardenSnapshot) -> Result<Self, WardenSnapshotError> {
        let mut warden = Self::new(config);
        let ordered = snapshot.points.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1 && w[0].2 <= w[1].2);
        if !ordered || (snapshot.points.is_empty() && !snapshot.entries.is_empty()) {
            return Err(WardenSnapshotError::PointsOutOfOrder);
        }
        if snapshot.points.iter().any(|p| p.2 > snapshot.inserted_total) {
            return Err(WardenSnapshotError::PointOvercounts);
        }
        let cutoff = snapshot.points.first().map_or(0, |p| p.0);
        for &(key, payload_digest, offset) in &snapshot.entries {
            if offset < cutoff || snapshot.last_offset.is_none_or(|last| offset > last) {
                return Err(WardenSnapshotError::EntryOutsideWindow { offset });
            }
            let hash = warden.place(&key);
            let part = &mut warden.parts[part_of(hash)];
            if part.find(hash, |e| e.key == key).is_some() {
                return Err(WardenSnapshotError::KeyListedTwice { offset });
            }
            let entry = Entry { key, payload_digest: split64(payload_digest), original_offset: split64(offset) };
            let placement = &warden.placement;
            part.insert_unique(hash, entry, |e| placement.hash_one(e.key));
        }
        warden.points = snapshot
            .points
            .iter()
            .map(|&(first_offset, stream_time_ms, inserted_before)| TimePoint {
                first_offset,
                stream_time_ms,
                inserted_before,
            })
            .collect();
        warden.inserted_total = snapshot.inserted_total;
        warden.last_offset = snapshot.last_offset;
        if warden.live_entries() != snapshot.entries.len() as u64 {
            return Err(WardenSnapshotError::LiveCountMismatch);
        }
        Ok(warden)
    }

    /// Moves stream time to `stream_time_ms` at `offset`. Called once per record, in
    /// offset order, before [`Warden::check`] (spec: Usher.StreamTimeIsMaxTimestamp).
    pub fn advance(&mut self, offset: u64, stream_time_ms: StreamTimeMs) {
        if let Some(last) = self.last_offset {
            assert!(offset > last, "records reach the Warden in offset order");
        }
        self.last_offset = Some(offset);
        match self.points.back_mut() {
            None => self.points.push_back(TimePoint {
                first_offset: offset,
                stream_time_ms,
                inserted_before: self.inserted_total,
            }),
            Some(back) => {
                assert!(stream_time_ms >= back.stream_time_ms, "stream time never decreases");
                if stream_time_ms > back.stream_time_ms {
                    if back.inserted_before == self.inserted_total {
                        // No key was recorded under `back`: move it rather than add one,
                        // so there are never more points than live keys + 1.
                        back.first_offset = offset;
                        back.stream_time_ms = stream_time_ms;
                    } else {
                        self.points.push_back(TimePoint {
                            first_offset: offset,
                            stream_time_ms,
                            inserted_before: self.inserted_total,
                        });
                    }
                }
            }
        }
        // spec: Warden.EntryExpires — expired when stream_time - recorded_at >= ttl.
        while let Some(front) = self.points.front() {
            if stream_time_ms - front.stream_time_ms < self.config.ttl_ms {
                break;
            }
            self.points.pop_front();
        }
        assert!(!self.points.is_empty(), "the current time point is never expired (ttl > 0)");
        assert!(self.points.len() as u64 <= self.live_entries() + 1, "time points are bounded by live keys");
    }

    /// Lowest offset whose entries are still live.
    fn cutoff_offset(&self) -> u64 {
        self.points.front().expect("advance() precedes check()").first_offset
    }

    /// Keys recorded within the TTL.
    pub fn live_entries(&self) -> u64 {
        self.points.front().map_or(0, |front| self.inserted_total - front.inserted_before)
    }

    /// Answers for the record at `offset` (already passed to [`Warden::advance`]) and
    /// records its key when it is new.
    pub fn check(&mut self, key_fingerprint: u128, payload_digest: u64, offset: u64) -> WardenCheck {
        assert_eq!(self.last_offset, Some(offset), "check() follows advance() for the same record");
        let cutoff = self.cutoff_offset();
        let key = key_bits(key_fingerprint);
        let hash = self.place(&key);
        let at_capacity = self.live_entries() >= self.config.max_entries;
        let fresh = Entry { key, payload_digest: split64(payload_digest), original_offset: split64(offset) };
        let part = part_of(hash);
        if let Some(entry) = self.parts[part].find_mut(hash, |e| e.key == key) {
            let original_offset = entry.original_offset();
            if original_offset >= cutoff {
                if entry.payload_digest() == payload_digest {
                    // spec: Warden.ReplayReturnsOriginal
                    return WardenCheck::Replay { original_offset };
                }
                // spec: Warden.ConflictOnDifferentPayload
                return WardenCheck::Conflict { original_offset };
            }
            if at_capacity {
                // spec: Warden.CapacityBound
                return WardenCheck::Full;
            }
            // spec: Warden.KeyRecorded — an expired key is new again; reuse its slot.
            *entry = fresh;
            self.inserted_total += 1;
            return WardenCheck::New;
        }
        if at_capacity {
            // spec: Warden.CapacityBound
            return WardenCheck::Full;
        }
        self.sweep_if_growing(part, cutoff);
        // spec: Warden.KeyRecorded
        let placement = &self.placement;
        self.parts[part].insert_unique(hash, fresh, |e| placement.hash_one(e.key));
        self.inserted_total += 1;
        WardenCheck::New
    }

    /// Entries held, live or stale.
    fn stored_entries(&self) -> u64 {
        self.parts.iter().map(|part| part.len() as u64).sum()
    }

    /// Removes a part's expired entries when the part is about to grow, and lets it grow
    /// only if that frees less than an eighth of it, so each sweep or growth pays for
    /// itself: amortised O(1) per insert. (Deciding by the share of expired entries in
    /// the whole table misleads: parts fill at about the same time, and the first to sweep
    /// lower the share the last ones see, which then double; measured 71 bytes/live
    /// entry in steady state instead of 45.)
    ///
    /// The sweep drains the part and re-inserts the live entries. `retain` would be
    /// cheaper in memory for a moment, but hashbrown's erase leaves a tombstone wherever
    /// the slot sits in a run of 16 full slots, which at this load is a large share of
    /// erasures; tombstones do not count as room, so the table doubles soon after
    /// (measured: 85-96 bytes per live entry in steady state). Draining leaves a clean
    /// part of the same size, at the cost of a transient buffer of the part's live
    /// entries (28 bytes each) while the sweep runs. Both figures are in
    /// `benches/warden_memory.rs`. A sweep and a growth each move one part: about 1/64 of
    /// the entries (spec: Warden.BoundedPause).
    fn sweep_if_growing(&mut self, part: usize, cutoff: u64) {
        let table = &mut self.parts[part];
        let (len, capacity) = (table.len(), table.capacity());
        if len == 0 || len < capacity {
            return;
        }
        let mut kept = Vec::with_capacity(len);
        kept.extend(table.drain().filter(|e| e.original_offset() >= cutoff));
        let placement = &self.placement;
        if len - kept.len() < capacity.div_ceil(8) {
            // Mostly live: double now rather than sweep again soon.
            table.reserve(capacity + 1, |e| placement.hash_one(e.key));
        }
        for entry in kept {
            let hash = placement.hash_one(entry.key);
            table.insert_unique(hash, entry, |e| placement.hash_one(e.key));
        }
        debug_assert!(table.len() < table.capacity(), "a sweep or a growth leaves room");
        debug_assert!(self.stored_entries() >= self.live_entries());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warden(ttl_ms: u64, max_entries: u64) -> Warden {
        Warden::new(WardenConfig { ttl_ms, max_entries })
    }

    fn at(w: &mut Warden, offset: u64, time: u64, key: u128, payload: u64) -> WardenCheck {
        w.advance(offset, time);
        w.check(key, payload, offset)
    }

    #[test]
    fn first_use_is_new_and_replay_returns_the_original_offset() {
        // spec: Warden.KeyRecorded
        // spec: Warden.ReplayReturnsOriginal
        let mut w = warden(1_000, 10);
        assert_eq!(at(&mut w, 0, 0, 7, 1), WardenCheck::New);
        assert_eq!(at(&mut w, 1, 10, 7, 1), WardenCheck::Replay { original_offset: 0 });
        assert_eq!(w.live_entries(), 1);
    }

    #[test]
    fn different_payload_is_a_conflict_and_keeps_the_entry() {
        // spec: Warden.ConflictOnDifferentPayload
        let mut w = warden(1_000, 10);
        at(&mut w, 0, 0, 7, 1);
        assert_eq!(at(&mut w, 1, 5, 7, 2), WardenCheck::Conflict { original_offset: 0 });
        assert_eq!(at(&mut w, 2, 6, 7, 1), WardenCheck::Replay { original_offset: 0 });
    }

    #[test]
    fn entry_expires_exactly_at_the_ttl_in_stream_time() {
        // spec: Warden.EntryExpires
        let mut w = warden(1_000, 10);
        at(&mut w, 0, 100, 7, 1);
        assert_eq!(at(&mut w, 1, 1_099, 7, 1), WardenCheck::Replay { original_offset: 0 });
        assert_eq!(at(&mut w, 2, 1_100, 7, 2), WardenCheck::New, "stream_time - recorded_at >= ttl");
        assert_eq!(at(&mut w, 3, 1_101, 7, 1), WardenCheck::Conflict { original_offset: 2 });
    }

    #[test]
    fn a_jump_in_stream_time_expires_the_entry_at_once() {
        // spec: Warden.EntryExpires — the older-timestamp case is the Usher's (it passes
        // max(ts seen)); see `a_late_older_record_does_not_move_stream_time_back`.
        let mut w = warden(1_000, 10);
        at(&mut w, 0, 0, 7, 1);
        w.advance(1, 2_000);
        assert_eq!(w.check(7, 1, 1), WardenCheck::New);
    }

    #[test]
    fn capacity_is_a_deterministic_full_answer() {
        // spec: Warden.CapacityBound
        let mut w = warden(1_000, 2);
        assert_eq!(at(&mut w, 0, 0, 1, 1), WardenCheck::New);
        assert_eq!(at(&mut w, 1, 0, 2, 1), WardenCheck::New);
        assert_eq!(at(&mut w, 2, 0, 3, 1), WardenCheck::Full);
        assert_eq!(at(&mut w, 3, 1, 1, 1), WardenCheck::Replay { original_offset: 0 }, "live keys still answer");
        assert_eq!(at(&mut w, 4, 1_000, 3, 1), WardenCheck::New, "room again once older keys expire");
    }

    #[test]
    fn memory_stays_bounded_by_live_keys_under_churn() {
        let mut w = warden(100, 1_000_000);
        for offset in 0..200_000u64 {
            // 10 keys per ms of stream time, TTL 100 ms: about 1,000 live keys.
            let key = crate::digest::key_fingerprint(&offset.to_string());
            assert_eq!(at(&mut w, offset, offset / 10, key, 0), WardenCheck::New);
        }
        assert_eq!(w.live_entries(), 1_000);
        // 64 small parts (hashbrown capacities 14, 28, 56 at ~16 live keys each): room for
        // a few times the live keys, never the 200,000 recorded.
        assert!(w.stored_entries() <= 4_000, "expired entries are swept: {}", w.stored_entries());
        assert!(w.points.len() <= 101);
    }

    /// The parts a check grew (their allocation changed) or swept (they hold fewer entries:
    /// a check without a sweep only adds or replaces one), and the entries they held before.
    fn moved_entries(before: &[(usize, usize)], w: &Warden) -> (usize, usize) {
        let moved: Vec<usize> = before
            .iter()
            .zip(w.parts.iter())
            .filter(|((len, capacity), part)| part.capacity() != *capacity || part.len() < *len)
            .map(|((len, _), _)| *len)
            .collect();
        (moved.len(), moved.iter().sum())
    }

    // spec: Warden.BoundedPause
    #[test]
    fn growing_or_sweeping_moves_one_part_at_a_time() {
        // 100 keys per ms of stream time and a 2 s TTL: the table grows to about 200,000
        // keys, then expired keys are swept as new ones arrive.
        let mut w = warden(2_000, 1_000_000);
        let (mut growths, mut largest_move) = (0, 0);
        let mut before = Vec::with_capacity(TABLE_PARTS);
        for offset in 0..600_000u64 {
            before.clear();
            before.extend(w.parts.iter().map(|part| (part.len(), part.capacity())));
            let stored = w.stored_entries() as usize;
            let key = crate::digest::key_fingerprint(&offset.to_string());
            assert_eq!(at(&mut w, offset, offset / 100, key, 0), WardenCheck::New);
            let (parts, moved) = moved_entries(&before, &w);
            assert!(parts <= 1, "offset {offset}: one check grew or swept {parts} parts");
            growths += parts;
            largest_move = largest_move.max(moved);
            // One part holds about 1/64 of the entries, up to twice that while it fills
            // with expired ones that others have already swept.
            assert!(moved <= 64.max(stored / 16), "offset {offset}: one check moved {moved} of {stored} entries");
        }
        assert!(growths > TABLE_PARTS, "the run grows and sweeps every part: {growths}");
        assert!(largest_move > 1_000, "and the moves are real: {largest_move}");
    }

    #[test]
    fn expired_key_reuse_keeps_counts_exact() {
        let mut w = warden(10, 100);
        at(&mut w, 0, 0, 1, 1);
        at(&mut w, 1, 20, 1, 2);
        assert_eq!(w.live_entries(), 1);
        assert_eq!(w.stored_entries(), 1);
    }

    #[test]
    fn a_bad_snapshot_is_refused_with_its_kind_and_message() {
        let config = WardenConfig { ttl_ms: 1_000, max_entries: 10 };
        let twice = WardenSnapshot {
            entries: vec![([7, 0, 0], 1, 0), ([7, 0, 0], 2, 1)],
            points: vec![(0, 0, 0)],
            inserted_total: 2,
            last_offset: Some(1),
        };
        let error = Warden::from_snapshot(config, &twice).err().expect("refused");
        assert_eq!(error, WardenSnapshotError::KeyListedTwice { offset: 1 });
        assert_eq!(error.to_string(), "key at offset 1 is listed twice");
        let unordered = WardenSnapshot { points: vec![(1, 0, 0), (0, 1, 0)], ..twice };
        let error = Warden::from_snapshot(config, &unordered).err().expect("refused");
        assert_eq!(error, WardenSnapshotError::PointsOutOfOrder);
        assert_eq!(error.to_string(), "time points are missing or out of order");
    }
}
