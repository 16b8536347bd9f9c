//! What we believe: the serve decision over the index ([`catalog`]) and the
//! sync that fetches, verifies and indexes the registry and anchors' sets,
//! and the upstream caches whose own signatures make paths servable.
pub mod catalog;
pub mod names;
pub mod sync;
pub mod upstream;
