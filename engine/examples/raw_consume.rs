//! The broker's raw rates, for `make bench-kafka`: a plain rdkafka consumer reads every
//! partition of a topic from offset 0 to its end and does nothing else with the records.
//! With `--pipe OUT`, it also produces one record per input (the input's bytes, keyed
//! `partition:offset`, idempotent, to the same partition of OUT) and waits until every
//! one is acknowledged: what the broker can do when, like the engine, it must both serve
//! the input and take one output per input. The engine's rate is compared with both.
//!
//! `cargo run --release -p tribunal --example raw_consume -- HOST:PORT TOPIC [--pipe OUT]`

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tribunal::log::kafka::producer::{idempotent_producer, ProducerRole};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(brokers), Some(topic)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: raw_consume HOST:PORT TOPIC [--pipe OUT]");
    };
    let pipe = match (args.next().as_deref(), args.next()) {
        (Some("--pipe"), Some(out)) => Some(out),
        (None, _) => None,
        _ => anyhow::bail!("usage: raw_consume HOST:PORT TOPIC [--pipe OUT]"),
    };
    // The engine's publisher's producer settings.
    let producer: Option<BaseProducer> = match &pipe {
        Some(_) => Some(idempotent_producer(&brokers, ProducerRole::Outputs { queue_records: 1_000_000 }).create()?),
        None => None,
    };
    let (consumer, partitions) = consume_from_start(&brokers, &topic)?;
    let started = Instant::now();
    let (mut records, mut bytes, mut at_end) = (0u64, 0u64, 0usize);
    while at_end < partitions {
        match consumer.poll(Duration::from_secs(10)) {
            Some(Ok(message)) => {
                records += 1;
                let payload = message.payload().unwrap_or_default();
                bytes += payload.len() as u64;
                if let (Some(producer), Some(out)) = (&producer, &pipe) {
                    pipe_record(producer, out, message.partition(), message.offset(), payload);
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => at_end += 1,
            Some(Err(error)) => anyhow::bail!("{error}"),
            None => anyhow::bail!("no record for 10 s after {records}"),
        }
    }
    if let Some(producer) = &producer {
        producer.flush(Duration::from_secs(600))?;
    }
    let elapsed = started.elapsed();
    println!(
        "{{\"records\":{records},\"payload_bytes\":{bytes},\"elapsed_ms\":{},\"records_per_s\":{:.0}}}",
        elapsed.as_millis(),
        records as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}

/// A consumer assigned every partition of `topic` from its beginning, with the same
/// fetch settings as the engine's source thread, and the number of partitions.
fn consume_from_start(brokers: &str, topic: &str) -> anyhow::Result<(BaseConsumer, usize)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "tribunal-raw-consume")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10")
        .set("queued.min.messages", "200000")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata.topics()[0].partitions().len();
    anyhow::ensure!(partitions > 0, "no topic {topic}");
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    Ok((consumer, partitions))
}

/// Produces one input record's bytes to the same partition of `out`, keyed
/// `partition:offset`, waiting for room in the producer's queue.
fn pipe_record(producer: &BaseProducer, out: &str, partition: i32, offset: i64, payload: &[u8]) {
    let key = format!("{partition}:{offset}");
    let mut record = BaseRecord::to(out).partition(partition).key(&key).payload(payload);
    loop {
        match producer.send(record) {
            Ok(()) => break,
            Err((_, returned)) => {
                record = returned;
                producer.poll(Duration::from_millis(10));
            }
        }
    }
    producer.poll(Duration::ZERO);
}
