//! Routing V1 over HTTP between real processes on loopback: a gateway
//! answers `/routing/v1/providers` and `/routing/v1/peers` from what it
//! holds (JSON, NDJSON, 404, 400, CORS, 429); a gateway whose only content
//! routing is another gateway's HTTP URL finds and fetches a NAR through
//! it, also when that router only knows the provider from its DHT record
//! store; and a real Helia node with only `delegatedRouters` does the same.

use std::fs;
use std::path::Path;
use std::time::Duration;

use e2e::gateway::{free_port, Gateway};
use e2e::{nixpfs, run_ok, run_ok_str};

/// A real NAR (`nixpfs nar dump` of a small tree with 3 MiB of noise, so
/// the DAG has several blocks), added and pinned on `gw`: (its CID, bytes).
fn pinned_nar(gw: &Gateway, dir: &Path, seed: u64) -> (String, Vec<u8>) {
    let tree = dir.join(format!("tree-{seed}"));
    fs::create_dir_all(tree.join("sub")).expect("tree");
    fs::write(
        tree.join("sub/blob"),
        anchor_registry::testing::noise(seed, 3 << 20),
    )
    .expect("blob");
    fs::write(tree.join("README"), format!("seed {seed}\n")).expect("readme");
    let nar = run_ok(nixpfs().args(["nar", "dump"]).arg(&tree));
    let file = dir.join(format!("nar-{seed}.nar"));
    fs::write(&file, &nar).expect("write nar");
    let out = run_ok_str(gw.cli().arg("add").arg(&file));
    let cid = out
        .split_whitespace()
        .find(|w| w.starts_with("baf"))
        .unwrap_or_else(|| panic!("no CID in `nixpfs add` output: {out}"))
        .to_owned();
    (cid, nar)
}

/// A GET with headers: (status, content type, the response's headers, body).
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn request(method: &str, url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = ureq::request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    let headers = resp
        .headers_names()
        .into_iter()
        .filter_map(|n| resp.header(&n).map(|v| (n.clone(), v.to_owned())))
        .collect();
    let body = resp.into_string().unwrap_or_default();
    Answer {
        status,
        headers,
        body,
    }
}

fn get(url: &str, headers: &[(&str, &str)]) -> Answer {
    request("GET", url, headers)
}

#[test]
fn providers_name_this_gateway_for_a_pinned_nar_in_json_and_ndjson_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = Gateway::start(&dir.path().join("gw"), &[]);
    let (peer, _, _) = gw.id();
    let (cid, _) = pinned_nar(&gw, dir.path(), 1);
    let port = gw.url.rsplit(':').next().expect("port").to_owned();
    let url = format!("{}/routing/v1/providers/{cid}", gw.url);

    let json = get(&url, &[]);
    assert_eq!(json.status, 200, "{}", json.body);
    assert_eq!(json.header("content-type"), Some("application/json"));
    assert_eq!(json.header("access-control-allow-origin"), Some("*"));
    assert!(
        json.header("cache-control")
            .is_some_and(|c| c.contains("max-age=300")),
        "{:?}",
        json.headers
    );
    let v: serde_json::Value = serde_json::from_str(&json.body).expect("JSON body");
    let providers = v["Providers"].as_array().expect("Providers array");
    assert_eq!(providers.len(), 1, "{v}");
    let me = &providers[0];
    assert_eq!(me["Schema"], "peer");
    assert_eq!(me["ID"], peer.as_str(), "base58btc peer id");
    let addrs: Vec<&str> = me["Addrs"]
        .as_array()
        .expect("Addrs")
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(
        addrs.iter().any(|a| a.starts_with("/ip4/127.0.0.1/tcp/")
            && !a.contains("/p2p/")
            && !a.ends_with("/http")),
        "a libp2p listen address: {addrs:?}"
    );
    let gateway_addr = format!("/ip4/127.0.0.1/tcp/{port}/http");
    assert!(addrs.contains(&gateway_addr.as_str()), "{addrs:?}");
    let protocols: Vec<&str> = me["Protocols"]
        .as_array()
        .expect("Protocols")
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    assert_eq!(
        protocols,
        ["transport-bitswap", "transport-ipfs-gateway-http"]
    );

    // NDJSON as Helia's client asks for it: the same record, one per line.
    let nd = get(
        &url,
        &[("Accept", "application/x-ndjson, application/json;q=0.8")],
    );
    assert_eq!(nd.status, 200);
    assert_eq!(nd.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<serde_json::Value> = nd
        .body
        .lines()
        .map(|l| serde_json::from_str(l).expect("NDJSON line"))
        .collect();
    assert_eq!(lines, vec![me.clone()]);

    // IPIP-484 filters: only the gateway address, or nothing left.
    let http_only = get(&format!("{url}?filter-addrs=http"), &[]);
    let v: serde_json::Value = serde_json::from_str(&http_only.body).expect("JSON");
    assert_eq!(
        v["Providers"][0]["Addrs"],
        serde_json::json!([gateway_addr])
    );
    let none = get(
        &format!("{url}?filter-protocols=transport-graphsync-filecoinv1"),
        &[],
    );
    assert_eq!(none.status, 404);

    // Unknown CID: 404 with the short cache time; bad CID: 400 with a reason.
    let unknown = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy";
    let missing = get(&format!("{}/routing/v1/providers/{unknown}", gw.url), &[]);
    assert_eq!(missing.status, 404);
    assert!(missing
        .header("cache-control")
        .is_some_and(|c| c.contains("max-age=15")));
    assert_eq!(missing.header("access-control-allow-origin"), Some("*"));
    let bad = get(&format!("{}/routing/v1/providers/not-a-cid", gw.url), &[]);
    assert_eq!(bad.status, 400);
    assert!(
        bad.body.contains("not-a-cid") && bad.body.contains("not a CID"),
        "{}",
        bad.body
    );
    assert_eq!(bad.body.lines().count(), 1, "one line: {}", bad.body);

    // Peers: ourselves by either peer id form; a bad id is 400, a stranger 404.
    let me = get(&format!("{}/routing/v1/peers/{peer}", gw.url), &[]);
    assert_eq!(me.status, 200, "{}", me.body);
    let v: serde_json::Value = serde_json::from_str(&me.body).expect("JSON");
    assert_eq!(v["Peers"][0]["ID"], peer.as_str());
    let bad_peer = get(&format!("{}/routing/v1/peers/{unknown}", gw.url), &[]);
    assert_eq!(bad_peer.status, 400);
    assert!(bad_peer.body.contains("libp2p-key"), "{}", bad_peer.body);
    let stranger = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";
    assert_eq!(
        get(&format!("{}/routing/v1/peers/{stranger}", gw.url), &[]).status,
        404
    );
    // An unknown routing path is 400; a preflight names the methods.
    assert_eq!(get(&format!("{}/routing/v1/nope", gw.url), &[]).status, 400);
    let pre = request(
        "OPTIONS",
        &url,
        &[
            ("Origin", "https://example.org"),
            ("Access-Control-Request-Method", "GET"),
        ],
    );
    assert!(pre.status == 204 || pre.status == 200, "{}", pre.status);
    assert_eq!(pre.header("access-control-allow-origin"), Some("*"));
    assert!(pre
        .header("access-control-allow-methods")
        .is_some_and(|m| m.contains("GET")));
    assert!(gw.metric("routing_answered") >= 4);
    let refused_before = gw.metric("routing_refused");
    assert!(refused_before >= 3, "400s counted: {refused_before}");

    // A burst beyond the bucket is answered 429 and counted.
    let mut limited = 0;
    for _ in 0..400 {
        if get(&url, &[]).status == 429 {
            limited += 1;
        }
    }
    assert!(limited > 0, "no request of 400 was rate limited");
    assert!(gw.metric("routing_refused") >= refused_before + limited);
    eprintln!("rate limit: {limited} of 400 back-to-back requests answered 429");
}

#[test]
fn a_gateway_whose_only_routing_is_another_gateway_finds_and_fetches_a_nar_through_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let holder = Gateway::start(&dir.path().join("holder"), &[]);
    let (holder_id, _, _) = holder.id();
    let (cid, nar) = pinned_nar(&holder, dir.path(), 2);
    // A dead router (nothing listens) beside the live one: logged and
    // counted, and the fetch does not wait on it.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let finder = Gateway::start(
        &dir.path().join("finder"),
        &["--router", &dead, "--router", &holder.url],
    );
    let peers = run_ok_str(finder.cli().arg("peers"));
    assert!(!peers.contains(&holder_id), "not connected before: {peers}");

    let found = run_ok_str(finder.cli().args(["routing", "findprovs", &cid]));
    assert!(found.contains(&holder_id), "{found}");
    assert!(found.contains("/ip4/127.0.0.1/tcp/"), "{found}");

    let out = dir.path().join("fetched.nar");
    let t0 = std::time::Instant::now();
    run_ok_str(finder.cli().arg("fetch").arg(&cid).arg("--out").arg(&out));
    let took = t0.elapsed();
    assert!(fs::read(&out).expect("fetched") == nar, "bytes equal");
    assert!(took < Duration::from_secs(20), "fetch took {took:?}");
    let peers = run_ok_str(finder.cli().arg("peers"));
    assert!(peers.contains(&holder_id), "dialled the provider: {peers}");
    // The finder dialled the holder: the holder knows it as a connected
    // peer, at the listen address it reports (not the connection's port).
    let (finder_id, finder_listen, _) = finder.id();
    let finder_listen = finder_listen
        .split("/p2p/")
        .next()
        .expect("address")
        .to_owned();
    let known = get(
        &format!("{}/routing/v1/peers/{finder_id}", holder.url),
        &[("Accept", "application/x-ndjson")],
    );
    assert_eq!(known.status, 200, "{}", known.body);
    let record: serde_json::Value =
        serde_json::from_str(known.body.trim()).expect("one NDJSON record");
    assert_eq!(record["ID"], finder_id.as_str());
    assert_eq!(
        record["Addrs"],
        serde_json::json!([finder_listen]),
        "{record}"
    );
    assert_eq!(
        record["Protocols"],
        serde_json::json!(["transport-bitswap"])
    );
    assert!(finder.metric("router_providers") >= 2);
    assert!(
        finder.metric("router_errors") >= 2,
        "the dead router, twice"
    );
    let log = finder.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("router failed") && l.contains(&dead)),
        "the dead router's URL is logged:\n{log}"
    );
    eprintln!("fetched {} bytes through a router in {took:?}", nar.len());
}

#[test]
fn a_router_names_a_provider_its_dht_record_store_knows_and_a_router_only_gateway_fetches_from_it()
{
    const LAN: &str = "/ipfs/lan/kad/1.0.0";
    let dir = tempfile::tempdir().expect("tempdir");
    // The hub holds no bytes; the holder provides to it on the DHT.
    let hub = Gateway::start(
        &dir.path().join("hub"),
        &["--dht", "server", "--dht-protocol", LAN],
    );
    let hub_addr = hub.multiaddr();
    let holder = Gateway::start(
        &dir.path().join("holder"),
        &[
            "--dht",
            "server",
            "--dht-protocol",
            LAN,
            "--bootstrap",
            &hub_addr,
        ],
    );
    let (holder_id, _, _) = holder.id();
    let (cid, nar) = pinned_nar(&holder, dir.path(), 4);
    let url = format!("{}/routing/v1/providers/{cid}", hub.url);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let answer = loop {
        run_ok_str(holder.cli().args(["routing", "provide", &cid]));
        let a = get(&url, &[]);
        if a.status == 200 {
            break a;
        }
        assert_eq!(a.status, 404, "{}", a.body);
        assert!(
            std::time::Instant::now() < deadline,
            "the hub never stored the holder's record:\n{}",
            holder.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let v: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON");
    let providers = v["Providers"].as_array().expect("Providers");
    assert_eq!(providers.len(), 1, "only the holder, not the hub: {v}");
    assert_eq!(providers[0]["ID"], holder_id.as_str());
    assert_eq!(providers[0]["Protocols"], serde_json::json!([]), "unknown");
    assert!(
        providers[0]["Addrs"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x
                .as_str()
                .is_some_and(|x| x.starts_with("/ip4/127.0.0.1/tcp/")))),
        "{v}"
    );

    let finder = Gateway::start(&dir.path().join("finder"), &["--router", &hub.url]);
    let out = dir.path().join("fetched.nar");
    run_ok_str(finder.cli().arg("fetch").arg(&cid).arg("--out").arg(&out));
    assert!(fs::read(&out).expect("fetched") == nar, "bytes equal");
    let peers = run_ok_str(finder.cli().arg("peers"));
    assert!(peers.contains(&holder_id), "dialled the holder: {peers}");
}

#[test]
#[cfg_attr(
    missing_peers,
    ignore = "needs the foreign IPFS peers: run scripts/install-peers DIR and export NIXPFS_PEERS_DIR=DIR"
)]
fn helia_with_only_our_gateway_as_delegated_router_finds_it_and_fetches_the_nar() {
    let peers = e2e::peers::peers_dir();
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = Gateway::start(&dir.path().join("gw"), &[]);
    let (peer, _, _) = gw.id();
    let (cid, nar) = pinned_nar(&gw, dir.path(), 3);
    let out = dir.path().join("helia.nar");
    let v = e2e::peers::node_script(
        &peers,
        "routed.mjs",
        &[&gw.url, &cid, &out.to_string_lossy(), "60"],
    )
    .expect("helia fetch through the delegated router");
    let providers = v["providers"].as_array().expect("providers");
    assert!(
        providers.iter().any(|p| p["id"] == peer.as_str()),
        "Helia found our gateway: {v}"
    );
    assert_eq!(v["bytes"].as_u64(), Some(nar.len() as u64), "{v}");
    assert!(fs::read(&out).expect("helia output") == nar, "bytes equal");
    assert!(gw.metric("routing_answered") >= 1);
    // Which of the two advertised transports Helia used: bitswap blocks
    // sent, or else the trustless gateway.
    eprintln!(
        "helia {} via delegated routing, {} blocks over bitswap: {v}",
        v["helia"],
        gw.metric("bitswap_blocks_sent")
    );
}
