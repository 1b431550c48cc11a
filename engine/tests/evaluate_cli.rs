//! The `tribunal` binary, run as a user would: `sample | evaluate`.

use std::io::Write;
use std::process::Stdio;

mod support;
use support::tribunal;

fn sample(events: u64) -> Vec<u8> {
    let out = tribunal().args(["sample", "--events", &events.to_string()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn evaluate(input: &[u8], extra: &[&str]) -> (i32, serde_json::Value) {
    let mut child = tribunal()
        .args(["evaluate", "--json", "-"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    let summary =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap(), summary)
}

#[test]
fn shard_count_does_not_change_the_state_digest() {
    // spec: Registrar.InstanceDigestIsShardSum
    let log = sample(5_000);
    let mut digests = Vec::new();
    for shards in ["1", "2", "4"] {
        let (code, summary) = evaluate(&log, &["--shards", shards]);
        assert_eq!(code, 0);
        assert_eq!(summary["reference_agrees"], true);
        assert_eq!(summary["records"], 5_000);
        digests.push(summary["state_digest"].as_str().unwrap().to_owned());
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
    let (_, summary) = evaluate(&log, &[]);
    let verdicts = &summary["verdicts"];
    for verdict in ["accepted", "rejected", "replay", "conflict"] {
        assert!(verdicts[verdict].as_u64().unwrap_or(0) > 0, "the sample exercises {verdict}: {verdicts}");
    }
    let stock = summary["stock"].as_array().unwrap();
    assert!(!stock.is_empty());
    assert!(stock.iter().all(|row| row["qty"].as_u64().unwrap() > 0));
}

#[test]
fn bad_lines_become_malformed_outputs_not_errors() {
    // spec: Usher.MalformedRecordRejected
    let input = b"{not json\n\n\xff\xfe\n{\"v\":1,\"key\":\"k\",\"command\":{\"type\":\"adjust\",\"sku\":\"S\",\"warehouse\":\"W\",\"delta\":3}}\n";
    let (code, summary) = evaluate(input, &[]);
    assert_eq!(code, 0);
    assert_eq!(summary["records"], 3, "the blank line is skipped");
    assert_eq!(summary["verdicts"]["malformed"], 2);
    assert_eq!(summary["verdicts"]["accepted"], 1);
    assert_eq!(summary["stock"][0]["qty"], 3);
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let out = tribunal().args(["evaluate", "/nonexistent/log.jsonl"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("opening /nonexistent/log.jsonl"), "{stderr}");
}
