//! The gateway's HTTP routers driven in process (as harmonia tests its
//! binary cache): each request goes through the real axum routers, wired as
//! `nixpfs serve` wires them, over a real embedded IPFS node on loopback.
//! Client mistakes must be the 4xx the handlers name, never a 5xx; each
//! group has a positive control so a router that refuses everything fails.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anchor_registry::{NarHash, NarInfo, Policy, SecretKey, StorePath};
use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use base64::Engine;
use bytes::Bytes;
use futures::future::BoxFuture;
use gateway::http::admin::{self, AdminError, AdminRequest, AdminService};
use gateway::http::cache::{self, AppState};
use gateway::http::trustless;
use gateway::http::upload::{self, Uploads};
use gateway::store::index::{Index, LocalPath};
use gateway::store::ipfs::{Cid, Node, NodeConfig};
use gateway::trust::catalog::{Catalog, Trust};
use gateway::util::metrics::Metrics;
use serde_json::{json, Value};
use tower::ServiceExt;

/// The store path hash of the one path the fixture serves: the whole Nix
/// base32 alphabet, so it is valid by construction.
const OWN_HASH: &str = "0123456789abcdfghijklmnpqrsvwxyz";
/// Valid, and known to nobody.
const UNKNOWN_HASH: &str = "00000000000000000000000000000000";
const UPLOAD_TOKEN: &str = "upload-s3cret";
const ADMIN_PATH: &str = admin::PATH;

/// An admin service that only counts the requests that reached it.
#[derive(Debug, Default)]
struct CountingAdmin {
    calls: AtomicUsize,
}

impl AdminService for CountingAdmin {
    fn execute(
        &self,
        _request: AdminRequest,
        _meter: gateway::util::progress::Meter,
    ) -> BoxFuture<'_, Result<Value, AdminError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(json!({})) })
    }
}

/// A gateway with one own path pinned: its NAR's bytes, hashes and CID, and
/// each router alone plus all of them merged as `nixpfs serve` merges them.
struct Gateway {
    _dir: tempfile::TempDir,
    node: Node,
    admin_service: Arc<CountingAdmin>,
    nar: Vec<u8>,
    nar_hash: NarHash,
    cid: Cid,
    cache: Router,
    trustless: Router,
    upload: Router,
    admin: Router,
    served: Router,
}

impl Gateway {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut config = NodeConfig::new(dir.path().join("ipfs"));
        config.listen = vec!["/ip4/127.0.0.1/tcp/0"
            .parse()
            .expect("a loopback multiaddr")];
        let node = Node::start(config).await.expect("the IPFS node starts");
        let index = Arc::new(Index::open(&dir.path().join("index.redb")).expect("the index opens"));
        let catalog = Catalog::new(
            index.clone(),
            Arc::new(SecretKey::generate("gateway-test-1").expect("a fresh key")),
            Trust {
                registry: None,
                policy: Policy::new(1, None).expect("a one-anchor policy"),
            },
        );
        let metrics = Arc::new(Metrics::default());

        // A real NAR of one regular file, pinned and recorded as our own path.
        let file = dir.path().join("hello");
        std::fs::write(&file, b"hello from nixpfs\n").expect("the sample file is written");
        let mut nar = Vec::new();
        gateway::store::nar::dump(&file, &mut nar).expect("the sample NAR is dumped");
        let summary = gateway::store::nar::validate(&nar[..]).expect("the sample NAR is valid");
        let pin = node
            .add_and_pin(&nar[..])
            .await
            .expect("the sample NAR is pinned");
        let narinfo = NarInfo {
            store_path: StorePath::parse(&format!("/nix/store/{OWN_HASH}-sample"))
                .expect("a valid store path"),
            url: "nar/ignored.nar".to_owned(),
            compression: None,
            file_hash: None,
            file_size: None,
            nar_hash: summary.nar_hash,
            nar_size: summary.nar_size,
            references: Vec::new(),
            deriver: None,
            sigs: Vec::new(),
            ca: None,
        };
        catalog
            .put_locals(vec![LocalPath {
                narinfo,
                cid: pin.cid.to_string(),
            }])
            .expect("the own path is indexed");

        let upload_token_file = dir.path().join("upload.token");
        std::fs::write(&upload_token_file, format!("{UPLOAD_TOKEN}\n"))
            .expect("the upload token is written");
        let admin_service = Arc::new(CountingAdmin::default());

        // As app/serve.rs builds them.
        let state = Arc::new(AppState {
            catalog: catalog.clone(),
            index: index.clone(),
            node: node.clone(),
            metrics: metrics.clone(),
            cache_info: anchor_registry::CacheInfo {
                store_dir: anchor_registry::STORE_DIR.to_owned(),
                want_mass_query: true,
                priority: Some(40),
            }
            .to_string(),
            seed_fetched: false,
            upstreams: Arc::new(gateway::trust::upstream::Upstreams::new(
                Vec::new(),
                metrics.clone(),
            )),
            prefer_peers: true,
            prefetch: None,
            retention: None,
        });
        let uploads = Uploads::configured(
            node.clone(),
            catalog.clone(),
            metrics.clone(),
            Some(&upload_token_file),
            &[],
        )
        .expect("uploads are configured");
        let cache = cache::router(state);
        // The admin router is served on the Unix socket only, never merged.
        let admin = admin::router(admin_service.clone());
        let trustless = trustless::router(node.clone());
        let upload = upload::router(uploads);
        let served = cache
            .clone()
            .merge(trustless.clone())
            .merge(upload.clone())
            .layer(tower_http::trace::TraceLayer::new_for_http());
        Gateway {
            _dir: dir,
            node,
            admin_service,
            nar,
            nar_hash: summary.nar_hash,
            cid: pin.cid,
            cache,
            trustless,
            upload,
            admin,
            served,
        }
    }

    /// `nar/<nix32>.nar`, as the served narinfo names it.
    fn nar_uri(&self) -> String {
        format!("/nar/{}.nar", self.nar_hash.to_nix32())
    }

    /// Every router, in the order of the tables below.
    fn routers(&self) -> [(&'static str, &Router); 5] {
        [
            ("cache", &self.cache),
            ("trustless", &self.trustless),
            ("upload", &self.upload),
            ("admin", &self.admin),
            ("served", &self.served),
        ]
    }

    async fn stop(self) {
        self.node.shutdown().await;
    }
}

/// One answer, body read whole (every body here is small).
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

fn request(method: Method, uri: &str) -> axum::http::request::Builder {
    Request::builder().method(method).uri(uri)
}

fn get(uri: &str) -> Request<Body> {
    request(Method::GET, uri)
        .body(Body::empty())
        .expect("a valid request")
}

async fn send(router: &Router, request: Request<Body>) -> Reply {
    let response = router
        .clone()
        .oneshot(request)
        .await
        .expect("axum routers never fail");
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("the response body reads");
    Reply {
        status,
        headers,
        body,
    }
}

/// Asserts `want` (a 4xx unless it is a positive control) and never a 5xx.
#[track_caller]
fn expect_status(reply: &Reply, want: u16, what: &str) {
    assert!(
        !reply.status.is_server_error(),
        "{what}: a client mistake answered {} ({})",
        reply.status,
        reply.text().trim()
    );
    assert_eq!(
        reply.status.as_u16(),
        want,
        "{what}: body {:?}",
        reply.text().trim()
    );
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn basic(login: &str, password: &str) -> String {
    let pair = base64::engine::general_purpose::STANDARD.encode(format!("{login}:{password}"));
    format!("Basic {pair}")
}

/// (method, path, status from: cache, trustless, upload, admin, served).
/// PUTs carry the upload token, so that a refusal comes from parsing the
/// path, not from a missing credential (the admin router has none: its
/// socket's permissions are its authorisation).
#[rustfmt::skip]
const TRAVERSALS: &[(&str, &str, [u16; 5])] = &[
    ("GET",  "/../etc/passwd",                  [404, 404, 404, 404, 404]),
    ("GET",  "/%2e%2e/%2e%2e/etc/passwd",       [404, 404, 404, 404, 404]),
    ("GET",  "/nar/..%2f..%2fetc%2fpasswd.nar", [400, 404, 405, 404, 400]),
    ("GET",  "/nar/%2e%2e",                     [404, 404, 405, 404, 404]),
    ("GET",  "/..%2f..%2fetc%2fpasswd",         [404, 404, 405, 404, 404]),
    ("GET",  "/..%2f..%2fetc%2fpasswd.narinfo", [400, 404, 405, 404, 400]),
    ("GET",  "/ipfs/%2e%2e",                    [404, 400, 404, 404, 400]),
    ("GET",  "/ipfs/%2e%2e%2fx",                [404, 400, 404, 404, 400]),
    ("HEAD", "/nar/..%2f..%2fetc%2fpasswd.nar", [400, 404, 404, 404, 404]),
    ("PUT",  "/../etc/passwd",                  [404, 404, 404, 404, 404]),
    ("PUT",  "/nar/..%2f..%2fetc%2fpasswd.nar", [405, 404, 415, 404, 415]),
    ("PUT",  "/..%2f..%2fetc%2fpasswd.narinfo", [405, 404, 400, 404, 400]),
    ("PUT",  "/%2e%2e/%2e%2e/etc/passwd",       [404, 404, 404, 404, 404]),
    ("POST", "/../api/v1/admin",                [404, 404, 404, 404, 404]),
    ("POST", "/api/v1/../v1/admin",             [404, 404, 404, 404, 404]),
    ("POST", "/api/v1/%2e%2e/v1/admin",         [404, 404, 404, 404, 404]),
];

#[tokio::test]
async fn traversal_attempts_are_4xx_on_every_router() {
    let gw = Gateway::start().await;
    for (method, path, statuses) in TRAVERSALS {
        for ((name, router), want) in gw.routers().into_iter().zip(statuses) {
            let mut req = request(method.parse().expect("a method"), path);
            if *method == "PUT" {
                req = req.header(header::AUTHORIZATION, bearer(UPLOAD_TOKEN));
            }
            let reply = send(router, req.body(Body::empty()).expect("a valid request")).await;
            expect_status(
                &reply,
                *want,
                &format!("{method} {path} on the {name} router"),
            );
            assert!(
                !reply.text().contains("root:"),
                "{method} {path} on {name} leaked a file"
            );
        }
    }
    assert_eq!(
        gw.admin_service.calls.load(Ordering::SeqCst),
        0,
        "no traversal reached the admin service"
    );

    // Control: the same routers do serve what exists.
    let control = send(&gw.served, get(&gw.nar_uri())).await;
    expect_status(&control, 200, "GET of the pinned NAR");
    assert_eq!(control.body, gw.nar);
    let control = send(&gw.trustless, get("/ipfs/bafkqaaa")).await;
    expect_status(&control, 200, "the trustless probe");
    gw.stop().await;
}

/// A CID followed by a path under it: `..` as the CID is the client's
/// mistake (not a CID at all), and must be refused as such.
#[tokio::test]
async fn traversal_past_the_cid_is_a_bad_cid() {
    let gw = Gateway::start().await;
    for path in ["/ipfs/../x", "/ipfs/not-a-cid/x", "/ipfs/%2e%2e/etc/passwd"] {
        for (name, router) in [("trustless", &gw.trustless), ("served", &gw.served)] {
            let reply = send(router, get(path)).await;
            expect_status(&reply, 400, &format!("GET {path} on the {name} router"));
        }
    }
    gw.stop().await;
}

#[tokio::test]
async fn bad_narinfo_and_nar_names_are_4xx_and_unknown_ones_404() {
    let gw = Gateway::start().await;
    let nix32 = gw.nar_hash.to_nix32();
    let unknown_nar = NarHash::digest(b"no such NAR").to_nix32();
    let cases: Vec<(String, u16)> = vec![
        // Hash parts: exactly 32 characters of Nix base32.
        ("/0123456789abcdfghijklmnpqrsvwxy.narinfo".into(), 400),
        (format!("/{OWN_HASH}0.narinfo"), 400),
        ("/.narinfo".into(), 400),
        ("/e123456789abcdfghijklmnpqrsvwxyz.narinfo".into(), 400),
        ("/o123456789abcdfghijklmnpqrsvwxyz.narinfo".into(), 400),
        ("/u123456789abcdfghijklmnpqrsvwxyz.narinfo".into(), 400),
        ("/t123456789abcdfghijklmnpqrsvwxyz.narinfo".into(), 400),
        ("/0123456789ABCDFGHIJKLMNPQRSVWXYZ.narinfo".into(), 400),
        ("/%C3%A9123456789abcdfghijklmnpqrsvwxy.narinfo".into(), 400),
        ("/%ff.narinfo".into(), 400),
        (format!("/{OWN_HASH}"), 404),
        (format!("/{OWN_HASH}.narinfo.xz"), 404),
        (format!("/{UNKNOWN_HASH}.narinfo"), 404),
        // NAR names: <52 characters of Nix base32>.nar.
        ("/nar/xyz.nar".into(), 400),
        ("/nar/.nar".into(), 400),
        (format!("/nar/{}.nar", gw.nar_hash.to_hex()), 400),
        (format!("/nar/{}.nar", nix32.to_uppercase()), 400),
        (format!("/nar/e{}.nar", &nix32[1..]), 400),
        (format!("/nar/{}.nar", "z".repeat(52)), 400),
        (format!("/nar/{nix32}.nar.xz"), 404),
        (format!("/nar/{nix32}.nar.zst"), 404),
        (format!("/nar/{nix32}"), 404),
        (format!("/nar/{unknown_nar}.nar"), 404),
    ];
    for (uri, want) in &cases {
        for (name, router) in [("cache", &gw.cache), ("served", &gw.served)] {
            let reply = send(router, get(uri)).await;
            expect_status(&reply, *want, &format!("GET {uri} on the {name} router"));
        }
    }

    // Controls: our own path's narinfo, pointing at the NAR we serve.
    let info = send(&gw.served, get(&format!("/{OWN_HASH}.narinfo"))).await;
    expect_status(&info, 200, "GET of our own narinfo");
    assert_eq!(
        info.header(header::CONTENT_TYPE),
        Some("text/x-nix-narinfo")
    );
    let text = info.text();
    assert!(
        text.contains(&format!("StorePath: /nix/store/{OWN_HASH}-sample\n")),
        "{text}"
    );
    assert!(text.contains(&format!("URL: nar/{nix32}.nar\n")), "{text}");
    assert!(text.contains("Compression: none\n"), "{text}");
    let cache_info = send(&gw.served, get("/nix-cache-info")).await;
    expect_status(&cache_info, 200, "GET /nix-cache-info");
    assert!(cache_info.text().contains("StoreDir: /nix/store"));
    gw.stop().await;
}

#[tokio::test]
async fn uploads_refuse_missing_wrong_and_foreign_scheme_tokens() {
    let gw = Gateway::start().await;
    let nar_put = format!("/nar/{}.nar", gw.nar_hash.to_nix32());
    let narinfo_put = format!("/{OWN_HASH}.narinfo");
    let refused: [(&str, Option<String>); 8] = [
        ("no Authorization", None),
        ("a wrong bearer token", Some(bearer("not-the-token"))),
        ("an empty bearer token", Some("Bearer ".to_owned())),
        (
            "a wrong basic password",
            Some(basic("nix", "not-the-token")),
        ),
        ("the token as basic login", Some(basic(UPLOAD_TOKEN, ""))),
        (
            "basic auth that is not base64",
            Some("Basic !!!".to_owned()),
        ),
        (
            "the token under another scheme",
            Some(format!("Token {UPLOAD_TOKEN}")),
        ),
        ("the bare token, no scheme", Some(UPLOAD_TOKEN.to_owned())),
    ];
    for uri in ["/nix-cache-info", nar_put.as_str(), narinfo_put.as_str()] {
        for (what, auth) in &refused {
            let mut req = request(Method::PUT, uri);
            if let Some(auth) = auth {
                req = req.header(header::AUTHORIZATION, auth);
            }
            let body = Body::from(gw.nar.clone());
            let reply = send(&gw.served, req.body(body).expect("a valid request")).await;
            expect_status(&reply, 401, &format!("PUT {uri} with {what}"));
            assert_eq!(
                reply.header(header::WWW_AUTHENTICATE),
                Some("Basic realm=\"nixpfs uploads\""),
                "PUT {uri} with {what} says how to authenticate"
            );
        }
    }

    // Uploads without a configured token are disabled: 403, whatever is sent.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let index = Arc::new(Index::open(&dir.path().join("index.redb")).expect("the index opens"));
    let catalog = Catalog::new(
        index,
        Arc::new(SecretKey::generate("gateway-test-2").expect("a fresh key")),
        Trust {
            registry: None,
            policy: Policy::new(1, None).expect("a one-anchor policy"),
        },
    );
    let disabled = upload::router(
        Uploads::configured(
            gw.node.clone(),
            catalog,
            Arc::new(Metrics::default()),
            None,
            &[],
        )
        .expect("uploads are configured"),
    );
    let req = request(Method::PUT, "/nix-cache-info")
        .header(header::AUTHORIZATION, bearer(UPLOAD_TOKEN))
        .body(Body::from("StoreDir: /nix/store\n"))
        .expect("a valid request");
    expect_status(
        &send(&disabled, req).await,
        403,
        "PUT with uploads disabled",
    );

    // Controls: the configured token, as a bearer token and as Nix sends it
    // from a netrc file (basic auth, any login).
    for auth in [bearer(UPLOAD_TOKEN), basic("nix", UPLOAD_TOKEN)] {
        let req = request(Method::PUT, "/nix-cache-info")
            .header(header::AUTHORIZATION, &auth)
            .body(Body::from("StoreDir: /nix/store\n"))
            .expect("a valid request");
        expect_status(
            &send(&gw.served, req).await,
            200,
            "PUT with the right token",
        );
    }
    // And a refused narinfo PUT left our own path as it was.
    let info = send(&gw.served, get(&narinfo_put)).await;
    expect_status(&info, 200, "GET of our own narinfo after refused PUTs");
    gw.stop().await;
}

#[tokio::test]
async fn the_admin_api_is_not_on_the_tcp_router() {
    let gw = Gateway::start().await;
    let status = || Body::from(r#"{"op":"status"}"#);
    for auth in [None, Some(bearer("anything"))] {
        let mut req =
            request(Method::POST, ADMIN_PATH).header(header::CONTENT_TYPE, "application/json");
        if let Some(auth) = &auth {
            req = req.header(header::AUTHORIZATION, auth);
        }
        let reply = send(&gw.served, req.body(status()).expect("a valid request")).await;
        expect_status(
            &reply,
            404,
            &format!("POST {ADMIN_PATH} over TCP ({auth:?})"),
        );
    }
    expect_status(
        &send(&gw.served, get(ADMIN_PATH)).await,
        404,
        "GET of the admin endpoint over TCP",
    );
    assert_eq!(
        gw.admin_service.calls.load(Ordering::SeqCst),
        0,
        "nothing over TCP reached the admin service"
    );

    // The admin router itself (as the socket serves it): a body that is no
    // request is the caller's mistake, GET is no method of it, and a
    // request runs with no credential at all.
    let req = request(Method::POST, ADMIN_PATH)
        .body(Body::from(r#"{"op":"no-such-op"}"#))
        .expect("a valid request");
    expect_status(&send(&gw.admin, req).await, 400, "POST of an unknown op");
    expect_status(
        &send(&gw.admin, get(ADMIN_PATH)).await,
        405,
        "GET of the admin endpoint",
    );
    let req = request(Method::POST, ADMIN_PATH)
        .body(status())
        .expect("a valid request");
    let reply = send(&gw.admin, req).await;
    expect_status(&reply, 200, "POST of status on the admin router");
    assert_eq!(reply.body.as_ref(), b"{}");
    assert_eq!(gw.admin_service.calls.load(Ordering::SeqCst), 1);
    gw.stop().await;
}

async fn ranged(gw: &Gateway, range: &str) -> Reply {
    let req = request(Method::GET, &gw.nar_uri())
        .header(header::RANGE, range)
        .body(Body::empty())
        .expect("a valid request");
    send(&gw.served, req).await
}

#[tokio::test]
async fn nar_ranges_are_served_exactly_or_refused_with_416() {
    let gw = Gateway::start().await;
    let nar = &gw.nar;
    let size = nar.len();
    assert!(size > 8, "the sample NAR has room for ranges");

    // Control: the whole NAR, byte for byte.
    let whole = send(&gw.served, get(&gw.nar_uri())).await;
    expect_status(&whole, 200, "GET of the whole NAR");
    assert_eq!(whole.body, *nar);
    assert_eq!(
        whole.header(header::CONTENT_TYPE),
        Some("application/x-nix-nar")
    );
    assert_eq!(whole.header(header::ACCEPT_RANGES), Some("bytes"));
    assert_eq!(
        whole.header(header::CONTENT_LENGTH),
        Some(size.to_string().as_str())
    );

    // Satisfiable ranges: 206 with exactly those bytes.
    let partial: [(String, usize, usize); 5] = [
        ("bytes=0-0".into(), 0, 0),
        ("bytes=-1".into(), size - 1, size - 1),
        ("bytes=3-7".into(), 3, 7),
        (format!("bytes={}-", size - 2), size - 2, size - 1),
        ("bytes=1-99999999".into(), 1, size - 1),
    ];
    for (range, first, last) in &partial {
        let reply = ranged(&gw, range).await;
        expect_status(&reply, 206, range);
        assert_eq!(reply.body, nar[*first..=*last], "{range}");
        assert_eq!(
            reply.header(header::CONTENT_RANGE),
            Some(format!("bytes {first}-{last}/{size}").as_str()),
            "{range}"
        );
        assert_eq!(
            reply.header(header::CONTENT_LENGTH),
            Some((last - first + 1).to_string().as_str()),
            "{range}"
        );
    }

    // Unsatisfiable: 416 naming the size.
    for range in [
        format!("bytes={size}-"),
        format!("bytes={}-{}", size + 10, size + 20),
        "bytes=5-4".to_owned(),
        "bytes=-0".to_owned(),
        "bytes=x-4".to_owned(),
    ] {
        let reply = ranged(&gw, &range).await;
        expect_status(&reply, 416, &range);
        assert_eq!(
            reply.header(header::CONTENT_RANGE),
            Some(format!("bytes */{size}").as_str()),
            "{range}"
        );
    }

    // Ranges a server may ignore (RFC 9110 §14.2): the whole NAR, 200.
    for range in ["bytes=abc", "bytes=0-1,4-5", "items=0-1", "bytes=-"] {
        let reply = ranged(&gw, range).await;
        expect_status(&reply, 200, range);
        assert_eq!(reply.body, *nar, "{range}");
    }
    gw.stop().await;
}

/// One header sent beside a request, e.g. `Accept`.
type ExtraHeader = (header::HeaderName, &'static str);

#[tokio::test]
async fn trustless_gateway_refuses_bad_cids_and_formats() {
    let gw = Gateway::start().await;
    let cid = gw.cid;
    // A valid CID of bytes nobody here has.
    let absent = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy";
    let cases: Vec<(String, Option<ExtraHeader>, u16)> = vec![
        ("/ipfs/not-a-cid".into(), None, 400),
        ("/ipfs/bafy".into(), None, 400),
        ("/ipfs/Qm".into(), None, 400),
        ("/ipfs/%ff".into(), None, 400),
        ("/ipfs/bafkqaaa?format=".into(), None, 400),
        ("/ipfs/bafkqaaa?format=tar".into(), None, 400),
        ("/ipfs/bafkqaaa?format=dag-json".into(), None, 400),
        (format!("/ipfs/{cid}"), None, 400),
        (
            format!("/ipfs/{cid}"),
            Some((header::ACCEPT, "text/html")),
            400,
        ),
        (
            format!("/ipfs/{cid}"),
            Some((header::ACCEPT, "application/vnd.ipld.car; version=2")),
            406,
        ),
        (format!("/ipfs/{cid}?format=car&car-version=2"), None, 406),
        (format!("/ipfs/{cid}?format=car&dag-scope=bogus"), None, 400),
        (
            format!("/ipfs/{cid}?format=car&entity-bytes=1-2"),
            None,
            400,
        ),
        (
            format!("/ipfs/{cid}?format=car&dag-scope=all&entity-bytes=0:*"),
            None,
            400,
        ),
        (
            format!("/ipfs/{absent}?format=raw"),
            Some((header::CACHE_CONTROL, "only-if-cached")),
            412,
        ),
    ];
    for (uri, extra, want) in &cases {
        for (name, router) in [("trustless", &gw.trustless), ("served", &gw.served)] {
            let mut req = request(Method::GET, uri);
            if let Some((header_name, value)) = extra {
                req = req.header(header_name, *value);
            }
            let reply = send(router, req.body(Body::empty()).expect("a valid request")).await;
            expect_status(
                &reply,
                *want,
                &format!("GET {uri} {extra:?} on the {name} router"),
            );
        }
    }

    // Controls: the empty-identity probe, and our NAR's root block and CAR.
    let probe = send(&gw.served, get("/ipfs/bafkqaaa")).await;
    expect_status(&probe, 200, "the bafkqaaa probe");
    assert!(probe.body.is_empty());
    assert_eq!(
        probe.header(header::CONTENT_TYPE),
        Some("application/vnd.ipld.raw")
    );
    let raw = send(&gw.served, get(&format!("/ipfs/{cid}?format=raw"))).await;
    expect_status(&raw, 200, "the NAR's root block");
    assert_eq!(cid.codec(), 0x55, "a NAR this small is one raw leaf");
    assert_eq!(raw.body, gw.nar, "the raw leaf is the NAR");
    let car = send(&gw.served, get(&format!("/ipfs/{cid}?format=car"))).await;
    expect_status(&car, 200, "the NAR as a CAR");
    assert!(car
        .header(header::CONTENT_TYPE)
        .is_some_and(|t| t.starts_with("application/vnd.ipld.car")));
    assert!(
        car.body
            .windows(gw.nar.len())
            .any(|w| w == gw.nar.as_slice()),
        "the CAR carries the NAR's bytes"
    );
    gw.stop().await;
}

/// A NAR of one regular file holding `contents`.
fn nar_of(dir: &std::path::Path, contents: &[u8]) -> Vec<u8> {
    let file = dir.join("upload-sample");
    std::fs::write(&file, contents).expect("the sample file is written");
    let mut nar = Vec::new();
    gateway::store::nar::dump(&file, &mut nar).expect("the sample NAR is dumped");
    nar
}

fn narinfo_text(hash_part: &str, url: &str, nar: &[u8]) -> String {
    format!(
        "StorePath: /nix/store/{hash_part}-upload\nURL: {url}\nCompression: none\nNarHash: {}\nNarSize: {}\nReferences: \n",
        NarHash::digest(nar),
        nar.len()
    )
}

async fn put(gw: &Gateway, uri: &str, body: impl Into<Body>) -> Reply {
    let req = request(Method::PUT, uri)
        .header(header::AUTHORIZATION, bearer(UPLOAD_TOKEN))
        .body(body.into())
        .expect("a valid request");
    send(&gw.served, req).await
}

#[tokio::test]
async fn authorised_uploads_with_bad_names_or_bodies_are_4xx() {
    let gw = Gateway::start().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let nar = nar_of(dir.path(), b"uploaded by the test\n");
    let stem = NarHash::digest(&nar).to_nix32();
    let url = format!("nar/{stem}.nar");
    let mut trailing = nar.clone();
    trailing.extend_from_slice(b"junk");
    let big = "x".repeat(65 * 1024);
    let cases: Vec<(String, Vec<u8>, u16)> = vec![
        // NAR file names this gateway cannot take.
        ("/nar/xyz.nar.bz2".into(), nar.clone(), 415),
        ("/nar/XYZ.nar".into(), nar.clone(), 415),
        (format!("/nar/{}.nar", "a".repeat(129)), nar.clone(), 415),
        ("/nar/.nar".into(), nar.clone(), 415),
        ("/nar/..%2fx.nar".into(), nar.clone(), 415),
        // Bodies that are not (canonical, whole) NARs.
        ("/nar/xyz.nar".into(), Vec::new(), 400),
        ("/nar/xyz.nar".into(), b"not a NAR".to_vec(), 400),
        ("/nar/xyz.nar".into(), nar[..nar.len() - 8].to_vec(), 400),
        ("/nar/xyz.nar".into(), trailing, 400),
        ("/nar/xyz.nar.xz".into(), nar.clone(), 400),
        ("/nar/xyz.nar.zst".into(), nar.clone(), 400),
        // Narinfo names and bodies.
        ("/xyz.narinfo".into(), Vec::new(), 400),
        (
            "/0123456789ABCDFGHIJKLMNPQRSVWXYZ.narinfo".into(),
            Vec::new(),
            400,
        ),
        (format!("/{UNKNOWN_HASH}"), Vec::new(), 400),
        (
            format!("/{UNKNOWN_HASH}.narinfo"),
            b"not a narinfo".to_vec(),
            400,
        ),
        (format!("/{UNKNOWN_HASH}.narinfo"), vec![0xff, 0xfe], 400),
        (format!("/{UNKNOWN_HASH}.narinfo"), big.into_bytes(), 400),
        (
            format!("/{UNKNOWN_HASH}.narinfo"),
            narinfo_text(OWN_HASH, &url, &nar).into_bytes(),
            400,
        ),
        // A narinfo whose NAR never arrived.
        (
            format!("/{UNKNOWN_HASH}.narinfo"),
            narinfo_text(UNKNOWN_HASH, &url, &nar).into_bytes(),
            409,
        ),
    ];
    for (uri, body, want) in cases {
        let what = format!("authorised PUT {uri} ({} bytes)", body.len());
        expect_status(&put(&gw, &uri, body).await, want, &what);
    }
    let head = |uri: String| {
        request(Method::HEAD, &uri)
            .body(Body::empty())
            .expect("a valid request")
    };
    let reply = send(&gw.served, head(format!("/{url}"))).await;
    expect_status(&reply, 404, "HEAD of a NAR never uploaded");
    let info = send(&gw.served, get(&format!("/{UNKNOWN_HASH}.narinfo"))).await;
    expect_status(&info, 404, "GET of a narinfo whose upload was refused");

    // Control: the NAR, then its narinfo; the path is served from then on.
    expect_status(
        &put(&gw, &format!("/{url}"), nar.clone()).await,
        200,
        "PUT of a NAR",
    );
    let reply = send(&gw.served, head(format!("/{url}"))).await;
    expect_status(&reply, 200, "HEAD of the uploaded NAR");
    let narinfo = narinfo_text(UNKNOWN_HASH, &url, &nar);
    let reply = put(&gw, &format!("/{UNKNOWN_HASH}.narinfo"), narinfo).await;
    expect_status(&reply, 200, "PUT of its narinfo");
    let info = send(&gw.served, get(&format!("/{UNKNOWN_HASH}.narinfo"))).await;
    expect_status(&info, 200, "GET of the uploaded path's narinfo");
    let served = send(&gw.served, get(&format!("/{url}"))).await;
    expect_status(&served, 200, "GET of the uploaded NAR");
    assert_eq!(served.body, nar);
    gw.stop().await;
}
