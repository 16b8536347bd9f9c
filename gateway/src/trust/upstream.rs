//! The upstream bridge's client: binary caches in the style of
//! cache.nixos.org, asked for the narinfos the index cannot answer, trusted
//! through the public keys the user configured for each (exactly as Nix's
//! `trusted-public-keys`), and read for the NARs of the paths they signed.
//!
//! # Goals
//! - A narinfo counts only if a signature in it verifies under a key of the
//!   upstream that sent it; the gateway passes that signature through and
//!   adds its own. The upstream key is one distinct vote in the policy.
//! - A dead or slow upstream costs a miss at most [`NARINFO_DEADLINE`] and
//!   is then skipped for [`BACKOFF`]; repeated misses of one path are
//!   answered from a negative cache for [`NEGATIVE_TTL`]. Nix sees 404 (it
//!   disables a substituter after other errors), never a 5xx for this.
//! - NAR files are read as they download: decompressed per `Compression:`
//!   with bounded decoder memory, FileHash and FileSize checked at the end.
//!   NarHash is the caller's to check (see `store::verify`).
//!
//! # Non-goals
//! - Absolute or off-site NAR URLs: a narinfo's `URL:` is not signed, so it
//!   must stay under the upstream's own base URL.
//! - Mass queries (`WantMassQuery`) or listing an upstream's contents.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anchor_registry::{NarHash, NarInfo, PublicKey, Sha256Hash, Signature, StorePathHash};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::index::{Index, IndexError, UpstreamPath};
use crate::store::nar::compression::Compression;
use crate::trust::catalog::{Catalog, Lookup};
use crate::util::metrics::Metrics;
use crate::util::sync::lock;

/// The longest a narinfo miss waits on all upstreams together.
pub const NARINFO_DEADLINE: Duration = Duration::from_secs(4);
/// How long an upstream that failed (transport error, 5xx, timeout) is
/// skipped before it is asked again.
pub const BACKOFF: Duration = Duration::from_secs(10);
/// How long a path no upstream had is answered 404 without asking again.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(60);
/// Most negative entries remembered; when full it starts over.
const NEGATIVE_ENTRIES: usize = 1 << 16;
/// How long the CIDs peers named with a narinfo stand in for asking them
/// again when Nix asks for that NAR (it does so at once).
const HEARD_TTL: Duration = Duration::from_secs(30);
/// Most NARs whose peer CIDs are remembered; when full it starts over.
const HEARD_ENTRIES: usize = 1 << 12;
/// Largest narinfo accepted from an upstream (real ones are under 4 KiB).
const MAX_NARINFO: u64 = 64 * 1024;
/// Time to connect to an upstream, and the longest pause between two reads
/// of a NAR download.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept open to each upstream. Nix's own requests, the
/// narinfos looked up ahead and the NARs prefetched run side by side; with
/// ureq's default of one, every other request opened a new connection
/// (measured: 265 connects for A's 600 requests in a 300-path copy).
const IDLE_PER_UPSTREAM: usize = 32;

/// One configured upstream cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Base URL without a trailing slash (`http://host:port/path`).
    pub url: String,
    /// Signatures by these keys make a path from this upstream servable.
    pub keys: Vec<PublicKey>,
    /// Lower is asked first (as Nix's `Priority:`).
    pub priority: u32,
}

/// What `status` shows about one upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamStatus {
    pub url: String,
    pub keys: Vec<String>,
    pub priority: u32,
    /// The last failure (transport, HTTP status, bad narinfo or NAR), if any.
    #[serde(default)]
    pub last_error: Option<String>,
    /// When it happened (unix seconds).
    #[serde(default)]
    pub last_error_at: Option<u64>,
    /// When the upstream last answered a request well (unix seconds).
    #[serde(default)]
    pub last_ok_at: Option<u64>,
    /// True while it is skipped after a failure.
    #[serde(default)]
    pub backing_off: bool,
}

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("{url}: not a valid narinfo: {reason}")]
    BadNarinfo { url: String, reason: String },
    #[error("{url}: no signature verifies under this upstream's keys ({keys})")]
    Unsigned { url: String, keys: String },
    #[error("{url}: NAR URL {nar_url:?} is not a relative path under the upstream")]
    BadNarUrl { url: String, nar_url: String },
    #[error("{url}: {source}")]
    Compression {
        url: String,
        source: crate::store::nar::compression::UnsupportedCompression,
    },
    #[error("the upstream {url} is no longer configured")]
    NotConfigured { url: String },
}

#[derive(Debug, Default)]
struct Health {
    last_error: Option<(u64, String)>,
    last_ok_at: Option<u64>,
    skip_until: Option<Instant>,
}

#[derive(Debug)]
struct Entry {
    upstream: Upstream,
    health: Mutex<Health>,
}

impl Entry {
    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        lock(&self.health)
    }

    fn skipped(&self, now: Instant) -> bool {
        self.health().skip_until.is_some_and(|until| now < until)
    }

    fn failed(&self, err: &UpstreamError, back_off: bool) {
        tracing::warn!(upstream = %self.upstream.url, "upstream failed: {err}");
        let mut health = self.health();
        health.last_error = Some((crate::util::time::unix_now(), err.to_string()));
        if back_off {
            health.skip_until = Some(Instant::now() + BACKOFF);
        }
    }

    fn ok(&self) {
        let mut health = self.health();
        health.last_ok_at = Some(crate::util::time::unix_now());
        health.skip_until = None;
    }
}

/// The configured upstreams, their health and the negative cache; shared by
/// every request.
#[derive(Debug)]
pub struct Upstreams {
    /// By priority, then configuration order.
    entries: Vec<Entry>,
    agent: ureq::Agent,
    negative: Mutex<HashMap<StorePathHash, Instant>>,
    /// The CIDs peers gave with a narinfo this gateway served, by NAR:
    /// the NAR request that follows needs no second round of questions.
    heard: Mutex<HashMap<NarHash, (Vec<String>, Instant)>>,
    metrics: Arc<Metrics>,
}

impl Upstreams {
    pub fn new(mut upstreams: Vec<Upstream>, metrics: Arc<Metrics>) -> Self {
        upstreams.sort_by_key(|u| u.priority);
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout_read(READ_TIMEOUT)
            .max_idle_connections_per_host(IDLE_PER_UPSTREAM)
            .build();
        Self {
            entries: upstreams
                .into_iter()
                .map(|upstream| Entry {
                    upstream,
                    health: Mutex::default(),
                })
                .collect(),
            agent,
            negative: Mutex::default(),
            heard: Mutex::default(),
            metrics,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn entry(&self, url: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.upstream.url == url)
    }

    /// Each upstream's health, for `status`.
    pub fn statuses(&self) -> Vec<UpstreamStatus> {
        let now = Instant::now();
        self.entries
            .iter()
            .map(|e| {
                let health = e.health();
                UpstreamStatus {
                    url: e.upstream.url.clone(),
                    keys: e.upstream.keys.iter().map(ToString::to_string).collect(),
                    priority: e.upstream.priority,
                    last_error: health.last_error.as_ref().map(|(_, m)| m.clone()),
                    last_error_at: health.last_error.as_ref().map(|(at, _)| *at),
                    last_ok_at: health.last_ok_at,
                    backing_off: health.skip_until.is_some_and(|u| now < u),
                }
            })
            .collect()
    }

    /// The signatures of `path` that verify under the keys its upstream has
    /// *now* (keys may have been removed since it was recorded), and those
    /// keys; empty when none does or the upstream is gone.
    pub fn valid_signatures(&self, path: &UpstreamPath) -> (Vec<Signature>, Vec<PublicKey>) {
        let Some(entry) = self.entry(&path.upstream) else {
            return (Vec::new(), Vec::new());
        };
        valid_signatures(&path.narinfo, &entry.upstream.keys)
    }

    fn negative_hit(&self, hash: &StorePathHash, now: Instant) -> bool {
        let negative = lock(&self.negative);
        negative
            .get(hash)
            .is_some_and(|at| now.saturating_duration_since(*at) < NEGATIVE_TTL)
    }

    fn remember_heard(&self, nar_hash: NarHash, cids: Vec<String>, now: Instant) {
        let mut heard = lock(&self.heard);
        if heard.len() >= HEARD_ENTRIES {
            heard.clear();
        }
        heard.insert(nar_hash, (cids, now));
    }

    /// The CIDs peers named for this NAR moments ago, once.
    fn take_heard(&self, nar_hash: &NarHash, now: Instant) -> Option<Vec<String>> {
        let mut heard = lock(&self.heard);
        heard
            .remove(nar_hash)
            .filter(|(_, at)| now.saturating_duration_since(*at) < HEARD_TTL)
            .map(|(cids, _)| cids)
    }

    fn remember_miss(&self, hash: StorePathHash, now: Instant) {
        let mut negative = lock(&self.negative);
        if negative.len() >= NEGATIVE_ENTRIES {
            negative.clear();
        }
        negative.insert(hash, now);
    }

    /// Asks the upstreams, best priority first, for the narinfo of `hash`
    /// and returns the first whose signature verifies under that upstream's
    /// keys. Blocking; bounded by [`NARINFO_DEADLINE`] in all. Failures are
    /// logged with the URL, recorded for `status` and counted.
    pub fn fetch_narinfo(&self, hash: &StorePathHash) -> Option<UpstreamPath> {
        let start = Instant::now();
        if self.entries.is_empty() || self.negative_hit(hash, start) {
            return None;
        }
        let deadline = start + NARINFO_DEADLINE;
        let mut unsure = false;
        for entry in &self.entries {
            let now = Instant::now();
            if entry.skipped(now) {
                unsure = true;
                continue;
            }
            let Some(left) = deadline
                .checked_duration_since(now)
                .filter(|d| !d.is_zero())
            else {
                unsure = true;
                break;
            };
            match self.narinfo_from(entry, hash, left) {
                Ok(Some(found)) => {
                    entry.ok();
                    return Some(found);
                }
                Ok(None) => entry.ok(),
                Err(e) => {
                    Metrics::inc(&self.metrics.upstream_errors);
                    let transient = matches!(
                        e,
                        UpstreamError::Transport { .. } | UpstreamError::Status { .. }
                    );
                    if matches!(e, UpstreamError::Unsigned { .. }) {
                        Metrics::inc(&self.metrics.upstream_bad_signature);
                    }
                    entry.failed(&e, transient);
                    unsure |= transient;
                }
            }
        }
        if !unsure {
            self.remember_miss(*hash, start);
        }
        None
    }

    fn narinfo_from(
        &self,
        entry: &Entry,
        hash: &StorePathHash,
        timeout: Duration,
    ) -> Result<Option<UpstreamPath>, UpstreamError> {
        let url = format!("{}/{hash}.narinfo", entry.upstream.url);
        let response = match self.agent.get(&url).timeout(timeout).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(404 | 403 | 410, _)) => return Ok(None),
            Err(ureq::Error::Status(status, _)) => {
                return Err(UpstreamError::Status { url, status })
            }
            Err(e) => {
                return Err(UpstreamError::Transport {
                    url,
                    reason: e.to_string(),
                })
            }
        };
        let mut text = String::new();
        response
            .into_reader()
            .take(MAX_NARINFO + 1)
            .read_to_string(&mut text)
            .map_err(|e| UpstreamError::Transport {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let bad = |reason: String| UpstreamError::BadNarinfo {
            url: url.clone(),
            reason,
        };
        if text.len() as u64 > MAX_NARINFO {
            return Err(bad(format!("larger than {MAX_NARINFO} bytes")));
        }
        let narinfo = NarInfo::parse(&text).map_err(|e| bad(e.to_string()))?;
        if narinfo.store_path.hash() != hash {
            return Err(bad(format!("it describes {}", narinfo.store_path)));
        }
        nar_file_url(&entry.upstream.url, &narinfo)?;
        Compression::from_narinfo(narinfo.compression.as_deref()).map_err(|source| {
            UpstreamError::Compression {
                url: url.clone(),
                source,
            }
        })?;
        let (sigs, _) = valid_signatures(&narinfo, &entry.upstream.keys);
        if sigs.is_empty() {
            return Err(UpstreamError::Unsigned {
                url,
                keys: entry
                    .upstream
                    .keys
                    .iter()
                    .map(|k| k.name().to_owned())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(Some(UpstreamPath {
            upstream: entry.upstream.url.clone(),
            narinfo,
        }))
    }

    /// Opens the NAR of an upstream path: a blocking reader of the NAR's
    /// uncompressed bytes that fails at the end when FileHash or FileSize
    /// (where the narinfo gives them) do not match, and the URL it reads.
    pub fn open_nar(
        &self,
        path: &UpstreamPath,
    ) -> Result<(Box<dyn Read + Send>, String), UpstreamError> {
        let entry = self
            .entry(&path.upstream)
            .ok_or_else(|| UpstreamError::NotConfigured {
                url: path.upstream.clone(),
            })?;
        let url = nar_file_url(&entry.upstream.url, &path.narinfo)?;
        let compression =
            Compression::from_narinfo(path.narinfo.compression.as_deref()).map_err(|source| {
                UpstreamError::Compression {
                    url: url.clone(),
                    source,
                }
            })?;
        let response = match self.agent.get(&url).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(status, _)) => {
                let e = UpstreamError::Status { url, status };
                Metrics::inc(&self.metrics.upstream_errors);
                entry.failed(&e, status >= 500);
                return Err(e);
            }
            Err(e) => {
                let e = UpstreamError::Transport {
                    url,
                    reason: e.to_string(),
                };
                Metrics::inc(&self.metrics.upstream_errors);
                entry.failed(&e, true);
                return Err(e);
            }
        };
        entry.ok();
        let file = FileCheck {
            inner: response.into_reader(),
            hasher: Sha256::new(),
            seen: 0,
            file_hash: path.narinfo.file_hash,
            file_size: path.narinfo.file_size,
            ended: Arc::default(),
        };
        let ended = file.ended.clone();
        let decoded = compression
            .decoder(file)
            .map_err(|e| UpstreamError::Transport {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        Ok((
            Box::new(WholeFile {
                inner: decoded,
                ended,
            }),
            url,
        ))
    }

    /// The URL a path's NAR is downloaded from, if its upstream is configured.
    pub fn nar_url(&self, path: &UpstreamPath) -> Option<String> {
        let entry = self.entry(&path.upstream)?;
        nar_file_url(&entry.upstream.url, &path.narinfo).ok()
    }

    /// Whether `path`'s upstream is configured and not backing off.
    pub fn available(&self, path: &UpstreamPath) -> bool {
        self.entry(&path.upstream)
            .is_some_and(|e| !e.skipped(Instant::now()))
    }

    /// Records a download failure seen by the caller (a NAR that broke off
    /// or did not match), for `status`.
    pub fn record_failure(&self, upstream: &str, err: &str) {
        if let Some(entry) = self.entry(upstream) {
            let mut health = entry.health();
            health.last_error = Some((crate::util::time::unix_now(), err.to_owned()));
        }
    }
}

/// Chunks in flight between the download thread and the response.
const NAR_PIPE_DEPTH: usize = 8;
/// Size of the chunks a download is cut into: the IPFS leaf size, so the
/// import stores them without a copy.
const NAR_CHUNK: usize = crate::store::ipfs::dag::CHUNK_SIZE;

/// Streams the uncompressed NAR of an upstream path as it downloads, read
/// on a blocking thread (see [`Upstreams::open_nar`]); an error item ends
/// it, naming the URL. Dropping the stream stops the download.
pub fn nar_stream(
    upstreams: Arc<Upstreams>,
    path: UpstreamPath,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send + Unpin + 'static {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(NAR_PIPE_DEPTH);
    tokio::task::spawn_blocking(move || {
        let (mut reader, url) = match upstreams.open_nar(&path) {
            Ok(opened) => opened,
            Err(e) => {
                let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
                return;
            }
        };
        let mut sent = 0u64;
        loop {
            // Only as big as what is left of the NAR: a whole leaf's worth
            // was zeroed and faulted in for each small NAR (zeroing pages
            // was 6% of a cold gateway's CPU in perf). At least one byte,
            // so that bytes past NarSize still come through (and are
            // refused by the NarHash check).
            let left = path.narinfo.nar_size.saturating_sub(sent);
            let len = usize::try_from(left).map_or(NAR_CHUNK, |l| l.clamp(1, NAR_CHUNK));
            let mut buf = vec![0u8; len];
            let mut filled = 0;
            let failed = loop {
                match reader.read(&mut buf[filled..]) {
                    Ok(0) => break None,
                    Ok(n) => {
                        filled += n;
                        if filled == buf.len() {
                            break None;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Some(e),
                }
            };
            if filled > 0 {
                sent += filled as u64;
                buf.truncate(filled);
                Metrics::add(&upstreams.metrics.upstream_bytes, filled as u64);
                if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                    return;
                }
            }
            if let Some(e) = failed {
                let message = format!("{url}: {e}");
                upstreams.record_failure(&path.upstream, &message);
                let _ = tx.blocking_send(Err(io::Error::new(e.kind(), message)));
                return;
            }
            if filled < len {
                return;
            }
        }
    });
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// `narinfo`'s signatures that verify under one of `keys`, and those keys.
fn valid_signatures(narinfo: &NarInfo, keys: &[PublicKey]) -> (Vec<Signature>, Vec<PublicKey>) {
    let fingerprint = narinfo.fingerprint();
    let mut sigs = Vec::new();
    let mut by = Vec::new();
    for sig in &narinfo.sigs {
        if let Some(key) = keys
            .iter()
            .find(|k| k.name() == sig.name() && k.verify(fingerprint.as_bytes(), sig))
        {
            sigs.push(sig.clone());
            if !by.contains(key) {
                by.push(key.clone());
            }
        }
    }
    (sigs, by)
}

/// The absolute URL of a narinfo's NAR file under `base`: only plain
/// relative paths (no scheme, no leading `/`, no `..`, no query).
fn nar_file_url(base: &str, narinfo: &NarInfo) -> Result<String, UpstreamError> {
    let rel = narinfo.url.as_str();
    let ok = !rel.is_empty()
        && !rel.starts_with('/')
        && rel
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
        && rel
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~/+".contains(&b));
    if !ok {
        return Err(UpstreamError::BadNarUrl {
            url: base.to_owned(),
            nar_url: rel.to_owned(),
        });
    }
    Ok(format!("{base}/{rel}"))
}

/// The compressed file as it downloads: hashed and counted, checked against
/// FileHash and FileSize when it ends.
struct FileCheck<R> {
    inner: R,
    hasher: Sha256,
    seen: u64,
    file_hash: Option<Sha256Hash>,
    file_size: Option<u64>,
    /// Set once the end of the file was reached and checked.
    ended: Arc<std::sync::atomic::AtomicBool>,
}

impl<R: Read> Read for FileCheck<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.seen += n as u64;
            self.hasher.update(&buf[..n]);
            if self.file_size.is_some_and(|size| self.seen > size) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "FileSize mismatch: more than the {} bytes the narinfo gives",
                        self.file_size.unwrap_or(0)
                    ),
                ));
            }
            return Ok(n);
        }
        if buf.is_empty() || self.ended.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(0);
        }
        if let Some(size) = self.file_size.filter(|s| *s != self.seen) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "FileSize mismatch: the narinfo gives {size} bytes, the file has {}",
                    self.seen
                ),
            ));
        }
        let digest: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
        let got = Sha256Hash::from_bytes(digest);
        if let Some(expected) = self.file_hash.filter(|h| *h != got) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "FileHash mismatch: the narinfo gives {expected}, the file hashes to {got}"
                ),
            ));
        }
        self.ended.store(true, std::sync::atomic::Ordering::Release);
        Ok(0)
    }
}

/// The decoded NAR, which must not end before the file it came from did
/// (otherwise FileHash was never checked, or data trails the stream).
struct WholeFile {
    inner: Box<dyn Read + Send>,
    ended: Arc<std::sync::atomic::AtomicBool>,
}

impl Read for WholeFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() && !self.ended.load(std::sync::atomic::Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the compressed stream ended before the file did (trailing data)",
            ));
        }
        Ok(n)
    }
}

/// The narinfo to serve for `hash` from an upstream, if one vouches for it
/// and the policy holds: first what an upstream sent before (checked again
/// under today's keys), else a fresh answer from the upstreams (recorded).
/// With a found answer comes the upstream path it was made from.
/// Blocking.
pub fn lookup(
    catalog: &Catalog,
    upstreams: &Upstreams,
    hash: &StorePathHash,
) -> Result<(Lookup<Bytes>, Option<UpstreamPath>), IndexError> {
    let found = |answer: Lookup<Bytes>, path: UpstreamPath| {
        let path = matches!(answer, Lookup::Found(_)).then_some(path);
        (answer, path)
    };
    if let Some(known) = catalog.index().upstream_path(hash)? {
        let (sigs, keys) = upstreams.valid_signatures(&known);
        if !sigs.is_empty() {
            return Ok(found(catalog.serve_upstream(&known, sigs, &keys)?, known));
        }
    }
    let Some(fetched) = upstreams.fetch_narinfo(hash) else {
        return Ok((Lookup::NotFound, None));
    };
    let (sigs, keys) = upstreams.valid_signatures(&fetched);
    let answer = catalog.serve_upstream(&fetched, sigs, &keys)?;
    if matches!(answer, Lookup::Found(_)) {
        catalog.index().put_upstream_path(&fetched)?;
    }
    Ok(found(answer, fetched))
}

/// How long a question to the connected gateways may take.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(3);

/// What a gateway answers another about a path an upstream served it: the
/// upstream's narinfo as it was sent (its signature is the asker's to
/// check) and the CID of the NAR's verified bytes here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAnswer {
    pub narinfo: String,
    pub cid: String,
}

/// Answers other gateways' questions (a store path's hash part) from the
/// index: only paths an upstream served whose NAR was verified here.
pub fn responder(index: Arc<Index>) -> crate::store::ipfs::exchange::Responder {
    Arc::new(move |request: String| {
        let index = index.clone();
        Box::pin(async move {
            let hash = StorePathHash::parse(&request).ok()?;
            tokio::task::spawn_blocking(move || {
                let path = index.upstream_path(&hash).ok()??;
                let location = index.nar_location(&path.narinfo.nar_hash).ok()??;
                location.verified.then(|| {
                    serde_json::to_vec(&PeerAnswer {
                        narinfo: path.narinfo.to_string(),
                        cid: location.cid,
                    })
                    .unwrap_or_default()
                })
            })
            .await
            .ok()
            .flatten()
        })
    })
}

impl Upstreams {
    /// Reads a peer's answer about `hash`: the path, under the configured
    /// upstream whose keys its signature verifies with, and the CID; `None`
    /// (counted) when it is anything else.
    fn check_peer_answer(
        &self,
        hash: &StorePathHash,
        answer: &[u8],
    ) -> Option<(UpstreamPath, String)> {
        let checked = (|| {
            let answer: PeerAnswer = serde_json::from_slice(answer).ok()?;
            let narinfo = NarInfo::parse(&answer.narinfo).ok()?;
            if narinfo.store_path.hash() != hash {
                return None;
            }
            Compression::from_narinfo(narinfo.compression.as_deref()).ok()?;
            answer.cid.parse::<crate::store::ipfs::Cid>().ok()?;
            let entry = self.entries.iter().find(|e| {
                nar_file_url(&e.upstream.url, &narinfo).is_ok()
                    && !valid_signatures(&narinfo, &e.upstream.keys).0.is_empty()
            })?;
            Some((
                UpstreamPath {
                    upstream: entry.upstream.url.clone(),
                    narinfo,
                },
                answer.cid,
            ))
        })();
        if checked.is_none() {
            Metrics::inc(&self.metrics.peer_answers_refused);
        }
        checked
    }
}

/// The narinfo to serve for `hash` from what connected gateways say an
/// upstream signed: the first answer whose signature verifies under a
/// configured upstream's keys and that the policy accepts is recorded as
/// that upstream's (so the NAR can also come from it once reachable). The
/// CIDs the peers gave for that NAR are kept for [`peer_locations`]. With
/// a found answer comes the upstream path it was made from.
pub async fn lookup_peers(
    catalog: &Catalog,
    upstreams: &Upstreams,
    node: &crate::store::ipfs::Node,
    hash: StorePathHash,
) -> Result<(Lookup<Bytes>, Option<UpstreamPath>), IndexError> {
    if upstreams.is_empty() {
        return Ok((Lookup::NotFound, None));
    }
    let mut checked = Vec::new();
    for (peer, answer) in node.ask_peers(hash.as_str(), PEER_TIMEOUT).await {
        match upstreams.check_peer_answer(&hash, &answer) {
            Some((path, cid)) => checked.push((peer, path, cid)),
            None => {
                tracing::warn!(%peer, path = %hash, "ignored a peer's answer: not signed by a configured upstream key")
            }
        }
    }
    for (peer, path, _) in &checked {
        let peer = *peer;
        let path = path.clone();
        let (nar_hash, nar_size) = (path.narinfo.nar_hash, path.narinfo.nar_size);
        let (sigs, keys) = upstreams.valid_signatures(&path);
        let catalog = catalog.clone();
        let (found, path) = tokio::task::spawn_blocking(move || {
            let answer = catalog.serve_upstream(&path, sigs, &keys)?;
            if matches!(answer, Lookup::Found(_)) {
                catalog.index().put_upstream_path(&path)?;
            }
            Ok::<_, IndexError>((answer, path))
        })
        .await
        .map_err(|e| IndexError::Storage(e.to_string()))??;
        if matches!(found, Lookup::Found(_) | Lookup::Conflict) {
            tracing::info!(%peer, path = %hash, "narinfo from a peer gateway, signed by a configured upstream key");
            Metrics::inc(&upstreams.metrics.peer_narinfo_served);
            let cids = cids_of_nar(
                checked.iter().map(|(_, theirs, cid)| (theirs, cid)),
                nar_hash,
                nar_size,
            );
            upstreams.remember_heard(nar_hash, cids, Instant::now());
            let path = matches!(found, Lookup::Found(_)).then_some(path);
            return Ok((found, path));
        }
    }
    Ok((Lookup::NotFound, None))
}

/// Where connected gateways hold the verified NAR of an upstream path: CIDs
/// to fetch over IPFS (checked block by block and against NarHash), in the
/// order they answered; those they gave with the narinfo moments ago, if
/// any, without asking again.
pub async fn peer_locations(
    upstreams: &Upstreams,
    node: &crate::store::ipfs::Node,
    path: &UpstreamPath,
) -> Vec<crate::store::index::NarLocation> {
    let location = |cid| crate::store::index::NarLocation {
        cid,
        nar_size: path.narinfo.nar_size,
        verified: false,
    };
    if let Some(cids) = upstreams.take_heard(&path.narinfo.nar_hash, Instant::now()) {
        if !cids.is_empty() {
            return cids.into_iter().map(location).collect();
        }
    }
    let hash = *path.narinfo.store_path.hash();
    let checked: Vec<(UpstreamPath, String)> = node
        .ask_peers(hash.as_str(), PEER_TIMEOUT)
        .await
        .into_iter()
        .filter_map(|(_, answer)| upstreams.check_peer_answer(&hash, &answer))
        .collect();
    cids_of_nar(
        checked.iter().map(|(theirs, cid)| (theirs, cid)),
        path.narinfo.nar_hash,
        path.narinfo.nar_size,
    )
    .into_iter()
    .map(location)
    .collect()
}

/// The CIDs, first answer first and each once, of the checked peer answers
/// that are about this NAR (a path's answers may name other bytes).
fn cids_of_nar<'a>(
    answers: impl IntoIterator<Item = (&'a UpstreamPath, &'a String)>,
    nar_hash: NarHash,
    nar_size: u64,
) -> Vec<String> {
    let mut cids: Vec<String> = Vec::new();
    for (theirs, cid) in answers {
        if theirs.narinfo.nar_hash == nar_hash
            && theirs.narinfo.nar_size == nar_size
            && !cids.contains(cid)
        {
            cids.push(cid.clone());
        }
    }
    cids
}

/// The upstream path whose NAR has this hash, if an upstream served one.
pub fn nar_source(index: &Index, nar_hash: &NarHash) -> Result<Option<UpstreamPath>, IndexError> {
    index.upstream_nar(nar_hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anchor_registry::{SecretKey, StorePath};

    fn narinfo(url: &str) -> NarInfo {
        NarInfo {
            store_path: StorePath::parse("/nix/store/0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-up").unwrap(),
            url: url.into(),
            compression: Some("xz".into()),
            file_hash: None,
            file_size: None,
            nar_hash: NarHash::digest(b"nar"),
            nar_size: 3,
            references: Vec::new(),
            deriver: None,
            sigs: Vec::new(),
            ca: None,
        }
    }

    #[test]
    fn nar_urls_stay_under_the_upstream() {
        let base = "http://127.0.0.1:1/cache";
        assert_eq!(
            nar_file_url(base, &narinfo("nar/1abc.nar.xz")).unwrap(),
            "http://127.0.0.1:1/cache/nar/1abc.nar.xz"
        );
        for bad in [
            "/etc/passwd",
            "../x.nar",
            "http://evil/x.nar",
            "nar/x?y",
            "nar//x",
            "",
        ] {
            assert!(nar_file_url(base, &narinfo(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn cids_heard_with_a_narinfo_stand_in_once_and_briefly() {
        let upstreams = Upstreams::new(Vec::new(), Arc::default());
        let nar = NarHash::digest(b"nar");
        let t0 = Instant::now();
        upstreams.remember_heard(nar, vec!["bafy1".into()], t0);
        assert_eq!(upstreams.take_heard(&nar, t0), Some(vec!["bafy1".into()]));
        // Once: the next request for the NAR asks the peers again.
        assert_eq!(upstreams.take_heard(&nar, t0), None);
        upstreams.remember_heard(nar, vec!["bafy2".into()], t0);
        assert_eq!(upstreams.take_heard(&nar, t0 + HEARD_TTL), None);
    }

    #[test]
    fn only_signatures_by_the_upstreams_keys_count() {
        let u = SecretKey::generate("upstream-1").unwrap();
        let other = SecretKey::generate("other-1").unwrap();
        let mut info = narinfo("nar/x.nar");
        info.sign(&other);
        assert!(valid_signatures(&info, &[u.public()]).0.is_empty());
        info.sign(&u);
        let (sigs, keys) = valid_signatures(&info, &[u.public()]);
        assert_eq!(sigs.len(), 1);
        assert_eq!(keys, [u.public()]);
        // A signature under the right name but over another fingerprint.
        let mut tampered = info.clone();
        tampered.nar_size = 4;
        assert!(valid_signatures(&tampered, &[u.public()]).0.is_empty());
    }

    fn check(data: &[u8], hash: Option<Sha256Hash>, size: Option<u64>) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        FileCheck {
            inner: data,
            hasher: Sha256::new(),
            seen: 0,
            file_hash: hash,
            file_size: size,
            ended: Arc::default(),
        }
        .read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn file_hash_and_size_are_checked_at_the_end() {
        let data = b"compressed bytes";
        let right = Sha256Hash::digest(data);
        assert_eq!(check(data, Some(right), Some(16)).unwrap(), data);
        assert_eq!(check(data, None, None).unwrap(), data);
        let err = check(data, Some(Sha256Hash::digest(b"x")), None).unwrap_err();
        assert!(err.to_string().contains("FileHash mismatch"), "{err}");
        let err = check(data, None, Some(17)).unwrap_err();
        assert!(err.to_string().contains("FileSize mismatch"), "{err}");
        let err = check(data, None, Some(3)).unwrap_err();
        assert!(err.to_string().contains("FileSize mismatch"), "{err}");
    }

    #[test]
    fn a_dead_upstream_is_skipped_and_misses_are_not_cached_as_absent() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let upstreams = Upstreams::new(
            vec![Upstream {
                url: format!("http://127.0.0.1:{port}"),
                keys: vec![SecretKey::generate("u-1").unwrap().public()],
                priority: 40,
            }],
            Arc::default(),
        );
        let hash = StorePathHash::parse("0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa").unwrap();
        let start = Instant::now();
        assert!(upstreams.fetch_narinfo(&hash).is_none());
        assert!(upstreams.fetch_narinfo(&hash).is_none());
        assert!(start.elapsed() < NARINFO_DEADLINE);
        let status = &upstreams.statuses()[0];
        assert!(status.backing_off, "{status:?}");
        assert!(status
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains(&port.to_string()));
        assert!(!upstreams.negative_hit(&hash, Instant::now()));
        assert_eq!(
            upstreams.metrics.snapshot().upstream_errors,
            1,
            "skipped the second time"
        );
    }
}
