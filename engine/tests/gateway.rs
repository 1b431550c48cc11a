//! The REST Gateway against real `tribunal run` processes on loopback: a 3-instance
//! federation (expected_copies 2) answering every documented code, retries with the same
//! key, read-your-writes, fault injection and readmit through the admin API, a deadline
//! passed while peers are gone, slow and keep-alive clients, and schemathesis against
//! the served OpenAPI document.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::federation::{Federation, PATIENCE};
use support::{http_answer as answer, ok, tribunal};

mod support;

const TOKEN: &str = "an admin token for the gateway tests";

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build()
}

fn get(url: &str) -> (u16, Value) {
    answer(agent().get(url).call())
}

fn post(url: &str, key: Option<&str>, body: &str) -> (u16, Value) {
    let mut request = agent().post(url).set("content-type", "application/json");
    if let Some(key) = key {
        request = request.set("Idempotency-Key", key);
    }
    answer(request.send_string(body))
}

fn admin(url: &str, token: Option<&str>, body: &str) -> (u16, Value) {
    let mut request = agent().post(url).set("content-type", "application/json");
    if let Some(token) = token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    answer(request.send_string(body))
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// Records in the input log: what the Gateway appended.
fn log_records(cluster: &Federation) -> usize {
    ok(tribunal().args(["log", "read", "--log", &cluster.log_arg()]))
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count()
}

/// The last lines of an instance's log, for a failure message.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < PATIENCE, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start(cluster: &mut Federation, id: u32) {
    let token_file = cluster.tmp.path().join("admin-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let token_file = token_file.to_str().unwrap().to_owned();
    // Instance 3 has no admin token: its admin endpoints do not exist.
    // A deadline well past what a loaded CI disk needs (fsyncs of 9 instances on one disk):
    // only the DeadlinePassed step waits for it.
    let mut extra = vec!["--http-deadline-ms", "10000", "--http-read-timeout-ms", "1000"];
    if id != 3 {
        extra.extend(["--admin-token-file", &token_file]);
    }
    cluster.spawn(id, false, &extra);
    let health = format!("{}/healthz", cluster.url(id));
    wait_for(&format!("instance {id} to serve"), || agent().get(&health).call().is_ok_and(|r| r.status() == 200));
}

#[test]
fn three_instances_answer_every_documented_code_with_certified_outputs() {
    let mut cluster = Federation::new(3, 2).with_http();
    for id in 1..=3 {
        start(&mut cluster, id);
    }
    let urls: Vec<String> = (1..=3).map(|id| cluster.url(id)).collect();
    let movements = |id: u32| format!("{}/v1/movements", urls[id as usize - 1]);

    // spec: Gateway.AnsweredWhenCertified — accepted: 200 with the certified levels.
    let (status, body) =
        post(&movements(1), Some("a1"), r#"{"type":"adjust","sku":"s1","warehouse":"w1","delta":100}"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["verdict"], "accepted");
    assert_eq!(body["replayed"], false);
    assert_eq!(body["levels"], json!([{"warehouse": "w1", "sku": "s1", "qty": 100}]));
    // spec: Gateway.ReadYourWrites — at once, on the instance that answered.
    let (status, stock) = get(&format!("{}/v1/stock/w1/s1", cluster.url(1)));
    assert_eq!((status, stock["qty"].as_u64()), (200, Some(100)), "{stock}");

    // A rule violation: 422 with the rule's code; nothing changes.
    let (status, body) = post(
        &movements(1),
        Some("big"),
        r#"{"type":"transfer","sku":"s1","from_warehouse":"w1","to_warehouse":"w2","qty":1000}"#,
    );
    assert_eq!(
        (status, code(&body), body["verdict"].as_str()),
        (422, "insufficient_stock", Some("rejected")),
        "{body}"
    );

    // spec: Gateway.ReplayReturnsOriginal — a retry, on another instance, gets the original.
    let transfer = r#"{"type":"transfer","sku":"s1","from_warehouse":"w1","to_warehouse":"w2","qty":30}"#;
    let (status, original) = post(&movements(2), Some("t1"), transfer);
    assert_eq!((status, original["replayed"].as_bool()), (200, Some(false)), "{original}");
    let (status, retry) = post(&movements(3), Some("t1"), transfer);
    assert_eq!(status, 200, "{retry}");
    assert_eq!(retry["replayed"], true);
    assert_eq!(retry["offset"], original["offset"], "the original's result, not a new one");
    assert_eq!(retry["digest"], original["digest"]);
    assert!(retry["replay_offset"].as_u64() > original["offset"].as_u64());
    // A retry with another payload: 409.
    let (status, body) = post(&movements(1), Some("t1"), &transfer.replace("30", "31"));
    assert_eq!((status, code(&body)), (409, "idempotency_key_reused"), "{body}");

    // spec: Gateway.InvalidInputRefused, Gateway.BodyTooLarge — each refused, nothing appended.
    let appended = log_records(&cluster);
    let adjust = r#"{"type":"adjust","sku":"s1","warehouse":"w1","delta":1}"#;
    let long_key = "k".repeat(129);
    let oversized =
        format!(r#"{{"type":"adjust","sku":"s1","warehouse":"w1","delta":1,"reason":"{}"}}"#, "r".repeat(70_000));
    let refusals: Vec<(Option<&str>, &str, u16, &str)> = vec![
        (None, adjust, 400, "missing_idempotency_key"),
        (Some(&long_key), adjust, 400, "invalid_idempotency_key"),
        (Some("m1"), r#"{"type":"adjust""#, 400, "malformed_json"),
        (
            Some("m2"),
            r#"{"type":"adjust","sku":"s1","warehouse":"w1","delta":1,"colour":"red"}"#,
            400,
            "malformed_json",
        ),
        (Some("m3"), r#"{"type":"adjust","sku":"bad name","warehouse":"w1","delta":1}"#, 400, "invalid_name"),
        (Some("m4"), &oversized, 413, "body_too_large"),
    ];
    for (key, body, expected_status, expected_code) in refusals {
        let (status, answer) = post(&movements(1), key, body);
        assert_eq!((status, code(&answer)), (expected_status, expected_code), "{key:?}: {answer}");
    }
    assert_eq!(log_records(&cluster), appended, "refused requests append nothing");

    // spec: Gateway.StockRead — every instance answers the same certified levels.
    for id in 1..=3 {
        let url = format!("{}/v1/stock?sku=s1", cluster.url(id));
        wait_for(&format!("instance {id} to certify the transfer"), || {
            let (status, body) = get(&url);
            status == 200 && body["levels"] == json!([{"warehouse": "w1", "qty": 70}, {"warehouse": "w2", "qty": 30}])
        });
        let (status, body) = get(&format!("{}/v1/stock/nowhere/s1", cluster.url(id)));
        assert_eq!((status, body["qty"].as_u64()), (200, Some(0)), "an untouched entity reads 0");
    }
    let (status, body) = get(&format!("{}/v1/stock", cluster.url(1)));
    assert_eq!((status, code(&body)), (400, "invalid_query"));
    let (status, body) = get(&format!("{}/v1/stock/w1/s1?partition=5", cluster.url(1)));
    assert_eq!((status, code(&body)), (400, "invalid_query"));
    let (status, body) = get(&format!("{}/v1/stock/bad%20name/s1", cluster.url(1)));
    assert_eq!((status, code(&body)), (400, "invalid_name"));

    // spec: Gateway.ClusterView, Gateway.MetricsExposed; the document served is the repo's.
    let (status, view) = get(&format!("{}/v1/cluster", cluster.url(1)));
    assert_eq!((status, view["instance_id"].as_u64(), view["ready"].as_bool()), (200, Some(1), Some(true)), "{view}");
    assert_eq!(view["peers"].as_array().map(Vec::len), Some(2), "{view}");
    assert_eq!(view["faults_detected"], 0);
    let metrics = agent().get(&format!("{}/metrics", cluster.url(1))).call().unwrap().into_string().unwrap();
    for name in [
        "tribunal_http_request_duration_seconds_bucket{",
        "tribunal_certified_watermark{partition=\"0\"}",
        "tribunal_faults_detected_total",
        "tribunal_ledger_fsyncs_total",
        "tribunal_log_lag_records{partition=\"0\"}",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}:\n{metrics}");
    }
    let (status, served) = get(&format!("{}/openapi.json", cluster.url(1)));
    let kept: Value =
        serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap())
            .unwrap();
    assert_eq!((status, served), (200, kept));
    let (status, body) = get(&format!("{}/nowhere", cluster.url(1)));
    assert_eq!((status, code(&body)), (404, "not_found"));
    let (status, body) = answer(agent().delete(&movements(1)).call());
    assert_eq!((status, code(&body)), (405, "method_not_allowed"));

    // spec: Gateway.AdminRequiresToken
    let faults = |id: u32| format!("{}/v1/admin/faults", urls[id as usize - 1]);
    assert_eq!(admin(&faults(3), Some(TOKEN), "{}").0, 404, "no token configured: no admin endpoints");
    assert_eq!(admin(&faults(1), None, "{}").0, 401);
    assert_eq!(admin(&faults(1), Some("not the admin token at all"), "{}").0, 401);

    // spec: Gateway.FaultInjectionReplaced — instance 2 flips a bit in every output; 1 and 3
    // certify without it; it quarantines itself and stops answering (Gateway.NotReadyRefuses).
    let (status, body) = admin(&faults(2), Some(TOKEN), r#"{"bitflip_rate":1.0,"delay_ms":null}"#);
    assert_eq!(status, 200, "{body}");
    // The injection takes effect at instance 2's next Clerk tick: movements until it shows.
    let mut flipped = 0;
    wait_for("instance 2 to quarantine itself", || {
        flipped += 1;
        let (status, body) = post(&movements(1), Some(&format!("f{flipped}")), adjust);
        assert_eq!(status, 200, "1 and 3 certify without the flipping instance: {body}");
        get(&format!("{}/healthz", cluster.url(2))).0 == 503
    });
    let (status, body) = post(&movements(2), Some("quarantined"), adjust);
    assert_eq!((status, code(&body)), (503, "not_ready"), "{body}");
    // spec: Gateway.ClusterView — instance 1 reports the fault and the quarantine (its
    // status is refreshed every 200 ms).
    wait_for("instance 1 to report the fault and the quarantine", || {
        let (_, view) = get(&format!("{}/v1/cluster", cluster.url(1)));
        view["faults_detected"].as_u64() > Some(0) && view["quarantined_peers"] == json!([2])
    });

    // spec: Gateway.ReadmitQueued — faults off, readmitted through instance 1's API.
    assert_eq!(admin(&faults(2), Some(TOKEN), r#"{"bitflip_rate":null,"delay_ms":null}"#).0, 200);
    let (status, body) = admin(&format!("{}/v1/admin/readmit/2", cluster.url(1)), Some(TOKEN), "");
    assert_eq!((status, body["queued"].as_bool()), (202, Some(true)), "{body}");
    wait_for("instance 2 to be readmitted", || get(&format!("{}/healthz", cluster.url(2))).0 == 200);
    let (status, body) = post(&movements(2), Some("readmitted"), adjust);
    assert_eq!(status, 200, "readmitted, instance 2 answers again: {body}");
    // spec: Gateway.OverruledOffsetLeavesAGap — offsets settled without instance 2's output
    // are unknown to its view: its stock reads refuse rather than serve a wrong level.
    let (status, body) = get(&format!("{}/v1/stock/w1/s1", cluster.url(2)));
    assert_eq!((status, code(&body)), (503, "not_ready"), "{body}");
    assert_eq!(get(&format!("{}/v1/stock/w1/s1", cluster.url(1))).0, 200);

    // spec: Gateway.DeadlinePassed — alone, instance 2 cannot certify (expected_copies 2).
    cluster.kill(1);
    cluster.kill(3);
    let (status, timed_out) = post(&movements(2), Some("d1"), adjust);
    assert_eq!((status, code(&timed_out)), (504, "deadline_exceeded"), "{timed_out}");
    // A client that goes away while its movement waits: its waiter is forgotten at once.
    let waiting = || {
        let metrics = agent().get(&format!("{}/metrics", urls[1])).call().unwrap().into_string().unwrap();
        let line = metrics.lines().find(|l| l.starts_with("tribunal_gateway_waiting_requests ")).unwrap().to_owned();
        line.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
    };
    let mut gone = TcpStream::connect(urls[1].trim_start_matches("http://")).unwrap();
    let request = format!(
        "POST /v1/movements HTTP/1.1\r\nHost: t\r\nIdempotency-Key: gone\r\ncontent-length: {}\r\n\r\n{adjust}",
        adjust.len()
    );
    gone.write_all(request.as_bytes()).unwrap();
    wait_for("the request to wait for certification", || waiting() == 1);
    drop(gone);
    wait_for("the gone client's waiter to be forgotten", || waiting() == 0);
    start(&mut cluster, 1);
    let (status, retry) = post(&movements(2), Some("d1"), adjust);
    assert_eq!(status, 200, "{retry}");
    assert_eq!(retry["replayed"], true, "the command from the 504 was applied once: {retry}");
    assert_eq!(retry["offset"], timed_out["offset"]);
}

#[test]
fn slow_clients_get_408_while_others_are_served_and_keep_alive_works() {
    let mut cluster = Federation::new(3, 2).with_http();
    for id in 1..=3 {
        start(&mut cluster, id);
    }
    let address = cluster.url(1).trim_start_matches("http://").to_owned();
    // spec: Gateway.SlowClientTimedOut — half a request head, then nothing.
    let mut slow = TcpStream::connect(&address).unwrap();
    slow.write_all(b"POST /v1/movements HTTP/1.1\r\nHost: tribunal\r\nIdempotency-Key: slow\r\n").unwrap();
    let (status, body) = post(
        &format!("{}/v1/movements", cluster.url(1)),
        Some("fast"),
        r#"{"type":"adjust","sku":"s","warehouse":"w","delta":1}"#,
    );
    assert_eq!(status, 200, "another client is served meanwhile: {body}");
    slow.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");

    // HTTP/1.1 keep-alive: two requests, one connection.
    let mut stream = TcpStream::connect(&address).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    for _ in 0..2 {
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: tribunal\r\n\r\n").unwrap();
        let mut buffer = [0u8; 4096];
        let read = stream.read(&mut buffer).unwrap();
        let text = String::from_utf8_lossy(&buffer[..read]);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.ends_with("{\"status\":\"ready\"}"), "{text}");
    }
    // Headers past the bound: hyper's 431, and the server goes on.
    let mut big = TcpStream::connect(&address).unwrap();
    big.set_read_timeout(Some(PATIENCE)).unwrap();
    let header = format!("GET /healthz HTTP/1.1\r\nHost: tribunal\r\nX-Big: {}\r\n\r\n", "b".repeat(40_000));
    big.write_all(header.as_bytes()).unwrap();
    let mut answer = Vec::new();
    big.read_to_end(&mut answer).unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 431"), "{}", String::from_utf8_lossy(&answer));
    assert_eq!(get(&format!("{}/healthz", cluster.url(1))).0, 200);

    // spec: Gateway.BodyTooLarge, Gateway.ClosingConnectionLingers — a client still
    // sending a body the server already refused gets its 413. The server answers as soon
    // as it reads the declared length; the client goes on writing for a while after that.
    // Before the server lingered, its close with unread input sent RST, and the client's
    // next write failed with "broken pipe" (once in CI, through ureq).
    let body_bytes = 512 * 1024;
    let mut oversized = TcpStream::connect(&address).unwrap();
    oversized.set_read_timeout(Some(PATIENCE)).unwrap();
    let head = format!(
        "POST /v1/movements HTTP/1.1\r\nHost: tribunal\r\nIdempotency-Key: oversized\r\ncontent-type: application/json\r\ncontent-length: {body_bytes}\r\n\r\n"
    );
    oversized.write_all(head.as_bytes()).unwrap();
    let chunk = vec![b' '; body_bytes / 8];
    for part in 0..8 {
        // Time for the 413 to be written and the server to close before the rest comes.
        std::thread::sleep(Duration::from_millis(100));
        oversized.write_all(&chunk).unwrap_or_else(|e| panic!("writing part {part} of the refused body: {e}"));
    }
    let mut answer = Vec::new();
    oversized.read_to_end(&mut answer).expect("the 413 arrives, then FIN, not RST");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"body_too_large\""), "{answer}");
}

/// Starts a second `tribunal run` with `extra` and waits for it to exit: its exit status
/// and stderr (None if it was still running after a while, and was killed).
fn second_process(cluster: &Federation, data: &str, extra: &[&str]) -> Option<(bool, String)> {
    let stderr = cluster.tmp.path().join(format!("{data}.log"));
    let mut command = tribunal();
    command
        .args(["run", "--log", &cluster.log_arg(), "--cores", "0", "--instance-id", "2", "--expected-copies", "1"])
        .arg("--data-dir")
        .arg(cluster.tmp.path().join(data))
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap());
    let mut child = support::die_with_parent(&mut command).spawn().unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Some(status) = child.try_wait().unwrap() {
            return Some((status.success(), std::fs::read_to_string(&stderr).unwrap()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    None
}

// spec: Gateway.SoleListener, PeerWire.SoleListener — SO_REUSEPORT would let a second
// process bind a served address and silently answer a share of its clients.
#[test]
fn a_second_process_on_a_served_address_refuses_to_start() {
    let mut cluster = Federation::new(2, 1).with_http();
    start(&mut cluster, 1);
    let http = cluster.url(1).trim_start_matches("http://").to_owned();
    let federation = format!("127.0.0.1:{}", cluster.ports[0]);
    let psk = cluster.tmp.path().join("psk");
    let psk = psk.to_str().unwrap();
    let peers = format!("1@{federation}");
    let attempts = [
        ("same-http", vec!["--http", &http], "is also listened on by another process"),
        (
            "same-federation",
            vec!["--listen", &federation, "--peers", &peers, "--psk-file", psk],
            "Address already in use",
        ),
    ];
    for (data, extra, refusal) in attempts {
        let exited = second_process(&cluster, data, &extra);
        let (success, stderr) = exited.unwrap_or_else(|| panic!("{data}: a second process started and kept running"));
        assert!(!success, "{data}: {stderr}");
        assert!(stderr.contains(refusal), "{data}: {stderr}");
    }
    // The first instance was not disturbed: it still serves, as itself.
    for _ in 0..20 {
        let (status, body) = get(&format!("{}/v1/cluster", cluster.url(1)));
        assert_eq!((status, body["instance_id"].as_u64()), (200, Some(1)), "{body}");
    }
}

#[test]
fn schemathesis_finds_no_server_error_and_every_answer_matches_the_document() {
    let mut cluster = Federation::new(3, 2).with_http();
    for id in 1..=3 {
        start(&mut cluster, id);
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/schemathesis.sh");
    let output = std::process::Command::new(script).arg(cluster.url(1)).output().expect("schemathesis.sh runs");
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        let logs: String =
            (1..=3).map(|id| format!("\n--- instance {id}:\n{}", tail(&cluster.instance_log(id)))).collect();
        panic!("schemathesis found failures:\n{report}{logs}");
    }
    assert!(report.contains("schemathesis PASS"), "{report}");
    // It sent movements: the cluster certified them and is still healthy.
    assert!(log_records(&cluster) > 0, "schemathesis appended movements");
    for id in 1..=3 {
        assert_eq!(get(&format!("{}/healthz", cluster.url(id))).0, 200, "instance {id} after the run");
    }
}
