//! Store-backed leaves: the raw leaf blocks of a NAR pinned from the local
//! Nix store are not written as block files. At pin time a [`Backing`]
//! records how each leaf maps onto the store path (framing bytes kept
//! literally, file contents as (file, offset, len) ranges, with a
//! [`FileStamp`] of every file); a read rebuilds the leaf from the files.
//! The DAG's inner nodes stay ordinary blocks. Backings live in the pin
//! database (`pins.redb`), beside the pins that keep them.
//!
//! # Goals
//! - No second copy of a pinned store path's contents: its leaves cost a
//!   map of a few bytes per MiB of NAR.
//! - Transparent to readers: [`super::blockstore::BlockStore`]'s `get`,
//!   `has`, `size` and `list` answer for backed leaves, so bitswap, NAR and
//!   trustless serving, CAR export, `repo verify` and GC do not change.
//! - Never a wrong byte: before and after each range is read, the open
//!   file's `fstat` must equal the stamp taken when the NAR was hashed at
//!   pin time (inode, size, mode, mtime and ctime, which userspace cannot
//!   set back). A path that vanished or changed is refused, logged and
//!   counted (`store_blocks_refused`), never served. With `rehash` every
//!   rebuilt leaf is also re-hashed against its CID.
//!
//! # Non-goals
//! - Repairing a changed path: `repo verify` names it; re-pin it (after
//!   `nix-store --repair-path`) or unpin it.
//! - Uploaded or fetched NARs: their bytes exist nowhere else, they stay
//!   ordinary blocks.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cid::Cid;
use redb::{MultimapTableDefinition, ReadableTable, TableDefinition};

use super::block::{self, RAW};
use super::dag::CHUNK_SIZE;
use super::pb;
use super::IpfsError;
use crate::store::db::Db;
use crate::store::nar::layout::{FileStamp, LayoutFile, NarLayout, Segment};
use crate::util::metrics::Metrics;
use crate::util::sync::lock;

/// Root CID bytes → encoded [`Backing`].
const BACKINGS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("store_backings");
/// Leaf multihash bytes → root CID bytes of each backing that holds it.
const LEAVES: MultimapTableDefinition<&[u8], &[u8]> =
    MultimapTableDefinition::new("store_backed_leaves");
/// Version byte of the encoding.
const FORMAT: u64 = 1;

/// How the leaves of one pinned NAR are rebuilt from a store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    /// The tree the NAR was made of (a store path such as `/nix/store/…`).
    pub root: PathBuf,
    pub files: Vec<LayoutFile>,
    /// Each leaf in DAG order: its raw CID and the segments it is made of.
    pub leaves: Vec<(Cid, Vec<Segment>)>,
}

impl Backing {
    /// The backing of a NAR of `root` whose layout was recorded while it was
    /// imported into `leaves` (CID and length of each leaf in order).
    /// Fails unless the layout cuts into exactly those leaves.
    pub fn new(root: &Path, layout: &NarLayout, leaves: &[(Cid, u64)]) -> Result<Self, String> {
        let pieces = layout.cut(CHUNK_SIZE as u64);
        if pieces.len() != leaves.len() {
            return Err(format!(
                "the NAR layout makes {} leaves, the import {}",
                pieces.len(),
                leaves.len()
            ));
        }
        let mut out = Vec::with_capacity(leaves.len());
        for ((cid, len), segs) in leaves.iter().zip(pieces) {
            let got: u64 = segs.iter().map(Segment::len).sum();
            if got != *len || cid.codec() != RAW {
                return Err(format!(
                    "leaf {cid} holds {len} bytes, its layout {got} bytes"
                ));
            }
            if let Some(Segment::File { file, .. }) = segs.iter().find(
                |s| matches!(s, Segment::File { file, .. } if *file as usize >= layout.files.len()),
            ) {
                return Err(format!(
                    "leaf {cid} names file {file}, which is not recorded"
                ));
            }
            out.push((*cid, segs));
        }
        Ok(Self {
            root: root.to_path_buf(),
            files: layout.files.clone(),
            leaves: out,
        })
    }

    /// The absolute path of file `index`.
    fn file_path(&self, index: u32) -> PathBuf {
        match self.files.get(index as usize) {
            Some(f) if !f.rel.is_empty() => self.root.join(OsStr::from_bytes(&f.rel)),
            _ => self.root.clone(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        pb::put_varint(&mut out, FORMAT);
        put_bytes(&mut out, self.root.as_os_str().as_bytes());
        pb::put_varint(&mut out, self.files.len() as u64);
        for f in &self.files {
            put_bytes(&mut out, &f.rel);
            let s = &f.stamp;
            for v in [s.dev, s.ino, s.size, u64::from(s.mode)] {
                pb::put_varint(&mut out, v);
            }
            for (secs, nanos) in [s.mtime, s.ctime] {
                out.extend_from_slice(&secs.to_le_bytes());
                out.extend_from_slice(&nanos.to_le_bytes());
            }
        }
        pb::put_varint(&mut out, self.leaves.len() as u64);
        for (cid, segs) in &self.leaves {
            put_bytes(&mut out, &cid.hash().to_bytes());
            pb::put_varint(&mut out, segs.len() as u64);
            for seg in segs {
                match seg {
                    Segment::Literal(b) => {
                        pb::put_varint(&mut out, 0);
                        put_bytes(&mut out, b);
                    }
                    Segment::File { file, offset, len } => {
                        pb::put_varint(&mut out, 1);
                        for v in [u64::from(*file), *offset, *len] {
                            pb::put_varint(&mut out, v);
                        }
                    }
                }
            }
        }
        out
    }

    fn decode(buf: &[u8]) -> Result<Self, String> {
        let mut r = Reader { buf, pos: 0 };
        if r.varint()? != FORMAT {
            return Err("unknown backing format".into());
        }
        let root = PathBuf::from(OsStr::from_bytes(r.bytes()?));
        let nfiles = r.count()?;
        let mut files = Vec::with_capacity(nfiles);
        for _ in 0..nfiles {
            let rel = r.bytes()?.to_vec();
            let (dev, ino, size) = (r.varint()?, r.varint()?, r.varint()?);
            let mode = u32::try_from(r.varint()?).map_err(|_| "mode out of range")?;
            let mtime = (r.i64()?, r.i64()?);
            let ctime = (r.i64()?, r.i64()?);
            files.push(LayoutFile {
                rel,
                stamp: FileStamp {
                    dev,
                    ino,
                    size,
                    mode,
                    mtime,
                    ctime,
                },
            });
        }
        let nleaves = r.count()?;
        let mut leaves = Vec::with_capacity(nleaves);
        for _ in 0..nleaves {
            let mh = cid::multihash::Multihash::from_bytes(r.bytes()?)
                .map_err(|e| format!("leaf multihash: {e}"))?;
            let nsegs = r.count()?;
            let mut segs = Vec::with_capacity(nsegs);
            for _ in 0..nsegs {
                segs.push(match r.varint()? {
                    0 => Segment::Literal(r.bytes()?.to_vec()),
                    1 => {
                        let file = u32::try_from(r.varint()?).map_err(|_| "file index")?;
                        if file as usize >= files.len() {
                            return Err(format!("segment names file {file} of {}", files.len()));
                        }
                        Segment::File {
                            file,
                            offset: r.varint()?,
                            len: r.varint()?,
                        }
                    }
                    t => return Err(format!("unknown segment tag {t}")),
                });
            }
            leaves.push((Cid::new_v1(RAW, mh), segs));
        }
        if r.pos != buf.len() {
            return Err("trailing bytes".into());
        }
        Ok(Self {
            root,
            files,
            leaves,
        })
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    pb::put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Bounds-checked reads of the encoding.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        pb::get_varint(self.buf, &mut self.pos).map_err(|e| e.to_string())
    }

    /// A length that must fit in what is left of the buffer.
    fn count(&mut self) -> Result<usize, String> {
        let n = self.varint()?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.buf.len() - self.pos)
            .ok_or_else(|| format!("count {n} past the end"))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.count()?;
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn i64(&mut self) -> Result<i64, String> {
        let end = self.pos + 8;
        let b = self.buf.get(self.pos..end).ok_or("truncated")?;
        self.pos = end;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_le_bytes(a))
    }
}

/// A decoded backing with its leaves indexed by multihash.
#[derive(Debug)]
struct Loaded {
    backing: Backing,
    by_hash: HashMap<Vec<u8>, usize>,
}

/// The backings of this node; cheap to clone.
#[derive(Clone)]
pub struct StoreBlocks {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Db>,
    path: PathBuf,
    loaded: Mutex<HashMap<Vec<u8>, Arc<Loaded>>>,
    rehash: bool,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for StoreBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreBlocks")
            .field("path", &self.inner.path)
            .field("rehash", &self.inner.rehash)
            .finish()
    }
}

/// Why a backed leaf cannot be served: what it was rebuilt from and what
/// happened to it.
fn refused(cid: Cid, path: PathBuf, reason: impl Into<String>) -> IpfsError {
    IpfsError::StoreBlockRefused {
        cid,
        reason: format!("{} {}", path.display(), reason.into()).into(),
    }
}

impl StoreBlocks {
    /// The backings in `db` (the pin database at `path`); `rehash`: re-hash
    /// every rebuilt leaf; refusals count into `metrics`.
    pub fn open(
        db: Arc<Db>,
        path: &Path,
        rehash: bool,
        metrics: Arc<Metrics>,
    ) -> Result<Self, IpfsError> {
        let this = Self {
            inner: Arc::new(Inner {
                db,
                path: path.to_path_buf(),
                loaded: Mutex::default(),
                rehash,
                metrics,
            }),
        };
        {
            let err = this.err();
            let tx = this.inner.db.begin_write().map_err(|e| err(e.into()))?;
            tx.open_table(BACKINGS).map_err(|e| err(e.into()))?;
            tx.open_multimap_table(LEAVES).map_err(|e| err(e.into()))?;
            tx.commit().map_err(|e| err(e.into()))?;
        }
        Ok(this)
    }

    fn err(&self) -> impl Fn(redb::Error) -> IpfsError + '_ {
        move |e| IpfsError::PinDb {
            path: self.inner.path.clone(),
            reason: e.to_string(),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Arc<Loaded>>> {
        lock(&self.inner.loaded)
    }

    /// Records (durably) how the leaves of the DAG `root` are rebuilt.
    pub fn insert(&self, root: &Cid, backing: &Backing) -> Result<(), IpfsError> {
        let err = self.err();
        let key = root.to_bytes();
        let tx = self.inner.db.begin_write().map_err(|e| err(e.into()))?;
        {
            let mut t = tx.open_table(BACKINGS).map_err(|e| err(e.into()))?;
            t.insert(key.as_slice(), backing.encode().as_slice())
                .map_err(|e| err(e.into()))?;
            let mut leaves = tx.open_multimap_table(LEAVES).map_err(|e| err(e.into()))?;
            for (cid, _) in &backing.leaves {
                leaves
                    .insert(cid.hash().to_bytes().as_slice(), key.as_slice())
                    .map_err(|e| err(e.into()))?;
            }
        }
        tx.commit().map_err(|e| err(e.into()))?;
        self.cache().remove(&key);
        Ok(())
    }

    /// Forgets the backing of `root`; whether there was one.
    pub fn remove(&self, root: &Cid) -> Result<bool, IpfsError> {
        let err = self.err();
        let key = root.to_bytes();
        let tx = self.inner.db.begin_write().map_err(|e| err(e.into()))?;
        let existed = {
            let mut t = tx.open_table(BACKINGS).map_err(|e| err(e.into()))?;
            let old = t
                .remove(key.as_slice())
                .map_err(|e| err(e.into()))?
                .map(|v| v.value().to_vec());
            if let Some(old) = &old {
                let mut leaves = tx.open_multimap_table(LEAVES).map_err(|e| err(e.into()))?;
                // A backing that no longer decodes still drops its row; its
                // leaf entries then point nowhere and are skipped on reads.
                if let Ok(b) = Backing::decode(old) {
                    for (cid, _) in &b.leaves {
                        leaves
                            .remove(cid.hash().to_bytes().as_slice(), key.as_slice())
                            .map_err(|e| err(e.into()))?;
                    }
                }
            }
            old.is_some()
        };
        tx.commit().map_err(|e| err(e.into()))?;
        self.cache().remove(&key);
        Ok(existed)
    }

    /// Root CIDs of every backing.
    pub fn roots(&self) -> Result<Vec<Cid>, IpfsError> {
        let err = self.err();
        let tx = self.inner.db.begin_read().map_err(|e| err(e.into()))?;
        let t = tx.open_table(BACKINGS).map_err(|e| err(e.into()))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| err(e.into()))? {
            let (k, _) = item.map_err(|e| err(e.into()))?;
            if let Ok(cid) = Cid::try_from(k.value()) {
                out.push(cid);
            }
        }
        Ok(out)
    }

    /// The backing of `root`, decoded (cached).
    fn load(&self, root: &[u8]) -> Result<Option<Arc<Loaded>>, IpfsError> {
        if let Some(l) = self.cache().get(root) {
            return Ok(Some(l.clone()));
        }
        let err = self.err();
        let tx = self.inner.db.begin_read().map_err(|e| err(e.into()))?;
        let t = tx.open_table(BACKINGS).map_err(|e| err(e.into()))?;
        let Some(v) = t.get(root).map_err(|e| err(e.into()))? else {
            return Ok(None);
        };
        let backing = Backing::decode(v.value()).map_err(|reason| IpfsError::PinDb {
            path: self.inner.path.clone(),
            reason: format!("a store-path backing does not decode: {reason}"),
        })?;
        let mut by_hash = HashMap::with_capacity(backing.leaves.len());
        for (i, (cid, _)) in backing.leaves.iter().enumerate() {
            by_hash.entry(cid.hash().to_bytes()).or_insert(i);
        }
        let loaded = Arc::new(Loaded { backing, by_hash });
        self.cache().insert(root.to_vec(), loaded.clone());
        Ok(Some(loaded))
    }

    /// Every backing holding the leaf `cid`, with the leaf's index in it.
    fn find(&self, cid: &Cid) -> Result<Vec<(Arc<Loaded>, usize)>, IpfsError> {
        if cid.codec() != RAW {
            return Ok(Vec::new());
        }
        let mh = cid.hash().to_bytes();
        let err = self.err();
        let roots: Vec<Vec<u8>> = {
            let tx = self.inner.db.begin_read().map_err(|e| err(e.into()))?;
            let t = tx.open_multimap_table(LEAVES).map_err(|e| err(e.into()))?;
            let values = t.get(mh.as_slice()).map_err(|e| err(e.into()))?;
            let mut roots = Vec::new();
            for v in values {
                roots.push(v.map_err(|e| err(e.into()))?.value().to_vec());
            }
            roots
        };
        let mut out = Vec::new();
        for root in roots {
            if let Some(l) = self.load(&root)? {
                if let Some(i) = l.by_hash.get(&mh) {
                    out.push((l.clone(), *i));
                }
            }
        }
        Ok(out)
    }

    fn count_refusal(&self, e: &IpfsError) {
        Metrics::inc(&self.inner.metrics.store_blocks_refused);
        tracing::warn!("store-backed block refused: {e}");
    }

    /// The leaf's bytes rebuilt from its store path, `None` if no backing
    /// holds it. A changed or vanished path is refused (see the module
    /// docs); with several backings, the first that serves wins.
    pub fn get(&self, cid: &Cid) -> Result<Option<Bytes>, IpfsError> {
        let mut last = None;
        for (l, i) in self.find(cid)? {
            match self.rebuild(&l.backing, i) {
                Ok(b) => return Ok(Some(b)),
                Err(e) => {
                    self.count_refusal(&e);
                    last = Some(e);
                }
            }
        }
        last.map_or(Ok(None), Err)
    }

    /// The leaf's length if a backing holds it and its files are as pinned
    /// (one `stat` per file).
    pub fn size(&self, cid: &Cid) -> Result<Option<u64>, IpfsError> {
        let mut last = None;
        for (l, i) in self.find(cid)? {
            match check_files(&l.backing, i) {
                Ok(n) => return Ok(Some(n)),
                Err(e) => {
                    self.count_refusal(&e);
                    last = Some(e);
                }
            }
        }
        last.map_or(Ok(None), Err)
    }

    /// The leaf's length if a backing holds it, without looking at its
    /// files: what GC keeps, whatever became of the store path.
    pub fn recorded_size(&self, cid: &Cid) -> Result<Option<u64>, IpfsError> {
        Ok(self
            .find(cid)?
            .first()
            .map(|(l, i)| leaf_len(&l.backing.leaves[*i].1)))
    }

    /// Every backed leaf once, with its length.
    pub fn list(&self) -> Result<Vec<(Cid, u64)>, IpfsError> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for root in self.roots()? {
            if let Some(l) = self.load(&root.to_bytes())? {
                for (cid, segs) in &l.backing.leaves {
                    if seen.insert(cid.hash().to_bytes()) {
                        out.push((*cid, leaf_len(segs)));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Leaf `i` of `b` read from its files, each checked against its stamp
    /// before and after the read, and re-hashed when asked to.
    fn rebuild(&self, b: &Backing, i: usize) -> Result<Bytes, IpfsError> {
        let (cid, segs) = &b.leaves[i];
        let mut out = vec![0u8; usize::try_from(leaf_len(segs)).unwrap_or(0)];
        let mut at = 0usize;
        for seg in segs {
            match seg {
                Segment::Literal(bytes) => {
                    out[at..at + bytes.len()].copy_from_slice(bytes);
                    at += bytes.len();
                }
                Segment::File { file, offset, len } => {
                    let path = b.file_path(*file);
                    let stamp = &b.files[*file as usize].stamp;
                    let n = usize::try_from(*len).unwrap_or(0);
                    let f = open_checked(*cid, &path, stamp)?;
                    f.read_exact_at(&mut out[at..at + n], *offset)
                        .map_err(|e| refused(*cid, path.clone(), format!("cannot be read: {e}")))?;
                    check_open(*cid, &path, &f, stamp)?;
                    at += n;
                }
            }
        }
        if self.inner.rehash && block::verify(cid, &out).is_err() {
            return Err(refused(
                *cid,
                b.root.clone(),
                "no longer holds the bytes of the block (re-hashed)",
            ));
        }
        Ok(Bytes::from(out))
    }
}

fn leaf_len(segs: &[Segment]) -> u64 {
    segs.iter().map(Segment::len).sum()
}

/// Opens `path` (never through a symlink) and checks it is the file pinned.
fn open_checked(cid: Cid, path: &Path, stamp: &FileStamp) -> Result<File, IpfsError> {
    let f = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| refused(cid, path.to_path_buf(), format!("cannot be opened: {e}")))?;
    check_open(cid, path, &f, stamp)?;
    Ok(f)
}

fn check_open(cid: Cid, path: &Path, f: &File, stamp: &FileStamp) -> Result<(), IpfsError> {
    let meta = f
        .metadata()
        .map_err(|e| refused(cid, path.to_path_buf(), format!("cannot be read: {e}")))?;
    match stamp.change(&FileStamp::of(&meta)) {
        Some(what) => Err(refused(
            cid,
            path.to_path_buf(),
            format!("{what} since it was pinned"),
        )),
        None => Ok(()),
    }
}

/// Checks every file of leaf `i` against its stamp; the leaf's length.
fn check_files(b: &Backing, i: usize) -> Result<u64, IpfsError> {
    let (cid, segs) = &b.leaves[i];
    for seg in segs {
        if let Segment::File { file, .. } = seg {
            let path = b.file_path(*file);
            let meta = std::fs::symlink_metadata(&path)
                .map_err(|e| refused(*cid, path.clone(), format!("cannot be read: {e}")))?;
            if let Some(what) = b.files[*file as usize].stamp.change(&FileStamp::of(&meta)) {
                return Err(refused(*cid, path, format!("{what} since it was pinned")));
            }
        }
    }
    Ok(leaf_len(segs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ipfs::block::Block;
    use crate::store::nar::NarReader;
    use std::io::Read;

    struct Fixture {
        _dir: tempfile::TempDir,
        tree: PathBuf,
        blocks: StoreBlocks,
        nar: Vec<u8>,
        backing: Backing,
        root: Cid,
    }

    fn fixture(rehash: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("d")).unwrap();
        let big: Vec<u8> = (0..CHUNK_SIZE * 2 + 77).map(|i| (i % 253) as u8).collect();
        std::fs::write(tree.join("big"), &big).unwrap();
        std::fs::write(tree.join("d/small"), b"small file").unwrap();
        let mut reader = NarReader::recording(&tree);
        let mut nar = Vec::new();
        reader.read_to_end(&mut nar).unwrap();
        let leaves: Vec<(Cid, u64)> = nar
            .chunks(CHUNK_SIZE)
            .map(|c| {
                let b = Block::from_data(RAW, Bytes::copy_from_slice(c));
                (*b.cid(), c.len() as u64)
            })
            .collect();
        let backing = Backing::new(&tree, reader.layout().unwrap(), &leaves).unwrap();
        let path = dir.path().join("pins.redb");
        let db = Arc::new(Db::create(&path, 1 << 20).unwrap());
        let blocks = StoreBlocks::open(db, &path, rehash, Arc::default()).unwrap();
        let root = leaves[0].0;
        blocks.insert(&root, &backing).unwrap();
        Fixture {
            _dir: dir,
            tree,
            blocks,
            nar,
            backing,
            root,
        }
    }

    #[test]
    fn encoding_round_trips() {
        let f = fixture(false);
        assert_eq!(Backing::decode(&f.backing.encode()).unwrap(), f.backing);
        let enc = f.backing.encode();
        for cut in [0, 1, enc.len() / 2, enc.len() - 1] {
            assert!(Backing::decode(&enc[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn leaves_rebuild_the_nar_and_are_listed_once() {
        let f = fixture(false);
        let mut rebuilt = Vec::new();
        for (cid, _) in &f.backing.leaves {
            let b = f.blocks.get(cid).unwrap().unwrap();
            block::verify(cid, &b).unwrap();
            assert_eq!(f.blocks.size(cid).unwrap(), Some(b.len() as u64));
            rebuilt.extend_from_slice(&b);
        }
        assert_eq!(rebuilt, f.nar);
        assert_eq!(f.blocks.list().unwrap().len(), 3);
        let other = Block::from_data(RAW, Bytes::from_static(b"x"));
        assert_eq!(f.blocks.get(other.cid()).unwrap(), None);
        assert!(f.blocks.remove(&f.root).unwrap());
        assert_eq!(f.blocks.get(&f.backing.leaves[1].0).unwrap(), None);
        assert!(f.blocks.list().unwrap().is_empty());
    }

    #[test]
    fn a_changed_file_is_refused_and_counted() {
        for rehash in [false, true] {
            let f = fixture(rehash);
            let leaf = f.backing.leaves[1].0;
            let path = f.tree.join("big");
            // Past the filesystem's timestamp tick, as any later change is.
            std::thread::sleep(std::time::Duration::from_millis(20));
            let mut data = std::fs::read(&path).unwrap();
            data[CHUNK_SIZE + 10] ^= 1;
            std::fs::write(&path, &data).unwrap();
            let err = f.blocks.get(&leaf).unwrap_err();
            assert!(
                matches!(&err, IpfsError::StoreBlockRefused { reason, .. } if reason.contains(&*path.to_string_lossy())),
                "{err}"
            );
            assert!(f.blocks.size(&leaf).is_err());
            assert_eq!(
                f.blocks.recorded_size(&leaf).unwrap(),
                Some(CHUNK_SIZE as u64)
            );
            std::fs::remove_file(&path).unwrap();
            assert!(f.blocks.get(&leaf).is_err());
            assert_eq!(
                f.blocks
                    .inner
                    .metrics
                    .store_blocks_refused
                    .load(std::sync::atomic::Ordering::Relaxed),
                3
            );
        }
    }

    #[test]
    fn a_layout_that_does_not_fit_the_leaves_is_refused() {
        let f = fixture(false);
        let layout = NarLayout {
            files: f.backing.files.clone(),
            segments: vec![Segment::Literal(vec![0; 10])],
        };
        let leaf = Block::from_data(RAW, Bytes::from_static(b"short"));
        assert!(Backing::new(&f.tree, &layout, &[(*leaf.cid(), 5)]).is_err());
        assert!(Backing::new(&f.tree, &layout, &[]).is_err());
    }
}
