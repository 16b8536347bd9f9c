//! `/nixpfs/narinfo/1.1.0`: how a gateway asks the nixpfs gateways it is
//! connected to what they know about a store path, so paths an upstream
//! served one gateway can be served by others from IPFS when that upstream
//! is out of reach.
//!
//! # Goals
//! - One request per stream: the asker writes a store path's hash part and
//!   a newline, then closes its side; the answerer writes its answer (or
//!   [`UNKNOWN`]) and closes. Sizes are capped on both sides.
//! - A question is not lost to a busy answerer: libp2p-stream drops an
//!   inbound stream when the previous one has not been taken yet, which
//!   the asker sees as an empty answer or a closed stream. So "unknown" is
//!   said out loud, such a question is asked again (within the caller's
//!   time), and a gateway has few questions in flight to each peer.
//! - The protocol only carries bytes; what they mean (a narinfo signed by
//!   an upstream key, a CID) and whether to believe them is the caller's:
//!   every answer is checked against the configured keys, every NAR byte
//!   against its CID and NarHash, so a lying peer achieves nothing.
//!
//! # Non-goals
//! - Discovery: the peers asked are the ones connected (static peers, or
//!   those the DHT found).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p_stream::{Control, IncomingStreams};
use rust_ipfs::{PeerId, StreamProtocol};

/// The protocol id. 1.1.0 says "unknown" as [`UNKNOWN`], where 1.0.0 sent
/// nothing (which cannot be told from a dropped question).
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/nixpfs/narinfo/1.1.0");
/// Longest request accepted (a hash part is 32 characters).
const MAX_REQUEST: u64 = 128;
/// Longest answer accepted (a narinfo and a CID).
pub const MAX_ANSWER: u64 = 64 * 1024;
/// How long an answerer waits for a request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The answer that says "I know nothing of this path".
const UNKNOWN: &[u8] = b"-";
/// Questions in flight to one peer at once: more pile up in its inbound
/// queue, which holds one.
const PER_PEER: usize = 2;
/// The longest pause before a dropped question is asked again.
const MAX_BACKOFF: Duration = Duration::from_millis(200);
/// Peers whose turns are kept before idle ones are forgotten.
const MAX_PEERS_ASKED: usize = 1024;

/// What answers a request: the request text in, the answer (if any) out.
pub type Responder = Arc<dyn Fn(String) -> BoxFuture<'static, Option<Vec<u8>>> + Send + Sync>;

/// Both sides of the protocol for one node.
pub struct Exchange {
    control: Control,
    incoming: Mutex<Option<IncomingStreams>>,
    /// At most [`PER_PEER`] questions in flight to each peer (see the goals).
    asking: Mutex<HashMap<PeerId, Arc<tokio::sync::Semaphore>>>,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange").finish_non_exhaustive()
    }
}

impl Exchange {
    /// `incoming` from `Control::accept(PROTOCOL)`, taken before any
    /// connection exists so identify advertises the protocol.
    pub fn new(control: Control, incoming: IncomingStreams) -> Self {
        Self {
            control,
            incoming: Mutex::new(Some(incoming)),
            asking: Mutex::default(),
        }
    }

    /// Starts answering requests with `responder` (once; later calls do
    /// nothing). Until then inbound requests wait.
    pub fn serve(&self, responder: Responder) -> Option<tokio::task::JoinHandle<()>> {
        let mut incoming = self
            .incoming
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        Some(tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                let responder = responder.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, responder).await {
                        tracing::debug!(%peer, "narinfo exchange: {e}");
                    }
                });
            }
        }))
    }

    /// Sends `request` to `peer` and reads its answer (`None`: it knows
    /// nothing), within `timeout`.
    pub async fn ask(
        &self,
        peer: PeerId,
        request: &str,
        timeout: Duration,
    ) -> std::io::Result<Option<Vec<u8>>> {
        let turns = {
            let mut asking = self.asking.lock().unwrap_or_else(|p| p.into_inner());
            if asking.len() >= MAX_PEERS_ASKED {
                asking.retain(|_, turns| Arc::strong_count(turns) > 1);
            }
            asking
                .entry(peer)
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(PER_PEER)))
                .clone()
        };
        let exchange = async move {
            let _turn = turns
                .acquire()
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let mut backoff = Duration::from_millis(5);
            loop {
                // A dropped stream reads as empty, or as a closed stream:
                // asked again until the caller's time is up.
                let failed = match self.ask_once(peer, request).await {
                    Ok(out) if out.is_empty() => std::io::Error::other("empty answer"),
                    Ok(out) => return Ok((out != UNKNOWN).then_some(out)),
                    Err(e) => e,
                };
                tracing::debug!(%peer, "narinfo exchange, asking again in {backoff:?}: {failed}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))?
    }

    /// One stream: the request out, the answer (empty if the peer dropped
    /// the stream) in.
    async fn ask_once(&self, peer: PeerId, request: &str) -> std::io::Result<Vec<u8>> {
        let mut stream = self
            .control
            .clone()
            .open_stream(peer, PROTOCOL)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        stream.write_all(request.as_bytes()).await?;
        stream.write_all(b"\n").await?;
        stream.close().await?;
        let mut out = Vec::new();
        (&mut stream)
            .take(MAX_ANSWER + 1)
            .read_to_end(&mut out)
            .await?;
        if out.len() as u64 > MAX_ANSWER {
            return Err(std::io::Error::other(format!(
                "answer longer than {MAX_ANSWER} bytes"
            )));
        }
        Ok(out)
    }
}

async fn answer(mut stream: rust_ipfs::Stream, responder: Responder) -> std::io::Result<()> {
    let mut request = Vec::new();
    tokio::time::timeout(
        REQUEST_TIMEOUT,
        (&mut stream)
            .take(MAX_REQUEST + 1)
            .read_to_end(&mut request),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request in time"))??;
    if request.len() as u64 > MAX_REQUEST {
        return Err(std::io::Error::other("request too long"));
    }
    let text = String::from_utf8_lossy(&request).trim().to_owned();
    match responder(text).await {
        Some(answer) if answer.len() as u64 <= MAX_ANSWER && answer != UNKNOWN => {
            stream.write_all(&answer).await?
        }
        _ => stream.write_all(UNKNOWN).await?,
    }
    stream.close().await
}
