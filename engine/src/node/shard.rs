//! One shard on its own pinned executor: the [`ShardCore`] the Usher and the inbound
//! channels feed, the sender tasks to the other shards, the Ledger task doing group
//! commit, the Gateway's listener, and the Ushers whose home this shard is.
//!
//! - Receiver tasks (one per inbound channel) hand messages to the core.
//! - Sender tasks (one per outbound channel) drain a local unbounded queue. Receiver tasks
//!   never await a bounded send, so two shards with full channels towards each other
//!   cannot deadlock; the Ushers' backpressure bounds what is in flight.
//! - The Ledger task: whatever records accumulated since its last commit are written and
//!   made durable with one fdatasync (group commit); only then do the shard's durable
//!   watermarks advance and its outputs go to the Clerk (the core's [`Unsynced`] type
//!   hands them out only after the sync).

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Context;
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::channels::shared_channel::{ConnectedSender, SharedReceiver, SharedSender};
use tracing::warn;
use tribunal_shards::arbiter::Arbiter;
use tribunal_shards::router::ShardId;
use tribunal_shards::shard_core::{LedgerStore, ShardCore, SnapshotPoint, Unsynced};
use tribunal_shards::usher::Usher;

use super::shard_state::ShardState;
use super::shared::{Event, Shared};
use super::usher::{self, ReaderTask, SourceSpec, UsherOptions};
use super::{Wire, D};
use crate::clerk::ClerkStarter;
use crate::gateway::{self, GatewayShared};
use crate::pacing::Pacer;
use crate::publish::DurableOutput;
use crate::storage::{self, Layout, SegmentWriter};

/// Group commits of a shard's Ledger start at most this often: each is a write and an
/// fdatasync, and the records appended meanwhile join the next one.
const COMMIT_INTERVAL: Duration = Duration::from_millis(4);

/// Everything a shard's executor starts with.
pub(super) struct ShardContext {
    pub shard: ShardId,
    pub shard_count: u16,
    pub layout: Layout,
    pub arbiter: Arbiter<D>,
    pub outbound: Vec<Option<SharedSender<Wire>>>,
    pub inbound: Vec<SharedReceiver<Wire>>,
    /// The Ushers of the partitions whose home this shard is, and where each one reads.
    pub ushers: Vec<(Usher<D>, SourceSpec)>,
    /// On the local log's reader shard, when it is not the Usher's: the reader, and where
    /// decoded batches go.
    pub reader: Option<ReaderTask>,
    /// Where outputs go once durable: the Clerk (spec: Clerk.OwnCopyRecorded).
    pub outputs: SharedSender<Vec<DurableOutput>>,
    pub shared: Arc<Shared>,
    pub events: mpsc::Sender<Event>,
    pub usher_options: UsherOptions,
    /// The Gateway, and this shard's listener (bound and listening).
    pub gateway: Option<(Arc<GatewayShared>, std::net::TcpListener)>,
    /// On the last shard: the Clerk, which runs on this executor.
    pub clerk: Option<ClerkStarter>,
}

/// The shard's Ledger: the DMA segment writer, and where snapshot parts go.
struct ShardLedger {
    writer: SegmentWriter,
    layout: Layout,
    shard: ShardId,
    events: mpsc::Sender<Event>,
}

impl LedgerStore<D> for ShardLedger {
    type Error = io::Error;

    async fn write_and_sync(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.commit(bytes).await
    }

    /// spec: Ledger.SnapshotAtMarker — the part, then a new segment right after the marker.
    async fn snapshot(&mut self, point: SnapshotPoint<D>) -> io::Result<()> {
        let path = self.layout.shard_part_path(point.partition, point.marker_offset, self.shard);
        storage::create_part_dir(&path)?;
        storage::write_part(&path, &point.entities)?;
        self.writer.roll().await?;
        let part = Event::SnapshotPart {
            partition: point.partition,
            marker_offset: point.marker_offset,
            shard: Some(self.shard),
            first_kept_segment: self.writer.segment(),
        };
        let _ = self.events.send(part);
        Ok(())
    }
}

pub(super) async fn shard_main(context: ShardContext) -> anyhow::Result<()> {
    let shard = context.shard;
    storage::settle_io_probe(&context.layout, shard).await.context("probing DMA IO")?;
    let writer = SegmentWriter::open(&context.layout, shard).await.context("opening the Ledger segment")?;
    let (doorbell, doorbell_rx) = local_channel::new_unbounded::<()>();
    let outbound = spawn_senders(shard, context.outbound, &context.shared);
    let core = ShardCore::new(context.arbiter, context.shard_count);
    let state = Rc::new(RefCell::new(ShardState::new(core, outbound, doorbell, context.shared.clone())));
    spawn_receivers(context.inbound, &state);
    let ledger = ShardLedger { writer, layout: context.layout.clone(), shard, events: context.events.clone() };
    glommio::spawn_local(ledger_task(ledger, doorbell_rx, state.clone(), context.shared.clone(), context.outputs))
        .detach();
    // The Clerk before the Gateway: a federation address in use stops the start-up.
    if let Some(clerk) = context.clerk {
        clerk.start().context("starting the Clerk")?;
    }
    // spec: Gateway — every shard accepts on its own listener (Gateway.SoleListener).
    if let Some((gateway, listener)) = context.gateway {
        glommio::spawn_local(gateway::serve(gateway, gateway::adopt(listener), shard)).detach();
    }
    let _ = context.events.send(Event::Started);
    if let Some(reader) = context.reader {
        let stop_at_end = context.usher_options.stop_at_end;
        usher::spawn_reader(reader, shard, context.shared.clone(), context.events.clone(), stop_at_end);
    }
    let tasks = usher::spawn_ushers(
        context.ushers,
        &state,
        &context.shared,
        &context.events,
        &context.layout,
        context.usher_options,
    )
    .await;
    for task in tasks {
        task.await;
    }
    // The shard now only reacts to messages and connections, until the process exits.
    futures_lite::future::pending::<()>().await;
    Ok(())
}

/// One sender task per other shard, draining the local queue the core's wires go to.
/// Each channel connects in its own task: `connect` waits for the other end, and the other
/// shard connects its ends in its own order.
fn spawn_senders(
    shard: ShardId,
    outbound: Vec<Option<SharedSender<Wire>>>,
    shared: &Arc<Shared>,
) -> Vec<Option<LocalSender<Wire>>> {
    let mut queues = Vec::with_capacity(outbound.len());
    for (to, sender) in outbound.into_iter().enumerate() {
        let Some(sender) = sender else {
            queues.push(None);
            continue;
        };
        let (queue, queue_rx) = local_channel::new_unbounded::<Wire>();
        queues.push(Some(queue));
        let shared = shared.clone();
        glommio::spawn_local(async move {
            let connected: ConnectedSender<Wire> = sender.connect().await;
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
    queues
}

/// One receiver task per inbound channel: each wire's messages go to the core in order.
fn spawn_receivers(inbound: Vec<SharedReceiver<Wire>>, state: &Rc<RefCell<ShardState>>) {
    for receiver in inbound {
        let state = state.clone();
        glommio::spawn_local(async move {
            let receiver = receiver.connect().await;
            while let Some(wire) = receiver.recv().await {
                let mut st = state.borrow_mut();
                let home = st.shard();
                for message in wire {
                    st.dispatch(home, message);
                }
                st.flush();
            }
        })
        .detach();
    }
}

/// Group commit (spec: Ledger.GroupCommitAtBatchEnd, Ledger.RecordDurableAfterSync): at
/// each ring, everything the core appended since the last commit is made durable, then
/// the durable watermarks advance and the outputs go to the Clerk.
async fn ledger_task(
    mut ledger: ShardLedger,
    doorbell_rx: LocalReceiver<()>,
    state: Rc<RefCell<ShardState>>,
    shared: Arc<Shared>,
    outputs: SharedSender<Vec<DurableOutput>>,
) {
    let outputs_tx = outputs.connect().await;
    let shard = ledger.shard;
    let mut pacer = Pacer::new(COMMIT_INTERVAL);
    while doorbell_rx.recv().await.is_some() {
        // spec: Ledger.GroupCommitPaced — what is appended meanwhile joins this commit.
        let wait = pacer.wait(Instant::now());
        if !wait.is_zero() {
            glommio::timer::sleep(wait).await;
        }
        pacer.started(Instant::now());
        let commit: Unsynced<D> = state.borrow_mut().take_commit();
        if commit.is_empty() {
            continue;
        }
        let durable = match commit.persist(&mut ledger).await {
            Ok(durable) => durable,
            Err(e) => {
                let _ = ledger.events.send(Event::Failed(shard, format!("Ledger write failed: {e}")));
                return;
            }
        };
        state.borrow_mut().core.recycle(durable.buffer);
        shared.syncs[shard as usize].store(ledger.writer.syncs, Ordering::Relaxed);
        // spec: Ledger.ShardDurableWatermark — per partition; markers are in order.
        for (partition, last_offset) in durable.marks {
            shared.set_durable(shard, partition, last_offset + 1);
        }
        // spec: Clerk.OwnCopyRecorded — only durable outputs are compared.
        let batch: Vec<DurableOutput> = durable
            .outputs
            .into_iter()
            .map(|o| DurableOutput { partition: o.partition, offset: o.offset, bytes: o.bytes })
            .collect();
        if !batch.is_empty() && outputs_tx.send(batch).await.is_err() {
            let _ = ledger.events.send(Event::Failed(shard, "the Clerk is gone".into()));
            return;
        }
    }
}
