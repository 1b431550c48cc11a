//! The input log and the outputs topic on Kafka (specs/kafka_log.allium, specs/publisher.allium).
//!
//! rdkafka's clients block (poll, flush, metadata), so none of them runs on a glommio
//! executor (spec: KafkaLog.BridgeNeverBlocksExecutor). Two plain threads own them:
//! - the **source** thread owns a `BaseConsumer`. It reads every partition through
//!   `assign()` at offsets taken from the Ledger, decodes each record's JSON envelope,
//!   and feeds one bounded std channel per partition. Usher tasks only `try_recv`, so
//!   a full channel blocks the source thread alone (backpressure), never an executor;
//! - the **publisher** thread owns a `BaseProducer`. The shards hand it outputs after
//!   the fdatasync that made them durable; it orders them per partition (the sans-IO
//!   `Publisher`), renders JSON and produces idempotently, keyed by input offset.
//!
//! A std channel plus a 1 ms idle poll was chosen over a runtime-agnostic future: it
//! needs no cross-thread waker into glommio, and under load the Usher finds a batch
//! waiting on every poll, so the sleep only costs latency when the log is idle.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};
use tribunal_federation::publisher::{Publisher, Release};
use tribunal_shards::envelope::Envelope;
use tribunal_shards::inventory::Inventory;
use tribunal_shards::usher::Decoded;

use crate::clerk_io::PublishBatch;
use crate::delivered_offsets::{Delivered, DeliveredOffsets};
use crate::doorbell::Bell;
use crate::output_json::OutputJson;

pub const DEFAULT_COMMANDS_TOPIC: &str = "tribunal.commands";
pub const DEFAULT_OUTPUTS_TOPIC: &str = "tribunal.outputs";
/// Partitions the engine serves at most (one Usher each).
pub const MAX_PARTITIONS: u32 = 256;
/// Records the source thread gathers per partition before handing a batch over.
const SOURCE_BATCH_RECORDS: usize = 4_096;
/// Batches waiting per partition between the source thread and its Usher.
pub const FEED_BATCHES_IN_FLIGHT: usize = 8;
/// Outputs the producer may hold unacknowledged (the Clerk's hand-over buffer bounds
/// what is certified but unpublished: spec Publisher.BoundedBacklog).
pub const MAX_UNPUBLISHED: u64 = crate::clerk_io::MAX_UNPUBLISHED;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The pause after each consumption error: at most 100 errors a second reach the log.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the Kafka log is and how its topics are made.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: `HOST:PORT[,HOST:PORT..]`.
    pub brokers: String,
    pub commands_topic: String,
    pub outputs_topic: String,
    /// Partitions of topics this instance creates (an existing topic keeps its own).
    pub partitions: u32,
    pub replication_factor: u16,
}

/// `kafka:HOST:PORT[,..]` → the broker list.
pub fn parse_brokers(spec: &str) -> Option<&str> {
    let brokers = spec.strip_prefix("kafka:")?;
    let valid = !brokers.is_empty()
        && brokers
            .split(',')
            .all(|b| b.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()));
    valid.then_some(brokers)
}

pub(crate) fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("client.id", "tribunal")
        // spec: KafkaLog.BrokerLossRetries — librdkafka reconnects with this backoff.
        .set("reconnect.backoff.ms", BACKOFF_MIN.as_millis().to_string())
        .set("reconnect.backoff.max.ms", BACKOFF_MAX.as_millis().to_string())
        .set("log_level", "3");
    config
}

/// What the Kafka threads share with the node.
#[derive(Debug)]
pub struct KafkaShared {
    /// False from a client error until the next record, end of partition or metadata answer.
    pub broker_connected: AtomicBool,
    /// Per partition, one past the last offset the broker acknowledged on the outputs topic.
    pub published_end: Vec<AtomicU64>,
    /// Set by a Kafka thread that cannot go on; the node stops with it.
    pub failure: Mutex<Option<String>>,
    /// The last consumption error, until every partition delivered again (not ready).
    pub source_error: Mutex<Option<String>>,
    pub stop: AtomicBool,
}

impl KafkaShared {
    pub fn new(published_end: &[u64]) -> Self {
        Self {
            broker_connected: AtomicBool::new(true),
            published_end: published_end.iter().map(|&e| AtomicU64::new(e)).collect(),
            failure: Mutex::new(None),
            source_error: Mutex::new(None),
            stop: AtomicBool::new(false),
        }
    }

    fn fail(&self, message: String) {
        error!("{message}");
        let mut failure = self.failure.lock().expect("failure lock");
        failure.get_or_insert(message);
    }

    fn set_source_error(&self, error: Option<String>) {
        if error.is_none() && self.source_error.lock().expect("source error lock").is_some() {
            info!("every partition of the commands topic delivers again; ready");
        }
        *self.source_error.lock().expect("source error lock") = error;
    }

    pub fn source_error(&self) -> Option<String> {
        self.source_error.lock().expect("source error lock").clone()
    }

    pub fn failure(&self) -> Option<String> {
        self.failure.lock().expect("failure lock").clone()
    }

    fn disconnected(&self, error: &KafkaError, reason: &str) {
        if self.broker_connected.swap(false, Ordering::Relaxed) {
            warn!(%error, reason, "lost the Kafka broker; not ready, retrying");
        } else {
            debug!(%error, reason, "Kafka broker still unreachable");
        }
    }

    fn connected(&self) {
        // Load first: this runs per record, and a swap would write the shared line each time.
        if !self.broker_connected.load(Ordering::Relaxed) && !self.broker_connected.swap(true, Ordering::Relaxed) {
            info!("Kafka broker reachable again; ready");
        }
    }

    /// librdkafka's error callback: every error event goes through it, end of partition
    /// and per-partition consumption errors included. Only losing the broker makes the
    /// instance not ready; the source loop handles the rest.
    fn client_error(&self, error: KafkaError, reason: &str) {
        match error {
            KafkaError::Global(
                RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::Resolve
                | RDKafkaErrorCode::BrokerNotAvailable,
            ) => self.disconnected(&error, reason),
            KafkaError::Global(RDKafkaErrorCode::PartitionEOF) => {}
            _ => debug!(%error, reason, "Kafka client error"),
        }
    }

    /// Records a panic or error of a Kafka thread, so that the node stops with it.
    fn run_thread(self: &Arc<Self>, what: &str, body: impl FnOnce() -> anyhow::Result<()>) {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
            Ok(Ok(())) => {}
            Ok(Err(error)) => self.fail(format!("the {what} stopped: {error:#}")),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic");
                self.fail(format!("the {what} panicked: {message}"));
            }
        }
    }
}

/// A client context that turns librdkafka's error callback into readiness.
struct ClientHooks {
    shared: Arc<KafkaShared>,
    /// Publisher only: acknowledgements and final failures from delivery callbacks,
    /// which run inside `poll` on the publisher thread.
    deliveries: Mutex<Vec<Result<(u32, u64), String>>>,
}

impl ClientContext for ClientHooks {
    fn error(&self, error: KafkaError, reason: &str) {
        self.shared.client_error(error, reason);
    }
}

impl ConsumerContext for ClientHooks {}

impl ProducerContext for ClientHooks {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let entry = match result {
            Ok(message) => match message.key().and_then(OutputJson::parse_key) {
                Some(key) => Ok(key),
                None => Err("an acknowledged output has no Tribunal key".to_string()),
            },
            Err((error, message)) => Err(format!(
                "the broker refused output {:?}: {error}",
                message.key().map(String::from_utf8_lossy).unwrap_or_default()
            )),
        };
        self.deliveries.lock().expect("deliveries lock").push(entry);
    }
}

/// Which topics a client needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topics {
    /// `log append`: only the commands topic.
    Commands,
    /// `run`: both.
    CommandsAndOutputs,
}

/// Makes sure the topics exist, creating missing ones (spec: KafkaLog.TopicsEnsured), and
/// returns the commands topic's partition count. While the broker cannot be reached it
/// retries with backoff until `deadline` (forever when None).
pub fn ensure_topics(config: &KafkaConfig, topics: Topics, deadline: Option<Instant>) -> anyhow::Result<u32> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(&config.brokers).create().context("creating the Kafka admin client")?;
    let mut backoff = BACKOFF_MIN;
    let mut created = false;
    loop {
        let metadata = match admin.inner().fetch_metadata(None, METADATA_TIMEOUT) {
            Ok(metadata) => metadata,
            Err(error) => {
                anyhow::ensure!(
                    deadline.is_none_or(|d| Instant::now() < d),
                    "the Kafka broker at {} cannot be reached: {error}",
                    config.brokers
                );
                warn!(brokers = %config.brokers, %error, "waiting for the Kafka broker");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let partitions_of = |name: &str| {
            metadata
                .topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
                .map(|t| t.partitions().len() as u32)
        };
        let commands = partitions_of(&config.commands_topic);
        let outputs = match topics {
            Topics::Commands => commands,
            Topics::CommandsAndOutputs => partitions_of(&config.outputs_topic),
        };
        if let (Some(commands), Some(outputs)) = (commands, outputs) {
            anyhow::ensure!(
                (1..=MAX_PARTITIONS).contains(&commands),
                "topic {} has {commands} partitions; this build serves 1 to {MAX_PARTITIONS}",
                config.commands_topic
            );
            anyhow::ensure!(
                outputs >= commands,
                "topic {} has {outputs} partitions, fewer than the {commands} of {}: the output of input \
                 partition p goes to output partition p",
                config.outputs_topic,
                config.commands_topic
            );
            return Ok(commands);
        }
        if created {
            // Created, but not in the metadata yet.
            anyhow::ensure!(
                deadline.is_none_or(|d| Instant::now() < d),
                "topics were created but do not show in the broker's metadata"
            );
            std::thread::sleep(BACKOFF_MIN);
            continue;
        }
        let partitions = commands.unwrap_or(config.partitions);
        anyhow::ensure!(
            (1..=MAX_PARTITIONS).contains(&partitions),
            "--kafka-partitions {partitions}: must be 1 to {MAX_PARTITIONS}"
        );
        let mut missing = Vec::new();
        for (name, present) in
            [(&config.commands_topic, commands.is_some()), (&config.outputs_topic, outputs.is_some())]
                .into_iter()
                .take(if topics == Topics::Commands { 1 } else { 2 })
        {
            if !present {
                missing.push(
                    NewTopic::new(
                        name,
                        partitions as i32,
                        TopicReplication::Fixed(i32::from(config.replication_factor)),
                    )
                    // Never compacted: offsets stay contiguous (spec: KafkaLog.GapHalts).
                    // Timestamps are the broker's, so no producer's clock moves stream time.
                    .set("cleanup.policy", "delete")
                    .set("message.timestamp.type", "LogAppendTime"),
                );
            }
        }
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = futures_executor::block_on(admin.create_topics(&missing, &options))
            .with_context(|| format!("creating topics on {}", config.brokers))?;
        for result in results {
            match result {
                Ok(name) => info!(topic = %name, partitions, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => anyhow::bail!("cannot create topic {name} on {}: {code}", config.brokers),
            }
        }
        created = true;
    }
}

/// Per partition, one past the input offset of the last output on the outputs topic: how
/// far publication got, whichever instance published (spec: Publisher.ResumeFromOutputTopic).
pub fn read_published_ends(config: &KafkaConfig, partitions: u32) -> anyhow::Result<Vec<u64>> {
    let consumer: BaseConsumer = client_config(&config.brokers)
        .set("group.id", "tribunal-publisher-probe")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // The last record may go with retention between the watermark read and the fetch.
        .set("auto.offset.reset", "error")
        .create()
        .context("creating a Kafka consumer")?;
    let mut ends = Vec::with_capacity(partitions as usize);
    let mut backoff = BACKOFF_MIN;
    for partition in 0..partitions {
        // spec: KafkaLog.BrokerLossRetries — the broker may be away at start: wait for it.
        let end = loop {
            match last_published(&consumer, &config.outputs_topic, partition) {
                Ok(end) => break end,
                Err(error) => {
                    warn!(topic = %config.outputs_topic, partition, "reading the outputs topic: {error:#}; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        };
        ends.push(end);
    }
    Ok(ends)
}

/// One past the input offset of the last output in `partition` of the outputs topic.
fn last_published(consumer: &BaseConsumer, topic: &str, partition: u32) -> anyhow::Result<u64> {
    let (low, high) = consumer.fetch_watermarks(topic, partition as i32, METADATA_TIMEOUT)?;
    if high <= low {
        return Ok(0);
    }
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition as i32, Offset::Offset(high - 1))?;
    consumer.assign(&assignment)?;
    let started = Instant::now();
    let message = loop {
        anyhow::ensure!(started.elapsed() < METADATA_TIMEOUT * 2, "reading the last record timed out");
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) if message.partition() == partition as i32 => break message,
            Some(Err(error)) => anyhow::bail!("{error}"),
            _ => {}
        }
    };
    // The key must be this partition's, and the JSON inside must say the same: a record
    // from a stranger (or a forged key) must not make outputs count as published.
    let key = message.key().and_then(OutputJson::parse_key);
    let body: Option<(u32, u64)> = message
        .payload()
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
        .and_then(|v| Some((u32::try_from(v["partition"].as_u64()?).ok()?, v["offset"].as_u64()?)));
    match (key, body) {
        (Some((p, offset)), Some(inside)) if p == partition && inside == (p, offset) => Ok(offset + 1),
        _ => {
            // Publishing everything the Ledger holds again loses nothing: duplicates are
            // identical and keyed.
            warn!(
                topic,
                partition,
                "the last record of the outputs topic is not a Tribunal output of this partition; \
                 publishing every output the Ledger holds again"
            );
            Ok(0)
        }
    }
}

/// What the source thread hands an Usher.
pub enum Feed {
    Batch(Vec<Decoded<Inventory>>),
    /// The partition's end was reached (spec: KafkaLog.AtEndForStopAtEnd).
    AtEnd,
}

/// Starts the source thread: every partition from `start_offsets[p]`
/// (spec: KafkaLog.EveryInstanceReadsEveryPartition, KafkaLog.StartFromLedger).
pub fn spawn_source(
    config: &KafkaConfig,
    instance: &str,
    start_offsets: Vec<u64>,
    feeds: Vec<FeedSender>,
    shared: Arc<KafkaShared>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    assert_eq!(start_offsets.len(), feeds.len());
    let consumer: BaseConsumer<ClientHooks> = client_config(&config.brokers)
        // Required by the client; no group is joined and nothing is committed.
        .set("group.id", format!("tribunal-{instance}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        // spec: KafkaLog.NoSilentReset
        .set("auto.offset.reset", "error")
        .set("fetch.wait.max.ms", "10")
        .set("queued.min.messages", "200000")
        .create_with_context(ClientHooks { shared: shared.clone(), deliveries: Mutex::new(Vec::new()) })
        .context("creating the Kafka consumer")?;
    let topic = config.commands_topic.clone();
    assign(&consumer, &topic, &start_offsets)?;
    info!(topic = %topic, start_offsets = ?start_offsets, "reading every partition from the Ledger's offsets");
    std::thread::Builder::new()
        .name("kafka-source".into())
        .spawn(move || {
            shared.run_thread("Kafka source", || source_loop(&consumer, &topic, start_offsets, &feeds, &shared))
        })
        .context("starting the Kafka source thread")
}

fn assign(consumer: &BaseConsumer<ClientHooks>, topic: &str, next_offsets: &[u64]) -> anyhow::Result<()> {
    let mut assignment = TopicPartitionList::new();
    for (partition, &offset) in next_offsets.iter().enumerate() {
        assignment.add_partition_offset(topic, partition as i32, Offset::Offset(offset as i64))?;
    }
    consumer.assign(&assignment).context("assigning the commands topic's partitions")
}

/// One partition's channel to its Usher, with the doorbell that wakes the Usher when
/// something was sent (spec: KafkaLog.BridgeNeverBlocksExecutor): the Usher waits on it
/// instead of polling the channel every millisecond.
pub struct FeedSender {
    tx: SyncSender<Feed>,
    bell: Bell,
}

impl FeedSender {
    pub fn new(tx: SyncSender<Feed>, bell: Bell) -> Self {
        Self { tx, bell }
    }

    /// Blocks while the channel is full; an error means the Usher is gone.
    fn send(&self, feed: Feed) -> Result<(), ()> {
        self.tx.send(feed).map_err(|_| ())?;
        self.bell.ring();
        Ok(())
    }
}

/// The source thread's side of the per-partition channels.
struct Feeds<'a> {
    senders: &'a [FeedSender],
    batches: Vec<Vec<Decoded<Inventory>>>,
    /// The partition's Usher is gone (it finished under `--stop-at-end`): drop its records.
    closed: Vec<bool>,
    /// Partitions with a non-empty batch.
    pending: usize,
}

impl Feeds<'_> {
    fn push(&mut self, partition: usize, record: Decoded<Inventory>) {
        if self.closed[partition] {
            return;
        }
        let batch = &mut self.batches[partition];
        if batch.is_empty() {
            self.pending += 1;
            batch.reserve(SOURCE_BATCH_RECORDS);
        }
        batch.push(record);
        if batch.len() >= SOURCE_BATCH_RECORDS {
            self.flush(partition);
        }
    }

    /// Hands the partition's batch to its Usher; blocks while its channel is full.
    fn flush(&mut self, partition: usize) {
        let batch = std::mem::take(&mut self.batches[partition]);
        if batch.is_empty() {
            return;
        }
        self.pending -= 1;
        if !self.closed[partition] && self.senders[partition].send(Feed::Batch(batch)).is_err() {
            self.closed[partition] = true;
        }
    }

    fn flush_all(&mut self) {
        for partition in 0..self.senders.len() {
            self.flush(partition);
        }
    }

    fn at_end(&mut self, partition: usize) {
        self.flush(partition);
        if !self.closed[partition] && self.senders[partition].send(Feed::AtEnd).is_err() {
            self.closed[partition] = true;
        }
    }

    fn all_closed(&self) -> bool {
        self.closed.iter().all(|c| *c)
    }
}

/// After a consumption error: when to assign every partition again, the next delay, and
/// which partitions delivered since. Pure, so that its timing is tested without a broker.
///
/// The delay counts from the first error since the last re-assignment; errors while one is
/// pending do not postpone it. librdkafka queues several errors while a broker is away, and
/// a wait per queued error (the first design) kept instances not ready for about 25 s after
/// the broker came back from a 2 s outage. spec: KafkaLog.NoSilentReset
struct ErrorRecovery {
    backoff: Duration,
    reassign_at: Option<Instant>,
    delivered_since: Option<Vec<bool>>,
}

impl ErrorRecovery {
    fn new() -> Self {
        Self { backoff: BACKOFF_MIN, reassign_at: None, delivered_since: None }
    }

    /// A consumption error: the error lasts until every partition delivers again. Returns
    /// the re-assignment it scheduled, or None if one was already pending.
    fn failed(&mut self, now: Instant, partitions: usize) -> Option<Instant> {
        self.delivered_since = Some(vec![false; partitions]);
        if self.reassign_at.is_some() {
            return None;
        }
        let at = now + self.backoff;
        self.reassign_at = Some(at);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        Some(at)
    }

    /// True once, when the pending re-assignment is due.
    fn reassign_due(&mut self, now: Instant) -> bool {
        match self.reassign_at {
            Some(at) if now >= at => {
                self.reassign_at = None;
                true
            }
            _ => false,
        }
    }

    /// A record or end of partition arrived. True when that ended the error: every
    /// partition has delivered since it; the pending re-assignment is no longer needed.
    fn delivered(&mut self, partition: usize) -> bool {
        let Some(seen) = &mut self.delivered_since else { return false };
        seen[partition] = true;
        if !seen.iter().all(|s| *s) {
            return false;
        }
        self.delivered_since = None;
        self.reassign_at = None;
        self.backoff = BACKOFF_MIN;
        true
    }
}

fn source_loop(
    consumer: &BaseConsumer<ClientHooks>,
    topic: &str,
    mut next_offsets: Vec<u64>,
    senders: &[FeedSender],
    shared: &KafkaShared,
) -> anyhow::Result<()> {
    let partitions = senders.len();
    let mut feeds = Feeds {
        senders,
        batches: (0..partitions).map(|_| Vec::new()).collect(),
        closed: vec![false; partitions],
        pending: 0,
    };
    let mut probe_backoff = BACKOFF_MIN;
    let mut last_probe = Instant::now();
    let mut errors = ErrorRecovery::new();
    while !shared.stop.load(Ordering::Relaxed) && !feeds.all_closed() {
        if errors.reassign_due(Instant::now()) {
            info!(next_offsets = ?next_offsets, "reading every partition again from this instance's offsets");
            assign(consumer, topic, &next_offsets)?;
        }
        let timeout = if feeds.pending > 0 { Duration::ZERO } else { Duration::from_millis(100) };
        match consumer.poll(timeout) {
            None => {
                feeds.flush_all();
                if !shared.broker_connected.load(Ordering::Relaxed) && last_probe.elapsed() >= probe_backoff {
                    last_probe = Instant::now();
                    match consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT) {
                        Ok(_) => {
                            shared.connected();
                            probe_backoff = BACKOFF_MIN;
                        }
                        Err(_) => probe_backoff = (probe_backoff * 2).min(BACKOFF_MAX),
                    }
                }
            }
            Some(Ok(message)) => {
                shared.connected();
                let Some(partition) = usize::try_from(message.partition()).ok().filter(|p| *p < partitions) else {
                    warn!(partition = message.partition(), "a record from a partition that is not assigned");
                    continue;
                };
                let offset = message.offset() as u64;
                // spec: KafkaLog.StrangerRecordRejected — any bytes (or none) decode to an
                // Envelope or to a DecodeError, which the Usher turns into a `malformed` output.
                feeds.push(
                    partition,
                    Decoded {
                        offset,
                        timestamp_ms: message.timestamp().to_millis().map_or(0, |t| t.max(0) as u64),
                        envelope: Envelope::<Inventory>::decode(message.payload().unwrap_or_default()),
                    },
                );
                next_offsets[partition] = offset + 1;
                if errors.delivered(partition) {
                    shared.set_source_error(None);
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                shared.connected();
                let Some(partition) = usize::try_from(partition).ok().filter(|p| *p < partitions) else { continue };
                feeds.at_end(partition);
                if errors.delivered(partition) {
                    shared.set_source_error(None);
                }
            }
            Some(Err(error)) => {
                // spec: KafkaLog.NoSilentReset — an offset out of range, or any other fetch
                // error: not ready until every partition delivers again; wait, then read
                // again from this instance's own positions. Never skip.
                feeds.flush_all();
                shared.set_source_error(Some(error.to_string()));
                let now = Instant::now();
                match errors.failed(now, partitions) {
                    Some(at) => warn!(
                        %error, next_offsets = ?next_offsets, retry_in_ms = (at - now).as_millis() as u64,
                        "consuming the commands topic failed; reading again from this instance's offsets"
                    ),
                    None => debug!(%error, "consuming the commands topic failed again; a re-read is pending"),
                }
                // Bounds a loop on an error librdkafka repeats at once; never a wait per error.
                std::thread::sleep(ERROR_PAUSE);
            }
        }
    }
    Ok(())
}

/// A durable output on its way to the publisher thread.
#[derive(Debug)]
pub struct DurableOutput {
    pub partition: u32,
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// Starts the publisher thread (spec: Publisher.*). It gets certified outputs from the
/// Clerk while this instance holds the publisher role, in offset order per partition.
pub fn spawn_publisher(
    config: &KafkaConfig,
    published_ends: &[u64],
    outputs: Receiver<PublishBatch>,
    shared: Arc<KafkaShared>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let producer: BaseProducer<ClientHooks> = client_config(&config.brokers)
        // spec: Publisher.IdempotentNoTransactions — no transactional.id: the broker has none.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // Retry for as long as the broker is away; a final failure stops the instance.
        .set("message.timeout.ms", "0")
        // Bigger produce requests cost the broker less per output (the broker shares the
        // machine); 10 ms is small next to a certification round trip.
        .set("linger.ms", "10")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", (MAX_UNPUBLISHED * 2).to_string())
        .create_with_context(ClientHooks { shared: shared.clone(), deliveries: Mutex::new(Vec::new()) })
        .context("creating the Kafka producer")?;
    let publisher = Publisher::new(published_ends);
    let topic: Arc<str> = config.outputs_topic.as_str().into();
    std::thread::Builder::new()
        .name("kafka-publisher".into())
        .spawn(move || {
            let mut shell = PublisherShell { producer, publisher, topic, shared: shared.clone() };
            shared.run_thread("publisher", || shell.run(outputs))
        })
        .context("starting the Kafka publisher thread")
}

struct PublisherShell {
    producer: BaseProducer<ClientHooks>,
    publisher: Publisher,
    topic: Arc<str>,
    shared: Arc<KafkaShared>,
}

impl PublisherShell {
    fn run(&mut self, outputs: Receiver<PublishBatch>) -> anyhow::Result<()> {
        let mut released = Vec::new();
        let mut disconnected = false;
        while !self.shared.stop.load(Ordering::Relaxed) {
            match outputs.recv_timeout(Duration::from_millis(2)) {
                Ok(batch) => {
                    self.take(batch)?;
                    while let Ok(batch) = outputs.try_recv() {
                        self.take(batch)?;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                // The Clerk is gone; keep delivering what was released.
                Err(RecvTimeoutError::Disconnected) if !disconnected => disconnected = true,
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(2)),
            }
            self.publisher.release(&mut released);
            for release in released.drain(..) {
                self.produce(release)?;
            }
            self.serve_deliveries()?;
        }
        Ok(())
    }

    fn take(&mut self, batch: PublishBatch) -> anyhow::Result<()> {
        // spec: Clerk.PublisherHandOver
        for (partition, end) in batch.skip_to {
            self.publisher.skip_to(partition, end);
            if let Some(published) = self.shared.published_end.get(partition as usize) {
                published.store(self.publisher.published_end(partition), Ordering::Release);
            }
        }
        for output in batch.outputs {
            self.offer(output)?;
        }
        Ok(())
    }

    /// Serves every delivery report librdkafka has ready: one `poll` serves one event (one
    /// produce response), so a single poll per loop would let acknowledgements fall behind.
    fn serve_deliveries(&mut self) -> anyhow::Result<()> {
        loop {
            self.producer.poll(Duration::ZERO);
            if self.take_deliveries()? == 0 {
                return Ok(());
            }
        }
    }

    fn offer(&mut self, output: DurableOutput) -> anyhow::Result<()> {
        let (partition, offset) = (output.partition, output.offset);
        let _ = self.publisher.offer(partition, offset, output.bytes)?;
        Ok(())
    }

    fn produce(&mut self, release: Release) -> anyhow::Result<()> {
        // A durable output that does not decode is corruption, not input: stop.
        let json = OutputJson::from_bytes(&release.bytes)
            .with_context(|| format!("output ({}, {}) does not decode", release.partition, release.offset))?;
        let payload = serde_json::to_vec(&json)?;
        let key = OutputJson::key(release.partition, release.offset);
        // spec: Publisher.KeyedByInput
        let topic = self.topic.clone();
        let mut record =
            BaseRecord::to(&topic).partition(release.partition as i32).key(key.as_bytes()).payload(&payload);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    self.producer.poll(Duration::from_millis(50));
                    self.take_deliveries()?;
                }
                Err((error, _)) => anyhow::bail!("producing output {key}: {error}"),
            }
        }
    }

    /// Applies the delivery reports gathered so far; returns how many there were.
    fn take_deliveries(&mut self) -> anyhow::Result<usize> {
        let deliveries = std::mem::take(&mut *self.producer.context().deliveries.lock().expect("deliveries lock"));
        let count = deliveries.len();
        for delivery in deliveries {
            // spec: Publisher.IdempotentNoTransactions — a final failure is never skipped.
            let (partition, offset) = delivery.map_err(|e| anyhow::anyhow!(e))?;
            self.publisher.acknowledged(partition, offset);
            self.shared.published_end[partition as usize]
                .store(self.publisher.published_end(partition), Ordering::Release);
        }
        Ok(count)
    }
}

/// `tribunal log append --log kafka:..` (spec: KafkaLog.AppendIdempotent): produces every
/// payload with the idempotent producer, keyed by its idempotency key, and returns each
/// record's (partition, offset) in input order; the offset is None when the broker
/// acknowledged the record without it (spec: KafkaLog.DeliveredOffsetUnknown).
pub fn append(
    config: &KafkaConfig,
    payloads: &[(Option<String>, Vec<u8>)],
    partition: Option<u32>,
) -> anyhow::Result<Vec<(u32, Option<u64>)>> {
    let partitions = ensure_topics(config, Topics::Commands, Some(Instant::now() + Duration::from_secs(30)))?;
    if let Some(p) = partition {
        anyhow::ensure!(p < partitions, "--partition {p}: topic {} has {partitions} partitions", config.commands_topic);
    }
    let shared = Arc::new(KafkaShared::new(&[]));
    let producer: BaseProducer<AppendContext> = client_config(&config.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "60000")
        .set("linger.ms", "5")
        // The Java client's partitioner, so any producer puts a key in the same partition.
        .set("partitioner", "murmur2_random")
        .create_with_context(AppendContext {
            results: Mutex::new(vec![None; payloads.len()]),
            offsets: Mutex::new(DeliveredOffsets::new(partitions)),
            shared,
        })
        .context("creating the Kafka producer")?;
    for (index, (key, payload)) in payloads.iter().enumerate() {
        let mut record = BaseRecord::with_opaque_to(&config.commands_topic, index).payload(payload);
        if let Some(key) = key {
            record = record.key(key.as_bytes());
        }
        if let Some(p) = partition {
            record = record.partition(p as i32);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    producer.poll(Duration::from_millis(50));
                }
                Err((error, _)) => anyhow::bail!("producing record {index}: {error}"),
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(120)).context("waiting for the broker to acknowledge every record")?;
    let results = std::mem::take(&mut *producer.context().results.lock().expect("results lock"));
    let acknowledged = results.iter().filter(|r| matches!(r, Some(Ok(_)))).count();
    let mut offsets = Vec::with_capacity(results.len());
    for (index, result) in results.into_iter().enumerate() {
        match result {
            Some(Ok(position)) => offsets.push(position),
            Some(Err(error)) => anyhow::bail!(
                "record {index} was refused: {error}; {acknowledged} of {} were acknowledged. Appending the \
                 same lines again is safe: repeated idempotency keys become replays",
                payloads.len()
            ),
            None => anyhow::bail!("record {index} was never acknowledged"),
        }
    }
    Ok(offsets)
}

/// Per appended record: its (partition, offset) once acknowledged, or why it was refused.
type AppendResult = Option<Result<(u32, Option<u64>), String>>;

struct AppendContext {
    results: Mutex<Vec<AppendResult>>,
    /// Delivery callbacks run in report order, as the classification needs.
    offsets: Mutex<DeliveredOffsets>,
    shared: Arc<KafkaShared>,
}

impl ClientContext for AppendContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.shared.client_error(error, reason);
    }
}

impl ProducerContext for AppendContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, index: usize) {
        let entry = match result {
            Ok(message) => {
                let partition = message.partition() as u32;
                let offset = match self.offsets.lock().expect("offsets lock").delivered(partition, message.offset()) {
                    Delivered::At(offset) => Some(offset),
                    Delivered::Unknown(_) => None,
                };
                Ok((partition, offset))
            }
            Err((error, _)) => Err(error.to_string()),
        };
        self.results.lock().expect("results lock")[index] = Some(entry);
    }
}

/// One record of a topic, as `tribunal log read --log kafka:..` prints it.
#[derive(serde::Serialize)]
pub struct TopicRecord {
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: u64,
    pub key: Option<String>,
    pub payload: String,
}

/// Reads `topic` from `from` on every partition up to the end each partition had when
/// the read started, calling `each` in per-partition offset order.
pub fn read_topic(
    brokers: &str,
    topic: &str,
    from: u64,
    mut each: impl FnMut(TopicRecord) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = client_config(brokers)
        .set("group.id", "tribunal-log-read")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // A reader that jumped would print a topic with a hole in it: fail instead.
        .set("auto.offset.reset", "error")
        .create()
        .context("creating a Kafka consumer")?;
    let metadata = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT).context("reading the topic's metadata")?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .filter(|n| *n > 0)
        .with_context(|| format!("no topic {topic} on {brokers}"))?;
    for partition in 0..partitions as i32 {
        let (low, high) = consumer.fetch_watermarks(topic, partition, METADATA_TIMEOUT)?;
        let start = (from as i64).max(low);
        if start >= high {
            continue;
        }
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, partition, Offset::Offset(start))?;
        consumer.assign(&assignment)?;
        let mut next = start;
        let mut idle_since = Instant::now();
        while next < high {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    idle_since = Instant::now();
                    // Offsets are dense (spec: KafkaLog.NeverSkipsAnOffset): a jump is a
                    // hole in what is printed, and a check reading it would miscount.
                    anyhow::ensure!(
                        message.offset() == next,
                        "reading {topic}/{partition}: offset {} came where {next} was expected",
                        message.offset()
                    );
                    next = message.offset() + 1;
                    each(TopicRecord {
                        partition: partition as u32,
                        offset: message.offset() as u64,
                        timestamp_ms: message.timestamp().to_millis().map_or(0, |t| t.max(0) as u64),
                        key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                        payload: String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned(),
                    })?;
                }
                Some(Err(KafkaError::MessageConsumption(code)))
                    if matches!(code, RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange) =>
                {
                    anyhow::bail!("reading {topic}/{partition} at offset {next}: {code}")
                }
                Some(Err(error)) => warn!(%error, "reading {topic}"),
                None => anyhow::ensure!(
                    idle_since.elapsed() < Duration::from_secs(30),
                    "reading {topic}/{partition} stalled at offset {next} before {high}"
                ),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_while_a_reread_is_pending_do_not_postpone_it() {
        // spec: KafkaLog.NoSilentReset — a burst of queued errors (a broker that was away)
        // costs one backoff, not one per error.
        let t0 = Instant::now();
        let mut errors = ErrorRecovery::new();
        assert_eq!(errors.failed(t0, 2), Some(t0 + BACKOFF_MIN));
        for later_ms in [1, 20, 99] {
            assert_eq!(errors.failed(t0 + Duration::from_millis(later_ms), 2), None);
        }
        assert!(!errors.reassign_due(t0 + Duration::from_millis(99)));
        assert!(errors.reassign_due(t0 + BACKOFF_MIN));
        assert!(!errors.reassign_due(t0 + BACKOFF_MIN), "due once");
        // Still failing after the re-read: the next delay doubles, up to BACKOFF_MAX.
        let t1 = t0 + Duration::from_millis(150);
        assert_eq!(errors.failed(t1, 2), Some(t1 + 2 * BACKOFF_MIN));
        let mut now = t1;
        for _ in 0..10 {
            now += BACKOFF_MAX;
            assert!(errors.reassign_due(now));
            let at = errors.failed(now, 2).expect("none pending");
            assert!(at - now <= BACKOFF_MAX);
        }
        assert_eq!(errors.backoff, BACKOFF_MAX);
    }

    #[test]
    fn the_error_ends_only_when_every_partition_delivered_and_that_cancels_the_reread() {
        // spec: KafkaLog.NoSilentReset, KafkaLog.SourceHealthy
        let t0 = Instant::now();
        let mut errors = ErrorRecovery::new();
        assert!(!errors.delivered(0), "no error, nothing to end");
        errors.failed(t0, 3);
        errors.failed(t0, 3);
        assert!(!errors.delivered(0));
        assert!(!errors.delivered(0), "the same partition twice is not every partition");
        assert!(!errors.delivered(2));
        assert!(errors.delivered(1));
        assert!(!errors.reassign_due(t0 + BACKOFF_MAX), "the pending re-read was cancelled");
        assert_eq!(errors.failed(t0, 3), Some(t0 + BACKOFF_MIN), "the backoff was reset");
        // A new error after a partial delivery needs every partition again.
        assert!(!errors.delivered(0));
        assert!(!errors.delivered(1));
        errors.failed(t0, 3);
        assert!(!errors.delivered(2));
    }
}
