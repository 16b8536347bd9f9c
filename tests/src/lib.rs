//! Helpers shared by the end-to-end tests: finding the built `nixpfs` binary,
//! requiring the external tools a test was built to use (see `build.rs`),
//! and an isolated real-Nix environment.

pub mod anchors;
pub mod gateway;
pub mod link;
pub mod netns;
pub mod nginx;
pub mod nix;
pub mod peers;

use std::path::PathBuf;
use std::process::Command;

/// The `nixpfs` binary built by the same `cargo build`/`cargo test` run:
/// `NIXPFS_BIN` if set, else `target/<profile>/nixpfs` next to this test's
/// own `deps/` directory.
pub fn nixpfs_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("NIXPFS_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("nixpfs");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --workspace` before the tests (scripts/test does)",
        bin.display()
    );
    bin
}

/// A `Command` for the built `nixpfs` binary.
pub fn nixpfs() -> Command {
    Command::new(nixpfs_bin())
}

/// Panics, naming `tool` and how to get it, unless it is on PATH. Tests that
/// need a tool are compiled `#[ignore]` when it is missing (see `build.rs`),
/// so reaching this without it means it vanished since the build, or CI
/// (`CI=true`, where nothing is ignored) did not install it.
pub fn require_tool(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is not installed: install it (.ci/run does), or rebuild the tests so they show as ignored"
    );
}

/// Runs a command, panicking with its stderr when it fails; returns stdout.
pub fn run_ok(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Like [`run_ok`] but returns stdout as trimmed UTF-8.
pub fn run_ok_str(cmd: &mut Command) -> String {
    String::from_utf8(run_ok(cmd))
        .expect("utf-8 output")
        .trim()
        .to_owned()
}

/// `len` deterministic, incompressible bytes from `seed` (xorshift64), for
/// files that must be big without compressing or deduplicating away.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
