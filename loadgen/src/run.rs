//! `loadgen run`: opening stock, then the open-loop schedule, then the drain, the stock
//! read-back and the verdict. Everything runs on one glommio executor thread: the
//! connections are tasks sharing one `RefCell`ed state, so nothing is locked.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::io::IsTerminal;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use hdrhistogram::Histogram;
use hyper::{Method, StatusCode};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use tribunal_shards::inventory::InventoryCommand;

use crate::client::{Answer, AttemptError, Connection, Target};
use crate::cost::{self, Cost, Sample};
use crate::ledger::{AnswerRecord, Decision, Ledger, LedgerEntry, StockRow, StockTable, Unresolved};
use crate::open_loop::{self, AnsweredCounter};
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
/// Without a terminal, a plain progress line this often.
const PROGRESS_LINE_EVERY: u32 = 5;
/// io_uring memory of loadgen's executor: the engine's instances need the rest of the
/// 8 MiB RLIMIT_MEMLOCK budget of a process, and loadgen moves little data.
const IO_MEMORY_BYTES: usize = 1 << 20;

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

    fn scheduled_requests(&self) -> u64 {
        ((self.warmup + self.duration).as_secs_f64() * self.rate_per_s).ceil() as u64
    }
}

/// What a run produced: figures for the report, the ledger and the stock read back.
pub struct RunOutcome {
    pub figures: RunFigures,
    pub ledger: Ledger,
    pub tables: Vec<StockTable>,
}

/// Runs the whole thing on a fresh glommio executor thread.
pub fn run(config: RunConfig) -> anyhow::Result<RunOutcome> {
    config.check()?;
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("loadgen")
        .io_memory(IO_MEMORY_BYTES)
        .spawn(move || async move { drive(config).await })
        .map_err(|e| anyhow::anyhow!("starting the glommio executor: {e}"))?
        .join()
        .map_err(|e| anyhow::anyhow!("the loadgen executor failed: {e}"))?
}

async fn drive(config: RunConfig) -> anyhow::Result<RunOutcome> {
    let partitions = wait_until_ready(&config).await?;
    let state = Rc::new(RefCell::new(State::new(&config)));

    eprintln!(
        "loadgen: opening stock ({} adjustments) over {} connections to {} instance(s)",
        config.workload.warehouses * config.workload.skus,
        config.connections,
        config.targets.len()
    );
    open_stock(&config, &state).await?;

    eprintln!(
        "loadgen: {:.0} requests/s for {:?} (+{:?} warm-up) over {} connections",
        config.rate_per_s, config.duration, config.warmup, config.connections
    );
    let start = Instant::now() + Duration::from_millis(50);
    let schedule =
        Schedule { start, measure_from: start + config.warmup, end: start + config.warmup + config.duration };
    let answered = AnsweredCounter::default();
    let sampler = spawn_cost_sampler(&config, schedule, answered.clone())?;
    let mut progress = Progress::new(&config);
    open_loop::run_schedule(&config, &mut state.borrow_mut(), schedule, &answered, |state| progress.tick(state))?;
    progress.finish(&state.borrow());
    let cost = sampler.join().unwrap_or(None);

    eprintln!("loadgen: reading stock back from every instance");
    let state = Rc::try_unwrap(state).ok().expect("every task ended").into_inner();
    let tables = read_stock(&config, &state.ledger, partitions).await;
    let figures = RunFigures { cost, ..state.figures(&config, schedule) };
    Ok(RunOutcome { figures, ledger: state.ledger, tables })
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
    fn new(config: &RunConfig) -> Self {
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

    fn figures(&self, config: &RunConfig, schedule: Schedule) -> RunFigures {
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

/// Takes a cost sample at the start and at the end of the measured window, on its own
/// thread so the load's loop never waits for it; the cost of the answers received between
/// them (spec: Loadgen.CostPerRequest).
fn spawn_cost_sampler(
    config: &RunConfig,
    schedule: Schedule,
    answered: AnsweredCounter,
) -> anyhow::Result<std::thread::JoinHandle<Option<Cost>>> {
    let targets = config.targets.clone();
    let sampler = std::thread::Builder::new().name("loadgen-cost".into()).spawn(move || {
        std::thread::sleep(schedule.measure_from.saturating_duration_since(Instant::now()));
        let (before, answered_before) = (cost_sample(&targets), answered.load(Ordering::Relaxed));
        std::thread::sleep(schedule.end.saturating_duration_since(Instant::now()));
        let (after, answered_after) = (cost_sample(&targets), answered.load(Ordering::Relaxed));
        let requests = answered_after.saturating_sub(answered_before);
        (requests > 0).then(|| Cost::between(&before, &after, requests))
    });
    sampler.context("starting the cost sampler")
}

/// Every instance's counters (from `/metrics`), loadgen's and the box's, now.
fn cost_sample(targets: &[Target]) -> Sample {
    let instances = targets.iter().map(|t| scrape(t, "/metrics").and_then(|text| cost::parse_metrics(&text))).collect();
    Sample { instances, loadgen: cost::this_process(), machine: cost::whole_box() }
}

/// A plain blocking GET, for the sampler's thread; None on any failure.
fn scrape(target: &Target, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let timeout = Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&target.addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n", target.host_header);
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    let text = String::from_utf8(answer).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// Waits for `/healthz` to answer 200 on every target; returns the partition count.
async fn wait_until_ready(config: &RunConfig) -> anyhow::Result<u32> {
    let deadline = Instant::now() + config.ready_timeout;
    let mut partitions = 1;
    for target in &config.targets {
        let mut connection = Connection::new(target.clone());
        loop {
            let answer = connection.request(Method::GET, "/healthz", &[], Bytes::new(), Duration::from_secs(2)).await;
            match answer {
                Ok(answer) if answer.status == StatusCode::OK => break,
                _ if Instant::now() < deadline => glommio::timer::sleep(Duration::from_millis(200)).await,
                Ok(answer) => bail!(
                    "{} is not ready after {:?}: {} {}",
                    target.url,
                    config.ready_timeout,
                    answer.status,
                    String::from_utf8_lossy(&answer.body)
                ),
                Err(e) => bail!("{} is not reachable after {:?}: {e}", target.url, config.ready_timeout),
            }
        }
        // The partition count decides which stock tables the verifier needs: unknown is an error.
        let count = loop {
            let answer =
                connection.request(Method::GET, "/v1/cluster", &[], Bytes::new(), Duration::from_secs(5)).await;
            let count = answer
                .ok()
                .and_then(|a| serde_json::from_slice::<serde_json::Value>(&a.body).ok())
                .and_then(|cluster| cluster["partitions"].as_array().map(Vec::len))
                .filter(|n| *n > 0);
            match count {
                Some(count) => break count,
                None if Instant::now() < deadline => glommio::timer::sleep(Duration::from_millis(200)).await,
                None => bail!("{}/v1/cluster never named its partitions", target.url),
            }
        };
        partitions = partitions.max(count as u32);
    }
    Ok(partitions)
}

/// The opening stock, closed loop over every connection. Not measured; in the ledger.
async fn open_stock(config: &RunConfig, state: &Rc<RefCell<State>>) -> anyhow::Result<()> {
    let queue: Rc<RefCell<VecDeque<(usize, InventoryCommand)>>> =
        Rc::new(RefCell::new(config.workload.opening_stock().into_iter().enumerate().collect()));
    let deadline = Instant::now() + config.drain.max(Duration::from_secs(30));
    let mut tasks = Vec::new();
    for c in 0..config.connections {
        let (config, state, queue) = (config.clone(), state.clone(), queue.clone());
        tasks.push(glommio::spawn_local(async move {
            let mut connection = Connection::new(config.targets[c % config.targets.len()].clone());
            loop {
                let Some((i, command)) = queue.borrow_mut().pop_front() else { return Ok(()) };
                let key = format!("{}-open-{i}", config.workload.run_prefix);
                let body = Bytes::from(serde_json::to_vec(&command).expect("commands serialise"));
                let submitted = submit(&mut connection, &config.targets, &key, &body, config.request_timeout, deadline);
                match submitted.await.map(|answer| answer.record) {
                    Ok(answer) if answer.decision == Some(Decision::Accepted) => {
                        state.borrow_mut().record_entry(key, command, answer)
                    }
                    Ok(answer) => bail!("opening stock {key} was not accepted: {answer:?}"),
                    Err(e) => bail!("opening stock {key} got no final answer: {e}"),
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    Ok(())
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

/// Sends one command until it gets a final answer, retrying the same key and body after a
/// timeout, a lost connection, a 5xx or a 408 (spec: Loadgen.RetrySameKey). For the opening
/// stock, which is not part of the figures (the schedule's requests go through the open
/// loop, `open_loop.rs`, with the same rules).
async fn submit(
    connection: &mut Connection,
    targets: &[Target],
    key: &str,
    body: &Bytes,
    timeout: Duration,
    drain_deadline: Instant,
) -> Result<Submitted, String> {
    let mut backoff = BACKOFF_INITIAL;
    for attempt in 0u32.. {
        let result =
            connection.request(Method::POST, "/v1/movements", &[("idempotency-key", key)], body.clone(), timeout).await;
        let Attempt { label, outcome, .. } = attempt_outcome(result, key)?;
        // A lost or silent instance: the same key is safe on any other (Gateway.ReplayReturnsOriginal).
        if matches!(label.as_ref(), "timeout" | "connection_error") && targets.len() > 1 {
            let next = targets.iter().position(|t| t == connection.target()).map_or(0, |i| (i + 1) % targets.len());
            *connection = Connection::new(targets[next].clone());
        }
        let last_error = match outcome {
            Ok(record) => return Ok(Submitted { record, first_attempt: attempt == 0 }),
            Err(e) => e,
        };
        if Instant::now() + backoff > drain_deadline {
            return Err(last_error);
        }
        glommio::timer::sleep(backoff + retry_jitter(key, attempt, backoff)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    unreachable!("the loop returns")
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

/// Reads every run SKU's stock from every instance, per partition, until each table's
/// certified watermark reaches the ledger (spec: Loadgen.StockReadAfterLedger).
async fn read_stock(config: &RunConfig, ledger: &Ledger, partitions: u32) -> Vec<StockTable> {
    let mut highest: BTreeMap<u32, u64> = BTreeMap::new();
    for entry in &ledger.entries {
        let top = highest.entry(entry.answer.partition).or_default();
        *top = (*top).max(entry.answer.offset);
    }
    let skus = config.workload.all_skus();
    let deadline = Instant::now() + config.stock_read_wait;
    let mut tasks = Vec::new();
    for target in config.targets.clone() {
        let (skus, highest, prefix, timeout) =
            (skus.clone(), highest.clone(), ledger.run_prefix.clone(), config.request_timeout);
        tasks.push(glommio::spawn_local(async move {
            let mut connection = Connection::new(target);
            let mut tables = Vec::new();
            for partition in 0..partitions {
                let need = highest.get(&partition).copied();
                loop {
                    let table = read_table(&mut connection, partition, &skus, &prefix, timeout).await;
                    let caught_up = match (need, table.certified_watermark) {
                        (None, _) => true,
                        (Some(need), Some(seen)) => seen >= need,
                        (Some(_), None) => false,
                    };
                    if caught_up || Instant::now() >= deadline {
                        tables.push(table);
                        break;
                    }
                    glommio::timer::sleep(Duration::from_millis(200)).await;
                }
            }
            tables
        }));
    }
    let mut tables = Vec::new();
    for task in tasks {
        tables.extend(task.await);
    }
    tables
}

async fn read_table(
    connection: &mut Connection,
    partition: u32,
    skus: &[String],
    prefix: &str,
    timeout: Duration,
) -> StockTable {
    #[derive(Deserialize)]
    struct Level {
        warehouse: String,
        qty: i64,
    }
    #[derive(Deserialize)]
    struct BySku {
        certified_watermark: Option<u64>,
        levels: Vec<Level>,
    }
    let mut table = StockTable {
        instance: connection.target().url.clone(),
        partition,
        certified_watermark: None,
        levels: Vec::new(),
    };
    let mut lowest: Option<Option<u64>> = None;
    for sku in skus {
        let path = format!("/v1/stock?sku={sku}&partition={partition}");
        let read = connection.request(Method::GET, &path, &[], Bytes::new(), timeout).await;
        let parsed = match read {
            Ok(answer) if answer.status == StatusCode::OK => serde_json::from_slice::<BySku>(&answer.body).ok(),
            _ => None,
        };
        // An unreadable answer makes the whole table unusable: its watermark is unknown.
        let Some(by_sku) = parsed else {
            table.certified_watermark = None;
            return table;
        };
        lowest = Some(match lowest {
            None => by_sku.certified_watermark,
            Some(low) => low.min(by_sku.certified_watermark),
        });
        for level in by_sku.levels.into_iter().filter(|l| prefix.is_empty() || l.warehouse.starts_with(prefix)) {
            table.levels.push(StockRow { warehouse: level.warehouse, sku: sku.clone(), qty: level.qty });
        }
    }
    table.certified_watermark = lowest.flatten();
    table.levels.sort();
    table
}

/// The live progress bar (or plain lines without a terminal), ticked by the load's loop.
struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    last_answered: u64,
    ticks: u32,
}

impl Progress {
    fn new(config: &RunConfig) -> Self {
        let total = config.scheduled_requests();
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar
        });
        Self { bar, total, last_answered: 0, ticks: 0 }
    }

    /// About once a second.
    fn tick(&mut self, state: &State) {
        self.ticks += 1;
        let rate = state.answered - self.last_answered;
        self.last_answered = state.answered;
        let message = format!(
            "{rate} answers/s, errors {}, retries {}, p99 so far {:.1} ms",
            state.errors,
            state.retries,
            state.histogram.value_at_quantile(0.99) as f64 / 1000.0
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(state.answered);
                bar.set_message(message);
            }
            None if self.ticks % PROGRESS_LINE_EVERY == 0 => {
                eprintln!("loadgen: {}/{} {message}", state.answered, self.total)
            }
            None => {}
        }
    }

    /// After every connection is done (an overloaded cluster answers the schedule's last
    /// requests well after its end).
    fn finish(self, state: &State) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
        eprintln!(
            "loadgen: schedule done: {} answered, {} errors, {} retries, {} unresolved",
            state.answered,
            state.errors,
            state.retries,
            state.ledger.unresolved.len()
        );
    }
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
