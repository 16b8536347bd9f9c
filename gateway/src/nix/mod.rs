//! The local Nix installation, through its own commands: path metadata,
//! builds with `--check` semantics, and the reference scan Nix does.
pub mod build;
pub mod path_info;
pub mod refs;
