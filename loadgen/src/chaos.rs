//! `loadgen chaos`: the resilience suite (specs/chaos.allium). Each scenario starts a
//! cluster (`tribunal cluster`, on a local log or a tansu broker started here), drives it
//! with `loadgen run` at a steady rate, SIGKILLs processes at a seeded random moment,
//! waits for them to come back, and then checks three independent witnesses: loadgen's
//! verifier (its ledger against stock read from every instance), the instances' recovered
//! state (`tribunal inspect`), and the published outputs log (`tribunal log read`).
//!
//! The suite only drives processes and reads files; the supervisor restarts the victims,
//! as it would in production. Plain threads and blocking IO: nothing here is on a hot path.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;

use crate::ledger::Ledger;
use crate::read_json;

/// The Kafka outputs topic the engine publishes to by default.
const OUTPUTS_TOPIC: &str = "tribunal.outputs";
/// How long a victim has to be ready again (spec: Chaos config ready_timeout_ms).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long every instance has to reach the same durable watermark after the load.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Watermarks unchanged for this long count as settled.
const SETTLE_QUIET: Duration = Duration::from_secs(1);
/// How long `loadgen run` waits for the cluster at the start and for retries at the end.
const LOAD_READY_TIMEOUT_S: u64 = 120;
const LOAD_DRAIN_S: u64 = 180;
const LOAD_STOCK_READ_WAIT_S: u64 = 120;
/// Per attempt: short, so that requests stuck on a dead instance move on quickly.
const LOAD_REQUEST_TIMEOUT_MS: u64 = 5_000;
/// How often processes and files are polled while waiting for a restart.
const POLL: Duration = Duration::from_millis(10);
/// The fault lands between these fractions of the schedule (spec: Chaos.FaultAtSeededMoment).
const FAULT_WINDOW_PERCENT: (u64, u64) = (20, 60);
const STOP_GRACE: Duration = Duration::from_secs(30);
const MAX_RECOVERY_KILL_DELAY_MS: u64 = 50;
/// broker-restart: how long the broker stays dead, as a real restart would.
const BROKER_DOWN: Duration = Duration::from_secs(2);
/// Reads of a status.json caught between two writes before giving up.
const STATUS_READ_ATTEMPTS: u32 = 10;

#[derive(Args)]
pub struct ChaosArgs {
    /// A scenario to run, or `all` (every scenario that applies to the cluster shape and
    /// log). Repeatable.
    #[arg(long = "scenario", default_value = "all")]
    scenarios: Vec<String>,
    /// Cluster sizes to run each scenario on. Repeatable; default 2 and 3.
    #[arg(long = "instances", value_parser = clap::value_parser!(u32).range(2..=3))]
    shapes: Vec<u32>,
    /// Commands loadgen schedules per scenario (the opening stock comes on top).
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Requests per second during each scenario.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Logs to run on: `local`, or `kafka` (a tansu broker started per scenario). Repeatable:
    /// each scenario runs once per cluster size, on the first of these logs it applies to,
    /// so `--log local --log kafka` runs the kills on the local log and broker-restart on
    /// Kafka. Default: local.
    #[arg(long = "log", value_enum)]
    logs: Vec<LogKind>,
    /// Draws every fault moment; default: random, printed so a failure can be replayed.
    #[arg(long)]
    seed: Option<u64>,
    /// Per-scenario directories (logs, data, loadgen report) and summary.json.
    #[arg(long, default_value = "target/chaos")]
    out_dir: PathBuf,
    /// The engine binary; default: `tribunal` next to this one.
    #[arg(long)]
    tribunal: Option<PathBuf>,
    /// The Kafka broker binary, for --kafka.
    #[arg(long, default_value = "tansu")]
    tansu: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogKind {
    Local,
    Kafka,
}

impl LogKind {
    fn name(self) -> &'static str {
        match self {
            LogKind::Local => "local",
            LogKind::Kafka => "kafka",
        }
    }
}

/// spec: Chaos.ScenarioKind
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioKind {
    KillPrimary,
    KillBackup,
    KillBoth,
    KillDuringRecovery,
    KillAllThree,
    BrokerRestart,
}

impl ScenarioKind {
    pub const ALL: [ScenarioKind; 6] = [
        ScenarioKind::KillPrimary,
        ScenarioKind::KillBackup,
        ScenarioKind::KillBoth,
        ScenarioKind::KillDuringRecovery,
        ScenarioKind::KillAllThree,
        ScenarioKind::BrokerRestart,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ScenarioKind::KillPrimary => "kill-primary",
            ScenarioKind::KillBackup => "kill-backup",
            ScenarioKind::KillBoth => "kill-both",
            ScenarioKind::KillDuringRecovery => "kill-during-recovery",
            ScenarioKind::KillAllThree => "kill-all-three",
            ScenarioKind::BrokerRestart => "broker-restart",
        }
    }

    /// spec: Chaos.ScenarioApplies
    pub fn applies(self, instances: u32, log: LogKind) -> bool {
        match self {
            ScenarioKind::KillAllThree => instances == 3,
            ScenarioKind::BrokerRestart => log == LogKind::Kafka,
            _ => true,
        }
    }

    /// The instances SIGKILLed at the fault moment (spec: Chaos.VictimsKilled). Tribunal
    /// has no primary: "primary" is instance 1 and "backup" instance 2.
    pub fn victims(self, instances: u32) -> Vec<u32> {
        match self {
            ScenarioKind::KillPrimary | ScenarioKind::KillDuringRecovery => vec![1],
            ScenarioKind::KillBackup => vec![2],
            ScenarioKind::KillBoth => vec![1, 2],
            ScenarioKind::KillAllThree => (1..=instances).collect(),
            ScenarioKind::BrokerRestart => Vec::new(),
        }
    }
}

/// The (log, shape, scenario) triples to run, in order: each selected scenario once per
/// shape, on the first of `logs` it applies to. A named scenario that applies nowhere is
/// an error, not a silent skip; `all` takes what applies (spec: Chaos.ScenarioApplies).
pub fn plan(
    scenarios: &[String],
    shapes: &[u32],
    logs: &[LogKind],
) -> anyhow::Result<Vec<(LogKind, u32, ScenarioKind)>> {
    let all = scenarios.iter().any(|s| s == "all");
    let mut kinds = Vec::new();
    if all {
        kinds.extend(ScenarioKind::ALL);
    } else {
        for name in scenarios {
            let kind = ScenarioKind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .with_context(|| format!("unknown scenario {name:?}"))?;
            kinds.push(kind);
        }
    }
    let mut planned = Vec::new();
    for &instances in shapes {
        for &kind in &kinds {
            match logs.iter().find(|&&log| kind.applies(instances, log)) {
                Some(&log) => planned.push((log, instances, kind)),
                None if all => {}
                None => {
                    let needs = if kind == ScenarioKind::BrokerRestart { "--log kafka" } else { "--instances 3" };
                    bail!("{} does not apply to {instances} instances on these logs: it needs {needs}", kind.name());
                }
            }
        }
    }
    Ok(planned)
}

fn scenario_identity(log: LogKind, instances: u32, kind: ScenarioKind) -> usize {
    let kind_index = ScenarioKind::ALL.iter().position(|&k| k == kind).expect("in ALL");
    (log as usize) * 1_000 + instances as usize * 100 + kind_index
}

/// When the fault lands, after the schedule starts (spec: Chaos.FaultAtSeededMoment).
pub fn fault_at(seed: u64, index: usize, schedule: Duration) -> Duration {
    let mut rng = SmallRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let percent_x100 = rng.random_range(FAULT_WINDOW_PERCENT.0 * 100..FAULT_WINDOW_PERCENT.1 * 100);
    schedule.mul_f64(percent_x100 as f64 / 10_000.0)
}

/// kill-during-recovery: the second kill lands this long after the restarted process
/// says it is recovering, drawn from the seed below [`MAX_RECOVERY_KILL_DELAY_MS`], which
/// is well inside the shortest recovery measured (about 250 ms from a new process to ready).
pub fn recovery_kill_delay(seed: u64, index: usize) -> Duration {
    let mut rng = SmallRng::seed_from_u64(seed.rotate_left(17) ^ index as u64);
    Duration::from_millis(rng.random_range(0..MAX_RECOVERY_KILL_DELAY_MS))
}

/// One victim's return. Instance 0 is the broker.
#[derive(Debug, Clone, Serialize)]
pub struct RestartRecord {
    pub instance: u32,
    pub killed_ms: u64,
    pub restarted_ms: Option<u64>,
    pub ready_ms: Option<u64>,
    /// kill-during-recovery: whether the second kill landed before the instance was ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub killed_while_recovering: Option<bool>,
}

impl RestartRecord {
    fn time_to_ready_ms(&self) -> Option<u64> {
        Some(self.ready_ms? - self.restarted_ms?)
    }
}

/// One scenario's outcome: a row of the table and of summary.json.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScenarioRow {
    pub scenario: String,
    pub instances: u32,
    pub log: &'static str,
    pub seed: u64,
    /// Records on the input log: the opening stock, the schedule, duplicates and retries.
    pub events: u64,
    /// Commands loadgen scheduled after the opening stock.
    pub scheduled: u64,
    pub acknowledged: u64,
    pub retried: u64,
    pub lost: u64,
    pub applied_twice: u64,
    pub violations: Vec<String>,
    pub fault_at_ms: u64,
    pub restarts: Vec<RestartRecord>,
    /// The slowest victim's, from its new process to its /healthz saying ready.
    pub time_to_ready_ms: Option<u64>,
    /// The suite could not run the scenario to the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub passed: bool,
    pub dir: String,
}

pub fn chaos(args: ChaosArgs) -> anyhow::Result<bool> {
    let shapes = if args.shapes.is_empty() { vec![2, 3] } else { args.shapes.clone() };
    let logs = if args.logs.is_empty() { vec![LogKind::Local] } else { args.logs.clone() };
    let planned = plan(&args.scenarios, &shapes, &logs)?;
    anyhow::ensure!(args.rate > 0 && args.events >= args.rate, "--events must be at least --rate (one second of load)");
    let tribunal = match &args.tribunal {
        Some(path) => path.clone(),
        None => std::env::current_exe().context("locating loadgen")?.with_file_name("tribunal"),
    };
    anyhow::ensure!(tribunal.is_file(), "{} not found: build it or pass --tribunal", tribunal.display());
    let seed = match args.seed {
        Some(seed) => seed,
        None => {
            let mut bytes = [0u8; 8];
            getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for the seed: {e}"))?;
            u64::from_le_bytes(bytes)
        }
    };
    fs::create_dir_all(&args.out_dir).with_context(|| format!("creating {}", args.out_dir.display()))?;
    eprintln!(
        "loadgen chaos: {} scenario(s), {} events each at {} req/s, seed {seed}",
        planned.len(),
        args.events,
        args.rate
    );
    let mut rows = Vec::new();
    let mut suite_error = false;
    for (index, &(log, instances, kind)) in planned.iter().enumerate() {
        eprintln!(
            "loadgen chaos: [{}/{}] {} on {instances} instances, {} log",
            index + 1,
            planned.len(),
            kind.name(),
            log.name()
        );
        let row = run_scenario(&args, &tribunal, seed, (log, instances, kind));
        suite_error |= row.error.is_some();
        print_row(&row);
        rows.push(row);
        write_summary(&args.out_dir, seed, &rows)?;
    }
    print_table(&mut std::io::stdout().lock(), &rows)?;
    eprintln!("loadgen chaos: summary in {}", args.out_dir.join("summary.json").display());
    if suite_error {
        bail!("the suite could not run every scenario (see the error column)");
    }
    Ok(rows.iter().all(|r| r.passed))
}

/// Runs one planned scenario in its own directory under --out-dir; its row, with
/// the error set if it could not run to the end.
fn run_scenario(
    args: &ChaosArgs,
    tribunal: &Path,
    seed: u64,
    (log, instances, kind): (LogKind, u32, ScenarioKind),
) -> ScenarioRow {
    let dir = args.out_dir.join(format!("{}-{instances}x-{}", log.name(), kind.name()));
    // Drawn from the scenario's identity, not its place in the plan, so one scenario
    // can be replayed alone with the same seed.
    let identity = scenario_identity(log, instances, kind);
    let fault_after = fault_at(seed, identity, schedule_length(args.events, args.rate));
    let mut row = ScenarioRow {
        scenario: kind.name().into(),
        instances,
        log: log.name(),
        seed,
        fault_at_ms: fault_after.as_millis() as u64,
        dir: dir.display().to_string(),
        ..ScenarioRow::default()
    };
    let recovery_kill_delay = recovery_kill_delay(seed, identity);
    let scenario = Scenario { args, tribunal, kind, log, instances, dir, fault_after, recovery_kill_delay };
    if let Err(error) = scenario.run(&mut row) {
        eprintln!("loadgen chaos: {} on {instances} instances could not run: {error:#}", kind.name());
        row.error = Some(format!("{error:#}"));
    }
    row.passed = row.error.is_none() && row.violations.is_empty() && row.lost == 0 && row.applied_twice == 0;
    row
}

fn schedule_length(events: u64, rate: u64) -> Duration {
    Duration::from_secs(events.div_ceil(rate))
}

fn write_summary(out_dir: &Path, seed: u64, rows: &[ScenarioRow]) -> anyhow::Result<()> {
    let path = out_dir.join("summary.json");
    let summary = serde_json::json!({
        "seed": seed,
        "passed": rows.iter().all(|r| r.passed),
        "scenarios": rows,
    });
    fs::write(&path, serde_json::to_vec_pretty(&summary)?).with_context(|| format!("writing {}", path.display()))
}

fn print_row(row: &ScenarioRow) {
    let verdict = if row.passed { "passed" } else { "FAILED" };
    eprintln!(
        "loadgen chaos: {} on {} instances {verdict}: {} acknowledged, {} retried, {} lost, {} applied twice, violations [{}]{}",
        row.scenario,
        row.instances,
        row.acknowledged,
        row.retried,
        row.lost,
        row.applied_twice,
        row.violations.join(", "),
        row.error.as_deref().map(|e| format!(", error: {e}")).unwrap_or_default()
    );
}

pub fn print_table(out: &mut impl Write, rows: &[ScenarioRow]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<22} {:>4} {:<5} {:>8} {:>9} {:>8} {:>7} {:>5} {:>11} {:>9} {:>7}  violations",
        "scenario",
        "inst",
        "log",
        "events",
        "scheduled",
        "acked",
        "retried",
        "lost",
        "dup-applied",
        "ready-ms",
        "result"
    )?;
    for row in rows {
        let ready = row.time_to_ready_ms.map_or_else(|| "-".to_string(), |ms| ms.to_string());
        let result = if row.passed {
            "passed"
        } else if row.error.is_some() {
            "ERROR"
        } else {
            "FAILED"
        };
        let mut violations = row.violations.join(",");
        if let Some(error) = &row.error {
            violations = format!("{violations}{}error: {error}", if violations.is_empty() { "" } else { "; " });
        }
        writeln!(
            out,
            "{:<22} {:>4} {:<5} {:>8} {:>9} {:>8} {:>7} {:>5} {:>11} {:>9} {:>7}  {}",
            row.scenario,
            row.instances,
            row.log,
            row.events,
            row.scheduled,
            row.acknowledged,
            row.retried,
            row.lost,
            row.applied_twice,
            ready,
            result,
            if violations.is_empty() { "-" } else { &violations }
        )?;
    }
    Ok(())
}

struct Scenario<'a> {
    args: &'a ChaosArgs,
    tribunal: &'a Path,
    kind: ScenarioKind,
    log: LogKind,
    instances: u32,
    dir: PathBuf,
    fault_after: Duration,
    /// kill-during-recovery: how long after the new process says `recovering` it is killed.
    recovery_kill_delay: Duration,
}

/// Processes this scenario started; killed on the way out, whatever happened.
#[derive(Default)]
struct Processes {
    cluster: Option<Child>,
    load: Option<Child>,
    broker: Option<Broker>,
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in [self.load.as_mut(), self.cluster.as_mut()].into_iter().flatten() {
            // The supervisor's children die with it (PR_SET_PDEATHSIG).
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(broker) = self.broker.as_mut() {
            broker.kill();
        }
    }
}

impl Scenario<'_> {
    fn run(&self, row: &mut ScenarioRow) -> anyhow::Result<()> {
        if self.dir.exists() {
            fs::remove_dir_all(&self.dir).with_context(|| format!("clearing {}", self.dir.display()))?;
        }
        fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        let mut processes = Processes::default();
        let log = self.input_log(&mut processes)?;
        let cluster_dir = self.dir.join("cluster");
        let http_base = free_port_run(self.instances as u16)?;
        processes.cluster = Some(self.start_cluster(&log, &cluster_dir, http_base)?);
        let targets: Vec<SocketAddr> =
            (0..self.instances as u16).map(|i| SocketAddr::from((Ipv4Addr::LOCALHOST, http_base + i))).collect();

        // spec: Chaos.LoadFinishesWithRetries — loadgen run in its own process.
        let (schedule_started_tx, schedule_started) = mpsc::channel();
        let mut load = self.start_load(&targets, schedule_started_tx)?;
        let table_thread = self.save_load_table(&mut load)?;
        processes.load = Some(load);

        let schedule = schedule_length(self.args.events, self.args.rate);
        let started = self.wait_for_fault(&schedule_started, &mut processes)?;
        let fault = Instant::now();
        if self.kind == ScenarioKind::BrokerRestart {
            self.restart_broker(&mut processes, &cluster_dir, &targets, started, row)?;
        } else {
            self.kill_and_watch(&cluster_dir, &targets, started, row)?;
        }
        let fault_ms = fault.saturating_duration_since(started).as_millis() as u64;
        eprintln!("loadgen chaos: fault at {fault_ms} ms into a {} s schedule; victims back", schedule.as_secs());
        row.time_to_ready_ms = row.restarts.iter().filter_map(RestartRecord::time_to_ready_ms).max();
        // A restart killed again on purpose is never ready; the one after it must be.
        if row.restarts.iter().any(|r| r.ready_ms.is_none() && r.killed_while_recovering.is_none()) {
            row.violations.push("victim_not_ready".into());
        }

        let load_budget = schedule + Duration::from_secs(LOAD_DRAIN_S + LOAD_STOCK_READ_WAIT_S + 120);
        let load_status = wait_child(processes.load.as_mut().expect("started"), started + load_budget)?
            .with_context(|| format!("loadgen did not finish within {} s", load_budget.as_secs()))?;
        processes.load = None;
        table_thread.join().map_err(|_| anyhow::anyhow!("loadgen table reader panicked"))??;
        self.read_load_report(load_status.code(), row)?;

        // spec: Chaos.StateDigestsEqual — settle, stop cleanly, inspect offline.
        match settle(&cluster_dir, self.instances)? {
            Settled::Yes => {}
            Settled::WatermarksDiffer => row.violations.push("durable_watermarks_differ".into()),
            Settled::PublisherBehind(figures) => row.violations.push(format!("publisher_behind {figures}")),
        }
        self.check_restarts(&cluster_dir, row)?;
        stop(processes.cluster.as_mut().expect("started"))?;
        processes.cluster = None;
        let durable_watermark = self.check_instances(&cluster_dir, row)?;
        // spec: Chaos.PublishedOutputsCertified, Chaos.NothingLost, Chaos.NothingAppliedTwice
        self.check_outputs(&log, durable_watermark, row)?;
        if let Some(broker) = processes.broker.as_mut() {
            broker.kill();
        }
        Ok(())
    }

    /// The scenario's input log: a local log in its directory, or on Kafka a broker it
    /// starts (kept in `processes`).
    fn input_log(&self, processes: &mut Processes) -> anyhow::Result<String> {
        Ok(if self.log == LogKind::Kafka {
            let broker = Broker::start(&self.args.tansu, &self.dir.join("broker"))?;
            let log = format!("kafka:127.0.0.1:{}", broker.port);
            processes.broker = Some(broker);
            log
        } else {
            format!("local:{}", self.dir.join("log").display())
        })
    }

    /// Starts `tribunal cluster` on the log, its REST APIs from `http_base`, its output
    /// in `cluster.log`.
    fn start_cluster(&self, log: &str, cluster_dir: &Path, http_base: u16) -> anyhow::Result<Child> {
        let cluster_log = File::create(self.dir.join("cluster.log"))?;
        die_with_suite(&mut Command::new(self.tribunal))
            .args(["cluster", "--instances", &self.instances.to_string(), "--log", log])
            .args(["--http-base-port", &http_base.to_string()])
            .arg("--data-dir")
            .arg(cluster_dir)
            .stdin(Stdio::null())
            .stdout(cluster_log.try_clone()?)
            .stderr(cluster_log)
            .spawn()
            .context("starting tribunal cluster")
    }

    /// A thread that copies the load process's table (its stdout) to `loadgen-table.txt`.
    fn save_load_table(&self, load: &mut Child) -> anyhow::Result<std::thread::JoinHandle<std::io::Result<()>>> {
        let load_stdout = load.stdout.take().context("loadgen stdout")?;
        let table_path = self.dir.join("loadgen-table.txt");
        Ok(std::thread::spawn(move || -> std::io::Result<()> {
            let mut text = String::new();
            BufReader::new(load_stdout).read_to_string(&mut text)?;
            fs::write(table_path, text)
        }))
    }

    /// Waits for the load's schedule to start, then until the fault's moment
    /// (spec: Chaos.FaultAtSeededMoment); when the schedule started. Fails if the load
    /// never starts or is already over.
    fn wait_for_fault(
        &self,
        schedule_started: &mpsc::Receiver<Instant>,
        processes: &mut Processes,
    ) -> anyhow::Result<Instant> {
        let started = match schedule_started.recv_timeout(Duration::from_secs(LOAD_READY_TIMEOUT_S + 60)) {
            Ok(instant) => instant,
            Err(_) => bail!("loadgen never started its schedule; see {}", self.dir.join("loadgen.log").display()),
        };
        // spec: Chaos.FaultAtSeededMoment
        let fault_moment = started + self.fault_after;
        std::thread::sleep(fault_moment.saturating_duration_since(Instant::now()));
        if processes.load.as_mut().expect("started").try_wait()?.is_some() {
            bail!("loadgen finished before the fault; see {}", self.dir.join("loadgen.log").display());
        }
        Ok(started)
    }

    /// broker-restart: kills the broker, checks every instance noticed
    /// (spec: Chaos.BrokerLossNoticed), restarts it and waits for the instances to be
    /// ready again on their own.
    fn restart_broker(
        &self,
        processes: &mut Processes,
        cluster_dir: &Path,
        targets: &[SocketAddr],
        started: Instant,
        row: &mut ScenarioRow,
    ) -> anyhow::Result<()> {
        let ms = |at: Instant| at.saturating_duration_since(started).as_millis() as u64;
        let broker = processes.broker.as_mut().expect("broker-restart runs on Kafka");
        broker.kill();
        let killed_ms = ms(Instant::now());
        std::thread::sleep(BROKER_DOWN);
        // spec: Chaos.BrokerLossNoticed — read just before the broker comes back.
        for id in 1..=self.instances {
            let status_file = cluster_dir.join(format!("instance-{id}")).join("status.json");
            if !broker_loss_advertised(&status_file) {
                row.violations.push(format!("broker_loss_unnoticed: instance {id}"));
            }
        }
        broker.restart()?;
        let restarted_ms = ms(Instant::now());
        // The instances must be ready again on their own once the broker answers.
        let deadline = Instant::now() + READY_TIMEOUT;
        let ready = targets.iter().all(|&target| wait_ready(target, deadline).is_ok());
        row.restarts.push(RestartRecord {
            instance: 0,
            killed_ms,
            restarted_ms: Some(restarted_ms),
            ready_ms: ready.then(|| ms(Instant::now())),
            killed_while_recovering: None,
        });
        Ok(())
    }

    /// Only the victims restarted, each as often as it was killed: an instance that
    /// crashed by itself is a failure even if the data agrees.
    fn check_restarts(&self, cluster_dir: &Path, row: &mut ScenarioRow) -> anyhow::Result<()> {
        let restarts = cluster_restarts(cluster_dir)?;
        for id in 1..=self.instances {
            let kills = self.kind.victims(self.instances).iter().filter(|&&v| v == id).count() as u64;
            let expected = if self.kind == ScenarioKind::KillDuringRecovery { kills * 2 } else { kills };
            let actual = restarts.get(&id).copied().unwrap_or(0);
            if actual != expected {
                row.violations
                    .push(format!("unexpected_restarts: instance {id} restarted {actual} times, expected {expected}"));
            }
        }
        Ok(())
    }

    fn start_load(&self, targets: &[SocketAddr], schedule_started: mpsc::Sender<Instant>) -> anyhow::Result<Child> {
        let exe = std::env::current_exe().context("locating loadgen")?;
        let mut command = Command::new(exe);
        die_with_suite(&mut command).arg("run");
        for target in targets {
            command.args(["--target", &format!("http://{target}")]);
        }
        command
            .args(["--rate", &self.args.rate.to_string()])
            .args(["--duration-s", &schedule_length(self.args.events, self.args.rate).as_secs().to_string()])
            .args(["--warmup-s", "0", "--connections", &self.args.connections.to_string()])
            .args(["--request-timeout-ms", &LOAD_REQUEST_TIMEOUT_MS.to_string()])
            .args(["--drain-s", &LOAD_DRAIN_S.to_string()])
            .args(["--ready-timeout-s", &LOAD_READY_TIMEOUT_S.to_string()])
            .args(["--stock-read-wait-s", &LOAD_STOCK_READ_WAIT_S.to_string()])
            .arg("--out-dir")
            .arg(self.dir.join("loadgen"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().context("starting loadgen run")?;
        let stderr = child.stderr.take().context("loadgen stderr")?;
        let mut log = File::create(self.dir.join("loadgen.log"))?;
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                // run.rs prints this line as the schedule starts.
                if !sent && line.contains(" requests/s for ") {
                    sent = schedule_started.send(Instant::now()).is_ok();
                }
                let _ = writeln!(log, "{line}");
            }
        });
        Ok(child)
    }

    /// SIGKILLs the victims, then watches each come back (spec: Chaos.VictimsKilled,
    /// Chaos.KilledDuringRecovery, Chaos.VictimsReady).
    fn kill_and_watch(
        &self,
        cluster_dir: &Path,
        targets: &[SocketAddr],
        started: Instant,
        row: &mut ScenarioRow,
    ) -> anyhow::Result<()> {
        let ms = |at: Instant| at.saturating_duration_since(started).as_millis() as u64;
        let pids = cluster_pids(cluster_dir)?;
        let victims = self.kind.victims(self.instances);
        let mut killed = Vec::new();
        for &id in &victims {
            let pid = pids.get(&id).copied().flatten().with_context(|| format!("instance {id} is not running"))?;
            sigkill(pid).with_context(|| format!("killing instance {id} (pid {pid})"))?;
            killed.push((id, pid, ms(Instant::now())));
        }
        // One thread per victim: each is timed from its own restart.
        let watched: Vec<anyhow::Result<Vec<RestartRecord>>> = std::thread::scope(|scope| {
            let watchers: Vec<_> = killed
                .into_iter()
                .map(|(id, pid, killed_ms)| {
                    let target = targets[id as usize - 1];
                    scope.spawn(move || self.watch_victim(cluster_dir, target, id, pid, killed_ms, started))
                })
                .collect();
            watchers
                .into_iter()
                .map(|w| w.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a victim's watcher panicked"))))
                .collect()
        });
        let mut errors = Vec::new();
        for records in watched {
            match records {
                Ok(records) => row.restarts.extend(records),
                Err(error) => errors.push(format!("{error:#}")),
            }
        }
        row.restarts.sort_by_key(|r| (r.instance, r.killed_ms));
        anyhow::ensure!(errors.is_empty(), "{}", errors.join("; "));
        Ok(())
    }

    /// Watches one killed instance come back: its new pid, the second kill of
    /// kill-during-recovery, then /healthz 200. Times are ms since `started`.
    fn watch_victim(
        &self,
        cluster_dir: &Path,
        target: SocketAddr,
        id: u32,
        pid: u32,
        killed_ms: u64,
        started: Instant,
    ) -> anyhow::Result<Vec<RestartRecord>> {
        let ms = |at: Instant| at.saturating_duration_since(started).as_millis() as u64;
        let mut records = Vec::new();
        let new_pid = wait_restarted(cluster_dir, id, pid, Instant::now() + READY_TIMEOUT)?;
        let mut restart = RestartRecord {
            instance: id,
            killed_ms,
            restarted_ms: Some(ms(Instant::now())),
            ready_ms: None,
            killed_while_recovering: None,
        };
        if self.kind == ScenarioKind::KillDuringRecovery {
            let status_file = cluster_dir.join(format!("instance-{id}")).join("status.json");
            let recovering = wait_recovering(&status_file, new_pid, Instant::now() + READY_TIMEOUT);
            // Somewhere inside the replay rather than always at its first instant.
            std::thread::sleep(self.recovery_kill_delay);
            // Not serving yet (refused) or serving 503; a slow or unparsable answer is not
            // proof of either, and neither is a 200.
            let not_ready = match probe_health(target) {
                Some(503) => true,
                None => refused(target),
                Some(_) => false,
            };
            let caught = recovering && not_ready && alive(new_pid);
            if !caught {
                bail!("instance {id} was ready or gone before the second kill (pid {new_pid})");
            }
            sigkill(new_pid).with_context(|| format!("killing instance {id} again (pid {new_pid})"))?;
            // The probe and the kill are two steps: the status the victim last wrote must
            // still say recovering.
            if status_says_ready(&status_file) {
                bail!("instance {id} reported ready before the second kill landed (pid {new_pid})");
            }
            restart.killed_while_recovering = Some(caught);
            records.push(restart);
            let killed_ms = ms(Instant::now());
            wait_restarted(cluster_dir, id, new_pid, Instant::now() + READY_TIMEOUT)?;
            restart = RestartRecord {
                instance: id,
                killed_ms,
                restarted_ms: Some(ms(Instant::now())),
                ready_ms: None,
                killed_while_recovering: None,
            };
        }
        if wait_ready(target, Instant::now() + READY_TIMEOUT).is_ok() {
            restart.ready_ms = Some(ms(Instant::now()));
        }
        records.push(restart);
        Ok(records)
    }

    fn read_load_report(&self, exit_code: Option<i32>, row: &mut ScenarioRow) -> anyhow::Result<()> {
        let report = self.dir.join("loadgen");
        match exit_code {
            Some(0) | Some(2) => {}
            other => bail!("loadgen run exited with {other:?}; see {}", self.dir.join("loadgen.log").display()),
        }
        let summary: Value = read_json(&report.join("summary.json"))?;
        row.retried = summary["retries"].as_u64().unwrap_or(0);
        row.scheduled = summary["measured_requests"].as_u64().unwrap_or(0);
        for check in summary["invariants"].as_array().into_iter().flatten() {
            if check["ok"] != Value::Bool(true) {
                row.violations.push(format!("loadgen:{}", check["name"].as_str().unwrap_or("?")));
            }
        }
        if exit_code == Some(2) && row.violations.is_empty() {
            row.violations.push("loadgen:exit_2".into());
        }
        Ok(())
    }

    /// `tribunal inspect` of every stopped instance: same durable watermark, same state
    /// digest, no fault the Clerk detected (spec: Chaos.StateDigestsEqual).
    /// Returns the instances' common durable watermark (partition 0).
    fn check_instances(&self, cluster_dir: &Path, row: &mut ScenarioRow) -> anyhow::Result<Option<u64>> {
        let mut reports = Vec::new();
        for id in 1..=self.instances {
            let data_dir = cluster_dir.join(format!("instance-{id}"));
            let output = die_with_suite(&mut Command::new(self.tribunal))
                .args(["inspect", "--json", "--data-dir"])
                .arg(&data_dir)
                .stderr(Stdio::inherit())
                .output()
                .context("running tribunal inspect")?;
            anyhow::ensure!(output.status.success(), "tribunal inspect of instance {id} failed: {}", output.status);
            let report: Value = serde_json::from_slice(&output.stdout).context("tribunal inspect --json output")?;
            fs::write(self.dir.join(format!("inspect-{id}.json")), &output.stdout)?;
            reports.push(report);
        }
        let watermarks: BTreeSet<String> = reports.iter().map(|r| r["durable_watermark"].to_string()).collect();
        let digests: BTreeSet<String> = reports.iter().map(|r| r["state_digest"].to_string()).collect();
        if watermarks.len() > 1 {
            row.violations.push(format!("durable_watermarks_differ {watermarks:?}"));
        } else if digests.len() > 1 {
            row.violations.push("state_digests_differ".into());
        }
        let mut faults = 0;
        for report in &reports {
            faults += report["federation"]["faults_detected"].as_u64().context("inspect without faults_detected")?;
        }
        if faults > 0 {
            row.violations.push(format!("faults_detected {faults}"));
        }
        if watermarks.len() > 1 {
            return Ok(None);
        }
        let watermark = reports[0]["durable_watermark"].as_u64();
        if watermark.is_none() {
            row.violations.push("nothing_durable".into());
        }
        Ok(watermark)
    }

    /// Reads the input log and the published outputs back and checks them against
    /// loadgen's ledger.
    fn check_outputs(
        &self,
        log: &str,
        row_durable_watermark: Option<u64>,
        row: &mut ScenarioRow,
    ) -> anyhow::Result<()> {
        let (outputs_log, topic) = match log.strip_prefix("local:") {
            Some(dir) => (format!("local:{}", Path::new(dir).join("outputs").display()), None),
            None => (log.to_string(), Some(OUTPUTS_TOPIC)),
        };
        let inputs = self.read_log(log, None)?;
        let outputs = self.read_log(&outputs_log, topic)?;
        row.events = inputs.len() as u64;
        let keys_by_offset: HashMap<u64, String> = inputs
            .iter()
            .filter_map(|(offset, payload)| {
                let envelope: Value = serde_json::from_str(payload).ok()?;
                Some((*offset, envelope["key"].as_str()?.to_string()))
            })
            .collect();
        let ledger: Ledger = read_json(&self.dir.join("loadgen").join("ledger.json"))?;
        row.acknowledged = ledger.entries.len() as u64;
        let verdict = check_published(&ledger, &keys_by_offset, &outputs);
        row.lost = verdict.lost;
        row.applied_twice = verdict.applied_twice;
        if verdict.divergent > 0 {
            row.violations.push(format!("outputs_disagree {}", verdict.divergent));
        }
        if verdict.unpublished > 0 {
            row.violations.push(format!("inputs_unpublished {}", verdict.unpublished));
        }
        // Every instance must have made the whole input log durable.
        let last_offset = inputs.iter().map(|(offset, _)| *offset).max();
        if let Some(watermark) = row_durable_watermark.filter(|w| Some(*w) != last_offset) {
            row.violations.push(format!("durable_watermark {watermark} is not the log's last offset {last_offset:?}"));
        }
        if verdict.unreadable > 0 {
            row.violations.push(format!("outputs_unreadable {}", verdict.unreadable));
        }
        if verdict.lost > 0 {
            row.violations.push("acknowledged_lost".into());
        }
        if verdict.applied_twice > 0 {
            row.violations.push("applied_twice".into());
        }
        Ok(())
    }

    /// (offset, payload) of every record of a log, through `tribunal log read`.
    fn read_log(&self, log: &str, topic: Option<&str>) -> anyhow::Result<Vec<(u64, String)>> {
        let mut command = Command::new(self.tribunal);
        die_with_suite(&mut command).args(["log", "read", "--log", log]);
        if let Some(topic) = topic {
            command.args(["--topic", topic]);
        }
        let output = command.output().context("running tribunal log read")?;
        // Its reason (a jump in offsets, a reset) belongs in the row, not only on stderr.
        anyhow::ensure!(
            output.status.success(),
            "tribunal log read --log {log} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        let mut records = Vec::new();
        for line in output.stdout.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let record: Value = serde_json::from_slice(line).context("a line of tribunal log read")?;
            let offset = record["offset"].as_u64().context("a record without an offset")?;
            // The checks key everything by offset: the suite's clusters have one partition.
            anyhow::ensure!(
                record["partition"].as_u64().unwrap_or(0) == 0,
                "a record on partition {}: the suite's checks assume one partition",
                record["partition"]
            );
            let payload = record["payload"].as_str().context("a record without a payload")?.to_string();
            records.push((offset, payload));
        }
        Ok(records)
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct PublishedVerdict {
    /// Acknowledged commands with no published output at their offset with their digest.
    pub lost: u64,
    /// Idempotency keys evaluated (accepted or rejected) at more than one offset.
    pub applied_twice: u64,
    /// Input offsets published with different outputs.
    pub divergent: u64,
    pub unreadable: u64,
    /// Input offsets with no published output at all.
    pub unpublished: u64,
}

/// The published outputs against the ledger (spec: Chaos.PublishedOutputsCertified,
/// Chaos.NothingLost, Chaos.NothingAppliedTwice). `outputs` are the outputs log's
/// records; `keys_by_offset` the idempotency key of every input offset.
pub fn check_published(
    ledger: &Ledger,
    keys_by_offset: &HashMap<u64, String>,
    outputs: &[(u64, String)],
) -> PublishedVerdict {
    let mut verdict = PublishedVerdict::default();
    // Input offset -> (digest, verdict); a second, different record for one is divergent.
    let mut published: BTreeMap<u64, (String, String)> = BTreeMap::new();
    // (original offset, digest) of every published bare replay: an instance that no
    // longer held the original answers a retry with one, and loadgen records it under
    // the original's offset.
    let mut replays: BTreeSet<(u64, String)> = BTreeSet::new();
    let mut divergent: BTreeSet<u64> = BTreeSet::new();
    for (_, payload) in outputs {
        let Ok(output) = serde_json::from_str::<Value>(payload) else {
            verdict.unreadable += 1;
            continue;
        };
        let (Some(offset), Some(digest), Some(name)) =
            (output["offset"].as_u64(), output["digest"].as_str(), output["verdict"].as_str())
        else {
            verdict.unreadable += 1;
            continue;
        };
        if let Some(original) = output["original_offset"].as_u64() {
            replays.insert((original, digest.to_string()));
        }
        let entry = (digest.to_string(), name.to_string());
        match published.get(&offset) {
            Some(existing) if *existing != entry => {
                divergent.insert(offset);
            }
            Some(_) => {}
            None => {
                published.insert(offset, entry);
            }
        }
    }
    verdict.divergent = divergent.len() as u64;
    verdict.unpublished = keys_by_offset.keys().filter(|offset| !published.contains_key(offset)).count() as u64;
    for entry in &ledger.entries {
        let answer = &entry.answer;
        let original = published.get(&answer.offset);
        let found = original.is_some_and(|(digest, _)| *digest == answer.digest)
            || (answer.replayed
                && original.is_some_and(|(_, name)| name == "accepted" || name == "rejected")
                && replays.contains(&(answer.offset, answer.digest.clone())));
        if !found {
            verdict.lost += 1;
        }
    }
    let mut evaluated: HashMap<&str, u32> = HashMap::new();
    for (offset, (_, name)) in &published {
        if name == "accepted" || name == "rejected" {
            if let Some(key) = keys_by_offset.get(offset) {
                *evaluated.entry(key.as_str()).or_default() += 1;
            }
        }
    }
    verdict.applied_twice = evaluated.values().filter(|&&count| count > 1).count() as u64;
    verdict
}

/// The first of `count` consecutive free loopback ports.
fn free_port_run(count: u16) -> anyhow::Result<u16> {
    for _ in 0..100 {
        let base = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port();
        if base.checked_add(count).is_none() {
            continue;
        }
        let held: Vec<_> = (base..base + count).map(|p| TcpListener::bind((Ipv4Addr::LOCALHOST, p))).collect();
        if held.iter().all(Result::is_ok) {
            return Ok(base);
        }
    }
    bail!("no {count} consecutive free loopback ports")
}

/// Instance id -> pid (None while it is not running), from the supervisor's cluster.json.
fn cluster_pids(cluster_dir: &Path) -> anyhow::Result<HashMap<u32, Option<u32>>> {
    let path = cluster_dir.join("cluster.json");
    let cluster: Value = read_json(&path)?;
    let mut pids = HashMap::new();
    for instance in cluster["instances"].as_array().into_iter().flatten() {
        let id = instance["id"].as_u64().context("cluster.json: an instance without an id")? as u32;
        let running = instance["state"] == "running";
        pids.insert(id, if running { instance["pid"].as_u64().map(|p| p as u32) } else { None });
    }
    Ok(pids)
}

/// Instance id -> how often the supervisor restarted it.
fn cluster_restarts(cluster_dir: &Path) -> anyhow::Result<HashMap<u32, u64>> {
    let cluster: Value = read_json(&cluster_dir.join("cluster.json"))?;
    let mut restarts = HashMap::new();
    for instance in cluster["instances"].as_array().into_iter().flatten() {
        let id = instance["id"].as_u64().context("cluster.json: an instance without an id")? as u32;
        restarts.insert(id, instance["restarts"].as_u64().context("cluster.json: no restarts count")?);
    }
    Ok(restarts)
}

/// Makes the child die with the suite (PR_SET_PDEATHSIG): a suite killed by a CI timeout
/// leaves no cluster, loadgen or broker behind. The signal follows the spawning thread, and
/// the suite spawns from its main thread only.
fn die_with_suite(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    assert_eq!(
        std::thread::current().name(),
        Some("main"),
        "PR_SET_PDEATHSIG follows the spawning thread: spawn from the main thread only"
    );
    let suite = std::process::id();
    // SAFETY: the closure runs between fork and exec and only calls prctl(2) and
    // getppid(2), which are async-signal-safe and touch no memory of ours.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The suite died between fork and prctl: the signal will never come.
            if libc::getppid() as u32 != suite {
                return Err(std::io::Error::other("the suite exited while starting a child"));
            }
            Ok(())
        })
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn sigkill(pid: u32) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) has no memory effects; a stale pid is reported as an error.
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Waits until the supervisor has started instance `id` again with a pid other than `old_pid`.
fn wait_restarted(cluster_dir: &Path, id: u32, old_pid: u32, deadline: Instant) -> anyhow::Result<u32> {
    loop {
        // cluster.json is replaced whole by the supervisor; a read between its writes
        // can still fail, and is retried.
        if let Ok(pids) = cluster_pids(cluster_dir) {
            if let Some(Some(pid)) = pids.get(&id) {
                if *pid != old_pid {
                    return Ok(*pid);
                }
            }
        }
        if Instant::now() > deadline {
            bail!("instance {id} was not restarted within {} s", READY_TIMEOUT.as_secs());
        }
        std::thread::sleep(POLL);
    }
}

/// Waits until the new process `pid` says it is recovering in its status.json; false if
/// it was ready (or gone) first.
fn wait_recovering(status_file: &Path, pid: u32, deadline: Instant) -> bool {
    while Instant::now() < deadline && alive(pid) {
        if let Ok(status) = read_json::<Value>(status_file) {
            // The file of the killed process says ready; the new one first writes
            // `recovering` with no uptime.
            match status["phase"].as_str() {
                Some("recovering") => return true,
                _ if status["ready"] == Value::Bool(true) && status["uptime_ms"].as_u64() < Some(1_000) => {
                    return false
                }
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// Whether the last status.json the instance wrote says it was ready.
fn status_says_ready(status_file: &Path) -> bool {
    read_json::<Value>(status_file).is_ok_and(|status| status["ready"] == Value::Bool(true))
}

/// Nothing listens at `target` (connection refused), as opposed to a slow answer.
fn refused(target: SocketAddr) -> bool {
    matches!(
        TcpStream::connect_timeout(&target, Duration::from_millis(200)),
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// The status code of GET /healthz, or None if the instance does not answer.
pub fn probe_health(target: SocketAddr) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: chaos\r\nConnection: close\r\n\r\n").ok()?;
    let mut buffer = [0u8; 1024];
    let mut filled = 0;
    loop {
        let read = stream.read(&mut buffer[filled..]).ok()?;
        if read == 0 {
            return None;
        }
        filled += read;
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buffer[..filled]) {
            Ok(httparse::Status::Complete(_)) => return response.code,
            Ok(httparse::Status::Partial) if filled < buffer.len() => continue,
            _ => return None,
        }
    }
}

fn wait_ready(target: SocketAddr, deadline: Instant) -> anyhow::Result<()> {
    while Instant::now() < deadline {
        if probe_health(target) == Some(200) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("{target} was not ready within {} s", READY_TIMEOUT.as_secs())
}

/// Whether an instance's status.json says it lost the broker and is not ready. The file
/// is rewritten every 200 ms by a live instance; a read between writes is retried.
fn broker_loss_advertised(status_file: &Path) -> bool {
    for _ in 0..STATUS_READ_ATTEMPTS {
        if let Ok(status) = read_json::<Value>(status_file) {
            return status["broker_connected"] == Value::Bool(false) && status["ready"] == Value::Bool(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

enum Settled {
    Yes,
    WatermarksDiffer,
    /// Instances whose published watermark stayed short of the durable one, with both.
    PublisherBehind(String),
}

/// Waits until every instance is ready, has the same durable watermarks, unchanged for a
/// second (the load is over, so they stop moving once all have the log's end), and has
/// published up to them (spec: Chaos.StateDigestsEqual): the stop kills the instances, so
/// outputs not yet on the outputs topic would be missing from the check.
fn settle(cluster_dir: &Path, instances: u32) -> anyhow::Result<Settled> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut last: Option<(String, Instant)> = None;
    let mut behind = Vec::new();
    while Instant::now() < deadline {
        let mut marks = BTreeSet::new();
        let mut all_ready = true;
        behind.clear();
        for id in 1..=instances {
            let path = cluster_dir.join(format!("instance-{id}")).join("status.json");
            let Ok(status) = read_json::<Value>(&path) else {
                all_ready = false;
                continue;
            };
            all_ready &= status["ready"] == Value::Bool(true);
            let partitions = status["partitions"].as_array().cloned().unwrap_or_default();
            let durable: Vec<Value> = partitions.iter().map(|p| p["durable_watermark"].clone()).collect();
            let published: Vec<Value> = partitions.iter().map(|p| p["published_watermark"].clone()).collect();
            if published != durable {
                let certified: Vec<Value> = partitions.iter().map(|p| p["certified_watermark"].clone()).collect();
                let json = |v: &Vec<Value>| serde_json::to_string(v).unwrap_or_default();
                behind.push(format!(
                    "instance {id} published {}, certified {}, durable {}",
                    json(&published),
                    json(&certified),
                    json(&durable)
                ));
            }
            marks.insert(serde_json::to_string(&durable)?);
        }
        if all_ready && marks.len() == 1 {
            let mark = marks.into_iter().next().expect("one");
            match &last {
                Some((seen, since)) if *seen == mark => {
                    if since.elapsed() >= SETTLE_QUIET && behind.is_empty() {
                        return Ok(Settled::Yes);
                    }
                }
                _ => last = Some((mark, Instant::now())),
            }
        } else {
            last = None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if last.is_some() && !behind.is_empty() {
        return Ok(Settled::PublisherBehind(behind.join("; ")));
    }
    Ok(Settled::WatermarksDiffer)
}

fn wait_child(child: &mut Child, deadline: Instant) -> anyhow::Result<Option<std::process::ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM to the supervisor, which stops every instance cleanly.
fn stop(cluster: &mut Child) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(cluster.id()).context("pid out of range")?;
    // SAFETY: kill(2) has no memory effects.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    match wait_child(cluster, Instant::now() + STOP_GRACE)? {
        Some(_) => Ok(()),
        None => {
            let _ = cluster.kill();
            bail!("tribunal cluster did not stop within {} s of SIGTERM", STOP_GRACE.as_secs())
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A tansu broker on a fixed port with its storage in `dir`, so that it can be killed and
/// started again as the same broker.
struct Broker {
    tansu: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Broker {
    fn start(tansu: &Path, dir: &Path) -> anyhow::Result<Broker> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let port = free_port_run(1)?;
        let mut broker = Broker { tansu: tansu.to_path_buf(), dir: dir.to_path_buf(), port, child: None };
        broker.restart()?;
        Ok(broker)
    }

    fn restart(&mut self) -> anyhow::Result<()> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = fs::OpenOptions::new().create(true).append(true).open(self.dir.join("broker.log"))?;
        let child = die_with_suite(&mut Command::new(&self.tansu))
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            // tansu resolves the sqlite path against its working directory.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} (run `make tools`)", self.tansu.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        while TcpStream::connect_timeout(&address, Duration::from_millis(100)).is_err() {
            if let Some(status) = self.child.as_mut().expect("spawned").try_wait()? {
                bail!("the broker exited ({status}); see {}", self.dir.join("broker.log").display());
            }
            if Instant::now() > deadline {
                bail!("the broker did not listen on {address}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGKILL, then wait for it to be gone.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::LedgerEntry;

    #[test]
    // spec: Chaos.ScenarioApplies
    fn all_picks_what_applies_and_a_named_misfit_is_an_error() {
        let names = |planned: Vec<(LogKind, u32, ScenarioKind)>| {
            planned.into_iter().map(|(l, n, k)| format!("{}:{n}:{}", l.name(), k.name())).collect::<Vec<_>>()
        };
        let local = plan(&["all".into()], &[2, 3], &[LogKind::Local]).unwrap();
        assert_eq!(
            names(local),
            [
                "local:2:kill-primary",
                "local:2:kill-backup",
                "local:2:kill-both",
                "local:2:kill-during-recovery",
                "local:3:kill-primary",
                "local:3:kill-backup",
                "local:3:kill-both",
                "local:3:kill-during-recovery",
                "local:3:kill-all-three"
            ]
        );
        // Each scenario on the first log it applies to: broker-restart goes to Kafka.
        let both = names(plan(&["all".into()], &[2], &[LogKind::Local, LogKind::Kafka]).unwrap());
        assert_eq!(
            both,
            [
                "local:2:kill-primary",
                "local:2:kill-backup",
                "local:2:kill-both",
                "local:2:kill-during-recovery",
                "kafka:2:broker-restart"
            ]
        );
        let kafka = names(plan(&["all".into()], &[3], &[LogKind::Kafka]).unwrap());
        assert_eq!(kafka.len(), 6, "{kafka:?}");
        assert!(kafka.iter().all(|n| n.starts_with("kafka:")));
        let error = plan(&["kill-all-three".into()], &[2], &[LogKind::Local]).unwrap_err();
        assert!(error.to_string().contains("--instances 3"));
        let error = plan(&["broker-restart".into()], &[3], &[LogKind::Local]).unwrap_err();
        assert!(error.to_string().contains("--log kafka"));
        assert!(plan(&["kill-everyone".into()], &[3], &[LogKind::Local]).is_err());
    }

    #[test]
    // spec: Chaos.VictimsKilled
    fn victims_per_scenario() {
        assert_eq!(ScenarioKind::KillPrimary.victims(2), [1]);
        assert_eq!(ScenarioKind::KillBackup.victims(3), [2]);
        assert_eq!(ScenarioKind::KillBoth.victims(3), [1, 2]);
        assert_eq!(ScenarioKind::KillAllThree.victims(3), [1, 2, 3]);
        assert_eq!(ScenarioKind::KillDuringRecovery.victims(2), [1]);
        assert!(ScenarioKind::BrokerRestart.victims(3).is_empty());
    }

    #[test]
    // spec: Chaos.FaultAtSeededMoment
    fn fault_moments_are_seeded_and_inside_the_window() {
        let schedule = Duration::from_secs(50);
        let moments: Vec<_> = (0..200).map(|i| fault_at(7, i, schedule)).collect();
        assert!(moments.iter().all(|m| *m >= schedule / 5 && *m < schedule * 3 / 5), "{moments:?}");
        assert_eq!(moments, (0..200).map(|i| fault_at(7, i, schedule)).collect::<Vec<_>>());
        assert_ne!(fault_at(7, 0, schedule), fault_at(8, 0, schedule));
        let distinct: BTreeSet<_> = moments.iter().collect();
        assert!(distinct.len() > 150, "moments spread over the window");
    }

    fn entry(key: &str, offset: u64, digest: &str) -> LedgerEntry {
        serde_json::from_value(serde_json::json!({
            "key": key,
            "command": {"type": "adjust", "warehouse": "W", "sku": "S", "delta": 1},
            "answer": {"http_status": 200, "partition": 0, "offset": offset, "decision": "accepted",
                       "replayed": false, "digest": digest},
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn output(offset: u64, verdict: &str, digest: &str) -> (u64, String) {
        (
            offset,
            serde_json::json!({"key": format!("0:{offset}"), "partition": 0, "offset": offset,
            "verdict": verdict, "digest": digest})
            .to_string(),
        )
    }

    #[test]
    // spec: Chaos.NothingLost, Chaos.NothingAppliedTwice, Chaos.PublishedOutputsCertified
    fn published_outputs_are_checked_against_the_ledger() {
        let ledger = Ledger {
            run_prefix: "t-".into(),
            entries: vec![entry("a", 0, "d0"), entry("b", 1, "d1"), entry("c", 3, "d3")],
            unresolved: Vec::new(),
            bad_answers: Vec::new(),
        };
        let keys: HashMap<u64, String> =
            [(0, "a"), (1, "b"), (2, "a"), (3, "c"), (4, "b")].into_iter().map(|(o, k)| (o, k.to_string())).collect();
        // Honest: published twice by a hand-over, duplicates replayed.
        let honest = vec![
            output(0, "accepted", "d0"),
            output(1, "rejected", "d1"),
            output(2, "replay", "r2"),
            output(1, "rejected", "d1"),
            output(3, "accepted", "d3"),
            output(4, "replay", "r4"),
        ];
        assert_eq!(check_published(&ledger, &keys, &honest), PublishedVerdict::default());

        // Offset 3 missing: c is lost. Offset 4 evaluated again: b applied twice.
        // Offset 0 published with two different outputs.
        let broken = vec![
            output(0, "accepted", "d0"),
            output(0, "accepted", "dX"),
            output(1, "rejected", "d1"),
            output(2, "replay", "r2"),
            output(4, "accepted", "d4"),
            (5, "not json".to_string()),
        ];
        let verdict = check_published(&ledger, &keys, &broken);
        assert_eq!(
            verdict,
            PublishedVerdict { lost: 1, applied_twice: 1, divergent: 1, unreadable: 1, unpublished: 1 }
        );

        // A retry answered by an instance that no longer held the original: a bare replay
        // recorded under the original's offset with the replay's digest.
        let mut replayed = entry("c", 3, "r4");
        replayed.answer.replayed = true;
        let with_replay = Ledger { entries: vec![replayed.clone()], ..ledger.clone() };
        let mut bare_replay = honest.clone();
        bare_replay[5] = (
            4,
            serde_json::json!({"key": "0:4", "partition": 0, "offset": 4, "verdict": "replay",
            "original_offset": 3, "digest": "r4"})
            .to_string(),
        );
        assert_eq!(check_published(&with_replay, &keys, &bare_replay).lost, 0);
        // Not if the original itself was never published.
        let without_original: Vec<_> = bare_replay.iter().filter(|(o, _)| *o != 3).cloned().collect();
        assert_eq!(check_published(&with_replay, &keys, &without_original).lost, 1);

        // An acknowledged digest that differs from the published one is not a match.
        let wrong_digest = vec![output(0, "accepted", "d0"), output(1, "rejected", "zz"), output(3, "accepted", "d3")];
        assert_eq!(check_published(&ledger, &keys, &wrong_digest).lost, 1);
    }

    #[test]
    fn table_has_a_row_per_scenario_with_its_violations() {
        let rows = vec![
            ScenarioRow {
                scenario: "kill-primary".into(),
                instances: 2,
                log: "local",
                passed: true,
                ..Default::default()
            },
            ScenarioRow {
                scenario: "kill-both".into(),
                instances: 3,
                log: "local",
                lost: 2,
                violations: vec!["acknowledged_lost".into()],
                time_to_ready_ms: Some(420),
                ..Default::default()
            },
        ];
        let mut out = Vec::new();
        print_table(&mut out, &rows).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].contains("kill-primary") && lines[1].contains("passed"));
        assert!(lines[2].contains("FAILED") && lines[2].contains("acknowledged_lost") && lines[2].contains("420"));
    }
}
