//! The nixpfs gateway: bytes and protocols. NAR encoding, the embedded IPFS
//! node, the local index, the HTTP binary cache and the command line.
pub mod nar;
