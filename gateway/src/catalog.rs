//! Answers the one question a binary cache is asked: "may I serve store path
//! P, and with which narinfo?". The user's own pins are always served; other
//! paths only when the anchor policy holds. Every narinfo served points at
//! `nar/<nix32 NarHash>.nar` and carries the gateway's own signature.

use std::sync::Arc;

use anchor_registry::{NarInfo, SecretKey, StorePathHash};

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
}

/// The URL under which the gateway serves a NAR: its Nix identity, stable
/// forever whatever the CID (Nix caches narinfos, URL included, for 30 days).
pub fn nar_url(narinfo: &NarInfo) -> String {
    format!("nar/{}.nar", narinfo.nar_hash.to_nix32())
}

impl Catalog {
    pub fn new(index: Arc<Index>, key: Arc<SecretKey>) -> Self {
        Self { index, key }
    }

    /// The narinfo to serve for `hash`, if policy allows.
    pub fn lookup(&self, hash: &StorePathHash) -> Result<Lookup, IndexError> {
        if let Some(local) = self.index.local(hash)? {
            return Ok(Lookup::Found(Box::new(self.present(local.narinfo))));
        }
        Ok(Lookup::NotFound)
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
