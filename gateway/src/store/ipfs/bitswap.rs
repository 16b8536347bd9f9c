//! Bitswap 1.2.0 over rust-ipfs's stream API (libp2p-stream), both roles.
//!
//! Server: every inbound stream is read until EOF (Kubo opens one stream per
//! message, and rust-ipfs's own bitswap loses all but the last); want-have is
//! answered with HAVE/DONT_HAVE, want-block with the block, in messages of
//! about 1 MiB of blocks. Client: while no connected peer is known to have
//! what we fetch, want-block goes to every connected peer (a few per peer at
//! a time); once peers have delivered blocks (proven providers), each want
//! goes to one of them only, the one with the most free slots, so a DAG's
//! blocks spread over its providers by how fast each answers and no block
//! is downloaded twice. A provider that says DONT_HAVE, or delivers nothing
//! while holding wants for [`STALLED`], loses its proven status and its wants
//! go to the others; a want nobody claimed within [`REWANT_IDLE`] goes to
//! every peer, as before providers were told apart. Many wants stay in flight, and a want is re-sent when
//! later blocks overtook it or it stayed unanswered (libp2p-stream silently
//! drops an inbound stream when its one-slot channel is full). Received
//! blocks are hashed on the blocking pool; only bytes that hash to a wanted
//! CID count; verified blocks nobody waits for any more are counted as
//! duplicates. A want lives as long as someone waits for it: when its last
//! waiter times out or drops its fetch, it is cancelled with the peers asked.
//!
//! Inbound work is bounded whatever a peer does: streams per peer and in
//! total are capped (more are reset and counted), message bytes read but not
//! yet handled are capped per peer and in total, one wantlist per peer is
//! answered at a time, and its answers wait while [`QUEUE_BYTES`] of them are
//! queued unwritten; a write that takes longer than [`WRITE_TIMEOUT`] resets
//! its stream. A peer that opens hundreds of streams and never reads costs a
//! few MiB.
//!
//! # Goals
//! - Speak `/ipfs/bitswap/1.2.0` as Kubo and Helia do, in both roles, so any
//!   IPFS peer can fetch our NARs and we can fetch theirs.
//! - Never hand a caller a block whose bytes do not hash to its CID.
//! - Keep many wants in flight per peer, so a fetch is bound by the link
//!   and the hashing, not by round trips.
//!
//! # Non-goals
//! - Finding providers: this module asks the peers it is connected to;
//!   routing (static peers, later the DHT) is the node's job.
//! - Ledgers, tit-for-tat or fairness between peers: any peer that asks for
//!   a block we hold gets it.
//! - Bitswap 1.0/1.1 and sessions: every peer we meet speaks 1.2.0.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use cid::Cid;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p_stream::{Control, IncomingStreams};
use rust_ipfs::{PeerId, Stream, StreamProtocol};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::block::{self, Block};
use super::blockstore::BlockStore;
use super::pb::{self, Fields};
use super::IpfsError;
use crate::util::sync::lock;

/// The only bitswap version we speak (Helia speaks only this one too).
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/ipfs/bitswap/1.2.0");
/// Largest inbound message accepted (bitswap's 4 MiB plus framing slack).
const MAX_MESSAGE: usize = 4 * 1024 * 1024 + 64 * 1024;
/// Block bytes per outbound message before it is flushed.
const RESPONSE_BYTES: usize = 1024 * 1024;
/// Inbound streams one peer may have open at once; more are reset. Kubo and
/// Helia open one per message and close it, so a handful is plenty.
pub const STREAMS_PER_PEER: usize = 32;
/// Inbound streams of all peers at once (each may hold a 256 KiB yamux
/// window of unread bytes).
pub const STREAMS_TOTAL: usize = 256;
/// Bytes of inbound messages one peer may have read but not handled yet:
/// two of the largest, so a peer's blocks keep flowing while one of its
/// wantlists waits.
const FRAME_BYTES_PER_PEER: usize = 2 * MAX_MESSAGE;
/// The same for all peers together.
const FRAME_BYTES_TOTAL: usize = 64 * 1024 * 1024;
/// How long the body of a message may take to arrive once its length has.
const FRAME_TIMEOUT: Duration = Duration::from_secs(60);
/// Block bytes of answers queued for one peer and not yet written; its next
/// blocks (and so its further wantlists) wait while this is used up.
pub const QUEUE_BYTES: usize = 8 * 1024 * 1024;
/// How long opening a stream and writing one message to a peer may take
/// before the stream is reset and the message dropped (1 MiB in 30 s is a
/// link below 300 kbit/s, or a peer that does not read).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often wants are checked for re-sending and peers refreshed.
const TICK: Duration = Duration::from_millis(50);
/// A want overtaken by later blocks is re-sent after this long.
const REWANT_OVERTAKEN: Duration = Duration::from_millis(250);
/// Any want unanswered this long is re-sent.
const REWANT_IDLE: Duration = Duration::from_secs(1);
/// A peer that delivered a block this recently is a proven provider.
const PROVEN_FOR: Duration = Duration::from_secs(10);
/// A proven provider holding wants that delivered nothing for this long is
/// dropped: its wants go to the other providers.
pub const STALLED: Duration = Duration::from_secs(2);
/// Received blocks hashed at once (bounds memory held by unverified blocks).
const HASHERS: usize = 8;
/// Messages queued per peer before senders wait.
const PEER_QUEUE: usize = 8;
/// Want-blocks in flight per peer that is not known to be a nixpfs node.
/// Helia 7 packs every wanted block it has into one send, sometimes cuts
/// multi-MiB sends short and then stops answering us; with two 1 MiB blocks
/// in flight it never did here (20 MiB in ~0.3 s).
pub const WANTS_PER_PEER: usize = 2;
/// Want-blocks in flight per nixpfs peer (our server has no such limit).
pub const WANTS_PER_NIXPFS_PEER: usize = 32;
/// Want-blocks in flight per Kubo peer. Kubo answers each block on a stream
/// of its own, several at once, and libp2p-stream drops an inbound stream
/// while another waits to be accepted (the re-want recovers it): 64 MiB
/// from Kubo ran at 0.7x of Kubo->Kubo with 8 in flight, 0.3x with 32, and
/// 1.1-1.6x with 4.
pub const WANTS_PER_KUBO_PEER: usize = 4;

/// How to ask one peer for blocks, from the agent version it reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerPolicy {
    /// Want-blocks in flight at once.
    pub wants: usize,
    /// Re-send a want as cancel + want in one message. Helia ignores a plain
    /// repeat of a want it believes it answered (for 5 s) and applies a
    /// message's entries in order; go-bitswap (Kubo) merges a message's
    /// entries by CID with the cancel winning, so it must get the plain
    /// repeat (it keeps no memory of blocks sent).
    pub cancel_before_rewant: bool,
    /// Send every message on one long-lived stream instead of a new stream
    /// per message. Only for nixpfs peers, whose reader takes any number of
    /// messages per stream (Helia handles a stream's messages only once it
    /// is closed). A new yamux stream starts with a 256 KiB window and every
    /// stream opened at a nixpfs receiver risks libp2p-stream's drop of
    /// inbound streams, so a stream per 1 MiB message capped a 1 GiB A->B
    /// fetch at one stream set-up plus four window round trips per block.
    pub reuse_stream: bool,
}

impl PeerPolicy {
    /// The policy for a peer whose identify agent is `agent` (empty if unknown).
    pub fn for_agent(agent: &str) -> Self {
        PeerPolicy {
            wants: if agent.starts_with("nixpfs/") {
                WANTS_PER_NIXPFS_PEER
            } else if agent.starts_with("kubo/") || agent.starts_with("go-ipfs/") {
                WANTS_PER_KUBO_PEER
            } else {
                WANTS_PER_PEER
            },
            cancel_before_rewant: agent.starts_with("helia/"),
            reuse_stream: agent.starts_with("nixpfs/"),
        }
    }
}

/// What a wantlist entry asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WantType {
    Block,
    Have,
}

/// One wantlist entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantEntry {
    pub cid: Cid,
    pub priority: i32,
    pub cancel: bool,
    pub want_type: WantType,
    pub send_dont_have: bool,
}

/// A block presence answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Have,
    DontHave,
}

/// A bitswap message (the fields of 1.2.0 we use).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    pub wantlist: Vec<WantEntry>,
    pub full: bool,
    /// (CID prefix, block bytes); 1.0.0-style blocks get a CIDv0 prefix.
    pub blocks: Vec<(Vec<u8>, Bytes)>,
    pub presences: Vec<(Cid, Presence)>,
}

/// Why an inbound bitswap message was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("bad protobuf in field {field}: {reason}")]
    Protobuf { field: &'static str, reason: String },
    #[error("bad CID in {field}: {reason}")]
    Cid { field: &'static str, reason: String },
}

impl Message {
    fn is_empty(&self) -> bool {
        self.wantlist.is_empty() && self.blocks.is_empty() && self.presences.is_empty()
    }

    fn block_bytes(&self) -> usize {
        self.blocks.iter().map(|b| b.1.len()).sum()
    }

    /// Appends `other`'s entries, keeping their order.
    fn merge(&mut self, other: Message) {
        self.wantlist.extend(other.wantlist);
        self.full |= other.full;
        self.blocks.extend(other.blocks);
        self.presences.extend(other.presences);
    }

    /// Protobuf encoding, without the length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let block_bytes: usize = self.blocks.iter().map(|b| b.1.len() + 64).sum();
        let mut out = Vec::with_capacity(block_bytes + 64 * self.wantlist.len() + 64);
        if !self.wantlist.is_empty() || self.full {
            let mut wl = Vec::new();
            for e in &self.wantlist {
                let mut entry = Vec::with_capacity(48);
                pb::put_bytes(&mut entry, 1, &e.cid.to_bytes());
                // int32 on the wire: negative values sign-extend to 64 bits.
                pb::put_uint(&mut entry, 2, i64::from(e.priority) as u64);
                if e.cancel {
                    pb::put_uint(&mut entry, 3, 1);
                }
                if e.want_type == WantType::Have {
                    pb::put_uint(&mut entry, 4, 1);
                }
                if e.send_dont_have {
                    pb::put_uint(&mut entry, 5, 1);
                }
                pb::put_bytes(&mut wl, 1, &entry);
            }
            if self.full {
                pb::put_uint(&mut wl, 2, 1);
            }
            pb::put_bytes(&mut out, 1, &wl);
        }
        for (prefix, data) in &self.blocks {
            let len = pb::bytes_field_len(1, prefix.len()) + pb::bytes_field_len(2, data.len());
            pb::put_varint(&mut out, (3 << 3) | 2);
            pb::put_varint(&mut out, len as u64);
            pb::put_bytes(&mut out, 1, prefix);
            pb::put_bytes(&mut out, 2, data);
        }
        for (cid, presence) in &self.presences {
            let mut p = Vec::with_capacity(48);
            pb::put_bytes(&mut p, 1, &cid.to_bytes());
            if *presence == Presence::DontHave {
                pb::put_uint(&mut p, 2, 1);
            }
            pb::put_bytes(&mut out, 4, &p);
        }
        out
    }

    /// Parses a message; block bytes are zero-copy slices of `buf`.
    pub fn decode(buf: &Bytes) -> Result<Self, MessageError> {
        let pbe = |field: &'static str| {
            move |e: pb::PbError| MessageError::Protobuf {
                field,
                reason: e.to_string(),
            }
        };
        let cide = |field: &'static str| {
            move |e: cid::Error| MessageError::Cid {
                field,
                reason: e.to_string(),
            }
        };
        let mut msg = Message::default();
        for field in Fields::new(buf) {
            let (num, value) = field.map_err(pbe("message"))?;
            match num {
                1 => {
                    for wf in Fields::new(value.bytes(1).map_err(pbe("wantlist"))?) {
                        let (wn, wv) = wf.map_err(pbe("wantlist"))?;
                        match wn {
                            1 => msg
                                .wantlist
                                .push(decode_entry(wv.bytes(1).map_err(pbe("entry"))?)?),
                            2 => msg.full = wv.varint(2).map_err(pbe("full"))? != 0,
                            _ => {}
                        }
                    }
                }
                2 => {
                    // Bitswap 1.0.0 blocks: implicitly CIDv0 dag-pb.
                    let data = value.bytes(2).map_err(pbe("blocks"))?;
                    msg.blocks
                        .push((vec![0, 0x70, 0x12, 0x20], buf.slice_ref(data)));
                }
                3 => {
                    let mut prefix = None;
                    let mut data = None;
                    for bf in Fields::new(value.bytes(3).map_err(pbe("payload"))?) {
                        let (bn, bv) = bf.map_err(pbe("payload"))?;
                        match bn {
                            1 => prefix = Some(bv.bytes(1).map_err(pbe("prefix"))?.to_vec()),
                            2 => data = Some(buf.slice_ref(bv.bytes(2).map_err(pbe("data"))?)),
                            _ => {}
                        }
                    }
                    if let (Some(p), Some(d)) = (prefix, data) {
                        msg.blocks.push((p, d));
                    }
                }
                4 => {
                    let mut cid = None;
                    let mut presence = Presence::Have;
                    for pf in Fields::new(value.bytes(4).map_err(pbe("presence"))?) {
                        let (pn, pv) = pf.map_err(pbe("presence"))?;
                        match pn {
                            1 => {
                                cid = Some(
                                    Cid::try_from(pv.bytes(1).map_err(pbe("presence cid"))?)
                                        .map_err(cide("presence"))?,
                                )
                            }
                            2 if pv.varint(2).map_err(pbe("presence type"))? == 1 => {
                                presence = Presence::DontHave
                            }
                            _ => {}
                        }
                    }
                    if let Some(c) = cid {
                        msg.presences.push((c, presence));
                    }
                }
                _ => {}
            }
        }
        Ok(msg)
    }
}

fn decode_entry(buf: &[u8]) -> Result<WantEntry, MessageError> {
    let pbe = |e: pb::PbError| MessageError::Protobuf {
        field: "entry",
        reason: e.to_string(),
    };
    let mut cid = None;
    let mut e = WantEntry {
        cid: Cid::default(),
        priority: 1,
        cancel: false,
        want_type: WantType::Block,
        send_dont_have: false,
    };
    for f in Fields::new(buf) {
        let (n, v) = f.map_err(pbe)?;
        match n {
            1 => {
                cid = Some(Cid::try_from(v.bytes(1).map_err(pbe)?).map_err(|err| {
                    MessageError::Cid {
                        field: "entry",
                        reason: err.to_string(),
                    }
                })?)
            }
            2 => e.priority = v.varint(2).map_err(pbe)? as i64 as i32,
            3 => e.cancel = v.varint(3).map_err(pbe)? != 0,
            4 => {
                e.want_type = if v.varint(4).map_err(pbe)? == 1 {
                    WantType::Have
                } else {
                    WantType::Block
                }
            }
            5 => e.send_dont_have = v.varint(5).map_err(pbe)? != 0,
            _ => {}
        }
    }
    e.cid = cid.ok_or(MessageError::Cid {
        field: "entry",
        reason: "missing".into(),
    })?;
    Ok(e)
}

/// Reads one length-prefixed message; `Ok(None)` at a clean end of stream.
/// Its bytes are taken from `budget` before they are read, and given back
/// when the returned permit is dropped.
async fn read_frame(
    stream: &mut Stream,
    budget: &FrameBudget,
) -> std::io::Result<Option<(Bytes, FramePermit)>> {
    let mut len: u64 = 0;
    for i in 0..10 {
        let mut b = [0u8; 1];
        match stream.read(&mut b).await? {
            0 if i == 0 => return Ok(None),
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => {}
        }
        len |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] < 0x80 {
            break;
        }
    }
    let len = usize::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_MESSAGE)
        .ok_or_else(|| std::io::Error::other(format!("bitswap message of {len} bytes")))?;
    let permit = budget.take(len).await?;
    let mut buf = BytesMut::zeroed(len);
    let mut filled = 0;
    let body = async {
        while filled < len {
            match stream.read(&mut buf[filled..]).await? {
                0 => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("stream ended after {filled} of {len} message bytes"),
                    ))
                }
                n => filled += n,
            }
        }
        Ok(())
    };
    tokio::time::timeout(FRAME_TIMEOUT, body)
        .await
        .map_err(|_| std::io::Error::other(format!("bitswap message of {len} bytes too slow")))??;
    Ok(Some((buf.freeze(), permit)))
}

/// Where inbound message bytes are accounted: the peer's share and the total.
struct FrameBudget {
    peer: Arc<Semaphore>,
    total: Arc<Semaphore>,
}

/// Message bytes taken from a [`FrameBudget`], given back on drop.
struct FramePermit {
    _peer: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
}

impl FrameBudget {
    async fn take(&self, len: usize) -> std::io::Result<FramePermit> {
        // `len` is at most MAX_MESSAGE, within both budgets and u32.
        let n = u32::try_from(len).map_err(std::io::Error::other)?;
        let closed = |_| std::io::Error::other("bitswap shutting down");
        let peer = self
            .peer
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(closed)?;
        let total = self
            .total
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(closed)?;
        Ok(FramePermit {
            _peer: peer,
            _total: total,
        })
    }
}

async fn write_frame(stream: &mut Stream, body: &[u8]) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(10);
    pb::put_varint(&mut head, body.len() as u64);
    stream.write_all(&head).await?;
    stream.write_all(body).await?;
    stream.flush().await
}

/// Counters for tests, benchmarks and `status`.
#[derive(Debug, Default)]
pub struct Stats {
    pub blocks_received: AtomicU64,
    pub blocks_sent: AtomicU64,
    /// Blocks that matched no outstanding want: late duplicates, blocks
    /// nobody asked for, and corrupted bytes (which hash to no wanted CID).
    pub unmatched: AtomicU64,
    pub rewants: AtomicU64,
    /// Blocks that arrived when nobody waited for them any more: the same
    /// block from a second peer (a timed-out retry, or a broadcast before
    /// any provider was proven). Not hashed when no want at all is open.
    pub duplicates: AtomicU64,
    /// Inbound messages cut short by the sender (seen from Helia 7 when it
    /// has to send several MiB at once).
    pub truncated: AtomicU64,
    /// Wants withdrawn because every caller waiting for them gave up
    /// (timed out or dropped its fetch).
    pub released: AtomicU64,
    /// Inbound streams reset because their peer (or all peers together)
    /// had as many open as allowed.
    pub streams_refused: AtomicU64,
    /// Messages dropped because writing them to the peer took longer than
    /// [`WRITE_TIMEOUT`] (a peer that does not read, or a dead link).
    pub write_timeouts: AtomicU64,
}

/// A block we are waiting for.
#[derive(Debug)]
struct Want {
    cid: Cid,
    waiters: Vec<oneshot::Sender<Bytes>>,
    /// Creation order: older wants are sent first. It is also the want's
    /// first place in line (`seq` before any re-send): how far in line a
    /// block for it proves its peer got, since the block may answer that
    /// first request rather than a re-send.
    order: u64,
    /// Order in which wants were (re)sent; a block for a later want
    /// arriving first means this one was probably lost.
    seq: u64,
    sent_at: Instant,
    /// Peers asked since the last re-send.
    asked: HashSet<PeerId>,
    /// Peers that said they do not have it.
    refused: HashSet<PeerId>,
    /// Peers sent a want-have for it.
    probed: HashSet<PeerId>,
    /// When it was first wanted.
    since: Instant,
}

impl Want {
    /// A new want, wanted from now on, `seq` its first place in line.
    fn new(cid: Cid, seq: u64, waiters: Vec<oneshot::Sender<Bytes>>) -> Self {
        let now = Instant::now();
        Self {
            cid,
            waiters,
            order: seq,
            seq,
            sent_at: now,
            asked: HashSet::new(),
            refused: HashSet::new(),
            probed: HashSet::new(),
            since: now,
        }
    }
}

#[derive(Debug)]
struct PeerState {
    tx: mpsc::Sender<Message>,
    /// Block bytes of answers this peer's writer may still queue
    /// ([`QUEUE_BYTES`] when all are written).
    queue: Arc<Semaphore>,
    /// Wants in flight at once, and how to re-send one.
    policy: PeerPolicy,
    /// Wants sent to this peer and not answered yet.
    in_flight: HashSet<Vec<u8>>,
    /// When it last sent us a block that verified, or said HAVE.
    delivered_at: Option<Instant>,
    /// Highest seq of a want this peer answered: a want it holds with a
    /// lower seq was probably lost (peers answer in priority order, so
    /// another peer answering later wants says nothing about this one).
    answered_seq: u64,
}

impl PeerState {
    fn new(tx: mpsc::Sender<Message>, queue: Arc<Semaphore>, policy: PeerPolicy) -> Self {
        Self {
            tx,
            queue,
            policy,
            in_flight: HashSet::new(),
            delivered_at: None,
            answered_seq: 0,
        }
    }

    fn proven(&self, now: Instant) -> bool {
        self.delivered_at
            .is_some_and(|at| now.duration_since(at) < PROVEN_FOR)
    }

    fn free(&self) -> usize {
        self.policy.wants.saturating_sub(self.in_flight.len())
    }
}

#[derive(Debug, Default)]
struct State {
    wants: HashMap<Vec<u8>, Want>,
    peers: HashMap<PeerId, PeerState>,
    next_seq: u64,
}

type Outbox = Vec<(mpsc::Sender<Message>, Message)>;

/// Puts `w` (stored under `key`) in flight with `peer`.
fn ask(
    w: &mut Want,
    key: &[u8],
    peer: PeerId,
    ps: &mut PeerState,
    batches: &mut HashMap<PeerId, Vec<WantEntry>>,
    now: Instant,
) {
    if w.asked.is_empty() {
        w.sent_at = now;
    }
    w.asked.insert(peer);
    ps.in_flight.insert(key.to_vec());
    batches
        .entry(peer)
        .or_default()
        .push(want_block(w.cid, w.seq));
}

impl State {
    fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Hands out wants, oldest first, within each peer's limit of wants in
    /// flight: a want nobody works on goes to the proven provider (that did
    /// not refuse it) with the most free slots; with no such provider, to
    /// every peer not asked yet.
    fn pump(&mut self) -> Outbox {
        let mut order: Vec<(u64, Vec<u8>)> = self
            .wants
            .iter()
            .map(|(k, w)| (w.order, k.clone()))
            .collect();
        order.sort_unstable();
        let now = Instant::now();
        let proven: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, ps)| ps.proven(now))
            .map(|(p, _)| *p)
            .collect();
        let mut batches: HashMap<PeerId, Vec<WantEntry>> = HashMap::new();
        for (_, key) in &order {
            let Some(w) = self.wants.get_mut(key) else {
                continue;
            };
            let candidates: Vec<PeerId> = proven
                .iter()
                .filter(|p| !w.refused.contains(p))
                .copied()
                .collect();
            let working_with = |proven_only: bool| {
                w.asked.iter().any(|p| {
                    self.peers.get(p).is_some_and(|ps| {
                        ps.in_flight.contains(key) && (!proven_only || ps.proven(now))
                    })
                })
            };
            // One peer at a time works on a want: a proven one, or, while
            // it is young, whichever peer was asked first.
            let young = now.duration_since(w.since) < REWANT_IDLE;
            let working = working_with(true) || (young && working_with(false));
            if candidates.is_empty() && !young {
                // Still nobody after a while (a peer that ignores want-have
                // or stays silent): want-block to every peer not asked yet.
                for (peer, ps) in self.peers.iter_mut() {
                    if ps.free() > 0 && !w.refused.contains(peer) && !w.asked.contains(peer) {
                        ask(w, key, *peer, ps, &mut batches, now);
                    }
                }
                continue;
            }
            if candidates.is_empty() {
                // Nobody is known to have it: want-block to one peer,
                // want-have to the others (a HAVE makes them providers).
                if !working_with(false) {
                    let best = self
                        .peers
                        .iter()
                        .filter(|(p, ps)| {
                            ps.free() > 0 && !w.refused.contains(p) && !w.asked.contains(p)
                        })
                        .max_by_key(|(_, ps)| ps.free())
                        .map(|(p, _)| *p);
                    if let Some(peer) = best {
                        if let Some(ps) = self.peers.get_mut(&peer) {
                            ask(w, key, peer, ps, &mut batches, now);
                        }
                    }
                }
                for peer in self.peers.keys() {
                    if !w.refused.contains(peer)
                        && !w.asked.contains(peer)
                        && w.probed.insert(*peer)
                    {
                        batches
                            .entry(*peer)
                            .or_default()
                            .push(want_have(w.cid, w.seq));
                    }
                }
                continue;
            }
            if working {
                continue;
            }
            let best = candidates
                .iter()
                .filter(|p| !w.asked.contains(p) || !working_with(false))
                .filter_map(|p| self.peers.get(p).map(|ps| (*p, ps.free())))
                .filter(|(_, free)| *free > 0)
                .max_by_key(|(_, free)| *free);
            if let Some((peer, _)) = best {
                if let Some(ps) = self.peers.get_mut(&peer) {
                    ask(w, key, peer, ps, &mut batches, now);
                }
            }
        }
        self.messages(batches)
    }

    /// One message per peer with its wantlist entries.
    fn messages(&self, batches: HashMap<PeerId, Vec<WantEntry>>) -> Outbox {
        batches
            .into_iter()
            .filter_map(|(peer, wantlist)| {
                self.peers.get(&peer).map(|ps| {
                    (
                        ps.tx.clone(),
                        Message {
                            wantlist,
                            ..Message::default()
                        },
                    )
                })
            })
            .collect()
    }

    /// Drops the proven status of providers that hold wants but delivered
    /// nothing for [`STALLED`]; their wants are free for the others.
    fn drop_stalled(&mut self, now: Instant) {
        for ps in self.peers.values_mut() {
            let stalled = !ps.in_flight.is_empty()
                && ps
                    .delivered_at
                    .is_some_and(|at| now.duration_since(at) >= STALLED);
            if stalled {
                ps.delivered_at = None;
                ps.in_flight.clear();
            }
        }
    }

    /// Wants that look lost, re-sent (their place in line renewed): those
    /// overtaken by later blocks from a peer holding them, and those idle
    /// for [`REWANT_IDLE`], unless a peer holding them is still delivering
    /// over a kept stream. Returns the entries per peer and how many wants.
    fn rewants(&mut self, now: Instant) -> (HashMap<PeerId, Vec<WantEntry>>, u64) {
        let mut out: HashMap<PeerId, Vec<WantEntry>> = HashMap::new();
        let mut count = 0;
        for (key, w) in self.wants.iter_mut() {
            let age = now.duration_since(w.sent_at);
            let overtaken = w.asked.iter().any(|p| {
                self.peers
                    .get(p)
                    .is_some_and(|ps| ps.in_flight.contains(key) && ps.answered_seq > w.seq)
            });
            // A want held by a peer that answers over one kept stream
            // (nothing in it is lost) and is still delivering waits its turn
            // in that peer's queue: over a capped link 32 wants are more
            // than a second of blocks, and re-sending the later ones made
            // the peer send each twice, which lengthened the queue further
            // (a 256 MiB fetch over 16 MiB/s collapsed). A want such a peer
            // skipped is still caught as overtaken.
            let queued = w.asked.iter().any(|p| {
                self.peers.get(p).is_some_and(|ps| {
                    ps.policy.reuse_stream
                        && ps.in_flight.contains(key)
                        && ps
                            .delivered_at
                            .is_some_and(|at| now.duration_since(at) < REWANT_IDLE)
                })
            });
            if !((overtaken && age >= REWANT_OVERTAKEN) || (age >= REWANT_IDLE && !queued)) {
                continue;
            }
            self.next_seq += 1;
            w.seq = self.next_seq;
            w.sent_at = now;
            count += 1;
            // Peers that said DONT_HAVE (or were not reached) may be asked
            // again by the pump; the rest get the want re-sent.
            w.asked.retain(|p| {
                self.peers
                    .get(p)
                    .is_some_and(|ps| ps.in_flight.contains(key))
            });
            for p in &w.asked {
                let e = out.entry(*p).or_default();
                if self
                    .peers
                    .get(p)
                    .is_some_and(|ps| ps.policy.cancel_before_rewant)
                {
                    e.push(cancel(w.cid));
                }
                e.push(want_block(w.cid, w.seq));
            }
        }
        (out, count)
    }

    /// A block `peer` delivered: the peer is delivering, and the want is
    /// done. The peer is taken to have got as far in line as the want's
    /// *first* send: its answer to a re-send's later place would make every
    /// want sent in between look overtaken, their re-sends would be sent
    /// twice and lengthen the queue again (a storm that carried 11× a
    /// NAR's bytes over one capped link).
    fn delivered(&mut self, peer: &PeerId, key: &[u8]) -> Option<(Want, Outbox)> {
        if let Some(ps) = self.peers.get_mut(peer) {
            ps.delivered_at = Some(Instant::now());
        }
        let (w, out) = self.remove_want(key)?;
        if let Some(ps) = self.peers.get_mut(peer) {
            ps.answered_seq = ps.answered_seq.max(w.order);
        }
        Some((w, out))
    }

    /// Forgets a want everywhere; returns cancels for the peers asked.
    fn remove_want(&mut self, key: &[u8]) -> Option<(Want, Outbox)> {
        let w = self.wants.remove(key)?;
        let mut out = Vec::new();
        for (peer, ps) in self.peers.iter_mut() {
            if ps.in_flight.remove(key) && w.asked.contains(peer) {
                out.push((
                    ps.tx.clone(),
                    Message {
                        wantlist: vec![cancel(w.cid)],
                        ..Message::default()
                    },
                ));
            }
        }
        Some((w, out))
    }
}

async fn send_all(out: Outbox) {
    for (tx, msg) in out {
        let _ = tx.send(msg).await;
    }
}

struct Shared {
    state: Mutex<State>,
    store: BlockStore,
    control: Control,
    hashers: Arc<Semaphore>,
    stats: Stats,
    /// Peers with inbound streams open, and what each may still use.
    inbound: Mutex<HashMap<PeerId, Inbound>>,
    /// Inbound streams of all peers ([`STREAMS_TOTAL`]).
    streams: Arc<Semaphore>,
    /// Inbound message bytes of all peers ([`FRAME_BYTES_TOTAL`]).
    frame_bytes: Arc<Semaphore>,
}

/// One peer's inbound streams.
struct Inbound {
    open: usize,
    /// Whether a refusal was logged since its streams were last all closed
    /// (one warning per burst, every refusal counted).
    warned: bool,
    frame_bytes: Arc<Semaphore>,
    /// Held while one of its wantlists is answered.
    serving: Arc<tokio::sync::Mutex<()>>,
}

/// An admitted inbound stream: its place in the caps, given back on drop.
struct InboundSlot {
    shared: Arc<Shared>,
    peer: PeerId,
    budget: FrameBudget,
    serving: Arc<tokio::sync::Mutex<()>>,
    _total: OwnedSemaphorePermit,
}

impl Drop for InboundSlot {
    fn drop(&mut self) {
        let mut inbound = self.shared.lock_inbound();
        if let Some(entry) = inbound.get_mut(&self.peer) {
            entry.open = entry.open.saturating_sub(1);
            if entry.open == 0 {
                inbound.remove(&self.peer);
            }
        }
    }
}

/// Handle to the bitswap engine; cheap to clone.
#[derive(Clone)]
pub struct Bitswap {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Bitswap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bitswap")
            .field("stats", &self.shared.stats)
            .finish()
    }
}

fn priority(seq: u64) -> i32 {
    // Earlier wants first: Kubo serves higher priorities first.
    i32::MAX - (seq % (i32::MAX as u64)) as i32
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (plain maps).
        lock(&self.state)
    }

    fn lock_inbound(&self) -> MutexGuard<'_, HashMap<PeerId, Inbound>> {
        lock(&self.inbound)
    }

    /// A place for a new inbound stream of `peer`, or why there is none.
    fn admit(self: &Arc<Self>, peer: PeerId) -> Result<InboundSlot, &'static str> {
        let mut inbound = self.lock_inbound();
        let entry = inbound.entry(peer).or_insert_with(|| Inbound {
            open: 0,
            warned: false,
            frame_bytes: Arc::new(Semaphore::new(FRAME_BYTES_PER_PEER)),
            serving: Arc::new(tokio::sync::Mutex::new(())),
        });
        let total = if entry.open >= STREAMS_PER_PEER {
            Err("the peer has as many bitswap streams open as one peer may")
        } else {
            self.streams
                .clone()
                .try_acquire_owned()
                .map_err(|_| "all peers together have as many bitswap streams open as allowed")
        };
        let total = match total {
            Ok(total) => total,
            Err(reason) => {
                self.stats.streams_refused.fetch_add(1, Ordering::Relaxed);
                if !entry.warned {
                    entry.warned = true;
                    tracing::warn!(%peer, open = entry.open, "bitswap: inbound streams refused: {reason}");
                }
                if entry.open == 0 {
                    inbound.remove(&peer);
                }
                return Err(reason);
            }
        };
        entry.open += 1;
        Ok(InboundSlot {
            shared: self.clone(),
            peer,
            budget: FrameBudget {
                peer: entry.frame_bytes.clone(),
                total: self.frame_bytes.clone(),
            },
            serving: entry.serving.clone(),
            _total: total,
        })
    }
}

impl Bitswap {
    /// Starts serving `incoming` (from `Control::accept(PROTOCOL)`, taken
    /// before any connection so identify advertises the protocol). Returns
    /// the engine and the tasks to abort on shutdown.
    pub fn start(
        control: Control,
        incoming: IncomingStreams,
        store: BlockStore,
    ) -> (Self, Vec<tokio::task::JoinHandle<()>>) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            store,
            control,
            hashers: Arc::new(Semaphore::new(HASHERS)),
            stats: Stats::default(),
            inbound: Mutex::new(HashMap::new()),
            streams: Arc::new(Semaphore::new(STREAMS_TOTAL)),
            frame_bytes: Arc::new(Semaphore::new(FRAME_BYTES_TOTAL)),
        });
        let accept = tokio::spawn(accept_loop(shared.clone(), incoming));
        let ticker = tokio::spawn(tick_loop(shared.clone()));
        (Bitswap { shared }, vec![accept, ticker])
    }

    /// Counters since start.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Replaces the set of peers wants go to, each with its limit of wants
    /// in flight; new peers get the oldest current wants, departed peers'
    /// senders are dropped.
    pub async fn set_peers(&self, peers: &[(PeerId, PeerPolicy)]) {
        let out = {
            let mut st = self.shared.lock();
            st.peers.retain(|p, _| peers.iter().any(|(q, _)| q == p));
            for (p, policy) in peers {
                let policy = PeerPolicy {
                    wants: policy.wants.max(1),
                    ..*policy
                };
                match st.peers.get_mut(p) {
                    Some(ps) => ps.policy = policy,
                    None => {
                        let queue = Arc::new(Semaphore::new(QUEUE_BYTES));
                        let tx = spawn_writer(self.shared.clone(), *p, queue.clone());
                        st.peers.insert(*p, PeerState::new(tx, queue, policy));
                    }
                }
            }
            st.pump()
        };
        send_all(out).await;
    }

    /// Fetches one block from the connected peers: verified bytes, or
    /// [`IpfsError::FetchTimeout`] naming the CID.
    pub async fn get(&self, cid: Cid, timeout: Duration) -> Result<Bytes, IpfsError> {
        block::check_supported(&cid)?;
        if let Some(data) = block::inline_data(&cid) {
            return Ok(data);
        }
        let key = cid.hash().to_bytes();
        let (tx, rx) = oneshot::channel();
        let out = {
            let mut st = self.shared.lock();
            if let Some(w) = st.wants.get_mut(&key) {
                w.waiters.push(tx);
                Vec::new()
            } else {
                let seq = st.next_seq();
                st.wants.insert(key.clone(), Want::new(cid, seq, vec![tx]));
                st.pump()
            }
        };
        // From here on, however this future ends (block, timeout, or dropped
        // because its caller went away), the guard releases our interest.
        let mut guard = Waiting {
            shared: self.shared.clone(),
            key,
            rx,
        };
        send_all(out).await;
        let got = tokio::time::timeout(timeout, &mut guard.rx).await;
        drop(guard);
        match got {
            Ok(Ok(data)) => Ok(data),
            Ok(Err(_)) | Err(_) => Err(IpfsError::FetchTimeout { cid, timeout }),
        }
    }

    /// Wants still registered (waiting for a block), for tests and `status`.
    pub fn open_wants(&self) -> usize {
        self.shared.lock().wants.len()
    }
}

/// One caller's interest in a want. Dropped when [`Bitswap::get`] returns or
/// its future is dropped (client gone, error elsewhere, prefetch aborted):
/// the last waiter out removes the want and cancels it with the peers asked,
/// so an abandoned fetch is not re-broadcast forever and does not hold, as
/// the oldest want, the slots real fetches need.
struct Waiting {
    shared: Arc<Shared>,
    key: Vec<u8>,
    rx: oneshot::Receiver<Bytes>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        // Closed first, so our own sender counts as gone below.
        self.rx.close();
        let out = {
            let mut st = self.shared.lock();
            let Some(w) = st.wants.get_mut(&self.key) else {
                return;
            };
            w.waiters.retain(|t| !t.is_closed());
            if !w.waiters.is_empty() {
                return;
            }
            let mut out = st.remove_want(&self.key).map(|r| r.1).unwrap_or_default();
            self.shared.stats.released.fetch_add(1, Ordering::Relaxed);
            out.extend(st.pump());
            out
        };
        if out.is_empty() {
            return;
        }
        // Drop cannot await: hand the cancels (and wants the freed slots
        // went to) to a task; outside a runtime, send what fits now (a want
        // not sent is re-sent by the ticker after REWANT_IDLE).
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(send_all(out));
            }
            Err(_) => {
                for (tx, msg) in out {
                    let _ = tx.try_send(msg);
                }
            }
        }
    }
}

fn want_block(cid: Cid, seq: u64) -> WantEntry {
    WantEntry {
        cid,
        priority: priority(seq),
        cancel: false,
        want_type: WantType::Block,
        send_dont_have: true,
    }
}

fn want_have(cid: Cid, seq: u64) -> WantEntry {
    WantEntry {
        cid,
        priority: priority(seq),
        cancel: false,
        want_type: WantType::Have,
        send_dont_have: true,
    }
}

fn cancel(cid: Cid) -> WantEntry {
    WantEntry {
        cid,
        priority: 0,
        cancel: true,
        want_type: WantType::Block,
        send_dont_have: false,
    }
}

/// One task per peer writes its queued messages, each on a new stream that
/// is closed right after (as Kubo and Helia do: Helia only handles a stream's
/// messages once the sender closes it), or, for peers whose policy says
/// [`PeerPolicy::reuse_stream`], all on one stream kept open. A failed send
/// is retried once on a new stream; a send that times out is dropped. Block
/// bytes are given back to `queue` once their message is written or dropped.
fn spawn_writer(shared: Arc<Shared>, peer: PeerId, queue: Arc<Semaphore>) -> mpsc::Sender<Message> {
    let (tx, mut rx) = mpsc::channel::<Message>(PEER_QUEUE);
    tokio::spawn(async move {
        let mut control = shared.control.clone();
        let mut kept: Option<Stream> = None;
        while let Some(mut msg) = rx.recv().await {
            // Coalesce whatever else is queued: Helia drops messages beyond
            // ten queued per peer, and fewer messages cost fewer streams.
            while msg.block_bytes() < RESPONSE_BYTES {
                match rx.try_recv() {
                    Ok(more) => msg.merge(more),
                    Err(_) => break,
                }
            }
            let body = msg.encode();
            let reuse = shared
                .lock()
                .peers
                .get(&peer)
                .is_some_and(|ps| ps.policy.reuse_stream);
            if !reuse {
                kept = None;
            }
            for attempt in 0..2 {
                let send = async {
                    let stream = match kept.take() {
                        Some(s) => Ok(s),
                        None => control
                            .open_stream(peer, PROTOCOL)
                            .await
                            .map_err(|e| std::io::Error::other(e.to_string())),
                    };
                    match stream {
                        Ok(mut s) => match write_frame(&mut s, &body).await {
                            Ok(()) if reuse => {
                                kept = Some(s);
                                Ok(())
                            }
                            Ok(()) => s.close().await,
                            Err(e) => Err(e),
                        },
                        Err(e) => Err(e),
                    }
                };
                // On timeout the stream is dropped, which resets it.
                match tokio::time::timeout(WRITE_TIMEOUT, send).await {
                    Ok(Ok(())) => {
                        shared
                            .stats
                            .blocks_sent
                            .fetch_add(msg.blocks.len() as u64, Ordering::Relaxed);
                        break;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, attempt, error = %e, "bitswap: send failed")
                    }
                    Err(_) => {
                        shared.stats.write_timeouts.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%peer, timeout = ?WRITE_TIMEOUT, blocks = msg.blocks.len(), "bitswap: message dropped, the peer did not read it in time");
                        break;
                    }
                }
            }
            queue.add_permits(queued_bytes(&msg) as usize);
        }
    });
    tx
}

/// The bytes of `queue` the blocks of `msg` hold.
fn queued_bytes(msg: &Message) -> u32 {
    msg.blocks.iter().map(|(_, d)| block_charge(d.len())).sum()
}

/// What one block of `len` bytes takes of a peer's queue: its size, within
/// what the queue holds in total so it can always be taken.
fn block_charge(len: usize) -> u32 {
    len.min(QUEUE_BYTES) as u32
}

/// Drains inbound streams as fast as possible (libp2p-stream keeps only one
/// waiting) and reads each in its own task, within the stream caps; a
/// stream beyond them is dropped, which resets it.
///
/// The reading tasks belong to this loop, so aborting it (the node shutting
/// down) ends them too: a reader left behind would hold the block store,
/// and with it the pins database, open until its peer closed the stream.
async fn accept_loop(shared: Arc<Shared>, mut incoming: IncomingStreams) {
    let mut readers = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            next = incoming.next() => match next {
                Some((peer, stream)) => {
                    if let Ok(slot) = shared.admit(peer) {
                        readers.spawn(read_stream(shared.clone(), slot, stream));
                    }
                }
                None => break,
            },
            Some(_) = readers.join_next(), if !readers.is_empty() => {}
        }
    }
    while readers.join_next().await.is_some() {}
}

async fn read_stream(shared: Arc<Shared>, slot: InboundSlot, mut stream: Stream) {
    let peer = slot.peer;
    loop {
        match read_frame(&mut stream, &slot.budget).await {
            // The permit is held until the message is handled.
            Ok(Some((frame, _permit))) => match Message::decode(&frame) {
                Ok(msg) => handle_message(&shared, peer, msg, &slot.serving).await,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "bitswap: bad message");
                    return;
                }
            },
            Ok(None) => return,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    shared.stats.truncated.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(%peer, error = %e, "bitswap: stream ended");
                return;
            }
        }
    }
}

async fn handle_message(
    shared: &Arc<Shared>,
    peer: PeerId,
    msg: Message,
    serving: &tokio::sync::Mutex<()>,
) {
    for (prefix, data) in msg.blocks {
        if shared.lock().wants.is_empty() {
            // Not even hashed: nobody waits for anything.
            shared.stats.unmatched.fetch_add(1, Ordering::Relaxed);
            shared.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let Ok(permit) = shared.hashers.clone().acquire_owned().await else {
            return;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let hashed = tokio::task::spawn_blocking(move || {
                block::cid_from_prefix(&prefix, &data).map(|c| (c, data))
            })
            .await;
            drop(permit);
            match hashed {
                Ok(Some((cid, data))) => deliver(&shared, peer, cid, data).await,
                _ => {
                    shared.stats.unmatched.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let have = msg.presences.iter().any(|(_, p)| *p == Presence::Have);
    let dont_have: Vec<Vec<u8>> = msg
        .presences
        .iter()
        .filter(|(_, p)| *p == Presence::DontHave)
        .map(|(c, _)| c.hash().to_bytes())
        .collect();
    if have || !dont_have.is_empty() {
        let out = {
            let mut st = shared.lock();
            if let Some(ps) = st.peers.get_mut(&peer) {
                if have {
                    ps.delivered_at = Some(Instant::now());
                }
                for k in &dont_have {
                    ps.in_flight.remove(k);
                }
                // It may have other DAGs, not this one: ask it again only
                // once it delivers something.
                if !dont_have.is_empty() {
                    ps.delivered_at = None;
                }
            }
            for k in &dont_have {
                if let Some(w) = st.wants.get_mut(k) {
                    w.refused.insert(peer);
                }
            }
            st.pump()
        };
        send_all(out).await;
    }
    if !msg.wantlist.is_empty() {
        // One wantlist of a peer at a time: the others wait, unread.
        let _serving = serving.lock().await;
        serve_wants(shared, peer, msg.wantlist).await;
    }
}

/// Hands a verified block from `peer` to its waiters and frees its slots;
/// the peer is a proven provider from now on.
async fn deliver(shared: &Shared, peer: PeerId, cid: Cid, data: Bytes) {
    let out = {
        let mut st = shared.lock();
        match st.delivered(&peer, &cid.hash().to_bytes()) {
            Some((w, mut out)) => {
                shared.stats.blocks_received.fetch_add(1, Ordering::Relaxed);
                for t in w.waiters {
                    let _ = t.send(data.clone());
                }
                // Only peers still working on it need the cancel.
                out.retain(|_| w.asked.len() > 1);
                out.extend(st.pump());
                out
            }
            None => {
                shared.stats.unmatched.fetch_add(1, Ordering::Relaxed);
                shared.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                st.pump()
            }
        }
    };
    send_all(out).await;
}

/// Answers a peer's wantlist from the local store; each block waits for
/// room in the peer's queue of unwritten answers.
async fn serve_wants(shared: &Arc<Shared>, peer: PeerId, wants: Vec<WantEntry>) {
    let (tx, queue) = peer_sender(shared, peer);
    let mut out = Message::default();
    let mut bytes = 0usize;
    for e in wants.into_iter().filter(|e| !e.cancel) {
        let store = shared.store.clone();
        let cid = e.cid;
        let found = match e.want_type {
            WantType::Have => {
                tokio::task::spawn_blocking(move || store.has(&cid).map(|h| h.then(Bytes::new)))
                    .await
            }
            WantType::Block => {
                tokio::task::spawn_blocking(move || {
                    store.get(&cid).map(|b| b.map(Block::into_data))
                })
                .await
            }
        };
        match found {
            Ok(Ok(Some(data))) if e.want_type == WantType::Block => {
                // Given back by the writer once written or dropped.
                match queue.acquire_many(block_charge(data.len())).await {
                    Ok(permit) => permit.forget(),
                    Err(_) => return,
                }
                bytes += data.len();
                out.blocks.push((block::prefix(&cid), data));
            }
            Ok(Ok(Some(_))) => out.presences.push((cid, Presence::Have)),
            Ok(Ok(None)) if e.send_dont_have => out.presences.push((cid, Presence::DontHave)),
            Ok(Ok(None)) => {}
            Ok(Err(err)) => tracing::warn!(%cid, error = %err, "bitswap: cannot read block"),
            Err(err) => tracing::warn!(%cid, error = %err, "bitswap: read task failed"),
        }
        if bytes >= RESPONSE_BYTES {
            let msg = std::mem::take(&mut out);
            bytes = 0;
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    }
    if !out.is_empty() {
        let _ = tx.send(out).await;
    }
}

/// The writer for `peer` and its queue's room, created if the peer is new
/// (it reached us first).
fn peer_sender(shared: &Arc<Shared>, peer: PeerId) -> (mpsc::Sender<Message>, Arc<Semaphore>) {
    let mut st = shared.lock();
    if let Some(ps) = st.peers.get(&peer).filter(|ps| !ps.tx.is_closed()) {
        return (ps.tx.clone(), ps.queue.clone());
    }
    let queue = Arc::new(Semaphore::new(QUEUE_BYTES));
    let tx = spawn_writer(shared.clone(), peer, queue.clone());
    st.peers.insert(
        peer,
        PeerState::new(tx.clone(), queue.clone(), PeerPolicy::for_agent("")),
    );
    (tx, queue)
}

/// Re-sends wants that look lost: overtaken by later blocks, or idle.
async fn tick_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let out = {
            let mut st = shared.lock();
            let now = Instant::now();
            st.drop_stalled(now);
            let (rewants, count) = st.rewants(now);
            shared.stats.rewants.fetch_add(count, Ordering::Relaxed);
            let mut msgs = st.messages(rewants);
            msgs.extend(st.pump());
            msgs
        };
        for (tx, msg) in out {
            let _ = tx.try_send(msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ipfs::block::{sha256_multihash, DAG_PB, RAW};
    use proptest::prelude::*;

    fn cid(i: u64) -> Cid {
        Cid::new_v1(RAW, sha256_multihash(&i.to_le_bytes()))
    }

    /// A state with `n` peers (nixpfs policy), the first `proven` of them
    /// proven providers, and wants for `cid(0..wants)`.
    fn state(n: usize, proven: usize, wants: u64) -> (State, Vec<PeerId>) {
        let mut st = State::default();
        let peers: Vec<PeerId> = (0..n).map(|_| PeerId::random()).collect();
        for (i, p) in peers.iter().enumerate() {
            let (tx, rx) = mpsc::channel(1);
            std::mem::forget(rx);
            let queue = Arc::new(Semaphore::new(QUEUE_BYTES));
            let mut ps = PeerState::new(tx, queue, PeerPolicy::for_agent("nixpfs/0.1.0"));
            if i < proven {
                ps.delivered_at = Some(Instant::now());
            }
            st.peers.insert(*p, ps);
        }
        for i in 0..wants {
            let seq = st.next_seq();
            st.wants
                .insert(cid(i).hash().to_bytes(), Want::new(cid(i), seq, Vec::new()));
        }
        (st, peers)
    }

    fn entries(out: &Outbox, kind: WantType) -> usize {
        out.iter()
            .flat_map(|(_, m)| &m.wantlist)
            .filter(|e| e.want_type == kind && !e.cancel)
            .count()
    }

    #[test]
    fn with_proven_providers_each_block_is_asked_of_one_peer_and_spread() {
        let (mut st, peers) = state(3, 2, 40);
        let out = st.pump();
        assert_eq!(entries(&out, WantType::Block), 40, "each want once");
        assert_eq!(entries(&out, WantType::Have), 0);
        assert!(st.wants.values().all(|w| w.asked.len() == 1));
        let load: Vec<usize> = peers.iter().map(|p| st.peers[p].in_flight.len()).collect();
        assert_eq!(
            load,
            [20, 20, 0],
            "spread over the providers, none to the other"
        );
        assert!(st.pump().is_empty(), "nothing asked twice");
    }

    #[test]
    fn with_no_known_provider_one_peer_gets_the_block_and_the_others_a_have() {
        let (mut st, peers) = state(3, 0, 1);
        let out = st.pump();
        assert_eq!(entries(&out, WantType::Block), 1);
        assert_eq!(entries(&out, WantType::Have), 2);
        // A DONT_HAVE from the one asked, and a HAVE from another, move the
        // want to the peer that has it.
        let key = cid(0).hash().to_bytes();
        let asked = *st.wants[&key].asked.iter().next().expect("asked");
        let have = *peers.iter().find(|p| **p != asked).expect("another peer");
        st.peers
            .get_mut(&asked)
            .expect("peer")
            .in_flight
            .remove(&key);
        st.wants.get_mut(&key).expect("want").refused.insert(asked);
        st.peers.get_mut(&have).expect("peer").delivered_at = Some(Instant::now());
        let out = st.pump();
        assert_eq!(entries(&out, WantType::Block), 1);
        assert!(st.peers[&have].in_flight.contains(&key));
    }

    #[test]
    fn a_want_nobody_claims_goes_to_every_peer_after_a_while() {
        let (mut st, _) = state(3, 0, 1);
        st.pump();
        let key = cid(0).hash().to_bytes();
        let w = st.wants.get_mut(&key).expect("want");
        w.since = Instant::now()
            .checked_sub(REWANT_IDLE)
            .expect("a past instant");
        let out = st.pump();
        assert_eq!(entries(&out, WantType::Block), 2, "the two not asked yet");
        assert_eq!(st.wants[&key].asked.len(), 3);
    }

    #[test]
    fn a_stalled_provider_loses_its_wants_to_the_others() {
        let (mut st, peers) = state(2, 2, 10);
        st.pump();
        let stalled = peers[0];
        st.peers.get_mut(&stalled).expect("peer").delivered_at =
            Instant::now().checked_sub(STALLED);
        st.drop_stalled(Instant::now());
        assert!(st.peers[&stalled].in_flight.is_empty());
        st.pump();
        assert_eq!(
            st.peers[&peers[1]].in_flight.len(),
            10,
            "all with the live one"
        );
    }

    /// One proven provider with `agent`'s policy holding `wants` wants,
    /// asked now; its last delivery `delivered_ago` before `now + later`.
    fn queued_at_one_peer(
        agent: &str,
        wants: u64,
        later: Duration,
        delivered_ago: Duration,
    ) -> (State, PeerId, Instant) {
        let (mut st, peers) = state(1, 1, wants);
        let peer = peers[0];
        st.peers.get_mut(&peer).expect("peer").policy = PeerPolicy::for_agent(agent);
        st.pump();
        let now = Instant::now() + later;
        st.peers.get_mut(&peer).expect("peer").delivered_at = Some(now - delivered_ago);
        (st, peer, now)
    }

    #[test]
    fn idle_wants_of_a_nixpfs_peer_still_delivering_wait_their_turn() {
        let (mut st, peer, now) = queued_at_one_peer(
            "nixpfs/0.1.0",
            32,
            REWANT_IDLE * 2,
            Duration::from_millis(50),
        );
        let (out, count) = st.rewants(now);
        assert_eq!(count, 0, "queued behind each other, not lost");
        assert!(out.is_empty());
        assert_eq!(st.peers[&peer].in_flight.len(), 32);
    }

    #[test]
    fn idle_wants_of_a_silent_peer_are_sent_again() {
        let (mut st, peer, now) =
            queued_at_one_peer("nixpfs/0.1.0", 32, REWANT_IDLE * 2, REWANT_IDLE);
        let (out, count) = st.rewants(now);
        assert_eq!(count, 32);
        assert_eq!(out[&peer].len(), 32);
    }

    #[test]
    fn idle_wants_of_a_peer_on_a_stream_per_message_are_sent_again() {
        // Kubo's answers can be lost (libp2p-stream drops inbound streams).
        let (mut st, _, now) =
            queued_at_one_peer("kubo/0.22.0", 4, REWANT_IDLE * 2, Duration::from_millis(50));
        assert_eq!(st.rewants(now).1, 4);
    }

    #[test]
    fn overtaken_wants_are_sent_again_even_while_the_peer_delivers() {
        let (mut st, peer, now) = queued_at_one_peer(
            "nixpfs/0.1.0",
            8,
            REWANT_OVERTAKEN,
            Duration::from_millis(50),
        );
        let ps = st.peers.get_mut(&peer).expect("peer");
        ps.answered_seq = 5;
        let (_, count) = st.rewants(now);
        assert_eq!(count, 4, "wants 1 to 4 were overtaken by an answer to 5");
    }

    #[test]
    fn a_block_answering_a_re_sent_want_overtakes_only_what_came_before_it_first() {
        let (mut st, peer, now) = queued_at_one_peer(
            "nixpfs/0.1.0",
            8,
            REWANT_OVERTAKEN,
            Duration::from_millis(50),
        );
        // The first want was re-sent (its place in line now after all 8),
        // then the peer answers its first request.
        let first = cid(0).hash().to_bytes();
        st.next_seq += 1;
        st.wants.get_mut(&first).expect("want").seq = st.next_seq;
        assert!(st.delivered(&peer, &first).is_some());
        assert_eq!(st.peers[&peer].answered_seq, 1);
        let (_, count) = st.rewants(now);
        assert_eq!(count, 0, "the other 7 are still in line behind it");
    }

    #[test]
    fn decodes_a_go_bitswap_style_message() {
        // Hand-built like boxo's encoder: wantlist with a want-have entry,
        // a payload block with a CIDv0 prefix, and a DONT_HAVE.
        let data = Bytes::from_static(b"\x0a\x02\x08\x01");
        let v0 = Cid::new_v0(sha256_multihash(&data)).unwrap();
        let msg = Message {
            wantlist: vec![WantEntry {
                cid: cid(1),
                priority: -5,
                cancel: false,
                want_type: WantType::Have,
                send_dont_have: true,
            }],
            full: true,
            blocks: vec![(block::prefix(&v0), data.clone())],
            presences: vec![(cid(2), Presence::DontHave)],
        };
        let got = Message::decode(&Bytes::from(msg.encode())).unwrap();
        assert_eq!(got, msg);
        let (p, d) = &got.blocks[0];
        assert_eq!(block::cid_from_prefix(p, d), Some(v0));
        assert_eq!(v0.codec(), DAG_PB);
    }

    #[test]
    fn only_helia_gets_a_cancel_before_a_rewant() {
        let kubo = PeerPolicy::for_agent("kubo/0.22.0/");
        assert!(!kubo.cancel_before_rewant);
        assert_eq!(kubo.wants, WANTS_PER_KUBO_PEER);
        assert!(PeerPolicy::for_agent("helia/7.1.15 js-libp2p/3.3.11").cancel_before_rewant);
        assert_eq!(
            PeerPolicy::for_agent("nixpfs/0.1.0").wants,
            WANTS_PER_NIXPFS_PEER
        );
        assert!(!PeerPolicy::for_agent("").cancel_before_rewant);
    }

    #[test]
    fn only_nixpfs_peers_get_one_long_lived_stream() {
        assert!(PeerPolicy::for_agent("nixpfs/0.1.0").reuse_stream);
        for agent in ["kubo/0.22.0/", "helia/7.1.15 js-libp2p/3.3.11", ""] {
            assert!(!PeerPolicy::for_agent(agent).reuse_stream, "{agent}");
        }
    }

    #[test]
    fn bitswap_1_0_blocks_are_read_as_cidv0() {
        let data = b"\x0a\x02\x08\x02";
        let mut buf = Vec::new();
        pb::put_bytes(&mut buf, 2, data);
        let msg = Message::decode(&Bytes::from(buf)).unwrap();
        let (p, d) = &msg.blocks[0];
        let want = Cid::new_v0(sha256_multihash(data)).unwrap();
        assert_eq!(block::cid_from_prefix(p, d), Some(want));
    }

    fn entry() -> impl Strategy<Value = WantEntry> {
        (
            any::<u64>(),
            any::<i32>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(i, priority, cancel, have, send_dont_have)| WantEntry {
                cid: cid(i),
                priority,
                cancel,
                want_type: if have {
                    WantType::Have
                } else {
                    WantType::Block
                },
                send_dont_have,
            })
    }

    proptest! {
        #[test]
        fn message_round_trips(
            wantlist in proptest::collection::vec(entry(), 0..4),
            full in any::<bool>(),
            blocks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 0..3),
            presences in proptest::collection::vec((any::<u64>(), any::<bool>()), 0..3),
        ) {
            let msg = Message {
                wantlist,
                full,
                blocks: blocks.into_iter().map(|b| (block::prefix(&cid(0)), Bytes::from(b))).collect(),
                presences: presences.into_iter().map(|(i, h)| (cid(i), if h { Presence::Have } else { Presence::DontHave })).collect(),
            };
            prop_assert_eq!(Message::decode(&Bytes::from(msg.encode())).unwrap(), msg);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Message::decode(&Bytes::from(bytes));
        }
    }
}
