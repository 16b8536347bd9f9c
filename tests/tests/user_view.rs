//! What a user sees, tried with the real tools: the status page rendered by
//! headless Chromium, `/metrics` checked by Prometheus' `promtool`, progress
//! bars drawn under a pseudo-terminal (util-linux `script`) and not into a
//! pipe, and JSON log lines.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anchor_registry::testing::{anchor, forged_set, key, mapping, FAR_FUTURE};
use anchor_registry::{Registry, SecretKey, SetKind, Sha256Hash, StorePath};
use e2e::gateway::Gateway;
use e2e::nix::NixEnv;
use e2e::{nixpfs_bin, require_tool, run_ok, run_ok_str};

/// What an outsider can put in a name or a path the page shows.
const SCRIPT: &str = "<script>alert(1)</script>";

/// A store path whose hash part is `c` repeated (a Nix base32 character).
fn store_path(c: char, name: &str) -> StorePath {
    let hash: String = std::iter::repeat_n(c, 32).collect();
    StorePath::parse(&format!("/nix/store/{hash}-{name}")).expect("a valid store path")
}

/// Where screenshots go: the target directory of the binary under test.
fn target_dir() -> PathBuf {
    nixpfs_bin()
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/nixpfs")
        .to_path_buf()
}

/// Headless Chromium as a locked-down machine runs it: no network of its
/// own beyond the page, a fresh profile, killed if it hangs.
fn chromium(profile: &Path) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["90", "chromium"]);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,2400",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

/// A registry of alpha, beta and gamma; gamma's source is a path with a
/// script tag in it, which the rejection reason quotes.
struct World {
    dir: tempfile::TempDir,
    keys: Vec<(String, SecretKey)>,
    registry: PathBuf,
    root: SecretKey,
}

impl World {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = key("root-1");
        let mut registry = Registry::init(vec![root.public()], 1, FAR_FUTURE).expect("registry");
        let mut keys = Vec::new();
        for name in ["alpha", "beta", "gamma"] {
            let k = key(&format!("{name}-1"));
            let source = if name == "gamma" {
                dir.path().join(format!("{SCRIPT}.jsonl"))
            } else {
                dir.path().join(format!("{name}.jsonl"))
            };
            registry
                .add_anchor(anchor(&k, name, &[source.to_str().expect("utf-8")]))
                .expect("add anchor");
            keys.push((name.to_owned(), k));
        }
        registry.sign(&root);
        let file = dir.path().join("registry.json");
        fs::write(&file, registry.render()).expect("write registry");
        Self {
            dir,
            keys,
            registry: file,
            root,
        }
    }

    fn key(&self, name: &str) -> &SecretKey {
        &self.keys.iter().find(|(n, _)| n == name).expect("a key").1
    }

    /// `name`'s set at `version`; past the first, chained to a previous
    /// version this gateway never saw (it trusts whatever it sees first).
    fn publish(&self, name: &str, version: u64, entries: &[anchor_registry::Mapping]) {
        let previous = (version > 1).then(|| Sha256Hash::digest(b"an earlier version"));
        let set = forged_set(
            self.key(name),
            SetKind::Anchor,
            name,
            version,
            previous,
            entries,
        );
        fs::write(self.dir.path().join(format!("{name}.jsonl")), set).expect("write set");
    }

    fn gateway(&self, extra: &[&str]) -> Gateway {
        let data = self.dir.path().join("gw");
        let mut args = vec![
            "--registry",
            self.registry.to_str().expect("utf-8"),
            "--sync-interval",
            "0",
        ];
        let root = self.root.public().to_string();
        args.extend(["--registry-root-key", &root]);
        args.extend(extra);
        Gateway::start(&data, &args)
    }
}

#[test]
#[cfg_attr(
    missing_chromium,
    ignore = "needs Debian's chromium; .ci/run installs it"
)]
fn the_status_page_shows_peers_pins_anchors_with_reasons_and_conflicts_in_chromium() {
    require_tool("chromium");
    let w = World::new();
    let path = store_path('c', "pkg");
    // alpha: v2, then a rollback to v1. beta maps the same path to other bytes.
    w.publish(
        "alpha",
        2,
        &[mapping(w.key("alpha"), path.clone(), b"alpha's nar")],
    );
    w.publish(
        "beta",
        1,
        &[mapping(w.key("beta"), path.clone(), b"beta's nar")],
    );
    let peer_dir = w.dir.path().join("peer");
    let peer = Gateway::start(&peer_dir, &[]);
    let peer_addr = peer.multiaddr();
    let gw = w.gateway(&["--peer", &peer_addr]);
    run_ok_str(gw.cli().args(["anchors", "sync"]));
    w.publish(
        "alpha",
        1,
        &[mapping(w.key("alpha"), path.clone(), b"alpha's nar")],
    );
    let out = run_ok_str(gw.cli().args(["anchors", "sync"]));
    assert!(out.contains("alpha: rejected"), "{out}");
    let file = w.dir.path().join("pinned.bin");
    fs::write(&file, anchor_registry::testing::noise(3, 100_000)).expect("write");
    let pinned = run_ok_str(gw.cli().arg("add").arg(&file));
    let cid = pinned.split_whitespace().next().expect("a CID").to_owned();
    let (peer_id, _, _) = peer.id();

    let (status, health) = gw.get("/health");
    assert_eq!((status, health.as_slice()), (200, &b"ok\n"[..]));

    let profile = w.dir.path().join("chromium");
    let dom = run_ok_str(
        chromium(&profile)
            .arg("--dump-dom")
            .arg(format!("{}/", gw.url))
            .stderr(Stdio::null()),
    );
    assert!(dom.contains("<h1>nixpfs gateway</h1>"), "{dom}");
    assert!(dom.contains(&peer_id), "the connected peer: {dom}");
    assert!(dom.contains(&cid), "the pin: {dom}");
    for anchor in ["alpha", "beta", "gamma"] {
        assert!(
            dom.contains(&format!("<td>{anchor}</td>")),
            "{anchor}: {dom}"
        );
    }
    assert!(dom.contains("rollback"), "alpha's rollback reason: {dom}");
    assert!(
        dom.contains(&path.to_string()) && dom.contains("alpha says") && dom.contains("beta says"),
        "the conflict with its evidence: {dom}"
    );
    assert!(
        dom.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "the script tag shows as text: {dom}"
    );
    assert!(!dom.contains(SCRIPT), "no script element: {dom}");

    let shot = target_dir().join("status-page.png");
    let _ = fs::remove_file(&shot);
    run_ok(
        chromium(&profile)
            .arg(format!("--screenshot={}", shot.display()))
            .arg(format!("{}/", gw.url))
            .stderr(Stdio::null()),
    );
    let png = fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG at {}", shot.display());
}

#[test]
#[cfg_attr(
    missing_promtool,
    ignore = "needs promtool (Debian package prometheus); .ci/run installs it"
)]
fn metrics_after_real_traffic_pass_promtool() {
    require_tool("promtool");
    let w = World::new();
    let gw = w.gateway(&[]);
    // Hits, misses and client mistakes, so every family has samples.
    let nar = anchor_registry::testing::noise(9, 200_000);
    let file = w.dir.path().join("nar.bin");
    fs::write(&file, &nar).expect("write nar");
    let cid = run_ok_str(gw.cli().arg("add").arg(&file));
    let path = store_path('d', "served");
    let mut served = mapping(w.key("alpha"), path.clone(), &nar).into_data();
    served.cid = anchor_registry::ContentId::parse(cid.trim()).expect("a CID");
    w.publish("alpha", 1, &[served.sign(w.key("alpha"))]);
    run_ok_str(gw.cli().args(["anchors", "sync"]));
    assert_eq!(gw.get(&format!("/{}.narinfo", path.hash())).0, 200);
    assert_eq!(
        gw.get(&format!("/{}.narinfo", store_path('f', "other").hash()))
            .0,
        404
    );
    assert_eq!(gw.get("/not-a-hash.narinfo").0, 400);
    let nar_url = format!(
        "/nar/{}.nar",
        anchor_registry::NarHash::digest(&nar).to_nix32()
    );
    let (status, body) = gw.get(&nar_url);
    assert_eq!(status, 200);
    assert!(body == nar);

    let (status, scrape) = gw.get("/metrics");
    assert_eq!(status, 200);
    let scrape = String::from_utf8(scrape).expect("utf-8");
    assert!(
        scrape.contains("nixpfs_narinfo_served_total 1\n"),
        "{scrape}"
    );
    assert!(
        scrape.contains("nixpfs_narinfo_request_seconds_count 3\n"),
        "{scrape}"
    );
    assert!(
        scrape.contains("nixpfs_nar_response_seconds_count 1\n"),
        "{scrape}"
    );
    assert!(
        scrape.contains("# TYPE nixpfs_pinned_bytes gauge\n"),
        "{scrape}"
    );
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    use std::io::Write;
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(scrape.as_bytes())
        .expect("feed promtool");
    let out = check.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool: {said}\n{scrape}");
    assert!(said.trim().is_empty(), "promtool found problems: {said}");

    // A broken exposition would fail the same check: the test can fail.
    let broken = Command::new("sh")
        .arg("-c")
        .arg("printf 'nixpfs_x_total 1\\nnixpfs_x_total{a=\"1\" 2\\n' | promtool check metrics")
        .output()
        .expect("promtool");
    assert!(!broken.status.success(), "promtool accepts garbage");
}

/// Runs `nixpfs` with `args` under a pseudo-terminal: what the terminal showed.
fn under_pty(args: &[&str], env: &[(&str, &Path)]) -> String {
    require_tool("script");
    let mut line = shell_quote(&nixpfs_bin().to_string_lossy());
    for a in args {
        line.push(' ');
        line.push_str(&shell_quote(a));
    }
    let mut cmd = Command::new("script");
    cmd.args(["-q", "-e", "-c", &line, "/dev/null"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run script");
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{line}: {shown}");
    shown
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn pin_draws_a_progress_bar_on_a_terminal_and_none_into_a_pipe() {
    let env = NixEnv::new();
    let big = env.build(
        "big.nix",
        r#"{ nonce }: derivation {
  name = "big-${nonce}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "/usr/bin/head -c 201326592 /dev/urandom > $out" ];
}"#,
    );
    let data = env.path().join("gw");
    let nix_env = [
        ("NIX_CONF_DIR", env.path().join("conf")),
        ("NIXPFS_DATA_DIR", data.clone()),
    ];
    let nix_env: Vec<(&str, &Path)> = nix_env.iter().map(|(k, v)| (*k, v.as_path())).collect();

    // No gateway running: the CLI pins itself and draws from its own meter.
    let shown = under_pty(&["pin", &big], &nix_env);
    assert!(shown.contains("pinning"), "{shown:?}");
    assert!(
        shown.contains("pinning: 192.00 MiB in"),
        "the one-line summary: {shown:?}"
    );
    run_ok(
        env.cmd(&nixpfs_bin().to_string_lossy())
            .env("NIXPFS_DATA_DIR", &data)
            .args(["unpin", &big]),
    );

    // Through a running gateway: the bar follows the gateway's meter.
    let gw = Gateway::start(&data, &[]);
    let shown = under_pty(&["pin", &big], &nix_env);
    assert!(
        shown.contains("pinning: 192.00 MiB in"),
        "the summary through the admin socket: {shown:?}"
    );
    run_ok(gw.cli().args(["unpin", &big]));

    // Into a pipe: the command's output and nothing else.
    let out = gw
        .cli()
        .env("NIX_CONF_DIR", env.path().join("conf"))
        .args(["pin", &big])
        .output()
        .expect("pin");
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("pinning"),
        "no bar into a pipe: {stderr:?}"
    );
    assert!(!stderr.contains('\u{1b}'), "no escape codes: {stderr:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&big), "{stdout}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("gw");
    fs::create_dir_all(&data).expect("mkdir");
    fs::write(data.join("config.toml"), "log_format = \"json\"\n").expect("config");
    let gw = Gateway::start(&data, &[]);
    assert_eq!(gw.get("/not-a-hash.narinfo").0, 400);
    run_ok_str(gw.cli().arg("status"));
    let log = gw.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "the gateway logged something");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    assert!(lines.iter().any(|l| l.contains("serving http://")), "{log}");
}

#[test]
fn completions_and_man_pages_come_from_the_command_line_definitions() {
    let bash = run_ok_str(e2e::nixpfs().args(["completions", "bash"]));
    assert!(
        bash.contains("anchors") && bash.contains("--progress"),
        "{bash}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("nixpfs.bash");
    fs::write(&script, &bash).expect("write");
    run_ok(Command::new("bash").arg("-n").arg(&script));
    for shell in ["zsh", "fish"] {
        let out = run_ok_str(e2e::nixpfs().args(["completions", shell]));
        assert!(out.contains("nixpfs"), "{shell}: {out}");
    }
    let bad = e2e::nixpfs()
        .args(["completions", "cmd.exe"])
        .output()
        .expect("run");
    assert_eq!(bad.status.code(), Some(2), "a usage error");

    let page = run_ok_str(e2e::nixpfs().arg("man"));
    assert!(
        page.starts_with(".ie") || page.contains(".TH nixpfs"),
        "{page}"
    );
    let pages = dir.path().join("man");
    run_ok(e2e::nixpfs().arg("man").arg("--out").arg(&pages));
    for name in ["nixpfs.1", "nixpfs-pin.1", "nixpfs-serve.1"] {
        assert!(pages.join(name).is_file(), "{name} written");
    }
}
