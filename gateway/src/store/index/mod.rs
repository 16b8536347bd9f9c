//! The persistent local index (redb): which store paths this gateway knows,
//! what their NARs are, and where the bytes live on IPFS. One transaction per
//! change, so a crash leaves either the old or the new state, never half.
//!
//! Tables:
//! - `local_paths`: store-path hash → the user's own pinned paths (narinfo + CID);
//! - `nar_locations`: NarHash → CID, size and whether the bytes were verified;
//! - `trusted_state`: the newest set each publisher had accepted (see `sync`),
//!   keyed by kind, name and key (a new key starts a new chain), whose
//!   entries are kept as files beside the index (see [`sets`]);
//! - the upstream bridge's narinfos and cache pins (see [`upstream`]);
//! - the newest IPNS record accepted per name (see [`names`]).

mod names;
mod sets;
mod upstream;

pub use names::{NameRecord, Offered};
pub use sets::{SetTee, StagedSet};
pub use upstream::{CachePin, UpstreamPath};

use std::io::BufRead;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anchor_registry::{
    Assertion, Mapping, NarHash, NarInfo, PublicKey, SetKind, SignedHeader, StorePathHash,
    TrustedState,
};
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::store::db::Db;
use crate::util::sync::lock;

const LOCAL_PATHS: TableDefinition<&str, &[u8]> = TableDefinition::new("local_paths");
const NAR_LOCATIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("nar_locations");
/// set owner ([`set_owner`]) → the trusted state (newest accepted signed header).
const TRUSTED: TableDefinition<&str, &[u8]> = TableDefinition::new("trusted_state");
/// name → small values: the trusted registry document.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// (anchor, sequence) → fork evidence: two signed headers of one version.
const FORKS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("fork_evidence");

/// Failures of the index; all of them are ours, none the client's.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("cannot open index {path}: {source}")]
    Open {
        path: String,
        source: redb::DatabaseError,
    },
    #[error("index storage error: {0}")]
    Storage(String),
    #[error("cannot read or write the stored mapping set {path}: {source}")]
    SetFile {
        path: String,
        source: std::io::Error,
    },
    #[error("the stored mapping set of {owner} is damaged ({reason}); remove {files} and run `nixpfs anchors sync` to store it again")]
    DamagedSet {
        owner: String,
        reason: String,
        files: String,
    },
    #[error("corrupt index record in {table} for {key}: {message}")]
    Corrupt {
        table: &'static str,
        key: String,
        message: String,
    },
}

macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for IndexError {
            fn from(e: $t) -> Self {
                IndexError::Storage(e.to_string())
            }
        }
    )*};
}
storage_from!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Where a NAR's bytes are on IPFS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NarLocation {
    /// Root CID of the UnixFS file (profile `unixfs-v1-2025` for our imports).
    pub cid: String,
    pub nar_size: u64,
    /// This CID's bytes were once hashed whole and matched NarHash. A CID
    /// fixes its bytes (every block is checked against its CID as it is
    /// read), so later responses need no whole-NAR hash.
    pub verified: bool,
}

/// One stored set's re-verification: entries counted, or what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSetCheck {
    pub owner: String,
    pub file: std::path::PathBuf,
    pub result: Result<u64, String>,
}

/// A store path the user pinned from their own Nix store: always served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPath {
    pub narinfo: NarInfo,
    pub cid: String,
}

#[derive(Serialize, Deserialize)]
struct LocalRecord {
    narinfo: String,
    cid: String,
    /// The gateway key (`name:base64`) whose signature `narinfo` already
    /// carries in served form; see [`Index::put_locals`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    served_by: Option<String>,
}

/// One of the user's paths as stored: the narinfo text, unparsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredNarInfo {
    pub text: String,
    /// Set when `text` is exactly what the gateway with this public key
    /// serves: its URL, uncompressed, signed by it.
    pub served_by: Option<String>,
}

/// The index handle; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Index {
    db: Db,
    /// Bumped after every change to `local_paths`, so caches of what it
    /// holds (the catalog's signed narinfos) know when to drop entries.
    local_generation: AtomicU64,
    /// Bumped after every change to the stored sets (replaced or purged),
    /// for caches of what anchors say.
    sets_generation: AtomicU64,
    /// Each publisher's current set, kept beside the index file.
    sets: sets::SetFiles,
    /// Serialises set replacements, so a slower sync of an older version
    /// cannot overwrite a newer one.
    replacing: std::sync::Mutex<()>,
}

/// The index's page cache. Every narinfo is a lookup here; the hot inner
/// pages fit easily and the leaves a random lookup reaches stay in the
/// kernel's page cache, so a larger one buys little and, at redb's default
/// of 1 GiB, let a 1,000,000-path index push the gateway past 512 MiB.
const CACHE_BYTES: usize = 64 << 20;

impl Index {
    /// Opens (or creates) the index file and its tables, and the stored sets
    /// in the directory beside it (`index.redb` → `index.sets/`).
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        let db = Db::create(path, CACHE_BYTES).map_err(|source| IndexError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let txn = db.begin_write()?;
        txn.open_table(LOCAL_PATHS)?;
        txn.open_table(NAR_LOCATIONS)?;
        txn.open_table(TRUSTED)?;
        txn.open_table(FORKS)?;
        txn.open_table(META)?;
        upstream::create_tables(&txn)?;
        names::create_tables(&txn)?;
        txn.commit()?;
        let states = {
            let txn = db.begin_write()?;
            let mut states = Vec::new();
            {
                let mut table = txn.open_table(TRUSTED)?;
                let mut renamed = Vec::new();
                for entry in table.iter()? {
                    let (key, state) = entry?;
                    let key = key.value().to_owned();
                    let state: TrustedState = decode("trusted_state", &key, state.value())?;
                    let owner = state_owner(&state);
                    if owner != key {
                        // Written before states were keyed by key too.
                        renamed.push((key, owner.clone(), state.clone()));
                    }
                    states.push((owner, state));
                }
                for (old, new, state) in renamed {
                    table.remove(old.as_str())?;
                    table.insert(new.as_str(), encode(&state).as_slice())?;
                }
            }
            txn.commit()?;
            states
        };
        let sets = sets::SetFiles::open(&path.with_extension("sets"), states)?;
        Ok(Self {
            db,
            local_generation: AtomicU64::new(0),
            sets_generation: AtomicU64::new(0),
            sets,
            replacing: std::sync::Mutex::new(()),
        })
    }

    /// An unnamed file in the data directory (gone when closed), to spool
    /// a fetched mapping set into: it is then streamed as a file source is,
    /// never held whole in memory.
    pub fn spool_file(&self) -> Result<std::fs::File, IndexError> {
        self.sets.spool()
    }

    /// Records paths the user pinned, in one transaction (one fsync). Call
    /// only once their blocks are durable and pinned: from then on the
    /// gateway serves them. `served_by` is the public key of the gateway
    /// whose served form the narinfos already are (its URL and signature;
    /// see `Catalog::put_locals`): those are sent as stored, others are
    /// re-presented on every miss.
    pub fn put_locals(
        &self,
        paths: &[LocalPath],
        served_by: Option<&str>,
    ) -> Result<(), IndexError> {
        let txn = self.db.begin_write()?;
        {
            let mut local = txn.open_table(LOCAL_PATHS)?;
            let mut nars = txn.open_table(NAR_LOCATIONS)?;
            for path in paths {
                let record = LocalRecord {
                    narinfo: path.narinfo.to_string(),
                    cid: path.cid.clone(),
                    served_by: served_by.map(str::to_owned),
                };
                let location = NarLocation {
                    cid: path.cid.clone(),
                    nar_size: path.narinfo.nar_size,
                    verified: true,
                };
                local.insert(
                    path.narinfo.store_path.hash().as_str(),
                    encode(&record).as_slice(),
                )?;
                nars.insert(
                    path.narinfo.nar_hash.as_bytes().as_slice(),
                    encode(&location).as_slice(),
                )?;
            }
        }
        txn.commit()?;
        self.local_generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Changes whenever the user's own paths change (after the commit).
    pub fn local_generation(&self) -> u64 {
        self.local_generation.load(Ordering::Acquire)
    }

    /// Changes whenever the stored sets change (after the switch).
    pub fn sets_generation(&self) -> u64 {
        self.sets_generation.load(Ordering::Acquire)
    }

    /// The stored narinfo of the user's own path with this hash part, if any,
    /// unparsed: the narinfo endpoint's fast path.
    pub fn local_narinfo(&self, hash: &StorePathHash) -> Result<Option<StoredNarInfo>, IndexError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOCAL_PATHS)?;
        let Some(value) = table.get(hash.as_str())? else {
            return Ok(None);
        };
        let record: LocalRecord = decode("local_paths", hash.as_str(), value.value())?;
        Ok(Some(StoredNarInfo {
            text: record.narinfo,
            served_by: record.served_by,
        }))
    }

    /// How many paths the user pinned.
    pub fn local_count(&self) -> Result<u64, IndexError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(LOCAL_PATHS)?.len()?)
    }

    /// How many NARs the index knows a location (CID) of.
    pub fn nar_location_count(&self) -> Result<u64, IndexError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(NAR_LOCATIONS)?.len()?)
    }

    /// The user's own pinned path with this hash part, if any.
    pub fn local(&self, hash: &StorePathHash) -> Result<Option<LocalPath>, IndexError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOCAL_PATHS)?;
        let Some(value) = table.get(hash.as_str())? else {
            return Ok(None);
        };
        let record: LocalRecord = decode("local_paths", hash.as_str(), value.value())?;
        let narinfo = NarInfo::parse(&record.narinfo).map_err(|e| IndexError::Corrupt {
            table: "local_paths",
            key: hash.to_string(),
            message: e.to_string(),
        })?;
        Ok(Some(LocalPath {
            narinfo,
            cid: record.cid,
        }))
    }

    /// Every path the user pinned, in store-path-hash order.
    pub fn locals(&self) -> Result<Vec<LocalPath>, IndexError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOCAL_PATHS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let record: LocalRecord = decode("local_paths", key.value(), value.value())?;
            let narinfo = NarInfo::parse(&record.narinfo).map_err(|e| IndexError::Corrupt {
                table: "local_paths",
                key: key.value().to_owned(),
                message: e.to_string(),
            })?;
            out.push(LocalPath {
                narinfo,
                cid: record.cid,
            });
        }
        Ok(out)
    }

    /// Forgets a pinned path; returns it if it was there. The NAR location
    /// stays: anchors may still map another path to the same NAR.
    pub fn remove_local(&self, hash: &StorePathHash) -> Result<Option<LocalPath>, IndexError> {
        let existing = self.local(hash)?;
        if existing.is_some() {
            let txn = self.db.begin_write()?;
            txn.open_table(LOCAL_PATHS)?.remove(hash.as_str())?;
            txn.commit()?;
            self.local_generation.fetch_add(1, Ordering::AcqRel);
        }
        Ok(existing)
    }

    /// Where the NAR with this hash was recorded to live (own pins, uploads,
    /// NARs once verified), if anywhere. What sets map is asked of the
    /// catalog, which knows whose word counts (`Catalog::nar_locations`).
    pub fn nar_location(&self, nar_hash: &NarHash) -> Result<Option<NarLocation>, IndexError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(NAR_LOCATIONS)?;
        match table.get(nar_hash.as_bytes().as_slice())? {
            Some(v) => Ok(Some(decode(
                "nar_locations",
                &nar_hash.to_string(),
                v.value(),
            )?)),
            None => Ok(None),
        }
    }

    /// Records where a NAR lives, keeping `verified` if it was already set.
    pub fn put_nar_location(
        &self,
        nar_hash: &NarHash,
        location: &NarLocation,
    ) -> Result<(), IndexError> {
        self.write_nar_location(nar_hash, location, redb::Durability::Immediate)
    }

    /// [`Index::put_nar_location`] for a NAR fetched and verified while it
    /// was served, without an fsync: its blocks are durable already, and a
    /// record lost in a crash only means that NAR is fetched (or hashed
    /// whole) once more. redb has one writer, so an fsync here would hold up
    /// the next narinfo's record, which Nix is waiting for.
    pub fn note_fetched_nar_location(
        &self,
        nar_hash: &NarHash,
        location: &NarLocation,
    ) -> Result<(), IndexError> {
        self.write_nar_location(nar_hash, location, redb::Durability::None)
    }

    /// Makes every commit made without an fsync durable (one empty,
    /// durable commit), e.g. before the gateway exits.
    pub fn sync(&self) -> Result<(), IndexError> {
        self.db.begin_write()?.commit()?;
        Ok(())
    }

    fn write_nar_location(
        &self,
        nar_hash: &NarHash,
        location: &NarLocation,
        durability: redb::Durability,
    ) -> Result<(), IndexError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(durability);
        {
            let mut table = txn.open_table(NAR_LOCATIONS)?;
            let key = nar_hash.as_bytes().as_slice();
            let was_verified = match table.get(key)? {
                Some(v) => {
                    let old: NarLocation =
                        decode("nar_locations", &nar_hash.to_string(), v.value())?;
                    old.verified && old.cid == location.cid
                }
                None => false,
            };
            let mut merged = location.clone();
            merged.verified |= was_verified;
            table.insert(key, encode(&merged).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }
}

/// Who published a set: anchors and contributors share names' namespace only
/// within their kind, so the kind is part of the key; and a name under a new
/// key is a new publisher, so a stolen old key's state (say, a huge version)
/// never blocks the new key's chain.
pub fn set_owner(kind: SetKind, name: &str, key: &PublicKey) -> String {
    format!("{kind}:{name}:{key}")
}

/// The owner of the set `state` names.
fn state_owner(state: &TrustedState) -> String {
    let header = state.header().header();
    set_owner(header.kind, header.anchor.as_str(), &header.key)
}

/// Two signed headers of the same version with different digests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkEvidence {
    pub anchor: String,
    pub version: u64,
    pub trusted: SignedHeader,
    pub found: SignedHeader,
}

impl Index {
    /// Starts copying a set as it is read, so that once verified it can be
    /// stored without a second read (see [`Index::replace_set`]).
    pub fn tee_set<R: BufRead>(&self, reader: R) -> Result<SetTee<R>, IndexError> {
        self.sets.tee(reader)
    }

    /// Whether the set `state` names is the one stored for its publisher:
    /// then a sync of the same version has nothing to do.
    pub fn holds_set(&self, state: &TrustedState) -> bool {
        self.sets.holds(&state_owner(state), state)
    }

    /// Replaces everything `state`'s publisher said with a newly verified
    /// version: its files are made durable first, then the trusted state
    /// naming them is committed, then lookups switch to it. Readers see the
    /// old set or the new one, never a mix.
    /// If a concurrent sync already stored this version or a newer one, the
    /// staged copy is dropped and the trusted state is left alone.
    pub fn replace_set(&self, state: &TrustedState, staged: StagedSet) -> Result<(), IndexError> {
        let header = state.header().header();
        let owner = state_owner(state);
        let _one_at_a_time = lock(&self.replacing);
        if let Some(current) =
            self.trusted_state(header.kind, header.anchor.as_str(), &header.key)?
        {
            let newer = current.version() > state.version();
            let stored = current.version() == state.version() && self.holds_set(&current);
            if newer || stored {
                return Ok(());
            }
        }
        let stored = self.sets.install(state.clone(), staged)?;
        let txn = self.db.begin_write()?;
        txn.open_table(TRUSTED)?
            .insert(owner.as_str(), encode(state).as_slice())?;
        txn.commit()?;
        self.sets.switch(owner, stored);
        self.sets_generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// The newest version accepted from this publisher (name under key).
    pub fn trusted_state(
        &self,
        kind: SetKind,
        name: &str,
        key: &PublicKey,
    ) -> Result<Option<TrustedState>, IndexError> {
        let owner = set_owner(kind, name, key);
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TRUSTED)?;
        match table.get(owner.as_str())? {
            Some(v) => Ok(Some(decode("trusted_state", &owner, v.value())?)),
            None => Ok(None),
        }
    }

    /// Every publisher's trusted state.
    pub fn trusted_states(&self) -> Result<Vec<TrustedState>, IndexError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TRUSTED)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            out.push(decode("trusted_state", k.value(), v.value())?);
        }
        Ok(out)
    }

    /// What every publisher whose set has not expired at `now` says about
    /// the path with this hash, in publisher order.
    pub fn assertions(&self, hash: &StorePathHash, now: u64) -> Result<Vec<Assertion>, IndexError> {
        self.unexpired_assertions(now, |set| set.for_path(hash))
    }

    /// What every unexpired set at `now` maps to the NAR with this hash:
    /// where its bytes may be, with who said so.
    pub fn nar_assertions(
        &self,
        nar_hash: &NarHash,
        now: u64,
    ) -> Result<Vec<Assertion>, IndexError> {
        self.unexpired_assertions(now, |set| set.for_nar(nar_hash))
    }

    fn unexpired_assertions(
        &self,
        now: u64,
        find: impl Fn(&sets::StoredSet) -> Result<Option<Mapping>, IndexError>,
    ) -> Result<Vec<Assertion>, IndexError> {
        let mut out = Vec::new();
        for set in self.sets.all() {
            let header = set.state.header().header();
            if header.expires <= now {
                continue;
            }
            if let Some(mapping) = find(&set)? {
                out.push(Assertion {
                    kind: header.kind,
                    owner: header.anchor.clone(),
                    key: header.key.clone(),
                    mapping,
                });
            }
        }
        Ok(out)
    }

    /// The registry document last accepted (its text), the base for rotation checks.
    pub fn registry_text(&self) -> Result<Option<String>, IndexError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(META)?;
        Ok(table
            .get("registry")?
            .map(|v| String::from_utf8_lossy(v.value()).into_owned()))
    }

    /// Records a newly accepted registry document.
    pub fn put_registry_text(&self, text: &str) -> Result<(), IndexError> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?.insert("registry", text.as_bytes())?;
        txn.commit()?;
        Ok(())
    }

    /// Every stored set re-verified against its trusted digest (see
    /// `repo verify`): per publisher, its file and the entry count, or the
    /// first problem found. Slow: reads every set file whole.
    pub fn verify_sets(&self) -> Vec<StoredSetCheck> {
        self.sets
            .all()
            .iter()
            .map(|set| StoredSetCheck {
                owner: state_owner(&set.state),
                file: set.entries_path().to_path_buf(),
                result: set.verify_file(),
            })
            .collect()
    }

    /// Every mapping of the set `state` names, if it is the one stored, in
    /// hash-part order.
    pub fn owner_mappings(&self, state: &TrustedState) -> Result<Vec<Mapping>, IndexError> {
        match self.sets.get(&state_owner(state)) {
            Some(set) if set.state.digest() == state.digest() => set.mappings(),
            _ => Ok(Vec::new()),
        }
    }

    /// Removes every publisher's state and set that `keep` refuses (anchors
    /// the registry no longer lists under that name and key); returns them.
    pub fn purge_sets(
        &self,
        keep: impl Fn(&TrustedState) -> bool,
    ) -> Result<Vec<TrustedState>, IndexError> {
        let _one_at_a_time = lock(&self.replacing);
        let purged: Vec<TrustedState> = self
            .trusted_states()?
            .into_iter()
            .filter(|s| !keep(s))
            .collect();
        if purged.is_empty() {
            return Ok(purged);
        }
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(TRUSTED)?;
            for state in &purged {
                table.remove(state_owner(state).as_str())?;
            }
        }
        txn.commit()?;
        for state in &purged {
            self.sets.remove(&state_owner(state));
        }
        self.sets_generation.fetch_add(1, Ordering::AcqRel);
        Ok(purged)
    }

    /// Hash parts that more than one publisher has a mapping for: the only
    /// paths where anchors can disagree.
    pub fn multi_asserted_paths(&self) -> Result<Vec<StorePathHash>, IndexError> {
        self.sets.shared_paths()
    }

    /// Keeps both signed headers of an equivocating anchor, forever.
    pub fn record_fork(&self, evidence: &ForkEvidence) -> Result<(), IndexError> {
        let txn = self.db.begin_write()?;
        {
            let mut forks = txn.open_table(FORKS)?;
            let anchor = evidence.anchor.as_str();
            let mut duplicate = false;
            let mut next = 0;
            for entry in forks.range((anchor, 0)..=(anchor, u64::MAX))? {
                let (k, v) = entry?;
                let seen: ForkEvidence = decode("fork_evidence", anchor, v.value())?;
                duplicate |= seen == *evidence;
                next = k.value().1 + 1;
            }
            if !duplicate {
                forks.insert((anchor, next), encode(evidence).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// All fork evidence recorded.
    pub fn forks(&self) -> Result<Vec<ForkEvidence>, IndexError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(FORKS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            out.push(decode("fork_evidence", k.value().0, v.value())?);
        }
        Ok(out)
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising plain structs of strings and integers to JSON cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(
    table: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<T, IndexError> {
    serde_json::from_slice(bytes).map_err(|e| IndexError::Corrupt {
        table,
        key: key.to_owned(),
        message: e.to_string(),
    })
}
