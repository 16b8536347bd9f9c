//! UnixFS file DAGs: importing a byte stream under the `unixfs-v1-2025`
//! profile (CIDv1, raw leaves, sha2-256, 1 MiB chunks, balanced width 1024,
//! byte-identical to Helia's importer), and walking a DAG in order, for a
//! byte range or for every block, with a window of blocks fetched ahead.

use std::collections::{HashSet, VecDeque};

use bytes::{Bytes, BytesMut};
use cid::Cid;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinHandle;

use super::block::{Block, DAG_PB, RAW};
use super::blockstore::{BlockStore, WriteBatch, Written};
use super::pb::{self, Fields};
use super::prefetch::{Charge, PrefetchBudget};
use super::IpfsError;

/// Name of the only import profile, recorded beside every CID.
pub const PROFILE: &str = "unixfs-v1-2025";
/// Fixed chunk size of the profile (`size-1048576`).
pub const CHUNK_SIZE: usize = 1024 * 1024;
/// Maximum links per DAG node of the profile.
pub const WIDTH: usize = 1024;
/// Chunks hashed and written concurrently while the next one is read.
const IMPORT_PIPELINE: usize = 4;
/// Bytes written between background flushes during an import, so disk
/// writeback overlaps hashing instead of all waiting for the final sync.
const FLUSH_EVERY: u64 = 128 * 1024 * 1024;

/// UnixFS `Data.Type` values we produce or read.
const UNIXFS_RAW: u64 = 0;
const UNIXFS_FILE: u64 = 2;

/// One link of a dag-pb node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PbLink {
    pub cid: Cid,
    pub name: Option<Vec<u8>>,
    pub tsize: Option<u64>,
}

/// A dag-pb node: links, then optional data (a UnixFS message for files).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PbNode {
    pub links: Vec<PbLink>,
    pub data: Option<Vec<u8>>,
}

impl PbNode {
    /// Canonical dag-pb encoding (links before data, as @ipld/dag-pb does).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for link in &self.links {
            let mut l = Vec::with_capacity(48);
            pb::put_bytes(&mut l, 1, &link.cid.to_bytes());
            if let Some(name) = &link.name {
                pb::put_bytes(&mut l, 2, name);
            }
            if let Some(tsize) = link.tsize {
                pb::put_uint(&mut l, 3, tsize);
            }
            pb::put_bytes(&mut out, 2, &l);
        }
        if let Some(data) = &self.data {
            pb::put_bytes(&mut out, 1, data);
        }
        out
    }

    /// Parses a dag-pb node; `cid` only names the block in errors.
    pub fn decode(cid: &Cid, buf: &[u8]) -> Result<Self, IpfsError> {
        let bad = |reason: String| IpfsError::Malformed { cid: *cid, reason };
        let mut node = PbNode::default();
        for field in Fields::new(buf) {
            let (num, value) = field.map_err(|e| bad(e.to_string()))?;
            match num {
                1 => node.data = Some(value.bytes(1).map_err(|e| bad(e.to_string()))?.to_vec()),
                2 => {
                    let lb = value.bytes(2).map_err(|e| bad(e.to_string()))?;
                    let mut link_cid = None;
                    let mut name = None;
                    let mut tsize = None;
                    for lf in Fields::new(lb) {
                        let (ln, lv) = lf.map_err(|e| bad(e.to_string()))?;
                        match ln {
                            1 => {
                                let raw = lv.bytes(1).map_err(|e| bad(e.to_string()))?;
                                link_cid = Some(
                                    Cid::try_from(raw)
                                        .map_err(|e| bad(format!("link CID: {e}")))?,
                                );
                            }
                            2 => name = Some(lv.bytes(2).map_err(|e| bad(e.to_string()))?.to_vec()),
                            3 => tsize = Some(lv.varint(3).map_err(|e| bad(e.to_string()))?),
                            _ => {}
                        }
                    }
                    let cid = link_cid.ok_or_else(|| bad("link without Hash".into()))?;
                    node.links.push(PbLink { cid, name, tsize });
                }
                _ => {}
            }
        }
        Ok(node)
    }
}

/// The UnixFS `Data` message fields a file needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnixfsData {
    pub kind: u64,
    pub data: Option<Vec<u8>>,
    pub filesize: Option<u64>,
    pub blocksizes: Vec<u64>,
}

impl UnixfsData {
    /// Encoding as ipfs-unixfs marshals it (empty data omitted).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        pb::put_uint(&mut out, 1, self.kind);
        if let Some(d) = self.data.as_ref().filter(|d| !d.is_empty()) {
            pb::put_bytes(&mut out, 2, d);
        }
        if let Some(fs) = self.filesize {
            pb::put_uint(&mut out, 3, fs);
        }
        for bs in &self.blocksizes {
            pb::put_uint(&mut out, 4, *bs);
        }
        out
    }

    /// Parses the message (blocksizes packed or not); `cid` names the block.
    pub fn decode(cid: &Cid, buf: &[u8]) -> Result<Self, IpfsError> {
        let bad = |reason: String| IpfsError::Malformed { cid: *cid, reason };
        let mut out = UnixfsData::default();
        let mut has_type = false;
        for field in Fields::new(buf) {
            let (num, value) = field.map_err(|e| bad(e.to_string()))?;
            match (num, value) {
                (1, v) => {
                    out.kind = v.varint(1).map_err(|e| bad(e.to_string()))?;
                    has_type = true;
                }
                (2, v) => {
                    let d = v.bytes(2).map_err(|e| bad(e.to_string()))?;
                    out.data = (!d.is_empty()).then(|| d.to_vec());
                }
                (3, v) => out.filesize = Some(v.varint(3).map_err(|e| bad(e.to_string()))?),
                (4, pb::Value::Bytes(packed)) => {
                    let mut pos = 0;
                    while pos < packed.len() {
                        let bs =
                            pb::get_varint(packed, &mut pos).map_err(|e| bad(e.to_string()))?;
                        out.blocksizes.push(bs);
                    }
                }
                (4, v) => out
                    .blocksizes
                    .push(v.varint(4).map_err(|e| bad(e.to_string()))?),
                _ => {}
            }
        }
        if !has_type {
            return Err(bad("UnixFS Data without Type".into()));
        }
        Ok(out)
    }

    fn data_len(&self) -> u64 {
        self.data.as_ref().map_or(0, |d| d.len() as u64)
    }

    /// File bytes under this node: declared filesize, else data + children.
    fn file_size(&self) -> u64 {
        self.filesize.unwrap_or_else(|| {
            self.data_len().saturating_add(
                self.blocksizes
                    .iter()
                    .fold(0u64, |a, b| a.saturating_add(*b)),
            )
        })
    }
}

/// A finished subtree as its parent links to it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    cid: Cid,
    /// Cumulative DAG size (the link's Tsize).
    tsize: u64,
    /// File bytes below it (the parent's blocksize for it).
    filesize: u64,
}

/// Builds the balanced layout bottom-up while leaves stream in: whenever a
/// level holds [`WIDTH`] entries they become one parent, which is exactly
/// Helia's `balanced` layout (batch by width, recurse on the parents).
#[derive(Debug, Default)]
pub struct DagBuilder {
    levels: Vec<Vec<Entry>>,
    leaves: u64,
}

impl DagBuilder {
    /// Adds the next leaf (already stored); returns parent blocks to store.
    pub fn push_leaf(&mut self, cid: Cid, len: u64) -> Vec<Block> {
        self.leaves += 1;
        let mut out = Vec::new();
        self.push(
            0,
            Entry {
                cid,
                tsize: len,
                filesize: len,
            },
            &mut out,
        );
        out
    }

    fn push(&mut self, level: usize, entry: Entry, out: &mut Vec<Block>) {
        if self.levels.len() <= level {
            self.levels.push(Vec::with_capacity(WIDTH));
        }
        self.levels[level].push(entry);
        if self.levels[level].len() == WIDTH {
            let entries = std::mem::take(&mut self.levels[level]);
            let parent = reduce(&entries, out);
            self.push(level + 1, parent, out);
        }
    }

    /// Closes the DAG: returns the root CID, the file size and the last
    /// parent blocks to store. A single leaf is its own root.
    pub fn finish(mut self) -> (Cid, u64, Vec<Block>) {
        let mut out = Vec::new();
        if self.leaves == 0 {
            let empty = Block::from_data(RAW, Bytes::new());
            let cid = *empty.cid();
            out.push(empty);
            return (cid, 0, out);
        }
        if self.leaves == 1 {
            if let Some(e) = self.levels.first().and_then(|l| l.first()) {
                return (e.cid, e.filesize, out);
            }
        }
        let mut level = 0;
        loop {
            let top = self.levels.iter().rposition(|l| !l.is_empty()).unwrap_or(0);
            let entries = std::mem::take(&mut self.levels[level]);
            if level == top && entries.len() == 1 && level > 0 {
                let root = entries[0];
                return (root.cid, root.filesize, out);
            }
            if !entries.is_empty() {
                let parent = reduce(&entries, &mut out);
                if self.levels.len() <= level + 1 {
                    self.levels.push(Vec::new());
                }
                self.levels[level + 1].push(parent);
            }
            level += 1;
        }
    }
}

/// One UnixFS File node over `entries`, as Helia's file reducer builds it.
fn reduce(entries: &[Entry], out: &mut Vec<Block>) -> Entry {
    let kept: Vec<&Entry> = entries.iter().filter(|e| e.filesize > 0).collect();
    let unixfs = UnixfsData {
        kind: UNIXFS_FILE,
        data: None,
        filesize: Some(kept.iter().map(|e| e.filesize).sum()),
        blocksizes: kept.iter().map(|e| e.filesize).collect(),
    };
    let node = PbNode {
        links: kept
            .iter()
            .map(|e| PbLink {
                cid: e.cid,
                name: Some(Vec::new()),
                tsize: Some(e.tsize),
            })
            .collect(),
        data: Some(unixfs.encode()),
    };
    let bytes = node.encode();
    let tsize = bytes.len() as u64 + kept.iter().map(|e| e.tsize).sum::<u64>();
    let block = Block::from_data(DAG_PB, Bytes::from(bytes));
    let entry = Entry {
        cid: *block.cid(),
        tsize,
        filesize: unixfs.filesize.unwrap_or(0),
    };
    out.push(block);
    entry
}

/// Result of an import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    /// Root CID under [`PROFILE`].
    pub cid: Cid,
    /// File bytes read.
    pub size: u64,
    /// Blocks in the DAG (leaves and parents).
    pub blocks: u64,
    /// Bytes of the DAG's distinct blocks (what a pin of it keeps on disk),
    /// counted on the way so that pinning need not walk the DAG again.
    pub dag_size: u64,
}

/// Imports a byte stream into `store`, durably (one fsync pass at the end).
/// Memory stays bounded by a few chunks whatever the input size.
pub async fn import<R: AsyncRead + Unpin>(
    reader: R,
    store: &BlockStore,
) -> Result<Imported, IpfsError> {
    let (imported, _) =
        import_inner(Box::pin(reader_chunks(reader)), Some(store.clone()), true).await?;
    Ok(imported)
}

/// Like [`import`], for a stream of byte chunks: chunks of exactly
/// [`CHUNK_SIZE`] become leaves without being copied (a 1 GiB pin spent
/// ~0.1 s of CPU re-buffering them through a reader).
pub async fn import_chunks<S>(chunks: S, store: &BlockStore) -> Result<Imported, IpfsError>
where
    S: Stream<Item = std::io::Result<Bytes>> + Unpin,
{
    let (imported, _) = import_inner(Box::pin(rechunk(chunks)), Some(store.clone()), true).await?;
    Ok(imported)
}

/// Like [`import_chunks`], but only the DAG's inner nodes are stored: the
/// leaves (their CIDs and lengths returned in order) are left for the
/// caller to back by other means (see [`super::storeblocks`]).
pub async fn import_chunks_without_leaves<S>(
    chunks: S,
    store: &BlockStore,
) -> Result<(Imported, Vec<(Cid, u64)>), IpfsError>
where
    S: Stream<Item = std::io::Result<Bytes>> + Unpin,
{
    import_inner(Box::pin(rechunk(chunks)), Some(store.clone()), false).await
}

/// Computes the CID the profile gives a byte stream, storing nothing.
pub async fn compute_cid<R: AsyncRead + Unpin>(reader: R) -> Result<Imported, IpfsError> {
    let (imported, _) = import_inner(Box::pin(reader_chunks(reader)), None, true).await?;
    Ok(imported)
}

fn join_error(e: tokio::task::JoinError) -> IpfsError {
    IpfsError::Task {
        reason: e.to_string(),
    }
}

/// The reader cut into [`CHUNK_SIZE`] chunks (the last one short, none empty).
fn reader_chunks<R: AsyncRead + Unpin>(reader: R) -> impl Stream<Item = Result<Bytes, IpfsError>> {
    futures::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        match read_chunk(&mut reader).await {
            Ok(chunk) if chunk.is_empty() => None,
            Ok(chunk) => Some((Ok(chunk), Some(reader))),
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// Re-cuts arbitrary chunks into [`CHUNK_SIZE`] ones (the last one short,
/// none empty), passing through without a copy those that already are.
fn rechunk<S>(chunks: S) -> impl Stream<Item = Result<Bytes, IpfsError>>
where
    S: Stream<Item = std::io::Result<Bytes>> + Unpin,
{
    futures::stream::unfold(
        (Some(chunks), BytesMut::new()),
        |(chunks, mut buf)| async move {
            let mut chunks = chunks?;
            loop {
                if buf.len() >= CHUNK_SIZE {
                    let chunk = buf.split_to(CHUNK_SIZE).freeze();
                    return Some((Ok(chunk), (Some(chunks), buf)));
                }
                match chunks.next().await {
                    Some(Ok(b)) if buf.is_empty() && b.len() == CHUNK_SIZE => {
                        return Some((Ok(b), (Some(chunks), buf)));
                    }
                    Some(Ok(b)) => buf.extend_from_slice(&b),
                    Some(Err(source)) => {
                        return Some((Err(IpfsError::Read { source }), (None, buf)));
                    }
                    None if buf.is_empty() => return None,
                    None => {
                        let last = buf.split().freeze();
                        return Some((Ok(last), (None, buf)));
                    }
                }
            }
        },
    )
}

/// Distinct blocks of an import and their bytes (a DAG may repeat a leaf or
/// a whole subtree; a pin keeps each once).
#[derive(Default)]
struct Tally {
    seen: HashSet<Cid>,
    bytes: u64,
}

impl Tally {
    fn count(&mut self, cid: Cid, len: u64) {
        if self.seen.insert(cid) {
            self.bytes += len;
        }
    }
}

/// Imports `chunks`; with a store, parents are written, and leaves too
/// when `write_leaves` (else their CIDs and lengths are returned in order).
async fn import_inner<S: Stream<Item = Result<Bytes, IpfsError>> + Unpin>(
    mut chunks: S,
    store: Option<BlockStore>,
    write_leaves: bool,
) -> Result<(Imported, Vec<(Cid, u64)>), IpfsError> {
    let mut leaves = Vec::new();
    let mut builder = DagBuilder::default();
    let mut batch = store.as_ref().map(BlockStore::batch);
    let mut in_flight = FuturesOrdered::new();
    let mut tally = Tally::default();
    let mut size = 0u64;
    let mut blocks = 0u64;
    let mut flushing: Option<JoinHandle<Result<(), IpfsError>>> = None;
    let mut since_flush = 0u64;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        size += chunk.len() as u64;
        since_flush += chunk.len() as u64;
        if let (Some(s), true) = (&store, since_flush >= FLUSH_EVERY) {
            if flushing.as_ref().is_none_or(|f| f.is_finished()) {
                since_flush = 0;
                if let Some(done) = flushing.take() {
                    done.await.map_err(join_error)??;
                }
                let s = s.clone();
                flushing = Some(tokio::task::spawn_blocking(move || s.sync()));
            }
        }
        let leaf_store = store.clone().filter(|_| write_leaves);
        in_flight.push_back(tokio::task::spawn_blocking(move || {
            let len = chunk.len() as u64;
            let block = Block::from_data(RAW, chunk);
            let written = match &leaf_store {
                Some(s) => s.write(&block)?,
                None => Written::default(),
            };
            Ok::<_, IpfsError>((*block.cid(), len, written))
        }));
        if in_flight.len() >= IMPORT_PIPELINE {
            if let Some(done) = in_flight.next().await {
                let done = note_leaf(done, &mut leaves, write_leaves);
                blocks += add_leaf(&mut builder, &mut batch, &store, &mut tally, done).await?;
            }
        }
    }
    while let Some(done) = in_flight.next().await {
        let done = note_leaf(done, &mut leaves, write_leaves);
        blocks += add_leaf(&mut builder, &mut batch, &store, &mut tally, done).await?;
    }
    if let Some(done) = flushing.take() {
        done.await.map_err(join_error)??;
    }
    let (cid, file_size, parents) = builder.finish();
    blocks += parents.len() as u64;
    if size == 0 {
        blocks = 1;
    }
    for b in &parents {
        tally.count(*b.cid(), b.data().len() as u64);
    }
    debug_assert_eq!(file_size, size);
    tokio::task::spawn_blocking(move || {
        if let (Some(store), Some(mut batch)) = (store, batch) {
            for b in &parents {
                batch.add(store.write(b)?);
            }
            batch.commit()?;
        }
        Ok::<_, IpfsError>(())
    })
    .await
    .map_err(join_error)??;
    let imported = Imported {
        cid,
        size,
        blocks,
        dag_size: tally.bytes,
    };
    Ok((imported, leaves))
}

/// Records a hashed leaf's CID and length when the leaves are not stored.
fn note_leaf(done: LeafResult, leaves: &mut Vec<(Cid, u64)>, write_leaves: bool) -> LeafResult {
    if let (false, Ok(Ok((cid, len, _)))) = (write_leaves, &done) {
        leaves.push((*cid, *len));
    }
    done
}

type LeafResult = Result<Result<(Cid, u64, Written), IpfsError>, tokio::task::JoinError>;

/// Feeds one hashed leaf to the builder and stores any parents it closed.
async fn add_leaf(
    builder: &mut DagBuilder,
    batch: &mut Option<WriteBatch>,
    store: &Option<BlockStore>,
    tally: &mut Tally,
    done: LeafResult,
) -> Result<u64, IpfsError> {
    let (cid, len, written) = done.map_err(join_error)??;
    tally.count(cid, len);
    let parents = builder.push_leaf(cid, len);
    let n = 1 + parents.len() as u64;
    for b in &parents {
        tally.count(*b.cid(), b.data().len() as u64);
    }
    if let Some(batch) = batch.as_mut() {
        batch.add(written);
        if let (Some(store), false) = (store, parents.is_empty()) {
            let store = store.clone();
            let writes = tokio::task::spawn_blocking(move || {
                parents
                    .iter()
                    .map(|b| store.write(b))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
            .map_err(join_error)??;
            writes.into_iter().for_each(|w| batch.add(w));
        }
    }
    Ok(n)
}

/// Reads up to [`CHUNK_SIZE`] bytes, short only at end of input.
async fn read_chunk<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Bytes, IpfsError> {
    let mut buf = BytesMut::with_capacity(CHUNK_SIZE);
    while buf.len() < CHUNK_SIZE {
        let n = reader
            .read_buf(&mut buf)
            .await
            .map_err(|source| IpfsError::Read { source })?;
        if n == 0 {
            break;
        }
    }
    Ok(buf.freeze())
}

/// Where a DAG walk gets its blocks: the local store, peers, or both.
pub trait BlockSource: Send + Sync + 'static {
    /// The block's bytes, verified against `cid` unless read from our store.
    fn get(&self, cid: Cid) -> BoxFuture<'static, Result<Bytes, IpfsError>>;

    /// Makes sure a leaf is available (for pinning) and returns its size; by
    /// default it fetches the bytes.
    fn ensure(&self, cid: Cid) -> BoxFuture<'static, Result<u64, IpfsError>> {
        let fut = self.get(cid);
        Box::pin(async move { Ok(fut.await?.len() as u64) })
    }

    /// The budget blocks fetched ahead of a reader are charged to; by
    /// default none (reads of a local store hold no more than their window).
    fn prefetch(&self) -> Option<&PrefetchBudget> {
        None
    }
}

/// A spawned fetch that is cancelled when the walk is dropped.
#[derive(Debug)]
struct Task<T>(JoinHandle<T>);

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Debug)]
enum Got {
    Bytes(Bytes),
    Len(u64),
}

#[derive(Debug)]
struct Slot {
    cid: Cid,
    /// File bytes of this subtree to skip, then to take (read mode).
    skip: u64,
    take: u64,
    /// File bytes the parent says this subtree holds.
    expect: Option<u64>,
    task: Option<Task<Result<Got, IpfsError>>>,
    /// Its share of the prefetch budget, when it was fetched ahead.
    charge: Option<Charge>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Read,
    Walk,
}

/// What a walk yields, in DAG order.
#[derive(Debug)]
enum Out {
    Data(Bytes),
    Visited(Cid, u64),
}

/// Depth-first, in-order walker that keeps `window` block fetches running
/// ahead of the block it is waiting for.
struct Walker<S> {
    source: std::sync::Arc<S>,
    mode: Mode,
    window: usize,
    queue: VecDeque<Slot>,
    root: Option<(Cid, u64)>,
    seen: HashSet<Vec<u8>>,
    done: bool,
}

impl<S: BlockSource> Walker<S> {
    fn new(
        source: std::sync::Arc<S>,
        mode: Mode,
        root: Cid,
        skip: u64,
        take: u64,
        window: usize,
    ) -> Self {
        let mut queue = VecDeque::new();
        queue.push_back(Slot {
            cid: root,
            skip,
            take,
            expect: None,
            task: None,
            charge: None,
        });
        Walker {
            source,
            mode,
            window: window.max(1),
            queue,
            root: Some((root, skip)),
            seen: HashSet::new(),
            done: false,
        }
    }

    fn start_window(&mut self) {
        for (i, slot) in self.queue.iter_mut().take(self.window).enumerate() {
            if slot.task.is_none() {
                // Blocks beyond the one the reader waits for are charged to
                // the source's budget; with none free, fetch no further
                // ahead for now.
                if let (true, Some(budget)) = (i > 0, self.source.prefetch()) {
                    match budget.try_charge() {
                        Some(charge) => slot.charge = Some(charge),
                        None => break,
                    }
                }
                let fut: BoxFuture<'static, Result<Got, IpfsError>> =
                    if self.mode == Mode::Walk && slot.cid.codec() == RAW {
                        let f = self.source.ensure(slot.cid);
                        Box::pin(async move { f.await.map(Got::Len) })
                    } else {
                        let f = self.source.get(slot.cid);
                        Box::pin(async move { f.await.map(Got::Bytes) })
                    };
                slot.task = Some(Task(tokio::spawn(fut)));
            }
        }
    }

    async fn next(&mut self) -> Option<Result<Out, IpfsError>> {
        if self.done {
            return None;
        }
        let r = self.step().await;
        if !matches!(r, Some(Ok(_))) {
            self.done = true;
            self.queue.clear();
        }
        r
    }

    async fn step(&mut self) -> Option<Result<Out, IpfsError>> {
        loop {
            self.start_window();
            let mut slot = self.queue.pop_front()?;
            let got = match slot.task.take() {
                Some(mut t) => (&mut t.0).await,
                None => {
                    return Some(Err(IpfsError::Task {
                        reason: "fetch not started".into(),
                    }))
                }
            };
            let got = match got.map_err(join_error) {
                Ok(Ok(g)) => g,
                Ok(Err(e)) | Err(e) => return Some(Err(e)),
            };
            match self.visit(slot, got) {
                Ok(Some(out)) => return Some(Ok(out)),
                Ok(None) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Handles the block at the head: emits bytes or a visit, queues children.
    fn visit(&mut self, slot: Slot, got: Got) -> Result<Option<Out>, IpfsError> {
        let cid = slot.cid;
        let root = self.root.take();
        let bytes = match got {
            Got::Len(n) => return Ok(Some(Out::Visited(cid, n))),
            Got::Bytes(b) => b,
        };
        let bad = |reason: String| IpfsError::Malformed { cid, reason };
        if self.mode == Mode::Walk {
            let len = bytes.len() as u64;
            if cid.codec() == DAG_PB {
                let node = PbNode::decode(&cid, &bytes)?;
                let children = node
                    .links
                    .into_iter()
                    .filter(|l| self.seen.insert(l.cid.hash().to_bytes()))
                    .map(|l| Slot {
                        cid: l.cid,
                        skip: 0,
                        take: 0,
                        expect: None,
                        task: None,
                        charge: None,
                    });
                let children: Vec<Slot> = children.collect();
                for c in children.into_iter().rev() {
                    self.queue.push_front(c);
                }
            }
            return Ok(Some(Out::Visited(cid, len)));
        }
        let (mut skip, mut take) = (slot.skip, slot.take);
        if cid.codec() == RAW {
            let len = bytes.len() as u64;
            if let Some(e) = slot.expect.filter(|e| *e != len) {
                return Err(bad(format!("leaf holds {len} bytes, its parent says {e}")));
            }
            if let Some((_, offset)) = root {
                (skip, take) = clamp_root(&cid, offset, take, len)?;
            }
            let start = skip.min(len) as usize;
            let end = skip.saturating_add(take).min(len) as usize;
            return Ok((end > start).then(|| Out::Data(bytes.slice(start..end))));
        }
        if cid.codec() != DAG_PB {
            return Err(IpfsError::UnsupportedCid {
                cid,
                reason: "codec is neither raw nor dag-pb",
            });
        }
        let node = PbNode::decode(&cid, &bytes)?;
        let unixfs = UnixfsData::decode(&cid, node.data.as_deref().unwrap_or_default())?;
        if unixfs.kind != UNIXFS_FILE && unixfs.kind != UNIXFS_RAW {
            return Err(bad(format!("UnixFS type {} is not a file", unixfs.kind)));
        }
        if unixfs.blocksizes.len() != node.links.len() {
            return Err(bad(format!(
                "{} links but {} blocksizes",
                node.links.len(),
                unixfs.blocksizes.len()
            )));
        }
        let size = unixfs.file_size();
        let sum = unixfs
            .blocksizes
            .iter()
            .fold(unixfs.data_len(), |a, b| a.saturating_add(*b));
        if sum != size {
            return Err(bad(format!("filesize {size} but parts add up to {sum}")));
        }
        if let Some(e) = slot.expect.filter(|e| *e != size) {
            return Err(bad(format!("holds {size} bytes, its parent says {e}")));
        }
        if let Some((_, offset)) = root {
            (skip, take) = clamp_root(&cid, offset, take, size)?;
        }
        let end = skip.saturating_add(take);
        let mut pos = unixfs.data_len();
        let mut children = Vec::new();
        for (link, bs) in node.links.iter().zip(&unixfs.blocksizes) {
            let (lo, hi) = (pos, pos.saturating_add(*bs));
            pos = hi;
            if hi <= skip || lo >= end {
                continue;
            }
            let child_skip = skip.saturating_sub(lo);
            let child_take = end.min(hi) - lo.max(skip);
            children.push(Slot {
                cid: link.cid,
                skip: child_skip,
                take: child_take,
                expect: Some(*bs),
                task: None,
                charge: None,
            });
        }
        for c in children.into_iter().rev() {
            self.queue.push_front(c);
        }
        let data = unixfs.data.unwrap_or_default();
        let (start, stop) = (
            skip.min(data.len() as u64) as usize,
            end.min(data.len() as u64) as usize,
        );
        Ok((stop > start).then(|| Out::Data(Bytes::from(data).slice(start..stop))))
    }
}

/// Checks a range against the root's size and clamps its length.
fn clamp_root(cid: &Cid, offset: u64, take: u64, size: u64) -> Result<(u64, u64), IpfsError> {
    if offset > size {
        return Err(IpfsError::RangeOutOfBounds {
            cid: *cid,
            offset,
            size,
        });
    }
    Ok((offset, take.min(size - offset)))
}

/// Streams the file bytes of `root` from `offset`, `len` bytes at most
/// (`None`: to the end), in order, fetching `window` blocks ahead.
pub fn read_range<S: BlockSource>(
    source: std::sync::Arc<S>,
    root: Cid,
    offset: u64,
    len: Option<u64>,
    window: usize,
) -> impl Stream<Item = Result<Bytes, IpfsError>> + Send + 'static {
    let take = len.unwrap_or(u64::MAX - offset);
    let walker = Walker::new(source, Mode::Read, root, offset, take, window);
    futures::stream::unfold(walker, |mut w| async move {
        loop {
            match w.next().await? {
                Ok(Out::Data(b)) => return Some((Ok(b), w)),
                Ok(Out::Visited(..)) => continue,
                Err(e) => return Some((Err(e), w)),
            }
        }
    })
}

/// Visits every block of the DAG under `root` once (any dag-pb DAG, not only
/// files), yielding each CID with its block size; leaves go through
/// [`BlockSource::ensure`].
pub fn walk_blocks<S: BlockSource>(
    source: std::sync::Arc<S>,
    root: Cid,
    window: usize,
) -> impl Stream<Item = Result<(Cid, u64), IpfsError>> + Send + 'static {
    let walker = Walker::new(source, Mode::Walk, root, 0, 0, window);
    futures::stream::unfold(walker, |mut w| async move {
        match w.next().await? {
            Ok(Out::Visited(c, n)) => Some((Ok((c, n)), w)),
            Ok(Out::Data(_)) => Some((
                Err(IpfsError::Task {
                    reason: "walk yielded data".into(),
                }),
                w,
            )),
            Err(e) => Some((Err(e), w)),
        }
    })
}

/// The whole file `root` read from `store` alone, on the calling thread:
/// `None` when a block is missing or the file exceeds `max` bytes (it gives
/// up at the first block past `max`). A small file held here is then
/// one blocking call, where [`read_range`] spends a task and a blocking
/// hop on every block: for the small NARs a gateway serves most, those
/// hops cost more than the reads.
pub fn read_local(store: &BlockStore, root: Cid, max: u64) -> Result<Option<Bytes>, IpfsError> {
    let mut walker = Walker::new(
        std::sync::Arc::new(store.clone()),
        Mode::Read,
        root,
        0,
        u64::MAX,
        1,
    );
    let mut parts = Vec::new();
    let mut len = 0u64;
    while let Some(slot) = walker.queue.pop_front() {
        let Some(block) = store.get(&slot.cid)? else {
            return Ok(None);
        };
        if let Some(Out::Data(part)) = walker.visit(slot, Got::Bytes(block.into_data()))? {
            len = len.saturating_add(part.len() as u64);
            if len > max {
                return Ok(None);
            }
            parts.push(part);
        }
    }
    Ok(Some(match parts.len() {
        1 => parts.swap_remove(0),
        _ => {
            let mut whole = BytesMut::with_capacity(len as usize);
            for part in parts {
                whole.extend_from_slice(&part);
            }
            whole.freeze()
        }
    }))
}

/// File size of the UnixFS file (or raw block) `root`, from its root block.
pub async fn file_size<S: BlockSource>(source: &S, root: Cid) -> Result<u64, IpfsError> {
    let bytes = source.get(root).await?;
    match root.codec() {
        RAW => Ok(bytes.len() as u64),
        DAG_PB => {
            let node = PbNode::decode(&root, &bytes)?;
            let unixfs = UnixfsData::decode(&root, node.data.as_deref().unwrap_or_default())?;
            Ok(unixfs.file_size())
        }
        _ => Err(IpfsError::UnsupportedCid {
            cid: root,
            reason: "codec is neither raw nor dag-pb",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ipfs::block::sha256_multihash;
    use futures::TryStreamExt;
    use proptest::prelude::*;
    use std::sync::Arc;

    /// Deterministic test data: byte i is i % 251.
    pub(crate) fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    async fn cid_of(len: usize) -> String {
        compute_cid(&pattern(len)[..])
            .await
            .unwrap()
            .cid
            .to_string()
    }

    // Expected values: Helia's importer defaults (README of the peers
    // recipes) and an independent stdlib Python encoder of the profile.
    #[tokio::test]
    async fn import_matches_known_cids() {
        let known = [
            (
                0,
                "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",
            ),
            (
                1,
                "bafkreidogqfzz75tpkmjzjke425xqcrmpcib2p5tg44hnbirumdbpl5adu",
            ),
            (
                CHUNK_SIZE,
                "bafkreidddocae7lltzjlkooe5a3tmiwsgazn7logjvqk7bzttsidpzhxne",
            ),
            (
                CHUNK_SIZE + 1,
                "bafybeidjogjfwuhbzwopgd4bn3skcf5m6oz72xshywcndzxgqb623nfclu",
            ),
            (
                3 * CHUNK_SIZE,
                "bafybeihzpjrbcpjpzcx4yxh3hasnjidsikmwmsrli7hhamhny5iueulu5a",
            ),
        ];
        for (len, cid) in known {
            assert_eq!(cid_of(len).await, cid, "{len} bytes");
        }
    }

    fn leaf(i: u64) -> Cid {
        Cid::new_v1(RAW, sha256_multihash(&i.to_le_bytes()))
    }

    fn children(blocks: &[Block], cid: &Cid) -> Vec<u64> {
        let b = blocks.iter().find(|b| b.cid() == cid).unwrap();
        let node = PbNode::decode(cid, b.data()).unwrap();
        UnixfsData::decode(cid, node.data.as_deref().unwrap())
            .unwrap()
            .blocksizes
    }

    #[test]
    fn builder_adds_a_level_past_1024_leaves() {
        let mut b = DagBuilder::default();
        let mut blocks = Vec::new();
        for i in 0..1025 {
            blocks.extend(b.push_leaf(leaf(i), 10));
        }
        let (root, size, last) = b.finish();
        blocks.extend(last);
        assert_eq!(size, 10250);
        assert_eq!(children(&blocks, &root), vec![10240, 10]);
        assert_eq!(blocks.len(), 3);
    }

    #[test]
    fn builder_with_exactly_1024_leaves_has_one_parent() {
        let mut b = DagBuilder::default();
        let mut blocks = Vec::new();
        for i in 0..1024 {
            blocks.extend(b.push_leaf(leaf(i), 1));
        }
        let (root, size, last) = b.finish();
        blocks.extend(last);
        assert_eq!(size, 1024);
        assert_eq!(blocks.len(), 1);
        assert_eq!(children(&blocks, &root).len(), 1024);
    }

    async fn store_with(len: usize) -> (tempfile::TempDir, BlockStore, Imported) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(&dir.path().join("blocks")).unwrap();
        let imported = import(&pattern(len)[..], &store).await.unwrap();
        (dir, store, imported)
    }

    async fn read_all(
        store: &BlockStore,
        cid: Cid,
        offset: u64,
        len: Option<u64>,
    ) -> Result<Vec<u8>, IpfsError> {
        let mut s = Box::pin(read_range(Arc::new(store.clone()), cid, offset, len, 8));
        let mut out = Vec::new();
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn imported_file_reads_back_whole_and_by_range() {
        let len = 3 * CHUNK_SIZE + 12345;
        let (_d, store, imp) = store_with(len).await;
        assert_eq!(imp.size, len as u64);
        assert_eq!(imp.blocks, 5);
        let data = pattern(len);
        assert_eq!(read_all(&store, imp.cid, 0, None).await.unwrap(), data);
        for (off, n) in [
            (0, 1),
            (CHUNK_SIZE - 1, 2),
            (CHUNK_SIZE, CHUNK_SIZE),
            (len - 5, 100),
            (len, 10),
            (7, 0),
        ] {
            let got = read_all(&store, imp.cid, off as u64, Some(n as u64))
                .await
                .unwrap();
            assert_eq!(got, data[off..(off + n).min(len)], "range {off}+{n}");
        }
        assert_eq!(file_size(&store, imp.cid).await.unwrap(), len as u64);
    }

    #[tokio::test]
    async fn local_read_is_the_whole_file_or_nothing() {
        for len in [0, 1000, CHUNK_SIZE, 2 * CHUNK_SIZE + 7] {
            let (_d, store, imp) = store_with(len).await;
            let whole = read_local(&store, imp.cid, len as u64).unwrap();
            assert_eq!(whole.as_deref(), Some(&pattern(len)[..]), "{len} bytes");
        }
        // Larger than allowed: nothing, whatever it holds.
        let (_d, store, imp) = store_with(2 * CHUNK_SIZE + 7).await;
        assert_eq!(
            read_local(&store, imp.cid, 2 * CHUNK_SIZE as u64).unwrap(),
            None
        );
        // A block gone (collected): nothing, so the caller asks peers.
        let leaf = *Block::from_data(RAW, Bytes::from(pattern(CHUNK_SIZE))).cid();
        assert!(store.delete(&leaf).unwrap() > 0);
        assert_eq!(read_local(&store, imp.cid, u64::MAX).unwrap(), None);
        // A damaged parent-child size is still an error, not bytes.
        let (_d, store, imp) = store_with(2 * CHUNK_SIZE).await;
        std::fs::write(store.path_of(&leaf), b"short").unwrap();
        assert!(matches!(
            read_local(&store, imp.cid, u64::MAX),
            Err(IpfsError::Malformed { cid, .. }) if cid == leaf
        ));
    }

    #[tokio::test]
    async fn chunk_stream_imports_like_a_reader_whatever_the_cuts() {
        let len = 3 * CHUNK_SIZE + 777;
        let data = pattern(len);
        let (_d, _store, want) = store_with(len).await;
        for cuts in [
            vec![CHUNK_SIZE; 4],
            vec![1, CHUNK_SIZE, 5, 2 * CHUNK_SIZE],
            vec![CHUNK_SIZE - 1, CHUNK_SIZE + 1, 3],
            vec![len],
        ] {
            let mut chunks = Vec::new();
            let mut at = 0;
            for n in cuts {
                let end = (at + n).min(len);
                chunks.push(Ok(Bytes::copy_from_slice(&data[at..end])));
                at = end;
            }
            chunks.push(Ok(Bytes::copy_from_slice(&data[at..])));
            let dir = tempfile::tempdir().unwrap();
            let store = BlockStore::open(&dir.path().join("blocks")).unwrap();
            let got = import_chunks(futures::stream::iter(chunks), &store)
                .await
                .unwrap();
            assert_eq!(got, want);
        }
    }

    #[tokio::test]
    async fn dag_size_counts_repeated_blocks_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(&dir.path().join("blocks")).unwrap();
        let zeros = vec![0u8; 3 * CHUNK_SIZE + 10];
        let imp = import(&zeros[..], &store).await.unwrap();
        let walked = walk_blocks(Arc::new(store.clone()), imp.cid, 4)
            .try_fold(0u64, |acc, (_, n)| async move { Ok(acc + n) })
            .await
            .unwrap();
        assert_eq!(imp.dag_size, walked);
        assert!(imp.dag_size < 2 * CHUNK_SIZE as u64);
        let empty = import(&[][..], &store).await.unwrap();
        assert_eq!((empty.size, empty.blocks, empty.dag_size), (0, 1, 0));
    }

    #[tokio::test]
    async fn range_past_the_end_is_an_error() {
        let (_d, store, imp) = store_with(100).await;
        let err = read_all(&store, imp.cid, 101, None).await;
        assert!(matches!(
            err,
            Err(IpfsError::RangeOutOfBounds {
                offset: 101,
                size: 100,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn missing_leaf_is_reported_by_cid() {
        let (_d, store, imp) = store_with(2 * CHUNK_SIZE).await;
        let leaf = *Block::from_data(
            RAW,
            Bytes::from(pattern(2 * CHUNK_SIZE)[CHUNK_SIZE..].to_vec()),
        )
        .cid();
        assert!(store.delete(&leaf).unwrap() > 0);
        let err = read_all(&store, imp.cid, 0, None).await;
        assert!(matches!(err, Err(IpfsError::BlockMissing { cid }) if cid == leaf));
    }

    #[tokio::test]
    async fn truncated_leaf_is_detected_by_its_parent_size() {
        let (_d, store, imp) = store_with(2 * CHUNK_SIZE).await;
        let leaf = *Block::from_data(RAW, Bytes::from(pattern(CHUNK_SIZE))).cid();
        std::fs::write(store.path_of(&leaf), b"short").unwrap();
        let err = read_all(&store, imp.cid, 0, None).await;
        assert!(matches!(err, Err(IpfsError::Malformed { cid, .. }) if cid == leaf));
    }

    /// A Kubo-default (CIDv0, dag-pb leaves with data inside UnixFS) file.
    #[tokio::test]
    async fn reads_cidv0_dag_with_dag_pb_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(&dir.path().join("blocks")).unwrap();
        let parts: [&[u8]; 3] = [b"hello ", b"kubo ", b"world"];
        let mut batch = store.batch();
        let mut links = Vec::new();
        for p in parts {
            let unixfs = UnixfsData {
                kind: UNIXFS_RAW,
                data: Some(p.to_vec()),
                filesize: Some(p.len() as u64),
                blocksizes: vec![],
            };
            let node = PbNode {
                links: vec![],
                data: Some(unixfs.encode()),
            }
            .encode();
            let cid = Cid::new_v0(sha256_multihash(&node)).unwrap();
            batch
                .put(&Block::new(cid, Bytes::from(node)).unwrap())
                .unwrap();
            links.push((cid, p.len() as u64));
        }
        let unixfs = UnixfsData {
            kind: UNIXFS_FILE,
            data: None,
            filesize: Some(16),
            blocksizes: links.iter().map(|l| l.1).collect(),
        };
        let root = PbNode {
            links: links
                .iter()
                .map(|(c, _)| PbLink {
                    cid: *c,
                    name: Some(vec![]),
                    tsize: Some(20),
                })
                .collect(),
            data: Some(unixfs.encode()),
        }
        .encode();
        let root_cid = Cid::new_v0(sha256_multihash(&root)).unwrap();
        batch
            .put(&Block::new(root_cid, Bytes::from(root)).unwrap())
            .unwrap();
        batch.commit().unwrap();
        assert_eq!(
            read_all(&store, root_cid, 0, None).await.unwrap(),
            b"hello kubo world"
        );
        assert_eq!(
            read_all(&store, root_cid, 4, Some(8)).await.unwrap(),
            b"o kubo w"
        );
    }

    #[tokio::test]
    async fn walk_visits_every_block_once() {
        let (_d, store, imp) = store_with(3 * CHUNK_SIZE).await;
        let visited: Vec<_> = walk_blocks(Arc::new(store.clone()), imp.cid, 4)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(visited.len(), 4);
        assert_eq!(visited[0].0, imp.cid);
        assert_eq!(
            visited.iter().skip(1).map(|v| v.1).sum::<u64>(),
            3 * CHUNK_SIZE as u64
        );
    }

    #[tokio::test]
    async fn import_is_bounded_by_the_pipeline_not_the_input() {
        // 64 MiB of input through a reader that never holds more than a chunk.
        let reader = tokio::io::repeat(7).take(64 * CHUNK_SIZE as u64);
        let imp = compute_cid(reader).await.unwrap();
        assert_eq!(imp.size, 64 * CHUNK_SIZE as u64);
        assert_eq!(imp.blocks, 65);
    }

    proptest! {
        #[test]
        fn pb_node_round_trips(
            data in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
            links in proptest::collection::vec((any::<u64>(), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)), proptest::option::of(any::<u64>())), 0..5),
        ) {
            let node = PbNode {
                links: links.into_iter().map(|(i, name, tsize)| PbLink { cid: leaf(i), name, tsize }).collect(),
                data,
            };
            let cid = leaf(0);
            prop_assert_eq!(PbNode::decode(&cid, &node.encode()).unwrap(), node);
        }

        #[test]
        fn unixfs_data_round_trips(
            kind in 0u64..6,
            data in proptest::option::of(proptest::collection::vec(any::<u8>(), 1..64)),
            filesize in proptest::option::of(any::<u64>()),
            blocksizes in proptest::collection::vec(any::<u64>(), 0..8),
        ) {
            let d = UnixfsData { kind, data, filesize, blocksizes };
            let cid = leaf(0);
            prop_assert_eq!(UnixfsData::decode(&cid, &d.encode()).unwrap(), d);
        }

        #[test]
        fn pb_node_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let cid = leaf(0);
            let _ = PbNode::decode(&cid, &bytes);
            let _ = UnixfsData::decode(&cid, &bytes);
        }
    }
}
