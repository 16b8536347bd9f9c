//! Bulk-loads synthetic "own" store paths into a data directory's index, for
//! the narinfo benchmark in `scripts/bench-serve`: COUNT paths whose narinfos
//! look like real ones (references, deriver, a signature), a sample of their
//! narinfo URLs for `wrk`, and the narinfos the gateway would serve for that
//! sample as static files, for an nginx baseline. Run it while no gateway
//! uses the data directory (the index allows one process).
//!
//! Usage: bulk_local_paths DATA_DIR COUNT SAMPLE_FILE STATIC_DIR

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anchor_registry::{NarHash, NarInfo, Policy, SecretKey, StorePath};
use anyhow::{bail, Context, Result};
use gateway::store::index::{Index, LocalPath};
use gateway::trust::catalog::{Catalog, Lookup, Trust};

/// Paths written per index transaction.
const BATCH: usize = 20_000;
/// Narinfo URLs in the sample `wrk` picks from.
const SAMPLE: usize = 100_000;
/// Any valid CID: the benchmark never fetches these NARs.
const DUMMY_CID: &str = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy";

fn path(i: usize, suffix: &str) -> Result<StorePath> {
    let hash = NarHash::digest(format!("bench-path-{i}{suffix}").as_bytes()).to_nix32();
    Ok(StorePath::parse(&format!(
        "/nix/store/{}-bench-{i}{suffix}",
        &hash[..32]
    ))?)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, data_dir, count, sample_file, static_dir] = args.as_slice() else {
        bail!("usage: bulk_local_paths DATA_DIR COUNT SAMPLE_FILE STATIC_DIR");
    };
    let data_dir = PathBuf::from(data_dir);
    let count: usize = count.parse().context("COUNT must be a number")?;
    std::fs::create_dir_all(&data_dir)?;
    std::fs::create_dir_all(static_dir)?;
    let index = Arc::new(Index::open(&data_dir.join("index.redb"))?);
    let key = Arc::new(gateway::util::keys::load_or_create_key(
        &gateway::app::default_key_file(&data_dir),
        &gateway::app::default_key_name(),
    )?);
    let anchor = SecretKey::generate("bench-anchor-1")?;
    let catalog = Catalog::new(
        index,
        key,
        Trust {
            registry: None,
            policy: Policy::new(1, None)?,
        },
    );

    let mut batch = Vec::new();
    for i in 0..count {
        let store_path = path(i, "")?;
        let references = (i.saturating_sub(3)..i)
            .map(|j| path(j, ""))
            .collect::<Result<Vec<_>>>()?;
        let mut narinfo = NarInfo {
            store_path,
            url: String::new(),
            compression: Some("none".to_owned()),
            file_hash: None,
            file_size: None,
            nar_hash: NarHash::digest(&i.to_le_bytes()),
            nar_size: 4096 + i as u64,
            references,
            deriver: Some(path(i, ".drv")?),
            sigs: Vec::new(),
            ca: None,
        };
        narinfo.sign(&anchor);
        batch.push(LocalPath {
            narinfo,
            cid: DUMMY_CID.to_owned(),
        });
        if batch.len() == BATCH || i + 1 == count {
            catalog.put_locals(std::mem::take(&mut batch))?;
        }
    }

    let step = (count / SAMPLE).max(1);
    let mut sample = std::io::BufWriter::new(std::fs::File::create(sample_file)?);
    for i in (0..count).step_by(step) {
        let hash = path(i, "")?.hash().to_string();
        let Lookup::Found(info) = catalog.lookup(&anchor_registry::StorePathHash::parse(&hash)?)?
        else {
            bail!("path {i} was not indexed");
        };
        std::fs::write(
            PathBuf::from(static_dir).join(format!("{hash}.narinfo")),
            info.to_string(),
        )?;
        writeln!(sample, "/{hash}.narinfo")?;
    }
    sample.flush()?;
    println!(
        "indexed {count} paths; sample of {} URLs",
        count.div_ceil(step)
    );
    Ok(())
}
