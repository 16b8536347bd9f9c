//! The gateway's state directory opened as one thing — IPFS node, index,
//! signing key, catalog — and the operations on it. The CLI runs these
//! directly when no gateway is serving, and through the admin API (see
//! `admin`) when one is, so both paths execute the same code.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anchor_registry::{
    Decision, NarHash, NarInfo, Policy, SecretKey, StorePath, StorePathHash, Vouch,
};
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, Trust};
use crate::config::Config;
use crate::index::{Index, LocalPath};
use crate::ipfs::{Cid, Multiaddr, Node, NodeConfig};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::nar::{NarReader, Sha256Tee};
use crate::sync::{SyncReport, Syncer};

/// Everything the gateway keeps under its data directory.
#[derive(Debug, Clone)]
pub struct App {
    pub data_dir: PathBuf,
    pub config: Config,
    pub node: Node,
    pub index: Arc<Index>,
    pub catalog: Catalog,
    pub key: Arc<SecretKey>,
    pub metrics: Arc<Metrics>,
    /// When the last sync finished (unix seconds) and what it did.
    pub last_sync: Arc<std::sync::Mutex<Option<(u64, SyncReport)>>>,
}

/// One pinned thing, as `nixpfs pins` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinEntry {
    pub cid: String,
    /// File bytes (the NAR size for store paths).
    pub size: u64,
    /// The store path whose NAR this is, when pinned as a store path.
    pub store_path: Option<String>,
}

/// A conflict: registry anchors that signed different contents for one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub store_path: String,
    pub evidence: Vec<Vouch>,
}

/// What `nixpfs status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    pub connected_peers: usize,
    pub pins: usize,
    pub pinned_bytes: u64,
    pub local_paths: u64,
    pub registry_version: Option<u64>,
    /// Unix seconds when the last anchor sync finished, if any since start.
    pub last_sync: Option<u64>,
    pub anchors: Vec<AnchorStatus>,
    pub forks: usize,
    pub conflicts: usize,
    /// Reproducibility verdicts over claimed, rebuilt and multiply signed paths.
    #[serde(default)]
    pub repro: crate::community::ReproCounts,
    pub counters: MetricsSnapshot,
}

/// Per publisher: the newest set version trusted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnchorStatus {
    pub name: String,
    pub kind: String,
    pub version: u64,
    pub expires: u64,
    pub entries: u64,
    /// The last sync's outcome for this publisher (`accepted`, `unchanged`, `rejected`).
    pub last_sync: Option<String>,
}

/// The file holding the gateway's own narinfo signing key, by default.
pub fn default_key_file(data_dir: &Path) -> PathBuf {
    data_dir.join("gateway.key")
}

impl App {
    /// Opens (creating on first use) the data directory and starts the node.
    pub async fn open(data_dir: &Path, config: Config) -> Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("while creating the data directory {}", data_dir.display()))?;
        let key_file = config
            .signing_key_file
            .clone()
            .unwrap_or_else(|| default_key_file(data_dir));
        let key = Arc::new(load_or_create_key(&key_file)?);
        let index =
            Arc::new(Index::open(&data_dir.join("index.redb")).context(
                "while opening the index (is another nixpfs using this data directory?)",
            )?);
        let mut node_config = NodeConfig::new(data_dir.join("ipfs"));
        node_config.listen = parse_addrs(&config.ipfs_listen, "ipfs_listen")?;
        node_config.peers = parse_addrs(&config.peers, "peers")?;
        node_config.fetch_timeout = std::time::Duration::from_secs(config.fetch_timeout_secs);
        let node = Node::start(node_config)
            .await
            .context("while starting the IPFS node")?;
        let policy = Policy::new(
            u64::from(config.require),
            if config.anchors.is_empty() {
                None
            } else {
                Some(
                    config
                        .anchors
                        .iter()
                        .map(|a| anchor_registry::AnchorName::parse(a))
                        .collect::<Result<_, _>>()
                        .context("invalid anchor name in `anchors`")?,
                )
            },
        )
        .context("invalid policy")?;
        let catalog = Catalog::new(
            index.clone(),
            key.clone(),
            Trust {
                registry: None,
                policy,
            },
        );
        if let Some(text) = index.registry_text()? {
            if let Ok(registry) = anchor_registry::Registry::parse(&text) {
                catalog.set_registry(registry);
            }
        }
        Ok(Self {
            data_dir: data_dir.to_owned(),
            config,
            node,
            index,
            catalog,
            key,
            metrics: Arc::new(Metrics::default()),
            last_sync: Arc::default(),
        })
    }

    /// Pins store paths from the local Nix store: serialise each to NAR,
    /// import and pin it, check it against the store's NarHash, and only then
    /// index it as the user's own (served and seeded).
    pub async fn pin_store_paths(&self, paths: &[String], closure: bool) -> Result<Vec<PinEntry>> {
        let wanted = paths.to_vec();
        let infos =
            tokio::task::spawn_blocking(move || crate::nix_store::path_infos(&wanted, closure))
                .await??;
        let mut out = Vec::new();
        for info in infos {
            out.push(self.pin_store_path(info).await?);
        }
        Ok(out)
    }

    /// Pins one store path whose metadata the caller already has.
    pub(crate) async fn pin_store_path(&self, info: NarInfo) -> Result<PinEntry> {
        let path = info.store_path.to_string();
        let (pin, summary) = import_pinned(
            &self.node,
            Sha256Tee::new(NarReader::new(Path::new(&path))),
            Sha256Tee::summary,
            &path,
        )
        .await?;
        if summary.nar_hash != info.nar_hash || summary.nar_size != info.nar_size {
            let _ = self.node.unpin(pin.cid).await;
            bail!(
                "{path} changed on disk: the store says {} ({} bytes), its NAR is {} ({} bytes); run `nix-store --verify --check-contents`",
                info.nar_hash,
                info.nar_size,
                summary.nar_hash,
                summary.nar_size
            );
        }
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

    /// Pins store paths like [`App::pin_store_paths`] and signs a mapping of
    /// each into the working set of the anchor whose key is in `key_file`.
    pub async fn anchor_sign(
        &self,
        paths: &[String],
        closure: bool,
        key_file: &Path,
    ) -> Result<Vec<String>> {
        let key = crate::cli::read_secret_key(key_file)?;
        let wanted = paths.to_vec();
        let infos =
            tokio::task::spawn_blocking(move || crate::nix_store::path_infos(&wanted, closure))
                .await??;
        let mut mappings = Vec::new();
        for info in infos {
            let pinned = self.pin_store_path(info.clone()).await?;
            mappings.push(crate::anchor::mapping_for(&info, &pinned.cid, &key)?);
        }
        let signed = mappings.iter().map(|m| m.path().to_string()).collect();
        crate::anchor::add_to_working(&crate::anchor::anchor_dir(&self.data_dir, &key), mappings)?;
        Ok(signed)
    }

    /// Pins what registry anchors signed, newest set first, until the NARs
    /// pinned this way would exceed `max_size` bytes, so this node seeds
    /// them to others. `anchors` restricts to those names (all when empty).
    pub async fn seed(&self, anchors: &[String], max_size: Option<u64>) -> Result<Vec<PinEntry>> {
        let index = self.index.clone();
        let wanted: Vec<String> = anchors.to_vec();
        let candidates = tokio::task::spawn_blocking(move || {
            let mut states: Vec<_> = index
                .trusted_states()?
                .into_iter()
                .filter(|s| s.header().header().kind == anchor_registry::SetKind::Anchor)
                .filter(|s| wanted.is_empty() || wanted.iter().any(|w| w == s.anchor().as_str()))
                .collect();
            states.sort_by_key(|s| std::cmp::Reverse(s.header().header().created));
            let mut seen = std::collections::HashSet::new();
            let mut out = Vec::new();
            for state in states {
                for mapping in index
                    .owner_mappings(anchor_registry::SetKind::Anchor, state.anchor().as_str())?
                {
                    let data = mapping.data();
                    if seen.insert(data.nar_hash) {
                        out.push((data.path.to_string(), data.cid.to_string(), data.nar_size));
                    }
                }
            }
            Ok::<_, anyhow::Error>(out)
        })
        .await??;
        if !anchors.is_empty() && candidates.is_empty() {
            bail!(
                "no synced mappings from {}: run `nixpfs anchors sync` first",
                anchors.join(", ")
            );
        }
        let budget = max_size.unwrap_or(u64::MAX);
        let mut used = 0u64;
        let mut pinned = Vec::new();
        for (path, cid, size) in candidates {
            if used.saturating_add(size) > budget {
                continue;
            }
            let pin = self
                .node
                .pin(parse_cid(&cid)?)
                .await
                .with_context(|| format!("while seeding {path} ({cid})"))?;
            used += size;
            pinned.push(PinEntry {
                cid: pin.cid.to_string(),
                size: pin.size,
                store_path: Some(path),
            });
        }
        Ok(pinned)
    }

    /// Pins a CID, fetching missing blocks from peers.
    pub async fn pin_cid(&self, cid: &str) -> Result<PinEntry> {
        let cid = parse_cid(cid)?;
        let pin = self.node.pin(cid).await?;
        Ok(PinEntry {
            cid: pin.cid.to_string(),
            size: pin.size,
            store_path: None,
        })
    }

    /// Pins each target: a store path (from the local Nix store) or a CID.
    pub async fn pin(&self, targets: &[String], closure: bool) -> Result<Vec<PinEntry>> {
        let (paths, cids): (Vec<String>, Vec<String>) =
            targets.iter().cloned().partition(|t| t.starts_with('/'));
        let mut out = Vec::new();
        if !paths.is_empty() {
            out.extend(self.pin_store_paths(&paths, closure).await?);
        }
        for cid in &cids {
            out.push(self.pin_cid(cid).await?);
        }
        Ok(out)
    }

    /// Unpins store paths (and forgets them as the user's own) or CIDs.
    pub async fn unpin(&self, targets: &[String]) -> Result<Vec<String>> {
        let mut done = Vec::new();
        for target in targets {
            let cid = if target.starts_with('/') {
                let path = StorePath::parse(target)?;
                let hash = *path.hash();
                let index = self.index.clone();
                let removed =
                    tokio::task::spawn_blocking(move || index.remove_local(&hash)).await??;
                let Some(local) = removed else {
                    bail!("{target} is not pinned");
                };
                parse_cid(&local.cid)?
            } else {
                parse_cid(target)?
            };
            self.node.unpin(cid).await?;
            done.push(target.clone());
        }
        Ok(done)
    }

    /// Everything pinned, with the store path for the user's own paths.
    pub async fn pins(&self) -> Result<Vec<PinEntry>> {
        let index = self.index.clone();
        let locals = tokio::task::spawn_blocking(move || index.locals()).await??;
        let by_cid: std::collections::HashMap<String, String> = locals
            .into_iter()
            .map(|l| (l.cid, l.narinfo.store_path.to_string()))
            .collect();
        Ok(self
            .node
            .pins()
            .await?
            .into_iter()
            .map(|p| {
                let cid = p.cid.to_string();
                PinEntry {
                    store_path: by_cid.get(&cid).cloned(),
                    cid,
                    size: p.size,
                }
            })
            .collect())
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
        Ok(PinEntry {
            cid: pin.cid.to_string(),
            size: pin.size,
            store_path: None,
        })
    }

    /// Fetches a file by CID (local or peers, every block verified) into `out`,
    /// through a temporary file so a failed fetch leaves nothing behind.
    pub async fn fetch(&self, cid: &str, out: &Path) -> Result<u64> {
        let cid = parse_cid(cid)?;
        let dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = tempfile::NamedTempFile::new_in(dir)?;
        let (mut std_file, tmp_path) = tmp.into_parts();
        // Chunks go to a blocking thread as they are: no copy into an async
        // file's buffer, and the write overlaps the fetch of the next blocks.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
        let writer = tokio::task::spawn_blocking(move || {
            while let Some(chunk) = rx.blocking_recv() {
                std_file.write_all(&chunk)?;
            }
            std_file.sync_all()
        });
        let mut stream = Box::pin(self.node.cat(cid));
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.with_context(|| format!("while fetching {cid}"))?;
            written += chunk.len() as u64;
            if tx.send(chunk).await.is_err() {
                // The writer stopped: its error is reported below.
                break;
            }
        }
        drop(tx);
        writer
            .await
            .context("file writer task failed")?
            .with_context(|| format!("while writing {}", out.display()))?;
        tmp_path
            .persist(out)
            .with_context(|| format!("while writing {}", out.display()))?;
        Ok(written)
    }

    /// Loads the registry and anchors' sets from their sources.
    pub async fn sync(&self) -> Result<SyncReport> {
        let Some(source) = self.config.registry.clone() else {
            bail!(
                "no registry configured: set `registry` in the config or pass --registry FILE|URL"
            );
        };
        let syncer = Syncer {
            index: self.index.clone(),
            catalog: self.catalog.clone(),
            node: Some(self.node.clone()),
            metrics: self.metrics.clone(),
            registry_source: source,
        };
        let report = syncer.sync().await?;
        if let Ok(mut last) = self.last_sync.lock() {
            *last = Some((crate::catalog::unix_now(), report.clone()));
        }
        Ok(report)
    }

    /// Paths that registry anchors disagree about, with the signed evidence.
    pub async fn conflicts(&self) -> Result<Vec<Conflict>> {
        let index = self.index.clone();
        let catalog = self.catalog.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for hash in index.multi_asserted_paths()? {
                if let Some(Decision::Conflict { path, evidence }) = catalog.decide(&hash)? {
                    out.push(Conflict {
                        store_path: path.to_string(),
                        evidence,
                    });
                }
            }
            Ok(out)
        })
        .await?
    }

    /// Pins, anchors, conflicts, peers and counters.
    pub async fn status(&self) -> Result<Status> {
        let pins = self.node.pins().await?;
        let peers = self.node.connected_peers().await?;
        let conflicts = self.conflicts().await?.len();
        let index = self.index.clone();
        let (states, forks, locals) = tokio::task::spawn_blocking(move || {
            Ok::<_, anyhow::Error>((
                index.trusted_states()?,
                index.forks()?.len(),
                index.local_count()?,
            ))
        })
        .await??;
        let last_sync = self.last_sync.lock().ok().and_then(|l| l.clone());
        let outcome = |name: &str| {
            last_sync.as_ref().and_then(|(_, report)| {
                report
                    .anchors
                    .iter()
                    .find(|a| a.anchor == name)
                    .map(|a| a.outcome.clone())
            })
        };
        Ok(Status {
            peer_id: self.node.peer_id().to_string(),
            listen_addrs: self
                .node
                .listen_addrs()
                .iter()
                .map(ToString::to_string)
                .collect(),
            connected_peers: peers.len(),
            pins: pins.len(),
            pinned_bytes: pins.iter().map(|p| p.size).sum(),
            local_paths: locals,
            last_sync: last_sync.as_ref().map(|(at, _)| *at),
            registry_version: self
                .catalog
                .trust()
                .and_then(|t| t.registry)
                .map(|r| r.version()),
            anchors: states
                .iter()
                .map(|s| {
                    let h = s.header().header();
                    AnchorStatus {
                        name: h.anchor.to_string(),
                        kind: h.kind.to_string(),
                        version: h.version,
                        expires: h.expires,
                        entries: h.count,
                        last_sync: outcome(h.anchor.as_str()),
                    }
                })
                .collect(),
            forks,
            conflicts,
            repro: crate::community::repro_counts(self).await?,
            counters: self.metrics.snapshot(),
        })
    }

    /// The narinfo this gateway would serve for a store path, if any.
    pub fn lookup(&self, hash: &StorePathHash) -> Result<crate::catalog::Lookup> {
        Ok(self.catalog.lookup(hash)?)
    }

    /// The CID of the NAR with this hash, if known.
    pub fn nar_cid(&self, nar_hash: &NarHash) -> Result<Option<String>> {
        Ok(self.index.nar_location(nar_hash)?.map(|l| l.cid))
    }
}

/// Streams what a blocking reader produces (NAR bytes, in 1 MiB chunks) into
/// the node, imported and pinned; the reader runs on a blocking thread, and
/// `finish` turns the drained reader into what it computed on the way
/// (hashes, references). `what` names the source in errors.
pub(crate) async fn import_pinned<R, T>(
    node: &Node,
    reader: R,
    finish: impl FnOnce(&R) -> T + Send + 'static,
    what: &str,
) -> Result<(crate::ipfs::Pin, T)>
where
    R: Read + Send + 'static,
    T: Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    let producer = tokio::task::spawn_blocking(move || {
        let mut reader = reader;
        // Whole chunks of the DAG's size go to the import without a copy.
        let mut buf = vec![0u8; crate::ipfs::dag::CHUNK_SIZE];
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
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let pinned = node.add_chunks_and_pin(stream).await;
    let value = producer
        .await?
        .with_context(|| format!("while serialising {what}"))?;
    let pin = pinned.with_context(|| format!("while importing {what}"))?;
    Ok((pin, value))
}

/// Parses a CID given by a user, with a reason they can act on.
pub fn parse_cid(text: &str) -> Result<Cid> {
    text.parse::<Cid>()
        .map_err(|e| anyhow!("{text:?} is not a CID ({e}); expected e.g. bafybei…"))
}

fn parse_addrs(addrs: &[String], what: &str) -> Result<Vec<Multiaddr>> {
    addrs
        .iter()
        .map(|a| {
            a.parse::<Multiaddr>()
                .map_err(|e| anyhow!("invalid multiaddr {a:?} in {what}: {e}"))
        })
        .collect()
}

/// The gateway's narinfo signing key: read it, or create it on first start.
pub fn load_or_create_key(path: &Path) -> Result<SecretKey> {
    if path.exists() {
        return crate::cli::read_secret_key(path);
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && !h.contains(':') && !h.contains(char::is_whitespace))
        .unwrap_or_else(|| "localhost".to_owned());
    let key = SecretKey::generate(&format!("{host}-nixpfs-1"))?;
    crate::cli::write_secret_file(path, &key.to_string())
        .with_context(|| format!("while writing the gateway key {}", path.display()))?;
    Ok(key)
}
