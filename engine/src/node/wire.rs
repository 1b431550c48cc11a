//! Wiring a recovered instance before its shards start: the shared atomics, the
//! publisher sink, the channels between shards and to the Clerk, the Gateway, the Clerk's
//! executor and each Usher's source. Nothing runs a record yet.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use anyhow::Context;
use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use tribunal_federation::clerk::ClerkConfig;
use tribunal_shards::arbiter::Arbiter;
use tribunal_shards::router::ShardId;
use tribunal_shards::usher::{home_shard, Decoded, Usher};

use super::recover::{KafkaStart, OpenedLog, Recovery};
use super::resume::ResumePlan;
use super::shard::ShardContext;
use super::shared::{Event, Shared};
use super::usher::{watch_local_log, ReaderTask, SourceSpec, UsherOptions};
use super::{NodeConfig, Wire, CHANNEL_CAPACITY, D, IDLE_WAIT};
use crate::clerk::peer_links::LinksConfig;
use crate::clerk::{ClerkSetup, ClerkShared, ClerkStarter, FaultControl};
use crate::gateway::certified_view::CertifiedView;
use crate::gateway::metrics::{Figures, Metrics, ProcessFigures};
use crate::gateway::{listeners, GatewayShared, NodeProbe};
use crate::log::appender;
use crate::log::doorbell::doorbell;
use crate::log::kafka::{self, Feed, FeedSender, KafkaShared};
use crate::log::local::LocalLog;
use crate::publish::local::LocalSink;
use crate::publish::{self, CertifiedSink, DurableOutput, PublishBatch};
use crate::status::RecoveryFigures;
use crate::storage::{quarantine, Layout, Manifest};

/// Batches of durable outputs in flight from a shard's Ledger task to the Clerk.
const OUTPUT_BATCHES_IN_FLIGHT: usize = 64;
/// Decoded batches in flight from the reader shard to the Usher's.
const DECODED_BATCHES_IN_FLIGHT: usize = 4;

/// A wired instance, ready to start its shards.
pub(super) struct Wired {
    pub contexts: Vec<ShardContext>,
    pub events: mpsc::Receiver<Event>,
    pub shared: Arc<Shared>,
    pub clerk: Arc<ClerkShared>,
    pub kafka: Option<(KafkaStart, Arc<KafkaShared>)>,
    /// The Kafka feeds, for the source thread.
    pub feeds: Vec<FeedSender>,
    /// Certified outputs for the Kafka publisher thread, when it runs.
    pub sink_rx: Option<mpsc::Receiver<PublishBatch>>,
    pub local_sink: Option<LocalSink>,
    pub probe: Arc<NodeProbe>,
    pub manifest: Manifest,
    pub plan: ResumePlan,
    pub figures: RecoveryFigures,
}

/// What several parts of the wiring hold on to.
struct Commons {
    shared: Arc<Shared>,
    clerk: Arc<ClerkShared>,
    probe: Arc<NodeProbe>,
    faults: Arc<FaultControl>,
    /// The outputs log's syncs by this instance's local publisher.
    outputs_syncs: Arc<AtomicU64>,
}

pub(super) fn wire(config: &NodeConfig, layout: &Layout, log: OpenedLog, recovery: Recovery) -> anyhow::Result<Wired> {
    let Recovery { manifest, arbiters, ushers, mut plan, figures } = recovery;
    let partitions = log.partitions;
    // With Kafka, a KafkaShared carries readiness, failures and the publisher's acks.
    // (Its published ends are where publication resumes: past outputs the Ledger lost.)
    let kafka_shared = log.kafka.as_ref().map(|k| {
        let ends = if k.published_ends.is_some() { plan.published_start.clone() } else { vec![0; partitions as usize] };
        Arc::new(KafkaShared::new(&ends))
    });
    let published_now: Vec<u64> = plan.published_start.iter().zip(&plan.certified).map(|(p, c)| (*p).min(*c)).collect();
    let clerk = Arc::new(ClerkShared::new(partitions, &plan.certified, &published_now));
    let shared = Arc::new(shared_state(config, &plan, &manifest, partitions, clerk.clone()));
    let (sink_tx, sink_rx) = mpsc::channel::<PublishBatch>();
    let (sink, local_sink) = publisher_sink(config, &plan, kafka_shared.as_ref(), log.outputs_log, sink_rx)?;
    let outputs_syncs = local_sink.as_ref().map_or_else(Arc::default, |s| s.syncs.clone());
    let commons = Commons { shared, clerk, probe: Arc::default(), faults: Arc::default(), outputs_syncs };
    let gateway = gateway(config, &log.local, log.kafka.as_ref(), &arbiters, &plan, &commons, figures)?;
    let (output_senders, output_receivers) = output_channels(config.cores.len());
    let view = gateway.as_ref().map(|(g, _)| g.view.clone() as Arc<dyn CertifiedSink>);
    let clerk = clerk_starter(config, &mut plan, &commons, (sink.published, sink_tx), view, output_receivers)?;
    let (sources, reader, feeds) = usher_sources(config, &log.local, ushers, &plan.resume)?;
    let (events_tx, events) = mpsc::channel::<Event>();
    let options = UsherOptions { stop_at_end: config.stop_at_end, snapshot_every: config.snapshot_every };
    let links = ShardLinks { sources, reader, outputs: output_senders, events: events_tx, options, gateway, clerk };
    let contexts = shard_contexts(config, layout, arbiters, &commons.shared, links);
    let Commons { shared, clerk, probe, .. } = commons;
    let kafka = log.kafka.zip(kafka_shared);
    Ok(Wired {
        contexts,
        events,
        shared,
        clerk,
        kafka,
        feeds,
        sink_rx: sink.kafka_rx,
        local_sink,
        probe,
        manifest,
        plan,
        figures,
    })
}

/// The Clerk, to run on the last shard's executor (shard 0, which plans, is the busiest);
/// it takes the outputs to compare and republish from the plan.
fn clerk_starter(
    config: &NodeConfig,
    plan: &mut ResumePlan,
    commons: &Commons,
    (sink_published, sink_tx): (Arc<dyn Fn(u32) -> u64 + Send + Sync>, mpsc::Sender<PublishBatch>),
    view: Option<Arc<dyn CertifiedSink>>,
    own_outputs: Vec<OutputsRx>,
) -> anyhow::Result<ClerkStarter> {
    let setup = ClerkSetup {
        config: clerk_config(config, commons.shared.partitions, commons.shared.copy_window)?,
        links: links_config(config),
        faults: config.federation.faults.clone(),
        resume: plan.certified.iter().zip(&plan.resume).map(|(c, r)| (*c, *r)).collect(),
        recovered_outputs: std::mem::take(&mut plan.to_compare),
        retained_seed: std::mem::take(&mut plan.retained_digests),
        unpublished: std::mem::take(&mut plan.to_republish),
        sink: config.publish.then_some(sink_tx),
        sink_published,
        data_dir: config.data_dir.clone(),
        view,
        fault_control: Some(commons.faults.clone()),
    };
    let durable_view = commons.shared.clone();
    let durable_end = Arc::new(move |p| durable_view.durable_end(p));
    Ok(ClerkStarter::new(setup, own_outputs, commons.clerk.clone(), durable_end))
}

fn shared_state(
    config: &NodeConfig,
    plan: &ResumePlan,
    manifest: &Manifest,
    partitions: u32,
    clerk: Arc<ClerkShared>,
) -> Shared {
    let shard_count = config.cores.len();
    let resume = &plan.resume;
    Shared {
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
        clerk,
        copy_window: ClerkConfig::DEFAULT_COPY_WINDOW,
    }
}

/// Where certified outputs go, and how far they got.
struct Sink {
    published: Arc<dyn Fn(u32) -> u64 + Send + Sync>,
    /// For the Kafka publisher thread, started once the shards run.
    kafka_rx: Option<mpsc::Receiver<PublishBatch>>,
}

/// The publisher sink: the outputs topic (its thread starts with the shards) or the
/// local outputs log (its thread starts now).
fn publisher_sink(
    config: &NodeConfig,
    plan: &ResumePlan,
    kafka_shared: Option<&Arc<KafkaShared>>,
    outputs_log: Option<(LocalLog, u64)>,
    sink_rx: mpsc::Receiver<PublishBatch>,
) -> anyhow::Result<(Sink, Option<LocalSink>)> {
    match (kafka_shared, outputs_log) {
        (Some(k), _) if config.publish => {
            let k = k.clone();
            let published = Arc::new(move |p: u32| k.published_end[p as usize].load(Ordering::Acquire));
            Ok((Sink { published, kafka_rx: Some(sink_rx) }, None))
        }
        (None, Some((log, _))) => {
            let sink = publish::local::spawn(log, plan.published_start[0], sink_rx)?;
            let published_end = sink.published.clone();
            let published = Arc::new(move |_| published_end.load(Ordering::Acquire));
            Ok((Sink { published, kafka_rx: None }, Some(sink)))
        }
        _ => Ok((Sink { published: Arc::new(|_| 0), kafka_rx: Some(sink_rx) }, None)),
    }
}

/// Batches of durable outputs, from a shard's Ledger task to the Clerk.
type OutputsTx = SharedSender<Vec<DurableOutput>>;
type OutputsRx = SharedReceiver<Vec<DurableOutput>>;

/// Durable outputs from each shard's Ledger task to the Clerk.
fn output_channels(shards: usize) -> (Vec<OutputsTx>, Vec<OutputsRx>) {
    (0..shards).map(|_| shared_channel::new_bounded::<Vec<DurableOutput>>(OUTPUT_BATCHES_IN_FLIGHT)).unzip()
}

fn links_config(config: &NodeConfig) -> Option<LinksConfig> {
    let federation = &config.federation;
    match (federation.listen, &federation.psk) {
        (Some(listen), Some(psk)) if !federation.peers.is_empty() => Some(LinksConfig::new(
            config.instance_id,
            listen,
            federation.peers.iter().map(|p| (p.instance_id, p.address)).collect(),
            psk.clone(),
        )),
        _ => None,
    }
}

fn clerk_config(config: &NodeConfig, partitions: u32, copy_window: u64) -> anyhow::Result<ClerkConfig> {
    Ok(ClerkConfig {
        instance_id: config.instance_id,
        peers: config.federation.peers.iter().map(|p| p.instance_id).collect(),
        partitions,
        expected_copies: config.federation.expected_copies,
        copy_window,
        digest_retention: ClerkConfig::DEFAULT_DIGEST_RETENTION,
        may_publish: config.publish,
        incarnation: quarantine::incarnation(&config.data_dir)?,
        max_unpublished: publish::MAX_UNPUBLISHED,
    })
}

/// The Gateway, when serving: its certified view starts from the recovered state
/// (spec: Gateway.ViewValidFromRecovery), its appender thread starts now.
fn gateway(
    config: &NodeConfig,
    local: &Option<(LocalLog, std::path::PathBuf)>,
    kafka: Option<&KafkaStart>,
    arbiters: &[Arbiter<D>],
    plan: &ResumePlan,
    commons: &Commons,
    figures: RecoveryFigures,
) -> anyhow::Result<Option<(Arc<GatewayShared>, Vec<std::net::TcpListener>)>> {
    let Some(gateway_config) = &config.gateway else { return Ok(None) };
    // spec: Gateway.SoleListener — before anything else starts.
    let listeners = listeners::bind(gateway_config.listen, config.cores.len())?;
    let partitions = commons.shared.partitions;
    let view = Arc::new(std::sync::Mutex::new(certified_view(gateway_config, arbiters, plan, partitions)));
    let target = match (local, kafka) {
        (Some((_, dir)), _) => appender::Target::Local(dir.clone()),
        (None, Some(k)) => appender::Target::Kafka(k.config.clone()),
        (None, None) => unreachable!("a node reads one log"),
    };
    let appender = appender::spawn(target, partitions, gateway_config.max_waiting)
        .context("starting the Gateway's log appender")?;
    let log = local.as_ref().map(|(_, dir)| LocalLog::open(dir)).transpose()?;
    let figures = figures_source(commons, &view, &appender, log, figures);
    let shared = Arc::new(GatewayShared {
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
        node: commons.probe.clone(),
        faults: commons.faults.clone(),
        data_dir: config.data_dir.clone(),
        in_flight: std::sync::atomic::AtomicUsize::new(0),
    });
    Ok(Some((shared, listeners)))
}

/// The view seeded with the recovered state; offsets skipped loudly at recovery were
/// never certified, yet the recovered state holds them: the view cannot claim to be
/// certified state there.
fn certified_view(
    config: &crate::gateway::GatewayConfig,
    arbiters: &[Arbiter<D>],
    plan: &ResumePlan,
    partitions: u32,
) -> CertifiedView<futures_channel::oneshot::Sender<crate::gateway::certified_view::Answer>> {
    let seed: Vec<_> = (0..partitions)
        .map(|p| {
            let entities: Vec<_> = arbiters.iter().flat_map(|a| a.registrar().entities_sorted(p)).collect();
            (entities, plan.resume[p as usize])
        })
        .collect();
    let mut view = CertifiedView::new(seed, &plan.certified, config.answer_capacity, config.max_waiting);
    for (p, (before, after)) in plan.certified_before_skip.iter().zip(&plan.certified).enumerate() {
        if after > before {
            view.mark_gap(p as u32, *before);
        }
    }
    view
}

/// `/metrics`' node figures, read at scrape time.
fn figures_source(
    commons: &Commons,
    view: &Arc<crate::gateway::SharedView>,
    appender: &appender::Appender,
    log: Option<LocalLog>,
    recovery: RecoveryFigures,
) -> crate::gateway::metrics::FiguresFn {
    let (shared, clerk, probe) = (commons.shared.clone(), commons.clerk.clone(), commons.probe.clone());
    let view = view.clone();
    let appended = appender.appended_end.clone();
    let (log_syncs, outputs_syncs) = (appender.syncs.clone(), commons.outputs_syncs.clone());
    Arc::new(move || {
        let durable_end: Vec<u64> = (0..shared.partitions).map(|p| shared.durable_end(p)).collect();
        let next = shared.next_offsets();
        let log_end = match &log {
            Some(log) => vec![log.end_offset().unwrap_or(0)],
            None => (0..shared.partitions as usize).map(|p| appended[p].load(Ordering::Relaxed).max(next[p])).collect(),
        };
        let faults_detected = clerk.status.lock().expect("not poisoned").as_ref().map_or(0, |f| f.faults_total);
        Figures {
            certified_end: (0..shared.partitions).map(|p| clerk.certified_end(p)).collect(),
            durable_end,
            log_end,
            ledger_fsyncs: shared.syncs.iter().map(|s| s.load(Ordering::Relaxed)).sum(),
            faults_detected,
            ready: probe.ready.load(Ordering::Acquire),
            waiting_requests: view.lock().expect("not poisoned").waiting() as u64,
            recovery_replayed_entries: recovery.replayed_entries,
            log_fsyncs: log_syncs.load(Ordering::Relaxed),
            outputs_fsyncs: outputs_syncs.load(Ordering::Relaxed),
            process: ProcessFigures::now(),
        }
    })
}

/// Where each Usher's records come from, per home shard; the reader shard's task; the
/// Kafka feeds for the source thread.
type UsherSources = (Vec<Vec<(Usher<D>, SourceSpec)>>, Option<ReaderTask>, Vec<FeedSender>);

/// The local log is read and its JSON decoded on the last shard when there are several:
/// decoding is a third of the Usher's shard's time otherwise (measured), and that shard
/// is the one that bounds throughput.
fn usher_sources(
    config: &NodeConfig,
    local: &Option<(LocalLog, std::path::PathBuf)>,
    ushers: Vec<Usher<D>>,
    resume: &[u64],
) -> anyhow::Result<UsherSources> {
    let shard_count = config.cores.len() as u16;
    let mut sources: Vec<Vec<(Usher<D>, SourceSpec)>> = (0..shard_count).map(|_| Vec::new()).collect();
    let mut feeds = Vec::new();
    let reader_shard = shard_count - 1;
    let mut reader = None;
    for (partition, usher) in ushers.into_iter().enumerate() {
        let home = home_shard(partition as u32, shard_count);
        let spec = match local {
            Some((log, dir)) if reader_shard == home => {
                SourceSpec::Local(Box::new(log.reader(resume[partition])?), watch_local_log(dir)?)
            }
            Some((log, dir)) => {
                let (tx, rx) = shared_channel::new_bounded::<Vec<Decoded<D>>>(DECODED_BATCHES_IN_FLIGHT);
                reader = Some((log.reader(resume[partition])?, watch_local_log(dir)?, tx));
                SourceSpec::Remote(rx)
            }
            None => {
                let (tx, rx) = mpsc::sync_channel::<Feed>(kafka::FEED_BATCHES_IN_FLIGHT);
                let (bell, door) = doorbell(IDLE_WAIT).context("making the Kafka feed's doorbell")?;
                feeds.push(FeedSender::new(tx, bell));
                SourceSpec::Kafka(rx, door)
            }
        };
        sources[home as usize].push((usher, spec));
    }
    Ok((sources, reader, feeds))
}

/// What each shard's context is made of, besides its Arbiter and channels.
struct ShardLinks {
    sources: Vec<Vec<(Usher<D>, SourceSpec)>>,
    reader: Option<ReaderTask>,
    outputs: Vec<SharedSender<Vec<DurableOutput>>>,
    events: mpsc::Sender<Event>,
    options: UsherOptions,
    /// The Gateway, and one listener per shard.
    gateway: Option<(Arc<GatewayShared>, Vec<std::net::TcpListener>)>,
    /// Runs on the last shard.
    clerk: ClerkStarter,
}

/// Channels for every ordered pair of distinct shards, and each shard's context.
fn shard_contexts(
    config: &NodeConfig,
    layout: &Layout,
    arbiters: Vec<Arbiter<D>>,
    shared: &Arc<Shared>,
    links: ShardLinks,
) -> Vec<ShardContext> {
    let n = config.cores.len();
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
    let ShardLinks { mut sources, mut reader, outputs, events, options, gateway, clerk } = links;
    let mut clerk = Some(clerk);
    let mut gateway = gateway.map(|(shared, listeners)| (shared, listeners.into_iter()));
    let reader_shard = n - 1;
    let parts = arbiters.into_iter().zip(senders).zip(receivers).zip(outputs).enumerate();
    parts
        .map(|(shard, (((arbiter, outbound), inbound), outputs))| ShardContext {
            shard: shard as ShardId,
            shard_count: n as u16,
            layout: layout.clone(),
            arbiter,
            outbound,
            inbound,
            ushers: std::mem::take(&mut sources[shard]),
            reader: if shard == reader_shard { reader.take() } else { None },
            outputs,
            shared: shared.clone(),
            events: events.clone(),
            usher_options: options,
            gateway: gateway
                .as_mut()
                .map(|(shared, listeners)| (shared.clone(), listeners.next().expect("one listener per shard"))),
            clerk: if shard == reader_shard { clerk.take() } else { None },
        })
        .collect()
}
