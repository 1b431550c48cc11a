//! One running instance: recovery, then one pinned glommio executor per shard.
//!
//! Start-up: the data directory is checked; with Kafka, the topics are ensured and how far
//! the outputs topic got is read; every shard's Ledger is read and recovered (std IO,
//! before any shard runs), cuts are applied, and only then are the shards started. Until
//! every shard has started the instance reports `recovering` in `status.json`
//! (spec: Recovery.RecoveryCompletes; nothing is advertised before).
//!
//! Per shard, on its own core:
//! - one receiver task per inbound channel: `Arbiter::handle`, then effects;
//! - one sender task per outbound channel, draining a local unbounded queue. Receiver
//!   tasks never await a bounded send, so two shards with full channels towards each
//!   other cannot deadlock; the Ushers' backpressure bounds what is in flight;
//! - one Ledger task: whatever records accumulated since its last commit are written
//!   and made durable with one fdatasync (group commit), then the shard's durable
//!   watermarks advance to the batch-end markers among them, and (Kafka) the outputs
//!   that became durable go to the publisher thread;
//! - one Usher task per partition whose home shard it is (spec: KafkaLog.PartitionIsOrderingDomain).
//!
//! Shards talk only through glommio's shared-nothing channels. Durable watermarks are
//! also published in atomics, read for status, snapshots and shutdown.

pub mod cores;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::clerk::peer_links::LinksConfig;
use anyhow::Context;
use glommio::channels::local_channel::{self, LocalSender};
use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use glommio::{LocalExecutorBuilder, Placement};
use serde::Serialize;
use tracing::{error, info, warn};
use tribunal_federation::clerk::ClerkConfig;
use tribunal_shards::arbiter::{Arbiter, ShardEffect, ShardMessage};
use tribunal_shards::envelope::Envelope;
use tribunal_shards::inventory::Inventory;
use tribunal_shards::ledger::{encode_record, LedgerRecord};
use tribunal_shards::recovery::recover;
use tribunal_shards::router::ShardId;
use tribunal_shards::snapshot_cadence::SnapshotCadence;
use tribunal_shards::usher::{home_shard, Decoded, Record, Usher, UsherConfig};
use tribunal_shards::warden::WardenConfig;

use crate::clerk::{self, ClerkSetup, ClerkShared, FaultControl, FederationStatus};
use crate::cli::federation_args::{Fault, PeerAddress};
use crate::gateway::certified_view::CertifiedView;
use crate::gateway::metrics::{Figures, Metrics};
use crate::gateway::{self, GatewayConfig, GatewayShared, NodeProbe};
use crate::log::appender;
use crate::log::doorbell::{doorbell, Door, DoorKey};
use crate::log::kafka::{self, Feed, KafkaConfig, KafkaShared};
use crate::log::local::watch::{self, TailWait, TailWaitKey};
use crate::log::local::LocalLog;
use crate::publish;
use crate::publish::{DurableOutput, PublishBatch};
use crate::storage::quarantine;
use crate::storage::{self, checkpoint, Layout, Manifest, PartitionManifest, SegmentWriter};

type D = Inventory;
type Message = ShardMessage<D>;
/// What travels between shards: the messages for one destination from one step (a
/// planned batch, or the handling of one inbound wire), in order. One cross-core
/// handoff per step instead of one per message.
type Wire = Vec<Message>;

/// Messages a channel between two shards holds before the sender waits.
const CHANNEL_CAPACITY: usize = 4_096;
/// Most records the Usher plans as one batch.
pub const MAX_BATCH_RECORDS: usize = 4_096;
/// The Ushers stop reading while this many messages they sent are not yet delivered.
const MAX_IN_FLIGHT_MESSAGES: u64 = 64 * 1_024;
/// How often `status.json` is rewritten.
const STATUS_INTERVAL: Duration = Duration::from_millis(200);
/// How long an idle Kafka Usher waits for its source thread's ring before trying its
/// channel again anyway (spec: KafkaLog.BridgeNeverBlocksExecutor).
const IDLE_WAIT: Duration = Duration::from_millis(20);

/// The input log.
pub enum LogSource {
    /// The embedded log: one partition.
    Local(PathBuf),
    Kafka(KafkaConfig),
}

/// Who the peers are and how many copies certify (spec: Clerk, Federation).
pub struct FederationConfig {
    pub listen: Option<std::net::SocketAddr>,
    pub peers: Vec<PeerAddress>,
    pub psk: Option<Vec<u8>>,
    pub expected_copies: u32,
    pub faults: Vec<Fault>,
}

pub struct NodeConfig {
    pub log: LogSource,
    pub instance_id: u32,
    /// May take the publisher role (spec: Clerk.PublisherElected).
    pub publish: bool,
    pub federation: FederationConfig,
    pub data_dir: PathBuf,
    pub cores: Vec<usize>,
    pub warden: WardenConfig,
    /// Exit once every partition's records, up to where its Usher last found the end,
    /// are durable (and, when publishing, published).
    pub stop_at_end: bool,
    /// Take a snapshot of a partition every this many of its records (0: never).
    pub snapshot_every: u64,
    /// Serve the REST API (spec: Gateway).
    pub gateway: Option<GatewayConfig>,
}

/// `status.json`: what an operator or a test can read while the instance runs.
#[derive(Debug, Serialize)]
struct Status {
    phase: &'static str,
    /// Recovered, and (Kafka) the broker answers (spec: KafkaLog.BrokerLossRetries).
    ready: bool,
    shards: u16,
    /// Partition 0's, the default partition's; every partition's is in `partitions`.
    /// Absent before recovery completes (spec: Recovery.NoWatermarkBeforeReady) or while
    /// nothing is durable.
    durable_watermark: Option<u64>,
    next_offset: Option<u64>,
    partitions: Vec<PartitionStatus>,
    /// Kafka only.
    #[serde(skip_serializing_if = "Option::is_none")]
    broker_connected: Option<bool>,
    /// Kafka only: the last error consuming the commands topic, until every partition
    /// delivers again (spec: KafkaLog.NoSilentReset).
    #[serde(skip_serializing_if = "Option::is_none")]
    source_error: Option<String>,
    ledger_syncs: u64,
    uptime_ms: u128,
    /// Time from start to ready: reading and replaying the Ledger, cutting, starting shards.
    recovery_ms: Option<u128>,
    /// The Clerk and the peer links: certified watermarks, peers, faults, quarantines.
    federation: Option<FederationStatus>,
    /// Records planned since this process became ready, and for how long it has been.
    records_processed: u64,
    processing_ms: u128,
    /// What the last recovery replayed (absent while recovering).
    #[serde(skip_serializing_if = "Option::is_none")]
    recovery: Option<RecoveryFigures>,
}

/// What recovery replayed, against its bound (spec: Recovery.RecoveryReported).
#[derive(Debug, Clone, Copy, Serialize)]
struct RecoveryFigures {
    /// Ledger entries applied past the snapshot markers, every partition.
    replayed_entries: u64,
    /// `--snapshot-every`; 0: snapshots are off.
    snapshot_every: u64,
    /// The most a recovery replays per partition: `snapshot_every` plus one batch
    /// (spec: Recovery.ReplayBoundedBySnapshotCadence); absent when snapshots are off.
    replay_bound_per_partition: Option<u64>,
}

#[derive(Debug, Serialize)]
struct PartitionStatus {
    partition: u32,
    durable_watermark: Option<u64>,
    next_offset: u64,
    /// Every offset up to it is certified (absent before the Clerk is ready).
    certified_watermark: Option<u64>,
    /// The last offset known published on the outputs topic or log.
    published_watermark: Option<u64>,
    /// The marker of the partition's committed snapshot.
    snapshot_marker: Option<u64>,
}

/// Shared between the executors and the main thread: published watermarks (durable
/// offset + 1, 0 = none), sync counts and the stop flag.
struct Shared {
    partitions: u32,
    /// Index `shard * partitions + partition`.
    durable: Vec<AtomicU64>,
    syncs: Vec<AtomicU64>,
    /// Per partition, the next offset its Usher will plan.
    next_offset: Vec<AtomicU64>,
    in_flight: AtomicU64,
    stop: AtomicBool,
    /// Per partition: snapshot at the next batch (another partition took one).
    snapshot_wanted: Vec<AtomicBool>,
    /// Per partition: the committed snapshot's marker + 1 (0: none), set by the main
    /// thread at each manifest commit (spec: Ledger.CadenceAdvancesOnCommit).
    snapshot_covered_end: Vec<AtomicU64>,
    clerk: Arc<ClerkShared>,
    copy_window: u64,
}

impl Shared {
    /// Instance durable watermark (+1) of `partition`: the minimum over shards
    /// (spec: Ledger.InstanceDurableWatermark).
    fn durable_end(&self, partition: u32) -> u64 {
        let p = self.partitions as usize;
        self.durable.iter().skip(partition as usize).step_by(p).map(|d| d.load(Ordering::Acquire)).min().unwrap_or(0)
    }

    fn next_offsets(&self) -> Vec<u64> {
        self.next_offset.iter().map(|n| n.load(Ordering::Acquire)).collect()
    }

    /// Per partition, the end below which the Ledger's outputs are no longer needed: the
    /// persisted certified checkpoint, and what is known published while anyone publishes.
    fn outputs_needed_from(&self, persisted_certified: &[u64]) -> Vec<u64> {
        let publishing = self.clerk.publisher_exists.load(Ordering::Acquire);
        (0..self.partitions as usize)
            .map(|p| {
                let published = self.clerk.published_known[p].load(Ordering::Acquire);
                persisted_certified[p].min(if publishing { published } else { u64::MAX })
            })
            .collect()
    }
}

enum Event {
    Started,
    Failed(ShardId, String),
    /// The partition's Usher reached the end with everything durable (`--stop-at-end`).
    Finished(u32),
    /// A snapshot part of `partition` at `marker_offset` is durable: the Usher's (`shard`
    /// None) or a shard's, whose segments before `first_kept_segment` hold only records
    /// of the partition at or below the marker.
    SnapshotPart {
        partition: u32,
        marker_offset: u64,
        shard: Option<ShardId>,
        first_kept_segment: u64,
    },
}

fn usher_config(shard_count: u16, warden: WardenConfig) -> impl Fn(u32) -> UsherConfig {
    move |partition| UsherConfig { partition, shard_count, warden, initial_version: 1 }
}

fn write_status(layout: &Layout, status: &Status) {
    let bytes = serde_json::to_vec_pretty(status).expect("status serialises");
    if let Err(e) = storage::replace_file(&layout.status_path(), &bytes) {
        warn!("could not write {}: {e}", layout.status_path().display());
    }
}

/// What the Kafka set-up found before recovery.
struct KafkaStart {
    config: KafkaConfig,
    partitions: u32,
    /// Per partition, one past the last output on the outputs topic (publishing only).
    published_ends: Option<Vec<u64>>,
}

pub fn run(config: NodeConfig) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let shard_count = config.cores.len() as u16;
    // One more executor: the Clerk's.
    cores::check_memlock(config.cores.len() + 1)?;
    let layout = Layout::new(&config.data_dir);
    layout.prepare(shard_count)?;
    let recovering = Status {
        phase: "recovering",
        ready: false,
        shards: shard_count,
        durable_watermark: None,
        next_offset: None,
        partitions: Vec::new(),
        broker_connected: None,
        source_error: None,
        ledger_syncs: 0,
        uptime_ms: 0,
        recovery_ms: None,
        federation: None,
        records_processed: 0,
        processing_ms: 0,
        recovery: None,
    };
    write_status(&layout, &recovering);

    let (local_log, kafka) = match config.log {
        LogSource::Local(dir) => {
            let log = LocalLog::open(&dir).with_context(|| format!("opening the log {}", dir.display()))?;
            (Some((log, dir)), None)
        }
        LogSource::Kafka(kafka) => {
            // spec: KafkaLog.TopicsEnsured — waits (retrying) while the broker is away.
            info!(brokers = %kafka.brokers, topic = %kafka.commands_topic, "connecting to Kafka");
            let partitions = kafka::ensure_topics(&kafka, kafka::Topics::CommandsAndOutputs, None)?;
            let published_ends = if config.publish {
                Some(kafka::read_published_ends(&kafka, partitions).context("reading the outputs topic")?)
            } else {
                None
            };
            info!(partitions, published_ends = ?published_ends, "Kafka topics ready");
            (None, Some(KafkaStart { config: kafka, partitions, published_ends }))
        }
    };
    let partitions = kafka.as_ref().map_or(1, |k| k.partitions);
    // The local outputs log, where certified outputs are published with the embedded log.
    let outputs_log = match (&local_log, config.publish) {
        (Some((_, dir)), true) => {
            let path = publish::local::outputs_dir(dir);
            let log = LocalLog::open(&path).with_context(|| format!("opening the outputs log {}", path.display()))?;
            let end = publish::local::published_end(&log).context("reading the outputs log")?;
            Some((log, end))
        }
        _ => None,
    };

    // spec: Recovery.RecoveryStarts .. Recovery.WardenRebuilt
    info!(shards = shard_count, partitions, data_dir = %config.data_dir.display(), "recovering");
    let mut manifest = storage::read_manifest(&layout, shard_count)?;
    let snapshot = storage::read_snapshot::<D>(&layout, &manifest).context("loading the snapshot")?;
    let logs = storage::read_logs::<D>(&layout, shard_count)?;
    let mut certified = checkpoint::read_certified(&layout, partitions)?;
    // Where publication resumes: the outputs topic's or log's end (when this instance may
    // publish); otherwise nothing is republished from here.
    let mut published_start: Vec<u64> = match (&kafka, &outputs_log) {
        (Some(KafkaStart { published_ends: Some(ends), .. }), _) => ends.clone(),
        (_, Some((_, end))) => vec![*end],
        _ => certified.clone(),
    };
    // Own outputs the Clerk or the publisher may still need: from the lower of the two.
    let mut from_ledger: Vec<DurableOutput> = Vec::new();
    // Digests of own outputs below the certified checkpoint, for peers that restarted
    // further behind (spec: Clerk.CertifiedDigestsResent).
    let retention = ClerkConfig::DEFAULT_DIGEST_RETENTION;
    let mut certified_digests: Vec<(u32, u64, u128)> = Vec::new();
    for scanned in logs.iter().flat_map(|l| &l.segments).flat_map(|s| &s.records) {
        if let LedgerRecord::Entry { partition, offset, output, .. } = &scanned.record {
            let p = *partition as usize;
            let checkpoint = certified.get(p).copied().unwrap_or(0);
            if *offset < checkpoint && *offset + retention >= checkpoint {
                certified_digests.push((*partition, *offset, tribunal_shards::digest::output_digest(output)));
            }
            let needed_from = published_start.get(p).copied().unwrap_or(0).min(certified.get(p).copied().unwrap_or(0));
            if *offset >= needed_from {
                from_ledger.push(DurableOutput { partition: *partition, offset: *offset, bytes: output.clone() });
            }
        }
    }
    skip_outputs_the_ledger_no_longer_holds(&mut published_start, &manifest, &mut from_ledger, "published");
    let certified_before_skip = certified.clone();
    skip_outputs_the_ledger_no_longer_holds(&mut certified, &manifest, &mut from_ledger, "certified");
    let mut recovered = recover(shard_count, usher_config(shard_count, config.warden), logs, snapshot)
        .context("recovering the Ledger")?;
    for cut in &recovered.cuts {
        // spec: Recovery.TornTailTruncated
        warn!(shard = cut.shard, segment = cut.segment, position = cut.position, reason = %cut.reason, "cutting the Ledger");
        storage::apply_cut(&layout, cut).with_context(|| format!("cutting shard {} at {}", cut.shard, cut.position))?;
    }
    if let Some(&stray) = recovered.ushers.keys().find(|p| **p >= partitions) {
        anyhow::bail!(
            "the Ledger holds partition {stray}, but the log has only {partitions}: wrong topic or data dir?"
        );
    }
    let mut ushers = Vec::with_capacity(partitions as usize);
    let mut resume = Vec::with_capacity(partitions as usize);
    for partition in 0..partitions {
        let watermark = recovered.watermarks.get(&partition).copied();
        let usher = recovered
            .ushers
            .remove(&partition)
            .unwrap_or_else(|| Usher::new(usher_config(shard_count, config.warden)(partition)));
        let next = watermark.map_or(0, |w| w + 1);
        // spec: KafkaLog.StartFromLedger
        assert_eq!(usher.next_offset(), next, "the Usher resumes right after the durable watermark");
        resume.push(next);
        ushers.push(usher);
    }
    // spec: Recovery.DueSnapshotTakenAtRecovery — a snapshot that was due and did not
    // commit before the crash is taken now, from the rebuilt state.
    for (partition, usher) in ushers.iter().enumerate() {
        let committed = manifest.get(partition as u32).map(|m| m.marker_offset);
        let cadence = SnapshotCadence::new(config.snapshot_every, MAX_BATCH_RECORDS as u64, committed);
        if cadence.due_at_recovery(resume[partition]) {
            let marker = resume[partition] - 1;
            snapshot_at_recovery(&layout, &mut manifest, usher, marker, &recovered.arbiters)
                .with_context(|| format!("taking partition {partition}'s due snapshot at {marker}"))?;
        }
    }
    let recovery_figures = RecoveryFigures {
        replayed_entries: recovered.replayed_entries,
        snapshot_every: config.snapshot_every,
        replay_bound_per_partition: SnapshotCadence::new(config.snapshot_every, MAX_BATCH_RECORDS as u64, None)
            .replay_bound(),
    };
    // Outputs past the durable watermark were cut with their records. The certified
    // checkpoint never exceeds the durable watermark (spec: Recovery.RecoveryCompletes):
    // a stale or foreign checkpoint must not make peers skip anything.
    from_ledger.retain(|o| o.offset < resume[o.partition as usize]);
    from_ledger.sort_by_key(|o| (o.partition, o.offset));
    for (p, end) in certified.iter_mut().enumerate() {
        if *end > resume[p] {
            warn!(
                partition = p,
                checkpoint = *end,
                durable_end = resume[p],
                "the certified checkpoint is past the durable watermark; capping it"
            );
            *end = resume[p];
        }
    }
    certified_digests.sort_unstable_by_key(|(p, o, _)| (*p, *o));
    let mut retained_seed: Vec<Vec<(u64, u128)>> = vec![Vec::new(); partitions as usize];
    for (partition, offset, digest) in certified_digests {
        if let Some(seed) = retained_seed.get_mut(partition as usize) {
            if offset < certified[partition as usize] {
                seed.push((offset, digest));
            }
        }
    }
    let (unpublished, recovered_outputs): (Vec<DurableOutput>, Vec<DurableOutput>) =
        from_ledger.into_iter().partition(|o| o.offset < certified[o.partition as usize]);
    let unpublished: Vec<DurableOutput> =
        unpublished.into_iter().filter(|o| o.offset >= published_start[o.partition as usize]).collect();
    info!(
        snapshot_markers = ?manifest.partitions.iter().map(|p| (p.partition, p.marker_offset)).collect::<Vec<_>>(),
        resume_offsets = ?resume,
        certified_ends = ?certified,
        replayed_entries = recovered.replayed_entries,
        to_compare = recovered_outputs.len(),
        to_republish = unpublished.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recovered"
    );

    // With Kafka, a KafkaShared carries readiness, failures and the publisher's acks.
    // (Its published ends are where publication resumes: past outputs the Ledger lost.)
    let kafka_shared = kafka.as_ref().map(|k| {
        let ends = if k.published_ends.is_some() { published_start.clone() } else { vec![0; partitions as usize] };
        Arc::new(KafkaShared::new(&ends))
    });
    let published_now: Vec<u64> = published_start.iter().zip(&certified).map(|(p, c)| (*p).min(*c)).collect();
    let clerk_shared = Arc::new(ClerkShared::new(partitions, &certified, &published_now));
    let copy_window = ClerkConfig::DEFAULT_COPY_WINDOW;
    let shared = Arc::new(Shared {
        partitions,
        durable: (0..shard_count).flat_map(|_| resume.iter().map(|&r| AtomicU64::new(r))).collect(),
        syncs: (0..shard_count).map(|_| AtomicU64::new(0)).collect(),
        next_offset: resume.iter().map(|&r| AtomicU64::new(r)).collect(),
        in_flight: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        snapshot_wanted: resume.iter().map(|_| AtomicBool::new(false)).collect(),
        snapshot_covered_end: (0..partitions)
            .map(|p| AtomicU64::new(manifest.get(p).map_or(0, |m| m.marker_offset + 1)))
            .collect(),
        clerk: clerk_shared.clone(),
        copy_window,
    });

    // The publisher sink: the outputs topic or the local outputs log.
    let (sink_tx, sink_rx) = mpsc::channel::<PublishBatch>();
    let mut sink_rx = Some(sink_rx);
    let mut local_sink = None;
    let sink_published: Arc<dyn Fn(u32) -> u64 + Send + Sync> = match (&kafka_shared, outputs_log) {
        (Some(k), _) if config.publish => {
            let k = k.clone();
            Arc::new(move |p| k.published_end[p as usize].load(Ordering::Acquire))
        }
        (None, Some((log, _))) => {
            let sink = publish::local::spawn(log, published_start[0], sink_rx.take().expect("one sink"))?;
            let published = sink.published.clone();
            local_sink = Some(sink);
            Arc::new(move |_| published.load(Ordering::Acquire))
        }
        _ => Arc::new(|_| 0),
    };

    // Channels for every ordered pair of distinct shards.
    let n = shard_count as usize;
    let mut senders: Vec<Vec<Option<SharedSender<Wire>>>> = (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    let mut receivers: Vec<Vec<SharedReceiver<Wire>>> = (0..n).map(|_| Vec::new()).collect();
    for (from, row) in senders.iter_mut().enumerate() {
        for (to, slot) in row.iter_mut().enumerate() {
            if from != to {
                let (tx, rx) = shared_channel::new_bounded(CHANNEL_CAPACITY);
                *slot = Some(tx);
                receivers[to].push(rx);
            }
        }
    }
    // Durable outputs from each shard's Ledger task to the Clerk.
    let mut output_senders = Vec::with_capacity(n);
    let mut output_receivers = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, rx) = shared_channel::new_bounded::<Vec<DurableOutput>>(OUTPUT_BATCHES_IN_FLIGHT);
        output_senders.push(Some(tx));
        output_receivers.push(rx);
    }

    // The Gateway's certified view starts from the recovered state (spec: Gateway.ViewValidFromRecovery).
    let node_probe = Arc::new(NodeProbe::default());
    let fault_control = Arc::new(FaultControl::default());
    let gateway = match &config.gateway {
        None => None,
        Some(gateway_config) => {
            let seed: Vec<_> = (0..partitions)
                .map(|p| {
                    let entities: Vec<_> =
                        recovered.arbiters.iter().flat_map(|a| a.registrar().entities_sorted(p)).collect();
                    (entities, resume[p as usize])
                })
                .collect();
            let mut view =
                CertifiedView::new(seed, &certified, gateway_config.answer_capacity, gateway_config.max_waiting);
            for (p, (before, after)) in certified_before_skip.iter().zip(&certified).enumerate() {
                if after > before {
                    // Offsets skipped loudly above were never certified, yet the recovered
                    // state holds them: the view cannot claim to be certified state.
                    view.mark_gap(p as u32, *before);
                }
            }
            let view = Arc::new(std::sync::Mutex::new(view));
            let target = match (&local_log, &kafka) {
                (Some((_, dir)), _) => appender::Target::Local(dir.clone()),
                (None, Some(k)) => appender::Target::Kafka(k.config.clone()),
                (None, None) => unreachable!("a node reads one log"),
            };
            let appender = appender::spawn(target, partitions, gateway_config.max_waiting)
                .context("starting the Gateway's log appender")?;
            let figures = {
                let (shared, clerk, view) = (shared.clone(), clerk_shared.clone(), view.clone());
                let appended = appender.appended_end.clone();
                let probe = node_probe.clone();
                let log = local_log.as_ref().map(|(_, dir)| LocalLog::open(dir)).transpose()?;
                Arc::new(move || {
                    let durable_end: Vec<u64> = (0..shared.partitions).map(|p| shared.durable_end(p)).collect();
                    let next = shared.next_offsets();
                    let log_end = match &log {
                        Some(log) => vec![log.end_offset().unwrap_or(0)],
                        None => (0..shared.partitions as usize)
                            .map(|p| appended[p].load(Ordering::Relaxed).max(next[p]))
                            .collect(),
                    };
                    let faults_detected =
                        clerk.status.lock().expect("not poisoned").as_ref().map_or(0, |f| f.faults_total);
                    Figures {
                        certified_end: (0..shared.partitions).map(|p| clerk.certified_end(p)).collect(),
                        durable_end,
                        log_end,
                        ledger_fsyncs: shared.syncs.iter().map(|s| s.load(Ordering::Relaxed)).sum(),
                        faults_detected,
                        ready: probe.ready.load(Ordering::Acquire),
                        waiting_requests: view.lock().expect("not poisoned").waiting() as u64,
                        recovery_replayed_entries: recovery_figures.replayed_entries,
                    }
                })
            };
            Some(Arc::new(GatewayShared {
                config: gateway_config.clone(),
                instance_id: config.instance_id,
                members: std::iter::once(config.instance_id)
                    .chain(config.federation.peers.iter().map(|p| p.instance_id))
                    .collect(),
                expected_copies: config.federation.expected_copies,
                partitions,
                view,
                appender,
                metrics: Metrics::new(figures),
                node: node_probe.clone(),
                faults: fault_control.clone(),
                data_dir: config.data_dir.clone(),
                in_flight: std::sync::atomic::AtomicUsize::new(0),
            }))
        }
    };

    // The Clerk, before the shards: a federation address in use is a start-up error.
    let federation = &config.federation;
    let peers: Vec<u32> = federation.peers.iter().map(|p| p.instance_id).collect();
    let links = match (federation.listen, &federation.psk) {
        (Some(listen), Some(psk)) if !peers.is_empty() => Some(LinksConfig::new(
            config.instance_id,
            listen,
            federation.peers.iter().map(|p| (p.instance_id, p.address)).collect(),
            psk.clone(),
        )),
        _ => None,
    };
    let clerk_config = ClerkConfig {
        instance_id: config.instance_id,
        peers,
        partitions,
        expected_copies: federation.expected_copies,
        copy_window,
        digest_retention: ClerkConfig::DEFAULT_DIGEST_RETENTION,
        may_publish: config.publish,
        incarnation: quarantine::incarnation(&config.data_dir)?,
        max_unpublished: publish::MAX_UNPUBLISHED,
    };
    let durable_view = shared.clone();
    clerk::spawn(
        ClerkSetup {
            config: clerk_config,
            links,
            faults: federation.faults.clone(),
            resume: certified.iter().zip(&resume).map(|(c, r)| (*c, *r)).collect(),
            recovered_outputs,
            retained_seed,
            unpublished,
            sink: config.publish.then(|| sink_tx.clone()),
            sink_published,
            data_dir: config.data_dir.clone(),
            view: gateway.as_ref().map(|g| g.view.clone() as Arc<dyn crate::publish::CertifiedSink>),
            fault_control: Some(fault_control.clone()),
        },
        output_receivers,
        clerk_shared.clone(),
        Arc::new(move |p| durable_view.durable_end(p)),
        cores::IO_MEMORY_PER_SHARD_BYTES,
    )?;
    drop(sink_tx);

    // Where each Usher's records come from.
    let mut usher_sources: Vec<Vec<(Usher<D>, SourceSpec)>> = (0..n).map(|_| Vec::new()).collect();
    let mut feeds = Vec::new();
    // The local log is read and its JSON decoded on the last shard when there are
    // several: decoding is a third of the Usher's shard's time otherwise (measured), and
    // that shard is the one that bounds throughput.
    let reader_shard = shard_count - 1;
    let mut reader_log = None;
    for (partition, usher) in ushers.into_iter().enumerate() {
        let home = home_shard(partition as u32, shard_count);
        let spec = match &local_log {
            Some((log, dir)) if reader_shard == home => {
                SourceSpec::Local(log.reader(resume[partition])?, watch_local_log(dir)?)
            }
            Some((log, dir)) => {
                let (tx, rx) = shared_channel::new_bounded::<Vec<Decoded<D>>>(DECODED_BATCHES_IN_FLIGHT);
                reader_log = Some((log.reader(resume[partition])?, watch_local_log(dir)?, tx));
                SourceSpec::Remote(rx)
            }
            None => {
                let (tx, rx) = mpsc::sync_channel::<Feed>(kafka::FEED_BATCHES_IN_FLIGHT);
                let (bell, door) = doorbell(IDLE_WAIT).context("making the Kafka feed's doorbell")?;
                feeds.push(kafka::FeedSender::new(tx, bell));
                SourceSpec::Kafka(rx, door)
            }
        };
        usher_sources[home as usize].push((usher, spec));
    }

    let (events_tx, events_rx) = mpsc::channel::<Event>();
    let mut arbiters: Vec<Option<Arbiter<D>>> = recovered.arbiters.into_iter().map(Some).collect();
    let mut handles = Vec::new();
    for (shard, core) in config.cores.iter().copied().enumerate() {
        let shard = shard as ShardId;
        let context = ShardContext {
            shard,
            shard_count,
            layout: layout.clone(),
            arbiter: arbiters[shard as usize].take().expect("one Arbiter per shard"),
            outbound: std::mem::take(&mut senders[shard as usize]),
            inbound: std::mem::take(&mut receivers[shard as usize]),
            ushers: std::mem::take(&mut usher_sources[shard as usize]),
            reader: if shard == reader_shard { reader_log.take() } else { None },
            outputs: output_senders[shard as usize].take().expect("one output channel per shard"),
            shared: shared.clone(),
            events: events_tx.clone(),
            stop_at_end: config.stop_at_end,
            snapshot_every: config.snapshot_every,
            gateway: gateway.clone(),
        };
        let failed = events_tx.clone();
        let handle = LocalExecutorBuilder::new(Placement::Fixed(core))
            .name(&format!("shard-{shard}"))
            .io_memory(cores::IO_MEMORY_PER_SHARD_BYTES)
            .spawn(move || async move {
                if let Err(error) = shard_main(context).await {
                    let _ = failed.send(Event::Failed(shard, format!("{error:#}")));
                }
            })
            .map_err(|e| anyhow::anyhow!("starting shard {shard} on core {core}: {e}"))?;
        handles.push(handle);
    }
    drop(events_tx);

    // Start-up handshake: a shard that fails to start stops the process. What else
    // arrives meanwhile (a snapshot part, a finished partition) is handled afterwards.
    let mut running = 0;
    let mut early_events = Vec::new();
    while running < n {
        match events_rx.recv() {
            Ok(Event::Started) => running += 1,
            Ok(Event::Failed(shard, error)) => anyhow::bail!("shard {shard} failed to start: {error}"),
            Ok(event) => early_events.push(event),
            Err(_) => anyhow::bail!("the shards stopped during start-up"),
        }
    }
    let mut early_events = early_events.into_iter();
    if let (Some(start), Some(kafka_shared)) = (&kafka, &kafka_shared) {
        if let (Some(_), Some(sink_rx)) = (&start.published_ends, sink_rx.take()) {
            publish::kafka::spawn_publisher(&start.config, &published_start, sink_rx, kafka_shared.clone())?;
        }
        let client_id = format!("tribunal-{}", config.instance_id);
        kafka::spawn_source(&start.config, &client_id, resume.clone(), feeds, kafka_shared.clone())?;
    }
    // spec: Recovery.RecoveryCompletes — only now may the Clerk advertise and send.
    clerk_shared.open_gate.store(true, Ordering::Release);
    let recovery_ms = started.elapsed().as_millis();
    let ready_at = Instant::now();
    info!(cores = ?config.cores, recovery_ms = recovery_ms as u64, instance_id = config.instance_id, "ready");

    let status = |phase: &'static str| {
        let next_offsets = shared.next_offsets();
        let broker_connected = kafka_shared.as_ref().map(|k| k.broker_connected.load(Ordering::Relaxed));
        let source_error = kafka_shared.as_ref().and_then(|k| k.source_error());
        let clerk_ready = clerk_shared.ready.load(Ordering::Acquire);
        let partitions: Vec<PartitionStatus> = (0..shared.partitions)
            .map(|p| PartitionStatus {
                partition: p,
                durable_watermark: shared.durable_end(p).checked_sub(1),
                next_offset: next_offsets[p as usize],
                certified_watermark: if clerk_ready { clerk_shared.certified_end(p).checked_sub(1) } else { None },
                published_watermark: clerk_shared.published_known[p as usize].load(Ordering::Acquire).checked_sub(1),
                snapshot_marker: shared.snapshot_covered_end[p as usize].load(Ordering::Acquire).checked_sub(1),
            })
            .collect();
        Status {
            phase,
            ready: phase == "ready" && clerk_ready && broker_connected != Some(false) && source_error.is_none(),
            shards: shard_count,
            durable_watermark: partitions[0].durable_watermark,
            next_offset: Some(next_offsets[0]),
            partitions,
            broker_connected,
            source_error,
            ledger_syncs: shared.syncs.iter().map(|s| s.load(Ordering::Relaxed)).sum(),
            uptime_ms: started.elapsed().as_millis(),
            recovery_ms: Some(recovery_ms),
            federation: clerk_shared.status.lock().expect("not poisoned").clone(),
            records_processed: next_offsets.iter().zip(&resume).map(|(n, r)| n - r).sum(),
            processing_ms: ready_at.elapsed().as_millis(),
            recovery: Some(recovery_figures),
        }
    };
    let mut last_status = Instant::now() - STATUS_INTERVAL;
    let mut last_checkpoint = Instant::now();
    // The certified ends last made durable: deletion never passes them.
    let mut persisted_certified = certified.clone();
    // Per (partition, marker): the parts that are durable, as (shard or Usher, first kept segment).
    type Parts = Vec<(Option<ShardId>, u64)>;
    let mut snapshot_parts: BTreeMap<(u32, u64), Parts> = BTreeMap::new();
    let mut finished: BTreeSet<u32> = BTreeSet::new();
    // Deletion waits for certification and publication, so it is retried until nothing is left to delete.
    let mut deletion_pending = !manifest.partitions.is_empty();
    loop {
        if last_status.elapsed() >= STATUS_INTERVAL {
            let current = status("ready");
            write_status(&layout, &current);
            update_probe(&node_probe, &current);
            last_status = Instant::now();
            if let Some(failure) = kafka_shared.as_ref().and_then(|k| k.failure()) {
                anyhow::bail!("{failure}");
            }
            if let Some(failure) = clerk_shared.failure.lock().expect("not poisoned").clone() {
                anyhow::bail!("the Clerk failed: {failure}");
            }
            if let Some(failure) = local_sink.as_ref().and_then(|s| s.failure.lock().expect("not poisoned").clone()) {
                anyhow::bail!("{failure}");
            }
            if last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL {
                last_checkpoint = Instant::now();
                let now: Vec<u64> = (0..partitions).map(|p| clerk_shared.certified_end(p)).collect();
                if now != persisted_certified {
                    checkpoint::write_certified(&layout, &now)?;
                    persisted_certified = now;
                    deletion_pending |= !manifest.partitions.is_empty();
                }
            }
            if deletion_pending {
                deletion_pending = delete_covered_segments(&layout, &manifest, &shared, &persisted_certified)?;
            }
        }
        // A snapshot being written is finished first: the next start counts from it.
        if finished.len() == partitions as usize && snapshot_parts.is_empty() && all_settled(&shared) {
            break;
        }
        let wait = if finished.len() == partitions as usize { Duration::from_millis(10) } else { STATUS_INTERVAL };
        let event = match early_events.next() {
            Some(event) => Ok(event),
            None => events_rx.recv_timeout(wait),
        };
        match event {
            Ok(Event::Failed(shard, error)) => {
                error!(shard, "{error}");
                anyhow::bail!("shard {shard} failed: {error}");
            }
            Ok(Event::Finished(partition)) => {
                finished.insert(partition);
            }
            Ok(Event::SnapshotPart { partition, marker_offset, shard, first_kept_segment }) => {
                let parts = snapshot_parts.entry((partition, marker_offset)).or_default();
                parts.push((shard, first_kept_segment));
                if parts.len() == n + 1 {
                    commit_snapshot(&layout, &mut manifest, partition, marker_offset, parts)?;
                    shared.snapshot_covered_end[partition as usize].fetch_max(marker_offset + 1, Ordering::AcqRel);
                    snapshot_parts.retain(|(p, m), _| *p != partition || *m > marker_offset);
                    deletion_pending = delete_covered_segments(&layout, &manifest, &shared, &persisted_certified)?;
                }
            }
            Ok(Event::Started) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => anyhow::bail!("every shard stopped"),
        }
    }
    let _ = clerk_shared.fresh_status();
    shared.stop.store(true, Ordering::Release);
    let now: Vec<u64> = (0..partitions).map(|p| clerk_shared.certified_end(p)).collect();
    checkpoint::write_certified(&layout, &now)?;
    if !manifest.partitions.is_empty() {
        delete_covered_segments(&layout, &manifest, &shared, &now)?;
    }
    write_status(&layout, &status("stopped"));
    let watermarks: Vec<Option<u64>> = (0..partitions).map(|p| shared.durable_end(p).checked_sub(1)).collect();
    info!(durable_watermarks = ?watermarks, elapsed_ms = started.elapsed().as_millis() as u64, "every record is certified; stopping");
    // Everything is durable; the executors hold nothing that needs a clean shutdown.
    std::process::exit(0);
}

/// What the Gateway answers with: ready, or why not (spec: Gateway.NotReadyRefuses). A
/// self-quarantined instance does not answer: its own outputs are not to be trusted.
fn update_probe(probe: &NodeProbe, status: &Status) {
    let self_quarantined = status.federation.as_ref().is_some_and(|f| f.quarantined);
    let reason = if status.phase != "ready" {
        format!("phase {}", status.phase)
    } else if status.broker_connected == Some(false) {
        "the Kafka broker cannot be reached".into()
    } else if let Some(error) = &status.source_error {
        format!("reading the log: {error}")
    } else if self_quarantined {
        "this instance quarantined itself (its outputs differed from the certified ones)".into()
    } else if !status.ready {
        "the Clerk is not ready yet".into()
    } else {
        String::new()
    };
    *probe.not_ready_reason.lock().expect("not poisoned") = reason.clone();
    *probe.status.lock().expect("not poisoned") = serde_json::to_value(status).unwrap_or_default();
    probe.ready.store(reason.is_empty(), Ordering::Release);
}

/// `--stop-at-end`: every durable output is certified here and by every eligible peer, and
/// published when anyone publishes (spec: Clerk.StopAtEnd). Leaving earlier could take away
/// the copy a peer still needs.
fn all_settled(shared: &Shared) -> bool {
    let clerk = &shared.clerk;
    (0..shared.partitions).all(|p| {
        let end = shared.durable_end(p);
        let published_ok = !clerk.publisher_exists.load(Ordering::Acquire)
            || clerk.published_known[p as usize].load(Ordering::Acquire) >= end;
        clerk.certified_end(p) >= end
            && clerk.peers_certified_end[p as usize].load(Ordering::Acquire) >= end
            && published_ok
    })
}

/// Outputs at or below a partition's snapshot marker may have left with the segments the
/// snapshot replaced. Deletion waits for publication, so this happens only when the
/// outputs topic lost records or this data dir ran without publishing. If the Ledger still
/// holds every output from the topic's end to the marker, they are published again;
/// otherwise they cannot be, and waiting for them would stall the publisher for ever:
/// publication resumes after the marker, loudly.
fn skip_outputs_the_ledger_no_longer_holds(
    ends: &mut [u64],
    manifest: &Manifest,
    from_ledger: &mut Vec<DurableOutput>,
    what: &str,
) {
    for entry in &manifest.partitions {
        let (partition, marker) = (entry.partition, entry.marker_offset);
        let Some(end) = ends.get_mut(partition as usize) else { continue };
        if *end > marker {
            continue;
        }
        let held: BTreeSet<u64> = from_ledger
            .iter()
            .filter(|o| o.partition == partition && o.offset >= *end && o.offset <= marker)
            .map(|o| o.offset)
            .collect();
        if held.len() as u64 == marker - *end + 1 {
            continue; // every one of them is still in the Ledger
        }
        error!(
            partition,
            first_missing = *end,
            last_missing = marker,
            "outputs not yet {what} are no longer in the Ledger (the outputs topic was emptied, this \
             data dir ran without --publish, or it predates the certified checkpoint); resuming after \
             the snapshot marker"
        );
        *end = marker + 1;
        from_ledger.retain(|o| o.partition != partition || o.offset > marker);
    }
}

/// Every part of `partition`'s snapshot at `marker_offset` is durable: commit the
/// manifest, then delete older snapshots of the partition (spec: Ledger.SnapshotCommitted).
fn commit_snapshot(
    layout: &Layout,
    manifest: &mut Manifest,
    partition: u32,
    marker_offset: u64,
    parts: &[(Option<ShardId>, u64)],
) -> anyhow::Result<()> {
    let mut first_kept_segments = vec![0; manifest.shard_count as usize];
    for (shard, first_kept) in parts {
        if let Some(shard) = shard {
            first_kept_segments[*shard as usize] = *first_kept;
        }
    }
    manifest.set(PartitionManifest { partition, marker_offset, first_kept_segments });
    storage::write_atomically(&layout.manifest_path(), &serde_json::to_vec_pretty(manifest)?)
        .context("writing the snapshot manifest")?;
    storage::delete_older_snapshots(layout, partition, marker_offset).context("deleting older snapshots")?;
    info!(partition, marker_offset, "snapshot committed");
    Ok(())
}

/// Takes and commits `usher`'s partition's snapshot at `marker`, the durable watermark,
/// from the state recovery rebuilt (spec: Recovery.DueSnapshotTakenAtRecovery). Each
/// shard's first kept segment is the one this process is about to start.
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

/// Deletes what the committed snapshots cover (spec: Ledger.SegmentsBelowSnapshotDeleted).
/// Returns whether a later pass might delete more (publication still behind a marker).
fn delete_covered_segments(
    layout: &Layout,
    manifest: &Manifest,
    shared: &Shared,
    persisted_certified: &[u64],
) -> anyhow::Result<bool> {
    let next_offsets = shared.next_offsets();
    let published = Some(shared.outputs_needed_from(persisted_certified));
    let mut waiting = false;
    for shard in 0..manifest.shard_count {
        let bound = manifest.deletable_below(shard, &next_offsets, published.as_deref());
        let deleted = storage::delete_segments_below(layout, shard, bound).context("deleting segments")?;
        if deleted > 0 {
            info!(shard, deleted, below = bound, "deleted Ledger segments the snapshots cover");
        }
        waiting |= published.is_some() && bound == 0;
    }
    Ok(waiting)
}

struct ShardContext {
    shard: ShardId,
    shard_count: u16,
    layout: Layout,
    arbiter: Arbiter<D>,
    outbound: Vec<Option<SharedSender<Wire>>>,
    inbound: Vec<SharedReceiver<Wire>>,
    /// The Ushers of the partitions whose home this shard is, and where each one reads.
    ushers: Vec<(Usher<D>, SourceSpec)>,
    /// On the local log's reader shard, when it is not the Usher's: the reader, and where
    /// decoded batches go.
    reader: Option<ReaderTask>,
    /// Where outputs go once durable: the Clerk (spec: Clerk.OwnCopyRecorded).
    outputs: SharedSender<Vec<DurableOutput>>,
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
    stop_at_end: bool,
    snapshot_every: u64,
    gateway: Option<Arc<GatewayShared>>,
}

/// A snapshot this shard owes: its entities as of the marker, and where the marker's
/// batch-end record ends in the pending bytes.
struct PendingSnapshot {
    partition: u32,
    marker_offset: u64,
    entities: Vec<(<D as tribunal_shards::domain::Domain>::EntityKey, u64)>,
    end_in_pending_bytes: usize,
}

/// A shard's state on its executor.
struct ShardState {
    shard: ShardId,
    arbiter: Arbiter<D>,
    /// Local queues to the sender tasks, one per other shard.
    outbound: Vec<Option<LocalSender<Wire>>>,
    /// Messages produced since the last flush, per destination, in order.
    staged: Vec<Wire>,
    /// Records encoded since the last commit, and the batch-end markers among them.
    pending_bytes: Vec<u8>,
    pending_marks: Vec<(u32, u64)>,
    pending_snapshots: Vec<PendingSnapshot>,
    /// Outputs among the pending records, for the Clerk once durable.
    pending_outputs: Vec<DurableOutput>,
    doorbell: LocalSender<()>,
    doorbell_rung: bool,
    effects: Vec<ShardEffect<D>>,
    shared: Arc<Shared>,
}

impl ShardState {
    /// Queues a message for another shard; [`ShardState::flush`] sends what is staged.
    fn stage(&mut self, to: ShardId, message: Message) {
        assert!(to != self.shard, "a shard does not message itself");
        self.staged[to as usize].push(message);
    }

    /// Hands every staged message to the sender tasks, one wire per destination.
    fn flush(&mut self) {
        for (to, staged) in self.staged.iter_mut().enumerate() {
            if staged.is_empty() {
                continue;
            }
            self.shared.in_flight.fetch_add(staged.len() as u64, Ordering::Relaxed);
            let queue = self.outbound[to].as_ref().expect("a queue to every other shard");
            if queue.try_send(std::mem::take(staged)).is_err() {
                unreachable!("local queues are unbounded and live as long as the shard");
            }
        }
    }

    /// Hands a message to the Arbiter and turns its effects into Ledger records and
    /// staged messages. Never awaits, so it can run from any task of the shard.
    fn process(&mut self, message: Message) {
        self.arbiter.handle(message);
        let mut effects = std::mem::take(&mut self.effects);
        effects.extend(self.arbiter.drain_effects());
        for effect in effects.drain(..) {
            match effect {
                ShardEffect::Send { to, message } => self.stage(to, message),
                ShardEffect::Output { output, changes } => {
                    let record = LedgerRecord::<D>::Entry {
                        partition: output.partition,
                        offset: output.offset,
                        output: output.bytes,
                        deltas: changes.into_vec(),
                    };
                    encode_record(&record, &mut self.pending_bytes).expect("an entry record fits the record bound");
                    if let LedgerRecord::Entry { partition, offset, output, .. } = record {
                        // Moved, not copied: the record is encoded already.
                        self.pending_outputs.push(DurableOutput { partition, offset, bytes: output });
                    }
                }
                ShardEffect::BatchDone { partition, last_offset, usher, snapshot } => {
                    // spec: Ledger.BatchEndMarkerAppended
                    let record =
                        LedgerRecord::<D>::BatchEnd { partition, last_offset, usher, snapshot: snapshot.is_some() };
                    encode_record(&record, &mut self.pending_bytes).expect("a batch journal fits the record bound");
                    self.pending_marks.push((partition, last_offset));
                    if let Some(entities) = snapshot {
                        self.pending_snapshots.push(PendingSnapshot {
                            partition,
                            marker_offset: last_offset,
                            entities,
                            end_in_pending_bytes: self.pending_bytes.len(),
                        });
                    }
                    if !self.doorbell_rung {
                        self.doorbell_rung = true;
                        let _ = self.doorbell.try_send(());
                    }
                }
            }
        }
        self.effects = effects;
    }
}

async fn shard_main(context: ShardContext) -> anyhow::Result<()> {
    let shard = context.shard;
    storage::settle_io_probe(&context.layout, shard).await.context("probing DMA IO")?;
    let mut writer = SegmentWriter::open(&context.layout, shard).await.context("opening the Ledger segment")?;

    let (doorbell, doorbell_rx) = local_channel::new_unbounded::<()>();
    let mut outbound_queues = Vec::new();
    for (to, sender) in context.outbound.into_iter().enumerate() {
        let Some(sender) = sender else {
            outbound_queues.push(None);
            continue;
        };
        let (queue, queue_rx) = local_channel::new_unbounded::<Wire>();
        outbound_queues.push(Some(queue));
        let shared = context.shared.clone();
        // Each channel connects in its own task: `connect` waits for the other end,
        // and the other shard connects its ends in its own order.
        glommio::spawn_local(async move {
            let connected = sender.connect().await;
            while let Some(wire) = queue_rx.recv().await {
                let messages = wire.len() as u64;
                if connected.send(wire).await.is_err() {
                    warn!(from = shard, to, "peer shard channel closed");
                    return;
                }
                shared.in_flight.fetch_sub(messages, Ordering::Relaxed);
            }
        })
        .detach();
    }
    let state = Rc::new(RefCell::new(ShardState {
        shard,
        arbiter: context.arbiter,
        outbound: outbound_queues,
        staged: (0..context.shard_count).map(|_| Vec::new()).collect(),
        pending_bytes: Vec::with_capacity(1 << 20),
        pending_marks: Vec::new(),
        pending_snapshots: Vec::new(),
        pending_outputs: Vec::new(),
        doorbell,
        doorbell_rung: false,
        effects: Vec::new(),
        shared: context.shared.clone(),
    }));

    for receiver in context.inbound {
        let state = state.clone();
        glommio::spawn_local(async move {
            let receiver = receiver.connect().await;
            while let Some(wire) = receiver.recv().await {
                let mut st = state.borrow_mut();
                for message in wire {
                    st.process(message);
                }
                st.flush();
            }
        })
        .detach();
    }

    // Ledger task: group commit.
    let ledger_state = state.clone();
    let shared = context.shared.clone();
    let events = context.events.clone();
    let layout = context.layout.clone();
    let outputs_tx = context.outputs;
    glommio::spawn_local(async move {
        let outputs_tx = outputs_tx.connect().await;
        let mut bytes = Vec::with_capacity(1 << 20);
        let mut marks = Vec::new();
        let mut snapshots = Vec::new();
        let mut outputs = Vec::new();
        while doorbell_rx.recv().await.is_some() {
            {
                let mut st = ledger_state.borrow_mut();
                st.doorbell_rung = false;
                std::mem::swap(&mut bytes, &mut st.pending_bytes);
                std::mem::swap(&mut marks, &mut st.pending_marks);
                std::mem::swap(&mut snapshots, &mut st.pending_snapshots);
                std::mem::swap(&mut outputs, &mut st.pending_outputs);
            }
            if bytes.is_empty() {
                continue;
            }
            // spec: Ledger.GroupCommitAtBatchEnd, Ledger.RecordDurableAfterSync — and at a
            // snapshot marker: commit up to it, write the part, start a new segment, so
            // every earlier segment holds only records the snapshot covers.
            let mut committed = 0;
            let mut result = Ok(());
            for pending in snapshots.drain(..) {
                result = async {
                    writer.commit(&bytes[committed..pending.end_in_pending_bytes]).await?;
                    committed = pending.end_in_pending_bytes;
                    let path = layout.shard_part_path(pending.partition, pending.marker_offset, shard);
                    storage::create_part_dir(&path)?;
                    storage::write_part(&path, &pending.entities)?;
                    writer.roll().await?;
                    let part = Event::SnapshotPart {
                        partition: pending.partition,
                        marker_offset: pending.marker_offset,
                        shard: Some(shard),
                        first_kept_segment: writer.segment(),
                    };
                    let _ = events.send(part);
                    Ok::<(), std::io::Error>(())
                }
                .await;
                if result.is_err() {
                    break;
                }
            }
            if result.is_ok() && committed < bytes.len() {
                result = writer.commit(&bytes[committed..]).await;
            }
            if let Err(e) = result {
                let _ = events.send(Event::Failed(shard, format!("Ledger write failed: {e}")));
                return;
            }
            bytes.clear();
            shared.syncs[shard as usize].store(writer.syncs, Ordering::Relaxed);
            // spec: Ledger.ShardDurableWatermark — per partition; markers are in order.
            for &(partition, last_offset) in &marks {
                let index = shard as usize * shared.partitions as usize + partition as usize;
                shared.durable[index].store(last_offset + 1, Ordering::Release);
            }
            marks.clear();
            // spec: Clerk.OwnCopyRecorded — only durable outputs are compared.
            if !outputs.is_empty() && outputs_tx.send(std::mem::take(&mut outputs)).await.is_err() {
                let _ = events.send(Event::Failed(shard, "the Clerk is gone".into()));
                return;
            }
        }
    })
    .detach();

    // spec: Gateway — every shard accepts; an address in use stops the start-up.
    if let Some(gateway) = context.gateway {
        let listener = gateway::bind(&gateway.config)?;
        glommio::spawn_local(gateway::serve(gateway, listener, shard)).detach();
    }
    let _ = context.events.send(Event::Started);

    if let Some((reader, tail, tx)) = context.reader {
        let shared = context.shared.clone();
        let events = context.events.clone();
        glommio::spawn_local(async move {
            if let Err(error) = read_and_decode(reader, tail.open(), tx, shared).await {
                let _ = events.send(Event::Failed(shard, format!("{error:#}")));
            }
        })
        .detach();
    }
    let options = UsherOptions { stop_at_end: context.stop_at_end, snapshot_every: context.snapshot_every };
    let mut tasks = Vec::new();
    for (usher, spec) in context.ushers {
        let source = match spec {
            SourceSpec::Local(reader, tail) => Source::Local(reader, Box::new(tail.open())),
            SourceSpec::Remote(rx) => Source::Remote(rx.connect().await),
            SourceSpec::Kafka(rx, door) => Source::Kafka { rx, at_end: false, door: door.open() },
        };
        let (state, shared, events, layout) =
            (state.clone(), context.shared.clone(), context.events.clone(), context.layout.clone());
        tasks.push(glommio::spawn_local(async move {
            if let Err(error) = usher_loop(usher, source, state, shared, events.clone(), layout, options).await {
                let _ = events.send(Event::Failed(shard, format!("{error:#}")));
            }
        }));
    }
    for task in tasks {
        task.await;
    }
    // The shard now only reacts to messages; park until the process exits.
    while !context.shared.stop.load(Ordering::Acquire) {
        glommio::timer::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Batches of durable outputs in flight from a shard's Ledger task to the Clerk.
const OUTPUT_BATCHES_IN_FLIGHT: usize = 64;
/// How often the certified checkpoint is persisted.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Decoded batches in flight from the reader shard to the Usher's.
const DECODED_BATCHES_IN_FLIGHT: usize = 4;

/// Where an Usher will read, as handed to its shard.
enum SourceSpec {
    /// The local log, read and decoded on the Usher's own shard.
    Local(crate::log::local::LocalLogReader, TailWaitKey),
    /// The local log, read and decoded on the reader shard.
    Remote(SharedReceiver<Vec<Decoded<D>>>),
    /// A Kafka partition, fed by the source thread (spec: KafkaLog.BridgeNeverBlocksExecutor).
    Kafka(mpsc::Receiver<Feed>, DoorKey),
}

/// The reader shard's job: its reader, how it waits when the log is idle, and the
/// channel to the Usher's shard.
type ReaderTask = (crate::log::local::LocalLogReader, TailWaitKey, SharedSender<Vec<Decoded<D>>>);

/// Where the Usher's records come from.
enum Source {
    /// Woken by the log's watch when idle (spec: LocalLog.AppendWakesReaders).
    Local(crate::log::local::LocalLogReader, Box<TailWait>),
    Remote(glommio::channels::shared_channel::ConnectedReceiver<Vec<Decoded<D>>>),
    Kafka {
        rx: mpsc::Receiver<Feed>,
        /// The last word from the source thread was "end of partition".
        at_end: bool,
        /// Rung by the source thread after each send.
        door: Door,
    },
}

impl Source {
    /// The next batch; empty when the log has nothing new right now.
    async fn next(&mut self, records: &mut Vec<Record>) -> anyhow::Result<Vec<Decoded<D>>> {
        match self {
            Source::Local(reader, tail) => {
                records.clear();
                if reader.poll(MAX_BATCH_RECORDS, records).context("reading the log")? > 0 {
                    tail.found_records();
                }
                Ok(decode(records))
            }
            Source::Remote(rx) => rx.recv().await.context("the reader shard stopped"),
            // Never blocks: the source thread may be waiting for the broker.
            Source::Kafka { rx, at_end, .. } => match rx.try_recv() {
                Ok(Feed::Batch(batch)) => {
                    *at_end = false;
                    Ok(batch)
                }
                Ok(Feed::AtEnd) => {
                    *at_end = true;
                    Ok(Vec::new())
                }
                Err(mpsc::TryRecvError::Empty) => Ok(Vec::new()),
                Err(mpsc::TryRecvError::Disconnected) => anyhow::bail!("the Kafka source thread stopped"),
            },
        }
    }

    /// Whether an empty batch means the log's end (rather than "nothing fetched yet").
    fn at_end(&self) -> bool {
        match self {
            Source::Local(..) | Source::Remote(_) => true,
            Source::Kafka { at_end, .. } => *at_end,
        }
    }

    /// After an empty batch: until something may be new. A remote source already waited.
    async fn idle(&mut self) {
        match self {
            Source::Local(_, tail) => {
                tail.after_empty_poll().await;
            }
            Source::Kafka { door, .. } => {
                door.wait().await;
            }
            Source::Remote(_) => {}
        }
    }
}

fn decode(records: &[Record]) -> Vec<Decoded<D>> {
    records
        .iter()
        .map(|r| Decoded {
            offset: r.offset,
            timestamp_ms: r.timestamp_ms,
            envelope: Envelope::<D>::decode(&r.payload),
        })
        .collect()
}

/// The reader shard's task: tail the log, decode, hand batches to the Usher. An empty
/// batch says "nothing new", so the Usher can tell when it has caught up; one is sent per
/// wake while the log is idle.
async fn read_and_decode(
    mut reader: crate::log::local::LocalLogReader,
    mut tail: TailWait,
    tx: SharedSender<Vec<Decoded<D>>>,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    let tx = tx.connect().await;
    let mut records = Vec::with_capacity(MAX_BATCH_RECORDS);
    while !shared.stop.load(Ordering::Acquire) {
        records.clear();
        let read = reader.poll(MAX_BATCH_RECORDS, &mut records).context("reading the log")?;
        if tx.send(decode(&records)).await.is_err() {
            return Ok(());
        }
        if read == 0 {
            tail.after_empty_poll().await;
        } else {
            tail.found_records();
        }
    }
    Ok(())
}

/// How the local log's reader waits when the log is idle (spec: LocalLog.AppendWakesReaders).
fn watch_local_log(dir: &std::path::Path) -> anyhow::Result<TailWaitKey> {
    watch::tail_wait(dir).context("making the local log's doorbell")
}

#[derive(Clone, Copy)]
struct UsherOptions {
    stop_at_end: bool,
    snapshot_every: u64,
}

/// An Usher's IO shell: take batches from its source, plan, dispatch.
async fn usher_loop(
    mut usher: Usher<D>,
    mut source: Source,
    state: Rc<RefCell<ShardState>>,
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
    layout: Layout,
    options: UsherOptions,
) -> anyhow::Result<()> {
    let UsherOptions { stop_at_end, snapshot_every } = options;
    let partition = usher.partition();
    let covered_end = &shared.snapshot_covered_end[partition as usize];
    let mut cadence = SnapshotCadence::new(
        snapshot_every,
        MAX_BATCH_RECORDS as u64,
        covered_end.load(Ordering::Acquire).checked_sub(1),
    );
    let mut records: Vec<Record> = Vec::with_capacity(MAX_BATCH_RECORDS);
    let home = state.borrow().shard;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        // spec: Clerk.CopyWindowBackpressure, Publisher.BoundedBacklog — own outputs always
        // fit the Clerk's ring, and certified outputs wait for publication in bounded memory.
        let window_end = shared.clerk.certified_end(partition) + shared.copy_window;
        if let Some(marker) = covered_end.load(Ordering::Acquire).checked_sub(1) {
            cadence.committed(marker);
        }
        // spec: Ledger.PlanningWaitsForSnapshot — bounds what a recovery replays.
        if !cadence.may_plan()
            || shared.in_flight.load(Ordering::Relaxed) > MAX_IN_FLIGHT_MESSAGES
            || usher.next_offset() + MAX_BATCH_RECORDS as u64 > window_end
            || shared.clerk.backlog_full.load(Ordering::Relaxed)
        {
            glommio::timer::sleep(Duration::from_micros(200)).await;
            continue;
        }
        let batch = source.next(&mut records).await?;
        if batch.is_empty() {
            if stop_at_end && source.at_end() && shared.durable_end(partition) >= usher.next_offset() {
                let _ = events.send(Event::Finished(partition));
                return Ok(());
            }
            source.idle().await;
            continue;
        }
        // spec: Ledger.SnapshotDue, Ledger.SnapshotPlanned — at the end of the batch that
        // brings the records since the committed snapshot to the threshold.
        // Every other partition is asked to snapshot at its next batch too: a segment is
        // deleted only once every partition's snapshot covers it, so a partition with little
        // traffic would otherwise hold back deletion for all (spec: Ledger.SegmentsBelowSnapshotDeleted).
        let own = cadence.snapshot_due(usher.next_offset(), batch.len() as u64);
        if own {
            for (other, wanted) in shared.snapshot_wanted.iter().enumerate() {
                if other != partition as usize {
                    wanted.store(true, Ordering::Relaxed);
                }
            }
        }
        let snapshot = own || shared.snapshot_wanted[partition as usize].swap(false, Ordering::Relaxed);
        if snapshot {
            usher.request_snapshot();
        }
        let plan = match usher.plan_decoded(batch) {
            Ok(plan) => plan,
            Err(halted) => anyhow::bail!("the Usher of partition {partition} halted: {halted}"),
        };
        if plan.snapshot.is_some() {
            cadence.requested(usher.next_offset() - 1);
        }
        {
            let mut st = state.borrow_mut();
            for (to, message) in plan.messages {
                if to == home {
                    st.process(message);
                } else {
                    st.stage(to, message);
                }
            }
            st.flush();
        }
        if let (Some(snapshot), Some(marker_offset)) = (&plan.snapshot, plan.last_offset) {
            let path = layout.usher_part_path(partition, marker_offset);
            storage::create_part_dir(&path)?;
            storage::write_part(&path, snapshot).context("writing the Usher's snapshot part")?;
            let _ = events.send(Event::SnapshotPart { partition, marker_offset, shard: None, first_kept_segment: 0 });
        }
        shared.next_offset[partition as usize].store(usher.next_offset(), Ordering::Release);
        if let Some(halted) = plan.halted {
            // spec: Versioning.UnknownVersionHalts — durable up to the record before it.
            anyhow::bail!("the Usher of partition {partition} halted: {halted}");
        }
        glommio::executor().yield_if_needed().await;
    }
}
