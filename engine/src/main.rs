//! `tribunal`: the engine binary.
//!
//! `run` is one instance: recovery from its Ledger, then pinned glommio shards reading
//! the local log or Kafka, and (Kafka) publishing outputs. `log` appends to and reads
//! either log; `inspect` shows what a data directory recovers to; `evaluate` runs a log
//! through the core on simulated shards against the reference interpreter; `sample`
//! writes a workload. Federation and HTTP arrive with later issues; the help text says
//! only what is here.

mod cores;
mod evaluate;
mod inspect;
mod kafka_log;
mod ledger_io;
mod local_log;
mod log_cli;
mod node;
mod output_json;
mod sample;
mod stock_table;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tribunal",
    version,
    about = "Tribunal: deterministic event sourcing for inventory movements",
    long_about = "Tribunal: deterministic event sourcing for inventory movements.\n\n\
        `run` processes a command log (the embedded `local:DIR` log, or Kafka) on pinned \
        shards with a durable Ledger, recovers after any crash, and with Kafka publishes \
        every output to the outputs topic. `evaluate` checks a log against the sequential \
        reference interpreter. Federation between instances and HTTP are not built yet."
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
    Log(log_cli::Args),
    /// Run one instance: recover, then process the log on pinned shards with a durable Ledger.
    Run(RunArgs),
    /// Print the state a data directory recovers to (offline, read-only).
    Inspect(inspect::Args),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The input log: `local:DIR` (the embedded log) or `kafka:HOST:PORT[,HOST:PORT..]`.
    #[arg(long)]
    log: String,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// This instance's name: tells instances apart in logs and Kafka client ids.
    #[arg(long, default_value = "1")]
    instance_id: String,
    /// Publish outputs to the outputs topic (Kafka). Only the publisher instance should.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    publish: bool,
    /// Where the Ledger and status live.
    #[arg(long)]
    data_dir: std::path::PathBuf,
    /// Cores to pin one shard each to, e.g. `0,1` or `0-3`; default: every allowed core.
    #[arg(long)]
    cores: Option<String>,
    /// Exit once every record in the log is durable (for jobs and tests).
    #[arg(long)]
    stop_at_end: bool,
    /// Idempotency TTL in stream-time milliseconds.
    #[arg(long, default_value_t = tribunal_shards::warden::WardenConfig::default().ttl_ms)]
    ttl_ms: u64,
    /// Take a snapshot of a partition every this many of its records, so that recovery
    /// replays at most that many from the Ledger; older segments are deleted (0: never).
    #[arg(long, default_value_t = 1_000_000)]
    snapshot_every: u64,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

/// Kafka options shared by `run` and `log`.
#[derive(clap::Args, Clone)]
pub struct KafkaArgs {
    /// The input topic.
    #[arg(long, default_value = kafka_log::DEFAULT_COMMANDS_TOPIC)]
    commands_topic: String,
    /// Where outputs are published, keyed by input partition and offset.
    #[arg(long, default_value = kafka_log::DEFAULT_OUTPUTS_TOPIC)]
    outputs_topic: String,
    /// Partitions of the topics, if they must be created (each is an ordering domain).
    #[arg(long, default_value_t = 1)]
    kafka_partitions: u32,
    /// Replication factor of the topics, if they must be created.
    #[arg(long, default_value_t = 1)]
    kafka_replication_factor: u16,
}

impl KafkaArgs {
    pub fn config(&self, log: &str) -> anyhow::Result<kafka_log::KafkaConfig> {
        let Some(brokers) = kafka_log::parse_brokers(log) else {
            anyhow::bail!("--log {log:?}: expected local:DIR or kafka:HOST:PORT[,HOST:PORT..]");
        };
        Ok(kafka_log::KafkaConfig {
            brokers: brokers.to_string(),
            commands_topic: self.commands_topic.clone(),
            outputs_topic: self.outputs_topic.clone(),
            partitions: self.kafka_partitions,
            replication_factor: self.kafka_replication_factor,
        })
    }
}

fn run_node(args: RunArgs) -> anyhow::Result<ExitCode> {
    let subscriber = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    );
    if args.log_json {
        subscriber.json().init();
    } else {
        subscriber.init();
    }
    let log = match args.log.strip_prefix("local:") {
        Some(dir) if !dir.is_empty() => node::LogSource::Local(dir.into()),
        _ => node::LogSource::Kafka(args.kafka.config(&args.log)?),
    };
    anyhow::ensure!(args.ttl_ms > 0, "--ttl-ms must be positive");
    let cores = cores::select(args.cores.as_deref())?;
    node::run(node::NodeConfig {
        log,
        instance_id: args.instance_id,
        publish: args.publish,
        data_dir: args.data_dir,
        cores,
        warden: tribunal_shards::warden::WardenConfig { ttl_ms: args.ttl_ms, ..Default::default() },
        stop_at_end: args.stop_at_end,
        snapshot_every: args.snapshot_every,
    })
}

fn main() -> ExitCode {
    // Behave like other Unix tools when the reader of stdout goes away (`| head`):
    // end quietly instead of panicking on a failed print.
    // SAFETY: setting a signal disposition to its default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Evaluate(args) => evaluate::run(args),
        Command::Sample(args) => sample::run(args),
        Command::Log(args) => log_cli::run(args),
        Command::Run(args) => run_node(args),
        Command::Inspect(args) => inspect::run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("tribunal: error: {error:#}");
            ExitCode::from(2)
        }
    }
}
