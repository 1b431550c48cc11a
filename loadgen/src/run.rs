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
use hyper::{Method, StatusCode};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use tribunal_shards::inventory::InventoryCommand;

use crate::client::{Connection, Target};
use crate::cost::{self, Cost, Sample};
use crate::ledger::{Decision, Ledger, StockRow, StockTable};
use crate::open_loop::{self, AnsweredCounter};
use crate::report::RunFigures;
pub use crate::requests::RunConfig;
use crate::requests::{
    attempt_outcome, retry_jitter, Attempt, Schedule, State, Submitted, BACKOFF_INITIAL, BACKOFF_MAX,
};

/// Without a terminal, a plain progress line this often.
const PROGRESS_LINE_EVERY: u32 = 5;
/// io_uring memory of loadgen's executor: the engine's instances need the rest of the
/// 8 MiB RLIMIT_MEMLOCK budget of a process, and loadgen moves little data.
const IO_MEMORY_BYTES: usize = 1 << 20;

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
