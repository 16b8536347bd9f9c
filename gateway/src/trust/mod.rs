//! What we believe: the serve decision over the index ([`catalog`]) and the
//! sync that fetches, verifies and indexes the registry and anchors' sets.
pub mod catalog;
pub mod sync;
