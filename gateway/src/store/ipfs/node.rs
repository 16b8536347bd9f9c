//! The node: one process owns a data directory (`blocks/`, `pins.redb`,
//! `identity.key`) and a libp2p host (rust-ipfs: TCP+noise+yamux, identify,
//! ping, streams, and the Kademlia DHT when configured; no mDNS). It ties the
//! block store, DAG import/reads, bitswap, pins and content routing (the
//! DHT and Routing V1 routers) together behind one cheap-to-clone handle.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cid::Cid;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt, TryStreamExt};
use rust_ipfs::builder::IpfsBuilder;
use rust_ipfs::p2p::IdentifyConfiguration;
use rust_ipfs::swarm::behaviour::toggle::Toggle;
use rust_ipfs::{Ipfs, Keypair, Multiaddr, PeerId, Protocol};
use tokio::io::AsyncRead;
use tokio::sync::RwLock;
use tokio::task::JoinHandle;

use super::bitswap::{self, Bitswap, Stats};
use super::block::{self, Block};
use super::blockstore::{BlockStore, Held, WriteBatch};
use super::dag::{self, BlockSource, Imported};
use super::dht::{self, Dht, DhtConfig, DhtMode};
use super::exchange;
use super::identify;
use super::ipns;
use super::pins::{Pin, Pins};
use super::prefetch::{self, PrefetchBudget};
use super::routers::Routers;
use super::storeblocks::{Backing, StoreBlocks};
use super::IpfsError;
use crate::util::metrics::Metrics;
use crate::util::sync::lock;

/// How to start a [`Node`].
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Holds `blocks/`, `pins.redb` and `identity.key`; created if missing.
    pub data_dir: PathBuf,
    /// Addresses to listen on. Default: loopback TCP on a free port. To be
    /// reachable from other machines use e.g. `/ip4/0.0.0.0/tcp/4001`.
    pub listen: Vec<Multiaddr>,
    /// Peers (`…/p2p/<id>`) dialled at start, in the background.
    pub peers: Vec<Multiaddr>,
    /// How long a block may take to arrive from peers before a fetch fails.
    pub fetch_timeout: Duration,
    /// Blocks fetched ahead of the reader (memory: up to this many MiB).
    pub fetch_window: usize,
    /// Bytes all reads together may hold fetched ahead of their readers
    /// (each block ahead counts as [`prefetch::BLOCK_CHARGE`]).
    pub prefetch_bytes: usize,
    /// Content routing; `None` or mode off: only connected peers are asked.
    pub dht: Option<DhtConfig>,
    /// Routing V1 routers asked for providers beside the DHT.
    pub routers: Option<Arc<Routers>>,
    /// Re-hash every leaf rebuilt from a store path on each read, beside
    /// the stamp check (see [`super::storeblocks`]).
    pub store_blocks_rehash: bool,
    /// Where refused store-backed reads are counted.
    pub metrics: Arc<Metrics>,
}

/// How long a block may be missing from every connected peer before the
/// DHT is asked who has it (Kubo waits about as long).
const FIND_DELAY: Duration = Duration::from_secs(1);
/// Most IPNS records one lookup collects (Kubo asks for 16).
pub const MAX_RECORD_ANSWERS: usize = 16;

impl NodeConfig {
    /// Defaults: loopback listener, no peers, 60 s fetch timeout, 32 blocks ahead.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        NodeConfig {
            data_dir: data_dir.into(),
            listen: vec![Multiaddr::empty()
                .with(Protocol::Ip4(std::net::Ipv4Addr::LOCALHOST))
                .with(Protocol::Tcp(0))],
            peers: Vec::new(),
            fetch_timeout: Duration::from_secs(60),
            fetch_window: 32,
            prefetch_bytes: prefetch::DEFAULT_BUDGET,
            dht: None,
            routers: None,
            store_blocks_rehash: false,
            metrics: Arc::default(),
        }
    }
}

/// A peer we are connected to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectedPeer {
    pub peer_id: PeerId,
    /// From identify, once the peer has told us.
    pub agent_version: Option<String>,
}

/// A peer as [`Node::known_peer`] knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownPeer {
    /// Without `/p2p/<id>`.
    pub addrs: Vec<Multiaddr>,
    /// Whether it speaks bitswap; `None`: not known.
    pub bitswap: Option<bool>,
}

/// How long a connected peer may take to say where it listens, when a
/// Routing V1 client asks about it.
const KNOWN_PEER_IDENTIFY_TIMEOUT: Duration = Duration::from_secs(1);

/// What [`Node::gc`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct GcReport {
    pub blocks: u64,
    pub bytes: u64,
}

/// Handle to the running node; clones share it.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

struct Inner {
    ipfs: Ipfs,
    store: BlockStore,
    pins: Pins,
    bitswap: Bitswap,
    peer_id: PeerId,
    listen_addrs: Vec<Multiaddr>,
    fetch_timeout: Duration,
    fetch_window: usize,
    prefetch: PrefetchBudget,
    dht: Option<Dht>,
    routers: Option<Arc<Routers>>,
    /// Questions to and answers from other nixpfs gateways.
    exchange: exchange::Exchange,
    /// Imports and pins hold it shared; GC holds it exclusively, so it never
    /// deletes blocks of an import that is not pinned yet.
    gc_lock: RwLock<()>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Garbage collection waits while one of these is alive (see [`Node::hold_gc`]).
#[derive(Debug)]
pub struct GcHold<'a> {
    _shared: tokio::sync::RwLockReadGuard<'a, ()>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("peer_id", &self.inner.peer_id)
            .field("store", &self.inner.store.dir())
            .finish()
    }
}

fn host_err(e: impl std::fmt::Display) -> IpfsError {
    IpfsError::Host {
        reason: e.to_string(),
    }
}

fn join_err(e: tokio::task::JoinError) -> IpfsError {
    IpfsError::Task {
        reason: e.to_string(),
    }
}

/// Loads the node's Ed25519 identity, creating it on first start.
fn load_identity(path: &Path) -> Result<Keypair, IpfsError> {
    let err = |reason: String| IpfsError::Identity {
        path: path.to_path_buf(),
        reason,
    };
    match fs::read(path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| err(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| err(e.to_string()))?;
            crate::util::fs::write_atomically(path, &bytes).map_err(|e| err(e.to_string()))?;
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

impl Node {
    /// Opens the data directory and starts the host: identity, listeners,
    /// the bitswap protocol, then dials `cfg.peers` in the background.
    pub async fn start(cfg: NodeConfig) -> Result<Node, IpfsError> {
        let dir = cfg.data_dir.clone();
        let (rehash, metrics) = (cfg.store_blocks_rehash, cfg.metrics.clone());
        let (store, pins, keypair) = tokio::task::spawn_blocking(move || {
            fs::create_dir_all(&dir).map_err(|source| IpfsError::Io {
                path: dir.clone(),
                source,
            })?;
            let pins_path = dir.join("pins.redb");
            let pins = Pins::open(&pins_path)?;
            let backed = StoreBlocks::open(pins.database(), &pins_path, rehash, metrics)?;
            let store = BlockStore::open_backed(&dir.join("blocks"), Some(backed))?;
            let keypair = load_identity(&dir.join("identity.key"))?;
            Ok::<_, IpfsError>((store, pins, keypair))
        })
        .await
        .map_err(join_err)??;
        let peer_id = keypair.public().to_peer_id();
        let dht_config = cfg.dht.clone().filter(|d| d.mode != DhtMode::Off);
        let (behaviour, dht) = match &dht_config {
            Some(config) => {
                let (behaviour, handle) = dht::new(peer_id, config);
                (Some(behaviour), Some(handle))
            }
            None => (None, None),
        };
        let ipfs: Ipfs = IpfsBuilder::<Toggle<dht::Behaviour>>::with_keypair(&keypair)
            .map_err(host_err)?
            .with_identify(IdentifyConfiguration {
                agent_version: format!("nixpfs/{}", env!("CARGO_PKG_VERSION")),
                ..Default::default()
            })
            .with_ping(Default::default())
            .with_streams()
            .with_custom_behaviour(move |_| Ok(Toggle::from(behaviour)))
            .enable_tcp()
            .set_idle_connection_timeout(120)
            .start()
            .await
            .map_err(host_err)?;
        // Accept bitswap before any connection exists: only then does
        // identify advertise it (Helia asks only peers that do).
        let mut control = ipfs.stream_control().await.map_err(host_err)?;
        let incoming = control.accept(bitswap::PROTOCOL).map_err(host_err)?;
        let exchange_incoming = control.accept(exchange::PROTOCOL).map_err(host_err)?;
        let exchange = exchange::Exchange::new(control.clone(), exchange_incoming);
        let (bitswap, mut tasks) = Bitswap::start(control, incoming, store.clone());
        let mut listen_addrs = Vec::new();
        for addr in &cfg.listen {
            let id = ipfs
                .add_listening_address(addr.clone())
                .await
                .map_err(|e| IpfsError::Host {
                    reason: format!("cannot listen on {addr}: {e}"),
                })?;
            for a in ipfs.get_listening_address(id).await.map_err(host_err)? {
                listen_addrs.push(a.with(Protocol::P2p(peer_id)));
            }
        }
        if dht.is_some() {
            // libp2p-kad sends only confirmed external addresses in provider
            // records, and Kubo and Helia drop records without any: what we
            // listen on is what others can dial.
            for addr in &listen_addrs {
                ipfs.add_external_address(without_peer_id(addr))
                    .await
                    .map_err(host_err)?;
            }
        }
        tasks.push(tokio::spawn(track_peers(ipfs.clone(), bitswap.clone())));
        let node = Node {
            inner: Arc::new(Inner {
                ipfs,
                store,
                pins,
                bitswap,
                peer_id,
                listen_addrs,
                fetch_timeout: cfg.fetch_timeout,
                fetch_window: cfg.fetch_window.max(1),
                prefetch: PrefetchBudget::new(cfg.prefetch_bytes),
                dht,
                routers: cfg.routers.filter(|r| !r.is_empty()),
                exchange,
                gc_lock: RwLock::new(()),
                tasks: Mutex::new(tasks),
            }),
        };
        for addr in cfg.peers {
            let task = tokio::spawn(keep_connected(node.clone(), addr));
            node.lock_tasks().push(task);
        }
        if let (Some(dht), Some(config)) = (&node.inner.dht, dht_config) {
            for addr in config.bootstrap {
                if let Some(Protocol::P2p(peer)) = addr.iter().last() {
                    dht.add_address(peer, without_peer_id(&addr))?;
                }
                let task = tokio::spawn(keep_connected(node.clone(), addr));
                node.lock_tasks().push(task);
            }
            dht.bootstrap()?;
        }
        if node.inner.dht.is_some() {
            let task = tokio::spawn(provide_pins(node.clone()));
            node.lock_tasks().push(task);
        }
        Ok(node)
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        lock(&self.inner.tasks)
    }

    /// This node's peer id (stable across restarts).
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// Addresses we listen on, each ending in `/p2p/<our id>`.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.inner.listen_addrs.clone()
    }

    /// The block store (e.g. for checks and benchmarks).
    pub fn store(&self) -> &BlockStore {
        &self.inner.store
    }

    /// Blocks by CID, local first, else from peers (verified on arrival),
    /// for walks outside this module (CAR export, the trustless gateway).
    pub fn blocks(&self) -> Arc<dyn BlockSource> {
        self.source(None)
    }

    /// Bitswap counters since start.
    pub fn bitswap_stats(&self) -> &Stats {
        self.inner.bitswap.stats()
    }

    /// Blocks being fetched from peers now (wants someone still waits for).
    pub fn open_wants(&self) -> usize {
        self.inner.bitswap.open_wants()
    }

    /// Dials `addr` (which must end in `/p2p/<id>`) and waits until connected.
    pub async fn connect(&self, addr: Multiaddr) -> Result<PeerId, IpfsError> {
        let Some(Protocol::P2p(peer)) = addr.iter().last() else {
            return Err(IpfsError::MissingPeerId { addr });
        };
        let dial_err = |reason: String| IpfsError::Dial {
            addr: addr.clone(),
            reason,
        };
        let ipfs = &self.inner.ipfs;
        if !ipfs
            .is_connected(peer)
            .await
            .map_err(|e| dial_err(e.to_string()))?
        {
            ipfs.connect(addr.clone())
                .await
                .map_err(|e| dial_err(e.to_string()))?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !ipfs
                .is_connected(peer)
                .await
                .map_err(|e| dial_err(e.to_string()))?
            {
                if tokio::time::Instant::now() > deadline {
                    return Err(dial_err("not connected after 10 s".into()));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // Identify (asked by refresh_peers) sets the want window.
        refresh_peers(ipfs, &self.inner.bitswap, &mut Agents::new()).await;
        Ok(peer)
    }

    /// Connected peers, with agent versions where identify has run.
    pub async fn connected_peers(&self) -> Result<Vec<ConnectedPeer>, IpfsError> {
        let ipfs = &self.inner.ipfs;
        // Asked several at a time, so a peer that never answers costs one
        // IDENTIFY_TIMEOUT in all, not one each.
        let peers = ipfs.connected().await.map_err(host_err)?;
        Ok(futures::stream::iter(peers)
            .map(|peer_id| async move {
                let agent_version = identify::query(ipfs, peer_id, IDENTIFY_TIMEOUT)
                    .await
                    .ok()
                    .map(|i| i.agent_version)
                    .filter(|a| !a.is_empty());
                ConnectedPeer {
                    peer_id,
                    agent_version,
                }
            })
            .buffered(IDENTIFY_CONCURRENCY)
            .collect()
            .await)
    }

    /// Imports a byte stream (profile `unixfs-v1-2025`), durably, unpinned:
    /// the next [`gc`](Self::gc) removes it unless it gets pinned.
    pub async fn add<R: AsyncRead + Unpin>(&self, reader: R) -> Result<Imported, IpfsError> {
        let _guard = self.inner.gc_lock.read().await;
        dag::import(reader, &self.inner.store).await
    }

    /// [`add`](Self::add) for a stream of byte chunks; chunks of exactly
    /// [`dag::CHUNK_SIZE`] are stored without a copy.
    pub async fn add_chunks<S>(&self, chunks: S) -> Result<Imported, IpfsError>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Unpin,
    {
        let _guard = self.inner.gc_lock.read().await;
        dag::import_chunks(chunks, &self.inner.store).await
    }

    /// Imports and pins in one step; GC cannot run in between.
    pub async fn add_and_pin<R: AsyncRead + Unpin>(&self, reader: R) -> Result<Pin, IpfsError> {
        let _guard = self.inner.gc_lock.read().await;
        let imported = dag::import(reader, &self.inner.store).await?;
        self.pin_imported(imported).await
    }

    /// [`add_and_pin`](Self::add_and_pin) for a stream of byte chunks; chunks
    /// of exactly [`dag::CHUNK_SIZE`] are stored without a copy.
    pub async fn add_chunks_and_pin<S>(&self, chunks: S) -> Result<Pin, IpfsError>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Unpin,
    {
        let _guard = self.inner.gc_lock.read().await;
        let imported = dag::import_chunks(chunks, &self.inner.store).await?;
        self.pin_imported(imported).await
    }

    /// Imports a NAR's chunks storing only the DAG's inner nodes, under a
    /// [`GcHold`] that must last until [`pin_backed`](Self::pin_backed):
    /// the leaves' CIDs and lengths come back in order, to be backed by the
    /// store path the NAR was made of.
    pub async fn add_chunks_without_leaves<S>(
        &self,
        _hold: &GcHold<'_>,
        chunks: S,
    ) -> Result<(Imported, Vec<(Cid, u64)>), IpfsError>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Unpin,
    {
        dag::import_chunks_without_leaves(chunks, &self.inner.store).await
    }

    /// Pins a DAG imported by [`add_chunks_without_leaves`](Self::add_chunks_without_leaves)
    /// after recording, durably, how its leaves are rebuilt.
    pub async fn pin_backed(
        &self,
        _hold: &GcHold<'_>,
        imported: Imported,
        backing: Backing,
    ) -> Result<Pin, IpfsError> {
        let backed = self.backed()?.clone();
        let root = imported.cid;
        tokio::task::spawn_blocking(move || backed.insert(&root, &backing))
            .await
            .map_err(join_err)??;
        self.pin_imported(imported).await
    }

    fn backed(&self) -> Result<&StoreBlocks, IpfsError> {
        self.inner.store.backed().ok_or_else(|| IpfsError::Task {
            reason: "the block store has no store-path backings".into(),
        })
    }

    /// Records the pin of a DAG this node just imported (durably: the import
    /// synced its blocks) without walking it again; the caller holds the GC
    /// lock since before the import.
    async fn pin_imported(&self, imported: Imported) -> Result<Pin, IpfsError> {
        let pin = Pin {
            cid: imported.cid,
            size: imported.size,
            dag_size: imported.dag_size,
        };
        let pins = self.inner.pins.clone();
        tokio::task::spawn_blocking(move || pins.insert(&pin))
            .await
            .map_err(join_err)??;
        self.announce(pin.cid);
        Ok(pin)
    }

    /// Provides `cid` on the DHT in the background, if it runs.
    fn announce(&self, cid: Cid) {
        if let Some(dht) = self.inner.dht.clone() {
            tokio::spawn(async move {
                match dht.provide(&cid).await {
                    Ok(()) => tracing::debug!(%cid, "provided on the DHT"),
                    Err(e) => tracing::warn!(%cid, "{e}"),
                }
            });
        }
    }

    /// Announces on the DHT that this node has `cid` (`routing provide`).
    pub async fn provide(&self, cid: Cid) -> Result<(), IpfsError> {
        let dht = self.inner.dht.as_ref().ok_or(IpfsError::NoDht)?;
        Ok(dht.provide(&cid).await?)
    }

    /// Providers of `cid` from the configured routers and the DHT
    /// (`routing findprovs`), at most `limit`, found within `timeout`.
    pub async fn find_providers(
        &self,
        cid: Cid,
        limit: usize,
        timeout: Duration,
    ) -> Result<Vec<dht::Provider>, IpfsError> {
        if self.inner.dht.is_none() && self.inner.routers.is_none() {
            return Err(IpfsError::NoRouting);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut found: Vec<dht::Provider> = Vec::new();
        if let Some(routers) = &self.inner.routers {
            if let Ok(from_routers) =
                tokio::time::timeout_at(deadline, routers.find_providers(&cid)).await
            {
                found.extend(from_routers);
            }
        }
        if let Some(dht) = &self.inner.dht {
            let mut lookup = Box::pin(dht.find_providers(&cid));
            while found.len() < limit {
                match tokio::time::timeout_at(deadline, lookup.next()).await {
                    Ok(Some(p)) if !found.iter().any(|f| f.peer == p.peer) => found.push(p),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
        found.truncate(limit);
        Ok(found)
    }

    /// Whether this node holds the whole DAG of `cid`: pinned (a pin is
    /// recorded only once every block is durable), or every block stored.
    pub async fn holds(&self, cid: Cid) -> Result<bool, IpfsError> {
        let pins = self.inner.pins.clone();
        let store = self.inner.store.clone();
        let (pinned, has_root) = tokio::task::spawn_blocking(move || {
            Ok::<_, IpfsError>((pins.get(&cid)?.is_some(), store.has(&cid)?))
        })
        .await
        .map_err(join_err)??;
        if pinned {
            return Ok(true);
        }
        if !has_root {
            return Ok(false);
        }
        self.has_all(cid).await
    }

    /// Who provides `cid` as far as this node knows without asking anyone:
    /// itself when it [holds](Self::holds) the DAG (with its listen
    /// addresses), then the providers in the DHT's local record store.
    /// What the Routing V1 server answers; never a network lookup.
    pub async fn local_providers(&self, cid: Cid) -> Result<Vec<dht::Provider>, IpfsError> {
        let mut out = Vec::new();
        if self.holds(cid).await? {
            out.push(dht::Provider {
                peer: self.inner.peer_id,
                addrs: self
                    .inner
                    .listen_addrs
                    .iter()
                    .map(without_peer_id)
                    .collect(),
            });
        }
        if let Some(dht) = &self.inner.dht {
            for p in dht.local_providers(&cid).await? {
                if !out.iter().any(|o| o.peer == p.peer) {
                    out.push(dht::Provider {
                        peer: p.peer,
                        addrs: p.addrs.iter().map(without_peer_id).collect(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// What this node knows of `peer` without a lookup: its own listen
    /// addresses and bitswap, or for a connected peer what identify says
    /// over the open connection (listen addresses, whether it speaks
    /// bitswap), else the connection's addresses; `None` for a peer it is
    /// not connected to.
    pub async fn known_peer(&self, peer: PeerId) -> Result<Option<KnownPeer>, IpfsError> {
        if peer == self.inner.peer_id {
            return Ok(Some(KnownPeer {
                addrs: self
                    .inner
                    .listen_addrs
                    .iter()
                    .map(without_peer_id)
                    .collect(),
                bitswap: Some(true),
            }));
        }
        let ipfs = &self.inner.ipfs;
        if !ipfs.is_connected(peer).await.map_err(host_err)? {
            return Ok(None);
        }
        if let Ok(id) = identify::query(ipfs, peer, KNOWN_PEER_IDENTIFY_TIMEOUT).await {
            if !id.listen_addrs.is_empty() {
                return Ok(Some(KnownPeer {
                    addrs: id.listen_addrs.iter().map(without_peer_id).collect(),
                    bitswap: Some(id.protocols.iter().any(|p| p.starts_with("/ipfs/bitswap"))),
                }));
            }
        }
        let addrs = ipfs
            .addrs()
            .await
            .map_err(host_err)?
            .into_iter()
            .filter(|(p, _)| *p == peer)
            .flat_map(|(_, addrs)| addrs)
            .map(|a| without_peer_id(&a))
            .collect();
        Ok(Some(KnownPeer {
            addrs,
            bitswap: None,
        }))
    }

    /// Asks the routers who provides `cid` and dials each provider at its
    /// libp2p addresses (bitswap then asks the new peers).
    async fn dial_router_providers(&self, cid: Cid) {
        let Some(routers) = self.inner.routers.clone() else {
            return;
        };
        let providers = routers.find_providers(&cid).await;
        let dials = providers
            .into_iter()
            .filter(|p| p.peer != self.inner.peer_id)
            .map(|p| async move {
                for addr in p.addrs.iter().filter(|a| is_libp2p_tcp(a)) {
                    let addr = without_peer_id(addr).with(Protocol::P2p(p.peer));
                    match self.connect(addr.clone()).await {
                        Ok(_) => {
                            tracing::debug!(%cid, peer = %p.peer, %addr, "dialled a provider a router named");
                            return;
                        }
                        Err(e) => tracing::debug!(%cid, peer = %p.peer, "{e}"),
                    }
                }
            });
        futures::future::join_all(dials).await;
    }

    /// Puts a signed IPNS record on the DHT under its name's routing key
    /// (the local record store keeps it too); the number of peers that took
    /// it.
    pub async fn put_ipns_record(
        &self,
        name: &ipns::IpnsName,
        record: Vec<u8>,
    ) -> Result<usize, IpfsError> {
        let dht = self.inner.dht.as_ref().ok_or(IpfsError::NoDht)?;
        Ok(dht.put_record(name.routing_key(), record).await?)
    }

    /// Candidate IPNS records for `name` from the local record store and
    /// the DHT, unverified, as many as came within `timeout` (at most
    /// [`MAX_RECORD_ANSWERS`]).
    pub async fn get_ipns_records(
        &self,
        name: &ipns::IpnsName,
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>, IpfsError> {
        let dht = self.inner.dht.as_ref().ok_or(IpfsError::NoDht)?;
        let mut lookup = dht.get_record(name.routing_key()).take(MAX_RECORD_ANSWERS);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut found = Vec::new();
        while let Ok(Some(record)) = tokio::time::timeout_at(deadline, lookup.next()).await {
            found.push(record);
        }
        Ok(found)
    }

    /// The IPNS record the local DHT store holds for `name`, unverified.
    pub async fn local_ipns_record(&self, name: &ipns::IpnsName) -> Option<Vec<u8>> {
        let dht = self.inner.dht.as_ref()?;
        dht.local_record(name.routing_key()).await.ok().flatten()
    }

    /// Starts answering other gateways' narinfo questions (see
    /// [`exchange`]) with `responder`; only the first call counts.
    pub fn serve_exchange(&self, responder: exchange::Responder) {
        if let Some(task) = self.inner.exchange.serve(responder) {
            self.lock_tasks().push(task);
        }
    }

    /// Asks every connected peer `request` at once; the answers that came
    /// within `timeout`, by peer. Peers that are not nixpfs gateways refuse
    /// the protocol and are left out.
    pub async fn ask_peers(&self, request: &str, timeout: Duration) -> Vec<(PeerId, Vec<u8>)> {
        let peers = match self.inner.ipfs.connected().await {
            Ok(peers) => peers,
            Err(e) => {
                tracing::debug!("cannot list connected peers: {e}");
                return Vec::new();
            }
        };
        let asks = peers.into_iter().map(|peer| async move {
            match self.inner.exchange.ask(peer, request, timeout).await {
                Ok(Some(answer)) => Some((peer, answer)),
                Ok(None) => None,
                Err(e) => {
                    tracing::debug!(%peer, "narinfo exchange: {e}");
                    None
                }
            }
        });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// The DHT's routing table and store sizes, if it runs.
    pub async fn dht_stats(&self) -> Option<dht::DhtStats> {
        self.inner.dht.as_ref()?.stats().await.ok()
    }

    fn source(&self, batch: Option<WriteBatch>) -> Arc<NodeSource> {
        Arc::new(NodeSource(Arc::new(SourceInner {
            node: self.clone(),
            store: self.inner.store.clone(),
            bitswap: self.inner.bitswap.clone(),
            dht: self.inner.dht.clone(),
            timeout: self.inner.fetch_timeout,
            batch: batch.map(Mutex::new),
        })))
    }

    /// The whole file, in order: local blocks first, else from peers.
    pub fn cat(&self, cid: Cid) -> impl Stream<Item = Result<Bytes, IpfsError>> + Send + 'static {
        self.cat_range(cid, 0, None)
    }

    /// The whole file when every block is stored here and it is at most
    /// `max` bytes, else `None` (see [`dag::read_local`]). It reads files,
    /// so call it off the async runtime, as with the index.
    pub fn read_local(&self, cid: Cid, max: u64) -> Result<Option<Bytes>, IpfsError> {
        dag::read_local(&self.inner.store, cid, max)
    }

    /// `len` bytes (`None`: to the end) of the file from `offset`.
    pub fn cat_range(
        &self,
        cid: Cid,
        offset: u64,
        len: Option<u64>,
    ) -> impl Stream<Item = Result<Bytes, IpfsError>> + Send + 'static {
        dag::read_range(self.source(None), cid, offset, len, self.inner.fetch_window)
    }

    /// Size in bytes of the file `cid` (fetches its root block if needed).
    pub async fn file_size(&self, cid: Cid) -> Result<u64, IpfsError> {
        dag::file_size(&*self.source(None), cid).await
    }

    /// Whether every block of the DAG is stored locally.
    pub async fn has_all(&self, cid: Cid) -> Result<bool, IpfsError> {
        match self.check_local_dag(cid).await {
            Ok(_) => Ok(true),
            Err(IpfsError::BlockMissing { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Walks the DAG over the local store only (never asking peers):
    /// its block count, or the first block missing or malformed.
    pub async fn check_local_dag(&self, cid: Cid) -> Result<u64, IpfsError> {
        dag::walk_blocks(
            Arc::new(self.inner.store.clone()),
            cid,
            self.inner.fetch_window,
        )
        .try_fold(0u64, |n, _| async move { Ok(n + 1) })
        .await
    }

    /// Holds garbage collection off while alive, for callers that write
    /// blocks themselves (a CAR import) and pin them afterwards with
    /// [`Node::pin_held`]: a GC in between would delete them.
    pub async fn hold_gc(&self) -> GcHold<'_> {
        GcHold {
            _shared: self.inner.gc_lock.read().await,
        }
    }

    /// [`Node::pin`] under a [`GcHold`] the caller already has (taking the
    /// lock again could wait behind a queued GC forever).
    pub async fn pin_held(&self, _hold: &GcHold<'_>, cid: Cid) -> Result<Pin, IpfsError> {
        self.pin_locked(cid, u64::MAX).await
    }

    /// Pins `cid` recursively, fetching missing blocks from peers first; the
    /// pin is recorded only after every block is durable.
    pub async fn pin(&self, cid: Cid) -> Result<Pin, IpfsError> {
        let _guard = self.inner.gc_lock.read().await;
        self.pin_locked(cid, u64::MAX).await
    }

    /// [`Node::pin`], refused with [`IpfsError::DagTooLarge`] (nothing
    /// pinned) as soon as the DAG's blocks exceed `limit` bytes: the size a
    /// record declares for a CID says nothing about the DAG behind it, so a
    /// budget must count the blocks themselves. At most a fetch window of
    /// blocks beyond the limit is fetched; unpinned, they go at the next GC.
    pub async fn pin_at_most(&self, cid: Cid, limit: u64) -> Result<Pin, IpfsError> {
        let _guard = self.inner.gc_lock.read().await;
        self.pin_locked(cid, limit).await
    }

    async fn pin_locked(&self, cid: Cid, limit: u64) -> Result<Pin, IpfsError> {
        block::check_supported(&cid)?;
        let source = self.source(Some(self.inner.store.batch()));
        let dag_size = dag::walk_blocks(source.clone(), cid, self.inner.fetch_window)
            .try_fold(0u64, |acc, (_, n)| async move {
                let total = acc.saturating_add(n);
                if total > limit {
                    return Err(IpfsError::DagTooLarge { cid, limit });
                }
                Ok(total)
            })
            .await?;
        let size = dag::file_size(&*source, cid).await?;
        let batch = source
            .0
            .batch
            .as_ref()
            .map(|b| std::mem::replace(&mut *lock(b), self.inner.store.batch()));
        let pin = Pin {
            cid,
            size,
            dag_size,
        };
        let pins = self.inner.pins.clone();
        tokio::task::spawn_blocking(move || {
            if let Some(batch) = batch {
                batch.commit()?;
            }
            pins.insert(&pin)
        })
        .await
        .map_err(join_err)??;
        self.announce(cid);
        Ok(pin)
    }

    /// Removes a pin; its blocks go at the next [`gc`](Self::gc), the
    /// leaves backed by a store path at once (they cost no disk).
    pub async fn unpin(&self, cid: Cid) -> Result<(), IpfsError> {
        let pins = self.inner.pins.clone();
        let backed = self.backed()?.clone();
        let removed = tokio::task::spawn_blocking(move || {
            let removed = pins.remove(&cid)?;
            backed.remove(&cid)?;
            Ok::<_, IpfsError>(removed)
        })
        .await
        .map_err(join_err)??;
        if removed {
            Ok(())
        } else {
            Err(IpfsError::NotPinned { cid })
        }
    }

    /// All pins with their sizes.
    pub async fn pins(&self) -> Result<Vec<Pin>, IpfsError> {
        let pins = self.inner.pins.clone();
        tokio::task::spawn_blocking(move || pins.list())
            .await
            .map_err(join_err)?
    }

    /// Deletes every block not reachable from a pin, and the store-path
    /// backings of DAGs no longer pinned. Refuses (deleting nothing) if a
    /// pinned DAG cannot be walked completely; a backed leaf whose store
    /// path changed still counts as held (`repo verify` reports it).
    pub async fn gc(&self) -> Result<GcReport, IpfsError> {
        let _guard = self.inner.gc_lock.write().await;
        let mut keep = std::collections::HashSet::new();
        for pin in self.pins().await? {
            let mut walk = Box::pin(dag::walk_blocks(
                Arc::new(Held(self.inner.store.clone())),
                pin.cid,
                self.inner.fetch_window,
            ));
            while let Some(item) = walk.next().await {
                keep.insert(item?.0.hash().to_bytes());
            }
        }
        let store = self.inner.store.clone();
        let backed = self.backed()?.clone();
        tokio::task::spawn_blocking(move || {
            let mut report = GcReport::default();
            for root in backed.roots()? {
                if !keep.contains(&root.hash().to_bytes()) {
                    backed.remove(&root)?;
                }
            }
            for (cid, _) in store.list_files()? {
                if !keep.contains(&cid.hash().to_bytes()) {
                    report.bytes += store.delete(&cid)?;
                    report.blocks += 1;
                }
            }
            Ok(report)
        })
        .await
        .map_err(join_err)?
    }

    /// Stops the host and background tasks. Other clones become unusable.
    pub async fn shutdown(&self) {
        for t in self.lock_tasks().drain(..) {
            t.abort();
        }
        // Each peer's bitswap writer holds the engine, and with it the block
        // store and the pins database, until its sender goes; with peer
        // tracking stopped, only this drops them.
        self.inner.bitswap.set_peers(&[]).await;
        self.inner.ipfs.clone().exit_daemon().await;
    }
}

/// First wait before re-dialling an unreachable configured peer; it doubles
/// up to [`REDIAL_MAX`] while the peer stays away.
const REDIAL_MIN: Duration = Duration::from_secs(1);
const REDIAL_MAX: Duration = Duration::from_secs(60);
/// How often a configured peer's connection is checked.
const PEER_CHECK: Duration = Duration::from_secs(2);

/// Keeps one configured (static) peer connected: dials it at start and
/// whenever its connection is gone (restart, network loss, idle timeout),
/// backing off exponentially while it stays unreachable.
async fn keep_connected(node: Node, addr: Multiaddr) {
    let Some(Protocol::P2p(peer)) = addr.iter().last() else {
        tracing::warn!(%addr, "configured peer lacks /p2p/<peer id>: not dialled");
        return;
    };
    let mut backoff = REDIAL_MIN;
    let mut failures = 0u32;
    loop {
        if node.inner.ipfs.is_connected(peer).await.unwrap_or(false) {
            tokio::time::sleep(PEER_CHECK).await;
            continue;
        }
        match node.connect(addr.clone()).await {
            Ok(_) => {
                if failures > 0 {
                    tracing::info!(%peer, failures, "configured peer reconnected");
                }
                failures = 0;
                backoff = REDIAL_MIN;
            }
            Err(e) => {
                failures += 1;
                // Log the first failure, then at 2, 4, 8… so a long outage
                // does not flood the log.
                if failures.is_power_of_two() {
                    tracing::warn!(%peer, failures, retry_in = ?backoff, "configured peer unreachable: {e}");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(REDIAL_MAX);
            }
        }
    }
}

/// How long a peer may take to answer an identify request.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(2);
/// Identify requests to new peers in flight at once.
const IDENTIFY_CONCURRENCY: usize = 16;

/// Agent versions learned from identify, so each peer is asked only once.
type Agents = std::collections::HashMap<PeerId, String>;

/// Hands bitswap the connected peers, with a larger want window for peers
/// whose identify says they are nixpfs nodes.
async fn refresh_peers(ipfs: &Ipfs, bitswap: &Bitswap, agents: &mut Agents) {
    let Ok(peers) = ipfs.connected().await else {
        return;
    };
    agents.retain(|p, _| peers.contains(p));
    // New peers are asked once per connection, several at a time, so peers
    // that never answer (each costs IDENTIFY_TIMEOUT) delay the others by
    // one timeout, not one each; a peer that does not answer counts as
    // foreign.
    let new: Vec<PeerId> = peers
        .iter()
        .filter(|p| !agents.contains_key(p))
        .copied()
        .collect();
    let identified: Vec<(PeerId, String)> = futures::stream::iter(new)
        .map(|p| async move {
            let agent = identify::query(ipfs, p, IDENTIFY_TIMEOUT).await;
            (p, agent.map(|i| i.agent_version).unwrap_or_default())
        })
        .buffer_unordered(IDENTIFY_CONCURRENCY)
        .collect()
        .await;
    agents.extend(identified);
    let mut caps = Vec::with_capacity(peers.len());
    for p in peers {
        let agent = agents.get(&p).map_or("", String::as_str);
        caps.push((p, bitswap::PeerPolicy::for_agent(agent)));
    }
    bitswap.set_peers(&caps).await;
}

/// `addr` without its `/p2p/<id>` part: how the DHT stores an address.
fn without_peer_id(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

/// Whether libp2p's TCP transport dials `addr` (not an HTTP gateway or
/// WebSocket address a router may list beside it).
fn is_libp2p_tcp(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::Tcp(_)))
        && !addr.iter().any(|p| {
            matches!(
                p,
                Protocol::Http
                    | Protocol::Https
                    | Protocol::Tls
                    | Protocol::Ws(_)
                    | Protocol::Wss(_)
            )
        })
}

/// Provides every pin's root at start: provider records live in memory
/// (libp2p-kad republishes them while the node runs).
async fn provide_pins(node: Node) {
    let pins = match node.pins().await {
        Ok(pins) => pins,
        Err(e) => {
            tracing::warn!("cannot list pins to provide them: {e}");
            return;
        }
    };
    let Some(dht) = node.inner.dht.clone() else {
        return;
    };
    let mut provided = 0usize;
    for pin in pins {
        match dht.provide(&pin.cid).await {
            Ok(()) => provided += 1,
            Err(e) => tracing::debug!(cid = %pin.cid, "{e}"),
        }
    }
    tracing::info!(provided, "pins provided on the DHT");
}

/// Keeps bitswap's peer set in step with the swarm's connections.
async fn track_peers(ipfs: Ipfs, bitswap: Bitswap) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut agents = Agents::new();
    loop {
        tick.tick().await;
        refresh_peers(&ipfs, &bitswap, &mut agents).await;
    }
}

/// Local blocks first, then bitswap; when pinning, fetched blocks are
/// written to the store (synced later by the batch).
struct NodeSource(Arc<SourceInner>);

struct SourceInner {
    /// For dialling providers that routers name.
    node: Node,
    store: BlockStore,
    bitswap: Bitswap,
    dht: Option<Dht>,
    timeout: Duration,
    batch: Option<Mutex<WriteBatch>>,
}

impl NodeSource {
    fn fetch(&self, cid: Cid) -> BoxFuture<'static, Result<Bytes, IpfsError>> {
        let this = self.0.clone();
        Box::pin(async move {
            let store = this.store.clone();
            let local = tokio::task::spawn_blocking(move || store.get(&cid))
                .await
                .map_err(join_err)??;
            if let Some(b) = local {
                return Ok(b.into_data());
            }
            let get = this.bitswap.get(cid, this.timeout);
            let data = if this.dht.is_none() && this.node.inner.routers.is_none() {
                get.await?
            } else {
                // With no peer connected, bitswap cannot deliver: ask at once.
                let alone = this
                    .node
                    .inner
                    .ipfs
                    .connected()
                    .await
                    .is_ok_and(|p| p.is_empty());
                let delay = if alone { Duration::ZERO } else { FIND_DELAY };
                tokio::pin!(get);
                tokio::select! {
                    got = &mut get => got?,
                    () = tokio::time::sleep(delay) => {
                        // Nobody connected had it: ask the DHT and the
                        // routers. The DHT behaviour dials each provider it
                        // finds, we dial those the routers name, and
                        // bitswap asks every newly connected peer.
                        let dht_lookup = this.dht.clone().map(|dht| {
                            tokio::spawn(dht.find_providers(&cid).for_each(move |p| async move {
                                tracing::debug!(%cid, peer = %p.peer, "found a provider");
                            }))
                        });
                        let node = this.node.clone();
                        let routed = tokio::spawn(async move { node.dial_router_providers(cid).await });
                        let got = get.await;
                        if let Some(lookup) = dht_lookup {
                            lookup.abort();
                        }
                        routed.abort();
                        got?
                    }
                }
            };
            if this.batch.is_some() {
                let store = this.store.clone();
                let block = Block::from_store(cid, data.clone());
                let written = tokio::task::spawn_blocking(move || store.write(&block))
                    .await
                    .map_err(join_err)??;
                if let Some(b) = &this.batch {
                    lock(b).add(written);
                }
            }
            Ok(data)
        })
    }
}

impl BlockSource for NodeSource {
    fn get(&self, cid: Cid) -> BoxFuture<'static, Result<Bytes, IpfsError>> {
        self.fetch(cid)
    }

    fn prefetch(&self) -> Option<&PrefetchBudget> {
        Some(&self.0.node.inner.prefetch)
    }

    fn ensure(&self, cid: Cid) -> BoxFuture<'static, Result<u64, IpfsError>> {
        let this = self.0.clone();
        let fetch = self.fetch(cid);
        Box::pin(async move {
            let store = this.store.clone();
            let size = tokio::task::spawn_blocking(move || store.size(&cid))
                .await
                .map_err(join_err)??;
            match size {
                Some(n) => Ok(n),
                None => Ok(fetch.await?.len() as u64),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ipfs::dag::CHUNK_SIZE;
    use sha2::{Digest, Sha256};
    use std::time::Instant;

    /// Deterministic, non-repeating test bytes (xorshift), streamed.
    struct Noise {
        state: u64,
        left: u64,
    }

    impl AsyncRead for Noise {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = (buf.remaining() as u64).min(self.left) as usize / 8 * 8;
            let n = if n == 0 {
                (self.left as usize).min(buf.remaining())
            } else {
                n
            };
            let mut out = vec![0u8; n];
            for chunk in out.chunks_mut(8) {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                chunk.copy_from_slice(&self.state.to_le_bytes()[..chunk.len()]);
            }
            self.left -= n as u64;
            buf.put_slice(&out);
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn noise(seed: u64, len: u64) -> Noise {
        Noise {
            state: seed | 1,
            left: len,
        }
    }

    async fn node(dir: &Path, timeout: Duration) -> Node {
        let mut cfg = NodeConfig::new(dir);
        cfg.fetch_timeout = timeout;
        Node::start(cfg).await.unwrap()
    }

    async fn sha_of(
        stream: impl Stream<Item = Result<Bytes, IpfsError>>,
    ) -> Result<(Vec<u8>, u64), IpfsError> {
        let mut stream = Box::pin(stream);
        let mut h = Sha256::new();
        let mut n = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            n += chunk.len() as u64;
            h.update(&chunk);
        }
        Ok((h.finalize().to_vec(), n))
    }

    async fn sha_of_noise(seed: u64, len: u64) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut r = noise(seed, len);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                return h.finalize().to_vec();
            }
            h.update(&buf[..n]);
        }
    }

    /// Two nodes, B connected to A, in directories that live as long as
    /// the first item.
    async fn connected_pair() -> ((tempfile::TempDir, tempfile::TempDir), Node, Node) {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = node(da.path(), Duration::from_secs(1)).await;
        let b = node(db.path(), Duration::from_secs(1)).await;
        b.connect(a.listen_addrs()[0].clone()).await.unwrap();
        ((da, db), a, b)
    }

    /// B's answers from its peers to each question, asked all at once.
    async fn ask_each(b: &Node, questions: &[String]) -> Vec<Vec<(PeerId, Vec<u8>)>> {
        futures::future::join_all(
            questions
                .iter()
                .map(|q| b.ask_peers(q, Duration::from_secs(20))),
        )
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn questions_to_a_busy_peer_are_each_answered() {
        let (_dirs, a, b) = connected_pair().await;
        // A takes no question yet, like a gateway too busy to take them as
        // fast as they come: its inbound streams pile up.
        let questions: Vec<String> = (0..12)
            .map(|i| format!("{}{i}", if i % 3 == 0 { 'u' } else { 'k' }))
            .collect();
        let asked = tokio::spawn({
            let b = b.clone();
            let questions = questions.clone();
            async move { ask_each(&b, &questions).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A knows the paths whose name starts with "k".
        a.serve_exchange(Arc::new(|request: String| {
            Box::pin(async move {
                request
                    .starts_with('k')
                    .then(|| format!("answer to {request}").into_bytes())
            })
        }));
        let answers = asked.await.unwrap();
        for (question, answer) in questions.iter().zip(answers) {
            let expected = question
                .starts_with('k')
                .then(|| (a.peer_id(), format!("answer to {question}").into_bytes()));
            assert_eq!(answer.into_iter().next(), expected, "{question}");
        }
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_questions_get_their_own_answers_when_answered_out_of_order() {
        let (_dirs, a, b) = connected_pair().await;
        // Later questions are answered sooner: the answers must still go
        // to the questions they answer.
        a.serve_exchange(Arc::new(|request: String| {
            Box::pin(async move {
                let i: u64 = request.trim_start_matches('q').parse().ok()?;
                tokio::time::sleep(Duration::from_millis(20 - i % 20)).await;
                (i % 7 != 0).then(|| format!("answer to {request}").into_bytes())
            })
        }));
        let questions: Vec<String> = (0..200).map(|i| format!("q{i}")).collect();
        let answers = ask_each(&b, &questions).await;
        for (i, (question, answer)) in questions.iter().zip(answers).enumerate() {
            let expected =
                (i % 7 != 0).then(|| (a.peer_id(), format!("answer to {question}").into_bytes()));
            assert_eq!(answer.into_iter().next(), expected, "{question}");
        }
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_question_stuck_on_a_stream_is_asked_again_on_a_new_one() {
        let (_dirs, a, b) = connected_pair().await;
        // A sits on the first question it gets, as a hung peer would.
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        a.serve_exchange(Arc::new(move |request: String| {
            let first = asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
            Box::pin(async move {
                if first {
                    futures::future::pending::<()>().await;
                }
                Some(format!("answer to {request}").into_bytes())
            })
        }));
        let t0 = Instant::now();
        let answers = b.ask_peers("k1", Duration::from_secs(20)).await;
        assert_eq!(answers, vec![(a.peer_id(), b"answer to k1".to_vec())]);
        assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn identity_and_pins_survive_restart_and_gc_frees_unpinned() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let a = node(dir.path(), Duration::from_secs(1)).await;
        let first_start = t0.elapsed();
        let id = a.peer_id();
        let kept = a
            .add_and_pin(noise(1, 3 * CHUNK_SIZE as u64 + 5))
            .await
            .unwrap();
        let loose = a.add(noise(2, 2 * CHUNK_SIZE as u64)).await.unwrap();
        assert_eq!(kept.size, 3 * CHUNK_SIZE as u64 + 5);
        assert!(a.has_all(loose.cid).await.unwrap());
        a.shutdown().await;
        drop(a);

        // Tasks of the old node may hold the pin database a moment longer
        // (redb: "already open"); a new process never meets them.
        let mut tries = 0;
        let (a, warm_start) = loop {
            let t0 = Instant::now();
            let mut cfg = NodeConfig::new(dir.path());
            cfg.fetch_timeout = Duration::from_secs(1);
            match Node::start(cfg).await {
                Ok(a) => break (a, t0.elapsed()),
                Err(IpfsError::PinDb { reason, .. }) if reason.contains("already open") => {
                    tries += 1;
                    assert!(tries < 100, "the old node never released the pin database");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("restart: {e}"),
            }
        };
        assert!(
            warm_start < Duration::from_secs(1),
            "warm start took {warm_start:?} (cold {first_start:?})"
        );
        assert_eq!(a.peer_id(), id);
        assert_eq!(a.pins().await.unwrap(), vec![kept]);
        let report = a.gc().await.unwrap();
        assert_eq!(report.blocks, 3);
        assert!(report.bytes > 2 * CHUNK_SIZE as u64);
        assert!(!a.has_all(loose.cid).await.unwrap());
        assert!(a.has_all(kept.cid).await.unwrap());
        let (sha, n) = sha_of(a.cat(kept.cid)).await.unwrap();
        assert_eq!(n, kept.size);
        assert_eq!(sha, sha_of_noise(1, kept.size).await);
        a.unpin(kept.cid).await.unwrap();
        assert!(matches!(
            a.unpin(kept.cid).await,
            Err(IpfsError::NotPinned { .. })
        ));
        assert_eq!(a.gc().await.unwrap().blocks, 5);
        assert!(a.store().list().unwrap().is_empty());
        a.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn second_node_fetches_a_file_over_bitswap() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = node(da.path(), Duration::from_secs(5)).await;
        let b = node(db.path(), Duration::from_secs(2)).await;
        let len = 20 * CHUNK_SIZE as u64 + 777;
        let pinned = a.add_and_pin(noise(3, len)).await.unwrap();
        b.connect(a.listen_addrs()[0].clone()).await.unwrap();

        let t0 = Instant::now();
        let (sha, n) = sha_of(b.cat(pinned.cid)).await.unwrap();
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "cat over bitswap: {:.1} MB/s, {:?}",
            len as f64 / secs / 1e6,
            b.bitswap_stats()
        );
        assert_eq!(n, len);
        assert_eq!(sha, sha_of_noise(3, len).await);

        // A range from the middle, then pinning fetches and keeps every block.
        let (_, n) = sha_of(b.cat_range(pinned.cid, 5 * CHUNK_SIZE as u64 - 3, Some(10)))
            .await
            .unwrap();
        assert_eq!(n, 10);
        assert_eq!(b.file_size(pinned.cid).await.unwrap(), len);
        let pin = b.pin(pinned.cid).await.unwrap();
        assert_eq!(pin, pinned);
        assert!(b.has_all(pinned.cid).await.unwrap());

        let agents = b.connected_peers().await.unwrap();
        assert_eq!(agents.len(), 1);
        assert_eq!(agents[0].peer_id, a.peer_id());
        let want = concat!("nixpfs/", env!("CARGO_PKG_VERSION"));
        assert_eq!(agents[0].agent_version.as_deref(), Some(want));

        // Nobody has this block: the error names it, after the timeout.
        let missing = *Block::from_data(block::RAW, Bytes::from_static(b"nobody has me")).cid();
        let t0 = Instant::now();
        let err = sha_of(b.cat(missing)).await.unwrap_err();
        assert!(
            matches!(err, IpfsError::FetchTimeout { cid, .. } if cid == missing),
            "{err}"
        );
        assert!(err.to_string().contains(&missing.to_string()));
        assert!(t0.elapsed() < Duration::from_secs(4));
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_fetches_leave_no_wants_and_a_real_fetch_still_completes() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = node(da.path(), Duration::from_secs(5)).await;
        // A timeout far beyond the test: only dropping can end these wants.
        let b = node(db.path(), Duration::from_secs(600)).await;
        let len = 8 * CHUNK_SIZE as u64 + 1;
        let pinned = a.add_and_pin(noise(5, len)).await.unwrap();
        b.connect(a.listen_addrs()[0].clone()).await.unwrap();

        let source = b.blocks();
        let fetches: Vec<_> = (0..100u32)
            .map(|i| {
                let data = Bytes::from(format!("nobody has block {i}"));
                let cid = *Block::from_data(block::RAW, data).cid();
                tokio::spawn(source.get(cid))
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while b.open_wants() < 100 {
            assert!(Instant::now() < deadline, "{} wants", b.open_wants());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for f in &fetches {
            f.abort();
        }
        for f in fetches {
            assert!(f.await.unwrap_err().is_cancelled());
        }
        assert_eq!(b.open_wants(), 0, "aborted fetches left their wants");
        let released = b
            .bitswap_stats()
            .released
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(released, 100);

        let t0 = Instant::now();
        let (sha, n) = sha_of(b.cat(pinned.cid)).await.unwrap();
        assert_eq!((n, sha), (len, sha_of_noise(5, len).await));
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        assert_eq!(b.open_wants(), 0);
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test]
    async fn pin_at_most_refuses_a_dag_over_the_limit_and_pins_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path(), Duration::from_secs(1)).await;
        let len = 4 * CHUNK_SIZE as u64;
        let added = node.add(noise(6, len)).await.unwrap();
        let err = node.pin_at_most(added.cid, len / 2).await.unwrap_err();
        assert!(
            matches!(err, IpfsError::DagTooLarge { cid, limit } if cid == added.cid && limit == len / 2),
            "{err}"
        );
        assert!(node.pins().await.unwrap().is_empty());
        let pin = node.pin_at_most(added.cid, 2 * len).await.unwrap();
        assert!(pin.dag_size > len && pin.dag_size < 2 * len, "{pin:?}");
        assert_eq!(node.pins().await.unwrap(), vec![pin]);
        node.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_configured_peer_is_redialled_after_it_restarts() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let b_config = || {
            let mut cfg = NodeConfig::new(db.path());
            cfg.listen = vec![format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap()];
            cfg
        };
        let b = Node::start(b_config()).await.unwrap();
        let b_id = b.peer_id();
        let mut cfg = NodeConfig::new(da.path());
        cfg.peers = b.listen_addrs();
        let a = Node::start(cfg).await.unwrap();
        let connected = |a: Node| async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let peers = a.connected_peers().await.unwrap();
                if peers.iter().any(|p| p.peer_id == b_id) {
                    return true;
                }
                if Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        assert!(connected(a.clone()).await, "dialled at start");
        b.shutdown().await;
        drop(b);
        let deadline = Instant::now() + Duration::from_secs(10);
        while a.inner.ipfs.is_connected(b_id).await.unwrap() {
            assert!(
                Instant::now() < deadline,
                "still connected to a stopped peer"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let b = Node::start(b_config()).await.unwrap();
        assert_eq!(b.peer_id(), b_id);
        assert!(connected(a.clone()).await, "redialled after the restart");
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test]
    async fn gc_waits_for_a_hold_and_blocks_pinned_under_it_survive() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path(), Duration::from_secs(2)).await;
        let hold = node.hold_gc().await;
        let gc = tokio::spawn({
            let node = node.clone();
            async move { node.gc().await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!gc.is_finished(), "GC ran while an import held it off");
        let store = node.inner.store.clone();
        let block = Block::from_data(block::RAW, Bytes::from_static(b"imported, then pinned"));
        let cid = *block.cid();
        tokio::task::spawn_blocking(move || store.write(&block))
            .await
            .unwrap()
            .unwrap();
        node.pin_held(&hold, cid).await.unwrap();
        drop(hold);
        gc.await.unwrap().unwrap();
        assert!(
            node.inner.store.get(&cid).unwrap().is_some(),
            "pinned block kept"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupted_block_on_the_server_never_reaches_the_reader() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = node(da.path(), Duration::from_secs(5)).await;
        let b = node(db.path(), Duration::from_secs(1)).await;
        let pinned = a
            .add_and_pin(noise(4, 2 * CHUNK_SIZE as u64))
            .await
            .unwrap();
        let second = a
            .store()
            .list()
            .unwrap()
            .into_iter()
            .map(|(c, _)| c)
            .find(|c| *c != pinned.cid && a.store().size(c).unwrap() == Some(CHUNK_SIZE as u64))
            .unwrap();
        let path = a.store().path_of(&second);
        let mut bytes = fs::read(&path).unwrap();
        bytes[100] ^= 1;
        fs::write(&path, bytes).unwrap();
        b.connect(a.listen_addrs()[0].clone()).await.unwrap();
        let err = sha_of(b.cat(pinned.cid)).await.unwrap_err();
        assert!(matches!(err, IpfsError::FetchTimeout { .. }), "{err}");
        assert!(
            b.bitswap_stats()
                .unmatched
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        );
        a.shutdown().await;
        b.shutdown().await;
    }
}
