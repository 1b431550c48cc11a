//! The broker's raw consume rate, for `make bench-kafka`: a plain rdkafka consumer reads
//! every partition of a topic from offset 0 to its end and does nothing else with the
//! records. The engine's rate is compared with this one in the same run.
//!
//! `cargo run --release -p tribunal --example raw_consume -- HOST:PORT TOPIC`

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(brokers), Some(topic)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: raw_consume HOST:PORT TOPIC");
    };
    // The same fetch settings as the engine's source thread.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "tribunal-raw-consume")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10")
        .set("queued.min.messages", "200000")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let partitions = metadata.topics()[0].partitions().len();
    anyhow::ensure!(partitions > 0, "no topic {topic}");
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        assignment.add_partition_offset(&topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let started = Instant::now();
    let (mut records, mut bytes, mut at_end) = (0u64, 0u64, 0usize);
    while at_end < partitions {
        match consumer.poll(Duration::from_secs(10)) {
            Some(Ok(message)) => {
                records += 1;
                bytes += message.payload().map_or(0, |p| p.len() as u64);
            }
            Some(Err(KafkaError::PartitionEOF(_))) => at_end += 1,
            Some(Err(error)) => anyhow::bail!("{error}"),
            None => anyhow::bail!("no record for 10 s after {records}"),
        }
    }
    let elapsed = started.elapsed();
    println!(
        "{{\"records\":{records},\"payload_bytes\":{bytes},\"elapsed_ms\":{},\"records_per_s\":{:.0}}}",
        elapsed.as_millis(),
        records as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
