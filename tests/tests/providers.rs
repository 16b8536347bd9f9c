//! Fetching one DAG from several providers at once, real gateways on
//! loopback: the blocks spread over the seeders, almost none arrives twice
//! (the `nixpfs_bitswap_duplicate_blocks` counter), and a seeder killed in
//! the middle of a fetch costs nothing but its share.

use std::fs;
use std::time::{Duration, Instant};

use e2e::gateway::Gateway;
use e2e::run_ok_str;

const MIB: usize = 1 << 20;

/// Three gateways seeding the same file and a fourth configured with all
/// three as peers: (seeders, fetcher, CID, bytes).
fn swarm(dir: &std::path::Path, mib: usize) -> (Vec<Gateway>, Gateway, String, Vec<u8>) {
    let bytes = anchor_registry::testing::noise(21, mib * MIB);
    let file = dir.join("payload.bin");
    fs::write(&file, &bytes).expect("write payload");
    let seeders: Vec<Gateway> = (0..3)
        .map(|i| Gateway::start(&dir.join(format!("seeder{i}")), &[]))
        .collect();
    let cids: Vec<String> = seeders
        .iter()
        .map(|s| run_ok_str(s.cli().arg("add").arg(&file)).trim().to_owned())
        .collect();
    assert!(cids.windows(2).all(|w| w[0] == w[1]), "one CID: {cids:?}");
    let addrs: Vec<String> = seeders.iter().map(Gateway::multiaddr).collect();
    let mut args = Vec::new();
    for a in &addrs {
        args.extend(["--peer", a.as_str()]);
    }
    let fetcher = Gateway::start(&dir.join("fetcher"), &args);
    let deadline = Instant::now() + Duration::from_secs(20);
    while run_ok_str(fetcher.cli().arg("peers")).lines().count() < 3 {
        assert!(
            Instant::now() < deadline,
            "the fetcher never reached all seeders"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (seeders, fetcher, cids[0].clone(), bytes)
}

#[test]
fn a_dag_from_three_seeders_spreads_over_them_with_almost_no_duplicate_blocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (seeders, fetcher, cid, bytes) = swarm(dir.path(), 64);
    let out = dir.path().join("fetched.bin");
    let started = Instant::now();
    run_ok_str(fetcher.cli().args(["fetch", &cid, "--out"]).arg(&out));
    let took = started.elapsed();
    assert!(fs::read(&out).expect("fetched") == bytes, "bytes equal");

    let received = fetcher.metric("bitswap_blocks_received");
    let duplicates = fetcher.metric("bitswap_duplicate_blocks");
    let rewants = fetcher.metric("bitswap_rewants");
    let sent: Vec<u64> = seeders
        .iter()
        .map(|s| s.metric("bitswap_blocks_sent"))
        .collect();
    println!(
        "64 MiB from 3 seeders in {took:?}: {received} blocks, {duplicates} duplicates, {rewants} re-wants, sent per seeder {sent:?}"
    );
    assert!(received >= 64, "{received}");
    assert!(
        duplicates * 50 < received,
        "under 2% duplicates: {duplicates} of {received}"
    );
    assert!(
        sent.iter().filter(|&&n| n >= 4).count() >= 2,
        "the blocks spread over the seeders: {sent:?}"
    );
}

#[test]
fn a_seeder_killed_mid_fetch_leaves_the_rest_to_finish_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut seeders, fetcher, cid, bytes) = swarm(dir.path(), 128);
    let out = dir.path().join("fetched.bin");
    let fetch = {
        let mut cmd = fetcher.cli();
        cmd.args(["fetch", &cid, "--out"]).arg(&out);
        std::thread::spawn(move || cmd.output().expect("run fetch"))
    };
    // Kill the busiest seeder once the fetch is under way.
    let deadline = Instant::now() + Duration::from_secs(30);
    let at_kill = loop {
        let got = fetcher.metric("bitswap_blocks_received");
        if got >= 6 {
            break got;
        }
        assert!(Instant::now() < deadline, "the fetch never started");
        std::thread::sleep(Duration::from_millis(5));
    };
    let busiest = (0..seeders.len())
        .max_by_key(|&i| seeders[i].metric("bitswap_blocks_sent"))
        .expect("three seeders");
    drop(seeders.remove(busiest));
    let result = fetch.join().expect("fetch thread");
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(
        fs::read(&out).expect("fetched") == bytes,
        "bytes verified and equal"
    );
    println!("killed seeder {busiest} after {at_kill} of 129 blocks");
    assert!(at_kill < 129, "killed before the end");
}
