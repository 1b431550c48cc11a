//! Recovery, sans-IO part (spec: `specs/recovery.allium`).
//!
//! In: what the IO shell read (every shard's segments, scanned, and the latest
//! complete snapshot). Out: the rebuilt Arbiters and Ushers, the durable watermark
//! of each partition, and where each shard's log must be cut. The shell performs the
//! cuts, then starts the shards and resumes the input log at watermark + 1.
//!
//! Every record of every shard is merged in offset order and each delta goes to the
//! shard that owns its entity, so the rebuilt state does not depend on which shard
//! wrote which record (a cross-shard event's record sits on its coordinator).

use std::collections::BTreeMap;

use crate::arbiter::{shard_of, Arbiter};
use crate::domain::Domain;
use crate::ledger::{LedgerRecord, ScanEnd, Scanned};
use crate::registrar::MAX_PARTITIONS;
use crate::router::ShardId;
use crate::usher::{home_shard, Usher, UsherConfig, UsherDelta, UsherSnapshot};

/// One segment of a shard, as scanned.
pub struct SegmentScan<D: Domain> {
    pub segment: u64,
    pub records: Vec<Scanned<D>>,
    pub end: ScanEnd,
}

/// A shard's segments, in order.
pub struct ShardLog<D: Domain> {
    pub shard: ShardId,
    pub segments: Vec<SegmentScan<D>>,
}

/// A partition's part of a complete snapshot.
pub struct PartitionSnapshot<D: Domain> {
    pub marker_offset: u64,
    pub usher: UsherSnapshot,
    /// Every shard's entities, in any order.
    pub entities: Vec<(D::EntityKey, D::State)>,
}

/// Where a shard's log must be cut: keep `segment` up to `position`, delete later
/// segments of the shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub shard: ShardId,
    pub segment: u64,
    pub position: usize,
    pub reason: String,
}

pub struct Recovered<D: Domain> {
    pub arbiters: Vec<Arbiter<D>>,
    pub ushers: BTreeMap<u32, Usher<D>>,
    /// Durable watermark per partition; a partition absent here has nothing durable.
    pub watermarks: BTreeMap<u32, u64>,
    pub cuts: Vec<Cut>,
    /// Entry records applied from the Ledger (not counting the snapshot).
    pub replayed_entries: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecoveryError {
    #[error("the Usher journal of partition {partition} has a gap: expected offset {expected}, found {found}")]
    JournalGap { partition: u32, expected: u64, found: u64 },
    #[error("partition {partition}: journal ends at offset {journal_end:?} but the durable watermark is {watermark}")]
    JournalShort { partition: u32, journal_end: Option<u64>, watermark: u64 },
    #[error("an entity delta of partition {partition} at offset {offset} could not be applied: {reason}")]
    BadDelta { partition: u32, offset: u64, reason: String },
    #[error("the Ledger or snapshot of partition {partition} is not consistent: {reason}")]
    Corrupt { partition: u32, reason: String },
}

/// A record's place in a shard log: (segment index in `segments`, record index).
type Place = (usize, usize);

fn record_partition_offset<D: Domain>(record: &LedgerRecord<D>) -> (u32, u64) {
    match record {
        LedgerRecord::Entry { partition, offset, .. } => (*partition, *offset),
        LedgerRecord::BatchEnd { partition, last_offset, .. } => (*partition, *last_offset),
    }
}

/// Entry records to replay, as (partition, offset, record).
type Entries<'a, D> = Vec<(u32, u64, &'a LedgerRecord<D>)>;
/// Each partition's Usher journal, from its home shard's batch-end markers.
type Journals<'a> = BTreeMap<u32, Vec<&'a UsherDelta>>;

/// Rebuilds an instance from its Ledger and snapshot.
pub fn recover<D: Domain>(
    shard_count: u16,
    usher_config: impl Fn(u32) -> UsherConfig,
    mut logs: Vec<ShardLog<D>>,
    snapshot: BTreeMap<u32, PartitionSnapshot<D>>,
) -> Result<Recovered<D>, RecoveryError> {
    logs.sort_by_key(|l| l.shard);
    assert!(logs.iter().all(|l| l.shard < shard_count), "one log per shard of this instance");
    let mut cuts = cut_invalid_tails(&mut logs);
    let (all_places, kept, watermarks) = settle_watermarks(&logs, &snapshot, shard_count);
    cut_past_watermarks(&logs, &all_places, &kept, &mut cuts);
    let mut arbiters = restore_snapshot(&snapshot, shard_count)?;
    let (entries, journals) = collect_entries(&logs, &all_places, &kept, &snapshot, shard_count);
    let replayed_entries = apply_entries(&mut arbiters, entries, shard_count)?;
    let ushers = rebuild_ushers(usher_config, &watermarks, &snapshot, journals)?;
    Ok(Recovered { arbiters, ushers, watermarks, cuts, replayed_entries })
}

/// spec: Recovery.TornTailTruncated — the valid prefix ends at the first invalid
/// record; later segments of that shard are dropped. Returns the cuts this makes.
fn cut_invalid_tails<D: Domain>(logs: &mut [ShardLog<D>]) -> Vec<Cut> {
    let mut cuts = Vec::new();
    for log in logs {
        if let Some(bad) = log.segments.iter().position(|s| s.end != ScanEnd::Clean) {
            let ScanEnd::Invalid { position, reason } = log.segments[bad].end.clone() else { unreachable!() };
            cuts.push(Cut { shard: log.shard, segment: log.segments[bad].segment, position, reason });
            log.segments.truncate(bad + 1);
            log.segments[bad].end = ScanEnd::Clean;
        }
    }
    cuts
}

/// spec: Recovery.DurableWatermarkRecomputed, Recovery.ReplayBoundedByWatermark —
/// W = min over shards of the last marker; records past W are cut; cutting may
/// remove another partition's marker, so repeat until W stops falling. Returns every
/// log's record places, how many of them are kept, and W.
fn settle_watermarks<D: Domain>(
    logs: &[ShardLog<D>],
    snapshot: &BTreeMap<u32, PartitionSnapshot<D>>,
    shard_count: u16,
) -> (Vec<Vec<Place>>, Vec<usize>, BTreeMap<u32, u64>) {
    let all_places: Vec<Vec<Place>> = logs
        .iter()
        .map(|log| {
            log.segments.iter().enumerate().flat_map(|(s, seg)| (0..seg.records.len()).map(move |r| (s, r))).collect()
        })
        .collect();
    let mut kept: Vec<usize> = all_places.iter().map(Vec::len).collect();
    let watermarks = loop {
        let watermarks = durable_watermarks(logs, &all_places, &kept, snapshot, shard_count);
        let mut changed = false;
        for (i, log) in logs.iter().enumerate() {
            let first_beyond = all_places[i][..kept[i]].iter().position(|&(s, r)| {
                let (partition, offset) = record_partition_offset(&log.segments[s].records[r].record);
                watermarks.get(&partition).is_none_or(|w| offset > *w)
            });
            if let Some(index) = first_beyond {
                kept[i] = index;
                changed = true;
            }
        }
        if !changed {
            break watermarks;
        }
    };
    (all_places, kept, watermarks)
}

/// Cuts each log whose records are not all kept right after its last kept record;
/// this cut replaces the shard's torn-tail cut.
fn cut_past_watermarks<D: Domain>(
    logs: &[ShardLog<D>],
    all_places: &[Vec<Place>],
    kept: &[usize],
    cuts: &mut Vec<Cut>,
) {
    for (i, log) in logs.iter().enumerate() {
        if kept[i] < all_places[i].len() {
            let (segment, position) = match kept[i].checked_sub(1).map(|k| all_places[i][k]) {
                Some((s, r)) => (log.segments[s].segment, log.segments[s].records[r].end_position),
                None => (log.segments[0].segment, 0),
            };
            cuts.retain(|c| c.shard != log.shard);
            cuts.push(Cut {
                shard: log.shard,
                segment,
                position,
                reason: "records past the durable watermark (not durable on every shard)".into(),
            });
        }
    }
}

/// spec: Recovery.SnapshotLoaded, Recovery.RegistrarRebuilt — new Arbiters holding
/// the snapshot's entities, each checked.
fn restore_snapshot<D: Domain>(
    snapshot: &BTreeMap<u32, PartitionSnapshot<D>>,
    shard_count: u16,
) -> Result<Vec<Arbiter<D>>, RecoveryError> {
    let mut arbiters: Vec<Arbiter<D>> = (0..shard_count).map(|s| Arbiter::new(s, shard_count)).collect();
    for (partition, part) in snapshot {
        if *partition >= MAX_PARTITIONS {
            return Err(RecoveryError::Corrupt { partition: *partition, reason: "partition out of range".into() });
        }
        for (key, state) in &part.entities {
            D::validate_state(key, state).map_err(|invalid| RecoveryError::Corrupt {
                partition: *partition,
                reason: format!("snapshot entity: {invalid}"),
            })?;
            arbiters[shard_of::<D>(key, shard_count) as usize].restore_entity(*partition, key, *state);
        }
    }
    Ok(arbiters)
}

/// The kept records past each partition's snapshot marker: the entries, sorted by
/// (partition, offset), and the journals from each partition's home shard.
fn collect_entries<'a, D: Domain>(
    logs: &'a [ShardLog<D>],
    all_places: &[Vec<Place>],
    kept: &[usize],
    snapshot: &BTreeMap<u32, PartitionSnapshot<D>>,
    shard_count: u16,
) -> (Entries<'a, D>, Journals<'a>) {
    let marker = |partition: u32| snapshot.get(&partition).map(|p| p.marker_offset);
    let mut entries: Entries<'a, D> = Vec::new();
    let mut journals: Journals<'a> = BTreeMap::new();
    for (i, log) in logs.iter().enumerate() {
        for &(s, r) in &all_places[i][..kept[i]] {
            let record = &log.segments[s].records[r].record;
            let (partition, offset) = record_partition_offset(record);
            if marker(partition).is_some_and(|m| offset <= m) {
                continue;
            }
            match record {
                LedgerRecord::Entry { .. } => entries.push((partition, offset, record)),
                LedgerRecord::BatchEnd { usher: Some(delta), .. } => {
                    if log.shard == home_shard(partition, shard_count) {
                        journals.entry(partition).or_default().push(delta);
                    }
                }
                LedgerRecord::BatchEnd { usher: None, .. } => {}
            }
        }
    }
    entries.sort_by_key(|(partition, offset, _)| (*partition, *offset));
    (entries, journals)
}

/// Applies the sorted entries' deltas to the Arbiters owning their entities, each
/// checked. Returns how many entries were replayed.
fn apply_entries<D: Domain>(
    arbiters: &mut [Arbiter<D>],
    entries: Entries<'_, D>,
    shard_count: u16,
) -> Result<u64, RecoveryError> {
    // Exactly one entry per offset: a second one can only come from a damaged Ledger.
    if let Some(pair) = entries.windows(2).find(|w| (w[0].0, w[0].1) == (w[1].0, w[1].1)) {
        let reason = format!("two entries for offset {}", pair[0].1);
        return Err(RecoveryError::Corrupt { partition: pair[0].0, reason });
    }
    let replayed_entries = entries.len() as u64;
    for (partition, offset, record) in entries {
        if partition >= MAX_PARTITIONS {
            return Err(RecoveryError::Corrupt { partition, reason: "partition out of range".into() });
        }
        let LedgerRecord::Entry { deltas, .. } = record else { unreachable!() };
        for (key, state) in deltas {
            D::validate_state(key, state).map_err(|invalid| RecoveryError::BadDelta {
                partition,
                offset,
                reason: invalid.to_string(),
            })?;
            let owner = shard_of::<D>(key, shard_count) as usize;
            arbiters[owner].restore_entity(partition, key, *state);
        }
    }
    Ok(replayed_entries)
}

/// spec: Recovery.WardenRebuilt — an Usher for every partition with a watermark or
/// a snapshot: restored from the snapshot, then its journal replayed up to W.
fn rebuild_ushers<D: Domain>(
    usher_config: impl Fn(u32) -> UsherConfig,
    watermarks: &BTreeMap<u32, u64>,
    snapshot: &BTreeMap<u32, PartitionSnapshot<D>>,
    mut journals: Journals<'_>,
) -> Result<BTreeMap<u32, Usher<D>>, RecoveryError> {
    let mut ushers = BTreeMap::new();
    let partitions: Vec<u32> = watermarks.keys().chain(snapshot.keys()).copied().collect();
    for partition in partitions {
        if ushers.contains_key(&partition) {
            continue;
        }
        let mut usher = Usher::<D>::new(usher_config(partition));
        if let Some(part) = snapshot.get(&partition) {
            usher
                .restore(&part.usher)
                .map_err(|error| RecoveryError::Corrupt { partition, reason: error.to_string() })?;
        }
        let watermark = watermarks.get(&partition).copied();
        let journal = journals.remove(&partition).unwrap_or_default();
        replay_journal(&mut usher, partition, journal, watermark)?;
        ushers.insert(partition, usher);
    }
    Ok(ushers)
}

/// Replays a partition's journal, in offset order, into its Usher up to the
/// watermark, which the journal must then reach exactly.
fn replay_journal<D: Domain>(
    usher: &mut Usher<D>,
    partition: u32,
    mut journal: Vec<&UsherDelta>,
    watermark: Option<u64>,
) -> Result<(), RecoveryError> {
    journal.sort_by_key(|d| d.first_offset);
    for delta in journal {
        if watermark.is_some_and(|w| delta.last_offset > w) {
            break;
        }
        if delta.first_offset != usher.next_offset() {
            return Err(RecoveryError::JournalGap {
                partition,
                expected: usher.next_offset(),
                found: delta.first_offset,
            });
        }
        usher.apply_delta(delta).map_err(|error| RecoveryError::Corrupt { partition, reason: error.to_string() })?;
    }
    if let Some(w) = watermark {
        if usher.next_offset() != w + 1 {
            let journal_end = usher.next_offset().checked_sub(1);
            return Err(RecoveryError::JournalShort { partition, journal_end, watermark: w });
        }
    }
    Ok(())
}

/// W per partition: min over shards of each shard's last kept marker, never below
/// the snapshot marker. A partition with a shard that has no marker (and no
/// snapshot) has nothing durable.
fn durable_watermarks<D: Domain>(
    logs: &[ShardLog<D>],
    all_places: &[Vec<Place>],
    kept: &[usize],
    snapshot: &BTreeMap<u32, PartitionSnapshot<D>>,
    shard_count: u16,
) -> BTreeMap<u32, u64> {
    let mut per_shard: Vec<BTreeMap<u32, u64>> = vec![BTreeMap::new(); shard_count as usize];
    let mut partitions: Vec<u32> = snapshot.keys().copied().collect();
    for (i, log) in logs.iter().enumerate() {
        for &(s, r) in &all_places[i][..kept[i]] {
            let record = &log.segments[s].records[r].record;
            let (partition, offset) = record_partition_offset(record);
            partitions.push(partition);
            if let LedgerRecord::BatchEnd { .. } = record {
                let mark = per_shard[log.shard as usize].entry(partition).or_insert(offset);
                *mark = (*mark).max(offset);
            }
        }
    }
    partitions.sort_unstable();
    partitions.dedup();
    let mut watermarks = BTreeMap::new();
    for partition in partitions {
        let floor = snapshot.get(&partition).map(|p| p.marker_offset);
        let mut w: Option<u64> = None;
        let mut all = true;
        for shard in &per_shard {
            match shard.get(&partition).copied().max(floor) {
                Some(mark) => w = Some(w.map_or(mark, |w: u64| w.min(mark))),
                None => all = false,
            }
        }
        if all {
            if let Some(w) = w {
                watermarks.insert(partition, w);
            }
        }
    }
    watermarks
}
