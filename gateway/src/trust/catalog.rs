//! Answers the one question a binary cache is asked: "may I serve store path
//! P, and with which narinfo?". The user's own pins are always served; other
//! paths only when the anchor policy holds. Every narinfo served points at
//! `nar/<nix32 NarHash>.nar` and carries the gateway's own signature.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anchor_registry::{
    Decision, Mapping, NarHash, NarInfo, Policy, Registry, SecretKey, StorePathHash,
};
use bytes::Bytes;

use crate::store::index::{Index, IndexError, LocalPath, NarLocation};
use crate::util::sync::lock;

/// What the catalog knows about a store path; `T` is the narinfo to send,
/// parsed or as the text the endpoint sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<T = Box<NarInfo>> {
    /// Servable: the narinfo to send, already rewritten and signed.
    Found(T),
    /// Unknown, or known but not trusted enough: Nix sees a 404.
    NotFound,
    /// Registry anchors disagree about this path: blocked, Nix sees a 404.
    Conflict,
    /// Anchors vouched for this path, but the registry that names them
    /// expired at this time (unix seconds): it counts for nothing until a
    /// fresh one is synced. Nix sees a 404.
    RegistryExpired { expired_at: u64 },
}

/// Resolution of store paths to servable narinfos.
#[derive(Debug, Clone)]
pub struct Catalog {
    index: Arc<Index>,
    key: Arc<SecretKey>,
    /// `key`'s public half as written in narinfos and index records.
    public: Arc<str>,
    trust: Arc<RwLock<Trust>>,
    own: Arc<Mutex<TextCache>>,
    /// Upstream-signed narinfos as sent, for paths no anchor set speaks
    /// of: such an answer depends only on the upstream's record and keys,
    /// so it holds until own paths, sets or the registry change.
    upstream: Arc<Mutex<TextCache>>,
    /// Bumped by every registry swap (the upstream cache's generation).
    registry_generation: Arc<AtomicU64>,
    /// CIDs whose bytes did not match the NarHash they were mapped to: tried
    /// last from then on.
    refuted: Arc<Mutex<HashSet<(NarHash, String)>>>,
}

/// Most refuted CIDs remembered; when full it starts over.
const REFUTED_ENTRIES: usize = 1 << 16;

/// Most narinfos a catalog keeps signed in memory (a few hundred bytes each).
const OWN_CACHE_ENTRIES: usize = 1 << 18;

/// Narinfos as sent: the endpoint answers a hit with a reference-counted
/// copy of these bytes. Valid while the generation it was filled under is
/// unchanged; when full it starts over.
#[derive(Debug, Default)]
struct TextCache {
    generation: u64,
    entries: HashMap<StorePathHash, Bytes>,
}

impl TextCache {
    fn get(&mut self, generation: u64, hash: &StorePathHash) -> Option<Bytes> {
        if self.generation != generation {
            self.entries.clear();
            self.generation = generation;
        }
        self.entries.get(hash).cloned()
    }

    fn put(&mut self, generation: u64, hash: StorePathHash, info: Bytes) {
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
            public: key.public().to_string().into(),
            key,
            trust: Arc::new(RwLock::new(trust)),
            own: Arc::default(),
            upstream: Arc::default(),
            registry_generation: Arc::default(),
            refuted: Arc::default(),
        }
    }

    /// The index this catalog answers from.
    pub fn index(&self) -> &Arc<Index> {
        &self.index
    }

    /// The gateway's own narinfo key, public half.
    pub fn public_key(&self) -> anchor_registry::PublicKey {
        self.key.public()
    }

    /// Installs a newly verified registry (sync does this).
    pub fn set_registry(&self, registry: Registry) {
        if let Ok(mut trust) = self.trust.write() {
            trust.registry = Some(registry);
        }
        self.registry_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// A copy of the registry and policy in force.
    pub fn trust(&self) -> Option<Trust> {
        self.trust.read().ok().map(|t| t.clone())
    }

    /// Records the user's own paths in served form (our URL, uncompressed,
    /// our signature), one transaction: serving them then costs one index
    /// read, no parsing and no signing.
    pub fn put_locals(&self, paths: Vec<LocalPath>) -> Result<(), IndexError> {
        let served: Vec<LocalPath> = paths
            .into_iter()
            .map(|path| LocalPath {
                narinfo: self.present(path.narinfo),
                cid: path.cid,
            })
            .collect();
        self.index.put_locals(&served, Some(&self.public))
    }

    /// The narinfo text for one of the user's own paths if it is in memory:
    /// no I/O, so callers may skip moving the lookup to a blocking thread.
    pub fn cached(&self, hash: &StorePathHash) -> Option<Bytes> {
        let generation = self.index.local_generation();
        self.lock_own().get(generation, hash)
    }

    /// The narinfo text for an upstream-signed path if it is in memory (see
    /// [`Catalog::serve_upstream`]): no I/O, no signature checked or made.
    pub fn cached_upstream(&self, hash: &StorePathHash) -> Option<Bytes> {
        let generation = self.upstream_generation();
        lock(&self.upstream).get(generation, hash)
    }

    /// Changes whenever an answer about an upstream-signed path may: the
    /// sum of counters that only grow (own paths shadow upstream ones;
    /// sets and the registry decide what anchors say).
    fn upstream_generation(&self) -> u64 {
        self.index.local_generation()
            + self.index.sets_generation()
            + self.registry_generation.load(Ordering::Acquire)
    }

    /// The narinfo to serve for `hash`, if policy allows, parsed.
    pub fn lookup(&self, hash: &StorePathHash) -> Result<Lookup, IndexError> {
        Ok(match self.lookup_text(hash)? {
            Lookup::Found(text) => {
                let parsed = std::str::from_utf8(&text)
                    .ok()
                    .and_then(|t| NarInfo::parse(t).ok());
                match parsed {
                    Some(info) => Lookup::Found(Box::new(info)),
                    None => return Err(corrupt_own(hash, "not a narinfo")),
                }
            }
            Lookup::NotFound => Lookup::NotFound,
            Lookup::Conflict => Lookup::Conflict,
            Lookup::RegistryExpired { expired_at } => Lookup::RegistryExpired { expired_at },
        })
    }

    /// The narinfo text to serve for `hash`, if policy allows. The user's
    /// own paths come from memory or as stored; others from policy.
    pub fn lookup_text(&self, hash: &StorePathHash) -> Result<Lookup<Bytes>, IndexError> {
        let generation = self.index.local_generation();
        if let Some(text) = self.lock_own().get(generation, hash) {
            return Ok(Lookup::Found(text));
        }
        if let Some(stored) = self.index.local_narinfo(hash)? {
            let text = if stored.served_by.as_deref() == Some(&*self.public) {
                Bytes::from(stored.text)
            } else {
                let info =
                    NarInfo::parse(&stored.text).map_err(|e| corrupt_own(hash, &e.to_string()))?;
                Bytes::from(self.present(info).to_string())
            };
            self.lock_own().put(generation, *hash, text.clone());
            return Ok(Lookup::Found(text));
        }
        let now = crate::util::time::unix_now();
        if let Some(expired_at) = self.registry_expired(now) {
            let vouched = !self.index.assertions(hash, now)?.is_empty();
            return Ok(if vouched {
                Lookup::RegistryExpired { expired_at }
            } else {
                Lookup::NotFound
            });
        }
        match self.decide_unexpired(hash, now)? {
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
                Ok(Lookup::Found(Bytes::from(
                    self.present(narinfo).to_string(),
                )))
            }
            Some(Decision::Conflict { .. }) => Ok(Lookup::Conflict),
            Some(Decision::NotEnough { .. }) | None => Ok(Lookup::NotFound),
        }
    }

    /// The narinfo to serve for a path an upstream cache vouches for, if the
    /// policy holds. The upstream counts as one distinct key (`upstream_keys`,
    /// the keys whose `sigs` verified) beside the registry anchors that agree
    /// on the same fingerprint: with `require = 1` it suffices, with
    /// `require = k` it needs k − 1 agreeing anchors. An anchor that signed
    /// another fingerprint, or a conflict among anchors, blocks the path.
    pub fn serve_upstream(
        &self,
        upstream: &crate::store::index::UpstreamPath,
        sigs: Vec<anchor_registry::Signature>,
        upstream_keys: &[anchor_registry::PublicKey],
    ) -> Result<Lookup<Bytes>, IndexError> {
        if sigs.is_empty() || upstream_keys.is_empty() {
            return Ok(Lookup::NotFound);
        }
        // Read before deciding: an answer cached under it is dropped if
        // anything changed meanwhile.
        let generation = self.upstream_generation();
        let hash = upstream.narinfo.store_path.hash();
        let now = crate::util::time::unix_now();
        let decision = if self.registry_expired(now).is_some() {
            None
        } else {
            self.decide_unexpired(hash, now)?
        };
        let agreeing = match decision {
            Some(Decision::Conflict { .. }) => return Ok(Lookup::Conflict),
            Some(Decision::Serve { agreeing, .. } | Decision::NotEnough { agreeing, .. }) => {
                agreeing
            }
            None => Vec::new(),
        };
        let fingerprint = upstream.narinfo.fingerprint();
        if agreeing
            .iter()
            .any(|v| v.mapping.fingerprint() != fingerprint)
        {
            return Ok(Lookup::Conflict);
        }
        let upstream_is_new = !agreeing.iter().any(|v| upstream_keys.contains(&v.key));
        let votes = agreeing.len() as u64 + u64::from(upstream_is_new);
        let require = self
            .trust
            .read()
            .map(|t| t.policy.require())
            .unwrap_or(u64::MAX);
        if votes < require {
            return Ok(Lookup::NotFound);
        }
        let mut narinfo = upstream.narinfo.clone();
        narinfo.sigs = sigs;
        for vouch in &agreeing {
            let sig = vouch.mapping.signature();
            if !narinfo.sigs.iter().any(|s| s.name() == sig.name()) {
                narinfo.sigs.push(sig.clone());
            }
        }
        let text = Bytes::from(self.present(narinfo).to_string());
        // With no anchor agreeing, time cannot change this answer (a set
        // that expires or a registry that lapses only removes votes it
        // never had), so it stays good until the generation moves.
        if agreeing.is_empty() {
            lock(&self.upstream).put(generation, *hash, text.clone());
        }
        Ok(Lookup::Found(text))
    }

    fn lock_own(&self) -> std::sync::MutexGuard<'_, TextCache> {
        lock(&self.own)
    }

    /// When the registry in force expired, if it has by `now`: from then on
    /// it counts for nothing, and no set counts past it.
    pub fn registry_expired(&self, now: u64) -> Option<u64> {
        let trust = self.trust.read().ok()?;
        let expires = trust.registry.as_ref()?.expires();
        (now >= expires).then_some(expires)
    }

    /// The policy's decision for `hash` from unexpired anchor sets; `None`
    /// when no registry is loaded, it expired, or nobody said anything
    /// about the path.
    pub fn decide(&self, hash: &StorePathHash) -> Result<Option<Decision>, IndexError> {
        let now = crate::util::time::unix_now();
        if self.registry_expired(now).is_some() {
            return Ok(None);
        }
        self.decide_unexpired(hash, now)
    }

    /// [`Catalog::decide`] once the caller checked the registry's expiry.
    fn decide_unexpired(
        &self,
        hash: &StorePathHash,
        now: u64,
    ) -> Result<Option<Decision>, IndexError> {
        let assertions = self.index.assertions(hash, now)?;
        if assertions.is_empty() {
            return Ok(None);
        }
        let Ok(trust) = self.trust.read() else {
            return Ok(None);
        };
        let Some(registry) = &trust.registry else {
            return Ok(None);
        };
        Ok(Some(trust.policy.evaluate(registry, hash, &assertions)))
    }

    /// Where the bytes of the NAR with this hash may be, best first: the
    /// recorded location (own pins, uploads, NARs once verified); then the
    /// CIDs of the vouches that make a path with this NAR servable; then what
    /// any other unexpired set maps it to. A CID only locates bytes, which
    /// are checked against NarHash before they are served, so no set can
    /// hide a NAR by mapping it to a CID nobody has: the next one is tried.
    /// CIDs refuted by their bytes come last.
    pub fn nar_locations(&self, nar_hash: &NarHash) -> Result<Vec<NarLocation>, IndexError> {
        let now = crate::util::time::unix_now();
        let assertions = self.index.nar_assertions(nar_hash, now)?;
        let mut vouched = Vec::new();
        if self.registry_expired(now).is_none() {
            let mut hashes: Vec<StorePathHash> = assertions
                .iter()
                .map(|a| *a.mapping.path().hash())
                .collect();
            hashes.sort_unstable();
            hashes.dedup();
            for hash in hashes {
                if let Some(Decision::Serve { agreeing, .. }) = self.decide_unexpired(&hash, now)? {
                    vouched.extend(
                        agreeing
                            .into_iter()
                            .filter(|v| v.mapping.nar_hash() == nar_hash)
                            .map(|v| located(&v.mapping)),
                    );
                }
            }
        }
        let mut out: Vec<NarLocation> = Vec::new();
        let candidates = self
            .index
            .nar_location(nar_hash)?
            .into_iter()
            .chain(vouched)
            .chain(assertions.iter().map(|a| located(&a.mapping)));
        for location in candidates {
            if !out.iter().any(|o| o.cid == location.cid) {
                out.push(location);
            }
        }
        let refuted = self.lock_refuted();
        out.sort_by_key(|l| refuted.contains(&(*nar_hash, l.cid.clone())));
        Ok(out)
    }

    /// Records that `cid`'s bytes are not the NAR `nar_hash` names.
    pub fn refute(&self, nar_hash: &NarHash, cid: &str) {
        let mut refuted = self.lock_refuted();
        if refuted.len() >= REFUTED_ENTRIES {
            refuted.clear();
        }
        refuted.insert((*nar_hash, cid.to_owned()));
    }

    /// Puts the CIDs refuted for this NAR last, keeping the order otherwise.
    pub fn refuted_last(&self, nar_hash: &NarHash, locations: &mut [NarLocation]) {
        let refuted = self.lock_refuted();
        locations.sort_by_key(|l| refuted.contains(&(*nar_hash, l.cid.clone())));
    }

    fn lock_refuted(&self) -> std::sync::MutexGuard<'_, HashSet<(NarHash, String)>> {
        lock(&self.refuted)
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

/// Where a mapping says its NAR's bytes are; unverified until hashed here.
fn located(mapping: &Mapping) -> NarLocation {
    let data = mapping.data();
    NarLocation {
        cid: data.cid.to_string(),
        nar_size: data.nar_size,
        verified: false,
    }
}

fn corrupt_own(hash: &StorePathHash, message: &str) -> IndexError {
    IndexError::Corrupt {
        table: "local_paths",
        key: hash.to_string(),
        message: message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        index.put_locals(&[first], None).unwrap();
        let found = |catalog: &Catalog| match catalog.lookup(&hash).unwrap() {
            Lookup::Found(info) => Some(info),
            _ => None,
        };
        let a = found(&catalog).unwrap();
        assert_eq!(found(&catalog).unwrap(), a, "cached answer is the same");
        assert!(a.sigs.iter().any(|s| s.name() == "uploader-1"));

        index.put_locals(&[local("uploader-2")], None).unwrap();
        let b = found(&catalog).unwrap();
        assert!(b.sigs.iter().any(|s| s.name() == "uploader-2"), "{b}");

        index.remove_local(&hash).unwrap();
        assert_eq!(catalog.lookup(&hash).unwrap(), Lookup::NotFound);
    }

    fn catalog(index: &Arc<Index>, key: &Arc<SecretKey>) -> Catalog {
        Catalog::new(
            index.clone(),
            key.clone(),
            Trust {
                registry: None,
                policy: Policy::new(1, None).unwrap(),
            },
        )
    }

    #[test]
    fn an_expired_registry_counts_for_nothing_but_own_paths_are_still_served() {
        use anchor_registry::testing::{self, FAR_FUTURE};
        use anchor_registry::{AnchorName, MappingSetBuilder, SetKind};
        let dir = tempfile::tempdir().unwrap();
        let index = Arc::new(Index::open(&dir.path().join("index.redb")).unwrap());
        let key = Arc::new(SecretKey::generate("gw-1").unwrap());
        let alpha = testing::key("alpha-1");
        let anchors = || [testing::anchor(&alpha, "alpha", &["/srv/alpha.jsonl"])];
        let live = testing::one_root_registry(anchors(), FAR_FUTURE);
        let path =
            StorePath::parse("/nix/store/1bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-anchored").unwrap();
        let mut builder =
            MappingSetBuilder::first(SetKind::Anchor, AnchorName::parse("alpha").unwrap());
        builder.insert(testing::mapping(&alpha, path.clone(), b"nar"));
        let mut set = Vec::new();
        builder.write(&alpha, 1, FAR_FUTURE, &mut set).unwrap();
        crate::trust::sync::verify_and_index(&index, &live, SetKind::Anchor, "alpha", &set[..])
            .unwrap();
        let catalog = catalog(&index, &key);
        catalog.set_registry(live);
        assert!(matches!(
            catalog.lookup(path.hash()).unwrap(),
            Lookup::Found(_)
        ));

        catalog.set_registry(testing::one_root_registry(anchors(), 1));
        assert_eq!(
            catalog.lookup(path.hash()).unwrap(),
            Lookup::RegistryExpired { expired_at: 1 }
        );
        assert_eq!(
            catalog.decide(path.hash()).unwrap(),
            None,
            "no conflict, no vote"
        );
        let unknown = StorePath::parse("/nix/store/2ccccccccccccccccccccccccccccccc-x").unwrap();
        assert_eq!(catalog.lookup(unknown.hash()).unwrap(), Lookup::NotFound);

        let own = local("uploader-1");
        let own_hash = *own.narinfo.store_path.hash();
        catalog.put_locals(vec![own]).unwrap();
        assert!(matches!(
            catalog.lookup(&own_hash).unwrap(),
            Lookup::Found(_)
        ));
    }

    #[test]
    fn paths_stored_in_served_form_are_sent_as_stored_and_re_signed_after_a_key_change() {
        let dir = tempfile::tempdir().unwrap();
        let index = Arc::new(Index::open(&dir.path().join("index.redb")).unwrap());
        let key = Arc::new(SecretKey::generate("gw-1").unwrap());
        let path = local("uploader-1");
        let hash = *path.narinfo.store_path.hash();
        catalog(&index, &key).put_locals(vec![path]).unwrap();

        let stored = index.local_narinfo(&hash).unwrap().unwrap();
        assert_eq!(stored.served_by, Some(key.public().to_string()));
        let served = NarInfo::parse(&stored.text).unwrap();
        assert_eq!(served.url, nar_url(&served));
        assert_eq!(served.compression.as_deref(), Some("none"));
        assert!(served.verify(&key.public()), "stored with our signature");
        let fresh = catalog(&index, &key);
        assert_eq!(
            fresh.lookup_text(&hash).unwrap(),
            Lookup::Found(Bytes::from(stored.text.clone())),
            "sent byte for byte as stored"
        );
        assert_eq!(fresh.cached(&hash), Some(Bytes::from(stored.text)));

        let rotated = SecretKey::generate("gw-1").unwrap();
        let Lookup::Found(info) = catalog(&index, &Arc::new(rotated.clone()))
            .lookup(&hash)
            .unwrap()
        else {
            panic!("own path not served");
        };
        assert!(
            info.verify(&rotated.public()),
            "re-signed with the key in use"
        );
        assert!(
            !info.verify(&key.public()),
            "the old key's signature replaced"
        );
        assert!(info.sigs.iter().any(|s| s.name() == "uploader-1"));
    }

    /// A fresh index and a registry of two anchors, `alpha` and `beta`.
    struct TwoAnchors {
        _dir: tempfile::TempDir,
        index: Arc<Index>,
        alpha: SecretKey,
        beta: SecretKey,
        registry: Registry,
    }

    fn two_anchors() -> TwoAnchors {
        use anchor_registry::testing::{self, FAR_FUTURE};
        let dir = tempfile::tempdir().unwrap();
        let index = Arc::new(Index::open(&dir.path().join("index.redb")).unwrap());
        let (alpha, beta) = (testing::key("alpha-1"), testing::key("beta-1"));
        let registry = testing::one_root_registry(
            [
                testing::anchor(&alpha, "alpha", &["/srv/alpha.jsonl"]),
                testing::anchor(&beta, "beta", &["/srv/beta.jsonl"]),
            ],
            FAR_FUTURE,
        );
        TwoAnchors {
            _dir: dir,
            index,
            alpha,
            beta,
            registry,
        }
    }

    /// `signer`'s one-entry set of `kind` under `name`, indexed.
    fn index_set(
        index: &Index,
        registry: &Registry,
        kind: anchor_registry::SetKind,
        signer: &SecretKey,
        name: &str,
        mapping: anchor_registry::Mapping,
    ) {
        use anchor_registry::{AnchorName, MappingSetBuilder};
        let mut builder = MappingSetBuilder::first(kind, AnchorName::parse(name).unwrap());
        builder.insert(mapping);
        let mut set = Vec::new();
        builder
            .write(signer, 1, anchor_registry::testing::FAR_FUTURE, &mut set)
            .unwrap();
        crate::trust::sync::verify_and_index(index, registry, kind, name, &set[..]).unwrap();
    }

    /// `signer`'s mapping of `path` to the NAR `b"nar"`, located at a CID
    /// made from `seed`.
    fn located_at(signer: &SecretKey, path: &StorePath, seed: &[u8]) -> anchor_registry::Mapping {
        let mut data = anchor_registry::testing::mapping(signer, path.clone(), b"nar").into_data();
        let digest = anchor_registry::Sha256Hash::digest(seed);
        let hash = cid::multihash::Multihash::<64>::wrap(0x12, digest.as_bytes()).unwrap();
        data.cid =
            anchor_registry::ContentId::parse(&cid::Cid::new_v1(0x55, hash).to_string()).unwrap();
        data.sign(signer)
    }

    #[test]
    fn nar_locations_try_counted_vouches_first_and_refuted_cids_last() {
        use anchor_registry::SetKind;
        let TwoAnchors {
            _dir,
            index,
            alpha,
            beta,
            registry,
        } = two_anchors();
        let mallory = anchor_registry::testing::key("mallory-1");
        let path = StorePath::parse("/nix/store/1bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-pkg").unwrap();
        let bogus = located_at(&alpha, &path, b"a CID nobody has");
        let good = located_at(&beta, &path, b"the real DAG");
        let claimed = located_at(&mallory, &path, b"a claimant's DAG");
        index_set(
            &index,
            &registry,
            SetKind::Anchor,
            &alpha,
            "alpha",
            bogus.clone(),
        );
        index_set(
            &index,
            &registry,
            SetKind::Anchor,
            &beta,
            "beta",
            good.clone(),
        );
        index_set(
            &index,
            &registry,
            SetKind::Claims,
            &mallory,
            "mallory",
            claimed.clone(),
        );
        let catalog = catalog(&index, &Arc::new(SecretKey::generate("gw-1").unwrap()));
        catalog.set_registry(registry);
        let nar_hash = *good.nar_hash();
        let cids = |catalog: &Catalog| -> Vec<String> {
            catalog
                .nar_locations(&nar_hash)
                .unwrap()
                .into_iter()
                .map(|l| l.cid)
                .collect()
        };
        let cid = |m: &anchor_registry::Mapping| m.data().cid.to_string();
        assert_eq!(cids(&catalog), [cid(&bogus), cid(&good), cid(&claimed)]);

        catalog.refute(&nar_hash, &cid(&bogus));
        assert_eq!(cids(&catalog), [cid(&good), cid(&claimed), cid(&bogus)]);

        let recorded = NarLocation {
            cid: "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy".into(),
            nar_size: 3,
            verified: true,
        };
        index.put_nar_location(&nar_hash, &recorded).unwrap();
        assert_eq!(cids(&catalog)[0], recorded.cid, "a verified location first");
    }

    /// An upstream-signed answer is served from memory until a set, the
    /// registry or an own path could change it; never past such a change.
    #[test]
    fn upstream_answers_are_remembered_until_sets_registry_or_own_paths_change() {
        use anchor_registry::{testing, SetKind};
        let TwoAnchors {
            _dir,
            index,
            alpha,
            beta,
            registry,
        } = two_anchors();
        let up = testing::key("up-1");
        let path = StorePath::parse("/nix/store/1bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-pkg").unwrap();
        let hash = *path.hash();
        let mut narinfo = local("up-1").narinfo;
        narinfo.store_path = path.clone();
        narinfo.sigs.clear();
        narinfo.sign(&up);
        let upstream = crate::store::index::UpstreamPath {
            upstream: "http://127.0.0.1:1".into(),
            narinfo: narinfo.clone(),
        };
        let catalog = catalog(&index, &Arc::new(SecretKey::generate("gw-1").unwrap()));
        let serve = || catalog.serve_upstream(&upstream, narinfo.sigs.clone(), &[up.public()]);
        assert_eq!(catalog.cached_upstream(&hash), None);
        let Lookup::Found(text) = serve().unwrap() else {
            panic!("an upstream-signed path with require = 1 is served");
        };
        assert_eq!(catalog.cached_upstream(&hash), Some(text.clone()));

        // A registry swap drops it (what anchors say may have changed).
        catalog.set_registry(registry.clone());
        assert_eq!(catalog.cached_upstream(&hash), None);
        assert!(matches!(serve().unwrap(), Lookup::Found(_)));
        assert_eq!(catalog.cached_upstream(&hash), Some(text.clone()));

        // An anchor mapping the path to another NAR makes it a conflict;
        // the remembered answer must not outlive the set that arrived.
        index_set(
            &index,
            &registry,
            SetKind::Anchor,
            &alpha,
            "alpha",
            testing::mapping(&alpha, path.clone(), b"another nar"),
        );
        assert_eq!(catalog.cached_upstream(&hash), None);
        assert_eq!(serve().unwrap(), Lookup::Conflict);
        assert_eq!(catalog.cached_upstream(&hash), None);

        // An answer an anchor agrees with depends on that set's expiry: it
        // is served, never remembered.
        let other = StorePath::parse("/nix/store/2ccccccccccccccccccccccccccccccc-x").unwrap();
        let mut agreed = narinfo.clone();
        agreed.store_path = other.clone();
        agreed.nar_hash = NarHash::digest(b"nar");
        agreed.nar_size = 3;
        agreed.sigs.clear();
        agreed.sign(&up);
        index_set(
            &index,
            &registry,
            SetKind::Anchor,
            &beta,
            "beta",
            testing::mapping(&beta, other.clone(), b"nar"),
        );
        let agreed = crate::store::index::UpstreamPath {
            upstream: "http://127.0.0.1:1".into(),
            narinfo: agreed,
        };
        let sigs = agreed.narinfo.sigs.clone();
        assert!(matches!(
            catalog
                .serve_upstream(&agreed, sigs, &[up.public()])
                .unwrap(),
            Lookup::Found(_)
        ));
        assert_eq!(catalog.cached_upstream(other.hash()), None);

        // An own path added later drops remembered upstream answers.
        let third = StorePath::parse("/nix/store/3ddddddddddddddddddddddddddddddd-y").unwrap();
        let mut third_info = narinfo.clone();
        third_info.store_path = third.clone();
        third_info.sigs.clear();
        third_info.sign(&up);
        let third_up = crate::store::index::UpstreamPath {
            upstream: "http://127.0.0.1:1".into(),
            narinfo: third_info.clone(),
        };
        let sigs = third_info.sigs.clone();
        assert!(matches!(
            catalog
                .serve_upstream(&third_up, sigs, &[up.public()])
                .unwrap(),
            Lookup::Found(_)
        ));
        assert!(catalog.cached_upstream(third.hash()).is_some());
        catalog.put_locals(vec![local("uploader-1")]).unwrap();
        assert_eq!(catalog.cached_upstream(third.hash()), None);
    }

    #[test]
    fn a_second_name_for_a_hash_part_blocks_the_path_as_a_conflict() {
        use anchor_registry::{testing, SetKind};
        let TwoAnchors {
            _dir,
            index,
            alpha,
            beta,
            registry,
        } = two_anchors();
        let honest = StorePath::parse("/nix/store/1bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-pkg").unwrap();
        let renamed =
            StorePath::parse("/nix/store/1bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-aaa-hide").unwrap();
        index_set(
            &index,
            &registry,
            SetKind::Anchor,
            &alpha,
            "alpha",
            testing::mapping(&alpha, honest.clone(), b"nar"),
        );
        // `aaa-hide` sorts first: the first stored name must not decide.
        index_set(
            &index,
            &registry,
            SetKind::Anchor,
            &beta,
            "beta",
            testing::mapping(&beta, renamed, b"nar"),
        );
        let catalog = catalog(&index, &Arc::new(SecretKey::generate("gw-1").unwrap()));
        catalog.set_registry(registry);
        assert_eq!(catalog.lookup(honest.hash()).unwrap(), Lookup::Conflict);
    }
}
