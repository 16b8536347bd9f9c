//! Seeding: pinning what registry anchors signed, newest set first, so this
//! node serves those NARs to others. Which NARs is decided from the index
//! alone (unit-tested); the pins then fetch them from peers.

use std::collections::HashSet;
use std::sync::Arc;

use anchor_registry::SetKind;
use anyhow::{bail, Result};

use crate::publish::pin::{parse_cid, PinEntry};
use crate::store::index::{Index, IndexError};
use crate::store::ipfs::{IpfsError, Node};
use crate::util::metrics::Metrics;
use crate::util::progress::{Meter, Unit};

/// One NAR an anchor signed, as a seeding candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub store_path: String,
    pub cid: String,
    pub nar_size: u64,
    pub nar_hash: anchor_registry::NarHash,
}

/// Every distinct NAR (by NarHash) in the trusted anchor sets, the newest
/// set's first; `anchors` restricts to those names (all when empty).
pub fn candidates(index: &Index, anchors: &[String]) -> Result<Vec<Candidate>, IndexError> {
    let mut states: Vec<_> = index
        .trusted_states()?
        .into_iter()
        .filter(|s| s.header().header().kind == SetKind::Anchor)
        .filter(|s| anchors.is_empty() || anchors.iter().any(|w| w == s.anchor().as_str()))
        .collect();
    states.sort_by_key(|s| std::cmp::Reverse(s.header().header().created));
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for state in states {
        for mapping in index.owner_mappings(&state)? {
            let data = mapping.data();
            if seen.insert(data.nar_hash) {
                out.push(Candidate {
                    store_path: data.path.to_string(),
                    cid: data.cid.to_string(),
                    nar_size: data.nar_size,
                    nar_hash: data.nar_hash,
                });
            }
        }
    }
    Ok(out)
}

/// What is left of a seeding budget. A candidate is tried only if its
/// declared size fits what is left; what its pin then holds on disk, not
/// what it declared, is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    left: u64,
}

impl Budget {
    pub fn new(bytes: u64) -> Self {
        Self { left: bytes }
    }

    /// Bytes still free: the most the next pin may hold.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// Whether a NAR declaring `declared` bytes is worth trying.
    pub fn admits(&self, declared: u64) -> bool {
        declared <= self.left
    }

    /// Counts `pinned` bytes (never more than is left: the pin was bounded).
    pub fn spend(&mut self, pinned: u64) {
        self.left = self.left.saturating_sub(pinned);
    }
}

/// Pins what registry anchors signed, up to `max_size` bytes of blocks
/// pinned (each pin bounded by what is left, so a CID whose DAG is larger
/// than its declared NarSize is refused, counted in
/// [`Metrics::seed_refused`], instead of overrunning the budget); each
/// NAR's declared size counts into `meter` once it is pinned.
pub async fn seed(
    node: &Node,
    index: Arc<Index>,
    metrics: &Metrics,
    anchors: &[String],
    max_size: Option<u64>,
    meter: &Meter,
) -> Result<Vec<PinEntry>> {
    let wanted = anchors.to_vec();
    let idx = index.clone();
    let all = tokio::task::spawn_blocking(move || candidates(&idx, &wanted)).await??;
    if !anchors.is_empty() && all.is_empty() {
        bail!(
            "no synced mappings from {}: run `nixpfs anchors sync` first",
            anchors.join(", ")
        );
    }
    let mut budget = Budget::new(max_size.unwrap_or(u64::MAX));
    let total = all
        .iter()
        .map(|c| c.nar_size)
        .fold(0u64, u64::saturating_add)
        .min(budget.left());
    meter.start("seeding", Unit::Bytes, Some(total));
    let mut pinned = Vec::new();
    for candidate in all {
        if !budget.admits(candidate.nar_size) {
            continue;
        }
        let cid = parse_cid(&candidate.cid)?;
        let pin = match node.pin_at_most(cid, budget.left()).await {
            Ok(pin) => pin,
            Err(IpfsError::DagTooLarge { limit, .. }) => {
                Metrics::inc(&metrics.seed_refused);
                tracing::warn!(
                    store_path = %candidate.store_path,
                    %cid,
                    declared = candidate.nar_size,
                    limit,
                    "seed: refused, the DAG behind the CID is larger than the budget left"
                );
                continue;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("while seeding {} ({cid})", candidate.store_path)))
            }
        };
        budget.spend(pin.dag_size);
        // A cache pin: retention (`cache_max_size`) may evict it.
        crate::publish::retention::record(&index, pin, candidate.nar_hash).await;
        pinned.push(PinEntry {
            cid: pin.cid.to_string(),
            size: pin.size,
            store_path: Some(candidate.store_path),
        });
        meter.add(candidate.nar_size);
    }
    Ok(pinned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_admits_what_fits_and_spends_what_was_pinned() {
        let mut budget = Budget::new(100);
        assert!(budget.admits(60));
        // Declared 60, but the pin held 70: 30 left, not 40.
        budget.spend(70);
        assert_eq!(budget.left(), 30);
        assert!(!budget.admits(40));
        assert!(budget.admits(30));
        budget.spend(500);
        assert_eq!(budget.left(), 0);
        assert!(budget.admits(0));
        assert!(!budget.admits(1));
    }

    #[test]
    fn no_budget_admits_anything() {
        let mut budget = Budget::new(u64::MAX);
        assert!(budget.admits(u64::MAX));
        budget.spend(1 << 40);
        assert!(budget.admits(1 << 50));
    }
}
