//! Content routing over the Kademlia DHT between real gateways on loopback
//! (LAN protocol, as Kubo's LAN DHT): a gateway finds bytes held by a peer
//! it was never told about, through a bootstrap node that holds none.

use std::fs;
use std::time::{Duration, Instant};

use e2e::gateway::Gateway;
use e2e::run_ok_str;

const LAN: &str = "/ipfs/lan/kad/1.0.0";

fn dht_gateway(dir: &std::path::Path, name: &str, mode: &str, bootstrap: Option<&str>) -> Gateway {
    let mut args = vec!["--dht", mode, "--dht-protocol", LAN];
    if let Some(addr) = bootstrap {
        args.extend(["--bootstrap", addr]);
    }
    Gateway::start(&dir.join(name), &args)
}

fn peer_id(gw: &Gateway) -> String {
    gw.id().0
}

#[test]
fn a_gateway_finds_and_fetches_bytes_through_the_dht_from_a_peer_it_was_never_told_about() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = dht_gateway(dir.path(), "hub", "server", None);
    let hub_addr = hub.multiaddr();
    let holder = dht_gateway(dir.path(), "holder", "server", Some(&hub_addr));
    // The probe waits until the holder's record is findable.
    let probe = dht_gateway(dir.path(), "probe", "client", Some(&hub_addr));
    let finder = dht_gateway(dir.path(), "finder", "client", Some(&hub_addr));

    let bytes = anchor_registry::testing::noise(11, 3 << 20);
    let file = dir.path().join("payload.bin");
    fs::write(&file, &bytes).expect("write payload");
    let cid = run_ok_str(holder.cli().arg("add").arg(&file));
    let cid = cid.trim().to_owned();

    // The holder provides what it pins; once its record reached the hub,
    // the finder's lookup names the holder.
    let holder_id = peer_id(&holder);
    let deadline = Instant::now() + Duration::from_secs(60);
    let providers = loop {
        run_ok_str(holder.cli().args(["routing", "provide", &cid]));
        let found = run_ok_str(probe.cli().args(["routing", "findprovs", &cid, "-n", "1"]));
        if found.contains(&holder_id) {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "the probe never learnt of the holder:\n{found}\nholder log:\n{}\nprobe log:\n{}",
            holder.log_text(),
            probe.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        providers.contains("/ip4/127.0.0.1/tcp/"),
        "with addresses: {providers}"
    );
    // The finder's only configured peer is the hub, which holds nothing:
    // whatever connects it to the holder (its routing-table walk or the
    // provider lookup) came from the DHT.

    let out = dir.path().join("fetched.bin");
    run_ok_str(finder.cli().arg("fetch").arg(&cid).arg("--out").arg(&out));
    assert!(fs::read(&out).expect("fetched") == bytes, "bytes equal");
    let status = run_ok_str(holder.cli().arg("status"));
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("dht: ") && !l.contains(" 0 keys")),
        "{status}"
    );
    let peers = run_ok_str(finder.cli().arg("peers"));
    assert!(peers.contains(&holder_id), "dialled the provider: {peers}");
}

#[test]
fn routing_commands_say_what_to_set_when_the_dht_is_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = Gateway::start(&dir.path().join("gw"), &[]);
    let out = gw
        .cli()
        .args([
            "routing",
            "findprovs",
            "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the DHT is off"), "{stderr}");
}

#[test]
fn a_cid_nobody_provides_fails_within_the_fetch_timeout_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = dht_gateway(dir.path(), "hub", "server", None);
    let data = dir.path().join("lonely");
    fs::create_dir_all(&data).expect("data dir");
    fs::write(data.join("config.toml"), "fetch_timeout_secs = 3\n").expect("config");
    let lonely = dht_gateway(dir.path(), "lonely", "client", Some(&hub.multiaddr()));
    let cid = "bafkreie7ohywtosou76tasm7j63yigtzxe7d5zqus4zu3j6oltvgtibeom";
    let started = Instant::now();
    let out = lonely
        .cli()
        .args(["fetch", cid, "--out"])
        .arg(dir.path().join("never.bin"))
        .output()
        .expect("run fetch");
    let took = started.elapsed();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(cid), "{stderr}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

/// Polls `finder`'s `routing findprovs CID` until `provider` is listed,
/// running `nudge` before each try; the listing.
fn await_provider(finder: &Gateway, cid: &str, provider: &str, mut nudge: impl FnMut()) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        nudge();
        let found = run_ok_str(finder.cli().args(["routing", "findprovs", cid, "-n", "5"]));
        if found.contains(provider) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{provider} never became a provider of {cid}:\n{found}\nlog:\n{}",
            finder.log_text()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
#[cfg_attr(
    missing_peers,
    ignore = "needs the foreign IPFS peers: run scripts/install-peers DIR and export NIXPFS_PEERS_DIR=DIR"
)]
fn nixpfs_finds_nixpfs_through_kubos_lan_dht() {
    let peers = e2e::peers::peers_dir();
    let dir = tempfile::tempdir().expect("tempdir");
    let kubo = e2e::peers::KuboPeer::start(&peers, e2e::peers::KuboKey::Ed25519).expect("kubo");
    println!("bootstrap: Kubo {} ({})", kubo.version, kubo.peer_id);
    let holder = dht_gateway(dir.path(), "holder", "server", Some(&kubo.addrs[0]));
    let finder = dht_gateway(dir.path(), "finder", "client", Some(&kubo.addrs[0]));
    let bytes = anchor_registry::testing::noise(12, 2 << 20);
    let file = dir.path().join("payload.bin");
    fs::write(&file, &bytes).expect("write payload");
    let cid = run_ok_str(holder.cli().arg("add").arg(&file))
        .trim()
        .to_owned();
    let holder_id = peer_id(&holder);
    let listing = await_provider(&finder, &cid, &holder_id, || {
        run_ok_str(holder.cli().args(["routing", "provide", &cid]));
    });
    assert!(listing.contains("/ip4/127.0.0.1/tcp/"), "{listing}");
    let out = dir.path().join("fetched.bin");
    run_ok_str(finder.cli().args(["fetch", &cid, "--out"]).arg(&out));
    assert!(fs::read(&out).expect("fetched") == bytes, "bytes equal");
}

#[test]
#[cfg_attr(
    missing_peers,
    ignore = "needs the foreign IPFS peers: run scripts/install-peers DIR and export NIXPFS_PEERS_DIR=DIR"
)]
fn nixpfs_fetches_what_a_second_kubo_provides_on_the_lan_dht() {
    let peers = e2e::peers::peers_dir();
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = e2e::peers::KuboPeer::start(&peers, e2e::peers::KuboKey::Ed25519).expect("kubo");
    let mut holder =
        e2e::peers::KuboPeer::start(&peers, e2e::peers::KuboKey::Ed25519).expect("second kubo");
    holder
        .request(&format!("connect {}", hub.addrs[0]))
        .expect("connect the kubos");
    let bytes = anchor_registry::testing::noise(13, 2 << 20);
    let file = dir.path().join("payload.bin");
    fs::write(&file, &bytes).expect("write payload");
    let cid = holder
        .request(&format!("add {}", file.display()))
        .expect("kubo add")["cid"]
        .as_str()
        .expect("cid")
        .to_owned();
    // Only the hub is configured: the holder must be found on the DHT.
    let finder = dht_gateway(dir.path(), "finder", "client", Some(&hub.addrs[0]));
    let listing = await_provider(&finder, &cid, &holder.peer_id, || {});
    println!("providers of {cid}: {listing}");
    let out = dir.path().join("fetched.bin");
    run_ok_str(finder.cli().args(["fetch", &cid, "--out"]).arg(&out));
    assert!(fs::read(&out).expect("fetched") == bytes, "bytes equal");
}

#[test]
#[cfg_attr(
    any(missing_nix, missing_peers),
    ignore = "needs the real Nix client and the foreign IPFS peers (.ci/run installs both)"
)]
fn real_nix_substitutes_a_closure_through_a_gateway_that_found_the_seeder_on_kubos_dht() {
    use e2e::anchors::{keygen, registry, sign_and_publish};
    use e2e::nix::{NixEnv, FIXTURE_CLOSURE};

    let env = NixEnv::new();
    let top = env.build("fixture.nix", FIXTURE_CLOSURE);
    let dir = env.path();
    let (ka, ka_pub) = keygen(dir, "anchor-a");
    // Anchor A pins and signs the closure, then publishes its set.
    let seeder = dir.join("seeder");
    let set_a = dir.join("set-a.jsonl");
    let mappings = sign_and_publish(&seeder, &ka, &[&top], &set_a);
    let top_cid = mappings
        .iter()
        .find(|m| m.path().to_string() == top)
        .expect("top is mapped")
        .data()
        .cid
        .to_string();
    let reg = registry(&dir.join("reg"), &[("anchor-a", &ka_pub, &[&set_a])]);

    // Kubo is the only peer either gateway is told about.
    let kubo = e2e::peers::KuboPeer::start(&e2e::peers::peers_dir(), e2e::peers::KuboKey::Ed25519)
        .expect("kubo");
    let dht = ["--dht-protocol", LAN, "--bootstrap", kubo.addrs[0].as_str()];
    let seeder_gw = Gateway::start(&seeder, &[&["--dht", "server"][..], &dht[..]].concat());
    let client = Gateway::start(
        &dir.join("client"),
        &[&reg.serve_args()[..], &["--dht", "client"], &dht[..]].concat(),
    );
    let sync = run_ok_str(client.cli().args(["anchors", "sync"]));
    assert!(sync.contains("anchor-a: "), "{sync}");
    // The seeder provides its pins at start; wait until the DHT has them.
    let seeder_id = peer_id(&seeder_gw);
    await_provider(&client, &top_cid, &seeder_id, || {});

    let (_, _, client_key) = client.id();
    let store = env.empty_store("client-store");
    let out = env
        .cmd("nix")
        .args(["copy", "--from", &client.url, "--to", &store])
        .args(["--option", "trusted-public-keys", &client_key, &top])
        .output()
        .expect("spawn nix copy");
    assert!(
        out.status.success(),
        "nix copy through the DHT-found seeder failed:\n{}\nclient log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        client.log_text()
    );
    for path in env.closure(&top) {
        let name = path.trim_start_matches("/nix/store/");
        let stored = dir.join("client-store/nix/store").join(name);
        assert!(stored.exists(), "{path} substituted into the empty store");
    }
}

#[test]
#[cfg_attr(
    missing_peers,
    ignore = "needs the foreign IPFS peers: run scripts/install-peers DIR and export NIXPFS_PEERS_DIR=DIR"
)]
fn helia_and_nixpfs_find_each_other_on_kubos_lan_dht() {
    let peers = e2e::peers::peers_dir();
    let dir = tempfile::tempdir().expect("tempdir");
    let kubo = e2e::peers::KuboPeer::start(&peers, e2e::peers::KuboKey::Ed25519).expect("kubo");
    let holder = dht_gateway(dir.path(), "holder", "server", Some(&kubo.addrs[0]));
    let mut helia = e2e::peers::HeliaPeer::start_with_lan_dht(&peers).expect("helia");
    helia
        .request(&format!("dial {}", kubo.addrs[0]))
        .expect("helia dials kubo");
    println!(
        "Helia {} ({}) on Kubo {}'s LAN DHT",
        helia.version, helia.peer_id, kubo.version
    );

    // Helia finds the nixpfs holder as a provider and fetches from it.
    let bytes = anchor_registry::testing::noise(14, 2 << 20);
    let file = dir.path().join("ours.bin");
    fs::write(&file, &bytes).expect("write");
    let cid = run_ok_str(holder.cli().arg("add").arg(&file))
        .trim()
        .to_owned();
    let holder_id = peer_id(&holder);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        run_ok_str(holder.cli().args(["routing", "provide", &cid]));
        let found = helia
            .request(&format!("findprovs {cid} 10"))
            .expect("findprovs");
        if found["providers"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["id"] == holder_id.as_str()))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Helia never found the holder: {found}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let got = dir.path().join("helia-got.bin");
    let r = helia
        .request(&format!("cat {cid} {} 60", got.display()))
        .expect("helia cat");
    assert_eq!(r["bytes"].as_u64(), Some(bytes.len() as u64), "{r}");
    assert!(fs::read(&got).expect("fetched") == bytes, "bytes equal");

    // nixpfs finds what Helia provided.
    let theirs = dir.path().join("theirs.bin");
    fs::write(&theirs, anchor_registry::testing::noise(15, 1 << 20)).expect("write");
    let hcid = helia
        .request(&format!("add {}", theirs.display()))
        .expect("helia add")["cid"]
        .as_str()
        .expect("cid")
        .to_owned();
    let helia_id = helia.peer_id.clone();
    let listing = await_provider(&holder, &hcid, &helia_id, || {
        let _ = helia.request(&format!("provide {hcid}"));
    });
    println!("nixpfs routing findprovs {hcid}: {listing}");
}

#[test]
fn an_unreachable_bootstrap_peer_is_retried_and_logged_while_the_gateway_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gone = Gateway::start(&dir.path().join("gone"), &[]).multiaddr();
    // `gone` stopped when its handle was dropped: nobody listens there now.
    let gw = dht_gateway(dir.path(), "gw", "client", Some(&gone));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !gw.log_text().contains("configured peer unreachable") {
        assert!(Instant::now() < deadline, "not logged:\n{}", gw.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(gw.get("/nix-cache-info").0, 200, "still serving");
    assert!(run_ok_str(gw.cli().arg("status")).starts_with("peer "));
}
