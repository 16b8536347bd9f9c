//! What we sign and offer to others: the user's own pins, anchors' signed
//! sets, contributors' claims (evidence, never enough to serve a path),
//! rebuilds with `--check` semantics whose results a rebuilder anchor signs
//! alone, reproducibility reports, and seeding what registry anchors signed.

pub mod anchor;
mod claims;
pub mod names;
pub mod pin;
mod rebuild;
mod repro;
pub mod retention;
pub mod seed;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anchor_registry::{Decision, Policy, StorePath};
use anyhow::Result;

pub use crate::nix::build::{Mode, NixError};
pub use claims::{
    claims_by_path, contribute, default_claims_file, import_claims, import_named_claims,
    import_verified, list, Claim, ClaimsError, ClaimsImport, Contribution, PathClaims,
};
pub use rebuild::{rebuild, RebuildOptions, RebuildReport};
pub use repro::{OwnResult, Party, PathReport, RebuildRecord, RecordStore, ReproCounts, Verdict};

use repro::report;

use crate::store::ipfs::Node;
use crate::trust::catalog::Catalog;
use crate::util::time::unix_now;
use pin::Pinner;

/// What publishing works on, handed in by the caller: the node holding the
/// bytes, the catalog (and through it the index and the gateway's key), and
/// the data directory where working sets, claims and rebuild records live.
#[derive(Debug, Clone)]
pub struct Publisher {
    data_dir: PathBuf,
    node: Node,
    catalog: Catalog,
    pinner: Pinner,
}

impl Publisher {
    pub fn new(data_dir: PathBuf, node: Node, catalog: Catalog) -> Self {
        let pinner = Pinner::new(node.clone(), catalog.clone(), data_dir.join("gcroots"));
        Self {
            data_dir,
            node,
            catalog,
            pinner,
        }
    }

    /// Pins the user's own paths (see [`Pinner`]).
    pub fn pinner(&self) -> &Pinner {
        &self.pinner
    }

    /// This publisher with its pins and rebuilds counting into `meter`.
    pub fn with_meter(&self, meter: &crate::util::progress::Meter) -> Self {
        Self {
            pinner: self.pinner.with_meter(meter),
            ..self.clone()
        }
    }
}

/// `nixpfs repro`: a report for every path that has claims, a rebuild
/// record here, or mappings from more than one publisher, sorted by path.
pub async fn repro(p: &Publisher) -> Result<Vec<PathReport>> {
    let index = p.catalog.index().clone();
    let registry = p.catalog.trust().and_then(|t| t.registry);
    let mut records = RecordStore::new(&p.data_dir).load()?;
    tokio::task::spawn_blocking(move || {
        let now = unix_now();
        let mut claims = claims_by_path(&index, now)?;
        let mut paths: BTreeMap<String, StorePath> = BTreeMap::new();
        for path in claims.keys().chain(records.keys()) {
            if let Ok(parsed) = StorePath::parse(path) {
                paths.insert(path.clone(), parsed);
            }
        }
        for hash in index.multi_asserted_paths()? {
            if let Some(first) = index.assertions(&hash, now)?.first() {
                let path = first.mapping.path();
                paths.insert(path.to_string(), path.clone());
            }
        }
        let mut reports = Vec::with_capacity(paths.len());
        for (text, path) in paths {
            let assertions = index.assertions(path.hash(), now)?;
            let vouches = registry
                .as_ref()
                .map(
                    |r| match Policy::default().evaluate(r, path.hash(), &assertions) {
                        Decision::Serve { agreeing, .. } | Decision::NotEnough { agreeing, .. } => {
                            agreeing
                        }
                        Decision::Conflict { evidence, .. } => evidence,
                    },
                )
                .unwrap_or_default();
            let path_claims = claims.remove(&text).unwrap_or_default();
            let record = records.remove(&text);
            reports.push(report(text, path_claims, vouches, record));
        }
        Ok(reports)
    })
    .await?
}

/// Where the verdict counts of the last [`refresh_repro_counts`] are kept.
const REPRO_COUNTS_FILE: &str = "repro-counts.json";

/// Recomputes the verdict counts over [`repro`]'s paths and stores them, so
/// `nixpfs status` reads them instead of rebuilding the whole report. Run
/// after whatever changes the report's inputs (sync, claims, rebuilds).
pub async fn refresh_repro_counts(p: &Publisher) -> Result<ReproCounts> {
    let counts = ReproCounts::of(&repro(p).await?);
    crate::util::fs::write_atomically(
        &p.data_dir.join(REPRO_COUNTS_FILE),
        &serde_json::to_vec(&counts)?,
    )?;
    Ok(counts)
}

/// The stored verdict counts; computed and stored first when there are none
/// (or the file is damaged).
pub async fn stored_repro_counts(p: &Publisher) -> Result<ReproCounts> {
    match std::fs::read(p.data_dir.join(REPRO_COUNTS_FILE)) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(counts) => Ok(counts),
            Err(_) => refresh_repro_counts(p).await,
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => refresh_repro_counts(p).await,
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "while reading {}",
            p.data_dir.join(REPRO_COUNTS_FILE).display()
        ))),
    }
}
