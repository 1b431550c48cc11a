//! `tribunal log`: append commands to an input log, and print its records.
//!
//! `append` is how commands get into a `local:DIR` log until the Gateway exists: one
//! envelope per line, the same bytes Kafka will carry. The whole input is one batch, so a
//! bad line means nothing is appended and the input can be fixed and appended again
//! without duplicating its good lines.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tribunal_shards::envelope::{Envelope, MAX_RECORD_BYTES};
use tribunal_shards::inventory::Inventory;

use crate::local_log::{
    LocalLog, DEFAULT_SEGMENT_MAX_SIZE_BYTES, MAX_BATCH_SIZE_BYTES, RECORD_HEADER_SIZE_BYTES,
    SEGMENT_MAX_SIZE_BYTES_RANGE,
};

/// How many malformed lines `append` describes before it only counts them.
const MAX_REPORTED_LINES: usize = 10;
/// Records `read` asks the reader for at a time.
const READ_BATCH_RECORDS: usize = 1024;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: LogCommand,
}

#[derive(clap::Subcommand)]
enum LogCommand {
    /// Append JSON-lines command envelopes as one batch and print their offsets, one per
    /// line. Blank lines are skipped. If any line is malformed, nothing is appended.
    Append(AppendArgs),
    /// Print the records from an offset to the current end of the log, one JSON object
    /// per line: {"offset":..,"timestamp_ms":..,"payload":".."}.
    Read(ReadArgs),
}

#[derive(clap::Args)]
struct AppendArgs {
    /// The input log: `local:DIR` (created if missing). `kafka:BROKERS` is not supported yet.
    #[arg(long, value_parser = parse_log)]
    log: PathBuf,
    /// File of one command envelope per line, or `-` for standard input.
    #[arg(default_value = "-")]
    input: String,
    /// Append every non-blank line as raw bytes, without checking that it decodes (the
    /// engine gives such records a `malformed` output).
    #[arg(long)]
    unchecked: bool,
    /// Size in bytes past which a segment file is not extended and a new one starts.
    #[arg(long, default_value_t = DEFAULT_SEGMENT_MAX_SIZE_BYTES,
          value_parser = clap::value_parser!(u64).range(SEGMENT_MAX_SIZE_BYTES_RANGE))]
    segment_max_size_bytes: u64,
}

#[derive(clap::Args)]
struct ReadArgs {
    /// The input log: `local:DIR`.
    #[arg(long, value_parser = parse_log)]
    log: PathBuf,
    /// First offset to print.
    #[arg(long, default_value_t = 0)]
    from: u64,
}

/// One record as `read` prints it (a payload that is not UTF-8 is shown lossily).
#[derive(serde::Serialize)]
struct ReadLine<'a> {
    offset: u64,
    timestamp_ms: u64,
    payload: &'a str,
}

/// `local:DIR` is the only log this build has.
fn parse_log(value: &str) -> Result<PathBuf, String> {
    match value.split_once(':') {
        Some(("local", dir)) if !dir.is_empty() => Ok(PathBuf::from(dir)),
        Some(("local", _)) => Err("expected local:DIR, with a directory after the colon".into()),
        Some(("kafka", _)) => Err("the Kafka log is not supported yet; use --log local:DIR".into()),
        _ => Err(format!("unknown log {value:?}: expected local:DIR")),
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        LogCommand::Append(args) => append(args),
        LogCommand::Read(args) => read(args),
    }
}

fn append(args: AppendArgs) -> anyhow::Result<ExitCode> {
    let input: Box<dyn Read> = if args.input == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(&args.input).with_context(|| format!("opening {}", args.input))?)
    };
    let mut input = BufReader::new(input);
    let mut payloads = Vec::new();
    let mut malformed: Vec<(usize, String)> = Vec::new();
    let mut batch_size_bytes: u64 = 0;
    let mut line = Vec::new();
    let mut line_number = 0;
    loop {
        line_number += 1;
        line.clear();
        // Bounded read: a line longer than a record is refused without being held whole.
        let read = (&mut input)
            .take(MAX_RECORD_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .with_context(|| format!("reading line {line_number} of {}", args.input))?;
        if read == 0 {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        } else if line.len() > MAX_RECORD_BYTES {
            malformed.push((line_number, format!("longer than the {MAX_RECORD_BYTES}-byte record limit")));
            input.skip_until(b'\n').with_context(|| format!("reading line {line_number} of {}", args.input))?;
            continue;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if !args.unchecked {
            if let Err(error) = Envelope::<Inventory>::decode(&line) {
                malformed.push((line_number, error.to_string()));
                continue;
            }
        }
        batch_size_bytes += RECORD_HEADER_SIZE_BYTES + line.len() as u64;
        if batch_size_bytes > MAX_BATCH_SIZE_BYTES {
            anyhow::bail!(
                "{} holds more than {MAX_BATCH_SIZE_BYTES} bytes of records, the most one append takes; \
                 split it (nothing was appended)",
                args.input
            );
        }
        payloads.push(line.clone());
    }
    if !malformed.is_empty() {
        for (number, reason) in malformed.iter().take(MAX_REPORTED_LINES) {
            eprintln!("tribunal: {}: line {number}: {reason}", args.input);
        }
        if malformed.len() > MAX_REPORTED_LINES {
            eprintln!("tribunal: ... and {} more", malformed.len() - MAX_REPORTED_LINES);
        }
        anyhow::bail!("{} malformed line(s) in {}; nothing was appended", malformed.len(), args.input);
    }

    let log = LocalLog::open_with(&args.log, args.segment_max_size_bytes)?;
    let offsets = log.append(&payloads)?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    for offset in offsets {
        writeln!(out, "{offset}")?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn read(args: ReadArgs) -> anyhow::Result<ExitCode> {
    // Reading must not create a log where there was none.
    anyhow::ensure!(args.log.is_dir(), "no log at {}", args.log.display());
    let log = LocalLog::open(&args.log)?;
    let end_offset = log.end_offset()?;
    let mut reader = log.reader(args.from)?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut records = Vec::with_capacity(READ_BATCH_RECORDS);
    // Stop at the end seen at the start, so that `read` ends while appenders keep going.
    while reader.next_offset() < end_offset {
        records.clear();
        let polled = reader.poll(READ_BATCH_RECORDS, &mut records);
        for record in records.iter().filter(|record| record.offset < end_offset) {
            let line = ReadLine {
                offset: record.offset,
                timestamp_ms: record.timestamp_ms,
                payload: &String::from_utf8_lossy(&record.payload),
            };
            serde_json::to_writer(&mut out, &line)?;
            writeln!(out)?;
        }
        out.flush()?;
        anyhow::ensure!(polled? > 0, "the log ended at offset {} before {end_offset}", reader.next_offset());
    }
    Ok(ExitCode::SUCCESS)
}
