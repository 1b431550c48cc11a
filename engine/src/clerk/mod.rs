//! The Clerk's IO shell: tasks on the last shard's executor (no thread of its own) that drive the sans-IO
//! [`Clerk`](tribunal_federation::clerk::Clerk), the peer links and the fault injection
//! (spec: specs/clerk.allium, specs/federation.allium). The Clerk decides (certification,
//! heartbeats, the hand-over buffer, take-over, the stop-at-end grace); the shell
//! (`shell.rs`) only feeds it inputs and the time, and carries out its actions.
//!
//! Inputs: own outputs, from each shard's Ledger task after its fdatasync (so only
//! durable outputs are ever compared: spec Clerk.OwnCopyRecorded); frames from peers;
//! a tick at most 10 ms apart while outputs or copies come in and 250 ms apart when idle,
//! sooner when the Clerk's `poll_timeout` says (durable and published watermarks, the
//! time; a status snapshot every tick, at most every 100 ms). Outputs: frames to peers,
//! certified outputs to the publisher sink while this instance holds the role, fault
//! reports (log, `faults.jsonl`, status), and atomics the Ushers and the main thread read
//! (certified ends for backpressure and `--stop-at-end`).

mod faults;
pub mod peer_links;
mod shell;
pub mod status;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use glommio::channels::shared_channel::SharedReceiver;
use peer_links::LinksConfig;
pub use status::{FederationStatus, InjectedFaultsStatus, LinksStatus, PartitionStatus, PeerStatus};
use tribunal_federation::clerk::ClerkConfig;

use crate::publish::{CertifiedSink, DurableOutput, PublishBatch};

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
    /// The last status snapshot; None until the shell takes its first.
    pub status: Mutex<Option<FederationStatus>>,
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
            status: Mutex::new(None),
            status_seq: AtomicU64::new(0),
            status_wanted: AtomicBool::new(false),
            failure: Mutex::new(None),
        }
    }

    pub fn certified_end(&self, partition: u32) -> u64 {
        self.certified_end[partition as usize].load(Ordering::Acquire)
    }

    /// Asks the Clerk for a status snapshot and waits (bounded) until it is taken.
    pub fn fresh_status(&self) -> Option<FederationStatus> {
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

/// A peer of this instance: its id and where it accepts federation links.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAddress {
    pub instance_id: u32,
    pub address: std::net::SocketAddr,
}

/// A fault injected at start (`--inject-fault`), loudly: for tests and demonstrations.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Share of outputs, in (0, 1], that get one flipped bit.
    BitFlip { rate: f64 },
    /// Each batch of own outputs is held this long before the Clerk takes it.
    Delay { delay_ms: u64 },
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
/// The Clerk, ready to run on the executor that hosts it (the last shard's): no thread of its
/// own, so own outputs, certified answers and waiting requests meet without a cross-thread
/// wake-up where they share that executor.
pub struct ClerkStarter {
    setup: ClerkSetup,
    own_outputs: Vec<SharedReceiver<Vec<DurableOutput>>>,
    shared: Arc<ClerkShared>,
    durable_end: Arc<dyn Fn(u32) -> u64 + Send + Sync>,
}

impl ClerkStarter {
    pub fn new(
        setup: ClerkSetup,
        own_outputs: Vec<SharedReceiver<Vec<DurableOutput>>>,
        shared: Arc<ClerkShared>,
        durable_end: Arc<dyn Fn(u32) -> u64 + Send + Sync>,
    ) -> Self {
        Self { setup, own_outputs, shared, durable_end }
    }

    /// On the hosting executor: binds the federation listener (an address in use is an
    /// error of the start-up) and starts the Clerk's tasks.
    pub fn start(self) -> anyhow::Result<()> {
        shell::start_shell(self.setup, self.own_outputs, self.shared, self.durable_end)
    }
}
