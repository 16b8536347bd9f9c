//! The local Nix installation, through its own commands: path metadata,
//! builds with `--check` semantics, the reference scan Nix does, and the
//! GC roots of the paths we seed.
pub mod build;
pub mod gcroots;
pub mod path_info;
pub mod refs;
