//! The embedded local log through the `tribunal` binary: `log append` and `log read`,
//! several appending processes at once, and damaged files.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

mod support;
use support::tribunal;

fn log_arg(dir: &Path) -> String {
    format!("local:{}", dir.display())
}

fn envelope(key: &str) -> String {
    format!(
        r#"{{"v":1,"key":"{key}","command":{{"type":"adjust","sku":"SKU-1","warehouse":"WH-A","delta":5,"reason":"count"}}}}"#
    )
}

fn lines(keys: &[String]) -> String {
    keys.iter().map(|key| envelope(key) + "\n").collect()
}

fn append_raw(dir: &Path, input: &str, extra: &[&str]) -> Output {
    let mut child = tribunal()
        .args(["log", "append", "--log", &log_arg(dir)])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// Appends and returns the printed offsets.
fn append(dir: &Path, input: &str, extra: &[&str]) -> Vec<u64> {
    let out = append_raw(dir, input, extra);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|line| line.parse().unwrap()).collect()
}

fn read_raw(dir: &Path, from: u64) -> Output {
    tribunal().args(["log", "read", "--log", &log_arg(dir), "--from", &from.to_string()]).output().unwrap()
}

/// (offset, timestamp_ms, payload) of every record from `from`.
fn read(dir: &Path, from: u64) -> Vec<(u64, u64, String)> {
    let out = read_raw(dir, from);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            let field = |name: &str| record[name].as_u64().unwrap();
            (field("offset"), field("timestamp_ms"), record["payload"].as_str().unwrap().to_owned())
        })
        .collect()
}

fn segment(dir: &Path, base_offset: u64) -> PathBuf {
    dir.join(format!("{base_offset:020}.seg"))
}

fn keys(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i}")).collect()
}

#[test]
fn appended_lines_get_dense_offsets_and_read_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let first = keys("a", 3);
    let input = format!("{}\n   \n{}\n{}", envelope(&first[0]), envelope(&first[1]), envelope(&first[2]));
    assert_eq!(append(dir.path(), &input, &[]), vec![0, 1, 2]);
    let file = dir.path().join("more.jsonl");
    std::fs::write(&file, lines(&keys("b", 2))).unwrap();
    let out =
        tribunal().args(["log", "append", "--log", &log_arg(dir.path()), file.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "3\n4\n");

    let records = read(dir.path(), 0);
    let payloads: Vec<String> = records.iter().map(|(_, _, payload)| payload.clone()).collect();
    let expected: Vec<String> = first.iter().chain(&keys("b", 2)).map(|key| envelope(key)).collect();
    assert_eq!(payloads, expected);
    assert_eq!(records.iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    assert!(records.windows(2).all(|w| w[0].1 <= w[1].1), "timestamps are non-decreasing");
    assert!(records[0].1 > 0, "a wall-clock timestamp");
    assert_eq!(read(dir.path(), 3).iter().map(|r| r.0).collect::<Vec<_>>(), vec![3, 4]);
    assert!(read(dir.path(), 5).is_empty());
    assert!(!read_raw(dir.path(), 6).status.success());
}

#[test]
fn concurrent_appending_processes_get_dense_unique_offsets() {
    let dir = tempfile::tempdir().unwrap();
    const THREADS: usize = 4;
    const PROCESSES_PER_THREAD: usize = 8;
    const LINES_PER_PROCESS: usize = 10;
    // Each thread starts its processes one after another, so that up to THREADS of them
    // contend for the lock at any time; small segments make them roll while they do.
    let batches: Vec<(Vec<String>, Vec<u64>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|thread| {
                let dir = dir.path();
                scope.spawn(move || {
                    (0..PROCESSES_PER_THREAD)
                        .map(|process| {
                            let batch = keys(&format!("t{thread}-p{process}"), LINES_PER_PROCESS);
                            let offsets = append(dir, &lines(&batch), &["--segment-max-size-bytes", "2048"]);
                            (batch, offsets)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|handle| handle.join().unwrap()).collect()
    });

    let total = THREADS * PROCESSES_PER_THREAD * LINES_PER_PROCESS;
    let mut all_offsets = BTreeSet::new();
    for (batch, offsets) in &batches {
        assert_eq!(offsets.len(), batch.len());
        // A batch is appended whole, at consecutive offsets.
        assert!(offsets.windows(2).all(|w| w[1] == w[0] + 1), "{offsets:?}");
        all_offsets.extend(offsets.iter().copied());
    }
    assert_eq!(all_offsets, (0..total as u64).collect::<BTreeSet<_>>());

    let records = read(dir.path(), 0);
    assert_eq!(records.len(), total);
    for (batch, offsets) in &batches {
        for (key, &offset) in batch.iter().zip(offsets) {
            assert_eq!(records[offset as usize].2, envelope(key), "offset {offset}");
        }
    }
    let segments = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|entry| entry.as_ref().unwrap().file_name().to_string_lossy().ends_with(".seg"));
    assert!(segments.count() > 1, "the appenders rolled segments");
}

#[test]
fn a_malformed_line_is_reported_by_number_and_nothing_is_appended() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(append(dir.path(), &lines(&keys("a", 1)), &[]), vec![0]);
    let input = format!("{}\n\n{{\"v\":1,\"key\":\"x\"}}\n{}\n", envelope("b-0"), envelope("b-1"));
    let out = append_raw(dir.path(), &input, &[]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 3: invalid JSON envelope"), "{stderr}");
    assert!(stderr.contains("nothing was appended"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(read(dir.path(), 0).len(), 1);

    // Even unchecked, a line longer than a record is refused, by number.
    let long_line = "x".repeat(70_000);
    let out = append_raw(dir.path(), &format!("short\n{long_line}\nshort\n"), &["--unchecked"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2: longer than the 65536-byte record limit"), "{stderr}");
    assert_eq!(read(dir.path(), 0).len(), 1);
}

#[test]
fn unchecked_appends_lines_that_do_not_decode() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(append(dir.path(), "not json\n{\"v\":9}\n", &["--unchecked"]), vec![0, 1]);
    let payloads: Vec<String> = read(dir.path(), 0).into_iter().map(|r| r.2).collect();
    assert_eq!(payloads, vec!["not json", "{\"v\":9}"]);
    assert!(!append_raw(dir.path(), "not json\n", &[]).status.success());
}

#[test]
fn a_torn_tail_is_never_read_and_the_next_append_repairs_it() {
    let dir = tempfile::tempdir().unwrap();
    append(dir.path(), &lines(&keys("a", 3)), &[]);
    let path = segment(dir.path(), 0);
    let committed = std::fs::read(&path).unwrap();
    // A crashed appender: a complete, valid-looking record (a copy of the first) and then
    // half of a header, past the commit point.
    let first_record_size_bytes = 16 + envelope("a-0").len();
    let mut torn = committed.clone();
    torn.extend_from_within(..first_record_size_bytes);
    torn.extend_from_slice(&[0xff; 7]);
    std::fs::write(&path, &torn).unwrap();

    assert_eq!(read(dir.path(), 0).len(), 3, "uncommitted bytes are invisible");
    assert_eq!(append(dir.path(), &lines(&keys("b", 2)), &[]), vec![3, 4]);
    let payloads: Vec<String> = read(dir.path(), 0).into_iter().map(|r| r.2).collect();
    let expected: Vec<String> = keys("a", 3).iter().chain(&keys("b", 2)).map(|key| envelope(key)).collect();
    assert_eq!(payloads, expected);
    assert_eq!(&std::fs::read(&path).unwrap()[..committed.len()], &committed[..]);
}

#[test]
fn lost_committed_bytes_are_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    append(dir.path(), &lines(&keys("a", 3)), &[]);
    let path = segment(dir.path(), 0);
    let size_bytes = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(size_bytes - 5).unwrap();

    let out = append_raw(dir.path(), &lines(&keys("b", 1)), &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("00000000000000000000.seg"), "{stderr}");
    assert!(stderr.contains(&format!("but the head commits {size_bytes}")), "{stderr}");

    let out = read_raw(dir.path(), 0);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("00000000000000000000.seg"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_flipped_byte_in_a_committed_record_is_reported_with_segment_and_position() {
    let dir = tempfile::tempdir().unwrap();
    append(dir.path(), &lines(&keys("a", 3)), &[]);
    let path = segment(dir.path(), 0);
    let mut bytes = std::fs::read(&path).unwrap();
    let second_record_position = 16 + envelope("a-0").len();
    bytes[second_record_position + 16 + 3] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let out = read_raw(dir.path(), 0);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("corrupt record at byte {second_record_position} of segment {}", path.display())),
        "{stderr}"
    );
    assert!(stderr.contains("(offset 1): checksum mismatch"), "{stderr}");
    // The record before it was printed; none after it.
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1);
    // A reader starting past it never reads it.
    assert_eq!(read(dir.path(), 2).len(), 1);
}

#[test]
fn segments_roll_at_the_bound_and_are_named_by_their_first_offset() {
    let dir = tempfile::tempdir().unwrap();
    let all = keys("k", 60);
    // Each record is 16 + about 115 bytes: 7 fit in 1 KiB.
    let offsets = append(dir.path(), &lines(&all[..40]), &["--segment-max-size-bytes", "1024"]);
    assert_eq!(offsets, (0..40).collect::<Vec<_>>());
    assert_eq!(
        append(dir.path(), &lines(&all[40..]), &["--segment-max-size-bytes", "1024"]),
        (40..60).collect::<Vec<_>>()
    );

    let mut bases: Vec<u64> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|entry| entry.unwrap().file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
        .collect();
    bases.sort_unstable();
    assert!(bases.len() >= 8, "{bases:?}");
    assert_eq!(bases[0], 0);
    for (index, &base) in bases.iter().enumerate() {
        let size_bytes = std::fs::metadata(segment(dir.path(), base)).unwrap().len();
        assert!(size_bytes <= 1024, "segment {base} is {size_bytes} bytes");
        // A segment starts where the one before it ends.
        let next = bases.get(index + 1).copied().unwrap_or(60);
        assert_eq!(read(dir.path(), base)[0].0, base);
        assert!(next > base);
    }
    let payloads: Vec<String> = read(dir.path(), 0).into_iter().map(|r| r.2).collect();
    assert_eq!(payloads, all.iter().map(|key| envelope(key)).collect::<Vec<_>>());
    assert_eq!(read(dir.path(), 33).len(), 27);
}

#[test]
fn a_log_argument_that_is_neither_local_nor_kafka_is_refused_with_the_forms_it_takes() {
    for bad in ["/tmp/x", "kafka:", "kafka:host", "kafka:host:port", "local:"] {
        let out = tribunal().args(["log", "append", "--log", bad]).output().unwrap();
        assert!(!out.status.success(), "{bad}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("expected local:DIR") || stderr.contains("expected kafka:HOST:PORT"),
            "{bad}: {stderr}"
        );
    }
}

/// An empty log as a release before format 3 made it: segment 0 empty, and a format 2
/// head (`TRBHEAD2`, commit 0 in slot 0, the CRC over its first 48 bytes).
fn format_2_log(dir: &Path) {
    std::fs::write(segment(dir, 0), b"").unwrap();
    let mut head = vec![0u8; 8192];
    head[0..8].copy_from_slice(b"TRBHEAD2");
    let crc = crc32c::crc32c(&head[..48]);
    head[48..52].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(dir.join("head"), head).unwrap();
}

fn upgrade(dir: &Path) -> String {
    let out = tribunal().args(["log", "upgrade", "--log", &log_arg(dir)]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

// spec: LocalLog.LogUpgraded (an older release's log is read, appended to in its own format, then upgraded on request)
#[test]
fn a_format_2_log_is_kept_until_upgraded_and_reads_through_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    format_2_log(dir.path());
    assert_eq!(append(dir.path(), &lines(&keys("a", 3)), &[]), vec![0, 1, 2]);
    let head = std::fs::read(dir.path().join("head")).unwrap();
    assert_eq!(&head[4096..4104], b"TRBHEAD2", "appending keeps format 2: commit 1 in slot 1");

    assert!(upgrade(dir.path()).contains("upgraded"));
    let head = std::fs::read(dir.path().join("head")).unwrap();
    assert_eq!((&head[0..8], &head[4096..4104]), (&b"TRBHEAD3"[..], &b"TRBHEAD3"[..]), "no format 2 slot is left");
    assert!(upgrade(dir.path()).contains("already in format 3"));
    assert_eq!(append(dir.path(), &lines(&keys("b", 2)), &[]), vec![3, 4]);
    assert!(segment(dir.path(), 3).exists(), "format 3 starts in a segment of its own");
    let read_back: Vec<String> = read(dir.path(), 0).into_iter().map(|(_, _, payload)| payload).collect();
    assert_eq!(read_back.len(), 5);
    assert!(read_back[0].contains("\"a-0\"") && read_back[4].contains("\"b-1\""), "{read_back:?}");
}

#[test]
fn upgrade_refuses_kafka_and_a_directory_without_a_log_and_creates_nothing() {
    let out = tribunal().args(["log", "upgrade", "--log", "kafka:localhost:9092"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("upgrade is for the local log"));
    let dir = tempfile::tempdir().unwrap();
    let out = tribunal().args(["log", "upgrade", "--log", &log_arg(dir.path())]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no log at"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing was created");
}
