//! The `tribunal` command line (clap): one module per command. `main` dispatches.
//!
//! `run` is one instance: recovery from its Ledger, then pinned glommio shards reading
//! the local log or Kafka, and (Kafka) publishing outputs. `log` appends to and reads
//! either log; `inspect` shows what a data directory recovers to; `evaluate` runs a log
//! through the core on simulated shards against the reference interpreter; `sample`
//! writes a workload; `cluster` supervises a local federation; `readmit` lifts a
//! quarantine. `run --http` serves the REST API (the Gateway).

pub mod cluster;
pub mod config;
pub mod evaluate;
pub mod federation_args;
pub mod inspect;
pub mod log;
pub mod readmit;
pub mod run;
pub mod sample;
pub mod stock_table;

use std::process::ExitCode;

use crate::log::kafka;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tribunal",
    version,
    about = "Tribunal: deterministic event sourcing for inventory movements",
    long_about = "Tribunal: deterministic event sourcing for inventory movements.\n\n\
        `run` processes a command log (the embedded `local:DIR` log, or Kafka) on pinned \
        shards with a durable Ledger, recovers after any crash, compares its durable outputs \
        with its peers' (--peers) and publishes only certified ones. `cluster` runs a local \
        federation. `evaluate` checks a log against the sequential reference interpreter. \
        `run --http ADDR` serves the REST API, answered with certified outputs."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a JSON-lines command log through the core on N simulated shards.
    Evaluate(evaluate::Args),
    /// Print a deterministic mixed workload as JSON-lines envelopes.
    Sample(sample::Args),
    /// Append commands to an input log (`--log local:DIR`), or print its records.
    Log(log::Args),
    /// Run one instance: recover, then process the log on pinned shards with a durable Ledger.
    Run(Box<run::RunArgs>),
    /// Launch and supervise a local N-instance federation on this host.
    Cluster(cluster::Args),
    /// Print the state a data directory recovers to (offline, read-only).
    Inspect(inspect::Args),
    /// Lift a quarantine: the running instance at --data-dir re-admits --instance and
    /// tells its peers.
    Readmit(readmit::Args),
}

/// Kafka options shared by `run` and `log`.
#[derive(clap::Args, Clone)]
pub struct KafkaArgs {
    /// The input topic.
    #[arg(long, default_value = kafka::DEFAULT_COMMANDS_TOPIC)]
    commands_topic: String,
    /// Where outputs are published, keyed by input partition and offset.
    #[arg(long, default_value = kafka::DEFAULT_OUTPUTS_TOPIC)]
    outputs_topic: String,
    /// Partitions of the topics, if they must be created (each is an ordering domain).
    #[arg(long, default_value_t = 1)]
    kafka_partitions: u32,
    /// Replication factor of the topics, if they must be created.
    #[arg(long, default_value_t = 1)]
    kafka_replication_factor: u16,
}

impl KafkaArgs {
    pub fn config(&self, log: &str) -> anyhow::Result<kafka::KafkaConfig> {
        let Some(brokers) = kafka::parse_brokers(log) else {
            anyhow::bail!("--log {log:?}: expected local:DIR or kafka:HOST:PORT[,HOST:PORT..]");
        };
        Ok(kafka::KafkaConfig {
            brokers: brokers.to_string(),
            commands_topic: self.commands_topic.clone(),
            outputs_topic: self.outputs_topic.clone(),
            partitions: self.kafka_partitions,
            replication_factor: self.kafka_replication_factor,
        })
    }
}

/// The `tribunal` binary's entry point.
pub fn main() -> ExitCode {
    // Behave like other Unix tools when the reader of stdout goes away (`| head`):
    // end quietly instead of panicking on a failed print.
    // SAFETY: setting a signal disposition to its default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let parsed = config::parse(Cli::command(), std::env::args_os().collect())
        .and_then(|matches| Cli::from_arg_matches(&matches).map_err(config::Failure::Clap));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(config::Failure::Clap(error)) => error.exit(),
        Err(config::Failure::Config(message)) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Evaluate(args) => evaluate::run(args),
        Command::Sample(args) => sample::run(args),
        Command::Log(args) => log::run(args),
        Command::Run(args) => run::run_node(*args),
        Command::Cluster(args) => cluster::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Readmit(args) => readmit::run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tribunal: error: {}", config::annotate(&format!("{error:#}")));
            ExitCode::from(2)
        }
    }
}
