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

use crate::http::prefetch::{Prefetch, Running};
use crate::publish::retention::Retention;
use crate::store::index::{Index, NarLocation, UpstreamPath};
use crate::store::ipfs::Node;
use crate::store::verify::VerifiedNar;
use crate::trust::catalog::{Catalog, Lookup};
use crate::trust::upstream::{self, Upstreams};
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
    /// Upstream caches asked for what the index cannot answer.
    pub upstreams: Arc<Upstreams>,
    /// Ask peer gateways for an upstream path's NAR before the upstream.
    pub prefer_peers: bool,
    /// Small upstream NARs fetched once their narinfo is served, if on.
    pub prefetch: Option<Arc<Prefetch>>,
    /// Retention of cache pins (`cache_max_size`), if a budget is set.
    pub retention: Option<Arc<Retention>>,
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
        (
            "released_wants",
            "Wants withdrawn because every fetch waiting for them gave up or was dropped.",
            &bitswap.released,
        ),
        (
            "streams_refused",
            "Inbound bitswap streams reset because their peer, or all peers together, had as many open as allowed.",
            &bitswap.streams_refused,
        ),
        (
            "write_timeouts",
            "Bitswap messages dropped because the peer did not read them within the write timeout.",
            &bitswap.write_timeouts,
        ),
    ] {
        let n = counter.load(std::sync::atomic::Ordering::Relaxed);
        out.counter(&format!("nixpfs_bitswap_{name}"), help, n);
    }
    // Gauges of what the node holds; a part that cannot be read now is left
    // out of this scrape rather than reported as zero.
    out.gauge(
        "nixpfs_bitswap_open_wants",
        "Blocks being fetched from peers now.",
        state.node.open_wants() as u64,
    );
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
    // Own paths first (they shadow any upstream's), then upstream answers
    // already made; only a miss in both touches the index.
    let lookup = if let Some(hit) = state.catalog.cached(&hash) {
        Lookup::Found(hit)
    } else if let Some(hit) = upstream_from_memory(&state, &hash) {
        Lookup::Found(hit)
    } else {
        // A lookup of this path under way (ahead of this request) leaves
        // its answer in memory; else this request looks it up, and a
        // lookup ahead that comes later finds that answer.
        let claim = match &state.prefetch {
            Some(prefetch) => {
                prefetch.narinfos.unqueue(&hash);
                match prefetch.narinfos.claim(hash) {
                    Some(claim) => Some(claim),
                    None => {
                        prefetch.narinfos.wait(&hash).await;
                        None
                    }
                }
            }
            None => None,
        };
        match upstream_from_memory(&state, &hash) {
            Some(hit) => Lookup::Found(hit),
            None => match look_up(&state, hash).await {
                Ok((answer, path)) => {
                    if let Some(path) = path {
                        Metrics::inc(&state.metrics.upstream_narinfo_served);
                        follow_up(&state, path);
                    }
                    drop(claim);
                    answer
                }
                Err((context, e)) => return internal(context, e),
            },
        }
    };
    match lookup {
        Lookup::Found(text) => {
            Metrics::inc(&state.metrics.narinfo_served);
            ([(header::CONTENT_TYPE, "text/x-nix-narinfo")], text).into_response()
        }
        Lookup::NotFound => {
            Metrics::inc(&state.metrics.narinfo_not_found);
            text(
                StatusCode::NOT_FOUND,
                format!("{hash_part} is not known or not trusted"),
            )
        }
        Lookup::Conflict => {
            Metrics::inc(&state.metrics.narinfo_conflict);
            text(
                StatusCode::NOT_FOUND,
                format!("{hash_part}: registry anchors disagree about its contents (see `nixpfs conflicts`)"),
            )
        }
        Lookup::RegistryExpired { expired_at } => {
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
    let whole = !headers.contains_key(header::RANGE);
    if let Some(prefetch) = &state.prefetch {
        // A prefetch of this NAR under way: its bytes are here once it
        // ends. One still queued is this request's to do.
        prefetch.nars.unqueue(&nar_hash);
        prefetch.nars.wait(&nar_hash).await;
        if let Some(nar) = whole.then(|| prefetch.take_held(&nar_hash)).flatten() {
            Metrics::inc(&state.metrics.nar_served);
            return nar_response(StatusCode::OK, nar.len() as u64, None, Body::from(nar));
        }
    }
    let catalog = state.catalog.clone();
    let node = state.node.clone();
    let (locations, from_upstream) = match tokio::task::spawn_blocking(move || {
        let locations = catalog.nar_locations(&nar_hash)?;
        if whole {
            if let Some(held) = small_held_here(&node, &locations) {
                return Ok(Found::Held(held));
            }
        }
        let from_upstream = upstream::nar_source(catalog.index(), &nar_hash)?;
        Ok::<_, crate::store::index::IndexError>(Found::Candidates(
            locations,
            from_upstream.map(Box::new),
        ))
    })
    .await
    {
        Ok(Ok(Found::Held((cid, bytes)))) => {
            if let Some(retention) = &state.retention {
                retention.touch(cid);
            }
            Metrics::inc(&state.metrics.nar_served);
            return nar_response(StatusCode::OK, bytes.len() as u64, None, Body::from(bytes));
        }
        Ok(Ok(Found::Candidates(locations, None))) if locations.is_empty() => {
            return text(StatusCode::NOT_FOUND, format!("unknown NAR {file}"))
        }
        Ok(Ok(Found::Candidates(locations, from_upstream))) => {
            (locations, from_upstream.map(|path| *path))
        }
        Ok(Err(e)) => return internal("while looking up a NAR", e),
        Err(e) => return internal("while looking up a NAR", e),
    };
    let mut failures = Vec::new();
    let mut locations = locations;
    // The upstream, when it is asked only after the peers that hold the NAR
    // failed to deliver it.
    let mut upstream_after_peers = None;
    if let Some(path) = from_upstream {
        // Bytes an upstream served are local while they are pinned (or not
        // yet collected): serve them from here; otherwise the upstream
        // comes before IPFS candidates, which may be slow to find.
        match held_here(&state, &locations).await {
            Some(location) => locations = vec![location],
            None => {
                locations.retain(|l| !l.verified);
                // Gateways that fetched the NAR from the upstream may hold
                // it, verified, on IPFS: asked first when peers are
                // preferred, else only once the upstream failed.
                let mut from_peers = Vec::new();
                if state.prefer_peers {
                    from_peers =
                        upstream::peer_locations(&state.upstreams, &state.node, &path).await;
                }
                if from_peers.is_empty() {
                    match serve_from_upstream(&state, path.clone(), nar_hash, &headers).await {
                        Ok(response) => return response,
                        Err(e) => failures.push(e),
                    }
                    if !state.prefer_peers {
                        from_peers =
                            upstream::peer_locations(&state.upstreams, &state.node, &path).await;
                    }
                } else {
                    upstream_after_peers = Some(path);
                }
                let from_peers_cids: Vec<String> =
                    from_peers.iter().map(|l| l.cid.clone()).collect();
                for location in from_peers.into_iter().rev() {
                    if !locations.iter().any(|l| l.cid == location.cid) {
                        locations.insert(0, location);
                    }
                }
                state.catalog.refuted_last(&nar_hash, &mut locations);
                if upstream_after_peers.is_some() {
                    // Only the peers' CIDs come before the upstream; the
                    // index's other candidates may need a slow search.
                    let (peers, rest) = locations
                        .into_iter()
                        .partition(|l| from_peers_cids.contains(&l.cid));
                    locations = rest;
                    if let Some(response) =
                        serve_first_of(&state, peers, nar_hash, &headers, &mut failures).await
                    {
                        return response;
                    }
                }
            }
        }
    }
    if let Some(path) = upstream_after_peers {
        match serve_from_upstream(&state, path, nar_hash, &headers).await {
            Ok(response) => return response,
            Err(e) => failures.push(e),
        }
    }
    if let Some(response) =
        serve_first_of(&state, locations, nar_hash, &headers, &mut failures).await
    {
        return response;
    }
    text(
        StatusCode::BAD_GATEWAY,
        format!(
            "cannot serve NAR {file}: every known location failed: {}",
            failures.join("; ")
        ),
    )
}

/// Up to this size a NAR held here is read whole, on the blocking thread
/// that looked it up, and sent as one body: a small NAR then costs one
/// thread hop, not one per block read plus the tasks of a streaming read,
/// which took most of a warm NAR's time (2.2× nginx's). Larger NARs stream,
/// so their first byte does not wait for the last.
const SMALL_NAR: u64 = 4 * 1024 * 1024;

/// What the index knows of a NAR: small and held here (its CID and bytes),
/// else where to look (its locations, and the upstream path it is from).
enum Found {
    Held((cid::Cid, bytes::Bytes)),
    Candidates(Vec<NarLocation>, Option<Box<UpstreamPath>>),
}

/// The first of `locations` whose bytes were verified, are at most
/// [`SMALL_NAR`] and are all held here, read whole. A block missing (not
/// yet fetched, or collected since) or unreadable leaves it to the
/// streaming path, which fetches from peers; blocking.
fn small_held_here(node: &Node, locations: &[NarLocation]) -> Option<(cid::Cid, bytes::Bytes)> {
    for location in locations
        .iter()
        .filter(|l| l.verified && l.nar_size <= SMALL_NAR)
    {
        let Ok(cid) = location.cid.parse::<cid::Cid>() else {
            continue;
        };
        match node.read_local(cid, location.nar_size) {
            Ok(Some(bytes)) if bytes.len() as u64 == location.nar_size => {
                return Some((cid, bytes))
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(%cid, "reading a held NAR whole failed, streaming it: {e}"),
        }
    }
    None
}

/// Serves the NAR from the first of `locations` that delivers, each in
/// turn: a CID nobody has, or whose bytes are not this NAR, does not hide
/// the ones behind it. `None` (with `failures` extended) when none did.
async fn serve_first_of(
    state: &Arc<AppState>,
    locations: Vec<crate::store::index::NarLocation>,
    nar_hash: NarHash,
    headers: &HeaderMap,
    failures: &mut Vec<String>,
) -> Option<Response> {
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
                return Some(
                    (
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        [(header::CONTENT_RANGE, format!("bytes */{size}"))],
                        "requested range not satisfiable\n",
                    )
                        .into_response(),
                )
            }
        };
        if location.verified {
            if let Some(retention) = &state.retention {
                retention.touch(cid);
            }
            return Some(match range {
                Some((start, end)) => serve_range(state, &cid, start, end, size),
                None => {
                    Metrics::inc(&state.metrics.nar_served);
                    let body = Body::from_stream(Box::pin(state.node.cat(cid)));
                    nar_response(StatusCode::OK, size, None, body)
                }
            });
        }
        // First fetch of these bytes: a range of unverified bytes cannot be
        // checked, so it waits for the whole NAR to be verified.
        if let Some((start, end)) = range {
            match verify_whole(state, &cid, nar_hash, size).await {
                Ok(()) => return Some(serve_range(state, &cid, start, end, size)),
                Err(e) => {
                    failures.push(e);
                    continue;
                }
            }
        }
        if state.seed_fetched {
            // Imported as they stream, pinned once verified: this node then
            // seeds what it fetched.
            let (mut body, _done) = tee_import(
                state.clone(),
                from_peers(state, cid),
                nar_hash,
                size,
                refuter(state, nar_hash, cid),
                None,
                None,
            );
            match body.next().await {
                Some(Ok(first)) => {
                    Metrics::inc(&state.metrics.nar_served);
                    let body = futures::stream::once(async move { Ok(first) }).chain(body);
                    return Some(nar_response(
                        StatusCode::OK,
                        size,
                        None,
                        Body::from_stream(body),
                    ));
                }
                Some(Err(e)) => {
                    tracing::warn!(nar = %nar_hash, %cid, "NAR candidate failed, trying the next: {e}");
                    failures.push(format!("{cid}: {e}"));
                    continue;
                }
                None => {
                    failures.push(format!("{cid}: no bytes"));
                    continue;
                }
            }
        }
        // Stream them while checking NarHash, holding back the end until it
        // matches; the first chunk is awaited here so a CID that fails at
        // once falls through to the next candidate.
        let mut verified = verified_from_peers(state, cid, nar_hash, size);
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
                    index.note_fetched_nar_location(&nar_hash, &location)
                })
                .await;
                Ok(bytes::Bytes::new())
            }));
        return Some(nar_response(
            StatusCode::OK,
            size,
            None,
            Body::from_stream(body),
        ));
    }
    None
}

/// An upstream-signed narinfo answered from memory, counted; one looked up
/// ahead of this request is followed up now that Nix asked for it.
fn upstream_from_memory(state: &Arc<AppState>, hash: &StorePathHash) -> Option<bytes::Bytes> {
    let hit = state.catalog.cached_upstream(hash)?;
    Metrics::inc(&state.metrics.upstream_narinfo_served);
    if let Some(path) = state
        .prefetch
        .as_ref()
        .and_then(|p| p.take_looked_ahead(hash))
    {
        follow_up(state, path);
    }
    Some(hit)
}

/// The narinfo to serve for `hash` when memory has no answer: the index's
/// (own paths, anchors), else the upstreams' (recorded or fetched, on the
/// same blocking thread: the upstream client is blocking and bounded in
/// time), else what peer gateways say an upstream signed. A found upstream
/// answer comes with its path. `Err` names what failed.
async fn look_up(
    state: &AppState,
    hash: StorePathHash,
) -> Result<(Lookup<bytes::Bytes>, Option<UpstreamPath>), (&'static str, String)> {
    const LOCAL: &str = "while looking up a narinfo";
    const UPSTREAMS: &str = "while asking the upstreams for a narinfo";
    let catalog = state.catalog.clone();
    let upstreams = state.upstreams.clone();
    let (local, from_upstream) = tokio::task::spawn_blocking(move || {
        let local = catalog.lookup_text(&hash).map_err(|e| (LOCAL, e))?;
        if upstreams.is_empty()
            || !matches!(local, Lookup::NotFound | Lookup::RegistryExpired { .. })
        {
            return Ok((local, None));
        }
        let answer = upstream::lookup(&catalog, &upstreams, &hash).map_err(|e| (UPSTREAMS, e))?;
        Ok((local, Some(answer)))
    })
    .await
    .map_err(|e| (LOCAL, e.to_string()))?
    .map_err(|(context, e)| (context, e.to_string()))?;
    match from_upstream {
        None => Ok((local, None)),
        Some((Lookup::NotFound, _)) => {
            match upstream::lookup_peers(&state.catalog, &state.upstreams, &state.node, hash).await
            {
                Ok((Lookup::NotFound, _)) => Ok((local, None)),
                Ok(found) => Ok(found),
                Err(e) => Err(("while asking peer gateways for a narinfo", e.to_string())),
            }
        }
        Some(found) => Ok(found),
    }
}

/// Whether memory holds the answer about `hash` (own or upstream-signed).
fn in_memory(state: &AppState, hash: &StorePathHash) -> bool {
    state.catalog.cached(hash).is_some() || state.catalog.cached_upstream(hash).is_some()
}

/// What follows an upstream-signed narinfo Nix asked for: its references'
/// narinfos are looked up and its NAR, if small, is fetched, ahead of
/// Nix's requests for them.
fn follow_up(state: &Arc<AppState>, path: UpstreamPath) {
    let Some(prefetch) = &state.prefetch else {
        return;
    };
    let own = *path.narinfo.store_path.hash();
    prefetch.take_looked_ahead(&own);
    for reference in &path.narinfo.references {
        let hash = *reference.hash();
        if hash == own || in_memory(state, &hash) {
            continue;
        }
        let Some(queued) = prefetch.narinfos.queue(hash) else {
            continue;
        };
        let state = state.clone();
        let prefetch = prefetch.clone();
        tokio::spawn(async move {
            // None: Nix's request for it came first and looks it up.
            let Some(_turn) = prefetch.narinfos.turn(&queued).await else {
                return;
            };
            if in_memory(&state, &hash) {
                return;
            }
            match look_up(&state, hash).await {
                Ok((Lookup::Found(_), Some(path))) => {
                    Metrics::inc(&state.metrics.narinfo_looked_ahead);
                    prefetch.looked_ahead(path);
                }
                Ok(_) => {}
                Err((context, e)) => {
                    tracing::debug!(path = %hash, "looking a narinfo up ahead of Nix failed {context}: {e}")
                }
            }
        });
    }
    prefetch_nar(state, prefetch, path);
}

/// Queues a fetch of an upstream path's NAR ahead of Nix's request, when
/// it is small enough; once it has a slot, it fetches it unless it is held
/// here, being fetched, or Nix asked for it meanwhile: from the peer
/// gateways that offer it when peers are preferred or the upstream is
/// unavailable (only with `seed_fetched`, which imports it anyway), else
/// from the upstream. A NAR request that comes while it runs waits for it
/// instead of starting its own.
fn prefetch_nar(state: &Arc<AppState>, prefetch: &Arc<Prefetch>, path: UpstreamPath) {
    let nar_hash = path.narinfo.nar_hash;
    let size = path.narinfo.nar_size;
    if !prefetch.small_enough(size) {
        return;
    }
    let Some(queued) = prefetch.nars.queue(nar_hash) else {
        return;
    };
    let state = state.clone();
    let prefetch = prefetch.clone();
    tokio::spawn(async move {
        let Some((_slot, claim)) = prefetch.nars.turn(&queued).await else {
            return;
        };
        let catalog = state.catalog.clone();
        let held = match tokio::task::spawn_blocking(move || catalog.nar_locations(&nar_hash)).await
        {
            Ok(Ok(locations)) => held_here(&state, &locations).await.is_some(),
            _ => false,
        };
        if held {
            return;
        }
        let upstream_up = state.upstreams.available(&path);
        if !upstream_up && !state.seed_fetched && size > SMALL_NAR {
            // Only peers could serve it, and without `seed_fetched` what
            // they send is not imported: too large to hold in memory, it
            // streams to Nix when asked.
            return;
        }
        if state.prefer_peers || !upstream_up {
            let from_peers = upstream::peer_locations(&state.upstreams, &state.node, &path).await;
            if !from_peers.is_empty() {
                // With `seed_fetched` it is imported (and seeded); without,
                // held in memory for Nix, so nothing lands in the store.
                let fetched = if state.seed_fetched {
                    tracing::debug!(nar = %nar_hash, "prefetching a NAR from peer gateways");
                    fetch_from_peers(&state, nar_hash, size, from_peers, claim).await
                } else if size <= SMALL_NAR {
                    tracing::debug!(nar = %nar_hash, "prefetching a NAR from peer gateways into memory");
                    match fetch_to_memory(&state, nar_hash, size, from_peers).await {
                        Some(nar) => {
                            prefetch.hold(nar_hash, nar);
                            true
                        }
                        None => false,
                    }
                } else {
                    false
                };
                if fetched {
                    Metrics::inc(&state.metrics.peer_nar_prefetched);
                }
                return;
            }
        }
        if !upstream_up {
            return;
        }
        let (url, body, done) = fetch_from_upstream(&state, path, Some(claim));
        tracing::debug!(nar = %nar_hash, %url, "prefetching a NAR from its upstream");
        // Nobody reads the body: the import goes on without it.
        drop(body);
        if let Ok(Some(_)) = done.await {
            Metrics::inc(&state.metrics.upstream_nar_prefetched);
        }
    });
}

/// Fetches a NAR over IPFS from the first of `locations` whose bytes are
/// it, verified and imported through [`tee_import`] with nobody reading;
/// whether one was. The prefetch's `claim` goes with the first attempt.
async fn fetch_from_peers(
    state: &Arc<AppState>,
    nar_hash: NarHash,
    size: u64,
    locations: Vec<NarLocation>,
    claim: Running<NarHash>,
) -> bool {
    let mut claim = Some(claim);
    for location in locations {
        let Ok(cid) = location.cid.parse::<cid::Cid>() else {
            continue;
        };
        let (body, done) = tee_import(
            state.clone(),
            from_peers(state, cid),
            nar_hash,
            size,
            refuter(state, nar_hash, cid),
            None,
            claim.take(),
        );
        drop(body);
        if let Ok(Some(_)) = done.await {
            return true;
        }
    }
    false
}

/// A NAR fetched over IPFS from the first of `locations` whose bytes are
/// it, whole, in memory: every byte checked against its CID and the whole
/// against NarHash (a mismatch is refuted and the next one tried).
async fn fetch_to_memory(
    state: &Arc<AppState>,
    nar_hash: NarHash,
    size: u64,
    locations: Vec<NarLocation>,
) -> Option<bytes::Bytes> {
    'candidates: for location in locations {
        let Ok(cid) = location.cid.parse::<cid::Cid>() else {
            continue;
        };
        let mut verified = verified_from_peers(state, cid, nar_hash, size);
        let mut whole = bytes::BytesMut::with_capacity(size.min(SMALL_NAR) as usize);
        while let Some(chunk) = verified.next().await {
            match chunk {
                Ok(chunk) => whole.extend_from_slice(&chunk),
                Err(e) => {
                    tracing::debug!(nar = %nar_hash, %cid, "prefetching a NAR into memory failed: {e}");
                    continue 'candidates;
                }
            }
        }
        return Some(whole.freeze());
    }
    None
}

/// A CID's bytes over IPFS checked as they come against the NAR they should
/// be (see [`VerifiedNar`]: the end is held back until NarHash matches); a
/// mismatch refutes the CID.
fn verified_from_peers(
    state: &AppState,
    cid: cid::Cid,
    nar_hash: NarHash,
    size: u64,
) -> VerifiedNar<
    impl futures::Stream<Item = Result<bytes::Bytes, crate::store::ipfs::IpfsError>>
        + Send
        + Unpin
        + 'static,
> {
    VerifiedNar::new(
        from_peers(state, cid),
        nar_hash,
        size,
        refuter(state, nar_hash, cid),
    )
}

/// A CID's bytes over IPFS, counted in `peer_bytes` as they come.
fn from_peers(
    state: &AppState,
    cid: cid::Cid,
) -> impl futures::Stream<Item = Result<bytes::Bytes, crate::store::ipfs::IpfsError>>
       + Send
       + Unpin
       + 'static {
    let metrics = state.metrics.clone();
    Box::pin(state.node.cat(cid).inspect(move |c| {
        if let Ok(c) = c {
            Metrics::add(&metrics.peer_bytes, c.len() as u64);
        }
    }))
}

/// The first of `locations` whose bytes were verified and are all held
/// here (pinned, or not yet collected).
async fn held_here(state: &AppState, locations: &[NarLocation]) -> Option<NarLocation> {
    for location in locations.iter().filter(|l| l.verified) {
        if let Ok(cid) = location.cid.parse::<cid::Cid>() {
            if state.node.has_all(cid).await.unwrap_or(false) {
                return Some(location.clone());
            }
        }
    }
    None
}

/// Starts downloading an upstream path's NAR through [`tee_import`]: its
/// URL, the response's chunks and the import's end. Bytes that are not
/// what the narinfo says are logged with the URL, counted, and noted
/// against that upstream.
fn fetch_from_upstream(
    state: &Arc<AppState>,
    path: UpstreamPath,
    claim: Option<Running<NarHash>>,
) -> (
    String,
    impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + Unpin + 'static,
    tokio::task::JoinHandle<Option<cid::Cid>>,
) {
    let nar_hash = path.narinfo.nar_hash;
    let url = state
        .upstreams
        .nar_url(&path)
        .unwrap_or_else(|| path.upstream.clone());
    let on_mismatch = {
        let metrics = state.metrics.clone();
        let upstreams = state.upstreams.clone();
        let upstream = path.upstream.clone();
        let url = url.clone();
        move |err: &crate::store::verify::VerifyError| {
            tracing::error!(nar = %nar_hash, %url, "refusing an upstream NAR: {err}");
            Metrics::inc(&metrics.upstream_nar_refused);
            upstreams.record_failure(&upstream, &format!("{url}: {err}"));
        }
    };
    let size = path.narinfo.nar_size;
    let chunks = upstream::nar_stream(state.upstreams.clone(), path);
    let (body, done) = tee_import(
        state.clone(),
        chunks,
        nar_hash,
        size,
        on_mismatch,
        Some(|m: &Metrics| &m.upstream_nar_fetched),
        claim,
    );
    (url, body, done)
}

/// Streams an upstream path's NAR to Nix as it downloads (see
/// [`tee_import`]); a range of it first downloads the whole NAR, then is
/// served from the verified local blocks. `Err` (nothing sent yet) lets the
/// caller try IPFS candidates.
async fn serve_from_upstream(
    state: &Arc<AppState>,
    path: UpstreamPath,
    nar_hash: NarHash,
    headers: &HeaderMap,
) -> Result<Response, String> {
    if !state.upstreams.available(&path) {
        return Err(format!("upstream {} is unavailable", path.upstream));
    }
    let size = path.narinfo.nar_size;
    let range = match headers.get(header::RANGE).map(|v| parse_range(v, size)) {
        None => None,
        Some(Ok(range)) => range,
        Some(Err(Unsatisfiable)) => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
                "requested range not satisfiable\n",
            )
                .into_response())
        }
    };
    let (url, mut body, done) = fetch_from_upstream(state, path, None);
    tracing::info!(nar = %nar_hash, %url, "fetching a NAR from its upstream");
    if let Some((start, end)) = range {
        while let Some(chunk) = body.next().await {
            chunk.map_err(|e| e.to_string())?;
        }
        let cid = done
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{url}: downloaded, but not imported"))?;
        return Ok(serve_range(state, &cid, start, end, size));
    }
    let first = match body.next().await {
        Some(Ok(first)) => first,
        Some(Err(e)) => return Err(e.to_string()),
        None => return Err(format!("{url}: no bytes")),
    };
    Metrics::inc(&state.metrics.nar_served);
    let body = futures::stream::once(async move { Ok(first) }).chain(body);
    Ok(nar_response(
        StatusCode::OK,
        size,
        None,
        Body::from_stream(body),
    ))
}

/// Chunks in flight from [`tee_import`] to the response.
const TEE_DEPTH: usize = 4;

/// Counts one NAR import in `nar_imports_running` while it lives.
struct ImportRunning(Arc<Metrics>);

impl ImportRunning {
    fn start(metrics: Arc<Metrics>) -> Self {
        metrics
            .nar_imports_running
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(metrics)
    }
}

impl Drop for ImportRunning {
    fn drop(&mut self) {
        self.0
            .nar_imports_running
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Sends `source` to Nix through [`VerifiedNar`] (NarHash checked, the end
/// held back until it matches) and, in the same pass, into the block store.
/// Once every byte matched, Nix gets the last chunk at once (the bytes are
/// verified; a small NAR's whole answer would otherwise wait for the
/// import's fsyncs and the index commit), then the NAR's CID is recorded as
/// its verified location and, with `seed_fetched`, pinned (and provided) as
/// a cache pin that retention may evict. A mismatch aborts the response and
/// records, pins and seeds nothing (the unpinned blocks go at the next gc).
/// The import goes on when Nix hangs up, so the bytes are not fetched twice;
/// an import that fails after Nix got its verified bytes is logged, and the
/// NAR is simply not held here.
/// `fetched` names the counter of NARs verified this way, if any; a
/// prefetch's `claim` is released once the NAR is recorded (or failed), so
/// a NAR request waiting for it is served without waiting for the seeding.
/// Returns the response's chunks and the task's end: the CID when recorded.
fn tee_import<S, E>(
    state: Arc<AppState>,
    source: S,
    nar_hash: NarHash,
    size: u64,
    on_mismatch: impl FnOnce(&crate::store::verify::VerifyError) + Send + 'static,
    fetched: Option<fn(&Metrics) -> &std::sync::atomic::AtomicU64>,
    claim: Option<Running<NarHash>>,
) -> (
    impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + Unpin + 'static,
    tokio::task::JoinHandle<Option<cid::Cid>>,
)
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>> + Send + Unpin + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let (body_tx, mut body_rx) =
        tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(TEE_DEPTH);
    let (import_tx, mut import_rx) =
        tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(TEE_DEPTH);
    let running = ImportRunning::start(state.metrics.clone());
    let done = tokio::spawn(async move {
        let _running = running;
        let import = {
            let node = state.node.clone();
            tokio::spawn(async move {
                let chunks = futures::stream::poll_fn(move |cx| import_rx.poll_recv(cx));
                node.add_chunks(chunks).await
            })
        };
        let mut verified = VerifiedNar::new(source, nar_hash, size, on_mismatch);
        let mut client = Some(body_tx);
        // The last chunk waits until the whole NAR matched its NarHash.
        let mut last: Option<bytes::Bytes> = None;
        while let Some(item) = verified.next().await {
            match item {
                Ok(chunk) => {
                    if import_tx.send(Ok(chunk.clone())).await.is_err() {
                        abort_client(client.take(), "the import of this NAR stopped").await;
                        return None;
                    }
                    if let Some(previous) = last.replace(chunk) {
                        to_client(&mut client, previous).await;
                    }
                }
                Err(e) => {
                    let _ = import_tx
                        .send(Err(std::io::Error::other(e.to_string())))
                        .await;
                    abort_client(client.take(), &e.to_string()).await;
                    return None;
                }
            }
        }
        drop(import_tx);
        if let Some(last) = last {
            to_client(&mut client, last).await;
        }
        drop(client);
        let imported = match import.await {
            Ok(Ok(imported)) if imported.size == size => imported,
            Ok(Ok(imported)) => {
                tracing::error!(nar = %nar_hash, "imported {} bytes of a {size}-byte NAR", imported.size);
                return None;
            }
            Ok(Err(e)) => {
                tracing::error!(nar = %nar_hash, "cannot import a verified NAR: {e}");
                return None;
            }
            Err(e) => {
                tracing::error!(nar = %nar_hash, "the import of a verified NAR failed: {e}");
                return None;
            }
        };
        let cid = imported.cid;
        tracing::debug!(nar = %nar_hash, %cid, "NAR verified and imported");
        if let Some(counter) = fetched {
            Metrics::inc(counter(&state.metrics));
        }
        let index = state.index.clone();
        let location = NarLocation {
            cid: cid.to_string(),
            nar_size: size,
            verified: true,
        };
        match tokio::task::spawn_blocking(move || {
            index.note_fetched_nar_location(&nar_hash, &location)
        })
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(nar = %nar_hash, %cid, "cannot record a verified NAR: {e}")
            }
            Err(e) => tracing::error!(nar = %nar_hash, %cid, "cannot record a verified NAR: {e}"),
        }
        drop(claim);
        if state.seed_fetched {
            seed(&state, cid, nar_hash).await;
        }
        Some(cid)
    });
    (
        futures::stream::poll_fn(move |cx| body_rx.poll_recv(cx)),
        done,
    )
}

type ClientTx = tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>;

/// Sends a chunk to Nix; once Nix hung up, nothing more is sent.
async fn to_client(client: &mut Option<ClientTx>, chunk: bytes::Bytes) {
    if let Some(tx) = client {
        if tx.send(Ok(chunk)).await.is_err() {
            *client = None;
        }
    }
}

/// Ends the response with an error: the body is cut short.
async fn abort_client(client: Option<ClientTx>, reason: &str) {
    if let Some(tx) = client {
        let _ = tx.send(Err(std::io::Error::other(reason.to_owned()))).await;
    }
}

/// Pins a NAR this gateway fetched and verified, so it seeds it (the pin
/// provides it on the DHT when that runs), as a cache pin within the
/// retention budget.
async fn seed(state: &AppState, cid: cid::Cid, nar_hash: NarHash) {
    let pin = match state.node.pin(cid).await {
        Ok(pin) => pin,
        Err(e) => {
            tracing::error!(nar = %nar_hash, %cid, "cannot pin a fetched NAR: {e}");
            return;
        }
    };
    Metrics::inc(&state.metrics.seeded_fetched);
    tracing::info!(nar = %nar_hash, %cid, "fetched NAR pinned and seeded");
    if let Some(retention) = &state.retention {
        retention.admit(pin, nar_hash).await;
    } else {
        crate::publish::retention::record(&state.index, pin, nar_hash).await;
    }
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
    match tokio::task::spawn_blocking(move || index.note_fetched_nar_location(&nar_hash, &location))
        .await
    {
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
