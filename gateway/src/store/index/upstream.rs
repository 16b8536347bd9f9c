//! What the index keeps for the upstream bridge: the narinfos upstream
//! caches sent (as sent, so their signatures can be checked again under the
//! keys configured at serve time), how to find one by its NarHash when Nix
//! asks for the NAR, and the pins made for the cache (`seed_fetched`,
//! `seed`) with their last access, which retention evicts first.
//!
//! Tables:
//! - `upstream_paths`: store-path hash → upstream URL and narinfo text;
//! - `upstream_nars`: NarHash → store-path hash of an upstream path;
//! - `cache_pins`: CID → NarHash, DAG size and last access (unix seconds).

use anchor_registry::{NarHash, NarInfo, StorePathHash};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{decode, encode, Index, IndexError};

const UPSTREAM_PATHS: TableDefinition<&str, &[u8]> = TableDefinition::new("upstream_paths");
const UPSTREAM_NARS: TableDefinition<&[u8], &str> = TableDefinition::new("upstream_nars");
const CACHE_PINS: TableDefinition<&str, &[u8]> = TableDefinition::new("cache_pins");

/// Creates this module's tables (at [`Index::open`]).
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), IndexError> {
    txn.open_table(UPSTREAM_PATHS)?;
    txn.open_table(UPSTREAM_NARS)?;
    txn.open_table(CACHE_PINS)?;
    Ok(())
}

/// A narinfo an upstream cache sent for a path, whose signature verified
/// under that upstream's keys when it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamPath {
    /// The upstream's base URL, as configured.
    pub upstream: String,
    /// The narinfo as the upstream sent it (its URL, compression, FileHash).
    pub narinfo: NarInfo,
}

#[derive(Serialize, Deserialize)]
struct UpstreamRecord {
    upstream: String,
    narinfo: String,
}

/// A pin made to seed what the gateway fetched or was asked to seed, not by
/// the user: retention may evict it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachePin {
    pub cid: String,
    /// The NAR the pin holds (its location is forgotten when evicted).
    pub nar_hash: String,
    /// Bytes of all blocks of the DAG.
    pub dag_size: u64,
    /// Unix seconds of the last time it was served or pinned.
    pub last_access: u64,
}

impl Index {
    /// Records a verified upstream narinfo for its path and NAR.
    pub fn put_upstream_path(&self, path: &UpstreamPath) -> Result<(), IndexError> {
        let record = UpstreamRecord {
            upstream: path.upstream.clone(),
            narinfo: path.narinfo.to_string(),
        };
        let hash = path.narinfo.store_path.hash().as_str();
        let mut txn = self.db.begin_write()?;
        // An upstream's narinfo lost in a crash is asked for again (of the
        // upstream or a peer, and checked again): no fsync on the narinfo
        // request's path for it. The next durable commit keeps it.
        txn.set_durability(redb::Durability::None);
        {
            txn.open_table(UPSTREAM_PATHS)?
                .insert(hash, encode(&record).as_slice())?;
            txn.open_table(UPSTREAM_NARS)?
                .insert(path.narinfo.nar_hash.as_bytes().as_slice(), hash)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// The upstream narinfo recorded for this path, if any.
    pub fn upstream_path(&self, hash: &StorePathHash) -> Result<Option<UpstreamPath>, IndexError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(UPSTREAM_PATHS)?;
        let Some(value) = table.get(hash.as_str())? else {
            return Ok(None);
        };
        let record: UpstreamRecord = decode("upstream_paths", hash.as_str(), value.value())?;
        let narinfo = NarInfo::parse(&record.narinfo).map_err(|e| IndexError::Corrupt {
            table: "upstream_paths",
            key: hash.to_string(),
            message: e.to_string(),
        })?;
        Ok(Some(UpstreamPath {
            upstream: record.upstream,
            narinfo,
        }))
    }

    /// The upstream narinfo of a path whose NAR has this hash, if any.
    pub fn upstream_nar(&self, nar_hash: &NarHash) -> Result<Option<UpstreamPath>, IndexError> {
        let hash = {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(UPSTREAM_NARS)?;
            let Some(value) = table.get(nar_hash.as_bytes().as_slice())? else {
                return Ok(None);
            };
            let text = value.value().to_owned();
            StorePathHash::parse(&text).map_err(|e| IndexError::Corrupt {
                table: "upstream_nars",
                key: nar_hash.to_string(),
                message: e.to_string(),
            })?
        };
        Ok(self
            .upstream_path(&hash)?
            .filter(|p| p.narinfo.nar_hash == *nar_hash))
    }

    /// Records (or refreshes the access time of) a pin retention may evict.
    pub fn put_cache_pin(&self, pin: &CachePin) -> Result<(), IndexError> {
        let txn = self.db.begin_write()?;
        txn.open_table(CACHE_PINS)?
            .insert(pin.cid.as_str(), encode(pin).as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Marks a cache pin as just used; false if `cid` is not one.
    pub fn touch_cache_pin(&self, cid: &str, now: u64) -> Result<bool, IndexError> {
        // Most NARs served are no cache pins: a read answers those without
        // a write transaction.
        if self
            .db
            .begin_read()?
            .open_table(CACHE_PINS)?
            .get(cid)?
            .is_none()
        {
            return Ok(false);
        }
        let mut txn = self.db.begin_write()?;
        // An access time lost in a crash only makes an eviction less exact:
        // no fsync for it.
        txn.set_durability(redb::Durability::None);
        let touched = {
            let mut table = txn.open_table(CACHE_PINS)?;
            let pin: Option<CachePin> = match table.get(cid)? {
                Some(v) => Some(decode("cache_pins", cid, v.value())?),
                None => None,
            };
            match pin {
                Some(mut pin) => {
                    pin.last_access = now;
                    table.insert(cid, encode(&pin).as_slice())?;
                    true
                }
                None => false,
            }
        };
        txn.commit()?;
        Ok(touched)
    }

    /// Every cache pin, least recently accessed first.
    pub fn cache_pins(&self) -> Result<Vec<CachePin>, IndexError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CACHE_PINS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            out.push(decode::<CachePin>("cache_pins", k.value(), v.value())?);
        }
        out.sort_by(|a, b| (a.last_access, &a.cid).cmp(&(b.last_access, &b.cid)));
        Ok(out)
    }

    /// Forgets a cache pin (evicted, or now the user's own pin) and, when
    /// `forget_location`, where its NAR was: the bytes are gone, so the NAR
    /// must be fetched again rather than looked for locally.
    pub fn remove_cache_pin(&self, cid: &str, forget_location: bool) -> Result<(), IndexError> {
        let txn = self.db.begin_write()?;
        {
            let mut pins = txn.open_table(CACHE_PINS)?;
            let pin: Option<CachePin> = match pins.get(cid)? {
                Some(v) => Some(decode("cache_pins", cid, v.value())?),
                None => None,
            };
            pins.remove(cid)?;
            if let (true, Some(pin)) = (forget_location, pin) {
                if let Ok(nar_hash) = NarHash::parse(&pin.nar_hash) {
                    let mut nars = txn.open_table(super::NAR_LOCATIONS)?;
                    let key = nar_hash.as_bytes().as_slice();
                    let same = match nars.get(key)? {
                        Some(v) => {
                            let old: super::NarLocation =
                                decode("nar_locations", &pin.nar_hash, v.value())?;
                            old.cid == pin.cid
                        }
                        None => false,
                    };
                    if same {
                        nars.remove(key)?;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anchor_registry::StorePath;

    fn narinfo(nar: &[u8]) -> NarInfo {
        NarInfo {
            store_path: StorePath::parse("/nix/store/0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-up").unwrap(),
            url: "nar/abc.nar.xz".into(),
            compression: Some("xz".into()),
            file_hash: None,
            file_size: None,
            nar_hash: NarHash::digest(nar),
            nar_size: nar.len() as u64,
            references: Vec::new(),
            deriver: None,
            sigs: Vec::new(),
            ca: None,
        }
    }

    #[test]
    fn upstream_paths_are_found_by_path_and_by_nar() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        let path = UpstreamPath {
            upstream: "http://127.0.0.1:1".into(),
            narinfo: narinfo(b"nar"),
        };
        index.put_upstream_path(&path).unwrap();
        let hash = *path.narinfo.store_path.hash();
        assert_eq!(index.upstream_path(&hash).unwrap(), Some(path.clone()));
        assert_eq!(
            index.upstream_nar(&path.narinfo.nar_hash).unwrap(),
            Some(path)
        );
        assert_eq!(
            index.upstream_nar(&NarHash::digest(b"other")).unwrap(),
            None
        );
    }

    #[test]
    fn records_made_without_fsync_survive_a_clean_close() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("index.redb");
        let path = UpstreamPath {
            upstream: "http://127.0.0.1:1".into(),
            narinfo: narinfo(b"nar"),
        };
        let nar_hash = path.narinfo.nar_hash;
        let location = super::super::NarLocation {
            cid: "bafy-fetched".into(),
            nar_size: 3,
            verified: true,
        };
        {
            let index = Index::open(&file).unwrap();
            index.put_upstream_path(&path).unwrap();
            index
                .note_fetched_nar_location(&nar_hash, &location)
                .unwrap();
            assert_eq!(
                index.nar_location(&nar_hash).unwrap(),
                Some(location.clone())
            );
        }
        let index = Index::open(&file).unwrap();
        assert_eq!(index.nar_location(&nar_hash).unwrap(), Some(location));
        assert_eq!(index.upstream_nar(&nar_hash).unwrap(), Some(path));
    }

    #[test]
    fn cache_pins_come_least_recently_used_first_and_eviction_forgets_the_location() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        let nar_hash = NarHash::digest(b"a");
        for (cid, at) in [("bafy-a", 10), ("bafy-b", 5)] {
            index
                .put_cache_pin(&CachePin {
                    cid: cid.into(),
                    nar_hash: nar_hash.to_string(),
                    dag_size: 1,
                    last_access: at,
                })
                .unwrap();
        }
        let order = |index: &Index| -> Vec<String> {
            index
                .cache_pins()
                .unwrap()
                .into_iter()
                .map(|p| p.cid)
                .collect()
        };
        assert_eq!(order(&index), ["bafy-b", "bafy-a"]);
        assert!(index.touch_cache_pin("bafy-b", 20).unwrap());
        assert!(!index.touch_cache_pin("bafy-z", 20).unwrap());
        assert_eq!(order(&index), ["bafy-a", "bafy-b"]);

        let location = super::super::NarLocation {
            cid: "bafy-a".into(),
            nar_size: 1,
            verified: true,
        };
        index.put_nar_location(&nar_hash, &location).unwrap();
        index.remove_cache_pin("bafy-a", true).unwrap();
        assert_eq!(order(&index), ["bafy-b"]);
        assert_eq!(index.nar_location(&nar_hash).unwrap(), None);
    }
}
