//! `tribunal run` as real processes on a real local log and Ledger: SIGKILL at random
//! moments (some during recovery), corrupted segments, and different core counts.
//! The final state is read back with `tribunal inspect` and compared with the
//! sequential reference (`tribunal evaluate --log`) over the same log: same state
//! digest, same outputs digest (every offset's output, so nothing lost or applied
//! twice), same stock table.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use support::{ok, tribunal};
use tribunal_shards::simulator::SplitMix64;

mod support;

struct Dirs {
    _tmp: tempfile::TempDir,
    log: PathBuf,
    data: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    Dirs { log: tmp.path().join("log"), data: tmp.path().join("data"), _tmp: tmp }
}

fn log_arg(log: &Path) -> String {
    format!("local:{}", log.display())
}

/// Appends `events` sample commands (seeded) to the log.
fn append_sample(log: &Path, events: u64, seed: u64) {
    let commands = ok(tribunal().args(["sample", "--events", &events.to_string(), "--seed", &seed.to_string()]));
    let file = log.parent().unwrap().join(format!("sample-{seed}.jsonl"));
    std::fs::write(&file, commands).unwrap();
    ok(tribunal().args(["log", "append", "--log", &log_arg(log)]).arg(&file));
}

fn append_raw(log: &Path, lines: &[&[u8]]) {
    let file = log.parent().unwrap().join("raw.jsonl");
    std::fs::write(&file, lines.join(&b"\n"[..])).unwrap();
    ok(tribunal().args(["log", "append", "--unchecked", "--log", &log_arg(log)]).arg(&file));
}

fn spawn_run(dirs: &Dirs, cores: &str) -> Child {
    tribunal()
        .args([
            "run",
            "--expected-copies",
            "1",
            "--log",
            &log_arg(&dirs.log),
            "--stop-at-end",
            "--cores",
            cores,
            "--data-dir",
        ])
        .arg(&dirs.data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn run_to_end(dirs: &Dirs, cores: &str) {
    let out = spawn_run(dirs, cores).wait_with_output().unwrap();
    assert!(out.status.success(), "run failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)))
}

fn inspect(data: &Path) -> serde_json::Value {
    json(&ok(tribunal().args(["inspect", "--json", "--data-dir"]).arg(data)))
}

fn reference(log: &Path) -> serde_json::Value {
    json(&ok(tribunal().args(["evaluate", "--json", "--log", &log_arg(log)])))
}

/// The engine's recovered state equals the reference's for the whole log.
fn assert_matches_reference(dirs: &Dirs) -> serde_json::Value {
    let engine = inspect(&dirs.data);
    let expected = reference(&dirs.log);
    let records = expected["records"].as_u64().unwrap();
    assert_eq!(engine["durable_watermark"].as_u64(), Some(records - 1), "every record is durable");
    assert_eq!(engine["outputs"], expected["records"], "one output per offset");
    assert_eq!(engine["outputs_digest"], expected["outputs_digest"], "every output equals the reference's");
    assert_eq!(engine["state_digest"], expected["state_digest"], "the state equals the reference's");
    assert_eq!(engine["stock"], expected["stock"]);
    engine
}

#[test]
fn sigkill_at_random_moments_loses_nothing_and_applies_nothing_twice() {
    // spec: Recovery.TornTailTruncated
    // spec: Recovery.ReplayBoundedByWatermark
    // spec: Recovery.InputResumesAfterWatermark
    // spec: Ledger.RecordDurableAfterSync
    let dirs = dirs();
    let seed = std::env::var("TRIBUNAL_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    let mut rng = SplitMix64(seed);
    append_sample(&dirs.log, 5_000, 1);
    let mut kills = 0;
    let mut round = 0u64;
    while kills < 24 {
        round += 1;
        assert!(round < 200, "could not land 24 kills in 200 rounds");
        // The log keeps growing between crashes, as it would under load.
        append_sample(&dirs.log, 1_500, 100 + round);
        let mut child = spawn_run(&dirs, "0,1");
        // Some kills land during recovery or start-up, most while processing.
        let delay_ms = if rng.below(4) == 0 { rng.below(15) } else { 15 + rng.below(150) };
        std::thread::sleep(Duration::from_millis(delay_ms));
        match child.try_wait().unwrap() {
            Some(status) => assert!(status.success(), "run exited by itself with {status}"),
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
            }
        }
    }
    run_to_end(&dirs, "0,1");
    let engine = assert_matches_reference(&dirs);
    assert!(engine["would_cut"].as_array().unwrap().is_empty());
    eprintln!("{kills} SIGKILLs over {round} rounds (seed {seed}), {} records", engine["outputs"]);
}

fn last_segment(data: &Path, shard: u32) -> PathBuf {
    let dir = data.join("ledger").join(format!("shard-{shard:03}"));
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    segments.sort();
    segments.pop().unwrap()
}

/// Length of the data in a segment, zero padding excluded.
fn data_len(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1)
}

#[test]
fn a_torn_tail_is_cut_and_the_log_fills_the_gap() {
    // spec: Recovery.TornTailTruncated
    // More records than one batch holds, so that earlier batches stay durable.
    let dirs = dirs();
    append_sample(&dirs.log, 10_000, 2);
    run_to_end(&dirs, "0,1");
    let segment = last_segment(&dirs.data, 0);
    let bytes = std::fs::read(&segment).unwrap();
    let torn = data_len(&bytes) - 5;
    std::fs::write(&segment, &bytes[..torn]).unwrap();
    let before = inspect(&dirs.data);
    let cuts = before["would_cut"].as_array().unwrap();
    assert!(cuts.iter().any(|c| c["shard"] == 0), "{before}");
    let watermark = before["durable_watermark"].as_u64().expect("earlier batches stay durable");
    assert!(watermark < 9_999, "the torn batch is not durable");
    run_to_end(&dirs, "0,1");
    assert_matches_reference(&dirs);
}

#[test]
fn a_flipped_byte_in_the_middle_is_cut_there_and_the_rest_redone() {
    // spec: Recovery.TornTailTruncated
    let dirs = dirs();
    append_sample(&dirs.log, 10_000, 3);
    run_to_end(&dirs, "0,1");
    let segment = last_segment(&dirs.data, 1);
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = data_len(&bytes) / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&segment, &bytes).unwrap();
    let before = inspect(&dirs.data);
    let cuts = before["would_cut"].as_array().unwrap();
    let cut = cuts.iter().find(|c| c["shard"] == 1).unwrap_or_else(|| panic!("{before}"));
    assert!(cut["position"].as_u64().unwrap() <= middle as u64);
    assert!(before["durable_watermark"].as_u64().is_none_or(|w| w < 9_999));
    run_to_end(&dirs, "0,1");
    assert_matches_reference(&dirs);
}

#[test]
fn one_core_and_two_cores_give_the_same_state() {
    // spec: Registrar.InstanceDigestIsShardSum
    let one = dirs();
    append_sample(&one.log, 4_000, 4);
    let two =
        Dirs { log: one.log.clone(), data: one.data.with_file_name("data-two"), _tmp: tempfile::tempdir().unwrap() };
    run_to_end(&one, "0");
    run_to_end(&two, "0,1");
    let (a, b) = (assert_matches_reference(&one), assert_matches_reference(&two));
    assert_eq!(a["shards"], 1);
    assert_eq!(b["shards"], 2);
    assert_eq!(a["state_digest"], b["state_digest"]);
    assert_eq!(a["outputs_digest"], b["outputs_digest"]);
}

#[test]
fn undecodable_records_get_the_same_rejection_on_every_run() {
    // spec: Usher.MalformedRecordRejected
    let dirs = dirs();
    append_sample(&dirs.log, 500, 5);
    append_raw(&dirs.log, &[b"\xff\xfe garbage", b"{\"v\":1}", b"[1,2,3]"]);
    append_sample(&dirs.log, 500, 6);
    run_to_end(&dirs, "0,1");
    let first = assert_matches_reference(&dirs);
    let again = Dirs {
        log: dirs.log.clone(),
        data: dirs.data.with_file_name("data-again"),
        _tmp: tempfile::tempdir().unwrap(),
    };
    run_to_end(&again, "0");
    let second = assert_matches_reference(&again);
    assert_eq!(first["outputs_digest"], second["outputs_digest"]);
    let verdicts = reference(&dirs.log)["verdicts"].clone();
    assert_eq!(verdicts["malformed"], 3, "{verdicts}");
}

#[test]
fn a_data_dir_refuses_another_shard_count() {
    let dirs = dirs();
    append_sample(&dirs.log, 100, 8);
    run_to_end(&dirs, "0,1");
    let out = spawn_run(&dirs, "0").wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("was written by 2 shard(s)"), "{stderr}");
}

#[test]
fn a_core_that_is_not_allowed_is_a_clear_error() {
    let dirs = dirs();
    append_sample(&dirs.log, 10, 9);
    let out = spawn_run(&dirs, "1000").wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("core 1000 is not allowed"), "{stderr}");
}

/// The most a recovery may replay with `--snapshot-every every`: that many plus one
/// Usher batch (4,096 records).
fn replay_bound(every: u64) -> u64 {
    every + 4_096
}

fn status(data: &Path) -> serde_json::Value {
    json(&std::fs::read(data.join("status.json")).expect("status.json"))
}

/// What the last start of the instance in `data` replayed, from its `status.json`.
fn replayed_entries(data: &Path) -> u64 {
    let status = status(data);
    status["recovery"]["replayed_entries"].as_u64().unwrap_or_else(|| panic!("no recovery figures: {status}"))
}

fn segments_on_shard_0(data: &Path) -> usize {
    std::fs::read_dir(data.join("ledger").join("shard-000")).unwrap().count()
}

fn spawn_snapshotting(dirs: &Dirs, snapshot_every: u64, stop_at_end: bool) -> Child {
    tribunal()
        .args(["run", "--expected-copies", "1", "--log", &log_arg(&dirs.log), "--cores", "0,1"])
        .args(["--snapshot-every", &snapshot_every.to_string()])
        .args(stop_at_end.then_some("--stop-at-end"))
        .arg("--data-dir")
        .arg(&dirs.data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The state after the last snapshot and every output after it equal the reference's.
fn assert_matches_reference_after_snapshot(dirs: &Dirs) -> u64 {
    let engine = inspect(&dirs.data);
    let marker = engine["snapshot_marker"].as_u64().expect("a snapshot was committed");
    let expected = json(&ok(tribunal().args([
        "evaluate",
        "--json",
        "--log",
        &log_arg(&dirs.log),
        "--outputs-after",
        &marker.to_string(),
    ])));
    let records = expected["records"].as_u64().unwrap();
    assert_eq!(engine["durable_watermark"].as_u64(), Some(records - 1));
    assert_eq!(engine["state_digest"], expected["state_digest"]);
    assert_eq!(engine["outputs"].as_u64(), Some(records - 1 - marker), "outputs after the marker are all there");
    assert_eq!(engine["outputs_digest"], expected["outputs_digest"]);
    assert_eq!(engine["stock"], expected["stock"]);
    marker
}

#[test]
fn snapshots_replace_old_segments_and_recovery_starts_from_them() {
    // spec: Ledger.SnapshotAtMarker
    // spec: Ledger.SnapshotCommitted
    // spec: Ledger.SegmentsBelowSnapshotDeleted
    // spec: Recovery.SnapshotLoaded
    // spec: Recovery.ReplayBoundedBySnapshotCadence
    let dirs = dirs();
    let mut rng = SplitMix64(11);
    append_sample(&dirs.log, 3_000, 20);
    let mut kills = 0;
    for round in 0..12u64 {
        append_sample(&dirs.log, 2_000, 30 + round);
        let mut child = spawn_snapshotting(&dirs, 2_500, true);
        std::thread::sleep(Duration::from_millis(20 + rng.below(200)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
    }
    // Then four runs to the end, each with fewer new records than --snapshot-every.
    // However the kills fell (mid-run in a debug build, often after the end in a
    // release one), no start replays more than the cadence allows.
    let mut replays = Vec::new();
    for round in 0..4u64 {
        append_sample(&dirs.log, 2_000, 50 + round);
        let out = spawn_snapshotting(&dirs, 2_500, true).wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        replays.push(replayed_entries(&dirs.data));
    }
    let marker = assert_matches_reference_after_snapshot(&dirs);
    let segments = segments_on_shard_0(&dirs.data);
    eprintln!(
        "{kills} kills; snapshot at {marker}; {segments} segments left; replayed at the last starts: {replays:?}"
    );
    assert!(replays.iter().all(|r| *r <= replay_bound(2_500)), "replayed at the last starts: {replays:?}");
}

#[test]
fn short_runs_to_the_end_still_take_snapshots_and_bound_recovery() {
    // spec: Ledger.CadenceRecoveredAtStart
    // spec: Ledger.SnapshotDue
    // spec: Recovery.ReplayBoundedBySnapshotCadence
    // spec: Recovery.RecoveryReported
    // Each run sees fewer records than --snapshot-every: the count must carry over.
    let dirs = dirs();
    let mut replays = Vec::new();
    for round in 0..12u64 {
        append_sample(&dirs.log, 2_000, 40 + round);
        let out = spawn_snapshotting(&dirs, 2_500, true).wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        replays.push(replayed_entries(&dirs.data));
    }
    let segments = segments_on_shard_0(&dirs.data);
    eprintln!("replayed at each start: {replays:?}; {segments} segments left on shard 0");
    assert!(replays.iter().all(|r| *r <= replay_bound(2_500)), "replayed at each start: {replays:?}");
    let marker = assert_matches_reference_after_snapshot(&dirs);
    assert!(marker >= 20_000, "the last snapshot is recent: at {marker} of 24,000 records");
    assert!(segments < 12, "segments the snapshots cover were deleted: {segments} left after 12 runs");
    let metrics_marker = status(&dirs.data)["partitions"][0]["snapshot_marker"].as_u64();
    assert_eq!(metrics_marker, Some(marker), "status.json names the committed snapshot");
}

/// Waits until the instance in `data` reports `ready` and a durable watermark of at
/// least `durable` in its `status.json`; returns that status.
fn wait_ready_and_durable(data: &Path, child: &mut Child, durable: u64) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(exit) = child.try_wait().unwrap() {
            panic!("the instance exited before it was ready: {exit}");
        }
        let status = std::fs::read(data.join("status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter(|s| s["phase"] == "ready" && s["durable_watermark"].as_u64().is_some_and(|w| w >= durable));
        if let Some(status) = status {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "not ready and durable through {durable} within 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_crash_loop_replays_at_most_snapshot_every_plus_one_batch_at_each_start() {
    // spec: Ledger.PlanningWaitsForSnapshot
    // spec: Recovery.DueSnapshotTakenAtRecovery
    // spec: Recovery.ReplayBoundedBySnapshotCadence
    // 20 starts while the log grows, each SIGKILLed shortly after it is ready and has
    // made a new record durable; no start sees --snapshot-every records in its own life.
    // The bound is checked at every start.
    let dirs = dirs();
    let mut rng = SplitMix64(17);
    let every = 3_000;
    let mut replays = Vec::new();
    let mut records = 0;
    for round in 0..20u64 {
        let added = 500 + rng.below(2_000);
        append_sample(&dirs.log, added, 60 + round);
        records += added;
        let mut child = spawn_snapshotting(&dirs, every, false);
        let status = wait_ready_and_durable(&dirs.data, &mut child, records - added);
        replays.push(status["recovery"]["replayed_entries"].as_u64().expect("recovery figures"));
        std::thread::sleep(Duration::from_millis(rng.below(50)));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    eprintln!("replayed at each start: {replays:?}");
    assert!(replays.iter().all(|r| *r <= replay_bound(every)), "replayed at each start: {replays:?}");
    assert!(replays.iter().any(|r| *r > 0), "some starts replayed entries: the kills landed after progress");
    let out = spawn_snapshotting(&dirs, every, true).wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(replayed_entries(&dirs.data) <= replay_bound(every));
    assert_matches_reference_after_snapshot(&dirs);
}
