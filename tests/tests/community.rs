//! The community-fed cache end to end, with real Nix and real processes on
//! loopback: a contributor claims a closure, two rebuilder anchors rebuild it
//! (`--check`: on one machine the outputs are present), and a client that
//! requires both anchors serves what reproduced and refuses what did not.
//! Claims alone, however many keys sign them, never make a path servable.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anchor_registry::{
    AnchorName, MappingSetBuilder, NarHash, PublicKey, SecretKey, SetKind, StorePath, Vouch,
};
use e2e::anchors::keygen;
use e2e::gateway::Gateway;
use e2e::nix::NixEnv;
use e2e::{nixpfs, nixpfs_bin, run_ok, run_ok_str};
use serde_json::Value;

/// A deterministic leaf and a derivation on top of it that records the
/// time of its build in nanoseconds: no two builds of it are alike.
const CLOSURE: &str = r#"{ nonce }:
let
  sys = builtins.currentSystem;
  det = builtins.derivation {
    name = "community-det"; system = sys; builder = "/bin/sh";
    args = [ "-c" "echo reproducible-${nonce} > $out" ];
  };
in builtins.derivation {
  name = "community-nondet"; system = sys; builder = "/bin/sh";
  inherit det;
  PATH = "/usr/bin:/bin";
  args = [ "-c" "mkdir $out; echo $det > $out/dep; date +%s%N > $out/built-at" ];
}
"#;

/// Something the contributor claims and no rebuilder touches.
const LONELY: &str = r#"{ nonce }: builtins.derivation {
  name = "community-lonely"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "echo lonely-${nonce} > $out" ];
}
"#;

/// `nixpfs --data-dir DIR …` with the test's Nix configuration (no build
/// users, no sandbox), as a rebuilder needs to build.
fn nixpfs_with_nix(env: &NixEnv, data_dir: &Path) -> Command {
    let bin = nixpfs_bin();
    let mut cmd = env.cmd(bin.to_str().expect("utf-8 binary path"));
    cmd.arg("--data-dir").arg(data_dir);
    cmd
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn record<'a>(report: &'a Value, path: &str) -> &'a Value {
    report["records"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["store_path"] == path))
        .unwrap_or_else(|| panic!("no record for {path}: {report}"))
}

fn entry<'a>(list: &'a Value, path: &str) -> &'a Value {
    list.as_array()
        .and_then(|r| r.iter().find(|r| r["store_path"] == path))
        .unwrap_or_else(|| panic!("no entry for {path}: {list}"))
}

/// Everything up to a client gateway that requires both rebuilders.
struct World {
    env: NixEnv,
    det: String,
    nondet: String,
    lonely: String,
    rebuilders: Vec<(String, PublicKey)>,
    claims_cid: String,
    _contributor: Gateway,
    client: Gateway,
}

fn world() -> World {
    let env = NixEnv::new();
    let nondet = env.build("community.nix", CLOSURE);
    let lonely = env.build("lonely.nix", LONELY);
    let det = env
        .closure(&nondet)
        .into_iter()
        .find(|p| p != &nondet)
        .expect("the dependency");
    let nondet_drv = run_ok_str(env.cmd("nix-store").args(["-q", "--deriver", &nondet]));
    let dir = env.path().to_owned();

    // The contributor seeds the closure and `lonely`, and claims them.
    let contributor_dir = dir.join("contributor");
    let (alice, _) = keygen(&dir, "alice-1");
    let out = run_ok_str(
        nixpfs_with_nix(&env, &contributor_dir)
            .args(["contribute", "--closure", &nondet, &lonely, "--key"])
            .arg(&alice),
    );
    let field = |prefix: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in: {out}"))
            .trim()
            .to_owned()
    };
    assert!(out.starts_with("claimed 3 paths as alice-1"), "{out}");
    let claims_file = field("claims set:");
    let claims_cid = field("announce: ipfs://");
    let own = json(&run_ok_str(
        nixpfs()
            .arg("--data-dir")
            .arg(&contributor_dir)
            .args(["claims", "--json"]),
    ));
    assert_eq!(own.as_array().map(Vec::len), Some(3), "{own}");

    // Two rebuilder anchors, each on its own data directory and key, take
    // the claims and rebuild both derivations (one by .drv, one by output).
    let reg = dir.join("registry.json");
    let (root, root_pub) = keygen(&dir, "root-1");
    run_ok(
        nixpfs()
            .args(["registry", "init", "--root-key", &root_pub])
            .args(["--threshold", "1", "--out"])
            .arg(&reg),
    );
    let mut rebuilders = Vec::new();
    let mut results = Vec::new();
    for name in ["rebuilder-a", "rebuilder-b"] {
        let data = dir.join(name);
        let (sk, public) = keygen(&dir, name);
        run_ok(
            nixpfs_with_nix(&env, &data)
                .args(["claims", "import"])
                .arg(&claims_file),
        );
        let report = json(&run_ok_str(
            nixpfs_with_nix(&env, &data)
                .args(["anchor", "rebuild", &nondet_drv, &det, "--json", "--key"])
                .arg(&sk),
        ));
        let d = record(&report, &det);
        assert_eq!(d["mode"], "checked", "{d}");
        assert_eq!(d["verdict"]["verdict"], "reproduced", "{d}");
        assert_eq!(d["verdict"]["matches"], 1, "{d}");
        let n = record(&report, &nondet);
        assert_eq!(n["verdict"]["verdict"], "differs", "{n}");
        assert_eq!(n["verdict"]["nar_hashes"].as_array().map(Vec::len), Some(2));
        assert!(
            n["result"]["built_at"]
                .as_str()
                .is_some_and(|p| p.ends_with(".check")),
            "{n}"
        );
        assert_eq!(report["signed"], 2, "{report}");
        results.push(n["result"]["nar_hash"].clone());
        let set = dir.join(format!("{name}.jsonl"));
        run_ok(
            nixpfs()
                .arg("--data-dir")
                .arg(&data)
                .args(["anchor", "publish", "--key"])
                .arg(&sk)
                .arg("--out")
                .arg(&set),
        );
        run_ok(nixpfs().args(["registry", "add-anchor"]).arg(&reg).args([
            "--name",
            name,
            "--key",
            &public,
            "--source",
            set.to_str().expect("utf-8"),
        ]));
        rebuilders.push((name.to_owned(), PublicKey::parse(&public).expect("key")));
    }
    assert_ne!(results[0], results[1], "two builds of nondet agreed");
    run_ok(
        nixpfs()
            .args(["registry", "sign"])
            .arg(&reg)
            .arg("--key")
            .arg(&root),
    );

    // The contributor's node seeds NARs and the claims set; the client has
    // nothing but the registry, `--require 2` and the contributor as peer.
    let contributor = Gateway::start(&contributor_dir, &[]);
    let client = Gateway::start(
        &dir.join("client"),
        &[
            "--registry",
            reg.to_str().expect("utf-8"),
            "--registry-root-key",
            &root_pub,
            "--require",
            "2",
            "--peer",
            &contributor.multiaddr(),
        ],
    );
    let sync = run_ok_str(client.cli().args(["anchors", "sync"]));
    assert!(
        sync.contains("rebuilder-a: ") && sync.contains("rebuilder-b: "),
        "{sync}"
    );
    let imported =
        run_ok_str(
            client
                .cli()
                .args(["claims", "import", &format!("ipfs://{claims_cid}")]),
        );
    assert!(
        imported.contains("alice-1: accepted version 1 (3 claims)"),
        "{imported}"
    );
    World {
        env,
        det,
        nondet,
        lonely,
        rebuilders,
        claims_cid,
        _contributor: contributor,
        client,
    }
}

fn narinfo_status(gw: &Gateway, path: &str) -> (u16, String) {
    let hash = StorePath::parse(path)
        .expect("store path")
        .hash()
        .to_string();
    let (status, body) = gw.get(&format!("/{hash}.narinfo"));
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn a_client_serves_what_two_rebuilders_reproduced_and_refuses_what_differs() {
    let w = world();
    let client = &w.client;
    let (_, _, client_key) = client.id();

    // Reproduced by both rebuilders: real Nix substitutes it into an empty store.
    let (status, narinfo) = narinfo_status(client, &w.det);
    assert_eq!(status, 200, "{}", client.log_text());
    assert!(
        narinfo.contains("Sig: rebuilder-a:") && narinfo.contains("Sig: rebuilder-b:"),
        "{narinfo}"
    );
    let store = w.env.empty_store("client-store");
    let copied = w
        .env
        .cmd("nix")
        .args(["copy", "--from", &client.url, "--to", &store])
        .args(["--option", "trusted-public-keys", &client_key, &w.det])
        .output()
        .expect("spawn nix copy");
    assert!(
        copied.status.success(),
        "nix copy: {}\n{}",
        String::from_utf8_lossy(&copied.stderr),
        client.log_text()
    );
    run_ok(
        w.env
            .cmd("nix-store")
            .args(["--store", &store, "--verify-path", &w.det]),
    );

    // The rebuilders got different bytes for nondet: refused. `lonely` has
    // a claim and nothing else: refused.
    assert_eq!(narinfo_status(client, &w.nondet).0, 404);
    assert_eq!(narinfo_status(client, &w.lonely).0, 404);
    let out = w
        .env
        .cmd("nix")
        .args(["copy", "--from", &client.url, "--to"])
        .arg(w.env.empty_store("refused-store"))
        .args(["--option", "trusted-public-keys", &client_key, &w.nondet])
        .output()
        .expect("spawn nix copy");
    assert!(
        !out.status.success(),
        "Nix got a path that did not reproduce"
    );

    // The report: two different NarHashes, each with its anchor's signed
    // mapping, which anyone can check against the registry keys.
    let repro = json(&run_ok_str(client.cli().args(["repro", "--json"])));
    let nondet = entry(&repro, &w.nondet);
    assert_eq!(nondet["verdict"]["verdict"], "differs", "{nondet}");
    let hashes = nondet["verdict"]["nar_hashes"].as_array().expect("hashes");
    assert_eq!(hashes.len(), 2, "{nondet}");
    assert_ne!(hashes[0], hashes[1]);
    let evidence: Vec<Vouch> = ["agreeing", "disagreeing"]
        .iter()
        .flat_map(|g| nondet[*g].as_array().cloned().unwrap_or_default())
        .map(|v| serde_json::from_value(v).expect("a vouch"))
        .collect();
    assert_eq!(evidence.len(), 2, "{nondet}");
    for vouch in &evidence {
        let (_, registered) = w
            .rebuilders
            .iter()
            .find(|(name, _)| name == vouch.anchor.as_str())
            .expect("a registry anchor");
        assert_eq!(&vouch.key, registered);
        vouch
            .mapping
            .verify(registered)
            .expect("signature verifies");
    }
    assert_ne!(
        evidence[0].mapping.nar_hash(),
        evidence[1].mapping.nar_hash()
    );
    assert_eq!(nondet["claims"].as_array().map(Vec::len), Some(1));
    let det = entry(&repro, &w.det);
    assert_eq!(det["verdict"]["verdict"], "reproduced", "{det}");
    assert_eq!(det["verdict"]["matches"], 2, "{det}");
    let lonely = entry(&repro, &w.lonely);
    assert_eq!(lonely["verdict"]["verdict"], "not_checked", "{lonely}");
    let text = run_ok_str(client.cli().arg("repro"));
    assert!(text.contains("differs: sha256:"), "{text}");

    let status = json(&run_ok_str(client.cli().args(["status", "--json"])));
    assert_eq!(status["repro"]["reproduced"], 1, "{status}");
    assert_eq!(status["repro"]["differs"], 1, "{status}");
    assert_eq!(status["repro"]["not_checked"], 1, "{status}");
    assert_eq!(status["conflicts"], 1, "{status}");
    assert!(!w.claims_cid.is_empty());
}

/// Writes a claims set, signed by `key`, that maps `path` to a NarHash of
/// nothing it ever was.
fn tampered_claims(key: &SecretKey, mapping: &anchor_registry::Mapping, out: &Path) -> NarHash {
    let mut data = mapping.data().clone();
    data.nar_hash = NarHash::digest(b"tampered");
    let mut builder = MappingSetBuilder::first(
        SetKind::Claims,
        AnchorName::parse(key.name()).expect("name"),
    );
    builder.insert(data.sign(key));
    let now = e2e::nix::unix_now();
    let mut bytes = Vec::new();
    builder
        .write(key, now, now + 3600, &mut bytes)
        .expect("write claims");
    fs::write(out, bytes).expect("write claims file");
    NarHash::digest(b"tampered")
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn five_keys_claiming_a_tampered_nar_hash_change_nothing() {
    let w = world();
    let client = &w.client;
    let before = narinfo_status(client, &w.det);
    assert_eq!(before.0, 200);

    let claims = json(&run_ok_str(client.cli().args(["claims", "--json"])));
    let honest: anchor_registry::Mapping =
        serde_json::from_value(entry(&claims, &w.det)["claims"][0]["mapping"].clone())
            .expect("a mapping");
    let mut files = Vec::new();
    let mut tampered = None;
    for i in 0..5 {
        let key = SecretKey::generate(&format!("sock{i}-1")).expect("key");
        let file = w.env.path().join(format!("sock{i}.jsonl"));
        tampered = Some(tampered_claims(&key, &honest, &file));
        files.push(file);
    }
    let tampered = tampered.expect("five claims").to_string();
    run_ok(client.cli().args(["claims", "import"]).args(&files));

    // Served exactly as before, by anchor agreement, with the real NarHash.
    let after = narinfo_status(client, &w.det);
    assert_eq!(after.0, 200);
    let narinfo = anchor_registry::NarInfo::parse(&after.1).expect("narinfo");
    assert_eq!(narinfo.nar_hash, *honest.nar_hash());
    assert_ne!(narinfo.nar_hash.to_string(), tampered);
    // Nor do claims make the refused paths servable.
    assert_eq!(narinfo_status(client, &w.nondet).0, 404);
    assert_eq!(narinfo_status(client, &w.lonely).0, 404);

    // `nixpfs claims` shows the five bad claims beside the honest one.
    let claims = json(&run_ok_str(client.cli().args(["claims", "--json"])));
    let det_claims = entry(&claims, &w.det)["claims"]
        .as_array()
        .cloned()
        .expect("claims");
    assert_eq!(det_claims.len(), 6, "{claims}");
    let bad: Vec<&Value> = det_claims
        .iter()
        .filter(|c| c["nar_hash"] == tampered.as_str())
        .collect();
    assert_eq!(bad.len(), 5, "{claims}");
    let text = run_ok_str(client.cli().arg("claims"));
    assert_eq!(text.matches(&tampered).count(), 5, "{text}");
    let repro = json(&run_ok_str(client.cli().args(["repro", "--json"])));
    assert_eq!(
        entry(&repro, &w.det)["verdict"]["verdict"],
        "reproduced",
        "{repro}"
    );
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn rebuild_and_sign_a_closure_of_fifty_derivations() {
    let env = NixEnv::new();
    let top = env.build(
        "fifty.nix",
        r#"{ nonce }:
let
  sys = builtins.currentSystem;
  leaf = i: builtins.derivation {
    name = "leaf-${toString i}"; system = sys; builder = "/bin/sh";
    args = [ "-c" "echo ${nonce}-${toString i} > $out" ];
  };
in builtins.derivation {
  name = "fifty"; system = sys; builder = "/bin/sh";
  leaves = builtins.genList leaf 49;
  args = [ "-c" "echo $leaves > $out" ];
}
"#,
    );
    let closure = env.closure(&top);
    assert_eq!(closure.len(), 50);
    let dir = env.path().to_owned();
    let (contributor_key, _) = keygen(&dir, "carol-1");
    let (rebuilder_key, _) = keygen(&dir, "rebuilder-1");
    let contributor = dir.join("contributor");
    let started = Instant::now();
    let out = run_ok_str(
        nixpfs_with_nix(&env, &contributor)
            .args(["contribute", "--closure", &top, "--key"])
            .arg(&contributor_key),
    );
    let contribute_ms = started.elapsed().as_millis();
    let claims_file = out
        .lines()
        .find_map(|l| l.strip_prefix("claims set: "))
        .expect("claims file")
        .to_owned();
    let rebuilder = dir.join("rebuilder");
    run_ok(
        nixpfs_with_nix(&env, &rebuilder)
            .args(["claims", "import"])
            .arg(&claims_file),
    );
    let started = Instant::now();
    let report = json(&run_ok_str(
        nixpfs_with_nix(&env, &rebuilder)
            .args(["anchor", "rebuild", "--json", "--key"])
            .arg(&rebuilder_key)
            .args(&closure),
    ));
    let wall_ms = started.elapsed().as_millis();
    let records = report["records"].as_array().expect("records");
    assert_eq!(records.len(), 50);
    assert!(
        records
            .iter()
            .all(|r| r["verdict"]["verdict"] == "reproduced" && r["signed"] == true),
        "{report}"
    );
    let (nix_ms, total_ms) = (
        report["nix_ms"].as_u64().expect("nix_ms"),
        report["total_ms"].as_u64().expect("total_ms"),
    );
    eprintln!(
        "NUMBERS: contribute 50 paths: {contribute_ms} ms wall; rebuild-and-sign 50 derivations: \
         {wall_ms} ms wall (process included), {total_ms} ms in the command, of which Nix {nix_ms} ms, \
         ours {} ms",
        total_ms.saturating_sub(nix_ms)
    );
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn an_absent_output_is_built_here_and_only_if_matches_withholds_lonely_results() {
    let env = NixEnv::new();
    let file = env.path().join("fresh.nix");
    fs::write(
        &file,
        r#"{ nonce }: builtins.derivation {
  name = "community-fresh"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "echo fresh-${nonce} > $out" ];
}
"#,
    )
    .expect("write nix file");
    let drv = run_ok_str(env.cmd("nix-instantiate").arg(&file).args([
        "--argstr",
        "nonce",
        &e2e::nix::nonce(),
    ]));
    let dir = env.path().to_owned();
    let (sk, public) = keygen(&dir, "rebuilder-1");
    let data = dir.join("rebuilder");
    let report = json(&run_ok_str(
        nixpfs_with_nix(&env, &data)
            .args(["anchor", "rebuild", &drv, "--json", "--key"])
            .arg(&sk),
    ));
    let records = report["records"].as_array().expect("records");
    assert_eq!(records.len(), 1, "{report}");
    let r = &records[0];
    let out = r["store_path"].as_str().expect("output").to_owned();
    assert_eq!(r["mode"], "built", "{r}");
    assert_eq!(r["result"]["built_at"], out.as_str(), "{r}");
    assert_eq!(r["verdict"]["verdict"], "not_checked", "{r}");
    assert_eq!(r["signed"], true, "{r}");
    run_ok(env.cmd("nix-store").args(["--verify-path", &out]));
    let info = env.path_info(&out);
    let parse = |v: &Value| NarHash::parse(v.as_str().expect("a hash")).expect("a NarHash");
    assert_eq!(
        parse(&r["result"]["nar_hash"]),
        parse(&info["narHash"]),
        "{r}"
    );

    // Present now: checked. Nobody claimed it, so --only-if-matches keeps it
    // out of the working set, though the verdict is recorded.
    let again = json(&run_ok_str(
        nixpfs_with_nix(&env, &data)
            .args([
                "anchor",
                "rebuild",
                &out,
                "--only-if-matches",
                "--json",
                "--key",
            ])
            .arg(&sk),
    ));
    assert_eq!(again["records"][0]["mode"], "checked", "{again}");
    assert_eq!(again["records"][0]["signed"], false, "{again}");
    assert_eq!(again["signed"], 0, "{again}");
    let published = dir.join("set.jsonl");
    run_ok(
        nixpfs()
            .arg("--data-dir")
            .arg(&data)
            .args(["anchor", "publish", "--key"])
            .arg(&sk)
            .arg("--out")
            .arg(&published),
    );
    let set = fs::read_to_string(&published).expect("set");
    assert_eq!(set.lines().count(), 2, "header + the one signed mapping");
    assert!(set.contains(&public.split(':').next().expect("name").to_string()));
    let repro = json(&run_ok_str(
        nixpfs()
            .arg("--data-dir")
            .arg(&data)
            .args(["repro", "--json"]),
    ));
    assert_eq!(entry(&repro, &out)["rebuilt"]["mode"], "checked", "{repro}");
}
