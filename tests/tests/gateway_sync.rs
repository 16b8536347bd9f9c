//! Anchor sync as a user's gateway sees it: a seeder keeps a closure available
//! after its anchor is gone, sets that must not be trusted are refused,
//! each with a logged reason, and a large set served over HTTP is streamed
//! through a spool file, not held in memory.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anchor_registry::{
    ContentId, ImportProfile, MappingData, MappingSetBuilder, NarHash, SecretKey, SetKind,
    StorePath, StorePathHash,
};
use e2e::anchors::{keygen, registry};
use e2e::gateway::{rss_of, Gateway};
use e2e::nginx::Nginx;
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

/// Made-up store path number `i` (distinct hash parts).
fn made_up(i: u64, tag: u64) -> StorePath {
    let mut digest = [0u8; 20];
    digest[..8].copy_from_slice(&i.to_le_bytes());
    digest[8..16].copy_from_slice(&tag.to_le_bytes());
    StorePath::from_parts(StorePathHash::from_digest(digest), &format!("made-up-{i}")).unwrap()
}

/// A set of `n` made-up entries with `refs` references each (so it is
/// large in bytes with few signatures to make and check), written to `out`.
fn large_set(key: &SecretKey, n: u64, refs: u64, out: &Path) {
    let cid = ContentId::parse("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")
        .expect("a CID");
    let references: std::collections::BTreeSet<StorePath> =
        (0..refs).map(|r| made_up(r, 0x7265_6673)).collect();
    let mut builder = MappingSetBuilder::first(SetKind::Anchor, key.name().parse().unwrap());
    for i in 0..n {
        builder.insert(
            MappingData {
                path: made_up(i, 0x0073_706f_6f6c),
                nar_hash: NarHash::digest(&i.to_le_bytes()),
                nar_size: 1000 + i,
                references: references.clone(),
                deriver: None,
                ca: None,
                cid,
                profile: ImportProfile::unixfs_v1_2025(),
            }
            .sign(key),
        );
    }
    let now = e2e::nix::unix_now();
    let mut file = std::io::BufWriter::new(fs::File::create(out).unwrap());
    builder.write(key, now, now + 86400, &mut file).unwrap();
    std::io::Write::flush(&mut file).unwrap();
}

#[test]
#[cfg_attr(missing_nginx, ignore = "needs nginx; .ci/run installs it")]
fn a_large_set_over_http_is_synced_without_holding_it_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (key_file, public) = keygen(dir.path(), "anchor-big");
    let key = SecretKey::parse(fs::read_to_string(&key_file).unwrap().trim()).unwrap();
    let www = dir.path().join("www");
    fs::create_dir_all(&www).unwrap();
    let nginx = Nginx::start(&www, &dir.path().join("nginx"));
    let url = format!("http://127.0.0.1:{}/big.jsonl", nginx.port);
    let reg = registry(
        &dir.path().join("reg"),
        &[("anchor-big", &public, &[Path::new(&url)])],
    );
    // The set is not served yet, so the sync at start finds nothing.
    let data = dir.path().join("gw");
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("config.toml"), "sync_interval_secs = 0\n").unwrap();
    let gw = Gateway::start(&data, &reg.serve_args());
    let made = Instant::now();
    let staged = dir.path().join("big.jsonl");
    large_set(&key, 16_000, 90, &staged);
    let size = fs::metadata(&staged).unwrap().len();
    assert!(size >= 64 << 20, "a set of {} MiB", size >> 20);
    println!("a set of {} MiB made in {:?}", size >> 20, made.elapsed());
    fs::rename(&staged, www.join("big.jsonl")).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let baseline = gw.rss();
    let peak = Arc::new(AtomicU64::new(baseline));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done, pid) = (peak.clone(), done.clone(), gw.pid());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_of(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let started = Instant::now();
    let out = run_ok_str(gw.cli().args(["anchors", "sync"]));
    let took = started.elapsed();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    assert_eq!(gw.metric("sync_accepted"), 1, "{out}\n{}", gw.log_text());
    let growth = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    println!(
        "synced a {} MiB set over HTTP in {took:?}: RSS {} MiB before, peak +{} MiB",
        size >> 20,
        baseline >> 20,
        growth >> 20
    );
    // Held whole, the set alone (and the buffer it grew in) is more
    // than its size.
    assert!(
        growth < size / 2,
        "RSS grew by {} MiB syncing a {} MiB set",
        growth >> 20,
        size >> 20
    );
}
