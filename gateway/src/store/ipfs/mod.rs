//! The embedded IPFS node. rust-ipfs is only the libp2p host (identity,
//! TCP+noise+yamux, identify, ping, streams); we own the NAR data path:
//! UnixFS import and reads ([`dag`]), the block store ([`blockstore`]),
//! bitswap 1.2.0 ([`bitswap`]), recursive pins with GC ([`pins`]), leaves
//! rebuilt from the Nix store instead of stored twice ([`storeblocks`]),
//! Kademlia content routing ([`dht`]) and Routing V1 routers ([`routers`]).

pub mod bitswap;
pub mod block;
pub mod blockstore;
pub mod dag;
pub mod dht;
pub mod exchange;
pub mod identify;
pub mod ipns;
pub mod node;
pub mod pb;
pub mod pins;
pub mod prefetch;
pub mod routers;
pub mod storeblocks;

use std::path::PathBuf;
use std::time::Duration;

pub use cid::Cid;
pub use node::{ConnectedPeer, GcReport, Node, NodeConfig};
pub use pins::Pin;
pub use rust_ipfs::{Multiaddr, PeerId};

/// Everything the IPFS side can fail with; each variant names the CID,
/// peer, address or file involved.
#[derive(Debug, thiserror::Error)]
pub enum IpfsError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the input stream: {source}")]
    Read {
        #[source]
        source: std::io::Error,
    },
    #[error("block {cid} does not match its CID")]
    HashMismatch { cid: Cid },
    #[error("block {cid} is {size} bytes, over the 2 MiB block limit")]
    BlockTooLarge { cid: Cid, size: usize },
    /// `reason` names the store path's file and what became of it.
    #[error("block {cid} is not served: {reason}")]
    StoreBlockRefused { cid: Cid, reason: Box<str> },
    #[error("block {cid} is not in the local store")]
    BlockMissing { cid: Cid },
    #[error("no connected peer delivered block {cid} within {timeout:?}")]
    FetchTimeout { cid: Cid, timeout: Duration },
    #[error("CID {cid} is not supported: {reason}")]
    UnsupportedCid { cid: Cid, reason: &'static str },
    #[error("block {cid} is malformed: {reason}")]
    Malformed { cid: Cid, reason: String },
    #[error("range starting at {offset} is past the end of {cid} ({size} bytes)")]
    RangeOutOfBounds { cid: Cid, offset: u64, size: u64 },
    #[error("pin database {path}: {reason}")]
    PinDb { path: PathBuf, reason: String },
    #[error("the DAG of {cid} holds more than {limit} bytes of blocks, the most allowed")]
    DagTooLarge { cid: Cid, limit: u64 },
    #[error("{cid} is not pinned")]
    NotPinned { cid: Cid },
    #[error("multiaddr {addr} does not end in /p2p/<peer id>")]
    MissingPeerId { addr: Multiaddr },
    #[error("could not connect to {addr}: {reason}")]
    Dial { addr: Multiaddr, reason: String },
    #[error("identity key {path}: {reason}")]
    Identity { path: PathBuf, reason: String },
    #[error("libp2p host: {reason}")]
    Host { reason: String },
    #[error("background task failed: {reason}")]
    Task { reason: String },
    #[error("the DHT is off: set `dht = \"client\"` or `\"server\"` (or `serve --dht`) to use content routing")]
    NoDht,
    #[error("the DHT is off and no routers are configured: set `dht = \"client\"` or `\"server\"` (or `serve --dht`), or `routers = [\"http://…\"]` (or `serve --router URL`)")]
    NoRouting,
    #[error(transparent)]
    Dht(#[from] dht::DhtError),
}
