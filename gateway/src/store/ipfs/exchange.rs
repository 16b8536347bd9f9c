//! `/nixpfs/narinfo/1.2.0`: how a gateway asks the nixpfs gateways it is
//! connected to what they know about a store path, so paths an upstream
//! served one gateway can be served by others from IPFS when that upstream
//! is out of reach.
//!
//! # Goals
//! - One stream per pair of peers, questions pipelined on it: the asker
//!   writes store path hash parts, a line each, without waiting; the
//!   answerer works on up to [`ANSWERING`] at once and writes the answers
//!   in the order asked, each as a 4-byte big-endian length and the bytes
//!   (a narinfo has newlines). "Unknown" is [`UNKNOWN`]. Sizes are capped
//!   on both sides.
//! - Nix asks for a closure's narinfos many at once; a stream per question
//!   costs a stream negotiation each, and libp2p-stream drops an inbound
//!   stream that arrives before the previous one was taken (1.1.0 had to
//!   keep two questions in flight per peer because of it, which made a
//!   300-path closure's walk wait). A stream that is dropped, breaks, or
//!   gets no answer for [`STALLED`] fails every question on it; each is
//!   asked again, on a new stream, within its caller's time.
//! - The protocol only carries bytes; what they mean (a narinfo signed by
//!   an upstream key, a CID) and whether to believe them is the caller's:
//!   every answer is checked against the configured keys, every NAR byte
//!   against its CID and NarHash, so a lying peer achieves nothing.
//!
//! # Non-goals
//! - Discovery: the peers asked are the ones connected (static peers, or
//!   those the DHT found).
//! - Fairness between askers beyond one stream each: a peer's questions
//!   are answered in its order.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p_stream::{Control, IncomingStreams};
use rust_ipfs::{PeerId, StreamProtocol};
use tokio::sync::{mpsc, oneshot};

use crate::util::sync::lock;

/// The protocol id. 1.2.0 pipelines questions on one stream, where 1.1.0
/// opened a stream per question.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/nixpfs/narinfo/1.2.0");
/// Longest question accepted (a hash part is 32 characters).
const MAX_REQUEST: u64 = 128;
/// Longest answer accepted (a narinfo and a CID).
pub const MAX_ANSWER: u64 = 64 * 1024;
/// How long an answerer waits for the first question on a stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The answer that says "I know nothing of this path".
const UNKNOWN: &[u8] = b"-";
/// Questions an answerer works on at once, per stream.
const ANSWERING: usize = 16;
/// Questions waiting to be written on one stream: more wait for room.
const QUEUED: usize = 256;
/// A stream with no question in flight for this long is closed.
const IDLE: Duration = Duration::from_secs(30);
/// A stream whose questions got no answer for this long is given up.
const STALLED: Duration = Duration::from_secs(5);
/// The longest pause before a failed question is asked again.
const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// What answers a request: the request text in, the answer (if any) out.
pub type Responder = Arc<dyn Fn(String) -> BoxFuture<'static, Option<Vec<u8>>> + Send + Sync>;

/// Where a question's answer goes.
type AnswerTx = oneshot::Sender<std::io::Result<Vec<u8>>>;
/// A question on its way to a stream, and where its answer goes.
type Question = (String, AnswerTx);

/// Both sides of the protocol for one node.
pub struct Exchange {
    control: Control,
    incoming: Mutex<Option<IncomingStreams>>,
    /// The stream to each peer asked, as the queue its task writes from;
    /// a closed queue means the stream ended.
    streams: Mutex<HashMap<PeerId, mpsc::Sender<Question>>>,
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
            streams: Mutex::default(),
        }
    }

    /// Starts answering requests with `responder` (once; later calls do
    /// nothing). Until then inbound requests wait.
    pub fn serve(&self, responder: Responder) -> Option<tokio::task::JoinHandle<()>> {
        let mut incoming = lock(&self.incoming).take()?;
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
        let exchange = async move {
            let mut backoff = Duration::from_millis(5);
            loop {
                // A dropped or broken stream fails its questions: asked
                // again, on a new stream, until the caller's time is up.
                let failed = match self.ask_once(peer, request).await {
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

    /// One question on the stream to `peer` (opened if there is none).
    async fn ask_once(&self, peer: PeerId, request: &str) -> std::io::Result<Vec<u8>> {
        let (tx, rx) = oneshot::channel();
        let queue = self.stream_to(peer);
        queue
            .send((request.to_owned(), tx))
            .await
            .map_err(|_| std::io::Error::other("the stream ended"))?;
        rx.await
            .map_err(|_| std::io::Error::other("the stream ended before the answer"))?
    }

    /// The queue of the stream to `peer`: the open one, or a new one whose
    /// task opens the stream.
    fn stream_to(&self, peer: PeerId) -> mpsc::Sender<Question> {
        let mut streams = lock(&self.streams);
        streams.retain(|_, queue| !queue.is_closed());
        if let Some(queue) = streams.get(&peer) {
            return queue.clone();
        }
        let (queue, questions) = mpsc::channel(QUEUED);
        let control = self.control.clone();
        tokio::spawn(async move {
            if let Err(e) = ask_on_stream(control, peer, questions).await {
                tracing::debug!(%peer, "narinfo exchange stream ended: {e}");
            }
        });
        streams.insert(peer, queue.clone());
        queue
    }
}

/// The asking side of one stream: questions written as they come, answers
/// read in the same order. Ends (failing the questions in flight) when the
/// stream breaks or has been idle for [`IDLE`].
async fn ask_on_stream(
    mut control: Control,
    peer: PeerId,
    mut questions: mpsc::Receiver<Question>,
) -> std::io::Result<()> {
    let stream = match control.open_stream(peer, PROTOCOL).await {
        Ok(stream) => stream,
        Err(e) => {
            // Whatever queued meanwhile fails with the reason.
            questions.close();
            while let Some((_, tx)) = questions.recv().await {
                let _ = tx.send(Err(std::io::Error::other(e.to_string())));
            }
            return Err(std::io::Error::other(e.to_string()));
        }
    };
    let (mut reader, mut writer) = stream.split();
    let in_flight: Arc<Mutex<VecDeque<AnswerTx>>> = Arc::default();
    let pending = in_flight.clone();
    let (answered_tx, mut answered) = mpsc::unbounded_channel::<()>();
    let read = async move {
        loop {
            // A peer that stops answering holds up every question behind
            // the one it sits on: the stream is given up (and each question
            // asked again on a new one) once none came for [`STALLED`].
            let answer = match tokio::time::timeout(STALLED, read_answer(&mut reader)).await {
                Ok(answer) => answer,
                Err(_) if lock(&pending).is_empty() => continue,
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer in {STALLED:?}"),
                )),
            };
            let Some(tx) = lock(&pending).pop_front() else {
                return match answer {
                    Ok(_) => Err(std::io::Error::other("an answer nobody asked for")),
                    Err(e) => Err(e),
                };
            };
            match answer {
                Ok(answer) => {
                    let _ = tx.send(Ok(answer));
                    let _ = answered_tx.send(());
                }
                Err(e) => {
                    let reason = e.to_string();
                    let _ = tx.send(Err(e));
                    for tx in lock(&pending).drain(..) {
                        let _ = tx.send(Err(std::io::Error::other(reason.clone())));
                    }
                    return Err(std::io::Error::other(reason));
                }
            }
        }
    };
    let write = async move {
        loop {
            let idle = lock(&in_flight).is_empty();
            let next = tokio::select! {
                next = questions.recv() => next,
                Some(()) = answered.recv() => continue,
                () = tokio::time::sleep(IDLE), if idle => None,
            };
            let Some((request, tx)) = next else {
                // Idle, or the exchange is gone: the answerer sees the end.
                questions.close();
                writer.close().await?;
                return Ok::<_, std::io::Error>(());
            };
            lock(&in_flight).push_back(tx);
            let mut line = request.into_bytes();
            line.push(b'\n');
            writer.write_all(&line).await?;
            writer.flush().await?;
        }
    };
    tokio::pin!(read, write);
    tokio::select! {
        read = &mut read => read,
        written = &mut write => match written {
            // Closed for idleness: the answers still due come first.
            Ok(()) => match read.await {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(()),
                other => other,
            },
            Err(e) => Err(e),
        },
    }
}

/// One framed answer: a 4-byte big-endian length, then that many bytes.
async fn read_answer<R: futures::AsyncRead + Unpin>(reader: &mut R) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    reader.read_exact(&mut len).await?;
    let len = u64::from(u32::from_be_bytes(len));
    if len > MAX_ANSWER {
        return Err(std::io::Error::other(format!(
            "answer of {len} bytes, longer than {MAX_ANSWER}"
        )));
    }
    let mut out = vec![0u8; len as usize];
    reader.read_exact(&mut out).await?;
    Ok(out)
}

/// The answering side of one stream: questions read as they come, up to
/// [`ANSWERING`] worked on at once, answers written in the order asked.
async fn answer(stream: rust_ipfs::Stream, responder: Responder) -> std::io::Result<()> {
    let (reader, mut writer) = stream.split();
    let mut reader = futures::io::BufReader::new(reader);
    let (questions_tx, mut questions) = mpsc::channel::<String>(ANSWERING);
    let read = async move {
        let mut first = true;
        loop {
            let mut line = Vec::new();
            let mut limited = (&mut reader).take(MAX_REQUEST + 1);
            let read = limited.read_until(b'\n', &mut line);
            let n = if first {
                tokio::time::timeout(REQUEST_TIMEOUT, read)
                    .await
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "no request in time")
                    })??
            } else {
                read.await?
            };
            first = false;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            if line.last() != Some(&b'\n') {
                return Err(std::io::Error::other(if line.len() as u64 > MAX_REQUEST {
                    "request too long"
                } else {
                    "request not ended by a newline"
                }));
            }
            let text = String::from_utf8_lossy(&line).trim().to_owned();
            if questions_tx.send(text).await.is_err() {
                return Ok(());
            }
        }
    };
    let write = async move {
        let mut working = FuturesOrdered::new();
        let mut more = true;
        loop {
            tokio::select! {
                question = questions.recv(), if more && working.len() < ANSWERING => match question {
                    Some(question) => working.push_back(responder(question)),
                    None => more = false,
                },
                Some(answer) = working.next() => {
                    let answer = match answer {
                        Some(answer) if answer.len() as u64 <= MAX_ANSWER && answer != UNKNOWN => answer,
                        _ => UNKNOWN.to_vec(),
                    };
                    let mut framed = (answer.len() as u32).to_be_bytes().to_vec();
                    framed.extend_from_slice(&answer);
                    writer.write_all(&framed).await?;
                    writer.flush().await?;
                }
                else => break,
            }
        }
        writer.close().await
    };
    let (read, written) = futures::join!(read, write);
    read.and(written)
}
