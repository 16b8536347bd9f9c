//! Two `nixpfs` processes on loopback: NARs of a real Nix closure pinned on A
//! are fetched by CID on B over our bitswap, before and after A restarts, and
//! a CID nobody has fails within the timeout with an error naming it.

use std::fs;

use anchor_registry::NarHash;
use e2e::gateway::{free_port, Gateway};
use e2e::nix::{NixEnv, FIXTURE_CLOSURE};
use e2e::{nixpfs, run_ok, run_ok_str};

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn nars_pinned_on_a_are_fetched_by_cid_on_b_across_a_restart() {
    let env = NixEnv::new();
    let top = env.build("fixture.nix", FIXTURE_CLOSURE);
    let a_dir = env.path().join("a");
    let pinned =
        run_ok_str(
            nixpfs()
                .arg("--data-dir")
                .arg(&a_dir)
                .args(["pin", "--closure", &top]),
        );
    let entries: Vec<(String, String)> = pinned
        .lines()
        .map(|l| {
            let mut parts = l.split_whitespace();
            let cid = parts.next().unwrap().to_owned();
            let _size = parts.next();
            (cid, parts.next().unwrap().to_owned())
        })
        .collect();
    assert_eq!(entries.len(), 2, "{pinned}");

    let a_port = free_port();
    let a_listen = format!("/ip4/127.0.0.1/tcp/{a_port}");
    for round in ["first start", "after restart"] {
        let a = Gateway::start(&a_dir, &["--ipfs-listen", &a_listen]);
        let b = Gateway::start(
            &env.path().join(format!("b-{}", round.replace(' ', "-"))),
            &["--peer", &a.multiaddr()],
        );
        for (cid, path) in &entries {
            let out = env.path().join("fetched.nar");
            let _ = fs::remove_file(&out);
            run_ok(b.cli().args(["fetch", cid, "--out"]).arg(&out));
            let bytes = fs::read(&out).unwrap();
            let info = env.path_info(path);
            assert_eq!(
                NarHash::digest(&bytes),
                NarHash::parse(info["narHash"].as_str().unwrap()).unwrap(),
                "{round}: NAR of {path} fetched by CID {cid} does not hash to Nix's NarHash"
            );
            assert_eq!(bytes.len() as u64, info["narSize"].as_u64().unwrap());
        }
        let pins = run_ok_str(a.cli().arg("pins"));
        assert_eq!(pins.lines().count(), 2, "{round}: A's pins: {pins}");
    }
}

#[test]
fn a_cid_nobody_has_fails_within_the_timeout_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    fs::write(&config, "fetch_timeout_secs = 2\n").unwrap();
    // A valid CID of content that exists nowhere (sha256 of a fresh nonce).
    let data = dir.path().join("x");
    fs::write(&data, format!("nobody has this {}", e2e::nix::nonce())).unwrap();
    let other = dir.path().join("other");
    let cid = run_ok_str(nixpfs().arg("--data-dir").arg(&other).arg("add").arg(&data));
    let started = std::time::Instant::now();
    let out = nixpfs()
        .arg("--data-dir")
        .arg(dir.path().join("empty"))
        .arg("--config")
        .arg(&config)
        .args(["fetch", &cid, "--out"])
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&cid), "the error names the CID: {stderr}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        !dir.path().join("out").exists(),
        "a failed fetch leaves no file"
    );
}
