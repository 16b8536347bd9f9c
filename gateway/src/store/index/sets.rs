//! Each publisher's newest accepted mapping set, kept as the exact file it
//! published beside a sorted sidecar (`<digest>.idx`) that finds an entry by
//! store-path hash or by NarHash with two reads. Indexing a set is then a copy
//! and a sort instead of a B-tree insert per entry (a million entries: about
//! a second instead of twelve), and the kept file stays evidence that anyone
//! can re-verify.
//!
//! Crash safety: both files are written and fsynced under their final names
//! before redb's trusted state names their digest; files no trusted state
//! names are debris of an interrupted sync and are removed on open.

use std::collections::{BTreeMap, BinaryHeap};
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anchor_registry::{Mapping, NarHash, StorePathHash, TrustedState};
use tempfile::NamedTempFile;

use super::IndexError;

const MAGIC: &[u8; 16] = b"nixpfs-setidx-1\n";
/// Magic plus the entry count.
const HEADER_LEN: u64 = 24;
/// Key (32 bytes: a rendered hash part or a NarHash digest), offset, length.
const RECORD_LEN: usize = 44;
/// Records per fence key kept in memory: a lookup reads one block of this
/// many records (5.5 KiB) and the fences of a million entries take 250 KiB.
const FENCE: u64 = 128;

/// The two sorted sections of a sidecar.
#[derive(Clone, Copy, Debug)]
enum Section {
    /// By rendered store-path hash: the set file's own order.
    Paths = 0,
    /// By NarHash digest; several paths may share one NAR.
    Nars = 1,
}

/// Where one entry's line is in the set file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Record {
    key: [u8; 32],
    offset: u64,
    len: u32,
}

impl Record {
    fn write(&self, out: &mut impl Write) -> io::Result<()> {
        out.write_all(&self.key)?;
        out.write_all(&self.offset.to_le_bytes())?;
        out.write_all(&self.len.to_le_bytes())
    }

    fn read(bytes: &[u8]) -> Self {
        let mut key = [0u8; 32];
        key.copy_from_slice(&bytes[..32]);
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&bytes[32..40]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&bytes[40..44]);
        Self {
            key,
            offset: u64::from_le_bytes(offset),
            len: u32::from_le_bytes(len),
        }
    }
}

fn io_error(path: &Path, source: io::Error) -> IndexError {
    IndexError::SetFile {
        path: path.display().to_string(),
        source,
    }
}

fn corrupt(path: &Path, message: impl Into<String>) -> IndexError {
    IndexError::Corrupt {
        table: "set files",
        key: path.display().to_string(),
        message: message.into(),
    }
}

/// One publisher's stored set: its trusted state and open file handles (an
/// open handle keeps reading even after a newer version replaced the files).
#[derive(Debug)]
pub(crate) struct StoredSet {
    pub(crate) state: TrustedState,
    entries: File,
    entries_path: PathBuf,
    idx: File,
    idx_path: PathBuf,
    count: u64,
    /// The key of every [`FENCE`]th record, per section.
    fences: [Vec<[u8; 32]>; 2],
}

impl StoredSet {
    /// The mapping this set holds for `hash`, if any.
    pub(crate) fn for_path(&self, hash: &StorePathHash) -> Result<Option<Mapping>, IndexError> {
        let mut key = [0u8; 32];
        key.copy_from_slice(hash.as_str().as_bytes());
        self.find(Section::Paths, &key)
    }

    /// A mapping of this set whose NAR has this hash, if any.
    pub(crate) fn for_nar(&self, nar_hash: &NarHash) -> Result<Option<Mapping>, IndexError> {
        self.find(Section::Nars, nar_hash.as_bytes())
    }

    /// Every mapping, in store-path-hash order.
    pub(crate) fn mappings(&self) -> Result<Vec<Mapping>, IndexError> {
        let mut reader = BufReader::with_capacity(1 << 20, AtReader::new(&self.entries, 0));
        let mut line = Vec::new();
        let mut scratch = Vec::new();
        let mut out = Vec::with_capacity(usize::try_from(self.count).unwrap_or(0));
        let mut first = true;
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| io_error(&self.entries_path, e))?;
            if n == 0 {
                break;
            }
            if std::mem::take(&mut first) {
                continue;
            }
            let body = line.strip_suffix(b"\n").unwrap_or(&line);
            out.push(self.parse(body, &mut scratch)?);
        }
        Ok(out)
    }

    /// Re-reads the kept file through the set verifier: its header must be
    /// the trusted one (same digest) and every entry byte must hash to it.
    /// `Err` is the first problem found, in words.
    pub(crate) fn verify_file(&self) -> Result<u64, String> {
        let reader = BufReader::with_capacity(1 << 20, AtReader::new(&self.entries, 0));
        let set = anchor_registry::SetReader::open_with(
            reader,
            anchor_registry::EntryChecks::DeferNixSignatures,
        )
        .map_err(|e| e.to_string())?;
        if set.header().digest() != self.state.digest() {
            return Err(format!(
                "header digest {} is not the trusted {}",
                set.header().digest().to_hex(),
                self.state.digest().to_hex()
            ));
        }
        let mut entries = 0u64;
        set.for_each(|_| entries += 1).map_err(|e| e.to_string())?;
        if entries != self.count {
            return Err(format!(
                "{entries} entries, the sidecar indexes {}",
                self.count
            ));
        }
        Ok(entries)
    }

    /// Where the kept set file is.
    pub(crate) fn entries_path(&self) -> &Path {
        &self.entries_path
    }

    /// The store-path hashes of this set, in order, read sequentially.
    fn path_keys(&self) -> PathKeys<'_> {
        PathKeys {
            reader: BufReader::with_capacity(1 << 16, AtReader::new(&self.idx, HEADER_LEN)),
            left: self.count,
            path: &self.idx_path,
        }
    }

    fn parse(&self, line: &[u8], scratch: &mut Vec<u8>) -> Result<Mapping, IndexError> {
        Mapping::parse_canonical(line, scratch)
            .map_err(|e| corrupt(&self.entries_path, e.to_string()))
    }

    fn find(&self, section: Section, key: &[u8; 32]) -> Result<Option<Mapping>, IndexError> {
        let fences = &self.fences[section as usize];
        let block = match fences.partition_point(|fence| fence <= key) {
            0 => return Ok(None),
            after => (after - 1) as u64,
        };
        let first = block * FENCE;
        let n = FENCE.min(self.count - first);
        let mut bytes = vec![0u8; n as usize * RECORD_LEN];
        let at = self.record_offset(section, first);
        self.idx
            .read_exact_at(&mut bytes, at)
            .map_err(|e| io_error(&self.idx_path, e))?;
        let mut records = bytes.chunks_exact(RECORD_LEN).map(Record::read);
        let Some(record) = records.find(|r| r.key == *key) else {
            return Ok(None);
        };
        let mut line = vec![0u8; record.len as usize];
        self.entries
            .read_exact_at(&mut line, record.offset)
            .map_err(|e| io_error(&self.entries_path, e))?;
        self.parse(&line, &mut Vec::new()).map(Some)
    }

    fn record_offset(&self, section: Section, record: u64) -> u64 {
        HEADER_LEN + (section as u64 * self.count + record) * RECORD_LEN as u64
    }

    /// Opens the files of the set `state` names; `None` if they are missing.
    fn load(dir: &Path, state: TrustedState) -> Result<Option<Self>, IndexError> {
        let (entries_path, idx_path) = file_names(dir, &state);
        let open = |path: &Path| match File::open(path) {
            Ok(file) => Ok(Some(file)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(path, e)),
        };
        let (Some(entries), Some(idx)) = (open(&entries_path)?, open(&idx_path)?) else {
            return Ok(None);
        };
        let mut header = [0u8; HEADER_LEN as usize];
        idx.read_exact_at(&mut header, 0)
            .map_err(|e| io_error(&idx_path, e))?;
        if header[..16] != MAGIC[..] {
            return Err(corrupt(&idx_path, "not a set index (bad magic)"));
        }
        let mut count = [0u8; 8];
        count.copy_from_slice(&header[16..]);
        let count = u64::from_le_bytes(count);
        let len = idx.metadata().map_err(|e| io_error(&idx_path, e))?.len();
        let expected = count
            .checked_mul(2 * RECORD_LEN as u64)
            .and_then(|n| n.checked_add(HEADER_LEN));
        if expected != Some(len) {
            return Err(corrupt(
                &idx_path,
                format!("{len} bytes cannot hold {count} entries"),
            ));
        }
        let mut set = Self {
            state,
            entries,
            entries_path,
            idx,
            idx_path,
            count,
            fences: [Vec::new(), Vec::new()],
        };
        for section in [Section::Paths, Section::Nars] {
            let mut fences = Vec::with_capacity(count.div_ceil(FENCE) as usize);
            let mut key = [0u8; 32];
            for record in (0..count).step_by(FENCE as usize) {
                set.idx
                    .read_exact_at(&mut key, set.record_offset(section, record))
                    .map_err(|e| io_error(&set.idx_path, e))?;
                fences.push(key);
            }
            set.fences[section as usize] = fences;
        }
        Ok(Some(set))
    }
}

fn file_names(dir: &Path, state: &TrustedState) -> (PathBuf, PathBuf) {
    let digest = state.digest().to_hex();
    (
        dir.join(format!("{digest}.jsonl")),
        dir.join(format!("{digest}.idx")),
    )
}

/// `Read` at a moving offset through `read_at`, so readers of one shared
/// handle never disturb each other's file position.
struct AtReader<'a> {
    file: &'a File,
    pos: u64,
}

impl<'a> AtReader<'a> {
    fn new(file: &'a File, pos: u64) -> Self {
        Self { file, pos }
    }
}

impl Read for AtReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

struct PathKeys<'a> {
    reader: BufReader<AtReader<'a>>,
    left: u64,
    path: &'a Path,
}

impl Iterator for PathKeys<'_> {
    type Item = Result<[u8; 32], IndexError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let mut record = [0u8; RECORD_LEN];
        Some(
            self.reader
                .read_exact(&mut record)
                .map(|()| Record::read(&record).key)
                .map_err(|e| io_error(self.path, e)),
        )
    }
}

/// Wraps the reader a set is verified from: every byte the verifier consumes
/// is copied to a staging file, and every line end is noted, so the verified
/// set is stored without a second read or a re-rendering of its entries.
#[derive(Debug)]
pub struct SetTee<R> {
    inner: R,
    out: BufWriter<NamedTempFile>,
    /// Offset of every `\n` consumed so far.
    newlines: Vec<u64>,
    consumed: u64,
    /// The first write failure; `consume` cannot return it.
    error: Option<io::Error>,
}

impl<R: BufRead> SetTee<R> {
    /// Ends the copy once the verifier accepted the set; `keys` are the
    /// entries' (store-path hash, NarHash) in file order.
    pub fn finish(self, keys: Vec<(StorePathHash, NarHash)>) -> Result<StagedSet, IndexError> {
        let path = self.out.get_ref().path().to_path_buf();
        if let Some(e) = self.error {
            return Err(io_error(&path, e));
        }
        let file = self
            .out
            .into_inner()
            .map_err(|e| io_error(&path, e.into_error()))?;
        Ok(StagedSet {
            file,
            newlines: self.newlines,
            keys,
        })
    }
}

impl<R: BufRead> Read for SetTee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for SetTee<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, amt: usize) {
        if amt == 0 {
            return;
        }
        // The bytes being consumed are still in the inner buffer: this
        // `fill_buf` returns them without reading.
        match self.inner.fill_buf() {
            Ok(data) => {
                let data = &data[..amt.min(data.len())];
                let base = self.consumed;
                self.newlines
                    .extend(memchr::memchr_iter(b'\n', data).map(|i| base + i as u64));
                if self.error.is_none() {
                    self.error = self.out.write_all(data).err();
                }
            }
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
        self.consumed += amt as u64;
        self.inner.consume(amt);
    }
}

/// A verified set's bytes in a staging file, ready to be installed.
#[derive(Debug)]
pub struct StagedSet {
    file: NamedTempFile,
    newlines: Vec<u64>,
    keys: Vec<(StorePathHash, NarHash)>,
}

/// The directory of stored sets and which one is current per publisher.
#[derive(Debug)]
pub(crate) struct SetFiles {
    dir: PathBuf,
    current: RwLock<BTreeMap<String, Arc<StoredSet>>>,
}

impl SetFiles {
    /// Opens the stored set of every `(owner, trusted state)` and removes
    /// files none of them names.
    pub(crate) fn open(
        dir: &Path,
        states: Vec<(String, TrustedState)>,
    ) -> Result<Self, IndexError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        let mut current = BTreeMap::new();
        for (owner, state) in states {
            // Fail closed: a set that cannot be read may hold the mapping
            // that blocks a conflicting path, so the index does not open
            // without it; the error says how to store it again.
            let (entries, idx) = file_names(dir, &state);
            let loaded = StoredSet::load(dir, state).map_err(|e| IndexError::DamagedSet {
                owner: owner.clone(),
                reason: e.to_string(),
                files: format!("{} and {}", entries.display(), idx.display()),
            })?;
            match loaded {
                Some(set) => {
                    current.insert(owner, Arc::new(set));
                }
                None => tracing::warn!(
                    %owner,
                    "no stored mapping set for the trusted version; the next sync indexes it again"
                ),
            }
        }
        let keep: Vec<PathBuf> = current
            .values()
            .flat_map(|s| [s.entries_path.clone(), s.idx_path.clone()])
            .collect();
        for entry in std::fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
            let path = entry.map_err(|e| io_error(dir, e))?.path();
            if !keep.contains(&path) {
                std::fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            current: RwLock::new(current),
        })
    }

    /// An unnamed file beside the stored sets (gone when closed), to
    /// spool a fetched set into before it is read as a file.
    pub(crate) fn spool(&self) -> Result<std::fs::File, IndexError> {
        tempfile::tempfile_in(&self.dir).map_err(|e| io_error(&self.dir, e))
    }

    /// Starts copying a set as it is read and verified.
    pub(crate) fn tee<R: BufRead>(&self, inner: R) -> Result<SetTee<R>, IndexError> {
        let file = NamedTempFile::with_prefix_in(".staging-", &self.dir)
            .map_err(|e| io_error(&self.dir, e))?;
        Ok(SetTee {
            inner,
            out: BufWriter::with_capacity(1 << 20, file),
            newlines: Vec::new(),
            consumed: 0,
            error: None,
        })
    }

    /// Whether `owner`'s stored set is the one `state` names.
    pub(crate) fn holds(&self, owner: &str, state: &TrustedState) -> bool {
        self.read()
            .get(owner)
            .is_some_and(|s| s.state.digest() == state.digest())
    }

    pub(crate) fn get(&self, owner: &str) -> Option<Arc<StoredSet>> {
        self.read().get(owner).cloned()
    }

    /// Every current set, in owner order (the order assertions come in).
    pub(crate) fn all(&self) -> Vec<Arc<StoredSet>> {
        self.read().values().cloned().collect()
    }

    /// Writes the sidecar and makes both files durable under their final
    /// names; the set becomes current only through [`SetFiles::switch`],
    /// after the trusted state naming it is committed.
    pub(crate) fn install(
        &self,
        state: TrustedState,
        staged: StagedSet,
    ) -> Result<Arc<StoredSet>, IndexError> {
        let StagedSet {
            file,
            newlines,
            keys,
        } = staged;
        let (entries_path, idx_path) = file_names(&self.dir, &state);
        if newlines.len() != keys.len() + 1 {
            return Err(corrupt(
                file.path(),
                format!(
                    "{} lines for a header and {} entries",
                    newlines.len(),
                    keys.len()
                ),
            ));
        }
        let records = |key_of: &dyn Fn(usize) -> [u8; 32]| -> Vec<Record> {
            newlines
                .windows(2)
                .enumerate()
                .map(|(i, ends)| Record {
                    key: key_of(i),
                    offset: ends[0] + 1,
                    // Lines are at most `MAX_LINE_LEN` long: checked while reading.
                    len: u32::try_from(ends[1] - ends[0] - 1).unwrap_or(u32::MAX),
                })
                .collect()
        };
        let by_path = records(&|i| {
            let mut key = [0u8; 32];
            key.copy_from_slice(keys[i].0.as_str().as_bytes());
            key
        });
        let mut by_nar = records(&|i| *keys[i].1.as_bytes());
        by_nar.sort_unstable_by_key(|r| r.key);
        drop(keys);

        let idx_tmp = NamedTempFile::with_prefix_in(".staging-", &self.dir)
            .map_err(|e| io_error(&self.dir, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, idx_tmp);
        let count = by_path.len() as u64;
        let write = |out: &mut BufWriter<NamedTempFile>| -> io::Result<()> {
            out.write_all(MAGIC)?;
            out.write_all(&count.to_le_bytes())?;
            for record in by_path.iter().chain(&by_nar) {
                record.write(out)?;
            }
            out.flush()
        };
        write(&mut out).map_err(|e| io_error(&idx_path, e))?;
        let idx_tmp = out
            .into_inner()
            .map_err(|e| io_error(&idx_path, e.into_error()))?;
        file.as_file()
            .sync_all()
            .map_err(|e| io_error(&entries_path, e))?;
        idx_tmp
            .as_file()
            .sync_all()
            .map_err(|e| io_error(&idx_path, e))?;
        let entries = file
            .persist(&entries_path)
            .map_err(|e| io_error(&entries_path, e.error))?;
        let idx = idx_tmp
            .persist(&idx_path)
            .map_err(|e| io_error(&idx_path, e.error))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error(&self.dir, e))?;
        let fence = |records: &[Record]| {
            records
                .iter()
                .step_by(FENCE as usize)
                .map(|r| r.key)
                .collect()
        };
        Ok(Arc::new(StoredSet {
            state,
            entries,
            entries_path,
            idx,
            idx_path,
            count,
            fences: [fence(&by_path), fence(&by_nar)],
        }))
    }

    /// Makes `set` `owner`'s current set and deletes the files it replaced.
    pub(crate) fn switch(&self, owner: String, set: Arc<StoredSet>) {
        let old = self
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(owner, set.clone());
        if let Some(old) = old.filter(|old| old.entries_path != set.entries_path) {
            for path in [&old.entries_path, &old.idx_path] {
                if let Err(e) = std::fs::remove_file(path) {
                    tracing::warn!(path = %path.display(), "cannot remove a replaced set file: {e}");
                }
            }
        }
    }

    /// Forgets `owner`'s set and deletes its files (after its trusted state
    /// was removed, so a crash in between leaves only debris for `open`).
    pub(crate) fn remove(&self, owner: &str) {
        let old = self
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(owner);
        for path in old.iter().flat_map(|o| [&o.entries_path, &o.idx_path]) {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), "cannot remove a purged set file: {e}");
            }
        }
    }

    /// Store-path hashes that more than one current set maps, in order: a
    /// merge of the sets' sorted sidecars, in constant memory per set.
    pub(crate) fn shared_paths(&self) -> Result<Vec<StorePathHash>, IndexError> {
        let sets = self.all();
        let mut keys: Vec<PathKeys<'_>> = sets.iter().map(|s| s.path_keys()).collect();
        let mut heap = BinaryHeap::new();
        for (i, k) in keys.iter_mut().enumerate() {
            if let Some(key) = k.next() {
                heap.push(std::cmp::Reverse((key?, i)));
            }
        }
        let mut out = Vec::new();
        let mut last: Option<([u8; 32], usize)> = None;
        while let Some(std::cmp::Reverse((key, i))) = heap.pop() {
            match &mut last {
                Some((k, n)) if *k == key => *n += 1,
                _ => {
                    flush_shared(last.take(), &mut out);
                    last = Some((key, 1));
                }
            }
            if let Some(next) = keys[i].next() {
                heap.push(std::cmp::Reverse((next?, i)));
            }
        }
        flush_shared(last, &mut out);
        Ok(out)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<StoredSet>>> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }
}

fn flush_shared(entry: Option<([u8; 32], usize)>, out: &mut Vec<StorePathHash>) {
    if let Some((key, n)) = entry.filter(|(_, n)| *n > 1) {
        let parsed = std::str::from_utf8(&key)
            .ok()
            .and_then(|s| StorePathHash::parse(s).ok());
        match parsed {
            Some(hash) => out.push(hash),
            None => tracing::warn!(
                sets = n,
                "a set index holds a key that is no store-path hash"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::index::Index;
    use crate::trust::sync::{verify_and_index, Indexed};
    use anchor_registry::{
        AnchorName, MappingSetBuilder, Registry, SecretKey, SetKind, SignedHeader, StorePath,
    };

    const EXPIRES: u64 = u32::MAX as u64;

    struct Publisher {
        key: SecretKey,
        name: AnchorName,
    }

    fn publisher(name: &str) -> Publisher {
        Publisher {
            key: SecretKey::generate(name).unwrap(),
            name: AnchorName::parse(name).unwrap(),
        }
    }

    fn registry(publishers: &[&Publisher]) -> Registry {
        anchor_registry::testing::one_root_registry(
            publishers.iter().map(|p| {
                anchor_registry::testing::anchor(&p.key, p.name.as_str(), &["/srv/set.jsonl"])
            }),
            EXPIRES,
        )
    }

    /// A mapping for path number `i`; `nar` picks its NarHash, so two
    /// paths (or two publishers) can share or differ on one.
    fn mapping(p: &Publisher, i: u64, nar: u64) -> Mapping {
        let mut digest = [0u8; 20];
        digest[..8].copy_from_slice(&i.to_be_bytes());
        let path =
            StorePath::from_parts(StorePathHash::from_digest(digest), &format!("pkg-{i}")).unwrap();
        anchor_registry::testing::mapping(&p.key, path, &nar.to_le_bytes())
    }

    fn publish(
        p: &Publisher,
        previous: Option<&SignedHeader>,
        mappings: impl IntoIterator<Item = Mapping>,
    ) -> (Vec<u8>, SignedHeader) {
        let mut builder = match previous {
            Some(h) => MappingSetBuilder::next_after(h),
            None => MappingSetBuilder::first(SetKind::Anchor, p.name.clone()),
        };
        for m in mappings {
            builder.insert(m);
        }
        let mut out = Vec::new();
        let header = builder.write(&p.key, 1, EXPIRES, &mut out).unwrap();
        (out, header)
    }

    /// A fresh index, publisher `alpha`, and a registry listing it.
    fn world() -> (tempfile::TempDir, Index, Publisher, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        let alpha = publisher("alpha");
        let registry = registry(&[&alpha]);
        (dir, index, alpha, registry)
    }

    fn sync(index: &Index, registry: &Registry, p: &Publisher, bytes: &[u8]) -> Indexed {
        verify_and_index(index, registry, SetKind::Anchor, p.name.as_str(), bytes).unwrap()
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join("index.sets"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn every_entry_is_found_by_path_and_by_nar_across_fence_blocks() {
        let (_dir, index, alpha, registry) = world();
        let n = 3 * FENCE + 7;
        // Paths 2i, so odd numbers are absent; NARs shared by pairs.
        let mappings: Vec<Mapping> = (0..n).map(|i| mapping(&alpha, 2 * i, i / 2)).collect();
        let (bytes, _) = publish(&alpha, None, mappings.clone());
        assert_eq!(
            sync(&index, &registry, &alpha, &bytes),
            Indexed::Accepted {
                version: 1,
                entries: n
            }
        );
        for m in &mappings {
            let found = index.assertions(m.path().hash(), 2).unwrap();
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].mapping, *m);
            let by_nar = index.nar_assertions(m.nar_hash(), 2).unwrap();
            assert_eq!(by_nar.len(), 1);
            assert_eq!(by_nar[0].mapping.nar_hash(), m.nar_hash());
        }
        let absent = mapping(&alpha, 2 * n + 1, n + 1);
        assert!(index
            .assertions(absent.path().hash(), 2)
            .unwrap()
            .is_empty());
        assert!(index
            .nar_assertions(absent.nar_hash(), 2)
            .unwrap()
            .is_empty());
        let before_first = mapping(&alpha, 1, 0);
        assert!(index
            .assertions(before_first.path().hash(), 2)
            .unwrap()
            .is_empty());
        assert!(
            index
                .assertions(mappings[0].path().hash(), EXPIRES)
                .unwrap()
                .is_empty(),
            "an expired set asserts nothing"
        );
        let mut in_order = mappings;
        in_order.sort_by(|a, b| a.path().cmp(b.path()));
        let state = index
            .trusted_state(SetKind::Anchor, "alpha", &alpha.key.public())
            .unwrap()
            .unwrap();
        let all = index.owner_mappings(&state).unwrap();
        assert!(all == in_order, "every mapping back, in hash-part order");
    }

    #[test]
    fn a_stored_set_survives_reopening_and_the_same_version_is_not_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let alpha = publisher("alpha");
        let registry = registry(&[&alpha]);
        let m = mapping(&alpha, 5, 5);
        let (bytes, _) = publish(&alpha, None, [m.clone()]);
        {
            let index = Index::open(&dir.path().join("index.redb")).unwrap();
            sync(&index, &registry, &alpha, &bytes);
        }
        std::fs::write(dir.path().join("index.sets/.staging-debris"), b"x").unwrap();
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        assert_eq!(
            files(dir.path()).len(),
            2,
            "debris removed: {:?}",
            files(dir.path())
        );
        assert_eq!(index.assertions(m.path().hash(), 2).unwrap()[0].mapping, m);
        // Only the header is read for the trusted version: damaged entries
        // after it go unnoticed because nothing is indexed from them.
        let header_end = bytes.iter().position(|b| *b == b'\n').unwrap() + 1;
        assert_eq!(
            sync(&index, &registry, &alpha, &bytes[..header_end]),
            Indexed::Unchanged { version: 1 }
        );
    }

    #[test]
    fn a_new_version_replaces_the_files_of_the_old_one() {
        let (dir, index, alpha, registry) = world();
        let old = mapping(&alpha, 1, 1);
        let (v1, h1) = publish(&alpha, None, [old.clone()]);
        sync(&index, &registry, &alpha, &v1);
        let first_files = files(dir.path());
        let new = mapping(&alpha, 2, 2);
        let (v2, _) = publish(&alpha, Some(&h1), [new.clone()]);
        sync(&index, &registry, &alpha, &v2);
        let second_files = files(dir.path());
        assert_eq!(second_files.len(), 2);
        assert!(first_files.iter().all(|f| !second_files.contains(f)));
        assert!(index.assertions(old.path().hash(), 2).unwrap().is_empty());
        assert_eq!(
            index.assertions(new.path().hash(), 2).unwrap()[0].mapping,
            new
        );
    }

    #[test]
    fn a_refused_set_leaves_no_file_and_the_old_set_in_place() {
        let (dir, index, alpha, registry) = world();
        let m = mapping(&alpha, 1, 1);
        let (v1, h1) = publish(&alpha, None, [m.clone()]);
        sync(&index, &registry, &alpha, &v1);
        let kept = files(dir.path());
        let (mut v2, _) = publish(&alpha, Some(&h1), [mapping(&alpha, 2, 2)]);
        let last = v2.len() - 3;
        v2[last] ^= 1;
        let refused = verify_and_index(&index, &registry, SetKind::Anchor, "alpha", v2.as_slice());
        assert!(refused.is_err());
        assert_eq!(files(dir.path()), kept);
        assert_eq!(index.assertions(m.path().hash(), 2).unwrap()[0].mapping, m);
    }

    #[test]
    fn paths_two_publishers_map_are_found_by_merging_their_sets() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        let alpha = publisher("alpha");
        let beta = publisher("beta");
        let registry = registry(&[&alpha, &beta]);
        let (a, _) = publish(&alpha, None, (0..300).map(|i| mapping(&alpha, i * 2, i)));
        let (b, _) = publish(&beta, None, (0..300).map(|i| mapping(&beta, i * 3, i)));
        sync(&index, &registry, &alpha, &a);
        sync(&index, &registry, &beta, &b);
        let mut expected: Vec<StorePathHash> = (0..100)
            .map(|i| *mapping(&alpha, i * 6, 0).path().hash())
            .collect();
        expected.sort();
        assert_eq!(index.multi_asserted_paths().unwrap(), expected);
        let both = index.assertions(&expected[7], 2).unwrap();
        assert_eq!(both.len(), 2);
    }

    #[test]
    fn verify_sets_passes_a_kept_set_and_names_one_with_a_flipped_byte() {
        let (dir, index, alpha, registry) = world();
        let (bytes, _) = publish(&alpha, None, (0..300).map(|i| mapping(&alpha, i, i)));
        sync(&index, &registry, &alpha, &bytes);
        let checks = index.verify_sets();
        assert_eq!(checks.len(), 1);
        assert_eq!(checks[0].result, Ok(300));

        let file = checks[0].file.clone();
        assert!(file.starts_with(dir.path()));
        let mut data = std::fs::read(&file).unwrap();
        let at = data.len() / 2;
        data[at] = if data[at] == b'a' { b'b' } else { b'a' };
        std::fs::write(&file, data).unwrap();
        let checks = index.verify_sets();
        assert!(checks[0].result.is_err(), "{:?}", checks[0]);
        assert!(checks[0].owner.contains("alpha"), "{:?}", checks[0]);
    }

    #[test]
    fn a_damaged_sidecar_stops_the_index_with_a_remedy_that_works() {
        let dir = tempfile::tempdir().unwrap();
        let alpha = publisher("alpha");
        let registry = registry(&[&alpha]);
        let (bytes, _) = publish(&alpha, None, [mapping(&alpha, 1, 1)]);
        {
            let index = Index::open(&dir.path().join("index.redb")).unwrap();
            sync(&index, &registry, &alpha, &bytes);
        }
        let idx = files(dir.path())
            .into_iter()
            .find(|f| f.ends_with(".idx"))
            .unwrap();
        let idx = dir.path().join("index.sets").join(idx);
        let mut data = std::fs::read(&idx).unwrap();
        data.pop();
        std::fs::write(&idx, data).unwrap();
        let err = Index::open(&dir.path().join("index.redb"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot hold 1 entries"), "{err}");
        assert!(err.contains("anchors sync"), "says what to do: {err}");
        // Doing what it says restores the set.
        for f in files(dir.path()) {
            std::fs::remove_file(dir.path().join("index.sets").join(f)).unwrap();
        }
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        assert_eq!(
            sync(&index, &registry, &alpha, &bytes),
            Indexed::Accepted {
                version: 1,
                entries: 1
            }
        );
    }

    #[test]
    fn a_slower_sync_of_an_older_version_cannot_replace_a_newer_one() {
        let (dir, index, alpha, registry) = world();
        let old = mapping(&alpha, 1, 1);
        let (v1, h1) = publish(&alpha, None, [old.clone()]);
        // The slow sync: v1 verified and staged, not yet stored.
        let mut tee = index.tee_set(v1.as_slice()).unwrap();
        let reader =
            anchor_registry::SetReader::open_with(&mut tee, anchor_registry::EntryChecks::All)
                .unwrap();
        let state = anchor_registry::check_header(reader.header(), &registry, None, 2).unwrap();
        let mut keys = Vec::new();
        reader
            .for_each(|m| keys.push((*m.path().hash(), *m.nar_hash())))
            .unwrap();
        let staged = tee.finish(keys).unwrap();
        // Meanwhile a fast sync stores v1 and then v2.
        sync(&index, &registry, &alpha, &v1);
        let new = mapping(&alpha, 2, 2);
        let (v2, _) = publish(&alpha, Some(&h1), [new.clone()]);
        sync(&index, &registry, &alpha, &v2);

        index.replace_set(&state, staged).unwrap();
        assert_eq!(
            index
                .trusted_state(SetKind::Anchor, "alpha", &alpha.key.public())
                .unwrap()
                .unwrap()
                .version(),
            2
        );
        assert!(index.assertions(old.path().hash(), 2).unwrap().is_empty());
        assert_eq!(
            index.assertions(new.path().hash(), 2).unwrap()[0].mapping,
            new
        );
        assert_eq!(files(dir.path()).len(), 2, "{:?}", files(dir.path()));
    }
}
