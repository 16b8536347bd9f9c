//! When a gateway may serve a store path: `require` = k distinct registry
//! anchors, out of the configured n, agree on its Nix fingerprint and none of
//! them disagrees. Owns the policy, its evaluation and the conflict evidence.
//!
//! Counting rules: a mapping counts only for the owner of the set that
//! carries it, and only if that owner is a registry anchor under the same key
//! and the mapping's Nix signature verifies under that key. So keys outside
//! the registry (sockpuppets) count for nothing, and a set cannot lend its
//! owner's weight to signatures it copied from another anchor (from that
//! anchor's narinfos, or from a set it revoked or let expire). An anchor
//! counts once. Claims never
//! count; k is fixed, so anchors that are offline or did not answer raise
//! nothing and lower nothing. Agreement is on the Nix fingerprint (path,
//! NarHash, NarSize, References), the thing Nix checks: two anchors whose
//! fingerprints differ conflict and block the path. CIDs (and Deriver, CA) may
//! differ without conflict: a CID only says where bytes are, and bytes are
//! checked against NarHash before they are served.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::keys::PublicKey;
use crate::mapping::Mapping;
use crate::mapping_set::SetKind;
use crate::registry::{AnchorName, Registry};
use crate::store_path::{StorePath, StorePathHash};

/// Why a policy cannot be used with a registry.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyError {
    #[error("require must be at least 1: with 0 anything would be served")]
    RequireZero,
    #[error("the anchor list is empty: nothing could ever be served; omit it to use every registry anchor")]
    NoAnchors,
    #[error(
        "policy names anchor `{name}`, which registry version {registry_version} does not list"
    )]
    UnknownAnchor {
        name: AnchorName,
        registry_version: u64,
    },
    #[error("require = {require} but only {available} anchors are configured: nothing could ever be served")]
    RequireExceedsAnchors { require: u64, available: usize },
}

/// What the gateway requires before it serves a path. Deserialises from
/// `{ require = 2, anchors = ["a", "b", "c"] }` (`anchors` optional).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PolicyConfig", into = "PolicyConfig")]
pub struct Policy {
    require: u64,
    anchors: Option<BTreeSet<AnchorName>>,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyConfig {
    require: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    anchors: Option<BTreeSet<AnchorName>>,
}

impl TryFrom<PolicyConfig> for Policy {
    type Error = PolicyError;
    fn try_from(c: PolicyConfig) -> Result<Self, PolicyError> {
        Policy::new(c.require, c.anchors)
    }
}

impl From<Policy> for PolicyConfig {
    fn from(p: Policy) -> Self {
        PolicyConfig {
            require: p.require,
            anchors: p.anchors,
        }
    }
}

impl Default for Policy {
    /// The design's default: one registry anchor suffices, none may disagree.
    fn default() -> Self {
        Self {
            require: 1,
            anchors: None,
        }
    }
}

/// A mapping as the index holds it, with the set that carries it: the set's
/// kind, its owner (the header's name) and the key that signed the set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assertion {
    pub kind: SetKind,
    pub owner: AnchorName,
    pub key: PublicKey,
    pub mapping: Mapping,
}

/// A registry anchor's verified mapping: exportable evidence, checkable by
/// anyone with the key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vouch {
    pub anchor: AnchorName,
    pub key: PublicKey,
    pub mapping: Mapping,
}

/// The answer for one path, with the reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Enough anchors agree and none disagrees. `mapping` is the first
    /// agreeing anchor's; all `agreeing` (sorted by anchor) share its
    /// fingerprint: their CIDs may differ, and all their Nix signatures can go
    /// into the narinfo.
    Serve {
        mapping: Box<Mapping>,
        agreeing: Vec<Vouch>,
    },
    /// Nobody disagrees, but fewer than `need` anchors vouch.
    NotEnough {
        have: usize,
        need: u64,
        agreeing: Vec<Vouch>,
    },
    /// Counted anchors signed different fingerprints (a different name for
    /// the same hash part included): the path is blocked. `path` is the
    /// first evidence's; `evidence` holds every counted anchor's mapping,
    /// sorted by anchor.
    Conflict {
        path: StorePath,
        evidence: Vec<Vouch>,
    },
}

impl Policy {
    /// `require` ≥ 1; `anchors`, if given, restricts which registry anchors
    /// count (n = its size), and must not be empty.
    pub fn new(require: u64, anchors: Option<BTreeSet<AnchorName>>) -> Result<Self, PolicyError> {
        if require == 0 {
            return Err(PolicyError::RequireZero);
        }
        if anchors.as_ref().is_some_and(BTreeSet::is_empty) {
            return Err(PolicyError::NoAnchors);
        }
        Ok(Self { require, anchors })
    }

    pub fn require(&self) -> u64 {
        self.require
    }

    pub fn anchors(&self) -> Option<&BTreeSet<AnchorName>> {
        self.anchors.as_ref()
    }

    /// Checks the policy can ever be met under `registry`: every named anchor
    /// exists and k ≤ n. Call it when the config or the registry changes.
    pub fn check(&self, registry: &Registry) -> Result<(), PolicyError> {
        let available = match &self.anchors {
            Some(names) => {
                if let Some(name) = names.iter().find(|n| registry.anchor(n).is_none()) {
                    return Err(PolicyError::UnknownAnchor {
                        name: name.clone(),
                        registry_version: registry.version(),
                    });
                }
                names.len()
            }
            None => registry.anchors().len(),
        };
        if self.require > available as u64 {
            return Err(PolicyError::RequireExceedsAnchors {
                require: self.require,
                available,
            });
        }
        Ok(())
    }

    /// Decides whether to serve the path with hash part `hash` from what the
    /// index holds about it (from unexpired sets). Every name under that hash
    /// part is judged together, so two names for one hash part conflict.
    /// Assertions about other hash parts, claims, owners that are not
    /// registry anchors under the set's key, anchors outside the policy and
    /// mappings not signed by their set's owner are ignored.
    pub fn evaluate(
        &self,
        registry: &Registry,
        hash: &StorePathHash,
        assertions: &[Assertion],
    ) -> Decision {
        // fingerprint -> anchor -> vouch: one vote per anchor per fingerprint.
        let mut by_fingerprint: BTreeMap<String, BTreeMap<AnchorName, Vouch>> = BTreeMap::new();
        for assertion in assertions {
            if assertion.kind != SetKind::Anchor || assertion.mapping.path().hash() != hash {
                continue;
            }
            let Some(anchor) = registry
                .anchor(&assertion.owner)
                .filter(|a| a.key == assertion.key)
            else {
                continue;
            };
            if self
                .anchors
                .as_ref()
                .is_some_and(|names| !names.contains(&anchor.name))
            {
                continue;
            }
            // The name check is free and refuses copied signatures before
            // the (costly) signature check.
            if assertion.mapping.signature().name() != anchor.key.name()
                || assertion.mapping.verify(&anchor.key).is_err()
            {
                continue;
            }
            by_fingerprint
                .entry(assertion.mapping.fingerprint())
                .or_default()
                .entry(anchor.name.clone())
                .or_insert_with(|| Vouch {
                    anchor: anchor.name.clone(),
                    key: anchor.key.clone(),
                    mapping: assertion.mapping.clone(),
                });
        }
        if by_fingerprint.len() > 1 {
            let mut evidence: Vec<Vouch> = by_fingerprint
                .into_values()
                .flat_map(BTreeMap::into_values)
                .collect();
            evidence.sort_by(|a, b| a.anchor.cmp(&b.anchor));
            let path = evidence[0].mapping.path().clone();
            return Decision::Conflict { path, evidence };
        }
        let agreeing: Vec<Vouch> = by_fingerprint
            .into_values()
            .next()
            .map(|vouches| vouches.into_values().collect())
            .unwrap_or_default();
        match agreeing.first() {
            Some(first) if agreeing.len() as u64 >= self.require => Decision::Serve {
                mapping: Box::new(first.mapping.clone()),
                agreeing,
            },
            _ => Decision::NotEnough {
                have: agreeing.len(),
                need: self.require,
                agreeing,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;
    use crate::mapping::testing::{cid_of, data, key};
    use crate::mapping::MappingData;
    use proptest::strategy::Strategy;

    const EXPIRES: u64 = 2_000_000_000;

    struct World {
        anchors: Vec<SecretKey>,
        registry: Registry,
    }

    /// A registry of `n` anchors named a0, a1, … with keys a0-1, a1-1, …
    fn world(n: usize) -> World {
        let anchors: Vec<SecretKey> = (0..n).map(|i| key(&format!("a{i}-1"))).collect();
        let registry = crate::testing::one_root_registry(
            anchors
                .iter()
                .enumerate()
                .map(|(i, k)| crate::testing::anchor(k, &format!("a{i}"), &[])),
            EXPIRES,
        );
        World { anchors, registry }
    }

    fn name(s: &str) -> AnchorName {
        AnchorName::parse(s).expect("valid")
    }

    fn truth() -> MappingData {
        data(1, b"the real NAR")
    }

    fn lie() -> MappingData {
        data(1, b"a backdoored NAR")
    }

    /// The owner a test key stands for: `a0-1` signs `a0`'s sets.
    fn owner_of(k: &SecretKey) -> AnchorName {
        let key_name = k.public().name().to_owned();
        name(key_name.rsplit_once('-').map_or(&key_name[..], |(n, _)| n))
    }

    /// `d` signed by `k`, in a set of `k`'s owner.
    fn by(k: &SecretKey, d: MappingData) -> Assertion {
        carried(k, k, d)
    }

    /// `d` signed by `signer`, carried in a set that `owner` signed.
    fn carried(owner: &SecretKey, signer: &SecretKey, d: MappingData) -> Assertion {
        Assertion {
            kind: SetKind::Anchor,
            owner: owner_of(owner),
            key: owner.public(),
            mapping: d.sign(signer),
        }
    }

    fn agreeing_names(d: &Decision) -> Vec<String> {
        match d {
            Decision::Serve { agreeing, .. } | Decision::NotEnough { agreeing, .. } => {
                agreeing.iter().map(|v| v.anchor.to_string()).collect()
            }
            Decision::Conflict { evidence, .. } => {
                evidence.iter().map(|v| v.anchor.to_string()).collect()
            }
        }
    }

    #[test]
    fn one_anchor_serves_under_default_policy() {
        let w = world(3);
        let d = Policy::default().evaluate(
            &w.registry,
            truth().path.hash(),
            &[by(&w.anchors[0], truth())],
        );
        assert!(
            matches!(&d, Decision::Serve { mapping, .. } if mapping.nar_hash() == &truth().nar_hash)
        );
        assert_eq!(agreeing_names(&d), ["a0"]);
    }

    #[test]
    fn five_sockpuppets_agreeing_on_a_wrong_nar_hash_do_not_satisfy_k1() {
        let w = world(3);
        let mut puppets: Vec<Assertion> = (0..5)
            .map(|i| by(&key(&format!("puppet{i}-1")), lie()))
            .collect();
        // One even borrows a registry anchor's key name.
        puppets.push(by(&key("a0-1"), lie()));
        let d = Policy::default().evaluate(&w.registry, truth().path.hash(), &puppets);
        assert_eq!(
            d,
            Decision::NotEnough {
                have: 0,
                need: 1,
                agreeing: vec![]
            }
        );
    }

    #[test]
    fn sockpuppets_cannot_raise_a_conflict() {
        let w = world(3);
        let mut assertions = vec![by(&w.anchors[0], truth())];
        assertions.extend((0..5).map(|i| by(&key(&format!("puppet{i}-1")), lie())));
        let d = Policy::default().evaluate(&w.registry, truth().path.hash(), &assertions);
        assert!(matches!(d, Decision::Serve { .. }));
    }

    #[test]
    fn two_of_three_agreeing_satisfy_k2() {
        let w = world(3);
        let policy = Policy::new(2, None).expect("valid");
        let d = policy.evaluate(
            &w.registry,
            truth().path.hash(),
            &[by(&w.anchors[0], truth()), by(&w.anchors[2], truth())],
        );
        assert!(matches!(d, Decision::Serve { .. }));
        assert_eq!(agreeing_names(&d), ["a0", "a2"]);
    }

    #[test]
    fn an_offline_anchor_does_not_lower_the_bar() {
        let w = world(3);
        let policy = Policy::new(2, None).expect("valid");
        let d = policy.evaluate(
            &w.registry,
            truth().path.hash(),
            &[by(&w.anchors[1], truth())],
        );
        assert!(matches!(
            d,
            Decision::NotEnough {
                have: 1,
                need: 2,
                ..
            }
        ));
    }

    #[test]
    fn the_same_anchor_twice_counts_once() {
        let w = world(3);
        let policy = Policy::new(2, None).expect("valid");
        let once = by(&w.anchors[0], truth());
        let d = policy.evaluate(&w.registry, truth().path.hash(), &[once.clone(), once]);
        assert!(matches!(
            d,
            Decision::NotEnough {
                have: 1,
                need: 2,
                ..
            }
        ));
    }

    #[test]
    fn one_disagreeing_anchor_blocks_the_path_with_evidence() {
        let w = world(3);
        let policy = Policy::new(2, None).expect("valid");
        let assertions = [
            by(&w.anchors[0], truth()),
            by(&w.anchors[1], truth()),
            by(&w.anchors[2], lie()),
        ];
        match policy.evaluate(&w.registry, truth().path.hash(), &assertions) {
            Decision::Conflict { path, evidence } => {
                assert_eq!(path, truth().path);
                assert_eq!(evidence.len(), 3);
                for v in &evidence {
                    assert_eq!(v.mapping.verify(&v.key), Ok(()), "evidence must verify");
                }
                assert_eq!(evidence[2].mapping.nar_hash(), &lie().nar_hash);
            }
            other => panic!("expected conflict, got {other:?}"),
        }
    }

    #[test]
    fn an_anchor_contradicting_itself_is_a_conflict() {
        let w = world(1);
        let d = Policy::default().evaluate(
            &w.registry,
            truth().path.hash(),
            &[by(&w.anchors[0], truth()), by(&w.anchors[0], lie())],
        );
        assert!(matches!(d, Decision::Conflict { .. }));
    }

    #[test]
    fn different_cids_for_the_same_nar_hash_agree() {
        let w = world(2);
        let mut elsewhere = truth();
        elsewhere.cid = cid_of(b"another profile's DAG");
        let policy = Policy::new(2, None).expect("valid");
        let d = policy.evaluate(
            &w.registry,
            truth().path.hash(),
            &[by(&w.anchors[0], truth()), by(&w.anchors[1], elsewhere)],
        );
        assert!(matches!(d, Decision::Serve { ref agreeing, .. } if agreeing.len() == 2));
    }

    #[test]
    fn a_different_nar_size_for_the_same_nar_hash_conflicts() {
        let w = world(2);
        let mut odd = truth();
        odd.nar_size += 1;
        let d = Policy::default().evaluate(
            &w.registry,
            truth().path.hash(),
            &[by(&w.anchors[0], truth()), by(&w.anchors[1], odd)],
        );
        assert!(matches!(d, Decision::Conflict { .. }));
    }

    #[test]
    fn claims_never_count() {
        let w = world(2);
        let claims: Vec<Assertion> = w
            .anchors
            .iter()
            .map(|k| Assertion {
                kind: SetKind::Claims,
                ..by(k, truth())
            })
            .collect();
        let d = Policy::default().evaluate(&w.registry, truth().path.hash(), &claims);
        assert!(matches!(d, Decision::NotEnough { have: 0, .. }));
    }

    #[test]
    fn bad_signatures_and_other_paths_are_ignored() {
        let w = world(1);
        let good = truth().sign(&w.anchors[0]);
        let forged = Mapping::new(lie(), good.signature().clone());
        let other_path = by(&w.anchors[0], data(2, b"other"));
        let d = Policy::default().evaluate(
            &w.registry,
            truth().path.hash(),
            &[
                Assertion {
                    mapping: forged,
                    ..by(&w.anchors[0], truth())
                },
                other_path,
            ],
        );
        assert!(matches!(d, Decision::NotEnough { have: 0, .. }));
    }

    #[test]
    fn a_set_carrying_another_anchors_signatures_lends_them_no_weight() {
        let w = world(2);
        let (a, b) = (&w.anchors[0], &w.anchors[1]);
        // `a`'s set carries `b`'s real signature on a lie: neither counts.
        let copied = carried(a, b, lie());
        let d = Policy::default().evaluate(
            &w.registry,
            truth().path.hash(),
            std::slice::from_ref(&copied),
        );
        assert!(matches!(d, Decision::NotEnough { have: 0, .. }), "{d:?}");
        let only_b = Policy::new(1, Some([name("a1")].into())).expect("valid");
        let d = only_b.evaluate(
            &w.registry,
            truth().path.hash(),
            std::slice::from_ref(&copied),
        );
        assert!(matches!(d, Decision::NotEnough { have: 0, .. }), "{d:?}");
        // It cannot raise a conflict against `b`'s own truth either.
        let d = only_b.evaluate(&w.registry, truth().path.hash(), &[copied, by(b, truth())]);
        assert_eq!(agreeing_names(&d), ["a1"]);
        assert!(matches!(d, Decision::Serve { .. }));
    }

    #[test]
    fn a_re_keyed_anchors_old_set_counts_for_nothing() {
        let w = world(1);
        let old_key = key("a0-1");
        let stale = Assertion {
            kind: SetKind::Anchor,
            owner: name("a0"),
            key: old_key.public(),
            mapping: truth().sign(&old_key),
        };
        let d = Policy::default().evaluate(&w.registry, truth().path.hash(), &[stale]);
        assert!(matches!(d, Decision::NotEnough { have: 0, .. }), "{d:?}");
    }

    #[test]
    fn two_names_for_one_hash_part_conflict() {
        let w = world(2);
        let mut renamed = truth();
        renamed.path = StorePath::parse(&format!("/nix/store/{}-hidden", truth().path.hash()))
            .expect("a valid store path");
        let d = Policy::new(1, None).expect("valid").evaluate(
            &w.registry,
            truth().path.hash(),
            &[
                by(&w.anchors[0], truth()),
                by(&w.anchors[1], renamed.clone()),
            ],
        );
        match d {
            Decision::Conflict { evidence, .. } => {
                let paths: BTreeSet<String> = evidence
                    .iter()
                    .map(|v| v.mapping.path().to_string())
                    .collect();
                assert_eq!(
                    paths,
                    [truth().path.to_string(), renamed.path.to_string()].into()
                );
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    proptest::proptest! {
        /// Whatever the order, a mapping whose signer is not its set's owner
        /// never becomes a vote, and never blocks the owner's honest ones.
        #[test]
        fn foreign_signatures_never_vote(
            order in proptest::sample::subsequence((0..6usize).collect::<Vec<_>>(), 0..=6)
                .prop_shuffle(),
        ) {
            let w = world(3);
            let pool: Vec<Assertion> = (0..6)
                .map(|i| {
                    let owner = &w.anchors[i % 3];
                    let signer = &w.anchors[(i + 1) % 3];
                    carried(owner, signer, if i % 2 == 0 { lie() } else { truth() })
                })
                .collect();
            let assertions: Vec<Assertion> = order.iter().map(|&i| pool[i].clone()).collect();
            let d = Policy::default().evaluate(&w.registry, truth().path.hash(), &assertions);
            proptest::prop_assert!(
                matches!(d, Decision::NotEnough { have: 0, .. }),
                "{:?}",
                d
            );
            let mut with_honest = assertions.clone();
            with_honest.push(by(&w.anchors[2], truth()));
            let d = Policy::default().evaluate(&w.registry, truth().path.hash(), &with_honest);
            proptest::prop_assert_eq!(agreeing_names(&d), vec!["a2".to_owned()]);
        }
    }

    #[test]
    fn only_configured_anchors_count_or_conflict() {
        let w = world(3);
        let policy = Policy::new(1, Some([name("a0")].into())).expect("valid");
        let d = policy.evaluate(
            &w.registry,
            truth().path.hash(),
            &[by(&w.anchors[0], truth()), by(&w.anchors[1], lie())],
        );
        assert!(matches!(d, Decision::Serve { .. }));
        let d = policy.evaluate(
            &w.registry,
            truth().path.hash(),
            &[by(&w.anchors[2], truth())],
        );
        assert!(matches!(d, Decision::NotEnough { have: 0, .. }));
    }

    #[test]
    fn policy_must_be_satisfiable() {
        let w = world(2);
        assert_eq!(Policy::new(0, None), Err(PolicyError::RequireZero));
        assert_eq!(
            Policy::new(1, Some(BTreeSet::new())),
            Err(PolicyError::NoAnchors)
        );
        assert_eq!(
            Policy::new(3, None).expect("valid").check(&w.registry),
            Err(PolicyError::RequireExceedsAnchors {
                require: 3,
                available: 2
            })
        );
        assert!(matches!(
            Policy::new(1, Some([name("zz")].into()))
                .expect("valid")
                .check(&w.registry),
            Err(PolicyError::UnknownAnchor { .. })
        ));
        assert_eq!(
            Policy::new(2, None).expect("valid").check(&w.registry),
            Ok(())
        );
    }

    #[test]
    fn policy_reads_from_config_and_refuses_zero() {
        let p: Policy =
            serde_json::from_str(r#"{"require":2,"anchors":["a0","a1"]}"#).expect("valid");
        assert_eq!(
            p,
            Policy::new(2, Some([name("a0"), name("a1")].into())).expect("valid")
        );
        assert!(serde_json::from_str::<Policy>(r#"{"require":0}"#).is_err());
        let json = serde_json::to_string(&p).expect("serialises");
        assert_eq!(
            serde_json::from_str::<Policy>(&json).expect("round trips"),
            p
        );
    }

    #[test]
    fn conflict_evidence_exports_and_reimports() {
        let w = world(2);
        let d = Policy::default().evaluate(
            &w.registry,
            truth().path.hash(),
            &[by(&w.anchors[0], truth()), by(&w.anchors[1], lie())],
        );
        let json = serde_json::to_string(&d).expect("serialises");
        assert!(json.starts_with("{\"decision\":\"conflict\""), "{json}");
        assert_eq!(serde_json::from_str::<Decision>(&json).expect("parses"), d);
    }
}
