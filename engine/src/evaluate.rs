//! `tribunal evaluate`: run a JSON-lines command log through the sans-IO core on N
//! simulated shards, and check it against the sequential reference interpreter.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use tribunal_shards::inventory::Inventory;
use tribunal_shards::output::Output;
use tribunal_shards::reference::Reference;
use tribunal_shards::simulator::{Simulator, SimulatorConfig};
use tribunal_shards::usher::Record;
use tribunal_shards::warden::WardenConfig;

#[derive(clap::Args)]
pub struct Args {
    /// JSON-lines file of command envelopes, or `-` for standard input. Blank lines
    /// are skipped; every other line is one log record (a line that does not decode
    /// gets a `malformed` output, like any bad record).
    #[arg(default_value = "-", conflicts_with = "log")]
    input: String,
    /// Read the records, with their timestamps, from an input log (`local:DIR`)
    /// instead: the reference answer for what `tribunal run` on that log must produce.
    #[arg(long)]
    log: Option<String>,
    /// Number of shards (1..=64).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    shards: u16,
    /// Records per batch.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    batch: u64,
    /// Log timestamp step between records, in ms (drives stream time and so the TTL).
    #[arg(long, default_value_t = 1)]
    ms_per_record: u64,
    /// Idempotency TTL in stream-time milliseconds.
    #[arg(long, default_value_t = WardenConfig::default().ttl_ms, value_parser = clap::value_parser!(u64).range(1..))]
    ttl_ms: u64,
    /// Seed of the simulated message interleaving between shards.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the summary and the whole stock table as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct StockRow {
    warehouse: String,
    sku: String,
    qty: u64,
}

#[derive(Serialize)]
struct Summary {
    records: u64,
    shards: u16,
    verdicts: BTreeMap<&'static str, u64>,
    state_digest: String,
    reference_agrees: bool,
    first_disagreement_offset: Option<u64>,
    outputs_digest: String,
    elapsed_ms: u128,
    stock: Vec<StockRow>,
}

fn read_records(input: &str, ms_per_record: u64) -> anyhow::Result<Vec<Record>> {
    let reader: Box<dyn Read> = if input == "-" {
        Box::new(std::io::stdin())
    } else {
        let path = PathBuf::from(input);
        Box::new(std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?)
    };
    let mut records = Vec::new();
    for (index, line) in BufReader::new(reader).split(b'\n').enumerate() {
        let line = line.with_context(|| format!("reading line {}", index + 1))?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let offset = records.len() as u64;
        records.push(Record { partition: 0, offset, timestamp_ms: offset * ms_per_record, payload: line });
    }
    Ok(records)
}

fn read_log(spec: &str) -> anyhow::Result<Vec<Record>> {
    let Some(dir) = spec.strip_prefix("local:") else {
        anyhow::bail!("--log {spec:?}: only local:DIR is supported");
    };
    let log = crate::local_log::LocalLog::open(dir).with_context(|| format!("opening the log {dir}"))?;
    let end = log.end_offset()?;
    let mut reader = log.reader(0)?;
    let mut records = Vec::with_capacity(end as usize);
    while (records.len() as u64) < end {
        if reader.poll(65_536, &mut records)? == 0 {
            break;
        }
    }
    records.truncate(end as usize);
    Ok(records)
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let records = match &args.log {
        Some(spec) => read_log(spec)?,
        None => read_records(&args.input, args.ms_per_record)?,
    };
    let warden = WardenConfig { ttl_ms: args.ttl_ms, ..WardenConfig::default() };
    let started = Instant::now();
    let mut sim = Simulator::<Inventory>::new(SimulatorConfig::new(args.shards, warden, args.seed));
    for batch in records.chunks(args.batch as usize) {
        sim.process_batch(batch).map_err(|halted| anyhow::anyhow!("the core halted: {halted}"))?;
    }
    let elapsed_ms = started.elapsed().as_millis();

    let mut reference = Reference::<Inventory>::new(warden, 1);
    let mut first_disagreement_offset = None;
    let mut verdicts: BTreeMap<&'static str, u64> = BTreeMap::new();
    for record in &records {
        let expected = reference.apply(record).map_err(|halted| anyhow::anyhow!("the reference halted: {halted}"))?;
        let actual = &sim.outputs()[&(0, record.offset)];
        if actual.bytes != expected.bytes && first_disagreement_offset.is_none() {
            first_disagreement_offset = Some(record.offset);
        }
        let output = Output::decode(&actual.bytes).context("decoding an output the core produced")?;
        *verdicts.entry(output.verdict.name()).or_default() += 1;
    }
    let reference_agrees = first_disagreement_offset.is_none() && reference.state_digest() == sim.state_digest();
    let outputs_digest =
        tribunal_shards::digest::outputs_digest(sim.outputs().iter().map(|((_, o), out)| (*o, out.digest)));

    let stock: Vec<StockRow> = sim
        .entities(0)
        .into_iter()
        .map(|(key, qty)| StockRow { warehouse: key.warehouse.to_string(), sku: key.sku.to_string(), qty })
        .collect();
    let summary = Summary {
        records: records.len() as u64,
        shards: args.shards,
        verdicts,
        state_digest: format!("{:032x}", sim.state_digest()),
        reference_agrees,
        first_disagreement_offset,
        outputs_digest: format!("{outputs_digest:032x}"),
        elapsed_ms,
        stock,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary).context("encoding the summary")?);
    } else {
        print_table(&summary);
    }
    Ok(if reference_agrees { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn print_table(summary: &Summary) {
    println!("records          {}", summary.records);
    println!("shards           {}", summary.shards);
    for (verdict, count) in &summary.verdicts {
        println!("  {verdict:<15} {count}");
    }
    println!("state digest     {}", summary.state_digest);
    match summary.first_disagreement_offset {
        None if summary.reference_agrees => println!("reference        agrees (every output and the final state)"),
        None => println!("reference        DISAGREES on the final state"),
        Some(offset) => println!("reference        DISAGREES from offset {offset}"),
    }
    println!("core time        {} ms (simulated shards on one thread)", summary.elapsed_ms);
    let total: u128 = summary.stock.iter().map(|r| u128::from(r.qty)).sum();
    println!("stock            {} (warehouse, sku) levels, {} units in all", summary.stock.len(), total);
    for row in summary.stock.iter().take(10) {
        println!("  {:<10} {:<12} {}", row.warehouse, row.sku, row.qty);
    }
    if summary.stock.len() > 10 {
        println!("  ... ({} more; --json prints them all)", summary.stock.len() - 10);
    }
}
