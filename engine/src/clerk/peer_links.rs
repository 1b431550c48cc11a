//! Peer links: the glommio TCP shell around [`tribunal_federation::handshake`] and [`tribunal_federation::wire`]
//! (spec: specs/federation.allium).
//!
//! Links are one-way. This instance dials every peer and only sends on those connections;
//! it only receives on the connections it accepts. So each pair has two TCP connections,
//! and there is no dial race to settle (spec: Handshake.PeerIdentity).
//!
//! Sending: one bounded queue per peer. Copies beyond `send_queue_copies` are dropped and
//! counted (the peer gets them again through the Clerk's resend on reconnect or its
//! catch-up); control frames are coalesced (the newest watermark per partition, the
//! newest readiness and heartbeat), never dropped. The writer takes everything queued as
//! one write, so under load frames batch by themselves and an idle link adds no delay
//! (spec: Federation.FramesBatched).
//!
//! Receiving: each accepted connection must finish the handshake within
//! `handshake_timeout`; then every frame is opened (length bound, MAC, validation) before
//! anything acts on it. A bad frame closes the connection and is counted; a connection
//! silent for `heartbeat_timeout` is closed and its peer reported down.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use tribunal_federation::clerk::InstanceId;
use tribunal_federation::handshake::{Acceptor, Dialer, HELLO_BYTES, NONCE_BYTES, PROOF_BYTES, REPLY_BYTES};
use tribunal_federation::wire::{Frame, FrameOpener, FrameSealer, SessionKey, LENGTH_PREFIX_BYTES};

use crate::pacing::Pacer;

/// Writes to a peer start at most this often: the frames queued meanwhile (copies,
/// watermarks) join the next write, so a busy link costs one write and one wake-up on
/// each side per interval instead of one per batch of outputs.
const WRITE_INTERVAL: Duration = Duration::from_millis(2);
/// Bytes a link reads at once; a longer frame grows its buffer, up to the frame bound.
const READ_BUFFER_BYTES: usize = 1 << 16;

#[derive(Clone, Debug)]
pub struct LinksConfig {
    pub own_id: InstanceId,
    pub listen: SocketAddr,
    pub peers: Vec<(InstanceId, SocketAddr)>,
    pub psk: Vec<u8>,
    pub max_frame_bytes: usize,
    pub send_queue_copies: usize,
    pub heartbeat_timeout: Duration,
    pub handshake_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl LinksConfig {
    pub fn new(own_id: InstanceId, listen: SocketAddr, peers: Vec<(InstanceId, SocketAddr)>, psk: Vec<u8>) -> Self {
        LinksConfig {
            own_id,
            listen,
            peers,
            psk,
            max_frame_bytes: tribunal_federation::wire::MAX_FRAME_BYTES,
            send_queue_copies: 65_536,
            heartbeat_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(2),
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// What the links tell the Clerk's shell.
#[derive(Debug)]
pub enum LinkEvent {
    /// Our sending link to the peer is established.
    SendingUp(InstanceId),
    /// The peer's sending link to us is gone or silent (spec: Federation.PeerSilent).
    ReceivingDown(InstanceId),
    Frame(InstanceId, Frame),
}

/// Counters for status and metrics (spec: Federation.InvalidFrameDropped, SendQueueBounded).
#[derive(Debug, Default)]
pub struct LinkCounters {
    pub frames_sent: Cell<u64>,
    pub frames_received: Cell<u64>,
    pub bytes_sent: Cell<u64>,
    pub writes: Cell<u64>,
    pub copies_dropped: Cell<u64>,
    pub invalid_frames: Cell<u64>,
    pub handshakes_rejected: Cell<u64>,
    pub last_rejection: RefCell<Option<String>>,
}

fn bump(cell: &Cell<u64>, by: u64) {
    cell.set(cell.get() + by);
}

#[derive(Default)]
struct SendQueue {
    copies: VecDeque<Frame>,
    watermarks: BTreeMap<u32, Frame>,
    readiness: Option<Frame>,
    heartbeat: Option<Frame>,
    others: VecDeque<Frame>,
}

impl SendQueue {
    fn is_empty(&self) -> bool {
        self.copies.is_empty()
            && self.watermarks.is_empty()
            && self.readiness.is_none()
            && self.heartbeat.is_none()
            && self.others.is_empty()
    }

    /// Control first (readiness before watermarks, so a peer learns we are ready before
    /// it reads our watermark), then copies.
    fn drain_into(&mut self, out: &mut Vec<Frame>) {
        out.extend(self.readiness.take());
        out.extend(std::mem::take(&mut self.watermarks).into_values());
        out.extend(self.others.drain(..));
        out.extend(self.copies.drain(..));
        out.extend(self.heartbeat.take());
    }
}

struct Outbound {
    queue: RefCell<SendQueue>,
    doorbell: LocalSender<()>,
}

/// Handle to the links, on the executor that runs them.
pub struct PeerLinks {
    outbound: BTreeMap<InstanceId, Rc<Outbound>>,
    counters: Rc<LinkCounters>,
    send_queue_copies: usize,
}

impl PeerLinks {
    /// Binds the listener (an error if the address is taken) and spawns the dialers and
    /// the acceptor on the current glommio executor.
    pub fn start(config: LinksConfig, events: LocalSender<LinkEvent>) -> std::io::Result<PeerLinks> {
        // spec: PeerWire.SoleListener — one socket, so no SO_REUSEPORT (glommio's `bind`
        // sets it, and a second process could then share the address): std's bind, which
        // refuses an address anything listens on.
        let listener = std::net::TcpListener::bind(config.listen)?;
        // SAFETY: a bound, listening TCP socket whose ownership `into_raw_fd` gave up.
        let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };
        let counters = Rc::new(LinkCounters::default());
        let events = Rc::new(events);
        let mut outbound = BTreeMap::new();
        for &(peer, address) in &config.peers {
            let (doorbell, rings) = local_channel::new_bounded(1);
            let link = Rc::new(Outbound { queue: RefCell::new(SendQueue::default()), doorbell });
            outbound.insert(peer, link.clone());
            let (config, events, counters) = (config.clone(), events.clone(), counters.clone());
            glommio::spawn_local(dial_loop(config, peer, address, link, rings, events, counters)).detach();
        }
        let generations = Rc::new(RefCell::new(BTreeMap::<InstanceId, u64>::new()));
        let (config_a, events_a, counters_a) = (config.clone(), events.clone(), counters.clone());
        glommio::spawn_local(async move {
            let mut next_generation = 0u64;
            loop {
                match listener.accept().await {
                    Ok(stream) => {
                        next_generation += 1;
                        let task = receive(
                            config_a.clone(),
                            stream,
                            next_generation,
                            generations.clone(),
                            events_a.clone(),
                            counters_a.clone(),
                        );
                        glommio::spawn_local(task).detach();
                    }
                    Err(error) => {
                        warn!(%error, "accepting a federation connection");
                        glommio::timer::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        })
        .detach();
        Ok(PeerLinks { outbound, counters, send_queue_copies: config.send_queue_copies })
    }

    pub fn counters(&self) -> &LinkCounters {
        &self.counters
    }

    /// Queues a frame for `peer`: copies are bounded, control frames coalesced
    /// (spec: Federation.CopyEnqueued, Federation.SendQueueBounded, Federation.ControlFrameCoalesced).
    pub fn send(&self, peer: InstanceId, frame: Frame) {
        let Some(link) = self.outbound.get(&peer) else { return };
        {
            let mut queue = link.queue.borrow_mut();
            match frame {
                Frame::Copy { .. } | Frame::CertifiedCopy { .. } => {
                    if queue.copies.len() >= self.send_queue_copies {
                        bump(&self.counters.copies_dropped, 1);
                        return;
                    }
                    queue.copies.push_back(frame);
                }
                Frame::Watermark { partition, .. } => {
                    queue.watermarks.insert(partition, frame);
                }
                Frame::Readiness { .. } => queue.readiness = Some(frame),
                Frame::Heartbeat { .. } => queue.heartbeat = Some(frame),
                Frame::Readmit { .. } => queue.others.push_back(frame),
            }
        }
        let _ = link.doorbell.try_send(());
    }

    /// Copies waiting for `peer`.
    pub fn queued_copies(&self, peer: InstanceId) -> usize {
        self.outbound.get(&peer).map_or(0, |l| l.queue.borrow().copies.len())
    }
}

fn nonce() -> [u8; NONCE_BYTES] {
    let mut nonce = [0u8; NONCE_BYTES];
    getrandom::fill(&mut nonce).expect("the OS random source works");
    nonce
}

/// backoff(n) = min(base * 2^(n-1), max), with +-20 % jitter from the nonce source
/// (spec: Federation.ReconnectWithBackoff).
fn backoff(config: &LinksConfig, attempt: u32) -> Duration {
    let exponent = attempt.saturating_sub(1).min(16);
    let raw = config.backoff_base.saturating_mul(1 << exponent).min(config.backoff_max);
    let jitter = nonce()[0] as u64 % 41; // 0..=40
    raw * (80 + jitter as u32) / 100
}

async fn with_timeout<T>(
    limit: Duration,
    future: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    glommio::timer::timeout(limit, async { future.await.map_err(glommio::GlommioError::from) }).await.map_err(|e| {
        match e {
            glommio::GlommioError::IoError(e) => e,
            other => std::io::Error::new(std::io::ErrorKind::TimedOut, other.to_string()),
        }
    })
}

/// Dials `peer` and runs the dialer's side of the handshake (spec: Federation.HandshakeAuthenticates).
async fn connect(
    config: &LinksConfig,
    peer: InstanceId,
    address: SocketAddr,
) -> std::io::Result<(TcpStream, SessionKey)> {
    let mut stream = with_timeout(config.handshake_timeout, async {
        TcpStream::connect(address).await.map_err(std::io::Error::from)
    })
    .await?;
    stream.set_nodelay(true)?;
    let (dialer, hello) = Dialer::new(&config.psk, config.own_id, peer, nonce());
    let key = with_timeout(config.handshake_timeout, async {
        stream.write_all(&hello).await?;
        let mut reply = [0u8; REPLY_BYTES];
        stream.read_exact(&mut reply).await?;
        let (proof, key) = dialer
            .on_reply(&reply)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string()))?;
        stream.write_all(&proof).await?;
        Ok(key)
    })
    .await?;
    Ok::<_, std::io::Error>((stream, key))
}

async fn dial_loop(
    config: LinksConfig,
    peer: InstanceId,
    address: SocketAddr,
    link: Rc<Outbound>,
    rings: LocalReceiver<()>,
    events: Rc<LocalSender<LinkEvent>>,
    counters: Rc<LinkCounters>,
) {
    let mut attempt = 0u32;
    let mut frames = Vec::new();
    let mut bytes = Vec::with_capacity(1 << 16);
    loop {
        let connected = connect(&config, peer, address).await;
        let (mut stream, key) = match connected {
            Ok(c) => c,
            Err(error) => {
                attempt += 1;
                if attempt == 1 || attempt % 20 == 0 {
                    info!(peer, %address, %error, attempt, "federation link not up yet");
                }
                glommio::timer::sleep(backoff(&config, attempt)).await;
                continue;
            }
        };
        info!(peer, %address, "federation link up (sending)");
        let mut sealer = FrameSealer::new(key);
        let _ = events.send(LinkEvent::SendingUp(peer)).await;
        let writer = Writer { config: &config, peer, link: &link, rings: &rings, counters: &counters };
        let failed = writer.write_until_failed(&mut stream, &mut sealer, &mut frames, &mut bytes).await;
        warn!(peer, %address, error = %failed, "federation link down (sending); reconnecting");
        let _ = stream.close().await;
        attempt = 1;
        glommio::timer::sleep(backoff(&config, attempt)).await;
    }
}

/// The sending side of one established link.
struct Writer<'a> {
    config: &'a LinksConfig,
    peer: InstanceId,
    link: &'a Outbound,
    rings: &'a LocalReceiver<()>,
    counters: &'a LinkCounters,
}

impl Writer<'_> {
    /// Everything queued is one write (spec: Federation.BatchFlushedOnSize/OnDelay), until
    /// a write fails.
    async fn write_until_failed(
        &self,
        stream: &mut TcpStream,
        sealer: &mut FrameSealer,
        frames: &mut Vec<Frame>,
        bytes: &mut Vec<u8>,
    ) -> std::io::Error {
        let (peer, link, counters) = (self.peer, self.link, self.counters);
        let mut pacer = Pacer::new(WRITE_INTERVAL);
        loop {
            // spec: Federation.BatchFlushedOnDelay — frames queued meanwhile join this write.
            let wait = pacer.wait(Instant::now());
            if !wait.is_zero() {
                glommio::timer::sleep(wait).await;
            }
            if link.queue.borrow().is_empty() {
                // Wake on a new frame only: heartbeats are frames, so a dead peer is
                // noticed at the next one's write (spec: Federation.HeartbeatSent).
                if self.rings.recv().await.is_none() {
                    return std::io::Error::other("the links were shut down");
                }
                continue;
            }
            pacer.started(Instant::now());
            link.queue.borrow_mut().drain_into(frames);
            bytes.clear();
            let n = frames.len() as u64;
            for frame in frames.drain(..) {
                if let Err(error) = sealer.seal(&frame, bytes) {
                    warn!(peer, %error, "a frame too large to send was dropped");
                }
            }
            if let Err(error) = with_timeout(self.config.heartbeat_timeout * 5, stream.write_all(bytes)).await {
                break error;
            }
            bump(&counters.frames_sent, n);
            bump(&counters.bytes_sent, bytes.len() as u64);
            bump(&counters.writes, 1);
        }
    }
}

/// The acceptor's side of the handshake: the peer and the session key, or why not
/// (spec: Federation.HandshakeAuthenticates / HandshakeRejected).
async fn accept_handshake(
    config: &LinksConfig,
    stream: &mut TcpStream,
) -> Result<(InstanceId, SessionKey), std::io::Error> {
    let known = config.peers.iter().map(|p| p.0).collect::<Vec<_>>();
    let own_id = config.own_id;
    with_timeout(config.handshake_timeout, async {
        let mut acceptor = Acceptor::new(&config.psk, own_id, nonce());
        let mut hello = [0u8; HELLO_BYTES];
        stream.read_exact(&mut hello).await?;
        let denied = |e: tribunal_federation::handshake::HandshakeError| {
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string())
        };
        let reply = acceptor.on_hello(&hello, |id| id != own_id && known.contains(&id)).map_err(denied)?;
        stream.write_all(&reply).await?;
        let mut proof = [0u8; PROOF_BYTES];
        stream.read_exact(&mut proof).await?;
        acceptor.on_proof(&proof).map_err(denied)
    })
    .await
}

async fn receive(
    config: LinksConfig,
    mut stream: TcpStream,
    generation: u64,
    generations: Rc<RefCell<BTreeMap<InstanceId, u64>>>,
    events: Rc<LocalSender<LinkEvent>>,
    counters: Rc<LinkCounters>,
) {
    let remote = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let _ = stream.set_nodelay(true);
    let (peer, key) = match accept_handshake(&config, &mut stream).await {
        Ok(ok) => ok,
        Err(error) => {
            bump(&counters.handshakes_rejected, 1);
            *counters.last_rejection.borrow_mut() = Some(format!("{remote}: {error}"));
            warn!(%remote, %error, "federation handshake rejected");
            return;
        }
    };
    generations.borrow_mut().insert(peer, generation);
    info!(peer, %remote, "federation link up (receiving)");
    let current = || generations.borrow().get(&peer) == Some(&generation);
    let reader = Reader { config: &config, peer, remote: &remote, events: &events, counters: &counters };
    let Some(reason) = reader.read_until_down(&mut stream, key, current).await else {
        return; // the shell is gone
    };
    warn!(peer, %remote, %reason, "federation link down (receiving)");
    if current() {
        generations.borrow_mut().remove(&peer);
        let _ = events.send(LinkEvent::ReceivingDown(peer)).await;
    }
}

/// The receiving side of one authenticated connection.
struct Reader<'a> {
    config: &'a LinksConfig,
    peer: InstanceId,
    remote: &'a str,
    events: &'a LocalSender<LinkEvent>,
    counters: &'a LinkCounters,
}

impl Reader<'_> {
    /// Opens and hands on frames until the connection closes, falls silent, is replaced
    /// (`current` turns false) or carries an invalid frame: why. None: the events
    /// channel is closed.
    async fn read_until_down(
        &self,
        stream: &mut TcpStream,
        key: SessionKey,
        current: impl Fn() -> bool,
    ) -> Option<String> {
        let (peer, remote, counters) = (self.peer, self.remote, self.counters);
        let mut opener = FrameOpener::new(key, self.config.max_frame_bytes);
        let mut buffer = ReceiveBuffer::new(self.config.max_frame_bytes);
        let reason = 'read: loop {
            let read = match with_timeout(self.config.heartbeat_timeout, stream.read(buffer.spare())).await {
                Ok(0) => break 'read "closed by the peer".to_string(),
                Ok(n) => n,
                Err(error) => break 'read format!("silent or failed: {error}"),
            };
            if !current() {
                break 'read "replaced by a newer connection".to_string();
            }
            buffer.received(read);
            loop {
                match buffer.next_frame(&mut opener) {
                    Ok(Some(frame)) => {
                        bump(&counters.frames_received, 1);
                        if self.events.send(LinkEvent::Frame(peer, frame)).await.is_err() {
                            return None;
                        }
                    }
                    Ok(None) => break,
                    Err(error) => {
                        // spec: Federation.InvalidFrameDropped — the stream position is untrusted now.
                        bump(&counters.invalid_frames, 1);
                        *counters.last_rejection.borrow_mut() = Some(format!("{remote} (instance {peer}): {error}"));
                        break 'read format!("invalid frame ({}): {error}", error.reason());
                    }
                }
            }
        };
        Some(reason)
    }
}

/// Received bytes not yet opened: read into in place and opened from where they lie (no
/// copy per read). A frame is bounded (the opener refuses a longer length prefix), so the
/// buffer grows at most to one whole frame, and what is left after the whole frames is
/// the start of one, moved to the front.
struct ReceiveBuffer {
    bytes: Vec<u8>,
    /// Bytes received.
    filled: usize,
    /// Bytes already opened as frames.
    consumed: usize,
    largest_frame_bytes: usize,
}

impl ReceiveBuffer {
    fn new(max_frame_bytes: usize) -> Self {
        let largest_frame_bytes = max_frame_bytes + LENGTH_PREFIX_BYTES;
        ReceiveBuffer {
            bytes: vec![0u8; READ_BUFFER_BYTES.min(largest_frame_bytes)],
            filled: 0,
            consumed: 0,
            largest_frame_bytes,
        }
    }

    /// Where the next read goes; never empty.
    fn spare(&mut self) -> &mut [u8] {
        if self.filled == self.bytes.len() {
            assert!(
                self.bytes.len() < self.largest_frame_bytes,
                "a full buffer of the largest size holds a whole frame"
            );
            self.bytes.resize((self.bytes.len() * 2).min(self.largest_frame_bytes), 0);
        }
        &mut self.bytes[self.filled..]
    }

    fn received(&mut self, read_bytes: usize) {
        self.filled += read_bytes;
        assert!(self.filled <= self.bytes.len());
    }

    /// The next whole frame; None once only part of one is left (moved to the front).
    fn next_frame(&mut self, opener: &mut FrameOpener) -> Result<Option<Frame>, tribunal_federation::wire::WireError> {
        match opener.open(&self.bytes[self.consumed..self.filled])? {
            Some((frame, used)) => {
                self.consumed += used;
                Ok(Some(frame))
            }
            None => {
                if self.consumed > 0 {
                    self.bytes.copy_within(self.consumed..self.filled, 0);
                }
                self.filled -= self.consumed;
                self.consumed = 0;
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: SessionKey = [7u8; 32];

    fn sealed(frames: &[Frame]) -> Vec<u8> {
        let mut sealer = FrameSealer::new(KEY);
        let mut out = Vec::new();
        for frame in frames {
            sealer.seal(frame, &mut out).unwrap();
        }
        out
    }

    /// Feeds `wire` in reads of at most `read_bytes`, as a socket would, and opens frames;
    /// also says how large the buffer grew.
    fn receive(wire: &[u8], read_bytes: usize, max_frame_bytes: usize) -> (Vec<Frame>, usize) {
        let (mut buffer, mut opener) = (ReceiveBuffer::new(max_frame_bytes), FrameOpener::new(KEY, max_frame_bytes));
        let (mut at, mut frames) = (0, Vec::new());
        while at < wire.len() {
            let spare = buffer.spare();
            let n = spare.len().min(read_bytes).min(wire.len() - at);
            spare[..n].copy_from_slice(&wire[at..at + n]);
            buffer.received(n);
            at += n;
            while let Some(frame) = buffer.next_frame(&mut opener).unwrap() {
                frames.push(frame);
            }
        }
        assert_eq!((buffer.filled, buffer.consumed), (0, 0), "nothing left over");
        (frames, buffer.bytes.len())
    }

    #[test]
    fn frames_longer_than_a_read_and_than_the_first_buffer_arrive_whole() {
        let max = tribunal_federation::wire::MAX_FRAME_BYTES;
        let frames = vec![
            Frame::Copy { partition: 0, offset: 1, output: vec![1; 10] },
            Frame::Copy { partition: 0, offset: 2, output: vec![2; 3 * READ_BUFFER_BYTES] },
            Frame::Watermark { partition: 0, durable_end: 3, certified_end: 2 },
            Frame::Copy { partition: 0, offset: 3, output: vec![3; max - 200] },
        ];
        let wire = sealed(&frames);
        for read_bytes in [1, 7_001, READ_BUFFER_BYTES, usize::MAX] {
            assert_eq!(receive(&wire, read_bytes, max).0, frames, "in reads of {read_bytes} bytes");
        }
    }

    #[test]
    fn a_frame_of_exactly_the_bound_fills_the_largest_buffer_and_the_next_one_follows() {
        let max = 100_000;
        let copy = |output_bytes| Frame::Copy { partition: 0, offset: 1, output: vec![9; output_bytes] };
        let prefix = |wire: &[u8]| u32::from_le_bytes(wire[..4].try_into().unwrap()) as usize;
        let short = max - 200;
        let frame = copy(short + max - prefix(&sealed(&[copy(short)])));
        let wire = sealed(&[frame.clone(), frame.clone()]);
        assert_eq!(prefix(&wire), max, "the frame is exactly at the bound");
        // The buffer is never larger than one frame (`spare` asserts it), and this one fills it.
        let (frames, buffer_bytes) = receive(&wire, usize::MAX, max);
        assert_eq!(buffer_bytes, max + LENGTH_PREFIX_BYTES, "grown to the largest frame");
        assert_eq!(frames, vec![frame.clone(), frame]);
    }
}
