//! The nixpfs gateway: bytes and protocols. NAR encoding, the embedded IPFS
//! node, the local index, the HTTP binary cache and the command line.
pub mod admin;
pub mod anchor;
pub mod app;
pub mod car;
pub mod catalog;
pub mod cli;
pub mod community;
pub mod config;
pub mod http;
pub mod index;
pub mod ipfs;
pub mod metrics;
pub mod nar;
pub mod nix_store;
pub mod serve;
pub mod sync;
#[cfg(test)]
mod testing;
pub mod trustless;
pub mod upload;
pub mod verify;
