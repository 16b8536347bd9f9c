//! Anchor sets under IPNS names, between real gateways on loopback: an
//! anchor publishes with `--ipns`, a gateway whose registry lists only
//! `ipns://…` follows it over the DHT (and serves the closure to real Nix),
//! follows the next version, and refuses a replayed older record and one
//! signed by another key. The record format is checked against the `ipns`
//! npm package (Helia's) in both directions.

use std::fs;
use std::time::{Duration, Instant};

use e2e::anchors::{keygen, registry};
use e2e::gateway::Gateway;
use e2e::nix::{NixEnv, FIXTURE_CLOSURE};
use e2e::peers::{node_script, peers_dir};
use e2e::{run_ok, run_ok_str};
use gateway::store::ipfs::ipns::{self, IpnsName};

const LAN: &str = "/ipfs/lan/kad/1.0.0";
const RECORD_TYPE: &str = "application/vnd.ipfs.ipns-record";

/// `anchor sign --closure PATH` then `anchor publish --ipns` through the
/// anchor's running gateway; the `ipns://…` name it printed.
fn sign_and_publish_ipns(
    anchor: &Gateway,
    key: &std::path::Path,
    path: &str,
    out: &std::path::Path,
) -> String {
    run_ok(
        anchor
            .cli()
            .args(["anchor", "sign", "--closure", path, "--key"])
            .arg(key),
    );
    let printed = run_ok_str(
        anchor
            .cli()
            .args(["anchor", "publish", "--ipns", "--key"])
            .arg(key)
            .arg("--out")
            .arg(out),
    );
    printed
        .split_whitespace()
        .find(|w| w.starts_with("ipns://k51"))
        .unwrap_or_else(|| panic!("no ipns:// name printed: {printed}"))
        .to_owned()
}

fn get_record(gw: &Gateway, name: &str) -> (u16, Vec<u8>) {
    gw.get_with(
        &format!("/routing/v1/ipns/{name}"),
        &[("Accept", RECORD_TYPE)],
    )
}

fn put_record(gw: &Gateway, name: &str, body: &[u8]) -> (u16, String) {
    let url = format!("{}/routing/v1/ipns/{name}", gw.url);
    match ureq::put(&url)
        .set("Content-Type", RECORD_TYPE)
        .send_bytes(body)
    {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("PUT {url}: {e}"),
    }
}

/// `anchors sync` until the anchor's line shows `version N` (the DHT
/// connection and the record lookup may take a few seconds at first).
fn sync_until_version(gw: &Gateway, version: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = run_ok_str(gw.cli().args(["anchors", "sync"]));
        if out.contains(&format!("version {version}")) && !out.contains("rejected") {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "never synced version {version}:\n{out}\n{}",
            gw.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn substitute(env: &NixEnv, gw: &Gateway, path: &str, store_name: &str) {
    let (_, _, key) = gw.id();
    let store = env.empty_store(store_name);
    let out = env
        .cmd("nix")
        .args([
            "copy",
            "--from",
            &gw.url,
            "--to",
            &store,
            "--option",
            "trusted-public-keys",
            &key,
            path,
        ])
        .output()
        .expect("nix copy");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log_text()
    );
    run_ok(
        env.cmd("nix-store")
            .args(["--store", &store, "--verify-path", path]),
    );
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn a_gateway_follows_an_anchor_under_its_ipns_name_and_refuses_replays_and_forgeries() {
    let env = NixEnv::new();
    let dir = env.path();
    let top1 = env.build("fixture1.nix", FIXTURE_CLOSURE);
    let (ka, ka_pub) = keygen(dir, "anchor-a");
    let anchor = Gateway::start(
        &dir.join("anchor"),
        &["--dht", "server", "--dht-protocol", LAN],
    );
    let set = dir.join("set-a.jsonl");
    let name = sign_and_publish_ipns(&anchor, &ka, &top1, &set);
    let bare = name.trim_start_matches("ipns://").to_owned();
    // The anchor's own key owns the name.
    let owner = IpnsName::from_ed25519(
        anchor_registry::PublicKey::parse(ka_pub.trim())
            .expect("anchor key")
            .as_bytes(),
    )
    .expect("name of the key");
    assert_eq!(owner.to_string(), bare);
    let (status, v1_record) = get_record(&anchor, &bare);
    assert_eq!(status, 200, "the anchor's gateway answers for its own name");

    // A router the client asks beside the DHT; it knows nothing yet.
    let router = Gateway::start(&dir.join("router"), &[]);
    let reg = registry(
        &dir.join("registry"),
        &[("anchor-a", &ka_pub, &[std::path::Path::new(&name)])],
    );
    let client_dir = dir.join("client");
    fs::create_dir_all(&client_dir).expect("client dir");
    fs::write(
        client_dir.join("config.toml"),
        format!("routers = [\"{}\"]\n", router.url),
    )
    .expect("client config");
    let mut args: Vec<&str> = reg.serve_args().to_vec();
    let anchor_addr = anchor.multiaddr();
    args.extend([
        "--require",
        "1",
        "--dht",
        "server",
        "--dht-protocol",
        LAN,
        "--bootstrap",
        &anchor_addr,
    ]);
    let client = Gateway::start(&client_dir, &args);
    sync_until_version(&client, 1);
    substitute(&env, &client, &top1, "v1");

    // v2: the name now points at the next version; the client follows.
    let top2 = env.build("fixture2.nix", FIXTURE_CLOSURE);
    let name2 = sign_and_publish_ipns(&anchor, &ka, &top2, &set);
    assert_eq!(name2, name, "one key, one name");
    sync_until_version(&client, 2);
    substitute(&env, &client, &top2, "v2");
    let resolved = run_ok_str(client.cli().args(["name", "resolve", &name]));
    let (_, v2_record) = get_record(&anchor, &bare);
    let v2 = ipns::verify(&owner, &v2_record, e2e::nix::unix_now()).expect("v2 verifies");
    assert_eq!(v2.sequence, 2);
    assert_eq!(resolved.trim(), format!("/ipfs/{}", v2.value));

    // Replay: the router is fed v1 (it never saw v2, so it takes it); the
    // client refuses v1 from there with a logged reason and stays on v2.
    let (status, body) = put_record(&router, &bare, &v1_record);
    assert_eq!(status, 200, "{body}");
    let refused_before = client.metric("ipns_refused");
    let resolved = run_ok_str(client.cli().args(["name", "resolve", &name]));
    assert_eq!(resolved.trim(), format!("/ipfs/{}", v2.value));
    assert!(client.metric("ipns_refused") > refused_before);
    assert!(
        client.log_text().contains("is below 2, the highest seen"),
        "{}",
        client.log_text()
    );
    // Handed to the client directly, v1 is refused too: 409, nothing stored.
    let (status, body) = put_record(&client, &bare, &v1_record);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("below 2"), "{body}");

    // A record for the anchor's name signed by another key: 400, nothing
    // stored; the client still answers v2.
    let forger = ipns::keypair_from_seed([0x5a; 32]).expect("key");
    let forged = ipns::sign(
        &forger,
        &v2.value,
        99,
        e2e::nix::unix_now() + 3600,
        Duration::from_secs(60),
    )
    .expect("forged record");
    let (status, body) = put_record(&client, &bare, &forged);
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("not signed by the key the name derives from"),
        "{body}"
    );
    let (status, body) = put_record(&client, &bare, &vec![0u8; 11 * 1024]);
    assert!((400..500).contains(&status), "oversized: {status} {body}");
    let (status, _) = get_record(&client, "k51-not-a-name");
    assert_eq!(status, 400);
    let (status, held) = get_record(&client, &bare);
    assert_eq!(status, 200);
    assert_eq!(
        ipns::verify(&owner, &held, e2e::nix::unix_now())
            .expect("held record")
            .sequence,
        2
    );
}

#[test]
#[cfg_attr(
    missing_peers,
    ignore = "needs the foreign peers (scripts/install-peers DIR, NIXPFS_PEERS_DIR=DIR)"
)]
fn records_we_make_pass_the_ipns_package_validator_and_we_accept_its_records() {
    let peers = peers_dir();
    let dir = tempfile::tempdir().expect("tempdir");
    let target = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy";
    let cid = target.parse().expect("cid");
    let now = e2e::nix::unix_now();

    // Ours, validated by the `ipns` package's DHT validator.
    let seed = [0x21u8; 32];
    let keypair = ipns::keypair_from_seed(seed).expect("key");
    let ours = ipns::sign(&keypair, &cid, 7, now + 3600, Duration::from_secs(300)).expect("sign");
    let name = IpnsName::from_ed25519(
        anchor_registry::SecretKey::from_seed("k-1", seed)
            .expect("key")
            .public()
            .as_bytes(),
    )
    .expect("name");
    let file = dir.path().join("ours.bin");
    fs::write(&file, &ours).expect("write");
    let v = node_script(
        &peers,
        "ipns.mjs",
        &["validate", &name.to_string(), file.to_str().expect("utf-8")],
    )
    .expect("the ipns package accepts our record");
    assert_eq!(v["sequence"], "7");
    assert_eq!(v["value"], format!("/ipfs/{target}"));
    // …and refuses it under another name (so the check can fail).
    let other = IpnsName::from_ed25519(
        anchor_registry::SecretKey::from_seed("k-2", [0x22; 32])
            .expect("key")
            .public()
            .as_bytes(),
    )
    .expect("name");
    assert!(node_script(
        &peers,
        "ipns.mjs",
        &[
            "validate",
            &other.to_string(),
            file.to_str().expect("utf-8")
        ],
    )
    .is_err());

    // Theirs, made from the same kind of seed, accepted by us: the name it
    // printed is the one our code derives from that seed, and the gateway
    // takes the record over Routing V1 and resolves the name to its value.
    let theirs_file = dir.path().join("theirs.bin");
    let their_seed = [0x33u8; 32];
    let made = node_script(
        &peers,
        "ipns.mjs",
        &[
            "make",
            &hex_of(&their_seed),
            target,
            "5",
            theirs_file.to_str().expect("utf-8"),
        ],
    )
    .expect("the ipns package makes a record");
    let their_name: IpnsName = made["name"]
        .as_str()
        .expect("name")
        .parse()
        .expect("k51 name");
    let expected = IpnsName::from_ed25519(
        anchor_registry::SecretKey::from_seed("k-3", their_seed)
            .expect("key")
            .public()
            .as_bytes(),
    )
    .expect("name");
    assert_eq!(their_name, expected);
    let theirs = fs::read(&theirs_file).expect("record");
    let verified = ipns::verify(&their_name, &theirs, now).expect("we accept their record");
    assert_eq!(verified.sequence, 5);
    assert_eq!(verified.value.to_string(), target);

    let gw = Gateway::start(&dir.path().join("gw"), &[]);
    let (status, body) = put_record(&gw, &their_name.to_string(), &theirs);
    assert_eq!(status, 200, "{body}");
    let resolved = run_ok_str(
        gw.cli()
            .args(["name", "resolve", &format!("ipns://{their_name}")]),
    );
    assert_eq!(resolved.trim(), format!("/ipfs/{target}"));
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
