//! Where a recovered instance resumes, decided without IO (spec: Recovery.RecoveryCompletes,
//! Recovery.InputResumesAfterWatermark, Clerk.CertifiedCheckpointPersisted,
//! Publisher.ResumeFromOutputTopic, Clerk.CertifiedDigestsResent).
//!
//! In: each partition's durable watermark (what recovery found), its snapshot marker,
//! the persisted certified checkpoint, where publication resumes (the outputs topic's or
//! log's end), and every output still in the Ledger. Out: the input's resume offsets,
//! the certified ends the Clerk starts from (never past what is durable), the own outputs
//! the Clerk must compare again, the certified ones the publisher may still need, the
//! digests kept for lagging peers, and what the shell must warn about.

use std::collections::BTreeSet;

use tribunal_shards::digest::output_digest;

use crate::publish::DurableOutput;

/// What the data dir and the log said before recovery.
#[derive(Debug, Clone)]
pub struct ResumeInputs {
    pub partitions: u32,
    /// Per partition, the persisted certified checkpoint (an end).
    pub certified_checkpoint: Vec<u64>,
    /// Per partition, where publication resumes: the outputs topic's or log's end when
    /// this instance may publish, the checkpoint otherwise.
    pub published_start: Vec<u64>,
    /// Certified digests kept below the checkpoint for peers further behind.
    pub digest_retention: u64,
}

/// Something the plan had to decide against the data, for the shell to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeWarning {
    /// Outputs not yet `what` (published or certified) at `first..=last` left with the
    /// segments a snapshot replaced: they resume after the marker.
    OutputsLost { partition: u32, what: &'static str, first_missing: u64, last_missing: u64 },
    /// The certified checkpoint was past the durable watermark; it is capped.
    CheckpointCapped { partition: u32, checkpoint: u64, durable_end: u64 },
}

/// The decisions: see the module documentation.
#[derive(Debug, Default)]
pub struct ResumePlan {
    /// Per partition, the next offset to read: the durable watermark + 1.
    pub resume: Vec<u64>,
    /// Per partition, the certified end the Clerk starts from.
    pub certified: Vec<u64>,
    /// Per partition, the certified end before outputs the Ledger lost were skipped: the
    /// offsets between it and `certified` were never certified here.
    pub certified_before_skip: Vec<u64>,
    /// Per partition, where publication resumes.
    pub published_start: Vec<u64>,
    /// Own outputs in [certified, resume): the Clerk compares them again.
    pub to_compare: Vec<DurableOutput>,
    /// Certified outputs in [published_start, certified): the publisher may still need them.
    pub to_republish: Vec<DurableOutput>,
    /// Per partition, digests of own outputs in the retention window below `certified`.
    pub retained_digests: Vec<Vec<(u64, u128)>>,
    pub warnings: Vec<ResumeWarning>,
}

/// Gathers, from one pass over the Ledger, the outputs the plan needs, before recovery
/// consumes the segments; then [`ResumePlanner::finish`] decides.
pub struct ResumePlanner {
    inputs: ResumeInputs,
    /// Outputs at or past the lower of the checkpoint and the published start.
    held: Vec<DurableOutput>,
    /// (partition, offset, digest) in the retention window below the checkpoint.
    digests: Vec<(u32, u64, u128)>,
    /// The highest partition seen in the Ledger that the log does not have.
    stray: Option<u32>,
}

impl ResumePlanner {
    pub fn new(inputs: ResumeInputs) -> Self {
        let p = inputs.partitions as usize;
        assert!(inputs.certified_checkpoint.len() == p && inputs.published_start.len() == p, "one end per partition");
        Self { inputs, held: Vec::new(), digests: Vec::new(), stray: None }
    }

    /// A partition the Ledger holds outputs of but the log does not have.
    pub fn stray_partition(&self) -> Option<u32> {
        self.stray
    }

    /// One output found in the Ledger. One of a partition the log lacks is not planned
    /// for: [`ResumePlanner::stray_partition`] names it, and start-up refuses the data dir.
    pub fn entry(&mut self, partition: u32, offset: u64, output: &[u8]) {
        if partition >= self.inputs.partitions {
            self.stray = Some(self.stray.map_or(partition, |s| s.max(partition)));
            return;
        }
        let p = partition as usize;
        let checkpoint = self.inputs.certified_checkpoint.get(p).copied().unwrap_or(0);
        if offset < checkpoint && offset + self.inputs.digest_retention >= checkpoint {
            self.digests.push((partition, offset, output_digest(output)));
        }
        let needed_from = self.inputs.published_start.get(p).copied().unwrap_or(0).min(checkpoint);
        if offset >= needed_from {
            self.held.push(DurableOutput { partition, offset, bytes: output.to_vec() });
        }
    }

    /// Decides, given each partition's resume offset (durable watermark + 1, 0: nothing
    /// durable) and snapshot marker.
    pub fn finish(self, resume: &[u64], snapshot_markers: &[Option<u64>]) -> ResumePlan {
        let ResumePlanner { inputs, mut held, digests, .. } = self;
        assert!(resume.len() == inputs.partitions as usize && snapshot_markers.len() == resume.len());
        let mut warnings = Vec::new();
        let mut published_start = inputs.published_start;
        let mut certified = inputs.certified_checkpoint;
        skip_outputs_lost(&mut published_start, snapshot_markers, &mut held, "published", &mut warnings);
        let certified_before_skip = certified.clone();
        skip_outputs_lost(&mut certified, snapshot_markers, &mut held, "certified", &mut warnings);
        // Outputs past the durable watermark were cut with their records.
        held.retain(|o| o.offset < resume[o.partition as usize]);
        held.sort_by_key(|o| (o.partition, o.offset));
        cap_by_durable(&mut certified, resume, &mut warnings);
        let retained_digests = retained(digests, &certified);
        let (to_republish, to_compare): (Vec<_>, Vec<_>) =
            held.into_iter().partition(|o| o.offset < certified[o.partition as usize]);
        let to_republish =
            to_republish.into_iter().filter(|o| o.offset >= published_start[o.partition as usize]).collect();
        ResumePlan {
            resume: resume.to_vec(),
            certified,
            certified_before_skip,
            published_start,
            to_compare,
            to_republish,
            retained_digests,
            warnings,
        }
    }
}

/// Outputs at or below a partition's snapshot marker may have left with the segments the
/// snapshot replaced. Deletion waits for publication, so this happens only when the
/// outputs topic lost records or this data dir ran without publishing. If the Ledger still
/// holds every output from `ends[p]` to the marker, they are published again; otherwise
/// they cannot be, and waiting for them would stall the publisher for ever: resume after
/// the marker, loudly.
fn skip_outputs_lost(
    ends: &mut [u64],
    snapshot_markers: &[Option<u64>],
    held: &mut Vec<DurableOutput>,
    what: &'static str,
    warnings: &mut Vec<ResumeWarning>,
) {
    for (p, marker) in snapshot_markers.iter().enumerate() {
        let (Some(marker), partition) = (*marker, p as u32) else { continue };
        let end = &mut ends[p];
        if *end > marker {
            continue;
        }
        let offsets: BTreeSet<u64> = held
            .iter()
            .filter(|o| o.partition == partition && o.offset >= *end && o.offset <= marker)
            .map(|o| o.offset)
            .collect();
        if offsets.len() as u64 == marker - *end + 1 {
            continue; // every one of them is still in the Ledger
        }
        warnings.push(ResumeWarning::OutputsLost { partition, what, first_missing: *end, last_missing: marker });
        *end = marker + 1;
        held.retain(|o| o.partition != partition || o.offset > marker);
    }
}

/// The certified checkpoint never exceeds the durable watermark (spec:
/// Recovery.RecoveryCompletes): a stale or foreign checkpoint must not make peers skip.
fn cap_by_durable(certified: &mut [u64], resume: &[u64], warnings: &mut Vec<ResumeWarning>) {
    for (p, end) in certified.iter_mut().enumerate() {
        if *end > resume[p] {
            let warning =
                ResumeWarning::CheckpointCapped { partition: p as u32, checkpoint: *end, durable_end: resume[p] };
            warnings.push(warning);
            *end = resume[p];
        }
    }
}

/// Per partition, the digests below its certified end, in offset order.
fn retained(mut digests: Vec<(u32, u64, u128)>, certified: &[u64]) -> Vec<Vec<(u64, u128)>> {
    digests.sort_unstable_by_key(|(p, o, _)| (*p, *o));
    let mut seed = vec![Vec::new(); certified.len()];
    for (partition, offset, digest) in digests {
        if let Some(partition_seed) = seed.get_mut(partition as usize) {
            if offset < certified[partition as usize] {
                partition_seed.push((offset, digest));
            }
        }
    }
    seed
}

impl std::fmt::Display for ResumeWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResumeWarning::OutputsLost { partition, what, first_missing, last_missing } => write!(
                f,
                "partition {partition}: outputs {first_missing}..={last_missing} not yet {what} are no longer in \
                 the Ledger (the outputs topic was emptied, this data dir ran without --publish, or it predates \
                 the certified checkpoint); resuming after the snapshot marker"
            ),
            ResumeWarning::CheckpointCapped { partition, checkpoint, durable_end } => write!(
                f,
                "partition {partition}: the certified checkpoint {checkpoint} is past the durable watermark \
                 (end {durable_end}); capping it"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(certified: u64, published: u64) -> ResumeInputs {
        ResumeInputs {
            partitions: 1,
            certified_checkpoint: vec![certified],
            published_start: vec![published],
            digest_retention: 3,
        }
    }

    fn offsets(outputs: &[DurableOutput]) -> Vec<u64> {
        outputs.iter().map(|o| o.offset).collect()
    }

    /// A planner that saw outputs for every offset in `held`.
    fn planner(inputs: ResumeInputs, held: std::ops::Range<u64>) -> ResumePlanner {
        let mut planner = ResumePlanner::new(inputs);
        for offset in held.rev() {
            planner.entry(0, offset, &offset.to_le_bytes());
        }
        planner
    }

    #[test]
    fn outputs_split_at_the_certified_and_published_ends() {
        // spec: Recovery.RecoveryCompletes
        // spec: Publisher.ResumeFromOutputTopic
        // Durable through 9, certified through 6, published through 3.
        let plan = planner(inputs(7, 4), 0..10).finish(&[10], &[None]);
        assert_eq!(plan.resume, vec![10]);
        assert_eq!(plan.certified, vec![7]);
        assert_eq!(offsets(&plan.to_compare), vec![7, 8, 9], "compared again, in offset order");
        assert_eq!(offsets(&plan.to_republish), vec![4, 5, 6], "certified, maybe not published");
        assert!(plan.warnings.is_empty());
    }

    #[test]
    fn digests_of_the_retention_window_below_the_checkpoint_are_kept() {
        // spec: Clerk.CertifiedDigestsResent
        let plan = planner(inputs(7, 7), 0..10).finish(&[10], &[None]);
        let kept: Vec<u64> = plan.retained_digests[0].iter().map(|(o, _)| *o).collect();
        assert_eq!(kept, vec![4, 5, 6]);
        assert_eq!(plan.retained_digests[0][0].1, output_digest(&4u64.to_le_bytes()));
    }

    #[test]
    fn a_checkpoint_past_the_durable_watermark_is_capped() {
        // spec: Recovery.RecoveryCompletes — never certify past what is durable now.
        let plan = planner(inputs(12, 12), 0..10).finish(&[8], &[None]);
        assert_eq!(plan.certified, vec![8]);
        assert_eq!(
            plan.warnings,
            vec![ResumeWarning::CheckpointCapped { partition: 0, checkpoint: 12, durable_end: 8 }]
        );
        assert_eq!(offsets(&plan.to_compare), Vec::<u64>::new(), "outputs past the watermark were cut");
    }

    #[test]
    fn outputs_a_snapshot_took_away_are_skipped_loudly_and_the_gap_is_known() {
        // spec: Publisher.ResumeFromOutputTopic — the outputs topic ends at 2, but the
        // Ledger holds only what follows the snapshot at 5.
        let plan = planner(inputs(3, 2), 6..10).finish(&[10], &[Some(5)]);
        assert_eq!(plan.published_start, vec![6]);
        assert_eq!(plan.certified, vec![6]);
        assert_eq!(plan.certified_before_skip, vec![3], "3..6 were never certified here");
        assert_eq!(plan.warnings.len(), 2);
        assert!(matches!(plan.warnings[0], ResumeWarning::OutputsLost { what: "published", first_missing: 2, .. }));
        assert_eq!(offsets(&plan.to_compare), vec![6, 7, 8, 9]);
    }

    #[test]
    fn outputs_of_a_partition_the_log_lacks_are_named_not_planned() {
        let mut planner = planner(inputs(0, 0), 0..3);
        planner.entry(4, 0, b"x");
        planner.entry(2, 0, b"x");
        assert_eq!(planner.stray_partition(), Some(4));
        assert_eq!(offsets(&planner.finish(&[3], &[None]).to_compare), vec![0, 1, 2]);
    }

    #[test]
    fn outputs_still_held_below_the_marker_are_published_again() {
        // The Ledger still holds 2..=5 (deletion waited for publication): nothing skipped.
        let plan = planner(inputs(8, 2), 2..10).finish(&[10], &[Some(5)]);
        assert_eq!(plan.published_start, vec![2]);
        assert!(plan.warnings.is_empty());
        assert_eq!(offsets(&plan.to_republish), vec![2, 3, 4, 5, 6, 7]);
    }
}
