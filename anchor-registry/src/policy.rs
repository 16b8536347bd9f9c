//! When a gateway may serve a store path: `require` = k distinct registry
//! anchors, out of the configured n, agree on its Nix fingerprint and none of
//! them disagrees. Owns the policy, its evaluation and the conflict evidence.
//!
//! Counting rules: an anchor counts once, identified by its registry key (a
//! mapping counts only if its Nix signature verifies under that key, so keys
//! outside the registry, i.e. sockpuppets, count for nothing); claims never
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
use crate::store_path::StorePath;

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

/// A mapping as the index holds it, with the kind of set it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assertion {
    pub kind: SetKind,
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
    /// Counted anchors signed different fingerprints: the path is blocked.
    /// `evidence` holds every counted anchor's mapping, sorted by anchor.
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

    /// Decides whether to serve `path` from what the index holds about it
    /// (from unexpired sets). Assertions about other paths, claims, unknown
    /// keys, anchors outside the policy and bad signatures are ignored.
    pub fn evaluate(
        &self,
        registry: &Registry,
        path: &StorePath,
        assertions: &[Assertion],
    ) -> Decision {
        // fingerprint -> anchor -> vouch: one vote per anchor per fingerprint.
        let mut by_fingerprint: BTreeMap<String, BTreeMap<AnchorName, Vouch>> = BTreeMap::new();
        for assertion in assertions {
            if assertion.kind != SetKind::Anchor || assertion.mapping.path() != path {
                continue;
            }
            let Some(anchor) = registry.anchor_by_key_name(assertion.mapping.signature().name())
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
            if assertion.mapping.verify(&anchor.key).is_err() {
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
            return Decision::Conflict {
                path: path.clone(),
                evidence,
            };
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

    fn by(k: &SecretKey, d: MappingData) -> Assertion {
        Assertion {
            kind: SetKind::Anchor,
            mapping: d.sign(k),
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
        let d =
            Policy::default().evaluate(&w.registry, &truth().path, &[by(&w.anchors[0], truth())]);
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
        let d = Policy::default().evaluate(&w.registry, &truth().path, &puppets);
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
        let d = Policy::default().evaluate(&w.registry, &truth().path, &assertions);
        assert!(matches!(d, Decision::Serve { .. }));
    }

    #[test]
    fn two_of_three_agreeing_satisfy_k2() {
        let w = world(3);
        let policy = Policy::new(2, None).expect("valid");
        let d = policy.evaluate(
            &w.registry,
            &truth().path,
            &[by(&w.anchors[0], truth()), by(&w.anchors[2], truth())],
        );
        assert!(matches!(d, Decision::Serve { .. }));
        assert_eq!(agreeing_names(&d), ["a0", "a2"]);
    }

    #[test]
    fn an_offline_anchor_does_not_lower_the_bar() {
        let w = world(3);
        let policy = Policy::new(2, None).expect("valid");
        let d = policy.evaluate(&w.registry, &truth().path, &[by(&w.anchors[1], truth())]);
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
        let d = policy.evaluate(&w.registry, &truth().path, &[once.clone(), once]);
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
        match policy.evaluate(&w.registry, &truth().path, &assertions) {
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
            &truth().path,
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
            &truth().path,
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
            &truth().path,
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
                mapping: truth().sign(k),
            })
            .collect();
        let d = Policy::default().evaluate(&w.registry, &truth().path, &claims);
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
            &truth().path,
            &[
                Assertion {
                    kind: SetKind::Anchor,
                    mapping: forged,
                },
                other_path,
            ],
        );
        assert!(matches!(d, Decision::NotEnough { have: 0, .. }));
    }

    #[test]
    fn only_configured_anchors_count_or_conflict() {
        let w = world(3);
        let policy = Policy::new(1, Some([name("a0")].into())).expect("valid");
        let d = policy.evaluate(
            &w.registry,
            &truth().path,
            &[by(&w.anchors[0], truth()), by(&w.anchors[1], lie())],
        );
        assert!(matches!(d, Decision::Serve { .. }));
        let d = policy.evaluate(&w.registry, &truth().path, &[by(&w.anchors[2], truth())]);
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
            &truth().path,
            &[by(&w.anchors[0], truth()), by(&w.anchors[1], lie())],
        );
        let json = serde_json::to_string(&d).expect("serialises");
        assert!(json.starts_with("{\"decision\":\"conflict\""), "{json}");
        assert_eq!(serde_json::from_str::<Decision>(&json).expect("parses"), d);
    }
}
