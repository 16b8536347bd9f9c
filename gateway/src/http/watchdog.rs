//! The per-connection timeouts of the HTTP server. hyper has only an
//! HTTP/1 header timer, which also runs while a keep-alive connection waits
//! for its next request (so keep-alive lasted only as long as a slow header
//! may), nothing for an idle HTTP/2 connection, and nothing for a client
//! that stops reading a response: each held a connection slot, its task
//! and the response's prefetched blocks for as long as it liked.
//!
//! A connection's I/O and its requests report here; [`Watch::expired`]
//! resolves when one of these deadlines passes, and the server then drops
//! the connection:
//! - **idle** (no request in flight, no byte of the next one): the idle
//!   timeout after the last response ended or the connection opened, as
//!   nginx's `keepalive_timeout` and Go's `IdleTimeout`. HTTP/2 control
//!   frames (PING, SETTINGS) do not keep a connection busy.
//! - **header** (HTTP/1 bytes of the next request received, the request not
//!   yet complete): the header read timeout after its first byte
//!   (slowloris), as Go's `ReadHeaderTimeout`.
//! - **send** (a write blocked because the client accepts no bytes): the
//!   send timeout after the first blocked write with no byte accepted
//!   since, as nginx's `send_timeout`. A slow producer (a block still
//!   coming from a peer) blocks no write, so it is never cut.
//!
//! # Goals
//! - Every state a client can leave a connection in ends by a deadline.
//! - Cheap on the hot path: one uncontended lock per read or write call,
//!   the timer re-armed only when a deadline appears or moves earlier.
//!
//! # Non-goals
//! - Bounding a request body a client sends slowly (uploads read it
//!   whole under their own size limit), or a whole response's duration.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::Response;
use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The deadlines a connection lives by; see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub idle: Duration,
    pub header: Duration,
    pub send: Duration,
}

/// Which deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No request for the idle timeout.
    Idle,
    /// A request header not complete within the header read timeout.
    Header,
    /// The client accepted no byte of a response for the send timeout.
    Send,
}

/// The first bytes of an HTTP/2 connection with prior knowledge.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes said about the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// This many bytes of the HTTP/2 preface seen so far.
    Unknown(usize),
    Http1,
    Http2,
}

#[derive(Debug)]
struct State {
    protocol: Protocol,
    /// Requests whose response has not ended.
    in_flight: usize,
    /// When the connection last had no request in flight.
    idle_since: Instant,
    /// When the first byte of the next HTTP/1 request arrived.
    head_since: Option<Instant>,
    /// When a write first blocked with no byte accepted since.
    blocked_since: Option<Instant>,
}

/// One connection's activity and deadlines, shared by its I/O, its
/// requests' response bodies and the task that serves it.
#[derive(Debug)]
pub struct Watch {
    timeouts: Timeouts,
    state: Mutex<State>,
    /// Woken when a deadline appears or moves earlier.
    changed: Notify,
}

impl Watch {
    pub fn new(timeouts: Timeouts) -> Arc<Self> {
        Arc::new(Self {
            timeouts,
            state: Mutex::new(State {
                protocol: Protocol::Unknown(0),
                in_flight: 0,
                idle_since: Instant::now(),
                head_since: None,
                blocked_since: None,
            }),
            changed: Notify::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent whatever a panicking holder did: each
        // update is a single assignment.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Resolves when a deadline has passed, naming it.
    pub async fn expired(&self) -> Expiry {
        loop {
            let next = self.next_deadline(&self.state());
            match next {
                Some((at, expiry)) if at <= Instant::now() => return expiry,
                Some((at, _)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = self.changed.notified() => {}
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }

    fn next_deadline(&self, s: &State) -> Option<(Instant, Expiry)> {
        let waiting = (s.in_flight == 0).then(|| match s.head_since {
            Some(t) => (t + self.timeouts.header, Expiry::Header),
            None => (s.idle_since + self.timeouts.idle, Expiry::Idle),
        });
        let blocked = s
            .blocked_since
            .map(|t| (t + self.timeouts.send, Expiry::Send));
        match (waiting, blocked) {
            (Some(w), Some(b)) => Some(if b.0 < w.0 { b } else { w }),
            (w, b) => w.or(b),
        }
    }

    fn on_read(&self, bytes: &[u8]) {
        let mut s = self.state();
        if let Protocol::Unknown(seen) = s.protocol {
            let rest = &H2_PREFACE[seen..];
            let n = rest.len().min(bytes.len());
            s.protocol = if bytes[..n] != rest[..n] {
                Protocol::Http1
            } else if seen + n == H2_PREFACE.len() {
                // The preface's first bytes may have looked like a header.
                s.head_since = None;
                Protocol::Http2
            } else {
                Protocol::Unknown(seen + n)
            };
        }
        if s.in_flight == 0 && s.head_since.is_none() && s.protocol != Protocol::Http2 {
            s.head_since = Some(Instant::now());
            drop(s);
            self.changed.notify_one();
        }
    }

    fn on_write<T>(&self, result: &Poll<std::io::Result<T>>, progressed: impl Fn(&T) -> bool) {
        match result {
            Poll::Pending => {
                let mut s = self.state();
                if s.blocked_since.is_none() {
                    s.blocked_since = Some(Instant::now());
                    drop(s);
                    self.changed.notify_one();
                }
            }
            Poll::Ready(Ok(n)) if progressed(n) => {
                let mut s = self.state();
                s.blocked_since = None;
            }
            Poll::Ready(_) => {}
        }
    }

    /// Marks a request in flight until the returned guard is dropped (with
    /// its response's body).
    fn request_started(self: &Arc<Self>) -> InFlight {
        let mut s = self.state();
        s.in_flight += 1;
        s.head_since = None;
        InFlight(self.clone())
    }
}

/// A request in flight on a [`Watch`]ed connection.
#[derive(Debug)]
struct InFlight(Arc<Watch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.0.state();
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.in_flight == 0 {
            s.idle_since = Instant::now();
            s.head_since = None;
            drop(s);
            self.0.changed.notify_one();
        }
    }
}

/// A connection's socket, reporting its reads and writes to its [`Watch`].
#[derive(Debug)]
pub struct WatchedIo<T> {
    io: T,
    watch: Arc<Watch>,
}

impl<T> WatchedIo<T> {
    pub fn new(io: T, watch: Arc<Watch>) -> Self {
        Self { io, watch }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WatchedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let read = &buf.filled()[before..];
            if !read.is_empty() {
                this.watch.on_read(read);
            }
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WatchedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, data);
        this.watch.on_write(&result, |n| *n > 0);
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch.on_write(&result, |n| *n > 0);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_flush(cx);
        this.watch.on_write(&result, |()| false);
        result
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A connection's service: marks each request in flight until its
/// response's body ends or is dropped.
#[derive(Debug, Clone)]
pub struct WatchedService<S> {
    inner: S,
    watch: Arc<Watch>,
}

impl<S> WatchedService<S> {
    pub fn new(inner: S, watch: Arc<Watch>) -> Self {
        Self { inner, watch }
    }
}

type ResponseFuture<E> =
    Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, E>> + Send>>;

impl<S, R> hyper::service::Service<R> for WatchedService<S>
where
    S: hyper::service::Service<R, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn call(&self, request: R) -> Self::Future {
        let in_flight = self.watch.request_started();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                Body::new(Tracked {
                    body,
                    _in_flight: in_flight,
                })
            }))
        })
    }
}

/// A response body holding its request's [`InFlight`] mark; it forwards
/// the size hint, so hyper still sends the body's `Content-Length`.
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real time (tokio's paused clock needs its `test-util` feature):
    // deadlines of a few hundred milliseconds.
    const MS: Duration = Duration::from_millis(1);

    fn timeouts() -> Timeouts {
        Timeouts {
            idle: 400 * MS,
            header: 200 * MS,
            send: 300 * MS,
        }
    }

    async fn expiry_after(watch: &Watch) -> (Expiry, Duration) {
        let t0 = Instant::now();
        let expiry = watch.expired().await;
        (expiry, t0.elapsed())
    }

    /// On time: not early (but for the microseconds between the event
    /// and the test's clock), and not late by more than a loaded machine's
    /// scheduling delay.
    fn about(took: Duration, expected: Duration) -> bool {
        took + 20 * MS >= expected && took < expected + 300 * MS
    }

    #[tokio::test]
    async fn an_idle_connection_expires_after_the_idle_timeout() {
        let (expiry, took) = expiry_after(&Watch::new(timeouts())).await;
        assert_eq!(expiry, Expiry::Idle);
        assert!(about(took, 400 * MS), "{took:?}");
    }

    #[tokio::test]
    async fn a_started_header_expires_after_the_header_timeout_from_its_first_byte() {
        let watch = Watch::new(timeouts());
        tokio::time::sleep(100 * MS).await;
        watch.on_read(b"GET / HT");
        let (expiry, took) = expiry_after(&watch).await;
        assert_eq!(expiry, Expiry::Header);
        assert!(about(took, 200 * MS), "{took:?}");
    }

    #[tokio::test]
    async fn http2_frames_while_idle_do_not_start_a_header_timer() {
        let opened = Instant::now();
        let watch = Watch::new(timeouts());
        watch.on_read(&H2_PREFACE[..5]);
        tokio::time::sleep(100 * MS).await;
        watch.on_read(&H2_PREFACE[5..]);
        watch.on_read(&[0, 0, 8, 6, 0, 0, 0, 0, 0]);
        assert_eq!(watch.expired().await, Expiry::Idle);
        let took = opened.elapsed();
        assert!(about(took, 400 * MS), "{took:?}");
    }

    #[tokio::test]
    async fn a_request_in_flight_is_never_idle_and_idleness_restarts_when_it_ends() {
        let watch = Watch::new(timeouts());
        let in_flight = watch.request_started();
        let waited = tokio::time::timeout(800 * MS, watch.expired()).await;
        assert!(waited.is_err(), "expired with a request in flight");
        drop(in_flight);
        let (expiry, took) = expiry_after(&watch).await;
        assert_eq!(expiry, Expiry::Idle);
        assert!(about(took, 400 * MS), "{took:?}");
    }

    #[tokio::test]
    async fn a_blocked_write_expires_after_the_send_timeout_unless_bytes_move() {
        let watch = Watch::new(timeouts());
        let _in_flight = watch.request_started();
        watch.on_write::<usize>(&Poll::Pending, |n| *n > 0);
        tokio::time::sleep(200 * MS).await;
        watch.on_write(&Poll::Ready(Ok(4096_usize)), |n| *n > 0);
        watch.on_write::<usize>(&Poll::Pending, |n| *n > 0);
        let (expiry, took) = expiry_after(&watch).await;
        assert_eq!(expiry, Expiry::Send);
        assert!(about(took, 300 * MS), "{took:?}");
    }
}
