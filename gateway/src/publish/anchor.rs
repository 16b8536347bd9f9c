//! The anchor side: signing mappings of store paths this node has pinned into
//! the anchor's working set, and publishing that set as the next version of
//! its signed, hash-chained mapping set.
//!
//! Files under `<data-dir>/anchor/<key name>/`: `working.jsonl` (one
//! canonical mapping per line, what the next version will contain) and
//! `published.header` (the signed header line of the last version written,
//! which the next version chains to).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anchor_registry::{
    AnchorName, ContentAddress, ContentId, ImportProfile, Mapping, MappingData, MappingSetBuilder,
    NarInfo, SecretKey, SetKind, SignedHeader,
};
use anyhow::{bail, Context, Result};

use crate::publish::pin::Pinner;
use crate::util::time::unix_now;

/// Where an anchor key's working files live.
pub fn anchor_dir(data_dir: &Path, key: &SecretKey) -> PathBuf {
    data_dir.join("anchor").join(key.name())
}

/// The mapping an anchor signs for a path it has pinned under `cid`.
pub fn mapping_for(narinfo: &NarInfo, cid: &str, key: &SecretKey) -> Result<Mapping> {
    let data = MappingData {
        path: narinfo.store_path.clone(),
        nar_hash: narinfo.nar_hash,
        nar_size: narinfo.nar_size,
        references: narinfo.references.iter().cloned().collect(),
        deriver: narinfo.deriver.clone(),
        ca: narinfo
            .ca
            .as_deref()
            .map(ContentAddress::parse)
            .transpose()
            .context("the store reported an unusable content address")?,
        cid: ContentId::parse(cid).context("the node produced an unusable CID")?,
        profile: ImportProfile::unixfs_v1_2025(),
    };
    Ok(data.sign(key))
}

/// Reads the working set (empty when none yet).
pub fn read_working(dir: &Path) -> Result<Vec<Mapping>> {
    let path = dir.join("working.jsonl");
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("while opening {}", path.display())),
    };
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line?;
        let mapping = Mapping::parse_canonical(line.as_bytes(), &mut scratch)
            .with_context(|| format!("{} line {}: invalid mapping", path.display(), n + 1))?;
        out.push(mapping);
    }
    Ok(out)
}

/// Adds (or replaces, by store path) mappings in the working set.
pub fn add_to_working(dir: &Path, mappings: Vec<Mapping>) -> Result<usize> {
    std::fs::create_dir_all(dir)?;
    let mut by_hash = std::collections::BTreeMap::new();
    for m in read_working(dir)?.into_iter().chain(mappings) {
        by_hash.insert(*m.path().hash(), m);
    }
    let mut text = Vec::new();
    for m in by_hash.values() {
        text.extend_from_slice(m.to_canonical_string().as_bytes());
        text.push(b'\n');
    }
    crate::util::fs::write_atomically(&dir.join("working.jsonl"), &text)?;
    Ok(by_hash.len())
}

/// Pins store paths like [`Pinner::pin_store_paths`] and signs a mapping of
/// each into the working set of `key`'s anchor; returns the paths signed.
pub async fn sign(
    pinner: &Pinner,
    data_dir: &Path,
    paths: &[String],
    closure: bool,
    key: &SecretKey,
) -> Result<Vec<String>> {
    let mut mappings = Vec::new();
    for info in crate::publish::pin::path_infos(paths, closure).await? {
        let pinned = pinner.pin_store_path(info.clone()).await?;
        mappings.push(mapping_for(&info, &pinned.cid, key)?);
    }
    let signed = mappings.iter().map(|m| m.path().to_string()).collect();
    add_to_working(&anchor_dir(data_dir, key), mappings)?;
    Ok(signed)
}

/// Writes the next version of the anchor's set to `out`: every working
/// mapping, chained to the last version published from this directory.
pub fn publish(
    data_dir: &Path,
    key: &SecretKey,
    name: Option<&str>,
    kind: SetKind,
    expires_in: u64,
    out: &Path,
) -> Result<SignedHeader> {
    let dir = anchor_dir(data_dir, key);
    let mappings = read_working(&dir)?;
    if mappings.is_empty() {
        bail!(
            "nothing to publish: the working set of {} is empty (sign paths first)",
            key.name()
        );
    }
    let anchor = AnchorName::parse(name.unwrap_or(key.name()))
        .context("the anchor name (the key's name unless --name is given) is not valid")?;
    let header_file = dir.join("published.header");
    let mut builder = match std::fs::read(&header_file) {
        Ok(line) => {
            let previous = SignedHeader::parse(line.trim_ascii_end())
                .with_context(|| format!("corrupt {}", header_file.display()))?;
            if previous.header().anchor != anchor || previous.header().kind != kind {
                bail!(
                    "{} was published as {} {}; use that name or a fresh data directory",
                    key.name(),
                    previous.header().kind,
                    previous.header().anchor
                );
            }
            MappingSetBuilder::next_after(&previous)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            MappingSetBuilder::first(kind, anchor)
        }
        Err(e) => {
            return Err(e).with_context(|| format!("while reading {}", header_file.display()))
        }
    };
    builder.extend(mappings);
    let now = unix_now();
    let mut bytes = Vec::new();
    let header = builder.write(key, now, now.saturating_add(expires_in), &mut bytes)?;
    crate::util::fs::write_atomically(out, &bytes)?;
    let mut line = header.line().as_bytes().to_vec();
    if line.last() != Some(&b'\n') {
        line.push(b'\n');
    }
    crate::util::fs::write_atomically(&header_file, &line)?;
    std::io::stdout().flush()?;
    Ok(header)
}
