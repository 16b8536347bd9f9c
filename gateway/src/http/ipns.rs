//! The IPNS part of Routing V1 over HTTP (IPIP-337): `GET` and `PUT
//! /routing/v1/ipns/{name}` with `application/vnd.ipfs.ipns-record` bodies.
//!
//! Goals: answer from what this gateway holds (its own published records,
//! ones it resolved or was given, the DHT's local store) and never by
//! asking other routers, so two gateways that list each other cannot loop;
//! check a PUT record completely (size, signature by the name's key,
//! validity, sequence not below the highest seen) before anything is
//! stored, refusing with a one-line reason (logged and counted); CORS for
//! browsers, as the spec asks.
//!
//! Non-goals: forwarding PUT records to the DHT (publishers do that
//! themselves), the historic provider write API.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::routing::{cors, preflight};
use crate::store::index::Index;
use crate::store::ipfs::ipns::{IpnsName, MAX_RECORD_BYTES};
use crate::store::ipfs::Node;
use crate::trust::names::{NameError, Names, RECORD_MEDIA_TYPE};
use crate::util::metrics::Metrics;

/// What the handlers read: the index, the node's DHT store, the counters.
#[derive(Debug, Clone)]
pub struct IpnsState {
    pub index: Arc<Index>,
    pub node: Node,
    pub metrics: Arc<Metrics>,
}

impl IpnsState {
    fn names(&self) -> Names<'_> {
        Names {
            index: &self.index,
            node: Some(&self.node),
            // Local knowledge only: a router never asks other routers.
            routers: &[],
            metrics: &self.metrics,
        }
    }
}

/// `/routing/v1/ipns/{name}`; bodies beyond the record limit are refused
/// before they are read whole.
pub fn router(state: Arc<IpnsState>) -> Router {
    Router::new()
        .route(
            "/routing/v1/ipns/{name}",
            get(get_record).put(put_record).options(preflight),
        )
        .layer(DefaultBodyLimit::max(MAX_RECORD_BYTES + 1))
        .layer(axum::middleware::from_fn(cors))
        .with_state(state)
}

fn text(status: StatusCode, message: String) -> Response {
    (status, format!("{message}\n")).into_response()
}

async fn get_record(State(state): State<Arc<IpnsState>>, Path(name): Path<String>) -> Response {
    let name = match name.parse::<IpnsName>() {
        Ok(name) => name,
        Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match state.names().local(&name).await {
        Ok(Some(record)) => {
            let mut response = record.into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(RECORD_MEDIA_TYPE),
            );
            // The record is signed; caches may keep it briefly, as the
            // spec suggests for IPNS answers.
            headers.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=60"),
            );
            headers.insert(header::VARY, HeaderValue::from_static("Accept"));
            response
        }
        Ok(None) => text(
            StatusCode::NOT_FOUND,
            format!("no valid IPNS record known here for {name}"),
        ),
        Err(e) => {
            tracing::error!(%name, "reading IPNS records failed: {e}");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "reading IPNS records failed".to_owned(),
            )
        }
    }
}

async fn put_record(
    State(state): State<Arc<IpnsState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let name = match name.parse::<IpnsName>() {
        Ok(name) => name,
        Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with(RECORD_MEDIA_TYPE) {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("send the record as Content-Type: {RECORD_MEDIA_TYPE}"),
        );
    }
    match state.names().accept(&name, body.to_vec()) {
        Ok(verified) => text(
            StatusCode::OK,
            format!(
                "stored {name} sequence {} -> /ipfs/{}",
                verified.sequence, verified.value
            ),
        ),
        Err(NameError::Index(e)) => {
            tracing::error!(%name, "storing an IPNS record failed: {e}");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "storing the record failed".to_owned(),
            )
        }
        Err(e @ NameError::Older { .. }) => text(StatusCode::CONFLICT, e.to_string()),
        Err(e @ NameError::NoRoom { .. }) => text(StatusCode::INSUFFICIENT_STORAGE, e.to_string()),
        Err(e) => text(StatusCode::BAD_REQUEST, e.to_string()),
    }
}
