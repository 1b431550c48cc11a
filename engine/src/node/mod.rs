//! One running instance: recovery, then one pinned glommio executor per shard.
//!
//! Start-up: the data directory is checked; with Kafka, the topics are ensured and how far
//! the outputs topic got is read; every shard's Ledger is read and recovered (std IO,
//! before any shard runs), cuts are applied, and only then are the shards started. Until
//! every shard has started the instance reports `recovering` in `status.json`
//! (spec: Recovery.RecoveryCompletes; nothing is advertised before).
//!
//! Per shard, on its own core:
//! - one receiver task per inbound channel: the shard's `ShardCore` handles each message;
//! - one sender task per outbound channel, draining a local unbounded queue. Receiver
//!   tasks never await a bounded send, so two shards with full channels towards each
//!   other cannot deadlock; the Ushers' backpressure bounds what is in flight;
//! - one Ledger task: whatever records accumulated since its last commit are written
//!   and made durable with one fdatasync (group commit), then the shard's durable
//!   watermarks advance to the batch-end markers among them, and the outputs that became
//!   durable go to the Clerk;
//! - one Usher task per partition whose home shard it is (spec: KafkaLog.PartitionIsOrderingDomain).
//!
//! Shards talk only through glommio's shared-nothing channels. Durable watermarks are
//! also published in atomics, read for status, snapshots and shutdown.
//!
//! The phases, each its own module: open and [`recover`] (std IO, nothing runs yet;
//! [`resume`] decides where everything resumes), [`wire`] (channels, sinks, the Gateway,
//! the Clerk), [`start`] (one pinned executor per shard: [`shard`], [`usher`]), and
//! [`supervisor`] (the main thread until exit).

pub mod cores;
mod recover;
mod resume;
mod shard;
mod shard_state;
mod shared;
mod status;
mod supervisor;
mod usher;
mod wire;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use tracing::info;
use tribunal_shards::arbiter::ShardMessage;
use tribunal_shards::inventory::Inventory;
use tribunal_shards::warden::WardenConfig;

use crate::clerk::{Fault, PeerAddress};
use crate::gateway::GatewayConfig;
use crate::log::kafka::{self, KafkaConfig};
use crate::publish;
use crate::status::NodeStatus;
use crate::storage::Layout;
use shared::Event;
use status::StatusSources;
use supervisor::Supervisor;
use wire::Wired;

type D = Inventory;
type Message = ShardMessage<D>;
/// What travels between shards: the messages for one destination from one step (a
/// planned batch, or the handling of one inbound wire), in order. One cross-core
/// handoff per step instead of one per message.
type Wire = Vec<Message>;

/// Messages a channel between two shards holds before the sender waits.
const CHANNEL_CAPACITY: usize = 4_096;
/// Most records the Usher plans as one batch.
pub use tribunal_shards::usher::MAX_BATCH_RECORDS;
/// The Ushers stop reading while this many messages they sent are not yet delivered.
const MAX_IN_FLIGHT_MESSAGES: u64 = 64 * 1_024;
/// How often `status.json` is rewritten.
const STATUS_INTERVAL: Duration = Duration::from_millis(200);
/// How long an idle Kafka Usher waits for its source thread's ring before trying its
/// channel again anyway (spec: KafkaLog.BridgeNeverBlocksExecutor): the local log's idle
/// wait too.
const IDLE_WAIT: Duration = crate::log::local::watch::IDLE_WAIT;

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

/// `tribunal run`: open → recover → wire → start → supervise. Returns only on an error,
/// or (`--stop-at-end`) exits the process once everything has settled.
pub fn run(config: NodeConfig) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let shard_count = config.cores.len() as u16;
    cores::check_io_uring()?;
    cores::check_memlock(config.cores.len())?;
    let layout = Layout::new(&config.data_dir);
    layout.prepare(shard_count)?;
    status::write_status(&layout, &NodeStatus::recovering(shard_count));
    let log = recover::open_log(&config)?;
    let recovery = recover::recover(&config, &layout, &log, started)?;
    let mut wired = wire::wire(&config, &layout, log, recovery)?;
    let early = start(&config, &mut wired)?;
    // spec: Recovery.RecoveryCompletes — only now may the Clerk advertise and send.
    wired.clerk.open_gate.store(true, Ordering::Release);
    let recovery_ms = started.elapsed().as_millis();
    info!(cores = ?config.cores, recovery_ms = recovery_ms as u64, instance_id = config.instance_id, "ready");
    let supervisor = Supervisor {
        layout,
        manifest: wired.manifest,
        shared: wired.shared.clone(),
        clerk: wired.clerk.clone(),
        kafka: wired.kafka.as_ref().map(|(_, k)| k.clone()),
        local_sink: wired.local_sink,
        probe: wired.probe,
        status: StatusSources {
            shared: wired.shared,
            clerk: wired.clerk,
            kafka: wired.kafka.map(|(_, k)| k),
            shards: shard_count,
            resume: wired.plan.resume,
            started,
            ready_at: Instant::now(),
            recovery_ms,
            recovery: wired.figures,
        },
        shard_count: config.cores.len(),
        persisted_certified: wired.plan.certified,
    };
    supervisor.run(&wired.events, early)?;
    Ok(ExitCode::SUCCESS)
}

/// Starts one pinned executor per shard and waits until each has started (a shard that
/// fails to start stops the process; what else arrives meanwhile is returned for the
/// supervisor), then the Kafka threads.
fn start(config: &NodeConfig, wired: &mut Wired) -> anyhow::Result<Vec<Event>> {
    let contexts = std::mem::take(&mut wired.contexts);
    let shards = contexts.len();
    for (context, core) in contexts.into_iter().zip(config.cores.iter().copied()) {
        let shard = context.shard;
        let failed = context.events.clone();
        LocalExecutorBuilder::new(Placement::Fixed(core))
            .name(&format!("shard-{shard}"))
            .io_memory(cores::IO_MEMORY_PER_SHARD_BYTES)
            .spawn(move || async move {
                if let Err(error) = shard::shard_main(context).await {
                    let _ = failed.send(Event::Failed(shard, format!("{error:#}")));
                }
            })
            .map_err(|e| anyhow::anyhow!("starting shard {shard} on core {core}: {e}"))?;
    }
    let (mut running, mut early) = (0, Vec::new());
    while running < shards {
        match wired.events.recv() {
            Ok(Event::Started) => running += 1,
            Ok(Event::Failed(shard, error)) => anyhow::bail!("shard {shard} failed to start: {error}"),
            Ok(event) => early.push(event),
            Err(_) => anyhow::bail!("the shards stopped during start-up"),
        }
    }
    if let Some((start, kafka_shared)) = &wired.kafka {
        if let (Some(_), Some(sink_rx)) = (&start.published_ends, wired.sink_rx.take()) {
            publish::kafka::spawn_publisher(&start.config, &wired.plan.published_start, sink_rx, kafka_shared.clone())?;
        }
        let client_id = format!("tribunal-{}", config.instance_id);
        let feeds = std::mem::take(&mut wired.feeds);
        kafka::spawn_source(&start.config, &client_id, wired.plan.resume.clone(), feeds, kafka_shared.clone())?;
    }
    Ok(early)
}
