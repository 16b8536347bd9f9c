//! Attacks on the trust path, tried against the real binary: each must be
//! refused, with the reason logged and counted.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anchor_registry::testing::{anchor, forged_set, key, mapping, FAR_FUTURE};
use anchor_registry::{
    ContentId, Mapping, NarHash, Registry, SecretKey, SetKind, Sha256Hash, StorePath,
};
use e2e::anchors::{keygen, registry};
use e2e::gateway::Gateway;
use e2e::{nixpfs, run_ok_str};

/// A registry under one root listing anchors that publish at
/// `<dir>/<name>.jsonl`, kept at `<dir>/registry.json`.
struct World {
    dir: tempfile::TempDir,
    root: SecretKey,
    registry: Registry,
    keys: BTreeMap<String, SecretKey>,
}

impl World {
    fn new(names: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = key("root-1");
        let mut registry = Registry::init(vec![root.public()], 1, FAR_FUTURE).expect("registry");
        let mut keys = BTreeMap::new();
        for name in names {
            let k = key(&format!("{name}-1"));
            let source = dir.path().join(format!("{name}.jsonl"));
            registry
                .add_anchor(anchor(&k, name, &[source.to_str().expect("utf-8")]))
                .expect("add anchor");
            keys.insert((*name).to_owned(), k);
        }
        registry.sign(&root);
        let world = Self {
            dir,
            root,
            registry,
            keys,
        };
        fs::write(world.registry_file(), world.registry.render()).expect("write registry");
        world
    }

    fn registry_file(&self) -> PathBuf {
        self.dir.path().join("registry.json")
    }

    fn key(&self, name: &str) -> &SecretKey {
        &self.keys[name]
    }

    /// Writes what `name`'s source serves.
    fn serve_set(&self, name: &str, bytes: &[u8]) {
        fs::write(self.dir.path().join(format!("{name}.jsonl")), bytes).expect("write set");
    }

    /// `name`'s honest first set holding `entries` (sorted by the caller).
    fn publish(&self, name: &str, entries: &[Mapping]) {
        let set = forged_set(self.key(name), SetKind::Anchor, name, 1, None, entries);
        self.serve_set(name, &set);
    }

    /// Publishes the registry's next version, changed by `change`.
    fn next_registry(&mut self, change: impl FnOnce(&mut Registry, &std::path::Path)) {
        let mut next = self.registry.next_version().expect("next version");
        change(&mut next, self.dir.path());
        next.sign(&self.root);
        fs::write(self.registry_file(), next.render()).expect("write registry");
        self.registry = next;
    }

    /// A gateway following this registry from its root, with `config` lines.
    fn gateway(&self, config: &str) -> Gateway {
        let data = self.dir.path().join("gw");
        fs::create_dir_all(&data).expect("data dir");
        fs::write(data.join("config.toml"), config).expect("config");
        Gateway::start(
            &data,
            &[
                "--registry",
                self.registry_file().to_str().expect("utf-8"),
                "--registry-root-key",
                &self.root.public().to_string(),
                "--sync-interval",
                "0",
            ],
        )
    }
}

/// How `status` writes a unix time: its UTC date.
fn gateway_time(secs: u64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn store_path(name: &str) -> StorePath {
    StorePath::parse(&format!(
        "/nix/store/1bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-{name}"
    ))
    .expect("a valid store path")
}

fn sync(gw: &Gateway) -> String {
    run_ok_str(gw.cli().args(["anchors", "sync"]))
}

fn narinfo_status(gw: &Gateway, path: &StorePath) -> (u16, String) {
    let (status, body) = gw.get(&format!("/{}.narinfo", path.hash()));
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn a_planted_first_registry_is_refused_and_the_real_one_still_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, anchor_pub) = keygen(dir.path(), "anchor-a");
    let set = dir.path().join("set-a.jsonl");
    let real = registry(
        &dir.path().join("real"),
        &[("anchor-a", &anchor_pub, &[&set])],
    );
    // Whoever answers the first fetch serves a registry of their own roots,
    // listing their own key as anchor-a.
    let (_, evil_pub) = keygen(dir.path(), "evil-1");
    let planted = registry(
        &dir.path().join("planted"),
        &[("anchor-a", &evil_pub, &[&set])],
    );
    let served = dir.path().join("served-registry.json");
    fs::copy(&planted.file, &served).expect("plant");

    let gw = Gateway::start(
        &dir.path().join("gw"),
        &[
            "--registry",
            served.to_str().expect("utf-8"),
            "--registry-root-key",
            &real.root_key,
            "--sync-interval",
            "0",
        ],
    );
    let out = gw
        .cli()
        .args(["anchors", "sync"])
        .output()
        .expect("run sync");
    assert!(!out.status.success(), "a planted registry must not sync");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("configured trust root"), "{stderr}");
    assert!(gw.metric("registry_refused") >= 1);
    assert!(
        gw.log_text().contains("refused registry"),
        "{}",
        gw.log_text()
    );
    let status = run_ok_str(gw.cli().args(["status", "--json"]));
    let status: serde_json::Value = serde_json::from_str(&status).expect("json");
    assert_eq!(
        status["registry_version"],
        serde_json::Value::Null,
        "nothing was trusted"
    );

    // The real registry at the same place is accepted: the plant left no trace.
    fs::copy(&real.file, &served).expect("the real one");
    let sync = run_ok_str(gw.cli().args(["anchors", "sync"]));
    assert!(sync.contains("registry version 1"), "{sync}");
}

#[test]
fn a_registry_without_a_configured_trust_root_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reg = registry(&dir.path().join("reg"), &[]);
    let out = nixpfs()
        .arg("--data-dir")
        .arg(dir.path().join("gw"))
        .args(["serve", "--listen", "127.0.0.1:0", "--registry"])
        .arg(&reg.file)
        .output()
        .expect("run serve");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("registry_root_keys"), "{stderr}");
}

#[test]
fn registry_init_and_sign_print_the_trust_root_a_gateway_needs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, root_pub) = keygen(dir.path(), "root-1");
    let file = dir.path().join("registry.json");
    let init = run_ok_str(
        nixpfs()
            .args([
                "registry",
                "init",
                "--root-key",
                &root_pub,
                "--threshold",
                "1",
                "--out",
            ])
            .arg(&file),
    );
    let line = format!("registry_root_keys = [\"{root_pub}\"]");
    assert!(init.contains(&line), "{init}");
    let sign = run_ok_str(
        Command::new(e2e::nixpfs_bin())
            .args(["registry", "sign"])
            .arg(&file)
            .arg("--key")
            .arg(&root),
    );
    assert!(
        sign.contains(&line) && sign.contains("registry_threshold = 1"),
        "{sign}"
    );
}

#[test]
fn an_expired_registry_serves_no_anchor_path() {
    use anchor_registry::testing::{anchor, key, mapping, one_root_registry, FAR_FUTURE};
    use anchor_registry::{AnchorName, MappingSetBuilder, SetKind, StorePath};
    let dir = tempfile::tempdir().expect("tempdir");
    let alpha = key("alpha-1");
    let set = dir.path().join("alpha.jsonl");
    let path =
        StorePath::parse("/nix/store/1bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-anchored").expect("path");
    let mut builder =
        MappingSetBuilder::first(SetKind::Anchor, AnchorName::parse("alpha").expect("name"));
    builder.insert(mapping(&alpha, path.clone(), b"nar bytes"));
    let mut bytes = Vec::new();
    builder
        .write(&alpha, 1, FAR_FUTURE, &mut bytes)
        .expect("set");
    fs::write(&set, bytes).expect("write set");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let expires = now + 4;
    let registry = one_root_registry(
        [anchor(&alpha, "alpha", &[set.to_str().expect("utf-8")])],
        expires,
    );
    let reg = dir.path().join("registry.json");
    fs::write(&reg, registry.render()).expect("write registry");
    let gw = Gateway::start(
        &dir.path().join("gw"),
        &[
            "--registry",
            reg.to_str().expect("utf-8"),
            "--registry-root-key",
            &registry.root_keys()[0].to_string(),
            "--sync-interval",
            "0",
        ],
    );
    run_ok_str(gw.cli().args(["anchors", "sync"]));
    let narinfo = format!("/{}.narinfo", path.hash());
    assert_eq!(
        gw.get(&narinfo).0,
        200,
        "served while the registry is valid"
    );

    let wait = expires.saturating_sub(now) + 1;
    std::thread::sleep(std::time::Duration::from_secs(wait));
    let (status, body) = gw.get(&narinfo);
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("registry expired"));
    assert_eq!(gw.metric("narinfo_registry_expired"), 1);
    assert!(gw.log_text().contains("the registry expired"), "logged");
    let text = run_ok_str(gw.cli().arg("status"));
    let when = gateway_time(expires);
    assert!(
        text.contains(&format!("registry expired at {when}")),
        "{text}"
    );
}

#[test]
fn skipped_registry_versions_are_walked_through_the_copies_registry_sign_keeps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, alpha_pub) = keygen(dir.path(), "alpha-1");
    let set = dir.path().join("alpha.jsonl");
    let reg = registry(&dir.path().join("reg"), &[("alpha", &alpha_pub, &[&set])]);
    let gw = Gateway::start(
        &dir.path().join("gw"),
        &[&reg.serve_args()[..], &["--sync-interval", "0"]].concat(),
    );
    assert!(sync(&gw).contains("registry version 1"));

    // Two versions published within one sync interval.
    let root = dir.path().join("reg").join("root-1.sk");
    let (_, beta_pub) = keygen(dir.path(), "beta-1");
    let edit = |args: &[&str]| {
        e2e::run_ok(nixpfs().args(["registry"]).args(args));
        let sign = run_ok_str(
            nixpfs()
                .args(["registry", "sign"])
                .arg(&reg.file)
                .arg("--key")
                .arg(&root),
        );
        assert!(sign.contains(".registry.json beside it"), "{sign}");
    };
    let file = reg.file.to_str().expect("utf-8");
    edit(&[
        "add-anchor",
        file,
        "--name",
        "beta",
        "--key",
        &beta_pub,
        "--source",
        "/srv/beta.jsonl",
    ]);
    edit(&["remove-anchor", file, "--name", "beta"]);
    assert!(dir.path().join("reg").join("2.registry.json").exists());

    let out = sync(&gw);
    assert!(out.contains("registry version 3"), "{out}");
    assert!(
        gw.log_text().contains("walking skipped registry versions"),
        "{}",
        gw.log_text()
    );
}

#[test]
fn a_set_carrying_another_anchors_signatures_counts_for_neither() {
    let w = World::new(&["alpha", "beta"]);
    let path = store_path("pkg");
    // alpha's set carries beta's real signature (copied from beta's narinfo).
    let copied = mapping(w.key("beta"), path.clone(), b"what beta signed");
    let set = forged_set(w.key("alpha"), SetKind::Anchor, "alpha", 1, None, &[copied]);
    w.serve_set("alpha", &set);
    let gw = w.gateway("anchors = [\"beta\"]\n");
    let out = sync(&gw);
    assert!(out.contains("alpha: rejected"), "{out}");
    assert!(
        out.contains("a set carries only its own key's signatures"),
        "{out}"
    );
    assert_eq!(narinfo_status(&gw, &path).0, 404, "beta's vote not counted");
    assert!(gw.metric("sync_rejected") >= 1);
    assert!(gw.log_text().contains("refused mapping set"));
}

#[test]
fn a_removed_anchors_leftover_set_is_purged_and_counts_for_nothing() {
    let mut w = World::new(&["alpha", "beta"]);
    let path = store_path("pkg");
    w.publish("alpha", &[mapping(w.key("alpha"), path.clone(), b"nar")]);
    let gw = w.gateway("");
    sync(&gw);
    assert_eq!(narinfo_status(&gw, &path).0, 200);

    w.next_registry(|r, _| {
        r.remove_anchor(&anchor_registry::AnchorName::parse("alpha").expect("name"))
            .expect("remove alpha");
    });
    let out = sync(&gw);
    assert!(out.contains("registry version 2"), "{out}");
    assert_eq!(narinfo_status(&gw, &path).0, 404);
    assert_eq!(gw.metric("sets_purged"), 1);
    assert!(gw.log_text().contains("purged a stored set"));
}

#[test]
fn a_source_listed_for_one_anchor_cannot_install_another_anchors_set() {
    let w = World::new(&["alpha", "beta"]);
    let path = store_path("pkg");
    // alpha's source serves beta's genuine set.
    let set = forged_set(
        w.key("beta"),
        SetKind::Anchor,
        "beta",
        1,
        None,
        &[mapping(w.key("beta"), path.clone(), b"nar")],
    );
    w.serve_set("alpha", &set);
    let gw = w.gateway("");
    let out = sync(&gw);
    assert!(out.contains("alpha: rejected"), "{out}");
    assert!(
        out.contains("installs only its own publisher's set"),
        "{out}"
    );
    assert_eq!(narinfo_status(&gw, &path).0, 404);
    assert!(gw.metric("sync_rejected") >= 1);
}

#[test]
fn a_second_name_for_a_hash_part_is_a_conflict_not_a_hidden_path() {
    let w = World::new(&["alpha", "beta"]);
    let honest = store_path("pkg");
    // `aaa-hide` sorts before `pkg`: the first stored name must not decide.
    let renamed = store_path("aaa-hide");
    w.publish("alpha", &[mapping(w.key("alpha"), honest.clone(), b"nar")]);
    w.publish("beta", &[mapping(w.key("beta"), renamed, b"nar")]);
    let gw = w.gateway("");
    sync(&gw);
    let (status, body) = narinfo_status(&gw, &honest);
    assert_eq!(status, 404);
    assert!(body.contains("disagree"), "{body}");
    assert_eq!(gw.metric("narinfo_conflict"), 1);
    let conflicts = run_ok_str(gw.cli().args(["conflicts", "--json"]));
    let conflicts: serde_json::Value = serde_json::from_str(&conflicts).expect("json");
    assert_eq!(conflicts[0]["evidence"].as_array().map(Vec::len), Some(2));
}

#[test]
fn a_bogus_cid_beside_a_good_one_does_not_hide_the_nar() {
    let w = World::new(&["alpha", "beta"]);
    let gw = w.gateway("fetch_timeout_secs = 3\n");
    let nar = anchor_registry::testing::noise(7, 300_000);
    let file = w.dir.path().join("nar.bin");
    fs::write(&file, &nar).expect("write nar");
    let good = run_ok_str(gw.cli().arg("add").arg(&file));
    let good = good.trim();
    let path = store_path("pkg");
    let at = |signer: &SecretKey, cid: &str| {
        let mut data = mapping(signer, path.clone(), &nar).into_data();
        data.cid = ContentId::parse(cid).expect("a CID");
        data.sign(signer)
    };
    // alpha (tried first) maps the NAR to a CID nobody has.
    let bogus = "bafkreie7ohywtosou76tasm7j63yigtzxe7d5zqus4zu3j6oltvgtibeom";
    w.publish("alpha", &[at(w.key("alpha"), bogus)]);
    w.publish("beta", &[at(w.key("beta"), good)]);
    sync(&gw);
    assert_eq!(narinfo_status(&gw, &path).0, 200);
    let (status, body) = gw.get(&format!("/nar/{}.nar", NarHash::digest(&nar).to_nix32()));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(body == nar, "the good CID's bytes, verified");
    assert!(
        gw.log_text()
            .contains("NAR candidate failed, trying the next"),
        "{}",
        gw.log_text()
    );
}

#[test]
fn a_new_key_starts_a_new_chain_after_a_stolen_keys_huge_version() {
    let mut w = World::new(&["alpha"]);
    let path = store_path("pkg");
    let stolen = w.key("alpha").clone();
    let huge = (1u64 << 53) - 1;
    let set = forged_set(
        &stolen,
        SetKind::Anchor,
        "alpha",
        huge,
        Some(Sha256Hash::digest(b"anything")),
        &[mapping(&stolen, path.clone(), b"backdoor")],
    );
    w.serve_set("alpha", &set);
    let gw = w.gateway("");
    // Accepted by the sync at start; unchanged by this one.
    let out = sync(&gw);
    assert!(out.contains(&format!("version {huge}")), "{out}");

    // The registry re-keys alpha; the new key's first set must be accepted.
    let fresh = key("alpha-2");
    let fresh_public = fresh.clone();
    w.next_registry(|r, dir| {
        let name = anchor_registry::AnchorName::parse("alpha").expect("name");
        r.remove_anchor(&name).expect("remove");
        let source = dir.join("alpha.jsonl");
        r.add_anchor(anchor(
            &fresh_public,
            "alpha",
            &[source.to_str().expect("utf-8")],
        ))
        .expect("re-add");
    });
    w.keys.insert("alpha".to_owned(), fresh);
    w.publish(
        "alpha",
        &[mapping(w.key("alpha"), path.clone(), b"the real NAR")],
    );
    let out = sync(&gw);
    assert!(out.contains("alpha: accepted version 1"), "{out}");
    let (status, body) = narinfo_status(&gw, &path);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&NarHash::digest(b"the real NAR").to_string()),
        "{body}"
    );
    assert_eq!(gw.metric("sets_purged"), 1);
}

#[test]
fn the_admin_api_is_a_private_socket_never_the_tcp_port() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("gw");
    let gw = Gateway::start(&data, &[]);
    let mode = |p: &std::path::Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&data.join("admin.sock")), 0o600);
    assert_eq!(mode(&data), 0o700);
    assert!(!data.join("admin.token").exists() && !data.join("api.json").exists());

    // Over TCP the admin path does not exist, whatever credential comes with it.
    let tcp = ureq::post(&format!("{}/api/v1/admin", gw.url))
        .set("Authorization", "Bearer anything")
        .send_string(r#"{"op":"status"}"#);
    assert!(matches!(tcp, Err(ureq::Error::Status(404, _))), "{tcp:?}");
    // The CLI reaches the gateway on the socket.
    let out = run_ok_str(gw.cli().arg("status"));
    assert!(out.starts_with("peer "), "{out}");

    // A second gateway on the same data directory stops with one line.
    let second = nixpfs()
        .arg("--data-dir")
        .arg(&data)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .expect("run a second serve");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(stderr.contains("already serving"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    // And the first one still answers on its socket.
    run_ok_str(gw.cli().arg("status"));
}
