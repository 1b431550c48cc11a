//! The Gateway's appender: one thread that appends commands to the input log for every
//! shard's handlers, and hands each request its (partition, offset).
//!
//! Why a thread: appending to the local log is blocking std IO with several fsyncs, and a
//! Kafka producer is driven by polling; neither may run on a shard's executor. Why one
//! thread: whatever queued while one append was syncing goes out as the next batch, so the
//! log's fsyncs are shared by every request waiting (group commit, spec: Gateway.MovementAppended).
//! Replies travel on oneshot channels; glommio wakes the waiting task from this thread.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
use tracing::{error, info, warn};

use crate::log::kafka::delivered_offsets::{Delivered, DeliveredOffsets, Why};
use crate::log::kafka::producer::{idempotent_producer, ProducerRole};
use crate::log::kafka::KafkaConfig;
use crate::log::local::LocalLog;
use crate::pacing::Pacer;

/// Commands appended as one local-log batch at most.
const MAX_APPEND_BATCH: usize = 1_024;
/// The bytes librdkafka may hold for the Gateway (its default is 1 GiB): records are kept
/// through an outage, so this is what an outage costs at most.
const KAFKA_QUEUE_KBYTES: usize = 64 * 1024;
/// Appends to the local log start at most this often: each is a lock and a sync (two on a
/// log not yet upgraded to format 3), and the requests that arrive meanwhile join the next.
const LOCAL_APPEND_INTERVAL: Duration = Duration::from_millis(4);
/// What the process exits with when librdkafka gives up on the idempotent producer.
const EXIT_PRODUCER_FATAL: i32 = 70;

/// The 503 detail when the broker acknowledged a record without its offset.
const OFFSET_UNKNOWN: &str = "the command is in the log and is applied once, but the broker acknowledged it \
    without a usable offset; retry with the same Idempotency-Key to learn the outcome";

/// Where a command went, or why it did not (spec: Gateway.LogUnavailable).
pub type AppendReply = Result<(u32, u64), String>;

pub struct AppendRequest {
    /// The idempotency key: with Kafka, the record key, so every retry reaches the same
    /// partition (spec: KafkaLog.AppendIdempotent).
    pub key: String,
    pub payload: Vec<u8>,
    pub reply: oneshot::Sender<AppendReply>,
}

/// The handlers' side of the appender.
pub struct Appender {
    requests: mpsc::SyncSender<AppendRequest>,
    /// Per partition, one past the highest offset this appender was given (Kafka: the only
    /// log end known without asking the broker).
    pub appended_end: Arc<Vec<AtomicU64>>,
    /// The local log's syncs made by this appender (none with Kafka).
    pub syncs: Arc<AtomicU64>,
}

/// Why a request could not even be queued.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the append queue is full")]
    Full,
    #[error("the appender stopped")]
    Stopped,
}

impl Appender {
    pub fn submit(&self, request: AppendRequest) -> Result<(), QueueError> {
        self.requests.try_send(request).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => QueueError::Full,
            mpsc::TrySendError::Disconnected(_) => QueueError::Stopped,
        })
    }
}

/// Where the appender writes.
pub enum Target {
    Local(PathBuf),
    Kafka(KafkaConfig),
}

/// Starts the appender thread. `queue_bound` bounds the requests waiting to be appended.
///
/// With Kafka the producer never times a record out: the request's deadline is the
/// Gateway's own timer (routes.rs), and a record librdkafka gave up on may still have been
/// written, so dropping it would not make the 503 truer. It would make the idempotent
/// producer bump its epoch locally, which tansu 0.6.0 cannot take (it panics and refuses
/// every later record). spec: Gateway.CommandProducerKeepsRecords
pub fn spawn(target: Target, partitions: u32, queue_bound: usize) -> anyhow::Result<Appender> {
    let (requests, rx) = mpsc::sync_channel::<AppendRequest>(queue_bound);
    let appended_end: Arc<Vec<AtomicU64>> = Arc::new((0..partitions).map(|_| AtomicU64::new(0)).collect());
    let ends = appended_end.clone();
    let mut syncs = Arc::default();
    match target {
        Target::Local(dir) => {
            let log = LocalLog::open(&dir)?;
            syncs = log.sync_counter();
            std::thread::Builder::new().name("gateway-append".into()).spawn(move || append_local(log, rx, ends))?;
        }
        Target::Kafka(config) => {
            let role = ProducerRole::Commands { queue_records: queue_bound, queue_kbytes: KAFKA_QUEUE_KBYTES };
            let producer: BaseProducer<Deliveries> =
                idempotent_producer(&config.brokers, role).create_with_context(Deliveries {
                    ends: ends.clone(),
                    held: Mutex::new(HashSet::new()),
                    offsets: Mutex::new(DeliveredOffsets::new(partitions)),
                })?;
            let topic = config.commands_topic.clone();
            std::thread::Builder::new()
                .name("gateway-produce".into())
                .spawn(move || append_kafka(producer, topic, rx, queue_bound))?;
        }
    }
    Ok(Appender { requests, appended_end, syncs })
}

fn append_local(log: LocalLog, rx: mpsc::Receiver<AppendRequest>, ends: Arc<Vec<AtomicU64>>) {
    info!("the Gateway appends to the local log");
    let mut batch: Vec<AppendRequest> = Vec::with_capacity(MAX_APPEND_BATCH);
    let mut payloads: Vec<Vec<u8>> = Vec::with_capacity(MAX_APPEND_BATCH);
    let mut pacer = Pacer::new(LOCAL_APPEND_INTERVAL);
    while let Ok(first) = rx.recv() {
        // spec: LocalLog.AppendsPaced — requests that arrive meanwhile share the next commit.
        std::thread::sleep(pacer.wait(Instant::now()));
        pacer.started(Instant::now());
        batch.push(first);
        while batch.len() < MAX_APPEND_BATCH {
            match rx.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        payloads.extend(batch.iter_mut().map(|r| std::mem::take(&mut r.payload)));
        let result = log.append(&payloads);
        payloads.clear();
        match result {
            Ok(range) => {
                assert_eq!(range.end - range.start, batch.len() as u64, "one offset per appended command");
                ends[0].fetch_max(range.end, Ordering::Relaxed);
                for (request, offset) in batch.drain(..).zip(range) {
                    let _ = request.reply.send(Ok((0, offset)));
                }
            }
            Err(e) => {
                error!("the Gateway could not append to the local log: {e}");
                for request in batch.drain(..) {
                    let _ = request.reply.send(Err(format!("appending to the log: {e}")));
                }
            }
        }
    }
}

/// Hands each delivery report to its request.
struct Deliveries {
    ends: Arc<Vec<AtomicU64>>,
    /// The keys of the records librdkafka holds: a retry of one of them is refused rather
    /// than queued as a second copy (spec: Gateway.CommandProducerKeepsRecords). Bounded by
    /// the producer queue. Only the appender thread touches it (send, and the delivery
    /// callbacks inside its poll); the lock is never contended.
    held: Mutex<HashSet<String>>,
    /// Which reported offsets are real (spec: KafkaLog.DeliveredOffsetUnknown). Only the
    /// delivery callbacks touch it, inside the appender thread's poll.
    offsets: Mutex<DeliveredOffsets>,
}

impl ClientContext for Deliveries {}

/// A record's request: its key (to release on delivery) and its reply.
struct Held {
    key: String,
    reply: oneshot::Sender<AppendReply>,
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<Held>;

    fn delivery(&self, result: &DeliveryResult<'_>, held: Self::DeliveryOpaque) {
        let Held { key, reply } = *held;
        let released = self.held.lock().expect("held keys lock").remove(&key);
        assert!(released, "a delivered record's key was held");
        let answer = match result {
            Ok(message) => {
                let partition = message.partition() as u32;
                let reported = message.offset();
                match self.offsets.lock().expect("offsets lock").delivered(partition, reported) {
                    Delivered::At(offset) => {
                        if let Some(end) = self.ends.get(partition as usize) {
                            end.fetch_max(offset + 1, Ordering::Relaxed);
                        }
                        Ok((partition, offset))
                    }
                    // spec: Gateway.LogUnavailable — never answer from another command's offset.
                    Delivered::Unknown(why) => {
                        match why {
                            Why::NoOffset => warn!(partition, %key, reported, "a command was acknowledged \
                                without its offset; answered 503 (a retry learns the outcome)"),
                            Why::InventedRun => {}
                            Why::BelowRealEnd { real_end } => warn!(partition, %key, reported, real_end,
                                "a command was acknowledged at an offset below one already given: the \
                                broker's log went back; answered 503"),
                        }
                        Err(OFFSET_UNKNOWN.to_string())
                    }
                }
            }
            Err((error, _)) => Err(format!("the broker refused the command: {error}")),
        };
        let _ = reply.send(answer);
    }
}

fn append_kafka(
    producer: BaseProducer<Deliveries>,
    topic: String,
    rx: mpsc::Receiver<AppendRequest>,
    queue_bound: usize,
) {
    info!(%topic, "the Gateway produces to Kafka");
    loop {
        match rx.recv_timeout(Duration::from_millis(1)) {
            Ok(request) => {
                let newly_held = {
                    let mut held = producer.context().held.lock().expect("held keys lock");
                    assert!(held.len() <= queue_bound, "held keys are bounded by the producer queue");
                    held.insert(request.key.clone())
                };
                if !newly_held {
                    let _ = request.reply.send(Err("a record with this Idempotency-Key is still waiting for the \
                         broker and may yet be applied; retry later with the same key to learn the outcome"
                        .to_string()));
                    continue;
                }
                let key = request.key;
                let record =
                    BaseRecord::with_opaque_to(&topic, Box::new(Held { key: key.clone(), reply: request.reply }))
                        .key(key.as_bytes())
                        .payload(&request.payload);
                if let Err((error, record)) = producer.send(record) {
                    let message = match error {
                        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                            "the producer queue is full".to_string()
                        }
                        other => other.to_string(),
                    };
                    let Held { key, reply } = *record.delivery_opaque;
                    producer.context().held.lock().expect("held keys lock").remove(&key);
                    let _ = reply.send(Err(message));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = producer.flush(Duration::from_secs(5));
                return;
            }
        }
        producer.poll(Duration::ZERO);
        // spec: Gateway.CommandProducerKeepsRecords — librdkafka gave up on the idempotent
        // producer: every later record would fail while /healthz says ready. Stop; the
        // supervisor restarts the instance with a new producer, and recovery is crash-safe.
        if let Some((code, reason)) = producer.client().fatal_error() {
            error!(?code, %reason, "the Gateway's Kafka producer failed fatally; stopping the instance");
            std::process::exit(EXIT_PRODUCER_FATAL);
        }
    }
}
