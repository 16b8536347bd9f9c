//! HTTP limits against a running gateway: a slowloris client (half a
//! request header, then silence) is disconnected after the header read
//! timeout and counted, while normal requests on other connections are
//! answered meanwhile; idle keep-alive connections (HTTP/1 after a
//! request, HTTP/2 with no stream) filling every connection slot are closed
//! after the idle timeout, so a new client gets in; a client that stops
//! reading a NAR is disconnected after the send timeout.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anchor_registry::{NarInfo, StorePath};
use e2e::gateway::Gateway;
use e2e::nix::NixEnv;
use e2e::{nixpfs, run_ok};

#[test]
fn a_client_that_never_finishes_its_header_is_cut_off_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&dir.path().join("gw"), &[]);
    let addr = gw.url.trim_start_matches("http://").to_owned();

    let mut slow: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: slow\r\nX-Half: ")
                .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s
        })
        .collect();
    let t0 = Instant::now();

    // Meanwhile, everyone else is served.
    for _ in 0..5 {
        let (status, body) = gw.get("/nix-cache-info");
        assert_eq!(status, 200);
        assert!(String::from_utf8_lossy(&body).contains("StoreDir"));
        std::thread::sleep(Duration::from_millis(200));
    }

    for s in &mut slow {
        let mut buf = [0u8; 512];
        // Closed by the server: EOF, a reset, or at most a short error reply.
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(8) && waited < Duration::from_secs(20),
        "slow clients cut after {waited:?}"
    );
    assert_eq!(gw.metric("http_header_timeouts"), 20, "{}", gw.log_text());
    let (status, _) = gw.get("/nix-cache-info");
    assert_eq!(status, 200, "still serving");
}

/// Sends one keep-alive HTTP/1.1 GET on `s` and reads its whole response
/// (it has a `Content-Length`), leaving the connection open.
fn get_keep_alive(s: &mut TcpStream, path: &str) -> String {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: idle\r\n\r\n").as_bytes())
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).expect("read a response");
        assert!(n > 0, "closed before the response ended");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|v| v.trim().parse().ok())
                .expect("a Content-Length");
            if body.len() >= length {
                return text;
            }
        }
    }
}

/// Reads `s` until the server closes it (EOF or a reset): the bytes read.
fn read_until_closed(s: &mut TcpStream) -> u64 {
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n as u64,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("still open after {total} bytes: {e}")
            }
            Err(_) => return total,
        }
    }
}

#[test]
fn idle_keep_alive_connections_in_every_slot_are_closed_and_a_new_client_gets_in() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gw");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("config.toml"),
        "http_max_connections = 4\nhttp_idle_timeout_secs = 2\n",
    )
    .unwrap();
    let gw = Gateway::start(&data, &[]);
    let addr = gw.url.trim_start_matches("http://").to_owned();
    // Let the start-up probes' connections go.
    std::thread::sleep(Duration::from_millis(300));

    // Two HTTP/1.1 clients after one request each (keep-alive), two
    // HTTP/2 clients with no stream (preface and SETTINGS only): all four
    // slots held by connections doing nothing.
    let mut idle: Vec<TcpStream> = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(&addr).unwrap();
        assert!(get_keep_alive(&mut s, "/nix-cache-info").contains("StoreDir"));
        idle.push(s);
    }
    for _ in 0..2 {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .unwrap();
        idle.push(s);
    }
    let t0 = Instant::now();

    // A new client waits in the backlog until the idle ones are closed.
    let mut fresh = TcpStream::connect(&addr).unwrap();
    fresh
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let answer = get_keep_alive(&mut fresh, "/nix-cache-info");
    let waited = t0.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(6),
        "the new client was served after {waited:?} (idle timeout 2 s)"
    );
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        read_until_closed(s);
    }
    drop(fresh);
    let closed = gw.metric("http_idle_timeouts");
    assert!(closed >= 4, "{closed} idle closed:\n{}", gw.log_text());
    assert_eq!(
        gw.metric("http_header_timeouts"),
        0,
        "idle is not a slow header"
    );
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn a_client_that_stops_reading_a_nar_is_cut_after_the_send_timeout() {
    const NAR_MIB: u64 = 32;
    let env = NixEnv::new();
    let path = env.build(
        "big.nix",
        &format!(
            r#"{{ nonce }}: builtins.derivation {{
  name = "http-send-timeout"; system = builtins.currentSystem; builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  args = [ "-c" "echo ${{nonce}} > /dev/null; head -c {bytes} /dev/urandom > $out" ];
}}"#,
            bytes = NAR_MIB << 20
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("gw");
    run_ok(nixpfs().arg("--data-dir").arg(&data).args(["pin", &path]));
    std::fs::write(data.join("config.toml"), "http_send_timeout_secs = 2\n").unwrap();
    let gw = Gateway::start(&data, &[]);
    let hash = StorePath::parse(&path).unwrap().hash().to_string();
    let (status, body) = gw.get(&format!("/{hash}.narinfo"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let info = NarInfo::parse(&String::from_utf8_lossy(&body)).expect("a narinfo");
    // (A pinned store path answers HEAD with GET's headers.)
    assert_eq!(
        gw.assert_head_is_get(&format!("/{}", info.url)),
        info.nar_size
    );

    // Asks for the NAR and reads nothing.
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let mut stalled = TcpStream::connect(&addr).unwrap();
    stalled
        .write_all(format!("GET /{} HTTP/1.1\r\nHost: stalled\r\n\r\n", info.url).as_bytes())
        .unwrap();
    let t0 = Instant::now();

    // Meanwhile another client gets the whole NAR.
    let (status, nar) = gw.get(&format!("/{}", info.url));
    assert_eq!(status, 200);
    assert_eq!(nar.len() as u64, info.nar_size, "the other client's NAR");
    let left = Duration::from_secs(5).saturating_sub(t0.elapsed());
    std::thread::sleep(left);
    assert_eq!(gw.metric("http_send_timeouts"), 1, "{}", gw.log_text());

    // What the kernel buffered, then the end: never the whole NAR.
    stalled
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let read = read_until_closed(&mut stalled);
    assert!(
        read < info.nar_size,
        "the stalled client got {read} of {} bytes: not cut",
        info.nar_size
    );
    println!(
        "a client reading nothing was cut after {} of {} MiB sent",
        read >> 20,
        info.nar_size >> 20
    );
    assert_eq!(gw.get("/health").0, 200, "still serving");
}
