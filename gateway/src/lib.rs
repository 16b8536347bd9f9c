//! The nixpfs gateway library: bytes and protocols. Folders are layers, each
//! importing only from the layers below it (checked by `scripts/check-layers`):
//!
//! | layer | owns |
//! |---|---|
//! | [`util`] | atomic and secret files, key files, the clock, counters |
//! | [`nix`] | the local Nix: path metadata, builds, reference scans |
//! | [`store`] | bytes we hold: NAR format, the IPFS node, CAR, the index, stream verification |
//! | [`trust`] | what we believe: the serve decision, sync of registry and anchor sets |
//! | [`publish`] | what we sign: own pins, anchor sets, claims, rebuilds, repro reports |
//! | [`http`] | what we serve: binary cache, trustless gateway, uploads, admin API |
//! | [`app`], [`config`] | the data directory opened and wired together |
//!
//! The command line lives in the binary (`src/cli`), never in the library.
pub mod app;
pub mod config;
pub mod http;
pub mod nix;
pub mod publish;
pub mod store;
pub mod trust;
pub mod util;
