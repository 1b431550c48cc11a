//! The Gateway: the REST API (docs/design.md §2, §8; spec: specs/gateway.allium).
//!
//! hyper 1 serves HTTP/1.1 from every shard's glommio executor: each shard accepts on a
//! listener of its own on the address (SO_REUSEPORT) and the kernel spreads connections
//! over them, so no core is the funnel and no second runtime runs. [`listeners`] binds
//! them before the shards start and refuses an address another process listens on (spec
//! Gateway.SoleListener). A connection is a task; a request waiting for certification
//! awaits a oneshot channel, so a slow request never blocks a shard.
//!
//! - [`certified_view`] holds the certified stock view, the recent answers and the
//!   waiters (sans-IO; fed by the Clerk's shell);
//! - [`crate::log::appender`] is the thread that appends commands to the log (group commit);
//! - [`http_io`] adapts hyper's IO traits to glommio's `TcpStream`;
//! - [`routes`] has the endpoints;
//! - [`metrics`] renders `/metrics`.

pub mod certified_view;
pub mod http_io;
pub mod listeners;
pub mod metrics;
pub mod routes;

use std::cell::{Cell, RefCell};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use hyper::server::conn::http1;
use tracing::{debug, info, warn};

use certified_view::{Answer, CertifiedView};

use crate::clerk::FaultControl;
use crate::publish::CertifiedSink;
use http_io::{HyperIo, Phase};

/// The request head (request line and headers) may use this many bytes at most; past it
/// hyper answers 431. (hyper's smallest allowed read buffer is 8 KiB.)
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// How often a connection's watchdog looks at its phase.
const WATCHDOG_TICK: Duration = Duration::from_millis(250);
/// A closing connection discards the client's input this long at most, and this much
/// (spec: Gateway.ClosingConnectionLingers).
const LINGER: Duration = Duration::from_millis(2_000);
const LINGER_MAX_BYTES: usize = 1024 * 1024;
const LINGER_READ_BYTES: usize = 16 * 1024;

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// How long a movement waits for its certified output before 504.
    pub deadline_ms: u64,
    pub max_body_bytes: usize,
    /// A request must arrive whole within this long of its first byte (else 408).
    pub read_timeout_ms: u64,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout_ms: u64,
    pub max_connections_per_shard: usize,
    /// Movements in flight (appending or waiting) per instance; past it, 503 overloaded.
    pub max_waiting: usize,
    /// Certified outputs kept for answers and replays.
    pub answer_capacity: usize,
    /// Bearer token of the admin endpoints; None: they do not exist.
    pub admin_token: Option<String>,
}

/// The defaults, shared with `tribunal run`'s flags.
pub const DEFAULT_DEADLINE_MS: u64 = 5_000;
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
pub const DEFAULT_READ_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;

impl GatewayConfig {
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            deadline_ms: DEFAULT_DEADLINE_MS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            read_timeout_ms: DEFAULT_READ_TIMEOUT_MS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            max_connections_per_shard: 4_096,
            max_waiting: certified_view::DEFAULT_MAX_WAITING,
            answer_capacity: certified_view::DEFAULT_ANSWER_CAPACITY,
            admin_token: None,
        }
    }
}

/// The view as the Clerk (on the last shard) and every shard share it.
pub type SharedView = Mutex<CertifiedView<oneshot::Sender<Answer>>>;

/// Hands certified outputs to the view, then wakes their waiters outside the lock.
impl CertifiedSink for SharedView {
    fn certified(&self, certified: &[(u32, u64, Answer)]) {
        if certified.is_empty() {
            return;
        }
        // Decoded before the lock: handlers on every shard take it too.
        let levels: Vec<_> = certified.iter().map(|(_, _, output)| certified_view::accepted_levels(output)).collect();
        let mut woken = Vec::new();
        {
            let mut view = self.lock().expect("the view lock is never poisoned");
            for ((partition, offset, output), levels) in certified.iter().zip(levels) {
                if let Some(waiter) = view.feed(*partition, *offset, output.clone(), levels).waiter {
                    woken.push(waiter);
                }
            }
        }
        for (waiter, answer) in woken {
            let _ = waiter.send(answer);
        }
    }
}

/// What the node tells the Gateway: readiness and the last status (refreshed by the main
/// thread every status interval).
#[derive(Default)]
pub struct NodeProbe {
    pub ready: AtomicBool,
    /// Why not ready, when not.
    pub not_ready_reason: Mutex<String>,
    /// The node's `status.json`, as last written.
    pub status: Mutex<crate::status::NodeStatus>,
}

pub struct GatewayShared {
    pub config: GatewayConfig,
    pub instance_id: u32,
    /// Every instance of the federation, this one included (readmit targets).
    pub members: Vec<u32>,
    pub expected_copies: u32,
    pub partitions: u32,
    pub view: Arc<SharedView>,
    pub appender: crate::log::appender::Appender,
    pub metrics: metrics::Metrics,
    pub node: Arc<NodeProbe>,
    pub faults: Arc<FaultControl>,
    pub data_dir: PathBuf,
    /// Movements appending or waiting right now (spec: Gateway.WaitingBound).
    pub in_flight: AtomicUsize,
}

/// This shard's listener, bound and listening by [`listeners::bind`], on this executor.
pub fn adopt(listener: std::net::TcpListener) -> TcpListener {
    // SAFETY: the descriptor is a bound, listening TCP socket that nothing else owns:
    // `into_raw_fd` gave up the std listener's ownership of it.
    unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) }
}

/// One shard's accept loop: every connection is its own task.
pub async fn serve(shared: Arc<GatewayShared>, listener: TcpListener, shard: u16) {
    info!(shard, address = %shared.config.listen, "the Gateway accepts HTTP");
    let open = Rc::new(Cell::new(0usize));
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(e) => {
                warn!(shard, "accepting an HTTP connection: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if open.get() >= shared.config.max_connections_per_shard {
            debug!(shard, "too many HTTP connections; closing a new one");
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        open.set(open.get() + 1);
        let (shared, open) = (shared.clone(), open.clone());
        glommio::spawn_local(async move {
            connection(shared, stream).await;
            open.set(open.get() - 1);
        })
        .detach();
    }
}

enum Ended {
    /// hyper finished: the client closed, or an error hyper already answered or logged.
    Served,
    /// spec: Gateway.SlowClientTimedOut
    ReadTimeout,
    /// spec: Gateway.IdleConnectionClosed
    Idle,
}

async fn connection(shared: Arc<GatewayShared>, stream: TcpStream) {
    let stream = Rc::new(RefCell::new(stream));
    let phase = Rc::new(Cell::new(Phase::Idle { since: Instant::now() }));
    let io = HyperIo::new(stream.clone(), phase.clone());
    let service = {
        let (shared, phase) = (shared.clone(), phase.clone());
        hyper::service::service_fn(move |request| {
            let (shared, phase) = (shared.clone(), phase.clone());
            async move { Ok::<_, std::convert::Infallible>(routes::handle(&shared, request, &phase).await) }
        })
    };
    let served = http1::Builder::new().keep_alive(true).max_buf_size(MAX_HEADER_BYTES).serve_connection(io, service);
    let read_timeout = Duration::from_millis(shared.config.read_timeout_ms);
    let idle_timeout = Duration::from_millis(shared.config.idle_timeout_ms);
    let watchdog = {
        let phase = phase.clone();
        async move {
            loop {
                glommio::timer::sleep(WATCHDOG_TICK).await;
                match phase.get() {
                    Phase::Reading { since } if since.elapsed() >= read_timeout => return Ended::ReadTimeout,
                    Phase::Idle { since } if since.elapsed() >= idle_timeout => return Ended::Idle,
                    _ => {}
                }
            }
        }
    };
    let ended = futures_lite::future::or(
        async {
            if let Err(e) = served.await {
                debug!("HTTP connection ended: {e}");
            }
            Ended::Served
        },
        watchdog,
    )
    .await;
    // hyper's connection is dropped by now: the stream is ours again.
    let Ok(stream) = Rc::try_unwrap(stream) else { return };
    let mut stream = stream.into_inner();
    if let Ended::ReadTimeout = ended {
        let body = routes::error_body(
            "request_timeout",
            &format!("the request did not arrive whole within {} ms", read_timeout.as_millis()),
        );
        let head = format!(
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        shared.metrics.observe("timeout", 408, read_timeout.as_secs_f64());
        // A client that does not read either gets no more than the read timeout again.
        let write = async {
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&body).await;
        };
        futures_lite::future::or(write, glommio::timer::sleep(read_timeout)).await;
    }
    if let Ended::Idle = ended {
        // Nothing unread, so no RST to avoid; and a keep-alive client sees the FIN only
        // when it next uses the connection, so lingering would hold the slot for nothing.
        debug!("closing an idle HTTP connection");
        let _ = stream.shutdown(Shutdown::Write).await;
        return;
    }
    linger(stream).await;
}

/// Closes without destroying the answer just written (spec: Gateway.ClosingConnectionLingers).
///
/// Closing a socket whose input was not all read makes the kernel send RST: a client
/// still sending a body the server refused (413, 431) then gets "broken pipe" or
/// "connection reset" instead of its answer. So the server sends FIN first and reads
/// and discards until the client closes too, within explicit bounds of time and bytes.
async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Write).await;
    let discard = async {
        let mut scratch = vec![0u8; LINGER_READ_BYTES];
        let mut discarded_bytes = 0usize;
        while discarded_bytes < LINGER_MAX_BYTES {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(read) => discarded_bytes += read,
            }
        }
        debug!(discarded_bytes, "a closing HTTP client kept sending; resetting it");
    };
    futures_lite::future::or(discard, glommio::timer::sleep(LINGER)).await;
}
