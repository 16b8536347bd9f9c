//! Bytes we hold: the NAR format, the embedded IPFS node (blocks, DAG,
//! bitswap, pins), CAR files, the persistent index and the last check of a
//! NAR stream before it is served. Imports nothing above `util` and `nix`.
pub mod car;
pub mod db;
pub mod index;
pub mod ipfs;
pub mod nar;
pub mod repo_verify;
pub mod verify;
