//! One running instance: recovery, then one pinned glommio executor per shard.
//!
//! Start-up: the data directory is checked, every shard's Ledger is read and
//! recovered (std IO, before any shard runs), cuts are applied, and only then are the
//! shards started. Until every shard has started the instance reports `recovering`
//! in `status.json` (spec: Recovery.RecoveryCompletes; nothing is advertised before).
//!
//! Per shard, on its own core:
//! - one receiver task per inbound channel: `Arbiter::handle`, then effects;
//! - one sender task per outbound channel, draining a local unbounded queue. Receiver
//!   tasks never await a bounded send, so two shards with full channels towards each
//!   other cannot deadlock; the Usher's backpressure bounds what is in flight;
//! - one Ledger task: whatever records accumulated since its last commit are written
//!   and made durable with one fdatasync (group commit), then the shard's durable
//!   watermark advances to the batch-end markers among them;
//! - on the home shard, the Usher task tails the input log and plans batches.
//!
//! Shards talk only through glommio's shared-nothing channels. The durable watermark
//! of each shard is also published in an atomic, read only for status and shutdown.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Context;
use glommio::channels::local_channel::{self, LocalSender};
use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use glommio::{LocalExecutorBuilder, Placement};
use serde::Serialize;
use tracing::{error, info, warn};
use tribunal_shards::arbiter::{Arbiter, ShardEffect, ShardMessage};
use tribunal_shards::envelope::Envelope;
use tribunal_shards::inventory::Inventory;
use tribunal_shards::ledger::{encode_record, LedgerRecord};
use tribunal_shards::recovery::recover;
use tribunal_shards::router::ShardId;
use tribunal_shards::usher::{Decoded, Record, Usher, UsherConfig};
use tribunal_shards::warden::WardenConfig;

use crate::cores;
use crate::ledger_io::{self, Layout, SegmentWriter};
use crate::local_log::LocalLog;

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
/// The Usher stops reading while this many messages it sent are not yet delivered.
const MAX_IN_FLIGHT_MESSAGES: u64 = 64 * 1_024;
/// How often `status.json` is rewritten.
const STATUS_INTERVAL: Duration = Duration::from_millis(200);
/// How long the Usher waits before polling an idle log again.
const IDLE_POLL: Duration = Duration::from_millis(1);

pub struct NodeConfig {
    pub log_dir: PathBuf,
    pub data_dir: PathBuf,
    pub cores: Vec<usize>,
    pub warden: WardenConfig,
    /// Exit once every record in the log when the Usher last found none is durable.
    pub stop_at_end: bool,
    /// Take a snapshot every this many records (0: never).
    pub snapshot_every: u64,
}

/// `status.json`: what an operator or a test can read while the instance runs.
#[derive(Debug, Serialize)]
struct Status {
    phase: &'static str,
    shards: u16,
    /// Highest offset durable on every shard; absent before recovery completes
    /// (spec: Recovery.NoWatermarkBeforeReady) or while nothing is durable.
    durable_watermark: Option<u64>,
    next_offset: Option<u64>,
    ledger_syncs: u64,
    uptime_ms: u128,
    /// Time from start to ready: reading and replaying the Ledger, cutting, starting shards.
    recovery_ms: Option<u128>,
    /// Records planned since this process became ready, and for how long it has been.
    records_processed: u64,
    processing_ms: u128,
}

/// Shared between the executors and the main thread: published watermarks (durable
/// offset + 1, 0 = none), sync counts and the stop flag.
struct Shared {
    durable: Vec<AtomicU64>,
    syncs: Vec<AtomicU64>,
    next_offset: AtomicU64,
    in_flight: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    /// Instance durable watermark (+1): the minimum over shards (spec: Ledger.InstanceDurableWatermark).
    fn durable_end(&self) -> u64 {
        self.durable.iter().map(|d| d.load(Ordering::Acquire)).min().unwrap_or(0)
    }
}

enum Event {
    Started,
    Failed(ShardId, String),
    Finished,
    /// A snapshot part at `marker_offset` is durable: the Usher's (`shard` None) or a
    /// shard's, whose segments before `first_kept_segment` hold only records <= marker.
    SnapshotPart {
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
    if let Err(e) = ledger_io::write_atomically(&layout.status_path(), &bytes) {
        warn!("could not write {}: {e}", layout.status_path().display());
    }
}

pub fn run(config: NodeConfig) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let shard_count = config.cores.len() as u16;
    cores::check_memlock(config.cores.len())?;
    let layout = Layout::new(&config.data_dir);
    layout.prepare(shard_count)?;
    let log =
        LocalLog::open(&config.log_dir).with_context(|| format!("opening the log {}", config.log_dir.display()))?;
    write_status(
        &layout,
        &Status {
            phase: "recovering",
            shards: shard_count,
            durable_watermark: None,
            next_offset: None,
            ledger_syncs: 0,
            uptime_ms: 0,
            recovery_ms: None,
            records_processed: 0,
            processing_ms: 0,
        },
    );

    // spec: Recovery.RecoveryStarts .. Recovery.WardenRebuilt
    info!(shards = shard_count, data_dir = %config.data_dir.display(), "recovering");
    let snapshot = ledger_io::read_snapshot::<D>(&layout, shard_count).context("loading the snapshot")?;
    let snapshot_marker = snapshot.get(&0).map(|s| s.marker_offset);
    let logs = ledger_io::read_logs::<D>(&layout, shard_count)?;
    let mut recovered = recover(shard_count, usher_config(shard_count, config.warden), logs, snapshot)
        .context("recovering the Ledger")?;
    for cut in &recovered.cuts {
        // spec: Recovery.TornTailTruncated
        warn!(shard = cut.shard, segment = cut.segment, position = cut.position, reason = %cut.reason, "cutting the Ledger");
        ledger_io::apply_cut(&layout, cut)
            .with_context(|| format!("cutting shard {} at {}", cut.shard, cut.position))?;
    }
    let watermark = recovered.watermarks.get(&0).copied();
    let usher = recovered.ushers.remove(&0).unwrap_or_else(|| Usher::new(usher_config(shard_count, config.warden)(0)));
    let resume = watermark.map_or(0, |w| w + 1);
    assert_eq!(usher.next_offset(), resume, "the Usher resumes right after the durable watermark");
    info!(
        snapshot_marker = ?snapshot_marker,
        durable_watermark = ?watermark,
        replayed_entries = recovered.replayed_entries,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "recovered; resuming the log at offset {resume}"
    );

    let shared = Arc::new(Shared {
        durable: (0..shard_count).map(|_| AtomicU64::new(resume)).collect(),
        syncs: (0..shard_count).map(|_| AtomicU64::new(0)).collect(),
        next_offset: AtomicU64::new(resume),
        in_flight: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });

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

    let (events_tx, events_rx) = mpsc::channel::<Event>();
    let mut arbiters: Vec<Option<Arbiter<D>>> = recovered.arbiters.into_iter().map(Some).collect();
    let mut usher = Some(usher);
    // The log is read and its JSON decoded on the last shard when there are several:
    // decoding is a third of the Usher's shard's time otherwise (measured), and that
    // shard is the one that bounds throughput.
    let mut log = Some(log);
    let (decoded_tx, decoded_rx) = shared_channel::new_bounded::<Vec<Decoded<D>>>(DECODED_BATCHES_IN_FLIGHT);
    let (mut decoded_tx, mut decoded_rx) = (Some(decoded_tx), Some(decoded_rx));
    let reader_shard = shard_count - 1;
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
            usher: if shard == 0 { usher.take() } else { None },
            log: if shard == reader_shard { log.take() } else { None },
            decoded_tx: if shard == reader_shard && shard != 0 { decoded_tx.take() } else { None },
            decoded_rx: if shard == 0 && reader_shard != 0 { decoded_rx.take() } else { None },
            resume,
            shared: shared.clone(),
            events: events_tx.clone(),
            stop_at_end: config.stop_at_end,
            snapshot_every: config.snapshot_every,
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

    // Start-up handshake: a shard that fails to start stops the process.
    let mut running = 0;
    while running < n {
        match events_rx.recv() {
            Ok(Event::Started) => running += 1,
            Ok(Event::Failed(shard, error)) => anyhow::bail!("shard {shard} failed to start: {error}"),
            Ok(Event::Finished | Event::SnapshotPart { .. }) => {}
            Err(_) => anyhow::bail!("the shards stopped during start-up"),
        }
    }
    let recovery_ms = started.elapsed().as_millis();
    let ready_at = Instant::now();
    info!(cores = ?config.cores, recovery_ms = recovery_ms as u64, "ready");

    let status = |phase: &'static str| Status {
        phase,
        shards: shard_count,
        durable_watermark: shared.durable_end().checked_sub(1),
        next_offset: Some(shared.next_offset.load(Ordering::Acquire)),
        ledger_syncs: shared.syncs.iter().map(|s| s.load(Ordering::Relaxed)).sum(),
        uptime_ms: started.elapsed().as_millis(),
        recovery_ms: Some(recovery_ms),
        records_processed: shared.next_offset.load(Ordering::Acquire) - resume,
        processing_ms: ready_at.elapsed().as_millis(),
    };
    let mut last_status = Instant::now() - STATUS_INTERVAL;
    let mut snapshot_parts: BTreeMap<u64, Vec<(Option<ShardId>, u64)>> = BTreeMap::new();
    loop {
        if last_status.elapsed() >= STATUS_INTERVAL {
            write_status(&layout, &status("ready"));
            last_status = Instant::now();
        }
        match events_rx.recv_timeout(STATUS_INTERVAL) {
            Ok(Event::Failed(shard, error)) => {
                error!(shard, "{error}");
                anyhow::bail!("shard {shard} failed: {error}");
            }
            Ok(Event::Finished) => break,
            Ok(Event::SnapshotPart { marker_offset, shard, first_kept_segment }) => {
                let parts = snapshot_parts.entry(marker_offset).or_default();
                parts.push((shard, first_kept_segment));
                if parts.len() == n + 1 {
                    commit_snapshot(&layout, shard_count, marker_offset, parts)?;
                    snapshot_parts.retain(|m, _| *m > marker_offset);
                }
            }
            Ok(Event::Started) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => anyhow::bail!("every shard stopped"),
        }
    }
    shared.stop.store(true, Ordering::Release);
    let end = shared.durable_end();
    write_status(&layout, &status("stopped"));
    info!(durable_watermark = ?end.checked_sub(1), elapsed_ms = started.elapsed().as_millis() as u64, "every record is durable; stopping");
    // Everything is durable; the executors hold nothing that needs a clean shutdown.
    std::process::exit(0);
}

/// Every part of the snapshot at `marker_offset` is durable: commit the manifest, then
/// delete what it covers (spec: Ledger.SnapshotCommitted, Ledger.SegmentsBelowSnapshotDeleted).
fn commit_snapshot(
    layout: &Layout,
    shard_count: u16,
    marker_offset: u64,
    parts: &[(Option<ShardId>, u64)],
) -> anyhow::Result<()> {
    let manifest = ledger_io::Manifest { partition: 0, marker_offset, shard_count };
    ledger_io::write_atomically(&layout.manifest_path(), &serde_json::to_vec_pretty(&manifest)?)
        .context("writing the snapshot manifest")?;
    let first_kept: Vec<(ShardId, u64)> =
        parts.iter().filter_map(|(shard, first)| shard.map(|s| (s, *first))).collect();
    ledger_io::delete_below_snapshot(layout, &first_kept, &manifest).context("deleting segments below the snapshot")?;
    info!(marker_offset, "snapshot committed; older segments deleted");
    Ok(())
}

struct ShardContext {
    shard: ShardId,
    shard_count: u16,
    layout: Layout,
    arbiter: Arbiter<D>,
    outbound: Vec<Option<SharedSender<Wire>>>,
    inbound: Vec<SharedReceiver<Wire>>,
    usher: Option<Usher<D>>,
    log: Option<LocalLog>,
    /// On the reader shard (when it is not the Usher's): where decoded batches go.
    decoded_tx: Option<SharedSender<Vec<Decoded<D>>>>,
    /// On the Usher's shard (when another shard reads): where they come from.
    decoded_rx: Option<SharedReceiver<Vec<Decoded<D>>>>,
    resume: u64,
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
    stop_at_end: bool,
    snapshot_every: u64,
}

/// A snapshot this shard owes: its entities as of the marker, and where the marker's
/// batch-end record ends in the pending bytes.
struct PendingSnapshot {
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
                }
                ShardEffect::BatchDone { partition, last_offset, usher, snapshot } => {
                    // spec: Ledger.BatchEndMarkerAppended
                    let record =
                        LedgerRecord::<D>::BatchEnd { partition, last_offset, usher, snapshot: snapshot.is_some() };
                    encode_record(&record, &mut self.pending_bytes).expect("a batch journal fits the record bound");
                    self.pending_marks.push((partition, last_offset));
                    if let Some(entities) = snapshot {
                        self.pending_snapshots.push(PendingSnapshot {
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
    ledger_io::settle_io_probe(&context.layout, shard).await.context("probing DMA IO")?;
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
    glommio::spawn_local(async move {
        let mut bytes = Vec::with_capacity(1 << 20);
        let mut marks = Vec::new();
        let mut snapshots = Vec::new();
        while doorbell_rx.recv().await.is_some() {
            {
                let mut st = ledger_state.borrow_mut();
                st.doorbell_rung = false;
                std::mem::swap(&mut bytes, &mut st.pending_bytes);
                std::mem::swap(&mut marks, &mut st.pending_marks);
                std::mem::swap(&mut snapshots, &mut st.pending_snapshots);
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
                    let path = layout.shard_part_path(0, pending.marker_offset, shard);
                    std::fs::create_dir_all(path.parent().expect("parts live in a directory"))?;
                    ledger_io::write_part(&path, &pending.entities)?;
                    writer.roll().await?;
                    let part = Event::SnapshotPart {
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
            // spec: Ledger.ShardDurableWatermark — only the local log's partition 0 today.
            if let Some(&(_, last_offset)) = marks.iter().rev().find(|(partition, _)| *partition == 0) {
                shared.durable[shard as usize].store(last_offset + 1, Ordering::Release);
            }
            marks.clear();
        }
    })
    .detach();

    let _ = context.events.send(Event::Started);

    if let (Some(log), Some(tx)) = (context.log.as_ref(), context.decoded_tx) {
        let reader = log.reader(context.resume).context("opening a reader on the log")?;
        let shared = context.shared.clone();
        let events = context.events.clone();
        glommio::spawn_local(async move {
            if let Err(error) = read_and_decode(reader, tx, shared).await {
                let _ = events.send(Event::Failed(shard, format!("{error:#}")));
            }
        })
        .detach();
    }
    match context.usher {
        Some(usher) => {
            let options = UsherOptions { stop_at_end: context.stop_at_end, snapshot_every: context.snapshot_every };
            let source = match (context.log, context.decoded_rx) {
                (Some(log), _) => {
                    Source::Local(log.reader(usher.next_offset()).context("opening a reader on the log")?)
                }
                (None, Some(rx)) => Source::Remote(rx.connect().await),
                (None, None) => unreachable!("the Usher reads the log or receives it decoded"),
            };
            usher_loop(usher, source, state, context.shared, context.events, context.layout, options).await
        }
        None => {
            // Other shards only react to messages; park until the process exits.
            while !context.shared.stop.load(Ordering::Acquire) {
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
            Ok(())
        }
    }
}

/// Decoded batches in flight from the reader shard to the Usher's.
const DECODED_BATCHES_IN_FLIGHT: usize = 4;

/// Where the Usher's records come from: read here, or read and decoded on another shard.
enum Source {
    Local(crate::local_log::LocalLogReader),
    Remote(glommio::channels::shared_channel::ConnectedReceiver<Vec<Decoded<D>>>),
}

impl Source {
    /// The next batch; empty when the log has nothing new right now.
    async fn next(&mut self, records: &mut Vec<Record>) -> anyhow::Result<Vec<Decoded<D>>> {
        match self {
            Source::Local(reader) => {
                records.clear();
                reader.poll(MAX_BATCH_RECORDS, records).context("reading the log")?;
                Ok(decode(records))
            }
            Source::Remote(rx) => rx.recv().await.context("the reader shard stopped"),
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
/// batch says "nothing new", so the Usher can tell when it has caught up.
async fn read_and_decode(
    mut reader: crate::local_log::LocalLogReader,
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
            glommio::timer::sleep(IDLE_POLL).await;
        }
    }
    Ok(())
}

struct UsherOptions {
    stop_at_end: bool,
    snapshot_every: u64,
}

/// The Usher's IO shell: tail the local log, plan, dispatch.
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
    let mut last_snapshot = usher.next_offset();
    let mut records: Vec<Record> = Vec::with_capacity(MAX_BATCH_RECORDS);
    let home = state.borrow().shard;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        if shared.in_flight.load(Ordering::Relaxed) > MAX_IN_FLIGHT_MESSAGES {
            glommio::timer::sleep(Duration::from_micros(200)).await;
            continue;
        }
        let batch = source.next(&mut records).await?;
        if batch.is_empty() {
            if stop_at_end && shared.durable_end() >= usher.next_offset() {
                let _ = events.send(Event::Finished);
                return Ok(());
            }
            if matches!(source, Source::Local(_)) {
                glommio::timer::sleep(IDLE_POLL).await;
            }
            continue;
        }
        // spec: Ledger.SnapshotPlanned
        if snapshot_every > 0 && usher.next_offset() - last_snapshot >= snapshot_every {
            usher.request_snapshot();
            last_snapshot = usher.next_offset();
        }
        let plan = match usher.plan_decoded(batch) {
            Ok(plan) => plan,
            Err(halted) => anyhow::bail!("the Usher halted: {halted}"),
        };
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
            let path = layout.usher_part_path(0, marker_offset);
            std::fs::create_dir_all(path.parent().expect("parts live in a directory"))?;
            ledger_io::write_part(&path, snapshot).context("writing the Usher's snapshot part")?;
            let _ = events.send(Event::SnapshotPart { marker_offset, shard: None, first_kept_segment: 0 });
        }
        shared.next_offset.store(usher.next_offset(), Ordering::Release);
        if let Some(halted) = plan.halted {
            // spec: Versioning.UnknownVersionHalts — durable up to the record before it.
            anyhow::bail!("the Usher halted: {halted}");
        }
        glommio::executor().yield_if_needed().await;
    }
}
