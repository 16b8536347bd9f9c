//! `nixpfs anchor rebuild`: a rebuilder anchor realises each derivation
//! itself (build if absent, `--check` if present), hashes and seeds *its own*
//! result, compares it with the claims and other anchors' mappings in the
//! index, signs it into its working set and records a verdict.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anchor_registry::{
    ContentId, ImportProfile, Mapping, MappingData, NarInfo, Registry, SecretKey, SetKind,
    StorePath,
};
use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

use super::repro::{judge, OwnResult, RebuildRecord, RecordStore, Verdict};
use crate::nix::build::{self as nix, Derivation, OutputResult};
use crate::nix::refs::{RefScan, ScanReader};
use crate::publish::Publisher;
use crate::store::index::NarLocation;
use crate::store::nar::{NarReader, NarSummary, Sha256Tee};
use crate::util::progress::Unit;
use crate::util::time::{now, unix_now};

/// What one `anchor rebuild` did, with where the time went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildReport {
    pub records: Vec<RebuildRecord>,
    /// Mappings added to the anchor's working set by this run.
    pub signed: usize,
    /// Milliseconds spent in Nix commands (building, checking, queries).
    pub nix_ms: u64,
    /// Milliseconds for the whole run; the rest is ours (NAR hashing,
    /// IPFS import, signing, comparison, bookkeeping).
    pub total_ms: u64,
}

/// The options of one rebuild run.
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    pub key: SecretKey,
    /// Sign only results that match a claim.
    pub only_if_matches: bool,
}

/// Rebuilds every target (a `.drv`, or an output path whose deriver the
/// store knows) and signs this node's own results.
pub async fn rebuild(
    p: &Publisher,
    targets: &[String],
    options: &RebuildOptions,
) -> Result<RebuildReport> {
    let started = Instant::now();
    let wanted = targets.to_vec();
    let (drvs, invalid) = tokio::task::spawn_blocking(move || {
        let drvs = nix::show_derivations(&nix::derivations_of(&wanted)?)?;
        let outputs: Vec<String> = drvs
            .iter()
            .flat_map(|d| d.outputs.values().cloned())
            .collect();
        let invalid = nix::invalid_paths(&outputs)?;
        Ok::<_, nix::NixError>((drvs, invalid))
    })
    .await??;
    let mut nix_time = started.elapsed();
    // Nix builds one derivation at a time here, so each verdict is about
    // exactly the derivation it names.
    let meter = p.pinner.meter();
    meter.start("rebuilding", Unit::Items, Some(drvs.len() as u64));
    let mut rebuilt = Vec::with_capacity(drvs.len());
    for drv in drvs {
        let (task_drv, task_invalid) = (drv.clone(), invalid.clone());
        let done =
            tokio::task::spawn_blocking(move || nix::rebuild(&task_drv, &task_invalid)).await??;
        nix_time += done.nix_time;
        rebuilt.push((drv, done.outputs));
        meter.add(1);
    }
    let plain: Vec<String> = rebuilt
        .iter()
        .flat_map(|(_, outputs)| outputs)
        .filter(|o| o.result.as_deref().is_ok_and(|p| p == Path::new(&o.output)))
        .map(|o| o.output.clone())
        .collect();
    let queried = Instant::now();
    let infos = if plain.is_empty() {
        Vec::new()
    } else {
        tokio::task::spawn_blocking(move || crate::nix::path_info::path_infos(&plain, false))
            .await??
    };
    nix_time += queried.elapsed();
    let registry = p.catalog.trust().and_then(|t| t.registry);
    let mut records = Vec::new();
    let mut to_sign = Vec::new();
    meter.start("pinning results", Unit::Bytes, None);
    for (drv, outputs) in rebuilt {
        for output in outputs {
            let (record, took) =
                record_output(p, options, &drv, output, &infos, registry.as_ref()).await?;
            nix_time += took;
            if record.signed {
                if let Some(result) = &record.result {
                    to_sign.push(result.mapping.clone());
                }
            }
            records.push(record);
        }
    }
    let signed = to_sign.len();
    if !to_sign.is_empty() {
        let dir = crate::publish::anchor::anchor_dir(&p.data_dir, &options.key)?;
        crate::publish::anchor::add_to_working(&dir, to_sign)?;
    }
    RecordStore::new(&p.data_dir).save(&records)?;
    Ok(RebuildReport {
        records,
        signed,
        nix_ms: millis(nix_time),
        total_ms: millis(started.elapsed()),
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Hashes, seeds and signs one output's result, compares it, and returns
/// its record with the time spent in Nix queries on the way.
async fn record_output(
    p: &Publisher,
    options: &RebuildOptions,
    drv: &Derivation,
    output: OutputResult,
    infos: &[NarInfo],
    registry: Option<&Registry>,
) -> Result<(RebuildRecord, Duration)> {
    let key = &options.key;
    let store_path = StorePath::parse(&output.output)
        .with_context(|| format!("Nix reported an invalid output path {}", output.output))?;
    let mut record = RebuildRecord {
        store_path: store_path.clone(),
        derivation: drv.path.clone(),
        key: key.public(),
        at: now()?,
        mode: output.mode,
        result: None,
        agreeing: Vec::new(),
        disagreeing: Vec::new(),
        signed: false,
        verdict: Verdict::NotChecked {
            reason: String::new(),
        },
    };
    let built_at = match output.result {
        Ok(path) => path,
        Err(reason) => {
            tracing::warn!(path = %store_path, "not rebuilt: {reason}");
            record.verdict = Verdict::NotChecked { reason };
            return Ok((record, Duration::ZERO));
        }
    };
    let mut nix_time = Duration::ZERO;
    let (mapping, cid) = if built_at == Path::new(&output.output) {
        let info = infos
            .iter()
            .find(|i| i.store_path == store_path)
            .ok_or_else(|| anyhow!("`nix path-info` did not report {store_path}"))?;
        // Serialises the output and checks it against the store's NarHash:
        // that NarHash is then our own result's.
        let pinned = p.pinner.pin_store_path(info.clone()).await?;
        (
            crate::publish::anchor::mapping_for(info, &pinned.cid, key)?,
            pinned.cid,
        )
    } else {
        let queried = Instant::now();
        let drv_path = drv.path.clone();
        let candidates =
            tokio::task::spawn_blocking(move || nix::reference_candidates(&drv_path)).await??;
        nix_time += queried.elapsed();
        let candidates: Vec<StorePath> = candidates
            .iter()
            .filter_map(|p| StorePath::parse(p).ok())
            .collect();
        let (cid, summary, references) = import_result(p, &built_at, candidates).await?;
        let data = MappingData {
            path: store_path.clone(),
            nar_hash: summary.nar_hash,
            nar_size: summary.nar_size,
            references,
            deriver: StorePath::parse(&drv.path).ok(),
            ca: None,
            cid: ContentId::parse(&cid).context("the node produced an unusable CID")?,
            profile: ImportProfile::unixfs_v1_2025(),
        };
        (data.sign(key), cid)
    };
    let index = p.catalog.index().clone();
    let hash = *store_path.hash();
    let assertions =
        tokio::task::spawn_blocking(move || index.assertions(&hash, unix_now())).await??;
    let (agreeing, disagreeing, verdict) =
        judge(mapping.nar_hash(), &key.public(), &assertions, registry);
    record.signed = !options.only_if_matches || agreeing.iter().any(|p| p.kind == SetKind::Claims);
    tracing::info!(path = %store_path, ?verdict, signed = record.signed, "rebuilt");
    record.result = Some(own_result(&mapping, built_at, cid));
    record.agreeing = agreeing;
    record.disagreeing = disagreeing;
    record.verdict = verdict;
    Ok((record, nix_time))
}

fn own_result(mapping: &Mapping, built_at: PathBuf, cid: String) -> OwnResult {
    OwnResult {
        nar_hash: *mapping.nar_hash(),
        nar_size: mapping.data().nar_size,
        built_at,
        cid,
        mapping: mapping.clone(),
    }
}

/// Serialises a result Nix did not register (`<out>.check`) to NAR, hashing
/// it, scanning it for references and importing it (pinned) in one pass,
/// and records where its bytes are. Nix rewrote its self-references to the
/// output's own path, so the NAR is what the output would be.
async fn import_result(
    p: &Publisher,
    built_at: &Path,
    candidates: Vec<StorePath>,
) -> Result<(String, NarSummary, std::collections::BTreeSet<StorePath>)> {
    let reader = ScanReader::new(
        Sha256Tee::new(NarReader::new(built_at)),
        RefScan::new(candidates),
    );
    let (pin, (summary, references)) = crate::publish::pin::import_pinned(
        &p.node,
        reader,
        |r| (r.inner().summary(), r.references().clone()),
        &built_at.display().to_string(),
        p.pinner.meter(),
    )
    .await?;
    let location = NarLocation {
        cid: pin.cid.to_string(),
        nar_size: summary.nar_size,
        verified: true,
    };
    let index = p.catalog.index().clone();
    let nar_hash = summary.nar_hash;
    tokio::task::spawn_blocking(move || index.put_nar_location(&nar_hash, &location)).await??;
    Ok((pin.cid.to_string(), summary, references))
}
