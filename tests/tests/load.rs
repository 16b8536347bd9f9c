//! Load on a running gateway: many concurrent clients for a while, each
//! asking for a mix of narinfo hits (of many indexed paths), narinfo misses,
//! NAR ranges and whole NARs. No response may be a 5xx, no request may fail
//! in transport, and the gateway's resident memory stays under 512 MiB.
//!
//! CI runs the short version (defaults: 100 clients, 10 s, 100,000 paths);
//! `scripts/load` runs the full one (500 clients, 60 s, 1,000,000 paths)
//! through `NIXPFS_LOAD_CLIENTS`, `NIXPFS_LOAD_SECS` and
//! `NIXPFS_LOAD_PATHS`, and reports the latencies this prints.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anchor_registry::{NarHash, NarInfo, Policy, SecretKey, StorePath};
use e2e::gateway::{rss_of, Gateway};
use e2e::{nixpfs, run_ok, run_ok_str};
use gateway::store::index::{Index, LocalPath};
use gateway::trust::catalog::{Catalog, Trust};

/// The memory bound the issue sets for this load.
const RSS_LIMIT: u64 = 512 * 1024 * 1024;
/// Real NARs served for the NAR part of the mix, and their size.
const NARS: usize = 4;
const NAR_BYTES: usize = 4 << 20;
/// Paths written per index transaction.
const BATCH: usize = 20_000;
/// Any valid CID: the indexed paths' NARs are never fetched.
const DUMMY_CID: &str = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: deterministic and cheap.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn numbered_path(i: u64, name: &str) -> StorePath {
    let hash = NarHash::digest(format!("load-path-{i}-{name}").as_bytes()).to_nix32();
    StorePath::parse(&format!("/nix/store/{}-{name}-{i}", &hash[..32])).unwrap()
}

/// A NAR of a directory holding one file of `len` pseudo-random bytes.
fn random_nar(dir: &Path, seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        data.extend_from_slice(&rng.next().to_le_bytes());
    }
    data.truncate(len);
    let root = dir.join(format!("nar-{seed}"));
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("data"), data).unwrap();
    run_ok(nixpfs().arg("nar").arg("dump").arg(&root))
}

/// What the clients ask for.
struct Targets {
    hits: Vec<String>,
    /// (URL, size) of NARs the gateway holds.
    nars: Vec<(String, u64)>,
}

/// Indexes `count` own paths (narinfos like real ones, NARs nowhere) and
/// `NARS` real ones whose NARs are added to the node, before the gateway
/// starts (the index allows one process).
fn populate(data_dir: &Path, count: u64) -> Targets {
    let mut nars = Vec::new();
    let mut real = Vec::new();
    for n in 0..NARS {
        let nar = random_nar(data_dir.parent().unwrap(), n as u64 + 7, NAR_BYTES);
        let file = data_dir.with_extension(format!("nar{n}"));
        fs::write(&file, &nar).unwrap();
        let cid = run_ok_str(
            nixpfs()
                .arg("--data-dir")
                .arg(data_dir)
                .arg("add")
                .arg(&file),
        )
        .trim()
        .to_owned();
        let nar_hash = NarHash::digest(&nar);
        nars.push((
            format!("/nar/{}.nar", nar_hash.to_nix32()),
            nar.len() as u64,
        ));
        real.push((nar_hash, nar.len() as u64, cid));
    }

    let index = Arc::new(Index::open(&data_dir.join("index.redb")).unwrap());
    let key = Arc::new(
        gateway::util::keys::load_or_create_key(
            &gateway::app::default_key_file(data_dir),
            &gateway::app::default_key_name(),
        )
        .unwrap(),
    );
    let anchor = SecretKey::generate("load-anchor-1").unwrap();
    let catalog = Catalog::new(
        index,
        key,
        Trust {
            registry: None,
            policy: Policy::new(1, None).unwrap(),
        },
    );
    let narinfo = |i: u64, nar_hash: NarHash, nar_size: u64| {
        let mut info = NarInfo {
            store_path: numbered_path(i, "load"),
            url: String::new(),
            compression: Some("none".to_owned()),
            file_hash: None,
            file_size: None,
            nar_hash,
            nar_size,
            references: (i.saturating_sub(3)..i)
                .map(|j| numbered_path(j, "load"))
                .collect(),
            deriver: Some(numbered_path(i, "load.drv")),
            sigs: Vec::new(),
            ca: None,
        };
        info.sign(&anchor);
        info
    };
    let mut batch: Vec<LocalPath> = real
        .iter()
        .enumerate()
        .map(|(n, (nar_hash, size, cid))| LocalPath {
            narinfo: narinfo(count + n as u64, *nar_hash, *size),
            cid: cid.clone(),
        })
        .collect();
    let mut hits = Vec::new();
    let step = (count / 10_000).max(1);
    for i in 0..count {
        let info = narinfo(i, NarHash::digest(&i.to_le_bytes()), 4096 + i);
        if i % step == 0 {
            hits.push(format!("/{}.narinfo", info.store_path.hash()));
        }
        batch.push(LocalPath {
            narinfo: info,
            cid: DUMMY_CID.to_owned(),
        });
        if batch.len() == BATCH || i + 1 == count {
            catalog.put_locals(std::mem::take(&mut batch)).unwrap();
        }
    }
    Targets { hits, nars }
}

#[derive(Default)]
struct Tally {
    requests: u64,
    server_errors: u64,
    transport_errors: u64,
    /// First few failures, for the assertion message.
    failures: Vec<String>,
    /// Latency of every request in microseconds, by kind.
    latencies: [Vec<u32>; 4],
}

const KINDS: [&str; 4] = ["narinfo hit", "narinfo miss", "NAR range", "whole NAR"];

/// One client: keep-alive requests until `deadline`.
fn client(url: &str, targets: &Targets, seed: u64, deadline: Instant) -> Tally {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut tally = Tally::default();
    let mut sink = vec![0u8; 64 << 10];
    while Instant::now() < deadline {
        let roll = rng.below(100);
        let (kind, path, range) = match roll {
            0..40 => {
                let hit = &targets.hits[rng.below(targets.hits.len() as u64) as usize];
                (0, hit.clone(), None)
            }
            40..60 => {
                let miss = numbered_path(rng.next(), "missing");
                (1, format!("/{}.narinfo", miss.hash()), None)
            }
            60..90 => {
                let (nar, size) = &targets.nars[rng.below(NARS as u64) as usize];
                let start = rng.below(*size);
                let end = (start + rng.below(256 << 10)).min(size - 1);
                (2, nar.clone(), Some(format!("bytes={start}-{end}")))
            }
            _ => {
                let (nar, _) = &targets.nars[rng.below(NARS as u64) as usize];
                (3, nar.clone(), None)
            }
        };
        let mut req = agent.get(&format!("{url}{path}"));
        if let Some(range) = &range {
            req = req.set("Range", range);
        }
        let started = Instant::now();
        let outcome = match req.call() {
            Ok(resp) | Err(ureq::Error::Status(_, resp)) => {
                let status = resp.status();
                let mut body = resp.into_reader();
                let mut read = Ok(());
                loop {
                    match body.read(&mut sink) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => {
                            read = Err(e);
                            break;
                        }
                    }
                }
                match read {
                    Ok(()) => Ok(status),
                    Err(e) => Err(format!("{path}: body: {e}")),
                }
            }
            Err(e) => Err(format!("{path}: {e}")),
        };
        tally.requests += 1;
        tally.latencies[kind].push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
        let failure = match outcome {
            Ok(status) if status >= 500 => {
                tally.server_errors += 1;
                Some(format!("{path}: HTTP {status}"))
            }
            Ok(_) => None,
            Err(e) => {
                tally.transport_errors += 1;
                Some(e)
            }
        };
        if let Some(f) = failure.filter(|_| tally.failures.len() < 5) {
            tally.failures.push(f);
        }
    }
    tally
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

#[test]
fn many_clients_get_no_5xx_and_no_errors_and_the_gateway_stays_under_512_mib() {
    let clients = env_or("NIXPFS_LOAD_CLIENTS", 100);
    let secs = env_or("NIXPFS_LOAD_SECS", 10);
    let paths = env_or("NIXPFS_LOAD_PATHS", 100_000);
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("gw");
    fs::create_dir_all(&data_dir).unwrap();
    let t0 = Instant::now();
    let targets = Arc::new(populate(&data_dir, paths));
    eprintln!(
        "indexed {paths} paths in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let gw = Gateway::start(&data_dir, &["--sync-interval", "0"]);
    // Every kind answers as expected before the load starts.
    let (status, _) = gw.get(&targets.hits[0]);
    assert_eq!(status, 200, "{}", gw.log_text());
    let (status, body) = gw.get(&targets.nars[0].0);
    assert_eq!(status, 200);
    assert_eq!(body.len() as u64, targets.nars[0].1);

    let peak = Arc::new(AtomicU64::new(gw.rss()));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done, pid) = (peak.clone(), done.clone(), gw.pid());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_of(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|n| {
            let (url, targets) = (gw.url.clone(), targets.clone());
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || client(&url, &targets, n + 1, deadline))
                .unwrap()
        })
        .collect();
    let mut total = Tally::default();
    for w in workers {
        let t = w.join().unwrap();
        total.requests += t.requests;
        total.server_errors += t.server_errors;
        total.transport_errors += t.transport_errors;
        total.failures.extend(t.failures);
        for (all, mine) in total.latencies.iter_mut().zip(t.latencies) {
            all.extend(mine);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);

    let mut all: Vec<u32> = total.latencies.iter().flatten().copied().collect();
    all.sort_unstable();
    eprintln!(
        "{clients} clients, {secs} s, {paths} paths: {} requests ({:.0}/s), {} 5xx, {} transport errors, peak RSS {} MiB; latency p50 {:.2} ms, p99 {:.2} ms",
        total.requests,
        total.requests as f64 / elapsed,
        total.server_errors,
        total.transport_errors,
        peak >> 20,
        percentile(&all, 0.5),
        percentile(&all, 0.99),
    );
    for (kind, lat) in KINDS.iter().zip(total.latencies.iter_mut()) {
        lat.sort_unstable();
        eprintln!(
            "  {kind:<12} {:>8} requests, p50 {:>8.2} ms, p99 {:>8.2} ms",
            lat.len(),
            percentile(lat, 0.5),
            percentile(lat, 0.99)
        );
    }
    assert!(
        total.requests > clients,
        "too few requests: {}",
        total.requests
    );
    assert_eq!(
        (total.server_errors, total.transport_errors),
        (0, 0),
        "failures: {:?}\n{}",
        total.failures,
        gw.log_text()
    );
    assert!(
        peak < RSS_LIMIT,
        "gateway RSS peaked at {} MiB under load",
        peak >> 20
    );
}
