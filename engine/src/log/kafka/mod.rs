//! The input log on Kafka (specs/kafka_log.allium).
//!
//! rdkafka's clients block (poll, flush, metadata), so none of them runs on a glommio
//! executor (spec: KafkaLog.BridgeNeverBlocksExecutor). The **source** thread
//! (`source.rs`) owns a `BaseConsumer`: it reads every partition through `assign()` at
//! offsets taken from the Ledger, decodes each record's JSON envelope, and feeds one
//! bounded std channel per partition. Usher tasks only `try_recv`, so a full channel
//! blocks the source thread alone (backpressure), never an executor; an idle Usher waits
//! on the doorbell the source thread rings after each send. `admin.rs` makes the topics,
//! `producer.rs` is the one idempotent-producer factory, `tool.rs` serves `tribunal log`,
//! and `delivered_offsets.rs` tells real delivered offsets from invented ones. The
//! publisher thread, which writes certified outputs to the outputs topic, is
//! `crate::publish::kafka`.

pub mod admin;
pub mod delivered_offsets;
pub mod producer;
pub mod source;
pub mod tool;

pub use admin::{ensure_topics, Topics};
pub use source::{spawn_source, Feed, FeedSender};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tracing::{debug, error, info, warn};

pub const DEFAULT_COMMANDS_TOPIC: &str = "tribunal.commands";
pub const DEFAULT_OUTPUTS_TOPIC: &str = "tribunal.outputs";
/// Partitions the engine serves at most (one Usher each).
pub const MAX_PARTITIONS: u32 = 256;
/// Records the source thread gathers per partition before handing a batch over: the
/// Usher's batch bound, which the snapshot cadence counts on.
const SOURCE_BATCH_RECORDS: usize = tribunal_shards::usher::MAX_BATCH_RECORDS;
/// Batches waiting per partition between the source thread and its Usher.
pub const FEED_BATCHES_IN_FLIGHT: usize = 8;
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The pause after each consumption error: at most 100 errors a second reach the log.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
pub(crate) const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

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
    pub(crate) fn client_error(&self, error: KafkaError, reason: &str) {
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
    pub(crate) fn run_thread(self: &Arc<Self>, what: &str, body: impl FnOnce() -> anyhow::Result<()>) {
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
pub(crate) struct ClientHooks {
    pub(crate) shared: Arc<KafkaShared>,
}

impl ClientContext for ClientHooks {
    fn error(&self, error: KafkaError, reason: &str) {
        self.shared.client_error(error, reason);
    }
}

impl ConsumerContext for ClientHooks {}
