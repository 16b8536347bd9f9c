//! Fault injection (issue 18, items 7–9), real processes and real Nix:
//! - faulty links: providers in their own network namespaces, reachable
//!   only through a userspace [`Link`] (delay, bandwidth cap, cut);
//! - a full disk: a data directory on a small tmpfs;
//! - kill -9 at a random moment of a pin, an upload, an anchors sync and a
//!   seed, then restart: `repo verify` is clean and every path is either
//!   served with the right bytes or answered 404, never a 5xx.
//!
//! Sizes and counts come from the environment, so CI stays in budget and a
//! long run is one variable away: `NIXPFS_KILL_ITERATIONS` (default 3; the
//! issue's figure is 20), `NIXPFS_FAULT_SIZE_MIB` (default 64; issue: 256),
//! `NIXPFS_FAULT_SYNC_ENTRIES` (default 100000), `NIXPFS_KILL_SEED` (default:
//! from the clock; printed, so a failing run can be replayed).

use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anchor_registry::{
    ContentId, ImportProfile, MappingData, MappingSetBuilder, NarHash, NarInfo, SecretKey, SetKind,
    StorePath, StorePathHash,
};
use e2e::anchors::{keygen, registry, sign_and_publish, TestRegistry};
use e2e::gateway::Gateway;
use e2e::link::{Link, LinkConfig};
use e2e::netns::Netns;
use e2e::nix::NixEnv;
use e2e::{nixpfs, run_ok, run_ok_str};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A derivation output of `mib` MiB of random bytes (one file).
fn big_path(env: &NixEnv, name: &str, mib: u64) -> String {
    env.build(
        &format!("{name}.nix"),
        &format!(
            r#"{{ nonce }}: builtins.derivation {{
  name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  args = [ "-c" "echo ${{nonce}} > /dev/null; head -c {bytes} /dev/urandom > $out" ];
}}"#,
            bytes = mib * MIB
        ),
    )
}

/// sha256 and length of `nix-store --dump PATH`, streamed.
fn dump_digest(env: &NixEnv, path: &str) -> ([u8; 32], u64) {
    let mut child = env
        .cmd("nix-store")
        .args(["--dump", path])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn nix-store --dump");
    let digest = digest_reader(child.stdout.take().expect("stdout"));
    assert!(child.wait().expect("nix-store --dump").success());
    digest
}

fn digest_reader(mut r: impl Read) -> ([u8; 32], u64) {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                hasher.update(&buf[..k]);
                n += k as u64;
            }
            Err(e) => panic!("reading a NAR: {e}"),
        }
    }
    (hasher.finalize().into(), n)
}

fn hash_part(path: &str) -> String {
    StorePath::parse(path)
        .expect("store path")
        .hash()
        .to_string()
}

/// What a gateway says about a path.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// narinfo 200 and the NAR's bytes equal `nix-store --dump`.
    Served,
    /// narinfo 404.
    Absent,
}

/// Asks `gw` for `path`: a narinfo 404, or a narinfo 200 whose NAR is
/// byte-equal to `expected`. Anything else (a 5xx, other bytes, a cut
/// response) panics.
fn served_or_absent(gw: &Gateway, path: &str, expected: &([u8; 32], u64)) -> Answer {
    let (status, body) = gw.get(&format!("/{}.narinfo", hash_part(path)));
    match status {
        404 => return Answer::Absent,
        200 => {}
        other => panic!(
            "narinfo of {path}: {other} {}\n{}",
            String::from_utf8_lossy(&body),
            gw.log_text()
        ),
    }
    let info = NarInfo::parse(&String::from_utf8_lossy(&body)).expect("a valid narinfo");
    let resp = ureq::get(&format!("{}/{}", gw.url, info.url))
        .call()
        .unwrap_or_else(|e| panic!("NAR of {path}: {e}\n{}", gw.log_text()));
    assert_eq!(resp.status(), 200);
    let got = digest_reader(resp.into_reader());
    assert!(
        got == *expected,
        "{path}: served {} bytes that differ from nix-store --dump ({} bytes)",
        got.1,
        expected.1
    );
    Answer::Served
}

/// `nixpfs repo verify` on `data_dir` (through its gateway if one runs):
/// must exit 0.
fn assert_verify_clean(data_dir: &Path, context: &str) {
    let out = nixpfs()
        .arg("--data-dir")
        .arg(data_dir)
        .args(["repo", "verify"])
        .output()
        .expect("run repo verify");
    assert!(
        out.status.success(),
        "{context}: repo verify is not clean:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_no_panic(text: &str, what: &str) {
    assert!(!text.contains("panicked"), "{what} panicked:\n{text}");
}

// ---------------------------------------------------------------- links

/// A provider gateway in its own network namespace and the link that is the
/// only way to its IPFS node. Fields drop in order: gateway, link, namespace.
struct Remote {
    gw: Gateway,
    link: Link,
    _ns: Netns,
}

impl Remote {
    fn start(data_dir: &Path, config: LinkConfig) -> Self {
        let ns = Netns::new("faults").expect("a network namespace (needs root)");
        let gw = Gateway::start_in(&ns, data_dir, &[]);
        let target = SocketAddr::from(([127, 0, 0, 1], gw.ipfs_port()));
        let link = Link::start(target, config.into_netns(ns.path())).expect("start the link");
        Remote { gw, link, _ns: ns }
    }

    /// The multiaddr that reaches this provider: the link's port, its peer id.
    fn addr(&self) -> String {
        format!(
            "/ip4/127.0.0.1/tcp/{}/p2p/{}",
            self.link.addr().port(),
            self.gw.peer_id()
        )
    }
}

/// A client gateway following `reg`, peered with `peers`, synced.
fn client(dir: &Path, reg: &TestRegistry, peers: &[String], config: &str) -> Gateway {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("config.toml"), config).unwrap();
    let mut args: Vec<&str> = reg.serve_args().to_vec();
    for p in peers {
        args.extend(["--peer", p.as_str()]);
    }
    let gw = Gateway::start(dir, &args);
    let sync = run_ok_str(gw.cli().args(["anchors", "sync"]));
    assert!(sync.contains("anchor-a: "), "{sync}");
    gw
}

/// Waits until the client is connected to `n` peers.
fn await_peers(gw: &Gateway, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while run_ok_str(gw.cli().arg("peers")).lines().count() < n {
        assert!(
            Instant::now() < deadline,
            "not connected to {n} peers:\n{}",
            gw.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A path of `mib` MiB pinned and signed by anchor A (in `seeder`), and the
/// registry listing A.
struct Signed {
    path: String,
    digest: ([u8; 32], u64),
    cid: String,
    reg: TestRegistry,
    seeder: PathBuf,
}

fn signed_big_path(env: &NixEnv, mib: u64) -> Signed {
    let path = big_path(env, "faults-big", mib);
    let digest = dump_digest(env, &path);
    let (key, public) = keygen(env.path(), "anchor-a");
    let seeder = env.path().join("seeder-a");
    let set = env.path().join("set-a.jsonl");
    let mappings = sign_and_publish(&seeder, &key, &[&path], &set);
    let reg = registry(&env.path().join("reg"), &[("anchor-a", &public, &[&set])]);
    Signed {
        path,
        digest,
        cid: mappings[0].data().cid.to_string(),
        reg,
        seeder,
    }
}

fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64() / 1e6
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
#[cfg_attr(missing_root, ignore = "needs root (network namespaces)")]
fn a_64_mib_nar_crosses_a_50_ms_rtt_20_mb_s_link_intact() {
    let env = NixEnv::new();
    let Signed {
        path,
        digest,
        reg,
        seeder,
        ..
    } = signed_big_path(&env, 64);
    let link = LinkConfig::new(Duration::from_millis(25), Some(20_000_000));
    let remote = Remote::start(&seeder, link);
    let b = client(&env.path().join("b"), &reg, &[remote.addr()], "");
    await_peers(&b, 1);
    let (_, _, key) = b.id();

    let store = env.empty_store("far");
    let started = Instant::now();
    let out = env
        .copy_from(&b.url, &key, &store, &path)
        .output()
        .expect("nix copy");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        b.log_text()
    );
    run_ok(
        env.cmd("nix-store")
            .args(["--store", &store, "--verify-path", &path]),
    );
    let crossed = remote.link.bytes_from_target();
    println!(
        "64 MiB NAR over 50 ms RTT, 20 MB/s: nix copy took {took:?} = {:.1} MB/s ({:.2} of the cap); {crossed} bytes crossed the link",
        mb_per_s(digest.1, took),
        mb_per_s(digest.1, took) / 20.0
    );
    assert!(
        crossed >= digest.1,
        "the NAR came through the link, not around it: {crossed} < {}",
        digest.1
    );
    assert!(took < Duration::from_secs(120), "{took:?}");
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
#[cfg_attr(missing_root, ignore = "needs root (network namespaces)")]
fn a_link_cut_mid_nar_is_finished_by_the_second_provider() {
    let env = NixEnv::new();
    let Signed {
        path,
        digest,
        reg,
        seeder: seeder_a,
        ..
    } = signed_big_path(&env, 64);
    let seeder_c = env.path().join("seeder-c");
    run_ok(
        nixpfs()
            .arg("--data-dir")
            .arg(&seeder_c)
            .args(["pin", &path]),
    );
    let link = || LinkConfig::new(Duration::from_millis(25), Some(20_000_000));
    let a = Remote::start(&seeder_a, link());
    let c = Remote::start(&seeder_c, link());
    let b = client(&env.path().join("b"), &reg, &[a.addr(), c.addr()], "");
    await_peers(&b, 2);
    let (_, _, key) = b.id();

    let store = env.empty_store("cut");
    let started = Instant::now();
    let copy = {
        let mut cmd = env.copy_from(&b.url, &key, &store, &path);
        std::thread::spawn(move || cmd.output().expect("nix copy"))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.link.bytes_from_target() + c.link.bytes_from_target() < digest.1 / 4 {
        assert!(Instant::now() < deadline, "the fetch never got going");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (a_at_cut, c_at_cut) = (a.link.bytes_from_target(), c.link.bytes_from_target());
    a.link.cut();
    let out = copy.join().expect("nix copy thread");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        b.log_text()
    );
    run_ok(
        env.cmd("nix-store")
            .args(["--store", &store, "--verify-path", &path]),
    );
    let c_after = c.link.bytes_from_target() - c_at_cut;
    println!(
        "64 MiB NAR from 2 providers (50 ms RTT, 20 MB/s each), one cut after {} MiB: {took:?} = {:.1} MB/s; at the cut A {a_at_cut} B, C {c_at_cut} B; C sent {c_after} B after",
        (a_at_cut + c_at_cut) / MIB,
        mb_per_s(digest.1, took)
    );
    assert!(
        a_at_cut + c_at_cut < digest.1,
        "cut before the end of the NAR"
    );
    assert!(
        a_at_cut + c_at_cut + c_after >= digest.1,
        "the rest came through C's link"
    );
    assert!(took < Duration::from_secs(180), "{took:?}");
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
#[cfg_attr(missing_root, ignore = "needs root (network namespaces)")]
fn with_every_provider_gone_nix_fails_cleanly_and_the_gateway_stays_healthy() {
    let env = NixEnv::new();
    let Signed {
        path,
        digest,
        reg,
        seeder,
        ..
    } = signed_big_path(&env, 64);
    let own = big_path(&env, "faults-own", 1);
    let own_digest = dump_digest(&env, &own);
    let remote = Remote::start(
        &seeder,
        LinkConfig::new(Duration::from_millis(25), Some(20_000_000)),
    );
    let timeout = 3;
    let b = client(
        &env.path().join("b"),
        &reg,
        &[remote.addr()],
        &format!("fetch_timeout_secs = {timeout}\n"),
    );
    run_ok(b.cli().args(["pin", &own]));
    await_peers(&b, 1);
    let (_, _, key) = b.id();

    // Cut mid-NAR, never restored: the only provider is gone.
    let store = env.empty_store("gone");
    let started = Instant::now();
    let copy = {
        let mut cmd = env.copy_from(&b.url, &key, &store, &path);
        std::thread::spawn(move || cmd.output().expect("nix copy"))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while remote.link.bytes_from_target() < digest.1 / 4 {
        assert!(Instant::now() < deadline, "the fetch never got going");
        std::thread::sleep(Duration::from_millis(10));
    }
    remote.link.cut();
    let cut_at = started.elapsed();
    let out = copy.join().expect("nix copy thread");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "provider cut at {cut_at:?}: nix copy failed after {took:?} (fetch_timeout_secs = {timeout}): {}",
        stderr.lines().last().unwrap_or("")
    );
    assert!(!out.status.success(), "nix copy cannot have succeeded");
    assert!(took < Duration::from_secs(150), "no hang: {took:?}");

    // Asked again with nobody there from the start: a clean failure too.
    let started = Instant::now();
    let out = env
        .copy_from(&b.url, &key, &store, &path)
        .output()
        .expect("nix copy");
    assert!(!out.status.success());
    println!(
        "with no provider from the start: nix copy failed after {:?}: {}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
    );

    // The gateway is fine and serves what it holds.
    assert_eq!(b.get("/health").0, 200);
    assert_eq!(served_or_absent(&b, &own, &own_digest), Answer::Served);
    let log = b.log_text();
    assert_no_panic(&log, "the gateway");
    let nar_5xx = log
        .lines()
        .filter(|l| l.contains("status=5") || l.contains("status: 5"))
        .count();
    println!("gateway log lines with a 5xx status: {nar_5xx}");
}

// ------------------------------------------------------------ disk full

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount -t tmpfs (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn resize(&self, mib: u64) {
        run_ok(
            Command::new("mount")
                .args(["-o", &format!("remount,size={mib}m")])
                .arg(self.path()),
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
#[cfg_attr(missing_root, ignore = "needs root (mounts a tmpfs)")]
fn a_full_disk_fails_the_pin_clearly_and_loses_nothing() {
    let env = NixEnv::new();
    let small = big_path(&env, "faults-small", 2);
    let tiny = big_path(&env, "faults-tiny", 0);
    // Store paths pinned from the local store keep no leaf blocks (they are
    // read from /nix/store), so the disk is filled by adding a plain file,
    // whose blocks are written whole.
    let huge = env.path().join("huge.bin");
    std::fs::write(&huge, e2e::noise(0x9e37_79b9_7f4a_7c15, 96 * MIB as usize))
        .expect("write huge.bin");
    let small_digest = dump_digest(&env, &small);
    let disk = Tmpfs::mount(48);
    let data = disk.path().join("gw");
    run_ok(nixpfs().arg("--data-dir").arg(&data).args(["pin", &small]));
    let mut gw = Gateway::start(&data, &[]);
    assert_eq!(served_or_absent(&gw, &small, &small_digest), Answer::Served);

    let out = gw.cli().arg("add").arg(&huge).output().expect("run add");
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("add on a full disk: {}", stderr.trim());
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_no_panic(&stderr, "add");
    assert!(
        stderr.to_lowercase().contains("no space left"),
        "says why: {stderr}"
    );
    assert!(
        stderr.contains(&data.display().to_string()),
        "names the data dir {}: {stderr}",
        data.display()
    );

    // Still serving what it had, the index still answering; a tiny pin on
    // the full disk either works or fails cleanly.
    assert_eq!(gw.get("/health").0, 200);
    assert_eq!(served_or_absent(&gw, &small, &small_digest), Answer::Served);
    assert!(run_ok_str(gw.cli().arg("pins")).contains(&small));
    let out = gw.cli().args(["pin", &tiny]).output().expect("run pin");
    let tiny_stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "a tiny pin on the full disk: {} {}",
        out.status,
        tiny_stderr.trim()
    );
    assert_no_panic(&tiny_stderr, "the tiny pin");
    assert!(gw.is_running(), "the gateway survived the full disk");
    assert_eq!(served_or_absent(&gw, &small, &small_digest), Answer::Served);

    // Space returns: verify is clean, and the same running gateway (its
    // databases reopened after the I/O error, not restarted) adds the
    // file; its bytes are right.
    disk.resize(256);
    assert_verify_clean(&data, "after space returned");
    let added = run_ok_str(gw.cli().arg("add").arg(&huge));
    let cid = added
        .split_whitespace()
        .next()
        .expect("add prints a CID")
        .to_owned();
    let same_bytes = |gw: &Gateway| {
        let out = env.path().join("huge.fetched");
        run_ok(gw.cli().args(["fetch", &cid, "--out"]).arg(&out));
        std::fs::read(&out).expect("read fetched") == std::fs::read(&huge).expect("read huge")
    };
    assert!(same_bytes(&gw), "the added file reads back intact");
    assert_verify_clean(&data, "after the add");
    assert!(
        gw.log_text()
            .contains("reopened the database after an I/O error"),
        "the pin database was reopened, not the gateway restarted:\n{}",
        gw.log_text()
    );
    drop(gw);
    // And after a restart on the same directory.
    let gw = Gateway::start(&data, &[]);
    assert!(
        same_bytes(&gw),
        "the added file reads back intact after a restart"
    );
    assert_eq!(served_or_absent(&gw, &small, &small_digest), Answer::Served);
    assert_no_panic(&gw.log_text(), "the gateway");
}

// ------------------------------------------------------------- kill -9

/// splitmix64: a small seeded generator, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn from_env(what: &str) -> Self {
        let seed = std::env::var("NIXPFS_KILL_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        println!("{what}: NIXPFS_KILL_SEED={seed}");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, max).
    fn below(&mut self, max: Duration) -> Duration {
        let nanos = max.as_nanos().max(1) as u64;
        Duration::from_nanos(self.next() % nanos)
    }
}

fn iterations() -> u64 {
    env_or("NIXPFS_KILL_ITERATIONS", 3)
}

fn fault_mib() -> u64 {
    env_or("NIXPFS_FAULT_SIZE_MIB", 64)
}

/// Kills `child` with SIGKILL and reaps it.
fn kill_9(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn spawn_quiet(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn")
}

/// Unpins `path` (it may not be pinned) and collects garbage, so the next
/// iteration starts from nothing again.
fn reset(gw: &Gateway, path: &str) {
    let _ = gw.cli().args(["unpin", path]).output();
    run_ok(gw.cli().arg("gc"));
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn kill_9_during_a_pin_leaves_right_bytes_or_none() {
    let env = NixEnv::new();
    let mib = fault_mib();
    let path = big_path(&env, "faults-kill-pin", mib);
    let digest = dump_digest(&env, &path);
    let data = env.path().join("gw");
    let mut rng = Rng::from_env("kill -9 during pin");
    // How long an undisturbed pin takes, so the kills land inside one.
    let started = Instant::now();
    run_ok(nixpfs().arg("--data-dir").arg(&data).args(["pin", &path]));
    let span = started.elapsed().mul_f64(1.2);
    {
        let gw = Gateway::start(&data, &[]);
        reset(&gw, &path);
    }
    let mut tally = [0u32; 2];
    for i in 0..iterations() {
        let at = rng.below(span);
        // Even iterations kill the CLI pinning the directory itself, odd
        // ones the gateway a CLI pins through.
        if i % 2 == 0 {
            let pin = spawn_quiet(nixpfs().arg("--data-dir").arg(&data).args(["pin", &path]));
            std::thread::sleep(at);
            kill_9(pin);
        } else {
            let gw = Gateway::start(&data, &[]);
            let pin = spawn_quiet(gw.cli().args(["pin", &path]));
            std::thread::sleep(at);
            gw.kill_9();
            let _ = pin.wait_with_output();
        }
        assert_verify_clean(&data, &format!("iteration {i}, killed after {at:?}"));
        let gw = Gateway::start(&data, &[]);
        let answer = served_or_absent(&gw, &path, &digest);
        println!("iteration {i}: killed after {at:?}: {answer:?}");
        tally[usize::from(answer == Answer::Served)] += 1;
        assert_verify_clean(&data, &format!("iteration {i}, restarted"));
        reset(&gw, &path);
        assert_no_panic(&gw.log_text(), "the gateway");
    }
    println!(
        "kill -9 during a {mib} MiB pin: {} iterations, {} absent, {} served intact",
        iterations(),
        tally[0],
        tally[1]
    );
}

const TOKEN: &str = "faults-upload-token-0123456789";

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn kill_9_during_an_upload_leaves_right_bytes_or_none() {
    let env = NixEnv::new();
    let mib = fault_mib();
    let path = big_path(&env, "faults-kill-upload", mib);
    let digest = dump_digest(&env, &path);
    let token_file = env.path().join("upload.token");
    fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let netrc = env.path().join("netrc");
    fs::write(
        &netrc,
        format!("machine 127.0.0.1 login nixpfs password {TOKEN}\n"),
    )
    .unwrap();
    let data = env.path().join("gw");
    let args = ["--upload-token-file", token_file.to_str().unwrap()];
    let upload = |gw: &Gateway| {
        let mut cmd = env.cmd("nix");
        cmd.args([
            "copy",
            "--to",
            &format!("{}?compression=none", gw.url),
            &path,
        ])
        .args(["--option", "netrc-file"])
        .arg(&netrc);
        cmd
    };
    let mut rng = Rng::from_env("kill -9 during upload");
    let span = {
        let gw = Gateway::start(&data, &args);
        let started = Instant::now();
        run_ok(&mut upload(&gw));
        let span = started.elapsed().mul_f64(1.2);
        assert_eq!(served_or_absent(&gw, &path, &digest), Answer::Served);
        reset(&gw, &path);
        assert_eq!(served_or_absent(&gw, &path, &digest), Answer::Absent);
        span
    };
    let mut tally = [0u32; 2];
    for i in 0..iterations() {
        let at = rng.below(span);
        let gw = Gateway::start(&data, &args);
        let copy = spawn_quiet(&mut upload(&gw));
        std::thread::sleep(at);
        gw.kill_9();
        let _ = copy.wait_with_output();
        assert_verify_clean(&data, &format!("iteration {i}, killed after {at:?}"));
        let gw = Gateway::start(&data, &args);
        let answer = served_or_absent(&gw, &path, &digest);
        println!("iteration {i}: killed after {at:?}: {answer:?}");
        tally[usize::from(answer == Answer::Served)] += 1;
        assert_verify_clean(&data, &format!("iteration {i}, restarted"));
        // The upload again, undisturbed: it must succeed over whatever the
        // kill left.
        run_ok(&mut upload(&gw));
        assert_eq!(served_or_absent(&gw, &path, &digest), Answer::Served);
        reset(&gw, &path);
        assert_no_panic(&gw.log_text(), "the gateway");
    }
    println!(
        "kill -9 during a {mib} MiB upload: {} iterations, {} absent, {} served intact",
        iterations(),
        tally[0],
        tally[1]
    );
}

/// A set of `n` mappings of made-up paths (their bytes exist nowhere) plus
/// `real` (mappings whose bytes a seeder holds), signed by `key`.
fn big_set(
    key: &SecretKey,
    n: u64,
    real: &[anchor_registry::Mapping],
    out: &Path,
) -> Vec<MappingData> {
    let cid = ContentId::parse("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")
        .expect("a CID");
    let mut builder = MappingSetBuilder::first(
        SetKind::Anchor,
        anchor_registry::AnchorName::parse(key.name()).unwrap(),
    );
    let mut samples = Vec::new();
    for i in 0..n {
        let mut digest = [0u8; 20];
        digest[..8].copy_from_slice(&i.to_le_bytes());
        digest[8..16].copy_from_slice(&0x6661_756c_7473u64.to_le_bytes());
        let path =
            StorePath::from_parts(StorePathHash::from_digest(digest), &format!("made-up-{i}"))
                .unwrap();
        let data = MappingData {
            path,
            nar_hash: NarHash::digest(&i.to_le_bytes()),
            nar_size: 1000 + i,
            references: Default::default(),
            deriver: None,
            ca: None,
            cid,
            profile: ImportProfile::unixfs_v1_2025(),
        };
        if i % (n / 16).max(1) == 0 {
            samples.push(data.clone());
        }
        builder.insert(data.sign(key));
    }
    for m in real {
        builder.insert(m.data().clone().sign(key));
    }
    let now = e2e::nix::unix_now();
    let mut file = std::io::BufWriter::new(fs::File::create(out).unwrap());
    builder.write(key, now, now + 7 * 86400, &mut file).unwrap();
    std::io::Write::flush(&mut file).unwrap();
    samples
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn kill_9_during_an_anchors_sync_leaves_right_bytes_or_none() {
    let env = NixEnv::new();
    let n = env_or("NIXPFS_FAULT_SYNC_ENTRIES", 100_000);
    let real = big_path(&env, "faults-kill-sync", 1);
    let digest = dump_digest(&env, &real);
    let (key_file, public) = keygen(env.path(), "anchor-a");
    let key = SecretKey::parse(fs::read_to_string(&key_file).unwrap().trim()).unwrap();
    let seeder_dir = env.path().join("seeder");
    let small_set = env.path().join("set-small.jsonl");
    let real_mappings = sign_and_publish(&seeder_dir, &key_file, &[&real], &small_set);
    let set = env.path().join("set-big.jsonl");
    let made = Instant::now();
    let samples = big_set(&key, n, &real_mappings, &set);
    println!(
        "a set of {} entries ({} MiB) made in {:?}",
        n + 1,
        fs::metadata(&set).unwrap().len() / MIB,
        made.elapsed()
    );
    let reg = registry(&env.path().join("reg"), &[("anchor-a", &public, &[&set])]);
    let seeder = Gateway::start(&seeder_dir, &[]);
    let mut args: Vec<String> = reg.serve_args().iter().map(|s| s.to_string()).collect();
    args.extend(["--peer".to_owned(), seeder.multiaddr()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // No timer: the syncs are the ones this test starts.
    let victim = |i: u64| {
        let dir = env.path().join(format!("victim-{i}"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("config.toml"), "sync_interval_secs = 0\n").unwrap();
        dir
    };
    let mut rng = Rng::from_env("kill -9 during anchors sync");
    let span = {
        let gw = Gateway::start(&victim(99), &args);
        let started = Instant::now();
        run_ok(gw.cli().args(["anchors", "sync"]));
        let took = started.elapsed();
        println!("an undisturbed sync of {} entries: {took:?}", n + 1);
        assert_eq!(served_or_absent(&gw, &real, &digest), Answer::Served);
        took.mul_f64(1.2)
    };
    let mut tally = [0u32; 2];
    for i in 0..iterations() {
        let at = rng.below(span);
        let dir = victim(i);
        let gw = Gateway::start(&dir, &args);
        let sync = spawn_quiet(gw.cli().args(["anchors", "sync"]));
        std::thread::sleep(at);
        gw.kill_9();
        let _ = sync.wait_with_output();
        assert_verify_clean(&dir, &format!("iteration {i}, killed after {at:?}"));
        let gw = Gateway::start(&dir, &args);
        let answer = served_or_absent(&gw, &real, &digest);
        for m in &samples {
            let (status, body) = gw.get(&format!("/{}.narinfo", m.path.hash()));
            match status {
                404 => {}
                200 => {
                    let info = NarInfo::parse(&String::from_utf8_lossy(&body)).unwrap();
                    assert_eq!(info.nar_hash, m.nar_hash, "what the anchor signed");
                }
                other => panic!("narinfo of {}: {other}", m.path),
            }
        }
        println!("iteration {i}: killed after {at:?}: {answer:?}");
        tally[usize::from(answer == Answer::Served)] += 1;
        // A sync after the kill completes and serves the path.
        run_ok(gw.cli().args(["anchors", "sync"]));
        assert_eq!(served_or_absent(&gw, &real, &digest), Answer::Served);
        assert_verify_clean(&dir, &format!("iteration {i}, synced again"));
        assert_no_panic(&gw.log_text(), "the gateway");
        drop(gw);
        let _ = fs::remove_dir_all(&dir);
    }
    println!(
        "kill -9 during a sync of {} entries: {} iterations, {} absent, {} served intact",
        n + 1,
        iterations(),
        tally[0],
        tally[1]
    );
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn kill_9_during_a_seed_leaves_right_bytes_or_none() {
    let env = NixEnv::new();
    let mib = fault_mib();
    let Signed {
        path,
        digest,
        cid,
        reg,
        seeder: seeder_dir,
    } = signed_big_path(&env, mib);
    let seeder = Gateway::start(&seeder_dir, &[]);
    let mut args: Vec<String> = reg.serve_args().iter().map(|s| s.to_string()).collect();
    args.extend(["--peer".to_owned(), seeder.multiaddr()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let data = env.path().join("victim");
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("config.toml"), "sync_interval_secs = 0\n").unwrap();
    let pinned = |gw: &Gateway| run_ok_str(gw.cli().arg("pins")).contains(&cid);
    let mut rng = Rng::from_env("kill -9 during seed");
    let span = {
        let gw = Gateway::start(&data, &args);
        run_ok(gw.cli().args(["anchors", "sync"]));
        await_peers(&gw, 1);
        let started = Instant::now();
        run_ok(gw.cli().arg("seed"));
        let span = started.elapsed().mul_f64(1.2);
        assert!(pinned(&gw));
        unpin_all(&gw);
        run_ok(gw.cli().arg("gc"));
        span
    };
    let mut tally = [0u32; 2];
    for i in 0..iterations() {
        let at = rng.below(span);
        let gw = Gateway::start(&data, &args);
        await_peers(&gw, 1);
        let seed = spawn_quiet(gw.cli().arg("seed"));
        std::thread::sleep(at);
        gw.kill_9();
        let _ = seed.wait_with_output();
        assert_verify_clean(&data, &format!("iteration {i}, killed after {at:?}"));
        let gw = Gateway::start(&data, &args);
        let was_pinned = pinned(&gw);
        // Served either way (from the seeder if the pin is gone): the bytes
        // must be right.
        let answer = served_or_absent(&gw, &path, &digest);
        println!("iteration {i}: killed after {at:?}: pinned {was_pinned}, {answer:?}");
        tally[usize::from(was_pinned)] += 1;
        assert_eq!(answer, Answer::Served, "anchored and seeded by a peer");
        run_ok(gw.cli().arg("seed"));
        assert!(pinned(&gw), "a seed after the kill completes");
        assert_verify_clean(&data, &format!("iteration {i}, seeded again"));
        unpin_all(&gw);
        run_ok(gw.cli().arg("gc"));
        assert_no_panic(&gw.log_text(), "the gateway");
    }
    println!(
        "kill -9 during a seed of {mib} MiB: {} iterations, {} not pinned after, {} pinned intact",
        iterations(),
        tally[0],
        tally[1]
    );
}

/// Unpins every CID the gateway holds.
fn unpin_all(gw: &Gateway) {
    let pins: serde_json::Value =
        serde_json::from_str(&run_ok_str(gw.cli().args(["pins", "--json"]))).unwrap();
    for p in pins.as_array().into_iter().flatten() {
        if let Some(cid) = p["cid"].as_str() {
            let _ = gw.cli().args(["unpin", cid]).output();
        }
    }
}
