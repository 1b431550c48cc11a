//! One request of a run, from schedule to ledger: what a run is configured with, which
//! request is due next (a fresh key or a duplicate), how an attempt is judged and retried,
//! and how its final answer is recorded and measured (spec: specs/loadgen.allium). The
//! open loop (`open_loop.rs`) and the closed-loop opening stock (`run.rs`) share these rules.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use hyper::StatusCode;
use serde::Deserialize;
use tribunal_shards::inventory::InventoryCommand;

use crate::client::{Answer, AttemptError, Target};
use crate::ledger::{AnswerRecord, Decision, Ledger, LedgerEntry, Unresolved};
use crate::report::{RunFigures, TimelinePoint};
use crate::workload::{Generator, WorkloadConfig};

/// Highest latency the histograms hold (µs); a slower answer is recorded as this.
const HISTOGRAM_MAX_US: u64 = 120_000_000;
/// Answered keys a duplicate may be drawn from (the most recent ones): bounded, and recent
/// enough that the instance still holds the original answer.
const RECENT_KEYS: usize = 4096;
/// A duplicate resends only a key answered this recently: well inside the Warden's
/// 5-minute TTL, past which the cluster rightly treats the key as new.
const DUPLICATE_MAX_AGE: Duration = Duration::from_secs(120);
pub(crate) const BACKOFF_INITIAL: Duration = Duration::from_millis(20);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub targets: Vec<Target>,
    pub rate_per_s: f64,
    pub duration: Duration,
    pub warmup: Duration,
    pub connections: usize,
    pub request_timeout: Duration,
    /// After the schedule, how long retries may go on (spec: Loadgen.RetrySameKey).
    pub drain: Duration,
    pub ready_timeout: Duration,
    pub stock_read_wait: Duration,
    pub workload: WorkloadConfig,
}

impl RunConfig {
    pub fn check(&self) -> anyhow::Result<()> {
        if self.targets.is_empty() {
            bail!("give at least one --target");
        }
        if !(self.rate_per_s.is_finite() && self.rate_per_s > 0.0) {
            bail!("--rate must be a positive number of requests per second");
        }
        if self.connections == 0 {
            bail!("--connections must be at least 1");
        }
        if self.duration.is_zero() {
            bail!("--duration-s must be positive");
        }
        self.workload.check()
    }

    pub(crate) fn scheduled_requests(&self) -> u64 {
        ((self.warmup + self.duration).as_secs_f64() * self.rate_per_s).ceil() as u64
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule {
    pub(crate) start: Instant,
    pub(crate) measure_from: Instant,
    pub(crate) end: Instant,
}

pub(crate) struct State {
    pub(crate) ledger: Ledger,
    /// (ledger index, when answered) of the latest answered keys.
    pub(crate) recent: VecDeque<(usize, Instant)>,
    /// Final answers to the requests intended in the measured window (µs from intended time).
    pub(crate) histogram: Histogram<u64>,
    /// Per second of intended time (measured window): latency and errors.
    pub(crate) seconds: Vec<(Histogram<u64>, u64)>,
    pub(crate) status_counts: BTreeMap<String, u64>,
    pub(crate) retries: u64,
    pub(crate) duplicates: u64,
    pub(crate) answered: u64,
    pub(crate) errors: u64,
    pub(crate) last_measured_answer: Option<Instant>,
}

impl State {
    pub(crate) fn new(config: &RunConfig) -> Self {
        let seconds = config.duration.as_secs() as usize + 1;
        let histogram = || Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).expect("valid bounds");
        let second = || Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 2).expect("valid bounds");
        let expected = config.scheduled_requests() as usize;
        Self {
            ledger: Ledger {
                run_prefix: format!("{}-", config.workload.run_prefix),
                entries: Vec::with_capacity(expected),
                unresolved: Vec::new(),
                bad_answers: Vec::new(),
            },
            recent: VecDeque::with_capacity(RECENT_KEYS),
            histogram: histogram(),
            seconds: (0..seconds).map(|_| (second(), 0)).collect(),
            status_counts: BTreeMap::new(),
            retries: 0,
            duplicates: 0,
            answered: 0,
            errors: 0,
            last_measured_answer: None,
        }
    }

    pub(crate) fn record_entry(&mut self, key: String, command: InventoryCommand, answer: AnswerRecord) {
        let index = self.ledger.entries.len();
        self.ledger.entries.push(LedgerEntry { key, command, answer, duplicates: Vec::new() });
        if self.recent.len() == RECENT_KEYS {
            self.recent.pop_front();
        }
        self.recent.push_back((index, Instant::now()));
    }

    pub(crate) fn figures(&self, config: &RunConfig, schedule: Schedule) -> RunFigures {
        let window_s = match self.last_measured_answer {
            Some(last) => last.saturating_duration_since(schedule.measure_from).as_secs_f64(),
            None => 0.0,
        };
        let window_s = window_s.max(config.duration.as_secs_f64());
        let timeline = self
            .seconds
            .iter()
            .enumerate()
            .filter(|(_, (h, errors))| !h.is_empty() || *errors > 0)
            .map(|(t, (h, errors))| TimelinePoint {
                t_s: t as u32,
                answered: h.len(),
                errors: *errors,
                p50_us: h.value_at_quantile(0.5),
                p99_us: h.value_at_quantile(0.99),
                max_us: h.max(),
            })
            .collect();
        RunFigures {
            targets: config.targets.iter().map(|t| t.url.clone()).collect(),
            rate_target_per_s: config.rate_per_s,
            duration_s: config.duration.as_secs_f64(),
            warmup_s: config.warmup.as_secs_f64(),
            connections: config.connections,
            measured_requests: self.histogram.len(),
            achieved_rate_per_s: self.histogram.len() as f64 / window_s,
            histogram: self.histogram.clone(),
            timeline,
            status_counts: self.status_counts.clone(),
            retries: self.retries,
            duplicates: self.duplicates,
            unresolved: self.ledger.unresolved.len() as u64,
            workload: serde_json::to_value(&config.workload).unwrap_or_default(),
            cost: None,
        }
    }
}

/// spec: Loadgen.UniqueKeys — request n of connection c: a fresh key and command, or
/// an answered key resent with its body; (the resent ledger entry, key, command).
pub(crate) fn next_request(
    config: &RunConfig,
    state: &State,
    generator: &mut Generator,
    c: usize,
    n: u64,
) -> (Option<usize>, String, InventoryCommand) {
    let duplicate_of = if generator.wants_duplicate() {
        let pick = generator.pick(state.recent.len());
        let fresh = state.recent.get(pick).filter(|(_, answered_at)| answered_at.elapsed() < DUPLICATE_MAX_AGE);
        fresh.map(|(index, _)| *index)
    } else {
        None
    };
    let (key, command) = match duplicate_of {
        Some(index) => {
            let entry = &state.ledger.entries[index];
            (entry.key.clone(), entry.command.clone())
        }
        None => (format!("{}-{c}-{n}", config.workload.run_prefix), generator.next_command()),
    };
    (duplicate_of, key, command)
}

/// A scheduled request's identity, for its result.
pub(crate) struct Scheduled {
    pub(crate) intended: Instant,
    /// Its second of the measured window; None in the warm-up.
    pub(crate) second: Option<usize>,
    pub(crate) key: String,
    pub(crate) command: InventoryCommand,
    pub(crate) duplicate_of: Option<usize>,
}

/// Records a scheduled request's result: its latency if it is measured and final, and
/// its answer in the ledger (as an entry, a duplicate's answer, or unresolved).
pub(crate) fn record_result(state: &mut State, request: Scheduled, result: Result<Submitted, String>) {
    let Scheduled { intended, second, key, command, duplicate_of } = request;
    // spec: Loadgen.LatencyFromIntendedTime, Loadgen.WarmupExcluded — final answers only:
    // a command given up on is a violation, not a latency sample.
    let answered_at = Instant::now();
    let latency_us = (answered_at - intended).as_micros().min(u128::from(HISTOGRAM_MAX_US)) as u64;
    if let (Some(second), Ok(_)) = (second, &result) {
        state.histogram.saturating_record(latency_us.max(1));
        if let Some((h, _)) = state.seconds.get_mut(second) {
            h.saturating_record(latency_us.max(1));
        }
        state.last_measured_answer = Some(answered_at);
    }
    state.answered += 1;
    match (result, duplicate_of) {
        (Ok(answer), None) => {
            // spec: Loadgen.AnswersWellFormed — a fresh key cannot exist already.
            if answer.record.replayed && answer.first_attempt {
                let bad = format!("key {key} was a replay on its first submission: it existed before the run");
                state.ledger.bad_answers.push(bad);
            }
            state.record_entry(key, command, answer.record)
        }
        (Ok(answer), Some(index)) => {
            state.duplicates += 1;
            state.ledger.entries[index].duplicates.push(answer.record);
        }
        // spec: Loadgen.UnresolvedIsViolation
        (Err(last_error), _) => state.ledger.unresolved.push(Unresolved { key, command, last_error }),
    }
}

/// Jitter (up to half the backoff, from the key), so connections refused together do not
/// retry together.
pub(crate) fn retry_jitter(key: &str, attempt: u32, backoff: Duration) -> Duration {
    let spread = key.bytes().fold(u64::from(attempt), |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    Duration::from_nanos(spread % (backoff.as_nanos() as u64 / 2 + 1))
}

/// One attempt's label for the status counts, its outcome (the final answer's record, or
/// the error to retry after) and, for an unreadable final answer, the violation to record.
/// Err: a refusal that is final and not retried.
pub(crate) fn attempt_outcome(result: Result<Answer, AttemptError>, key: &str) -> Result<Attempt, String> {
    Ok(match result {
        Ok(answer) => {
            let label = status_label(answer.status);
            let final_answer = matches!(answer.status.as_u16(), 200 | 400 | 409 | 422);
            if final_answer {
                match parse_answer(answer.status, &answer.body) {
                    Ok(record) => Attempt { label, outcome: Ok(record), bad: None },
                    // spec: Loadgen.AnswersWellFormed — retried, and still a violation.
                    Err(e) => {
                        let bad = format!("key {key}: {label} with an unreadable body: {e}");
                        Attempt { label: Label::Borrowed("bad_answer"), outcome: Err(bad.clone()), bad: Some(bad) }
                    }
                }
            } else {
                let detail = String::from_utf8_lossy(&answer.body[..answer.body.len().min(200)]).into_owned();
                let retriable = answer.status.is_server_error() || answer.status == StatusCode::REQUEST_TIMEOUT;
                if !retriable {
                    return Err(format!("{label}: {detail}"));
                }
                let error = format!("{label}: {detail}");
                Attempt { label, outcome: Err(error), bad: None }
            }
        }
        Err(AttemptError::Timeout(t)) => {
            Attempt { label: Label::Borrowed("timeout"), outcome: Err(format!("no answer within {t:?}")), bad: None }
        }
        Err(e @ AttemptError::Connection(_)) => {
            Attempt { label: Label::Borrowed("connection_error"), outcome: Err(e.to_string()), bad: None }
        }
    })
}

/// One attempt, judged.
pub(crate) struct Attempt {
    /// Its label in the status counts.
    pub(crate) label: Label,
    /// The final answer's record, or the error to retry after.
    pub(crate) outcome: Result<AnswerRecord, String>,
    /// An unreadable final answer: the violation to record.
    pub(crate) bad: Option<String>,
}

/// An attempt's label in the status counts.
pub(crate) type Label = std::borrow::Cow<'static, str>;

/// The status counts' label of an HTTP status, without allocating for the usual ones.
fn status_label(status: StatusCode) -> Label {
    const USUAL: [&str; 9] = ["200", "400", "408", "409", "413", "422", "500", "503", "504"];
    match USUAL.iter().find(|s| **s == status.as_str()) {
        Some(usual) => Label::Borrowed(usual),
        None => Label::Owned(status.as_str().to_owned()),
    }
}

/// Counts an attempt in the figures: its label, an error (in its second too) and a retry.
pub(crate) fn count_attempt(state: &mut State, label: &str, failed: bool, attempt: u32, second: Option<usize>) {
    match state.status_counts.get_mut(label) {
        Some(count) => *count += 1,
        None => {
            state.status_counts.insert(label.to_owned(), 1);
        }
    }
    if failed {
        state.errors += 1;
        if let Some((_, errors)) = second.and_then(|s| state.seconds.get_mut(s)) {
            *errors += 1;
        }
    }
    if attempt > 0 {
        state.retries += 1;
    }
}

/// A final answer, and whether the very first attempt got it.
pub(crate) struct Submitted {
    pub(crate) record: AnswerRecord,
    pub(crate) first_attempt: bool,
}

/// The parts of a movement answer loadgen keeps.
#[derive(Deserialize)]
struct MovementAnswer {
    partition: Option<u32>,
    offset: Option<u64>,
    verdict: Option<String>,
    code: Option<String>,
    original_offset: Option<u64>,
    #[serde(default)]
    replayed: bool,
    #[serde(default)]
    digest: String,
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
struct ErrorBody {
    code: String,
}

fn parse_answer(status: StatusCode, body: &[u8]) -> anyhow::Result<AnswerRecord> {
    let answer: MovementAnswer = serde_json::from_slice(body)?;
    let (Some(partition), Some(offset)) = (answer.partition, answer.offset) else {
        bail!("no partition and offset");
    };
    let verdict = answer.verdict.as_deref().unwrap_or_default();
    let (decision, offset) = match (status.as_u16(), verdict) {
        (200, "accepted") => (Some(Decision::Accepted), offset),
        (422, "rejected") => (Some(Decision::Rejected), offset),
        // The instance no longer holds the original's answer: only its offset is known.
        (200, "replay") => (None, answer.original_offset.context("a replay without original_offset")?),
        (409 | 400, _) => (None, answer.original_offset.unwrap_or(offset)),
        (status, verdict) => bail!("status {status} with verdict {verdict:?}"),
    };
    Ok(AnswerRecord {
        http_status: status.as_u16(),
        partition,
        offset,
        decision,
        code: answer.code.or(answer.error.map(|e| e.code)),
        replayed: answer.replayed,
        digest: answer.digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_become_ledger_records() {
        let accepted =
            br#"{"key":"k","partition":0,"offset":7,"verdict":"accepted","version":1,"digest":"ab","replayed":false}"#;
        let record = parse_answer(StatusCode::OK, accepted).unwrap();
        assert_eq!((record.offset, record.decision, record.replayed), (7, Some(Decision::Accepted), false));

        let rejected = br#"{"partition":0,"offset":9,"verdict":"rejected","code":"insufficient_stock","digest":"cd","replayed":true,"replay_offset":12,"error":{"code":"insufficient_stock","message":"m"}}"#;
        let record = parse_answer(StatusCode::UNPROCESSABLE_ENTITY, rejected).unwrap();
        assert_eq!((record.offset, record.decision, record.replayed), (9, Some(Decision::Rejected), true));
        assert_eq!(record.code.as_deref(), Some("insufficient_stock"));

        let evicted =
            br#"{"partition":0,"offset":40,"verdict":"replay","original_offset":3,"digest":"ef","replayed":true}"#;
        let record = parse_answer(StatusCode::OK, evicted).unwrap();
        assert_eq!((record.offset, record.decision), (3, None));

        assert!(parse_answer(StatusCode::OK, b"{\"partition\":0}").is_err());
        assert!(parse_answer(StatusCode::OK, b"not json").is_err());
        assert!(parse_answer(StatusCode::OK, br#"{"partition":0,"offset":1,"verdict":"rejected"}"#).is_err());
    }
}
