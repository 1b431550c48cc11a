//! Start-up, before any shard runs: the input log is opened (with Kafka, the topics are
//! ensured and how far the outputs topic got is read), then the Ledger is read and
//! recovered with std IO, its cuts applied, a snapshot that was due is taken, and where
//! everything resumes is planned (spec: Recovery.RecoveryStarts .. Recovery.RecoveryCompletes).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use tracing::{error, info, warn};
use tribunal_federation::clerk::ClerkConfig;
use tribunal_shards::arbiter::Arbiter;
use tribunal_shards::snapshot_cadence::SnapshotCadence;
use tribunal_shards::usher::{Usher, UsherConfig};
use tribunal_shards::warden::WardenConfig;

use super::resume::{ResumeInputs, ResumePlan, ResumePlanner, ResumeWarning};
use super::{LogSource, NodeConfig, D, MAX_BATCH_RECORDS};
use crate::log::kafka::{self, KafkaConfig};
use crate::log::local::LocalLog;
use crate::publish;
use crate::status::RecoveryFigures;
use crate::storage::loader::LedgerOnDisk;
use crate::storage::{self, checkpoint, Layout, Manifest, PartitionManifest};

/// What the Kafka set-up found before recovery.
pub(super) struct KafkaStart {
    pub config: KafkaConfig,
    pub partitions: u32,
    /// Per partition, one past the last output on the outputs topic (publishing only).
    pub published_ends: Option<Vec<u64>>,
}

/// The input log, opened, and where certified outputs go with the embedded log.
pub(super) struct OpenedLog {
    pub local: Option<(LocalLog, PathBuf)>,
    pub kafka: Option<KafkaStart>,
    pub partitions: u32,
    /// The local outputs log and its end, when publishing with the embedded log.
    pub outputs_log: Option<(LocalLog, u64)>,
}

/// Opens the input log: the local one, or Kafka once its topics exist
/// (spec: KafkaLog.TopicsEnsured; waits, retrying, while the broker is away).
pub(super) fn open_log(config: &NodeConfig) -> anyhow::Result<OpenedLog> {
    let (local, kafka) = match &config.log {
        LogSource::Local(dir) => {
            let log = LocalLog::open(dir).with_context(|| format!("opening the log {}", dir.display()))?;
            (Some((log, dir.clone())), None)
        }
        LogSource::Kafka(kafka) => {
            info!(brokers = %kafka.brokers, topic = %kafka.commands_topic, "connecting to Kafka");
            let partitions = kafka::ensure_topics(kafka, kafka::Topics::CommandsAndOutputs, None)?;
            let published_ends = if config.publish {
                Some(
                    publish::kafka::read_published_ends(kafka, partitions, None)
                        .context("reading the outputs topic")?,
                )
            } else {
                None
            };
            info!(partitions, published_ends = ?published_ends, "Kafka topics ready");
            (None, Some(KafkaStart { config: kafka.clone(), partitions, published_ends }))
        }
    };
    let partitions = kafka.as_ref().map_or(1, |k| k.partitions);
    let outputs_log = match (&local, config.publish) {
        (Some((_, dir)), true) => {
            let path = publish::local::outputs_dir(dir);
            let log = LocalLog::open(&path).with_context(|| format!("opening the outputs log {}", path.display()))?;
            let end = publish::local::published_end(&log).context("reading the outputs log")?;
            Some((log, end))
        }
        _ => None,
    };
    Ok(OpenedLog { local, kafka, partitions, outputs_log })
}

/// What recovery rebuilt and decided.
pub(super) struct Recovery {
    pub manifest: Manifest,
    pub arbiters: Vec<Arbiter<D>>,
    /// One per partition, each resuming right after its durable watermark.
    pub ushers: Vec<Usher<D>>,
    pub plan: ResumePlan,
    pub figures: RecoveryFigures,
}

pub(super) fn usher_config(shard_count: u16, warden: WardenConfig) -> impl Fn(u32) -> UsherConfig {
    move |partition| UsherConfig { partition, shard_count, warden, initial_version: 1 }
}

/// Reads the Ledger, recovers, cuts, takes a due snapshot and plans the resume.
pub(super) fn recover(
    config: &NodeConfig,
    layout: &Layout,
    log: &OpenedLog,
    started: Instant,
) -> anyhow::Result<Recovery> {
    let (shard_count, partitions) = (config.cores.len() as u16, log.partitions);
    info!(shards = shard_count, partitions, data_dir = %config.data_dir.display(), "recovering");
    let ledger = LedgerOnDisk::<D>::read(layout, shard_count)?;
    let mut planner = ResumePlanner::new(resume_inputs(layout, log)?);
    for (partition, offset, output) in ledger.outputs() {
        planner.entry(partition, offset, output);
    }
    if let Some(stray) = planner.stray_partition() {
        anyhow::bail!(
            "the Ledger holds partition {stray}, but the log has only {partitions}: wrong topic or data dir?"
        );
    }
    let markers = ledger.snapshot_markers();
    let (mut manifest, recovered) = ledger.recover(shard_count, usher_config(shard_count, config.warden))?;
    for cut in &recovered.cuts {
        // spec: Recovery.TornTailTruncated
        warn!(shard = cut.shard, segment = cut.segment, position = cut.position, reason = %cut.reason, "cutting the Ledger");
        storage::apply_cut(layout, cut).with_context(|| format!("cutting shard {} at {}", cut.shard, cut.position))?;
    }
    let (ushers, resume) = ushers_and_resume(config, partitions, recovered.ushers, &recovered.watermarks)?;
    take_due_snapshots(config, layout, &mut manifest, &ushers, &recovered.arbiters, &resume);
    let markers: Vec<Option<u64>> = (0..partitions).map(|p| markers.get(&p).copied()).collect();
    let plan = planner.finish(&resume, &markers);
    log_warnings(&plan.warnings);
    let figures = RecoveryFigures {
        replayed_entries: recovered.replayed_entries,
        snapshot_every: config.snapshot_every,
        replay_bound_per_partition: SnapshotCadence::new(config.snapshot_every, MAX_BATCH_RECORDS as u64, None)
            .replay_bound(),
    };
    info!(
        snapshot_markers = ?manifest.partitions.iter().map(|p| (p.partition, p.marker_offset)).collect::<Vec<_>>(),
        resume_offsets = ?plan.resume,
        certified_ends = ?plan.certified,
        replayed_entries = recovered.replayed_entries,
        to_compare = plan.to_compare.len(),
        to_republish = plan.to_republish.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recovered"
    );
    Ok(Recovery { manifest, arbiters: recovered.arbiters, ushers, plan, figures })
}

/// The certified checkpoint, and where publication resumes: the outputs topic's or log's
/// end when this instance may publish; otherwise nothing is republished from here.
fn resume_inputs(layout: &Layout, log: &OpenedLog) -> anyhow::Result<ResumeInputs> {
    let certified = checkpoint::read_certified(layout, log.partitions)?;
    let published_start = match (&log.kafka, &log.outputs_log) {
        (Some(KafkaStart { published_ends: Some(ends), .. }), _) => ends.clone(),
        (_, Some((_, end))) => vec![*end],
        _ => certified.clone(),
    };
    Ok(ResumeInputs {
        partitions: log.partitions,
        certified_checkpoint: certified,
        published_start,
        digest_retention: ClerkConfig::DEFAULT_DIGEST_RETENTION,
    })
}

/// One Usher per partition of the log, each resuming right after its durable watermark
/// (spec: KafkaLog.StartFromLedger); a Ledger partition the log lacks is an error.
fn ushers_and_resume(
    config: &NodeConfig,
    partitions: u32,
    mut recovered: BTreeMap<u32, Usher<D>>,
    watermarks: &BTreeMap<u32, u64>,
) -> anyhow::Result<(Vec<Usher<D>>, Vec<u64>)> {
    if let Some(&stray) = recovered.keys().find(|p| **p >= partitions) {
        anyhow::bail!(
            "the Ledger holds partition {stray}, but the log has only {partitions}: wrong topic or data dir?"
        );
    }
    let shard_count = config.cores.len() as u16;
    let mut ushers = Vec::with_capacity(partitions as usize);
    let mut resume = Vec::with_capacity(partitions as usize);
    for partition in 0..partitions {
        let usher = recovered
            .remove(&partition)
            .unwrap_or_else(|| Usher::new(usher_config(shard_count, config.warden)(partition)));
        let next = watermarks.get(&partition).map_or(0, |w| w + 1);
        assert_eq!(usher.next_offset(), next, "the Usher resumes right after the durable watermark");
        resume.push(next);
        ushers.push(usher);
    }
    Ok((ushers, resume))
}

/// spec: Recovery.DueSnapshotTakenAtRecovery — a snapshot that was due and did not commit
/// before the crash is taken now, from the rebuilt state.
fn take_due_snapshots(
    config: &NodeConfig,
    layout: &Layout,
    manifest: &mut Manifest,
    ushers: &[Usher<D>],
    arbiters: &[Arbiter<D>],
    resume: &[u64],
) {
    for (partition, usher) in ushers.iter().enumerate() {
        let committed = manifest.get(partition as u32).map(|m| m.marker_offset);
        let cadence = SnapshotCadence::new(config.snapshot_every, MAX_BATCH_RECORDS as u64, committed);
        if cadence.due_at_recovery(resume[partition]) {
            let marker = resume[partition] - 1;
            // Not a reason to refuse to start: the Usher asks for one at its first batch.
            if let Err(error) = snapshot_at_recovery(layout, manifest, usher, marker, arbiters) {
                warn!(partition, marker, "could not take the snapshot that was due: {error:#}");
            }
        }
    }
}

/// Takes and commits `usher`'s partition's snapshot at `marker`, the durable watermark,
/// from the state recovery rebuilt. Each shard's first kept segment is the one this
/// process is about to start.
fn snapshot_at_recovery(
    layout: &Layout,
    manifest: &mut Manifest,
    usher: &Usher<D>,
    marker: u64,
    arbiters: &[Arbiter<D>],
) -> anyhow::Result<()> {
    let partition = usher.partition();
    assert_eq!(usher.next_offset(), marker + 1, "the Usher is as after the marker");
    let path = layout.usher_part_path(partition, marker);
    storage::create_part_dir(&path)?;
    storage::write_part(&path, &usher.snapshot()).context("writing the Usher's snapshot part")?;
    let mut parts = vec![(None, 0)];
    for arbiter in arbiters {
        let shard = arbiter.shard();
        let path = layout.shard_part_path(partition, marker, shard);
        storage::write_part(&path, &arbiter.registrar().entities_sorted(partition))
            .with_context(|| format!("writing shard {shard}'s snapshot part"))?;
        let next_segment = layout.segments(shard)?.last().map_or(0, |last| last + 1);
        parts.push((Some(shard), next_segment));
    }
    commit_snapshot(layout, manifest, partition, marker, &parts)
}

/// Every part of `partition`'s snapshot at `marker_offset` is durable: commit the
/// manifest, then delete older snapshots of the partition (spec: Ledger.SnapshotCommitted).
pub(super) fn commit_snapshot(
    layout: &Layout,
    manifest: &mut Manifest,
    partition: u32,
    marker_offset: u64,
    parts: &[(Option<tribunal_shards::router::ShardId>, u64)],
) -> anyhow::Result<()> {
    let mut first_kept_segments = vec![0; manifest.shard_count as usize];
    for (shard, first_kept) in parts {
        if let Some(shard) = shard {
            first_kept_segments[*shard as usize] = *first_kept;
        }
    }
    // The manifest in memory changes only once the new one is on disk: deletion trusts it.
    let mut committed = manifest.clone();
    committed.set(PartitionManifest { partition, marker_offset, first_kept_segments });
    storage::write_atomically(&layout.manifest_path(), &serde_json::to_vec_pretty(&committed)?)
        .context("writing the snapshot manifest")?;
    *manifest = committed;
    storage::delete_older_snapshots(layout, partition, marker_offset).context("deleting older snapshots")?;
    info!(partition, marker_offset, "snapshot committed");
    Ok(())
}

fn log_warnings(warnings: &[ResumeWarning]) {
    for warning in warnings {
        match warning {
            ResumeWarning::OutputsLost { .. } => error!("{warning}"),
            ResumeWarning::CheckpointCapped { .. } => warn!("{warning}"),
        }
    }
}
