//! `loadgen`: drives Tribunal's REST API open-loop and proves the answers right
//! (specs/loadgen.allium). Exit codes: 0 all invariants hold, 2 an invariant is violated,
//! 1 anything else (bad flags, unreachable cluster).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tribunal_loadgen::client::Target;
use tribunal_loadgen::ledger::{Ledger, StockTable};
use tribunal_loadgen::run::{run, RunConfig};
use tribunal_loadgen::workload::ShapeArgs;
use tribunal_loadgen::{bulk, chaos, read_json, report, verify};

#[derive(Parser)]
#[command(name = "loadgen", version, about = "Open-loop load, honest latency and invariant checks for Tribunal")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Drive the REST API at a constant rate, then read stock back from every target and
    /// check the invariants.
    Run(RunArgs),
    /// Re-check a saved run: its ledger.json against a stock.json (for example a doctored one).
    Verify(VerifyArgs),
    /// Pre-fill a log with N commands and measure certified, durable events/s of a cluster
    /// processing it, without HTTP.
    Bulk(bulk::BulkArgs),
    /// The resilience suite: SIGKILL instances (or the broker) under load, let them come
    /// back, and prove nothing was lost, applied twice or published uncertified.
    Chaos(chaos::ChaosArgs),
}

#[derive(Args)]
struct RunArgs {
    /// An instance's REST API, `http://HOST:PORT`. Repeat for every instance: connections are
    /// spread over all of them, and stock is read back from each.
    #[arg(long = "target", required = true)]
    targets: Vec<Target>,
    /// Requests per second, in total, at fixed intervals (open loop).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Length of the measured part of the run.
    #[arg(long, default_value_t = 30)]
    duration_s: u64,
    /// Length of the warm-up before it, run at the same rate and left out of the figures.
    #[arg(long, default_value_t = 5)]
    warmup_s: u64,
    /// Keep-alive connections in total (one request in flight on each).
    #[arg(long, default_value_t = 256)]
    connections: usize,
    #[command(flatten)]
    shape: ShapeArgs,
    /// Share of requests that resend an answered key with the same body.
    #[arg(long, default_value_t = 0.02)]
    duplicate_share: f64,
    /// Opening stock of every (warehouse, SKU).
    #[arg(long, default_value_t = 10_000)]
    initial_stock: u64,
    /// Prefix of every key and name; default: `lg` and 8 random hex digits.
    #[arg(long)]
    run_prefix: Option<String>,
    /// Client-side limit per attempt; past it the attempt is retried on a new connection.
    #[arg(long, default_value_t = 10_000)]
    request_timeout_ms: u64,
    /// After the schedule, how long retries may go on before a command counts as unresolved.
    #[arg(long, default_value_t = 60)]
    drain_s: u64,
    #[arg(long, default_value_t = 60)]
    ready_timeout_s: u64,
    /// How long to wait for every instance's stock view to reach the ledger.
    #[arg(long, default_value_t = 30)]
    stock_read_wait_s: u64,
    /// Where ledger.json, stock.json, latency.hgrm, latency.svg and summary.json go.
    #[arg(long, default_value = "loadgen-report")]
    out_dir: PathBuf,
    /// Also (or instead) write the summary here.
    #[arg(long)]
    summary_json: Option<PathBuf>,
}

#[derive(Args)]
struct VerifyArgs {
    #[arg(long)]
    ledger: PathBuf,
    #[arg(long)]
    stock: PathBuf,
    #[arg(long)]
    summary_json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run_command(args),
        Command::Verify(args) => verify_command(args),
        Command::Bulk(args) => bulk::bulk(args).map(|()| true),
        Command::Chaos(args) => chaos::chaos(args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        // spec: Loadgen.ExitNonZeroOnViolation
        Ok(false) => ExitCode::from(2),
        Err(error) => {
            eprintln!("loadgen: error: {error:#}");
            ExitCode::from(1)
        }
    }
}

fn run_command(args: RunArgs) -> anyhow::Result<bool> {
    let run_prefix = match args.run_prefix {
        Some(prefix) => prefix,
        None => {
            let mut bytes = [0u8; 4];
            getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for the run prefix: {e}"))?;
            format!("lg{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
        }
    };
    let config = RunConfig {
        targets: args.targets,
        rate_per_s: args.rate,
        duration: Duration::from_secs(args.duration_s),
        warmup: Duration::from_secs(args.warmup_s),
        connections: args.connections,
        request_timeout: Duration::from_millis(args.request_timeout_ms),
        drain: Duration::from_secs(args.drain_s),
        ready_timeout: Duration::from_secs(args.ready_timeout_s),
        stock_read_wait: Duration::from_secs(args.stock_read_wait_s),
        workload: args.shape.config(run_prefix, args.duplicate_share, args.initial_stock),
    };
    std::fs::create_dir_all(&args.out_dir).with_context(|| format!("creating {}", args.out_dir.display()))?;
    let outcome = run(config)?;
    write_json(&args.out_dir.join("ledger.json"), &outcome.ledger)?;
    write_json(&args.out_dir.join("stock.json"), &outcome.tables)?;
    let verification = verify::verify(&outcome.ledger, &outcome.tables);
    report::print_table(&mut std::io::stdout().lock(), &outcome.figures, &verification)?;
    let hgrm = args.out_dir.join("latency.hgrm");
    report::write_hgrm(&hgrm, &outcome.figures.histogram).with_context(|| format!("writing {}", hgrm.display()))?;
    report::write_plot_svg(&args.out_dir.join("latency.svg"), &outcome.figures)?;
    let summary = report::summary_json(&outcome.figures, &verification);
    write_json(&args.out_dir.join("summary.json"), &summary)?;
    if let Some(path) = &args.summary_json {
        write_json(path, &summary)?;
    }
    eprintln!("loadgen: report in {}", args.out_dir.display());
    Ok(verification.ok())
}

fn verify_command(args: VerifyArgs) -> anyhow::Result<bool> {
    let ledger: Ledger = read_json(&args.ledger)?;
    let tables: Vec<StockTable> = read_json(&args.stock)?;
    let verification = verify::verify(&ledger, &tables);
    for check in &verification.checks {
        let verdict = if check.ok { "ok" } else { "VIOLATED" };
        println!("{:<24} {verdict:<9} {}", check.name, check.examples.first().map(String::as_str).unwrap_or(""));
    }
    println!("invariants: {}", if verification.ok() { "OK" } else { "VIOLATED" });
    if let Some(path) = &args.summary_json {
        write_json(
            path,
            &serde_json::json!({ "invariants_ok": verification.ok(), "invariants": verification.checks }),
        )?;
    }
    Ok(verification.ok())
}

/// Streamed through a buffer: a ledger of a long run is hundreds of MB as one string.
fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    serde_json::to_writer_pretty(&mut out, value).with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::flush(&mut out).with_context(|| format!("writing {}", path.display()))
}
