//! `loadgen bulk`: the engine's end-to-end rate without HTTP. N commands of the workload
//! are appended to the log first (`tribunal log append`), then a cluster processes the
//! pre-filled log until every record is certified and durable on every instance
//! (`tribunal cluster --stop-at-end`). The rate is measured by the engine itself
//! (status.json `processing_ms`: from ready to the last record certified, durable and
//! confirmed), not by the wrapper.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use crate::workload::{Generator, ShapeArgs};

#[derive(Args)]
pub struct BulkArgs {
    /// Commands to pre-fill the log with: the opening stock (--warehouses × --skus
    /// adjustments) first, then the mix.
    #[arg(long)]
    events: u64,
    /// The log: `local:DIR` (default: a `log` directory under --work-dir) or
    /// `kafka:HOST:PORT` (an empty broker: the default topics are used).
    #[arg(long)]
    log: Option<String>,
    /// Partitions of the Kafka topics, if they must be created.
    #[arg(long, default_value_t = 1)]
    kafka_partitions: u32,
    #[arg(long, default_value_t = 3)]
    instances: u32,
    #[arg(long, default_value_t = 2)]
    expected_copies: u32,
    /// The engine binary; default: `tribunal` next to this one.
    #[arg(long)]
    tribunal: Option<PathBuf>,
    /// Holds the commands, the local log and the cluster's data; must not exist yet or be empty.
    #[arg(long, default_value = "target/bench/bulk")]
    work_dir: PathBuf,
    #[command(flatten)]
    shape: ShapeArgs,
    #[arg(long)]
    summary_json: Option<PathBuf>,
}

pub fn bulk(args: BulkArgs) -> anyhow::Result<()> {
    let tribunal = prepare(&args)?;
    let log = args.log.clone().unwrap_or_else(|| format!("local:{}", args.work_dir.join("log").display()));

    let commands = args.work_dir.join("commands.jsonl");
    write_commands(&args, &commands)?;
    eprintln!("loadgen bulk: appending {} commands to {log}", args.events);
    let append_s = append(&args, &tribunal, &log, &commands)?;

    eprintln!("loadgen bulk: {} instances process the log until every record is certified", args.instances);
    let data_dir = args.work_dir.join("cluster");
    let wall_s = process(&args, &tribunal, &log, &data_dir)?;

    let (instances, slowest_ms) = instance_rates(&args, &data_dir)?;
    let rate = args.events as f64 * 1000.0 / slowest_ms as f64;
    println!(
        "{} events, {} instances, expected_copies {}: {rate:.0} certified, durable events/s",
        args.events, args.instances, args.expected_copies
    );
    println!("(slowest instance {slowest_ms} ms from ready to its last record certified; append {append_s:.1} s; cluster wall time {wall_s:.1} s)");
    if let Some(path) = &args.summary_json {
        let summary = json!({
            "events": args.events,
            "log": log,
            "instances": args.instances,
            "expected_copies": args.expected_copies,
            "certified_events_per_s": rate.round(),
            "slowest_processing_ms": slowest_ms,
            "per_instance": instances,
            "append_s": append_s,
            "cluster_wall_s": wall_s,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Finds the engine binary, checks the arguments and creates the (empty) work dir;
/// returns the binary's path.
fn prepare(args: &BulkArgs) -> anyhow::Result<PathBuf> {
    let tribunal = match &args.tribunal {
        Some(path) => path.clone(),
        None => std::env::current_exe().context("locating loadgen")?.with_file_name("tribunal"),
    };
    if !tribunal.is_file() {
        bail!("{} not found: build it (cargo build --release -p tribunal) or pass --tribunal", tribunal.display());
    }
    if args.work_dir.exists() && std::fs::read_dir(&args.work_dir)?.next().is_some() {
        bail!("{} is not empty: bulk needs a fresh log and fresh instances", args.work_dir.display());
    }
    let opening = u64::from(args.shape.warehouses) * u64::from(args.shape.skus);
    if args.events <= opening {
        bail!(
            "--events {} is no more than the opening stock ({opening} adjustments): the mix would never run",
            args.events
        );
    }
    std::fs::create_dir_all(&args.work_dir).with_context(|| format!("creating {}", args.work_dir.display()))?;
    Ok(tribunal)
}

/// Appends the commands file to the log with `tribunal log append`; the seconds it took.
fn append(args: &BulkArgs, tribunal: &Path, log: &str, commands: &Path) -> anyhow::Result<f64> {
    let started = Instant::now();
    let appended = Command::new(tribunal)
        .args(["log", "append", "--log", log, "--kafka-partitions", &args.kafka_partitions.to_string()])
        .arg(commands)
        .stdout(Stdio::null())
        .status()
        .context("running tribunal log append")?;
    if !appended.success() {
        bail!("tribunal log append failed: {appended}");
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Runs `tribunal cluster --stop-at-end` over the log until every record is certified
/// and durable (its stderr in `cluster.log`); the wall-clock seconds it took.
fn process(args: &BulkArgs, tribunal: &Path, log: &str, data_dir: &Path) -> anyhow::Result<f64> {
    let started = Instant::now();
    let cluster = Command::new(tribunal)
        .args(["cluster", "--instances", &args.instances.to_string(), "--log", log])
        .args(["--expected-copies", &args.expected_copies.to_string(), "--stop-at-end", "--snapshot-every", "0"])
        .arg("--data-dir")
        .arg(data_dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(args.work_dir.join("cluster.log"))?)
        .status()
        .context("running tribunal cluster")?;
    let wall_s = started.elapsed().as_secs_f64();
    if !cluster.success() {
        bail!("tribunal cluster failed ({cluster}); see {}", args.work_dir.join("cluster.log").display());
    }
    Ok(wall_s)
}

/// Each instance's processing time and rate, from its status.json, and the slowest
/// instance's processing time in milliseconds (at least 1).
fn instance_rates(args: &BulkArgs, data_dir: &Path) -> anyhow::Result<(Vec<serde_json::Value>, u64)> {
    let mut instances = Vec::new();
    let mut slowest_ms = 0u64;
    for id in 1..=args.instances {
        let status = data_dir.join(format!("instance-{id}")).join("status.json");
        let status: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&status).with_context(|| format!("reading {}", status.display()))?)?;
        let processing_ms = status["processing_ms"].as_u64().context("status.json without processing_ms")?.max(1);
        slowest_ms = slowest_ms.max(processing_ms);
        instances.push(json!({
            "instance": id,
            "processing_ms": processing_ms,
            "events_per_s": (args.events as f64 * 1000.0 / processing_ms as f64).round(),
        }));
    }
    Ok((instances, slowest_ms))
}

/// The commands as the envelopes `tribunal log append` takes, one per line.
fn write_commands(args: &BulkArgs, path: &Path) -> anyhow::Result<()> {
    let config = args.shape.config("bulk".into(), 0.0, 1_000);
    config.check()?;
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let mut generator = Generator::new(&config, 0);
    let opening = config.opening_stock();
    for n in 0..args.events {
        let command = match opening.get(n as usize) {
            Some(command) => command.clone(),
            None => generator.next_command(),
        };
        serde_json::to_writer(&mut out, &json!({ "v": 1, "key": format!("bulk-{n}"), "command": command }))?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}
