//! `tribunal evaluate`: run a JSON-lines command log through the sans-IO core on N
//! simulated shards, and check it against the sequential reference interpreter.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;
use tribunal_shards::envelope::MAX_RECORD_BYTES;
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
    /// Log timestamp step between records, in ms (drives stream time and so the TTL);
    /// 0..=86400000 (one day).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=MAX_MS_PER_RECORD))]
    ms_per_record: u64,
    /// Idempotency TTL in stream-time milliseconds.
    #[arg(long, default_value_t = WardenConfig::default().ttl_ms, value_parser = clap::value_parser!(u64).range(1..))]
    ttl_ms: u64,
    /// Seed of the simulated message interleaving between shards.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Digest only the outputs after this offset (to compare with `tribunal inspect` of
    /// an instance whose snapshot replaced the older Ledger segments).
    #[arg(long)]
    outputs_after: Option<u64>,
    /// Print the summary and the whole stock table as JSON.
    #[arg(long)]
    json: bool,
}

/// Largest `--ms-per-record`: one day.
const MAX_MS_PER_RECORD: u64 = 86_400_000;
/// Most records `read_log` reserves room for up front, whatever the log's head claims.
const MAX_PREALLOCATED_RECORDS: u64 = 1 << 20;

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
    stock: Vec<crate::cli::stock_table::StockRow>,
}

fn read_records(input: &str, ms_per_record: u64) -> anyhow::Result<Vec<Record>> {
    let reader: Box<dyn Read> = if input == "-" {
        Box::new(std::io::stdin())
    } else {
        let path = PathBuf::from(input);
        Box::new(std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?)
    };
    records_from(BufReader::new(reader), ms_per_record)
}

/// One record per non-blank line. A line longer than a record keeps only its first
/// `MAX_RECORD_BYTES + 1` bytes: enough for the core to call it `record_too_large`, like
/// `tribunal log append` refuses it, without holding it whole.
fn records_from(mut input: impl BufRead, ms_per_record: u64) -> anyhow::Result<Vec<Record>> {
    let mut records = Vec::new();
    let mut line_number = 0u64;
    loop {
        line_number += 1;
        let mut line = Vec::new();
        let Some(blank) = read_line_bounded(&mut input, &mut line, MAX_RECORD_BYTES + 1)
            .with_context(|| format!("reading line {line_number}"))?
        else {
            break;
        };
        if blank {
            continue;
        }
        let offset = records.len() as u64;
        let timestamp_ms = offset.checked_mul(ms_per_record).with_context(|| {
            format!("line {line_number}: timestamp {offset} x {ms_per_record} ms overflows u64; lower --ms-per-record")
        })?;
        records.push(Record { partition: 0, offset, timestamp_ms, payload: line });
    }
    Ok(records)
}

/// Reads one line into `line` (without its `\n`), keeping at most `max_kept` bytes of it
/// and consuming the rest. `None` at the end of the input, else whether the whole line,
/// kept or not, is ASCII whitespace.
fn read_line_bounded(input: &mut impl BufRead, line: &mut Vec<u8>, max_kept: usize) -> std::io::Result<Option<bool>> {
    let mut blank = true;
    let mut read_any = false;
    loop {
        let buffer = match input.fill_buf() {
            Ok(buffer) => buffer,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        if buffer.is_empty() {
            return Ok(read_any.then_some(blank));
        }
        read_any = true;
        let newline = buffer.iter().position(|b| *b == b'\n');
        let part = &buffer[..newline.unwrap_or(buffer.len())];
        blank &= part.iter().all(u8::is_ascii_whitespace);
        let room = max_kept.saturating_sub(line.len());
        line.extend_from_slice(&part[..part.len().min(room)]);
        let consumed = newline.map_or(buffer.len(), |at| at + 1);
        input.consume(consumed);
        if newline.is_some() {
            return Ok(Some(blank));
        }
    }
}

fn read_log(spec: &str) -> anyhow::Result<Vec<Record>> {
    let Some(dir) = spec.strip_prefix("local:") else {
        anyhow::bail!("--log {spec:?}: only local:DIR is supported");
    };
    let log = crate::log::local::LocalLog::open(dir).with_context(|| format!("opening the log {dir}"))?;
    let end = log.end_offset()?;
    let mut reader = log.reader(0)?;
    // The head is read from disk: reserve no more than a bounded amount on its word.
    let mut records = Vec::with_capacity(usize::try_from(end.min(MAX_PREALLOCATED_RECORDS)).unwrap_or(0));
    while (records.len() as u64) < end {
        if reader.poll(65_536, &mut records)? == 0 {
            break;
        }
    }
    records.truncate(usize::try_from(end).unwrap_or(usize::MAX));
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
    let outputs_digest = tribunal_shards::digest::outputs_digest(
        sim.outputs()
            .iter()
            .filter(|((_, offset), _)| args.outputs_after.is_none_or(|after| *offset > after))
            .map(|((_, o), out)| (*o, out.digest)),
    );

    let stock = crate::cli::stock_table::rows(sim.entities(0));
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
    println!("outputs digest   {}", summary.outputs_digest);
    match summary.first_disagreement_offset {
        None if summary.reference_agrees => println!("reference        agrees (every output and the final state)"),
        None => println!("reference        DISAGREES on the final state"),
        Some(offset) => println!("reference        DISAGREES from offset {offset}"),
    }
    println!("core time        {} ms (simulated shards on one thread)", summary.elapsed_ms);
    crate::cli::stock_table::print("stock", &summary.stock);
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn ms_per_record_is_bounded_by_clap() {
        assert!(Cli::try_parse_from(["evaluate", "--ms-per-record", "86400000"]).is_ok());
        for bad in ["86400001", "18446744073709551615"] {
            let error = Cli::try_parse_from(["evaluate", "--ms-per-record", bad]).err().expect(bad);
            assert!(error.to_string().contains("--ms-per-record"), "{error}");
        }
    }

    #[test]
    fn a_timestamp_past_u64_is_an_error_not_a_panic() {
        let input = b"a\nb\nc\n".as_slice();
        let records = records_from(input, u64::MAX / 2).unwrap();
        assert_eq!(records.iter().map(|r| r.timestamp_ms).collect::<Vec<_>>(), [0, u64::MAX / 2, u64::MAX - 1]);
        let error = records_from(b"a\nb\nc\nd\n".as_slice(), u64::MAX / 2).unwrap_err();
        assert!(format!("{error:#}").contains("line 4: timestamp 3 x"), "{error:#}");
    }

    #[test]
    fn lines_are_held_up_to_one_byte_past_a_record() {
        let mut input = vec![b'x'; 3 * MAX_RECORD_BYTES];
        input.extend_from_slice(b"\r\n   \t\n");
        input.extend_from_slice(&vec![b' '; 2 * MAX_RECORD_BYTES]);
        input.extend_from_slice(b"\nlast");
        let records = records_from(std::io::BufReader::with_capacity(1_000, input.as_slice()), 1).unwrap();
        let payloads: Vec<&[u8]> = records.iter().map(|r| r.payload.as_slice()).collect();
        assert_eq!(payloads.len(), 2, "blank lines, however long, are skipped");
        assert_eq!(payloads[0], vec![b'x'; MAX_RECORD_BYTES + 1].as_slice());
        assert_eq!(payloads[1], b"last");
        assert_eq!(records[1].offset, 1);
    }

    #[test]
    fn an_over_long_line_becomes_a_record_too_large_output() {
        use tribunal_shards::envelope::{malformed, Envelope};
        let mut input = vec![b'{'; MAX_RECORD_BYTES + 10];
        input.push(b'\n');
        let records = records_from(input.as_slice(), 1).unwrap();
        let error = Envelope::<Inventory>::decode(&records[0].payload).unwrap_err();
        assert_eq!(error.code(), malformed::RECORD_TOO_LARGE);
    }
}
