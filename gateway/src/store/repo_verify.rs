//! `repo verify` (as Kubo's `ipfs repo verify`): re-checks everything the
//! data directory holds against what it claims to be, and lists what is
//! damaged. Every block is re-hashed against its CID; every pin's DAG is
//! walked over the local store; every path the index says we hold (own pins,
//! cache pins) must have its CID pinned with its DAG complete; every stored
//! mapping set is re-read and must hash to the digest of its trusted state.
//!
//! # Goals
//! - Find damage a crash, a bad disk or a hand edit left behind, naming the
//!   block, pin, path or set and what is wrong with it.
//! - Run the same against a data directory or through a running gateway.
//!
//! # Non-goals
//! - Repairing: the report says what to re-pin or re-sync; `gc` and the
//!   commands that wrote the data fix it.
//! - Checking what peers or anchors hold: only this directory is read.

use std::collections::HashSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::store::index::{Index, IndexError};
use crate::store::ipfs::{Cid, IpfsError, Node};
use crate::util::progress::{Meter, Unit};

/// What a damaged item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    /// A stored block whose bytes do not hash to its CID, or cannot be read.
    Block,
    /// A pin whose DAG is not complete or not readable locally.
    Pin,
    /// An indexed path (own or cache pin) whose CID is not held whole.
    Path,
    /// A stored mapping set that no longer matches its trusted digest.
    Set,
}

/// One damaged item: which, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Damage {
    pub part: Part,
    /// The block's or pin's CID, the store path, or the set's owner.
    pub item: String,
    pub problem: String,
}

/// What was checked, and what was found damaged (empty when clean).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoReport {
    pub blocks: u64,
    pub block_bytes: u64,
    pub pins: u64,
    pub paths: u64,
    pub sets: u64,
    pub damaged: Vec<Damage>,
}

impl RepoReport {
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty()
    }
}

/// Why verification could not run at all (damage is reported, not an error).
#[derive(Debug, thiserror::Error)]
pub enum RepoVerifyError {
    #[error(transparent)]
    Ipfs(#[from] IpfsError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("verification task failed: {0}")]
    Task(String),
}

/// Checks the whole data directory; see the module docs. GC is held off
/// meanwhile, so a block it would delete is not reported missing.
pub async fn verify_repo(
    node: &Node,
    index: Arc<Index>,
    meter: &Meter,
) -> Result<RepoReport, RepoVerifyError> {
    let _hold = node.hold_gc().await;
    let mut report = RepoReport::default();
    check_blocks(node, meter, &mut report).await?;

    let pins = node.pins().await?;
    meter.start("checking pins", Unit::Items, Some(pins.len() as u64));
    let mut whole = HashSet::new();
    for pin in &pins {
        match node.check_local_dag(pin.cid).await {
            Ok(_) => {
                whole.insert(pin.cid);
            }
            Err(e) => report.damaged.push(Damage {
                part: Part::Pin,
                item: pin.cid.to_string(),
                problem: e.to_string(),
            }),
        }
        report.pins += 1;
        meter.add(1);
    }

    let idx = index.clone();
    let (locals, cache_pins) = tokio::task::spawn_blocking(move || {
        Ok::<_, IndexError>((idx.locals()?, idx.cache_pins()?))
    })
    .await
    .map_err(|e| RepoVerifyError::Task(e.to_string()))??;
    let held = locals
        .iter()
        .map(|l| (l.narinfo.store_path.to_string(), l.cid.clone()))
        .chain(
            cache_pins
                .iter()
                .map(|c| (format!("cache pin of {}", c.nar_hash), c.cid.clone())),
        );
    for (item, cid) in held {
        report.paths += 1;
        let problem = match cid.parse::<Cid>() {
            Err(e) => Some(format!("indexed CID {cid} does not parse: {e}")),
            Ok(cid) if whole.contains(&cid) => None,
            Ok(cid) if pins.iter().any(|p| p.cid == cid) => {
                Some(format!("its CID {cid} is pinned but its DAG is damaged"))
            }
            Ok(cid) => Some(format!("its CID {cid} is not pinned")),
        };
        if let Some(problem) = problem {
            report.damaged.push(Damage {
                part: Part::Path,
                item,
                problem,
            });
        }
    }

    meter.start("checking mapping sets", Unit::Items, None);
    let checks = tokio::task::spawn_blocking(move || index.verify_sets())
        .await
        .map_err(|e| RepoVerifyError::Task(e.to_string()))?;
    for check in checks {
        report.sets += 1;
        meter.add(1);
        if let Err(problem) = check.result {
            report.damaged.push(Damage {
                part: Part::Set,
                item: check.owner,
                problem: format!("{problem} (file {})", check.file.display()),
            });
        }
    }
    Ok(report)
}

/// Re-hashes every stored block on the blocking pool.
async fn check_blocks(
    node: &Node,
    meter: &Meter,
    report: &mut RepoReport,
) -> Result<(), RepoVerifyError> {
    let store = node.store().clone();
    let meter = meter.clone();
    let (blocks, bytes, damaged) = tokio::task::spawn_blocking(move || {
        let listed = store.list()?;
        let total = listed.iter().map(|(_, n)| n).sum();
        meter.start("re-hashing blocks", Unit::Bytes, Some(total));
        let (mut blocks, mut bytes, mut damaged) = (0u64, 0u64, Vec::new());
        for (cid, len) in listed {
            match store.get_verified(&cid) {
                // Gone since the listing (a GC of an older run): not damage.
                Ok(None) => {}
                Ok(Some(_)) => {
                    blocks += 1;
                    bytes += len;
                }
                Err(e) => {
                    blocks += 1;
                    bytes += len;
                    damaged.push(Damage {
                        part: Part::Block,
                        item: cid.to_string(),
                        problem: e.to_string(),
                    });
                }
            }
            meter.add(len);
        }
        Ok::<_, IpfsError>((blocks, bytes, damaged))
    })
    .await
    .map_err(|e| RepoVerifyError::Task(e.to_string()))??;
    report.blocks = blocks;
    report.block_bytes = bytes;
    report.damaged.extend(damaged);
    Ok(())
}
