//! Kademlia content routing: the DHT Kubo and Helia use to find who has a
//! CID. The node provides the roots it seeds and asks the DHT for providers
//! of what no connected peer has.
//!
//! Goals: take part as a client or a server on one configurable protocol
//! (`/ipfs/kad/1.0.0` on the public network; Kubo's LAN DHT,
//! `/ipfs/lan/kad/1.0.0`, is the one that accepts loopback peers); provider
//! records keyed by the multihash, as Kubo keys them; a record store bounded
//! by [`MAX_PROVIDER_KEYS`] instead of libp2p-kad's default 1,024 keys; dial
//! providers while their query still holds their addresses.
//!
//! Value records are IPNS records only (see [`super::ipns`]): a record
//! another peer stores with us is checked first — its key must be an IPNS
//! key, the record must verify for that name and not be older than the one
//! we hold — and any other record is refused and counted. Records we put
//! are stored locally too, so a GET finds them even with no peer.
//!
//! Non-goals: other value records (`/pk/`…), Kubo's dual WAN+LAN DHT in one
//! node, IPNI and delegated routing.
//!
//! The libp2p-kad behaviour runs inside rust-ipfs's swarm as our custom
//! behaviour, so it cannot be called directly: [`Dht`] sends it commands
//! over a channel that the behaviour drains whenever the swarm polls it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use cid::Cid;
use futures::Stream;
use libp2p_kad::store::RecordStore;
use libp2p_kad::store::{MemoryStore, MemoryStoreConfig};
use libp2p_kad::{
    Event, GetProvidersOk, GetRecordOk, InboundRequest, Mode, QueryId, QueryResult, Quorum, Record,
    RecordKey, RoutingUpdate, StoreInserts,
};
use rust_ipfs::swarm::derive_prelude::{
    ConnectionDenied, ConnectionId, Endpoint, FromSwarm, NetworkBehaviour, PortUse, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use rust_ipfs::swarm::dial_opts::{DialOpts, PeerCondition};
use rust_ipfs::{Multiaddr, PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::ipns::{self, IpnsName};

/// The public IPFS DHT's protocol.
pub const DEFAULT_PROTOCOL: &str = "/ipfs/kad/1.0.0";
/// Kubo's LAN DHT: the one that keeps private and loopback peers.
pub const LAN_PROTOCOL: &str = "/ipfs/lan/kad/1.0.0";
/// Most keys the record store holds provider records for (others' and ours):
/// about 200 bytes each, so at most ~200 MiB.
pub const MAX_PROVIDER_KEYS: usize = 1 << 20;
/// Providers kept per key (Kubo keeps 20, the replication factor).
const MAX_PROVIDERS_PER_KEY: usize = 20;
/// Addresses remembered per peer from identify, and peers remembered.
const MAX_ADDRS_PER_PEER: usize = 8;
const MAX_IDENTIFIED_PEERS: usize = 4096;
/// How long one lookup may run.
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Most value (IPNS) records the store holds, ours and others': at most
/// 10 KiB each, so at most 40 MiB.
const MAX_VALUE_RECORDS: usize = 4096;

/// How the node takes part in the DHT (config `dht`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DhtMode {
    /// No DHT: only configured peers are asked.
    #[default]
    Off,
    /// Queries the DHT but answers no one's queries (behind NAT, laptops).
    Client,
    /// Also stores records and answers queries (reachable hosts).
    Server,
}

impl std::str::FromStr for DhtMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "client" => Ok(Self::Client),
            "server" => Ok(Self::Server),
            other => Err(format!("dht must be off, client or server, not {other:?}")),
        }
    }
}

/// How to run the DHT.
#[derive(Debug, Clone)]
pub struct DhtConfig {
    pub mode: DhtMode,
    /// The Kademlia protocol name ([`DEFAULT_PROTOCOL`], [`LAN_PROTOCOL`]…).
    pub protocol: StreamProtocol,
    /// Peers (`…/p2p/<id>`) the routing table starts from.
    pub bootstrap: Vec<Multiaddr>,
}

/// What the routing table and the store hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DhtStats {
    pub routing_peers: usize,
    pub provided_keys: usize,
    /// IPNS records held for others and ourselves.
    #[serde(default)]
    pub value_records: usize,
    /// Records other peers asked us to store that failed the checks.
    #[serde(default)]
    pub refused_records: u64,
}

enum Command {
    AddAddress(PeerId, Multiaddr),
    Bootstrap,
    Provide(RecordKey, oneshot::Sender<Result<(), String>>),
    FindProviders(RecordKey, mpsc::UnboundedSender<Provider>),
    PutRecord(RecordKey, Vec<u8>, oneshot::Sender<Result<usize, String>>),
    GetRecord(RecordKey, mpsc::UnboundedSender<Vec<u8>>),
    LocalRecord(RecordKey, oneshot::Sender<Option<Vec<u8>>>),
    Stats(oneshot::Sender<DhtStats>),
    LocalProviders(RecordKey, oneshot::Sender<Vec<Provider>>),
}

/// A provider a lookup found, with the addresses the lookup learnt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    pub peer: PeerId,
    pub addrs: Vec<Multiaddr>,
}

/// The key a CID's provider records are stored under: its multihash, as
/// Kubo and Helia key them (so CIDv0 and CIDv1 of one block meet).
pub fn provider_key(cid: &Cid) -> RecordKey {
    RecordKey::new(&cid.hash().to_bytes())
}

/// Handle to the DHT running inside the swarm; clones share it.
#[derive(Debug, Clone)]
pub struct Dht {
    commands: mpsc::UnboundedSender<Command>,
}

/// A value lookup's results, as peers answer.
pub type RecordValues = futures::stream::BoxStream<'static, Vec<u8>>;

/// Why a DHT request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DhtError {
    #[error("the DHT is not running (the node stopped)")]
    Stopped,
    #[error("providing {cid} failed: {reason}")]
    Provide { cid: String, reason: String },
    #[error("no DHT peer stored the record (it is kept locally): {reason}")]
    PutRecord { reason: String },
}

impl Dht {
    fn send(&self, command: Command) -> Result<(), DhtError> {
        self.commands.send(command).map_err(|_| DhtError::Stopped)
    }

    /// Tells the routing table where `peer` is.
    pub fn add_address(&self, peer: PeerId, addr: Multiaddr) -> Result<(), DhtError> {
        self.send(Command::AddAddress(peer, addr))
    }

    /// Refreshes the routing table from the peers it knows.
    pub fn bootstrap(&self) -> Result<(), DhtError> {
        self.send(Command::Bootstrap)
    }

    /// Announces that this node has `cid`; done once the closest peers
    /// accepted the record (libp2p-kad then republishes it on a schedule).
    pub async fn provide(&self, cid: &Cid) -> Result<(), DhtError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Provide(provider_key(cid), tx))?;
        rx.await
            .map_err(|_| DhtError::Stopped)?
            .map_err(|reason| DhtError::Provide {
                cid: cid.to_string(),
                reason,
            })
    }

    /// Providers of `cid` as the lookup finds them (each once; the node
    /// dials them while the lookup still knows their addresses). The stream
    /// ends when the lookup does.
    pub fn find_providers(&self, cid: &Cid) -> impl Stream<Item = Provider> + Send + 'static {
        let (tx, rx) = mpsc::unbounded_channel();
        let started = self.send(Command::FindProviders(provider_key(cid), tx));
        let rx = started.ok().map(|()| rx);
        futures::stream::unfold(rx, |rx| async move {
            let mut rx = rx?;
            let peer = rx.recv().await?;
            Some((peer, Some(rx)))
        })
    }

    /// Providers of `cid` the local record store holds (ours included),
    /// with the addresses their records or the routing table give: no
    /// network lookup, so the Routing V1 server can answer from it.
    pub async fn local_providers(&self, cid: &Cid) -> Result<Vec<Provider>, DhtError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::LocalProviders(provider_key(cid), tx))?;
        rx.await.map_err(|_| DhtError::Stopped)
    }

    /// Stores a value record locally and on the closest peers; the number
    /// of peers that accepted it.
    pub async fn put_record(&self, key: Vec<u8>, value: Vec<u8>) -> Result<usize, DhtError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::PutRecord(RecordKey::new(&key), value, tx))?;
        rx.await
            .map_err(|_| DhtError::Stopped)?
            .map_err(|reason| DhtError::PutRecord { reason })
    }

    /// The values peers (and first the local store) hold under `key`, as
    /// they arrive; unchecked: the caller verifies each. Ends with the
    /// lookup.
    pub fn get_record(&self, key: Vec<u8>) -> RecordValues {
        let (tx, rx) = mpsc::unbounded_channel();
        let rx = self
            .send(Command::GetRecord(RecordKey::new(&key), tx))
            .ok()
            .map(|()| rx);
        Box::pin(futures::stream::unfold(rx, |rx| async move {
            let mut rx = rx?;
            let value = rx.recv().await?;
            Some((value, Some(rx)))
        }))
    }

    /// The value the local store holds under `key`, without asking anyone.
    pub async fn local_record(&self, key: Vec<u8>) -> Result<Option<Vec<u8>>, DhtError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::LocalRecord(RecordKey::new(&key), tx))?;
        rx.await.map_err(|_| DhtError::Stopped)
    }

    /// The routing table's size and how many keys we provide.
    pub async fn stats(&self) -> Result<DhtStats, DhtError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Stats(tx))?;
        rx.await.map_err(|_| DhtError::Stopped)
    }
}

/// A running lookup for providers.
struct Find {
    found: mpsc::UnboundedSender<Provider>,
    seen: HashSet<PeerId>,
}

type Kad = libp2p_kad::Behaviour<MemoryStore>;

/// The swarm side: libp2p-kad plus the command channel and the bookkeeping
/// that turns its query events into answers.
pub struct Behaviour {
    kad: Kad,
    commands: mpsc::UnboundedReceiver<Command>,
    provides: HashMap<QueryId, oneshot::Sender<Result<(), String>>>,
    finds: HashMap<QueryId, Find>,
    puts: HashMap<QueryId, oneshot::Sender<Result<usize, String>>>,
    gets: HashMap<QueryId, mpsc::UnboundedSender<Vec<u8>>>,
    refused_records: Arc<AtomicU64>,
    /// Listen addresses peers reported through identify: libp2p-kad learns
    /// an address only from connections we dialled, so a peer that dialled
    /// us would otherwise never enter the routing table.
    identified: HashMap<PeerId, Vec<Multiaddr>>,
    /// Peers that speak our protocol but whose address we did not know yet.
    unroutable: HashSet<PeerId>,
    local: PeerId,
    pending: VecDeque<ToSwarm<Infallible, THandlerInEvent<Kad>>>,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("dht::Behaviour")
            .field("local", &self.local)
            .field("finds", &self.finds.len())
            .finish()
    }
}

/// The behaviour to hand to the swarm and the handle to drive it.
pub fn new(local: PeerId, config: &DhtConfig) -> (Behaviour, Dht) {
    let store = MemoryStore::with_config(
        local,
        MemoryStoreConfig {
            max_records: MAX_VALUE_RECORDS,
            max_value_bytes: 10 * 1024,
            max_providers_per_key: MAX_PROVIDERS_PER_KEY,
            max_provided_keys: MAX_PROVIDER_KEYS,
        },
    );
    let mut kad_config = libp2p_kad::Config::new(config.protocol.clone());
    kad_config.set_query_timeout(QUERY_TIMEOUT);
    // Every record and provider record another peer sends comes to us to
    // check before it is stored (see the module docs).
    kad_config.set_record_filtering(StoreInserts::FilterBoth);
    kad_config.set_replication_factor(
        NonZeroUsize::new(MAX_PROVIDERS_PER_KEY).unwrap_or(NonZeroUsize::MIN),
    );
    let mut kad = Kad::with_config(local, store, kad_config);
    kad.set_mode(Some(match config.mode {
        DhtMode::Server => Mode::Server,
        DhtMode::Client | DhtMode::Off => Mode::Client,
    }));
    let (tx, rx) = mpsc::unbounded_channel();
    let behaviour = Behaviour {
        kad,
        commands: rx,
        provides: HashMap::new(),
        finds: HashMap::new(),
        puts: HashMap::new(),
        gets: HashMap::new(),
        refused_records: Arc::new(AtomicU64::new(0)),
        identified: HashMap::new(),
        unroutable: HashSet::new(),
        local,
        pending: VecDeque::new(),
    };
    (behaviour, Dht { commands: tx })
}

impl Behaviour {
    fn run(&mut self, command: Command) {
        match command {
            Command::AddAddress(peer, addr) => {
                if self.kad.add_address(&peer, addr) == RoutingUpdate::Failed {
                    tracing::debug!(%peer, "the DHT routing table refused an address");
                }
            }
            Command::Bootstrap => {
                if let Err(e) = self.kad.bootstrap() {
                    tracing::debug!("DHT bootstrap: {e}");
                }
            }
            Command::Provide(key, done) => match self.kad.start_providing(key) {
                Ok(id) => {
                    self.provides.insert(id, done);
                }
                Err(e) => {
                    let _ = done.send(Err(e.to_string()));
                }
            },
            Command::FindProviders(key, found) => {
                let id = self.kad.get_providers(key);
                self.finds.insert(
                    id,
                    Find {
                        found,
                        seen: HashSet::new(),
                    },
                );
            }
            Command::PutRecord(key, value, done) => {
                let record = Record::new(key, value);
                match self.kad.put_record(record, Quorum::One) {
                    Ok(id) => {
                        self.puts.insert(id, done);
                    }
                    Err(e) => {
                        let _ = done.send(Err(e.to_string()));
                    }
                }
            }
            Command::GetRecord(key, found) => {
                let id = self.kad.get_record(key);
                self.gets.insert(id, found);
            }
            Command::LocalRecord(key, reply) => {
                let value = self
                    .kad
                    .store_mut()
                    .get(&key)
                    .map(|record| record.value.clone());
                let _ = reply.send(value);
            }
            Command::Stats(reply) => {
                let routing_peers = self.kad.kbuckets().map(|bucket| bucket.num_entries()).sum();
                let store = self.kad.store_mut();
                let provided_keys = store.provided().count();
                let value_records = store.records().count();
                let _ = reply.send(DhtStats {
                    routing_peers,
                    provided_keys,
                    value_records,
                    refused_records: self.refused_records.load(Ordering::Relaxed),
                });
            }
            Command::LocalProviders(key, reply) => {
                let records = libp2p_kad::store::RecordStore::providers(self.kad.store_mut(), &key);
                let providers = records
                    .into_iter()
                    .map(|record| {
                        let mut addrs = record.addresses;
                        for addr in self.known_addrs(record.provider) {
                            if !addrs.contains(&addr) {
                                addrs.push(addr);
                            }
                        }
                        Provider {
                            peer: record.provider,
                            addrs,
                        }
                    })
                    .collect();
                let _ = reply.send(providers);
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::OutboundQueryProgressed {
                id, result, step, ..
            } => self.on_query(id, result, step.last),
            Event::UnroutablePeer { peer } => match self.identified.get(&peer) {
                Some(addrs) => {
                    for addr in addrs.clone() {
                        self.kad.add_address(&peer, addr);
                    }
                }
                None if self.unroutable.len() < MAX_IDENTIFIED_PEERS => {
                    self.unroutable.insert(peer);
                }
                None => {}
            },
            Event::RoutingUpdated { peer, .. } => {
                tracing::debug!(%peer, "DHT routing table updated");
            }
            Event::InboundRequest {
                request:
                    InboundRequest::PutRecord {
                        source,
                        record: Some(record),
                        ..
                    },
            } => self.on_inbound_record(source, record),
            Event::InboundRequest {
                request:
                    InboundRequest::AddProvider {
                        record: Some(provider),
                    },
            } => {
                if let Err(e) = self.kad.store_mut().add_provider(provider) {
                    tracing::debug!("provider record not stored: {e}");
                }
            }
            _ => {}
        }
    }

    fn on_query(&mut self, id: QueryId, result: QueryResult, last: bool) {
        match result {
            QueryResult::StartProviding(result) => {
                if let Some(done) = self.provides.remove(&id) {
                    let _ = done.send(result.map(|_| ()).map_err(|e| e.to_string()));
                }
            }
            QueryResult::GetProviders(result) => {
                if let Some(find) = self.finds.get_mut(&id) {
                    if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = result {
                        for peer in providers {
                            if peer == self.local || !find.seen.insert(peer) {
                                continue;
                            }
                            // Dial now: the query still holds the
                            // provider's addresses (see the module docs).
                            self.pending.push_back(ToSwarm::Dial {
                                opts: DialOpts::peer_id(peer)
                                    .condition(PeerCondition::DisconnectedAndNotDialing)
                                    .build(),
                            });
                            // The same addresses the dial will use: the
                            // routing table's and the running queries'.
                            let addrs = self
                                .kad
                                .handle_pending_outbound_connection(
                                    ConnectionId::new_unchecked(0),
                                    Some(peer),
                                    &[],
                                    Endpoint::Dialer,
                                )
                                .unwrap_or_default();
                            if find.found.send(Provider { peer, addrs }).is_err() {
                                break;
                            }
                        }
                    }
                    if last || find.found.is_closed() {
                        self.finds.remove(&id);
                    }
                }
            }
            QueryResult::PutRecord(result) => {
                if let Some(done) = self.puts.remove(&id) {
                    let _ = done.send(match result {
                        Ok(_) => Ok(1),
                        Err(
                            libp2p_kad::PutRecordError::QuorumFailed { success, .. }
                            | libp2p_kad::PutRecordError::Timeout { success, .. },
                        ) if !success.is_empty() => Ok(success.len()),
                        Err(e) => Err(e.to_string()),
                    });
                }
            }
            QueryResult::GetRecord(result) => {
                if let Some(found) = self.gets.get(&id) {
                    if let Ok(GetRecordOk::FoundRecord(peer_record)) = result {
                        let _ = found.send(peer_record.record.value);
                    }
                    if last || found.is_closed() {
                        self.gets.remove(&id);
                    }
                }
            }
            QueryResult::Bootstrap(Err(e)) => tracing::debug!("DHT bootstrap: {e:?}"),
            _ => {}
        }
    }

    /// Addresses of `peer` from the routing table and identify, without
    /// dialling.
    fn known_addrs(&mut self, peer: PeerId) -> Vec<Multiaddr> {
        // Reads the routing table and running queries; dials nothing.
        let mut addrs = self
            .kad
            .handle_pending_outbound_connection(
                ConnectionId::new_unchecked(0),
                Some(peer),
                &[],
                Endpoint::Dialer,
            )
            .unwrap_or_default();
        for addr in self.identified.get(&peer).into_iter().flatten() {
            if !addrs.contains(addr) {
                addrs.push(addr.clone());
            }
        }
        addrs
    }

    /// A record `source` asked us to store: kept only if it is a valid IPNS
    /// record for the name its key names, and not older than the one held.
    fn on_inbound_record(&mut self, source: PeerId, record: Record) {
        match check_inbound(&record, self.kad.store_mut().get(&record.key).as_deref()) {
            Ok(true) => {
                if let Err(e) = self.kad.store_mut().put(record) {
                    tracing::warn!(peer = %source, "IPNS record not stored: {e}");
                }
            }
            Ok(false) => {}
            Err(reason) => {
                self.refused_records.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %source, "refused a DHT record: {reason}");
            }
        }
    }

    fn learn(&mut self, peer: PeerId, addr: &Multiaddr) {
        if self.identified.len() >= MAX_IDENTIFIED_PEERS && !self.identified.contains_key(&peer) {
            return;
        }
        let addrs = self.identified.entry(peer).or_default();
        if addrs.len() < MAX_ADDRS_PER_PEER && !addrs.contains(addr) {
            addrs.push(addr.clone());
        }
        if self.unroutable.remove(&peer) {
            self.kad.add_address(&peer, addr.clone());
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = <Kad as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.kad
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.kad
            .handle_established_inbound_connection(connection_id, peer, local_addr, remote_addr)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.kad.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.kad.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::NewExternalAddrOfPeer(e) = &event {
            self.learn(e.peer_id, e.addr);
        }
        self.kad.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.kad
            .on_connection_handler_event(peer, connection_id, event);
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        while let Poll::Ready(Some(command)) = self.commands.poll_recv(cx) {
            self.run(command);
        }
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Poll::Ready(event);
            }
            match self.kad.poll(cx) {
                Poll::Ready(ToSwarm::GenerateEvent(event)) => self.on_event(event),
                Poll::Ready(other) => {
                    return Poll::Ready(
                        other.map_out(|_| unreachable!("GenerateEvent is matched above")),
                    )
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Whether an inbound record replaces what the store holds (`Ok(false)`:
/// it is the same or older than a valid one held), or why it is refused.
fn check_inbound(record: &Record, held: Option<&Record>) -> Result<bool, String> {
    let name = IpnsName::from_routing_key(record.key.as_ref())
        .ok_or("only IPNS records (/ipns/<peer id>) are stored")?;
    let now = crate::util::time::now().map_err(|e| e.to_string())?;
    let new = ipns::verify(&name, &record.value, now).map_err(|e| e.to_string())?;
    let held = held.and_then(|held| ipns::verify(&name, &held.value, now).ok());
    Ok(held.is_none_or(|held| new.supersedes(&held)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_from_config_words() {
        assert_eq!("server".parse(), Ok(DhtMode::Server));
        assert_eq!("client".parse(), Ok(DhtMode::Client));
        assert_eq!("off".parse(), Ok(DhtMode::Off));
        assert!("on"
            .parse::<DhtMode>()
            .unwrap_err()
            .contains("off, client or server"));
    }

    #[test]
    fn provider_keys_are_the_multihash_so_cid_versions_meet() {
        let v1: Cid = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
            .parse()
            .unwrap();
        let dag_pb_v1 = Cid::new_v1(0x70, *v1.hash());
        let v0 = Cid::new_v0(*v1.hash()).unwrap();
        assert_eq!(provider_key(&v1), provider_key(&dag_pb_v1));
        assert_eq!(provider_key(&v0), provider_key(&v1));
        assert_eq!(provider_key(&v1).as_ref(), v1.hash().to_bytes().as_slice());
    }

    #[test]
    fn only_valid_ipns_records_newer_than_the_held_one_are_stored() {
        let keypair = ipns::keypair_from_seed([7; 32]).unwrap();
        let name = IpnsName::from_ed25519(
            anchor_registry::SecretKey::from_seed("a-1", [7; 32])
                .unwrap()
                .public()
                .as_bytes(),
        )
        .unwrap();
        let cid: Cid = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
            .parse()
            .unwrap();
        let valid = crate::util::time::now().unwrap() + 3600;
        let record = |seq| {
            Record::new(
                RecordKey::new(&name.routing_key()),
                ipns::sign(&keypair, &cid, seq, valid, Duration::from_secs(60)).unwrap(),
            )
        };
        assert_eq!(check_inbound(&record(2), None), Ok(true));
        assert_eq!(check_inbound(&record(3), Some(&record(2))), Ok(true));
        assert_eq!(check_inbound(&record(1), Some(&record(2))), Ok(false));
        assert_eq!(check_inbound(&record(2), Some(&record(2))), Ok(false));
        let other = Record::new(RecordKey::new(&b"/pk/x".to_vec()), record(2).value);
        assert!(check_inbound(&other, None)
            .unwrap_err()
            .contains("only IPNS"));
        let stranger = IpnsName::from_ed25519(
            anchor_registry::SecretKey::from_seed("b-1", [8; 32])
                .unwrap()
                .public()
                .as_bytes(),
        )
        .unwrap();
        let forged = Record::new(RecordKey::new(&stranger.routing_key()), record(9).value);
        assert!(check_inbound(&forged, None)
            .unwrap_err()
            .contains("not signed"));
    }
}
