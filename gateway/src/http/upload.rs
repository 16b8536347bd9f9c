//! Uploads from stock `nix copy --to http://…`: the `PUT`s and `HEAD`s Nix
//! sends to an HTTP binary cache. A NAR is decompressed on arrival, parsed as
//! a canonical NAR and hashed while it streams into the IPFS node, unpinned
//! ("staged"); only its narinfo, with a NarHash and NarSize matching what
//! arrived (and a trusted signature when required), gets it pinned and the
//! path indexed as the user's own, served and seeded from then on.
//!
//! `HEAD nar/<file>` answers 200 only when those bytes are here, complete
//! and verified (staged, or a verified local NAR): Nix then skips the upload.
//!
//! # Goals
//! - Accept what stock `nix copy --to http://…` sends (compression none, xz
//!   or zstd), with the token the user configured, and keep only NARs that
//!   are canonical and match the narinfo that names them.
//! - Never let an upload change what another path serves: an upload makes a
//!   path the uploader's own, signed by the gateway key, and nothing else.
//!
//! # Non-goals
//! - Multi-tenant caches, quotas or per-user tokens (one token per gateway).
//! - Storing compressed NARs: NARs live uncompressed on IPFS, so identical
//!   NARs dedupe to one CID across all seeders.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anchor_registry::{KeyError, NarHash, NarInfo, PublicKey, StorePathHash};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{head, put};
use axum::Router;
use base64::Engine;
use bytes::{Buf, Bytes};
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::store::index::{Index, LocalPath};
use crate::store::ipfs::{Cid, Node};
use crate::store::nar::{self, NarError, NarSummary};
use crate::trust::catalog::Catalog;
use crate::util::metrics::Metrics;
use crate::util::sync::lock;

/// How long an uploaded NAR waits for its narinfo before it is forgotten;
/// its unpinned blocks then go at the next `nixpfs gc`.
pub const STAGED_TTL: Duration = Duration::from_secs(3600);
/// Largest narinfo accepted (real ones are well under 4 KiB).
const MAX_NARINFO: usize = 64 * 1024;
/// Chunks in flight between the request body, the decoder thread and the
/// import: enough to keep all three busy, bounded for backpressure.
const PIPE_DEPTH: usize = 16;
/// Longest hash part accepted in a NAR file name (Nix writes 52).
const MAX_STEM: usize = 128;

/// How an uploaded NAR is compressed, from its file name's suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Xz,
    Zstd,
}

impl Compression {
    const ALL: [Compression; 3] = [Compression::None, Compression::Xz, Compression::Zstd];

    fn suffix(self) -> &'static str {
        match self {
            Compression::None => ".nar",
            Compression::Xz => ".nar.xz",
            Compression::Zstd => ".nar.zst",
        }
    }

    /// The name Nix uses in `?compression=` and narinfo `Compression:`.
    pub fn name(self) -> &'static str {
        self.decoding().name()
    }

    /// The decoder for it: the one upstream NARs use, memory limits included.
    fn decoding(self) -> nar::compression::Compression {
        match self {
            Compression::None => nar::compression::Compression::None,
            Compression::Xz => nar::compression::Compression::Xz,
            Compression::Zstd => nar::compression::Compression::Zstd,
        }
    }
}

/// The file name of an uploaded NAR: `<hash>.nar[.xz|.zst]`, where Nix puts
/// the nix32 sha256 of the file as sent (FileHash) before the suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarFile {
    stem: String,
    compression: Compression,
}

impl NarFile {
    /// Accepts a stem of 1 to 128 lowercase letters and digits and one of
    /// the suffixes this gateway can decompress.
    pub fn parse(file: &str) -> Option<Self> {
        Compression::ALL.into_iter().find_map(|compression| {
            let stem = file.strip_suffix(compression.suffix())?;
            let ok = !stem.is_empty()
                && stem.len() <= MAX_STEM
                && stem
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
            ok.then(|| NarFile {
                stem: stem.to_owned(),
                compression,
            })
        })
    }

    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// The narinfo `URL:` Nix writes for this file.
    pub fn url(&self) -> String {
        format!("nar/{self}")
    }
}

impl fmt::Display for NarFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.stem, self.compression.suffix())
    }
}

/// Why the upload routes could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("cannot read the upload token file {}: {source}", path.display())]
    TokenFile { path: PathBuf, source: io::Error },
    #[error("the upload token file {} is empty", path.display())]
    EmptyToken { path: PathBuf },
    #[error("invalid public key {key:?} in upload_require_sig: {source}")]
    RequireSigKey { key: String, source: KeyError },
}

/// Why one upload request was refused: a client's mistake is a 4xx with
/// this one-line reason; [`Rejection::Internal`] is ours (500, logged).
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("uploads are disabled: start the gateway with --upload-token-file FILE (config `upload_token_file`)")]
    Disabled,
    #[error("missing or wrong upload token: send it with HTTP basic auth (Nix: a netrc-file with `password TOKEN`)")]
    Unauthorized,
    #[error("cannot take NAR file {file}: expected <hash>.nar, <hash>.nar.xz or <hash>.nar.zst (nix copy --to '…?compression=none|xz|zstd')")]
    UnsupportedFile { file: String },
    #[error("upload of {file} broke off after {received} bytes: {reason}")]
    BodyRead {
        file: String,
        received: u64,
        reason: String,
    },
    #[error("{file} is not a valid NAR: {source}")]
    InvalidNar { file: String, source: NarError },
    #[error("{file} is not a narinfo name: expected <32-character store path hash>.narinfo")]
    BadNarinfoName { file: String },
    #[error("narinfo {file} is not valid: {reason}")]
    BadNarinfo { file: String, reason: String },
    #[error("narinfo {file} describes {store_path}, another store path")]
    NarinfoNameMismatch { file: String, store_path: String },
    #[error("the NAR of {store_path} ({url}, {nar_hash}) was never uploaded here, or expired: upload the NAR before its narinfo")]
    NarMissing {
        store_path: String,
        url: String,
        nar_hash: String,
    },
    #[error("NarHash mismatch for {store_path}: the narinfo says {expected}, the NAR uploaded as {url} is {got}")]
    NarHashMismatch {
        store_path: String,
        url: String,
        expected: String,
        got: String,
    },
    #[error("NarSize mismatch for {store_path}: the narinfo says {expected}, the NAR uploaded as {url} is {got} bytes")]
    NarSizeMismatch {
        store_path: String,
        url: String,
        expected: u64,
        got: u64,
    },
    #[error("{store_path} carries no valid signature by a key in upload_require_sig ({keys})")]
    Unsigned { store_path: String, keys: String },
    #[error("internal error {context}: {reason}")]
    Internal {
        context: &'static str,
        reason: String,
    },
}

impl Rejection {
    fn internal(context: &'static str, err: impl fmt::Display) -> Self {
        Rejection::Internal {
            context,
            reason: err.to_string(),
        }
    }

    /// The HTTP status this rejection is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::Disabled | Rejection::Unsigned { .. } => StatusCode::FORBIDDEN,
            Rejection::Unauthorized => StatusCode::UNAUTHORIZED,
            Rejection::UnsupportedFile { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Rejection::BodyRead { .. }
            | Rejection::InvalidNar { .. }
            | Rejection::BadNarinfoName { .. }
            | Rejection::BadNarinfo { .. }
            | Rejection::NarinfoNameMismatch { .. } => StatusCode::BAD_REQUEST,
            Rejection::NarMissing { .. } => StatusCode::CONFLICT,
            Rejection::NarHashMismatch { .. } | Rejection::NarSizeMismatch { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Rejection::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut resp = (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{self}\n"),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"nixpfs uploads\""),
            );
        }
        resp
    }
}

/// A NAR whose every block is here (see [`Uploads::held_nar`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldNar {
    /// Its size, for an uncompressed `.nar` (what `GET` sends).
    pub size: Option<u64>,
}

/// A NAR that arrived complete and canonical, waiting for its narinfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Staged {
    cid: Cid,
    summary: NarSummary,
    at: Instant,
}

/// Staged NARs by the narinfo URL they arrived under; entries older than
/// [`STAGED_TTL`] are dropped whenever a new one comes in.
#[derive(Debug, Default)]
struct Staging {
    by_url: HashMap<String, Staged>,
}

impl Staging {
    fn insert(&mut self, url: String, staged: Staged) {
        let now = staged.at;
        self.by_url
            .retain(|_, s| now.saturating_duration_since(s.at) < STAGED_TTL);
        self.by_url.insert(url, staged);
    }

    fn by_url(&self, url: &str, now: Instant) -> Option<Staged> {
        self.by_url
            .get(url)
            .copied()
            .filter(|s| now.saturating_duration_since(s.at) < STAGED_TTL)
    }

    /// Any staged NAR with these bytes, whatever name it came under.
    fn by_hash(&self, nar_hash: &NarHash, now: Instant) -> Option<Staged> {
        self.by_url.values().copied().find(|s| {
            s.summary.nar_hash == *nar_hash && now.saturating_duration_since(s.at) < STAGED_TTL
        })
    }
}

/// The upload side of the gateway: token, signature policy and staged NARs.
#[derive(Debug)]
pub struct Uploads {
    node: Node,
    index: Arc<Index>,
    /// Stores accepted paths in served form.
    catalog: Catalog,
    metrics: Arc<Metrics>,
    /// `None`: uploads are disabled (403).
    token: Option<String>,
    /// Non-empty: a narinfo needs a valid signature by one of these.
    require_sig: Vec<PublicKey>,
    staged: Mutex<Staging>,
}

impl Uploads {
    pub fn new(
        node: Node,
        catalog: Catalog,
        metrics: Arc<Metrics>,
        token: Option<String>,
        require_sig: Vec<PublicKey>,
    ) -> Self {
        Self {
            node,
            index: catalog.index().clone(),
            catalog,
            metrics,
            token,
            require_sig,
            staged: Mutex::new(Staging::default()),
        }
    }

    /// Reads the token file and parses the signature keys the configuration
    /// names (`upload_token_file`, `upload_require_sig`).
    pub fn configured(
        node: Node,
        catalog: Catalog,
        metrics: Arc<Metrics>,
        token_file: Option<&std::path::Path>,
        require_sig: &[String],
    ) -> Result<Self, UploadError> {
        let token = token_file.map(read_token).transpose()?;
        let require_sig = require_sig
            .iter()
            .map(|key| {
                PublicKey::parse(key).map_err(|source| UploadError::RequireSigKey {
                    key: key.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self::new(node, catalog, metrics, token, require_sig))
    }

    fn staging(&self) -> std::sync::MutexGuard<'_, Staging> {
        lock(&self.staged)
    }

    /// Checks the request's credentials against the token.
    pub fn authorize(&self, headers: &HeaderMap, what: &str) -> Result<(), Rejection> {
        let Some(token) = &self.token else {
            return Err(Rejection::Disabled);
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(credential);
        if presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
            return Ok(());
        }
        Metrics::inc(&self.metrics.auth_failures);
        tracing::warn!("upload of {what} refused: missing or wrong token");
        Err(Rejection::Unauthorized)
    }

    /// `PUT nar/<file>`: receives, decompresses, checks and stages a NAR.
    pub async fn put_nar(
        &self,
        file: &str,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<String, Rejection> {
        self.authorize(headers, file)?;
        let Some(nar_file) = NarFile::parse(file) else {
            return Err(Rejection::UnsupportedFile {
                file: file.to_owned(),
            });
        };
        let (cid, summary) = self.receive(&nar_file, body).await?;
        tracing::info!(
            file,
            cid = %cid,
            nar_hash = %summary.nar_hash,
            nar_size = summary.nar_size,
            "NAR uploaded, waiting for its narinfo"
        );
        self.staging().insert(
            nar_file.url(),
            Staged {
                cid,
                summary,
                at: Instant::now(),
            },
        );
        Ok(format!(
            "received {} ({} bytes as NAR), waiting for its narinfo",
            summary.nar_hash, summary.nar_size
        ))
    }

    /// Streams the body through the decoder and NAR parser (one blocking
    /// thread) into an unpinned import: every byte is read once from the
    /// network, hashed for NarHash once and for the CID once.
    async fn receive(&self, file: &NarFile, body: Body) -> Result<(Cid, NarSummary), Rejection> {
        let (raw_tx, raw_rx) = mpsc::channel::<io::Result<Bytes>>(PIPE_DEPTH);
        let (nar_tx, mut nar_rx) = mpsc::channel::<io::Result<Bytes>>(PIPE_DEPTH);
        let compression = file.compression();
        let decoder =
            tokio::task::spawn_blocking(move || decode_and_check(compression, raw_rx, nar_tx));
        let pump = async move {
            let mut stream = body.into_data_stream();
            let mut received = 0u64;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(chunk) => {
                        received += chunk.len() as u64;
                        if raw_tx.send(Ok(chunk)).await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let reason = e.to_string();
                        let _ = raw_tx.send(Err(io::Error::other(reason.clone()))).await;
                        return Err((received, reason));
                    }
                }
            }
            Ok(received)
        };
        let decoded = futures::stream::poll_fn(move |cx| nar_rx.poll_recv(cx));
        let import = self.node.add(tokio_util::io::StreamReader::new(decoded));
        let (pumped, imported) = tokio::join!(pump, import);
        let checked = decoder
            .await
            .map_err(|e| Rejection::internal("while decoding an upload", e))?;
        if let Err((received, reason)) = pumped {
            return Err(Rejection::BodyRead {
                file: file.to_string(),
                received,
                reason,
            });
        }
        let summary = checked.map_err(|source| Rejection::InvalidNar {
            file: file.to_string(),
            source,
        })?;
        let imported =
            imported.map_err(|e| Rejection::internal("while importing an uploaded NAR", e))?;
        if imported.size != summary.nar_size {
            return Err(Rejection::internal(
                "while importing an uploaded NAR",
                format!(
                    "imported {} bytes of a {}-byte NAR",
                    imported.size, summary.nar_size
                ),
            ));
        }
        Ok((imported.cid, summary))
    }

    /// `HEAD nar/<file>`: whether Nix may skip uploading these bytes, i.e.
    /// every block of them is here, and for an uncompressed `.nar` its size
    /// (what `GET` would send as `Content-Length`). A pinned DAG is whole
    /// by construction (a pin is recorded once every block is durable), so
    /// this costs two lookups; only unpinned bytes are walked.
    pub async fn held_nar(&self, file: &str) -> Option<HeldNar> {
        let nar_file = NarFile::parse(file)?;
        let uncompressed = nar_file.compression() == Compression::None;
        let staged = self.staging().by_url(&nar_file.url(), Instant::now());
        let (cid, size) = match staged {
            // An uncompressed staged NAR is named by its NarHash: the bytes
            // `GET` serves under this name once its narinfo arrives.
            Some(s) => (s.cid, s.summary.nar_size),
            None if uncompressed => self.verified_local(&nar_file.stem).await?,
            None => return None,
        };
        self.node
            .holds(cid)
            .await
            .unwrap_or(false)
            .then_some(HeldNar {
                size: uncompressed.then_some(size),
            })
    }

    /// The CID and size of a NAR (named by its nix32 NarHash) that was
    /// hashed whole here before.
    async fn verified_local(&self, nix32: &str) -> Option<(Cid, u64)> {
        let nar_hash = NarHash::parse(&format!("sha256:{nix32}")).ok()?;
        let index = self.index.clone();
        let location = tokio::task::spawn_blocking(move || index.nar_location(&nar_hash))
            .await
            .ok()?
            .ok()??;
        location
            .verified
            .then(|| location.cid.parse::<Cid>().ok())
            .flatten()
            .map(|cid| (cid, location.nar_size))
    }

    /// `PUT <hash>.narinfo`: checks the narinfo against the NAR that arrived,
    /// then pins and indexes the path as the user's own.
    pub async fn put_narinfo(
        &self,
        file: &str,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<String, Rejection> {
        self.authorize(headers, file)?;
        let hash = file
            .strip_suffix(".narinfo")
            .and_then(|h| StorePathHash::parse(h).ok())
            .ok_or_else(|| Rejection::BadNarinfoName {
                file: file.to_owned(),
            })?;
        let bad = |reason: String| Rejection::BadNarinfo {
            file: file.to_owned(),
            reason,
        };
        let bytes = axum::body::to_bytes(body, MAX_NARINFO)
            .await
            .map_err(|e| bad(format!("cannot read it (at most {MAX_NARINFO} bytes): {e}")))?;
        let text = std::str::from_utf8(&bytes).map_err(|e| bad(e.to_string()))?;
        let info = NarInfo::parse(text).map_err(|e| bad(e.to_string()))?;
        if *info.store_path.hash() != hash {
            return Err(Rejection::NarinfoNameMismatch {
                file: file.to_owned(),
                store_path: info.store_path.to_string(),
            });
        }
        self.check_signature(&info)?;
        let cid = self.find_nar(&info).await?;
        self.node
            .pin(cid)
            .await
            .map_err(|e| Rejection::internal("while pinning an uploaded NAR", e))?;
        let store_path = info.store_path.to_string();
        let local = LocalPath {
            narinfo: info,
            cid: cid.to_string(),
        };
        let catalog = self.catalog.clone();
        tokio::task::spawn_blocking(move || catalog.put_locals(vec![local]))
            .await
            .map_err(|e| Rejection::internal("while indexing an upload", e))?
            .map_err(|e| Rejection::internal("while indexing an upload", e))?;
        Metrics::inc(&self.metrics.uploads_accepted);
        tracing::info!(path = %store_path, cid = %cid, "uploaded path stored, pinned and served");
        Ok(format!("stored {store_path} as {cid}"))
    }

    fn check_signature(&self, info: &NarInfo) -> Result<(), Rejection> {
        if self.require_sig.is_empty() || self.require_sig.iter().any(|k| info.verify(k)) {
            return Ok(());
        }
        Err(Rejection::Unsigned {
            store_path: info.store_path.to_string(),
            keys: self
                .require_sig
                .iter()
                .map(|k| k.name().to_owned())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// The NAR this narinfo describes: staged under its URL (which must then
    /// match), else staged or verified here under its NarHash; all of its
    /// blocks must still be local.
    async fn find_nar(&self, info: &NarInfo) -> Result<Cid, Rejection> {
        let store_path = info.store_path.to_string();
        let now = Instant::now();
        let (by_url, by_hash) = {
            let staging = self.staging();
            (
                staging.by_url(&info.url, now),
                staging.by_hash(&info.nar_hash, now),
            )
        };
        let cid = match (by_url, by_hash) {
            (Some(staged), _) => {
                if staged.summary.nar_hash != info.nar_hash {
                    return Err(Rejection::NarHashMismatch {
                        store_path,
                        url: info.url.clone(),
                        expected: info.nar_hash.to_string(),
                        got: staged.summary.nar_hash.to_string(),
                    });
                }
                Some(staged)
            }
            (None, staged) => staged,
        }
        .map(|staged| {
            if staged.summary.nar_size == info.nar_size {
                Ok(staged.cid)
            } else {
                Err(Rejection::NarSizeMismatch {
                    store_path: store_path.clone(),
                    url: info.url.clone(),
                    expected: info.nar_size,
                    got: staged.summary.nar_size,
                })
            }
        })
        .transpose()?;
        let cid = match cid {
            Some(cid) => Some(cid),
            None => self.verified_local_sized(info).await,
        };
        let missing = || Rejection::NarMissing {
            store_path: store_path.clone(),
            url: info.url.clone(),
            nar_hash: info.nar_hash.to_string(),
        };
        let cid = cid.ok_or_else(missing)?;
        match self.node.has_all(cid).await {
            Ok(true) => Ok(cid),
            Ok(false) => Err(missing()),
            Err(e) => Err(Rejection::internal("while checking an uploaded NAR", e)),
        }
    }

    async fn verified_local_sized(&self, info: &NarInfo) -> Option<Cid> {
        let nar_hash = info.nar_hash;
        let index = self.index.clone();
        let location = tokio::task::spawn_blocking(move || index.nar_location(&nar_hash))
            .await
            .ok()?
            .ok()??;
        (location.verified && location.nar_size == info.nar_size)
            .then(|| location.cid.parse::<Cid>().ok())
            .flatten()
    }
}

/// Reads the token (surrounding whitespace ignored); an empty file is an
/// error rather than a token anyone could match.
fn read_token(path: &std::path::Path) -> Result<String, UploadError> {
    let text = std::fs::read_to_string(path).map_err(|source| UploadError::TokenFile {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(UploadError::EmptyToken {
            path: path.to_owned(),
        });
    }
    Ok(token.to_owned())
}

/// The secret in an `Authorization` header: the password of `Basic` (what
/// curl sends from a netrc file; the login is not checked), or a `Bearer`
/// token.
pub fn credential(value: &str) -> Option<String> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (_, password) = text.split_once(':')?;
        Some(password.to_owned())
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Some(rest.trim().to_owned())
    } else {
        None
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Runs on a blocking thread: decompresses the body, parses the NAR
/// (canonical form, NarHash, NarSize) and forwards every NAR byte to the
/// import. A failure is also sent down the pipe so the import stops.
fn decode_and_check(
    compression: Compression,
    raw: mpsc::Receiver<io::Result<Bytes>>,
    out: mpsc::Sender<io::Result<Bytes>>,
) -> Result<NarSummary, NarError> {
    let input = ChannelReader::new(raw);
    let decoded = compression
        .decoding()
        .decoder(input)
        .map_err(|source| NarError::Read { offset: 0, source })?;
    let result = nar::validate(Forward {
        inner: decoded,
        tx: out.clone(),
    });
    if let Err(e) = &result {
        let _ = out.blocking_send(Err(io::Error::other(e.to_string())));
    }
    result
}

/// Reads the chunks a channel delivers, as many as are ready per call. An
/// error item ends the stream; bytes before it are delivered first.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
    failed: Option<io::Error>,
}

impl ChannelReader {
    fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        Self {
            rx,
            current: Bytes::new(),
            failed: None,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.current.is_empty() {
            if let Some(e) = self.failed.take() {
                return Err(e);
            }
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let mut n = 0;
        loop {
            let take = (buf.len() - n).min(self.current.len());
            buf[n..n + take].copy_from_slice(&self.current[..take]);
            self.current.advance(take);
            n += take;
            if n == buf.len() {
                return Ok(n);
            }
            match self.rx.try_recv() {
                Ok(Ok(chunk)) => self.current = chunk,
                Ok(Err(e)) => {
                    self.failed = Some(e);
                    return Ok(n);
                }
                Err(_) => return Ok(n),
            }
        }
    }
}

/// Passes each read on to the import channel as it goes by.
struct Forward<R> {
    inner: R,
    tx: mpsc::Sender<io::Result<Bytes>>,
}

impl<R: Read> Read for Forward<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0
            && self
                .tx
                .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                .is_err()
        {
            return Err(io::Error::other("the import of this NAR stopped"));
        }
        Ok(n)
    }
}

/// The upload routes, to merge beside the read-only cache routes (axum
/// merges methods per path: GET stays there, PUT and HEAD come from here).
pub fn router(uploads: Uploads) -> Router {
    Router::new()
        .route("/nix-cache-info", put(put_cache_info))
        .route("/nar/{file}", head(head_nar).put(put_nar))
        .route("/{file}", put(put_narinfo))
        .with_state(Arc::new(uploads))
}

fn reply(uploads: &Uploads, result: Result<String, Rejection>) -> Response {
    match result {
        Ok(message) => (StatusCode::OK, format!("{message}\n")).into_response(),
        Err(Rejection::Internal { context, reason }) => {
            tracing::error!("upload failed {context}: {reason}");
            Rejection::Internal { context, reason }.into_response()
        }
        Err(rejection) => {
            Metrics::inc(&uploads.metrics.uploads_rejected);
            tracing::warn!("upload refused: {rejection}");
            rejection.into_response()
        }
    }
}

/// Nix PUTs a `nix-cache-info` when it finds none; ours is generated, so
/// an authorised PUT is accepted and ignored.
async fn put_cache_info(
    State(uploads): State<Arc<Uploads>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = match uploads.authorize(&headers, "nix-cache-info") {
        Ok(()) => {
            let _ = axum::body::to_bytes(body, MAX_NARINFO).await;
            Ok("nix-cache-info is generated by the gateway; kept as is".to_owned())
        }
        Err(e) => Err(e),
    };
    reply(&uploads, result)
}

/// 200 with the headers a `GET` would send when the NAR is held here, 404
/// otherwise; no body either way.
async fn head_nar(State(uploads): State<Arc<Uploads>>, Path(file): Path<String>) -> Response {
    match uploads.held_nar(&file).await {
        Some(HeldNar { size: Some(size) }) => (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-nix-nar"),
                ),
                (header::ACCEPT_RANGES, HeaderValue::from_static("bytes")),
                (header::CONTENT_LENGTH, HeaderValue::from(size)),
            ],
            Body::empty(),
        )
            .into_response(),
        Some(HeldNar { size: None }) => StatusCode::OK.into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn put_nar(
    State(uploads): State<Arc<Uploads>>,
    Path(file): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = uploads.put_nar(&file, &headers, body).await;
    reply(&uploads, result)
}

async fn put_narinfo(
    State(uploads): State<Arc<Uploads>>,
    Path(file): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = uploads.put_narinfo(&file, &headers, body).await;
    reply(&uploads, result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    const TOKEN: &str = "s3cret-token";

    fn basic(login: &str, password: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let value = base64::engine::general_purpose::STANDARD.encode(format!("{login}:{password}"));
        headers.insert(
            header::AUTHORIZATION,
            format!("Basic {value}").parse().unwrap(),
        );
        headers
    }

    #[test]
    fn nar_file_names_nix_writes_are_understood() {
        let stem = "1m15k531wbfnmgajcy9gzlh2gq79m6bz8q00wbnqrin3q4sknxn8";
        for (suffix, compression) in [
            (".nar", Compression::None),
            (".nar.xz", Compression::Xz),
            (".nar.zst", Compression::Zstd),
        ] {
            let file = NarFile::parse(&format!("{stem}{suffix}")).unwrap();
            assert_eq!(file.compression(), compression);
            assert_eq!(file.url(), format!("nar/{stem}{suffix}"));
        }
        for bad in [
            ".nar",
            "x.nar.bz2",
            "x.nar.br",
            "X.nar",
            "a/b.nar",
            "x.narinfo",
            &format!("{}.nar", "a".repeat(129)),
        ] {
            assert_eq!(NarFile::parse(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn nar_file_round_trips(stem in "[0-9a-z]{1,128}", i in 0usize..3) {
            let file = NarFile { stem, compression: Compression::ALL[i] };
            prop_assert_eq!(NarFile::parse(&file.to_string()), Some(file));
        }
    }

    #[test]
    fn credential_is_the_basic_password_or_a_bearer_token() {
        let value = basic("nixpfs", "pa:ss");
        let value = value[header::AUTHORIZATION].to_str().unwrap();
        assert_eq!(credential(value).as_deref(), Some("pa:ss"));
        assert_eq!(credential("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(credential("basic !!!"), None);
        assert_eq!(credential("Digest x"), None);
        assert_eq!(credential("Basic"), None);
    }

    fn staged(seed: &[u8], at: Instant) -> Staged {
        let cid = *crate::store::ipfs::block::Block::from_data(
            crate::store::ipfs::block::RAW,
            Bytes::copy_from_slice(seed),
        )
        .cid();
        Staged {
            cid,
            summary: NarSummary {
                nar_hash: NarHash::digest(seed),
                nar_size: seed.len() as u64,
            },
            at,
        }
    }

    #[test]
    fn staged_nars_are_found_by_url_or_hash_until_they_expire() {
        let t0 = Instant::now();
        let mut staging = Staging::default();
        let a = staged(b"a", t0);
        staging.insert("nar/a.nar.xz".into(), a);
        assert_eq!(staging.by_url("nar/a.nar.xz", t0), Some(a));
        assert_eq!(staging.by_url("nar/b.nar.xz", t0), None);
        assert_eq!(staging.by_hash(&NarHash::digest(b"a"), t0), Some(a));
        let late = t0 + STAGED_TTL;
        assert_eq!(staging.by_url("nar/a.nar.xz", late), None);
        assert_eq!(staging.by_hash(&NarHash::digest(b"a"), late), None);
        staging.insert("nar/b.nar".into(), staged(b"b", late));
        assert_eq!(staging.by_url.len(), 1, "expired entries are dropped");
    }

    /// A NAR of a small tree, and its summary.
    fn sample_nar(dir: &std::path::Path, payload: &[u8]) -> (Vec<u8>, NarSummary) {
        let root = dir.join("tree");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/file"), payload).unwrap();
        std::os::unix::fs::symlink("sub/file", root.join("link")).unwrap();
        let mut nar = Vec::new();
        nar::dump(&root, &mut nar).unwrap();
        let summary = nar::validate(&nar[..]).unwrap();
        (nar, summary)
    }

    fn narinfo(hash_part: &str, url: &str, summary: &NarSummary) -> String {
        format!(
            "StorePath: /nix/store/{hash_part}-sample\nURL: {url}\nCompression: none\nNarHash: {}\nNarSize: {}\nReferences: \n",
            summary.nar_hash, summary.nar_size
        )
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        uploads: Uploads,
        index: Arc<Index>,
        node: Node,
    }

    async fn fixture(token: Option<&str>, require_sig: Vec<PublicKey>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::start(crate::store::ipfs::NodeConfig::new(dir.path().join("ipfs")))
            .await
            .unwrap();
        let index = Arc::new(Index::open(&dir.path().join("index.redb")).unwrap());
        let catalog = Catalog::new(
            index.clone(),
            Arc::new(anchor_registry::SecretKey::generate("gateway-1").unwrap()),
            crate::trust::catalog::Trust {
                registry: None,
                policy: anchor_registry::Policy::new(1, None).unwrap(),
            },
        );
        let uploads = Uploads::new(
            node.clone(),
            catalog,
            Arc::new(Metrics::default()),
            token.map(str::to_owned),
            require_sig,
        );
        Fixture {
            _dir: dir,
            uploads,
            index,
            node,
        }
    }

    const HASH_A: &str = "0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const HASH_B: &str = "0bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compressed_nars_are_stored_only_once_their_narinfo_matches() {
        let f = fixture(Some(TOKEN), Vec::new()).await;
        let auth = basic("nixpfs", TOKEN);
        let payload = vec![7u8; 3 * 1024 * 1024 + 5];
        let (nar, summary) = sample_nar(f._dir.path(), &payload);
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(&nar).unwrap();
        let xz = xz.finish().unwrap();
        let zst = zstd::stream::encode_all(&nar[..], 1).unwrap();
        for (file, body) in [
            ("aaaa.nar.xz", xz),
            ("bbbb.nar.zst", zst),
            ("cccc.nar", nar.clone()),
        ] {
            f.uploads
                .put_nar(file, &auth, Body::from(body))
                .await
                .unwrap();
            // The size only where GET would serve the name: uncompressed.
            let size = file.ends_with(".nar").then_some(summary.nar_size);
            assert_eq!(
                f.uploads.held_nar(file).await,
                Some(HeldNar { size }),
                "{file}"
            );
        }
        assert!(f.uploads.held_nar("dddd.nar.xz").await.is_none());
        assert!(
            f.node.pins().await.unwrap().is_empty(),
            "staged, not pinned"
        );

        let text = narinfo(HASH_A, "nar/aaaa.nar.xz", &summary);
        f.uploads
            .put_narinfo(&format!("{HASH_A}.narinfo"), &auth, Body::from(text))
            .await
            .unwrap();
        let pins = f.node.pins().await.unwrap();
        assert_eq!(pins.len(), 1);
        let local = f
            .index
            .local(&StorePathHash::parse(HASH_A).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(local.cid, pins[0].cid.to_string());
        assert_eq!(
            local.narinfo.url,
            format!("nar/{}.nar", summary.nar_hash.to_nix32())
        );
        assert_eq!(local.narinfo.compression.as_deref(), Some("none"));
        // The verified local NAR now answers HEAD under its NarHash name,
        // with the size GET sends.
        assert_eq!(
            f.uploads
                .held_nar(&format!("{}.nar", summary.nar_hash.to_nix32()))
                .await,
            Some(HeldNar {
                size: Some(summary.nar_size)
            })
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mismatching_or_orphan_narinfos_and_broken_nars_leave_no_pin() {
        let f = fixture(Some(TOKEN), Vec::new()).await;
        let auth = basic("nixpfs", TOKEN);
        let (nar, summary) = sample_nar(f._dir.path(), b"hello");
        f.uploads
            .put_nar("aaaa.nar", &auth, Body::from(nar.clone()))
            .await
            .unwrap();

        let mut wrong = summary;
        wrong.nar_hash = NarHash::digest(b"other");
        let err = f
            .uploads
            .put_narinfo(
                &format!("{HASH_A}.narinfo"),
                &auth,
                Body::from(narinfo(HASH_A, "nar/aaaa.nar", &wrong)),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Rejection::NarHashMismatch { .. }), "{err}");
        assert_eq!(err.status(), StatusCode::UNPROCESSABLE_ENTITY);

        let mut longer = summary;
        longer.nar_size += 8;
        let err = f
            .uploads
            .put_narinfo(
                &format!("{HASH_A}.narinfo"),
                &auth,
                Body::from(narinfo(HASH_A, "nar/aaaa.nar", &longer)),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Rejection::NarSizeMismatch { .. }), "{err}");

        let never = NarSummary {
            nar_hash: NarHash::digest(b"never sent"),
            nar_size: 5,
        };
        let err = f
            .uploads
            .put_narinfo(
                &format!("{HASH_B}.narinfo"),
                &auth,
                Body::from(narinfo(HASH_B, "nar/zzzz.nar.xz", &never)),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Rejection::NarMissing { .. }), "{err}");
        assert_eq!(err.status(), StatusCode::CONFLICT);

        let err = f
            .uploads
            .put_narinfo(
                &format!("{HASH_B}.narinfo"),
                &auth,
                Body::from(narinfo(HASH_A, "nar/aaaa.nar", &summary)),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, Rejection::NarinfoNameMismatch { .. }),
            "{err}"
        );

        let err = f
            .uploads
            .put_nar("bbbb.nar", &auth, Body::from(nar[..nar.len() - 8].to_vec()))
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                Rejection::InvalidNar {
                    source: NarError::Truncated { .. },
                    ..
                }
            ),
            "{err}"
        );
        let err = f
            .uploads
            .put_nar("cccc.nar.xz", &auth, Body::from(nar.clone()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("xz data"), "{err}");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        let mut trailing = nar.clone();
        trailing.extend_from_slice(&[0; 8]);
        assert!(f
            .uploads
            .put_nar("dddd.nar", &auth, Body::from(trailing))
            .await
            .is_err());
        let broken = futures::stream::iter(vec![
            Ok::<_, io::Error>(Bytes::copy_from_slice(&nar[..64])),
            Err(io::Error::other("connection reset")),
        ]);
        let err = f
            .uploads
            .put_nar("eeee.nar", &auth, Body::from_stream(broken))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Rejection::BodyRead { received: 64, .. }),
            "{err}"
        );
        for file in ["bbbb.nar", "cccc.nar.xz", "dddd.nar", "eeee.nar"] {
            assert!(f.uploads.held_nar(file).await.is_none(), "{file}");
        }
        assert!(f.node.pins().await.unwrap().is_empty());
        assert!(f.index.locals().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tokens_and_required_signatures_are_enforced() {
        let key = anchor_registry::SecretKey::generate("uploader-1").unwrap();
        let f = fixture(Some(TOKEN), vec![key.public()]).await;
        let (nar, summary) = sample_nar(f._dir.path(), b"signed");
        for headers in [HeaderMap::new(), basic("nixpfs", "wrong")] {
            let err = f
                .uploads
                .put_nar("aaaa.nar", &headers, Body::from(nar.clone()))
                .await
                .unwrap_err();
            assert_eq!(err.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(
                err.into_response().headers()[header::WWW_AUTHENTICATE],
                "Basic realm=\"nixpfs uploads\""
            );
        }
        assert_eq!(
            f.uploads
                .metrics
                .auth_failures
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        let auth = basic("anyone", TOKEN);
        f.uploads
            .put_nar("aaaa.nar", &auth, Body::from(nar))
            .await
            .unwrap();
        let unsigned = narinfo(HASH_A, "nar/aaaa.nar", &summary);
        let err = f
            .uploads
            .put_narinfo(
                &format!("{HASH_A}.narinfo"),
                &auth,
                Body::from(unsigned.clone()),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Rejection::Unsigned { .. }), "{err}");
        let mut info = NarInfo::parse(&unsigned).unwrap();
        info.sign(&key);
        f.uploads
            .put_narinfo(
                &format!("{HASH_A}.narinfo"),
                &auth,
                Body::from(info.to_string()),
            )
            .await
            .unwrap();
        assert_eq!(f.node.pins().await.unwrap().len(), 1);

        let closed = fixture(None, Vec::new()).await;
        let err = closed
            .uploads
            .put_nar("aaaa.nar", &auth, Body::empty())
            .await
            .unwrap_err();
        assert_eq!(err.status(), StatusCode::FORBIDDEN);
    }
}
