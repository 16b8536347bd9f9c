//! The HTTP accept loop: hyper (HTTP/1.1 and HTTP/2) over accepted TCP
//! connections, with the limits `axum::serve` has no knobs for. A client
//! must send a request's whole header within [`Limits::header_read_timeout`]
//! (a slowloris client sending half a header and waiting is disconnected);
//! at most [`Limits::max_connections`] connections are served at once (the
//! next waits in the kernel's backlog, not in our memory).
//!
//! # Goals
//! - A handful of misbehaving clients cannot hold every socket and task.
//! - Graceful shutdown: on the signal, stop accepting, let requests in
//!   flight finish.
//!
//! # Non-goals
//! - Per-client rate limits or authentication (handlers and the upload
//!   token do that); TLS (a reverse proxy's job).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::util::metrics::Metrics;

/// Connection limits; see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest a client may take to send a request's header (HTTP/1).
    pub header_read_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// After the shutdown signal, how long requests in flight may finish.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
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
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
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
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
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
        let service = TowerToHyperService::new(router.clone());
        let conn = builder
            .serve_connection(TokioIo::new(tcp), service)
            .into_owned();
        let conn = graceful.watch(conn);
        let metrics = metrics.clone();
        let timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                let timed_out = e
                    .downcast_ref::<hyper::Error>()
                    .is_some_and(hyper::Error::is_timeout);
                if timed_out {
                    Metrics::inc(&metrics.http_header_timeouts);
                    tracing::info!(
                        ?timeout,
                        "http: a client did not send its request header in time; disconnected"
                    );
                } else {
                    tracing::debug!(error = %e, "http: connection ended in an error");
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
