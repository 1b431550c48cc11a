//! `tribunal` against a real Kafka broker (tansu, sqlite storage), started by the test on
//! a free port in a temp dir and stopped by PID, even when the test fails (Drop) or the
//! test process dies (PR_SET_PDEATHSIG). `make test` installs tansu when it is missing.
//!
//! Each test checks the result against the sequential reference interpreter run over the
//! records read back from the commands topic: every input has an output on the outputs
//! topic with the reference's digest, and every partition's final state equals the
//! reference's. That is what "nothing lost, nothing applied twice" means here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

mod support;

use serde_json::Value;
use support::{die_with_parent, http_answer, ok, tribunal};
use tribunal_shards::inventory::Inventory;
use tribunal_shards::reference::Reference;
use tribunal_shards::simulator::SplitMix64;
use tribunal_shards::usher::Record;
use tribunal_shards::warden::WardenConfig;

/// One broker and one engine at a time: the machine has two cores.
static SERIAL: Mutex<()> = Mutex::new(());
/// How long any wait may take before the test fails (never a timing assertion: a bound
/// against hanging).
const PATIENCE: Duration = Duration::from_secs(180);
const PARTITIONS: u32 = 3;

fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TANSU") {
        return path.into();
    }
    let home = PathBuf::from(std::env::var_os("HOME").expect("HOME is set"));
    let cargo_bin = home.join(".cargo/bin/tansu");
    if cargo_bin.exists() {
        return cargo_bin;
    }
    panic!("tansu is not installed: `make tools` installs it (see README)");
}

/// A tansu broker with sqlite storage in its own temp dir.
struct Broker {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Broker {
    fn start() -> Broker {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut broker = Broker { child: None, port, dir: tempfile::tempdir().unwrap() };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        // tansu resolves the sqlite path against its working directory.
        let storage = "sqlite://tansu.db";
        let log = std::fs::File::create(self.dir.path().join("broker.log")).unwrap();
        let mut command = Command::new(tansu_binary());
        command
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", storage])
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(die_with_parent(&mut command).spawn().expect("tansu starts"));
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(started.elapsed() < PATIENCE, "the broker never listened on {}", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_arg(&self) -> String {
        format!("kafka:127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Instance {
    data: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Instance {
    fn new() -> Instance {
        let tmp = tempfile::tempdir().unwrap();
        Instance { data: tmp.path().join("data"), _tmp: tmp }
    }

    fn spawn(&self, broker: &Broker, stop_at_end: bool) -> Child {
        self.spawn_with(broker, if stop_at_end { &["--stop-at-end"] } else { &[] })
    }

    fn spawn_with(&self, broker: &Broker, extra: &[&str]) -> Child {
        let mut command = tribunal();
        command
            .args([
                "run",
                "--expected-copies",
                "1",
                "--log",
                &broker.log_arg(),
                "--kafka-partitions",
                &PARTITIONS.to_string(),
            ])
            .args(["--cores", "0,1", "--snapshot-every", "400", "--data-dir"])
            .arg(&self.data)
            .args(extra)
            .stdout(Stdio::null())
            // A file, not a pipe: a pipe nobody reads would block a chatty run.
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap());
        die_with_parent(&mut command).spawn().unwrap()
    }

    fn log_path(&self) -> PathBuf {
        self._tmp.path().join("run.log")
    }

    /// Everything the runs of this instance logged.
    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn status(&self) -> Option<Value> {
        serde_json::from_slice(&std::fs::read(self.data.join("status.json")).ok()?).ok()
    }

    fn inspect(&self) -> Value {
        serde_json::from_slice(&ok(tribunal().args(["inspect", "--json", "--data-dir"]).arg(&self.data))).unwrap()
    }
}

/// Waits for a `--stop-at-end` run; one that never ends (a stalled publisher) fails the test.
fn wait_bounded(instance: &Instance, mut child: Child) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > PATIENCE {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the run never finished: {}", instance.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_to_end(instance: &Instance, broker: &Broker) {
    let status = wait_bounded(instance, instance.spawn(broker, true));
    assert!(status.success(), "run failed: {}", instance.log());
}

/// Appends `lines` to the commands topic and returns each one's (partition, offset).
fn append(broker: &Broker, dir: &Path, lines: &[u8], unchecked: bool) -> Vec<(u32, u64)> {
    let file = dir.join(format!("append-{}.jsonl", rand_suffix()));
    std::fs::write(&file, lines).unwrap();
    let mut command = tribunal();
    command.args(["log", "append", "--log", &broker.log_arg(), "--kafka-partitions", &PARTITIONS.to_string()]);
    if unchecked {
        command.arg("--unchecked");
    }
    let out = String::from_utf8(ok(command.arg(&file))).unwrap();
    out.lines()
        .map(|l| {
            let (p, o) = l.split_once(':').expect("partition:offset");
            // `p:?` (spec: KafkaLog.DeliveredOffsetUnknown) only follows a broker restart
            // during the append, which no test here does.
            (p.parse().unwrap(), o.parse().unwrap_or_else(|_| panic!("no offset for a record: {l}")))
        })
        .collect()
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

fn sample(events: u64, seed: u64) -> Vec<u8> {
    ok(tribunal().args(["sample", "--events", &events.to_string(), "--seed", &seed.to_string()]))
}

fn read_topic(broker: &Broker, topic: &str) -> Vec<Value> {
    let out = ok(tribunal().args(["log", "read", "--log", &broker.log_arg(), "--topic", topic]));
    out.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect()
}

/// The reference over the commands topic: each input's output digest, and the final
/// entity digest and stock of every partition.
struct Expected {
    digests: BTreeMap<(u32, u64), String>,
    partition_digests: Vec<String>,
    stock: Vec<Value>,
}

fn expected(broker: &Broker) -> Expected {
    let mut reference = Reference::<Inventory>::new(WardenConfig::default(), 1);
    let mut inputs = read_topic(broker, "tribunal.commands");
    inputs.sort_by_key(|r| (r["partition"].as_u64(), r["offset"].as_u64()));
    let mut digests = BTreeMap::new();
    for input in &inputs {
        let record = Record {
            partition: input["partition"].as_u64().unwrap() as u32,
            offset: input["offset"].as_u64().unwrap(),
            timestamp_ms: input["timestamp_ms"].as_u64().unwrap(),
            payload: input["payload"].as_str().unwrap().as_bytes().to_vec(),
        };
        let output = reference.apply(&record).expect("the reference does not halt");
        digests.insert((record.partition, record.offset), format!("{:032x}", output.digest));
    }
    let partition_digests = (0..PARTITIONS).map(|p| format!("{:032x}", reference.partition_digest(p))).collect();
    let stock = (0..PARTITIONS)
        .map(|p| {
            let mut rows: Vec<_> = reference.entities(p);
            rows.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Array(
                rows.into_iter()
                    .map(|(k, qty)| serde_json::json!({"warehouse": k.warehouse.to_string(), "sku": k.sku.to_string(), "qty": qty}))
                    .collect(),
            )
        })
        .collect();
    Expected { digests, partition_digests, stock }
}

/// Every input has its output on the outputs topic with the reference's digest; copies of
/// one key are identical; and every partition's state is the reference's.
fn check(broker: &Broker, instance: &Instance, allow_duplicates: bool) -> Expected {
    let expected = expected(broker);
    assert!(!expected.digests.is_empty());
    let mut published: BTreeMap<(u32, u64), String> = BTreeMap::new();
    let mut duplicates = 0;
    for record in read_topic(broker, "tribunal.outputs") {
        let key = record["key"].as_str().expect("outputs are keyed");
        let (p, o) = key.split_once(':').unwrap();
        let key = (p.parse::<u32>().unwrap(), o.parse::<u64>().unwrap());
        assert_eq!(record["partition"].as_u64(), Some(u64::from(key.0)), "output partition = input partition");
        let payload = record["payload"].as_str().unwrap().to_string();
        let json: Value = serde_json::from_str(&payload).expect("outputs are JSON");
        assert_eq!(json["offset"].as_u64(), Some(key.1));
        if let Some(previous) = published.insert(key, payload.clone()) {
            duplicates += 1;
            assert_eq!(previous, payload, "a duplicate output differs from the first copy");
        }
    }
    assert!(allow_duplicates || duplicates == 0, "{duplicates} duplicate outputs without any restart");
    let missing: Vec<_> = expected.digests.keys().filter(|k| !published.contains_key(k)).take(5).collect();
    assert!(missing.is_empty(), "inputs without an output: {missing:?}");
    let strangers: Vec<_> = published.keys().filter(|k| !expected.digests.contains_key(k)).take(5).collect();
    assert!(strangers.is_empty(), "outputs without an input: {strangers:?}");
    for (key, payload) in &published {
        let json: Value = serde_json::from_str(payload).unwrap();
        assert_eq!(json["digest"].as_str(), Some(expected.digests[key].as_str()), "output {key:?}: {payload}");
    }
    let engine = instance.inspect();
    let partitions = engine["partitions"].as_array().unwrap();
    for p in 0..PARTITIONS as usize {
        let report = partitions.iter().find(|r| r["partition"].as_u64() == Some(p as u64)).expect("partition reported");
        assert_eq!(report["partition_digest"].as_str(), Some(expected.partition_digests[p].as_str()), "partition {p}");
        assert_eq!(report["stock"], expected.stock[p], "partition {p} stock");
    }
    expected
}

/// Waits until the running instance has every input durable and published.
fn wait_until_published(instance: &Instance, ends: &BTreeMap<u32, u64>) {
    let started = Instant::now();
    loop {
        if let Some(status) = instance.status() {
            let done = ends.iter().all(|(p, last)| {
                let partition = &status["partitions"][*p as usize];
                partition["durable_watermark"].as_u64() >= Some(*last)
                    && partition["published_watermark"].as_u64() >= Some(*last)
            });
            if done {
                return;
            }
        }
        assert!(started.elapsed() < PATIENCE, "not everything was published: {:?}", instance.status());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn last_offsets(positions: &[(u32, u64)]) -> BTreeMap<u32, u64> {
    let mut ends = BTreeMap::new();
    for &(p, o) in positions {
        let end = ends.entry(p).or_insert(o);
        *end = (*end).max(o);
    }
    ends
}

#[test]
fn ten_thousand_mixed_commands_on_three_partitions_are_published_once_each_and_match_the_reference() {
    // spec: KafkaLog.EveryInstanceReadsEveryPartition, KafkaLog.PartitionIsOrderingDomain,
    // spec: Publisher.KeyedByInput, Publisher.InOffsetOrder, KafkaLog.TopicsEnsured
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = Broker::start();
    let instance = Instance::new();
    let mut lines = sample(7_000, 1);
    lines.extend(sample(3_000, 2)); // overlapping keys: replays and conflicts
    let positions = append(&broker, broker.dir.path(), &lines, false);
    assert_eq!(positions.len(), 10_000);
    let partitions: BTreeSet<u32> = positions.iter().map(|p| p.0).collect();
    assert_eq!(partitions.len(), PARTITIONS as usize, "keys spread over every partition");
    run_to_end(&instance, &broker);
    check(&broker, &instance, false);
    // The outputs of one partition are in input-offset order on the topic.
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    for record in read_topic(&broker, "tribunal.outputs") {
        let (p, o) = record["key"].as_str().unwrap().split_once(':').unwrap();
        let (p, o) = (p.parse::<u64>().unwrap(), o.parse::<u64>().unwrap());
        assert!(last.insert(p, o).is_none_or(|previous| previous < o), "partition {p} out of order at {o}");
    }
    // A restart on a finished log publishes nothing again.
    let before = read_topic(&broker, "tribunal.outputs").len();
    run_to_end(&instance, &broker);
    assert_eq!(read_topic(&broker, "tribunal.outputs").len(), before);
}

#[test]
fn sigkill_mid_stream_then_restart_loses_nothing_and_applies_nothing_twice() {
    // spec: KafkaLog.StartFromLedger, Publisher.ResumeFromOutputTopic, Recovery.TornTailTruncated
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = Broker::start();
    let instance = Instance::new();
    let mut rng = SplitMix64(0x5eed);
    let mut positions = append(&broker, broker.dir.path(), &sample(6_000, 3), false);
    let mut mid_stream_kills = 0;
    for round in 0..6 {
        let mut child = instance.spawn(&broker, false);
        if round == 3 {
            // More input while the instance runs: it tails the topic.
            positions.extend(append(&broker, broker.dir.path(), &sample(4_000, 4), false));
        }
        std::thread::sleep(Duration::from_millis(200 + rng.below(1_000)));
        if let Some(status) = child.try_wait().unwrap() {
            panic!("run exited by itself with {status}");
        }
        // Published before the kill (the file may be a moment old, so this undercounts).
        let published: u64 = instance.status().map_or(0, |s| {
            s["partitions"]
                .as_array()
                .map_or(0, |ps| ps.iter().filter_map(|p| p["published_watermark"].as_u64()).map(|w| w + 1).sum())
        });
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if published < positions.len() as u64 {
            mid_stream_kills += 1;
        }
    }
    assert!(mid_stream_kills >= 2, "only {mid_stream_kills} kills landed before everything was published");
    let mut child = instance.spawn(&broker, false);
    wait_until_published(&instance, &last_offsets(&positions));
    child.kill().unwrap();
    child.wait().unwrap();
    check(&broker, &instance, true);
}

#[test]
fn a_broker_restart_mid_stream_makes_the_instance_wait_report_not_ready_and_finish() {
    // spec: KafkaLog.BrokerLossRetries
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut broker = Broker::start();
    let instance = Instance::new();
    let mut positions = append(&broker, broker.dir.path(), &sample(5_000, 5), false);
    let mut child = instance.spawn(&broker, false);
    wait_until_published(&instance, &last_offsets(&positions));
    broker.kill();
    let started = Instant::now();
    loop {
        let status = instance.status().unwrap();
        if status["ready"] == Value::Bool(false) && status["broker_connected"] == Value::Bool(false) {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the instance exited when the broker went away");
        assert!(started.elapsed() < PATIENCE, "the instance never reported the broker lost: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(child.try_wait().unwrap().is_none(), "the instance exited while the broker was away");
    broker.spawn();
    positions.extend(append(&broker, broker.dir.path(), &sample(5_000, 6), false));
    wait_until_published(&instance, &last_offsets(&positions));
    let status = instance.status().unwrap();
    assert_eq!(status["broker_connected"], Value::Bool(true), "{status}");
    assert_eq!(status["ready"], Value::Bool(true), "{status}");
    child.kill().unwrap();
    child.wait().unwrap();
    check(&broker, &instance, true);
}

#[test]
fn garbage_records_from_a_stranger_get_a_rejected_output_and_no_crash() {
    // spec: KafkaLog.StrangerRecordRejected
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = Broker::start();
    let instance = Instance::new();
    let mut lines = sample(300, 7);
    lines.extend_from_slice(
        b"\nnot json at all\n{\"v\":1}\n{\"v\":9,\"key\":\"k\",\"command\":{}}\n\xff\xfe\x00binary\n",
    );
    lines.extend(sample(300, 8));
    let positions = append(&broker, broker.dir.path(), &lines, true);
    assert_eq!(positions.len(), 604);
    run_to_end(&instance, &broker);
    let expected = check(&broker, &instance, false);
    let malformed: Vec<Value> = read_topic(&broker, "tribunal.outputs")
        .into_iter()
        .map(|r| serde_json::from_str::<Value>(r["payload"].as_str().unwrap()).unwrap())
        .filter(|o| o["verdict"] == "malformed")
        .collect();
    assert_eq!(malformed.len(), 4, "{malformed:?}");
    assert!(malformed.iter().all(|o| o["reason"].as_str().is_some_and(|r| !r.is_empty())));
    assert_eq!(expected.digests.len(), 604);
}

#[test]
fn an_outputs_topic_with_fewer_partitions_than_the_commands_topic_is_refused_at_start() {
    // spec: KafkaLog.TopicsEnsured
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = Broker::start();
    let instance = Instance::new();
    // The outputs topic is created first, with one partition.
    let mut command = tribunal();
    command.args([
        "log",
        "append",
        "--log",
        &broker.log_arg(),
        "--commands-topic",
        "tribunal.outputs",
        "--partition",
        "0",
    ]);
    let file = broker.dir.path().join("one.jsonl");
    std::fs::write(&file, sample(1, 9)).unwrap();
    ok(command.arg(&file));
    append(&broker, broker.dir.path(), &sample(10, 10), false);
    let status = wait_bounded(&instance, instance.spawn(&broker, true));
    assert!(!status.success());
    assert!(instance.log().contains("fewer than the 3"), "{}", instance.log());
}

#[test]
fn outputs_the_ledger_no_longer_holds_are_skipped_loudly_instead_of_stalling_the_publisher() {
    // spec: Publisher.ResumeFromOutputTopic, Ledger.SegmentsBelowSnapshotDeleted
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = Broker::start();
    let instance = Instance::new();
    append(&broker, broker.dir.path(), &sample(3_000, 11), false);
    // Without publishing, snapshots delete segments whatever the outputs topic holds.
    let status = wait_bounded(&instance, instance.spawn_with(&broker, &["--stop-at-end", "--publish", "false"]));
    assert!(status.success(), "{}", instance.log());
    assert!(read_topic(&broker, "tribunal.outputs").is_empty(), "--publish false publishes nothing");
    // Segments go once the certified checkpoint covers them; it is persisted at exit, so
    // a second run (nothing new to read) deletes them.
    let status = wait_bounded(&instance, instance.spawn_with(&broker, &["--stop-at-end", "--publish", "false"]));
    assert!(status.success(), "{}", instance.log());
    let markers: BTreeMap<u64, u64> = instance.inspect()["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| Some((p["partition"].as_u64()?, p["snapshot_marker"].as_u64()?)))
        .collect();
    assert_eq!(markers.len(), PARTITIONS as usize, "every partition took a snapshot: {markers:?}");
    append(&broker, broker.dir.path(), &sample(600, 12), false);
    let before = instance.log().len();
    let status = wait_bounded(&instance, instance.spawn_with(&broker, &["--stop-at-end"]));
    let log = instance.log()[before..].to_string();
    assert!(status.success(), "{log}");
    assert!(log.contains("resuming after the snapshot marker"), "{log}");
    let expected = expected(&broker);
    let published: BTreeSet<(u64, u64)> = read_topic(&broker, "tribunal.outputs")
        .iter()
        .map(|r| {
            let (p, o) = r["key"].as_str().unwrap().split_once(':').unwrap();
            (p.parse().unwrap(), o.parse().unwrap())
        })
        .collect();
    let wanted: BTreeSet<(u64, u64)> =
        expected.digests.keys().map(|(p, o)| (u64::from(*p), *o)).filter(|(p, o)| *o > markers[p]).collect();
    assert!(!wanted.is_empty());
    assert_eq!(published, wanted, "exactly the outputs after each marker are published");
}

/// `run` arguments for instance `id` of a federation of `ports.len()` instances on loopback.
fn federation_args(id: u32, ports: &[u16], psk: &Path) -> Vec<String> {
    let peers: Vec<String> = (1..=ports.len() as u32)
        .filter(|p| *p != id)
        .map(|p| format!("{p}@127.0.0.1:{}", ports[p as usize - 1]))
        .collect();
    vec![
        "--instance-id".into(),
        id.to_string(),
        "--listen".into(),
        format!("127.0.0.1:{}", ports[id as usize - 1]),
        "--peers".into(),
        peers.join(","),
        "--psk-file".into(),
        psk.display().to_string(),
        "--expected-copies".into(),
        "2".into(),
    ]
}

impl Instance {
    fn spawn_federated(&self, broker: &Broker, args: &[String]) -> Child {
        let mut command = tribunal();
        command
            .args(["run", "--log", &broker.log_arg(), "--kafka-partitions", &PARTITIONS.to_string()])
            .args(["--cores", "0,1", "--snapshot-every", "400", "--data-dir"])
            .arg(&self.data)
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap());
        die_with_parent(&mut command).spawn().unwrap()
    }

    /// Per partition, the certified and published watermarks (-1: none yet).
    fn watermarks(&self, key: &str) -> Vec<i64> {
        let status = self.status().unwrap_or(Value::Null);
        (0..PARTITIONS as usize).map(|p| status["partitions"][p][key].as_i64().unwrap_or(-1)).collect()
    }
}

#[test]
fn three_instances_on_kafka_certify_publish_once_through_the_publisher_and_hand_over_on_its_sigkill() {
    // spec: Clerk.OffsetCertified, Clerk.CertifiedOutputPublished, Clerk.PublisherElected,
    // spec: Clerk.PublisherHandOver, Publisher.KeyedByInput, KafkaLog.EveryInstanceReadsEveryPartition
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = Broker::start();
    let psk = broker.dir.path().join("psk");
    std::fs::write(&psk, "a federation key of more than sixteen bytes").unwrap();
    let ports: Vec<u16> =
        (0..3).map(|_| TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).collect();
    let instances: Vec<Instance> = (0..3).map(|_| Instance::new()).collect();
    let mut positions = append(&broker, broker.dir.path(), &sample(6_000, 21), false);
    let mut children: Vec<Option<Child>> = (1..=3u32)
        .map(|id| Some(instances[id as usize - 1].spawn_federated(&broker, &federation_args(id, &ports, &psk))))
        .collect();
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() < PATIENCE, "gave up waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait("instance 1 to publish", &|| instances[0].watermarks("published_watermark").iter().any(|w| *w >= 0));
    assert_eq!(instances[0].status().unwrap()["federation"]["publisher"], true, "the lowest id publishes");
    // SIGKILL the publisher mid-stream; more input arrives while it is gone.
    let mut publisher = children[0].take().unwrap();
    publisher.kill().unwrap();
    publisher.wait().unwrap();
    positions.extend(append(&broker, broker.dir.path(), &sample(4_000, 22), false));
    let ends = last_offsets(&positions);
    let all_published = |instance: &Instance| {
        let published = instance.watermarks("published_watermark");
        ends.iter().all(|(p, last)| published[*p as usize] >= *last as i64)
    };
    wait("instance 2 to take over and publish everything", &|| all_published(&instances[1]));
    assert_eq!(instances[1].status().unwrap()["federation"]["publisher"], true);
    // The old publisher comes back, catches up and agrees.
    children[0] = Some(instances[0].spawn_federated(&broker, &federation_args(1, &ports, &psk)));
    wait("every instance to certify everything", &|| {
        instances.iter().all(|i| {
            let certified = i.watermarks("certified_watermark");
            ends.iter().all(|(p, last)| certified[*p as usize] >= *last as i64)
        })
    });
    for (i, child) in children.iter_mut().enumerate() {
        let mut child = child.take().unwrap();
        assert!(child.try_wait().unwrap().is_none(), "instance {} exited: {}", i + 1, instances[i].log());
        child.kill().unwrap();
        child.wait().unwrap();
        let status = instances[i].status().unwrap();
        assert_eq!(status["federation"]["faults_total"], 0, "instance {}: no fault", i + 1);
    }
    // Every input has exactly its reference output on the topic (a duplicate from the
    // hand-over is identical), and every instance's state is the reference's.
    for instance in &instances {
        check(&broker, instance, true);
    }
    // One publisher at a time: at most the hand-over's outputs appear twice.
    let records = read_topic(&broker, "tribunal.outputs").len();
    assert!(records < 2 * positions.len(), "{records} outputs for {} inputs", positions.len());
}

#[test]
fn the_gateway_appends_to_kafka_and_answers_with_certified_outputs_on_every_partition() {
    // spec: Gateway.MovementAppended, Gateway.AnsweredWhenCertified, Gateway.ReplayReturnsOriginal
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = Broker::start();
    let instance = Instance::new();
    let address = format!("127.0.0.1:{}", support::federation::free_port());
    let mut child = instance.spawn_with(&broker, &["--http", &address]);
    let base = format!("http://{address}");
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(60)).build();
    let start = Instant::now();
    while agent.get(&format!("{base}/healthz")).call().map(|r| r.status()).unwrap_or(0) != 200 {
        assert!(child.try_wait().unwrap().is_none(), "the instance exited:\n{}", instance.log());
        assert!(start.elapsed() < Duration::from_secs(300), "the Gateway never became ready:\n{}", instance.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let post = |key: &str, body: &str| {
        http_answer(agent.post(&format!("{base}/v1/movements")).set("Idempotency-Key", key).send_string(body))
    };
    let mut partitions = BTreeSet::new();
    for i in 0..24 {
        let body = format!(r#"{{"type":"adjust","sku":"s{i}","warehouse":"w","delta":{}}}"#, i + 1);
        let (status, answer) = post(&format!("kafka-{i}"), &body);
        assert_eq!((status, answer["verdict"].as_str()), (200, Some("accepted")), "{answer}");
        let partition = answer["partition"].as_u64().unwrap();
        partitions.insert(partition);
        // Read-your-writes on the partition the key went to.
        let (status, stock) = http_answer(agent.get(&format!("{base}/v1/stock/w/s{i}?partition={partition}")).call());
        assert_eq!((status, stock["qty"].as_u64()), (200, Some(i + 1)), "{stock}");
        // A retry reaches the same partition (keyed) and gets the original.
        let (status, retry) = post(&format!("kafka-{i}"), &body);
        assert_eq!((status, retry["replayed"].as_bool()), (200, Some(true)), "{retry}");
        assert_eq!(
            (retry["partition"].as_u64(), retry["offset"].as_u64()),
            (Some(partition), answer["offset"].as_u64())
        );
    }
    assert!(partitions.len() > 1, "24 keys spread over the {PARTITIONS} partitions: {partitions:?}");
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends `signal` (e.g. "STOP") to the broker process.
fn signal_broker(broker: &Broker, signal: &str) {
    let pid = broker.child.as_ref().expect("the broker runs").id().to_string();
    let status = Command::new("kill").args([&format!("-{signal}"), &pid]).status().unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Starts an instance with the Gateway on and waits until /healthz says ready.
fn spawn_gateway(instance: &Instance, broker: &Broker, extra: &[&str]) -> (Child, String) {
    let address = format!("127.0.0.1:{}", support::federation::free_port());
    let mut args = vec!["--http", address.as_str()];
    args.extend_from_slice(extra);
    let mut child = instance.spawn_with(broker, &args);
    let base = format!("http://{address}");
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
    let start = Instant::now();
    while agent.get(&format!("{base}/healthz")).call().map(|r| r.status()).unwrap_or(0) != 200 {
        assert!(child.try_wait().unwrap().is_none(), "the instance exited:\n{}", instance.log());
        assert!(start.elapsed() < PATIENCE, "the Gateway never became ready:\n{}", instance.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, base)
}

#[test]
fn a_command_whose_request_timed_out_while_the_broker_stalled_is_kept_applied_once_and_the_gateway_goes_on() {
    // spec: Gateway.CommandProducerKeepsRecords, Gateway.LogUnavailable, Gateway.ReplayReturnsOriginal
    // A stalled broker (SIGSTOP: a long pause, connections stay open) outlives the request's
    // 2 s deadline. The Gateway answers 503 on its own timer; the record stays with the
    // producer. Had librdkafka timed it out, the idempotent producer would bump its epoch,
    // and tansu panics on the next record (every later POST fails: this test failed so).
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let broker = Broker::start();
    let instance = Instance::new();
    let (mut child, base) = spawn_gateway(&instance, &broker, &["--http-deadline-ms", "2000"]);
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build();
    let post = |key: &str, delta: u32| {
        let body = format!(r#"{{"type":"adjust","sku":"stall","warehouse":"w","delta":{delta}}}"#);
        http_answer(agent.post(&format!("{base}/v1/movements")).set("Idempotency-Key", key).send_string(&body))
    };
    // Until a 200: a busy machine may answer 504 (appended, not yet certified) first.
    let post_until_accepted = |key: &str, delta: u32| {
        let start = Instant::now();
        loop {
            let (status, answer) = post(key, delta);
            if status == 200 {
                return answer;
            }
            assert!(status == 503 || status == 504, "{status} {answer}");
            assert!(
                start.elapsed() < PATIENCE,
                "{key} was never accepted: {answer}\n{}\nbroker: {}",
                instance.log(),
                std::fs::read_to_string(broker.dir.path().join("broker.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let before = post_until_accepted("before-stall", 1);
    assert_eq!(before["verdict"].as_str(), Some("accepted"), "{before}");

    signal_broker(&broker, "STOP");
    let (status, answer) = post("during-stall", 10);
    assert_eq!((status, answer["error"]["code"].as_str()), (503, Some("log_unavailable")), "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("may still be appended"), "{answer}");
    // A retry while the first record is still held is refused at once: no second copy.
    let (status, answer) = post("during-stall", 10);
    assert_eq!((status, answer["error"]["code"].as_str()), (503, Some("log_unavailable")), "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap_or_default().contains("still waiting"), "{answer}");
    // Well past the deadline, so a producer with a message timeout would have given up.
    std::thread::sleep(Duration::from_secs(3));
    signal_broker(&broker, "CONT");

    // The Gateway goes on: a new command is accepted once the broker answers again.
    let after = post_until_accepted("after-stall", 100);
    assert_eq!(after["verdict"].as_str(), Some("accepted"), "{after}");
    // The command whose request timed out was kept and appended: its retry is a replay.
    let retry = post_until_accepted("during-stall", 10);
    assert_eq!((retry["replayed"].as_bool(), retry["verdict"].as_str()), (Some(true), Some("accepted")), "{retry}");
    // On the log: the held record once, plus the retry after the stall (a replay), and
    // none of the refused retry.
    let records: Vec<Value> = read_topic(&broker, "tribunal.commands")
        .into_iter()
        .filter(|r| r["key"].as_str() == Some("during-stall"))
        .collect();
    assert_eq!(records.len(), 2, "{records:?}");
    let first = (records[0]["partition"].as_u64(), records[0]["offset"].as_u64());
    assert_eq!(first, (retry["partition"].as_u64(), retry["offset"].as_u64()), "the replay names the held record");
    // Each of the three commands applied exactly once, wherever its key's partition is: the
    // answers above mean every partition is certified past them.
    let partitions: BTreeSet<u64> =
        [&before, &after, &retry].iter().map(|a| a["partition"].as_u64().expect("a partition")).collect();
    let total: u64 = partitions
        .iter()
        .map(|partition| {
            let (status, stock) =
                http_answer(agent.get(&format!("{base}/v1/stock/w/stall?partition={partition}")).call());
            assert_eq!(status, 200, "{stock}");
            stock["qty"].as_u64().unwrap_or_else(|| panic!("{stock}"))
        })
        .sum();
    assert_eq!(total, 1 + 10 + 100, "before, during and after the stall, once each");
    let _ = child.kill();
    let _ = child.wait();
}
