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
    /// agreeing anchor's; all `agreeing` share its fingerprint (their CIDs may
    /// differ; their Nix signatures can all go into the narinfo).
    Serve {
        mapping: Mapping,
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
                mapping: first.mapping.clone(),
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
