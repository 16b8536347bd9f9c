//! The user's own paths: NARs of local store paths (or any file, or a CID
//! from peers) imported, pinned and, for store paths, checked against the
//! NarHash the Nix store recorded before they are indexed as served. A
//! store path's leaves are not copied: they are rebuilt from its files
//! (`store::ipfs::storeblocks`), and a Nix GC root keeps the path alive
//! while it is pinned.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anchor_registry::{NarInfo, StorePath};
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::nix::gcroots;
use crate::store::index::LocalPath;
use crate::store::ipfs::storeblocks::Backing;
use crate::store::ipfs::{dag::CHUNK_SIZE, Cid, Node, Pin};
use crate::store::nar::{NarReader, NarSummary, Sha256Tee};
use crate::trust::catalog::Catalog;
use crate::util::progress::{Meter, Unit};

/// One pinned thing, as `nixpfs pins` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinEntry {
    pub cid: String,
    /// File bytes (the NAR size for store paths).
    pub size: u64,
    /// The store path whose NAR this is, when pinned as a store path.
    pub store_path: Option<String>,
}

impl PinEntry {
    /// A pin that is not (known as) a store path's NAR.
    pub fn of(pin: &Pin) -> Self {
        Self {
            cid: pin.cid.to_string(),
            size: pin.size,
            store_path: None,
        }
    }
}

/// What a pin target given by a user is: a store path (absolute, from the
/// local Nix store) or a CID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    StorePath(String),
    Cid(Cid),
}

impl Target {
    /// Tells a store path (it starts with `/`) from a CID, rejecting text
    /// that is neither with the reason.
    pub fn parse(text: &str) -> Result<Self> {
        if text.starts_with('/') {
            Ok(Self::StorePath(text.to_owned()))
        } else {
            parse_cid(text).map(Self::Cid)
        }
    }
}

/// Parses a CID given by a user, with a reason they can act on.
pub fn parse_cid(text: &str) -> Result<Cid> {
    text.parse::<Cid>()
        .map_err(|e| anyhow!("{text:?} is not a CID ({e}); expected e.g. bafybei…"))
}

/// A store path the user asked to unpin that is not one of their pins.
#[derive(Debug, thiserror::Error)]
#[error("{path} is not pinned")]
pub struct NotPinned {
    pub path: String,
}

/// Pins the user's own store paths into the node and records them in the
/// catalog as served.
#[derive(Debug, Clone)]
pub struct Pinner {
    node: Node,
    catalog: Catalog,
    /// Where the Nix GC roots of pinned store paths live.
    gc_roots: PathBuf,
    /// Counts the NAR bytes imported, for a progress bar.
    meter: Meter,
}

impl Pinner {
    /// A pinner keeping the GC roots of pinned store paths in `gc_roots`.
    pub fn new(node: Node, catalog: Catalog, gc_roots: PathBuf) -> Self {
        Self {
            node,
            catalog,
            gc_roots,
            meter: Meter::new(),
        }
    }

    /// This pinner counting into `meter`.
    pub fn with_meter(&self, meter: &Meter) -> Self {
        Self {
            meter: meter.clone(),
            ..self.clone()
        }
    }

    /// The meter this pinner counts into.
    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// Pins store paths from the local Nix store (with their closures when
    /// `closure`): serialise each to NAR, import and pin it, check it against
    /// the store's NarHash, and only then index it as the user's own.
    pub async fn pin_store_paths(&self, paths: &[String], closure: bool) -> Result<Vec<PinEntry>> {
        let infos = path_infos(paths, closure).await?;
        self.start_pinning(&infos);
        let mut out = Vec::new();
        for info in infos {
            out.push(self.pin_store_path(info).await?);
        }
        Ok(out)
    }

    /// Starts the meter's "pinning" step over these paths' NAR bytes.
    pub fn start_pinning(&self, infos: &[NarInfo]) {
        let total = infos.iter().map(|i| i.nar_size).sum();
        self.meter.start("pinning", Unit::Bytes, Some(total));
    }

    /// Pins one store path whose metadata the caller already has; its NAR
    /// bytes count into the meter as they are imported. The path becomes a
    /// Nix GC root first, so Nix cannot delete it while it is pinned.
    pub async fn pin_store_path(&self, info: NarInfo) -> Result<PinEntry> {
        let path = info.store_path.to_string();
        let (dir, p) = (self.gc_roots.clone(), path.clone());
        let had_root = tokio::task::spawn_blocking(move || {
            let had = gcroots::root_of(&dir, &p)?.symlink_metadata().is_ok();
            gcroots::add(&dir, &p)?;
            Ok::<_, gcroots::GcRootError>(had)
        })
        .await?
        .with_context(|| format!("while making {path} a Nix GC root"))?;
        let pinned = self.pin_backed(info).await;
        if pinned.is_err() && !had_root {
            let (dir, p) = (self.gc_roots.clone(), path.clone());
            let _ = tokio::task::spawn_blocking(move || gcroots::remove(&dir, &p)).await;
        }
        pinned
    }

    /// Imports the NAR of a store path keeping only the DAG's inner nodes,
    /// checks it against the store's NarHash, then pins it with the leaves
    /// backed by the path's files, and indexes it.
    async fn pin_backed(&self, info: NarInfo) -> Result<PinEntry> {
        let path = info.store_path.to_string();
        let reader = Sha256Tee::new(NarReader::recording(Path::new(&path)));
        let (stream, producer) = produce_chunks(reader, &self.meter, |r: &Sha256Tee<NarReader>| {
            (
                r.summary(),
                r.get_ref().layout().cloned().unwrap_or_default(),
            )
        });
        let hold = self.node.hold_gc().await;
        let imported = self.node.add_chunks_without_leaves(&hold, stream).await;
        let (summary, layout): (NarSummary, _) = producer
            .await?
            .with_context(|| format!("while serialising {path}"))?;
        let (imported, leaves) = imported.with_context(|| format!("while importing {path}"))?;
        if summary.nar_hash != info.nar_hash || summary.nar_size != info.nar_size {
            bail!(
                "{path} changed on disk: the store says {} ({} bytes), its NAR is {} ({} bytes); run `nix-store --verify --check-contents`",
                info.nar_hash,
                info.nar_size,
                summary.nar_hash,
                summary.nar_size
            );
        }
        let backing = Backing::new(Path::new(&path), &layout, &leaves)
            .map_err(|e| anyhow!("while mapping the NAR of {path} onto its files: {e}"))?;
        let pin = self
            .node
            .pin_backed(&hold, imported, backing)
            .await
            .with_context(|| format!("while pinning {path}"))?;
        drop(hold);
        let local = LocalPath {
            narinfo: info,
            cid: pin.cid.to_string(),
        };
        let catalog = self.catalog.clone();
        tokio::task::spawn_blocking(move || catalog.put_locals(vec![local])).await??;
        Ok(PinEntry {
            cid: pin.cid.to_string(),
            size: pin.size,
            store_path: Some(path),
        })
    }

    /// Pins each target: a store path (from the local Nix store) or a CID
    /// (fetching missing blocks from peers).
    pub async fn pin(&self, targets: &[String], closure: bool) -> Result<Vec<PinEntry>> {
        let mut paths = Vec::new();
        let mut cids = Vec::new();
        for target in targets {
            match Target::parse(target)? {
                Target::StorePath(path) => paths.push(path),
                Target::Cid(cid) => cids.push(cid),
            }
        }
        let mut out = Vec::new();
        if !paths.is_empty() {
            out.extend(self.pin_store_paths(&paths, closure).await?);
        }
        if !cids.is_empty() {
            self.meter
                .start("pinning CIDs", Unit::Items, Some(cids.len() as u64));
        }
        for cid in cids {
            out.push(PinEntry::of(&self.node.pin(cid).await?));
            // The user's pin now: retention never evicts it.
            let index = self.catalog.index().clone();
            tokio::task::spawn_blocking(move || index.remove_cache_pin(&cid.to_string(), false))
                .await??;
            self.meter.add(1);
        }
        Ok(out)
    }

    /// Unpins store paths (and forgets them as the user's own) or CIDs;
    /// returns the targets unpinned. A CID takes the user's own paths whose
    /// NAR it is along: their bytes go, so do their narinfos and GC roots.
    pub async fn unpin(&self, targets: &[String]) -> Result<Vec<String>> {
        let mut done = Vec::new();
        for target in targets {
            let (cid, store_paths) = match Target::parse(target)? {
                Target::Cid(cid) => {
                    let index = self.catalog.index().clone();
                    let key = cid.to_string();
                    let owned = tokio::task::spawn_blocking(move || {
                        let mut paths = Vec::new();
                        for local in index.locals()?.into_iter().filter(|l| l.cid == key) {
                            index.remove_local(local.narinfo.store_path.hash())?;
                            paths.push(local.narinfo.store_path.to_string());
                        }
                        Ok::<_, crate::store::index::IndexError>(paths)
                    })
                    .await??;
                    (cid, owned)
                }
                Target::StorePath(text) => {
                    let hash = *StorePath::parse(&text)?.hash();
                    let index = self.catalog.index().clone();
                    let (removed, twin) = tokio::task::spawn_blocking(move || {
                        let Some(local) = index.remove_local(&hash)? else {
                            return Ok((None, None));
                        };
                        let twin = index.locals()?.into_iter().find(|l| l.cid == local.cid);
                        Ok::<_, crate::store::index::IndexError>((Some(local), twin))
                    })
                    .await??;
                    let Some(local) = removed else {
                        return Err(NotPinned { path: text }.into());
                    };
                    let path = local.narinfo.store_path.to_string();
                    if let Some(twin) = twin {
                        // Another of the user's paths has the same NAR: the
                        // CID stays pinned, its leaves read from that path's
                        // files from now on (this one may go once its GC
                        // root does).
                        let twin_path = twin.narinfo.store_path.to_string();
                        self.pin_store_path(twin.narinfo).await.with_context(|| {
                            format!("while moving the pin of {path} to {twin_path}, which has the same NAR")
                        })?;
                        self.release_gc_root(path).await?;
                        done.push(target.clone());
                        continue;
                    }
                    (parse_cid(&local.cid)?, vec![path])
                }
            };
            // A seeded or fetched CID is also a cache pin: forget that record
            // first, so a crash in between leaves an unrecorded pin (harmless,
            // `gc` keeps it) rather than a record of a pin that is gone
            // (which `repo verify` reports as damage).
            let index = self.catalog.index().clone();
            let key = cid.to_string();
            tokio::task::spawn_blocking(move || index.remove_cache_pin(&key, true)).await??;
            self.node.unpin(cid).await?;
            for path in store_paths {
                self.release_gc_root(path).await?;
            }
            done.push(target.clone());
        }
        Ok(done)
    }

    /// Lets `nix-collect-garbage` delete `path` again.
    async fn release_gc_root(&self, path: String) -> Result<()> {
        let dir = self.gc_roots.clone();
        tokio::task::spawn_blocking(move || gcroots::remove(&dir, &path))
            .await?
            .context("while releasing the Nix GC root")?;
        Ok(())
    }

    /// Everything pinned, with the store path for the user's own paths.
    pub async fn pins(&self) -> Result<Vec<PinEntry>> {
        let index = self.catalog.index().clone();
        let locals = tokio::task::spawn_blocking(move || index.locals()).await??;
        // Store paths with the same contents share one NAR, so one pin: it
        // is listed once for each of them.
        let mut by_cid: HashMap<String, Vec<String>> = HashMap::new();
        for local in locals {
            by_cid
                .entry(local.cid)
                .or_default()
                .push(local.narinfo.store_path.to_string());
        }
        let mut out = Vec::new();
        for pin in self.node.pins().await? {
            let entry = PinEntry::of(&pin);
            match by_cid.get_mut(&entry.cid) {
                Some(paths) => {
                    paths.sort();
                    out.extend(paths.iter().map(|path| PinEntry {
                        store_path: Some(path.clone()),
                        ..entry.clone()
                    }));
                }
                None => out.push(entry),
            }
        }
        Ok(out)
    }

    /// Imports any file (pinned) and returns its CID.
    pub async fn add_file(&self, path: &Path) -> Result<PinEntry> {
        let file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("while opening {}", path.display()))?;
        let pin = self
            .node
            .add_and_pin(tokio::io::BufReader::with_capacity(1 << 20, file))
            .await?;
        Ok(PinEntry::of(&pin))
    }
}

/// The local store's metadata of `paths` (and their closures), read off the
/// async runtime.
pub async fn path_infos(paths: &[String], closure: bool) -> Result<Vec<NarInfo>> {
    let wanted = paths.to_vec();
    Ok(
        tokio::task::spawn_blocking(move || crate::nix::path_info::path_infos(&wanted, closure))
            .await??,
    )
}

/// Streams what a blocking reader produces (NAR bytes, in chunks of the
/// DAG's size) into the node, imported and pinned; the reader runs on a
/// blocking thread, and `finish` turns the drained reader into what it
/// computed on the way (hashes, references). `what` names the source in
/// errors; each chunk's bytes count into `meter`.
pub(crate) async fn import_pinned<R, T>(
    node: &Node,
    reader: R,
    finish: impl FnOnce(&R) -> T + Send + 'static,
    what: &str,
    meter: &Meter,
) -> Result<(Pin, T)>
where
    R: Read + Send + 'static,
    T: Send + 'static,
{
    let (stream, producer) = produce_chunks(reader, meter, finish);
    let pinned = node.add_chunks_and_pin(stream).await;
    let value = producer
        .await?
        .with_context(|| format!("while serialising {what}"))?;
    let pin = pinned.with_context(|| format!("while importing {what}"))?;
    Ok((pin, value))
}

/// Runs a blocking reader on the blocking pool, handing its bytes over in
/// chunks of the DAG's size (whole chunks need no copy in the import);
/// the task ends with what `finish` makes of the drained reader.
fn produce_chunks<R, T>(
    reader: R,
    meter: &Meter,
    finish: impl FnOnce(&R) -> T + Send + 'static,
) -> (
    impl futures::Stream<Item = std::io::Result<Bytes>> + Unpin,
    tokio::task::JoinHandle<Result<T>>,
)
where
    R: Read + Send + 'static,
    T: Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    let meter = meter.clone();
    let producer = tokio::task::spawn_blocking(move || {
        let mut reader = reader;
        let mut buf = vec![0u8; CHUNK_SIZE];
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                match reader.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let message = e.to_string();
                        let _ = tx.blocking_send(Err(e));
                        return Err(anyhow!(message));
                    }
                }
            }
            meter.add(filled as u64);
            if filled == 0
                || tx
                    .blocking_send(Ok(Bytes::copy_from_slice(&buf[..filled])))
                    .is_err()
                || filled < buf.len()
            {
                break;
            }
        }
        Ok(finish(&reader))
    });
    (
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx)),
        producer,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_store_paths_or_cids() {
        assert_eq!(
            Target::parse("/nix/store/abc-x").expect("path"),
            Target::StorePath("/nix/store/abc-x".to_owned())
        );
        let cid = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku";
        assert!(matches!(Target::parse(cid), Ok(Target::Cid(c)) if c.to_string() == cid));
        let err = Target::parse("nix/store/relative").expect_err("neither");
        assert!(err.to_string().contains("is not a CID"), "{err}");
    }
}
