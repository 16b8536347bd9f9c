//! Whether a gateway may believe a mapping set: the signer must be a registry
//! anchor, the set must not expire, roll back, fork or break the chain of
//! versions the gateway already trusts. Owns the persisted per-anchor
//! [`TrustedState`] and the one-call [`verify_set`].

use std::io::BufRead;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::hash::Sha256Hash;
use crate::keys::PublicKey;
use crate::mapping::Mapping;
use crate::mapping_set::{SetError, SetKind, SetReader, SignedHeader};
use crate::registry::{AnchorName, Registry};

/// Why a set is not trusted. Format and signature failures come wrapped from
/// [`SetError`]; the rest compare the set with the registry, the clock and
/// what this gateway trusted before.
#[derive(Debug, Error)]
pub enum TrustError {
    #[error(transparent)]
    Set(#[from] SetError),
    #[error("`{anchor}` with key `{key}` is not an anchor of registry version {registry_version}")]
    AnchorNotInRegistry {
        anchor: AnchorName,
        key: PublicKey,
        registry_version: u64,
    },
    #[error("the trusted state given is for `{state_anchor}`, the set is by `{set_anchor}`")]
    StateForOtherAnchor {
        state_anchor: AnchorName,
        set_anchor: AnchorName,
    },
    #[error("`{anchor}` version {found_version} ({found_digest}) is older than trusted version {trusted_version} ({trusted_digest}): rollback")]
    Rollback {
        anchor: AnchorName,
        trusted_version: u64,
        trusted_digest: Sha256Hash,
        found_version: u64,
        found_digest: Sha256Hash,
    },
    #[error("`{anchor}` signed two different version {version}s: trusted {} and found {}: fork", trusted.digest(), found.digest())]
    Fork {
        anchor: AnchorName,
        version: u64,
        /// Both signed headers: anyone can check them and see the equivocation.
        trusted: Box<SignedHeader>,
        found: Box<SignedHeader>,
    },
    #[error("`{anchor}` version {version} names previous {found_previous:?}, but trusted version {} is {expected_previous}: broken chain", version - 1)]
    BrokenChain {
        anchor: AnchorName,
        version: u64,
        expected_previous: Sha256Hash,
        found_previous: Option<Sha256Hash>,
    },
    #[error("`{anchor}` version {version} expired at {expires} (now {now})")]
    Expired {
        anchor: AnchorName,
        version: u64,
        expires: u64,
        now: u64,
    },
}

/// What a gateway remembers per anchor: the newest set header it accepted.
/// Serialises as that signed header line, so the state is itself evidence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TrustedState {
    header: SignedHeader,
}

impl TrustedState {
    pub fn anchor(&self) -> &AnchorName {
        &self.header.header().anchor
    }

    pub fn version(&self) -> u64 {
        self.header.header().version
    }

    pub fn digest(&self) -> &Sha256Hash {
        self.header.digest()
    }

    pub fn header(&self) -> &SignedHeader {
        &self.header
    }
}

/// A set that passed every check, with what the gateway needs to index it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedSet {
    pub header: SignedHeader,
    /// How many entries were handed to the caller.
    pub entries: u64,
}

impl VerifiedSet {
    /// Claims sets are evidence only; policy never counts them.
    pub fn kind(&self) -> SetKind {
        self.header.header().kind
    }
}

/// Judges a verified header against the registry, the clock and the state
/// trusted so far; returns the state to persist once the entries also verify.
/// Anchor sets must come from a registry anchor (same name and key); claims
/// sets may come from any key. Re-reading the trusted version is fine.
pub fn check_header(
    header: &SignedHeader,
    registry: &Registry,
    trusted: Option<&TrustedState>,
    now: u64,
) -> Result<TrustedState, TrustError> {
    let h = header.header();
    if h.kind == SetKind::Anchor && registry.anchor(&h.anchor).is_none_or(|a| a.key != h.key) {
        return Err(TrustError::AnchorNotInRegistry {
            anchor: h.anchor.clone(),
            key: h.key.clone(),
            registry_version: registry.version(),
        });
    }
    if let Some(state) = trusted {
        check_against(header, state)?;
    }
    if now >= h.expires {
        return Err(TrustError::Expired {
            anchor: h.anchor.clone(),
            version: h.version,
            expires: h.expires,
            now,
        });
    }
    Ok(TrustedState {
        header: header.clone(),
    })
}

fn check_against(header: &SignedHeader, state: &TrustedState) -> Result<(), TrustError> {
    let h = header.header();
    if state.anchor() != &h.anchor {
        return Err(TrustError::StateForOtherAnchor {
            state_anchor: state.anchor().clone(),
            set_anchor: h.anchor.clone(),
        });
    }
    let trusted_version = state.version();
    if h.version < trusted_version {
        return Err(TrustError::Rollback {
            anchor: h.anchor.clone(),
            trusted_version,
            trusted_digest: *state.digest(),
            found_version: h.version,
            found_digest: *header.digest(),
        });
    }
    if h.version == trusted_version && header.digest() != state.digest() {
        return Err(TrustError::Fork {
            anchor: h.anchor.clone(),
            version: h.version,
            trusted: Box::new(state.header.clone()),
            found: Box::new(header.clone()),
        });
    }
    if h.version == trusted_version + 1 && h.previous.as_ref() != Some(state.digest()) {
        return Err(TrustError::BrokenChain {
            anchor: h.anchor.clone(),
            version: h.version,
            expected_previous: *state.digest(),
            found_previous: h.previous,
        });
    }
    Ok(())
}

/// Verifies a whole set as a gateway must before indexing it: header checks
/// ([`check_header`]) first, so a stale or foreign set costs one line, then
/// every entry, each handed to `on_entry` as it verifies. Stage what
/// `on_entry` receives and commit it, with the returned state, only on `Ok`.
pub fn verify_set<R: BufRead>(
    reader: R,
    registry: &Registry,
    trusted: Option<&TrustedState>,
    now: u64,
    on_entry: impl FnMut(Mapping),
) -> Result<(VerifiedSet, TrustedState), TrustError> {
    let reader = SetReader::open(reader)?;
    let state = check_header(reader.header(), registry, trusted, now)?;
    let mut entries = 0u64;
    let mut on_entry = on_entry;
    let header = reader.for_each(|mapping| {
        entries += 1;
        on_entry(mapping);
    })?;
    Ok((VerifiedSet { header, entries }, state))
}
