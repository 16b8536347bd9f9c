//! The local admin API: how CLI commands act on a running gateway, as Kubo's
//! CLI does with its daemon (redb and the block store allow one process per
//! data directory). One endpoint takes an [`AdminRequest`] as JSON and runs
//! it on an [`AdminService`]; a bearer token in the data directory authorises it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anchor_registry::PublicKey;
use anyhow::{anyhow, Context, Result};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::util::metrics::Metrics;

/// Where a serving gateway announces its admin API inside the data dir.
pub const API_FILE: &str = "api.json";
/// The admin token's file inside the data dir (mode 0600).
pub const TOKEN_FILE: &str = "admin.token";
const PATH: &str = "/api/v1/admin";

/// One operation on the gateway's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum AdminRequest {
    Pin {
        targets: Vec<String>,
        closure: bool,
    },
    Unpin {
        targets: Vec<String>,
    },
    Pins,
    Add {
        path: PathBuf,
    },
    Fetch {
        cid: String,
        out: PathBuf,
    },
    /// Write the DAG under a CID as a CARv1 file.
    CarExport {
        cid: String,
        out: PathBuf,
    },
    /// Store a CAR file's blocks (verified) and pin its roots.
    CarImport {
        path: PathBuf,
    },
    Gc,
    Sync,
    Status,
    Conflicts,
    Peers,
    Id,
    Seed {
        anchors: Vec<String>,
        max_size: Option<u64>,
    },
    AnchorSign {
        targets: Vec<String>,
        closure: bool,
        key_file: PathBuf,
    },
    /// Seed store paths and publish the contributor's claims about them.
    Contribute {
        targets: Vec<String>,
        closure: bool,
        key_file: PathBuf,
        out: Option<PathBuf>,
        expires: u64,
    },
    /// Accept a claims set (file path, http(s) URL or `ipfs://<cid>`).
    ImportClaims {
        source: String,
    },
    Claims,
    /// Rebuild derivations and sign this node's own results.
    AnchorRebuild {
        targets: Vec<String>,
        key_file: PathBuf,
        only_if_matches: bool,
    },
    Repro,
}

/// The reply to [`AdminRequest::Fetch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchReply {
    /// Bytes written to the output file.
    pub bytes: u64,
}

/// The reply to [`AdminRequest::Id`]: who this node is to IPFS peers and to Nix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdReply {
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    /// The key this gateway signs narinfos with.
    pub gateway_key: PublicKey,
}

/// One connected peer in the reply to [`AdminRequest::Peers`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReply {
    pub peer_id: String,
    /// From identify, once the peer has told us.
    pub agent_version: Option<String>,
}

/// How a failed request is answered: the caller's mistake, something that
/// does not exist, a clash with what is stored, or our own fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    BadRequest,
    NotFound,
    Conflict,
    Internal,
}

impl ErrorKind {
    /// The HTTP status the admin API answers with.
    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::UNPROCESSABLE_ENTITY,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Conflict => StatusCode::CONFLICT,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// What the innermost typed error of `err`'s chain says about whose
    /// fault it is; an error no layer classified is the caller's (a bad
    /// argument), as the admin API answered before it had kinds.
    fn of(err: &anyhow::Error) -> Self {
        use crate::store::index::IndexError;
        use crate::store::ipfs::IpfsError;
        for cause in err.chain() {
            if let Some(e) = cause.downcast_ref::<IpfsError>() {
                return match e {
                    IpfsError::NotPinned { .. }
                    | IpfsError::BlockMissing { .. }
                    | IpfsError::FetchTimeout { .. } => Self::NotFound,
                    IpfsError::Io { .. }
                    | IpfsError::PinDb { .. }
                    | IpfsError::Identity { .. }
                    | IpfsError::Host { .. }
                    | IpfsError::Task { .. } => Self::Internal,
                    _ => Self::BadRequest,
                };
            }
            if cause.downcast_ref::<IndexError>().is_some()
                || cause.downcast_ref::<tokio::task::JoinError>().is_some()
            {
                return Self::Internal;
            }
            if cause
                .downcast_ref::<crate::publish::pin::NotPinned>()
                .is_some()
            {
                return Self::NotFound;
            }
            if let Some(crate::publish::ClaimsError::NameTaken { .. }) = cause.downcast_ref() {
                return Self::Conflict;
            }
            if let Some(e) = cause.downcast_ref::<std::io::Error>() {
                return match e.kind() {
                    std::io::ErrorKind::NotFound => Self::NotFound,
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::AlreadyExists => {
                        Self::BadRequest
                    }
                    _ => Self::Internal,
                };
            }
        }
        Self::BadRequest
    }
}

/// A failed admin request: its kind and the whole cause chain as a sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct AdminError {
    pub kind: ErrorKind,
    pub message: String,
}

impl From<anyhow::Error> for AdminError {
    fn from(err: anyhow::Error) -> Self {
        Self {
            kind: ErrorKind::of(&err),
            message: format!("{err:#}"),
        }
    }
}

/// What runs admin requests: the opened data directory (`app` implements
/// it), kept behind a trait so this layer never depends on the one that
/// wires it.
pub trait AdminService: Send + Sync + 'static {
    /// Runs one request; the reply is JSON for both the CLI's `--json` and
    /// its text rendering.
    fn execute(&self, request: AdminRequest) -> BoxFuture<'_, Result<Value, AdminError>>;
}

struct AdminState {
    service: Arc<dyn AdminService>,
    metrics: Arc<Metrics>,
    token: String,
}

/// The admin route, to merge into the gateway's router.
pub fn router(service: Arc<dyn AdminService>, metrics: Arc<Metrics>, token: String) -> Router {
    Router::new()
        .route(PATH, post(handle))
        .with_state(Arc::new(AdminState {
            service,
            metrics,
            token,
        }))
}

async fn handle(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !presented.is_some_and(|t| constant_time_eq(t.as_bytes(), state.token.as_bytes())) {
        Metrics::inc(&state.metrics.auth_failures);
        tracing::warn!("admin request with a missing or wrong token refused");
        return (
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token (see <data-dir>/admin.token)\n",
        )
            .into_response();
    }
    let request: AdminRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("bad admin request: {e}\n")).into_response()
        }
    };
    match state.service.execute(request).await {
        Ok(value) => Json(value).into_response(),
        Err(e) => {
            if e.kind == ErrorKind::Internal {
                tracing::error!("admin request failed: {}", e.message);
            }
            (e.kind.status(), Json(json!({ "error": e.message }))).into_response()
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a serving gateway writes so CLI commands can find it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiAnnouncement {
    pub url: String,
    pub pid: u32,
}

/// Creates (or reads) the admin token of a data directory.
pub fn ensure_token(data_dir: &Path) -> Result<String> {
    let path = data_dir.join(TOKEN_FILE);
    if let Ok(token) = std::fs::read_to_string(&path) {
        let token = token.trim().to_owned();
        if !token.is_empty() {
            return Ok(token);
        }
    }
    let mut bytes = [0u8; 32];
    getrandom(&mut bytes)?;
    let token = hex::encode(bytes);
    crate::util::fs::write_secret_file(&path, &token)
        .with_context(|| format!("while writing {}", path.display()))?;
    Ok(token)
}

fn getrandom(buf: &mut [u8]) -> Result<()> {
    use rand_core::{OsRng, RngCore};
    OsRng
        .try_fill_bytes(buf)
        .map_err(|e| anyhow!("no OS randomness: {e}"))
}

/// Announces the admin API of a gateway listening on `addr`.
pub fn announce(data_dir: &Path, addr: SocketAddr) -> Result<()> {
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        addr.ip().to_string()
    };
    let announcement = ApiAnnouncement {
        url: format!("http://{host}:{}", addr.port()),
        pid: std::process::id(),
    };
    crate::util::fs::write_atomically(
        &data_dir.join(API_FILE),
        serde_json::to_string(&announcement)?.as_bytes(),
    )?;
    Ok(())
}

/// Removes the announcement when the gateway stops.
pub fn withdraw(data_dir: &Path) {
    let _ = std::fs::remove_file(data_dir.join(API_FILE));
}

/// A client for a running gateway's admin API.
#[derive(Debug, Clone)]
pub struct Client {
    url: String,
    token: String,
}

impl Client {
    /// The running gateway of `data_dir`, if one announced itself and answers.
    pub fn discover(data_dir: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(data_dir.join(API_FILE)).ok()?;
        let announcement: ApiAnnouncement = serde_json::from_str(&text).ok()?;
        let token = std::fs::read_to_string(data_dir.join(TOKEN_FILE)).ok()?;
        let alive = std::path::Path::new(&format!("/proc/{}", announcement.pid)).exists();
        alive.then(|| Self {
            url: format!("{}{PATH}", announcement.url),
            token: token.trim().to_owned(),
        })
    }

    /// Sends one request; the gateway's error message becomes ours.
    pub fn call(&self, request: &AdminRequest) -> Result<Value> {
        let response = ureq::post(&self.url)
            .set("Authorization", &format!("Bearer {}", self.token))
            .timeout(std::time::Duration::from_secs(24 * 3600))
            .send_json(serde_json::to_value(request)?);
        match response {
            Ok(r) => Ok(r.into_json()?),
            Err(ureq::Error::Status(_, r)) => {
                let text = r.into_string().unwrap_or_default();
                let message = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or(text);
                Err(anyhow!("{}", message.trim()))
            }
            Err(e) => Err(anyhow!(
                "cannot reach the running gateway at {}: {e}",
                self.url
            )),
        }
    }
}
