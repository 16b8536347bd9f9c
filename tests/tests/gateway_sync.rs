//! Anchor sync as a user's gateway sees it: a seeder keeps a closure available
//! after its anchor is gone, and sets that must not be trusted are refused,
//! each with a logged reason.

use std::fs;
use std::path::{Path, PathBuf};

use anchor_registry::{MappingSetBuilder, SecretKey, SetKind, StorePath};
use e2e::anchors::{keygen, registry};
use e2e::gateway::Gateway;
use e2e::nix::{NixEnv, FIXTURE_CLOSURE};
use e2e::{nixpfs, run_ok, run_ok_str};

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn a_seeder_keeps_the_closure_available_after_the_anchor_is_gone() {
    let env = NixEnv::new();
    let top = env.build("fixture.nix", FIXTURE_CLOSURE);
    let dir = env.path();
    let (ka, ka_pub) = keygen(dir, "anchor-a");
    let anchor_dir = dir.join("anchor");
    run_ok(
        nixpfs()
            .arg("--data-dir")
            .arg(&anchor_dir)
            .args(["anchor", "sign", "--closure", &top, "--key"])
            .arg(&ka),
    );
    let set = dir.join("set-a.jsonl");
    run_ok(
        nixpfs()
            .arg("--data-dir")
            .arg(&anchor_dir)
            .args(["anchor", "publish", "--key"])
            .arg(&ka)
            .arg("--out")
            .arg(&set),
    );
    let reg = registry(dir, &[("anchor-a", &ka_pub, &[&set])]);
    let reg_s = reg.file.to_str().unwrap();

    let anchor = Gateway::start(&anchor_dir, &[]);
    let seeder = Gateway::start(
        &dir.join("seeder"),
        &[
            "--registry",
            reg_s,
            "--registry-root-key",
            &reg.root_key,
            "--peer",
            &anchor.multiaddr(),
        ],
    );
    run_ok_str(seeder.cli().args(["anchors", "sync"]));
    let seeded = run_ok_str(seeder.cli().args(["seed", "--anchor", "anchor-a"]));
    assert_eq!(seeded.lines().count(), 2, "top and dep seeded: {seeded}");
    drop(anchor);

    let client = Gateway::start(
        &dir.join("client"),
        &[
            "--registry",
            reg_s,
            "--registry-root-key",
            &reg.root_key,
            "--require",
            "1",
            "--peer",
            &seeder.multiaddr(),
        ],
    );
    run_ok_str(client.cli().args(["anchors", "sync"]));
    let (_, _, key) = client.id();
    let store = env.empty_store("from-seeder");
    let out = env
        .cmd("nix")
        .args([
            "copy",
            "--from",
            &client.url,
            "--to",
            &store,
            "--option",
            "trusted-public-keys",
            &key,
            &top,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        client.log_text()
    );
    for path in env.closure(&top) {
        run_ok(
            env.cmd("nix-store")
                .args(["--store", &store, "--verify-path", &path]),
        );
    }
    let peers = run_ok_str(client.cli().arg("peers"));
    assert!(
        peers.contains(&seeder.id().0),
        "the bytes came from the seeder: {peers}"
    );
}

/// Writes a set claiming to be `anchor` with `key`, mapping `paths` (copied from `from`).
fn forged_set(
    key: &SecretKey,
    anchor: &str,
    from: &Path,
    version_after: Option<&Path>,
    expires_in: u64,
    out: &Path,
) {
    let mut entries = Vec::new();
    anchor_registry::read_set(
        std::io::BufReader::new(fs::File::open(from).unwrap()),
        |m| entries.push(m),
    )
    .unwrap();
    let mut builder = match version_after {
        Some(prev) => {
            let text = fs::read(prev).unwrap();
            let line = text.split(|b| *b == b'\n').next().unwrap();
            MappingSetBuilder::next_after(&anchor_registry::SignedHeader::parse(line).unwrap())
        }
        None => MappingSetBuilder::first(SetKind::Anchor, anchor.parse().unwrap()),
    };
    for m in entries {
        builder.insert(m.data().clone().sign(key));
    }
    let now = e2e::nix::unix_now();
    let mut bytes = Vec::new();
    builder
        .write(key, now, now + expires_in, &mut bytes)
        .unwrap();
    fs::write(out, bytes).unwrap();
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn sockpuppets_rollbacks_and_expired_sets_are_refused_with_a_logged_reason() {
    let env = NixEnv::new();
    let top = env.build("fixture.nix", FIXTURE_CLOSURE);
    let dir = env.path();
    let (ka, ka_pub) = keygen(dir, "anchor-a");
    let (kb, kb_pub) = keygen(dir, "anchor-b");
    let ka_secret = SecretKey::parse(&fs::read_to_string(&ka).unwrap()).unwrap();
    let kb_secret = SecretKey::parse(&fs::read_to_string(&kb).unwrap()).unwrap();
    let anchor_dir = dir.join("anchor");
    run_ok(
        nixpfs()
            .arg("--data-dir")
            .arg(&anchor_dir)
            .args(["anchor", "sign", "--closure", &top, "--key"])
            .arg(&ka),
    );
    let v1 = dir.join("a-v1.jsonl");
    run_ok(
        nixpfs()
            .arg("--data-dir")
            .arg(&anchor_dir)
            .args(["anchor", "publish", "--key"])
            .arg(&ka)
            .arg("--out")
            .arg(&v1),
    );

    // Five sockpuppet keys agree, each claiming to be anchor-a, at anchor-a's sources.
    let mut sources: Vec<PathBuf> = Vec::new();
    for i in 0..5 {
        let puppet = SecretKey::generate(&format!("anchor-a-puppet-{i}")).unwrap();
        let file = dir.join(format!("puppet-{i}.jsonl"));
        forged_set(&puppet, "anchor-a", &v1, None, 3600, &file);
        sources.push(file);
    }
    let a_source = dir.join("a-current.jsonl");
    fs::copy(&v1, &a_source).unwrap();
    let b_source = dir.join("b-current.jsonl");
    forged_set(&kb_secret, "anchor-b", &v1, None, 1, &b_source);
    let mut a_sources: Vec<&Path> = sources.iter().map(PathBuf::as_path).collect();
    let reg_puppets = registry(
        &dir.join("reg-puppets"),
        &[("anchor-a", &ka_pub, &a_sources)],
    );

    let top_hash = StorePath::parse(&top).unwrap().hash().to_string();
    let gw = Gateway::start(
        &dir.join("gw-puppets"),
        &[
            "--registry",
            reg_puppets.file.to_str().unwrap(),
            "--registry-root-key",
            &reg_puppets.root_key,
            "--sync-interval",
            "0",
        ],
    );
    let sync = run_ok_str(gw.cli().args(["anchors", "sync"]));
    assert!(sync.contains("anchor-a: rejected"), "{sync}");
    assert_eq!(
        sync.matches("not an anchor of registry").count(),
        5,
        "{sync}"
    );
    assert_eq!(
        gw.get(&format!("/{top_hash}.narinfo")).0,
        404,
        "sockpuppets count for nothing"
    );
    assert!(
        gw.log_text().contains("refused mapping set"),
        "refusals are logged"
    );
    drop(gw);

    // The real anchor-a, then a rollback to an older version; anchor-b's set expires.
    a_sources.clear();
    a_sources.push(&a_source);
    let reg = registry(
        &dir.join("reg-real"),
        &[
            ("anchor-a", &ka_pub, &a_sources),
            ("anchor-b", &kb_pub, &[&b_source]),
        ],
    );
    let gw = Gateway::start(
        &dir.join("gw"),
        &[reg.serve_args().as_slice(), &["--sync-interval", "0"]].concat(),
    );
    let sync = run_ok_str(gw.cli().args(["anchors", "sync"]));
    assert!(
        sync.contains("anchor-a: accepted version 1")
            || sync.contains("anchor-a: unchanged version 1"),
        "{sync}"
    );
    let v2 = dir.join("a-v2.jsonl");
    forged_set(&ka_secret, "anchor-a", &v1, Some(&v1), 3600, &v2);
    fs::copy(&v2, &a_source).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let sync = run_ok_str(gw.cli().args(["anchors", "sync"]));
    assert!(sync.contains("anchor-a: accepted version 2"), "{sync}");
    assert!(
        sync.contains("anchor-b: rejected") && sync.contains("expired"),
        "{sync}"
    );
    assert_eq!(
        gw.get(&format!("/{top_hash}.narinfo")).0,
        200,
        "anchor-a's v2 is served"
    );

    fs::copy(&v1, &a_source).unwrap();
    let sync = run_ok_str(gw.cli().args(["anchors", "sync"]));
    assert!(
        sync.contains("anchor-a: rejected") && sync.contains("rollback"),
        "{sync}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&run_ok_str(gw.cli().args(["status", "--json"]))).unwrap();
    let a = status["anchors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "anchor-a")
        .unwrap();
    assert_eq!(a["version"], 2, "trusted state did not move back: {status}");
    assert_eq!(a["last_sync"], "rejected", "{status}");
    assert!(
        a["reason"].as_str().is_some_and(|r| r.contains("rollback")),
        "the reason travels with the outcome: {status}"
    );
    let text = run_ok_str(gw.cli().arg("status"));
    assert!(
        text.lines()
            .any(|l| l.starts_with("anchor anchor-a: version 2")
                && l.contains("last sync rejected: ")
                && l.contains("rollback")),
        "{text}"
    );
    assert!(status["last_sync"].as_u64().is_some(), "{status}");
    assert!(
        status["counters"]["sync_rejected"].as_u64().unwrap() >= 2,
        "{status}"
    );
    assert_eq!(
        gw.get(&format!("/{top_hash}.narinfo")).0,
        200,
        "still served from v2"
    );
}
