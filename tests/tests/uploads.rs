//! Uploads as a user makes them: stock `nix copy --to` the gateway with a
//! token in a netrc file (none, xz and zstd compression), a fresh store
//! substituting the closure back, and every broken or unauthorised upload
//! refused with a 4xx while `nixpfs pins` stays as it was.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Output;

use anchor_registry::{NarHash, NarInfo, StorePath};
use e2e::gateway::Gateway;
use e2e::nix::{NixEnv, FIXTURE_CLOSURE};
use e2e::{run_ok, run_ok_str};

const TOKEN: &str = "e2e-upload-token-0123456789";

/// A gateway accepting uploads with [`TOKEN`], and a netrc file holding it.
fn gateway(env: &NixEnv) -> (Gateway, PathBuf) {
    let token_file = env.path().join("upload.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let netrc = env.path().join("netrc");
    std::fs::write(
        &netrc,
        format!("machine 127.0.0.1 login nixpfs password {TOKEN}\n"),
    )
    .unwrap();
    let gw = Gateway::start(
        &env.path().join("gw"),
        &["--upload-token-file", token_file.to_str().unwrap()],
    );
    (gw, netrc)
}

fn nix_copy_to(env: &NixEnv, url: &str, netrc: Option<&Path>, path: &str) -> Output {
    let mut cmd = env.cmd("nix");
    cmd.args(["copy", "--to", url, path]);
    if let Some(netrc) = netrc {
        cmd.args(["--option", "netrc-file"]).arg(netrc);
    }
    cmd.output().expect("spawn nix copy")
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pins(gw: &Gateway) -> String {
    run_ok_str(gw.cli().args(["pins", "--json"]))
}

/// PUT with the token as a bearer credential (or none): (status, body).
fn put(gw: &Gateway, path: &str, token: Option<&str>, body: &[u8]) -> (u16, String) {
    let mut req = ureq::put(&format!("{}{path}", gw.url));
    if let Some(token) = token {
        req = req.set("Authorization", &format!("Bearer {token}"));
    }
    match req.send_bytes(body) {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("PUT {path}: {e}"),
    }
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn nix_copy_to_the_gateway_then_a_fresh_store_substitutes_it_back() {
    let env = NixEnv::new();
    let (gw, netrc) = gateway(&env);
    let (_, _, key) = gw.id();
    for compression in ["none", "xz", "zstd"] {
        let top = env.build(&format!("fixture-{compression}.nix"), FIXTURE_CLOSURE);
        let closure = env.closure(&top);
        assert_eq!(closure.len(), 2, "top and its dependency");
        let before = pins(&gw);
        let url = format!("{}?compression={compression}", gw.url);
        let started = std::time::Instant::now();
        assert_ok(
            &nix_copy_to(&env, &url, Some(&netrc), &top),
            &format!("nix copy --to with compression={compression}"),
        );
        // Each PUT carries `Expect: 100-continue`; a server that does not
        // answer it costs a 1 s stall per PUT (4 here).
        let took = started.elapsed();
        assert!(
            took < std::time::Duration::from_secs(4),
            "nix copy --to took {took:?}"
        );
        let after = pins(&gw);
        for path in &closure {
            assert!(
                after.contains(path.as_str()) && !before.contains(path.as_str()),
                "{path} pinned by the upload: {after}"
            );
        }

        // Served as our own: uncompressed, URL by NarHash, signed by the gateway.
        let hash = StorePath::parse(&top).unwrap().hash().to_string();
        let (status, body) = gw.get(&format!("/{hash}.narinfo"));
        assert_eq!(status, 200);
        let info = NarInfo::parse(&String::from_utf8(body).unwrap()).unwrap();
        assert_eq!(info.compression.as_deref(), Some("none"));
        assert_eq!(info.url, format!("nar/{}.nar", info.nar_hash.to_nix32()));
        // HEAD of the NAR (the upload existence check, answered from the
        // pin without walking the DAG) says it is here, with GET's
        // headers and no body.
        assert_eq!(
            gw.assert_head_is_get(&format!("/{}", info.url)),
            info.nar_size
        );

        let store = env.empty_store(&format!("substituted-{compression}"));
        let out = env
            .cmd("nix")
            .args(["copy", "--from", &gw.url, "--to", &store])
            .args(["--option", "trusted-public-keys", &key, &top])
            .output()
            .expect("spawn nix copy --from");
        assert_ok(&out, "nix copy --from the gateway");
        run_ok(
            env.cmd("nix-store")
                .args(["--store", &store, "--verify-path", &top]),
        );
        let got = run_ok_str(env.cmd("nix-store").args(["--store", &store, "-qR", &top]));
        assert_eq!(got.lines().count(), 2, "{got}");
    }
    assert_eq!(gw.metric("uploads_accepted"), 6);
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn unauthorised_and_broken_uploads_are_refused_and_leave_no_pin() {
    let env = NixEnv::new();
    let (gw, _netrc) = gateway(&env);
    let top = env.build("fixture.nix", FIXTURE_CLOSURE);
    let before = pins(&gw);

    // No token: Nix fails, the gateway says 401 and asks for basic auth.
    let out = nix_copy_to(&env, &format!("{}?compression=none", gw.url), None, &top);
    assert!(!out.status.success(), "nix copy without a token succeeded");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nar = run_ok(env.cmd("nix-store").args(["--dump", &top]));
    let nar_hash = NarHash::digest(&nar);
    let nar_url = format!("/nar/{}.nar", nar_hash.to_nix32());
    // Refused before the body is read: a client that sends no `Expect:
    // 100-continue` (ureq) reads the answer only if its body fit in the
    // socket buffers, so these probes send a small one. Nix (curl) waits.
    let probe = &nar[..1024];
    let resp = match ureq::put(&format!("{}{nar_url}", gw.url)).send_bytes(probe) {
        Err(ureq::Error::Status(_, r)) => r,
        other => panic!("PUT without a token: {other:?}"),
    };
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.header("WWW-Authenticate"),
        Some("Basic realm=\"nixpfs uploads\"")
    );
    assert_eq!(put(&gw, &nar_url, Some("wrong"), probe).0, 401);
    assert_eq!(pins(&gw), before);

    // The narinfo as Nix would write it, for this NAR.
    let json = env.path_info(&top);
    let hash = StorePath::parse(&top).unwrap().hash().to_string();
    let refs: Vec<String> = json["references"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_str()
                .unwrap()
                .trim_start_matches("/nix/store/")
                .to_owned()
        })
        .collect();
    let narinfo = |url: &str, nar_hash: &NarHash| {
        format!(
            "StorePath: {top}\nURL: {url}\nCompression: none\nNarHash: {nar_hash}\nNarSize: {}\nReferences: {}\n",
            nar.len(),
            refs.join(" ")
        )
    };
    let narinfo_path = format!("/{hash}.narinfo");

    // A narinfo whose NAR never arrived.
    let (status, body) = put(
        &gw,
        &narinfo_path,
        Some(TOKEN),
        narinfo(&nar_url[1..], &nar_hash).as_bytes(),
    );
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("never uploaded"), "{body}");

    // A truncated NAR (the body is complete, the archive is not).
    let (status, body) = put(&gw, &nar_url, Some(TOKEN), &nar[..nar.len() / 2]);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a valid NAR"), "{body}");

    // A body that breaks off before its Content-Length.
    let mut conn = TcpStream::connect(gw.url.trim_start_matches("http://")).unwrap();
    write!(
        conn,
        "PUT {nar_url} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n",
        nar.len()
    )
    .unwrap();
    conn.write_all(&nar[..nar.len() / 3]).unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    let _ = conn.read_to_string(&mut reply);
    assert!(
        reply.starts_with("HTTP/1.1 400") && reply.contains("broke off"),
        "broken-off upload answered: {reply}"
    );
    let (status, body) = put(
        &gw,
        &narinfo_path,
        Some(TOKEN),
        narinfo(&nar_url[1..], &nar_hash).as_bytes(),
    );
    assert_eq!(status, 409, "after broken uploads: {body}");

    // The whole NAR, then a narinfo with a wrong NarHash.
    let (status, body) = put(&gw, &nar_url, Some(TOKEN), &nar);
    assert_eq!(status, 200, "{body}");
    let wrong = NarHash::digest(b"not this NAR");
    let (status, body) = put(
        &gw,
        &narinfo_path,
        Some(TOKEN),
        narinfo(&nar_url[1..], &wrong).as_bytes(),
    );
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("NarHash mismatch"), "{body}");

    assert_eq!(pins(&gw), before, "nothing pinned by refused uploads");
    assert_eq!(gw.get(&narinfo_path).0, 404, "nothing served");
    assert!(gw.metric("auth_failures") >= 3);
    assert_eq!(gw.metric("uploads_accepted"), 0);
}
