//! Whether a gateway may believe a mapping set: the signer must be a registry
//! anchor, the set must not expire, roll back, fork or break the chain of
//! versions the gateway already trusts. Owns the persisted per-anchor
//! [`TrustedState`] and the one-call [`verify_set`].

use std::io::BufRead;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::hash::Sha256Hash;
use crate::mapping::Mapping;
use crate::mapping_set::{EntryChecks, SetError, SetKind, SetReader, SignedHeader};
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
        key: String,
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
            key: h.key.to_string(),
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
    verify_set_with(reader, registry, trusted, now, EntryChecks::All, on_entry)
}

/// [`verify_set`] with a choice of entry checks: a syncing gateway may pass
/// [`EntryChecks::DeferNixSignatures`] for large sets (see there why that is sound).
pub fn verify_set_with<R: BufRead>(
    reader: R,
    registry: &Registry,
    trusted: Option<&TrustedState>,
    now: u64,
    checks: EntryChecks,
    mut on_entry: impl FnMut(Mapping),
) -> Result<(VerifiedSet, TrustedState), TrustError> {
    let reader = SetReader::open_with(reader, checks)?;
    let state = check_header(reader.header(), registry, trusted, now)?;
    let mut entries = 0u64;
    let header = reader.for_each(|mapping| {
        entries += 1;
        on_entry(mapping);
    })?;
    Ok((VerifiedSet { header, entries }, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;
    use crate::mapping::testing::key;
    use crate::mapping_set::testing::{entries, params, write, CREATED, EXPIRES};
    use crate::mapping_set::SetParams;

    struct World {
        alpha: SecretKey,
        registry: Registry,
    }

    fn world() -> World {
        let alpha = key("alpha-1");
        let registry = crate::testing::one_root_registry(
            [crate::testing::anchor(
                &alpha,
                "alpha",
                &["/srv/alpha.jsonl"],
            )],
            EXPIRES,
        );
        World { alpha, registry }
    }

    fn publish(
        w: &World,
        version: u64,
        previous: Option<Sha256Hash>,
        seeds: std::ops::Range<u64>,
    ) -> (Vec<u8>, SignedHeader) {
        write(
            &params("alpha", version, previous),
            &entries(&w.alpha, seeds),
            &w.alpha,
        )
    }

    fn verify(
        w: &World,
        bytes: &[u8],
        state: Option<&TrustedState>,
    ) -> Result<(VerifiedSet, TrustedState), TrustError> {
        verify_set(bytes, &w.registry, state, CREATED, |_| {})
    }

    #[test]
    fn accepts_first_version_and_chained_successor() {
        let w = world();
        let (v1, h1) = publish(&w, 1, None, 0..3);
        let mut seen = 0;
        let (set, state) =
            verify_set(v1.as_slice(), &w.registry, None, CREATED, |_| seen += 1).expect("trusted");
        assert_eq!((seen, set.entries, set.kind()), (3, 3, SetKind::Anchor));
        assert_eq!((state.version(), state.digest()), (1, h1.digest()));
        let (v2, h2) = publish(&w, 2, Some(*h1.digest()), 0..4);
        let (_, state2) = verify(&w, &v2, Some(&state)).expect("chained");
        assert_eq!(state2.header(), &h2);
    }

    #[test]
    fn accepts_the_trusted_version_again() {
        let w = world();
        let (v1, _) = publish(&w, 1, None, 0..2);
        let (_, state) = verify(&w, &v1, None).expect("trusted");
        let (_, again) = verify(&w, &v1, Some(&state)).expect("same set");
        assert_eq!(again, state);
    }

    #[test]
    fn accepts_a_jump_over_unseen_versions() {
        let w = world();
        let (v1, _) = publish(&w, 1, None, 0..2);
        let (_, state) = verify(&w, &v1, None).expect("trusted");
        let (v5, _) = publish(&w, 5, Some(Sha256Hash::digest(b"v4 we never saw")), 0..2);
        assert_eq!(verify(&w, &v5, Some(&state)).expect("jump").1.version(), 5);
    }

    #[test]
    fn rejects_rollback() {
        let w = world();
        let (v1, h1) = publish(&w, 1, None, 0..2);
        let (v2, h2) = publish(&w, 2, Some(*h1.digest()), 0..3);
        let (_, state2) = verify(&w, &v2, None).expect("trusted");
        match verify(&w, &v1, Some(&state2)) {
            Err(TrustError::Rollback {
                trusted_version: 2,
                found_version: 1,
                trusted_digest,
                found_digest,
                ..
            }) => assert_eq!((&trusted_digest, &found_digest), (h2.digest(), h1.digest())),
            other => panic!("expected rollback, got {other:?}"),
        }
    }

    #[test]
    fn rejects_fork_with_both_signed_headers_as_evidence() {
        let w = world();
        let (v1, h1) = publish(&w, 1, None, 0..2);
        let (v2a, h2a) = publish(&w, 2, Some(*h1.digest()), 0..3);
        let (v2b, h2b) = publish(&w, 2, Some(*h1.digest()), 0..4);
        let (_, state1) = verify(&w, &v1, None).expect("trusted");
        let (_, state2) = verify(&w, &v2a, Some(&state1)).expect("chained");
        match verify(&w, &v2b, Some(&state2)) {
            Err(TrustError::Fork {
                version: 2,
                trusted,
                found,
                ..
            }) => {
                assert_eq!((*trusted, *found), (h2a.clone(), h2b.clone()));
                for evidence in [&h2a, &h2b] {
                    let checked =
                        SignedHeader::parse(evidence.line().as_bytes()).expect("evidence verifies");
                    assert_eq!(checked.header().key, w.alpha.public());
                }
            }
            other => panic!("expected fork, got {other:?}"),
        }
    }

    #[test]
    fn rejects_broken_chain() {
        let w = world();
        let (v1, _) = publish(&w, 1, None, 0..2);
        let (_, state) = verify(&w, &v1, None).expect("trusted");
        let bogus = Sha256Hash::digest(b"not v1");
        let (v2, _) = publish(&w, 2, Some(bogus), 0..2);
        assert!(matches!(
            verify(&w, &v2, Some(&state)),
            Err(TrustError::BrokenChain { version: 2, found_previous: Some(found), .. }) if found == bogus
        ));
    }

    #[test]
    fn rejects_expired_set() {
        let w = world();
        let (v1, _) = publish(&w, 1, None, 0..1);
        assert!(matches!(
            verify_set(v1.as_slice(), &w.registry, None, EXPIRES, |_| {}),
            Err(TrustError::Expired {
                version: 1,
                expires: EXPIRES,
                now: EXPIRES,
                ..
            })
        ));
    }

    #[test]
    fn rejects_signer_not_in_registry() {
        let w = world();
        let mallory = key("mallory-1");
        let (unknown, _) = write(
            &params("mallory", 1, None),
            &entries(&mallory, 0..1),
            &mallory,
        );
        assert!(matches!(
            verify(&w, &unknown, None),
            Err(TrustError::AnchorNotInRegistry { .. })
        ));
        let impostor = key("alpha-1");
        let (wrong_key, _) = write(
            &params("alpha", 1, None),
            &entries(&impostor, 0..1),
            &impostor,
        );
        assert!(matches!(
            verify(&w, &wrong_key, None),
            Err(TrustError::AnchorNotInRegistry { .. })
        ));
    }

    #[test]
    fn accepts_claims_from_any_key_and_marks_them() {
        let w = world();
        let contributor = key("carol-1");
        let claims = SetParams {
            kind: SetKind::Claims,
            ..params("carol", 1, None)
        };
        let (bytes, _) = write(&claims, &entries(&contributor, 0..2), &contributor);
        let (set, _) = verify(&w, &bytes, None).expect("claims verify");
        assert_eq!(set.kind(), SetKind::Claims);
    }

    #[test]
    fn rejects_state_of_another_anchor() {
        let w = world();
        let carol = key("carol-1");
        let claims = SetParams {
            kind: SetKind::Claims,
            ..params("carol", 1, None)
        };
        let (carol_set, _) = write(&claims, &entries(&carol, 0..1), &carol);
        let (_, carol_state) = verify(&w, &carol_set, None).expect("claims verify");
        let (v1, _) = publish(&w, 1, None, 0..1);
        assert!(matches!(
            verify(&w, &v1, Some(&carol_state)),
            Err(TrustError::StateForOtherAnchor { .. })
        ));
    }

    #[test]
    fn format_errors_pass_through_and_yield_no_state() {
        let w = world();
        let (mut v1, _) = publish(&w, 1, None, 0..2);
        let last = v1.len() - 3;
        v1[last] ^= 1;
        assert!(matches!(verify(&w, &v1, None), Err(TrustError::Set(_))));
    }

    #[test]
    fn trusted_state_persists_as_json_and_reverifies() {
        let w = world();
        let (v1, _) = publish(&w, 1, None, 0..1);
        let (_, state) = verify(&w, &v1, None).expect("trusted");
        let json = serde_json::to_string(&state).expect("serialises");
        assert_eq!(
            serde_json::from_str::<TrustedState>(&json).expect("parses"),
            state
        );
        assert!(serde_json::from_str::<TrustedState>(&json.replacen(
            "\\\"version\\\":1",
            "\\\"version\\\":9",
            1
        ))
        .is_err());
    }
}
