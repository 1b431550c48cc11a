//! Topics: made when missing (spec: KafkaLog.TopicsEnsured), and how far publication
//! got on the outputs topic (spec: Publisher.ResumeFromOutputTopic).

use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::metadata::Metadata;
use tracing::{info, warn};

use super::{client_config, KafkaConfig, BACKOFF_MAX, BACKOFF_MIN, MAX_PARTITIONS, METADATA_TIMEOUT};

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
        let (commands, outputs) = topic_partitions(&metadata, config, topics);
        if let (Some(commands), Some(outputs)) = (commands, outputs) {
            return checked_partitions(config, commands, outputs);
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
        create_missing_topics(&admin, config, topics, commands, outputs)?;
        created = true;
    }
}

/// The partition counts of the commands topic and of the outputs topic (the commands
/// topic's again when only it is needed), `None` for a topic the metadata lacks.
fn topic_partitions(metadata: &Metadata, config: &KafkaConfig, topics: Topics) -> (Option<u32>, Option<u32>) {
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
    (commands, outputs)
}

/// The commands topic's partition count, once the existing topics are checked to be
/// servable: 1 to MAX_PARTITIONS commands partitions, at least as many outputs ones.
fn checked_partitions(config: &KafkaConfig, commands: u32, outputs: u32) -> anyhow::Result<u32> {
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
    Ok(commands)
}

/// Creates the needed topics that are missing, with the commands topic's partition
/// count if it exists (else `--kafka-partitions`); one that appeared meanwhile is fine.
fn create_missing_topics(
    admin: &AdminClient<DefaultClientContext>,
    config: &KafkaConfig,
    topics: Topics,
    commands: Option<u32>,
    outputs: Option<u32>,
) -> anyhow::Result<()> {
    let partitions = commands.unwrap_or(config.partitions);
    anyhow::ensure!(
        (1..=MAX_PARTITIONS).contains(&partitions),
        "--kafka-partitions {partitions}: must be 1 to {MAX_PARTITIONS}"
    );
    let mut missing = Vec::new();
    for (name, present) in [(&config.commands_topic, commands.is_some()), (&config.outputs_topic, outputs.is_some())]
        .into_iter()
        .take(if topics == Topics::Commands { 1 } else { 2 })
    {
        if !present {
            missing.push(
                NewTopic::new(name, partitions as i32, TopicReplication::Fixed(i32::from(config.replication_factor)))
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
    Ok(())
}
