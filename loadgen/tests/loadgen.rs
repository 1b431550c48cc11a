//! loadgen end to end: a short open-loop run against a real 3-instance cluster (real
//! processes, real HTTP, real disk), then its verifier on doctored stock tables.
//!
//! The `tribunal` binary is the one `cargo test --workspace` builds next to `loadgen`
//! (or `TRIBUNAL_BIN`).

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

fn loadgen() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
}

fn tribunal_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("TRIBUNAL_BIN") {
        return PathBuf::from(path);
    }
    let sibling = Path::new(env!("CARGO_BIN_EXE_loadgen")).with_file_name("tribunal");
    assert!(sibling.is_file(), "{} is missing: run `cargo test --workspace` or set TRIBUNAL_BIN", sibling.display());
    sibling
}

/// A base port whose next three ports are free now.
fn free_port_run(count: u16) -> u16 {
    'search: for _ in 0..100 {
        let base = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if base.checked_add(count).is_none() {
            continue;
        }
        for port in base..base + count {
            if TcpListener::bind(("127.0.0.1", port)).is_err() {
                continue 'search;
            }
        }
        return base;
    }
    panic!("no {count} consecutive free ports");
}

/// `tribunal cluster` as a child that dies with the test (its instances die with it).
struct Cluster {
    child: Child,
    urls: Vec<String>,
    _tmp: tempfile::TempDir,
}

impl Cluster {
    fn start(instances: u16) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let http = free_port_run(instances);
        let mut command = Command::new(tribunal_bin());
        command
            .args(["cluster", "--instances", &instances.to_string(), "--http-base-port", &http.to_string()])
            .arg("--log")
            .arg(format!("local:{}", tmp.path().join("log").display()))
            .arg("--data-dir")
            .arg(tmp.path().join("cluster"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(tmp.path().join("cluster.log")).unwrap());
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        let urls = (0..instances).map(|i| format!("http://127.0.0.1:{}", http + i)).collect();
        Cluster { child, urls, _tmp: tmp }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.child.kill(); // SIGKILL; the instances get PR_SET_PDEATHSIG
        let _ = self.child.wait();
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn verify(dir: &Path, stock: &Path) -> Output {
    loadgen().arg("verify").arg("--ledger").arg(dir.join("ledger.json")).arg("--stock").arg(stock).output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Writes `tables` to a new file and runs `loadgen verify` on it.
fn verify_doctored(dir: &Path, name: &str, tables: &Value) -> Output {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec(tables).unwrap()).unwrap();
    verify(dir, &path)
}

#[test]
fn a_short_run_against_a_cluster_keeps_every_invariant_and_its_verifier_catches_doctored_stock() {
    let cluster = Cluster::start(3);
    let out = tempfile::tempdir().unwrap();
    let summary_path = out.path().join("summary-copy.json");
    let mut command = loadgen();
    command.arg("run");
    for url in &cluster.urls {
        command.args(["--target", url]);
    }
    // Little opening stock, so rules are broken and the decisions check has rejections to see.
    let output = command
        .args(["--rate", "150", "--duration-s", "3", "--warmup-s", "1", "--connections", "6"])
        .args(["--warehouses", "3", "--skus", "6", "--kits", "2", "--initial-stock", "4"])
        .args(["--duplicate-share", "0.1", "--ready-timeout-s", "300", "--drain-s", "120"])
        .arg("--out-dir")
        .arg(out.path())
        .arg("--summary-json")
        .arg(&summary_path)
        .output()
        .unwrap();
    let report = format!("{}\n{}", stdout(&output), String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{report}");
    assert!(report.contains("invariants: OK"), "{report}");

    // spec: Loadgen.ExitNonZeroOnViolation — the summary says why the exit code is what it is.
    let summary = read_json(&summary_path);
    assert_eq!(summary, read_json(&out.path().join("summary.json")));
    assert_eq!(summary["invariants_ok"], true, "{summary:#}");
    let checks: Vec<&str> =
        summary["invariants"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    for name in [
        "exactly_once",
        "decisions_serializable",
        "totals",
        "conservation_per_sku",
        "non_negative",
        "instances_identical",
        "unresolved",
        "answers_well_formed",
    ] {
        assert!(checks.contains(&name), "{name} missing from {checks:?}");
    }
    assert!(summary["measured_requests"].as_u64().unwrap() > 0, "{summary:#}");
    let latency = &summary["latency_ms"];
    for p in ["p50", "p90", "p99", "p99_9", "max"] {
        assert!(latency[p].as_f64().unwrap() > 0.0, "{p}: {summary:#}");
    }
    assert!(latency["p50"].as_f64() <= latency["p99"].as_f64() && latency["p99"].as_f64() <= latency["max"].as_f64());
    assert!(summary["status_counts"]["200"].as_u64().unwrap() > 0, "{summary:#}");
    assert_eq!(summary["unresolved"], 0);

    // The ledger holds the opening stock, the answers, and the duplicates' replays.
    let ledger = read_json(&out.path().join("ledger.json"));
    let entries = ledger["entries"].as_array().unwrap();
    assert!(entries.len() >= 3 * 6, "{}", entries.len());
    // spec: Loadgen.UniqueKeys — duplicates came back as replays of their original.
    let duplicates: Vec<&Value> =
        entries.iter().flat_map(|e| e["duplicates"].as_array().into_iter().flatten()).collect();
    assert!(!duplicates.is_empty(), "a 10% duplicate share sent none");
    assert!(duplicates.iter().all(|d| d["replayed"] == true));
    assert!(std::fs::read_to_string(out.path().join("latency.hgrm")).unwrap().contains("Percentile"));
    assert!(std::fs::read_to_string(out.path().join("latency.svg")).unwrap().starts_with("<svg"));

    // The saved run verifies offline, and doctored copies do not.
    let stock_path = out.path().join("stock.json");
    assert_eq!(verify(out.path(), &stock_path).status.code(), Some(0));
    let tables = read_json(&stock_path);
    assert_eq!(tables.as_array().unwrap().len(), 3, "one table per instance: {tables:#}");

    // spec: Loadgen.TotalsMatchLedger, Loadgen.InstancesIdentical — one level off on one instance.
    let mut doctored = tables.clone();
    let level = &mut doctored[1]["levels"][0]["qty"];
    *level = Value::from(level.as_i64().unwrap() + 1);
    let output = verify_doctored(out.path(), "one-off.json", &doctored);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    for check in ["totals", "instances_identical", "conservation_per_sku"] {
        assert!(
            stdout(&output).lines().any(|l| l.starts_with(check) && l.contains("VIOLATED")),
            "{check}: {}",
            stdout(&output)
        );
    }
}

/// A tiny ledger written by hand: 10 units opened at W1, 4 moved to W2.
fn hand_ledger() -> Value {
    let answer = |offset: u64, decision: &str, status: u16| {
        serde_json::json!({"http_status": status, "partition": 0, "offset": offset, "decision": decision,
                           "code": null, "replayed": false, "digest": format!("{offset:032x}")})
    };
    serde_json::json!({
        "run_prefix": "t",
        "entries": [
            {"key": "t-1", "command": {"type": "adjust", "sku": "t-S", "warehouse": "t-W1", "delta": 10, "reason": "open"},
             "answer": answer(0, "accepted", 200)},
            {"key": "t-2", "command": {"type": "transfer", "sku": "t-S", "from_warehouse": "t-W1", "to_warehouse": "t-W2", "qty": 4},
             "answer": answer(1, "accepted", 200)},
            {"key": "t-3", "command": {"type": "transfer", "sku": "t-S", "from_warehouse": "t-W2", "to_warehouse": "t-W1", "qty": 5},
             "answer": answer(2, "rejected", 422)},
        ],
    })
}

fn hand_tables(w1: i64, w2: i64) -> Value {
    let table = |instance: &str, w2: i64| {
        serde_json::json!({"instance": instance, "partition": 0, "certified_watermark": 2, "levels": [
            {"warehouse": "t-W1", "sku": "t-S", "qty": w1}, {"warehouse": "t-W2", "sku": "t-S", "qty": w2}]})
    };
    serde_json::json!([table("http://a", w2), table("http://b", w2)])
}

#[test]
fn the_verifier_exits_non_zero_on_a_doctored_stock_table() {
    // spec: Loadgen.ExitNonZeroOnViolation
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ledger.json"), serde_json::to_vec(&hand_ledger()).unwrap()).unwrap();

    let honest = verify_doctored(dir.path(), "honest.json", &hand_tables(6, 4));
    assert_eq!(honest.status.code(), Some(0), "{}", stdout(&honest));
    assert!(stdout(&honest).contains("invariants: OK"));

    // spec: Loadgen.ConservationPerSku — a unit created from nothing.
    let created = verify_doctored(dir.path(), "created.json", &hand_tables(6, 5));
    assert_eq!(created.status.code(), Some(2), "{}", stdout(&created));
    assert!(stdout(&created).contains("invariants: VIOLATED"));

    // spec: Loadgen.NoNegativeStock, Loadgen.DecisionsSerializable's model — the rejected
    // transfer applied anyway would leave W2 at -1.
    let negative = verify_doctored(dir.path(), "negative.json", &hand_tables(11, -1));
    assert_eq!(negative.status.code(), Some(2), "{}", stdout(&negative));
    assert!(stdout(&negative).lines().any(|l| l.starts_with("non_negative") && l.contains("VIOLATED")));

    // A file that is not a stock table is an error (1), not a verdict.
    std::fs::write(dir.path().join("junk.json"), b"{\"not\": \"tables\"}").unwrap();
    assert_eq!(verify(dir.path(), &dir.path().join("junk.json")).status.code(), Some(1));
}
