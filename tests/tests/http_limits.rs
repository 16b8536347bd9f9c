//! HTTP limits against a running gateway: a slowloris client (half a
//! request header, then silence) is disconnected after the header read
//! timeout and counted, while normal requests on other connections are
//! answered meanwhile.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use e2e::gateway::Gateway;

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
