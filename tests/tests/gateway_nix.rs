//! The product as a user sees it: `nixpfs serve`, real Nix substituting from
//! it, NARs fetched over our bitswap from another gateway, anchor policy
//! (k of n, conflicts), and bytes that do not match what anchors signed never
//! reaching Nix as valid.

use std::fs;
use std::path::Path;

use anchor_registry::{
    Mapping, MappingData, MappingSetBuilder, NarHash, SecretKey, SetKind, StorePath,
};
use e2e::anchors::{keygen, registry, sign_and_publish};
use e2e::gateway::Gateway;
use e2e::nix::{NixEnv, FIXTURE_CLOSURE};
use e2e::{nixpfs, run_ok, run_ok_str};

fn substitute(env: &NixEnv, url: &str, key: &str, store: &str, path: &str) -> std::process::Output {
    env.copy_from(url, key, store, path)
        .output()
        .expect("spawn nix copy")
}

fn assert_ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn own_pins_are_served_to_real_nix_with_ranges_and_clear_errors() {
    let env = NixEnv::new();
    let top = env.build("fixture.nix", FIXTURE_CLOSURE);
    let data = env.path().join("gw");
    run_ok(
        nixpfs()
            .arg("--data-dir")
            .arg(&data)
            .args(["pin", "--closure", &top]),
    );
    let pins = run_ok_str(nixpfs().arg("--data-dir").arg(&data).args(["pins"]));
    assert_eq!(pins.lines().count(), 2, "top + dep pinned: {pins}");

    let gw = Gateway::start(&data, &[]);
    let (_, _, key) = gw.id();
    let store = env.empty_store("substituted");
    let out = substitute(&env, &gw.url, &key, &store, &top);
    assert_ok(&out, "nix copy from the gateway");
    let closure = run_ok_str(env.cmd("nix-store").args(["--store", &store, "-qR", &top]));
    assert_eq!(closure.lines().count(), 2, "{closure}");
    run_ok(
        env.cmd("nix-store")
            .args(["--store", &store, "--verify-path", &top]),
    );

    // The narinfo points at nar/<nix32 NarHash>.nar, uncompressed, signed by us.
    let hash = &StorePath::parse(&top).unwrap().hash().to_string();
    let (status, body) = gw.get(&format!("/{hash}.narinfo"));
    assert_eq!(status, 200);
    let narinfo = anchor_registry::NarInfo::parse(&String::from_utf8(body).unwrap()).unwrap();
    assert_eq!(narinfo.compression.as_deref(), Some("none"));
    assert_eq!(
        narinfo.url,
        format!("nar/{}.nar", narinfo.nar_hash.to_nix32())
    );
    assert!(narinfo.verify(&anchor_registry::PublicKey::parse(&key).unwrap()));

    // Range requests return exactly the slice of nix-store --dump.
    let dump = run_ok(env.cmd("nix-store").args(["--dump", &top]));
    let (status, part) = gw.get_with(&format!("/{}", narinfo.url), &[("Range", "bytes=100-1999")]);
    assert_eq!(status, 206);
    assert!(part == dump[100..2000], "range bytes differ");
    let (status, whole) = gw.get(&format!("/{}", narinfo.url));
    assert_eq!(status, 200);
    assert!(whole == dump);
    let (status, _) = gw.get_with(
        &format!("/{}", narinfo.url),
        &[("Range", &format!("bytes={}-", dump.len()))],
    );
    assert_eq!(status, 416);

    // Client mistakes are 4xx with a reason, unknown paths 404.
    let (status, body) = gw.get("/not-a-hash.narinfo");
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let (status, _) = gw.get("/00000000000000000000000000000000.narinfo");
    assert_eq!(status, 404);
    let (status, _) = gw.get("/nar/zzz.nar");
    assert_eq!(status, 400);
    let (status, _) = gw.get(&format!("/nar/{}.nar", NarHash::digest(b"x").to_nix32()));
    assert_eq!(status, 404);
    let (status, cache_info) = gw.get("/nix-cache-info");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&cache_info).contains("StoreDir: /nix/store"));
}

/// Rewrites a set of mappings under another anchor's key, plus extra entries.
fn write_set(key: &SecretKey, mappings: &[Mapping], extra: Vec<Mapping>, out: &Path) {
    let mut builder = MappingSetBuilder::first(
        SetKind::Anchor,
        anchor_registry::AnchorName::parse(key.name()).unwrap(),
    );
    for m in mappings {
        builder.insert(m.data().clone().sign(key));
    }
    for m in extra {
        builder.insert(m);
    }
    let now = e2e::nix::unix_now();
    let mut bytes = Vec::new();
    builder.write(key, now, now + 3600, &mut bytes).unwrap();
    fs::write(out, bytes).unwrap();
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn anchors_policy_decides_what_a_client_gateway_serves_from_a_peer() {
    let env = NixEnv::new();
    let top = env.build("fixture.nix", FIXTURE_CLOSURE);
    let lonely = env.build(
        "lonely.nix",
        r#"{ nonce }: builtins.derivation { name = "lonely"; system = builtins.currentSystem;
            builder = "/bin/sh"; args = [ "-c" "echo lonely-${nonce} > $out" ]; }"#,
    );
    let dir = env.path();
    let (ka, ka_pub) = keygen(dir, "anchor-a");
    let (kb, kb_pub) = keygen(dir, "anchor-b");
    let kb_secret = SecretKey::parse(&fs::read_to_string(&kb).unwrap()).unwrap();

    // Anchor A pins and signs the closure and `lonely`, then publishes.
    let seeder = dir.join("seeder");
    let set_a = dir.join("set-a.jsonl");
    let a_mappings = sign_and_publish(&seeder, &ka, &[&top, &lonely], &set_a);
    assert_eq!(a_mappings.len(), 3);

    // Anchor B independently agrees on the closure, not on `lonely`, and signs
    // a different NarHash for the dep: that path is a conflict.
    let dep = env.closure(&top).into_iter().find(|p| p != &top).unwrap();
    let agreed: Vec<Mapping> = a_mappings
        .iter()
        .filter(|m| m.path().to_string() == top)
        .cloned()
        .collect();
    let dep_mapping = a_mappings
        .iter()
        .find(|m| m.path().to_string() == dep)
        .unwrap();
    let mut forged = dep_mapping.data().clone();
    forged.nar_hash = NarHash::digest(b"something else");
    let set_b = dir.join("set-b.jsonl");
    write_set(
        &kb_secret,
        &agreed,
        vec![MappingData::sign(forged, &kb_secret)],
        &set_b,
    );

    // Registry with both anchors, signed by a root key.
    let reg = registry(
        &dir.join("reg"),
        &[
            ("anchor-a", &ka_pub, &[&set_a]),
            ("anchor-b", &kb_pub, &[&set_b]),
        ],
    );

    // The seeder serves the bytes over IPFS; the client has no blocks at all.
    let seeder_gw = Gateway::start(&seeder, &[]);
    let client_dir = dir.join("client");
    let client = Gateway::start(
        &client_dir,
        &[
            "--registry",
            reg.file.to_str().unwrap(),
            "--registry-root-key",
            &reg.root_key,
            "--require",
            "2",
            "--peer",
            &seeder_gw.multiaddr(),
        ],
    );
    let sync = run_ok_str(client.cli().args(["anchors", "sync"]));
    assert!(
        sync.contains("anchor-a: ") && sync.contains("anchor-b: "),
        "{sync}"
    );
    let (_, _, client_key) = client.id();

    // 2 of 2 agree on top: served, with both anchors' signatures passed through.
    let top_hash = StorePath::parse(&top).unwrap().hash().to_string();
    let (status, body) = client.get(&format!("/{top_hash}.narinfo"));
    assert_eq!(status, 200, "{}", client.log_text());
    let narinfo = String::from_utf8(body).unwrap();
    assert!(
        narinfo.contains("Sig: anchor-a:") && narinfo.contains("Sig: anchor-b:"),
        "{narinfo}"
    );
    // Only anchor A vouches for `lonely`: 1 < 2, not served.
    let lonely_hash = StorePath::parse(&lonely).unwrap().hash().to_string();
    assert_eq!(client.get(&format!("/{lonely_hash}.narinfo")).0, 404);
    // Anchors disagree about the dep: blocked, and reported with evidence.
    let dep_hash = StorePath::parse(&dep).unwrap().hash().to_string();
    assert_eq!(client.get(&format!("/{dep_hash}.narinfo")).0, 404);
    let conflicts = run_ok_str(client.cli().args(["conflicts", "--json"]));
    assert!(
        conflicts.contains(&dep) && conflicts.contains("anchor-b"),
        "{conflicts}"
    );

    // Real Nix: the top NAR comes from the seeder over bitswap, verified.
    // (Nix needs the closure; the dep is blocked, so give Nix only top's NAR by
    // substituting top's contents via its own narinfo and NAR.)
    let (status, nar) = client.get(&format!(
        "/{}",
        anchor_registry::NarInfo::parse(&narinfo).unwrap().url
    ));
    assert_eq!(status, 200, "{}", client.log_text());
    let dump = run_ok(env.cmd("nix-store").args(["--dump", &top]));
    assert!(
        nar == dump,
        "NAR fetched from the peer differs from nix-store --dump"
    );
    let store = env.empty_store("client-store");
    let out = substitute(&env, &client.url, &client_key, &store, &top);
    assert!(
        !out.status.success(),
        "the closure includes a conflicted path: Nix must not get it"
    );

    // Seeding for others: pin what anchor B signed (top, and the dep under
    // its forged NarHash, whose CID is still the real dep's), within a budget
    // that fits only one of the two, then without a budget.
    let size_of = |path: &str| {
        a_mappings
            .iter()
            .find(|m| m.path().to_string() == path)
            .unwrap()
            .data()
            .nar_size
    };
    let budget = size_of(&top) + size_of(&dep) - 1;
    let seeded = run_ok_str(client.cli().args([
        "seed",
        "--anchor",
        "anchor-b",
        "--max-size",
        &budget.to_string(),
    ]));
    assert_eq!(seeded.lines().count(), 1, "budget fits one NAR: {seeded}");
    let seeded = run_ok_str(client.cli().args(["seed", "--anchor", "anchor-b"]));
    assert_eq!(seeded.lines().count(), 2, "{seeded}");
    assert!(seeded.contains(&top) && seeded.contains(&dep), "{seeded}");
    let pins = run_ok_str(client.cli().args(["pins", "--json"]));
    for line in seeded.lines() {
        let cid = line.split_whitespace().next().unwrap();
        assert!(pins.contains(cid), "{cid} not pinned: {pins}");
    }

    // With require 1 and only anchor A counting, Nix substitutes the whole closure.
    drop(client);
    let client2 = Gateway::start(
        &dir.join("client2"),
        &[
            "--registry",
            reg.file.to_str().unwrap(),
            "--registry-root-key",
            &reg.root_key,
            "--require",
            "1",
            "--anchor",
            "anchor-a",
            "--peer",
            &seeder_gw.multiaddr(),
        ],
    );
    run_ok_str(client2.cli().args(["anchors", "sync"]));
    let (_, _, key2) = client2.id();
    let out = substitute(
        &env,
        &client2.url,
        &key2,
        &env.empty_store("client2-store"),
        &top,
    );
    assert_ok(&out, "nix copy through the client gateway");
    let status = run_ok_str(client2.cli().args(["status", "--json"]));
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["counters"]["nar_hash_mismatch"], 0);
    assert!(status["counters"]["narinfo_served"].as_u64().unwrap() >= 2);
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn bytes_that_do_not_match_the_signed_nar_hash_never_reach_nix() {
    let env = NixEnv::new();
    let victim = env.build(
        "victim.nix",
        r#"{ nonce }: builtins.derivation { name = "victim"; system = builtins.currentSystem;
            builder = "/bin/sh"; args = [ "-c" "echo victim-${nonce} > $out" ]; }"#,
    );
    let dir = env.path();
    let (ka, ka_pub) = keygen(dir, "anchor-a");
    let ka_secret = SecretKey::parse(&fs::read_to_string(&ka).unwrap()).unwrap();

    // The seeder has some other bytes; the anchor (wrongly) maps the victim's
    // real NarHash to their CID.
    let seeder = dir.join("seeder");
    let evil = dir.join("evil.bin");
    fs::write(&evil, vec![7u8; 3 << 20]).unwrap();
    let cid = run_ok_str(
        nixpfs()
            .arg("--data-dir")
            .arg(&seeder)
            .arg("add")
            .arg(&evil),
    );
    let info = env.path_info(&victim);
    let data = MappingData {
        path: StorePath::parse(&victim).unwrap(),
        nar_hash: NarHash::parse(info["narHash"].as_str().unwrap()).unwrap(),
        nar_size: 3 << 20,
        references: Default::default(),
        deriver: None,
        ca: None,
        cid: anchor_registry::ContentId::parse(&cid).unwrap(),
        profile: anchor_registry::ImportProfile::unixfs_v1_2025(),
    };
    let set = dir.join("set.jsonl");
    write_set(&ka_secret, &[], vec![data.sign(&ka_secret)], &set);
    let reg = registry(&dir.join("reg"), &[("anchor-a", &ka_pub, &[&set])]);

    let seeder_gw = Gateway::start(&seeder, &[]);
    let client = Gateway::start(
        &dir.join("client"),
        &[
            "--registry",
            reg.file.to_str().unwrap(),
            "--registry-root-key",
            &reg.root_key,
            "--peer",
            &seeder_gw.multiaddr(),
        ],
    );
    run_ok_str(client.cli().args(["anchors", "sync"]));
    let (_, _, key) = client.id();
    let out = substitute(
        &env,
        &client.url,
        &key,
        &env.empty_store("victim-store"),
        &victim,
    );
    assert!(
        !out.status.success(),
        "Nix accepted bytes that do not match the signed NarHash"
    );
    let status: serde_json::Value =
        serde_json::from_str(&run_ok_str(client.cli().args(["status", "--json"]))).unwrap();
    assert!(
        status["counters"]["nar_hash_mismatch"].as_u64().unwrap() >= 1,
        "{status}"
    );
    assert!(
        client.log_text().contains("refusing NAR bytes"),
        "mismatch must be logged"
    );
}
