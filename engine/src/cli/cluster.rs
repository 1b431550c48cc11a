//! `tribunal cluster`: a local N-instance federation on one host.
//!
//! The supervisor starts N child processes of this same binary, each `tribunal run` with
//! its own data directory, federation address and instance id, every other instance as a
//! peer and one shared pre-shared key. It restarts a child that exits (with backoff), and
//! stops them all on SIGINT or SIGTERM. What runs where is in `BASE/cluster.json`.
//!
//! ```text
//! BASE/psk                     the federation's pre-shared key (hex, mode 0600), kept across runs
//! BASE/cluster.lock            flock(2)ed by the supervisor: one cluster per BASE
//! BASE/cluster.json            ids, pids, addresses and paths; rewritten when a pid changes
//! BASE/instance-<i>/           instance i's --data-dir (Ledger, status.json)
//! BASE/instance-<i>/tribunal.log   its stdout and stderr, appended across restarts
//! ```
//!
//! The supervisor is one thread: children get PR_SET_PDEATHSIG, which fires when the
//! thread that forked them ends, so they never outlive it, even when it is SIGKILLed.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

/// How often children are polled.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// First delay before restarting an instance that exited; it doubles up to the maximum.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// An instance that stayed up this long before exiting failed slowly: its backoff and its
/// count of quick failures start again.
const STABLE_UPTIME: Duration = Duration::from_secs(10);
/// Consecutive quick failures after which an instance is given up.
const MAX_QUICK_FAILURES: u32 = 20;
/// How long instances have to exit after SIGTERM before they get SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Bytes of the generated pre-shared key.
const PSK_BYTES: usize = 32;
const MAX_INSTANCES: u32 = 100;

/// `run` options the supervisor sets itself, per instance or from its own options; they
/// may not appear after `--`.
const RESERVED_RUN_FLAGS: &[(&str, &str)] = &[
    ("--log", "use tribunal cluster --log"),
    ("--config", "an instance's settings are flags; give them after `--`"),
    ("--data-dir", "each instance gets BASE/instance-<i>; use tribunal cluster --data-dir"),
    ("--instance-id", "instances are numbered 1..=N"),
    ("--listen", "each instance gets its own port; use tribunal cluster --base-port"),
    ("--peers", "every other instance is a peer"),
    ("--psk-file", "the cluster's key is BASE/psk"),
    ("--expected-copies", "use tribunal cluster --expected-copies"),
    ("--cores", "use tribunal cluster --cores"),
    ("--stop-at-end", "use tribunal cluster --stop-at-end"),
    ("--snapshot-every", "use tribunal cluster --snapshot-every"),
    ("--inject-fault", "use tribunal cluster --fault ID:SPEC"),
    ("--http", "each instance gets its own port; use tribunal cluster --http-base-port"),
];

#[derive(clap::Args)]
#[command(after_help = "\
Each instance is a child `tribunal run` with the data directory BASE/instance-<i>, a
federation address on 127.0.0.1, every other instance as a peer and the pre-shared key
BASE/psk (generated once, then reused). Its stdout and stderr are appended to
BASE/instance-<i>/tribunal.log. BASE/cluster.json lists the instances, their pids and files.

An instance that exits is restarted, after 100 ms doubling up to 5 s. After 20 consecutive
failures within 10 s of starting it is given up: the others are stopped and the cluster
exits 1. SIGINT or SIGTERM stops every instance (SIGTERM, then SIGKILL after 5 s) and the
cluster exits 0.")]
pub struct Args {
    /// Instances to run, with ids 1..=N; at least 2 unless --expected-copies is 1.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=MAX_INSTANCES as i64))]
    instances: u32,
    /// The input log, passed to every instance: `local:DIR` or `kafka:HOST:PORT[,HOST:PORT..]`.
    #[arg(long)]
    log: String,
    /// The cluster's directory: the key, cluster.json and one data directory per instance.
    #[arg(long, value_name = "BASE", default_value = "tribunal-cluster")]
    data_dir: PathBuf,
    /// Federation ports are P, P+1, ... on 127.0.0.1; 0 picks free ports.
    #[arg(long, value_name = "P", default_value_t = 0)]
    base_port: u16,
    /// Serve the REST API: instance i on 127.0.0.1:(H + i - 1) (`run --http`); off when absent.
    #[arg(long, value_name = "H")]
    http_base_port: Option<u16>,
    /// Byte-identical copies that certify an output; at most --instances.
    #[arg(long, value_name = "K", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    expected_copies: u32,
    /// Cores for every instance (`run --cores`), e.g. `0,1`. Default: every allowed core for
    /// each instance, or, with at least as many instances as cores, one core each, round robin.
    #[arg(long, value_name = "LIST")]
    cores: Option<String>,
    /// Every instance exits once the log is processed; the cluster exits 0 when they all
    /// exited 0 (an instance that exits 0 is not restarted).
    #[arg(long)]
    stop_at_end: bool,
    /// Passed to every instance (`run --snapshot-every`).
    #[arg(long, value_name = "N")]
    snapshot_every: Option<u64>,
    /// Fault injection for one instance: `ID:SPEC` passes `--inject-fault SPEC` to instance
    /// ID, e.g. `3:bitflip:0.01` or `2:delay:50`. Repeatable.
    #[arg(long = "fault", value_name = "ID:SPEC")]
    faults: Vec<String>,
    /// Further `run` options for every instance, after `--`.
    #[arg(last = true, value_name = "RUN_ARGS")]
    extra: Vec<String>,
    /// A TOML file of settings, keyed by the flags' long names (`instances = 3`). Flags win
    /// over TRIBUNAL_* variables, which win over the file. The instances get their
    /// settings as flags, never from this file or those variables.
    #[arg(long, value_name = "FILE")]
    #[allow(dead_code)] // read by cli::config, before clap parses the rest
    config: Option<PathBuf>,
}

/// Signals (SIGINT, SIGTERM) received so far; the handler only counts.
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_signal: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

fn install_signal_handlers() -> anyhow::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler touches nothing but an atomic, which is async-signal-safe.
        let previous = unsafe { libc::signal(signal, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t) };
        anyhow::ensure!(
            previous != libc::SIG_ERR,
            "installing a handler for signal {signal}: {}",
            io::Error::last_os_error()
        );
    }
    Ok(())
}

enum State {
    Running {
        child: Child,
        started: Instant,
    },
    /// Exited; started again at this instant.
    Waiting {
        restart_at: Instant,
    },
    /// Exited 0 with --stop-at-end.
    Done,
    /// Too many consecutive quick failures.
    GaveUp,
    /// Stopped by the supervisor.
    Stopped,
}

struct Instance {
    id: u32,
    listen: SocketAddr,
    http: Option<SocketAddr>,
    data_dir: PathBuf,
    log_file: PathBuf,
    status_file: PathBuf,
    /// The `run` arguments, the same at every start.
    args: Vec<OsString>,
    state: State,
    restarts: u32,
    quick_failures: u32,
    backoff: Duration,
}

impl Instance {
    fn pid(&self) -> Option<u32> {
        match &self.state {
            State::Running { child, .. } => Some(child.id()),
            _ => None,
        }
    }

    fn state_name(&self) -> &'static str {
        match self.state {
            State::Running { .. } => "running",
            State::Waiting { .. } => "restarting",
            State::Done => "done",
            State::GaveUp => "failed",
            State::Stopped => "stopped",
        }
    }

    /// Starts the child; its output is appended to the instance's log file.
    fn spawn(&self, exe: &Path) -> anyhow::Result<Child> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .with_context(|| format!("opening {}", self.log_file.display()))?;
        writeln!(log, "=== tribunal cluster: starting instance {} (restarts so far: {})", self.id, self.restarts)
            .with_context(|| format!("writing {}", self.log_file.display()))?;
        let stderr = log.try_clone().with_context(|| format!("duplicating {}", self.log_file.display()))?;
        let mut command = Command::new(exe);
        // The output goes to a file: no terminal colours in it.
        command.args(&self.args).env("NO_COLOR", "1").stdin(Stdio::null()).stdout(log).stderr(stderr);
        // The cluster's own settings are not the instances': they get theirs as flags.
        for (name, _) in std::env::vars_os() {
            let is_setting =
                name.to_str().is_some_and(|name| name.starts_with("TRIBUNAL_") && name != "TRIBUNAL_ADMIN_TOKEN");
            if is_setting {
                command.env_remove(&name);
            }
        }
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: setpgid, prctl and getppid are async-signal-safe, and the closure
        // allocates nothing (the errors are raw OS errors).
        unsafe {
            command.pre_exec(move || {
                // Its own process group: a terminal's Ctrl-C reaches the supervisor only,
                // which then stops the instances in order.
                if libc::setpgid(0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The supervisor died before prctl took effect.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        command.spawn().with_context(|| format!("starting instance {} ({})", self.id, exe.display()))
    }
}

/// `BASE/cluster.json`.
#[derive(Serialize)]
struct ClusterFile {
    supervisor_pid: u32,
    log: String,
    psk_file: String,
    expected_copies: u32,
    instances: Vec<InstanceEntry>,
}

#[derive(Serialize)]
struct InstanceEntry {
    id: u32,
    /// Absent while the instance is not running.
    pid: Option<u32>,
    /// `running`, `restarting`, `done` (exited 0 with --stop-at-end), `failed` (given up)
    /// or `stopped`.
    state: &'static str,
    listen: String,
    /// The REST API's address, with --http-base-port.
    #[serde(skip_serializing_if = "Option::is_none")]
    http: Option<String>,
    data_dir: String,
    log_file: String,
    status_file: String,
    restarts: u32,
}

struct Cluster {
    base: PathBuf,
    exe: PathBuf,
    log: String,
    psk_file: PathBuf,
    expected_copies: u32,
    stop_at_end: bool,
    instances: Vec<Instance>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    validate(&args)?;
    // spec: Configuration.EffectiveConfigurationLogged
    eprintln!("tribunal cluster: settings: {}", super::config::describe(super::config::effective()));
    let (base, lock) = lock_base(&args)?;

    let psk_file = base.join("psk");
    ensure_psk(&psk_file)?;
    let ports = ports(args.instances, args.base_port)?;
    let exe = std::env::current_exe().context("finding the tribunal binary to start instances from")?;
    let mut cluster = Cluster {
        base: base.clone(),
        exe,
        log: args.log.clone(),
        psk_file,
        expected_copies: args.expected_copies,
        stop_at_end: args.stop_at_end,
        instances: Vec::new(),
    };
    for id in 1..=args.instances {
        let instance = new_instance(&args, id, &base, &ports, &cluster.psk_file)?;
        cluster.instances.push(instance);
    }

    install_signal_handlers()?;
    for index in 0..cluster.instances.len() {
        let instance = &cluster.instances[index];
        match instance.spawn(&cluster.exe) {
            Ok(child) => cluster.instances[index].state = State::Running { child, started: Instant::now() },
            Err(error) => {
                cluster.stop_all();
                cluster.write_file_or_warn();
                return Err(error);
            }
        }
    }
    cluster.write_file().context("writing cluster.json")?;
    cluster.print_table();
    let code = cluster.supervise();
    drop(lock);
    Ok(code)
}

/// Creates the cluster's data dir (absolute) and takes its `cluster.lock`, which
/// the returned file holds until dropped: one supervisor per data dir.
fn lock_base(args: &Args) -> anyhow::Result<(PathBuf, File)> {
    let base = std::path::absolute(&args.data_dir)
        .with_context(|| format!("--data-dir {}: cannot make it absolute", args.data_dir.display()))?;
    fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let lock_path = base.join("cluster.lock");
    let lock = File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    let locked =
        fs4::fs_std::FileExt::try_lock_exclusive(&lock).with_context(|| format!("locking {}", lock_path.display()))?;
    anyhow::ensure!(
        locked,
        "another tribunal cluster is supervising {} ({} is locked)",
        base.display(),
        lock_path.display()
    );
    Ok((base, lock))
}

/// Instance `id`, stopped: its data dir (created), its address and its arguments,
/// with every other instance as a peer.
fn new_instance(args: &Args, id: u32, base: &Path, ports: &[u16], psk_file: &Path) -> anyhow::Result<Instance> {
    let data_dir = base.join(format!("instance-{id}"));
    fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, ports[id as usize - 1]));
    let peers: Vec<String> = (1..=args.instances)
        .filter(|&peer| peer != id)
        .map(|peer| format!("{peer}@{}", SocketAddr::from((Ipv4Addr::LOCALHOST, ports[peer as usize - 1]))))
        .collect();
    let instance_args = run_args(args, id, &data_dir, listen, &peers, psk_file);
    Ok(Instance {
        id,
        listen,
        http: http_address(args, id),
        log_file: data_dir.join("tribunal.log"),
        status_file: data_dir.join("status.json"),
        data_dir,
        args: instance_args,
        state: State::Stopped,
        restarts: 0,
        quick_failures: 0,
        backoff: FIRST_BACKOFF,
    })
}

fn validate(args: &Args) -> anyhow::Result<()> {
    match args.log.split_once(':') {
        Some(("local", dir)) => anyhow::ensure!(!dir.is_empty(), "--log {:?}: expected local:DIR", args.log),
        Some(("kafka", _)) => anyhow::ensure!(
            crate::log::kafka::parse_brokers(&args.log).is_some(),
            "--log {:?}: expected kafka:HOST:PORT[,HOST:PORT..]",
            args.log
        ),
        _ => anyhow::bail!("--log {:?}: expected local:DIR or kafka:HOST:PORT[,HOST:PORT..]", args.log),
    }
    anyhow::ensure!(
        args.expected_copies <= args.instances,
        "--expected-copies {} is more than --instances {}: no output could ever be certified",
        args.expected_copies,
        args.instances
    );
    anyhow::ensure!(
        args.instances >= 2 || args.expected_copies == 1,
        "--instances {}: a federation needs at least 2 instances (or --expected-copies 1)",
        args.instances
    );
    if let Some(http) = args.http_base_port {
        anyhow::ensure!(
            http != 0 && u32::from(http) + args.instances - 1 <= u32::from(u16::MAX),
            "--http-base-port {http} with {} instances needs ports {http}..{} in 1..=65535",
            args.instances,
            u32::from(http) + args.instances - 1
        );
    }
    if args.base_port != 0 {
        let last = u32::from(args.base_port) + args.instances - 1;
        anyhow::ensure!(
            last <= u32::from(u16::MAX),
            "--base-port {} with {} instances needs ports up to {last}, past 65535",
            args.base_port,
            args.instances
        );
    }
    for fault in &args.faults {
        let (id, spec) = fault
            .split_once(':')
            .with_context(|| format!("--fault {fault:?}: expected ID:SPEC, e.g. 3:bitflip:0.01"))?;
        let id: u32 = id.parse().with_context(|| format!("--fault {fault:?}: {id:?} is not an instance id"))?;
        anyhow::ensure!(
            (1..=args.instances).contains(&id),
            "--fault {fault:?}: there is no instance {id} (ids are 1..={})",
            args.instances
        );
        crate::cli::federation_args::parse_fault(spec).with_context(|| format!("--fault {fault:?}"))?;
    }
    for extra in &args.extra {
        for (flag, hint) in RESERVED_RUN_FLAGS {
            anyhow::ensure!(
                !super::config::names_flag(extra, flag),
                "`-- {extra}`: tribunal cluster sets {flag} itself ({hint})"
            );
        }
    }
    if let Some(cores) = &args.cores {
        crate::node::cores::select(Some(cores)).with_context(|| format!("--cores {cores:?}"))?;
    }
    Ok(())
}

/// The cores instance `id` runs on: `--cores` for every instance when given. Otherwise,
/// when there are at least as many instances as allowed cores, one core each, round robin:
/// every instance already uses every core then, and more shards than cores would only add
/// hand-offs between threads that share a core. Fewer instances than cores: every core.
fn instance_cores(args: &Args, id: u32) -> Option<String> {
    if let Some(cores) = &args.cores {
        return Some(cores.clone());
    }
    let allowed = crate::node::cores::select(None).ok()?;
    (args.instances as usize >= allowed.len()).then(|| allowed[(id as usize - 1) % allowed.len()].to_string())
}

/// Instance `id`'s REST address, with --http-base-port.
fn http_address(args: &Args, id: u32) -> Option<SocketAddr> {
    let port = u32::from(args.http_base_port?) + id - 1;
    Some(SocketAddr::from((Ipv4Addr::LOCALHOST, u16::try_from(port).ok()?)))
}

/// The `run` arguments of instance `id`.
fn run_args(
    args: &Args,
    id: u32,
    data_dir: &Path,
    listen: SocketAddr,
    peers: &[String],
    psk_file: &Path,
) -> Vec<OsString> {
    let mut run: Vec<OsString> = vec![
        "run".into(),
        "--log".into(),
        args.log.clone().into(),
        "--data-dir".into(),
        data_dir.into(),
        "--instance-id".into(),
        id.to_string().into(),
        "--listen".into(),
        listen.to_string().into(),
    ];
    if !peers.is_empty() {
        run.extend(["--peers".into(), peers.join(",").into()]);
    }
    run.extend([
        "--psk-file".into(),
        psk_file.into(),
        "--expected-copies".into(),
        args.expected_copies.to_string().into(),
    ]);
    if let Some(cores) = instance_cores(args, id) {
        run.extend(["--cores".into(), cores.into()]);
    }
    if let Some(http) = http_address(args, id) {
        run.extend(["--http".into(), http.to_string().into()]);
    }
    if args.stop_at_end {
        run.push("--stop-at-end".into());
    }
    if let Some(every) = args.snapshot_every {
        run.extend(["--snapshot-every".into(), every.to_string().into()]);
    }
    for fault in &args.faults {
        if let Some((fault_id, spec)) = fault.split_once(':') {
            if fault_id.parse() == Ok(id) {
                run.extend(["--inject-fault".into(), spec.into()]);
            }
        }
    }
    run.extend(args.extra.iter().map(OsString::from));
    run
}

/// The federation ports: `base`, `base + 1`, ..., or free loopback ports when `base` is 0.
/// Every port is checked to be free now (an instance that cannot bind later is restarted).
fn ports(instances: u32, base: u16) -> anyhow::Result<Vec<u16>> {
    // Bound all at once so that the kernel hands out distinct ports, then released.
    let mut listeners = Vec::new();
    for index in 0..instances {
        let port = if base == 0 { 0 } else { base + index as u16 };
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).with_context(|| {
            if port == 0 {
                "finding a free port on 127.0.0.1".to_string()
            } else {
                format!("port {port} on 127.0.0.1 is not free (--base-port {base})")
            }
        })?;
        listeners.push(listener);
    }
    listeners.iter().map(|l| Ok(l.local_addr().context("reading a bound port")?.port())).collect()
}

/// Makes sure `path` holds a pre-shared key: 32 random bytes, hex, mode 0600. A key that is
/// already there is kept, so that a restarted cluster keeps its key.
fn ensure_psk(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        crate::cli::federation_args::read_psk(path)?;
        let mode = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.permissions().mode();
        if mode & 0o077 != 0 {
            eprintln!("tribunal cluster: warning: {} is readable by others (mode {:o})", path.display(), mode & 0o777);
        }
        return Ok(());
    }
    let mut key = [0u8; PSK_BYTES];
    getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("generating the pre-shared key: {e}"))?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = path.with_extension("tmp");
    // A leftover from an interrupted run; the lock on the cluster directory is held.
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    writeln!(file, "{hex}").and_then(|()| file.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// The last non-empty line of an instance's log (its error, when it failed), if readable.
fn last_line(path: &Path) -> Option<String> {
    const TAIL_BYTES: u64 = 4_096;
    let mut file = File::open(path).ok()?;
    let length = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(length.saturating_sub(TAIL_BYTES))).ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    let tail = String::from_utf8_lossy(&tail);
    let line = tail.lines().map(str::trim).rfind(|line| !line.is_empty())?;
    // Not the supervisor's own start marker: the instance wrote nothing.
    (!line.starts_with("=== tribunal cluster:")).then(|| line.to_string())
}

impl Cluster {
    /// Polls the instances until a signal, every instance is done (--stop-at-end), or one
    /// is given up.
    fn supervise(&mut self) -> ExitCode {
        loop {
            if SIGNALS.load(Ordering::SeqCst) > 0 {
                eprintln!("tribunal cluster: signal received; stopping {} instances", self.running());
                self.stop_all();
                self.write_file_or_warn();
                return ExitCode::SUCCESS;
            }
            let mut changed = false;
            for index in 0..self.instances.len() {
                changed |= self.poll(index);
            }
            if let Some(failed) = self.instances.iter().find(|i| matches!(i.state, State::GaveUp)) {
                eprintln!(
                    "tribunal cluster: gave up on instance {} after {MAX_QUICK_FAILURES} consecutive failures \
                     within {} s of starting (see {}); stopping the others",
                    failed.id,
                    STABLE_UPTIME.as_secs(),
                    failed.log_file.display()
                );
                self.stop_all();
                self.write_file_or_warn();
                return ExitCode::from(1);
            }
            if changed {
                self.write_file_or_warn();
            }
            if self.stop_at_end && self.instances.iter().all(|i| matches!(i.state, State::Done)) {
                eprintln!("tribunal cluster: all {} instances finished", self.instances.len());
                return ExitCode::SUCCESS;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// One instance: reaps it if it exited and schedules its restart, or restarts it when
    /// its backoff is over. True if its pid changed.
    fn poll(&mut self, index: usize) -> bool {
        let now = Instant::now();
        let stop_at_end = self.stop_at_end;
        let instance = &mut self.instances[index];
        match &mut instance.state {
            State::Running { child, started } => {
                let (pid, uptime) = (child.id(), now.duration_since(*started));
                let status = match child.try_wait() {
                    Ok(None) => return false,
                    Ok(Some(status)) => status,
                    Err(error) => {
                        // Cannot happen for our own unreaped child; treat it as gone.
                        eprintln!("tribunal cluster: waiting for instance {} (pid {pid}): {error}", instance.id);
                        let _ = child.kill();
                        let _ = child.wait();
                        return Self::failed(instance, None, uptime, now);
                    }
                };
                if status.success() && stop_at_end {
                    eprintln!("tribunal cluster: instance {} (pid {pid}) finished", instance.id);
                    instance.state = State::Done;
                    return true;
                }
                // An instance that failed says why in its last line; one killed by a signal does not.
                let last_line = match status.code() {
                    Some(code) if code != 0 => last_line(&instance.log_file).map(|line| format!(": {line}")),
                    _ => None,
                }
                .unwrap_or_default();
                eprintln!(
                    "tribunal cluster: instance {} (pid {pid}) exited ({status}) after {:.1} s{last_line}",
                    instance.id,
                    uptime.as_secs_f64()
                );
                Self::failed(instance, Some(status), uptime, now)
            }
            State::Waiting { restart_at } if now >= *restart_at => {
                match instance.spawn(&self.exe) {
                    Ok(child) => {
                        instance.restarts += 1;
                        eprintln!(
                            "tribunal cluster: restarted instance {} as pid {} (restart {})",
                            instance.id,
                            child.id(),
                            instance.restarts
                        );
                        instance.state = State::Running { child, started: Instant::now() };
                    }
                    Err(error) => {
                        eprintln!("tribunal cluster: {error:#}");
                        Self::failed(instance, None, Duration::ZERO, now);
                    }
                }
                true
            }
            State::Waiting { .. } | State::Done | State::GaveUp | State::Stopped => false,
        }
    }

    /// Schedules the restart of an instance that exited (or could not start), or gives it up.
    fn failed(instance: &mut Instance, status: Option<ExitStatus>, uptime: Duration, now: Instant) -> bool {
        if uptime >= STABLE_UPTIME {
            instance.quick_failures = 0;
            instance.backoff = FIRST_BACKOFF;
        }
        instance.quick_failures += 1;
        if uptime < STABLE_UPTIME && instance.quick_failures >= MAX_QUICK_FAILURES {
            instance.state = State::GaveUp;
            return true;
        }
        let delay = instance.backoff;
        instance.backoff = (instance.backoff * 2).min(MAX_BACKOFF);
        if status.is_some() {
            eprintln!(
                "tribunal cluster: restarting instance {} in {} ms (see {})",
                instance.id,
                delay.as_millis(),
                instance.log_file.display()
            );
        }
        instance.state = State::Waiting { restart_at: now + delay };
        true
    }

    fn running(&self) -> usize {
        self.instances.iter().filter(|i| matches!(i.state, State::Running { .. })).count()
    }

    /// SIGTERM to every running instance, SIGKILL to those still there after the grace
    /// period (or at once on another signal); every child is reaped.
    fn stop_all(&mut self) {
        let signals = SIGNALS.load(Ordering::SeqCst);
        for instance in &mut self.instances {
            if let State::Running { child, .. } = &instance.state {
                // SAFETY: kill(2) on our own child, not yet reaped, so the pid is still its.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            for instance in &mut self.instances {
                if let State::Running { child, .. } = &mut instance.state {
                    if !matches!(child.try_wait(), Ok(None)) {
                        instance.state = State::Stopped;
                    }
                }
            }
            if self.running() == 0 {
                break;
            }
            if Instant::now() >= deadline || SIGNALS.load(Ordering::SeqCst) > signals {
                for instance in &mut self.instances {
                    if let State::Running { child, .. } = &mut instance.state {
                        eprintln!(
                            "tribunal cluster: instance {} (pid {}) did not stop; killing it",
                            instance.id,
                            child.id()
                        );
                        let _ = child.kill();
                        let _ = child.wait();
                        instance.state = State::Stopped;
                    }
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for instance in &mut self.instances {
            if let State::Waiting { .. } = instance.state {
                instance.state = State::Stopped;
            }
        }
    }

    fn file(&self) -> ClusterFile {
        ClusterFile {
            supervisor_pid: std::process::id(),
            log: self.log.clone(),
            psk_file: self.psk_file.display().to_string(),
            expected_copies: self.expected_copies,
            instances: self
                .instances
                .iter()
                .map(|i| InstanceEntry {
                    id: i.id,
                    pid: i.pid(),
                    state: i.state_name(),
                    listen: i.listen.to_string(),
                    http: i.http.map(|a| a.to_string()),
                    data_dir: i.data_dir.display().to_string(),
                    log_file: i.log_file.display().to_string(),
                    status_file: i.status_file.display().to_string(),
                    restarts: i.restarts,
                })
                .collect(),
        }
    }

    /// `BASE/cluster.json`, atomically (temporary file, then rename).
    fn write_file(&self) -> anyhow::Result<()> {
        let path = self.base.join("cluster.json");
        let mut bytes = serde_json::to_vec_pretty(&self.file())?;
        bytes.push(b'\n');
        crate::storage::write_atomically(&path, &bytes).with_context(|| format!("writing {}", path.display()))
    }

    fn write_file_or_warn(&self) {
        if let Err(error) = self.write_file() {
            eprintln!("tribunal cluster: warning: {error:#}");
        }
    }

    fn print_table(&self) {
        // Paths under the current directory are shown relative to it (cluster.json has
        // them absolute).
        let cwd = std::env::current_dir().ok();
        let shown = |path: &Path| {
            cwd.as_deref().and_then(|cwd| path.strip_prefix(cwd).ok()).unwrap_or(path).display().to_string()
        };
        let rows: Vec<[String; 6]> = self
            .instances
            .iter()
            .map(|i| {
                [
                    i.id.to_string(),
                    i.pid().map_or("-".into(), |p| p.to_string()),
                    i.listen.to_string(),
                    shown(&i.data_dir),
                    shown(&i.log_file),
                    shown(&i.status_file),
                ]
            })
            .collect();
        let header = ["id", "pid", "federation", "data dir", "log", "status"];
        let mut widths = header.map(str::len);
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.len());
            }
        }
        let mut out = io::stdout().lock();
        let _ = writeln!(
            out,
            "tribunal cluster: {} instances on {}, expected copies {} (supervisor pid {})",
            self.instances.len(),
            self.log,
            self.expected_copies,
            std::process::id()
        );
        let line = |cells: &[&str]| {
            let padded: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
            padded.join("  ").trim_end().to_string()
        };
        let _ = writeln!(out, "{}", line(&header));
        for row in &rows {
            let cells: Vec<&str> = row.iter().map(String::as_str).collect();
            let _ = writeln!(out, "{}", line(&cells));
        }
        let _ = writeln!(
            out,
            "key {}; instances and pids in {}",
            shown(&self.psk_file),
            shown(&self.base.join("cluster.json"))
        );
        let _ = writeln!(out, "stop with Ctrl-C or `kill {}`", std::process::id());
        let _ = out.flush();
    }
}
