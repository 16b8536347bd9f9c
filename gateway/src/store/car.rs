//! CAR files (content-addressed archives, CARv1; CARv2 read): the header
//! and section codec, a verifying streaming reader, a DAG exporter that
//! streams the blocks of a selection (`dag-scope`, `entity-bytes`) in
//! depth-first order, and import into the node (every block checked, roots
//! pinned). Used by `nixpfs car` and the trustless gateway.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::store::ipfs::block::{self, Block, DAG_PB, RAW};
use crate::store::ipfs::dag::{BlockSource, PbNode, UnixfsData};
use crate::store::ipfs::pb;
use crate::store::ipfs::prefetch::Charge;
use crate::store::ipfs::{Cid, IpfsError, Node};
use crate::util::progress::{Meter, Unit};

/// Largest section accepted: a block at bitswap's limit plus its CID.
const MAX_SECTION: u64 = block::MAX_BLOCK_SIZE as u64 + 1024;
/// Largest header accepted (a few thousand roots).
const MAX_HEADER: u64 = 256 * 1024;
/// CARv2 starts with this 11-byte pragma (a CARv1-style header `{version: 2}`).
const V2_PRAGMA: [u8; 11] = [
    0x0a, 0xa1, 0x67, b'v', b'e', b'r', b's', b'i', b'o', b'n', 0x02,
];
/// Blocks fetched ahead of the one being written out.
const EXPORT_WINDOW: usize = 16;
/// UnixFS `Data.Type` values that decide what an entity is.
const UNIXFS_RAW: u64 = 0;
const UNIXFS_FILE: u64 = 2;
const UNIXFS_HAMT: u64 = 5;

/// Why a CAR could not be read, written or imported; each names the
/// offending offset, CID or value.
#[derive(Debug, thiserror::Error)]
pub enum CarError {
    #[error("reading the CAR: {source}")]
    Io {
        #[source]
        source: std::io::Error,
    },
    #[error("CAR file {path}: {source}")]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad CAR header: {reason}")]
    Header { reason: String },
    #[error("CAR version {version} is not supported (only 1, and 2 for reading)")]
    Version { version: u64 },
    #[error("bad CAR section at byte {offset}: {reason}")]
    Section { offset: u64, reason: String },
    #[error("block {cid} at byte {offset} does not match its CID")]
    Mismatch { cid: Cid, offset: u64 },
    #[error("the CAR has no root to pin")]
    NoRoots,
    #[error(transparent)]
    Ipfs(#[from] IpfsError),
}

fn io_err(source: std::io::Error) -> CarError {
    CarError::Io { source }
}

/// The dag-cbor header `{roots: [CID…], version: 1}` with its varint
/// length prefix, keys in canonical (length-first) order.
pub fn encode_header(roots: &[Cid]) -> Vec<u8> {
    let mut body = vec![0xa2];
    cbor_text(&mut body, "roots");
    cbor_head(&mut body, 4, roots.len() as u64);
    for root in roots {
        // Tag 42 wraps the CID bytes behind the identity multibase byte 0x00.
        body.extend_from_slice(&[0xd8, 42]);
        let bytes = root.to_bytes();
        cbor_head(&mut body, 2, bytes.len() as u64 + 1);
        body.push(0);
        body.extend_from_slice(&bytes);
    }
    cbor_text(&mut body, "version");
    cbor_head(&mut body, 0, 1);
    let mut out = Vec::with_capacity(body.len() + 4);
    pb::put_varint(&mut out, body.len() as u64);
    out.extend_from_slice(&body);
    out
}

/// The bytes that precede a block in a section: varint(len) and the CID.
pub fn section_head(cid: &Cid, data_len: usize) -> Vec<u8> {
    let cid_bytes = cid.to_bytes();
    let mut out = Vec::with_capacity(cid_bytes.len() + 10);
    pb::put_varint(&mut out, (cid_bytes.len() + data_len) as u64);
    out.extend_from_slice(&cid_bytes);
    out
}

fn cbor_head(out: &mut Vec<u8>, major: u8, v: u64) {
    let m = major << 5;
    match v {
        0..=23 => out.push(m | v as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, v as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(v as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend_from_slice(&(v as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
}

fn cbor_text(out: &mut Vec<u8>, s: &str) {
    cbor_head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// A tiny dag-cbor cursor: just what a CAR header holds.
struct Cbor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cbor<'_> {
    fn err(&self, what: &str) -> CarError {
        CarError::Header {
            reason: format!("{what} at header byte {}", self.pos),
        }
    }

    fn byte(&mut self) -> Result<u8, CarError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or_else(|| self.err("truncated"))?;
        self.pos += 1;
        Ok(b)
    }

    /// (major type, argument); indefinite lengths are not dag-cbor.
    fn head(&mut self) -> Result<(u8, u64), CarError> {
        let b = self.byte()?;
        let (major, info) = (b >> 5, b & 0x1f);
        let n = match info {
            0..=23 => return Ok((major, u64::from(info))),
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            _ => return Err(self.err("indefinite or reserved length")),
        };
        let mut v = 0u64;
        for _ in 0..n {
            v = (v << 8) | u64::from(self.byte()?);
        }
        Ok((major, v))
    }

    fn take(&mut self, len: u64) -> Result<&[u8], CarError> {
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| self.pos.checked_add(l))
            .filter(|e| *e <= self.buf.len())
            .ok_or_else(|| self.err("truncated"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Skips one value of any kind (keys a future CAR version may add).
    fn skip(&mut self, depth: u32) -> Result<(), CarError> {
        if depth > 16 {
            return Err(self.err("nesting too deep"));
        }
        let (major, v) = self.head()?;
        match major {
            0 | 1 | 7 => Ok(()),
            2 | 3 => self.take(v).map(|_| ()),
            4 => (0..v).try_for_each(|_| self.skip(depth + 1)),
            5 => (0..v).try_for_each(|_| {
                self.skip(depth + 1)?;
                self.skip(depth + 1)
            }),
            _ => self.skip(depth + 1),
        }
    }
}

/// Parses a header body (without its length prefix): (version, roots).
pub fn decode_header(buf: &[u8]) -> Result<(u64, Vec<Cid>), CarError> {
    let mut c = Cbor { buf, pos: 0 };
    let (major, entries) = c.head()?;
    if major != 5 {
        return Err(c.err("header is not a map"));
    }
    let mut version = None;
    let mut roots = Vec::new();
    for _ in 0..entries {
        let (kmajor, klen) = c.head()?;
        if kmajor != 3 {
            return Err(c.err("map key is not text"));
        }
        let key = c.take(klen)?.to_vec();
        match key.as_slice() {
            b"version" => match c.head()? {
                (0, v) => version = Some(v),
                _ => return Err(c.err("version is not an unsigned integer")),
            },
            b"roots" => {
                let (amajor, n) = c.head()?;
                if amajor != 4 {
                    return Err(c.err("roots is not an array"));
                }
                for _ in 0..n {
                    if c.head()? != (6, 42) {
                        return Err(c.err("root is not a CID (tag 42)"));
                    }
                    let (bmajor, blen) = c.head()?;
                    if bmajor != 2 {
                        return Err(c.err("CID is not a byte string"));
                    }
                    let bytes = c.take(blen)?;
                    let cid = match bytes.split_first() {
                        Some((0, rest)) => Cid::try_from(rest).map_err(|e| CarError::Header {
                            reason: format!("bad root CID: {e}"),
                        })?,
                        _ => return Err(c.err("CID without the 0x00 multibase prefix")),
                    };
                    roots.push(cid);
                }
            }
            _ => c.skip(0)?,
        }
    }
    if c.pos != buf.len() {
        return Err(c.err("trailing bytes after the header map"));
    }
    let version = version.ok_or_else(|| CarError::Header {
        reason: "no version".into(),
    })?;
    Ok((version, roots))
}

/// Reads a varint from an async reader; `Ok(None)` at a clean end.
async fn read_varint<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<(u64, u64)>, CarError> {
    let mut v = 0u64;
    for i in 0..10u64 {
        let mut b = [0u8; 1];
        if r.read(&mut b).await.map_err(io_err)? == 0 {
            return if i == 0 {
                Ok(None)
            } else {
                Err(io_err(std::io::ErrorKind::UnexpectedEof.into()))
            };
        }
        v |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] < 0x80 {
            return Ok(Some((v, i + 1)));
        }
    }
    Err(CarError::Header {
        reason: "varint longer than 64 bits".into(),
    })
}

async fn read_exact_bytes<R: AsyncRead + Unpin>(r: &mut R, len: u64) -> Result<Bytes, CarError> {
    let len = usize::try_from(len).map_err(|_| CarError::Header {
        reason: format!("length {len} too large"),
    })?;
    let mut buf = BytesMut::zeroed(len);
    r.read_exact(&mut buf).await.map_err(io_err)?;
    Ok(buf.freeze())
}

/// Streams the blocks of a CAR, each checked against its CID before it is
/// handed out: a reader never yields bytes that do not match.
#[derive(Debug)]
pub struct CarReader<R> {
    r: R,
    roots: Vec<Cid>,
    version: u64,
    /// Bytes read so far (for error messages).
    offset: u64,
    /// CARv2: where the inner CARv1 payload ends.
    end: Option<u64>,
}

impl<R: AsyncRead + Unpin> CarReader<R> {
    /// Reads the header (CARv1, or a CARv2 wrapper around one).
    pub async fn open(mut r: R) -> Result<Self, CarError> {
        let (version, roots, offset, end) = match read_header(&mut r).await? {
            (1, roots, n) => (1, roots, n, None),
            (2, _, n) => {
                let mut v2 = [0u8; 40];
                r.read_exact(&mut v2).await.map_err(io_err)?;
                let le = |i: usize| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&v2[i..i + 8]);
                    u64::from_le_bytes(b)
                };
                let (data_offset, data_size) = (le(16), le(24));
                let here = n + 40;
                let skip = data_offset.checked_sub(here).ok_or(CarError::Header {
                    reason: format!("CARv2 data offset {data_offset} inside the header"),
                })?;
                tokio::io::copy(&mut (&mut r).take(skip), &mut tokio::io::sink())
                    .await
                    .map_err(io_err)?;
                let (inner, roots, m) = read_header(&mut r).await?;
                if inner != 1 {
                    return Err(CarError::Version { version: inner });
                }
                // Both fields are the file's claims: a sum past 2^64 is a
                // corrupt header, not a reason to wrap or panic.
                let (Some(first), Some(end)) = (
                    data_offset.checked_add(m),
                    data_offset.checked_add(data_size),
                ) else {
                    return Err(CarError::Header {
                        reason: format!(
                            "CARv2 data offset {data_offset} plus size {data_size} is past any file"
                        ),
                    });
                };
                (2, roots, first, Some(end))
            }
            (version, _, _) => return Err(CarError::Version { version }),
        };
        Ok(CarReader {
            r,
            roots,
            version,
            offset,
            end,
        })
    }

    /// The header's roots.
    pub fn roots(&self) -> &[Cid] {
        &self.roots
    }

    /// 1 for CARv1, 2 for a CARv2 file.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The next block, verified; `None` at the end of the archive.
    pub async fn next_block(&mut self) -> Result<Option<Block>, CarError> {
        if self.end.is_some_and(|e| self.offset >= e) {
            return Ok(None);
        }
        let at = self.offset;
        let Some((len, n)) = read_varint(&mut self.r).await? else {
            return Ok(None);
        };
        let bad = |reason: String| CarError::Section { offset: at, reason };
        if len > MAX_SECTION {
            return Err(bad(format!("section of {len} bytes is over the limit")));
        }
        let section = read_exact_bytes(&mut self.r, len).await?;
        self.offset += n + len;
        let mut rest: &[u8] = &section;
        let cid = Cid::read_bytes(&mut rest).map_err(|e| bad(format!("bad CID: {e}")))?;
        let data = section.slice(section.len() - rest.len()..);
        let block = tokio::task::spawn_blocking(move || Block::new(cid, data))
            .await
            .map_err(|e| {
                CarError::Ipfs(IpfsError::Task {
                    reason: e.to_string(),
                })
            })?;
        match block {
            Ok(b) => Ok(Some(b)),
            Err(IpfsError::HashMismatch { cid }) => Err(CarError::Mismatch { cid, offset: at }),
            Err(e) => Err(e.into()),
        }
    }
}

/// Reads a length-prefixed header: (version, roots, bytes consumed).
async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<(u64, Vec<Cid>, u64), CarError> {
    let (len, n) = read_varint(r).await?.ok_or(CarError::Header {
        reason: "empty file".into(),
    })?;
    if len == 0 || len > MAX_HEADER {
        return Err(CarError::Header {
            reason: format!("header length {len}"),
        });
    }
    let body = read_exact_bytes(r, len).await?;
    if n + len == V2_PRAGMA.len() as u64 && body[..] == V2_PRAGMA[1..] {
        return Ok((2, Vec::new(), n + len));
    }
    let (version, roots) = decode_header(&body)?;
    Ok((version, roots, n + len))
}

/// Which blocks of the DAG under a root a CAR carries (`dag-scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DagScope {
    /// The whole DAG.
    #[default]
    All,
    /// What it takes to read the entity: a whole file (or the range of
    /// it in [`Selection::bytes`]), a directory's own block(s).
    Entity,
    /// Only the root block.
    Block,
}

impl DagScope {
    /// The query-parameter spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DagScope::All => "all",
            DagScope::Entity => "entity",
            DagScope::Block => "block",
        }
    }
}

impl FromStr for DagScope {
    type Err = SelectionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(DagScope::All),
            "entity" => Ok(DagScope::Entity),
            "block" => Ok(DagScope::Block),
            _ => Err(SelectionError::Scope(s.to_owned())),
        }
    }
}

/// Why a `dag-scope` or `entity-bytes` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    #[error("dag-scope {0:?} is not one of block, entity, all")]
    Scope(String),
    #[error("entity-bytes {0:?} is not FROM:TO (integers, TO may be *)")]
    Bytes(String),
}

/// `entity-bytes=from:to`: inclusive byte offsets, negative ones counted
/// from the end of the file, `to = None` for `*` (end of file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntityBytes {
    pub from: i64,
    pub to: Option<i64>,
}

impl FromStr for EntityBytes {
    type Err = SelectionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SelectionError::Bytes(s.to_owned());
        let (from, to) = s.split_once(':').ok_or_else(bad)?;
        let from = from.parse::<i64>().map_err(|_| bad())?;
        let to = match to {
            "*" => None,
            t => Some(t.parse::<i64>().map_err(|_| bad())?),
        };
        Ok(EntityBytes { from, to })
    }
}

impl fmt::Display for EntityBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to {
            Some(to) => write!(f, "{}:{to}", self.from),
            None => write!(f, "{}:*", self.from),
        }
    }
}

impl EntityBytes {
    /// The half-open range `[lo, hi)` of a file of `size` bytes, or `None`
    /// when it selects nothing.
    pub fn resolve(&self, size: u64) -> Option<(u64, u64)> {
        let size_i = i128::from(size);
        let abs = |v: i64| {
            let v = i128::from(v);
            if v < 0 {
                (size_i + v).max(0)
            } else {
                v
            }
        };
        let lo = abs(self.from);
        let hi = self.to.map_or(size_i, |t| (abs(t) + 1).min(size_i));
        (lo < hi).then_some((lo as u64, hi as u64))
    }
}

/// What an export writes: scope, optional byte range, duplicates or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Selection {
    pub scope: DagScope,
    /// Only with [`DagScope::Entity`] (the parameter implies it).
    pub bytes: Option<EntityBytes>,
    /// Repeat a block each time the walk meets it (`dups=y`).
    pub dups: bool,
}

/// A fetch running ahead of the writer; aborted when the export is dropped.
#[derive(Debug)]
struct Ahead(JoinHandle<Result<Bytes, IpfsError>>);

impl Drop for Ahead {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Debug)]
struct Pending {
    cid: Cid,
    /// `[lo, hi)` of this subtree's file bytes still wanted (entity ranges).
    range: Option<(u64, u64)>,
    /// Whether this block's links are followed.
    follow: bool,
    ahead: Option<Ahead>,
    /// Its share of the source's prefetch budget, when fetched ahead.
    charge: Option<Charge>,
}

/// Depth-first, pre-order walk of a selection, blocks verified on arrival.
struct Exporter {
    source: Arc<dyn BlockSource>,
    selection: Selection,
    queue: VecDeque<Pending>,
    seen: HashSet<Vec<u8>>,
    root: bool,
    header: Option<Vec<u8>>,
    /// The data half of the last section, emitted after its head.
    data: Option<Bytes>,
    done: bool,
}

/// Fetches a block (local or from peers) and re-hashes it: a block damaged
/// on disk stops the export instead of reaching the client.
fn fetch_verified(source: &Arc<dyn BlockSource>, cid: Cid) -> Ahead {
    let fut = source.get(cid);
    Ahead(tokio::spawn(async move {
        let data = fut.await?;
        tokio::task::spawn_blocking(move || block::verify(&cid, &data).map(|()| data))
            .await
            .map_err(|e| IpfsError::Task {
                reason: e.to_string(),
            })?
    }))
}

impl Exporter {
    async fn next(&mut self) -> Option<Result<Bytes, CarError>> {
        if let Some(h) = self.header.take() {
            return Some(Ok(Bytes::from(h)));
        }
        if let Some(d) = self.data.take() {
            return Some(Ok(d));
        }
        if self.done {
            return None;
        }
        match self.step().await {
            Ok(Some(b)) => Some(Ok(b)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                self.queue.clear();
                Some(Err(e))
            }
        }
    }

    async fn step(&mut self) -> Result<Option<Bytes>, CarError> {
        loop {
            for (i, p) in self.queue.iter_mut().take(EXPORT_WINDOW).enumerate() {
                if p.ahead.is_none() && block::inline_data(&p.cid).is_none() {
                    // Beyond the next block, charged to the source's budget
                    // (as reads are, see dag::Walker).
                    if let (true, Some(budget)) = (i > 0, self.source.prefetch()) {
                        match budget.try_charge() {
                            Some(charge) => p.charge = Some(charge),
                            None => break,
                        }
                    }
                    p.ahead = Some(fetch_verified(&self.source, p.cid));
                }
            }
            let Some(mut p) = self.queue.pop_front() else {
                return Ok(None);
            };
            let data = match (block::inline_data(&p.cid), p.ahead.take()) {
                (Some(d), _) => d,
                (None, Some(mut a)) => (&mut a.0).await.map_err(|e| IpfsError::Task {
                    reason: e.to_string(),
                })??,
                (None, None) => return Err(IpfsError::BlockMissing { cid: p.cid }.into()),
            };
            let root = std::mem::take(&mut self.root);
            if p.follow {
                self.queue_children(&mut p, &data, root)?;
            }
            // Identity blocks live inside their parent: never a section.
            if block::inline_data(&p.cid).is_some() {
                continue;
            }
            let head = section_head(&p.cid, data.len());
            self.data = Some(data);
            return Ok(Some(Bytes::from(head)));
        }
    }

    fn queue_children(
        &mut self,
        p: &mut Pending,
        data: &Bytes,
        root: bool,
    ) -> Result<(), CarError> {
        if p.cid.codec() != DAG_PB {
            return Ok(());
        }
        let node = PbNode::decode(&p.cid, data)?;
        let mut children: Vec<Pending> = Vec::new();
        if self.selection.scope == DagScope::All {
            children.extend(node.links.iter().map(|l| child(l.cid, None)));
        } else {
            let unixfs = node
                .data
                .as_deref()
                .and_then(|d| UnixfsData::decode(&p.cid, d).ok());
            match unixfs {
                Some(u) if u.kind == UNIXFS_FILE || u.kind == UNIXFS_RAW => {
                    let data_len = u.data.as_ref().map_or(0, |d| d.len() as u64);
                    if root {
                        let size = u.filesize.unwrap_or_else(|| {
                            u.blocksizes
                                .iter()
                                .fold(data_len, |a, b| a.saturating_add(*b))
                        });
                        p.range = match self.selection.bytes {
                            Some(eb) => match eb.resolve(size) {
                                Some(r) => Some(r),
                                None => return Ok(()),
                            },
                            None => None,
                        };
                    }
                    let mut pos = data_len;
                    for (link, bs) in node.links.iter().zip(&u.blocksizes) {
                        let (lo, hi) = (pos, pos.saturating_add(*bs));
                        pos = hi;
                        match p.range {
                            Some((a, b)) if hi <= a || lo >= b => {}
                            Some((a, b)) => children.push(child(
                                link.cid,
                                Some((a.saturating_sub(lo), b.min(hi) - lo)),
                            )),
                            None => children.push(child(link.cid, None)),
                        }
                    }
                }
                // A sharded directory's entity is its shard nodes (links
                // named by the 2-hex-digit bucket only), not its entries.
                Some(u) if u.kind == UNIXFS_HAMT => children.extend(
                    node.links
                        .iter()
                        .filter(|l| l.name.as_ref().is_some_and(|n| n.len() == 2))
                        .map(|l| child(l.cid, None)),
                ),
                _ => {}
            }
        }
        for c in children.into_iter().rev() {
            if self.selection.dups || self.seen.insert(c.cid.hash().to_bytes()) {
                self.queue.push_front(c);
            }
        }
        Ok(())
    }
}

fn child(cid: Cid, range: Option<(u64, u64)>) -> Pending {
    Pending {
        cid,
        range,
        follow: cid.codec() == DAG_PB,
        ahead: None,
        charge: None,
    }
}

/// Streams a CARv1 of `selection` under `root` (header first, then one
/// section per block in depth-first pre-order) from `source`, each block
/// re-hashed before it goes out. A block that cannot be had ends the
/// stream with an error, so the archive is visibly incomplete.
pub fn export(
    source: Arc<dyn BlockSource>,
    root: Cid,
    selection: Selection,
) -> impl Stream<Item = Result<Bytes, CarError>> + Send + 'static {
    let mut seen = HashSet::new();
    seen.insert(root.hash().to_bytes());
    let exporter = Exporter {
        source,
        selection,
        queue: VecDeque::from([Pending {
            cid: root,
            range: None,
            follow: selection.scope != DagScope::Block && root.codec() != RAW,
            ahead: None,
            charge: None,
        }]),
        seen,
        root: true,
        header: Some(encode_header(&[root])),
        data: None,
        done: false,
    };
    futures::stream::unfold(exporter, |mut e| async move {
        e.next().await.map(|item| (item, e))
    })
}

/// What [`export_file`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExportReport {
    pub root: String,
    pub blocks: u64,
    /// Size of the CAR file.
    pub bytes: u64,
}

/// Writes the whole DAG under `root` (local blocks, else peers) as a CARv1
/// file, through a temporary file so a failed export leaves nothing behind.
pub async fn export_file(
    node: &Node,
    root: Cid,
    out: &Path,
    meter: &Meter,
) -> Result<ExportReport, CarError> {
    meter.start("exporting", Unit::Bytes, None);
    let file_err = |source| CarError::File {
        path: out.to_path_buf(),
        source,
    };
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(file_err)?;
    let (file, tmp_path) = tmp.into_parts();
    let mut file = tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(file));
    let mut stream = Box::pin(export(node.blocks(), root, Selection::default()));
    let (mut items, mut bytes) = (0u64, 0u64);
    while let Some(item) = stream.next().await {
        let item = item?;
        file.write_all(&item).await.map_err(file_err)?;
        items += 1;
        bytes += item.len() as u64;
        meter.add(item.len() as u64);
    }
    file.flush().await.map_err(file_err)?;
    file.into_inner().sync_all().await.map_err(file_err)?;
    tmp_path.persist(out).map_err(|e| file_err(e.error))?;
    Ok(ExportReport {
        root: root.to_string(),
        blocks: items.saturating_sub(1) / 2,
        bytes,
    })
}

/// [`import`] from a file, its bytes read counting into `meter`.
pub async fn import_file(
    node: &Node,
    path: &Path,
    meter: &Meter,
) -> Result<ImportReport, CarError> {
    let file_err = |source| CarError::File {
        path: path.to_path_buf(),
        source,
    };
    let file = tokio::fs::File::open(path).await.map_err(file_err)?;
    let total = file.metadata().await.map_err(file_err)?.len();
    meter.start("importing", Unit::Bytes, Some(total));
    let counted = Counted {
        inner: file,
        meter: meter.clone(),
    };
    import(node, tokio::io::BufReader::with_capacity(1 << 20, counted)).await
}

/// A reader whose bytes count into a meter as they are read.
#[derive(Debug)]
struct Counted<R> {
    inner: R,
    meter: Meter,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.meter.add((buf.filled().len() - before) as u64);
        polled
    }
}

/// What [`import`] stored and pinned.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImportReport {
    pub roots: Vec<String>,
    pub blocks: u64,
    pub bytes: u64,
}

/// Stores every block of a CAR (each verified against its CID; the first
/// mismatch aborts the import) and pins its roots, whose DAGs must then be
/// complete locally or fetchable from peers.
pub async fn import<R: AsyncRead + Unpin>(
    node: &Node,
    reader: R,
) -> Result<ImportReport, CarError> {
    let mut car = CarReader::open(reader).await?;
    if car.roots().is_empty() {
        return Err(CarError::NoRoots);
    }
    let hold = node.hold_gc().await;
    let mut report = ImportReport {
        roots: Vec::new(),
        blocks: 0,
        bytes: 0,
    };
    let mut batch = node.store().batch();
    while let Some(block) = car.next_block().await? {
        report.blocks += 1;
        report.bytes += block.data().len() as u64;
        let store = node.store().clone();
        let written = tokio::task::spawn_blocking(move || store.write(&block))
            .await
            .map_err(|e| IpfsError::Task {
                reason: e.to_string(),
            })??;
        batch.add(written);
    }
    tokio::task::spawn_blocking(move || batch.commit())
        .await
        .map_err(|e| IpfsError::Task {
            reason: e.to_string(),
        })??;
    for root in car.roots().to_vec() {
        let pin = node.pin_held(&hold, root).await?;
        report.roots.push(pin.cid.to_string());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ipfs::blockstore::BlockStore;
    use crate::store::ipfs::dag;
    use proptest::prelude::*;

    fn raw_cid(i: u64) -> Cid {
        *Block::from_data(RAW, Bytes::copy_from_slice(&i.to_le_bytes())).cid()
    }

    async fn collect(s: impl Stream<Item = Result<Bytes, CarError>>) -> Result<Vec<u8>, CarError> {
        let mut s = Box::pin(s);
        let mut out = Vec::new();
        while let Some(b) = s.next().await {
            out.extend_from_slice(&b?);
        }
        Ok(out)
    }

    async fn read_all(car: &[u8]) -> Result<(Vec<Cid>, Vec<Block>), CarError> {
        let mut r = CarReader::open(car).await?;
        let mut blocks = Vec::new();
        while let Some(b) = r.next_block().await? {
            blocks.push(b);
        }
        Ok((r.roots().to_vec(), blocks))
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// A store holding a 3.5-chunk file; returns (store, root CID).
    async fn stored_file(dir: &std::path::Path, len: usize) -> (BlockStore, Cid) {
        let store = BlockStore::open(dir).unwrap();
        let imported = dag::import(&pattern(len)[..], &store).await.unwrap();
        (store, imported.cid)
    }

    #[test]
    fn header_matches_ipld_car_bytes_for_one_root() {
        // @ipld/car's header for the empty raw block's CID, byte for byte.
        let root: Cid = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
            .parse()
            .unwrap();
        let h = encode_header(&[root]);
        assert_eq!(h[0] as usize, h.len() - 1);
        assert_eq!(&h[1..8], &[0xa2, 0x65, b'r', b'o', b'o', b't', b's']);
        assert_eq!(&h[8..12], &[0x81, 0xd8, 0x2a, 0x58]);
        assert_eq!(h[12] as usize, root.to_bytes().len() + 1);
        assert_eq!(&h[h.len() - 9..], b"\x67version\x01");
        assert_eq!(decode_header(&h[1..]).unwrap(), (1, vec![root]));
    }

    #[tokio::test]
    async fn export_then_read_gives_back_every_block_verified() {
        let dir = tempfile::tempdir().unwrap();
        let len = 3 * dag::CHUNK_SIZE + 12345;
        let (store, root) = stored_file(dir.path(), len).await;
        let car = collect(export(Arc::new(store.clone()), root, Selection::default()))
            .await
            .unwrap();
        let (roots, blocks) = read_all(&car).await.unwrap();
        assert_eq!(roots, vec![root]);
        assert_eq!(blocks.len(), 5);
        assert_eq!(*blocks[0].cid(), root, "depth-first: root first");
        let file: Vec<u8> = blocks[1..].iter().flat_map(|b| b.data().to_vec()).collect();
        assert_eq!(file, pattern(len));

        // Round trip through import into another store.
        let other = tempfile::tempdir().unwrap();
        let copy = BlockStore::open(other.path()).unwrap();
        for b in &blocks {
            copy.write(b).unwrap();
        }
        let mut cat = Box::pin(dag::read_range(Arc::new(copy), root, 0, None, 4));
        let mut back = Vec::new();
        while let Some(c) = cat.next().await {
            back.extend_from_slice(&c.unwrap());
        }
        assert_eq!(back, pattern(len));
    }

    #[tokio::test]
    async fn scopes_and_entity_bytes_pick_the_needed_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = dag::CHUNK_SIZE as i64;
        let (store, root) = stored_file(dir.path(), 4 * dag::CHUNK_SIZE).await;
        let source: Arc<dyn BlockSource> = Arc::new(store);
        let count = |sel: Selection| {
            let source = source.clone();
            async move {
                let car = collect(export(source, root, sel)).await.unwrap();
                read_all(&car).await.unwrap().1.len()
            }
        };
        let entity = |from, to| Selection {
            scope: DagScope::Entity,
            bytes: Some(EntityBytes { from, to }),
            dups: false,
        };
        let block = Selection {
            scope: DagScope::Block,
            ..Selection::default()
        };
        assert_eq!(count(block).await, 1);
        assert_eq!(count(Selection::default()).await, 5);
        assert_eq!(count(entity(0, None)).await, 5);
        assert_eq!(count(entity(0, Some(0))).await, 2);
        assert_eq!(count(entity(chunk - 1, Some(chunk))).await, 3);
        assert_eq!(count(entity(-1, None)).await, 2);
        assert_eq!(
            count(entity(5 * chunk, None)).await,
            1,
            "outside: root only"
        );
    }

    #[tokio::test]
    async fn a_block_damaged_on_disk_stops_the_export() {
        let dir = tempfile::tempdir().unwrap();
        let (store, root) = stored_file(dir.path(), 2 * dag::CHUNK_SIZE).await;
        let leaf = store
            .list()
            .unwrap()
            .into_iter()
            .find(|(c, n)| c.hash() != root.hash() && *n == dag::CHUNK_SIZE as u64)
            .unwrap()
            .0;
        let path = store.path_of(&leaf);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[7] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
        let err = collect(export(Arc::new(store), root, Selection::default()))
            .await
            .unwrap_err();
        assert!(
            matches!(err, CarError::Ipfs(IpfsError::HashMismatch { cid }) if cid.hash() == leaf.hash()),
            "{err}"
        );
    }

    #[tokio::test]
    async fn reader_refuses_a_block_that_does_not_match() {
        let data = Bytes::from_static(b"honest bytes");
        let cid = *Block::from_data(RAW, data.clone()).cid();
        let mut car = encode_header(&[cid]);
        car.extend(section_head(&cid, data.len()));
        car.extend_from_slice(b"HONEST bytes");
        let err = read_all(&car).await.unwrap_err();
        assert!(
            matches!(err, CarError::Mismatch { cid: c, offset } if c == cid && offset == car.len() as u64 - 12 - 37),
            "{err}"
        );
    }

    #[tokio::test]
    async fn carv2_wrapper_is_read() {
        let data = Bytes::from_static(b"inside a v2");
        let cid = *Block::from_data(RAW, data.clone()).cid();
        let mut v1 = encode_header(&[cid]);
        v1.extend(section_head(&cid, data.len()));
        v1.extend_from_slice(&data);
        let mut v2 = V2_PRAGMA.to_vec();
        let mut header = [0u8; 40];
        let data_offset = 11 + 40 + 5u64;
        header[16..24].copy_from_slice(&data_offset.to_le_bytes());
        header[24..32].copy_from_slice(&(v1.len() as u64).to_le_bytes());
        v2.extend_from_slice(&header);
        v2.extend_from_slice(&[0; 5]);
        v2.extend_from_slice(&v1);
        v2.extend_from_slice(b"index bytes after the payload");
        let mut r = CarReader::open(&v2[..]).await.unwrap();
        assert_eq!(r.version(), 2);
        assert_eq!(r.roots(), &[cid]);
        assert_eq!(r.next_block().await.unwrap().unwrap().data(), &data);
        assert!(r.next_block().await.unwrap().is_none());
    }

    /// The input cargo-fuzz found in CI: a CARv2 header whose data size
    /// near 2^64 overflowed the payload's end (a panic in debug builds).
    #[tokio::test]
    async fn carv2_whose_data_size_overflows_is_a_header_error() {
        let data = Bytes::from_static(b"inside a v2");
        let cid = *Block::from_data(RAW, data.clone()).cid();
        let mut v1 = encode_header(&[cid]);
        v1.extend(section_head(&cid, data.len()));
        v1.extend_from_slice(&data);
        let mut v2 = V2_PRAGMA.to_vec();
        let mut header = [0u8; 40];
        let data_offset = 11 + 40u64;
        header[16..24].copy_from_slice(&data_offset.to_le_bytes());
        header[24..32].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
        v2.extend_from_slice(&header);
        v2.extend_from_slice(&v1);
        let err = CarReader::open(&v2[..]).await.unwrap_err();
        assert!(
            matches!(&err, CarError::Header { reason } if reason.contains("past any file")),
            "{err}"
        );
    }

    #[test]
    fn entity_bytes_resolve_like_the_spec_examples() {
        let eb = |s: &str| s.parse::<EntityBytes>().unwrap();
        assert_eq!(eb("0:*").resolve(100), Some((0, 100)));
        assert_eq!(eb("-10:*").resolve(100), Some((90, 100)));
        assert_eq!(eb("10:19").resolve(100), Some((10, 20)));
        assert_eq!(eb("49:-10").resolve(100), Some((49, 91)));
        assert_eq!(eb("0:1000").resolve(100), Some((0, 100)));
        assert_eq!(eb("100:*").resolve(100), None);
        assert_eq!(eb("-1000:*").resolve(100), Some((0, 100)));
        assert!("1-2".parse::<EntityBytes>().is_err());
        assert!("a:*".parse::<EntityBytes>().is_err());
        assert!("dfs".parse::<DagScope>().is_err());
    }

    proptest! {
        #[test]
        fn header_round_trips(ids in proptest::collection::vec(any::<u64>(), 0..5)) {
            let roots: Vec<Cid> = ids.into_iter().map(raw_cid).collect();
            let h = encode_header(&roots);
            let mut pos = 0;
            let len = pb::get_varint(&h, &mut pos).unwrap() as usize;
            prop_assert_eq!(len, h.len() - pos);
            prop_assert_eq!(decode_header(&h[pos..]).unwrap(), (1, roots));
        }

        #[test]
        fn entity_bytes_round_trip(from in any::<i64>(), to in proptest::option::of(any::<i64>())) {
            let eb = EntityBytes { from, to };
            prop_assert_eq!(eb.to_string().parse::<EntityBytes>().unwrap(), eb);
        }

        #[test]
        fn reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async { let _ = read_all(&bytes).await; });
        }

        #[test]
        fn header_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_header(&bytes);
        }
    }
}
