//! The trustless gateway and CAR files against the JS reference clients:
//! `@helia/verified-fetch` retrieves and verifies a 20 MiB NAR from our
//! gateway's `/ipfs/{cid}`; a block damaged on disk is refused, never
//! served; `@ipld/car` reads the CARs we write (over HTTP and from `nixpfs
//! car export`) and we import the CARs it writes, refusing a tampered one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e::gateway::Gateway;
use e2e::peers::{node_script, peers_dir};
use e2e::{nixpfs, run_ok, run_ok_str};
use sha2::{Digest, Sha256};

use anchor_registry::testing::noise;

const MIB: usize = 1024 * 1024;

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A NAR of a tree holding `mib` MiB of noise, written next to the tree.
fn make_nar(dir: &Path, seed: u64, mib: usize) -> (PathBuf, Vec<u8>) {
    let tree = dir.join(format!("tree-{seed}"));
    std::fs::create_dir_all(tree.join("lib")).expect("tree");
    std::fs::write(tree.join("lib/big.so"), noise(seed, mib * MIB - 8192)).expect("write");
    std::fs::write(tree.join("README"), b"a small file\n").expect("write");
    let nar = run_ok(nixpfs().args(["nar", "dump"]).arg(&tree));
    let path = dir.join(format!("{seed}.nar"));
    std::fs::write(&path, &nar).expect("write nar");
    (path, nar)
}

/// A gateway whose fetches from peers give up after 3 s (there are none).
fn gateway(dir: &Path) -> Gateway {
    let config = dir.join("config.toml");
    std::fs::write(&config, "fetch_timeout_secs = 3\n").expect("config");
    let config = config.to_string_lossy().into_owned();
    Gateway::start(&dir.join("gw"), &["--config", &config])
}

fn get(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> (u16, Vec<u8>, Option<String>) {
    let mut req = ureq::get(&format!("{}{path}", gw.url)).timeout(Duration::from_secs(30));
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {path}: {e}"),
    };
    let status = resp.status();
    let ctype = resp.header("content-type").map(str::to_owned);
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_reader(), &mut body).ok();
    (status, body, ctype)
}

/// The CID of the first 1 MiB leaf in the gateway's block store, and its file.
fn a_leaf(gw: &Gateway) -> (String, PathBuf) {
    let blocks = gw.data_dir.join("ipfs/blocks");
    for shard in std::fs::read_dir(&blocks).expect("blocks dir").flatten() {
        for entry in std::fs::read_dir(shard.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            if len == MIB as u64 {
                let name = entry.file_name().to_string_lossy().into_owned();
                return (name, entry.path());
            }
        }
    }
    panic!("no 1 MiB leaf under {}", blocks.display());
}

#[test]
#[cfg_attr(
    missing_peers,
    ignore = "needs the foreign IPFS peers: run scripts/install-peers DIR and export NIXPFS_PEERS_DIR=DIR"
)]
fn verified_fetch_gets_a_20_mib_nar_and_a_damaged_block_is_never_served() {
    let peers = peers_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (nar, bytes) = make_nar(tmp.path(), 21, 20);
    let gw = gateway(tmp.path());
    let cid = run_ok_str(gw.cli().arg("add").arg(&nar));

    // The probe, as the spec asks, and requests it must refuse.
    let (status, body, ctype) = get(&gw, "/ipfs/bafkqaaa", &[]);
    assert_eq!((status, body.len()), (200, 0));
    assert_eq!(ctype.as_deref(), Some("application/vnd.ipld.raw"));
    let head = ureq::head(&format!("{}/ipfs/bafkqaaa?format=raw", gw.url))
        .call()
        .expect("HEAD probe");
    assert_eq!(head.status(), 200);
    assert_eq!(get(&gw, "/ipfs/not-a-cid?format=raw", &[]).0, 400);
    assert_eq!(
        get(&gw, &format!("/ipfs/{cid}"), &[]).0,
        400,
        "no format asked"
    );
    assert_eq!(
        get(&gw, &format!("/ipfs/{cid}?format=dag-json"), &[]).0,
        400
    );

    // One raw block: the root, hashing to its CID.
    let (status, root, ctype) = get(
        &gw,
        &format!("/ipfs/{cid}"),
        &[("Accept", "application/vnd.ipld.raw")],
    );
    assert_eq!(status, 200);
    assert_eq!(ctype.as_deref(), Some("application/vnd.ipld.raw"));
    assert!(!root.is_empty() && root.len() < 64 * 1024, "a dag-pb root");

    // Unknown content: 504 once peers had their chance, 412 if only cached.
    let unknown = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy";
    let t0 = Instant::now();
    assert_eq!(get(&gw, &format!("/ipfs/{unknown}?format=raw"), &[]).0, 504);
    assert!(t0.elapsed() < Duration::from_secs(20));
    let only_cached = [("Cache-Control", "only-if-cached")];
    assert_eq!(
        get(&gw, &format!("/ipfs/{unknown}?format=raw"), &only_cached).0,
        412
    );

    // @helia/verified-fetch, with our gateway as its only block source.
    let out = tmp.path().join("vf.nar");
    let out_s = out.to_string_lossy().into_owned();
    let r =
        node_script(&peers, "vfetch.mjs", &[&gw.url, &cid, &out_s, "120"]).expect("verified-fetch");
    println!(
        "@helia/verified-fetch {} got {} bytes in {} ms ({:.1} MB/s)",
        r["version"].as_str().unwrap_or("?"),
        r["bytes"],
        r["ms"],
        bytes.len() as f64 / r["ms"].as_f64().unwrap_or(1.0) / 1e3
    );
    assert_eq!(r["status"].as_u64(), Some(200));
    assert_eq!(r["sha256"].as_str(), Some(sha256_hex(&bytes).as_str()));
    assert!(std::fs::read(&out).expect("read") == bytes);

    // The whole DAG as a CAR over HTTP, read and checked by @ipld/car.
    let (status, car, ctype) = get(&gw, &format!("/ipfs/{cid}?format=car"), &[]);
    assert_eq!(status, 200);
    assert_eq!(
        ctype.as_deref(),
        Some("application/vnd.ipld.car; version=1; order=dfs; dups=n")
    );
    let car_path = tmp.path().join("http.car");
    std::fs::write(&car_path, &car).expect("write car");
    let from_car = tmp.path().join("from-car.nar");
    let r = node_script(
        &peers,
        "car.mjs",
        &[
            "verify",
            &car_path.to_string_lossy(),
            &from_car.to_string_lossy(),
        ],
    )
    .expect("@ipld/car reads our CAR");
    assert_eq!(r["roots"][0].as_str(), Some(cid.as_str()));
    assert_eq!(r["sha256"].as_str(), Some(sha256_hex(&bytes).as_str()));
    println!("@ipld/car {} verified our CAR: {r}", r["car"]);

    // A trustless range: the last byte needs the root and one leaf.
    let (status, range_car, _) = get(
        &gw,
        &format!("/ipfs/{cid}?format=car&entity-bytes=-1:*"),
        &[],
    );
    assert_eq!(status, 200);
    assert!(
        range_car.len() < car.len() / 10,
        "{} bytes",
        range_car.len()
    );

    // Damage one leaf on disk: the gateway refuses it rather than serve it.
    let (leaf, file) = a_leaf(&gw);
    let mut damaged = std::fs::read(&file).expect("read leaf");
    damaged[4242] ^= 0x20;
    std::fs::write(&file, &damaged).expect("damage leaf");
    let (status, body, _) = get(&gw, &format!("/ipfs/{leaf}?format=raw"), &[]);
    assert_eq!(status, 500, "{}", String::from_utf8_lossy(&body));
    assert!(
        body.len() < 1024,
        "a 1 MiB block cannot hide in {} bytes",
        body.len()
    );
    assert!(gw
        .log_text()
        .contains("refusing to serve a block that fails verification"));
    let out2 = tmp.path().join("vf2.nar");
    let r = node_script(
        &peers,
        "vfetch.mjs",
        &[&gw.url, &cid, &out2.to_string_lossy(), "15"],
    );
    match r {
        Ok(v) => assert!(
            v.get("status").and_then(|s| s.as_u64()) != Some(200)
                || v["sha256"].as_str() != Some(sha256_hex(&bytes).as_str()),
            "verified-fetch accepted a file with a damaged block: {v}"
        ),
        Err(e) => println!("verified-fetch after the damage, as expected: {e}"),
    }
    let (_, cut, _) = get(&gw, &format!("/ipfs/{cid}?format=car"), &[]);
    assert!(
        cut.len() < car.len(),
        "a CAR with the damaged block stops short"
    );
}

#[test]
#[cfg_attr(
    missing_peers,
    ignore = "needs the foreign IPFS peers: run scripts/install-peers DIR and export NIXPFS_PEERS_DIR=DIR"
)]
fn car_files_move_between_nixpfs_and_ipld_car() {
    let peers = peers_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (nar, bytes) = make_nar(tmp.path(), 22, 6);

    // Ours, written by `nixpfs car export` with no gateway running.
    let a = tmp.path().join("a");
    let cid = run_ok_str(nixpfs().arg("--data-dir").arg(&a).arg("add").arg(&nar));
    let ours = tmp.path().join("ours.car");
    let said = run_ok_str(
        nixpfs()
            .arg("--data-dir")
            .arg(&a)
            .args(["car", "export", &cid, "--out"])
            .arg(&ours),
    );
    println!("{said}");
    let check = tmp.path().join("check.nar");
    let r = node_script(
        &peers,
        "car.mjs",
        &["verify", &ours.to_string_lossy(), &check.to_string_lossy()],
    )
    .expect("@ipld/car reads `nixpfs car export`");
    assert_eq!(r["roots"][0].as_str(), Some(cid.as_str()));
    assert_eq!(r["sha256"].as_str(), Some(sha256_hex(&bytes).as_str()));

    // Theirs, made by Helia's importer and @ipld/car, into a serving gateway.
    let theirs = tmp.path().join("theirs.car");
    let made = node_script(
        &peers,
        "car.mjs",
        &["pack", &nar.to_string_lossy(), &theirs.to_string_lossy()],
    )
    .expect("pack");
    let root = made["root"].as_str().expect("root").to_owned();
    println!("@ipld/car {} packed {root}", made["car"]);
    let gw = Gateway::start(&tmp.path().join("b"), &[]);

    // A tampered copy is refused, naming the block, and nothing is pinned.
    let mut tampered = std::fs::read(&theirs).expect("read car");
    let at = tampered.len() - 1000;
    tampered[at] ^= 1;
    let bad = tmp.path().join("tampered.car");
    std::fs::write(&bad, &tampered).expect("write");
    let out = gw
        .cli()
        .args(["car", "import"])
        .arg(&bad)
        .output()
        .expect("spawn");
    assert!(!out.status.success(), "a tampered CAR was imported");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not match its CID"), "{err}");
    assert_eq!(run_ok_str(gw.cli().arg("pins")), "");

    let said = run_ok_str(gw.cli().args(["car", "import"]).arg(&theirs));
    println!("{said}");
    assert!(said.contains(&root), "{said}");
    assert!(run_ok_str(gw.cli().arg("pins")).contains(&root));
    let got = tmp.path().join("got.nar");
    run_ok(gw.cli().args(["fetch", &root, "--out"]).arg(&got));
    assert!(std::fs::read(&got).expect("read") == bytes);
}
