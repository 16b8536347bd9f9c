//! The nixpfs gateway: bytes and protocols. NAR encoding, the embedded IPFS
//! node, the local index, the HTTP binary cache and the command line.
pub mod catalog;
pub mod cli;
pub mod config;
pub mod index;
pub mod metrics;
pub mod nar;
pub mod nix_store;
pub mod verify;
pub mod ipfs;
