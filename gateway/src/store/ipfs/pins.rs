//! Recursive pins, persisted in a redb database (`<data_dir>/pins.redb`) so
//! they survive restarts. A pin is only recorded after its blocks were made
//! durable (see [`super::blockstore::WriteBatch::commit`]); garbage
//! collection keeps every block reachable from a pin.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cid::Cid;
use redb::{ReadableTable, TableDefinition};

use super::IpfsError;
use crate::store::db::Db;

/// CID bytes → (file size, total block bytes of the DAG).
const PINS: TableDefinition<&[u8], (u64, u64)> = TableDefinition::new("pins");

/// One recursive pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    pub cid: Cid,
    /// Bytes of the file the DAG encodes.
    pub size: u64,
    /// Bytes of all blocks of the DAG (what the pin keeps on disk).
    pub dag_size: u64,
}

/// The pin set; cheap to clone. redb locks the file, so only one process
/// can own a data directory at a time.
#[derive(Clone)]
pub struct Pins {
    db: Arc<Db>,
    path: PathBuf,
}

impl std::fmt::Debug for Pins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pins").field("path", &self.path).finish()
    }
}

/// The pin database's page cache: pins and store-block maps are read per
/// pin or per block range, not per request, so a small cache serves them.
const CACHE_BYTES: usize = 32 << 20;

impl Pins {
    /// Opens or creates the database at `path`.
    pub fn open(path: &Path) -> Result<Self, IpfsError> {
        let err = |e: redb::Error| IpfsError::PinDb {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let db = Db::create(path, CACHE_BYTES).map_err(|e| err(e.into()))?;
        let tx = db.begin_write().map_err(|e| err(e.into()))?;
        tx.open_table(PINS).map_err(|e| err(e.into()))?;
        tx.commit().map_err(|e| err(e.into()))?;
        Ok(Pins {
            db: Arc::new(db),
            path: path.to_path_buf(),
        })
    }

    /// The database, which also holds the store-path backings of pinned
    /// NARs (see [`super::storeblocks`]).
    pub fn database(&self) -> Arc<Db> {
        self.db.clone()
    }

    fn err(&self) -> impl Fn(redb::Error) -> IpfsError + '_ {
        move |e| IpfsError::PinDb {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Records (or updates) a pin, durably.
    pub fn insert(&self, pin: &Pin) -> Result<(), IpfsError> {
        let err = self.err();
        let tx = self.db.begin_write().map_err(|e| err(e.into()))?;
        {
            let mut t = tx.open_table(PINS).map_err(|e| err(e.into()))?;
            t.insert(pin.cid.to_bytes().as_slice(), (pin.size, pin.dag_size))
                .map_err(|e| err(e.into()))?;
        }
        tx.commit().map_err(|e| err(e.into()))
    }

    /// Removes a pin; `false` if it was not pinned.
    pub fn remove(&self, cid: &Cid) -> Result<bool, IpfsError> {
        let err = self.err();
        let tx = self.db.begin_write().map_err(|e| err(e.into()))?;
        let existed = {
            let mut t = tx.open_table(PINS).map_err(|e| err(e.into()))?;
            let removed = t
                .remove(cid.to_bytes().as_slice())
                .map_err(|e| err(e.into()))?;
            removed.is_some()
        };
        tx.commit().map_err(|e| err(e.into()))?;
        Ok(existed)
    }

    /// The pin for `cid`, if any.
    pub fn get(&self, cid: &Cid) -> Result<Option<Pin>, IpfsError> {
        let err = self.err();
        let tx = self.db.begin_read().map_err(|e| err(e.into()))?;
        let t = tx.open_table(PINS).map_err(|e| err(e.into()))?;
        let v = t
            .get(cid.to_bytes().as_slice())
            .map_err(|e| err(e.into()))?;
        Ok(v.map(|v| {
            let (size, dag_size) = v.value();
            Pin {
                cid: *cid,
                size,
                dag_size,
            }
        }))
    }

    /// Every pin, ordered by CID bytes. Unparseable keys are skipped.
    pub fn list(&self) -> Result<Vec<Pin>, IpfsError> {
        let err = self.err();
        let tx = self.db.begin_read().map_err(|e| err(e.into()))?;
        let t = tx.open_table(PINS).map_err(|e| err(e.into()))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| err(e.into()))? {
            let (k, v) = item.map_err(|e| err(e.into()))?;
            let Ok(cid) = Cid::try_from(k.value()) else {
                tracing::warn!(path = %self.path.display(), "skipping a pin with an unreadable CID");
                continue;
            };
            let (size, dag_size) = v.value();
            out.push(Pin {
                cid,
                size,
                dag_size,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ipfs::block::{Block, RAW};
    use bytes::Bytes;

    fn cid(s: &'static [u8]) -> Cid {
        *Block::from_data(RAW, Bytes::from_static(s)).cid()
    }

    #[test]
    fn pins_survive_reopening_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pins.redb");
        let a = Pin {
            cid: cid(b"a"),
            size: 1,
            dag_size: 1,
        };
        let b = Pin {
            cid: cid(b"b"),
            size: 2,
            dag_size: 3,
        };
        {
            let pins = Pins::open(&path).unwrap();
            pins.insert(&a).unwrap();
            pins.insert(&b).unwrap();
            assert!(pins.remove(&a.cid).unwrap());
            assert!(!pins.remove(&a.cid).unwrap());
        }
        let pins = Pins::open(&path).unwrap();
        assert_eq!(pins.list().unwrap(), vec![b]);
        assert_eq!(pins.get(&b.cid).unwrap(), Some(b));
        assert_eq!(pins.get(&a.cid).unwrap(), None);
    }

    #[test]
    fn second_open_of_the_same_database_fails_while_the_first_is_alive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pins.redb");
        let _first = Pins::open(&path).unwrap();
        assert!(matches!(Pins::open(&path), Err(IpfsError::PinDb { .. })));
    }
}
