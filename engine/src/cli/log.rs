//! `tribunal log`: append commands to an input log, and print its records.
//!
//! `append` is how commands get into a log until the Gateway exists: one envelope per
//! line, the same bytes on the local log and on Kafka. Every line is checked before
//! anything is appended, so a bad line means nothing is appended and the input can be
//! fixed and appended again without duplicating its good lines. On the local log the
//! whole input is one atomic batch. Kafka has no transactions here, so a broker failure
//! part-way leaves a prefix appended; appending the same input again is then safe,
//! because each line carries an idempotency key and repeated keys become replays.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tribunal_shards::envelope::{Envelope, MAX_RECORD_BYTES};
use tribunal_shards::inventory::Inventory;

use crate::log::local::{
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
    /// Switch a local log written by an older release (format 2) to format 3, whose
    /// appends take one fdatasync instead of two. Run it once every process that opens
    /// the log runs this release: an older one refuses a format 3 log. Safe to repeat.
    Upgrade(UpgradeArgs),
}

#[derive(clap::Args)]
struct UpgradeArgs {
    /// The local log: `local:DIR`.
    #[arg(long, value_parser = parse_log)]
    log: LogArg,
}

#[derive(clap::Args)]
struct AppendArgs {
    /// The input log: `local:DIR` (created if missing) or `kafka:HOST:PORT[,..]` (topics
    /// created if missing).
    #[arg(long, value_parser = parse_log)]
    log: LogArg,
    #[command(flatten)]
    kafka: crate::cli::KafkaArgs,
    /// Kafka: put every record in this partition, instead of choosing by idempotency key.
    #[arg(long)]
    partition: Option<u32>,
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
    /// The input log: `local:DIR` or `kafka:HOST:PORT[,..]`.
    #[arg(long, value_parser = parse_log)]
    log: LogArg,
    /// Kafka: the topic to read (default: the commands topic); the outputs topic works too.
    #[arg(long)]
    topic: Option<String>,
    #[command(flatten)]
    kafka: crate::cli::KafkaArgs,
    /// First offset to print (of every partition, on Kafka).
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

#[derive(Debug, Clone)]
enum LogArg {
    Local(PathBuf),
    /// The whole `kafka:..` argument.
    Kafka(String),
}

fn parse_log(value: &str) -> Result<LogArg, String> {
    match value.split_once(':') {
        Some(("local", dir)) if !dir.is_empty() => Ok(LogArg::Local(PathBuf::from(dir))),
        Some(("local", _)) => Err("expected local:DIR, with a directory after the colon".into()),
        Some(("kafka", _)) if crate::log::kafka::parse_brokers(value).is_some() => Ok(LogArg::Kafka(value.into())),
        Some(("kafka", _)) => Err("expected kafka:HOST:PORT[,HOST:PORT..]".into()),
        _ => Err(format!("unknown log {value:?}: expected local:DIR or kafka:HOST:PORT[,..]")),
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        LogCommand::Append(args) => append(args),
        LogCommand::Read(args) => read(args),
        LogCommand::Upgrade(args) => upgrade(args),
    }
}

fn upgrade(args: UpgradeArgs) -> anyhow::Result<ExitCode> {
    let LogArg::Local(dir) = &args.log else {
        anyhow::bail!("upgrade is for the local log; a Kafka topic has no Tribunal format");
    };
    // Upgrading must not create a log where there was none.
    anyhow::ensure!(dir.join("head").is_file(), "no log at {} (it has no head file)", dir.display());
    let log = LocalLog::open(dir).with_context(|| format!("opening the log {}", dir.display()))?;
    if log.upgrade().with_context(|| format!("upgrading the log {}", dir.display()))? {
        println!("upgraded {} to format 3", dir.display());
    } else {
        println!("{} is already in format 3", dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn append(args: AppendArgs) -> anyhow::Result<ExitCode> {
    let (payloads, malformed) = read_payloads(&args)?;
    refuse_malformed(&args.input, &malformed)?;

    let mut out = BufWriter::new(std::io::stdout().lock());
    match &args.log {
        LogArg::Local(dir) => {
            anyhow::ensure!(args.partition.is_none(), "--partition is for Kafka; the local log has one partition");
            let log = LocalLog::open_with(dir, args.segment_max_size_bytes)?;
            for offset in log.append(&payloads)? {
                writeln!(out, "{offset}")?;
            }
        }
        LogArg::Kafka(spec) => append_kafka(&args, spec, payloads, &mut out)?,
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Malformed input lines, as (line number, reason).
type MalformedLines = Vec<(usize, String)>;

/// Reads and checks the input's non-blank lines: the payloads to append and the
/// malformed lines, as (line number, reason). Fails on a read error, or when a
/// local log's batch would exceed the most one append takes.
fn read_payloads(args: &AppendArgs) -> anyhow::Result<(Vec<Vec<u8>>, MalformedLines)> {
    let input: Box<dyn Read> = if args.input == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(&args.input).with_context(|| format!("opening {}", args.input))?)
    };
    let mut input = BufReader::new(input);
    let mut payloads = Vec::new();
    let mut malformed: MalformedLines = Vec::new();
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
        if matches!(args.log, LogArg::Local(_)) && batch_size_bytes > MAX_BATCH_SIZE_BYTES {
            anyhow::bail!(
                "{} holds more than {MAX_BATCH_SIZE_BYTES} bytes of records, the most one append takes; \
                 split it (nothing was appended)",
                args.input
            );
        }
        payloads.push(line.clone());
    }
    Ok((payloads, malformed))
}

/// Describes the first malformed lines on stderr and fails if there is any.
fn refuse_malformed(input: &str, malformed: &[(usize, String)]) -> anyhow::Result<()> {
    if !malformed.is_empty() {
        for (number, reason) in malformed.iter().take(MAX_REPORTED_LINES) {
            eprintln!("tribunal: {input}: line {number}: {reason}");
        }
        if malformed.len() > MAX_REPORTED_LINES {
            eprintln!("tribunal: ... and {} more", malformed.len() - MAX_REPORTED_LINES);
        }
        anyhow::bail!("{} malformed line(s) in {input}; nothing was appended", malformed.len());
    }
    Ok(())
}

/// Appends the payloads to Kafka, keyed by idempotency key, and prints each one's
/// `partition:offset` (`partition:?` when the broker gave no usable offset).
fn append_kafka(args: &AppendArgs, spec: &str, payloads: Vec<Vec<u8>>, out: &mut impl Write) -> anyhow::Result<()> {
    let config = args.kafka.config(spec)?;
    // The idempotency key is the Kafka key: retries of a key reach the same
    // partition, so the same Warden (spec: KafkaLog.AppendIdempotent).
    let keyed: Vec<(Option<String>, Vec<u8>)> = payloads
        .into_iter()
        .map(|payload| (Envelope::<Inventory>::decode(&payload).ok().map(|e| e.key), payload))
        .collect();
    let mut unknown = 0;
    for (partition, offset) in crate::log::kafka::tool::append(&config, &keyed, args.partition)? {
        match offset {
            Some(offset) => writeln!(out, "{partition}:{offset}")?,
            // spec: KafkaLog.DeliveredOffsetUnknown
            None => {
                unknown += 1;
                writeln!(out, "{partition}:?")?;
            }
        }
    }
    if unknown > 0 {
        eprintln!(
            "tribunal log append: {unknown} record(s) were acknowledged without a usable offset (a \
             retried copy the broker already held, or an implied acknowledgement); each is in the log \
             (printed as partition:?)"
        );
    }
    Ok(())
}

fn read(args: ReadArgs) -> anyhow::Result<ExitCode> {
    let dir = match &args.log {
        LogArg::Local(dir) => dir,
        LogArg::Kafka(spec) => {
            let config = args.kafka.config(spec)?;
            let topic = args.topic.as_deref().unwrap_or(&config.commands_topic);
            let mut out = BufWriter::new(std::io::stdout().lock());
            crate::log::kafka::tool::read_topic(&config.brokers, topic, args.from, |record| {
                serde_json::to_writer(&mut out, &record)?;
                writeln!(out)?;
                Ok(())
            })?;
            out.flush()?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    anyhow::ensure!(args.topic.is_none(), "--topic is for Kafka");
    // Reading must not create a log where there was none.
    anyhow::ensure!(dir.is_dir(), "no log at {}", dir.display());
    let log = LocalLog::open(dir)?;
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
