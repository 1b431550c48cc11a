//! Every idempotent producer Tribunal makes, in one place, so their settings stay in step.
//! They differ only where a role needs it, and each difference carries its reason.

use rdkafka::config::ClientConfig;

use super::client_config;

/// What a producer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProducerRole {
    /// The Gateway's appender: commands from REST requests, each waiting on its ack.
    Commands { queue_records: usize, queue_kbytes: usize },
    /// The publisher thread: certified outputs to the outputs topic.
    Outputs { queue_records: u64 },
    /// `tribunal log append`: a file of commands, from the command line.
    CommandLine,
}

/// An idempotent producer's configuration for `role` (spec: Publisher.IdempotentNoTransactions:
/// no `transactional.id`, the broker has no transactions).
pub fn idempotent_producer(brokers: &str, role: ProducerRole) -> ClientConfig {
    let mut config = client_config(brokers);
    config.set("enable.idempotence", "true").set("acks", "all");
    match role {
        ProducerRole::Commands { queue_records, queue_kbytes } => {
            config
                // Never time a record out: the request's deadline is the Gateway's own timer,
                // and a librdkafka timeout bumps the idempotent producer's epoch, which
                // tansu 0.6.0 cannot take (spec: Gateway.CommandProducerKeepsRecords).
                .set("message.timeout.ms", "0")
                .set("queue.buffering.max.messages", queue_records.to_string())
                .set("queue.buffering.max.kbytes", queue_kbytes.to_string())
                // Latency matters more than batching here: requests wait on every ack.
                .set("linger.ms", "1")
                // The Java client's partitioner, as `tribunal log append` uses.
                .set("partitioner", "murmur2_random");
        }
        ProducerRole::Outputs { queue_records } => {
            config
                // Retry for as long as the broker is away; a final failure stops the instance.
                .set("message.timeout.ms", "0")
                // Bigger produce requests cost the broker less per output (the broker shares
                // the machine); 10 ms is small next to a certification round trip.
                .set("linger.ms", "10")
                .set("batch.num.messages", "10000")
                .set("queue.buffering.max.messages", queue_records.to_string());
        }
        ProducerRole::CommandLine => {
            config
                // A command line tool gives up after a minute and says which records were
                // not acknowledged, rather than hang for as long as the broker is away.
                .set("message.timeout.ms", "60000")
                .set("linger.ms", "5")
                // The Java client's partitioner, so any producer puts a key in the same partition.
                .set("partitioner", "murmur2_random");
        }
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_is_idempotent_and_only_the_command_line_times_records_out() {
        for role in [
            ProducerRole::Commands { queue_records: 10, queue_kbytes: 10 },
            ProducerRole::Outputs { queue_records: 10 },
            ProducerRole::CommandLine,
        ] {
            let config = idempotent_producer("127.0.0.1:9092", role);
            assert_eq!(config.get("enable.idempotence"), Some("true"), "{role:?}");
            assert_eq!(config.get("acks"), Some("all"), "{role:?}");
            assert_eq!(config.get("transactional.id"), None, "{role:?}");
            let timeout = if role == ProducerRole::CommandLine { "60000" } else { "0" };
            assert_eq!(config.get("message.timeout.ms"), Some(timeout), "{role:?}");
        }
    }
}
