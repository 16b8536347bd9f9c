//! The on-disk block store under `<data_dir>/blocks/`: one file per block,
//! named by the block's multihash (as a CIDv1-raw string) in flatfs-style
//! shard directories, written to a temp file and renamed into place.
//!
//! Bytes are verified when they enter (a [`Block`] always matches its CID);
//! reads of our own files are not re-hashed, because serving would otherwise
//! cost a second SHA-256 pass. [`BlockStore::get_verified`] re-hashes for
//! checks. Durability is batched: a [`WriteBatch`] syncs once, at
//! [`WriteBatch::commit`], not per block: a few files by `fdatasync(2)`
//! each, many by one `syncfs(2)`. Leaves of NARs pinned from the
//! Nix store have no file here: reads that find no file ask the
//! [`StoreBlocks`] backings, so every reader sees them as stored blocks.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use cid::multihash::Multihash;
use cid::Cid;

use futures::future::BoxFuture;

use super::block::{self, Block, RAW};
use super::dag::BlockSource;
use super::storeblocks::StoreBlocks;
use super::IpfsError;

/// Handle to the block directory; cheap to clone, safe to share across threads.
#[derive(Clone, Debug)]
pub struct BlockStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    tmp: PathBuf,
    counter: AtomicU64,
    /// Leaves rebuilt from store paths, asked when a block has no file.
    backed: Option<StoreBlocks>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IpfsError + '_ {
    move |source| IpfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Storage key of a multihash: the CIDv1-raw string, so that the CIDv0 and
/// CIDv1 of the same bytes share one file.
fn key(mh: &Multihash<64>) -> String {
    Cid::new_v1(RAW, *mh).to_string()
}

/// The characters of a CIDv1 string in base32 (its multibase prefix aside),
/// so the characters a shard is named with.
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Creates every shard directory that does not exist yet, then syncs the
/// store's directory once if any was new. A new store then pays for its
/// 1024 directories at once, not one `mkdir` per early block on the path
/// of a NAR Nix waits for (6% of a cold gateway's CPU in perf, a 300-path
/// copy), and a [`WriteBatch::commit`], which syncs a block's shard
/// directory, never depends on that directory's own entry being unsynced.
fn create_shards(dir: &Path) -> Result<(), IpfsError> {
    let mut created = false;
    for a in BASE32 {
        for b in BASE32 {
            let shard = dir.join([char::from(*a), char::from(*b)].iter().collect::<String>());
            match fs::create_dir(&shard) {
                Ok(()) => created = true,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(&shard)(e)),
            }
        }
    }
    if created {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

impl BlockStore {
    /// Opens (creating if needed) the store in `dir` and discards temp files
    /// left by an interrupted write.
    pub fn open(dir: &Path) -> Result<Self, IpfsError> {
        Self::open_backed(dir, None)
    }

    /// [`open`](Self::open), answering for the leaves `backed` rebuilds
    /// from store paths too.
    pub fn open_backed(dir: &Path, backed: Option<StoreBlocks>) -> Result<Self, IpfsError> {
        let tmp = dir.join("tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        create_shards(dir)?;
        Ok(BlockStore {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                tmp,
                counter: AtomicU64::new(0),
                backed,
            }),
        })
    }

    /// The store-path backings this store answers for, if any.
    pub fn backed(&self) -> Option<&StoreBlocks> {
        self.inner.backed.as_ref()
    }

    /// The directory this store lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn shard_and_path(&self, mh: &Multihash<64>) -> (PathBuf, PathBuf) {
        let k = key(mh);
        // flatfs "next-to-last/2": the two characters before the last one.
        let shard = &k[k.len() - 3..k.len() - 1];
        let shard_dir = self.inner.dir.join(shard);
        let path = shard_dir.join(&k);
        (shard_dir, path)
    }

    /// Path of the file holding `cid`'s block (whether or not it exists).
    pub fn path_of(&self, cid: &Cid) -> PathBuf {
        self.shard_and_path(cid.hash()).1
    }

    /// Whether the block is stored (identity CIDs always are).
    pub fn has(&self, cid: &Cid) -> Result<bool, IpfsError> {
        Ok(self.size(cid)?.is_some())
    }

    /// Stored size of the block in bytes, if present. A store-backed leaf
    /// is present while its files are as pinned (else an error says why).
    pub fn size(&self, cid: &Cid) -> Result<Option<u64>, IpfsError> {
        match self.file_size(cid)? {
            Some(n) => Ok(Some(n)),
            None => self.backed().map_or(Ok(None), |b| b.size(cid)),
        }
    }

    /// Like [`size`](Self::size), but a store-backed leaf counts whatever
    /// became of its files: what garbage collection must keep.
    pub fn held_size(&self, cid: &Cid) -> Result<Option<u64>, IpfsError> {
        match self.file_size(cid)? {
            Some(n) => Ok(Some(n)),
            None => self.backed().map_or(Ok(None), |b| b.recorded_size(cid)),
        }
    }

    fn file_size(&self, cid: &Cid) -> Result<Option<u64>, IpfsError> {
        if let Some(data) = block::inline_data(cid) {
            return Ok(Some(data.len() as u64));
        }
        let path = self.path_of(cid);
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// The block's bytes, trusted because only verified blocks are written
    /// and store-backed leaves are served only from files as pinned.
    pub fn get(&self, cid: &Cid) -> Result<Option<Block>, IpfsError> {
        if let Some(data) = block::inline_data(cid) {
            return Ok(Some(Block::from_store(*cid, data)));
        }
        let path = self.path_of(cid);
        match fs::read(&path) {
            Ok(data) => Ok(Some(Block::from_store(*cid, Bytes::from(data)))),
            Err(e) if e.kind() == ErrorKind::NotFound => match self.backed() {
                Some(b) => Ok(b.get(cid)?.map(|data| Block::from_store(*cid, data))),
                None => Ok(None),
            },
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Like [`get`](Self::get) but re-hashes the bytes: a file damaged on
    /// disk yields [`IpfsError::HashMismatch`] naming the CID.
    pub fn get_verified(&self, cid: &Cid) -> Result<Option<Block>, IpfsError> {
        match self.get(cid)? {
            Some(b) => Block::new(*cid, b.into_data()).map(Some),
            None => Ok(None),
        }
    }

    /// Removes the block's file; returns the bytes freed (0 if it had
    /// none). A store-backed leaf goes with its backing, not here.
    pub fn delete(&self, cid: &Cid) -> Result<u64, IpfsError> {
        let path = self.path_of(cid);
        let len = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io(&path)(e)),
        };
        match fs::remove_file(&path) {
            Ok(()) => Ok(len),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Every stored block as (CIDv1-raw of its multihash, size in bytes):
    /// block files, then store-backed leaves that have none.
    pub fn list(&self) -> Result<Vec<(Cid, u64)>, IpfsError> {
        let mut out = self.list_files()?;
        if let Some(b) = self.backed() {
            let files: std::collections::HashSet<Vec<u8>> =
                out.iter().map(|(c, _)| c.hash().to_bytes()).collect();
            out.extend(
                b.list()?
                    .into_iter()
                    .filter(|(c, _)| !files.contains(&c.hash().to_bytes())),
            );
        }
        Ok(out)
    }

    /// Every block file as (CIDv1-raw of its multihash, size in bytes).
    pub fn list_files(&self) -> Result<Vec<(Cid, u64)>, IpfsError> {
        let dir = &self.inner.dir;
        let mut out = Vec::new();
        for shard in fs::read_dir(dir).map_err(io(dir))? {
            let shard = shard.map_err(io(dir))?;
            if shard.path() == self.inner.tmp || !shard.path().is_dir() {
                continue;
            }
            let shard_path = shard.path();
            for entry in fs::read_dir(&shard_path).map_err(io(&shard_path))? {
                let entry = entry.map_err(io(&shard_path))?;
                let Some(cid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<Cid>().ok())
                else {
                    continue;
                };
                let len = entry.metadata().map_err(io(&entry.path()))?.len();
                out.push((cid, len));
            }
        }
        Ok(out)
    }

    /// Writes a verified block without syncing it; hand the result to a
    /// [`WriteBatch`] to make it durable. An existing file of the wrong length
    /// (a torn write) is replaced.
    pub fn write(&self, block: &Block) -> Result<Written, IpfsError> {
        let mut written = Written::default();
        if block::inline_data(block.cid()).is_some() {
            return Ok(written);
        }
        let (shard, path) = self.shard_and_path(block.cid().hash());
        let existing = match fs::metadata(&path) {
            Ok(m) => Some(m.len()),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(io(&path)(e)),
        };
        if existing != Some(block.data().len() as u64) {
            let n = self.inner.counter.fetch_add(1, Ordering::Relaxed);
            let tmp = self.inner.tmp.join(format!("{}.{n}", std::process::id()));
            let mut f = File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(block.data()).map_err(io(&tmp))?;
            drop(f);
            if let Err(e) = fs::rename(&tmp, &path) {
                if e.kind() != ErrorKind::NotFound {
                    return Err(io(&path)(e));
                }
                fs::create_dir_all(&shard).map_err(io(&shard))?;
                fs::rename(&tmp, &path).map_err(io(&path))?;
            }
            written.new = existing.is_none();
        }
        written.file = Some(path);
        Ok(written)
    }

    /// Flushes the store's filesystem (`syncfs(2)`). Besides
    /// [`WriteBatch::commit`], long imports call it now and then in the
    /// background so that the final commit finds little left to write.
    pub fn sync(&self) -> Result<(), IpfsError> {
        let dir = self.dir();
        let f = File::open(dir).map_err(io(dir))?;
        rustix::fs::syncfs(&f).map_err(|e| io(dir)(e.into()))
    }

    /// Starts a group of writes made durable together.
    pub fn batch(&self) -> WriteBatch {
        WriteBatch {
            store: self.clone(),
            files: Some(Vec::new()),
        }
    }
}

/// Reads come from disk on the blocking pool; a missing block is an error.
impl BlockSource for BlockStore {
    fn get(&self, cid: Cid) -> BoxFuture<'static, Result<Bytes, IpfsError>> {
        let store = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || store.get(&cid))
                .await
                .map_err(|e| IpfsError::Task {
                    reason: e.to_string(),
                })??
                .map(Block::into_data)
                .ok_or(IpfsError::BlockMissing { cid })
        })
    }

    fn ensure(&self, cid: Cid) -> BoxFuture<'static, Result<u64, IpfsError>> {
        let store = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || store.size(&cid))
                .await
                .map_err(|e| IpfsError::Task {
                    reason: e.to_string(),
                })??
                .ok_or(IpfsError::BlockMissing { cid })
        })
    }
}

/// The store as garbage collection walks it: a store-backed leaf is held
/// (see [`BlockStore::held_size`]) even when its path changed, so that a
/// damaged pin does not stop the collection.
#[derive(Debug, Clone)]
pub struct Held(pub BlockStore);

impl BlockSource for Held {
    fn get(&self, cid: Cid) -> BoxFuture<'static, Result<Bytes, IpfsError>> {
        BlockSource::get(&self.0, cid)
    }

    fn ensure(&self, cid: Cid) -> BoxFuture<'static, Result<u64, IpfsError>> {
        let store = self.0.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || store.held_size(&cid))
                .await
                .map_err(|e| IpfsError::Task {
                    reason: e.to_string(),
                })??
                .ok_or(IpfsError::BlockMissing { cid })
        })
    }
}

/// An unsynced write of one block file.
#[derive(Debug, Default)]
pub struct Written {
    file: Option<PathBuf>,
    new: bool,
}

impl Written {
    /// Whether the block was not stored before.
    pub fn is_new(&self) -> bool {
        self.new
    }
}

/// Up to this many files, a commit syncs each file and its shard directory;
/// beyond, the whole filesystem at once. `syncfs(2)` writes back every dirty
/// page of the filesystem, other programs' too: measured here while a build
/// wrote to the same disk, 1.0–9.0 ms per commit of one file vs 1.2–1.4 ms
/// for its `fdatasync(2)` and directory `fsync(2)`; and a NAR fetched
/// through the upstream bridge is mostly one or two blocks, waited for by
/// Nix. For hundreds of files one journal commit wins (see
/// [`WriteBatch::commit`]).
const FSYNC_EACH_MAX: usize = 16;

/// Writes whose durability is deferred to one [`commit`](Self::commit): until
/// then a crash may lose them, so nothing may refer to them (no pin) before.
#[derive(Debug)]
pub struct WriteBatch {
    store: BlockStore,
    /// The files written, while few enough to sync one by one; `None` once
    /// there are more (the commit syncs the filesystem).
    files: Option<Vec<PathBuf>>,
}

impl WriteBatch {
    /// Stores a verified block; returns whether it was new.
    pub fn put(&mut self, block: &Block) -> Result<bool, IpfsError> {
        let written = self.store.write(block)?;
        let new = written.new;
        self.add(written);
        Ok(new)
    }

    /// Takes over a write made with [`BlockStore::write`] (e.g. on another
    /// thread), so that [`commit`](Self::commit) makes it durable.
    pub fn add(&mut self, written: Written) {
        let (Some(file), Some(files)) = (written.file, self.files.as_mut()) else {
            return;
        };
        if files.len() < FSYNC_EACH_MAX {
            files.push(file);
        } else {
            self.files = None;
        }
    }

    /// Makes every block written through this batch durable: a few files
    /// by syncing each and then their shard directories (the renames), more
    /// with one `syncfs(2)` of the store's filesystem, one journal commit
    /// instead of an fsync per file and directory (measured here: 512 files
    /// of 1 MiB, 2.0 s of per-file fsyncs vs 0.4 s).
    pub fn commit(self) -> Result<(), IpfsError> {
        let Some(files) = self.files else {
            return self.store.sync();
        };
        let mut dirs: Vec<&Path> = Vec::new();
        for file in &files {
            let f = File::open(file).map_err(io(file))?;
            f.sync_data().map_err(io(file))?;
            if let Some(dir) = file.parent() {
                if !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
        }
        for dir in dirs {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ipfs::block::DAG_PB;

    fn store() -> (tempfile::TempDir, BlockStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(&dir.path().join("blocks")).unwrap();
        (dir, store)
    }

    #[test]
    fn a_small_batch_syncs_its_files_and_a_large_one_the_filesystem() {
        let (_d, s) = store();
        let blocks: Vec<Block> = (0..=FSYNC_EACH_MAX)
            .map(|i| Block::from_data(RAW, Bytes::from(format!("block {i}"))))
            .collect();
        let mut small = s.batch();
        for b in &blocks[..3] {
            small.put(b).unwrap();
        }
        small.put(&blocks[0]).unwrap();
        assert_eq!(small.files.as_ref().map(Vec::len), Some(4));
        small.commit().unwrap();
        let mut large = s.batch();
        for b in &blocks {
            large.put(b).unwrap();
        }
        assert!(
            large.files.is_none(),
            "past the limit the batch syncs the filesystem"
        );
        large.commit().unwrap();
        for b in &blocks {
            assert_eq!(s.get(b.cid()).unwrap().as_ref(), Some(b));
        }
    }

    #[test]
    fn open_makes_every_shard_a_block_can_go_to() {
        let (d, s) = store();
        for i in 0..200 {
            let b = Block::from_data(RAW, Bytes::from(format!("shard {i}")));
            assert!(s.path_of(b.cid()).parent().unwrap().is_dir(), "{i}");
        }
        let shards = || fs::read_dir(s.dir()).unwrap().count();
        assert_eq!(shards(), 1024 + 1, "1024 shards and tmp");
        BlockStore::open(&d.path().join("blocks")).unwrap();
        assert_eq!(shards(), 1024 + 1);
    }

    #[test]
    fn put_then_get_returns_same_bytes() {
        let (_d, s) = store();
        let b = Block::from_data(RAW, Bytes::from_static(b"hello"));
        let mut batch = s.batch();
        assert!(batch.put(&b).unwrap());
        assert!(!batch.put(&b).unwrap());
        batch.commit().unwrap();
        assert_eq!(s.get(b.cid()).unwrap(), Some(b.clone()));
        assert_eq!(s.size(b.cid()).unwrap(), Some(5));
        assert!(s.has(b.cid()).unwrap());
    }

    #[test]
    fn cid_v0_and_v1_share_one_file() {
        let (_d, s) = store();
        let b = Block::from_data(DAG_PB, Bytes::from_static(b"\x0a\x02\x08\x02"));
        let v0 = Cid::new_v0(*b.cid().hash()).unwrap();
        let mut batch = s.batch();
        batch.put(&b).unwrap();
        batch.commit().unwrap();
        assert_eq!(
            s.get(&v0).unwrap().map(|b| b.into_data()),
            Some(b.data().clone())
        );
        assert_eq!(s.list().unwrap().len(), 1);
    }

    #[test]
    fn get_verified_detects_a_corrupted_file() {
        let (_d, s) = store();
        let b = Block::from_data(RAW, Bytes::from_static(b"precious bytes"));
        let mut batch = s.batch();
        batch.put(&b).unwrap();
        batch.commit().unwrap();
        fs::write(s.path_of(b.cid()), b"precious bytez").unwrap();
        let err = s.get_verified(b.cid());
        assert!(matches!(err, Err(IpfsError::HashMismatch { cid }) if cid == *b.cid()));
    }

    #[test]
    fn torn_write_of_wrong_length_is_replaced() {
        let (_d, s) = store();
        let b = Block::from_data(RAW, Bytes::from_static(b"full block"));
        let mut batch = s.batch();
        batch.put(&b).unwrap();
        fs::write(s.path_of(b.cid()), b"full").unwrap();
        batch.put(&b).unwrap();
        batch.commit().unwrap();
        assert!(s.get_verified(b.cid()).unwrap().is_some());
    }

    #[test]
    fn delete_reports_bytes_freed() {
        let (_d, s) = store();
        let b = Block::from_data(RAW, Bytes::from_static(b"12345678"));
        let mut batch = s.batch();
        batch.put(&b).unwrap();
        batch.commit().unwrap();
        assert_eq!(s.delete(b.cid()).unwrap(), 8);
        assert_eq!(s.delete(b.cid()).unwrap(), 0);
        assert_eq!(s.get(b.cid()).unwrap(), None);
    }

    #[test]
    fn open_discards_leftover_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let blocks = dir.path().join("blocks");
        BlockStore::open(&blocks).unwrap();
        fs::write(blocks.join("tmp").join("1.1"), b"half").unwrap();
        let s = BlockStore::open(&blocks).unwrap();
        assert_eq!(fs::read_dir(blocks.join("tmp")).unwrap().count(), 0);
        assert!(s.list().unwrap().is_empty());
    }
}
