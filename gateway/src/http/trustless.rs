//! The IPFS trustless gateway on the gateway's HTTP port: `GET|HEAD
//! /ipfs/{cid}` answering only verifiable response types — one raw block
//! (`?format=raw`, `Accept: application/vnd.ipld.raw`) or a CARv1 of the DAG
//! (`?format=car`, `dag-scope`, `entity-bytes`) — from local blocks or peers.
//! Every block is re-hashed before it is sent, so a block damaged on disk is
//! refused, never served.
//!
//! # Goals
//! - The verifiable response types of the trustless gateway spec, as
//!   `@helia/verified-fetch` and `ipfs-car` consume them: a raw block, or a
//!   CAR of a DAG with `dag-scope` and `entity-bytes`.
//! - Refuse, with a 4xx and the reason, anything a client must not trust
//!   (deserialised files, directory listings).
//!
//! # Non-goals
//! - Deserialised responses (`/ipfs/{cid}` as a plain file) and HTML: a
//!   trustless client verifies bytes itself, and plain files are what the
//!   binary cache endpoint serves, verified against NarHash.
//! - IPNS, DNSLink and `/ipfs/{cid}/path` traversal; CARv2 responses
//!   (CAR imports read CARv2, responses are CARv1).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;

use crate::store::car::{self, DagScope, EntityBytes, Selection, SelectionError};
use crate::store::ipfs::block;
use crate::store::ipfs::dag::BlockSource;
use crate::store::ipfs::prefetch::PrefetchBudget;
use crate::store::ipfs::{Cid, IpfsError, Node};

const RAW_TYPE: &str = "application/vnd.ipld.raw";
const CAR_TYPE: &str = "application/vnd.ipld.car";
/// Content under a CID never changes.
const IMMUTABLE: &str = "public, max-age=29030400, immutable";

/// Why a request cannot be answered as asked (all 4xx).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("{text:?} is not a CID: {reason}")]
    BadCid { text: String, reason: String },
    #[error("format {0:?} is not served here: use raw or car")]
    Format(String),
    #[error("this is a trustless gateway: ask for ?format=raw or ?format=car (or Accept: {RAW_TYPE} or {CAR_TYPE})")]
    NoFormat,
    #[error("CAR {param}={value} is not served here (version=1, order=dfs|unk, dups=y|n)")]
    CarParam { param: &'static str, value: String },
    #[error("entity-bytes needs dag-scope=entity (got dag-scope={0})")]
    BytesScope(&'static str),
    #[error("content paths under a CID are not supported here, only /ipfs/<cid>")]
    Path,
    #[error(transparent)]
    Selection(#[from] SelectionError),
}

impl RequestError {
    fn status(&self) -> StatusCode {
        match self {
            RequestError::CarParam { .. } => StatusCode::NOT_ACCEPTABLE,
            RequestError::Path => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// The response type a request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Car(Selection),
}

/// CAR content-type parameters (`version`, `order`, `dups`) from a media
/// range or the `car-*` query parameters; returns whether dups were asked.
fn car_params<'a>(
    params: impl Iterator<Item = (&'a str, &'a str)>,
    dups: &mut bool,
) -> Result<(), RequestError> {
    for (k, v) in params {
        let bad = |param| RequestError::CarParam {
            param,
            value: v.to_owned(),
        };
        match k {
            "version" if v != "1" => return Err(bad("version")),
            "order" if v != "dfs" && v != "unk" => return Err(bad("order")),
            "dups" => match v {
                "y" => *dups = true,
                "n" => *dups = false,
                _ => return Err(bad("dups")),
            },
            _ => {}
        }
    }
    Ok(())
}

/// One `Accept` entry: (q, media type, parameters).
type MediaRange<'a> = (f32, &'a str, Vec<(&'a str, &'a str)>);

/// Picks the response type: the `format` query parameter wins over
/// `Accept` (media ranges tried by descending `q`); `Ok(None)` when
/// neither asks for a trustless type.
pub fn negotiate(
    query: &HashMap<String, String>,
    accept: Option<&str>,
) -> Result<Option<Format>, RequestError> {
    let mut dups = false;
    let mut chosen = match query.get("format").map(String::as_str) {
        Some("raw") => Some(false),
        Some("car") => Some(true),
        Some(other) => return Err(RequestError::Format(other.to_owned())),
        None => None,
    };
    if let Some(accept) = accept {
        let mut ranges: Vec<MediaRange> = accept
            .split(',')
            .filter_map(|range| {
                let mut parts = range.split(';').map(str::trim);
                let media = parts.next()?;
                let params: Vec<(&str, &str)> = parts.filter_map(|p| p.split_once('=')).collect();
                let q = params
                    .iter()
                    .find(|(k, _)| *k == "q")
                    .and_then(|(_, v)| v.parse::<f32>().ok())
                    .unwrap_or(1.0);
                Some((q, media, params))
            })
            .filter(|(q, media, _)| *q > 0.0 && (*media == RAW_TYPE || *media == CAR_TYPE))
            .collect();
        ranges.sort_by(|a, b| b.0.total_cmp(&a.0));
        let wanted_car = chosen;
        for (_, media, params) in &ranges {
            let is_car = *media == CAR_TYPE;
            if wanted_car.is_some_and(|c| c != is_car) {
                continue;
            }
            if is_car {
                car_params(params.iter().copied(), &mut dups)?;
            }
            chosen = Some(is_car);
            break;
        }
    }
    let Some(is_car) = chosen else {
        return Ok(None);
    };
    if !is_car {
        return Ok(Some(Format::Raw));
    }
    let q = |k: &str| query.get(k).map(String::as_str);
    let car_query = [
        ("version", q("car-version")),
        ("order", q("car-order")),
        ("dups", q("car-dups")),
    ];
    car_params(
        car_query.iter().filter_map(|(k, v)| v.map(|v| (*k, v))),
        &mut dups,
    )?;
    let scope = q("dag-scope").map(str::parse::<DagScope>).transpose()?;
    let bytes = q("entity-bytes")
        .map(str::parse::<EntityBytes>)
        .transpose()?;
    let scope = match (scope, bytes) {
        (Some(s), Some(_)) if s != DagScope::Entity => {
            return Err(RequestError::BytesScope(s.as_str()))
        }
        (_, Some(_)) => DagScope::Entity,
        (s, None) => s.unwrap_or_default(),
    };
    Ok(Some(Format::Car(Selection { scope, bytes, dups })))
}

/// The trustless routes, to merge into the gateway's router.
pub fn router(node: Node) -> Router {
    Router::new()
        .route("/ipfs/{cid}", get(handle))
        .route("/ipfs/{cid}/{*path}", get(with_path))
        .with_state(node)
}

fn text(status: StatusCode, body: impl std::fmt::Display) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{body}\n"),
    )
        .into_response()
}

/// A path below a CID: a CID that does not parse is the client's mistake
/// (400, as without a path); pathing itself is not implemented (501).
async fn with_path(Path((cid_text, _path)): Path<(String, String)>) -> Response {
    let e = parse_cid(cid_text).err().unwrap_or(RequestError::Path);
    text(e.status(), e)
}

fn parse_cid(text: String) -> Result<Cid, RequestError> {
    text.parse::<Cid>().map_err(|e| RequestError::BadCid {
        reason: e.to_string(),
        text,
    })
}

async fn handle(
    State(node): State<Node>,
    Path(cid_text): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let cid = match parse_cid(cid_text.clone()) {
        Ok(c) => c,
        Err(e) => return text(e.status(), e),
    };
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = match negotiate(&query, accept) {
        Ok(Some(f)) => f,
        // The probe `GET /ipfs/bafkqaaa` answers with its (empty) bytes.
        Ok(None) if block::inline_data(&cid).is_some() => Format::Raw,
        Ok(None) => return text(StatusCode::BAD_REQUEST, RequestError::NoFormat),
        Err(e) => return text(e.status(), e),
    };
    let from_accept = !query.contains_key("format");
    let only_if_cached = headers
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("only-if-cached"));
    if only_if_cached && !matches!(node.store().has(&cid), Ok(true)) {
        return text(
            StatusCode::PRECONDITION_FAILED,
            format!("{cid} is not stored here (only-if-cached)"),
        );
    }
    let root = match verified_block(&node.blocks(), cid).await {
        Ok(data) => data,
        Err(e) => return block_error(cid, e),
    };
    let etag = match format {
        Format::Raw => format!("\"{cid}.raw\""),
        Format::Car(sel) => format!(
            "\"{cid}.car.{}.{}.dfs.{}\"",
            sel.scope.as_str(),
            sel.bytes.map_or_else(|| "-".to_owned(), |b| b.to_string()),
            if sel.dups { "y" } else { "n" }
        ),
    };
    let cached = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let (status, body, ctype, ext, location) = match format {
        Format::Raw => {
            let len = root.len();
            (
                StatusCode::OK,
                Body::from(root),
                RAW_TYPE.to_owned(),
                "bin",
                (from_accept, "raw", Some(len)),
            )
        }
        Format::Car(sel) => {
            let source: Arc<dyn BlockSource> = Arc::new(Primed {
                cid,
                data: root,
                inner: node.blocks(),
            });
            let stream = car::export(source, cid, sel).map(move |item| {
                item.map_err(|e| {
                    tracing::warn!(%cid, "trustless CAR stream cut short: {e}");
                    std::io::Error::other(e.to_string())
                })
            });
            (
                StatusCode::OK,
                Body::from_stream(stream),
                format!(
                    "{CAR_TYPE}; version=1; order=dfs; dups={}",
                    if sel.dups { "y" } else { "n" }
                ),
                "car",
                (from_accept, "car", None),
            )
        }
    };
    let status = if cached {
        StatusCode::NOT_MODIFIED
    } else {
        status
    };
    let mut response = if cached {
        status.into_response()
    } else {
        (status, body).into_response()
    };
    let h = response.headers_mut();
    let mut set = |name: header::HeaderName, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    };
    set(header::CONTENT_TYPE, ctype);
    set(
        header::CONTENT_DISPOSITION,
        format!("attachment; filename=\"{cid}.{ext}\""),
    );
    set(header::ETAG, etag);
    set(header::CACHE_CONTROL, IMMUTABLE.to_owned());
    set(header::VARY, "Accept".to_owned());
    set(header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned());
    set(
        header::HeaderName::from_static("x-ipfs-path"),
        format!("/ipfs/{cid}"),
    );
    let (from_accept, fmt, len) = location;
    if from_accept {
        set(
            header::CONTENT_LOCATION,
            format!("/ipfs/{cid_text}?format={fmt}"),
        );
    }
    if let (Some(len), false) = (len, cached) {
        set(header::CONTENT_LENGTH, len.to_string());
    }
    response
}

/// A block from the node (local, else peers), re-hashed against its CID.
async fn verified_block(source: &Arc<dyn BlockSource>, cid: Cid) -> Result<Bytes, IpfsError> {
    if let Some(data) = block::inline_data(&cid) {
        return Ok(data);
    }
    let data = source.get(cid).await?;
    tokio::task::spawn_blocking(move || block::verify(&cid, &data).map(|()| data))
        .await
        .map_err(|e| IpfsError::Task {
            reason: e.to_string(),
        })?
}

/// Maps a failure to get the requested block to the spec's status codes.
fn block_error(cid: Cid, e: IpfsError) -> Response {
    match e {
        IpfsError::FetchTimeout { .. } => text(StatusCode::GATEWAY_TIMEOUT, e),
        IpfsError::BlockMissing { .. } => text(StatusCode::NOT_FOUND, e),
        IpfsError::UnsupportedCid { .. } => text(StatusCode::BAD_REQUEST, e),
        IpfsError::HashMismatch { .. } => {
            tracing::error!(%cid, "refusing to serve a block that fails verification: {e}");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("block {cid} failed verification here and is not served"),
            )
        }
        e => {
            tracing::error!(%cid, "trustless gateway: {e}");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read {cid}"),
            )
        }
    }
}

/// The node's blocks, with the root already in hand (it was fetched to
/// choose the status code, and may not be stored locally).
struct Primed {
    cid: Cid,
    data: Bytes,
    inner: Arc<dyn BlockSource>,
}

impl BlockSource for Primed {
    fn get(&self, cid: Cid) -> BoxFuture<'static, Result<Bytes, IpfsError>> {
        if cid == self.cid {
            let data = self.data.clone();
            return Box::pin(async move { Ok(data) });
        }
        self.inner.get(cid)
    }

    fn prefetch(&self) -> Option<&PrefetchBudget> {
        self.inner.prefetch()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn car(scope: DagScope, bytes: Option<&str>, dups: bool) -> Option<Format> {
        Some(Format::Car(Selection {
            scope,
            bytes: bytes.map(|b| b.parse().unwrap()),
            dups,
        }))
    }

    #[test]
    fn format_query_wins_over_accept() {
        let raw_accept = Some(RAW_TYPE);
        assert_eq!(
            negotiate(&q(&[("format", "car")]), raw_accept),
            Ok(car(DagScope::All, None, false))
        );
        assert_eq!(negotiate(&q(&[]), raw_accept), Ok(Some(Format::Raw)));
        assert_eq!(
            negotiate(&q(&[("format", "raw")]), None),
            Ok(Some(Format::Raw))
        );
        assert_eq!(negotiate(&q(&[]), Some("*/*")), Ok(None));
        assert_eq!(negotiate(&q(&[]), None), Ok(None));
        assert!(matches!(
            negotiate(&q(&[("format", "dag-json")]), None),
            Err(RequestError::Format(f)) if f == "dag-json"
        ));
    }

    #[test]
    fn accept_ranges_by_q_with_car_parameters() {
        let accept = "application/vnd.ipld.raw;q=0.5, application/vnd.ipld.car; version=1; order=dfs; dups=y";
        assert_eq!(
            negotiate(&q(&[]), Some(accept)),
            Ok(car(DagScope::All, None, true))
        );
        let err = negotiate(&q(&[]), Some("application/vnd.ipld.car;version=2")).unwrap_err();
        assert_eq!(err.status(), StatusCode::NOT_ACCEPTABLE);
        assert_eq!(
            negotiate(&q(&[]), Some("application/vnd.ipld.car;q=0, text/html")),
            Ok(None)
        );
    }

    #[test]
    fn scope_and_entity_bytes_from_the_query() {
        assert_eq!(
            negotiate(
                &q(&[
                    ("format", "car"),
                    ("entity-bytes", "0:99"),
                    ("car-dups", "y")
                ]),
                None
            ),
            Ok(car(DagScope::Entity, Some("0:99"), true))
        );
        assert_eq!(
            negotiate(&q(&[("format", "car"), ("dag-scope", "block")]), None),
            Ok(car(DagScope::Block, None, false))
        );
        assert!(matches!(
            negotiate(
                &q(&[
                    ("format", "car"),
                    ("dag-scope", "all"),
                    ("entity-bytes", "0:*")
                ]),
                None
            ),
            Err(RequestError::BytesScope("all"))
        ));
        assert!(negotiate(&q(&[("format", "car"), ("dag-scope", "x")]), None).is_err());
        assert!(negotiate(&q(&[("format", "car"), ("entity-bytes", "1-2")]), None).is_err());
    }
}
