//! Small helpers every layer shares: files written atomically or privately,
//! Nix-format key files, the wall clock and how people read it, the
//! gateway's counters and progress meters, locks that outlive a panic, and
//! remote text made safe for a terminal.
pub mod fs;
pub mod keys;
pub mod metrics;
pub mod progress;
pub mod size;
pub mod sync;
pub mod text;
pub mod time;
pub mod when;
