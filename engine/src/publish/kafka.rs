//! The publisher thread: one idempotent `BaseProducer` writing certified outputs to the
//! outputs topic, in input-offset order per partition (the sans-IO `Publisher` orders
//! them), as JSON keyed `PARTITION:OFFSET` (specs/publisher.allium).

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use tribunal_federation::publisher::{Publisher, Release};

use super::json::OutputJson;
use super::{DurableOutput, PublishBatch, MAX_UNPUBLISHED};
use crate::log::kafka::producer::{idempotent_producer, ProducerRole};
use crate::log::kafka::{KafkaConfig, KafkaShared, BACKOFF_MAX, BACKOFF_MIN, METADATA_TIMEOUT};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::time::Instant;
use tracing::warn;

/// The publisher's client context: librdkafka's errors become readiness, and delivery
/// callbacks (run inside `poll` on the publisher thread) gather acknowledgements.
struct PublisherHooks {
    shared: Arc<KafkaShared>,
    deliveries: Mutex<Vec<Result<(u32, u64), String>>>,
}

impl ClientContext for PublisherHooks {
    fn error(&self, error: KafkaError, reason: &str) {
        self.shared.client_error(error, reason);
    }
}

impl ProducerContext for PublisherHooks {
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

/// Starts the publisher thread (spec: Publisher.*). It gets certified outputs from the
/// Clerk while this instance holds the publisher role, in offset order per partition.
pub fn spawn_publisher(
    config: &KafkaConfig,
    published_ends: &[u64],
    outputs: Receiver<PublishBatch>,
    shared: Arc<KafkaShared>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let producer: BaseProducer<PublisherHooks> =
        idempotent_producer(&config.brokers, ProducerRole::Outputs { queue_records: MAX_UNPUBLISHED * 2 })
            .create_with_context(PublisherHooks { shared: shared.clone(), deliveries: Mutex::new(Vec::new()) })
            .context("creating the Kafka producer")?;
    let publisher = Publisher::new(published_ends);
    let topic: Arc<str> = config.outputs_topic.as_str().into();
    let config = config.clone();
    std::thread::Builder::new()
        .name("kafka-publisher".into())
        .spawn(move || {
            let mut shell = PublisherShell { config, producer, publisher, topic, shared: shared.clone() };
            shared.run_thread("publisher", || shell.run(outputs))
        })
        .context("starting the Kafka publisher thread")
}

struct PublisherShell {
    config: KafkaConfig,
    producer: BaseProducer<PublisherHooks>,
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
        // spec: Clerk.PublisherHandOver, Publisher.TakeOverReadsTheSink — the topic says
        // exactly how far publication got; the heartbeats may be a beat behind.
        if !batch.skip_to.is_empty() {
            // Bounded: an error that does not clear (retention took the last record, a
            // permission) fails the instance, instead of a publisher that silently stops.
            let partitions = self.shared.published_end.len() as u32;
            let written = read_published_ends(&self.config, partitions, Some(TAKE_OVER_PATIENCE))
                .context("reading the outputs topic at a take-over")?;
            for (partition, end) in written.into_iter().enumerate() {
                self.publisher.skip_to(partition as u32, end);
            }
        }
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

/// How long a take-over retries reading the outputs topic before it fails the instance.
const TAKE_OVER_PATIENCE: Duration = Duration::from_secs(60);

/// Per partition, one past the input offset of the last output on the outputs topic: how
/// far publication got, whichever instance published (spec: Publisher.ResumeFromOutputTopic).
/// Retries failed reads for `patience` (None: until the broker answers).
pub fn read_published_ends(
    config: &KafkaConfig,
    partitions: u32,
    patience: Option<Duration>,
) -> anyhow::Result<Vec<u64>> {
    let started = Instant::now();
    let consumer: BaseConsumer = crate::log::kafka::client_config(&config.brokers)
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
                Err(error) if patience.is_some_and(|p| started.elapsed() >= p) => {
                    return Err(error.context(format!("still failing after {:?}", started.elapsed())));
                }
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
