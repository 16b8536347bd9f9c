//! The local admin API: how CLI commands act on a running gateway, as Kubo's
//! CLI does with its daemon (redb and the block store allow one process per
//! data directory). One endpoint takes an [`AdminRequest`] as JSON and runs
//! it on the [`App`]; a bearer token in the data directory authorises it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::app::App;
use crate::metrics::Metrics;

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

/// Runs one request on the opened state; the reply is JSON for both the
/// CLI's `--json` and its text rendering.
pub async fn execute(app: &App, request: AdminRequest) -> Result<Value> {
    Ok(match request {
        AdminRequest::Pin { targets, closure } => json!(app.pin(&targets, closure).await?),
        AdminRequest::Unpin { targets } => json!(app.unpin(&targets).await?),
        AdminRequest::Pins => json!(app.pins().await?),
        AdminRequest::Add { path } => json!(app.add_file(&path).await?),
        AdminRequest::Fetch { cid, out } => json!({ "bytes": app.fetch(&cid, &out).await? }),
        AdminRequest::CarExport { cid, out } => {
            json!(crate::car::export_file(&app.node, crate::app::parse_cid(&cid)?, &out).await?)
        }
        AdminRequest::CarImport { path } => {
            json!(crate::car::import_file(&app.node, &path).await?)
        }
        AdminRequest::Gc => {
            let report = app.node.gc().await?;
            json!({ "blocks": report.blocks, "bytes": report.bytes })
        }
        AdminRequest::Sync => json!(app.sync().await?),
        AdminRequest::Status => json!(app.status().await?),
        AdminRequest::Conflicts => json!(app.conflicts().await?),
        AdminRequest::Peers => {
            let peers = app.node.connected_peers().await?;
            json!(peers
                .iter()
                .map(|p| json!({ "peer_id": p.peer_id.to_string(), "agent_version": p.agent_version }))
                .collect::<Vec<_>>())
        }
        AdminRequest::Seed { anchors, max_size } => json!(app.seed(&anchors, max_size).await?),
        AdminRequest::AnchorSign {
            targets,
            closure,
            key_file,
        } => json!(app.anchor_sign(&targets, closure, &key_file).await?),
        AdminRequest::Contribute {
            targets,
            closure,
            key_file,
            out,
            expires,
        } => json!(
            crate::community::contribute(app, &targets, closure, &key_file, out, expires).await?
        ),
        AdminRequest::ImportClaims { source } => {
            json!(crate::community::import_claims(app, &source).await?)
        }
        AdminRequest::Claims => json!(crate::community::list(app).await?),
        AdminRequest::AnchorRebuild {
            targets,
            key_file,
            only_if_matches,
        } => {
            let options = crate::community::RebuildOptions {
                key: crate::cli::read_secret_key(&key_file)?,
                only_if_matches,
            };
            json!(crate::community::rebuild(app, &targets, &options).await?)
        }
        AdminRequest::Repro => json!(crate::community::repro(app).await?),
        AdminRequest::Id => json!({
            "peer_id": app.node.peer_id().to_string(),
            "listen_addrs": app.node.listen_addrs().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "gateway_key": app.key.public().to_string(),
        }),
    })
}

#[derive(Debug)]
struct AdminState {
    app: App,
    token: String,
}

/// The admin route, to merge into the gateway's router.
pub fn router(app: App, token: String) -> Router {
    Router::new()
        .route(PATH, post(handle))
        .with_state(Arc::new(AdminState { app, token }))
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
        Metrics::inc(&state.app.metrics.auth_failures);
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
    match execute(&state.app, request).await {
        Ok(value) => Json(value).into_response(),
        Err(e) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "error": format!("{e:#}") })),
        )
            .into_response(),
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
    crate::cli::write_secret_file(&path, &token)
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
    crate::cli::write_atomically(
        &data_dir.join(API_FILE),
        serde_json::to_string(&announcement)?.as_bytes(),
    )
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
