//! The Clerk's IO shell: one glommio executor (thread `clerk`) that owns the sans-IO
//! [`Clerk`], the peer links, the hand-over buffer of certified outputs and the fault
//! injection (spec: specs/clerk.allium, specs/federation.allium).
//!
//! Inputs: own outputs, from each shard's Ledger task after its fdatasync (so only
//! durable outputs are ever compared: spec Clerk.OwnCopyRecorded); frames from peers;
//! a 10 ms tick (durable watermarks, heartbeats, status). Outputs: frames to peers,
//! certified outputs to the publisher sink while this instance holds the role, fault
//! reports (log, `faults.jsonl`, status), and atomics the Ushers and the main thread read
//! (certified ends for backpressure and `--stop-at-end`).

pub mod peer_links;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use glommio::channels::local_channel;
use glommio::channels::shared_channel::SharedReceiver;
use glommio::{LocalExecutorBuilder, Placement};
use peer_links::{LinkEvent, LinksConfig, PeerLinks};
use serde_json::{json, Value};
use tracing::{error, info, warn};
use tribunal_federation::clerk::{
    Action, Clerk, ClerkConfig, ClerkStatus, FaultReport, InstanceId, Outgoing, QuarantineState,
};
use tribunal_federation::wire::Frame;
use tribunal_shards::prng::SplitMix64;

use crate::cli::federation_args::Fault;
use crate::publish::json::OutputJson;
use crate::publish::{CertifiedSink, DurableOutput, PublishBatch, MAX_UNPUBLISHED};
use crate::storage::quarantine::{self, ReadmitRequest};

/// Fault reports and injected faults listed in status (all are in `faults.jsonl`).
const STATUS_FAULTS: usize = 32;
const MAX_INJECTED_LISTED: usize = 4_096;
/// Fault reports per differing instance that are decoded field by field and logged as
/// errors; past it (a diverged instance differs at every offset) each fault is still a
/// line in `faults.jsonl`, without the decoding, and the log gets one line per
/// `FAULT_LOG_EVERY`, so a fault does not slow certification down to a crawl.
const DETAILED_FAULTS_PER_INSTANCE: u64 = 100;
const FAULT_LOG_EVERY: u64 = 1_000;
const TICK: Duration = Duration::from_millis(10);
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
const STATUS_INTERVAL: Duration = Duration::from_millis(100);
/// Ticks a peer must stay unreachable before `--stop-at-end` stops waiting for it: a
/// peer that is only slow (a starved link times out) may still need our copies.
const STOP_GRACE_TICKS: u32 = 500;

/// Shared with the Ushers, the main thread and the publisher sink.
pub struct ClerkShared {
    pub partitions: u32,
    /// Per partition: every offset below is certified here.
    pub certified_end: Vec<AtomicU64>,
    /// Per partition: published, as far as this instance knows (own sink or heartbeats).
    pub published_known: Vec<AtomicU64>,
    /// Per partition: the lowest certified end advertised by an eligible peer (u64::MAX: none).
    pub peers_certified_end: Vec<AtomicU64>,
    /// Some instance (this or an eligible peer) may publish.
    pub publisher_exists: AtomicBool,
    /// The hand-over buffer is full: the Ushers wait.
    pub backlog_full: AtomicBool,
    /// Set by the main thread once recovery is complete (spec: Recovery.RecoveryCompletes).
    pub open_gate: AtomicBool,
    pub ready: AtomicBool,
    pub quarantined: AtomicBool,
    pub status: Mutex<Value>,
    /// Bumped on every status snapshot; the main thread asks for a fresh one at exit.
    pub status_seq: AtomicU64,
    pub status_wanted: AtomicBool,
    pub failure: Mutex<Option<String>>,
}

impl ClerkShared {
    pub fn new(partitions: u32, certified: &[u64], published: &[u64]) -> Self {
        let atomics = |v: &[u64]| v.iter().map(|&x| AtomicU64::new(x)).collect();
        ClerkShared {
            partitions,
            certified_end: atomics(certified),
            published_known: atomics(published),
            peers_certified_end: (0..partitions).map(|_| AtomicU64::new(u64::MAX)).collect(),
            publisher_exists: AtomicBool::new(false),
            backlog_full: AtomicBool::new(false),
            open_gate: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            quarantined: AtomicBool::new(false),
            status: Mutex::new(Value::Null),
            status_seq: AtomicU64::new(0),
            status_wanted: AtomicBool::new(false),
            failure: Mutex::new(None),
        }
    }

    pub fn certified_end(&self, partition: u32) -> u64 {
        self.certified_end[partition as usize].load(Ordering::Acquire)
    }

    /// Asks the Clerk for a status snapshot and waits (bounded) until it is taken.
    pub fn fresh_status(&self) -> Value {
        let seen = self.status_seq.load(Ordering::Acquire);
        self.status_wanted.store(true, Ordering::Release);
        for _ in 0..200 {
            if self.status_seq.load(Ordering::Acquire) != seen {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.status.lock().expect("not poisoned").clone()
    }
}

/// Run-time fault injection (the Gateway's admin API), taken by the Clerk's shell on its
/// next tick (spec: Gateway.FaultInjectionReplaced).
#[derive(Default)]
pub struct FaultControl {
    pub pending: Mutex<Option<InjectedFaults>>,
}

/// The faults to inject from now on; `None` clears one.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectedFaults {
    #[serde(default)]
    pub bitflip_rate: Option<f64>,
    #[serde(default)]
    pub delay_ms: Option<u64>,
}

pub struct ClerkSetup {
    pub config: ClerkConfig,
    /// None: no peers (expected_copies 1).
    pub links: Option<LinksConfig>,
    pub faults: Vec<Fault>,
    /// Per partition (certified end, durable end) as recovered.
    pub resume: Vec<(u64, u64)>,
    /// Own outputs from the Ledger at or past the certified end, in (partition, offset) order.
    pub recovered_outputs: Vec<DurableOutput>,
    /// Per partition, digests of own outputs below the certified end, in offset order.
    pub retained_seed: Vec<Vec<(u64, u128)>>,
    /// Certified outputs from the Ledger that may not be published yet.
    pub unpublished: Vec<DurableOutput>,
    pub sink: Option<mpsc::Sender<PublishBatch>>,
    /// Per partition, what this instance's own sink has published (end).
    pub sink_published: Arc<dyn Fn(u32) -> u64 + Send + Sync>,
    pub data_dir: PathBuf,
    /// The Gateway's certified view, fed every certified output (spec: Gateway.CertifiedViewAdvances).
    pub view: Option<Arc<dyn CertifiedSink>>,
    /// Fault injection replaced at run time through the admin API.
    pub fault_control: Option<Arc<FaultControl>>,
}

/// Starts the `clerk` executor; returns once the listener is bound (or failed to).
pub fn spawn(
    setup: ClerkSetup,
    own_outputs: Vec<SharedReceiver<Vec<DurableOutput>>>,
    shared: Arc<ClerkShared>,
    durable_end: Arc<dyn Fn(u32) -> u64 + Send + Sync>,
    io_memory_bytes: usize,
) -> anyhow::Result<()> {
    let (started_tx, started_rx) = mpsc::channel::<Result<(), String>>();
    LocalExecutorBuilder::new(Placement::Unbound)
        .name("clerk")
        .io_memory(io_memory_bytes)
        .spawn(move || async move {
            let failed = started_tx.clone();
            let result = clerk_main(setup, own_outputs, shared.clone(), durable_end, started_tx).await;
            if let Err(error) = result {
                let message = format!("{error:#}");
                let _ = failed.send(Err(message.clone()));
                *shared.failure.lock().expect("not poisoned") = Some(message);
            }
        })
        .map_err(|e| anyhow::anyhow!("starting the clerk executor: {e}"))?;
    match started_rx.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => anyhow::bail!("{error}"),
        Err(_) => anyhow::bail!("the clerk executor stopped during start-up"),
    }
}

struct Shell {
    clerk: Clerk,
    links: Option<PeerLinks>,
    shared: Arc<ClerkShared>,
    sink: Option<mpsc::Sender<PublishBatch>>,
    sink_published: Arc<dyn Fn(u32) -> u64 + Send + Sync>,
    /// Per partition, certified outputs not known to be published, in order.
    buffer: Vec<VecDeque<(u64, Arc<[u8]>)>>,
    faults_file: PathBuf,
    /// Opened on the first fault; flushed every tick.
    faults_writer: Option<std::io::BufWriter<std::fs::File>>,
    /// Per differing instance, faults reported so far (bounded by the instance count).
    faults_by_instance: std::collections::BTreeMap<InstanceId, u64>,
    /// The last STATUS_FAULTS fault lines, for status.
    recent_faults: VecDeque<Value>,
    injected: Injected,
    bitflip_rate: Option<f64>,
    delay: Option<Duration>,
    /// Per peer (in config order), consecutive ticks unreachable or not ready.
    down_ticks: Vec<u32>,
    data_dir: PathBuf,
    /// The Clerk's quarantine version last written to `quarantine.json`.
    persisted_quarantine: u64,
    /// Certified outputs held back while a quarantine could not be persisted.
    unforwarded: Vec<DurableOutput>,
    /// Per partition, one past the last output trimmed from the hand-over buffer.
    trimmed_end: Vec<u64>,
    view: Option<Arc<dyn CertifiedSink>>,
    /// Certified outputs held back from the view while a quarantine could not be persisted.
    unviewed: Vec<(u32, u64, Arc<[u8]>)>,
    fault_control: Option<Arc<FaultControl>>,
}

struct Injected {
    /// Flips are not evaluation, so a seed from the OS is fine here.
    rng: SplitMix64,
    count: u64,
    listed: Vec<(u32, u64)>,
}

impl Shell {
    fn apply(&mut self) {
        let actions: Vec<Action> = self.clerk.drain_actions().collect();
        let mut forward = Vec::new();
        for action in actions {
            match action {
                Action::Send { peer, message } => {
                    if let Some(links) = &self.links {
                        links.send(peer, to_frame(message));
                    }
                }
                Action::Certified { partition, offset, output } => {
                    if self.clerk.is_publisher() {
                        forward.push(DurableOutput { partition, offset, bytes: output.to_vec() });
                    }
                    if self.view.is_some() {
                        self.unviewed.push((partition, offset, output.clone()));
                    }
                    self.buffer[partition as usize].push_back((offset, output));
                }
                Action::Fault(report) => self.fault(&report),
                Action::Publisher(on) => {
                    if on {
                        self.take_over();
                    } else {
                        warn!("this instance hands over the publisher role");
                    }
                }
            }
        }
        // A quarantine decided in this batch is on disk before anything past it leaves.
        if !self.persist_quarantine() {
            self.unforwarded.extend(forward);
            return;
        }
        if let Some(view) = &self.view {
            // spec: Gateway.CertifiedViewAdvances — answers leave only past a persisted quarantine.
            view.certified(&self.unviewed);
            self.unviewed.clear();
        }
        forward.splice(0..0, self.unforwarded.drain(..));
        if !forward.is_empty() {
            self.send_to_sink(PublishBatch { skip_to: Vec::new(), outputs: forward });
        }
        for partition in 0..self.shared.partitions {
            let end = self.clerk.certified_end(partition);
            self.shared.certified_end[partition as usize].store(end, Ordering::Release);
        }
    }

    fn send_to_sink(&mut self, batch: PublishBatch) {
        if let Some(sink) = &self.sink {
            if sink.send(batch).is_err() {
                *self.shared.failure.lock().expect("not poisoned") = Some("the publisher sink stopped".into());
            }
        }
    }

    /// spec: Clerk.PublisherElected, Clerk.PublisherHandOver — resume after the highest
    /// published offset heard of; what lies between that and what the old publisher
    /// really wrote is published again, byte-identical and keyed.
    fn take_over(&mut self) {
        let mut skip_to = Vec::new();
        let mut outputs = Vec::new();
        for partition in 0..self.shared.partitions {
            let p = partition as usize;
            // Outputs trimmed while nobody could publish cannot be republished by us.
            let known = self.known_published(partition);
            let start = known.max(self.trimmed_end[p]);
            if start > known {
                warn!(partition, from = known, to = start, "outputs trimmed while no publisher existed are skipped");
            }
            skip_to.push((partition, start));
            let buffer = &mut self.buffer[p];
            while buffer.front().is_some_and(|(o, _)| *o < start) {
                buffer.pop_front();
            }
            outputs.extend(buffer.iter().map(|(offset, output)| DurableOutput {
                partition,
                offset: *offset,
                bytes: output.to_vec(),
            }));
        }
        info!(resume = ?skip_to, republish = outputs.len(), "this instance is the publisher");
        self.send_to_sink(PublishBatch { skip_to, outputs });
    }

    fn known_published(&self, partition: u32) -> u64 {
        let own = (self.sink_published)(partition);
        own.max(self.clerk.peers_published_end(partition))
    }

    /// spec: Clerk.FaultReported — an error line with the differing fields, a line in
    /// `faults.jsonl`, the counters and the status.
    fn fault(&mut self, report: &FaultReport) {
        let mut seen = 0;
        for instance in &report.differing {
            let count = self.faults_by_instance.entry(*instance).or_insert(0);
            *count += 1;
            seen = seen.max(*count);
        }
        let detailed = seen <= DETAILED_FAULTS_PER_INSTANCE;
        let line = if detailed { fault_json(report) } else { fault_json_brief(report) };
        if detailed {
            error!(
                partition = report.partition,
                offset = report.offset,
                kind = ?report.kind,
                differing = ?report.differing,
                detail = %line["differing_fields"],
                "detected fault: output copies differ"
            );
        } else if seen % FAULT_LOG_EVERY == 0 {
            error!(
                differing = ?report.differing,
                faults = seen,
                "detected faults keep coming from the same instance (all in faults.jsonl)"
            );
        }
        if self.faults_writer.is_none() {
            let opened = std::fs::OpenOptions::new().create(true).append(true).open(&self.faults_file);
            match opened {
                Ok(file) => self.faults_writer = Some(std::io::BufWriter::new(file)),
                Err(e) => warn!("could not open {}: {e}", self.faults_file.display()),
            }
        }
        if let Some(writer) = &mut self.faults_writer {
            if let Err(e) = writeln!(writer, "{line}") {
                warn!("could not append to {}: {e}", self.faults_file.display());
                self.faults_writer = None;
            }
        }
        if self.recent_faults.len() == STATUS_FAULTS {
            self.recent_faults.pop_front();
        }
        self.recent_faults.push_back(line);
    }

    fn flush_faults(&mut self) {
        if let Some(writer) = &mut self.faults_writer {
            if let Err(e) = writer.flush() {
                warn!("could not append to {}: {e}", self.faults_file.display());
                self.faults_writer = None;
            }
        }
    }

    /// spec: Gateway.FaultInjectionReplaced
    fn take_injected_faults(&mut self) {
        let Some(control) = &self.fault_control else { return };
        let Some(faults) = control.pending.lock().expect("not poisoned").take() else { return };
        self.bitflip_rate = faults.bitflip_rate;
        self.delay = faults.delay_ms.map(Duration::from_millis);
        warn!(bitflip_rate = ?self.bitflip_rate, delay = ?self.delay, "injected faults replaced");
    }

    fn own_outputs(&mut self, batch: Vec<DurableOutput>) {
        for output in batch {
            let mut bytes = output.bytes;
            if let Some(rate) = self.bitflip_rate {
                if !bytes.is_empty() && self.injected.rng.next_unit() < rate {
                    let bit = (self.injected.rng.next_unit() * (bytes.len() * 8) as f64) as usize % (bytes.len() * 8);
                    bytes[bit / 8] ^= 1 << (bit % 8);
                    self.injected.count += 1;
                    if self.injected.listed.len() < MAX_INJECTED_LISTED {
                        self.injected.listed.push((output.partition, output.offset));
                    }
                    warn!(
                        partition = output.partition,
                        offset = output.offset,
                        bit,
                        "INJECTED FAULT: flipped a bit in an output"
                    );
                }
            }
            self.clerk.own_output(output.partition, output.offset, Arc::from(bytes));
        }
        self.apply();
    }

    fn frame(&mut self, peer: InstanceId, frame: Frame) {
        match frame {
            Frame::Copy { partition, offset, output } => {
                self.clerk.peer_copy(peer, partition, offset, Arc::from(output))
            }
            Frame::CertifiedCopy { partition, offset, digest } => {
                self.clerk.peer_certified_copy(peer, partition, offset, digest)
            }
            Frame::Watermark { partition, durable_end, certified_end } => {
                self.clerk.peer_watermark(peer, partition, durable_end, certified_end)
            }
            Frame::Heartbeat { published_ends } => self.clerk.peer_heartbeat(peer, &published_ends),
            Frame::Readiness { ready, quarantined, publisher, incarnation } => {
                self.clerk.peer_readiness(peer, ready, quarantined, publisher, incarnation)
            }
            Frame::Readmit { instance_id } => self.clerk.readmit(instance_id),
        }
        self.apply();
    }

    fn tick(&mut self, durable_end: &dyn Fn(u32) -> u64) {
        if self.clerk.status() == ClerkStatus::Recovering && self.shared.open_gate.load(Ordering::Acquire) {
            self.clerk.open_gate();
            self.shared.ready.store(true, Ordering::Release);
            info!("the Clerk is ready: advertising watermarks and sending copies");
        }
        for partition in 0..self.shared.partitions {
            self.clerk.own_durable(partition, durable_end(partition));
        }
        self.apply();
        for (view, down) in self.clerk.peers().iter().zip(self.down_ticks.iter_mut()) {
            *down = if view.link_up && view.ready { 0 } else { down.saturating_add(1) };
        }
        // Prune the hand-over buffer to what is known published.
        let mut full = false;
        for partition in 0..self.shared.partitions {
            let p = partition as usize;
            let known = self.known_published(partition);
            self.shared.published_known[p].store(known, Ordering::Release);
            let buffer = &mut self.buffer[p];
            while buffer.front().is_some_and(|(o, _)| *o < known) {
                buffer.pop_front();
            }
            full |= buffer.len() as u64 >= MAX_UNPUBLISHED;
            // spec: Clerk.StopAtEnd — every trusted peer, unless it has been gone a while.
            let min_peer = self
                .clerk
                .peers()
                .iter()
                .zip(&self.down_ticks)
                .filter(|(v, down)| !v.quarantined && !v.says_quarantined && **down < STOP_GRACE_TICKS)
                .map(|(v, _)| v.advertised_certified_end[p].unwrap_or(v.last_certified_end[p]))
                .min()
                .unwrap_or(u64::MAX);
            self.shared.peers_certified_end[p].store(min_peer, Ordering::Release);
        }
        let peer_publishes = self.clerk.peers().iter().any(|v| v.eligible() && v.may_publish);
        let exists = self.clerk.is_publisher() || peer_publishes;
        self.shared.publisher_exists.store(exists, Ordering::Release);
        // With nobody to publish, the buffer must not stall the input: it only waits
        // while a publisher exists (and a hand-over would need it).
        if !exists {
            for (buffer, trimmed_end) in self.buffer.iter_mut().zip(&mut self.trimmed_end) {
                while buffer.len() as u64 > MAX_UNPUBLISHED {
                    if let Some((offset, _)) = buffer.pop_front() {
                        *trimmed_end = offset + 1;
                    }
                }
            }
            full = false;
        }
        self.shared.backlog_full.store(full, Ordering::Release);
        self.shared.quarantined.store(self.clerk.self_quarantined(), Ordering::Release);
    }

    /// spec: Clerk.QuarantineLifted — operator requests left by `tribunal readmit`.
    fn take_readmits(&mut self) {
        let requests = match quarantine::list_readmit_requests(&self.data_dir) {
            Ok(requests) => requests,
            Err(e) => {
                warn!("could not read readmit requests in {}: {e}", self.data_dir.display());
                return;
            }
        };
        if requests.is_empty() {
            return;
        }
        for (_, request) in &requests {
            match *request {
                ReadmitRequest::Instance(instance) if self.clerk.operator_readmit(instance) => {
                    warn!(instance, "OPERATOR READMIT: instance {instance} is trusted again; telling the peers")
                }
                ReadmitRequest::Instance(instance) => {
                    warn!(instance, "readmit request ignored: instance {instance} is not in this federation")
                }
                ReadmitRequest::Malformed(ref name) => {
                    warn!("readmit request ignored: {name:?} is not an instance id")
                }
            }
        }
        self.apply();
        if !self.persist_quarantine() {
            return; // the requests stay, and are applied again next time
        }
        for (path, _) in requests {
            if let Err(e) = std::fs::remove_file(&path) {
                warn!("could not remove the readmit request {}: {e}", path.display());
            }
        }
    }

    /// spec: Clerk.QuarantinePersisted — before the certified ends that passed the offset
    /// that caused it are shown to anyone (the checkpoint is written from them), so no
    /// restart can forget it. False: the write failed; it is retried on the next call.
    fn persist_quarantine(&mut self) -> bool {
        let version = self.clerk.quarantine_version();
        if version == self.persisted_quarantine {
            return true;
        }
        let state = self.clerk.quarantine_state();
        match quarantine::write_quarantine(&self.data_dir, &state) {
            Ok(()) => {
                self.persisted_quarantine = version;
                info!(quarantined = state.self_quarantined, peers = ?state.peers, "quarantine recorded");
                true
            }
            Err(e) => {
                warn!("{e:#}");
                false
            }
        }
    }

    fn heartbeat(&mut self) {
        let Some(links) = &self.links else { return };
        let published_ends: Vec<u64> = (0..self.shared.partitions).map(|p| self.known_published(p)).collect();
        for peer in &self.clerk.config().peers {
            links.send(*peer, Frame::Heartbeat { published_ends: published_ends.clone() });
        }
    }

    fn status(&self) -> Value {
        let clerk = &self.clerk;
        let faults: Vec<Value> = self.recent_faults.iter().rev().cloned().collect();
        let peers: Vec<Value> = clerk
            .peers()
            .iter()
            .map(|v| {
                json!({
                    "instance_id": v.instance_id,
                    "link_up": v.link_up,
                    "ready": v.ready,
                    "quarantined": v.quarantined,
                    "says_quarantined": v.says_quarantined,
                    "incarnation": v.incarnation,
                    "quarantined_incarnation": v.quarantined_incarnation,
                    "may_publish": v.may_publish,
                    "certified_watermarks": v.advertised_certified_end.iter().map(|e| e.and_then(|e| e.checked_sub(1))).collect::<Vec<_>>(),
                    "published_ends": v.published_ends,
                    "queued_copies": self.links.as_ref().map_or(0, |l| l.queued_copies(v.instance_id)),
                })
            })
            .collect();
        let partitions: Vec<Value> = (0..self.shared.partitions)
            .map(|p| {
                json!({
                    "partition": p,
                    "certified_watermark": clerk.certified_end(p).checked_sub(1),
                    "published_watermark": self.known_published(p).checked_sub(1),
                    "contested_at": clerk.contested_at(p),
                    "handover_buffer": self.buffer[p as usize].len(),
                })
            })
            .collect();
        let links = self.links.as_ref().map(|l| {
            let c = l.counters();
            json!({
                "frames_sent": c.frames_sent.get(),
                "frames_received": c.frames_received.get(),
                "writes": c.writes.get(),
                "bytes_sent": c.bytes_sent.get(),
                "copies_dropped": c.copies_dropped.get(),
                "invalid_frames": c.invalid_frames.get(),
                "handshakes_rejected": c.handshakes_rejected.get(),
                "last_rejection": *c.last_rejection.borrow(),
            })
        });
        let counters = clerk.counters();
        json!({
            "instance_id": clerk.config().instance_id,
            "clerk": match clerk.status() { ClerkStatus::Recovering => "recovering", ClerkStatus::Ready => "ready" },
            "quarantined": clerk.self_quarantined(),
            "incarnation": clerk.config().incarnation,
            "publisher": clerk.is_publisher(),
            "expected_copies": clerk.config().expected_copies,
            "partitions": partitions,
            "peers": peers,
            "faults_total": counters.faults,
            "faults": faults,
            "certified": counters.certified,
            "copies_received": counters.copies_received,
            "copies_sent": counters.copies_sent,
            "copies_outside_window": counters.copies_outside_window,
            "late_copies_checked": counters.late_copies_checked,
            "links": links,
            "injected_faults": if self.bitflip_rate.is_some() || self.delay.is_some() {
                json!({"bitflip_rate": self.bitflip_rate, "delay_ms": self.delay.map(|d| d.as_millis() as u64),
                       "bitflips": self.injected.count, "flipped": self.injected.listed})
            } else { Value::Null },
        })
    }
}

fn to_frame(message: Outgoing) -> Frame {
    match message {
        Outgoing::Copy { partition, offset, output } => Frame::Copy { partition, offset, output: output.to_vec() },
        Outgoing::CertifiedCopy { partition, offset, digest } => Frame::CertifiedCopy { partition, offset, digest },
        Outgoing::Watermark { partition, durable_end, certified_end } => {
            Frame::Watermark { partition, durable_end, certified_end }
        }
        // The wire's `publisher` field says whether the sender may take the role.
        Outgoing::Readiness { ready, quarantined, may_publish, incarnation } => {
            Frame::Readiness { ready, quarantined, publisher: may_publish, incarnation }
        }
        Outgoing::Readmit { instance } => Frame::Readmit { instance_id: instance },
    }
}

/// A fault as JSON without decoding the outputs: for the stream of faults from an
/// instance that already differs everywhere.
fn fault_json_brief(report: &FaultReport) -> Value {
    let mut line = fault_json_head(report);
    line["differing_fields"] = json!("not decoded: this instance already differed many times");
    line
}

fn fault_json_head(report: &FaultReport) -> Value {
    let digests: serde_json::Map<String, Value> =
        report.digests.iter().map(|(id, d)| (id.to_string(), Value::String(format!("{d:032x}")))).collect();
    json!({
        "partition": report.partition,
        "offset": report.offset,
        "kind": format!("{:?}", report.kind),
        "differing": report.differing,
        "digests": digests,
    })
}

/// A fault as JSON, with the fields in which the two outputs differ.
fn fault_json(report: &FaultReport) -> Value {
    let mut line = fault_json_head(report);
    line["differing_fields"] = differing_fields(report.own_output.as_deref(), report.differing_output.as_deref());
    line
}

/// Names what differs: decoded fields when both outputs decode, else which one does not
/// and the first differing byte.
fn differing_fields(own: Option<&[u8]>, other: Option<&[u8]>) -> Value {
    let (Some(own), Some(other)) = (own, other) else {
        return json!("bytes not held (a certified digest or a late copy)");
    };
    let decode = |b: &[u8]| OutputJson::from_bytes(b).map(|j| serde_json::to_value(j).expect("serialises"));
    let first_byte = own.iter().zip(other).position(|(a, b)| a != b).unwrap_or(own.len().min(other.len()));
    match (decode(own), decode(other)) {
        (Ok(a), Ok(b)) => {
            let mut fields = Vec::new();
            diff("", &a, &b, &mut fields);
            json!({"fields": fields, "first_differing_byte": first_byte})
        }
        (Ok(_), Err(e)) => json!({"other_copy": format!("does not decode: {e}"), "first_differing_byte": first_byte}),
        (Err(e), Ok(_)) => json!({"own_copy": format!("does not decode: {e}"), "first_differing_byte": first_byte}),
        (Err(e), Err(_)) => json!({"both": format!("do not decode: {e}"), "first_differing_byte": first_byte}),
    }
}

fn diff(path: &str, a: &Value, b: &Value, out: &mut Vec<Value>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for key in keys {
                let null = Value::Null;
                diff(&format!("{path}/{key}"), x.get(key).unwrap_or(&null), y.get(key).unwrap_or(&null), out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                diff(&format!("{path}/{i}"), p, q, out);
            }
        }
        _ if a != b => out.push(json!({"field": path, "own": a, "other": b})),
        _ => {}
    }
}

async fn clerk_main(
    setup: ClerkSetup,
    own_outputs: Vec<SharedReceiver<Vec<DurableOutput>>>,
    shared: Arc<ClerkShared>,
    durable_end: Arc<dyn Fn(u32) -> u64 + Send + Sync>,
    started: mpsc::Sender<Result<(), String>>,
) -> anyhow::Result<()> {
    let (events_tx, events_rx) = local_channel::new_bounded::<LinkEvent>(4_096);
    let links = match setup.links {
        Some(config) => {
            let listen = config.listen;
            Some(PeerLinks::start(config, events_tx).with_context(|| format!("listening for peers on {listen}"))?)
        }
        None => None,
    };
    let mut bitflip_rate = None;
    let mut delay = None;
    for fault in &setup.faults {
        match *fault {
            Fault::BitFlip { rate } => bitflip_rate = Some(rate),
            Fault::Delay { delay_ms } => delay = Some(Duration::from_millis(delay_ms)),
        }
        warn!(?fault, "FAULT INJECTION IS ON for this instance");
    }
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("seeding fault injection: {e}"))?;
    let partitions = setup.config.partitions;
    let peer_count = setup.config.peers.len();
    let mut clerk = Clerk::new(setup.config, &setup.resume);
    let quarantine = quarantine::read_quarantine(&setup.data_dir)?;
    if quarantine != QuarantineState::default() {
        warn!(quarantined = quarantine.self_quarantined, peers = ?quarantine.peers, "quarantine restored from the data dir");
    }
    clerk.restore_quarantine(&quarantine);
    for (partition, seed) in setup.retained_seed.iter().enumerate() {
        clerk.seed_retained(partition as u32, seed);
    }
    let persisted_quarantine = clerk.quarantine_version();
    // Recovered own outputs enter before the gate opens; nothing is sent until it does.
    for output in setup.recovered_outputs {
        clerk.own_output(output.partition, output.offset, Arc::from(output.bytes));
    }
    let mut buffer: Vec<VecDeque<(u64, Arc<[u8]>)>> = (0..partitions).map(|_| VecDeque::new()).collect();
    for output in setup.unpublished {
        buffer[output.partition as usize].push_back((output.offset, Arc::from(output.bytes)));
    }
    let shell = Rc::new(RefCell::new(Shell {
        clerk,
        links,
        shared: shared.clone(),
        sink: setup.sink,
        sink_published: setup.sink_published,
        buffer,
        faults_file: setup.data_dir.join("faults.jsonl"),
        faults_writer: None,
        faults_by_instance: std::collections::BTreeMap::new(),
        recent_faults: VecDeque::new(),
        injected: Injected { rng: SplitMix64(u64::from_le_bytes(seed)), count: 0, listed: Vec::new() },
        bitflip_rate,
        delay,
        down_ticks: vec![0; peer_count],
        data_dir: setup.data_dir,
        persisted_quarantine,
        unforwarded: Vec::new(),
        trimmed_end: vec![0; partitions as usize],
        view: setup.view,
        unviewed: Vec::new(),
        fault_control: setup.fault_control,
    }));
    shell.borrow_mut().apply();
    let _ = started.send(Ok(()));

    for receiver in own_outputs {
        let shell = shell.clone();
        glommio::spawn_local(async move {
            let receiver = receiver.connect().await;
            while let Some(batch) = receiver.recv().await {
                let delay = shell.borrow().delay;
                if let Some(delay) = delay {
                    glommio::timer::sleep(delay).await;
                }
                shell.borrow_mut().own_outputs(batch);
            }
        })
        .detach();
    }
    {
        let shell = shell.clone();
        glommio::spawn_local(async move {
            while let Some(event) = events_rx.recv().await {
                let mut sh = shell.borrow_mut();
                match event {
                    LinkEvent::SendingUp(peer) => {
                        sh.clerk.link_up(peer);
                        sh.apply();
                    }
                    LinkEvent::ReceivingDown(peer) => {
                        sh.clerk.link_down(peer);
                        sh.apply();
                    }
                    LinkEvent::Frame(peer, frame) => sh.frame(peer, frame),
                }
            }
        })
        .detach();
    }
    let mut since_heartbeat = Duration::ZERO;
    let mut since_status = STATUS_INTERVAL;
    loop {
        glommio::timer::sleep(TICK).await;
        let mut sh = shell.borrow_mut();
        sh.take_injected_faults();
        sh.tick(durable_end.as_ref());
        since_heartbeat += TICK;
        since_status += TICK;
        if since_heartbeat >= HEARTBEAT_INTERVAL {
            since_heartbeat = Duration::ZERO;
            sh.heartbeat();
        }
        let _ = sh.persist_quarantine();
        sh.flush_faults();
        if since_status >= STATUS_INTERVAL || shared.status_wanted.swap(false, Ordering::AcqRel) {
            since_status = Duration::ZERO;
            sh.take_readmits();
            let status = sh.status();
            *shared.status.lock().expect("not poisoned") = status;
            shared.status_seq.fetch_add(1, Ordering::AcqRel);
        }
    }
}
