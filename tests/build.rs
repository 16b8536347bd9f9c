//! Decides, when the end-to-end tests are compiled, which external tools are
//! missing, so a test that needs one is compiled `#[ignore]` with the reason
//! and shows up as ignored in the test summary, never as passed. Under
//! `CI=true` nothing is ignored: CI installs every tool, and a missing one
//! fails its tests.

use std::path::{Path, PathBuf};

/// Files `scripts/install-peers DIR` leaves in DIR.
const PEER_FILES: [&str; 5] = [
    "helia/hash.mjs",
    "helia/car.mjs",
    "helia/vfetch.mjs",
    "helia/routed.mjs",
    "kubo.py",
];

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

fn peers_installed() -> bool {
    std::env::var_os("NIXPFS_PEERS_DIR")
        .map(PathBuf::from)
        .is_some_and(|dir| PEER_FILES.iter().all(|f| Path::new(&dir).join(f).is_file()))
}

/// Whether the tests will run as root (they run as whoever builds them).
fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(missing_nix)");
    println!("cargo::rustc-check-cfg=cfg(missing_peers)");
    println!("cargo::rustc-check-cfg=cfg(missing_nginx)");
    println!("cargo::rustc-check-cfg=cfg(missing_chromium)");
    println!("cargo::rustc-check-cfg=cfg(missing_promtool)");
    println!("cargo::rustc-check-cfg=cfg(missing_systemd_analyze)");
    println!("cargo::rustc-check-cfg=cfg(missing_nix_instantiate)");
    println!("cargo::rustc-check-cfg=cfg(missing_root)");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-env-changed=NIXPFS_PEERS_DIR");
    println!("cargo::rerun-if-env-changed=CI");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if ci {
        return;
    }
    if !on_path("nix-store") {
        println!("cargo::rustc-cfg=missing_nix");
        println!("cargo::warning=nix-store not on PATH: the end-to-end tests that need real Nix are ignored");
    }
    if !on_path("nginx") && !Path::new("/usr/sbin/nginx").is_file() {
        println!("cargo::rustc-cfg=missing_nginx");
        println!("cargo::warning=nginx not installed: the upstream-bridge tests are ignored");
    }
    for (tool, cfg, package) in [
        ("chromium", "missing_chromium", "chromium"),
        ("promtool", "missing_promtool", "prometheus"),
        ("systemd-analyze", "missing_systemd_analyze", "systemd"),
        ("nix-instantiate", "missing_nix_instantiate", "nix-bin"),
    ] {
        if !on_path(tool) {
            println!("cargo::rustc-cfg={cfg}");
            println!("cargo::warning={tool} not on PATH: the tests that need it are ignored (Debian package {package})");
        }
    }
    if !is_root() {
        println!("cargo::rustc-cfg=missing_root");
        println!("cargo::warning=not root: the fault tests that mount a tmpfs or make network namespaces are ignored");
    }
    if !peers_installed() {
        println!("cargo::rustc-cfg=missing_peers");
        println!("cargo::warning=NIXPFS_PEERS_DIR unset or incomplete: the tests with Kubo and Helia are ignored");
    }
}
