//! Routing V1 over HTTP (IPIP-337) as a server on the gateway's HTTP port:
//! `GET /routing/v1/providers/{cid}` and `GET /routing/v1/peers/{peer-id}`,
//! so browsers, Helia and other gateways find this gateway's NARs without
//! running a DHT.
//!
//! # Goals
//! - Answer from local knowledge only ([`Node::local_providers`],
//!   [`Node::known_peer`]): this gateway when it holds the whole DAG (as a
//!   bitswap peer and, since `/ipfs/{cid}` is a trustless gateway, as a
//!   `transport-ipfs-gateway-http` provider), the providers the DHT's local
//!   record store holds, and connected peers. Never ask other routers, so
//!   two gateways that name each other as routers cannot loop.
//! - JSON (at most 100 records) or NDJSON when `Accept` asks for it;
//!   `filter-addrs` and `filter-protocols` (IPIP-484); CORS for any origin;
//!   `Cache-Control` shorter for "none" than for an answer.
//! - 404 for nothing known, 400 with a one-line reason for a bad CID or
//!   peer id; a global token bucket answers the excess with 429, and every
//!   refusal is counted (`routing_refused`).
//!
//! # Non-goals
//! - `PUT /routing/v1/providers` (historic, IPIP-0526) and
//!   `/routing/v1/dht/closest/peers`.
//! - IPNS (`/routing/v1/ipns/{name}`) is its own module.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use crate::store::ipfs::routers::{parse_peer_id, PeerRecord, BITSWAP, GATEWAY_HTTP};
use crate::store::ipfs::{Cid, Multiaddr, Node};
use crate::util::metrics::Metrics;

/// Most records in a JSON answer (the spec's SHOULD).
pub const MAX_JSON_RECORDS: usize = 100;
/// Requests per second the token bucket refills, and its size (a burst).
pub const RATE_PER_SEC: f64 = 50.0;
pub const BURST: f64 = 100.0;
const NDJSON: &str = "application/x-ndjson";
/// Answers with records may be cached for 5 minutes, "none" for 15 s (the
/// spec's examples), stale ones served for up to 48 h while revalidating
/// (the provider-record lifetime of the DHT).
const CACHE_FOUND: &str =
    "public, max-age=300, stale-while-revalidate=172800, stale-if-error=172800";
const CACHE_NONE: &str = "public, max-age=15, stale-while-revalidate=172800, stale-if-error=172800";

/// A token bucket: `take` succeeds while tokens are left; they refill at
/// `rate` per second up to `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Takes one token at `now`; false when none is left.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the routing handlers share.
#[derive(Debug)]
pub struct RoutingState {
    pub node: Node,
    /// The trustless gateway's address (`/ip4/…/tcp/…/http`), when the
    /// HTTP listener has one others can dial.
    pub gateway_addr: Option<Multiaddr>,
    pub metrics: Arc<Metrics>,
    pub bucket: Mutex<TokenBucket>,
}

impl RoutingState {
    /// State for a gateway whose HTTP port listens on `http`.
    pub fn new(node: Node, http: std::net::SocketAddr, metrics: Arc<Metrics>) -> Self {
        RoutingState {
            node,
            gateway_addr: gateway_multiaddr(http),
            metrics,
            bucket: Mutex::new(TokenBucket::new(RATE_PER_SEC, BURST)),
        }
    }
}

/// `/ip4/A/tcp/P/http` for a listener on a specific address; `None` for a
/// wildcard one (0.0.0.0 or ::), whose dialable address we do not know.
pub fn gateway_multiaddr(http: std::net::SocketAddr) -> Option<Multiaddr> {
    use rust_ipfs::Protocol;
    if http.ip().is_unspecified() {
        return None;
    }
    let ip = match http.ip() {
        std::net::IpAddr::V4(v4) => Protocol::Ip4(v4),
        std::net::IpAddr::V6(v6) => Protocol::Ip6(v6),
    };
    Some(
        Multiaddr::empty()
            .with(ip)
            .with(Protocol::Tcp(http.port()))
            .with(Protocol::Http),
    )
}

/// The `/routing/v1` routes, to merge into the gateway's router.
pub fn router(state: Arc<RoutingState>) -> Router {
    Router::new()
        .route(
            "/routing/v1/providers/{cid}",
            get(providers).options(preflight),
        )
        .route("/routing/v1/peers/{peer_id}", get(peers).options(preflight))
        .route("/routing/v1/{*rest}", get(unknown_path).options(preflight))
        .layer(axum::middleware::from_fn(cors))
        .with_state(state)
}

/// CORS for every origin on every routing response (the spec's "CORS and
/// Web Browsers").
pub(crate) async fn cors(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, PUT, OPTIONS"),
    );
    response
}

pub(crate) async fn preflight() -> Response {
    (
        StatusCode::NO_CONTENT,
        [
            (header::ACCESS_CONTROL_ALLOW_HEADERS, "*"),
            (header::ACCESS_CONTROL_MAX_AGE, "86400"),
        ],
    )
        .into_response()
}

async fn unknown_path(State(state): State<Arc<RoutingState>>, method: Method) -> Response {
    Metrics::inc(&state.metrics.routing_refused);
    text(
        StatusCode::BAD_REQUEST,
        format!(
            "{method}: unknown /routing/v1 path (served: providers/{{cid}}, peers/{{peer-id}})"
        ),
    )
}

fn text(status: StatusCode, body: impl std::fmt::Display) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{body}\n"),
    )
        .into_response()
}

/// `filter-addrs` and `filter-protocols`, comma-separated.
#[derive(Debug, Default, Deserialize)]
pub struct Filters {
    #[serde(rename = "filter-addrs")]
    pub addrs: Option<String>,
    #[serde(rename = "filter-protocols")]
    pub protocols: Option<String>,
}

fn names(list: &str) -> Vec<String> {
    list.split(',')
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect()
}

impl Filters {
    /// Applies IPIP-484 to one record: `None` when it is filtered out.
    pub fn apply(&self, mut record: PeerRecord) -> Option<PeerRecord> {
        if let Some(wanted) = self.protocols.as_deref().map(names) {
            let keep = if record.protocols.is_empty() {
                wanted.iter().any(|w| w == "unknown")
            } else {
                record
                    .protocols
                    .iter()
                    .any(|p| wanted.contains(&p.to_ascii_lowercase()))
            };
            if !keep {
                return None;
            }
        }
        if let Some(filter) = self.addrs.as_deref().map(names) {
            if record.addrs.is_empty() {
                return filter.iter().any(|f| f == "unknown").then_some(record);
            }
            let (negative, positive): (Vec<&str>, Vec<&str>) = filter
                .iter()
                .map(String::as_str)
                .filter(|f| *f != "unknown")
                .partition(|f| f.starts_with('!'));
            record.addrs.retain(|addr| {
                let Ok(addr) = addr.parse::<Multiaddr>() else {
                    return false;
                };
                let has = |name: &str| addr.iter().any(|p| p.tag().eq_ignore_ascii_case(name));
                negative.iter().all(|n| !has(&n[1..]))
                    && (positive.is_empty() || positive.iter().any(|p| has(p)))
            });
            if record.addrs.is_empty() {
                return None;
            }
        }
        Some(record)
    }
}

/// Takes a token; `Some(429)` when the bucket is empty.
fn limited(state: &RoutingState) -> Option<Response> {
    let allowed = state
        .bucket
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take(Instant::now());
    if allowed {
        return None;
    }
    Metrics::inc(&state.metrics.routing_refused);
    tracing::debug!("routing request over the rate limit: 429");
    let mut response = text(
        StatusCode::TOO_MANY_REQUESTS,
        "too many routing requests: retry in a second",
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    Some(response)
}

fn refuse(state: &RoutingState, reason: String) -> Response {
    Metrics::inc(&state.metrics.routing_refused);
    text(StatusCode::BAD_REQUEST, reason)
}

async fn providers(
    State(state): State<Arc<RoutingState>>,
    Path(cid_text): Path<String>,
    Query(filters): Query<Filters>,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = limited(&state) {
        return response;
    }
    let cid = match cid_text.parse::<Cid>() {
        Ok(cid) => cid,
        Err(e) => return refuse(&state, format!("{cid_text:?} is not a CID: {e}")),
    };
    let found = match state.node.local_providers(cid).await {
        Ok(found) => found,
        Err(e) => {
            tracing::error!(%cid, "routing: listing local providers failed: {e}");
            return text(StatusCode::INTERNAL_SERVER_ERROR, "cannot list providers");
        }
    };
    let own = state.node.peer_id();
    let records = found
        .into_iter()
        .map(|p| {
            if p.peer == own {
                let mut addrs = p.addrs;
                addrs.extend(state.gateway_addr.clone());
                let protocols: &[&str] = if state.gateway_addr.is_some() {
                    &[BITSWAP, GATEWAY_HTTP]
                } else {
                    &[BITSWAP]
                };
                PeerRecord::new(p.peer, &addrs, protocols)
            } else {
                // Learnt from the DHT: what it speaks is not recorded.
                PeerRecord::new(p.peer, &p.addrs, &[])
            }
        })
        .filter_map(|r| filters.apply(r))
        .collect();
    answer(&state, "Providers", records, &headers)
}

async fn peers(
    State(state): State<Arc<RoutingState>>,
    Path(peer_text): Path<String>,
    Query(filters): Query<Filters>,
    headers: HeaderMap,
) -> Response {
    if let Some(response) = limited(&state) {
        return response;
    }
    let peer = match parse_peer_id(&peer_text) {
        Ok(peer) => peer,
        Err(reason) => return refuse(&state, reason),
    };
    let records = match state.node.known_peer(peer).await {
        Ok(Some(known)) => {
            let protocols: &[&str] = if known.bitswap == Some(true) {
                &[BITSWAP]
            } else {
                &[]
            };
            vec![PeerRecord::new(peer, &known.addrs, protocols)]
        }
        Ok(None) => Vec::new(),
        Err(e) => {
            tracing::error!(%peer, "routing: looking up a peer failed: {e}");
            return text(StatusCode::INTERNAL_SERVER_ERROR, "cannot look up the peer");
        }
    };
    let records = records
        .into_iter()
        .filter_map(|r| filters.apply(r))
        .collect();
    answer(&state, "Peers", records, &headers)
}

/// 404 for no records; else JSON `{field: [...]}` (capped) or NDJSON when
/// `Accept` names it.
fn answer(
    state: &RoutingState,
    field: &str,
    records: Vec<PeerRecord>,
    headers: &HeaderMap,
) -> Response {
    let now = chrono::Utc::now()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let common = |cache: &'static str| {
        [
            (header::CACHE_CONTROL, cache.to_owned()),
            (header::VARY, "Accept".to_owned()),
            (header::LAST_MODIFIED, now.clone()),
        ]
    };
    if records.is_empty() {
        return (
            StatusCode::NOT_FOUND,
            common(CACHE_NONE),
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "no records known here\n",
        )
            .into_response();
    }
    Metrics::inc(&state.metrics.routing_answered);
    let ndjson = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|r| r.split(';').next().map(str::trim) == Some(NDJSON))
        });
    let (ctype, body) = if ndjson {
        let mut body = String::new();
        for r in &records {
            body.push_str(&serde_json::to_string(r).unwrap_or_default());
            body.push('\n');
        }
        (NDJSON, body)
    } else {
        let capped = &records[..records.len().min(MAX_JSON_RECORDS)];
        let body = serde_json::json!({ field: capped }).to_string();
        ("application/json", body)
    };
    (
        StatusCode::OK,
        common(CACHE_FOUND),
        [(header::CONTENT_TYPE, ctype)],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(addrs: &[&str], protocols: &[&str]) -> PeerRecord {
        PeerRecord {
            schema: "peer".into(),
            id: "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA".into(),
            addrs: addrs.iter().map(|a| (*a).to_owned()).collect(),
            protocols: protocols.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    fn filters(addrs: Option<&str>, protocols: Option<&str>) -> Filters {
        Filters {
            addrs: addrs.map(str::to_owned),
            protocols: protocols.map(str::to_owned),
        }
    }

    #[test]
    fn the_bucket_refuses_beyond_its_burst_and_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 3.0);
        assert!((0..3).all(|_| bucket.take(t0)));
        assert!(!bucket.take(t0));
        assert!(!bucket.take(t0 + Duration::from_millis(50)));
        assert!(bucket.take(t0 + Duration::from_millis(150)));
        assert!(!bucket.take(t0 + Duration::from_millis(150)));
        // Refills to the burst, no further.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| bucket.take(later)));
        assert!(!bucket.take(later));
    }

    #[test]
    fn filter_addrs_keeps_matching_addresses_and_drops_records_left_with_none() {
        let r = record(
            &[
                "/ip4/127.0.0.1/tcp/4001",
                "/ip4/127.0.0.1/tcp/8480/http",
                "/ip6/::1/tcp/4001",
            ],
            &[BITSWAP, GATEWAY_HTTP],
        );
        let http = filters(Some("http"), None).apply(r.clone()).unwrap();
        assert_eq!(http.addrs, vec!["/ip4/127.0.0.1/tcp/8480/http"]);
        let no_v6 = filters(Some("!ip6"), None).apply(r.clone()).unwrap();
        assert_eq!(no_v6.addrs.len(), 2);
        let tcp_not_http = filters(Some("TCP,!http"), None).apply(r.clone()).unwrap();
        assert_eq!(
            tcp_not_http.addrs,
            vec!["/ip4/127.0.0.1/tcp/4001", "/ip6/::1/tcp/4001"]
        );
        assert!(filters(Some("webtransport"), None)
            .apply(r.clone())
            .is_none());
        let unknown = record(&[], &[]);
        assert!(filters(Some("tcp"), None).apply(unknown.clone()).is_none());
        assert!(filters(Some("tcp,unknown"), None).apply(unknown).is_some());
        assert_eq!(filters(None, None).apply(r.clone()), Some(r));
    }

    #[test]
    fn filter_protocols_keeps_whole_records_that_speak_one() {
        let r = record(&["/ip4/127.0.0.1/tcp/4001"], &[BITSWAP, GATEWAY_HTTP]);
        let kept = filters(None, Some("transport-ipfs-gateway-http")).apply(r.clone());
        assert_eq!(kept, Some(r.clone()), "returned unchanged");
        assert!(filters(None, Some("transport-graphsync-filecoinv1"))
            .apply(r)
            .is_none());
        let dht = record(&["/ip4/127.0.0.1/tcp/4001"], &[]);
        assert!(filters(None, Some("transport-bitswap"))
            .apply(dht.clone())
            .is_none());
        assert!(filters(None, Some("unknown,transport-bitswap"))
            .apply(dht)
            .is_some());
    }

    /// The routes beside a more specific one merged in later (as the IPNS
    /// endpoints are): each request reaches its handler, all with CORS.
    #[tokio::test]
    async fn routes_dispatch_beside_a_merged_ipns_route_and_carry_cors() {
        use axum::body::Body;
        use tower::ServiceExt;
        let dir = tempfile::tempdir().unwrap();
        let node = Node::start(crate::store::ipfs::NodeConfig::new(dir.path()))
            .await
            .unwrap();
        let state = Arc::new(RoutingState::new(
            node.clone(),
            "127.0.0.1:8480".parse().unwrap(),
            Arc::new(Metrics::default()),
        ));
        let app = router(state.clone())
            .merge(Router::new().route("/routing/v1/ipns/{name}", get(|| async { "ipns" })));
        let call = |method: Method, uri: String| {
            let app = app.clone();
            async move {
                let request = axum::http::Request::builder()
                    .method(method)
                    .uri(uri)
                    .body(Body::empty())
                    .unwrap();
                app.oneshot(request).await.unwrap()
            }
        };
        let cid = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy";
        for (uri, status) in [
            (
                format!("/routing/v1/providers/{cid}"),
                StatusCode::NOT_FOUND,
            ),
            (
                "/routing/v1/providers/nope".to_owned(),
                StatusCode::BAD_REQUEST,
            ),
            (
                format!("/routing/v1/peers/{}", node.peer_id()),
                StatusCode::OK,
            ),
            ("/routing/v1/peers/nope".to_owned(), StatusCode::BAD_REQUEST),
            (
                "/routing/v1/dht/closest/peers/x".to_owned(),
                StatusCode::BAD_REQUEST,
            ),
            ("/routing/v1/ipns/k51x".to_owned(), StatusCode::OK),
        ] {
            let response = call(Method::GET, uri.clone()).await;
            assert_eq!(response.status(), status, "{uri}");
            if !uri.contains("/ipns/") {
                assert_eq!(
                    response.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
                    "*",
                    "{uri}"
                );
            }
        }
        let pre = call(Method::OPTIONS, format!("/routing/v1/providers/{cid}")).await;
        assert_eq!(pre.status(), StatusCode::NO_CONTENT);
        assert_eq!(state.metrics.snapshot().routing_refused, 3);
        assert_eq!(state.metrics.snapshot().routing_answered, 1);
        node.shutdown().await;
    }

    #[test]
    fn the_gateway_address_is_known_only_for_a_specific_listener() {
        let addr = gateway_multiaddr("127.0.0.1:8480".parse().unwrap()).unwrap();
        assert_eq!(addr.to_string(), "/ip4/127.0.0.1/tcp/8480/http");
        assert!(gateway_multiaddr("0.0.0.0:8480".parse().unwrap()).is_none());
        assert!(gateway_multiaddr("[::]:8480".parse().unwrap()).is_none());
    }
}
