//! Fault reports as the operator sees them (spec: Clerk.FaultReported): an error line
//! naming the fields in which the copies differ, a line in `faults.jsonl`, and the last
//! few for status.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;

use serde_json::{json, Value};
use tracing::{error, warn};
use tribunal_federation::clerk::{FaultReport, InstanceId};

use crate::publish::json::OutputJson;

/// Fault reports listed in status (all are in `faults.jsonl`).
pub const STATUS_FAULTS: usize = 32;
/// Fault reports per differing instance that are decoded field by field and logged as
/// errors; past it (a diverged instance differs at every offset) each fault is still a
/// line in `faults.jsonl`, without the decoding, and the log gets one line per
/// `FAULT_LOG_EVERY`, so a fault does not slow certification down to a crawl.
const DETAILED_FAULTS_PER_INSTANCE: u64 = 100;
const FAULT_LOG_EVERY: u64 = 1_000;

/// Where fault reports go: the log, `faults.jsonl` (flushed by the tick) and status.
pub struct FaultLog {
    file: PathBuf,
    /// Opened on the first fault; flushed every tick.
    writer: Option<std::io::BufWriter<std::fs::File>>,
    /// Per differing instance, faults reported so far (bounded by the instance count).
    by_instance: BTreeMap<InstanceId, u64>,
    /// The last STATUS_FAULTS fault lines, for status.
    recent: VecDeque<Value>,
}

impl FaultLog {
    pub fn new(file: PathBuf) -> FaultLog {
        FaultLog { file, writer: None, by_instance: BTreeMap::new(), recent: VecDeque::new() }
    }

    /// spec: Clerk.FaultReported — an error line with the differing fields, a line in
    /// `faults.jsonl`, the counters and the status.
    pub fn record(&mut self, report: &FaultReport) {
        let mut seen = 0;
        for instance in &report.differing {
            let count = self.by_instance.entry(*instance).or_insert(0);
            *count += 1;
            seen = seen.max(*count);
        }
        let detailed = seen <= DETAILED_FAULTS_PER_INSTANCE;
        let line = if detailed { fault_json(report) } else { fault_json_brief(report) };
        if detailed {
            error!(
                partition = report.partition,
                offset = report.offset,
                kind = ?report.kind,
                differing = ?report.differing,
                detail = %line["differing_fields"],
                "detected fault: output copies differ"
            );
        } else if seen % FAULT_LOG_EVERY == 0 {
            error!(
                differing = ?report.differing,
                faults = seen,
                "detected faults keep coming from the same instance (all in faults.jsonl)"
            );
        }
        self.append(&line);
        if self.recent.len() == STATUS_FAULTS {
            self.recent.pop_front();
        }
        self.recent.push_back(line);
        assert!(self.recent.len() <= STATUS_FAULTS);
    }

    fn append(&mut self, line: &Value) {
        if self.writer.is_none() {
            match std::fs::OpenOptions::new().create(true).append(true).open(&self.file) {
                Ok(file) => self.writer = Some(std::io::BufWriter::new(file)),
                Err(e) => warn!("could not open {}: {e}", self.file.display()),
            }
        }
        if let Some(writer) = &mut self.writer {
            if let Err(e) = writeln!(writer, "{line}") {
                warn!("could not append to {}: {e}", self.file.display());
                self.writer = None;
            }
        }
    }

    pub fn flush(&mut self) {
        if let Some(writer) = &mut self.writer {
            if let Err(e) = writer.flush() {
                warn!("could not append to {}: {e}", self.file.display());
                self.writer = None;
            }
        }
    }

    /// The last fault lines, newest first.
    pub fn recent(&self) -> Vec<Value> {
        self.recent.iter().rev().cloned().collect()
    }
}

/// A fault as JSON without decoding the outputs: for the stream of faults from an
/// instance that already differs everywhere.
fn fault_json_brief(report: &FaultReport) -> Value {
    let mut line = fault_json_head(report);
    line["differing_fields"] = json!("not decoded: this instance already differed many times");
    line
}

fn fault_json_head(report: &FaultReport) -> Value {
    let digests: serde_json::Map<String, Value> =
        report.digests.iter().map(|(id, d)| (id.to_string(), Value::String(format!("{d:032x}")))).collect();
    json!({
        "partition": report.partition,
        "offset": report.offset,
        "kind": format!("{:?}", report.kind),
        "differing": report.differing,
        "digests": digests,
    })
}

/// A fault as JSON, with the fields in which the two outputs differ.
fn fault_json(report: &FaultReport) -> Value {
    let mut line = fault_json_head(report);
    line["differing_fields"] = differing_fields(report.own_output.as_deref(), report.differing_output.as_deref());
    line
}

/// Names what differs: decoded fields when both outputs decode, else which one does not
/// and the first differing byte.
fn differing_fields(own: Option<&[u8]>, other: Option<&[u8]>) -> Value {
    let (Some(own), Some(other)) = (own, other) else {
        return json!("bytes not held (a certified digest or a late copy)");
    };
    let decode = |b: &[u8]| OutputJson::from_bytes(b).map(|j| serde_json::to_value(j).expect("serialises"));
    let first_byte = own.iter().zip(other).position(|(a, b)| a != b).unwrap_or(own.len().min(other.len()));
    match (decode(own), decode(other)) {
        (Ok(a), Ok(b)) => {
            let mut fields = Vec::new();
            diff("", &a, &b, &mut fields);
            json!({"fields": fields, "first_differing_byte": first_byte})
        }
        (Ok(_), Err(e)) => json!({"other_copy": format!("does not decode: {e}"), "first_differing_byte": first_byte}),
        (Err(e), Ok(_)) => json!({"own_copy": format!("does not decode: {e}"), "first_differing_byte": first_byte}),
        (Err(e), Err(_)) => json!({"both": format!("do not decode: {e}"), "first_differing_byte": first_byte}),
    }
}

fn diff(path: &str, a: &Value, b: &Value, out: &mut Vec<Value>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for key in keys {
                let null = Value::Null;
                diff(&format!("{path}/{key}"), x.get(key).unwrap_or(&null), y.get(key).unwrap_or(&null), out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                diff(&format!("{path}/{i}"), p, q, out);
            }
        }
        _ if a != b => out.push(json!({"field": path, "own": a, "other": b})),
        _ => {}
    }
}
