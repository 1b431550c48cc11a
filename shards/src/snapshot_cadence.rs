//! When a partition's Usher asks for a snapshot, and how far it may plan while one is
//! being written (spec: `specs/ledger.allium`, `SnapshotCadence`).
//!
//! The count is of records since the last **committed** snapshot, recovered at start
//! from the manifest's marker, so no restart resets it. While a requested snapshot is
//! not committed, the Usher plans nothing past it. Together these bound what recovery
//! replays from the Ledger: at most `snapshot_every + max_batch_records` entries
//! (spec: Recovery.ReplayBoundedBySnapshotCadence).

/// One partition's snapshot cadence. Sans-IO: the shell tells it where the Usher is and
/// which snapshots were committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotCadence {
    /// `--snapshot-every`; 0: never.
    snapshot_every: u64,
    /// The largest batch the Usher plans.
    max_batch_records: u64,
    /// The first offset after the committed snapshot's marker; 0 when there is none.
    covered_end: u64,
    /// The marker of a requested snapshot not yet committed.
    requested_marker: Option<u64>,
}

impl SnapshotCadence {
    /// At start: `committed_marker` is the partition's marker in the snapshot manifest
    /// (spec: Ledger.CadenceRecoveredAtStart).
    pub fn new(snapshot_every: u64, max_batch_records: u64, committed_marker: Option<u64>) -> Self {
        assert!(max_batch_records > 0, "a batch holds at least one record");
        Self {
            snapshot_every,
            max_batch_records,
            covered_end: committed_marker.map_or(0, |m| m + 1),
            requested_marker: None,
        }
    }

    /// Most Ledger entries a recovery can replay for this partition: none past the
    /// committed marker beyond this many are ever planned (spec: Ledger.PlannedWithinCadence).
    /// `None` when snapshots are off.
    pub fn replay_bound(&self) -> Option<u64> {
        (self.snapshot_every > 0).then(|| self.snapshot_every + self.max_batch_records)
    }

    /// Whether the Usher may plan its next batch now, or must wait for the requested
    /// snapshot's commit (spec: Ledger.PlanningWaitsForSnapshot). The request ends a batch,
    /// so this holds the Usher right after the marker: nothing is planned past a snapshot
    /// that is not committed.
    pub fn may_plan(&self) -> bool {
        self.requested_marker.is_none()
    }

    /// Whether the batch of `batch_records` starting at `next_offset` must end with a
    /// snapshot (spec: Ledger.SnapshotDue).
    pub fn snapshot_due(&self, next_offset: u64, batch_records: u64) -> bool {
        assert!(batch_records <= self.max_batch_records, "a batch of {batch_records} records is over the bound");
        self.snapshot_every > 0
            && self.requested_marker.is_none()
            && (next_offset + batch_records).saturating_sub(self.covered_end) >= self.snapshot_every
    }

    /// A snapshot was requested at `marker` (the cadence's own, or one another
    /// partition's snapshot asked for).
    pub fn requested(&mut self, marker: u64) {
        assert!(marker >= self.covered_end, "a snapshot at {marker} is below the committed one");
        self.requested_marker = Some(self.requested_marker.map_or(marker, |m| m.max(marker)));
    }

    /// The manifest now names a snapshot at `marker` (spec: Ledger.CadenceAdvancesOnCommit).
    pub fn committed(&mut self, marker: u64) {
        self.covered_end = self.covered_end.max(marker + 1);
        if self.requested_marker.is_some_and(|m| m <= marker) {
            self.requested_marker = None;
        }
    }

    /// At start, before anything is planned: whether a snapshot was due and did not
    /// commit, so recovery must take one at the durable watermark, `next_offset - 1`
    /// (spec: Recovery.DueSnapshotTakenAtRecovery).
    pub fn due_at_recovery(&self, next_offset: u64) -> bool {
        self.snapshot_every > 0 && next_offset.saturating_sub(self.covered_end) >= self.snapshot_every
    }

    /// Whether a requested snapshot is not committed yet.
    pub fn pending(&self) -> bool {
        self.requested_marker.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plans batches of `len` from `next` until a snapshot is due; returns its marker.
    fn run_until_due(cadence: &SnapshotCadence, mut next: u64, len: u64) -> u64 {
        while !cadence.snapshot_due(next, len) {
            next += len;
        }
        next + len - 1
    }

    #[test]
    fn the_count_starts_at_the_committed_marker_not_at_the_process_start() {
        // spec: Ledger.CadenceRecoveredAtStart
        // Six restarts of 2,000 records each with snapshot_every 2,500: the cadence made
        // anew at each start from the manifest (none) still asks at the second run.
        let fresh = SnapshotCadence::new(2_500, 4_096, None);
        assert!(!fresh.snapshot_due(0, 2_000), "2,000 records since nothing: not yet");
        let restarted = SnapshotCadence::new(2_500, 4_096, None);
        assert!(restarted.snapshot_due(2_000, 2_000), "4,000 records since nothing: due, whatever the restart");
        let after_snapshot = SnapshotCadence::new(2_500, 4_096, Some(3_999));
        assert!(!after_snapshot.snapshot_due(4_000, 2_000));
        assert!(after_snapshot.snapshot_due(6_000, 500));
    }

    #[test]
    fn a_pending_snapshot_holds_planning_right_after_its_batch() {
        // spec: Ledger.PlanningWaitsForSnapshot
        // spec: Ledger.CadenceAdvancesOnCommit
        let mut cadence = SnapshotCadence::new(1_000, 100, Some(99));
        let marker = run_until_due(&cadence, 100, 100);
        assert_eq!(marker, 1_099);
        cadence.requested(marker);
        assert!(cadence.pending());
        assert!(!cadence.snapshot_due(1_100, 100), "one snapshot at a time");
        assert!(!cadence.may_plan(), "nothing past the pending snapshot");
        cadence.committed(marker);
        assert!(!cadence.pending());
        assert!(cadence.may_plan());
        assert!(!cadence.snapshot_due(1_100, 100), "the count restarts at the new marker");
    }

    #[test]
    fn a_snapshot_lost_in_a_crash_is_taken_at_recovery() {
        // spec: Recovery.DueSnapshotTakenAtRecovery
        let cadence = SnapshotCadence::new(1_000, 100, Some(99));
        assert!(!cadence.due_at_recovery(1_099), "999 records since the snapshot");
        assert!(cadence.due_at_recovery(1_100));
        assert!(!SnapshotCadence::new(0, 100, None).due_at_recovery(1_000_000), "snapshots off");
        assert!(!SnapshotCadence::new(10, 100, None).due_at_recovery(0), "nothing durable");
    }

    #[test]
    fn an_older_commit_does_not_release_a_newer_request() {
        let mut cadence = SnapshotCadence::new(10, 4, None);
        cadence.requested(11);
        cadence.requested(15);
        cadence.committed(11);
        assert!(cadence.pending());
        cadence.committed(15);
        assert!(!cadence.pending());
    }

    #[test]
    fn nothing_pending_never_holds_a_batch_back() {
        // A data dir that ran with a larger snapshot_every is already past the bound: it
        // plans, and its first batch asks for a snapshot.
        let cadence = SnapshotCadence::new(100, 10, None);
        assert!(cadence.may_plan());
        assert!(cadence.snapshot_due(5_000, 1));
        let off = SnapshotCadence::new(0, 10, None);
        assert!(off.may_plan() && !off.snapshot_due(5_000, 10));
        assert_eq!(off.replay_bound(), None);
    }

    #[test]
    fn whatever_the_batches_and_crashes_planning_stays_within_the_bound() {
        // spec: Ledger.PlannedWithinCadence
        // Random batch sizes, commits that arrive late or never (a crash), and restarts
        // that rebuild the cadence from the committed marker only.
        let mut rng = crate::simulator::SplitMix64(7);
        for every in [1, 7, 100, 2_500] {
            let max_batch = 1 + rng.below(300);
            let mut committed: Option<u64> = None;
            let mut cadence = SnapshotCadence::new(every, max_batch, committed);
            let mut next = 0u64;
            for _ in 0..20_000 {
                if rng.below(50) == 0 {
                    // Crash and restart; recovery takes a snapshot that was due and lost.
                    cadence = SnapshotCadence::new(every, max_batch, committed);
                    if cadence.due_at_recovery(next) {
                        committed = Some(next - 1);
                        cadence.committed(next - 1);
                    }
                }
                if let (Some(m), true) = (cadence.requested_marker, rng.below(4) == 0) {
                    committed = Some(m);
                    cadence.committed(m);
                }
                if !cadence.may_plan() {
                    continue;
                }
                let len = 1 + rng.below(max_batch);
                if cadence.snapshot_due(next, len) {
                    cadence.requested(next + len - 1);
                }
                next += len;
                let covered = committed.map_or(0, |m| m + 1);
                assert!(
                    next - covered <= cadence.replay_bound().unwrap(),
                    "every {every}: {next} planned, {covered} covered"
                );
            }
        }
    }
}
