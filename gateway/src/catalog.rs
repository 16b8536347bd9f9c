//! Answers the one question a binary cache is asked: "may I serve store path
//! P, and with which narinfo?". The user's own pins are always served; other
//! paths only when the anchor policy holds. Every narinfo served points at
//! `nar/<nix32 NarHash>.nar` and carries the gateway's own signature.

use std::sync::{Arc, RwLock};

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

    /// The narinfo to serve for `hash`, if policy allows.
    pub fn lookup(&self, hash: &StorePathHash) -> Result<Lookup, IndexError> {
        if let Some(local) = self.index.local(hash)? {
            return Ok(Lookup::Found(Box::new(self.present(local.narinfo))));
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
