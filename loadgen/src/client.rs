//! One keep-alive HTTP/1.1 connection to an instance: hyper 1's client over a glommio
//! `TcpStream`, inside loadgen's single glommio executor (no second runtime, as in the
//! engine). One request at a time per connection, like wrk2.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};

/// Bytes read from the socket per poll at most.
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// An answer larger than this is not one of ours (stock of one SKU stays far below it).
pub const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// An instance's address, from `http://host:port` (what `--target` takes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
    pub(crate) host_header: String,
}

impl std::str::FromStr for Target {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Self> {
        let url = text.trim_end_matches('/');
        let Some(authority) = url.strip_prefix("http://") else {
            bail!("target {text:?} must look like http://HOST:PORT (https is not supported)");
        };
        if authority.contains('/') {
            bail!("target {text:?} must not have a path");
        }
        let addr = authority
            .to_socket_addrs()
            .with_context(|| format!("resolving target {text:?}"))?
            .next()
            .with_context(|| format!("target {text:?} resolves to no address"))?;
        Ok(Self { url: url.to_owned(), addr, host_header: authority.to_owned() })
    }
}

/// Why an attempt got no HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection: {0}")]
    Connection(String),
}

/// An HTTP answer: status and the whole body.
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

pub struct Connection {
    target: Target,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Connection {
    /// Not connected yet: the first request connects.
    pub fn new(target: Target) -> Self {
        Self { target, sender: None }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// One request, within `timeout` (connecting included). After any error the connection
    /// is dropped, and the next request opens a new one: an answer that may still be in
    /// flight on the old one must not be taken for the next request's.
    pub async fn request(
        &mut self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, AttemptError> {
        let attempt = self.attempt(method, path_and_query, headers, body);
        let timed = futures_lite::future::or(async { Some(attempt.await) }, async {
            glommio::timer::sleep(timeout).await;
            None
        });
        let result = match timed.await {
            Some(result) => result,
            None => Err(AttemptError::Timeout(timeout)),
        };
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    async fn attempt(
        &mut self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Answer, AttemptError> {
        let connection_error = |e: &dyn std::fmt::Display| AttemptError::Connection(e.to_string());
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.sender = Some(connect(self.target.addr).await?);
        }
        let sender = self.sender.as_mut().expect("just connected");
        sender.ready().await.map_err(|e| connection_error(&e))?;
        let mut request = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(hyper::header::HOST, &self.target.host_header)
            .header(hyper::header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body)).map_err(|e| connection_error(&e))?;
        let response = sender.send_request(request).await.map_err(|e| connection_error(&e))?;
        let status = response.status();
        let limited = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_BYTES);
        let body = limited.collect().await.map_err(|e| connection_error(&e))?.to_bytes();
        Ok(Answer { status, body })
    }
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, AttemptError> {
    let stream =
        TcpStream::connect(addr).await.map_err(|e| AttemptError::Connection(format!("connect {addr}: {e}")))?;
    stream.set_nodelay(true).map_err(|e| AttemptError::Connection(e.to_string()))?;
    let io = ClientIo { stream, scratch: vec![0; READ_CHUNK_BYTES].into_boxed_slice() };
    let (sender, connection) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| AttemptError::Connection(e.to_string()))?;
    // The connection future does the IO; it ends when the sender is dropped.
    glommio::spawn_local(async move {
        let _ = connection.await;
    })
    .detach();
    Ok(sender)
}

/// hyper's view of a glommio stream (the engine's server side has its own, which also
/// tracks the connection's phase for its watchdog).
struct ClientIo {
    stream: TcpStream,
    scratch: Box<[u8]>,
}

impl hyper::rt::Read for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let want = buf.remaining().min(this.scratch.len());
        match Pin::new(&mut this.stream).poll_read(cx, &mut this.scratch[..want]) {
            Poll::Ready(Ok(read)) => {
                buf.put_slice(&this.scratch[..read]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl hyper::rt::Write for ClientIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_or_say_why_not() {
        let target: Target = "http://127.0.0.1:8081/".parse().unwrap();
        assert_eq!(target.url, "http://127.0.0.1:8081");
        assert_eq!(target.addr, "127.0.0.1:8081".parse::<SocketAddr>().unwrap());
        for bad in ["127.0.0.1:8081", "https://127.0.0.1:1", "http://127.0.0.1:1/v1", "http://nohost"] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }
}
