//! The HTTP binary cache Nix talks to (axum): `nix-cache-info`,
//! `<hash>.narinfo` and `nar/<nix32 NarHash>.nar`, plus `/metrics`. Handlers
//! parse the request, ask one library function, and map the answer to a
//! response: a client's mistake is a 4xx with a one-line reason, our fault a
//! 5xx with the cause logged.

use std::sync::Arc;

use anchor_registry::{NarHash, StorePathHash};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::StreamExt;

use crate::store::index::Index;
use crate::store::ipfs::Node;
use crate::store::verify::VerifiedNar;
use crate::trust::catalog::{Catalog, Lookup};
use crate::util::metrics::{Exposition, Metrics};

/// What every handler may use.
#[derive(Debug)]
pub struct AppState {
    pub catalog: Catalog,
    pub index: Arc<Index>,
    pub node: Node,
    pub metrics: Arc<Metrics>,
    /// Pre-rendered `nix-cache-info`.
    pub cache_info: String,
    /// Pin NARs fetched for Nix once verified, so this node seeds them.
    pub seed_fetched: bool,
}

/// The binary-cache routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/nix-cache-info", get(cache_info))
        .route("/metrics", get(metrics))
        .route("/nar/{file}", get(nar))
        .route("/{file}", get(narinfo))
        .with_state(state)
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    let mut body: String = body.into();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

fn internal(context: &str, err: impl std::fmt::Display) -> Response {
    tracing::error!("{context}: {err}");
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("internal error {context}"),
    )
}

async fn cache_info(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/x-nix-cache-info")],
        state.cache_info.clone(),
    )
        .into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut out = Exposition::default();
    state.metrics.expose(&mut out);
    let bitswap = state.node.bitswap_stats();
    for (name, help, counter) in [
        (
            "blocks_received",
            "Blocks received from peers and verified.",
            &bitswap.blocks_received,
        ),
        ("blocks_sent", "Blocks sent to peers.", &bitswap.blocks_sent),
        (
            "duplicate_blocks",
            "Blocks that arrived when nobody waited for them any more.",
            &bitswap.duplicates,
        ),
        (
            "unmatched_blocks",
            "Blocks that matched no outstanding want (late, unasked or corrupted).",
            &bitswap.unmatched,
        ),
        (
            "rewants",
            "Wants sent again to another peer after the first did not deliver.",
            &bitswap.rewants,
        ),
    ] {
        let n = counter.load(std::sync::atomic::Ordering::Relaxed);
        out.counter(&format!("nixpfs_bitswap_{name}"), help, n);
    }
    // Gauges of what the node holds; a part that cannot be read now is left
    // out of this scrape rather than reported as zero.
    if let Ok(peers) = state.node.connected_peers().await {
        out.gauge(
            "nixpfs_connected_peers",
            "IPFS peers connected now.",
            peers.len() as u64,
        );
    }
    if let Ok(pins) = state.node.pins().await {
        out.gauge("nixpfs_pins", "Pinned DAGs.", pins.len() as u64);
        out.gauge(
            "nixpfs_pinned_bytes",
            "File bytes under the pins.",
            pins.iter().map(|p| p.size).sum(),
        );
    }
    let index = state.index.clone();
    if let Ok(Ok((own, nars))) = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::store::index::IndexError>((
            index.local_count()?,
            index.nar_location_count()?,
        ))
    })
    .await
    {
        out.gauge(
            "nixpfs_own_paths",
            "Store paths the user pinned from the local store.",
            own,
        );
        out.gauge(
            "nixpfs_indexed_nars",
            "NARs whose location (CID) the index knows.",
            nars,
        );
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out.finish(),
    )
        .into_response()
}

async fn narinfo(state: State<Arc<AppState>>, file: Path<String>) -> Response {
    let started = std::time::Instant::now();
    let metrics = state.metrics.clone();
    let response = narinfo_answer(state, file).await;
    metrics.narinfo_seconds.observe(started.elapsed());
    response
}

async fn nar(state: State<Arc<AppState>>, file: Path<String>, headers: HeaderMap) -> Response {
    let started = std::time::Instant::now();
    let metrics = state.metrics.clone();
    let response = nar_answer(state, file, headers).await;
    metrics.nar_seconds.observe(started.elapsed());
    response
}

async fn narinfo_answer(State(state): State<Arc<AppState>>, Path(file): Path<String>) -> Response {
    let Some(hash_part) = file.strip_suffix(".narinfo") else {
        return text(StatusCode::NOT_FOUND, format!("no such file: {file}"));
    };
    let hash = match StorePathHash::parse(hash_part) {
        Ok(hash) => hash,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("bad narinfo name: {e}")),
    };
    let lookup = match state.catalog.cached(&hash) {
        Some(hit) => Ok(Ok(Lookup::Found(hit))),
        None => {
            let catalog = state.catalog.clone();
            tokio::task::spawn_blocking(move || catalog.lookup_text(&hash)).await
        }
    };
    match lookup {
        Ok(Ok(Lookup::Found(text))) => {
            Metrics::inc(&state.metrics.narinfo_served);
            ([(header::CONTENT_TYPE, "text/x-nix-narinfo")], text).into_response()
        }
        Ok(Ok(Lookup::NotFound)) => {
            Metrics::inc(&state.metrics.narinfo_not_found);
            text(
                StatusCode::NOT_FOUND,
                format!("{hash_part} is not known or not trusted"),
            )
        }
        Ok(Ok(Lookup::Conflict)) => {
            Metrics::inc(&state.metrics.narinfo_conflict);
            text(
                StatusCode::NOT_FOUND,
                format!("{hash_part}: registry anchors disagree about its contents (see `nixpfs conflicts`)"),
            )
        }
        Ok(Ok(Lookup::RegistryExpired { expired_at })) => {
            Metrics::inc(&state.metrics.narinfo_registry_expired);
            tracing::warn!(
                path = hash_part,
                expired_at,
                "refused an anchor-vouched path: the registry expired; sync a fresh one"
            );
            text(
                StatusCode::NOT_FOUND,
                format!("{hash_part}: the anchor registry expired at {expired_at} (unix seconds); it counts for nothing until a fresh one syncs"),
            )
        }
        Ok(Err(e)) => internal("while looking up a narinfo", e),
        Err(e) => internal("while looking up a narinfo", e),
    }
}

async fn nar_answer(
    State(state): State<Arc<AppState>>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(nix32) = file.strip_suffix(".nar") else {
        return text(
            StatusCode::NOT_FOUND,
            format!("no such NAR: {file} (expected <nix32 NarHash>.nar)"),
        );
    };
    let nar_hash = match NarHash::parse(&format!("sha256:{nix32}")) {
        Ok(h) if nix32.len() == 52 => h,
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("bad NAR name {file}: expected 52 characters of Nix base32 then .nar"),
            )
        }
    };
    let catalog = state.catalog.clone();
    let locations =
        match tokio::task::spawn_blocking(move || catalog.nar_locations(&nar_hash)).await {
            Ok(Ok(locations)) if !locations.is_empty() => locations,
            Ok(Ok(_)) => return text(StatusCode::NOT_FOUND, format!("unknown NAR {file}")),
            Ok(Err(e)) => return internal("while looking up a NAR", e),
            Err(e) => return internal("while looking up a NAR", e),
        };
    // Each candidate in turn until one delivers: a CID nobody has, or whose
    // bytes are not this NAR, does not hide the NAR behind it.
    let mut failures = Vec::new();
    for location in locations {
        let cid = match location.cid.parse::<cid::Cid>() {
            Ok(cid) => cid,
            Err(e) => {
                failures.push(format!("{}: not a CID ({e})", location.cid));
                continue;
            }
        };
        let size = location.nar_size;
        let range = match headers.get(header::RANGE).map(|v| parse_range(v, size)) {
            None => None,
            Some(Ok(range)) => range,
            Some(Err(Unsatisfiable)) => {
                return (
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{size}"))],
                    "requested range not satisfiable\n",
                )
                    .into_response()
            }
        };
        if location.verified {
            return match range {
                Some((start, end)) => serve_range(&state, &cid, start, end, size),
                None => {
                    Metrics::inc(&state.metrics.nar_served);
                    let body = Body::from_stream(Box::pin(state.node.cat(cid)));
                    nar_response(StatusCode::OK, size, None, body)
                }
            };
        }
        // First fetch of these bytes: a range of unverified bytes cannot be
        // checked, so it waits for the whole NAR to be verified.
        if let Some((start, end)) = range {
            match verify_whole(&state, &cid, nar_hash, size).await {
                Ok(()) => return serve_range(&state, &cid, start, end, size),
                Err(e) => {
                    failures.push(e);
                    continue;
                }
            }
        }
        // Stream them while checking NarHash, holding back the end until it
        // matches; the first chunk is awaited here so a CID that fails at
        // once falls through to the next candidate.
        let mut verified = VerifiedNar::new(
            Box::pin(state.node.cat(cid)),
            nar_hash,
            size,
            refuter(&state, nar_hash, cid),
        );
        let first = match verified.next().await {
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => {
                tracing::warn!(nar = %nar_hash, %cid, "NAR candidate failed, trying the next: {e}");
                failures.push(format!("{cid}: {e}"));
                continue;
            }
            None => bytes::Bytes::new(),
        };
        Metrics::inc(&state.metrics.nar_served);
        let index = state.index.clone();
        let mut location = location.clone();
        let body = futures::stream::once(async move { Ok(first) })
            .chain(verified)
            .chain(futures::stream::once(async move {
                // Reached only when every byte was checked: later requests
                // may then skip the whole-NAR hash.
                location.verified = true;
                let _ = tokio::task::spawn_blocking(move || {
                    index.put_nar_location(&nar_hash, &location)
                })
                .await;
                Ok(bytes::Bytes::new())
            }));
        return nar_response(StatusCode::OK, size, None, Body::from_stream(body));
    }
    text(
        StatusCode::BAD_GATEWAY,
        format!(
            "cannot serve NAR {file}: every known location failed: {}",
            failures.join("; ")
        ),
    )
}

/// What to do when a CID's bytes are not the NAR: log, count, and try that
/// CID last from then on.
fn refuter(
    state: &AppState,
    nar_hash: NarHash,
    cid: cid::Cid,
) -> impl FnOnce(&crate::store::verify::VerifyError) + Send + 'static {
    let metrics = state.metrics.clone();
    let catalog = state.catalog.clone();
    move |err| {
        tracing::error!(nar = %nar_hash, %cid, "refusing NAR bytes: {err}");
        Metrics::inc(&metrics.nar_hash_mismatch);
        catalog.refute(&nar_hash, &cid.to_string());
    }
}

/// Fetches and checks a whole NAR without sending it, so that a later range
/// request can be served from verified local blocks.
async fn verify_whole(
    state: &AppState,
    cid: &cid::Cid,
    nar_hash: NarHash,
    size: u64,
) -> Result<(), String> {
    let mut stream = VerifiedNar::new(
        Box::pin(state.node.cat(*cid)),
        nar_hash,
        size,
        refuter(state, nar_hash, *cid),
    );
    while let Some(chunk) = stream.next().await {
        if let Err(e) = chunk {
            return Err(format!("{cid}: {e}"));
        }
    }
    let location = crate::store::index::NarLocation {
        cid: cid.to_string(),
        nar_size: size,
        verified: true,
    };
    let index = state.index.clone();
    match tokio::task::spawn_blocking(move || index.put_nar_location(&nar_hash, &location)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{cid}: verified, but cannot record it: {e}")),
        Err(e) => Err(format!("{cid}: verified, but cannot record it: {e}")),
    }
}

fn serve_range(state: &AppState, cid: &cid::Cid, start: u64, end: u64, size: u64) -> Response {
    Metrics::inc(&state.metrics.nar_served);
    let body = Body::from_stream(state.node.cat_range(*cid, start, Some(end - start + 1)));
    nar_response(
        StatusCode::PARTIAL_CONTENT,
        end - start + 1,
        Some(format!("bytes {start}-{end}/{size}")),
        body,
    )
}

fn nar_response(
    status: StatusCode,
    len: u64,
    content_range: Option<String>,
    body: Body,
) -> Response {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-nix-nar"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Some(range) = content_range.and_then(|r| HeaderValue::from_str(&r).ok()) {
        h.insert(header::CONTENT_RANGE, range);
    }
    resp
}

/// A `Range` header that cannot be satisfied for this resource (HTTP 416).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

/// Parses a single `bytes=` range against a resource of `size` bytes:
/// `Ok(None)` = serve the whole resource (absent, multi-range or not bytes),
/// `Ok(Some((first, last)))` inclusive, `Err(Unsatisfiable)` = 416.
pub fn parse_range(value: &HeaderValue, size: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(spec) = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (first, last) = (first.trim(), last.trim());
    let parsed = match (first.is_empty(), last.is_empty()) {
        (true, true) => return Ok(None),
        (true, false) => {
            let n: u64 = last.parse().map_err(|_| Unsatisfiable)?;
            if n == 0 || size == 0 {
                return Err(Unsatisfiable);
            }
            (size.saturating_sub(n), size - 1)
        }
        (false, _) => {
            let a: u64 = first.parse().map_err(|_| Unsatisfiable)?;
            let b: u64 = if last.is_empty() {
                size.saturating_sub(1)
            } else {
                last.parse::<u64>()
                    .map_err(|_| Unsatisfiable)?
                    .min(size.saturating_sub(1))
            };
            if a >= size || a > b {
                return Err(Unsatisfiable);
            }
            (a, b)
        }
    };
    Ok(Some(parsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str, size: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
        parse_range(&HeaderValue::from_str(v).unwrap(), size)
    }

    #[test]
    fn parses_the_range_forms_nix_and_curl_send() {
        assert_eq!(range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(range("bytes=-1000", 100), Ok(Some((0, 99))));
        assert_eq!(range("bytes=50-1000", 100), Ok(Some((50, 99))));
    }

    #[test]
    fn unsatisfiable_ranges_are_416() {
        assert_eq!(range("bytes=100-", 100), Err(Unsatisfiable));
        assert_eq!(range("bytes=5-4", 100), Err(Unsatisfiable));
        assert_eq!(range("bytes=-0", 100), Err(Unsatisfiable));
        assert_eq!(range("bytes=x-4", 100), Err(Unsatisfiable));
    }

    #[test]
    fn other_forms_serve_the_whole_resource() {
        assert_eq!(range("items=0-9", 100), Ok(None));
        assert_eq!(range("bytes=0-1,5-6", 100), Ok(None));
    }
}
