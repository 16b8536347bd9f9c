//! The local admin API: how CLI commands act on a running gateway, as Kubo's
//! CLI does with its daemon (redb and the block store allow one process per
//! data directory). One endpoint takes an [`AdminRequest`] as JSON and runs
//! it on an [`AdminService`]. It is served only on a Unix socket in the data
//! directory ([`AdminSocket`], mode 0600 in a 0700 directory), never on the
//! TCP port: the socket's file permissions are the authorisation, so there
//! is no token to leak and no address a stale announcement could misdirect.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anchor_registry::PublicKey;
use anyhow::{anyhow, Context, Result};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::util::fs::WriteError;
use crate::util::progress::{Meter, Progress};

/// The admin socket's file inside the data dir (mode 0600).
pub const SOCKET_FILE: &str = "admin.sock";
/// The admin endpoint's path on the socket.
pub const PATH: &str = "/api/v1/admin";
/// Where a client reads how far its running request has got:
/// `GET /api/v1/progress/<id>`, `<id>` as it sent in [`PROGRESS_HEADER`].
pub const PROGRESS_PATH: &str = "/api/v1/progress";
/// The request header naming a request's progress meter (1 to 64 ASCII
/// letters, digits or dashes, chosen by the client).
pub const PROGRESS_HEADER: &str = "x-nixpfs-progress";

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
    /// Re-check every block, pin, indexed path and stored set (`repo verify`).
    RepoVerify,
    Sync,
    Status,
    Conflicts,
    Peers,
    Id,
    /// Providers of a CID from the DHT and routers (`routing findprovs`).
    FindProviders {
        cid: String,
        limit: usize,
    },
    /// Announce a CID on the DHT (`routing provide`).
    Provide {
        cid: String,
    },
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
        /// Also publish the claims set under the key's IPNS name.
        #[serde(default)]
        ipns: bool,
    },
    /// Publish a signed set file under the IPNS name of the key that
    /// signed it (`anchor publish --ipns`).
    NamePublish {
        key_file: PathBuf,
        set_file: PathBuf,
    },
    /// Resolve and verify an IPNS name (`name resolve`).
    NameResolve {
        name: String,
    },
    /// Accept a claims set (file path, http(s) URL, `ipfs://<cid>` or `ipns://<name>`).
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

/// The reply to [`AdminRequest::NameResolve`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameReply {
    pub name: String,
    /// `/ipfs/<cid>`.
    pub value: String,
    pub sequence: u64,
    /// Unix seconds.
    pub validity: u64,
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

/// One provider in the reply to [`AdminRequest::FindProviders`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderReply {
    pub peer_id: String,
    /// Where the lookup said the provider listens.
    pub addrs: Vec<String>,
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

/// A conflict: registry anchors that signed different contents for one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub store_path: String,
    pub evidence: Vec<anchor_registry::Vouch>,
}

/// What `nixpfs status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    pub connected_peers: usize,
    pub pins: usize,
    pub pinned_bytes: u64,
    pub local_paths: u64,
    pub registry_version: Option<u64>,
    /// When the registry in force expires (unix seconds); past it, no path
    /// is served on anchor policy.
    #[serde(default)]
    pub registry_expires: Option<u64>,
    /// Why the last sync could not fetch the registry, if it could not.
    #[serde(default)]
    pub registry_error: Option<String>,
    /// Unix seconds when the last anchor sync finished, if any since start.
    pub last_sync: Option<u64>,
    pub anchors: Vec<AnchorStatus>,
    pub forks: usize,
    pub conflicts: usize,
    /// The DHT's routing table and provided keys; absent when it is off.
    #[serde(default)]
    pub dht: Option<crate::store::ipfs::dht::DhtStats>,
    /// Reproducibility verdicts over claimed, rebuilt and multiply signed paths.
    #[serde(default)]
    pub repro: crate::publish::ReproCounts,
    /// Each configured upstream cache with its last error.
    #[serde(default)]
    pub upstreams: Vec<crate::trust::upstream::UpstreamStatus>,
    pub counters: crate::util::metrics::MetricsSnapshot,
}

/// Per publisher: the newest set version trusted, and what the last sync
/// made of it. An anchor the last sync rejected appears even if none of its
/// sets was ever trusted (version, expiry and entries are then absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnchorStatus {
    pub name: String,
    pub kind: String,
    pub version: Option<u64>,
    pub expires: Option<u64>,
    pub entries: Option<u64>,
    /// The last sync's outcome for this publisher, if one ran since start.
    pub last_sync: Option<crate::trust::sync::Outcome>,
    /// Why the last sync rejected it: each source's error, in order.
    #[serde(default)]
    pub reason: Option<String>,
}

/// What runs admin requests: the opened data directory (`app` implements
/// it), kept behind a trait so this layer never depends on the one that
/// wires it.
pub trait AdminService: Send + Sync + 'static {
    /// Runs one request, counting a long one's progress into `meter`; the
    /// reply is JSON for both the CLI's `--json` and its text rendering.
    fn execute(
        &self,
        request: AdminRequest,
        meter: Meter,
    ) -> BoxFuture<'_, Result<Value, AdminError>>;
}

/// The service and the meters of the requests running on it that a client
/// asked to watch.
#[derive(Clone)]
struct Served {
    service: Arc<dyn AdminService>,
    meters: Arc<Mutex<Meters>>,
}

/// Watched meters by id; a finished request's meter stays until its client
/// reads it once more (to end its bar with the final count), or
/// [`FINISHED_KEPT`] passes.
type Meters = HashMap<String, (Meter, Option<std::time::Instant>)>;

/// How long a finished request's meter waits for its client's last read.
const FINISHED_KEPT: Duration = Duration::from_secs(60);

/// A watched request's meter, marked finished when the request ends however
/// it ends.
struct Watched {
    meters: Arc<Mutex<Meters>>,
    id: String,
}

impl Watched {
    fn start(meters: &Arc<Mutex<Meters>>, id: &str, meter: &Meter) -> Option<Self> {
        let mut all = meters.lock().ok()?;
        all.retain(|_, (_, finished)| finished.is_none_or(|at| at.elapsed() < FINISHED_KEPT));
        all.insert(id.to_owned(), (meter.clone(), None));
        Some(Self {
            meters: meters.clone(),
            id: id.to_owned(),
        })
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Ok(mut meters) = self.meters.lock() {
            if let Some((_, finished)) = meters.get_mut(&self.id) {
                *finished = Some(std::time::Instant::now());
            }
        }
    }
}

/// Whether a client-chosen progress id is one we keep: short and plain.
fn valid_progress_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The admin routes, served on the [`AdminSocket`] only: whoever can open
/// the socket may run every request, so they must never be merged into the
/// TCP router.
pub fn router(service: Arc<dyn AdminService>) -> Router {
    let served = Served {
        service,
        meters: Arc::default(),
    };
    Router::new()
        .route(PATH, post(handle))
        .route(&format!("{PROGRESS_PATH}/{{id}}"), get(progress))
        .with_state(served)
}

async fn progress(State(served): State<Served>, UrlPath(id): UrlPath<String>) -> Response {
    let meter = served.meters.lock().ok().and_then(|mut meters| {
        let (meter, finished) = meters.get(&id)?.clone();
        if finished.is_some() {
            meters.remove(&id);
        }
        Some(meter)
    });
    match meter {
        Some(meter) => Json(meter.snapshot()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("no running request is watched as {id:?}\n"),
        )
            .into_response(),
    }
}

async fn handle(State(served): State<Served>, headers: HeaderMap, body: Bytes) -> Response {
    let request: AdminRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("bad admin request: {e}\n")).into_response()
        }
    };
    let meter = Meter::new();
    let watch_id = headers
        .get(PROGRESS_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| valid_progress_id(id));
    let _watched = watch_id.and_then(|id| Watched::start(&served.meters, id, &meter));
    match served.service.execute(request, meter).await {
        Ok(value) => Json(value).into_response(),
        Err(e) => {
            if e.kind == ErrorKind::Internal {
                tracing::error!("admin request failed: {}", e.message);
            }
            (e.kind.status(), Json(json!({ "error": e.message }))).into_response()
        }
    }
}

/// Why the admin socket could not be served or used.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another process answers on the socket: a second gateway on one data
    /// directory would fight over its index and blocks.
    #[error("another gateway is already serving {} (its admin socket {} answers)", .data_dir.display(), .path.display())]
    AlreadyServing { data_dir: PathBuf, path: PathBuf },
    /// The socket could have been made by someone else: the client will not
    /// send requests (paths, key files) to it.
    #[error("refusing the admin socket {}: {reason}", .path.display())]
    Untrusted { path: PathBuf, reason: &'static str },
    #[error("while {action} the admin socket {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    DataDir(#[from] WriteError),
}

impl SocketError {
    fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| Self::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// The bound admin socket of a serving gateway; its file is removed when
/// this (or the server made of it) is dropped.
#[derive(Debug)]
pub struct AdminSocket {
    listener: tokio::net::UnixListener,
    file: SocketFile,
}

/// The socket file we bound, removed on drop so the next start finds none.
#[derive(Debug)]
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl AdminSocket {
    /// Binds `<data_dir>/admin.sock` (within a Tokio runtime), after making
    /// the data directory 0700. A socket left by a crash (nobody answers)
    /// is replaced; one a live gateway answers on is
    /// [`SocketError::AlreadyServing`]. The socket is chmod 0600 before
    /// anything is accepted; until then the 0700 directory keeps others out.
    pub fn bind(data_dir: &Path) -> Result<Self, SocketError> {
        use std::os::unix::fs::PermissionsExt;
        crate::util::fs::ensure_private_dir(data_dir)?;
        let path = data_dir.join(SOCKET_FILE);
        match UnixStream::connect(&path) {
            Ok(_) => {
                return Err(SocketError::AlreadyServing {
                    data_dir: data_dir.to_owned(),
                    path,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(&path)
                    .map_err(SocketError::io("removing the stale", &path))?;
                tracing::info!("removed the stale admin socket {}", path.display());
            }
            Err(e) => return Err(SocketError::io("probing", &path)(e)),
        }
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .map_err(SocketError::io("binding", &path))?;
        let file = SocketFile(path);
        let path = &file.0;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(SocketError::io("restricting", path))?;
        listener
            .set_nonblocking(true)
            .map_err(SocketError::io("configuring", path))?;
        let listener = tokio::net::UnixListener::from_std(listener)
            .map_err(SocketError::io("registering", path))?;
        Ok(Self { listener, file })
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.file.0
    }

    /// Serves the admin API on the socket until `shutdown` completes (and
    /// the requests running then are answered), then removes the socket.
    pub async fn serve(
        self,
        service: Arc<dyn AdminService>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        let Self { listener, file } = self;
        let router = router(service).layer(tower_http::trace::TraceLayer::new_for_http());
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await;
        drop(file);
        served
    }
}

/// Admin requests may run for hours (a closure pin, a rebuild).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// How often a watching client asks how far its request has got.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);
/// The largest reply the client reads (a big node's `pins` is a few MB).
const MAX_REPLY_BYTES: u64 = 1 << 30;
/// The longest status or header line the client reads.
const MAX_LINE_BYTES: u64 = 64 * 1024;
/// The most header lines the client reads.
const MAX_HEADERS: usize = 100;

/// A client for a running gateway's admin API: blocking HTTP/1.1 over its
/// Unix socket, one connection per request (the CLI makes one or two).
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// The gateway serving `data_dir`, if one is: `None` when no socket
    /// answers (there is none, or a crash left it). A socket in a directory
    /// others may write to, or owned by someone other than the directory's
    /// owner, is refused: someone may have planted it to collect requests.
    pub fn discover(data_dir: &Path) -> Result<Option<Self>, SocketError> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let path = data_dir.join(SOCKET_FILE);
        let socket = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(SocketError::io("inspecting", &path)(e)),
        };
        let dir = std::fs::metadata(data_dir).map_err(SocketError::io("inspecting", &path))?;
        let untrusted = |reason| SocketError::Untrusted {
            path: path.clone(),
            reason,
        };
        if dir.permissions().mode() & 0o022 != 0 {
            return Err(untrusted(
                "its directory is writable by other users (chmod 700 the data directory)",
            ));
        }
        if socket.uid() != dir.uid() {
            return Err(untrusted(
                "it belongs to another user than the data directory",
            ));
        }
        match UnixStream::connect(&path) {
            Ok(_) => Ok(Some(Self { socket: path })),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(SocketError::io("connecting to", &path)(e)),
        }
    }

    /// Sends one request; the gateway's error message becomes ours.
    pub fn call(&self, request: &AdminRequest) -> Result<Value> {
        self.call_with(request, None)
    }

    /// [`Client::call`], handing `watch` the request's progress about five
    /// times a second while it runs.
    pub fn call_watching(
        &self,
        request: &AdminRequest,
        mut watch: impl FnMut(Progress),
    ) -> Result<Value> {
        use rand_core::RngCore;
        let id = format!("{:016x}", rand_core::OsRng.next_u64());
        let (done, result) = std::sync::mpsc::channel();
        let client = self.clone();
        let sent = request.clone();
        let watched = id.clone();
        std::thread::spawn(move || {
            let _ = done.send(client.call_with(&sent, Some(&watched)));
        });
        let path = format!("{PROGRESS_PATH}/{id}");
        let mut look = || {
            // Not watched yet: nothing to show this round.
            if let Ok((200, body)) = exchange(&self.socket, "GET", &path, &[], None) {
                if let Ok(progress) = serde_json::from_slice(&body) {
                    watch(progress);
                }
            }
        };
        loop {
            match result.recv_timeout(WATCH_INTERVAL) {
                Ok(reply) => {
                    // The final count, which the gateway keeps for this read.
                    look();
                    return reply;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(anyhow!("the admin request's thread ended without a reply"))
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => look(),
            }
        }
    }

    fn call_with(&self, request: &AdminRequest, watch_id: Option<&str>) -> Result<Value> {
        let body = serde_json::to_vec(request)?;
        let (status, reply) =
            exchange(&self.socket, "POST", PATH, &body, watch_id).with_context(|| {
                format!(
                    "cannot reach the running gateway at {}",
                    self.socket.display()
                )
            })?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&reply)
                .context("the running gateway answered with something not JSON");
        }
        let text = String::from_utf8_lossy(&reply);
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| text.into_owned());
        Err(anyhow!("{}", message.trim()))
    }
}

/// One request with `body` to `path` on the socket, its progress watched
/// as `watch_id` if given: the reply's status and body.
fn exchange(
    socket: &Path,
    method: &str,
    path: &str,
    body: &[u8],
    watch_id: Option<&str>,
) -> io::Result<(u16, Vec<u8>)> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let watch = watch_id.map_or_else(String::new, |id| format!("{PROGRESS_HEADER}: {id}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{watch}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()?;
    read_response(BufReader::new(stream))
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed HTTP reply: {what}"),
    )
}

/// Reads an HTTP/1.1 response: status line, headers, then a body framed by
/// `Content-Length`, chunked, or (with neither) by the connection's end.
fn read_response(mut reader: impl BufRead) -> io::Result<(u16, Vec<u8>)> {
    let status_line = read_line(&mut reader)?;
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| invalid("no status line"))?;
    let mut length = None;
    let mut chunked = false;
    for _ in 0..=MAX_HEADERS {
        let line = read_line(&mut reader)?;
        if line.is_empty() {
            let body = if chunked {
                read_chunked(&mut reader)?
            } else if let Some(length) = length {
                read_exactly(&mut reader, length)?
            } else {
                read_exactly_or_eof(&mut reader)?
            };
            return Ok((status, body));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid("a header without a colon"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<u64>()
                    .map_err(|_| invalid("a bad Content-Length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        }
    }
    Err(invalid("too many headers"))
}

/// One CRLF- (or LF-) terminated line without its terminator.
fn read_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    reader
        .by_ref()
        .take(MAX_LINE_BYTES)
        .read_until(b'\n', &mut line)?;
    if line.pop() != Some(b'\n') {
        return Err(invalid("a line too long or cut short"));
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| invalid("a line that is not UTF-8"))
}

fn read_exactly(reader: &mut impl BufRead, length: u64) -> io::Result<Vec<u8>> {
    if length > MAX_REPLY_BYTES {
        return Err(invalid("a reply too large"));
    }
    let mut body = Vec::new();
    reader.by_ref().take(length).read_to_end(&mut body)?;
    if body.len() as u64 != length {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the gateway closed the connection mid-reply",
        ));
    }
    Ok(body)
}

fn read_exactly_or_eof(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    reader
        .by_ref()
        .take(MAX_REPLY_BYTES + 1)
        .read_to_end(&mut body)?;
    if body.len() as u64 > MAX_REPLY_BYTES {
        return Err(invalid("a reply too large"));
    }
    Ok(body)
}

fn read_chunked(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(reader)?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size, 16).map_err(|_| invalid("a bad chunk size"))?;
        if size == 0 {
            // Trailers, if any, up to the closing empty line.
            for _ in 0..=MAX_HEADERS {
                if read_line(reader)?.is_empty() {
                    return Ok(body);
                }
            }
            return Err(invalid("too many trailers"));
        }
        if size > MAX_REPLY_BYTES.saturating_sub(body.len() as u64) {
            return Err(invalid("a reply too large"));
        }
        body.extend(read_exactly(reader, size)?);
        if !read_line(reader)?.is_empty() {
            return Err(invalid("a chunk longer than its size"));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// Answers `status` with the request's op; `gc` fails as a conflict.
    struct Echo;

    impl AdminService for Echo {
        fn execute(
            &self,
            request: AdminRequest,
            meter: Meter,
        ) -> BoxFuture<'_, Result<Value, AdminError>> {
            Box::pin(async move {
                match request {
                    AdminRequest::Gc => Err(AdminError {
                        kind: ErrorKind::Conflict,
                        message: "not now".to_owned(),
                    }),
                    // Counts slowly, so a watching client sees it move.
                    AdminRequest::Sync => {
                        meter.start("counting", crate::util::progress::Unit::Items, Some(5));
                        for _ in 0..5 {
                            tokio::time::sleep(Duration::from_millis(150)).await;
                            meter.add(1);
                        }
                        Ok(json!("counted"))
                    }
                    other => Ok(json!({ "echo": other })),
                }
            })
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_socket_is_private_and_the_client_reaches_the_gateway_on_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        std::fs::create_dir(&data_dir).expect("mkdir");
        std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let socket = AdminSocket::bind(&data_dir).expect("bind");
        assert_eq!(socket.path(), data_dir.join(SOCKET_FILE));
        assert_eq!(mode(socket.path()), 0o600, "the socket is the owner's only");
        assert_eq!(mode(&data_dir), 0o700, "so is its directory");

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(socket.serve(Arc::new(Echo), async {
            let _ = stopped.await;
        }));
        let calls = data_dir.clone();
        let (status, gc) = tokio::task::spawn_blocking(move || {
            let client = Client::discover(&calls)
                .expect("a trustworthy socket")
                .expect("a serving gateway");
            let mut seen = Vec::new();
            let counted = client.call_watching(&AdminRequest::Sync, |p| seen.push(p));
            assert_eq!(counted.expect("sync"), json!("counted"));
            assert!(!seen.is_empty(), "the watcher saw the request run");
            assert!(
                seen.iter()
                    .all(|p| p.label == "counting" && p.total == Some(5) && p.done <= 5),
                "{seen:?}"
            );
            assert_eq!(
                seen.last().map(|p| p.done),
                Some(5),
                "the final count: {seen:?}"
            );
            (
                client.call(&AdminRequest::Status),
                client.call(&AdminRequest::Gc),
            )
        })
        .await
        .expect("the client ran");
        assert_eq!(
            status.expect("status"),
            json!({ "echo": { "op": "status" } })
        );
        assert_eq!(gc.expect_err("gc fails").to_string(), "not now");

        // A second gateway on the same directory is refused while this one runs.
        let second = AdminSocket::bind(&data_dir).expect_err("a live gateway answers");
        assert!(
            matches!(second, SocketError::AlreadyServing { .. }),
            "{second}"
        );
        assert!(second.to_string().contains("already serving"), "{second}");

        stop.send(()).expect("the server waits");
        server.await.expect("joined").expect("served");
        assert!(
            !data_dir.join(SOCKET_FILE).exists(),
            "the socket is removed at shutdown"
        );
    }

    #[tokio::test]
    async fn a_stale_socket_is_not_discovered_and_is_replaced_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(SOCKET_FILE);
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        assert!(path.exists(), "a crash leaves the socket file behind");
        assert!(Client::discover(dir.path()).expect("trusted").is_none());
        let socket = AdminSocket::bind(dir.path()).expect("the stale socket is replaced");
        assert_eq!(mode(socket.path()), 0o600);
    }

    #[test]
    fn the_client_refuses_a_socket_others_could_have_planted() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(SOCKET_FILE), b"").expect("plant");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let err = Client::discover(dir.path()).expect_err("a world-writable directory");
        assert!(matches!(err, SocketError::Untrusted { .. }), "{err}");
    }

    #[test]
    fn replies_are_read_by_length_by_chunks_or_to_the_end() {
        let read = |raw: &str| read_response(raw.as_bytes());
        assert_eq!(
            read("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").expect("sized"),
            (200, b"{}".to_vec())
        );
        assert_eq!(
            read("HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
                .expect("chunked"),
            (409, b"abcde".to_vec())
        );
        assert_eq!(
            read("HTTP/1.0 500 Oops\n\nall of it").expect("to the end"),
            (500, b"all of it".to_vec())
        );
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        for raw in [
            "",
            "garbage\r\n\r\n",
            "HTTP/1.1 2x0 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nabc",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nffffffffffffffff\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 2",
        ] {
            assert!(
                read_response(raw.as_bytes()).is_err(),
                "{raw:?} was accepted"
            );
        }
    }
}
