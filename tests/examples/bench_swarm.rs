//! Swarm downloads over real-world links (issue 19, item 2), as benchmark
//! rows beside their baselines in the same run (scripts/bench-swarm):
//!
//! - a NAR fetched by a client gateway from three seeders, each in its own
//!   network namespace behind its own capped [`Link`], beside the same NAR
//!   from one seeder (goal ≥ 2.5×) and beside the sum of the caps (≥ 0.9×);
//! - one seeder over a long round trip with a cap, beside curl fetching the
//!   same file from nginx through the same kind of link (goal ≥ 0.8×).
//!
//! Every fetch goes through the real binary (`nixpfs fetch CID` against a
//! running client gateway, every block verified against its CID), each run
//! with a fresh client, and its bytes are compared with the original. The
//! links run in this process: its CPU time during a fetch is the proxies'
//! and is printed beside the gateways', since on a shared two-core machine
//! it could be what limits a row.
//!
//! Usage: `bench_swarm [MIB] [RUNS]` (defaults 256 and 3); needs root
//! (network namespaces), nginx and curl. Run it built in release with a
//! release `nixpfs` beside it (scripts/bench-swarm does both).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use e2e::gateway::Gateway;
use e2e::link::{Link, LinkConfig};
use e2e::netns::Netns;
use e2e::nginx::Nginx;
use e2e::{nixpfs, noise, run_ok_str};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
/// Each seeder's link in the swarm rows: a cap far below what one core
/// pushes through the proxy, and a small delay.
const SWARM_CAP: u64 = 16 * MIB;
const SWARM_DELAY: Duration = Duration::from_millis(5);
/// The long link: 50 ms round trip, 20 MiB/s.
const RTT_CAP: u64 = 20 * MIB;
const RTT_DELAY: Duration = Duration::from_millis(25);

/// A seeder gateway in its own namespace; the link is the only way to its
/// IPFS node (identify advertises its real addresses, which lead nowhere
/// from here). Fields drop in order: gateway, link, namespace.
struct Seeder {
    gw: Gateway,
    link: Link,
    _ns: Netns,
}

impl Seeder {
    fn start(dir: &Path, config: LinkConfig) -> Result<Self> {
        let ns = Netns::new("bench").context("a network namespace (needs root)")?;
        let gw = Gateway::start_in(&ns, dir, &[]);
        let target = std::net::SocketAddr::from(([127, 0, 0, 1], gw.ipfs_port()));
        let link = Link::start(target, config.into_netns(ns.path())).context("start a link")?;
        Ok(Seeder { gw, link, _ns: ns })
    }

    fn addr(&self) -> String {
        format!(
            "/ip4/127.0.0.1/tcp/{}/p2p/{}",
            self.link.addr().port(),
            self.gw.peer_id()
        )
    }
}

/// CPU seconds (user + system) of this process so far: the links' threads.
fn own_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// CPU seconds (user + system) of process `pid` so far.
fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at 3.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / hz
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n") + "\n"
}

fn sha256_file(path: &Path) -> Result<[u8; 32]> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize().into())
}

/// Waits until `gw` is connected to `n` peers.
fn await_peers(gw: &Gateway, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while run_ok_str(gw.cli().arg("peers")).lines().count() < n {
        ensure!(
            Instant::now() < deadline,
            "not connected to {n} peers:\n{}",
            gw.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// What one fetch took, and the CPU each part spent meanwhile.
struct Fetched {
    secs: f64,
    proxy_cpu: f64,
    client_cpu: f64,
    seeders_cpu: f64,
    /// Bytes that crossed the seeders' links, over the NAR's size.
    crossed: f64,
    duplicates: u64,
    rewants: u64,
}

/// A fresh client peered with `seeders` fetches `cid`; checks the bytes.
fn fetch(
    work: &Path,
    tag: &str,
    seeders: &[&Seeder],
    cid: &str,
    want: &[u8; 32],
) -> Result<Fetched> {
    let dir = work.join(format!("client-{tag}"));
    let mut args = Vec::new();
    for s in seeders {
        args.push("--peer".to_owned());
        args.push(s.addr());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let client = Gateway::start(&dir, &args);
    await_peers(&client, seeders.len())?;
    let out = work.join(format!("fetched-{tag}"));
    let before = (
        own_cpu(),
        cpu_of(client.pid()),
        seeders.iter().map(|s| cpu_of(s.gw.pid())).sum::<f64>(),
    );
    let crossed = || {
        seeders
            .iter()
            .map(|s| s.link.bytes_from_target())
            .sum::<u64>()
    };
    let crossed_before = crossed();
    let started = Instant::now();
    let status = client
        .cli()
        .arg("fetch")
        .arg(cid)
        .arg("--out")
        .arg(&out)
        .output()
        .context("run nixpfs fetch")?;
    let secs = started.elapsed().as_secs_f64();
    if !status.status.success() {
        let mut logs = format!("client:\n{}", tail(&client.log_text(), 20));
        for (i, s) in seeders.iter().enumerate() {
            logs += &format!("seeder {i}:\n{}", tail(&s.gw.log_text(), 20));
        }
        bail!(
            "nixpfs fetch failed after {secs:.1} s: {}\n{logs}",
            String::from_utf8_lossy(&status.stderr).trim()
        );
    }
    let fetched = Fetched {
        secs,
        proxy_cpu: own_cpu() - before.0,
        client_cpu: cpu_of(client.pid()) - before.1,
        seeders_cpu: seeders.iter().map(|s| cpu_of(s.gw.pid())).sum::<f64>() - before.2,
        crossed: (crossed() - crossed_before) as f64 / std::fs::metadata(&out)?.len() as f64,
        duplicates: client.metric("bitswap_duplicate_blocks"),
        rewants: client.metric("bitswap_rewants"),
    };
    ensure!(&sha256_file(&out)? == want, "fetched bytes differ ({tag})");
    std::fs::remove_file(&out)?;
    drop(client);
    std::fs::remove_dir_all(&dir).ok();
    Ok(fetched)
}

/// curl fetching `url` (through a link) to a file; checks the bytes.
fn curl(work: &Path, url: &str, want: &[u8; 32]) -> Result<f64> {
    let out = work.join("curled");
    let started = Instant::now();
    let status = Command::new("curl")
        .args(["-sf", "-o"])
        .arg(&out)
        .arg(url)
        .status()
        .context("run curl")?;
    let secs = started.elapsed().as_secs_f64();
    ensure!(status.success(), "curl {url} failed");
    ensure!(&sha256_file(&out)? == want, "curl's bytes differ");
    std::fs::remove_file(&out)?;
    Ok(secs)
}

/// One table row, as scripts/bench prints them: rates of ours and of the
/// baseline, and ours/baseline.
fn row(name: &str, bytes: u64, ours_secs: f64, base_rate: f64, goal: &str) {
    let ours = bytes as f64 / ours_secs / MIB as f64;
    println!(
        "| {name:<60} | {ours:9.1} MiB/s | {base_rate:9.1} MiB/s | {:5.2}x | {goal} |",
        ours / base_rate
    );
}

/// A fetch that failed is a result too: its row says so, the reason goes
/// to stderr, and the next run goes on.
fn reported(name: &str, fetched: Result<Fetched>) -> Option<Fetched> {
    match fetched {
        Ok(f) => Some(f),
        Err(e) => {
            println!("| {name:<60} | failed (reason on stderr) | | | |");
            eprintln!("bench_swarm: {name}: {e:#}");
            None
        }
    }
}

/// What else a fetch cost: CPU seconds of the links (this process), the
/// client and the seeders; link bytes over NAR bytes; wasted wants.
fn cpu_note(what: &str, f: &Fetched) {
    println!(
        "|   {:<58} | {:>15} | {:>15} | {:>6} | |",
        format!(
            "{what}: seeders {:.1} CPU-s, link/NAR {:.3}, dup {}, rewants {}",
            f.seeders_cpu, f.crossed, f.duplicates, f.rewants
        ),
        format!("client {:.1} CPU-s", f.client_cpu),
        format!("links {:.1} CPU-s", f.proxy_cpu),
        "",
    );
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map_or(Ok(256), |a| a.parse()).context("MIB")?;
    let runs: usize = args.next().map_or(Ok(3), |a| a.parse()).context("RUNS")?;
    if !Path::new("/run").exists() || unsafe { libc::geteuid() } != 0 {
        bail!("bench_swarm needs root (network namespaces)");
    }
    // On tmpfs: `nixpfs fetch` syncs its output and curl does not, and a
    // shared disk would add its own noise to both.
    let work = tempfile::Builder::new()
        .prefix("nixpfs-bench-swarm.")
        .tempdir_in("/dev/shm")?;
    let work = work.path();
    eprintln!(
        "bench_swarm: {mib} MiB NAR, {runs} runs, in {}",
        work.display()
    );

    // One NAR (a real one: `nixpfs nar dump` of a file of noise), added to
    // three seeders' data directories before they serve.
    let file = work.join("blob");
    std::fs::write(&file, noise(19, (mib * MIB) as usize))?;
    let nar_path = work.join("www").join("blob.nar");
    std::fs::create_dir_all(nar_path.parent().unwrap_or(work))?;
    let nar = nixpfs()
        .args(["nar", "dump"])
        .arg(&file)
        .output()
        .context("nixpfs nar dump")?;
    ensure!(nar.status.success(), "nixpfs nar dump failed");
    std::fs::write(&nar_path, &nar.stdout)?;
    std::fs::remove_file(&file)?;
    let bytes = nar.stdout.len() as u64;
    let want: [u8; 32] = Sha256::digest(&nar.stdout).into();
    drop(nar);
    let seed_dirs: Vec<PathBuf> = (0..3).map(|i| work.join(format!("seeder-{i}"))).collect();
    let mut cid = String::new();
    for dir in &seed_dirs {
        let out = run_ok_str(
            nixpfs()
                .arg("--data-dir")
                .arg(dir)
                .arg("add")
                .arg(&nar_path),
        );
        let this = out.split_whitespace().next().unwrap_or_default().to_owned();
        ensure!(cid.is_empty() || cid == this, "seeders disagree on the CID");
        cid = this;
    }

    println!(
        "| {:<60} | {:>15} | {:>15} | {:>6} | goal |",
        "swarm benchmark", "ours", "baseline", "ratio"
    );
    println!(
        "| {:-<60} | {:-<15} | {:-<15} | {:-<6} | ---- |",
        "", "", "", ""
    );

    // a. Three seeders, each behind a 16 MiB/s link, vs one of them alone.
    {
        let link = || LinkConfig::new(SWARM_DELAY, Some(SWARM_CAP));
        let seeders: Vec<Seeder> = seed_dirs
            .iter()
            .map(|d| Seeder::start(d, link()))
            .collect::<Result<_>>()?;
        let caps = 3.0 * SWARM_CAP as f64 / MIB as f64;
        for run in 1..=runs {
            let name =
                format!("{mib} MiB from 3 seeders vs 1 (16 MiB/s, 10 ms RTT each), run {run}");
            let Some(one) = reported(
                &name,
                fetch(work, &format!("one-{run}"), &[&seeders[0]], &cid, &want),
            ) else {
                continue;
            };
            let all: Vec<&Seeder> = seeders.iter().collect();
            let Some(three) = reported(
                &name,
                fetch(work, &format!("three-{run}"), &all, &cid, &want),
            ) else {
                continue;
            };
            let one_rate = bytes as f64 / one.secs / MIB as f64;
            row(&name, bytes, three.secs, one_rate, "≥ 2.5x");
            row(
                &format!("  3 seeders vs the sum of their caps, run {run}"),
                bytes,
                three.secs,
                caps,
                "≥ 0.9x",
            );
            cpu_note("3 seeders", &three);
            cpu_note("1 seeder", &one);
        }
        let sent: Vec<String> = seeders
            .iter()
            .map(|s| format!("{} MiB", s.link.bytes_from_target() / MIB))
            .collect();
        eprintln!(
            "bench_swarm: bytes from each seeder's link: {}",
            sent.join(", ")
        );
    }

    // b. One seeder over 50 ms RTT at 20 MiB/s vs curl from nginx over the
    // same kind of link.
    {
        let link = || LinkConfig::new(RTT_DELAY, Some(RTT_CAP));
        let seeder = Seeder::start(&seed_dirs[0], link())?;
        let nginx = Nginx::start(&work.join("www"), &work.join("nginx"));
        let target = std::net::SocketAddr::from(([127, 0, 0, 1], nginx.port));
        let web = Link::start(target, link())?;
        let url = format!("http://{}/blob.nar", web.addr());
        for run in 1..=runs {
            let base = curl(work, &url, &want)?;
            let name = format!("{mib} MiB over 50 ms RTT, 20 MiB/s: vs curl from nginx, run {run}");
            let Some(ours) = reported(
                &name,
                fetch(work, &format!("rtt-{run}"), &[&seeder], &cid, &want),
            ) else {
                continue;
            };
            row(
                &name,
                bytes,
                ours.secs,
                bytes as f64 / base / MIB as f64,
                "≥ 0.8x",
            );
            cpu_note("1 seeder, 50 ms", &ours);
        }
    }
    Ok(())
}
