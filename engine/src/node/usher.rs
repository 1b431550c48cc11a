//! The Usher's IO shell: where each partition's records come from (the local log, read
//! here or on the reader shard, or a Kafka feed), the backpressure that holds reading
//! back, and the loop that plans each batch and dispatches it to the shards
//! (spec: specs/usher.allium; the decisions are `tribunal_shards::usher` and
//! `tribunal_shards::snapshot_cadence`).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::Context;
use glommio::channels::shared_channel::{ConnectedReceiver, SharedReceiver, SharedSender};

use tribunal_shards::envelope::Envelope;
use tribunal_shards::snapshot_cadence::SnapshotCadence;
use tribunal_shards::usher::{BatchPlan, Decoded, Record, Usher};

use super::shard_state::ShardState;
use super::shared::{Event, Shared};
use super::{D, MAX_BATCH_RECORDS, MAX_IN_FLIGHT_MESSAGES};
use crate::log::doorbell::{Door, DoorKey};
use crate::log::kafka::Feed;
use crate::log::local::watch::{self, TailWait, TailWaitKey};
use crate::log::local::LocalLogReader;
use crate::storage::{self, Layout};

/// How long an Usher waits before looking again while backpressure holds it.
const BACKPRESSURE_WAIT: Duration = Duration::from_micros(200);
/// With `--stop-at-end`, how often a reader at the log's end looks whether what it read
/// is durable yet: nothing rings when it becomes so, and an idle wait is up to a second.
const SETTLE_WAIT: Duration = Duration::from_millis(2);

/// Where an Usher will read, as handed to its shard.
pub(super) enum SourceSpec {
    /// The local log, read and decoded on the Usher's own shard.
    Local(Box<LocalLogReader>, TailWaitKey),
    /// The local log, read and decoded on the reader shard.
    Remote(SharedReceiver<Vec<Decoded<D>>>),
    /// A Kafka partition, fed by the source thread (spec: KafkaLog.BridgeNeverBlocksExecutor).
    Kafka(mpsc::Receiver<Feed>, DoorKey),
}

/// The reader shard's job: its reader, how it waits when the log is idle, and the
/// channel to the Usher's shard.
pub(super) type ReaderTask = (LocalLogReader, TailWaitKey, SharedSender<Vec<Decoded<D>>>);

/// Where the Usher's records come from.
enum Source {
    /// Woken by the log's watch when idle (spec: LocalLog.AppendWakesReaders).
    Local(Box<LocalLogReader>, Box<TailWait>),
    Remote(ConnectedReceiver<Vec<Decoded<D>>>),
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
    mut reader: LocalLogReader,
    mut tail: TailWait,
    tx: SharedSender<Vec<Decoded<D>>>,
    shared: Arc<Shared>,
    stop_at_end: bool,
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
            // The local log has one partition.
            if stop_at_end && !shared.reads_durable(0) {
                glommio::timer::sleep(SETTLE_WAIT).await;
            } else {
                tail.after_empty_poll().await;
            }
        } else {
            tail.found_records();
        }
    }
    Ok(())
}

/// How the local log's reader waits when the log is idle (spec: LocalLog.AppendWakesReaders).
pub(super) fn watch_local_log(dir: &std::path::Path) -> anyhow::Result<TailWaitKey> {
    watch::tail_wait(dir).context("making the local log's doorbell")
}

#[derive(Clone, Copy)]
pub(super) struct UsherOptions {
    pub stop_at_end: bool,
    pub snapshot_every: u64,
}

/// On the reader shard: tails the local log and feeds the Usher's shard.
pub(super) fn spawn_reader(
    reader: ReaderTask,
    shard: u16,
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
    stop_at_end: bool,
) {
    let (reader, tail, tx) = reader;
    glommio::spawn_local(async move {
        if let Err(error) = read_and_decode(reader, tail.open(), tx, shared, stop_at_end).await {
            let _ = events.send(Event::Failed(shard, format!("{error:#}")));
        }
    })
    .detach();
}

/// Starts the Usher of every partition whose home this shard is.
pub(super) async fn spawn_ushers(
    ushers: Vec<(Usher<D>, SourceSpec)>,
    state: &Rc<RefCell<ShardState>>,
    shared: &Arc<Shared>,
    events: &mpsc::Sender<Event>,
    layout: &Layout,
    options: UsherOptions,
) -> Vec<glommio::Task<()>> {
    let shard = state.borrow().shard();
    let mut tasks = Vec::new();
    for (usher, spec) in ushers {
        let source = match spec {
            SourceSpec::Local(reader, tail) => Source::Local(reader, Box::new(tail.open())),
            SourceSpec::Remote(rx) => Source::Remote(rx.connect().await),
            SourceSpec::Kafka(rx, door) => Source::Kafka { rx, at_end: false, door: door.open() },
        };
        let shell = UsherShell {
            usher,
            source,
            state: state.clone(),
            shared: shared.clone(),
            events: events.clone(),
            layout: layout.clone(),
            options,
        };
        let events = events.clone();
        tasks.push(glommio::spawn_local(async move {
            if let Err(error) = shell.run().await {
                let _ = events.send(Event::Failed(shard, format!("{error:#}")));
            }
        }));
    }
    tasks
}

/// An Usher's IO shell: take batches from its source, plan, dispatch.
struct UsherShell {
    usher: Usher<D>,
    source: Source,
    state: Rc<RefCell<ShardState>>,
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
    layout: Layout,
    options: UsherOptions,
}

impl UsherShell {
    async fn run(mut self) -> anyhow::Result<()> {
        let partition = self.usher.partition();
        let covered_end = self.shared.snapshot_covered_end[partition as usize].load(Ordering::Acquire);
        let mut cadence =
            SnapshotCadence::new(self.options.snapshot_every, MAX_BATCH_RECORDS as u64, covered_end.checked_sub(1));
        let mut records: Vec<Record> = Vec::with_capacity(MAX_BATCH_RECORDS);
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            if self.held_back(&mut cadence) {
                glommio::timer::sleep(BACKPRESSURE_WAIT).await;
                continue;
            }
            let batch = self.source.next(&mut records).await?;
            if batch.is_empty() {
                if self.finished() {
                    let _ = self.events.send(Event::Finished(partition));
                    return Ok(());
                }
                if self.settling() {
                    glommio::timer::sleep(SETTLE_WAIT).await;
                } else {
                    self.source.idle().await;
                }
                continue;
            }
            self.plan_and_dispatch(batch, &mut cadence)?;
            glommio::executor().yield_if_needed().await;
        }
    }

    /// spec: Clerk.CopyWindowBackpressure, Publisher.BoundedBacklog — own outputs always
    /// fit the Clerk's ring, and certified outputs wait for publication in bounded memory;
    /// spec: Ledger.PlanningWaitsForSnapshot — bounds what a recovery replays.
    fn held_back(&self, cadence: &mut SnapshotCadence) -> bool {
        let (partition, shared) = (self.usher.partition(), &self.shared);
        if let Some(marker) = shared.snapshot_covered_end[partition as usize].load(Ordering::Acquire).checked_sub(1) {
            cadence.committed(marker);
        }
        let gate = Backpressure {
            snapshot_pending: !cadence.may_plan(),
            messages_in_flight: shared.in_flight.load(Ordering::Relaxed),
            next_offset: self.usher.next_offset(),
            certified_end: shared.clerk.certified_end(partition),
            copy_window: shared.copy_window,
            backlog_full: shared.clerk.backlog_full.load(Ordering::Relaxed),
        };
        gate.holds()
    }

    /// `--stop-at-end`: the input is at its end and what was read is not durable yet, so
    /// no append will wake the Usher when it is.
    fn settling(&self) -> bool {
        self.options.stop_at_end && self.source.at_end() && !self.shared.reads_durable(self.usher.partition())
    }

    /// `--stop-at-end`: the input is at its end and everything read is durable.
    fn finished(&self) -> bool {
        self.options.stop_at_end && self.source.at_end() && self.shared.reads_durable(self.usher.partition())
    }

    /// Plans one batch (with a snapshot when due) and hands its messages to the shards.
    fn plan_and_dispatch(&mut self, batch: Vec<Decoded<D>>, cadence: &mut SnapshotCadence) -> anyhow::Result<()> {
        let partition = self.usher.partition();
        if self.snapshot_wanted(cadence.snapshot_due(self.usher.next_offset(), batch.len() as u64)) {
            self.usher.request_snapshot();
        }
        let plan = match self.usher.plan_decoded(batch) {
            Ok(plan) => plan,
            Err(halted) => anyhow::bail!("the Usher of partition {partition} halted: {halted}"),
        };
        if plan.snapshot.is_some() {
            cadence.requested(self.usher.next_offset() - 1);
        }
        let BatchPlan { messages, snapshot, last_offset, halted, .. } = plan;
        {
            let mut st = self.state.borrow_mut();
            for (to, message) in messages {
                st.dispatch(to, message);
            }
            st.flush();
        }
        if let (Some(snapshot), Some(marker_offset)) = (&snapshot, last_offset) {
            let path = self.layout.usher_part_path(partition, marker_offset);
            storage::create_part_dir(&path)?;
            storage::write_part(&path, snapshot).context("writing the Usher's snapshot part")?;
            let part = Event::SnapshotPart { partition, marker_offset, shard: None, first_kept_segment: 0 };
            let _ = self.events.send(part);
        }
        self.shared.next_offset[partition as usize].store(self.usher.next_offset(), Ordering::Release);
        if let Some(halted) = halted {
            // spec: Versioning.UnknownVersionHalts — durable up to the record before it.
            anyhow::bail!("the Usher of partition {partition} halted: {halted}");
        }
        Ok(())
    }

    /// spec: Ledger.SnapshotDue, Ledger.SnapshotPlanned — at the end of the batch that
    /// brings the records since the committed snapshot to the threshold. Every other
    /// partition is asked to snapshot at its next batch too: a segment is deleted only
    /// once every partition's snapshot covers it, so a partition with little traffic
    /// would otherwise hold back deletion for all (spec: Ledger.SegmentsBelowSnapshotDeleted).
    fn snapshot_wanted(&self, own: bool) -> bool {
        let partition = self.usher.partition() as usize;
        if own {
            for (other, wanted) in self.shared.snapshot_wanted.iter().enumerate() {
                if other != partition {
                    wanted.store(true, Ordering::Relaxed);
                }
            }
        }
        // Taken whether or not this batch snapshots anyway: one snapshot answers both.
        let asked = self.shared.snapshot_wanted[partition].swap(false, Ordering::Relaxed);
        own || asked
    }
}

/// What may hold an Usher back before it reads its next batch.
#[derive(Debug, Clone, Copy)]
struct Backpressure {
    /// Its snapshot is not committed yet (spec: Ledger.PlanningWaitsForSnapshot).
    snapshot_pending: bool,
    /// Messages between shards sent and not delivered.
    messages_in_flight: u64,
    next_offset: u64,
    certified_end: u64,
    copy_window: u64,
    /// The Clerk's hand-over buffer is full while someone publishes (spec: Publisher.BoundedBacklog).
    backlog_full: bool,
}

impl Backpressure {
    /// spec: Clerk.CopyWindowBackpressure — a whole batch more must still fit the Clerk's
    /// ring, so own outputs always land in it.
    fn holds(&self) -> bool {
        self.snapshot_pending
            || self.messages_in_flight > MAX_IN_FLIGHT_MESSAGES
            || self.next_offset + MAX_BATCH_RECORDS as u64 > self.certified_end + self.copy_window
            || self.backlog_full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FREE: Backpressure = Backpressure {
        snapshot_pending: false,
        messages_in_flight: 0,
        next_offset: 10_000,
        certified_end: 10_000,
        copy_window: 65_536,
        backlog_full: false,
    };

    #[test]
    fn nothing_holds_an_usher_with_room_everywhere() {
        assert!(!FREE.holds());
    }

    #[test]
    fn a_batch_that_could_pass_the_clerk_s_ring_waits() {
        // spec: Clerk.CopyWindowBackpressure
        let at_edge = Backpressure { next_offset: 10_000 + 65_536 - MAX_BATCH_RECORDS as u64, ..FREE };
        assert!(!at_edge.holds(), "a full batch still fits");
        assert!(Backpressure { next_offset: at_edge.next_offset + 1, ..FREE }.holds());
    }

    #[test]
    fn each_other_reason_holds_it_alone() {
        // spec: Ledger.PlanningWaitsForSnapshot, Publisher.BoundedBacklog
        assert!(Backpressure { snapshot_pending: true, ..FREE }.holds());
        assert!(Backpressure { backlog_full: true, ..FREE }.holds());
        assert!(Backpressure { messages_in_flight: MAX_IN_FLIGHT_MESSAGES + 1, ..FREE }.holds());
        assert!(!Backpressure { messages_in_flight: MAX_IN_FLIGHT_MESSAGES, ..FREE }.holds());
    }
}
