//! The Clerk: certifies an output once `expected_copies` byte-identical copies of it
//! exist, this instance's own included, and detects every disagreement (spec:
//! specs/clerk.allium).
//!
//! Sans-IO: inputs are method calls (own durable outputs, frames from peers, link
//! events, what the own publisher has published), outputs are [`Action`]s the shell
//! drains with [`Clerk::drain_actions`]. Time is an input too, in the manner of
//! quinn-proto: the shell calls [`Clerk::handle_timeout`] with the current time in ms,
//! at the latest when [`Clerk::poll_timeout`] says, and the Clerk decides what is due
//! (heartbeats, the hand-over buffer's pruning, the stop-at-end grace). No clock, no
//! sockets, no randomness: a simulator can drive several Clerks from a seed.
//!
//! Memory is bounded by construction. Each partition holds a ring of `copy_window`
//! slots indexed by `offset & (copy_window - 1)`, covering `[certified_end,
//! certified_end + copy_window)`; the certified watermark advances by popping settled
//! slots off the front, so each offset is pushed and popped once (O(1) amortised, never
//! a scan). Certified digests stay in a second ring of `digest_retention` entries, for
//! late copies and lagging peers. The engine never plans an offset past the ring
//! (spec: Clerk.CopyWindowBackpressure); only outputs recovered from the Ledger at
//! start-up may lie beyond it, and they wait in `overflow` until the window reaches them.
//! Certified outputs not yet known published wait in a hand-over buffer per partition:
//! while someone publishes the Ushers wait once it holds `max_unpublished` (so at most a
//! copy window more arrives); with nobody to publish the oldest past it are trimmed. A
//! new publisher republishes them (spec: Clerk.PublisherHandOver).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use smallvec::SmallVec;
// Copies are compared by their digest, xxh3_128 of the canonical output bytes
// (spec: Arbiter.OutputCanonical), so equal digests stand for byte-identical outputs.
use tribunal_shards::digest::output_digest;

pub type Digest = u128;
pub type InstanceId = u32;

/// Heartbeats carry the published ends this Clerk knows of, to every peer, this often
/// (spec: Federation.HeartbeatSent, heartbeat_interval).
pub const HEARTBEAT_INTERVAL_MS: u64 = 250;
/// A peer unreachable or not ready this long no longer holds `--stop-at-end` back: one
/// only slow (a starved link times out) may still need our copies (spec: Clerk.StopAtEnd,
/// stop_grace).
pub const STOP_GRACE_MS: u64 = 5_000;

#[derive(Clone, Debug)]
pub struct ClerkConfig {
    pub instance_id: InstanceId,
    /// Every other instance of the federation.
    pub peers: Vec<InstanceId>,
    pub partitions: u32,
    pub expected_copies: u32,
    /// Ring size in offsets, a power of two.
    pub copy_window: u64,
    /// Certified digests kept below the watermark, a power of two.
    pub digest_retention: u64,
    /// Whether this instance may take the publisher role (`--publish`).
    pub may_publish: bool,
    /// Made with the data dir: a peer announcing another one was rebuilt
    /// (spec: Clerk.RebuiltPeerReadmitted).
    pub incarnation: u64,
    /// Certified outputs per partition kept for a hand-over beyond what is known
    /// published: at this many the backlog is full and the Ushers wait, while anyone
    /// publishes (spec: Publisher.BoundedBacklog); with nobody to publish, the oldest
    /// past it are trimmed. At least `copy_window`; the buffer never holds more than
    /// twice this (the oldest are trimmed).
    pub max_unpublished: u64,
}

/// The quarantine decisions a restart must not forget (spec: Clerk.QuarantinePersisted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QuarantineState {
    pub self_quarantined: bool,
    /// Each quarantined peer with the incarnation it had then (None: not yet known).
    pub peers: Vec<(InstanceId, Option<u64>)>,
}

impl ClerkConfig {
    pub const DEFAULT_COPY_WINDOW: u64 = 65_536;
    pub const DEFAULT_DIGEST_RETENTION: u64 = 1_048_576;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClerkStatus {
    /// Recovery is not complete: nothing is sent, advertised or certified
    /// (spec: Recovery.NoWatermarkBeforeReady, Recovery.NoCopiesBeforeReady).
    Recovering,
    Ready,
}

/// What the Clerk asks its shell to send to one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outgoing {
    Copy {
        partition: u32,
        offset: u64,
        output: Arc<[u8]>,
    },
    CertifiedCopy {
        partition: u32,
        offset: u64,
        digest: Digest,
    },
    Watermark {
        partition: u32,
        durable_end: u64,
        certified_end: u64,
    },
    Readiness {
        ready: bool,
        quarantined: bool,
        may_publish: bool,
        incarnation: u64,
    },
    /// An operator re-admitted this instance (spec: Clerk.QuarantineLifted).
    Readmit {
        instance: InstanceId,
    },
    /// Per partition, the published end this Clerk knows of (spec: Federation.HeartbeatSent).
    Heartbeat {
        published_ends: Vec<u64>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Send {
        peer: InstanceId,
        message: Outgoing,
    },
    /// In offset order per partition: `offset` is certified, with this instance's bytes.
    Certified {
        partition: u32,
        offset: u64,
        output: Arc<[u8]>,
    },
    Fault(FaultReport),
    /// This instance's publisher role changed (spec: Clerk.PublisherElected). Taking it
    /// is followed by [`Action::PublishFrom`].
    Publisher(bool),
    /// This instance took the publisher role (spec: Clerk.PublisherHandOver): its
    /// publisher resumes each partition at `skip_to` and first publishes `outputs` again,
    /// the hand-over buffer from there, byte-identical and keyed, in offset order per
    /// partition.
    PublishFrom(TakeOver),
}

/// Where a new publisher resumes, and what it republishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TakeOver {
    /// Per partition, in order: (partition, first offset to publish).
    pub skip_to: Vec<(u32, u64)>,
    /// (partition, offset, output): the hand-over buffer from `skip_to` on.
    pub outputs: Vec<(u32, u64, Arc<[u8]>)>,
    /// Partitions where outputs trimmed while nobody could publish are skipped:
    /// (partition, published end known, skip_to). They cannot be republished here.
    pub skipped: Vec<(u32, u64, u64)>,
}

/// One detected fault: the copies of an offset that disagree (spec: Clerk.FaultReported).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultReport {
    pub partition: u32,
    pub offset: u64,
    pub kind: FaultKind,
    /// This instance's digest, or the certified one for a late copy.
    pub own_digest: Option<Digest>,
    /// (instance, digest) of every copy known, this instance's included.
    pub digests: Vec<(InstanceId, Digest)>,
    /// The instances whose copy differs from `own_digest`.
    pub differing: Vec<InstanceId>,
    /// Bytes of this instance's output and of a differing copy, when still held, so the
    /// shell can name the differing fields.
    pub own_output: Option<Arc<[u8]>>,
    pub differing_output: Option<Arc<[u8]>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// A copy differs from ours; not settled yet (spec: Clerk.MismatchDetected).
    Mismatch,
    /// A copy for an offset certified here differs (spec: Clerk.LateCopyChecked).
    LateCopy,
    /// Another digest reached expected_copies without ours (spec: Clerk.OwnCopyInMinority).
    OwnCopyOverruled,
    /// Every eligible instance sent a copy and no digest can be certified
    /// (spec: Clerk.OffsetContested): the watermark stops here.
    Contested,
}

/// Counters for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClerkCounters {
    pub certified: u64,
    pub faults: u64,
    pub copies_received: u64,
    pub copies_outside_window: u64,
    pub copies_before_ready: u64,
    pub copies_sent: u64,
    pub late_copies_checked: u64,
    /// Certified outputs dropped from a hand-over buffer before they were known published.
    pub handover_trimmed: u64,
}

/// This Clerk's view of one peer (spec: Clerk entity Peer).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerView {
    pub instance_id: InstanceId,
    pub link_up: bool,
    pub ready: bool,
    /// The peer says it quarantined itself.
    pub says_quarantined: bool,
    pub may_publish: bool,
    /// Quarantined by this Clerk: its copies are compared, never counted.
    pub quarantined: bool,
    /// From its readiness frames.
    pub incarnation: Option<u64>,
    /// Its incarnation when this Clerk quarantined it.
    pub quarantined_incarnation: Option<u64>,
    /// Per partition, its advertised certified end; None until it advertises after it
    /// became ready (spec: Recovery.NoWatermarkBeforeReady).
    pub advertised_certified_end: Vec<Option<u64>>,
    pub advertised_durable_end: Vec<Option<u64>>,
    /// Per partition, the published end its heartbeats carry.
    pub published_ends: Vec<u64>,
    /// Per partition, its last advertised certified end, kept when its link goes down:
    /// only for `--stop-at-end` (spec: Clerk.StopAtEnd), never for certification.
    pub last_certified_end: Vec<u64>,
}

impl PeerView {
    /// Its copies do not count: quarantined here, or by itself (spec: Clerk.SelfQuarantined).
    pub fn distrusted(&self) -> bool {
        self.quarantined || self.says_quarantined
    }

    /// Reachable, ready, and trusted: may publish and counts for liveness.
    pub fn eligible(&self) -> bool {
        self.link_up && self.ready && !self.says_quarantined && !self.quarantined
    }
}

#[derive(Clone, Debug)]
struct PeerCopy {
    instance: InstanceId,
    digest: Digest,
    /// A catch-up copy: the sender certified this digest.
    certified: bool,
    /// The sender was not quarantined here when the copy arrived.
    trusted: bool,
    /// Compared with the own digest already (a mismatch is reported once).
    compared: bool,
    /// Kept only while it may be needed for a fault report.
    output: Option<Arc<[u8]>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotStatus {
    Empty,
    Pending,
    Contested,
}

#[derive(Clone, Debug)]
struct Slot {
    status: SlotStatus,
    offset: u64,
    own: Option<(Digest, Arc<[u8]>)>,
    copies: SmallVec<[PeerCopy; 2]>,
}

impl Slot {
    fn empty() -> Slot {
        Slot { status: SlotStatus::Empty, offset: 0, own: None, copies: SmallVec::new() }
    }

    /// Makes an empty slot pending for `offset`; a taken slot must already hold it.
    fn claim(&mut self, offset: u64) {
        if self.status == SlotStatus::Empty {
            *self = Slot { status: SlotStatus::Pending, offset, own: None, copies: SmallVec::new() };
        }
        assert_eq!(self.offset, offset, "a ring slot holds one offset");
    }

    /// A fault about this slot, whose own copy is present: every known digest, ours first.
    fn fault(
        &self,
        partition: u32,
        instance_id: InstanceId,
        kind: FaultKind,
        differing: Vec<InstanceId>,
        differing_output: Option<Arc<[u8]>>,
    ) -> FaultReport {
        let (own, own_output) = self.own.clone().expect("a fault about a slot with an own copy");
        FaultReport {
            partition,
            offset: self.offset,
            kind,
            own_digest: Some(own),
            digests: std::iter::once((instance_id, own))
                .chain(self.copies.iter().map(|c| (c.instance, c.digest)))
                .collect(),
            differing,
            own_output: Some(own_output),
            differing_output,
        }
    }
}

/// How a pending slot stands after a change.
enum Verdict {
    Wait,
    Certify,
    Overruled(Digest),
    Contested,
}

struct PartitionClerk {
    ring: Vec<Slot>,
    /// Every offset below it is settled (certified or overruled) here.
    certified_end: u64,
    durable_end: u64,
    /// Certified digests for `[retained_from, certified_end)`, indexed by offset & mask.
    retained: Vec<Digest>,
    retained_from: u64,
    /// Own outputs recovered from the Ledger beyond the ring, in order.
    overflow: BTreeMap<u64, (Digest, Arc<[u8]>)>,
    /// A watermark advert is owed to the peers.
    advert_due: bool,
    /// The hand-over buffer: certified outputs not known published, in offset order.
    handover: VecDeque<(u64, Arc<[u8]>)>,
    /// One past the last output trimmed from `handover` before it was known published.
    trimmed_end: u64,
    /// What this instance's own publisher has published (an input).
    own_published_end: u64,
}

pub struct Clerk {
    config: ClerkConfig,
    status: ClerkStatus,
    self_quarantined: bool,
    publisher: bool,
    peers: Vec<PeerView>,
    partitions: Vec<PartitionClerk>,
    actions: Vec<Action>,
    counters: ClerkCounters,
    /// Bumped on every quarantine change, so the shell knows when to persist.
    quarantine_version: u64,
    /// The time of the last `handle_timeout`; None before the first.
    now_ms: Option<u64>,
    /// When the next heartbeat is due; None before the first `handle_timeout`.
    heartbeat_due_ms: Option<u64>,
    /// Per peer (in config order), since when it has been unreachable or not ready, as
    /// seen by `handle_timeout` (spec: Clerk.StopAtEnd).
    peer_down_since_ms: Vec<Option<u64>>,
    /// Some hand-over buffer holds `max_unpublished` while anyone publishes: the Ushers
    /// wait (decided by `handle_timeout`).
    backlog_full: bool,
}

impl Clerk {
    /// A recovering Clerk. `resume` holds, per partition, (certified end, durable end) as
    /// recovered: the certified end from the checkpoint, capped by the durable end.
    pub fn new(config: ClerkConfig, resume: &[(u64, u64)]) -> Clerk {
        assert!(config.copy_window.is_power_of_two(), "copy_window {} is a power of two", config.copy_window);
        assert!(config.digest_retention.is_power_of_two(), "digest_retention is a power of two");
        assert!(config.expected_copies >= 1, "at least the own copy");
        assert!(
            config.expected_copies as usize <= config.peers.len() + 1,
            "expected_copies {} exceeds the {} instances",
            config.expected_copies,
            config.peers.len() + 1
        );
        assert!(!config.peers.contains(&config.instance_id), "an instance is not its own peer");
        assert!(
            config.max_unpublished >= config.copy_window,
            "max_unpublished {} holds at least the copy window {}",
            config.max_unpublished,
            config.copy_window
        );
        assert_eq!(resume.len(), config.partitions as usize, "one resume point per partition");
        let partitions = resume
            .iter()
            .map(|&(certified_end, durable_end)| {
                assert!(certified_end <= durable_end, "nothing certified that is not durable");
                PartitionClerk {
                    ring: vec![Slot::empty(); config.copy_window as usize],
                    certified_end,
                    durable_end,
                    retained: vec![0; config.digest_retention as usize],
                    retained_from: certified_end,
                    overflow: BTreeMap::new(),
                    advert_due: false,
                    handover: VecDeque::new(),
                    trimmed_end: 0,
                    own_published_end: 0,
                }
            })
            .collect();
        let n = config.partitions as usize;
        let peers = config
            .peers
            .iter()
            .map(|&instance_id| PeerView {
                instance_id,
                advertised_certified_end: vec![None; n],
                advertised_durable_end: vec![None; n],
                published_ends: vec![0; n],
                last_certified_end: vec![0; n],
                ..PeerView::default()
            })
            .collect();
        let peer_count = config.peers.len();
        Clerk {
            config,
            status: ClerkStatus::Recovering,
            self_quarantined: false,
            publisher: false,
            peers,
            partitions,
            actions: Vec::new(),
            counters: ClerkCounters::default(),
            quarantine_version: 0,
            now_ms: None,
            heartbeat_due_ms: None,
            peer_down_since_ms: vec![None; peer_count],
            backlog_full: false,
        }
    }

    /// Quarantines persisted before a restart (spec: Clerk.QuarantinePersisted). Peers
    /// not in the federation any more are ignored.
    pub fn restore_quarantine(&mut self, state: &QuarantineState) {
        self.self_quarantined = state.self_quarantined;
        for &(peer, incarnation) in &state.peers {
            if let Some(view) = self.peer_mut(peer) {
                view.quarantined = true;
                view.quarantined_incarnation = incarnation;
            }
        }
    }

    /// Digests of own outputs below the recovered certified end, from the Ledger: they
    /// were certified, so a peer that restarted further behind (its checkpoint is up to
    /// a second older) can still catch up against them (spec: Clerk.CertifiedDigestsResent).
    /// `digests` in offset order; only the gap-free run ending right below the certified
    /// end, within the retention, is kept.
    pub fn seed_retained(&mut self, partition: u32, digests: &[(u64, Digest)]) {
        let mask = self.config.digest_retention - 1;
        let retention = self.config.digest_retention;
        let p = &mut self.partitions[partition as usize];
        assert_eq!(p.retained_from, p.certified_end, "seeded once, before anything is certified");
        let lowest = p.certified_end.saturating_sub(retention);
        for &(offset, digest) in digests.iter().rev() {
            if offset + 1 != p.retained_from || offset < lowest {
                continue; // above the end (ignored), or a gap: what is below it cannot be served
            }
            p.retained[(offset & mask) as usize] = digest;
            p.retained_from = offset;
        }
    }

    /// A certified output from the Ledger that may not be published yet, at start-up, in
    /// offset order per partition: it waits in the hand-over buffer like one certified
    /// here (spec: Clerk.PublisherHandOver). One not above the last held is ignored. None
    /// is trimmed here: whether anyone publishes is not known before the peers speak, and
    /// the first `handle_timeout` decides (what the Ledger holds bounds them).
    pub fn seed_unpublished(&mut self, partition: u32, offset: u64, output: Arc<[u8]>) {
        let p = &mut self.partitions[partition as usize];
        assert!(offset < p.certified_end, "an unpublished output from the Ledger is certified");
        if p.handover.back().is_some_and(|(last, _)| *last >= offset) {
            return;
        }
        p.handover.push_back((offset, output));
    }

    pub fn quarantine_state(&self) -> QuarantineState {
        QuarantineState {
            self_quarantined: self.self_quarantined,
            peers: self
                .peers
                .iter()
                .filter(|v| v.quarantined)
                .map(|v| (v.instance_id, v.quarantined_incarnation))
                .collect(),
        }
    }

    pub fn quarantine_version(&self) -> u64 {
        self.quarantine_version
    }

    // ---- queries ----

    pub fn status(&self) -> ClerkStatus {
        self.status
    }
    pub fn self_quarantined(&self) -> bool {
        self.self_quarantined
    }
    pub fn is_publisher(&self) -> bool {
        self.publisher
    }
    pub fn certified_end(&self, partition: u32) -> u64 {
        self.partitions[partition as usize].certified_end
    }
    pub fn durable_end(&self, partition: u32) -> u64 {
        self.partitions[partition as usize].durable_end
    }
    pub fn peers(&self) -> &[PeerView] {
        &self.peers
    }
    pub fn counters(&self) -> &ClerkCounters {
        &self.counters
    }
    pub fn config(&self) -> &ClerkConfig {
        &self.config
    }
    /// The offset at which `partition` waits for an operator, if a slot is contested.
    pub fn contested_at(&self, partition: u32) -> Option<u64> {
        let p = &self.partitions[partition as usize];
        let slot = &p.ring[self.index(p.certified_end)];
        (slot.status == SlotStatus::Contested && slot.offset == p.certified_end).then_some(p.certified_end)
    }
    /// The highest published end this instance knows of, its own publishing included.
    pub fn peers_published_end(&self, partition: u32) -> u64 {
        self.peers.iter().map(|p| p.published_ends[partition as usize]).max().unwrap_or(0)
    }
    pub fn drain_actions(&mut self) -> std::vec::Drain<'_, Action> {
        self.actions.drain(..)
    }
    /// What is known published of `partition`: by the own publisher, or heard in
    /// heartbeats (spec: Clerk.PublisherHandOver).
    pub fn known_published(&self, partition: u32) -> u64 {
        self.partitions[partition as usize].own_published_end.max(self.peers_published_end(partition))
    }
    /// This instance or an eligible peer may publish.
    pub fn publisher_exists(&self) -> bool {
        self.publisher || self.peers.iter().any(|v| v.eligible() && v.may_publish)
    }
    /// The hand-over buffer is full while someone publishes: the Ushers wait (spec:
    /// Publisher.BoundedBacklog). As of the last `handle_timeout`.
    pub fn backlog_full(&self) -> bool {
        self.backlog_full
    }
    /// Certified outputs of `partition` held for a hand-over.
    pub fn handover_len(&self, partition: u32) -> usize {
        self.partitions[partition as usize].handover.len()
    }
    /// One past the last output of `partition` trimmed before it was known published.
    pub fn trimmed_end(&self, partition: u32) -> u64 {
        self.partitions[partition as usize].trimmed_end
    }
    /// spec: Clerk.StopAtEnd — the lowest certified end of `partition` over the trusted
    /// peers not gone for `STOP_GRACE_MS` (as of the last `handle_timeout`), each its
    /// advert or, once its link is down, its last one; u64::MAX: no such peer.
    pub fn peers_certified_end(&self, partition: u32) -> u64 {
        let p = partition as usize;
        self.peers
            .iter()
            .zip(&self.peer_down_since_ms)
            .filter(|(view, down_since)| !view.distrusted() && !self.gone_for_grace(**down_since))
            .map(|(view, _)| view.advertised_certified_end[p].unwrap_or(view.last_certified_end[p]))
            .min()
            .unwrap_or(u64::MAX)
    }
    /// The next time, in ms, at which the Clerk wants `handle_timeout`: a heartbeat, or a
    /// peer's stop-at-end grace running out. None before the first `handle_timeout`.
    pub fn poll_timeout(&self) -> Option<u64> {
        let now_ms = self.now_ms?;
        let grace_ends = self
            .peer_down_since_ms
            .iter()
            .flatten()
            .map(|since| since + STOP_GRACE_MS)
            .filter(|end_ms| *end_ms > now_ms);
        grace_ends.chain(self.heartbeat_due_ms).min()
    }

    // ---- inputs ----

    /// Recovery is complete (spec: Clerk.ReadyGateOpens, Recovery.RecoveryCompletes).
    pub fn open_gate(&mut self) {
        assert_eq!(self.status, ClerkStatus::Recovering, "the gate opens once");
        self.status = ClerkStatus::Ready;
        for partition in 0..self.config.partitions {
            // Own outputs recovered before the gate may already have their copies.
            self.settle_front(partition);
        }
        let peers: Vec<InstanceId> = self.config.peers.clone();
        let window = self.config.copy_window;
        for peer in peers {
            self.greet(peer);
            // Peers that advertised while we recovered get what their windows hold.
            for partition in 0..self.config.partitions {
                let view = self.peers.iter().find(|p| p.instance_id == peer).expect("a configured peer");
                if let Some(end) = view.advertised_certified_end[partition as usize] {
                    self.send_range(peer, partition, end, end + window);
                }
            }
        }
        self.role_check();
    }

    /// An own output, durable on its shard (spec: Clerk.OwnCopyRecorded, Clerk.OwnDigestPlaced).
    pub fn own_output(&mut self, partition: u32, offset: u64, output: Arc<[u8]>) {
        let digest = output_digest(&output);
        let window = self.config.copy_window;
        let p = &mut self.partitions[partition as usize];
        if offset < p.certified_end {
            return; // settled before a restart; the Ledger handed it over again
        }
        if offset >= p.certified_end + window {
            p.overflow.insert(offset, (digest, output));
            return;
        }
        self.place_own(partition, offset, digest, output);
        self.after_change(partition, offset);
    }

    /// The instance durable watermark of `partition` advanced (advertised to peers).
    pub fn own_durable(&mut self, partition: u32, durable_end: u64) {
        let p = &mut self.partitions[partition as usize];
        if durable_end > p.durable_end {
            p.durable_end = durable_end;
            p.advert_due = true;
            self.flush_adverts();
        }
    }

    /// What this instance's own publisher has published of `partition` (end): the
    /// hand-over buffer is pruned to it (spec: Clerk.PublisherHandOver).
    pub fn own_published(&mut self, partition: u32, published_end: u64) {
        self.partitions[partition as usize].own_published_end = published_end;
    }

    /// Time is an input: `now_ms` from any monotonic clock, never going back. Call it
    /// at the latest at [`Clerk::poll_timeout`]; calling it sooner is harmless. The first
    /// call starts the heartbeat schedule. Tracks which peers are down (Clerk.StopAtEnd),
    /// prunes the hand-over buffers to what is known published and decides the backlog
    /// (Publisher.BoundedBacklog), and sends the heartbeats that are due
    /// (Federation.HeartbeatSent).
    pub fn handle_timeout(&mut self, now_ms: u64) {
        if let Some(before_ms) = self.now_ms {
            assert!(now_ms >= before_ms, "time goes forward: {now_ms} ms after {before_ms} ms");
        }
        self.now_ms = Some(now_ms);
        for (view, down_since) in self.peers.iter().zip(self.peer_down_since_ms.iter_mut()) {
            if view.link_up && view.ready {
                *down_since = None;
            } else {
                down_since.get_or_insert(now_ms);
            }
        }
        self.prune_handover();
        match self.heartbeat_due_ms {
            Some(due_ms) if now_ms < due_ms => {}
            Some(_) => {
                self.send_heartbeats();
                self.heartbeat_due_ms = Some(now_ms + HEARTBEAT_INTERVAL_MS);
            }
            None => self.heartbeat_due_ms = Some(now_ms + HEARTBEAT_INTERVAL_MS),
        }
    }

    /// A live copy from a peer: its output bytes (spec: Clerk.PeerCopyRecorded).
    pub fn peer_copy(&mut self, peer: InstanceId, partition: u32, offset: u64, output: Arc<[u8]>) {
        let digest = output_digest(&output);
        self.record_copy(peer, partition, offset, digest, false, Some(output));
    }

    /// A catch-up copy: the digest the peer certified (spec: Clerk.LaggingPeerCatchesUp).
    pub fn peer_certified_copy(&mut self, peer: InstanceId, partition: u32, offset: u64, digest: Digest) {
        self.record_copy(peer, partition, offset, digest, true, None);
    }

    /// spec: Clerk.WatermarkReceived, Clerk.CertifiedDigestsResent
    pub fn peer_watermark(&mut self, peer: InstanceId, partition: u32, durable_end: u64, certified_end: u64) {
        if partition >= self.config.partitions {
            return;
        }
        let Some(view) = self.peer_mut(peer) else { return };
        let previous = view.advertised_certified_end[partition as usize];
        view.advertised_certified_end[partition as usize] = Some(certified_end);
        view.advertised_durable_end[partition as usize] = Some(durable_end);
        view.last_certified_end[partition as usize] = certified_end;
        if self.status != ClerkStatus::Ready {
            return;
        }
        let window = self.config.copy_window;
        // Offsets the peer's ring could not hold before and can now.
        let from = match previous {
            Some(previous) => (previous + window).max(certified_end),
            None => certified_end,
        };
        self.send_range(peer, partition, from, certified_end + window);
    }

    /// spec: Clerk.ReadinessReceived, Clerk.RebuiltPeerReadmitted
    pub fn peer_readiness(
        &mut self,
        peer: InstanceId,
        ready: bool,
        quarantined: bool,
        may_publish: bool,
        incarnation: u64,
    ) {
        let Some(view) = self.peer_mut(peer) else { return };
        let lifted_itself = view.says_quarantined && !quarantined;
        view.ready = ready;
        view.says_quarantined = quarantined;
        view.may_publish = may_publish;
        view.link_up = true;
        view.incarnation = Some(incarnation);
        let rebuilt = view.quarantined && view.quarantined_incarnation.is_some_and(|q| q != incarnation);
        if !ready {
            // A recovering peer's old watermark means nothing (spec: Recovery.NoWatermarkBeforeReady),
            // and it may come back with less certified than it said before (Clerk.StopAtEnd).
            view.advertised_certified_end.iter_mut().for_each(|e| *e = None);
            view.last_certified_end.iter_mut().for_each(|e| *e = 0);
        }
        if rebuilt {
            view.quarantined = false;
            view.quarantined_incarnation = None;
            self.quarantine_version += 1;
            // What its old incarnation sent is not evidence about the new one; its
            // fresh copies replace it.
            self.forget_copies(peer);
        } else if lifted_itself && !view.quarantined {
            // An operator re-admitted it: its waiting copies count now.
            self.trust_again(peer);
        }
        self.role_check();
    }

    /// spec: Clerk.PublisherHandOver (the heartbeat's published watermark)
    pub fn peer_heartbeat(&mut self, peer: InstanceId, published_ends: &[u64]) {
        let certified: Vec<u64> = self.partitions.iter().map(|p| p.certified_end).collect();
        let Some(view) = self.peer_mut(peer) else { return };
        view.link_up = true;
        // A quarantined peer's word cannot prune what a hand-over needs, and nobody can
        // have published what is not certified here yet.
        if view.quarantined || view.says_quarantined {
            return;
        }
        for ((mine, theirs), certified) in view.published_ends.iter_mut().zip(published_ends).zip(certified) {
            *mine = (*mine).max((*theirs).min(certified));
        }
    }

    /// A link to `peer` came up: it is told our readiness and, if ready, our watermarks.
    pub fn link_up(&mut self, peer: InstanceId) {
        let Some(view) = self.peer_mut(peer) else { return };
        view.link_up = true;
        let advertised = view.advertised_certified_end.clone();
        self.greet(peer);
        // What was in flight on a broken link is lost: send the peer's window again
        // (it ignores copies it has).
        if self.status == ClerkStatus::Ready {
            let window = self.config.copy_window;
            for (partition, end) in advertised.into_iter().enumerate() {
                if let Some(end) = end {
                    self.send_range(peer, partition as u32, end, end + window);
                }
            }
        }
    }

    /// The peer is silent or its link failed (spec: Clerk.PublisherHandOver).
    pub fn link_down(&mut self, peer: InstanceId) {
        let Some(view) = self.peer_mut(peer) else { return };
        view.link_up = false;
        view.ready = false;
        view.advertised_certified_end.iter_mut().for_each(|e| *e = None);
        view.advertised_durable_end.iter_mut().for_each(|e| *e = None);
        self.role_check();
    }

    /// An operator lifts a quarantine here, of a peer or of this instance, and tells
    /// every peer (spec: Clerk.QuarantineLifted). False: `instance` is not a member.
    pub fn operator_readmit(&mut self, instance: InstanceId) -> bool {
        if instance != self.config.instance_id && !self.config.peers.contains(&instance) {
            return false;
        }
        self.readmit(instance);
        for peer in self.config.peers.clone() {
            self.actions.push(Action::Send { peer, message: Outgoing::Readmit { instance } });
        }
        true
    }

    /// A peer relays an operator's readmit: applied, never forwarded (spec: Clerk.ReadmitReceived).
    pub fn readmit(&mut self, instance: InstanceId) {
        if instance == self.config.instance_id {
            if self.self_quarantined {
                self.self_quarantined = false;
                self.quarantine_version += 1;
                for peer in self.config.peers.clone() {
                    self.send_readiness(peer);
                }
            }
        } else if let Some(view) = self.peer_mut(instance) {
            if view.quarantined {
                view.quarantined = false;
                view.quarantined_incarnation = None;
                self.quarantine_version += 1;
                self.trust_again(instance);
            }
        }
        self.role_check();
    }

    /// A lifted quarantine: the peer's copies waiting in the ring count from now on, or
    /// offsets they arrived for could wait forever (a resend of a copy we hold is
    /// ignored). O(copy_window) per partition, once per operator decision.
    fn trust_again(&mut self, peer: InstanceId) {
        self.rework_copies(peer, false);
    }

    /// A rebuilt peer: its pending copies are dropped, so its next copies are recorded.
    fn forget_copies(&mut self, peer: InstanceId) {
        self.rework_copies(peer, true);
    }

    fn rework_copies(&mut self, peer: InstanceId, forget: bool) {
        for partition in 0..self.config.partitions {
            for slot in self.partitions[partition as usize].ring.iter_mut() {
                if slot.status != SlotStatus::Pending {
                    continue;
                }
                if forget {
                    slot.copies.retain(|c| c.instance != peer);
                } else {
                    slot.copies.iter_mut().filter(|c| c.instance == peer).for_each(|c| c.trusted = true);
                }
            }
            if self.status == ClerkStatus::Ready {
                self.settle_front(partition);
            }
        }
    }

    // ---- internals ----

    fn index(&self, offset: u64) -> usize {
        (offset & (self.config.copy_window - 1)) as usize
    }

    fn peer_mut(&mut self, peer: InstanceId) -> Option<&mut PeerView> {
        self.peers.iter_mut().find(|p| p.instance_id == peer)
    }

    fn peer_trusted(&self, peer: InstanceId) -> bool {
        self.peers.iter().any(|p| p.instance_id == peer && !p.distrusted())
    }

    fn greet(&mut self, peer: InstanceId) {
        self.send_readiness(peer);
        if self.status == ClerkStatus::Ready {
            for partition in 0..self.config.partitions {
                let p = &self.partitions[partition as usize];
                let message =
                    Outgoing::Watermark { partition, durable_end: p.durable_end, certified_end: p.certified_end };
                self.actions.push(Action::Send { peer, message });
            }
        }
    }

    fn send_readiness(&mut self, peer: InstanceId) {
        let message = Outgoing::Readiness {
            ready: self.status == ClerkStatus::Ready,
            quarantined: self.self_quarantined,
            may_publish: self.config.may_publish,
            incarnation: self.config.incarnation,
        };
        self.actions.push(Action::Send { peer, message });
    }

    fn place_own(&mut self, partition: u32, offset: u64, digest: Digest, output: Arc<[u8]>) {
        let index = self.index(offset);
        let p = &mut self.partitions[partition as usize];
        debug_assert!(offset >= p.certified_end && offset < p.certified_end + self.config.copy_window);
        let slot = &mut p.ring[index];
        slot.claim(offset);
        if slot.own.is_some() {
            return; // the Ledger handed it over twice (recovery, then the live path)
        }
        slot.own = Some((digest, output.clone()));
        if self.status != ClerkStatus::Ready {
            return;
        }
        // spec: Clerk.CopiesSentWithinPeerWindow
        let window = self.config.copy_window;
        for i in 0..self.peers.len() {
            let Some(end) = self.peers[i].advertised_certified_end[partition as usize] else { continue };
            if offset < end + window {
                let peer = self.peers[i].instance_id;
                let message = Outgoing::Copy { partition, offset, output: output.clone() };
                self.actions.push(Action::Send { peer, message });
                self.counters.copies_sent += 1;
            }
        }
    }

    /// Sends `peer` what we hold for `[from, to)`: own copies, or certified digests.
    fn send_range(&mut self, peer: InstanceId, partition: u32, from: u64, to: u64) {
        let (mask_ring, mask_retained) = (self.config.copy_window - 1, self.config.digest_retention - 1);
        let p = &self.partitions[partition as usize];
        let from = from.max(p.retained_from);
        for offset in from..to {
            let message = if offset < p.certified_end {
                let digest = p.retained[(offset & mask_retained) as usize];
                Outgoing::CertifiedCopy { partition, offset, digest }
            } else {
                let slot = &p.ring[(offset & mask_ring) as usize];
                match (&slot.own, slot.status) {
                    (Some((_, output)), SlotStatus::Pending | SlotStatus::Contested) if slot.offset == offset => {
                        Outgoing::Copy { partition, offset, output: output.clone() }
                    }
                    // Not durable here yet: sent when it is (place_own).
                    _ => continue,
                }
            };
            self.actions.push(Action::Send { peer, message });
            self.counters.copies_sent += 1;
        }
    }

    fn record_copy(
        &mut self,
        peer: InstanceId,
        partition: u32,
        offset: u64,
        digest: Digest,
        certified: bool,
        output: Option<Arc<[u8]>>,
    ) {
        if partition >= self.config.partitions || !self.config.peers.contains(&peer) {
            return;
        }
        self.counters.copies_received += 1;
        if self.status != ClerkStatus::Ready {
            self.counters.copies_before_ready += 1;
            return;
        }
        let trusted = self.peer_trusted(peer);
        let window = self.config.copy_window;
        let mask_retained = self.config.digest_retention - 1;
        let index = self.index(offset);
        let p = &mut self.partitions[partition as usize];
        if offset < p.certified_end {
            // spec: Clerk.LateCopyChecked
            if offset < p.retained_from {
                return;
            }
            self.counters.late_copies_checked += 1;
            let retained = p.retained[(offset & mask_retained) as usize];
            if retained != digest {
                let report = FaultReport {
                    partition,
                    offset,
                    kind: FaultKind::LateCopy,
                    own_digest: Some(retained),
                    digests: vec![(self.config.instance_id, retained), (peer, digest)],
                    differing: vec![peer],
                    own_output: None,
                    differing_output: output,
                };
                self.report(report);
                self.quarantine_peer(peer);
            }
            return;
        }
        if offset >= p.certified_end + window {
            // spec: Clerk.CopyOutsideWindowIgnored
            self.counters.copies_outside_window += 1;
            return;
        }
        let slot = &mut p.ring[index];
        slot.claim(offset);
        if slot.copies.iter().any(|c| c.instance == peer) {
            return; // a resend: same key, same bytes
        }
        let keep_output = match &slot.own {
            None => output,
            Some((own, _)) if *own != digest => output,
            Some(_) => None,
        };
        slot.copies.push(PeerCopy { instance: peer, digest, certified, trusted, compared: false, output: keep_output });
        self.after_change(partition, offset);
    }

    /// Re-evaluates the slot of `offset` and advances the watermark.
    fn after_change(&mut self, partition: u32, offset: u64) {
        if self.status != ClerkStatus::Ready {
            return;
        }
        self.report_mismatches(partition, offset);
        if self.partitions[partition as usize].certified_end == offset {
            self.settle_front(partition);
        } else {
            // A contested slot is reported when it is found, wherever it is.
            let index = self.index(offset);
            if let Verdict::Contested = self.verdict(partition, index) {
                self.contest(partition, index);
            }
        }
    }

    /// Reports each copy that differs from the own digest, once (spec: Clerk.MismatchDetected).
    fn report_mismatches(&mut self, partition: u32, offset: u64) {
        let index = self.index(offset);
        let instance_id = self.config.instance_id;
        let p = &mut self.partitions[partition as usize];
        let slot = &mut p.ring[index];
        let Some((own, _)) = slot.own else { return };
        let mut differing = Vec::new();
        let mut differing_output = None;
        for copy in slot.copies.iter_mut().filter(|c| !c.compared) {
            copy.compared = true;
            if copy.digest != own {
                differing.push(copy.instance);
                differing_output = differing_output.take().or_else(|| copy.output.clone());
            } else {
                copy.output = None; // matches ours: the bytes are not needed
            }
        }
        if differing.is_empty() {
            return;
        }
        let report = slot.fault(partition, instance_id, FaultKind::Mismatch, differing, differing_output);
        self.report(report);
    }

    fn verdict(&self, partition: u32, index: usize) -> Verdict {
        let p = &self.partitions[partition as usize];
        let slot = &p.ring[index];
        if slot.status != SlotStatus::Pending {
            return Verdict::Wait;
        }
        let Some((own, _)) = slot.own else { return Verdict::Wait };
        let expected = self.config.expected_copies as usize;
        // A copy counts if its sender was trusted when it arrived and still is: a peer
        // quarantined since (at an earlier offset) counts for nothing here either.
        let quarantined = |id: InstanceId| self.peers.iter().any(|p| p.instance_id == id && p.distrusted());
        let trusted = || slot.copies.iter().filter(move |c| c.trusted && !quarantined(c.instance));
        // spec: Clerk.OffsetCertified, Clerk.LaggingPeerCatchesUp
        let matching = 1 + trusted().filter(|c| c.digest == own).count();
        if matching >= expected || trusted().any(|c| c.certified && c.digest == own) {
            return Verdict::Certify;
        }
        // spec: Clerk.OwnCopyInMinority
        for copy in trusted().filter(|c| c.digest != own) {
            let agreeing = trusted().filter(|c| c.digest == copy.digest).count();
            if agreeing >= expected || copy.certified {
                return Verdict::Overruled(copy.digest);
            }
        }
        // spec: Clerk.OffsetContested — no digest can reach expected_copies even if every
        // trusted peer that has not answered yet agreed with it. Peers that are merely
        // unreachable now still count as able to answer: a slow link is not a verdict.
        let unanswered = self
            .peers
            .iter()
            .filter(|p| !p.distrusted() && !slot.copies.iter().any(|c| c.instance == p.instance_id))
            .count();
        let best = trusted()
            .map(|c| trusted().filter(|d| d.digest == c.digest).count() + usize::from(c.digest == own))
            .max()
            .unwrap_or(1)
            .max(matching);
        let mismatch = trusted().any(|c| c.digest != own);
        if mismatch && best + unanswered < expected {
            return Verdict::Contested;
        }
        Verdict::Wait
    }

    /// Pops settled slots off the front of the ring (spec: Clerk.CertifiedWatermarkAdvances).
    fn settle_front(&mut self, partition: u32) {
        let mut advanced = false;
        while self.pop_settled(partition) {
            advanced = true;
            // Own outputs recovered beyond the ring enter it as the window reaches them.
            self.place_overflow(partition);
        }
        if advanced {
            self.partitions[partition as usize].advert_due = true;
            self.flush_adverts();
        }
    }

    /// Pops the run of settled slots at the front; whether any was popped.
    fn pop_settled(&mut self, partition: u32) -> bool {
        let mut advanced = false;
        loop {
            let front = self.partitions[partition as usize].certified_end;
            let index = self.index(front);
            let slot = &self.partitions[partition as usize].ring[index];
            if slot.status == SlotStatus::Empty || slot.offset != front {
                break;
            }
            let digest = match self.verdict(partition, index) {
                Verdict::Wait => break,
                Verdict::Contested => {
                    self.contest(partition, index);
                    break;
                }
                Verdict::Certify => {
                    let slot = &self.partitions[partition as usize].ring[index];
                    let (digest, output) = slot.own.clone().expect("certified with an own copy");
                    self.minority_quarantined(partition, index, digest);
                    self.counters.certified += 1;
                    self.hold_for_handover(partition, front, output.clone());
                    self.actions.push(Action::Certified { partition, offset: front, output });
                    digest
                }
                Verdict::Overruled(digest) => {
                    let slot = &self.partitions[partition as usize].ring[index];
                    let instance_id = self.config.instance_id;
                    let majority_output =
                        slot.copies.iter().find(|c| c.digest == digest).and_then(|c| c.output.clone());
                    let report = slot.fault(
                        partition,
                        instance_id,
                        FaultKind::OwnCopyOverruled,
                        vec![instance_id],
                        majority_output,
                    );
                    self.report(report);
                    self.quarantine_self();
                    digest
                }
            };
            self.pop_front(partition, digest);
            advanced = true;
        }
        advanced
    }

    fn pop_front(&mut self, partition: u32, digest: Digest) {
        let (retention, mask_retained) = (self.config.digest_retention, self.config.digest_retention - 1);
        let index = self.index(self.partitions[partition as usize].certified_end);
        let p = &mut self.partitions[partition as usize];
        let front = p.certified_end;
        p.ring[index] = Slot::empty();
        // spec: Clerk.CertifiedDigestsPruned — the retention ring overwrites the oldest.
        p.retained[(front & mask_retained) as usize] = digest;
        p.certified_end = front + 1;
        if p.certified_end - p.retained_from > retention {
            p.retained_from = p.certified_end - retention;
        }
    }

    fn place_overflow(&mut self, partition: u32) {
        let window = self.config.copy_window;
        loop {
            let p = &mut self.partitions[partition as usize];
            let limit = p.certified_end + window;
            let Some(entry) = p.overflow.first_entry() else { break };
            if *entry.key() >= limit {
                break;
            }
            let (offset, (digest, output)) = entry.remove_entry();
            if offset < p.certified_end {
                continue;
            }
            self.place_own(partition, offset, digest, output);
            self.report_mismatches(partition, offset);
        }
    }

    /// spec: Clerk.MinorityQuarantined — copies that differ from a certified digest.
    fn minority_quarantined(&mut self, partition: u32, index: usize, digest: Digest) {
        let minority: Vec<InstanceId> = self.partitions[partition as usize].ring[index]
            .copies
            .iter()
            .filter(|c| c.digest != digest)
            .map(|c| c.instance)
            .collect();
        for peer in minority {
            self.quarantine_peer(peer);
        }
    }

    fn contest(&mut self, partition: u32, index: usize) {
        let instance_id = self.config.instance_id;
        let slot = &mut self.partitions[partition as usize].ring[index];
        if slot.status == SlotStatus::Contested {
            return;
        }
        slot.status = SlotStatus::Contested;
        let (own, _) = slot.own.as_ref().expect("contested with an own copy");
        let differing = slot.copies.iter().filter(|c| c.digest != *own).map(|c| c.instance).collect();
        let differing_output = slot.copies.iter().find(|c| c.digest != *own).and_then(|c| c.output.clone());
        let report = slot.fault(partition, instance_id, FaultKind::Contested, differing, differing_output);
        self.report(report);
    }

    /// spec: Clerk.PeerQuarantineApplied
    fn quarantine_peer(&mut self, peer: InstanceId) {
        if let Some(view) = self.peer_mut(peer) {
            if !view.quarantined {
                view.quarantined = true;
                view.quarantined_incarnation = view.incarnation;
                self.quarantine_version += 1;
                self.role_check();
            }
        }
    }

    /// spec: Clerk.SelfQuarantined — this instance keeps certifying with the cluster's
    /// digests (so it stays in step and keeps comparing) but never publishes, and its
    /// readiness says quarantined so peers do not count it.
    fn quarantine_self(&mut self) {
        if self.self_quarantined {
            return;
        }
        self.self_quarantined = true;
        self.quarantine_version += 1;
        let peers: Vec<InstanceId> = self.config.peers.clone();
        for peer in peers {
            self.send_readiness(peer);
        }
        self.role_check();
    }

    fn report(&mut self, report: FaultReport) {
        self.counters.faults += 1;
        self.actions.push(Action::Fault(report));
    }

    /// spec: Clerk.WatermarkAdvertised — one advert per partition per input.
    fn flush_adverts(&mut self) {
        if self.status != ClerkStatus::Ready {
            return;
        }
        for partition in 0..self.config.partitions {
            let p = &mut self.partitions[partition as usize];
            if !p.advert_due {
                continue;
            }
            p.advert_due = false;
            let (durable_end, certified_end) = (p.durable_end, p.certified_end);
            for peer in &self.config.peers {
                let message = Outgoing::Watermark { partition, durable_end, certified_end };
                self.actions.push(Action::Send { peer: *peer, message });
            }
        }
    }

    /// spec: Clerk.PublisherElected — the lowest eligible id that may publish.
    fn role_check(&mut self) {
        let self_eligible = self.status == ClerkStatus::Ready && !self.self_quarantined && self.config.may_publish;
        let lowest_peer = self.peers.iter().filter(|p| p.eligible() && p.may_publish).map(|p| p.instance_id).min();
        let publisher = self_eligible && lowest_peer.is_none_or(|peer| self.config.instance_id < peer);
        if publisher != self.publisher {
            self.publisher = publisher;
            self.actions.push(Action::Publisher(publisher));
            if publisher {
                self.take_over();
            }
        }
    }

    /// spec: Clerk.PublisherElected, Clerk.PublisherHandOver — resume after the highest
    /// published offset heard of; what lies between that and what the old publisher
    /// really wrote is published again, byte-identical and keyed. Outputs trimmed while
    /// nobody could publish cannot be republished here: they are skipped, and said so.
    fn take_over(&mut self) {
        let partitions = self.config.partitions;
        let mut take_over =
            TakeOver { skip_to: Vec::with_capacity(partitions as usize), outputs: Vec::new(), skipped: Vec::new() };
        for partition in 0..partitions {
            let known = self.known_published(partition);
            let p = &mut self.partitions[partition as usize];
            let start = known.max(p.trimmed_end);
            if start > known {
                take_over.skipped.push((partition, known, start));
            }
            take_over.skip_to.push((partition, start));
            while p.handover.front().is_some_and(|(offset, _)| *offset < start) {
                p.handover.pop_front();
            }
            take_over.outputs.extend(p.handover.iter().map(|(offset, output)| (partition, *offset, output.clone())));
        }
        self.actions.push(Action::PublishFrom(take_over));
    }

    /// A certified output waits for publication (spec: Clerk.CertifiedOutputPublished:
    /// every instance keeps its certified outputs until they are known published). While
    /// someone publishes, a full buffer holds the Ushers back at once (only what was already
    /// planned, at most a copy window, can follow); with nobody to publish, the oldest past
    /// `max_unpublished` are trimmed, since no hand-over could need them from here.
    fn hold_for_handover(&mut self, partition: u32, offset: u64, output: Arc<[u8]>) {
        let (max, exists) = (self.config.max_unpublished, self.publisher_exists());
        let p = &mut self.partitions[partition as usize];
        assert!(p.handover.back().is_none_or(|(last, _)| *last < offset), "held in offset order");
        p.handover.push_back((offset, output));
        if !exists {
            while p.handover.len() as u64 > max {
                let (oldest, _) = p.handover.pop_front().expect("longer than max has a front");
                p.trimmed_end = oldest + 1;
                self.counters.handover_trimmed += 1;
            }
        } else if p.handover.len() as u64 >= max {
            self.backlog_full = true;
        }
    }

    /// Drops what is known published from the hand-over buffers and decides the
    /// backlog. With nobody to publish the buffers must not stall the input: they only
    /// hold the Ushers back while a publisher exists (and a hand-over would need them);
    /// otherwise the oldest past `max_unpublished` are trimmed.
    fn prune_handover(&mut self) {
        let exists = self.publisher_exists();
        let max = self.config.max_unpublished;
        let mut full = false;
        for partition in 0..self.config.partitions {
            let known = self.known_published(partition);
            let p = &mut self.partitions[partition as usize];
            while p.handover.front().is_some_and(|(offset, _)| *offset < known) {
                p.handover.pop_front();
            }
            if exists {
                full |= p.handover.len() as u64 >= max;
                continue;
            }
            while p.handover.len() as u64 > max {
                let (offset, _) = p.handover.pop_front().expect("longer than max has a front");
                p.trimmed_end = offset + 1;
                self.counters.handover_trimmed += 1;
            }
        }
        self.backlog_full = full;
    }

    /// spec: Federation.HeartbeatSent — to every peer (a link that is down drops it).
    fn send_heartbeats(&mut self) {
        let published_ends: Vec<u64> = (0..self.config.partitions).map(|p| self.known_published(p)).collect();
        for &peer in &self.config.peers {
            let message = Outgoing::Heartbeat { published_ends: published_ends.clone() };
            self.actions.push(Action::Send { peer, message });
        }
    }

    /// Gone for the stop-at-end grace, as of the last `handle_timeout`.
    fn gone_for_grace(&self, down_since_ms: Option<u64>) -> bool {
        match (down_since_ms, self.now_ms) {
            (Some(since_ms), Some(now_ms)) => now_ms - since_ms >= STOP_GRACE_MS,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    type CertifiedOutput = (u32, u64, Arc<[u8]>);

    /// Clerks wired by an in-memory network: what a Clerk sends is delivered in order
    /// per link, while the link is up.
    struct Net {
        clerks: Vec<Clerk>,
        queue: VecDeque<(InstanceId, InstanceId, Outgoing)>,
        down: Vec<(InstanceId, InstanceId)>,
        certified: Vec<Vec<CertifiedOutput>>,
        faults: Vec<Vec<FaultReport>>,
        publisher: Vec<bool>,
        take_overs: Vec<Vec<TakeOver>>,
    }

    fn config(id: InstanceId, n: u32, expected: u32, window: u64) -> ClerkConfig {
        ClerkConfig {
            instance_id: id,
            peers: (1..=n).filter(|p| *p != id).collect(),
            partitions: 1,
            expected_copies: expected,
            copy_window: window,
            digest_retention: 1 << 12,
            may_publish: true,
            incarnation: 100 + id as u64,
            max_unpublished: window.max(64),
        }
    }

    fn output(offset: u64) -> Arc<[u8]> {
        Arc::from(format!("output of {offset}").into_bytes())
    }

    impl Net {
        fn new(n: u32, expected: u32, window: u64) -> Net {
            let clerks = (1..=n).map(|id| Clerk::new(config(id, n, expected, window), &[(0, 0)])).collect();
            let k = n as usize;
            Net {
                clerks,
                queue: VecDeque::new(),
                down: Vec::new(),
                certified: vec![Vec::new(); k],
                faults: vec![Vec::new(); k],
                publisher: vec![false; k],
                take_overs: vec![Vec::new(); k],
            }
        }
        fn clerk(&mut self, id: InstanceId) -> &mut Clerk {
            &mut self.clerks[id as usize - 1]
        }
        fn open_all(&mut self) {
            let n = self.clerks.len() as u32;
            for id in 1..=n {
                self.clerk(id).open_gate();
                self.collect(id);
            }
            for id in 1..=n {
                for peer in (1..=n).filter(|p| *p != id) {
                    self.clerk(id).link_up(peer);
                }
                self.collect(id);
            }
        }
        fn collect(&mut self, id: InstanceId) {
            let actions: Vec<Action> = self.clerk(id).drain_actions().collect();
            for action in actions {
                match action {
                    Action::Send { peer, message } => self.queue.push_back((id, peer, message)),
                    Action::Certified { partition, offset, output } => {
                        self.certified[id as usize - 1].push((partition, offset, output))
                    }
                    Action::Fault(report) => self.faults[id as usize - 1].push(report),
                    Action::Publisher(on) => self.publisher[id as usize - 1] = on,
                    Action::PublishFrom(take_over) => self.take_overs[id as usize - 1].push(take_over),
                }
            }
        }
        fn own(&mut self, id: InstanceId, offset: u64, bytes: Arc<[u8]>) {
            self.clerk(id).own_output(0, offset, bytes);
            self.collect(id);
        }
        fn run(&mut self) {
            while let Some((from, to, message)) = self.queue.pop_front() {
                if self.down.contains(&(from, to)) || self.down.contains(&(to, from)) {
                    continue;
                }
                let clerk = self.clerk(to);
                match message {
                    Outgoing::Copy { partition, offset, output } => clerk.peer_copy(from, partition, offset, output),
                    Outgoing::CertifiedCopy { partition, offset, digest } => {
                        clerk.peer_certified_copy(from, partition, offset, digest)
                    }
                    Outgoing::Watermark { partition, durable_end, certified_end } => {
                        clerk.peer_watermark(from, partition, durable_end, certified_end)
                    }
                    Outgoing::Readiness { ready, quarantined, may_publish, incarnation } => {
                        clerk.peer_readiness(from, ready, quarantined, may_publish, incarnation)
                    }
                    Outgoing::Readmit { instance } => clerk.readmit(instance),
                    Outgoing::Heartbeat { published_ends } => clerk.peer_heartbeat(from, &published_ends),
                }
                self.collect(to);
            }
        }
        fn cut(&mut self, a: InstanceId, b: InstanceId) {
            self.down.push((a, b));
            self.clerk(a).link_down(b);
            self.collect(a);
            self.clerk(b).link_down(a);
            self.collect(b);
        }
        fn heal(&mut self, a: InstanceId, b: InstanceId) {
            self.down.retain(|l| *l != (a, b) && *l != (b, a));
            self.clerk(a).link_up(b);
            self.collect(a);
            self.clerk(b).link_up(a);
            self.collect(b);
            self.run();
        }
        fn offsets(&self, id: InstanceId) -> Vec<u64> {
            self.certified[id as usize - 1].iter().map(|c| c.1).collect()
        }
    }

    /// A deterministic shuffle, so that own outputs arrive out of order as they do from shards.
    fn shuffled(n: u64, seed: u64) -> Vec<u64> {
        let mut v: Vec<u64> = (0..n).collect();
        let mut x = seed | 1;
        for i in (1..v.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.swap(i, (x % (i as u64 + 1)) as usize);
        }
        v
    }

    #[test]
    fn three_instances_certify_every_offset_in_order() {
        // spec: Clerk.OffsetCertified, Clerk.CertifiedWatermarkAdvances, Clerk.OwnDigestPlaced
        let mut net = Net::new(3, 2, 64);
        net.open_all();
        net.run();
        for (id, seed) in [(1, 7), (2, 11), (3, 13)] {
            for offset in shuffled(60, seed) {
                net.own(id, offset, output(offset));
            }
            net.run();
        }
        for id in 1..=3 {
            assert_eq!(net.offsets(id), (0..60).collect::<Vec<_>>(), "instance {id}");
            assert_eq!(net.clerk(id).certified_end(0), 60);
            assert!(net.faults[id as usize - 1].is_empty());
        }
        assert_eq!(net.certified[0][5].2, output(5), "certified with the output's bytes");
    }

    #[test]
    fn expected_copies_one_certifies_alone() {
        let mut clerk = Clerk::new(config(1, 1, 1, 16), &[(0, 0)]);
        clerk.open_gate();
        clerk.own_output(0, 1, output(1));
        assert_eq!(clerk.certified_end(0), 0, "offset 0 first");
        clerk.own_output(0, 0, output(0));
        assert_eq!(clerk.certified_end(0), 2);
    }

    #[test]
    fn nothing_certifies_without_a_second_copy() {
        // spec: Clerk.CertifiedHasEnoughCopies — two instances, one silent.
        let mut net = Net::new(2, 2, 64);
        net.open_all();
        net.run();
        net.cut(1, 2);
        for offset in 0..10 {
            net.own(1, offset, output(offset));
        }
        net.run();
        assert!(net.offsets(1).is_empty(), "certification pauses");
        for offset in 0..10 {
            net.own(2, offset, output(offset));
        }
        net.heal(1, 2);
        assert_eq!(net.offsets(1), (0..10).collect::<Vec<_>>());
        assert_eq!(net.offsets(2), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn a_differing_copy_is_detected_never_certified_and_its_sender_quarantined() {
        // spec: Clerk.MismatchDetected, Clerk.MinorityQuarantined, Clerk.OwnCopyInMinority, Clerk.SelfQuarantined
        let mut net = net_with_instance_3_quarantined();
        for id in [1, 2] {
            assert_eq!(net.offsets(id), (0..20).collect::<Vec<_>>());
            let faults = &net.faults[id as usize - 1];
            assert!(faults.iter().all(|f| f.offset == 7 && f.differing == vec![3]), "{faults:?}");
            assert!(!faults.is_empty());
            assert!(net.clerk(id).peers().iter().any(|p| p.instance_id == 3 && p.quarantined));
        }
        let own = &net.faults[2];
        assert!(own.iter().any(|f| f.kind == FaultKind::OwnCopyOverruled && f.offset == 7));
        assert!(net.clerk(3).self_quarantined());
        assert!(!net.offsets(3).contains(&7), "an overruled output is never certified here");
        assert_eq!(net.clerk(3).certified_end(0), 20, "the quarantined instance keeps in step");
        assert!(!net.publisher[2], "a quarantined instance never publishes");
    }

    #[test]
    fn a_quarantined_peers_copies_are_compared_but_not_counted() {
        // spec: Clerk.PeerCopyRecorded (trusted = false), Clerk.LateCopyChecked
        let mut net = Net::new(3, 2, 64);
        net.open_all();
        net.run();
        let flips = [3u64, 9, 15];
        for offset in 0..20 {
            for id in 1..=3 {
                let bytes = if id == 3 && flips.contains(&offset) { Arc::from(&b"bad"[..]) } else { output(offset) };
                net.own(id, offset, bytes);
            }
            net.run();
        }
        let mut seen: Vec<u64> = net.faults[0].iter().map(|f| f.offset).collect();
        seen.dedup();
        assert_eq!(seen, flips, "every differing copy is detected, the quarantined one's too");
        // Instance 2 silent: instance 3's matching copies must not certify at 1.
        net.cut(1, 2);
        net.own(1, 20, output(20));
        net.own(3, 20, output(20));
        net.run();
        assert_eq!(net.clerk(1).certified_end(0), 20, "a quarantined copy does not count");
    }

    /// Three instances; instance 3's copy of offset 7 differs, so it is quarantined.
    fn net_with_instance_3_quarantined() -> Net {
        let mut net = Net::new(3, 2, 64);
        net.open_all();
        net.run();
        for offset in 0..20 {
            for id in 1..=3 {
                let bytes = if id == 3 && offset == 7 { Arc::from(&b"flipped"[..]) } else { output(offset) };
                net.own(id, offset, bytes);
            }
            net.run();
        }
        assert!(net.clerk(3).self_quarantined());
        net
    }

    fn quarantines(net: &mut Net, id: InstanceId, peer: InstanceId) -> bool {
        net.clerk(id).peers().iter().any(|p| p.instance_id == peer && p.quarantined)
    }

    #[test]
    fn an_operator_readmit_on_one_instance_lifts_the_quarantine_everywhere() {
        // spec: Clerk.QuarantineLifted, Clerk.ReadmitReceived
        let mut net = net_with_instance_3_quarantined();
        assert!(!net.clerk(1).operator_readmit(9), "not a member");
        let before = net.clerk(2).quarantine_version();
        assert!(net.clerk(1).operator_readmit(3));
        net.collect(1);
        net.run();
        assert!(!quarantines(&mut net, 1, 3) && !quarantines(&mut net, 2, 3));
        assert!(!net.clerk(3).self_quarantined());
        assert!(net.clerk(2).quarantine_version() > before, "the change is persisted");
        // Instance 2 silent: instance 3's copy counts again at instance 1.
        net.cut(1, 2);
        net.own(1, 20, output(20));
        net.own(3, 20, output(20));
        net.run();
        assert_eq!(net.clerk(1).certified_end(0), 21, "a readmitted peer's copy counts");
    }

    #[test]
    fn quarantines_survive_a_restart_and_a_rebuild_lifts_them() {
        // spec: Clerk.QuarantinePersisted, Clerk.RebuiltPeerReadmitted
        let mut net = net_with_instance_3_quarantined();
        let healthy = net.clerk(1).quarantine_state();
        assert_eq!(healthy, QuarantineState { self_quarantined: false, peers: vec![(3, Some(103))] });
        let faulty = net.clerk(3).quarantine_state();
        assert!(faulty.self_quarantined);

        // The faulty instance restarts: it still says quarantined.
        let mut restarted = Clerk::new(config(3, 3, 2, 64), &[(20, 20)]);
        restarted.restore_quarantine(&faulty);
        restarted.open_gate();
        restarted.link_up(1);
        let says: Vec<bool> = restarted
            .drain_actions()
            .filter_map(|a| match a {
                Action::Send { message: Outgoing::Readiness { quarantined, .. }, .. } => Some(quarantined),
                _ => None,
            })
            .collect();
        assert!(!says.is_empty() && says.iter().all(|q| *q), "{says:?}");

        // A healthy instance restarts: it still quarantines 3, whose restart kept its incarnation.
        let mut clerk = Clerk::new(config(1, 3, 2, 64), &[(20, 20)]);
        clerk.restore_quarantine(&healthy);
        clerk.open_gate();
        clerk.peer_readiness(3, true, false, true, 103);
        assert!(clerk.peers().iter().any(|p| p.instance_id == 3 && p.quarantined), "same incarnation");
        clerk.peer_copy(3, 0, 20, output(20));
        clerk.own_output(0, 20, output(20));
        assert_eq!(clerk.certified_end(0), 20, "its copy does not count after the restart");

        // Instance 3 is wiped and rebuilt: a new incarnation lifts the quarantine.
        let version = clerk.quarantine_version();
        clerk.peer_readiness(3, true, false, true, 999);
        assert!(clerk.peers().iter().all(|p| !p.quarantined));
        assert!(clerk.quarantine_version() > version);
        assert_eq!(clerk.certified_end(0), 20, "its old incarnation's copy is not evidence");
        clerk.peer_copy(3, 0, 20, output(20));
        assert_eq!(clerk.certified_end(0), 21, "the rebuilt peer's fresh copy counts");
        clerk.peer_copy(3, 0, 21, output(21));
        clerk.own_output(0, 21, output(21));
        assert_eq!(clerk.certified_end(0), 22, "a rebuilt peer's copies count");
    }

    #[test]
    fn a_peers_last_certified_end_outlives_its_link_but_its_advert_does_not() {
        // spec: Clerk.StopAtEnd (last_advertised_certified), Recovery.NoWatermarkBeforeReady
        let mut clerk = Clerk::new(config(1, 2, 2, 16), &[(0, 0)]);
        clerk.open_gate();
        clerk.peer_watermark(2, 0, 10, 10);
        clerk.link_down(2);
        let view = &clerk.peers()[0];
        assert_eq!(view.advertised_certified_end, vec![None], "never trusted for certification once gone");
        assert_eq!(view.last_certified_end, vec![10], "a peer that stopped at the end needs nothing more");
    }

    #[test]
    fn a_peer_that_says_it_is_quarantined_is_not_counted_nor_heard_on_publication() {
        // spec: Clerk.SelfQuarantined (peers do not count its copies), Clerk.PublisherHandOver
        let mut clerk = Clerk::new(config(1, 3, 2, 16), &[(0, 0)]);
        clerk.open_gate();
        clerk.peer_readiness(3, true, true, true, 7);
        clerk.peer_copy(3, 0, 0, output(0));
        clerk.own_output(0, 0, output(0));
        assert_eq!(clerk.certified_end(0), 0, "a self-quarantined peer's copy does not count");
        clerk.peer_heartbeat(3, &[u64::MAX]);
        assert_eq!(clerk.peers_published_end(0), 0, "nor does its word on what is published");
        // Re-admitted (its readiness says so): its waiting copy counts.
        clerk.peer_readiness(3, true, false, true, 7);
        assert_eq!(clerk.certified_end(0), 1);
        clerk.peer_heartbeat(3, &[u64::MAX]);
        assert_eq!(clerk.peers_published_end(0), 1, "capped by what is certified here");
    }

    #[test]
    fn a_peer_restarted_behind_catches_up_against_digests_seeded_from_the_ledger() {
        // spec: Clerk.CertifiedDigestsResent, Clerk.LaggingPeerCatchesUp — after a crash
        // of both, instance 2's checkpoint says 10 and instance 1's only 4.
        let mut ahead = Clerk::new(config(2, 2, 2, 16), &[(10, 10)]);
        let seeds: Vec<(u64, Digest)> = (0..12).map(|o| (o, output_digest(&output(o)))).collect();
        ahead.seed_retained(0, &seeds[..3]); // a gap below 3..10: ignored
        ahead.seed_retained(0, &seeds);
        ahead.open_gate();
        let mut behind = Clerk::new(config(1, 2, 2, 16), &[(4, 10)]);
        behind.open_gate();
        for offset in 4..10 {
            behind.own_output(0, offset, output(offset));
        }
        ahead.peer_watermark(1, 0, 10, 4);
        for action in ahead.drain_actions() {
            if let Action::Send { peer: 1, message: Outgoing::CertifiedCopy { partition, offset, digest } } = action {
                behind.peer_certified_copy(2, partition, offset, digest);
            }
        }
        assert_eq!(behind.certified_end(0), 10, "certified against the seeded digests");
    }

    #[test]
    fn a_recovering_clerk_sends_nothing_and_ignores_copies() {
        // spec: Clerk.ReadyGateOpens, Recovery.NoWatermarkBeforeReady, Recovery.NoCopiesBeforeReady
        let mut clerk = Clerk::new(config(1, 2, 2, 16), &[(5, 9)]);
        clerk.link_up(2);
        clerk.own_output(0, 5, output(5));
        clerk.peer_watermark(2, 0, 0, 0);
        clerk.peer_copy(2, 0, 5, output(5));
        let actions: Vec<Action> = clerk.drain_actions().collect();
        assert!(
            actions.iter().all(|a| matches!(a, Action::Send { message: Outgoing::Readiness { ready: false, .. }, .. })),
            "only 'not ready' leaves a recovering instance: {actions:?}"
        );
        assert_eq!(clerk.counters().copies_before_ready, 1);
        assert_eq!(clerk.certified_end(0), 5);
        clerk.open_gate();
        let actions: Vec<Action> = clerk.drain_actions().collect();
        assert!(actions.contains(&Action::Send {
            peer: 2,
            message: Outgoing::Watermark { partition: 0, durable_end: 9, certified_end: 5 }
        }));
        // The peer advertised end 0 earlier, so our copy of 5 goes out once ready.
        assert!(actions.iter().any(|a| matches!(a, Action::Send { message: Outgoing::Copy { offset: 5, .. }, .. })));
    }

    #[test]
    fn a_lagging_instance_catches_up_against_certified_digests() {
        // spec: Clerk.CertifiedDigestsResent, Clerk.LaggingPeerCatchesUp
        let mut net = Net::new(3, 2, 16);
        net.open_all();
        net.run();
        net.cut(1, 3);
        net.cut(2, 3);
        for offset in 0..100 {
            net.own(1, offset, output(offset));
            net.own(2, offset, output(offset));
            net.run();
        }
        assert_eq!(net.clerk(1).certified_end(0), 100);
        // Instance 3 restarts from nothing and reconnects; the others are far ahead.
        net.clerks[2] = Clerk::new(config(3, 3, 2, 16), &[(0, 0)]);
        net.clerk(3).open_gate();
        net.collect(3);
        net.heal(1, 3);
        net.heal(2, 3);
        for offset in shuffled(100, 3) {
            net.own(3, offset, output(offset));
            net.run();
        }
        assert_eq!(net.offsets(3), (0..100).collect::<Vec<_>>());
        assert!(net.faults.iter().all(|f| f.is_empty()));
        assert!(!net.clerk(3).self_quarantined());
    }

    #[test]
    fn copies_beyond_the_window_wait_and_outputs_beyond_it_overflow() {
        // spec: Clerk.CopyOutsideWindowIgnored, Clerk.SlotsInsideWindow
        let mut clerk = Clerk::new(config(1, 2, 2, 8), &[(0, 0)]);
        clerk.open_gate();
        clerk.peer_copy(2, 0, 8, output(8));
        assert_eq!(clerk.counters().copies_outside_window, 1);
        // Recovered own outputs beyond the ring wait, then enter as it moves.
        for offset in 0..12 {
            clerk.own_output(0, offset, output(offset));
        }
        for offset in 0..12 {
            clerk.peer_copy(2, 0, offset, output(offset));
        }
        assert_eq!(clerk.certified_end(0), 12);
    }

    #[test]
    fn the_lowest_eligible_instance_publishes_and_hands_over() {
        // spec: Clerk.PublisherElected, Clerk.PublisherHandOver
        let mut net = Net::new(3, 2, 16);
        net.open_all();
        net.run();
        assert_eq!(net.publisher, vec![true, false, false]);
        net.cut(1, 2);
        net.cut(1, 3);
        assert_eq!(net.publisher[1..], [true, false], "2 takes over when 1 goes silent");
        net.heal(1, 2);
        net.heal(1, 3);
        assert_eq!(net.publisher, vec![true, false, false]);
    }

    #[test]
    fn a_mismatch_while_the_third_instance_is_unreachable_waits_for_it() {
        // spec: Clerk.OffsetContested — only when no digest can still reach expected_copies.
        let mut net = Net::new(3, 2, 16);
        net.open_all();
        net.run();
        net.cut(1, 2);
        net.own(1, 0, output(0));
        net.own(3, 0, Arc::from(&b"flipped"[..]));
        net.run();
        assert_eq!(net.clerk(1).contested_at(0), None, "instance 2 may still agree");
        net.own(2, 0, output(0));
        net.heal(1, 2);
        assert_eq!(net.offsets(1), vec![0]);
    }

    #[test]
    fn a_copy_from_a_peer_quarantined_after_it_arrived_neither_counts_nor_contests() {
        // spec: Clerk.OffsetContested, Clerk.PeerCopyRecorded (trusted)
        let mut net = Net::new(3, 2, 16);
        net.open_all();
        net.run();
        net.cut(1, 2);
        // 3's differing copy of 1 arrives first, trusted; then 3 is caught at offset 0.
        net.own(3, 1, Arc::from(&b"flipped"[..]));
        net.own(3, 0, Arc::from(&b"flipped too"[..]));
        net.run();
        net.own(1, 1, output(1));
        net.own(1, 0, output(0));
        net.own(2, 0, output(0));
        net.own(2, 1, output(1));
        net.heal(1, 2);
        assert_eq!(net.clerk(1).contested_at(0), None);
        assert_eq!(net.offsets(1), vec![0, 1], "instance 2's copies certify both");
        assert!(net.clerk(1).peers().iter().any(|p| p.instance_id == 3 && p.quarantined));
    }

    #[test]
    fn two_instances_that_disagree_contest_the_offset() {
        // spec: Clerk.OffsetContested
        let mut net = Net::new(2, 2, 16);
        net.open_all();
        net.run();
        net.own(1, 0, output(0));
        net.own(2, 0, Arc::from(&b"other"[..]));
        net.own(1, 1, output(1));
        net.own(2, 1, output(1));
        net.run();
        for id in 1..=2 {
            assert_eq!(net.clerk(id).contested_at(0), Some(0));
            assert!(net.faults[id as usize - 1].iter().any(|f| f.kind == FaultKind::Contested));
            assert!(net.offsets(id).is_empty(), "the watermark stops below a contested offset");
        }
    }

    /// A lone Clerk (expected_copies 1) with `max_unpublished` 64, every output certified
    /// as soon as it is durable.
    fn lone(may_publish: bool, resume: (u64, u64)) -> Clerk {
        let config = ClerkConfig { may_publish, ..config(1, 1, 1, 16) };
        assert_eq!(config.max_unpublished, 64);
        Clerk::new(config, &[resume])
    }

    fn take_overs(clerk: &mut Clerk) -> Vec<TakeOver> {
        clerk
            .drain_actions()
            .filter_map(|a| match a {
                Action::PublishFrom(take_over) => Some(take_over),
                _ => None,
            })
            .collect()
    }

    fn heartbeats(clerk: &mut Clerk) -> Vec<(InstanceId, Vec<u64>)> {
        clerk
            .drain_actions()
            .filter_map(|a| match a {
                Action::Send { peer, message: Outgoing::Heartbeat { published_ends } } => Some((peer, published_ends)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn heartbeats_are_due_every_interval_from_the_first_timeout() {
        // spec: Federation.HeartbeatSent
        const I: u64 = HEARTBEAT_INTERVAL_MS;
        let mut clerk = Clerk::new(config(1, 3, 2, 16), &[(0, 0)]);
        assert_eq!(clerk.poll_timeout(), None, "no schedule before time is known");
        clerk.handle_timeout(1_000);
        assert!(heartbeats(&mut clerk).is_empty(), "the first timeout starts the schedule");
        assert_eq!(clerk.poll_timeout(), Some(1_000 + I));
        clerk.handle_timeout(1_000 + I - 1);
        assert!(heartbeats(&mut clerk).is_empty(), "not due yet");
        clerk.own_published(0, 7);
        clerk.handle_timeout(1_000 + I);
        assert_eq!(heartbeats(&mut clerk), vec![(2, vec![7]), (3, vec![7])], "the published end known, to each peer");
        assert_eq!(clerk.poll_timeout(), Some(1_000 + 2 * I));
        clerk.handle_timeout(1_000 + 2 * I + 50);
        assert_eq!(heartbeats(&mut clerk).len(), 2);
        assert_eq!(clerk.poll_timeout(), Some(1_000 + 3 * I + 50), "the next one an interval after the late one");
    }

    #[test]
    fn a_heartbeat_carries_what_peers_said_they_published_capped_by_the_certified_end() {
        // spec: Federation.HeartbeatSent, Clerk.PublisherHandOver
        let mut net = Net::new(3, 2, 16);
        net.open_all();
        net.run();
        for offset in 0..4 {
            for id in 1..=3 {
                net.own(id, offset, output(offset));
            }
        }
        net.run();
        net.clerk(2).peer_heartbeat(1, &[9]);
        net.clerk(2).handle_timeout(0);
        net.clerk(2).handle_timeout(HEARTBEAT_INTERVAL_MS);
        assert_eq!(heartbeats(net.clerk(2)), vec![(1, vec![4]), (3, vec![4])]);
    }

    #[test]
    fn the_handover_buffer_is_pruned_to_what_is_known_published() {
        // spec: Clerk.CertifiedOutputPublished, Clerk.PublisherHandOver
        let mut net = Net::new(3, 2, 16);
        net.open_all();
        net.run();
        for offset in 0..10 {
            for id in 1..=3 {
                net.own(id, offset, output(offset));
            }
        }
        net.run();
        let clerk = net.clerk(2);
        assert_eq!(clerk.handover_len(0), 10, "every certified output is held");
        clerk.own_published(0, 3);
        clerk.handle_timeout(0);
        assert_eq!((clerk.handover_len(0), clerk.known_published(0)), (7, 3), "the own publisher's end");
        clerk.peer_heartbeat(1, &[6]);
        clerk.handle_timeout(10);
        assert_eq!((clerk.handover_len(0), clerk.known_published(0)), (4, 6), "a trusted peer's heartbeat");
        clerk.peer_heartbeat(3, &[50]);
        clerk.handle_timeout(20);
        assert_eq!((clerk.handover_len(0), clerk.known_published(0)), (0, 10), "capped by the certified end");
        assert_eq!(clerk.trimmed_end(0), 0, "nothing was trimmed");
    }

    #[test]
    fn a_full_handover_buffer_holds_the_ushers_back_while_someone_publishes() {
        // spec: Clerk.CertifiedOutputPublished (the bound), Publisher.BoundedBacklog
        let mut clerk = lone(true, (0, 0));
        clerk.open_gate();
        assert!(clerk.publisher_exists());
        for offset in 0..64 {
            clerk.own_output(0, offset, output(offset));
        }
        clerk.handle_timeout(0);
        assert!(clerk.backlog_full(), "64 held, max_unpublished 64");
        clerk.own_published(0, 1);
        clerk.handle_timeout(10);
        assert!(!clerk.backlog_full());
        assert_eq!(clerk.handover_len(0), 63);
        assert_eq!(clerk.trimmed_end(0), 0);
    }

    #[test]
    fn with_nobody_to_publish_the_handover_buffer_is_trimmed_not_full() {
        // spec: Clerk.CertifiedOutputPublished (the bound), Publisher.BoundedBacklog
        let mut clerk = lone(false, (0, 0));
        clerk.open_gate();
        assert!(!clerk.publisher_exists());
        for offset in 0..70 {
            clerk.own_output(0, offset, output(offset));
        }
        clerk.handle_timeout(0);
        assert!(!clerk.backlog_full());
        assert_eq!((clerk.handover_len(0), clerk.trimmed_end(0)), (64, 6), "trimmed as they are held");
        assert_eq!(clerk.counters().handover_trimmed, 6);
    }

    #[test]
    fn while_someone_publishes_a_full_buffer_holds_the_ushers_back_at_once_and_drops_nothing() {
        // spec: Clerk.CertifiedOutputPublished (the bound), Publisher.BoundedBacklog
        let mut clerk = lone(true, (0, 0));
        clerk.open_gate();
        for offset in 0..63 {
            clerk.own_output(0, offset, output(offset));
        }
        assert!(!clerk.backlog_full());
        for offset in 63..130 {
            clerk.own_output(0, offset, output(offset));
        }
        assert!(clerk.backlog_full(), "at the 64th, without waiting for a timeout");
        assert_eq!((clerk.handover_len(0), clerk.trimmed_end(0)), (130, 0), "a publisher may still need them all");
    }

    #[test]
    fn outputs_from_the_ledger_are_never_trimmed_before_anyone_is_known_to_publish() {
        // spec: Clerk.PublisherHandOver
        let mut clerk = lone(true, (200, 200));
        for offset in 0..200 {
            clerk.seed_unpublished(0, offset, output(offset));
        }
        assert_eq!((clerk.handover_len(0), clerk.trimmed_end(0)), (200, 0));
        clerk.open_gate();
        clerk.handle_timeout(0);
        assert!(clerk.backlog_full(), "a publisher exists: they wait for it");
        assert_eq!((clerk.handover_len(0), clerk.trimmed_end(0)), (200, 0));
    }

    #[test]
    fn a_new_publisher_resumes_at_the_published_end_heard_and_republishes_the_rest() {
        // spec: Clerk.PublisherHandOver, Clerk.PublisherElected
        let mut net = Net::new(3, 2, 16);
        net.open_all();
        net.run();
        assert_eq!(net.take_overs[0].len(), 1, "1 took the role at start");
        for offset in 0..10 {
            for id in 1..=3 {
                net.own(id, offset, output(offset));
            }
        }
        net.run();
        // 1 says it published up to 6; 2 has published nothing itself.
        net.clerk(2).peer_heartbeat(1, &[6]);
        net.take_overs.iter_mut().for_each(Vec::clear);
        net.cut(1, 2);
        net.cut(1, 3);
        assert!(net.publisher[1]);
        let take_over = net.take_overs[1].pop().expect("2 took over");
        assert_eq!(take_over.skip_to, vec![(0, 6)]);
        assert!(take_over.skipped.is_empty());
        let republished: Vec<u64> = take_over.outputs.iter().map(|(_, offset, _)| *offset).collect();
        assert_eq!(republished, vec![6, 7, 8, 9]);
        assert!(take_over.outputs.iter().all(|(p, offset, bytes)| *p == 0 && *bytes == output(*offset)));
        assert!(net.take_overs[2].is_empty(), "3 is not the publisher");
    }

    #[test]
    fn outputs_trimmed_while_nobody_could_publish_are_skipped_at_take_over() {
        // spec: Clerk.PublisherHandOver — they cannot be republished here.
        let mut clerk = lone(true, (100, 100));
        for offset in 0..100 {
            clerk.seed_unpublished(0, offset, output(offset));
        }
        clerk.handle_timeout(0);
        assert!(!clerk.publisher_exists(), "a recovering Clerk does not publish");
        assert_eq!((clerk.handover_len(0), clerk.trimmed_end(0)), (64, 36));
        clerk.own_published(0, 20);
        clerk.open_gate();
        let take_over = take_overs(&mut clerk).pop().expect("took the role");
        assert_eq!(take_over.skip_to, vec![(0, 36)]);
        assert_eq!(take_over.skipped, vec![(0, 20, 36)], "from the published end to the trimmed end");
        let republished: Vec<u64> = take_over.outputs.iter().map(|(_, offset, _)| *offset).collect();
        assert_eq!(republished, (36..100).collect::<Vec<_>>());
    }

    #[test]
    fn a_take_over_past_the_trimmed_end_skips_nothing() {
        // spec: Clerk.PublisherHandOver
        let mut clerk = lone(true, (100, 100));
        for offset in 0..100 {
            clerk.seed_unpublished(0, offset, output(offset));
        }
        clerk.handle_timeout(0);
        clerk.own_published(0, 90);
        clerk.open_gate();
        let take_over = take_overs(&mut clerk).pop().expect("took the role");
        assert_eq!(take_over.skip_to, vec![(0, 90)]);
        assert!(take_over.skipped.is_empty());
        assert_eq!(take_over.outputs.len(), 10);
        assert_eq!(clerk.handover_len(0), 10);
    }

    #[test]
    fn a_peer_down_for_less_than_the_grace_still_holds_stop_at_end_back() {
        // spec: Clerk.StopAtEnd
        let mut net = Net::new(3, 2, 16);
        net.open_all();
        net.run();
        for offset in 0..5 {
            for id in 1..=3 {
                net.own(id, offset, output(offset));
            }
        }
        net.run();
        assert_eq!(net.clerk(1).peers_certified_end(0), 5, "both peers advertised 5");
        net.cut(1, 3);
        for id in [1, 2] {
            net.own(id, 5, output(5));
        }
        net.run();
        let clerk = net.clerk(1);
        clerk.handle_timeout(1_000);
        clerk.handle_timeout(5_950);
        assert_eq!(clerk.poll_timeout(), Some(1_000 + STOP_GRACE_MS), "the grace ends before the next heartbeat");
        clerk.handle_timeout(1_000 + STOP_GRACE_MS - 1);
        assert_eq!(clerk.peers_certified_end(0), 5, "3's last advert still counts");
    }

    #[test]
    fn a_peer_down_for_the_grace_no_longer_holds_stop_at_end_back() {
        // spec: Clerk.StopAtEnd
        let mut net = Net::new(3, 2, 16);
        net.open_all();
        net.run();
        for offset in 0..5 {
            for id in 1..=3 {
                net.own(id, offset, output(offset));
            }
        }
        net.run();
        net.cut(1, 3);
        for id in [1, 2] {
            net.own(id, 5, output(5));
        }
        net.run();
        let clerk = net.clerk(1);
        clerk.handle_timeout(1_000);
        clerk.handle_timeout(1_000 + STOP_GRACE_MS);
        assert_eq!(clerk.peers_certified_end(0), 6, "only 2 counts now");
        clerk.link_up(3);
        clerk.peer_readiness(3, true, false, true, 103);
        clerk.handle_timeout(1_000 + STOP_GRACE_MS + 10);
        assert_eq!(clerk.peers_certified_end(0), 5, "3 is back: it counts again");
    }

    #[test]
    fn a_quarantined_peer_never_holds_stop_at_end_back() {
        // spec: Clerk.StopAtEnd
        let mut net = net_with_instance_3_quarantined();
        for offset in 20..22 {
            for id in [1, 2] {
                net.own(id, offset, output(offset));
            }
        }
        net.run();
        let clerk = net.clerk(1);
        clerk.handle_timeout(0);
        assert!(clerk.peers().iter().any(|v| v.instance_id == 3 && v.quarantined && v.link_up));
        assert_eq!(clerk.peers_certified_end(0), 22, "3 (still at 20) does not count");
    }
}
