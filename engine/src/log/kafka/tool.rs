//! `tribunal log append` and `tribunal log read` on Kafka.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use super::delivered_offsets::{Delivered, DeliveredOffsets};
use super::producer::{idempotent_producer, ProducerRole};
use super::{client_config, ensure_topics, KafkaConfig, KafkaShared, Topics, METADATA_TIMEOUT};

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
    let producer: BaseProducer<AppendContext> = idempotent_producer(&config.brokers, ProducerRole::CommandLine)
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
