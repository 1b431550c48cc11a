//! `tribunal`: the engine binary.
//!
//! What exists today is the deterministic core (issue 2): `evaluate` runs a command
//! log through it on simulated shards and cross-checks the result against the
//! sequential reference interpreter; `sample` writes a workload to feed it. The
//! running engine (`run`, the local log, the Ledger, federation, HTTP) arrives with
//! the later issues; the help text says only what is here.

mod cores;
mod evaluate;
mod inspect;
mod ledger_io;
mod local_log;
mod log_cli;
mod node;
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
        This build contains the deterministic sans-IO core only: `evaluate` runs a log of \
        JSON-lines commands through the Usher, Warden, router and per-shard Arbiters in one \
        process and checks the result against the sequential reference interpreter. \
        There is no durable storage, network or HTTP yet."
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
    /// The input log: `local:DIR` (the embedded log).
    #[arg(long)]
    log: String,
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
    /// Take a snapshot every this many records, so that recovery replays at most that
    /// many from the Ledger; older segments are deleted (0: never).
    #[arg(long, default_value_t = 1_000_000)]
    snapshot_every: u64,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
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
    let Some(log_dir) = args.log.strip_prefix("local:") else {
        anyhow::bail!("--log {:?}: only local:DIR is supported (Kafka arrives later)", args.log);
    };
    anyhow::ensure!(args.ttl_ms > 0, "--ttl-ms must be positive");
    let cores = cores::select(args.cores.as_deref())?;
    node::run(node::NodeConfig {
        log_dir: log_dir.into(),
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
