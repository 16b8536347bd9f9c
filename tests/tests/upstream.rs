//! The upstream bridge as a user sees it: real nginx serving binary caches
//! that `nix copy --to file://…` wrote (xz, zstd, none), signed with a key U
//! made by `nix-store --generate-binary-cache-key`; a gateway that lists
//! the upstream with `keys = [U]`; real Nix trusting only U substituting
//! through the gateway. And what must not pass: NAR bytes altered on the
//! upstream, narinfos whose signature does not verify under U, and an
//! upstream that went away.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anchor_registry::{NarHash, NarInfo, PublicKey, StorePath};
use e2e::gateway::Gateway;
use e2e::nginx::Nginx;
use e2e::nix::NixEnv;
use e2e::{run_ok, run_ok_str};

/// A closure of three paths: a top that references a small dep and a NAR of
/// 52 MiB of random bytes (each 64 KiB repeated 16 times, so that xz
/// compresses it in seconds, yet every 1 MiB leaf is distinct).
const CLOSURE: &str = r#"{ nonce }:
let
  sys = builtins.currentSystem;
  dep = builtins.derivation {
    name = "upstream-dep"; system = sys; builder = "/bin/sh";
    args = [ "-c" "echo dep-${nonce} > $out" ];
  };
  big = builtins.derivation {
    name = "upstream-big"; system = sys; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
    args = [ "-c" "set -e; for i in $(seq 52); do head -c 65536 /dev/urandom > blk; for j in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do cat blk; done; done > $out; echo ${nonce} >> $out" ];
  };
in builtins.derivation {
  name = "upstream-top"; system = sys; builder = "/bin/sh";
  inherit dep big;
  args = [ "-c" "echo $dep $big > $out" ];
}
"#;

/// A small closure: a top referencing a dep.
const SMALL: &str = r#"{ nonce }:
let
  sys = builtins.currentSystem;
  dep = builtins.derivation {
    name = "small-dep"; system = sys; builder = "/bin/sh";
    args = [ "-c" "echo small-dep-content-${nonce} > $out" ];
  };
in builtins.derivation {
  name = "small-top"; system = sys; builder = "/bin/sh";
  inherit dep;
  args = [ "-c" "echo top-${nonce} $dep > $out" ];
}
"#;

fn write_config(data_dir: &Path, body: &str) {
    fs::create_dir_all(data_dir).unwrap();
    fs::write(data_dir.join("config.toml"), body).unwrap();
}

fn upstream_config(url: &str, key: &str, extra: &str) -> String {
    format!("{extra}\n[[upstreams]]\nurl = \"{url}\"\nkeys = [\"{key}\"]\n")
}

/// `nix copy --to 'file://DIR?compression=C&secret-key=SK' PATH`.
fn copy_to_file_cache(env: &NixEnv, dir: &Path, compression: &str, sk: &Path, path: &str) {
    run_ok(env.cmd("nix").args([
        "copy",
        "--to",
        &format!(
            "file://{}?compression={compression}&secret-key={}",
            dir.display(),
            sk.display()
        ),
        path,
    ]));
}

/// One download attempt: a refused NAR fails at once instead of retrying.
fn substitute(env: &NixEnv, url: &str, key: &str, store: &str, path: &str) -> std::process::Output {
    env.copy_from(url, key, store, path)
        .args(["--option", "download-attempts", "1"])
        .output()
        .expect("spawn nix copy")
}

/// The copy succeeded, and the gateway finished importing what it served
/// (Nix gets a NAR's last bytes once they are verified, before the import
/// behind them ends).
fn assert_ok(out: &std::process::Output, what: &str, gw: &Gateway) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log_text()
    );
    eventually("the gateway's imports", || {
        gw.metric("nar_imports_running") == 0
    });
}

fn hash_part(path: &str) -> String {
    StorePath::parse(path).unwrap().hash().to_string()
}

fn narinfo(gw: &Gateway, path: &str) -> NarInfo {
    let (status, body) = gw.get(&format!("/{}.narinfo", hash_part(path)));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    NarInfo::parse(&String::from_utf8(body).unwrap()).unwrap()
}

/// Pins listed by `nixpfs pins`.
fn pins(gw: &Gateway) -> Vec<String> {
    run_ok_str(gw.cli().arg("pins"))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A GET whose body may break off: (status, bytes received, whether the
/// body ended cleanly).
fn get_raw(url: &str) -> (u16, usize, bool) {
    let resp = match ureq::get(url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("GET {url}: {e}"),
    };
    let status = resp.status();
    let mut body = Vec::new();
    let clean = std::io::Read::read_to_end(&mut resp.into_reader(), &mut body).is_ok();
    (status, body.len(), clean)
}

#[test]
#[cfg_attr(
    any(missing_nix, missing_nginx),
    ignore = "needs the real Nix client and nginx; .ci/run installs nix-bin and nginx"
)]
fn real_nix_substitutes_an_upstream_closure_through_the_gateway() {
    let env = NixEnv::new();
    let top = env.build("closure.nix", CLOSURE);
    let closure = env.closure(&top);
    assert_eq!(closure.len(), 3, "{closure:?}");
    let big = closure
        .iter()
        .find(|p| p.ends_with("-upstream-big"))
        .unwrap()
        .clone();
    let (sk, u) = env.nix_keypair("upstream-u-1");
    let www = env.path().join("www");
    copy_to_file_cache(&env, &www.join("xz"), "xz", &sk, &top);
    copy_to_file_cache(&env, &www.join("zstd"), "zstd", &sk, &top);
    let nginx = Nginx::start(&www, &env.path().join("nginx"));

    // Gateway A: the xz cache upstream, seeding what it fetches.
    let a_dir = env.path().join("a");
    write_config(
        &a_dir,
        &upstream_config(&nginx.url("xz"), &u, "seed_fetched = true"),
    );
    let a = Gateway::start(&a_dir, &[]);

    let store = env.empty_store("via-a");
    let started = Instant::now();
    let out = substitute(&env, &a.url, &u, &store, &top);
    assert_ok(&out, "nix copy through the upstream bridge", &a);
    let through_a = started.elapsed();
    for path in &closure {
        run_ok(
            env.cmd("nix-store")
                .args(["--store", &store, "--verify-path", path]),
        );
    }
    let copied = run_ok_str(env.cmd("nix-store").args(["--store", &store, "-qR", &top]));
    assert_eq!(copied.lines().count(), 3, "{copied}");

    // What A serves: U's signature passed through, our URL, uncompressed,
    // NarHash and NarSize as the upstream signed them.
    let upstream_key = PublicKey::parse(&u).unwrap();
    let (_, _, gateway_key) = a.id();
    let info = narinfo(&a, &big);
    assert!(
        info.verify(&upstream_key),
        "U's signature is passed through"
    );
    assert!(info.verify(&PublicKey::parse(&gateway_key).unwrap()));
    assert_eq!(info.compression.as_deref(), Some("none"));
    assert_eq!(info.url, format!("nar/{}.nar", info.nar_hash.to_nix32()));
    assert!(info.nar_size >= 50 << 20, "a NAR of at least 50 MiB");
    let upstream_info = NarInfo::parse(
        &fs::read_to_string(www.join(format!("xz/{}.narinfo", hash_part(&big)))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (info.nar_hash, info.nar_size),
        (upstream_info.nar_hash, upstream_info.nar_size)
    );

    // Fetched, verified, imported and (seed_fetched) pinned: three NARs.
    assert!(a.metric("upstream_narinfo_served") >= 3);
    assert_eq!(a.metric("upstream_nar_fetched"), 3);
    // Pinned after Nix got the bytes (a prefetch's waiter is served first).
    eventually("three seeded NARs", || a.metric("seeded_fetched") == 3);
    assert_eq!(a.metric("upstream_nar_refused"), 0);
    assert!(a.metric("upstream_bytes") >= info.nar_size);
    assert_eq!(pins(&a).len(), 3, "{:?}", pins(&a));
    // A fetched NAR answers HEAD with GET's headers.
    assert_eq!(
        a.assert_head_is_get(&format!("/{}", info.url)),
        info.nar_size
    );

    // A second empty store: served from A's pins, the upstream not asked
    // for NARs again.
    let nar_requests = |nginx: &Nginx| nginx.access_log().matches("GET /xz/nar/").count();
    let before = nar_requests(&nginx);
    let store2 = env.empty_store("via-a-again");
    let out = substitute(&env, &a.url, &u, &store2, &top);
    assert_ok(&out, "nix copy of pinned upstream paths", &a);
    assert_eq!(nar_requests(&nginx), before, "NARs came from A's blocks");
    assert_eq!(a.metric("upstream_nar_fetched"), 3);

    // Baseline: Nix straight from nginx.
    let direct = env.empty_store("direct");
    let started = Instant::now();
    let out = substitute(&env, &nginx.url("xz"), &u, &direct, &top);
    assert_ok(&out, "nix copy straight from nginx", &a);
    let straight = started.elapsed();
    eprintln!(
        "nix copy of a 52 MiB closure (xz): through A cold {through_a:?}, straight from nginx {straight:?}"
    );

    // Gateway Z: the zstd cache. The NAR starts streaming before it is
    // downloaded whole: the first byte arrives long before the last.
    let z_dir = env.path().join("z");
    write_config(&z_dir, &upstream_config(&nginx.url("zstd"), &u, ""));
    let z = Gateway::start(&z_dir, &[]);
    let info = narinfo(&z, &big);
    let started = Instant::now();
    let resp = ureq::get(&format!("{}/{}", z.url, info.url))
        .call()
        .unwrap();
    let mut reader = resp.into_reader();
    let mut first = [0u8; 1];
    std::io::Read::read_exact(&mut reader, &mut first).unwrap();
    let ttfb = started.elapsed();
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut rest).unwrap();
    let total = started.elapsed();
    assert_eq!(rest.len() as u64 + 1, info.nar_size);
    eprintln!(
        "zstd NAR through Z: first byte after {ttfb:?}, all {} bytes after {total:?}",
        info.nar_size
    );
    assert!(
        ttfb < total / 2,
        "first byte {ttfb:?} vs whole NAR {total:?}"
    );
    let store3 = env.empty_store("via-z");
    let out = substitute(&env, &z.url, &u, &store3, &top);
    assert_ok(&out, "nix copy through the zstd upstream", &z);
    assert_eq!(z.metric("seeded_fetched"), 0, "seed_fetched is off on Z");
    assert!(pins(&z).is_empty());
}

#[test]
#[cfg_attr(
    any(missing_nix, missing_nginx),
    ignore = "needs the real Nix client and nginx; .ci/run installs nix-bin and nginx"
)]
fn altered_bytes_bad_signatures_and_a_dead_upstream_never_reach_nix() {
    let env = NixEnv::new();
    let top = env.build("small.nix", SMALL);
    let other = env.build(
        "other.nix",
        r#"{ nonce }: builtins.derivation { name = "never-fetched"; system = builtins.currentSystem;
             builder = "/bin/sh"; args = [ "-c" "echo ${nonce} > $out" ]; }"#,
    );
    let closure = env.closure(&top);
    let dep = closure
        .iter()
        .find(|p| p.ends_with("-small-dep"))
        .unwrap()
        .clone();
    let (sk, u) = env.nix_keypair("upstream-u-1");
    let wrong_dir = env.path().join("wrong-key");
    fs::create_dir_all(&wrong_dir).unwrap();
    // Another key under U's name: its signatures name U but do not verify.
    let (wrong_sk, _) = {
        let sk = wrong_dir.join("sk");
        let pk = wrong_dir.join("pk");
        run_ok(
            env.cmd("nix-store")
                .args(["--generate-binary-cache-key", "upstream-u-1"])
                .arg(&sk)
                .arg(&pk),
        );
        (sk, pk)
    };
    let www = env.path().join("www");
    for path in [&top, &other] {
        copy_to_file_cache(&env, &www.join("plain"), "none", &sk, path);
        copy_to_file_cache(&env, &www.join("tampered"), "none", &sk, path);
        copy_to_file_cache(&env, &www.join("xz-tampered"), "xz", &sk, path);
        copy_to_file_cache(&env, &www.join("wrongsig"), "none", &wrong_sk, path);
    }
    // One byte of the dep's NAR flipped; FileHash and FileSize (not
    // signed) dropped, so only NarHash can catch it.
    let dep_narinfo = www.join(format!("tampered/{}.narinfo", hash_part(&dep)));
    let text = fs::read_to_string(&dep_narinfo).unwrap();
    let url = NarInfo::parse(&text).unwrap().url;
    let nar = www.join("tampered").join(&url);
    let mut bytes = fs::read(&nar).unwrap();
    let at = bytes
        .windows(17)
        .position(|w| w == b"small-dep-content")
        .unwrap();
    bytes[at] ^= 1;
    fs::write(&nar, bytes).unwrap();
    let stripped: String = text
        .lines()
        .filter(|l| !l.starts_with("FileHash:") && !l.starts_with("FileSize:"))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(&dep_narinfo, stripped).unwrap();
    // The same in the xz cache, inside the compressed file: FileHash
    // catches it (or the xz check does).
    let xz_info = NarInfo::parse(
        &fs::read_to_string(www.join(format!("xz-tampered/{}.narinfo", hash_part(&dep)))).unwrap(),
    )
    .unwrap();
    let xz_nar = www.join("xz-tampered").join(&xz_info.url);
    let mut bytes = fs::read(&xz_nar).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    fs::write(&xz_nar, bytes).unwrap();

    let mut nginx = Nginx::start(&www, &env.path().join("nginx"));

    // Altered NAR bytes: the response is cut short, nothing is pinned,
    // the refusal is counted, and Nix does not get the path.
    for (name, cache) in [("t", "tampered"), ("x", "xz-tampered")] {
        let dir = env.path().join(name);
        write_config(
            &dir,
            &upstream_config(&nginx.url(cache), &u, "seed_fetched = true"),
        );
        let gw = Gateway::start(&dir, &[]);
        let info = narinfo(&gw, &dep);
        let (status, received, clean) = get_raw(&format!("{}/{}", gw.url, info.url));
        assert!(
            status != 200 || !clean || (received as u64) < info.nar_size,
            "{cache}: a complete body of altered bytes was sent ({status}, {received} bytes)"
        );
        assert!(gw.metric("upstream_nar_refused") >= 1, "{cache}");
        let store = env.empty_store(&format!("{name}-store"));
        let out = substitute(&env, &gw.url, &u, &store, &top);
        assert!(!out.status.success(), "{cache}: altered NAR accepted");
        let valid = env
            .cmd("nix-store")
            .args(["--store", &store, "--check-validity", &dep])
            .output()
            .unwrap();
        assert!(
            !valid.status.success(),
            "{cache}: altered path became valid"
        );
        // The untouched top path's NAR may have been prefetched, verified
        // and seeded once its narinfo was served; the altered one never is.
        let dep_nar = info.nar_hash.to_string();
        let log = gw.log_text();
        let seeded: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("fetched NAR pinned and seeded"))
            .collect();
        assert!(
            seeded.iter().all(|l| !l.contains(&dep_nar)),
            "{cache}: the altered NAR was seeded: {seeded:?}"
        );
        assert!(gw.metric("seeded_fetched") <= 1, "{cache}: {seeded:?}");
        // The good NAR's seeding may still be under way: pinned, not yet counted.
        eventually("every pin counted as seeded", || {
            pins(&gw).len() as u64 == gw.metric("seeded_fetched")
        });
        assert!(
            gw.log_text().contains(&format!(
                "{}/{}",
                nginx.url(cache),
                info_url(&www, cache, &dep)
            )),
            "{cache}: the refusal is logged with the URL:\n{}",
            gw.log_text()
        );
    }

    // A narinfo whose signature names U but does not verify: 404.
    let w_dir = env.path().join("w");
    write_config(&w_dir, &upstream_config(&nginx.url("wrongsig"), &u, ""));
    let w = Gateway::start(&w_dir, &[]);
    let (status, _) = w.get(&format!("/{}.narinfo", hash_part(&top)));
    assert_eq!(status, 404);
    assert_eq!(w.metric("upstream_bad_signature"), 1);
    let status_json = run_ok_str(w.cli().args(["status", "--json"]));
    let status: serde_json::Value = serde_json::from_str(&status_json).unwrap();
    let last_error = status["upstreams"][0]["last_error"].as_str().unwrap_or("");
    assert!(
        last_error.contains("no signature verifies"),
        "{status_json}"
    );
    // Asked again: the negative cache answers, the upstream is not asked.
    let asked = nginx.access_log().matches("GET /wrongsig/").count();
    let (status, _) = w.get(&format!("/{}.narinfo", hash_part(&top)));
    assert_eq!(status, 404);
    assert_eq!(nginx.access_log().matches("GET /wrongsig/").count(), asked);

    // A working upstream, then nginx stopped: what G fetched is still
    // served, and misses are 404 within 5 s.
    let g_dir = env.path().join("g");
    write_config(
        &g_dir,
        &upstream_config(&nginx.url("plain"), &u, "seed_fetched = true"),
    );
    let g = Gateway::start(&g_dir, &[]);
    let store = env.empty_store("g-store");
    let out = substitute(&env, &g.url, &u, &store, &top);
    assert_ok(&out, "nix copy through G", &g);
    nginx.stop();
    for _ in 0..3 {
        let started = Instant::now();
        let (status, _) = g.get(&format!("/{}.narinfo", hash_part(&other)));
        assert_eq!(status, 404);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a miss with the upstream down took {:?}",
            started.elapsed()
        );
    }
    let info = narinfo(&g, &top);
    let (status, body) = g.get(&format!("/{}", info.url));
    assert_eq!(
        (status, body.len() as u64),
        (200, info.nar_size),
        "{}\n{}",
        String::from_utf8_lossy(&body),
        g.log_text()
    );
    let store = env.empty_store("g-store-after");
    let out = substitute(&env, &g.url, &u, &store, &top);
    assert_ok(&out, "nix copy through G with the upstream down", &g);
    let status_json = run_ok_str(g.cli().args(["status", "--json"]));
    let status: serde_json::Value = serde_json::from_str(&status_json).unwrap();
    let last_error = status["upstreams"][0]["last_error"].as_str().unwrap_or("");
    assert!(
        last_error.contains(&nginx.url("plain")),
        "status names the failing URL: {status_json}"
    );
    let text = run_ok_str(g.cli().arg("status"));
    assert!(text.contains("upstream http://127.0.0.1:"), "{text}");
}

/// The `URL:` an upstream cache's narinfo gives for `path`.
fn info_url(www: &Path, cache: &str, path: &str) -> String {
    NarInfo::parse(
        &fs::read_to_string(www.join(format!("{cache}/{}.narinfo", hash_part(path)))).unwrap(),
    )
    .unwrap()
    .url
}

/// How often nginx was asked for `path`'s NAR in the `plain` cache.
fn nar_gets(nginx: &Nginx, www: &Path, path: &str) -> usize {
    let url = info_url(www, "plain", path);
    nginx
        .access_log()
        .matches(&format!("GET /plain/{url}"))
        .count()
}

/// A store path of `mib` MiB of random bytes (distinct per call).
fn random_path(env: &NixEnv, name: &str, mib: u32) -> String {
    env.build(
        &format!("{name}.nix"),
        &format!(
            r#"{{ nonce }}: builtins.derivation {{ name = "{name}"; system = builtins.currentSystem;
                 builder = "/bin/sh"; PATH = "/usr/bin:/bin";
                 args = [ "-c" "head -c {} /dev/urandom > $out; echo ${{nonce}} >> $out" ]; }}"#,
            u64::from(mib) << 20
        ),
    )
}

/// Waits until `cond` holds, for at most 10 s.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[cfg_attr(
    any(missing_nix, missing_nginx),
    ignore = "needs the real Nix client and nginx; .ci/run installs nix-bin and nginx"
)]
fn cache_pins_beyond_cache_max_size_are_evicted_least_recently_used_first() {
    let env = NixEnv::new();
    let paths: Vec<String> = (1..=3)
        .map(|i| random_path(&env, &format!("cached-{i}"), 3))
        .collect();
    let own = random_path(&env, "own-pin", 3);
    let (sk, u) = env.nix_keypair("upstream-u-1");
    let www = env.path().join("www");
    for path in &paths {
        copy_to_file_cache(&env, &www.join("plain"), "none", &sk, path);
    }
    let nginx = Nginx::start(&www, &env.path().join("nginx"));
    let nar_gets = |path: &str| nar_gets(&nginx, &www, path);

    // Room for two and a half NARs of 3 MiB.
    let dir = env.path().join("r");
    let config = |budget: u64| {
        upstream_config(
            &nginx.url("plain"),
            &u,
            &format!("seed_fetched = true\ncache_max_size = \"{budget}\""),
        )
    };
    write_config(&dir, &config(15 << 19));
    let gw = Gateway::start(&dir, &[]);
    run_ok(gw.cli().args(["pin", &own]));
    let fetch = |path: &str| {
        let info = narinfo(&gw, path);
        let (status, body) = gw.get(&format!("/{}", info.url));
        assert_eq!((status, body.len() as u64), (200, info.nar_size), "{path}");
    };
    fetch(&paths[0]);
    fetch(&paths[1]);
    eventually("two seeded NARs", || gw.metric("seeded_fetched") == 2);
    std::thread::sleep(Duration::from_millis(50));
    fetch(&paths[0]); // now the most recently used
    assert_eq!(nar_gets(&paths[0]), 1, "served from the pin");
    std::thread::sleep(Duration::from_millis(200));
    fetch(&paths[2]);
    eventually("an eviction", || gw.metric("cache_evictions") == 1);
    assert_eq!(
        pins(&gw).len(),
        3,
        "two cache pins and the user's: {:?}",
        pins(&gw)
    );
    assert!(
        pins(&gw).iter().any(|p| p.ends_with(&own)),
        "the user pin stays: {:?}",
        pins(&gw)
    );
    // The least recently used one is gone: fetched from the upstream again.
    fetch(&paths[0]);
    assert_eq!(nar_gets(&paths[0]), 1, "kept");
    fetch(&paths[1]);
    assert_eq!(nar_gets(&paths[1]), 2, "evicted, so fetched again");
    eventually("the refetched NAR's eviction", || {
        gw.metric("cache_evictions") == 2
    });
    drop(gw);

    // A smaller budget: `nixpfs gc` evicts down to it and says what it did.
    write_config(&dir, &config(9 << 19));
    let out = run_ok_str(e2e::nixpfs().arg("--data-dir").arg(&dir).arg("gc"));
    let evicted: Vec<&str> = out.lines().filter(|l| l.starts_with("evicted ")).collect();
    assert_eq!(evicted.len(), 1, "{out}");
    assert!(out.contains("freed "), "{out}");
    let left = run_ok_str(e2e::nixpfs().arg("--data-dir").arg(&dir).arg("pins"));
    assert_eq!(
        left.lines().count(),
        2,
        "one cache pin and the user's: {left}"
    );
    assert!(left.contains(&own), "{left}");
}

/// A closure whose dep is 8 MiB of random bytes (several IPFS blocks).
const SHARED: &str = r#"{ nonce }:
let
  sys = builtins.currentSystem;
  dep = builtins.derivation {
    name = "shared-dep"; system = sys; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
    args = [ "-c" "head -c 8388608 /dev/urandom > $out; echo ${nonce} >> $out" ];
  };
in builtins.derivation {
  name = "shared-top"; system = sys; builder = "/bin/sh";
  inherit dep;
  args = [ "-c" "echo top-${nonce} $dep > $out" ];
}
"#;

#[test]
#[cfg_attr(
    any(missing_nix, missing_nginx),
    ignore = "needs the real Nix client and nginx; .ci/run installs nix-bin and nginx"
)]
fn a_small_upstream_nar_is_fetched_once_its_narinfo_is_served() {
    let env = NixEnv::new();
    let small = random_path(&env, "prefetched", 1);
    let large = random_path(&env, "not-prefetched", 3);
    let (sk, u) = env.nix_keypair("upstream-u-1");
    let www = env.path().join("www");
    for path in [&small, &large] {
        copy_to_file_cache(&env, &www.join("plain"), "xz", &sk, path);
    }
    let nginx = Nginx::start(&www, &env.path().join("nginx"));
    let nar_gets = |path: &str| nar_gets(&nginx, &www, path);
    let dir = env.path().join("p");
    write_config(
        &dir,
        &upstream_config(&nginx.url("plain"), &u, "upstream_prefetch_max = \"2M\""),
    );
    let gw = Gateway::start(&dir, &[]);

    // The narinfo alone brings the small NAR here, verified and imported.
    let info = narinfo(&gw, &small);
    eventually("the prefetch", || gw.metric("upstream_nar_prefetched") == 1);
    assert_eq!(nar_gets(&small), 1);
    // Nix's NAR request is then served from here: the upstream is not asked again.
    let (status, body) = gw.get(&format!("/{}", info.url));
    assert_eq!((status, body.len() as u64), (200, info.nar_size));
    assert_eq!(
        NarHash::digest(&body),
        info.nar_hash,
        "the prefetched bytes are the NAR"
    );
    assert_eq!(nar_gets(&small), 1, "fetched once");
    assert_eq!(gw.metric("upstream_nar_fetched"), 1);

    // A NAR above upstream_prefetch_max waits for Nix to ask for it.
    let info = narinfo(&gw, &large);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(nar_gets(&large), 0, "a large NAR is not prefetched");
    let (status, body) = gw.get(&format!("/{}", info.url));
    assert_eq!((status, body.len() as u64), (200, info.nar_size));
    assert_eq!(nar_gets(&large), 1);
    assert_eq!(gw.metric("upstream_nar_prefetched"), 1);
    drop(gw);

    // `upstream_prefetch_max = "0"` turns it off.
    let dir = env.path().join("off");
    write_config(
        &dir,
        &upstream_config(&nginx.url("plain"), &u, "upstream_prefetch_max = \"0\""),
    );
    let gw = Gateway::start(&dir, &[]);
    let before = nar_gets(&small);
    narinfo(&gw, &small);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(nar_gets(&small), before, "no prefetch when turned off");
    assert_eq!(gw.metric("upstream_nar_prefetched"), 0);
}

#[test]
#[cfg_attr(
    any(missing_nix, missing_nginx),
    ignore = "needs the real Nix client and nginx; .ci/run installs nix-bin and nginx"
)]
fn the_references_of_a_served_narinfo_are_looked_up_ahead_of_nix() {
    let env = NixEnv::new();
    let top = env.build("shared.nix", SHARED);
    let dep = env
        .closure(&top)
        .into_iter()
        .find(|p| *p != top)
        .expect("the closure has a dependency");
    let (sk, u) = env.nix_keypair("upstream-u-1");
    let www = env.path().join("www");
    copy_to_file_cache(&env, &www.join("plain"), "xz", &sk, &top);
    let nginx = Nginx::start(&www, &env.path().join("nginx"));
    let narinfo_gets = |path: &str| {
        nginx
            .access_log()
            .matches(&format!("GET /plain/{}.narinfo", hash_part(path)))
            .count()
    };
    let dir = env.path().join("p");
    // Large enough for the 8 MiB dependency's NAR: what holds it back is
    // that Nix has not asked for its narinfo.
    write_config(
        &dir,
        &upstream_config(&nginx.url("plain"), &u, "upstream_prefetch_max = \"16M\""),
    );
    let gw = Gateway::start(&dir, &[]);

    narinfo(&gw, &top);
    eventually("the lookup ahead", || {
        gw.metric("narinfo_looked_ahead") == 1
    });
    assert_eq!(narinfo_gets(&dep), 1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        nar_gets(&nginx, &www, &dep),
        0,
        "a reference's NAR waits until Nix asks for its narinfo"
    );

    // Nix's request is answered from what was looked up, signed by U.
    let info = narinfo(&gw, &dep);
    assert!(info.verify(&PublicKey::parse(&u).unwrap()));
    assert_eq!(narinfo_gets(&dep), 1, "the upstream was not asked again");
    assert_eq!(gw.metric("upstream_narinfo_served"), 2);
    // Now that Nix asked, its NAR is fetched ahead.
    eventually("the dependency's prefetch", || {
        gw.metric("upstream_nar_prefetched") == 2
    });
    assert_eq!(nar_gets(&nginx, &www, &dep), 1);
}

/// Waits until `gw` is connected to every peer in `peer_ids`.
fn wait_connected(gw: &Gateway, peer_ids: &[&str]) {
    eventually("peer connections", || {
        let out = run_ok_str(gw.cli().arg("peers"));
        peer_ids.iter().all(|id| out.contains(id))
    });
}

#[test]
#[cfg_attr(
    any(missing_nix, missing_nginx),
    ignore = "needs the real Nix client and nginx; .ci/run installs nix-bin and nginx"
)]
fn peers_share_what_an_unreachable_upstream_served_and_liars_change_nothing() {
    let env = NixEnv::new();
    let top = env.build("shared.nix", SHARED);
    let closure = env.closure(&top);
    let (sk, u) = env.nix_keypair("upstream-u-1");
    // A liar's key under U's name: its narinfos name U but do not verify.
    let liar_dir = env.path().join("liar-key");
    fs::create_dir_all(&liar_dir).unwrap();
    let liar_sk = liar_dir.join("sk");
    let liar_pk = liar_dir.join("pk");
    run_ok(
        env.cmd("nix-store")
            .args(["--generate-binary-cache-key", "upstream-u-1"])
            .arg(&liar_sk)
            .arg(&liar_pk),
    );
    let liar_key = fs::read_to_string(&liar_pk).unwrap().trim().to_owned();
    let www = env.path().join("www");
    copy_to_file_cache(&env, &www.join("zstd"), "zstd", &sk, &top);
    copy_to_file_cache(&env, &www.join("liar"), "zstd", &liar_sk, &top);
    let mut nginx = Nginx::start(&www, &env.path().join("nginx"));

    // A fetches the closure from the upstream and seeds it; L (trusting the
    // liar's key) does the same from the liar's cache.
    let a_dir = env.path().join("a");
    write_config(
        &a_dir,
        &upstream_config(&nginx.url("zstd"), &u, "seed_fetched = true"),
    );
    let a = Gateway::start(&a_dir, &[]);
    let out = substitute(&env, &a.url, &u, &env.empty_store("via-a"), &top);
    assert_ok(&out, "nix copy through A", &a);
    let l_dir = env.path().join("l");
    write_config(
        &l_dir,
        &upstream_config(&nginx.url("liar"), &liar_key, "seed_fetched = true"),
    );
    let l = Gateway::start(&l_dir, &[]);
    let out = substitute(&env, &l.url, &liar_key, &env.empty_store("via-l"), &top);
    assert_ok(&out, "nix copy through L", &l);
    let upstream_url = nginx.url("zstd");

    // P and Q reach the upstream and peer A. P (peers preferred, the
    // default) gets the NARs from A; Q (`prefer_peers = false`) from the
    // upstream.
    let (a_peer, _, _) = a.id();
    let nar_requests = |nginx: &Nginx| nginx.access_log().matches("GET /zstd/nar/").count();
    let before = nar_requests(&nginx);
    let p_dir = env.path().join("p");
    write_config(
        &p_dir,
        &upstream_config(
            &upstream_url,
            &u,
            &format!("peers = [\"{}\"]", a.multiaddr()),
        ),
    );
    let p = Gateway::start(&p_dir, &[]);
    wait_connected(&p, &[&a_peer]);
    let out = substitute(&env, &p.url, &u, &env.empty_store("via-p"), &top);
    assert_ok(&out, "nix copy through P, peers preferred", &p);
    assert_eq!(
        nar_requests(&nginx),
        before,
        "P asked the upstream for NARs"
    );
    assert_eq!(p.metric("upstream_bytes"), 0);
    assert!(p.metric("peer_bytes") > 0);
    assert_eq!(
        p.metric("peer_nar_prefetched"),
        1,
        "without seed_fetched the small top NAR is held in memory ahead of Nix's request"
    );
    assert_eq!(p.metric("seeded_fetched"), 0, "P seeds nothing");
    let q_dir = env.path().join("q");
    write_config(
        &q_dir,
        &upstream_config(
            &upstream_url,
            &u,
            &format!("prefer_peers = false\npeers = [\"{}\"]", a.multiaddr()),
        ),
    );
    let q = Gateway::start(&q_dir, &[]);
    wait_connected(&q, &[&a_peer]);
    let out = substitute(&env, &q.url, &u, &env.empty_store("via-q"), &top);
    assert_ok(&out, "nix copy through Q, upstream preferred", &q);
    assert!(nar_requests(&nginx) > before, "Q asked the upstream");
    assert!(q.metric("upstream_bytes") > 0);
    assert_eq!(q.metric("peer_bytes"), 0);
    nginx.stop();

    // B: the same upstream entry, now unreachable, and static peers L and A.
    let (l_peer, _, _) = l.id();
    let b_dir = env.path().join("b");
    write_config(
        &b_dir,
        &upstream_config(
            &upstream_url,
            &u,
            &format!(
                "seed_fetched = true\npeers = [\"{}\", \"{}\"]",
                l.multiaddr(),
                a.multiaddr()
            ),
        ),
    );
    let b = Gateway::start(&b_dir, &[]);
    wait_connected(&b, &[&a_peer, &l_peer]);
    let store = env.empty_store("via-b");
    let out = substitute(&env, &b.url, &u, &store, &top);
    assert_ok(&out, "nix copy through B from peers", &b);
    for path in &closure {
        run_ok(
            env.cmd("nix-store")
                .args(["--store", &store, "--verify-path", path]),
        );
    }
    let info = narinfo(&b, &top);
    assert!(info.verify(&PublicKey::parse(&u).unwrap()), "U's signature");
    assert!(!info.verify(&PublicKey::parse(&liar_key).unwrap()));
    assert_eq!(
        b.metric("upstream_bytes"),
        0,
        "nothing came from the upstream"
    );
    let dep_size = narinfo(
        &b,
        closure.iter().find(|p| p.ends_with("-shared-dep")).unwrap(),
    )
    .nar_size;
    assert!(
        b.metric("peer_bytes") >= dep_size,
        "the bytes came from peers: {}",
        b.metric("peer_bytes")
    );
    assert!(b.metric("peer_narinfo_served") >= 2);
    assert_eq!(
        b.metric("peer_nar_prefetched"),
        1,
        "the small top NAR came from peers ahead of Nix's request (the 8 MiB one is over the limit)"
    );
    assert!(
        b.metric("peer_answers_refused") >= 2,
        "L's answers were refused"
    );
    assert_eq!(b.metric("nar_hash_mismatch"), 0);
    eventually("B seeds what it fetched", || {
        b.metric("seeded_fetched") == 2
    });

    // C: only the liar as a peer: nothing is served.
    let c_dir = env.path().join("c");
    write_config(
        &c_dir,
        &upstream_config(
            &upstream_url,
            &u,
            &format!("peers = [\"{}\"]", l.multiaddr()),
        ),
    );
    let c = Gateway::start(&c_dir, &[]);
    wait_connected(&c, &[&l_peer]);
    let (status, _) = c.get(&format!("/{}.narinfo", hash_part(&top)));
    assert_eq!(status, 404);
    assert!(c.metric("peer_answers_refused") >= 1);
    let out = substitute(&env, &c.url, &u, &env.empty_store("via-c"), &top);
    assert!(!out.status.success(), "the liar's paths were accepted");
}

#[test]
#[cfg_attr(
    any(missing_nix, missing_nginx),
    ignore = "needs the real Nix client and nginx; .ci/run installs nix-bin and nginx"
)]
fn a_peer_naming_a_cid_of_other_bytes_changes_nothing() {
    use gateway::store::ipfs::{Node, NodeConfig};
    use gateway::trust::upstream::PeerAnswer;

    let env = NixEnv::new();
    let top = env.build("small.nix", SMALL);
    let (sk, u) = env.nix_keypair("upstream-u-1");
    let www = env.path().join("www");
    copy_to_file_cache(&env, &www.join("plain"), "none", &sk, &top);
    let mut nginx = Nginx::start(&www, &env.path().join("nginx"));
    let a_dir = env.path().join("a");
    write_config(
        &a_dir,
        &upstream_config(&nginx.url("plain"), &u, "seed_fetched = true"),
    );
    let a = Gateway::start(&a_dir, &[]);
    let out = substitute(&env, &a.url, &u, &env.empty_store("via-a"), &top);
    assert_ok(&out, "nix copy through A", &a);
    let upstream_url = nginx.url("plain");
    nginx.stop();

    // The liar: a node speaking the protocol that copies U's genuine
    // narinfo of `top` (signatures are public) and names a CID of other
    // bytes of the same size, which it serves over bitswap.
    let genuine =
        fs::read_to_string(www.join(format!("plain/{}.narinfo", hash_part(&top)))).unwrap();
    let nar_size = NarInfo::parse(&genuine).unwrap().nar_size;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let liar_dir = env.path().join("liar");
    let liar = rt.block_on(async {
        let node = Node::start(NodeConfig::new(&liar_dir)).await.unwrap();
        let bogus: Vec<u8> = (0..nar_size).map(|i| (i % 251) as u8).collect();
        let pin = node.add_and_pin(&bogus[..]).await.unwrap();
        let answer = serde_json::to_vec(&PeerAnswer {
            narinfo: genuine.clone(),
            cid: pin.cid.to_string(),
        })
        .unwrap();
        node.serve_exchange(std::sync::Arc::new(move |_request: String| {
            let answer = answer.clone();
            Box::pin(async move { Some(answer) })
        }));
        node
    });
    let liar_addr = liar.listen_addrs()[0].to_string();
    let liar_peer = liar.peer_id().to_string();

    // B1 hears only the liar: the narinfo is genuine, so it is served, but
    // the bytes are refused, nothing is pinned, and Nix gets nothing.
    let gw = |name: &str, peers: &[&str]| {
        let dir = env.path().join(name);
        let list: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
        write_config(
            &dir,
            &upstream_config(
                &upstream_url,
                &u,
                &format!("seed_fetched = true\npeers = [{}]", list.join(", ")),
            ),
        );
        Gateway::start(&dir, &[])
    };
    let b1 = gw("b1", &[&liar_addr]);
    wait_connected(&b1, &[&liar_peer]);
    let info = narinfo(&b1, &top);
    assert!(info.verify(&PublicKey::parse(&u).unwrap()));
    let (status, received, clean) = get_raw(&format!("{}/{}", b1.url, info.url));
    assert!(
        status != 200 || !clean || (received as u64) < nar_size,
        "the liar's bytes were served whole ({status}, {received})"
    );
    assert!(b1.metric("nar_hash_mismatch") >= 1);
    assert!(pins(&b1).is_empty(), "{:?}", pins(&b1));
    let out = substitute(&env, &b1.url, &u, &env.empty_store("via-b1"), &top);
    assert!(!out.status.success(), "the liar's bytes were accepted");

    // B2 hears the liar and A: whatever the order, Nix gets the real bytes.
    let (a_peer, _, _) = a.id();
    let b2 = gw("b2", &[&liar_addr, &a.multiaddr()]);
    wait_connected(&b2, &[&liar_peer, &a_peer]);
    let store = env.empty_store("via-b2");
    let out = substitute(&env, &b2.url, &u, &store, &top);
    assert_ok(&out, "nix copy through B2", &b2);
    run_ok(
        env.cmd("nix-store")
            .args(["--store", &store, "--verify-path", &top]),
    );
    let dump = run_ok(env.cmd("nix-store").args(["--dump", &top]));
    let (status, body) = b2.get(&format!("/{}", narinfo(&b2, &top).url));
    assert_eq!(status, 200);
    assert!(body == dump, "B2 serves the real NAR");
    rt.block_on(liar.shutdown());
}
