//! hyper 1 on glommio: the IO adapter between a glommio `TcpStream` and hyper's IO traits,
//! and the phase of a connection that the watchdog reads.
//!
//! Why not a crate: the adapters on crates.io target tokio, and the engine runs no second
//! runtime. Why the stream is shared (`Rc<RefCell<..>>`): when a client is too slow, the
//! connection's hyper future is dropped, and the server still has to write the 408 and
//! close (spec: Gateway.SlowClientTimedOut).

use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

/// Bytes read from the socket per poll at most (hyper asks again for more).
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Where a connection is, for its watchdog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the next request since then (keep-alive idle).
    Idle { since: Instant },
    /// Receiving a request whose first byte came then: it must be whole within the read
    /// timeout.
    Reading { since: Instant },
    /// The request is whole; the handler is working (maybe waiting for certification,
    /// which has its own deadline).
    Handling,
}

pub type SharedStream = Rc<RefCell<TcpStream>>;

/// hyper's view of the connection.
pub struct HyperIo {
    stream: SharedStream,
    phase: Rc<Cell<Phase>>,
    scratch: Box<[u8]>,
}

impl HyperIo {
    pub fn new(stream: SharedStream, phase: Rc<Cell<Phase>>) -> Self {
        Self { stream, phase, scratch: vec![0; READ_CHUNK_BYTES].into_boxed_slice() }
    }
}

impl hyper::rt::Read for HyperIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let want = buf.remaining().min(this.scratch.len());
        let mut stream = this.stream.borrow_mut();
        match Pin::new(&mut *stream).poll_read(cx, &mut this.scratch[..want]) {
            Poll::Ready(Ok(read)) => {
                if read > 0 {
                    if let Phase::Idle { .. } = this.phase.get() {
                        this.phase.set(Phase::Reading { since: Instant::now() });
                    }
                }
                // Copied rather than read into hyper's uninitialised buffer: no unsafe.
                buf.put_slice(&this.scratch[..read]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl hyper::rt::Write for HyperIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.stream.borrow_mut()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream.borrow_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream.borrow_mut()).poll_close(cx)
    }
}
