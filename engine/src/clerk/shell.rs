//! The Clerk's driver: it feeds the sans-IO Clerk its inputs (own outputs, frames and
//! link events, durable and published watermarks, the time) and carries out its actions
//! (frames to peers, certified outputs to the sink and the view, fault reports). It
//! decides nothing about the protocol: the Clerk says when a heartbeat is due, what the
//! hand-over buffer holds, where a new publisher resumes and which peers `--stop-at-end`
//! waits for. What stays here is IO: quarantine persistence (certified outputs wait for
//! it), `faults.jsonl`, readmit requests, fault injection and the status snapshot.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Context;
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::channels::shared_channel::SharedReceiver;
use tracing::{info, warn};
use tribunal_federation::clerk::{
    Action, Clerk, ClerkStatus, InstanceId, Outgoing, PeerView, QuarantineState, TakeOver,
};
use tribunal_federation::wire::Frame;
use tribunal_shards::prng::SplitMix64;

use super::faults::FaultLog;
use super::peer_links::{LinkCounters, LinkEvent, PeerLinks};
use super::status::{clerk_state, FederationStatus, InjectedFaultsStatus, LinksStatus, PartitionStatus, PeerStatus};
use super::Fault;
use super::{ClerkSetup, ClerkShared, FaultControl};
use crate::publish::{CertifiedSink, DurableOutput, PublishBatch};
use crate::storage::quarantine::{self, ReadmitRequest};

/// Injected faults listed in status.
const MAX_INJECTED_LISTED: usize = 4_096;
/// The longest the tick sleeps, even when the Clerk wants no timeout sooner: durable
/// watermarks, the own publisher's published ends, the ready gate, injected faults and
/// quarantine persistence are polled.
const TICK_MS: u64 = 10;
/// The tick while nothing came in for `BUSY_FOR_MS`: heartbeats are due every 250 ms anyway.
const IDLE_TICK_MS: u64 = 250;
const BUSY_FOR_MS: u64 = 200;
const STATUS_INTERVAL_MS: u64 = 100;
/// Link events waiting for the shell.
const LINK_EVENTS: usize = 4_096;

pub(super) struct Shell {
    clerk: Clerk,
    links: Option<PeerLinks>,
    shared: Arc<ClerkShared>,
    sink: Option<mpsc::Sender<PublishBatch>>,
    sink_published: Arc<dyn Fn(u32) -> u64 + Send + Sync>,
    faults: FaultLog,
    injected: Injected,
    data_dir: PathBuf,
    /// The Clerk's quarantine version last written to `quarantine.json`.
    persisted_quarantine: u64,
    /// Certified outputs held back while a quarantine could not be persisted.
    unforwarded: Vec<DurableOutput>,
    view: Option<Arc<dyn CertifiedSink>>,
    /// Certified outputs held back from the view while a quarantine could not be persisted.
    unviewed: Vec<(u32, u64, Arc<[u8]>)>,
    fault_control: Option<Arc<FaultControl>>,
    /// The Clerk's time counts from here.
    started: Instant,
    /// When the last status snapshot was taken (Clerk time).
    status_taken_ms: Option<u64>,
    /// Until when the tick keeps the busy pace (Clerk time): outputs or copies came in.
    busy_until_ms: u64,
}

/// Faults injected into own outputs (`--fault`, the admin API).
struct Injected {
    /// Flips are not evaluation, so a seed from the OS is fine here.
    rng: SplitMix64,
    bitflip_rate: Option<f64>,
    delay: Option<Duration>,
    count: u64,
    listed: Vec<(u32, u64)>,
}

impl Injected {
    fn from_flags(faults: &[Fault]) -> anyhow::Result<Injected> {
        let mut bitflip_rate = None;
        let mut delay = None;
        for fault in faults {
            match *fault {
                Fault::BitFlip { rate } => bitflip_rate = Some(rate),
                Fault::Delay { delay_ms } => delay = Some(Duration::from_millis(delay_ms)),
            }
            warn!(?fault, "FAULT INJECTION IS ON for this instance");
        }
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("seeding fault injection: {e}"))?;
        let rng = SplitMix64(u64::from_le_bytes(seed));
        Ok(Injected { rng, bitflip_rate, delay, count: 0, listed: Vec::new() })
    }

    /// Flips one bit of `bytes` with the configured rate; the bit flipped, if any.
    fn maybe_flip(&mut self, partition: u32, offset: u64, bytes: &mut [u8]) -> Option<usize> {
        let rate = self.bitflip_rate?;
        let flip = !bytes.is_empty() && self.rng.next_unit() < rate;
        if !flip {
            return None;
        }
        let bits = bytes.len() * 8;
        let bit = (self.rng.next_unit() * bits as f64) as usize % bits;
        bytes[bit / 8] ^= 1 << (bit % 8);
        self.count += 1;
        if self.listed.len() < MAX_INJECTED_LISTED {
            self.listed.push((partition, offset));
        }
        Some(bit)
    }

    fn status(&self) -> Option<InjectedFaultsStatus> {
        (self.bitflip_rate.is_some() || self.delay.is_some()).then(|| InjectedFaultsStatus {
            bitflip_rate: self.bitflip_rate,
            bitflips: self.count,
            delay_ms: self.delay.map(|d| d.as_millis() as u64),
            flipped: self.listed.clone(),
        })
    }
}

/// The Clerk as recovered: its quarantines, retained digests, own outputs at or past
/// the certified end, and the certified outputs not known published.
fn recovered_clerk(setup: &mut ClerkSetup) -> anyhow::Result<(Clerk, u64)> {
    let mut clerk = Clerk::new(setup.config.clone(), &setup.resume);
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
    for output in std::mem::take(&mut setup.recovered_outputs) {
        clerk.own_output(output.partition, output.offset, Arc::from(output.bytes));
    }
    for output in std::mem::take(&mut setup.unpublished) {
        clerk.seed_unpublished(output.partition, output.offset, Arc::from(output.bytes));
    }
    Ok((clerk, persisted_quarantine))
}

impl Shell {
    fn start(mut setup: ClerkSetup, shared: Arc<ClerkShared>, events: LocalSender<LinkEvent>) -> anyhow::Result<Shell> {
        let links = match setup.links.take() {
            Some(config) => {
                let listen = config.listen;
                Some(PeerLinks::start(config, events).with_context(|| format!("listening for peers on {listen}"))?)
            }
            None => None,
        };
        let injected = Injected::from_flags(&setup.faults)?;
        let (clerk, persisted_quarantine) = recovered_clerk(&mut setup)?;
        Ok(Shell {
            clerk,
            links,
            shared,
            sink: setup.sink,
            sink_published: setup.sink_published,
            faults: FaultLog::new(setup.data_dir.join("faults.jsonl")),
            injected,
            data_dir: setup.data_dir,
            persisted_quarantine,
            unforwarded: Vec::new(),
            view: setup.view,
            unviewed: Vec::new(),
            fault_control: setup.fault_control,
            started: Instant::now(),
            status_taken_ms: None,
            busy_until_ms: 0,
        })
    }

    /// The Clerk's time: ms since the shell started, from a monotonic clock.
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Until the next tick: when the Clerk wants its timeout, at most `TICK_MS` while
    /// outputs or frames came in lately, at most `IDLE_TICK_MS` when idle (an idle
    /// instance does not wake a hundred times a second for nothing).
    fn wait(&self) -> Duration {
        let now_ms = self.now_ms();
        // Recovering: the gate opens at the next tick, so it is not put off.
        let busy = now_ms < self.busy_until_ms || self.clerk.status() == ClerkStatus::Recovering;
        let tick_ms = if busy { TICK_MS } else { IDLE_TICK_MS };
        let wait_ms = self.clerk.poll_timeout().map_or(tick_ms, |due_ms| due_ms.saturating_sub(now_ms).min(tick_ms));
        Duration::from_millis(wait_ms)
    }

    /// Outputs or frames came in: tick at the busy pace for a while.
    fn mark_busy(&mut self) {
        self.busy_until_ms = self.now_ms() + BUSY_FOR_MS;
    }

    /// Carries out what the Clerk asked for.
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
                        self.unviewed.push((partition, offset, output));
                    }
                }
                Action::Fault(report) => self.faults.record(&report),
                Action::Publisher(true) => {} // PublishFrom follows
                Action::Publisher(false) => warn!("this instance hands over the publisher role"),
                Action::PublishFrom(take_over) => self.take_over(take_over),
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

    /// spec: Clerk.PublisherHandOver — the Clerk decided where to resume and what to
    /// publish again; the sink gets it.
    fn take_over(&mut self, take_over: TakeOver) {
        for &(partition, from, to) in &take_over.skipped {
            warn!(partition, from, to, "outputs trimmed while no publisher existed are skipped");
        }
        let outputs: Vec<DurableOutput> = take_over
            .outputs
            .into_iter()
            .map(|(partition, offset, output)| DurableOutput { partition, offset, bytes: output.to_vec() })
            .collect();
        info!(resume = ?take_over.skip_to, republish = outputs.len(), "this instance is the publisher");
        self.send_to_sink(PublishBatch { skip_to: take_over.skip_to, outputs });
    }

    /// spec: Gateway.FaultInjectionReplaced
    fn take_injected_faults(&mut self) {
        let Some(control) = &self.fault_control else { return };
        let Some(faults) = control.pending.lock().expect("not poisoned").take() else { return };
        self.injected.bitflip_rate = faults.bitflip_rate;
        self.injected.delay = faults.delay_ms.map(Duration::from_millis);
        warn!(bitflip_rate = ?self.injected.bitflip_rate, delay = ?self.injected.delay, "injected faults replaced");
    }

    fn own_outputs(&mut self, batch: Vec<DurableOutput>) {
        for output in batch {
            let mut bytes = output.bytes;
            if let Some(bit) = self.injected.maybe_flip(output.partition, output.offset, &mut bytes) {
                warn!(
                    partition = output.partition,
                    offset = output.offset,
                    bit,
                    "INJECTED FAULT: flipped a bit in an output"
                );
            }
            self.clerk.own_output(output.partition, output.offset, Arc::from(bytes));
        }
        self.mark_busy();
        self.apply();
    }

    fn frame(&mut self, peer: InstanceId, frame: Frame) {
        match frame {
            Frame::Copy { partition, offset, output } => {
                self.mark_busy();
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

    fn link_event(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::SendingUp(peer) => {
                self.clerk.link_up(peer);
                self.apply();
            }
            LinkEvent::ReceivingDown(peer) => {
                self.clerk.link_down(peer);
                self.apply();
            }
            LinkEvent::Frame(peer, frame) => self.frame(peer, frame),
        }
    }

    /// Feeds the Clerk what is polled (the ready gate, durable and published ends) and
    /// the time, carries out what it decided, and shows its decisions to the Ushers and
    /// the main thread.
    fn tick(&mut self, durable_end: &dyn Fn(u32) -> u64) {
        let now_ms = self.now_ms();
        for partition in 0..self.shared.partitions {
            self.clerk.own_published(partition, (self.sink_published)(partition));
        }
        if self.clerk.status() == ClerkStatus::Recovering && self.shared.open_gate.load(Ordering::Acquire) {
            self.clerk.open_gate();
            self.shared.ready.store(true, Ordering::Release);
            info!("the Clerk is ready: advertising watermarks and sending copies");
        }
        for partition in 0..self.shared.partitions {
            self.clerk.own_durable(partition, durable_end(partition));
        }
        self.clerk.handle_timeout(now_ms);
        self.apply();
        for partition in 0..self.shared.partitions {
            let p = partition as usize;
            self.shared.published_known[p].store(self.clerk.known_published(partition), Ordering::Release);
            // spec: Clerk.StopAtEnd — every trusted peer, unless it has been gone a while.
            self.shared.peers_certified_end[p].store(self.clerk.peers_certified_end(partition), Ordering::Release);
        }
        self.shared.publisher_exists.store(self.clerk.publisher_exists(), Ordering::Release);
        self.shared.backlog_full.store(self.clerk.backlog_full(), Ordering::Release);
        self.shared.quarantined.store(self.clerk.self_quarantined(), Ordering::Release);
    }

    /// Every `STATUS_INTERVAL_MS`, or when the main thread asks: operator readmit
    /// requests, then a status snapshot.
    fn maybe_status(&mut self) {
        let now_ms = self.now_ms();
        let due = self.status_taken_ms.is_none_or(|taken_ms| now_ms - taken_ms >= STATUS_INTERVAL_MS);
        if !due && !self.shared.status_wanted.swap(false, Ordering::AcqRel) {
            return;
        }
        self.status_taken_ms = Some(now_ms);
        self.take_readmits();
        let status = self.status();
        *self.shared.status.lock().expect("not poisoned") = Some(status);
        self.shared.status_seq.fetch_add(1, Ordering::AcqRel);
    }

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

    fn status(&self) -> FederationStatus {
        let clerk = &self.clerk;
        let counters = clerk.counters();
        let config = clerk.config();
        FederationStatus {
            certified: counters.certified,
            clerk: clerk_state(clerk.status()),
            copies_outside_window: counters.copies_outside_window,
            copies_received: counters.copies_received,
            copies_sent: counters.copies_sent,
            expected_copies: config.expected_copies,
            faults: self.faults.recent(),
            faults_total: counters.faults,
            incarnation: config.incarnation,
            injected_faults: self.injected.status(),
            instance_id: config.instance_id,
            late_copies_checked: counters.late_copies_checked,
            links: self.links.as_ref().map(|l| links_status(l.counters())),
            partitions: (0..self.shared.partitions).map(|p| self.partition_status(p)).collect(),
            peers: clerk.peers().iter().map(|v| self.peer_status(v)).collect(),
            publisher: clerk.is_publisher(),
            quarantined: clerk.self_quarantined(),
        }
    }

    fn partition_status(&self, partition: u32) -> PartitionStatus {
        PartitionStatus {
            certified_watermark: self.clerk.certified_end(partition).checked_sub(1),
            contested_at: self.clerk.contested_at(partition),
            handover_buffer: self.clerk.handover_len(partition),
            partition,
            published_watermark: self.clerk.known_published(partition).checked_sub(1),
        }
    }

    fn peer_status(&self, view: &PeerView) -> PeerStatus {
        PeerStatus {
            certified_watermarks: view
                .advertised_certified_end
                .iter()
                .map(|e| e.and_then(|e| e.checked_sub(1)))
                .collect(),
            incarnation: view.incarnation,
            instance_id: view.instance_id,
            link_up: view.link_up,
            may_publish: view.may_publish,
            published_ends: view.published_ends.clone(),
            quarantined: view.quarantined,
            quarantined_incarnation: view.quarantined_incarnation,
            queued_copies: self.links.as_ref().map_or(0, |l| l.queued_copies(view.instance_id)),
            ready: view.ready,
            says_quarantined: view.says_quarantined,
        }
    }
}

fn links_status(c: &LinkCounters) -> LinksStatus {
    LinksStatus {
        bytes_sent: c.bytes_sent.get(),
        copies_dropped: c.copies_dropped.get(),
        frames_received: c.frames_received.get(),
        frames_sent: c.frames_sent.get(),
        handshakes_rejected: c.handshakes_rejected.get(),
        invalid_frames: c.invalid_frames.get(),
        last_rejection: c.last_rejection.borrow().clone(),
        writes: c.writes.get(),
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
        Outgoing::Heartbeat { published_ends } => Frame::Heartbeat { published_ends },
    }
}

/// Starts the shell on the current executor: binds the federation listener (an error
/// here is a start-up error), then runs the Clerk's tasks in the background.
pub(super) fn start_shell(
    setup: ClerkSetup,
    own_outputs: Vec<SharedReceiver<Vec<DurableOutput>>>,
    shared: Arc<ClerkShared>,
    durable_end: Arc<dyn Fn(u32) -> u64 + Send + Sync>,
) -> anyhow::Result<()> {
    let (events_tx, events_rx) = local_channel::new_bounded::<LinkEvent>(LINK_EVENTS);
    let shell = Rc::new(RefCell::new(Shell::start(setup, shared, events_tx)?));
    shell.borrow_mut().apply();
    for receiver in own_outputs {
        spawn_own_outputs(shell.clone(), receiver);
    }
    spawn_link_events(shell.clone(), events_rx);
    glommio::spawn_local(async move {
        loop {
            let wait = shell.borrow().wait();
            glommio::timer::sleep(wait).await;
            let mut sh = shell.borrow_mut();
            sh.take_injected_faults();
            sh.tick(durable_end.as_ref());
            let _ = sh.persist_quarantine();
            sh.faults.flush();
            sh.maybe_status();
        }
    })
    .detach();
    Ok(())
}

/// One shard's own outputs, durable, into the Clerk (delayed when that is injected).
fn spawn_own_outputs(shell: Rc<RefCell<Shell>>, receiver: SharedReceiver<Vec<DurableOutput>>) {
    glommio::spawn_local(async move {
        let receiver = receiver.connect().await;
        while let Some(batch) = receiver.recv().await {
            let delay = shell.borrow().injected.delay;
            if let Some(delay) = delay {
                glommio::timer::sleep(delay).await;
            }
            shell.borrow_mut().own_outputs(batch);
        }
    })
    .detach();
}

fn spawn_link_events(shell: Rc<RefCell<Shell>>, events: LocalReceiver<LinkEvent>) {
    glommio::spawn_local(async move {
        while let Some(event) = events.recv().await {
            shell.borrow_mut().link_event(event);
        }
    })
    .detach();
}
