//! A hostile bitswap peer against a running gateway: it opens 500 streams,
//! asks on each for every block of a 16 MiB NAR the gateway holds, accepts
//! the gateway's answer streams and never reads them. The gateway refuses
//! the streams beyond its caps (counted in /metrics), its memory stays
//! bounded, and an honest peer fetches the same NAR meanwhile.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::gateway::{rss_of, Gateway};
use e2e::{nixpfs, run_ok, run_ok_str};
use futures::{AsyncWriteExt, StreamExt};
use gateway::store::car::CarReader;
use gateway::store::ipfs::bitswap::{self, Message, WantEntry, WantType};
use gateway::store::ipfs::{pb, Cid};
use rust_ipfs::{Multiaddr, PeerId, Protocol};

/// Streams the hostile peer opens.
const STREAMS: usize = 500;
/// What the attack may add to the gateway's resident memory: the caps allow
/// per peer 8 MiB of inbound frames, 8 MiB of queued answers and 32 yamux
/// stream windows of 256 KiB (8 MiB); the rest is allocator slack. Without
/// the caps every stream holds a 1 MiB answer: 500 MiB.
const RSS_BOUND: u64 = 64 * 1024 * 1024;

/// Every block CID of `cid`'s DAG, from `nixpfs car export`.
fn dag_blocks(data_dir: &Path, cid: &str, car: &Path) -> Vec<Cid> {
    run_ok(
        nixpfs()
            .arg("--data-dir")
            .arg(data_dir)
            .args(["car", "export", cid, "--out"])
            .arg(car),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let file = tokio::fs::File::open(car).await.unwrap();
        let mut reader = CarReader::open(file).await.unwrap();
        let mut cids = Vec::new();
        while let Some(block) = reader.next_block().await.unwrap() {
            cids.push(*block.cid());
        }
        cids
    })
}

/// The hostile peer: a libp2p host (rust-ipfs, as the gateway's node) that
/// holds every bitswap stream it is given unread and opens `STREAMS`
/// streams of wantlists. Returns the streams it holds open.
async fn attack(gateway: Multiaddr, blocks: &[Cid]) -> (rust_ipfs::Ipfs, Vec<rust_ipfs::Stream>) {
    let ipfs = rust_ipfs::builder::DefaultIpfsBuilder::new()
        .with_streams()
        .enable_tcp()
        .add_listening_addr("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .start()
        .await
        .unwrap();
    let mut control = ipfs.stream_control().await.unwrap();
    let mut answers = control.accept(bitswap::PROTOCOL).unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some((_, stream)) = answers.next().await {
            held.push(stream);
        }
    });
    let Some(Protocol::P2p(peer)) = gateway.iter().last() else {
        panic!("no peer id in {gateway}");
    };
    let peer: PeerId = peer;
    ipfs.connect(gateway.clone()).await.unwrap();
    let wantlist = Message {
        wantlist: blocks
            .iter()
            .map(|cid| WantEntry {
                cid: *cid,
                priority: 1,
                cancel: false,
                want_type: WantType::Block,
                send_dont_have: false,
            })
            .collect(),
        ..Message::default()
    };
    let body = wantlist.encode();
    let mut frame = Vec::new();
    pb::put_varint(&mut frame, body.len() as u64);
    frame.extend_from_slice(&body);
    let mut open = Vec::new();
    for _ in 0..STREAMS {
        // Streams beyond the gateway's caps are reset: not an error here.
        let Ok(mut stream) = control.open_stream(peer, bitswap::PROTOCOL).await else {
            continue;
        };
        if stream.write_all(&frame).await.is_ok() && stream.flush().await.is_ok() {
            open.push(stream);
        }
    }
    (ipfs, open)
}

#[test]
fn a_peer_that_opens_500_streams_and_never_reads_costs_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let payload = dir.path().join("payload");
    fs::create_dir(&payload).unwrap();
    fs::write(
        payload.join("data"),
        e2e::noise(0x9e37_79b9_7f4a_7c15, 16 * 1024 * 1024),
    )
    .unwrap();
    let nar = dir.path().join("payload.nar");
    fs::write(&nar, run_ok(nixpfs().arg("nar").arg("dump").arg(&payload))).unwrap();
    let gw_dir = dir.path().join("gw");
    let cid = run_ok_str(nixpfs().arg("--data-dir").arg(&gw_dir).arg("add").arg(&nar))
        .trim()
        .to_owned();
    let blocks = dag_blocks(&gw_dir, &cid, &dir.path().join("nar.car"));
    assert!(blocks.len() > 16, "{} blocks", blocks.len());

    let gw = Gateway::start(&gw_dir, &[]);
    let gw_addr: Multiaddr = gw.multiaddr().parse().unwrap();
    let baseline = gw.rss();

    // Peak RSS of the gateway, sampled until the test ends.
    let peak = Arc::new(AtomicU64::new(baseline));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done, pid) = (peak.clone(), done.clone(), gw.pid());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_of(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_hostile, streams) = rt.block_on(attack(gw_addr, &blocks));

    // Meanwhile an honest peer fetches the NAR, every block verified.
    let honest = Gateway::start(&dir.path().join("honest"), &["--peer", &gw.multiaddr()]);
    let fetched = dir.path().join("fetched.nar");
    run_ok(honest.cli().args(["fetch", &cid, "--out"]).arg(&fetched));
    assert!(
        fs::read(&fetched).unwrap() == fs::read(&nar).unwrap(),
        "fetched NAR differs"
    );
    // Give the gateway time to read what the hostile streams sent.
    std::thread::sleep(Duration::from_secs(3));
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();

    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "hostile streams kept open: {}, RSS baseline {} MiB, peak {} MiB",
        streams.len(),
        baseline >> 20,
        peak >> 20
    );
    assert!(
        peak <= baseline + RSS_BOUND,
        "gateway RSS grew from {} MiB to {} MiB under the attack",
        baseline >> 20,
        peak >> 20
    );
    let refused = gw.metric("bitswap_streams_refused");
    assert!(refused > 0, "no stream refused:\n{}", gw.log_text());
    let (status, _) = gw.get("/nix-cache-info");
    assert_eq!(status, 200, "still serving");
}
