//! A federation of real `tribunal run` processes on loopback, for the integration tests:
//! start, SIGKILL and restart instances, and read their status.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{die_with_parent, ok, tribunal};

/// Generous bounds for slow CI machines; tests never assert on how long things take.
pub const PATIENCE: Duration = Duration::from_secs(300);

pub struct Federation {
    pub tmp: tempfile::TempDir,
    pub ports: Vec<u16>,
    pub expected_copies: u32,
    pub children: BTreeMap<u32, Child>,
    /// Per instance, the REST API port when the federation serves HTTP.
    pub http_ports: Option<Vec<u16>>,
}

/// A port nothing listens on, and that no other test of this process was given: the
/// tests of one file run in parallel, and the port is free again between this call and
/// the instance's bind, when the kernel could hand it to another test's `bind(0)`.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if given.insert(port) {
            return port;
        }
    }
}

impl Federation {
    pub fn new(instances: u32, expected_copies: u32) -> Federation {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("psk"), "a test key of more than sixteen bytes").unwrap();
        let ports = (0..instances).map(|_| free_port()).collect();
        Federation { tmp, ports, expected_copies, children: BTreeMap::new(), http_ports: None }
    }

    /// Every instance started from now on serves the REST API.
    pub fn with_http(mut self) -> Federation {
        self.http_ports = Some(self.ports.iter().map(|_| free_port()).collect());
        self
    }

    /// The REST API's base URL of instance `id`.
    pub fn url(&self, id: u32) -> String {
        let ports = self.http_ports.as_ref().expect("the federation serves HTTP");
        format!("http://127.0.0.1:{}", ports[id as usize - 1])
    }

    pub fn log(&self) -> PathBuf {
        self.tmp.path().join("log")
    }

    pub fn log_arg(&self) -> String {
        format!("local:{}", self.log().display())
    }

    pub fn data(&self, id: u32) -> PathBuf {
        self.tmp.path().join(format!("instance-{id}"))
    }

    pub fn append(&self, events: u64, seed: u64) {
        let commands = ok(tribunal().args(["sample", "--events", &events.to_string(), "--seed", &seed.to_string()]));
        let file = self.tmp.path().join(format!("sample-{seed}.jsonl"));
        std::fs::write(&file, commands).unwrap();
        ok(tribunal().args(["log", "append", "--log", &self.log_arg()]).arg(&file));
    }

    pub fn spawn(&mut self, id: u32, stop_at_end: bool, extra: &[&str]) {
        let peers: Vec<String> = (1..=self.ports.len() as u32)
            .filter(|p| *p != id)
            .map(|p| format!("{p}@127.0.0.1:{}", self.ports[p as usize - 1]))
            .collect();
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.path().join(format!("instance-{id}.log")))
            .unwrap();
        let mut command = tribunal();
        command
            .args(["run", "--log", &self.log_arg(), "--cores", "0,1", "--instance-id", &id.to_string()])
            .args(["--listen", &format!("127.0.0.1:{}", self.ports[id as usize - 1])])
            .args(["--peers", &peers.join(",")])
            .args(["--expected-copies", &self.expected_copies.to_string()])
            .arg("--psk-file")
            .arg(self.tmp.path().join("psk"))
            .arg("--data-dir")
            .arg(self.data(id))
            .args(extra)
            .args(
                self.http_ports
                    .iter()
                    .flat_map(|ports| ["--http".to_string(), format!("127.0.0.1:{}", ports[id as usize - 1])]),
            )
            .stdout(Stdio::null())
            .stderr(log_file);
        if stop_at_end {
            command.arg("--stop-at-end");
        }
        let child = die_with_parent(&mut command).spawn().unwrap();
        self.children.insert(id, child);
    }

    pub fn kill(&mut self, id: u32) {
        let mut child = self.children.remove(&id).expect("running");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    pub fn instance_log(&self, id: u32) -> String {
        std::fs::read_to_string(self.tmp.path().join(format!("instance-{id}.log"))).unwrap_or_default()
    }

    /// `status.json` of an instance (Null while it does not exist or is being replaced).
    pub fn status(&self, id: u32) -> Value {
        std::fs::read(self.data(id).join("status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }

    pub fn certified(&self, id: u32) -> i64 {
        self.status(id)["partitions"][0]["certified_watermark"].as_i64().unwrap_or(-1)
    }

    pub fn wait_until(&mut self, what: &str, mut condition: impl FnMut(&Federation) -> bool) {
        let start = Instant::now();
        while !condition(self) {
            let mut failed = None;
            for (id, child) in &mut self.children {
                if let Ok(Some(status)) = child.try_wait() {
                    if !status.success() {
                        failed = Some((*id, status));
                    }
                }
            }
            if let Some((id, status)) = failed {
                panic!("instance {id} exited with {status} while waiting for {what}:\n{}", self.instance_log(id));
            }
            assert!(start.elapsed() < PATIENCE, "gave up waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for every running instance to exit 0 (they run with --stop-at-end).
    pub fn wait_all_exit(&mut self) {
        let start = Instant::now();
        let ids: Vec<u32> = self.children.keys().copied().collect();
        for id in ids {
            let child = self.children.get_mut(&id).unwrap();
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(status.success(), "instance {id} exited with {status}:\n{}", self.instance_log(id));
                    break;
                }
                assert!(start.elapsed() < PATIENCE, "instance {id} did not finish:\n{}", self.instance_log(id));
                std::thread::sleep(Duration::from_millis(50));
            }
            self.children.remove(&id);
        }
    }
}

impl Drop for Federation {
    fn drop(&mut self) {
        for child in self.children.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
