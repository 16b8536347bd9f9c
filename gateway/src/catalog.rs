//! Answers the one question a binary cache is asked: "may I serve store path
//! P, and with which narinfo?". The user's own pins are always served; other
//! paths only when the anchor policy holds. Every narinfo served points at
//! `nar/<nix32 NarHash>.nar` and carries the gateway's own signature.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use anchor_registry::{Decision, NarInfo, Policy, Registry, SecretKey, StorePathHash};

use crate::index::{Index, IndexError};

/// What the catalog knows about a store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Servable: the narinfo to send, already rewritten and signed.
    Found(Box<NarInfo>),
    /// Unknown, or known but not trusted enough: Nix sees a 404.
    NotFound,
    /// Registry anchors disagree about this path: blocked, Nix sees a 404.
    Conflict,
}

/// Resolution of store paths to servable narinfos.
#[derive(Debug, Clone)]
pub struct Catalog {
    index: Arc<Index>,
    key: Arc<SecretKey>,
    trust: Arc<RwLock<Trust>>,
    own: Arc<Mutex<OwnCache>>,
}

/// Most narinfos a catalog keeps signed in memory (a few hundred bytes each).
const OWN_CACHE_ENTRIES: usize = 1 << 18;

/// The user's own paths as served, signed: signing and parsing are most of
/// a lookup's cost. Valid while the index's local generation is unchanged;
/// when full it starts over.
#[derive(Debug, Default)]
struct OwnCache {
    generation: u64,
    entries: HashMap<StorePathHash, Arc<NarInfo>>,
}

impl OwnCache {
    fn get(&mut self, generation: u64, hash: &StorePathHash) -> Option<Arc<NarInfo>> {
        if self.generation != generation {
            self.entries.clear();
            self.generation = generation;
        }
        self.entries.get(hash).cloned()
    }

    fn put(&mut self, generation: u64, hash: StorePathHash, info: Arc<NarInfo>) {
        if self.generation != generation {
            return;
        }
        if self.entries.len() >= OWN_CACHE_ENTRIES {
            self.entries.clear();
        }
        self.entries.insert(hash, info);
    }
}

/// The registry in force and the user's policy; replaced by each sync.
#[derive(Debug, Clone)]
pub struct Trust {
    pub registry: Option<Registry>,
    pub policy: Policy,
}

/// The URL under which the gateway serves a NAR: its Nix identity, stable
/// forever whatever the CID (Nix caches narinfos, URL included, for 30 days).
pub fn nar_url(narinfo: &NarInfo) -> String {
    format!("nar/{}.nar", narinfo.nar_hash.to_nix32())
}

impl Catalog {
    pub fn new(index: Arc<Index>, key: Arc<SecretKey>, trust: Trust) -> Self {
        Self {
            index,
            key,
            trust: Arc::new(RwLock::new(trust)),
            own: Arc::default(),
        }
    }

    /// Installs a newly verified registry (sync does this).
    pub fn set_registry(&self, registry: Registry) {
        if let Ok(mut trust) = self.trust.write() {
            trust.registry = Some(registry);
        }
    }

    /// A copy of the registry and policy in force.
    pub fn trust(&self) -> Option<Trust> {
        self.trust.read().ok().map(|t| t.clone())
    }

    /// The answer for one of the user's own paths if it is in memory: no
    /// I/O, so callers may skip moving the lookup to a blocking thread.
    pub fn cached(&self, hash: &StorePathHash) -> Option<Lookup> {
        let generation = self.index.local_generation();
        let info = self
            .own
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(generation, hash)?;
        Some(Lookup::Found(Box::new((*info).clone())))
    }

    /// The narinfo to serve for `hash`, if policy allows.
    pub fn lookup(&self, hash: &StorePathHash) -> Result<Lookup, IndexError> {
        let generation = self.index.local_generation();
        let lock = || self.own.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(info) = lock().get(generation, hash) {
            return Ok(Lookup::Found(Box::new((*info).clone())));
        }
        if let Some(local) = self.index.local(hash)? {
            let info = self.present(local.narinfo);
            lock().put(generation, *hash, Arc::new(info.clone()));
            return Ok(Lookup::Found(Box::new(info)));
        }
        match self.decide(hash)? {
            Some(Decision::Serve { mapping, agreeing }) => {
                let data = mapping.into_data();
                let narinfo = NarInfo {
                    store_path: data.path,
                    url: String::new(),
                    compression: None,
                    file_hash: None,
                    file_size: None,
                    nar_hash: data.nar_hash,
                    nar_size: data.nar_size,
                    references: data.references.into_iter().collect(),
                    deriver: data.deriver,
                    sigs: agreeing
                        .iter()
                        .map(|v| v.mapping.signature().clone())
                        .collect(),
                    ca: data.ca.map(|ca| ca.as_str().to_owned()),
                };
                Ok(Lookup::Found(Box::new(self.present(narinfo))))
            }
            Some(Decision::Conflict { .. }) => Ok(Lookup::Conflict),
            Some(Decision::NotEnough { .. }) | None => Ok(Lookup::NotFound),
        }
    }

    /// The policy's decision for `hash` from unexpired anchor sets; `None`
    /// when no registry is loaded or nobody said anything about the path.
    pub fn decide(&self, hash: &StorePathHash) -> Result<Option<Decision>, IndexError> {
        let assertions = self.index.assertions(hash, unix_now())?;
        let Some(path) = assertions.first().map(|a| a.mapping.path().clone()) else {
            return Ok(None);
        };
        let Ok(trust) = self.trust.read() else {
            return Ok(None);
        };
        let Some(registry) = &trust.registry else {
            return Ok(None);
        };
        Ok(Some(trust.policy.evaluate(registry, &path, &assertions)))
    }

    /// Rewrites a narinfo for serving: our URL, uncompressed, our signature
    /// added beside the ones it carries.
    fn present(&self, mut narinfo: NarInfo) -> NarInfo {
        narinfo.url = nar_url(&narinfo);
        narinfo.compression = Some("none".to_owned());
        narinfo.file_hash = None;
        narinfo.file_size = None;
        narinfo.sign(&self.key);
        narinfo
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::LocalPath;
    use anchor_registry::{NarHash, StorePath};

    fn local(sig_name: &str) -> LocalPath {
        let mut narinfo = NarInfo {
            store_path: StorePath::parse("/nix/store/0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-own")
                .unwrap(),
            url: "nar/x.nar".into(),
            compression: None,
            file_hash: None,
            file_size: None,
            nar_hash: NarHash::digest(b"nar"),
            nar_size: 3,
            references: Vec::new(),
            deriver: None,
            sigs: Vec::new(),
            ca: None,
        };
        narinfo.sign(&SecretKey::generate(sig_name).unwrap());
        LocalPath {
            narinfo,
            cid: "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy".into(),
        }
    }

    #[test]
    fn own_paths_are_served_from_memory_until_the_index_changes() {
        let dir = tempfile::tempdir().unwrap();
        let index = Arc::new(Index::open(&dir.path().join("index.redb")).unwrap());
        let catalog = Catalog::new(
            index.clone(),
            Arc::new(SecretKey::generate("gw-1").unwrap()),
            Trust {
                registry: None,
                policy: Policy::new(1, None).unwrap(),
            },
        );
        let first = local("uploader-1");
        let hash = *first.narinfo.store_path.hash();
        index.put_local(&first).unwrap();
        let found = |catalog: &Catalog| match catalog.lookup(&hash).unwrap() {
            Lookup::Found(info) => Some(info),
            _ => None,
        };
        let a = found(&catalog).unwrap();
        assert_eq!(found(&catalog).unwrap(), a, "cached answer is the same");
        assert!(a.sigs.iter().any(|s| s.name() == "uploader-1"));

        index.put_local(&local("uploader-2")).unwrap();
        let b = found(&catalog).unwrap();
        assert!(b.sigs.iter().any(|s| s.name() == "uploader-2"), "{b}");

        index.remove_local(&hash).unwrap();
        assert_eq!(catalog.lookup(&hash).unwrap(), Lookup::NotFound);
    }
}
