//! Memory under slow HTTP readers: 40 clients ask for the CAR of a 48 MiB
//! DAG and read nothing. Each CAR export fetches 16 blocks (16 MiB) ahead of
//! what it sends; without a shared budget that is 640 MiB held for clients
//! that read nothing. With the node's 256 MiB budget for blocks fetched
//! ahead, the gateway's RSS grows by at most that plus each response's
//! current block and the bytes in flight; a normal client is served
//! meanwhile, and gets every block.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::gateway::{rss_of, Gateway};
use e2e::{nixpfs, run_ok_str};

/// Clients that never read.
const SLOW: usize = 40;
/// The node's prefetch budget (`prefetch::DEFAULT_BUDGET`), plus per slow
/// response the block it waits on and a chunk in hyper's write buffer
/// (1 MiB each), plus allocator slack.
const RSS_BOUND: u64 = (256 + 2 * SLOW as u64 + 48) * 1024 * 1024;

#[test]
fn forty_clients_that_read_no_car_hold_a_bounded_prefetch() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("big");
    std::fs::write(&file, e2e::noise(0x2545_f491_4f6c_dd1d, 48 << 20)).unwrap();
    let gw_dir = dir.path().join("gw");
    let cid = run_ok_str(
        nixpfs()
            .arg("--data-dir")
            .arg(&gw_dir)
            .arg("add")
            .arg(&file),
    )
    .trim()
    .to_owned();
    let gw = Gateway::start(&gw_dir, &[]);
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let baseline = gw.rss();

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

    let request = format!("GET /ipfs/{cid}?format=car HTTP/1.1\r\nHost: slow\r\n\r\n");
    let slow: Vec<TcpStream> = (0..SLOW)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            s
        })
        .collect();
    // Let every export fill what it may.
    std::thread::sleep(Duration::from_secs(4));

    // A normal client meanwhile gets the whole CAR.
    let (status, car) = gw.get(&format!("/ipfs/{cid}?format=car"));
    assert_eq!(status, 200);
    assert!(car.len() > 48 << 20, "CAR of {} bytes", car.len());
    std::thread::sleep(Duration::from_secs(1));
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "RSS baseline {} MiB, peak {} MiB with {SLOW} clients reading nothing",
        baseline >> 20,
        peak >> 20
    );
    assert!(
        peak <= baseline + RSS_BOUND,
        "gateway RSS grew from {} MiB to {} MiB",
        baseline >> 20,
        peak >> 20
    );

    // The slow clients' responses are intact too: one of them reads now.
    let mut first = slow.into_iter().next().unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut head = [0u8; 12];
    first.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
}
