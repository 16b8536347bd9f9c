//! Attacks on the trust path, tried against the real binary: each must be
//! refused, with the reason logged and counted. (Issue: trust that holds
//! under attack; the holes not yet closed have no test here.)

use std::fs;
use std::process::Command;

use e2e::anchors::{keygen, registry};
use e2e::gateway::Gateway;
use e2e::{nixpfs, run_ok_str};

fn metric(gw: &Gateway, name: &str) -> u64 {
    let (status, body) = gw.get("/metrics");
    assert_eq!(status, 200);
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("nixpfs_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
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
    assert!(metric(&gw, "registry_refused") >= 1);
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
    assert_eq!(metric(&gw, "narinfo_registry_expired"), 1);
    assert!(gw.log_text().contains("the registry expired"), "logged");
    let text = run_ok_str(gw.cli().arg("status"));
    assert!(
        text.contains(&format!("registry expired at {expires}")),
        "{text}"
    );
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
