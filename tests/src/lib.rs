//! Helpers shared by the end-to-end tests: finding the built `nixpfs` binary,
//! deciding whether an external tool is present (skip locally, fail in CI),
//! and an isolated real-Nix environment.

pub mod anchors;
pub mod gateway;
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

/// True when the tests run in CI, where a missing tool is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether `tool` is on PATH. Locally a missing tool skips the test with a
/// printed reason; under `CI=true` it fails the test, because CI installs it.
pub fn require_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            !in_ci(),
            "{tool} is required in CI (CI=true) but not installed: .ci/run must install it"
        );
        eprintln!("SKIP: {tool} not installed (CI would fail here)");
    }
    found
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
