//! The persistent local index (redb): which store paths this gateway knows,
//! what their NARs are, and where the bytes live on IPFS. One transaction per
//! change, so a crash leaves either the old or the new state, never half.
//!
//! Tables:
//! - `local_paths`: store-path hash → the user's own pinned paths (narinfo + CID);
//! - `nar_locations`: NarHash → CID, size and whether the bytes were verified;
//! - `anchor_mappings`, `trusted_state`: what registry anchors signed (see `sync`).

use std::path::Path;

use anchor_registry::{NarHash, NarInfo, StorePathHash};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const LOCAL_PATHS: TableDefinition<&str, &[u8]> = TableDefinition::new("local_paths");
const NAR_LOCATIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("nar_locations");

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
    /// The whole NAR was hashed against NarHash and its blocks are local:
    /// it may be served without re-hashing.
    pub verified: bool,
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
}

/// The index handle; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Index {
    db: Database,
}

impl Index {
    /// Opens (or creates) the index file and its tables.
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        let db = Database::create(path).map_err(|source| IndexError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let txn = db.begin_write()?;
        txn.open_table(LOCAL_PATHS)?;
        txn.open_table(NAR_LOCATIONS)?;
        txn.commit()?;
        Ok(Self { db })
    }

    /// Records a path the user pinned. Call only once its blocks are durable
    /// and pinned: from then on the gateway serves it.
    pub fn put_local(&self, path: &LocalPath) -> Result<(), IndexError> {
        let record = LocalRecord {
            narinfo: path.narinfo.to_string(),
            cid: path.cid.clone(),
        };
        let location = NarLocation {
            cid: path.cid.clone(),
            nar_size: path.narinfo.nar_size,
            verified: true,
        };
        let txn = self.db.begin_write()?;
        {
            let mut local = txn.open_table(LOCAL_PATHS)?;
            local.insert(
                path.narinfo.store_path.hash().as_str(),
                encode(&record).as_slice(),
            )?;
            let mut nars = txn.open_table(NAR_LOCATIONS)?;
            nars.insert(
                path.narinfo.nar_hash.as_bytes().as_slice(),
                encode(&location).as_slice(),
            )?;
        }
        txn.commit()?;
        Ok(())
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
        }
        Ok(existing)
    }

    /// Where the NAR with this hash lives, if known.
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
        let txn = self.db.begin_write()?;
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
