//! The gateway's data directory opened and wired together: the IPFS node,
//! the index and catalog, the signing key, the publisher, and the operations
//! the CLI runs on them — directly when no gateway is serving, through the
//! admin API (see [`admin`]) when one is, so both paths execute the same
//! code. Each operation hands a lower layer only the parts it uses.

mod admin;
pub mod serve;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anchor_registry::{AnchorName, Decision, Policy, SecretKey, SetKind, TrustRoot, TrustedState};
use anyhow::{bail, Context, Result};
use futures::StreamExt;

pub use crate::http::admin::{AnchorStatus, Conflict, Status};

use crate::config::Config;
use crate::publish::pin::parse_cid;
use crate::publish::Publisher;
use crate::store::index::Index;
use crate::store::ipfs::dht::DhtConfig;
use crate::store::ipfs::{Multiaddr, Node, NodeConfig};
use crate::trust::catalog::{Catalog, Trust};
use crate::trust::sync::{AnchorSync, Outcome, SyncReport, Syncer};
use crate::util::metrics::Metrics;
use crate::util::progress::{Meter, Unit};

/// Everything the gateway keeps under its data directory.
#[derive(Debug, Clone)]
pub struct App {
    data_dir: PathBuf,
    config: Config,
    node: Node,
    index: Arc<Index>,
    catalog: Catalog,
    key: Arc<SecretKey>,
    publisher: Publisher,
    /// The configured trust root, validated once at open; `None` when no
    /// registry is followed.
    trust_root: Option<TrustRoot>,
    metrics: Arc<Metrics>,
    /// The configured upstream caches and their health.
    upstreams: Arc<crate::trust::upstream::Upstreams>,
    /// When the last sync finished (unix seconds) and what it did.
    last_sync: Arc<std::sync::Mutex<Option<(u64, SyncReport)>>>,
}

/// What `nixpfs gc` did: the cache pins it evicted to honour
/// `cache_max_size`, and the blocks it deleted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GcOutcome {
    pub blocks: u64,
    pub bytes: u64,
    #[serde(default)]
    pub evicted: Vec<crate::publish::retention::Evicted>,
}

/// The file holding the gateway's own narinfo signing key, by default.
pub fn default_key_file(data_dir: &Path) -> PathBuf {
    data_dir.join("gateway.key")
}

/// The name a new gateway key gets: `<hostname>-nixpfs-1`, or `localhost`
/// for a hostname a key name cannot hold.
pub fn default_key_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && !h.contains(':') && !h.contains(char::is_whitespace))
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-nixpfs-1")
}

/// The gateway's narinfo signing key under `config` (created on first use).
pub fn gateway_key(data_dir: &Path, config: &Config) -> Result<SecretKey> {
    let key_file = config
        .signing_key_file
        .clone()
        .unwrap_or_else(|| default_key_file(data_dir));
    Ok(crate::util::keys::load_or_create_key(
        &key_file,
        &default_key_name(),
    )?)
}

impl App {
    /// Opens (creating on first use) the data directory, private to its
    /// owner (0700), and starts the node.
    pub async fn open(data_dir: &Path, config: Config) -> Result<Self> {
        crate::util::time::check_clock()?;
        let trust_root = config.validate()?;
        crate::util::fs::ensure_private_dir(data_dir)
            .context("while opening the data directory")?;
        let key = Arc::new(gateway_key(data_dir, &config)?);
        let index =
            Arc::new(Index::open(&data_dir.join("index.redb")).context(
                "while opening the index (is another nixpfs using this data directory?)",
            )?);
        let mut node_config = NodeConfig::new(data_dir.join("ipfs"));
        node_config.listen = parse_addrs(&config.ipfs_listen, "ipfs_listen")?;
        node_config.peers = parse_addrs(&config.peers, "peers")?;
        node_config.fetch_timeout = std::time::Duration::from_secs(config.fetch_timeout_secs);
        node_config.dht = Some(DhtConfig {
            mode: config.dht,
            protocol: config.dht_protocol()?,
            bootstrap: parse_addrs(&config.bootstrap, "bootstrap")?,
        });
        let metrics = Arc::new(Metrics::default());
        node_config.metrics = metrics.clone();
        node_config.store_blocks_rehash = config.store_blocks_rehash;
        node_config.routers = Some(Arc::new(crate::store::ipfs::routers::Routers::new(
            config.routers()?,
            metrics.clone(),
        )));
        let node = Node::start(node_config)
            .await
            .context("while starting the IPFS node")?;
        let catalog = Catalog::new(
            index.clone(),
            key.clone(),
            Trust {
                registry: None,
                policy: policy(&config)?,
            },
        );
        if let Some(registry) = crate::trust::sync::stored_registry(&index)? {
            catalog.set_registry(registry);
        }
        let publisher = Publisher::new(data_dir.to_owned(), node.clone(), catalog.clone());
        let upstreams = Arc::new(crate::trust::upstream::Upstreams::new(
            config.upstreams()?,
            metrics.clone(),
        ));
        Ok(Self {
            data_dir: data_dir.to_owned(),
            config,
            node,
            index,
            catalog,
            key,
            publisher,
            trust_root,
            metrics,
            upstreams,
            last_sync: Arc::default(),
        })
    }

    /// The IPFS node.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The node's listen multiaddrs, as text.
    pub fn listen_addrs(&self) -> Vec<String> {
        self.node
            .listen_addrs()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// Stops the node (its listeners and background tasks).
    pub async fn shutdown(&self) {
        self.node.shutdown().await;
    }

    /// Fetches a file by CID (local or peers, every block verified) into `out`,
    /// through a temporary file so a failed fetch leaves nothing behind;
    /// the bytes count into `meter`.
    pub async fn fetch(&self, cid: &str, out: &Path, meter: &Meter) -> Result<u64> {
        let cid = parse_cid(cid)?;
        // The root says how big the file is: one block, and a fetch needs it first anyway.
        let total = self.node.file_size(cid).await.ok();
        meter.start("fetching", Unit::Bytes, total);
        let tmp = tempfile::NamedTempFile::new_in(crate::util::fs::parent_dir(out))?;
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
            meter.add(chunk.len() as u64);
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
        self.sync_counted(&Meter::new()).await
    }

    /// [`App::sync`], counting the anchors synced into `meter`.
    pub async fn sync_counted(&self, meter: &Meter) -> Result<SyncReport> {
        let Some(source) = self.config.registry.clone() else {
            bail!(
                "no registry configured: set `registry` in the config or pass --registry FILE|URL"
            );
        };
        let Some(root) = self.trust_root.clone() else {
            bail!(crate::config::ConfigError::NoTrustRoot);
        };
        let syncer = Syncer {
            index: self.index.clone(),
            catalog: self.catalog.clone(),
            node: Some(self.node.clone()),
            metrics: self.metrics.clone(),
            registry_source: source,
            root,
            routers: self.config.routers.clone(),
            meter: meter.clone(),
        };
        let report = syncer.sync().await?;
        if let Ok(mut last) = self.last_sync.lock() {
            *last = Some((crate::util::time::unix_now(), report.clone()));
        }
        crate::publish::refresh_repro_counts(&self.publisher).await?;
        Ok(report)
    }

    /// Where IPNS names are resolved and published: the index, the DHT,
    /// the configured routers.
    pub fn names(&self) -> crate::trust::names::Names<'_> {
        crate::trust::names::Names {
            index: &self.index,
            node: Some(&self.node),
            routers: &self.config.routers,
            metrics: &self.metrics,
        }
    }

    /// Evicts cache pins beyond `cache_max_size` (least recently accessed
    /// first), then deletes every block no pin reaches.
    pub async fn gc(&self) -> Result<GcOutcome> {
        let evicted = match self.config.cache_max_size()? {
            Some(budget) => {
                crate::publish::retention::enforce(&self.node, &self.index, budget, &self.metrics)
                    .await?
            }
            None => Vec::new(),
        };
        let report = self.node.gc().await?;
        Ok(GcOutcome {
            blocks: report.blocks,
            bytes: report.bytes,
            evicted,
        })
    }

    /// Paths that registry anchors disagree about, with the signed evidence.
    pub async fn conflicts(&self) -> Result<Vec<Conflict>> {
        let catalog = self.catalog.clone();
        tokio::task::spawn_blocking(move || conflicts(&catalog)).await?
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
        let synced = last_sync
            .as_ref()
            .map_or(&[][..], |(_, report)| &report.anchors[..]);
        let anchors = anchor_statuses(&states, synced);
        let registry = self.catalog.trust().and_then(|t| t.registry);
        Ok(Status {
            peer_id: self.node.peer_id().to_string(),
            listen_addrs: self.listen_addrs(),
            connected_peers: peers.len(),
            pins: pins.len(),
            pinned_bytes: pins.iter().map(|p| p.size).sum(),
            local_paths: locals,
            last_sync: last_sync.as_ref().map(|(at, _)| *at),
            registry_version: registry.as_ref().map(|r| r.version()),
            registry_expires: registry.as_ref().map(|r| r.expires()),
            registry_error: last_sync
                .as_ref()
                .and_then(|(_, report)| report.registry_error.clone()),
            anchors,
            forks,
            conflicts,
            dht: self.node.dht_stats().await,
            repro: crate::publish::stored_repro_counts(&self.publisher).await?,
            upstreams: self.upstreams.statuses(),
            counters: self.metrics.snapshot(),
        })
    }
}

/// Every trusted set's publisher with the last sync's word on it, then the
/// anchors that sync rejected without any trusted set.
fn anchor_statuses(states: &[TrustedState], synced: &[AnchorSync]) -> Vec<AnchorStatus> {
    let reason = |a: &AnchorSync| (a.outcome == Outcome::Rejected).then(|| a.errors.join("; "));
    let mut out: Vec<AnchorStatus> = states
        .iter()
        .map(|s| {
            let h = s.header().header();
            let sync = synced
                .iter()
                .find(|a| h.kind == SetKind::Anchor && a.anchor == h.anchor.as_str());
            AnchorStatus {
                name: h.anchor.to_string(),
                kind: h.kind.to_string(),
                version: Some(h.version),
                expires: Some(h.expires),
                entries: Some(h.count),
                last_sync: sync.map(|a| a.outcome),
                reason: sync.and_then(reason),
            }
        })
        .collect();
    for a in synced {
        let known = out.iter().any(|s| s.kind == "anchor" && s.name == a.anchor);
        if !known {
            out.push(AnchorStatus {
                name: a.anchor.clone(),
                kind: SetKind::Anchor.to_string(),
                version: None,
                expires: None,
                entries: None,
                last_sync: Some(a.outcome),
                reason: reason(a),
            });
        }
    }
    out
}

/// The serve policy the configuration asks for.
fn policy(config: &Config) -> Result<Policy> {
    let anchors = if config.anchors.is_empty() {
        None
    } else {
        Some(
            config
                .anchors
                .iter()
                .map(|a| AnchorName::parse(a))
                .collect::<Result<_, _>>()
                .context("invalid anchor name in `anchors`")?,
        )
    };
    Policy::new(u64::from(config.require), anchors).context("invalid policy")
}

/// Every path registry anchors disagree about, with the signed evidence.
fn conflicts(catalog: &Catalog) -> Result<Vec<Conflict>> {
    let mut out = Vec::new();
    for hash in catalog.index().multi_asserted_paths()? {
        if let Some(Decision::Conflict { path, evidence }) = catalog.decide(&hash)? {
            out.push(Conflict {
                store_path: path.to_string(),
                evidence,
            });
        }
    }
    Ok(out)
}

fn parse_addrs(addrs: &[String], what: &str) -> Result<Vec<Multiaddr>> {
    addrs
        .iter()
        .map(|a| {
            a.parse::<Multiaddr>()
                .map_err(|e| anyhow::anyhow!("invalid multiaddr {a:?} in {what}: {e}"))
        })
        .collect()
}
