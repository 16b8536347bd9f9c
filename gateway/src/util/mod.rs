//! Small helpers every layer shares: files written atomically or privately,
//! Nix-format key files, the wall clock and how people read it, and the
//! gateway's counters.
pub mod fs;
pub mod keys;
pub mod metrics;
pub mod time;
pub mod when;
