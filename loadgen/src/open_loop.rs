//! The measured, open-loop schedule on one thread: non-blocking sockets and one epoll loop
//! (mio), as wrk does. A request costs a write, a read and a share of one `epoll_wait`;
//! no timer, task or wake-up of its own (spec: Loadgen.OpenLoopSchedule,
//! Loadgen.CostPerRequest). The rules are `run.rs`'s: request n of connection c of C is
//! intended at start + (n·C + c) / rate, a late connection sends at once, latency counts
//! from the intended time, and every failed attempt is retried with the same key and body
//! after a backoff, on the next target when the instance was silent or gone.
//!
//! One request is in flight per connection; after any error the connection is closed, so
//! an answer still in flight on it is never taken for the next request's.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use hyper::StatusCode;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::client::{Answer, AttemptError, Target, MAX_ANSWER_BYTES};
use crate::requests::{
    attempt_outcome, count_attempt, next_request, record_result, retry_jitter, Attempt, RunConfig, Schedule, Scheduled,
    State, Submitted, BACKOFF_INITIAL, BACKOFF_MAX,
};
use crate::workload::Generator;

/// Bytes read from a socket at a time.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// The loop wakes at least this often (progress, attempts' deadlines).
const MAX_WAIT: Duration = Duration::from_millis(100);
/// How often attempts are checked against their deadlines: a timeout is noticed this much
/// late at most (the default timeout is 10 s).
const EXPIRY_SCAN: Duration = Duration::from_millis(50);

/// What a connection does now.
enum Phase {
    /// Waiting for its next slot.
    Idle,
    /// An attempt is written (or being written) and awaits its answer until the deadline.
    InFlight { deadline: Instant },
    /// A failed attempt waits before the next.
    BackingOff { until: Instant },
}

/// The request a connection is working on.
struct Current {
    request: Scheduled,
    body: Vec<u8>,
    attempt: u32,
    backoff: Duration,
}

struct Conn {
    target: usize,
    stream: Option<TcpStream>,
    connecting: bool,
    out: Vec<u8>,
    written: usize,
    input: Vec<u8>,
    generator: Generator,
    next_slot: u64,
    current: Option<Current>,
    phase: Phase,
    /// Only the newest timer of a connection counts.
    timer_generation: u64,
    done: bool,
}

/// Answers received so far, shared with the cost sampler's thread.
pub type AnsweredCounter = std::sync::Arc<std::sync::atomic::AtomicU64>;

/// Runs the schedule to its end and the drain; every answer lands in `state`.
pub(crate) fn run_schedule(
    config: &RunConfig,
    state: &mut State,
    schedule: Schedule,
    answered: &AnsweredCounter,
    mut progress: impl FnMut(&State),
) -> anyhow::Result<()> {
    let mut looper = Looper::new(config, state, schedule, answered)?;
    for c in 0..config.connections {
        looper.start_next(c);
    }
    let mut last_progress = Instant::now();
    while looper.conns.iter().any(|conn| !conn.done) {
        looper.turn()?;
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            progress(looper.state);
        }
    }
    Ok(())
}

struct Looper<'a> {
    config: &'a RunConfig,
    state: &'a mut State,
    schedule: Schedule,
    drain_deadline: Instant,
    poll: Poll,
    events: Events,
    conns: Vec<Conn>,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    scratch: Vec<u8>,
    answered: &'a AnsweredCounter,
    next_expiry_scan: Instant,
}

impl<'a> Looper<'a> {
    fn new(
        config: &'a RunConfig,
        state: &'a mut State,
        schedule: Schedule,
        answered: &'a AnsweredCounter,
    ) -> anyhow::Result<Self> {
        let conns = (0..config.connections)
            .map(|c| Conn {
                target: c % config.targets.len(),
                stream: None,
                connecting: false,
                out: Vec::with_capacity(1024),
                written: 0,
                input: Vec::with_capacity(4096),
                generator: Generator::new(&config.workload, c as u64 + 1),
                next_slot: 0,
                current: None,
                phase: Phase::Idle,
                timer_generation: 0,
                done: false,
            })
            .collect();
        Ok(Self {
            config,
            state,
            schedule,
            drain_deadline: schedule.end + config.drain,
            poll: Poll::new().context("creating the epoll instance")?,
            events: Events::with_capacity(1024),
            conns,
            timers: BinaryHeap::new(),
            scratch: vec![0; READ_CHUNK_BYTES],
            answered,
            next_expiry_scan: Instant::now() + EXPIRY_SCAN,
        })
    }

    /// One round: wait for readiness or the next timer, then handle both.
    fn turn(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let next_timer = self.timers.peek().map_or(MAX_WAIT, |Reverse((at, _, _))| at.saturating_duration_since(now));
        let wait = next_timer.min(self.next_expiry_scan.saturating_duration_since(now)).min(MAX_WAIT);
        match self.poll.poll(&mut self.events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("waiting for sockets"),
        }
        let ready: Vec<(usize, bool, bool)> =
            self.events.iter().map(|e| (e.token().0, e.is_readable() || e.is_read_closed(), e.is_writable())).collect();
        for (c, readable, writable) in ready {
            self.on_ready(c, readable, writable);
        }
        let now = Instant::now();
        if now >= self.next_expiry_scan {
            self.next_expiry_scan = now + EXPIRY_SCAN;
            self.expire_attempts(now);
        }
        while let Some(&Reverse((at, c, generation))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            if self.conns[c].timer_generation == generation {
                self.on_timer(c, now);
            }
        }
        Ok(())
    }

    /// Attempts past their deadline time out (spec: Loadgen.RetrySameKey): one scan of the
    /// connections every `EXPIRY_SCAN` instead of a timer per attempt.
    fn expire_attempts(&mut self, now: Instant) {
        for c in 0..self.conns.len() {
            if matches!(self.conns[c].phase, Phase::InFlight { deadline } if now >= deadline) {
                self.attempt_done(c, Err(AttemptError::Timeout(self.config.request_timeout)));
            }
        }
    }

    fn set_timer(&mut self, c: usize, at: Instant) {
        let conn = &mut self.conns[c];
        conn.timer_generation += 1;
        self.timers.push(Reverse((at, c, conn.timer_generation)));
    }

    fn on_timer(&mut self, c: usize, now: Instant) {
        match self.conns[c].phase {
            Phase::Idle => self.start_next(c),
            Phase::BackingOff { until } if now >= until => self.send_attempt(c),
            Phase::InFlight { .. } | Phase::BackingOff { .. } => {}
        }
    }

    /// The connection's next slot: sent now if due, else a timer for it; past the
    /// schedule's end the connection is done (spec: Loadgen.OpenLoopSchedule).
    fn start_next(&mut self, c: usize) {
        let connections = self.config.connections as u64;
        let slot = (self.conns[c].next_slot * connections + c as u64) as f64;
        let intended = self.schedule.start + Duration::from_nanos((slot * 1e9 / self.config.rate_per_s) as u64);
        if intended >= self.schedule.end {
            let conn = &mut self.conns[c];
            conn.done = true;
            if let Some(mut stream) = conn.stream.take() {
                let _ = self.poll.registry().deregister(&mut stream);
            }
            return;
        }
        if intended > Instant::now() {
            self.set_timer(c, intended);
            return;
        }
        let n = self.conns[c].next_slot;
        self.conns[c].next_slot += 1;
        let (duplicate_of, key, command) = next_request(self.config, self.state, &mut self.conns[c].generator, c, n);
        let body = serde_json::to_vec(&command).expect("commands serialise");
        let measured = intended >= self.schedule.measure_from;
        let second = measured.then(|| (intended - self.schedule.measure_from).as_secs() as usize);
        let request = Scheduled { intended, second, key, command, duplicate_of };
        self.conns[c].current = Some(Current { request, body, attempt: 0, backoff: BACKOFF_INITIAL });
        self.send_attempt(c);
    }

    /// Writes the current request's next attempt, connecting first if needed.
    fn send_attempt(&mut self, c: usize) {
        let deadline = Instant::now() + self.config.request_timeout;
        let target = &self.config.targets[self.conns[c].target];
        let conn = &mut self.conns[c];
        let current = conn.current.as_ref().expect("an attempt is for a current request");
        conn.out.clear();
        conn.written = 0;
        conn.input.clear();
        write_request(&mut conn.out, target, &current.request.key, &current.body);
        conn.phase = Phase::InFlight { deadline };
        // No timer: `expire_attempts` finds an attempt past its deadline.
        conn.timer_generation += 1;
        if self.conns[c].stream.is_none() {
            if let Err(e) = self.connect(c) {
                self.attempt_done(c, Err(e));
            }
            return;
        }
        self.flush(c);
    }

    fn connect(&mut self, c: usize) -> Result<(), AttemptError> {
        let addr = self.config.targets[self.conns[c].target].addr;
        let mut stream =
            TcpStream::connect(addr).map_err(|e| AttemptError::Connection(format!("connect {addr}: {e}")))?;
        stream.set_nodelay(true).map_err(|e| AttemptError::Connection(e.to_string()))?;
        self.poll
            .registry()
            .register(&mut stream, Token(c), Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| AttemptError::Connection(e.to_string()))?;
        let conn = &mut self.conns[c];
        conn.stream = Some(stream);
        conn.connecting = true;
        Ok(())
    }

    fn on_ready(&mut self, c: usize, readable: bool, writable: bool) {
        if !matches!(self.conns[c].phase, Phase::InFlight { .. }) {
            // An idle or backing-off connection has nothing to read: the server closed it.
            if readable {
                self.drop_stream(c);
            }
            return;
        }
        if self.conns[c].connecting && writable {
            let stream = self.conns[c].stream.as_ref().expect("connecting has a stream");
            if let Some(e) = stream.take_error().ok().flatten().or_else(|| stream.peer_addr().err()) {
                let addr = self.config.targets[self.conns[c].target].addr;
                return self.attempt_done(c, Err(AttemptError::Connection(format!("connect {addr}: {e}"))));
            }
            self.conns[c].connecting = false;
        }
        if writable && !self.conns[c].connecting {
            self.flush(c);
        }
        if readable && matches!(self.conns[c].phase, Phase::InFlight { .. }) {
            self.read(c);
        }
    }

    /// Writes what is left of the request; the rest waits for writability.
    fn flush(&mut self, c: usize) {
        let conn = &mut self.conns[c];
        let Some(stream) = conn.stream.as_mut() else { return };
        if conn.connecting {
            return;
        }
        while conn.written < conn.out.len() {
            match stream.write(&conn.out[conn.written..]) {
                Ok(0) => return self.attempt_done(c, Err(AttemptError::Connection("the socket took nothing".into()))),
                Ok(n) => conn.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.attempt_done(c, Err(AttemptError::Connection(e.to_string()))),
            }
        }
    }

    /// Reads until the answer is whole or the socket is drained.
    fn read(&mut self, c: usize) {
        loop {
            let conn = &mut self.conns[c];
            let Some(stream) = conn.stream.as_mut() else { return };
            match stream.read(&mut self.scratch) {
                Ok(0) => return self.attempt_done(c, Err(AttemptError::Connection("closed by the server".into()))),
                Ok(n) => conn.input.extend_from_slice(&self.scratch[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return self.attempt_done(c, Err(AttemptError::Connection(e.to_string()))),
            }
            match parse_response(&conn.input) {
                Ok(Some((answer, close))) => {
                    if close {
                        self.drop_stream(c);
                    }
                    return self.attempt_done(c, Ok(answer));
                }
                Ok(None) => {}
                Err(e) => return self.attempt_done(c, Err(AttemptError::Connection(e))),
            }
        }
    }

    fn drop_stream(&mut self, c: usize) {
        if let Some(mut stream) = self.conns[c].stream.take() {
            let _ = self.poll.registry().deregister(&mut stream);
        }
        self.conns[c].connecting = false;
    }

    /// An attempt ended: counted, then the request is finished or retried (spec:
    /// Loadgen.RetrySameKey).
    fn attempt_done(&mut self, c: usize, result: Result<Answer, AttemptError>) {
        if result.is_err() {
            self.drop_stream(c);
        }
        let current = self.conns[c].current.as_mut().expect("an attempt is for a current request");
        let (attempt, second) = (current.attempt, current.request.second);
        let (label, outcome) = match attempt_outcome(result, &current.request.key) {
            Ok(Attempt { label, outcome, bad }) => {
                if let Some(bad) = bad {
                    self.state.ledger.bad_answers.push(bad);
                }
                (label, outcome)
            }
            Err(refused) => return self.finish(c, Err(refused)),
        };
        // A lost or silent instance: the same key is safe on any other (Gateway.ReplayReturnsOriginal).
        if matches!(label.as_ref(), "timeout" | "connection_error") && self.config.targets.len() > 1 {
            self.drop_stream(c);
            self.conns[c].target = (self.conns[c].target + 1) % self.config.targets.len();
        }
        count_attempt(self.state, &label, outcome.is_err(), attempt, second);
        let error = match outcome {
            Ok(record) => return self.finish(c, Ok(Submitted { record, first_attempt: attempt == 0 })),
            Err(e) => e,
        };
        let current = self.conns[c].current.as_mut().expect("still current");
        if Instant::now() + current.backoff > self.drain_deadline {
            return self.finish(c, Err(error));
        }
        let until = Instant::now() + current.backoff + retry_jitter(&current.request.key, attempt, current.backoff);
        current.backoff = (current.backoff * 2).min(BACKOFF_MAX);
        current.attempt += 1;
        self.conns[c].phase = Phase::BackingOff { until };
        self.set_timer(c, until);
    }

    fn finish(&mut self, c: usize, result: Result<Submitted, String>) {
        let current = self.conns[c].current.take().expect("finishing the current request");
        record_result(self.state, current.request, result);
        self.answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.conns[c].phase = Phase::Idle;
        self.start_next(c);
    }
}

/// `POST /v1/movements` with its key and body, keep-alive.
fn write_request(out: &mut Vec<u8>, target: &Target, key: &str, body: &[u8]) {
    let _ = write!(
        out,
        "POST /v1/movements HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\nidempotency-key: {key}\r\ncontent-length: {}\r\n\r\n",
        target.host_header,
        body.len()
    );
    out.extend_from_slice(body);
}

/// A whole answer in `input`, and whether the server closes the connection after it;
/// None while it is not whole yet.
fn parse_response(input: &[u8]) -> Result<Option<(Answer, bool)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(input) {
        Ok(httparse::Status::Complete(head)) => head,
        Ok(httparse::Status::Partial) if input.len() > MAX_ANSWER_BYTES => return Err("an answer too large".into()),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("an unreadable answer: {e}")),
    };
    let code = response.code.ok_or("an answer without a status")?;
    let status = StatusCode::from_u16(code).map_err(|e| e.to_string())?;
    let header = |name: &str| response.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    let length: usize = match header("content-length") {
        Some(value) => {
            std::str::from_utf8(value).ok().and_then(|v| v.trim().parse().ok()).ok_or("a bad content-length")?
        }
        None => return Err("an answer without content-length".into()),
    };
    if length > MAX_ANSWER_BYTES {
        return Err("an answer too large".into());
    }
    if input.len() < head + length {
        return Ok(None);
    }
    let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
    let body = Bytes::copy_from_slice(&input[head..head + length]);
    Ok(Some((Answer { status, body }, close)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_answer_parses_and_a_partial_one_waits() {
        let whole = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}";
        let (answer, close) = parse_response(whole).unwrap().unwrap();
        assert_eq!((answer.status, &answer.body[..], close), (StatusCode::OK, &b"{}"[..], false));
        assert!(parse_response(&whole[..whole.len() - 1]).unwrap().is_none(), "the body is not whole");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-le").unwrap().is_none(), "the head is not whole");
        let closing = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        let (answer, close) = parse_response(closing).unwrap().unwrap();
        assert_eq!((answer.status, close), (StatusCode::REQUEST_TIMEOUT, true));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\n").is_err(), "no content-length");
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn a_request_carries_its_key_and_body() {
        let target: Target = "http://127.0.0.1:8081".parse().unwrap();
        let mut out = Vec::new();
        write_request(&mut out, &target, "k-1", b"{\"a\":1}");
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("POST /v1/movements HTTP/1.1\r\nhost: 127.0.0.1:8081\r\n"), "{text}");
        assert!(text.contains("idempotency-key: k-1\r\n") && text.contains("content-length: 7\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n{\"a\":1}"), "{text}");
    }
}
