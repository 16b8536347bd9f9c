//! Seeding: pinning what registry anchors signed, newest set first, so this
//! node serves those NARs to others. Which NARs is decided from the index
//! alone (unit-tested); the pins then fetch them from peers.

use std::collections::HashSet;
use std::sync::Arc;

use anchor_registry::SetKind;
use anyhow::{bail, Context, Result};

use crate::publish::pin::{parse_cid, PinEntry};
use crate::store::index::{Index, IndexError};
use crate::store::ipfs::Node;
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

/// The candidates, in order, whose declared sizes fit in `budget` bytes: one
/// that would overflow it is skipped, and smaller ones after it still count.
pub fn within_budget(candidates: Vec<Candidate>, budget: u64) -> Vec<Candidate> {
    let mut used = 0u64;
    candidates
        .into_iter()
        .filter(|c| {
            let total = used.saturating_add(c.nar_size);
            let fits = total <= budget;
            if fits {
                used = total;
            }
            fits
        })
        .collect()
}

/// Pins what registry anchors signed, up to `max_size` bytes of NARs; each
/// NAR's declared size counts into `meter` once it is pinned.
pub async fn seed(
    node: &Node,
    index: Arc<Index>,
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
    let picked = within_budget(all, max_size.unwrap_or(u64::MAX));
    let total = picked.iter().map(|c| c.nar_size).sum();
    meter.start("seeding", Unit::Bytes, Some(total));
    let mut pinned = Vec::new();
    for candidate in picked {
        let pin = node
            .pin(parse_cid(&candidate.cid)?)
            .await
            .with_context(|| {
                format!("while seeding {} ({})", candidate.store_path, candidate.cid)
            })?;
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

    fn candidate(n: u8, nar_size: u64) -> Candidate {
        Candidate {
            store_path: format!("/nix/store/{n}"),
            cid: String::new(),
            nar_size,
            nar_hash: anchor_registry::NarHash::digest(&[n]),
        }
    }

    #[test]
    fn budget_skips_what_overflows_and_keeps_smaller_later_nars() {
        let picked = within_budget(
            vec![candidate(1, 60), candidate(2, 50), candidate(3, 40)],
            100,
        );
        assert_eq!(picked, vec![candidate(1, 60), candidate(3, 40)]);
    }

    #[test]
    fn no_budget_takes_everything_and_a_zero_budget_nothing() {
        let all = vec![candidate(1, u64::MAX), candidate(2, 1)];
        assert_eq!(within_budget(all.clone(), u64::MAX), all);
        assert!(within_budget(all, 0).is_empty());
    }
}
