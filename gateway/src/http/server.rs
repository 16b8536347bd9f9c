//! The HTTP accept loop: hyper (HTTP/1.1 and HTTP/2) over accepted TCP
//! connections, with the limits `axum::serve` has no knobs for. At most
//! [`Limits::max_connections`] connections are served at once (the next
//! waits in the kernel's backlog, not in our memory), and each lives by the
//! deadlines of [`super::watchdog`]: a keep-alive connection with no
//! request for [`Limits::idle_timeout`], a request header not complete
//! within [`Limits::header_read_timeout`] of its first byte (slowloris),
//! and a client that accepts no byte of a response for
//! [`Limits::send_timeout`] are disconnected, counted and logged.
//!
//! # Goals
//! - A handful of misbehaving clients cannot hold every socket and task,
//!   nor the blocks prefetched for responses they do not read.
//! - Graceful shutdown: on the signal, stop accepting, let requests in
//!   flight finish.
//!
//! # Non-goals
//! - Per-client rate limits or authentication (handlers and the upload
//!   token do that); TLS (a reverse proxy's job).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::watchdog::{Expiry, Timeouts, Watch, WatchedIo, WatchedService};
use crate::util::metrics::Metrics;

/// Connection limits; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest a client may take to send a request's header (HTTP/1),
    /// from its first byte.
    pub header_read_timeout: Duration,
    /// Longest a connection may wait with no request in flight (keep-alive
    /// between requests, an HTTP/2 connection with no stream).
    pub idle_timeout: Duration,
    /// Longest a client may accept no byte of a response it is sent.
    pub send_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// After the shutdown signal, how long requests in flight may finish.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            // nginx's keepalive_timeout and send_timeout.
            idle_timeout: Duration::from_secs(75),
            send_timeout: Duration::from_secs(60),
            max_connections: 512,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    // hyper's own header timer also runs between keep-alive requests; the
    // watchdog times headers from their first byte instead.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    builder.http2().timer(TokioTimer::new());
    let timeouts = Timeouts {
        idle: limits.idle_timeout,
        header: limits.header_read_timeout,
        send: limits.send_timeout,
    };
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!(error = %e, "http: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Without TCP_NODELAY a streamed response (headers, then body
        // chunks) waits on the client's delayed ACK: ~40 ms per NAR.
        let _ = tcp.set_nodelay(true);
        let watch = Watch::new(timeouts);
        let service = WatchedService::new(TowerToHyperService::new(router.clone()), watch.clone());
        let conn = builder
            .serve_connection(TokioIo::new(WatchedIo::new(tcp, watch.clone())), service)
            .into_owned();
        let conn = graceful.watch(conn);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            {
                // Pinned outside the select, so a cut connection is closed
                // (at the end of this block) only after it was counted: a
                // client that sees the close may read the counter at once.
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    served = &mut conn => if let Err(e) = served {
                        tracing::debug!(error = %e, "http: connection ended in an error");
                    },
                    expiry = watch.expired() => cut(expiry, peer, &timeouts, &metrics),
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace = ?limits.shutdown_grace,
            "http: connections still open at shutdown were cut"
        );
    }
}

/// Counts and logs a connection its watchdog ended (the caller drops it).
fn cut(expiry: Expiry, peer: SocketAddr, timeouts: &Timeouts, metrics: &Metrics) {
    match expiry {
        Expiry::Idle => {
            Metrics::inc(&metrics.http_idle_timeouts);
            tracing::info!(
                %peer,
                timeout = ?timeouts.idle,
                "http: closed a connection idle with no request"
            );
        }
        Expiry::Header => {
            Metrics::inc(&metrics.http_header_timeouts);
            tracing::info!(
                %peer,
                timeout = ?timeouts.header,
                "http: a client did not send its request header in time; disconnected"
            );
        }
        Expiry::Send => {
            Metrics::inc(&metrics.http_send_timeouts);
            tracing::info!(
                %peer,
                timeout = ?timeouts.send,
                "http: a client accepted no bytes of its response in time; disconnected"
            );
        }
    }
}
