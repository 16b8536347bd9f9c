//! Bitswap 1.2.0 over rust-ipfs's stream API (libp2p-stream), both roles.
//!
//! Server: every inbound stream is read until EOF (Kubo opens one stream per
//! message, and rust-ipfs's own bitswap loses all but the last); want-have is
//! answered with HAVE/DONT_HAVE, want-block with the block, in messages of
//! about 1 MiB of blocks. Client: want-block goes straight to every connected
//! peer, many wants stay in flight, and a want is re-sent when later blocks
//! overtook it or it stayed unanswered (libp2p-stream silently drops an
//! inbound stream when its one-slot channel is full). Received blocks are
//! hashed on the blocking pool; only bytes that hash to a wanted CID count.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use cid::Cid;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p_stream::{Control, IncomingStreams};
use rust_ipfs::{PeerId, Stream, StreamProtocol};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::block::{self, Block};
use super::blockstore::BlockStore;
use super::pb::{self, Fields};
use super::IpfsError;

/// The only bitswap version we speak (Helia speaks only this one too).
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/ipfs/bitswap/1.2.0");
/// Largest inbound message accepted (bitswap's 4 MiB plus framing slack).
const MAX_MESSAGE: usize = 4 * 1024 * 1024 + 64 * 1024;
/// Block bytes per outbound message before it is flushed.
const RESPONSE_BYTES: usize = 1024 * 1024;
/// How often wants are checked for re-sending and peers refreshed.
const TICK: Duration = Duration::from_millis(50);
/// A want overtaken by later blocks is re-sent after this long.
const REWANT_OVERTAKEN: Duration = Duration::from_millis(250);
/// Any want unanswered this long is re-sent.
const REWANT_IDLE: Duration = Duration::from_secs(1);
/// Received blocks hashed at once (bounds memory held by unverified blocks).
const HASHERS: usize = 8;
/// Messages queued per peer before senders wait.
const PEER_QUEUE: usize = 8;

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
async fn read_frame(stream: &mut Stream) -> std::io::Result<Option<Bytes>> {
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
    let mut buf = BytesMut::zeroed(len);
    stream.read_exact(&mut buf).await?;
    Ok(Some(buf.freeze()))
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
}

/// A block we are waiting for.
#[derive(Debug)]
struct Want {
    cid: Cid,
    waiters: Vec<oneshot::Sender<Bytes>>,
    /// Order in which wants were (re)sent; a block for a later want
    /// arriving first means this one was probably lost.
    seq: u64,
    sent_at: Instant,
    asked: HashSet<PeerId>,
}

#[derive(Debug, Default)]
struct State {
    wants: HashMap<Vec<u8>, Want>,
    peers: HashMap<PeerId, mpsc::Sender<Message>>,
    next_seq: u64,
    /// Highest seq of a want answered so far.
    answered_seq: u64,
}

struct Shared {
    state: Mutex<State>,
    store: BlockStore,
    control: Control,
    hashers: Arc<Semaphore>,
    stats: Stats,
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
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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
        });
        let accept = tokio::spawn(accept_loop(shared.clone(), incoming));
        let ticker = tokio::spawn(tick_loop(shared.clone()));
        (Bitswap { shared }, vec![accept, ticker])
    }

    /// Counters since start.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Replaces the set of peers wants go to; new peers get the whole
    /// current wantlist, departed peers' senders are dropped.
    pub fn set_peers(&self, peers: &[PeerId]) {
        let mut st = self.shared.lock();
        st.peers.retain(|p, _| peers.contains(p));
        for p in peers {
            if !st.peers.contains_key(p) {
                let tx = spawn_writer(self.shared.clone(), *p);
                st.peers.insert(*p, tx.clone());
                let entries: Vec<WantEntry> = st
                    .wants
                    .values_mut()
                    .map(|w| {
                        w.asked.insert(*p);
                        want_block(w.cid, w.seq)
                    })
                    .collect();
                if !entries.is_empty() {
                    let _ = tx.try_send(Message {
                        wantlist: entries,
                        ..Message::default()
                    });
                }
            }
        }
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
        let sends = {
            let mut st = self.shared.lock();
            if let Some(w) = st.wants.get_mut(&key) {
                w.waiters.push(tx);
                Vec::new()
            } else {
                st.next_seq += 1;
                let seq = st.next_seq;
                let peers: Vec<(PeerId, mpsc::Sender<Message>)> =
                    st.peers.iter().map(|(p, s)| (*p, s.clone())).collect();
                st.wants.insert(
                    key.clone(),
                    Want {
                        cid,
                        waiters: vec![tx],
                        seq,
                        sent_at: Instant::now(),
                        asked: peers.iter().map(|p| p.0).collect(),
                    },
                );
                peers
                    .into_iter()
                    .map(|(_, s)| (s, want_block(cid, seq)))
                    .collect()
            }
        };
        for (s, entry) in sends {
            let _ = s
                .send(Message {
                    wantlist: vec![entry],
                    ..Message::default()
                })
                .await;
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(data)) => Ok(data),
            Ok(Err(_)) | Err(_) => {
                self.give_up(&key);
                Err(IpfsError::FetchTimeout { cid, timeout })
            }
        }
    }

    /// Drops a timed-out waiter; the last one out cancels the want.
    fn give_up(&self, key: &[u8]) {
        let mut st = self.shared.lock();
        let Some(w) = st.wants.get_mut(key) else {
            return;
        };
        w.waiters.retain(|t| !t.is_closed());
        if w.waiters.is_empty() {
            if let Some(w) = st.wants.remove(key) {
                send_cancels(&st, &w);
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

fn send_cancels(st: &State, w: &Want) {
    for p in &w.asked {
        if let Some(tx) = st.peers.get(p) {
            let _ = tx.try_send(Message {
                wantlist: vec![WantEntry {
                    cid: w.cid,
                    priority: 0,
                    cancel: true,
                    want_type: WantType::Block,
                    send_dont_have: false,
                }],
                ..Message::default()
            });
        }
    }
}

/// One task per peer owns an outbound stream and writes queued messages,
/// reopening the stream once if a write fails.
fn spawn_writer(shared: Arc<Shared>, peer: PeerId) -> mpsc::Sender<Message> {
    let (tx, mut rx) = mpsc::channel::<Message>(PEER_QUEUE);
    tokio::spawn(async move {
        let mut control = shared.control.clone();
        let mut stream: Option<Stream> = None;
        while let Some(msg) = rx.recv().await {
            let body = msg.encode();
            for attempt in 0..2 {
                if stream.is_none() {
                    match control.open_stream(peer, PROTOCOL).await {
                        Ok(s) => stream = Some(s),
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "bitswap: cannot open stream");
                            break;
                        }
                    }
                }
                if let Some(s) = stream.as_mut() {
                    match write_frame(s, &body).await {
                        Ok(()) => {
                            shared
                                .stats
                                .blocks_sent
                                .fetch_add(msg.blocks.len() as u64, Ordering::Relaxed);
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(%peer, attempt, error = %e, "bitswap: write failed");
                            stream = None;
                        }
                    }
                }
            }
        }
        if let Some(mut s) = stream {
            let _ = s.close().await;
        }
    });
    tx
}

/// Drains inbound streams as fast as possible (libp2p-stream keeps only one
/// waiting) and reads each in its own task.
async fn accept_loop(shared: Arc<Shared>, mut incoming: IncomingStreams) {
    while let Some((peer, stream)) = incoming.next().await {
        tokio::spawn(read_stream(shared.clone(), peer, stream));
    }
}

async fn read_stream(shared: Arc<Shared>, peer: PeerId, mut stream: Stream) {
    loop {
        match read_frame(&mut stream).await {
            Ok(Some(frame)) => match Message::decode(&frame) {
                Ok(msg) => handle_message(&shared, peer, msg).await,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "bitswap: bad message");
                    return;
                }
            },
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "bitswap: stream ended");
                return;
            }
        }
    }
}

async fn handle_message(shared: &Arc<Shared>, peer: PeerId, msg: Message) {
    for (prefix, data) in msg.blocks {
        if shared.lock().wants.is_empty() {
            shared.stats.unmatched.fetch_add(1, Ordering::Relaxed);
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
                Ok(Some((cid, data))) => deliver(&shared, cid, data),
                _ => {
                    shared.stats.unmatched.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    if !msg.wantlist.is_empty() {
        serve_wants(shared, peer, msg.wantlist).await;
    }
}

/// Hands a verified block to its waiters.
fn deliver(shared: &Shared, cid: Cid, data: Bytes) {
    let mut st = shared.lock();
    match st.wants.remove(&cid.hash().to_bytes()) {
        Some(w) => {
            shared.stats.blocks_received.fetch_add(1, Ordering::Relaxed);
            st.answered_seq = st.answered_seq.max(w.seq);
            if w.asked.len() > 1 {
                send_cancels(&st, &w);
            }
            for t in w.waiters {
                let _ = t.send(data.clone());
            }
        }
        None => {
            shared.stats.unmatched.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Answers a peer's wantlist from the local store.
async fn serve_wants(shared: &Arc<Shared>, peer: PeerId, wants: Vec<WantEntry>) {
    let Some(tx) = peer_sender(shared, peer) else {
        return;
    };
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

/// The writer for `peer`, created if the peer is new (it reached us first).
fn peer_sender(shared: &Arc<Shared>, peer: PeerId) -> Option<mpsc::Sender<Message>> {
    let mut st = shared.lock();
    if let Some(tx) = st.peers.get(&peer).filter(|t| !t.is_closed()) {
        return Some(tx.clone());
    }
    let tx = spawn_writer(shared.clone(), peer);
    st.peers.insert(peer, tx.clone());
    Some(tx)
}

/// Re-sends wants that look lost.
async fn tick_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let sends = {
            let mut st = shared.lock();
            let now = Instant::now();
            let answered = st.answered_seq;
            let mut next_seq = st.next_seq;
            let mut entries = Vec::new();
            for w in st.wants.values_mut() {
                let age = now.duration_since(w.sent_at);
                if (answered > w.seq && age >= REWANT_OVERTAKEN) || age >= REWANT_IDLE {
                    next_seq += 1;
                    w.seq = next_seq;
                    w.sent_at = now;
                    entries.push(want_block(w.cid, w.seq));
                }
            }
            st.next_seq = next_seq;
            if entries.is_empty() {
                Vec::new()
            } else {
                shared
                    .stats
                    .rewants
                    .fetch_add(entries.len() as u64, Ordering::Relaxed);
                let peers: Vec<PeerId> = st.peers.keys().copied().collect();
                for w in st.wants.values_mut() {
                    w.asked.extend(peers.iter().copied());
                }
                st.peers
                    .values()
                    .map(|tx| (tx.clone(), entries.clone()))
                    .collect::<Vec<_>>()
            }
        };
        for (tx, entries) in sends {
            let _ = tx.try_send(Message {
                wantlist: entries,
                ..Message::default()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipfs::block::{sha256_multihash, DAG_PB, RAW};
    use proptest::prelude::*;

    fn cid(i: u64) -> Cid {
        Cid::new_v1(RAW, sha256_multihash(&i.to_le_bytes()))
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
