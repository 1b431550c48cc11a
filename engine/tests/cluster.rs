//! `tribunal cluster`: the supervisor's mechanics (start, restart, stop), whatever the
//! instances themselves manage to do.

mod support;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::{die_with_parent, ok, tribunal};

/// Generous: a debug build on a loaded two-core machine.
const TIMEOUT: Duration = Duration::from_secs(60);

/// `BASE/cluster.json`'s (pid, restarts) per instance, once it exists.
fn instances(base: &Path) -> Option<Vec<(Option<i32>, u64)>> {
    let text = std::fs::read_to_string(base.join("cluster.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).expect("cluster.json is JSON (written atomically)");
    let list = json["instances"].as_array().expect("cluster.json has instances");
    Some(
        list.iter()
            .map(|i| {
                let pid = i["pid"].as_i64().map(|p| i32::try_from(p).expect("a pid"));
                (pid, i["restarts"].as_u64().expect("restarts"))
            })
            .collect(),
    )
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Processes whose command line mentions `dir` (every instance's does: `--data-dir`).
fn processes_using(dir: &Path) -> Vec<i32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<i32>().ok()) else { continue };
        // A process that ended meanwhile has no cmdline to read; a zombie has an empty one.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            found.push(pid);
        }
    }
    found
}

/// Polls `condition` on cluster.json until it holds; fails the test, with the supervisor's stderr, after TIMEOUT or if the supervisor exits.
fn wait_for<T>(
    base: &Path,
    supervisor: &mut Child,
    stderr: &Path,
    what: &str,
    condition: impl Fn(&[(Option<i32>, u64)]) -> Option<T>,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(found) = instances(base).as_deref().and_then(&condition) {
            return found;
        }
        let log = || std::fs::read_to_string(stderr).unwrap_or_default();
        if let Some(status) = supervisor.try_wait().expect("polling the supervisor") {
            panic!("the supervisor exited ({status}) waiting for {what}; its stderr:\n{}", log());
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "no {what} in cluster.json after {TIMEOUT:?}; supervisor stderr:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn supervisor_restarts_a_killed_instance_and_stops_every_instance_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let log = format!("local:{}", dir.path().join("log").display());
    let commands = dir.path().join("commands.jsonl");
    std::fs::write(&commands, ok(tribunal().args(["sample", "--events", "10"]))).unwrap();
    ok(tribunal().args(["log", "append", "--log", &log]).arg(&commands));

    let base = dir.path().join("c");
    let stderr_path = dir.path().join("supervisor.stderr");
    let mut supervisor = die_with_parent(
        tribunal()
            .args(["cluster", "--instances", "2", "--expected-copies", "1", "--log", &log, "--data-dir"])
            .arg(&base)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap()),
    )
    .spawn()
    .expect("tribunal cluster starts");

    // Both instances are listed, and instance 1 runs. (While federation is unfinished an
    // instance may fail at start and be restarted over and over: then its pid is listed
    // only between a restart and the next exit, and the two need not be listed at once.)
    let killed = wait_for(&base, &mut supervisor, &stderr_path, "pid for instance 1", |instances| match instances {
        [(pid, _), _] => *pid,
        _ => None,
    });
    assert!(base.join("psk").is_file() && base.join("instance-1").is_dir() && base.join("instance-2").is_dir());

    // SIGKILL instance 1. It may have exited on its own already (a failing start is
    // restarted too): either way the supervisor must start it again.
    // SAFETY: kill(2) with a pid read from cluster.json.
    unsafe { libc::kill(killed, libc::SIGKILL) };
    wait_for(&base, &mut supervisor, &stderr_path, "new pid for instance 1", |instances| match instances[0] {
        (Some(pid), restarts) if pid != killed && restarts >= 1 => Some(pid),
        _ => None,
    });

    // SIGTERM: the supervisor stops every instance and exits 0.
    let running: Vec<i32> = instances(&base).unwrap().iter().filter_map(|(pid, _)| *pid).collect();
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(supervisor.id() as i32, libc::SIGTERM) };
    let started = Instant::now();
    let status = loop {
        if let Some(status) = supervisor.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < TIMEOUT, "the supervisor did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(status.success(), "the supervisor exited with {status} after SIGTERM; stderr:\n{stderr}");
    for pid in running {
        assert!(!alive(pid), "instance pid {pid} outlived the supervisor; its stderr:\n{stderr}");
    }
    let left = processes_using(&base);
    assert!(left.is_empty(), "processes still running with {} in their arguments: {left:?}", base.display());
    let after = instances(&base).unwrap();
    assert!(after.iter().all(|(pid, _)| pid.is_none()), "cluster.json still lists pids after the stop: {after:?}");
    assert!(after[0].1 >= 1, "instance 1's restarts are recorded: {after:?}");
}

#[test]
fn a_clean_run_to_the_end_publishes_each_output_exactly_once() {
    // spec: Publisher.TakeOverReadsTheSink
    // The instances stop one after another at --stop-at-end: each stop hands the
    // publisher role over, and the new publisher must resume where the outputs log ends,
    // not where the last heartbeat it heard said.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let commands = dir.path().join("commands.jsonl");
    std::fs::write(&commands, ok(tribunal().args(["sample", "--events", "30000", "--seed", "5"]))).unwrap();
    ok(tribunal().args(["log", "append", "--log", &format!("local:{}", log.display())]).arg(&commands));
    let base = dir.path().join("cluster");
    let status = die_with_parent(
        tribunal()
            .args(["cluster", "--instances", "3", "--stop-at-end", "--log", &format!("local:{}", log.display())])
            .arg("--data-dir")
            .arg(&base)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .status()
    .unwrap();
    assert!(status.success(), "the cluster ran to the end: {status}");
    let outputs = format!("local:{}", log.join("outputs").display());
    let lines = ok(tribunal().args(["log", "read", "--log", &outputs]));
    let keys: Vec<String> = String::from_utf8(lines)
        .unwrap()
        .lines()
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            let payload: serde_json::Value = serde_json::from_str(record["payload"].as_str().unwrap()).unwrap();
            payload["key"].as_str().unwrap().to_owned()
        })
        .collect();
    let distinct: std::collections::BTreeSet<&String> = keys.iter().collect();
    assert_eq!(distinct.len(), 30_000, "every output is published");
    assert_eq!(keys.len(), 30_000, "and none twice: {} duplicates", keys.len() - distinct.len());
}
