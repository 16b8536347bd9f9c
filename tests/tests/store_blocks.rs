//! Store-backed blocks with real Nix: a store path pinned from the local
//! store keeps no second copy of its contents (no leaf block files, CIDs
//! identical to an ordinary import), is served from its files to real Nix
//! and over bitswap, is held by a Nix GC root until unpinned, and once a
//! file of it is changed behind our back (as root), is refused everywhere:
//! no wrong byte over HTTP or bitswap, counted, and named by `repo verify`.

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use anchor_registry::StorePath;
use e2e::gateway::Gateway;
use e2e::nix::{NixEnv, FIXTURE_CLOSURE};
use e2e::{nixpfs, run_ok, run_ok_str};

const MIB: u64 = 1 << 20;

/// `nix-store --delete PATH`: whether Nix deleted it.
fn nix_delete(env: &NixEnv, path: &str) -> (bool, String) {
    let out = env
        .cmd("nix-store")
        .args(["--delete", path])
        .output()
        .expect("run nix-store --delete");
    (
        out.status.success() && !Path::new(path).exists(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `nixpfs pins --json` of the data dir, parsed.
fn pins(data: &Path) -> serde_json::Value {
    serde_json::from_str(&run_ok_str(
        nixpfs()
            .arg("--data-dir")
            .arg(data)
            .args(["pins", "--json"]),
    ))
    .expect("pins --json")
}

/// The CID `pins --json` lists for a store path, if it lists the path.
fn cid_of(listed: &serde_json::Value, path: &str) -> Option<String> {
    listed
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["store_path"].as_str() == Some(path))
        .and_then(|p| p["cid"].as_str())
        .map(str::to_owned)
}

/// GET of the whole body, tolerating a response cut short: (status, bytes
/// received before the end or the abort).
fn get_partial(url: &str) -> (u16, Vec<u8>) {
    let resp = match ureq::get(url).timeout(Duration::from_secs(30)).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {url}: {e}"),
    };
    let status = resp.status();
    let mut body = Vec::new();
    let _ = std::io::Read::read_to_end(&mut resp.into_reader(), &mut body);
    (status, body)
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn store_paths_are_served_from_their_files_held_by_gc_roots_and_refused_once_changed() {
    let env = NixEnv::new();
    let top = env.build("fixture.nix", FIXTURE_CLOSURE);
    let dep = env
        .closure(&top)
        .into_iter()
        .find(|p| *p != top)
        .expect("dep in closure");
    let data = env.path().join("gw");
    run_ok(
        nixpfs()
            .arg("--data-dir")
            .arg(&data)
            .args(["pin", "--closure", &top]),
    );

    // Same CID as an ordinary import of the same NAR bytes.
    let nar = run_ok(nixpfs().args(["nar", "dump", &top]));
    assert!(nar.len() as u64 > 2 * MIB, "the fixture spans leaves");
    let nar_file = env.path().join("top.nar");
    fs::write(&nar_file, &nar).unwrap();
    let plain = env.path().join("plain");
    let plain_cid = run_ok_str(
        nixpfs()
            .arg("--data-dir")
            .arg(&plain)
            .arg("add")
            .arg(&nar_file),
    );
    let top_cid = cid_of(&pins(&data), &top).expect("top pinned");
    assert_eq!(
        top_cid, plain_cid,
        "store-backed pin keeps the profile's CID"
    );

    // No second copy: only the DAG's inner node is a file, no leaf.
    let files = e2e::gateway::block_files(&data);
    let stored: u64 = files.iter().map(|(_, n)| n).sum();
    assert!(
        files.iter().all(|(_, n)| *n < 64 * 1024),
        "no leaf block files: {files:?}"
    );
    assert!(
        stored < 4096,
        "{stored} bytes of blocks for a {} byte NAR",
        nar.len()
    );

    // Nix cannot delete a pinned path.
    let (deleted, stderr) = nix_delete(&env, &top);
    assert!(!deleted, "a pinned path must stay: {stderr}");
    assert!(stderr.contains("alive"), "{stderr}");

    let gw = Gateway::start(&data, &[]);
    let (_, _, key) = gw.id();
    let store = env.empty_store("substituted");
    let out = env
        .cmd("nix")
        .args(["copy", "--from", &gw.url, "--to", &store])
        .args(["--option", "trusted-public-keys", &key, &top])
        .output()
        .expect("spawn nix copy");
    assert!(
        out.status.success(),
        "nix copy: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log_text()
    );
    let hash = StorePath::parse(&top).unwrap().hash().to_string();
    let (status, body) = gw.get(&format!("/{hash}.narinfo"));
    assert_eq!(status, 200);
    let narinfo = anchor_registry::NarInfo::parse(&String::from_utf8(body).unwrap()).unwrap();
    let nar_url = format!("{}/{}", gw.url, narinfo.url);
    assert_eq!(get_partial(&nar_url), (200, nar.clone()));

    // Over bitswap, to a second gateway with an empty store.
    let peer_cfg = env.path().join("peer.toml");
    fs::write(&peer_cfg, "fetch_timeout_secs = 3\n").unwrap();
    let peer_cfg = peer_cfg.to_string_lossy().into_owned();
    let ours = gw.multiaddr();
    let peer = Gateway::start(
        &env.path().join("peer"),
        &["--config", &peer_cfg, "--peer", &ours],
    );
    let fetched = env.path().join("fetched.nar");
    run_ok(peer.cli().args(["fetch", &top_cid, "--out"]).arg(&fetched));
    assert_eq!(fs::read(&fetched).unwrap(), nar);
    drop(peer);
    assert_eq!(gw.metric("store_blocks_refused"), 0);

    // Root changes a byte of the big file, same size, behind our back.
    let big = Path::new(&top).join("big");
    let mode = fs::metadata(&big).unwrap().permissions().mode();
    fs::set_permissions(&big, fs::Permissions::from_mode(mode | 0o200)).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&big).unwrap();
    f.write_at(b"Z", 2 * MIB + 17).unwrap();
    drop(f);

    let (status, body) = get_partial(&nar_url);
    assert!(
        status != 200 || body.len() < nar.len(),
        "a changed path must not be served whole ({status}, {} bytes)",
        body.len()
    );
    assert_eq!(body, nar[..body.len()], "no wrong byte before the abort");
    assert!(gw.metric("store_blocks_refused") >= 1, "{}", gw.log_text());
    assert!(gw.log_text().contains("store-backed block refused"));

    let peer2 = Gateway::start(
        &env.path().join("peer2"),
        &["--config", &peer_cfg, "--peer", &ours],
    );
    let out = peer2
        .cli()
        .args(["fetch", &top_cid, "--out"])
        .arg(env.path().join("refetched.nar"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "bitswap must not deliver the changed leaf"
    );
    drop(peer2);
    let status = run_ok_str(gw.cli().arg("status"));
    assert!(status.contains("store_blocks_refused "), "{status}");
    drop(gw);

    let out = nixpfs()
        .arg("--data-dir")
        .arg(&data)
        .args(["repo", "verify"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&big.to_string_lossy().into_owned()), "{text}");
    assert!(text.contains(&top), "the damaged path is named: {text}");

    // Unpinned, the paths are Nix's to delete again: `top` by its path,
    // `dep` by its CID, which takes the path's record and GC root along.
    let listed = pins(&data);
    let dep_cid = cid_of(&listed, &dep).unwrap_or_else(|| panic!("{dep} among the pins: {listed}"));
    run_ok(
        nixpfs()
            .arg("--data-dir")
            .arg(&data)
            .args(["unpin", &top, &dep_cid]),
    );
    let listed = pins(&data);
    assert!(
        !listed.to_string().contains(&dep) && !listed.to_string().contains(&dep_cid),
        "unpinned by CID, the path is no longer the user's: {listed}"
    );
    for path in [&top, &dep] {
        let (deleted, stderr) = nix_delete(&env, path);
        assert!(deleted, "{path} after unpin: {stderr}");
    }
}

/// Two store paths with the same contents: one NAR, one CID.
const TWINS: &str = r#"{ nonce }:
let
  twin = name: builtins.derivation {
    inherit name; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "echo twin-${nonce} > $out" ];
  };
in [ (twin "nixpfs-twin-a") (twin "nixpfs-twin-b") ]
"#;

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn unpinning_one_of_two_paths_with_the_same_nar_keeps_the_other_served_and_rooted() {
    let env = NixEnv::new();
    let built = env.build("twins.nix", TWINS);
    let twins: Vec<&str> = built.lines().collect();
    let [a, b] = twins[..] else {
        panic!("two paths from twins.nix: {built}");
    };
    let data = env.path().join("gw");
    run_ok(nixpfs().arg("--data-dir").arg(&data).args(["pin", a, b]));
    let listed = pins(&data);
    let cid = cid_of(&listed, a).unwrap_or_else(|| panic!("{a} among the pins: {listed}"));
    assert!(
        listed.to_string().contains(&cid) && listed.to_string().contains(b),
        "{b} is pinned with the same CID: {listed}"
    );

    run_ok(nixpfs().arg("--data-dir").arg(&data).args(["unpin", a]));
    let listed = pins(&data);
    assert_eq!(
        cid_of(&listed, b),
        Some(cid.clone()),
        "{b} stays pinned: {listed}"
    );
    assert!(!listed.to_string().contains(a), "{a} is unpinned: {listed}");
    let (deleted, stderr) = nix_delete(&env, a);
    assert!(deleted, "{a} after its unpin: {stderr}");
    let (deleted, _) = nix_delete(&env, b);
    assert!(!deleted, "{b} is still held by its GC root");

    // b's NAR is still served, its leaves read from b's own files.
    let gw = Gateway::start(&data, &[]);
    let hash = StorePath::parse(b).unwrap().hash().to_string();
    let (status, info) = gw.get(&format!("/{hash}.narinfo"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&info));
    let info = String::from_utf8_lossy(&info).into_owned();
    let url = info
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .expect("URL in the narinfo");
    let (status, nar) = gw.get(&format!("/{url}"));
    assert_eq!(status, 200);
    let dumped = run_ok(env.cmd("nix-store").args(["--dump", b]));
    assert_eq!(nar, dumped, "the NAR of {b} as nix-store --dump makes it");
}
