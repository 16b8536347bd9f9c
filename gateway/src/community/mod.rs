//! The community-fed cache: contributors publish signed claims (evidence,
//! never enough to serve a path), rebuilder anchors rebuild independently
//! with `--check` semantics and sign only their own results, and reports
//! show per path who agrees with whom, with the signed evidence.

mod claims;
mod nix;
mod rebuild;
mod refs;
mod repro;

use std::collections::BTreeMap;

use anchor_registry::{Decision, Policy, StorePath};
use anyhow::Result;

pub use claims::{
    claims_by_path, contribute, default_claims_file, import_claims, import_verified, list, Claim,
    ClaimsError, ClaimsImport, Contribution, PathClaims,
};
pub use nix::{Mode, NixError};
pub use rebuild::{rebuild, RebuildOptions, RebuildReport};
pub use repro::{OwnResult, Party, PathReport, RebuildRecord, RecordStore, ReproCounts, Verdict};

use repro::report;

use crate::app::App;
use crate::catalog::unix_now;

/// `nixpfs repro`: a report for every path that has claims, a rebuild
/// record here, or mappings from more than one publisher, sorted by path.
pub async fn repro(app: &App) -> Result<Vec<PathReport>> {
    let index = app.index.clone();
    let registry = app.catalog.trust().and_then(|t| t.registry);
    let mut records = RecordStore::new(&app.data_dir).load()?;
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
                    |r| match Policy::default().evaluate(r, &path, &assertions) {
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

/// Verdict counts over [`repro`]'s paths, for `nixpfs status`.
pub async fn repro_counts(app: &App) -> Result<ReproCounts> {
    Ok(ReproCounts::of(&repro(app).await?))
}
