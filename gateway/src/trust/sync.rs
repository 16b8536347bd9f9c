//! Fetching the anchor registry and each anchor's newest mapping set from
//! where they publish (file, http(s), IPFS, an IPNS name of the anchor's own
//! key), verifying them through
//! `anchor-registry`, and indexing what passed. Nothing is indexed, and no
//! trusted state moves, unless every check passed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anchor_registry::{
    check_header, versioned_location, Anchor, EntryChecks, Registry, RegistryError, SetKind,
    SetReader, Source, TrustError, TrustRoot,
};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::store::index::{ForkEvidence, Index, IndexError};
use crate::store::ipfs::ipns::IpnsName;
use crate::store::ipfs::Node;
use crate::trust::catalog::Catalog;
use crate::trust::names::Names;
use crate::util::metrics::Metrics;
use crate::util::progress::{Meter, Unit};
use crate::util::time::unix_now;

/// Largest registry or mapping set accepted from one source.
const MAX_DOCUMENT: u64 = 1 << 30;

/// Most registry versions one sync walks through: a gateway further behind
/// than this is told so (its operator can re-sync from the trust root).
const MAX_WALK: u64 = 1024;

/// Why a sync could not even start (per-anchor failures are in the report).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot load the registry from {source_name}: {message}")]
    RegistrySource {
        source_name: String,
        message: String,
    },
    #[error("registry from {source_name} refused: {error}")]
    Registry {
        source_name: String,
        error: anchor_registry::RegistryError,
    },
    #[error("the registry stored in the index is damaged ({reason}); move the data directory's index.redb aside (or restore it from a backup) and run `nixpfs anchors sync`, which starts again from the configured trust root")]
    StoredRegistry { reason: RegistryError },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("sync task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// What became of one publisher's set in a sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// A new version was verified and indexed.
    Accepted,
    /// The trusted version again: nothing changed.
    Unchanged,
    /// No source delivered a set that passed every check.
    Rejected,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Accepted => "accepted",
            Self::Unchanged => "unchanged",
            Self::Rejected => "rejected",
        })
    }
}

/// What one sync did, per anchor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReport {
    pub registry_version: u64,
    /// Why the registry could not be fetched, when the sync went on with
    /// the stored (unexpired) one.
    #[serde(default)]
    pub registry_error: Option<String>,
    pub anchors: Vec<AnchorSync>,
}

/// The outcome for one anchor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnchorSync {
    pub anchor: String,
    pub outcome: Outcome,
    pub version: Option<u64>,
    pub entries: Option<u64>,
    /// Why each source failed, when none succeeded.
    pub errors: Vec<String>,
}

/// Everything a sync touches.
#[derive(Debug, Clone)]
pub struct Syncer {
    pub index: Arc<Index>,
    pub catalog: Catalog,
    pub node: Option<Node>,
    pub metrics: Arc<Metrics>,
    /// The registry's own location (file path or http(s) URL).
    pub registry_source: String,
    /// The keys the first registry accepted must be signed by.
    pub root: TrustRoot,
    /// Routing V1 routers asked for IPNS records (beside the DHT).
    pub routers: Vec<String>,
    /// Counts the anchors synced, for a progress bar.
    pub meter: Meter,
}

impl Syncer {
    /// Loads and verifies the registry (rotation checked against the last
    /// accepted one), then every anchor's newest set.
    pub async fn sync(&self) -> Result<SyncReport, SyncError> {
        let (registry, registry_error) = match self.load_registry().await {
            Ok(registry) => (registry, None),
            // The registry host is down: while the stored registry is
            // unexpired, its anchors' sets keep syncing.
            Err(e @ SyncError::RegistrySource { .. }) => match stored_registry(&self.index)? {
                Some(stored) if unix_now() < stored.expires() => {
                    tracing::warn!("{e}; syncing anchor sets with the stored registry");
                    (stored, Some(e.to_string()))
                }
                _ => return Err(e),
            },
            Err(e) => return Err(e),
        };
        self.catalog.set_registry(registry.clone());
        self.purge_unlisted(&registry)?;
        let mut report = SyncReport {
            registry_version: registry.version(),
            registry_error,
            anchors: Vec::new(),
        };
        self.meter.start(
            "syncing anchors",
            Unit::Items,
            Some(registry.anchors().len() as u64),
        );
        for anchor in registry.anchors() {
            let outcome = self.sync_anchor(&registry, anchor).await?;
            report.anchors.push(outcome);
            self.meter.add(1);
        }
        Ok(report)
    }

    /// Drops the sets of anchors the registry no longer lists under the key
    /// that signed them: they count for nothing, and a re-added or re-keyed
    /// anchor starts a new chain.
    fn purge_unlisted(&self, registry: &Registry) -> Result<(), SyncError> {
        let purged = self.index.purge_sets(|state| {
            let h = state.header().header();
            h.kind != SetKind::Anchor || registry.anchor(&h.anchor).is_some_and(|a| a.key == h.key)
        })?;
        for state in purged {
            Metrics::inc(&self.metrics.sets_purged);
            let h = state.header().header();
            tracing::warn!(
                anchor = %h.anchor,
                key = %h.key,
                version = h.version,
                registry_version = registry.version(),
                "purged a stored set: the registry no longer lists its anchor under that key"
            );
        }
        Ok(())
    }

    /// Fetches the registry and verifies it against the stored one (or, with
    /// none, the configured trust root), walking any versions in between.
    /// Stores it once it verified.
    async fn load_registry(&self) -> Result<Registry, SyncError> {
        let source = &self.registry_source;
        let text = self.fetch_registry_text(source).await?;
        let previous = stored_registry(&self.index)?;
        let now = unix_now();
        // Parsed and checked on the blocking pool: a registry may be as
        // large as the document limit, and is untrusted until verified.
        let (root, trusted) = (self.root.clone(), previous.clone());
        let (text, parsed) = tokio::task::spawn_blocking(move || {
            let parsed = Registry::parse(&text).map(|registry| {
                let verdict = registry.verify_from(&root, trusted.as_ref(), now);
                (registry, verdict)
            });
            (text, parsed)
        })
        .await?;
        let verified = match parsed {
            Err(error) => Err((source.clone(), error)),
            Ok((registry, verdict)) => match (verdict, &previous) {
                (Ok(()), _) => Ok(registry),
                (Err(RegistryError::SkippedVersion { .. }), Some(trusted)) => {
                    self.walk(trusted, registry, now).await?
                }
                (Err(error), _) => Err((source.clone(), error)),
            },
        };
        let registry = match verified {
            Ok(registry) => registry,
            Err((source_name, error)) => {
                Metrics::inc(&self.metrics.registry_refused);
                tracing::warn!(source = %source_name, "refused registry: {error}");
                return Err(SyncError::Registry { source_name, error });
            }
        };
        if previous.as_ref().map(Registry::version) != Some(registry.version()) {
            self.index.put_registry_text(&text)?;
        }
        Ok(registry)
    }

    /// Walks from the trusted version to `newest` through each version in
    /// between, fetched from [`versioned_location`]: each must follow the one
    /// before (TUF-style, see `anchor_registry::registry`). The outer error
    /// is a fetch failure (the stored registry may still serve); the inner
    /// one a refusal, with the location that was refused.
    async fn walk(
        &self,
        trusted: &Registry,
        newest: Registry,
        now: u64,
    ) -> Result<Result<Registry, (String, RegistryError)>, SyncError> {
        let source = &self.registry_source;
        let (from, to) = (trusted.version(), newest.version());
        if to - from > MAX_WALK {
            return Ok(Err((
                source.clone(),
                RegistryError::SkippedVersion {
                    trusted: from,
                    found: to,
                },
            )));
        }
        tracing::info!(from, to, "walking skipped registry versions");
        let mut current = trusted.clone();
        for version in from + 1..to {
            let location =
                versioned_location(source, version).ok_or_else(|| SyncError::RegistrySource {
                    source_name: source.clone(),
                    message: format!(
                        "version {version} is needed to walk from trusted version {from} to {to}, and a location without a file name has no versioned copies"
                    ),
                })?;
            let text = self.fetch_registry_text(&location).await?;
            // Parsed and checked on the blocking pool, as in load_registry.
            let (_previous, step) = tokio::task::spawn_blocking(move || {
                let step = Registry::parse(&text)
                    .and_then(|step| step.verify_successor(&current).map(|()| step));
                (current, step)
            })
            .await?;
            current = match step {
                Ok(step) => step,
                Err(error) => return Ok(Err((location, error))),
            };
        }
        Ok(newest
            .verify_from(&self.root, Some(&current), now)
            .map(|()| newest)
            .map_err(|error| (source.clone(), error)))
    }

    async fn fetch_registry_text(&self, location: &str) -> Result<String, SyncError> {
        let bytes = fetch_location(location, self.node.as_ref())
            .await
            .map_err(|message| SyncError::RegistrySource {
                source_name: location.to_owned(),
                message,
            })?;
        String::from_utf8(bytes.to_vec()).map_err(|_| SyncError::RegistrySource {
            source_name: location.to_owned(),
            message: "not UTF-8 text".to_owned(),
        })
    }

    async fn sync_anchor(
        &self,
        registry: &Registry,
        anchor: &Anchor,
    ) -> Result<AnchorSync, SyncError> {
        let mut errors = Vec::new();
        for source in &anchor.sources {
            // Files are streamed; other sources are spooled to a file
            // (bounded as they arrive), then streamed the same way.
            let document = match source {
                Source::File(path) => match open_source_file(Path::new(path)) {
                    Ok(f) => Ok(std::io::BufReader::with_capacity(1 << 20, f)),
                    Err(OpenError::Refused(reason)) => {
                        Metrics::inc(&self.metrics.sources_refused);
                        tracing::warn!(anchor = %anchor.name, %source, %reason, "set source refused");
                        Err(reason)
                    }
                    Err(OpenError::Io(e)) => Err(e.to_string()),
                },
                Source::Ipns(name) => match self.resolve_anchor_name(anchor, name).await {
                    Ok(resolved) => self
                        .spool(&resolved)
                        .await
                        .map_err(|e| format!("{resolved}: {e}")),
                    Err(e) => Err(e),
                },
                _ => self.spool(source).await,
            };
            let document = match document {
                Ok(document) => document,
                Err(e) => {
                    errors.push(format!("{source}: {e}"));
                    continue;
                }
            };
            let index = self.index.clone();
            let registry = registry.clone();
            let name = anchor.name.as_str().to_owned();
            let result = tokio::task::spawn_blocking(move || {
                verify_and_index(&index, &registry, SetKind::Anchor, &name, document)
            })
            .await?;
            match result {
                Ok(Indexed::Accepted { version, entries }) => {
                    Metrics::inc(&self.metrics.sync_accepted);
                    tracing::info!(anchor = %anchor.name, version, entries, "accepted mapping set");
                    return Ok(AnchorSync {
                        anchor: anchor.name.to_string(),
                        outcome: Outcome::Accepted,
                        version: Some(version),
                        entries: Some(entries),
                        errors,
                    });
                }
                Ok(Indexed::Unchanged { version }) => {
                    return Ok(AnchorSync {
                        anchor: anchor.name.to_string(),
                        outcome: Outcome::Unchanged,
                        version: Some(version),
                        entries: None,
                        errors,
                    });
                }
                Err(SetRejected::Index(e)) => return Err(e.into()),
                Err(e) => {
                    Metrics::inc(&self.metrics.sync_rejected);
                    tracing::warn!(anchor = %anchor.name, %source, "refused mapping set: {e}");
                    errors.push(format!("{source}: {e}"));
                }
            }
        }
        Ok(AnchorSync {
            anchor: anchor.name.to_string(),
            outcome: Outcome::Rejected,
            version: None,
            entries: None,
            errors,
        })
    }
}

impl Syncer {
    /// Fetches an http or ipfs source into a spool file in the data
    /// directory, counting its bytes against [`MAX_DOCUMENT`] as they
    /// arrive (a set of hundreds of MiB never sits in memory), and returns
    /// it rewound for the verifier.
    async fn spool(
        &self,
        source: &Source,
    ) -> Result<std::io::BufReader<std::io::Take<std::fs::File>>, String> {
        use std::io::{Seek, Write};
        let index = self.index.clone();
        let file = tokio::task::spawn_blocking(move || index.spool_file())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let mut file = match source {
            Source::Http(url) => {
                let url = url.clone();
                tokio::task::spawn_blocking(move || http_spool(&url, file))
                    .await
                    .map_err(|e| e.to_string())??
            }
            Source::Ipfs(cid) => {
                let Some(node) = self.node.as_ref() else {
                    return Err(
                        "ipfs:// sources need the IPFS node (run through `nixpfs serve`)"
                            .to_owned(),
                    );
                };
                let cid: cid::Cid = cid.to_string().parse().map_err(|e| format!("{e}"))?;
                let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
                let mut stream = Box::pin(node.cat(cid));
                let mut len = 0u64;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| e.to_string())?;
                    len += chunk.len() as u64;
                    if len > MAX_DOCUMENT {
                        return Err(format!("larger than {MAX_DOCUMENT} bytes"));
                    }
                    // A 1 MiB buffer in front: one write per block or so.
                    out.write_all(&chunk).map_err(|e| e.to_string())?;
                }
                out.into_inner().map_err(|e| e.error().to_string())?
            }
            Source::File(_) | Source::Ipns(_) => {
                return Err(format!("{source} is not fetched over the network"))
            }
        };
        file.rewind().map_err(|e| e.to_string())?;
        Ok(std::io::BufReader::with_capacity(
            1 << 20,
            std::io::Read::take(file, MAX_DOCUMENT),
        ))
    }

    /// Resolves an anchor's `ipns://` source to the `ipfs://` of its newest
    /// set. The name must be the one the anchor's registered key derives:
    /// anyone may list a name, but only the anchor's own key can sign for
    /// its name (the set is then still verified as from any source).
    async fn resolve_anchor_name(&self, anchor: &Anchor, name: &str) -> Result<Source, String> {
        let name: IpnsName = name.parse().map_err(|e| format!("{e}"))?;
        let own = IpnsName::from_ed25519(anchor.key.as_bytes()).map_err(|e| e.to_string())?;
        if name != own {
            Metrics::inc(&self.metrics.ipns_refused);
            let reason = format!(
                "ipns://{name} is not the name of {}'s registered key (that is ipns://{own})",
                anchor.name
            );
            tracing::warn!(anchor = %anchor.name, "refused an IPNS source: {reason}");
            return Err(reason);
        }
        let names = Names {
            index: &self.index,
            node: self.node.as_ref(),
            routers: &self.routers,
            metrics: &self.metrics,
        };
        let resolved = names.resolve(&name).await.map_err(|e| e.to_string())?;
        anchor_registry::ContentId::parse(&resolved.value.to_string())
            .map(Source::Ipfs)
            .map_err(|e| format!("ipns://{name} points at {}: {e}", resolved.value))
    }
}

/// The registry the index holds as trusted, if any; one that does not parse
/// is an error, never "no predecessor" (which would let any registry signed
/// by the trust root roll this one back).
pub fn stored_registry(index: &Index) -> Result<Option<Registry>, SyncError> {
    index
        .registry_text()?
        .map(|text| Registry::parse(&text))
        .transpose()
        .map_err(|reason| SyncError::StoredRegistry { reason })
}

/// Why a file source was not read.
#[derive(Debug)]
enum OpenError {
    Io(std::io::Error),
    /// Not a document at all, or too large: refused before reading.
    Refused(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => e.fmt(f),
            Self::Refused(reason) => f.write_str(reason),
        }
    }
}

/// Opens a file source, refusing what is not a regular file (a FIFO would
/// hold a worker until someone writes to it, a device may never end) and
/// what is over [`MAX_DOCUMENT`]. Opened non-blocking, so even a FIFO swapped
/// in cannot hang the open, and read through a limit, so a file growing while
/// it is read stops at the bound (the verifier then refuses the cut set).
fn open_source_file(path: &Path) -> Result<std::io::Take<std::fs::File>, OpenError> {
    use std::io::Read as _;
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(OpenError::Io)?;
    let meta = file.metadata().map_err(OpenError::Io)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a device"
        };
        return Err(OpenError::Refused(format!(
            "{} is {what}, not a regular file",
            path.display()
        )));
    }
    if meta.len() > MAX_DOCUMENT {
        return Err(OpenError::Refused(format!(
            "{} is {} bytes, over the {MAX_DOCUMENT}-byte limit",
            path.display(),
            meta.len()
        )));
    }
    Ok(file.take(MAX_DOCUMENT))
}

/// What became of one fetched set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Indexed {
    Accepted {
        version: u64,
        entries: u64,
    },
    /// The trusted version again: nothing to do.
    Unchanged {
        version: u64,
    },
}

/// Why a fetched set was not indexed.
#[derive(Debug, thiserror::Error)]
pub enum SetRejected {
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error("this source is listed for {expected}, but the set it delivered is {found}'s: a source installs only its own publisher's set")]
    OtherPublisher { expected: String, found: String },
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// Verifies a set of publisher `name` (of `kind`) against the registry and
/// the trusted state and, only when every check passed, replaces the
/// publisher's mappings and state. A set naming another publisher or kind is
/// refused before anything else, so a source listed for one anchor can
/// never install another's set or claims. The set is copied aside while it
/// is read, so it is read once; the trusted version again costs one header
/// line. A fork is recorded as evidence before it is refused.
pub fn verify_and_index(
    index: &Index,
    registry: &Registry,
    kind: SetKind,
    name: &str,
    reader: impl std::io::BufRead,
) -> Result<Indexed, SetRejected> {
    let mut tee = index.tee_set(reader)?;
    // Anchor entries' signatures are checked when policy counts a mapping
    // (see `Policy::evaluate`); the header signature already binds every
    // entry byte to the anchor, and the reader checks every entry names the
    // set's key, so deferring them is sound and ~20x faster. Claims are
    // checked whole here: `repro` shows claimants as evidence.
    let checks = match kind {
        SetKind::Anchor => EntryChecks::DeferNixSignatures,
        SetKind::Claims => EntryChecks::All,
    };
    let set = SetReader::open_with(&mut tee, checks).map_err(TrustError::from)?;
    let h = set.header().header();
    if h.kind != kind || h.anchor.as_str() != name {
        return Err(SetRejected::OtherPublisher {
            expected: format!("{kind} set of {name}"),
            found: format!("{} set of {}", h.kind, h.anchor),
        });
    }
    let trusted = index.trusted_state(kind, name, &h.key)?;
    let state = match check_header(set.header(), registry, trusted.as_ref(), unix_now()) {
        Ok(state) => state,
        Err(TrustError::Fork {
            anchor,
            version,
            trusted,
            found,
        }) => {
            tracing::error!(%anchor, version, "anchor signed two different sets of one version: fork");
            index.record_fork(&ForkEvidence {
                anchor: anchor.to_string(),
                version,
                trusted: (*trusted).clone(),
                found: (*found).clone(),
            })?;
            return Err(TrustError::Fork {
                anchor,
                version,
                trusted,
                found,
            }
            .into());
        }
        Err(e) => return Err(e.into()),
    };
    if index.holds_set(&state) {
        return Ok(Indexed::Unchanged {
            version: state.version(),
        });
    }
    let mut keys = Vec::new();
    set.for_each(|m| keys.push((*m.path().hash(), *m.nar_hash())))
        .map_err(TrustError::from)?;
    let entries = keys.len() as u64;
    index.replace_set(&state, tee.finish(keys)?)?;
    Ok(Indexed::Accepted {
        version: state.version(),
        entries,
    })
}

/// Fetches a registry location given as text (file path or http(s) URL).
async fn fetch_location(location: &str, node: Option<&Node>) -> Result<Bytes, String> {
    match Source::parse(location) {
        Ok(source) => fetch_source(&source, node).await,
        Err(_) => tokio::fs::read(location)
            .await
            .map(Bytes::from)
            .map_err(|e| e.to_string()),
    }
}

/// Fetches one published document, bounded in size.
pub async fn fetch_source(source: &Source, node: Option<&Node>) -> Result<Bytes, String> {
    match source {
        Source::File(path) => {
            let path = PathBuf::from(path);
            tokio::task::spawn_blocking(move || {
                use std::io::Read as _;
                let mut file = open_source_file(&path).map_err(|e| e.to_string())?;
                let mut out = Vec::new();
                file.read_to_end(&mut out).map_err(|e| e.to_string())?;
                Ok(Bytes::from(out))
            })
            .await
            .map_err(|e| e.to_string())?
        }
        Source::Http(url) => {
            let url = url.clone();
            tokio::task::spawn_blocking(move || http_get(&url))
                .await
                .map_err(|e| e.to_string())?
        }
        Source::Ipfs(cid) => {
            let Some(node) = node else {
                return Err(
                    "ipfs:// sources need the IPFS node (run through `nixpfs serve`)".to_owned(),
                );
            };
            let cid: cid::Cid = cid.to_string().parse().map_err(|e| format!("{e}"))?;
            let mut stream = Box::pin(node.cat(cid));
            let mut out = Vec::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| e.to_string())?;
                if (out.len() + chunk.len()) as u64 > MAX_DOCUMENT {
                    return Err(format!("larger than {MAX_DOCUMENT} bytes"));
                }
                out.extend_from_slice(&chunk);
            }
            Ok(Bytes::from(out))
        }
        Source::Ipns(name) => Err(format!(
            "ipns://{name} must be resolved first (an anchor's source, or `claims import`)"
        )),
    }
}

/// Streams `url` into `file`, refusing more than [`MAX_DOCUMENT`] bytes.
fn http_spool(url: &str, mut file: std::fs::File) -> Result<std::fs::File, String> {
    use std::io::Read;
    let response = ureq::get(url)
        .timeout(std::time::Duration::from_secs(60))
        .call()
        .map_err(|e| e.to_string())?;
    let copied = std::io::copy(
        &mut response.into_reader().take(MAX_DOCUMENT + 1),
        &mut file,
    )
    .map_err(|e| e.to_string())?;
    if copied > MAX_DOCUMENT {
        return Err(format!("larger than {MAX_DOCUMENT} bytes"));
    }
    Ok(file)
}

fn http_get(url: &str) -> Result<Bytes, String> {
    use std::io::Read;
    let response = ureq::get(url)
        .timeout(std::time::Duration::from_secs(60))
        .call()
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    response
        .into_reader()
        .take(MAX_DOCUMENT + 1)
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    if out.len() as u64 > MAX_DOCUMENT {
        return Err(format!("larger than {MAX_DOCUMENT} bytes"));
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use anchor_registry::testing::{anchor, key, mapping, FAR_FUTURE};
    use anchor_registry::{MappingSetBuilder, Policy, SecretKey, SignedHeader, StorePath};

    use super::*;
    use crate::trust::catalog::Trust;

    /// An index, an anchor `alpha` publishing at `<dir>/alpha.jsonl`, and a
    /// syncer reading the registry (signed by `root`) from `<dir>/registry.json`.
    struct World {
        dir: tempfile::TempDir,
        alpha: SecretKey,
        root: SecretKey,
        registry: Registry,
        syncer: Syncer,
    }

    fn world() -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let alpha = key("alpha-1");
        let root = key("root-1");
        let set_file = dir.path().join("alpha.jsonl");
        let mut registry =
            Registry::init(vec![root.public()], 1, FAR_FUTURE).expect("a valid registry");
        registry
            .add_anchor(anchor(
                &alpha,
                "alpha",
                &[set_file.to_str().expect("utf-8")],
            ))
            .expect("add alpha");
        registry.sign(&root);
        let registry_file = dir.path().join("registry.json");
        std::fs::write(&registry_file, registry.render()).expect("write registry");
        let index = Arc::new(Index::open(&dir.path().join("index.redb")).expect("index"));
        let catalog = Catalog::new(
            index.clone(),
            Arc::new(key("gateway-1")),
            Trust {
                registry: None,
                policy: Policy::default(),
            },
        );
        let syncer = Syncer {
            index,
            catalog,
            node: None,
            metrics: Arc::default(),
            registry_source: registry_file.to_str().expect("utf-8").to_owned(),
            root: TrustRoot::of(&registry),
            routers: Vec::new(),
            meter: Meter::new(),
        };
        World {
            dir,
            alpha,
            root,
            registry,
            syncer,
        }
    }

    /// Publishes the registry's next version, changed by `change`.
    fn next_registry(w: &mut World, change: impl FnOnce(&mut Registry)) {
        let mut next = w.registry.next_version().expect("next version");
        change(&mut next);
        next.sign(&w.root);
        std::fs::write(&w.syncer.registry_source, next.render()).expect("write registry");
        let kept = versioned_location(&w.syncer.registry_source, next.version()).expect("a file");
        std::fs::write(kept, next.render()).expect("write the versioned copy");
        w.registry = next;
    }

    fn alpha_name() -> anchor_registry::AnchorName {
        anchor_registry::AnchorName::parse("alpha").expect("name")
    }

    fn path(i: u8) -> StorePath {
        let hash = "0123456789abcdfghijklmnpqrsvwxyz";
        StorePath::parse(&format!(
            "/nix/store/{}{}-pkg",
            &hash[..31],
            hash.as_bytes()[i as usize] as char
        ))
        .expect("a valid store path")
    }

    /// Writes `alpha`'s next set (after `previous`) with `paths` to `out`.
    fn publish(
        w: &World,
        previous: Option<&SignedHeader>,
        paths: &[u8],
        out: &Path,
    ) -> SignedHeader {
        let mut builder = match previous {
            Some(h) => MappingSetBuilder::next_after(h),
            None => MappingSetBuilder::first(SetKind::Anchor, alpha_name()),
        };
        for &i in paths {
            builder.insert(mapping(&w.alpha, path(i), &[i]));
        }
        let mut bytes = Vec::new();
        let header = builder
            .write(&w.alpha, 1, FAR_FUTURE, &mut bytes)
            .expect("write set");
        std::fs::write(out, bytes).expect("write set file");
        header
    }

    fn set_file(w: &World) -> PathBuf {
        w.dir.path().join("alpha.jsonl")
    }

    #[tokio::test]
    async fn sync_outcomes_follow_the_published_versions() {
        let w = world();
        let v1 = publish(&w, None, &[1], &set_file(&w));
        let kept = w.dir.path().join("v1.jsonl");
        std::fs::copy(set_file(&w), &kept).expect("keep v1");

        let report = w.syncer.sync().await.expect("sync");
        assert_eq!(report.registry_version, 1);
        let alpha = &report.anchors[0];
        assert_eq!(
            (alpha.outcome, alpha.version, alpha.entries),
            (Outcome::Accepted, Some(1), Some(1))
        );

        let again = w.syncer.sync().await.expect("sync again");
        assert_eq!(again.anchors[0].outcome, Outcome::Unchanged);

        publish(&w, Some(&v1), &[1, 2], &set_file(&w));
        let next = w.syncer.sync().await.expect("sync v2");
        let alpha = &next.anchors[0];
        assert_eq!(
            (alpha.outcome, alpha.version, alpha.entries),
            (Outcome::Accepted, Some(2), Some(2))
        );

        // The old version again is a rollback: refused, counted, with the reason.
        std::fs::copy(&kept, set_file(&w)).expect("restore v1");
        let rolled = w.syncer.sync().await.expect("sync rollback");
        let alpha = &rolled.anchors[0];
        assert_eq!(alpha.outcome, Outcome::Rejected);
        assert!(
            alpha.errors[0].contains("alpha.jsonl"),
            "{:?}",
            alpha.errors
        );
        let counters = w.syncer.metrics.snapshot();
        assert_eq!((counters.sync_accepted, counters.sync_rejected), (2, 1));
        assert_eq!(
            w.syncer
                .index
                .trusted_state(SetKind::Anchor, "alpha", &w.alpha.public())
                .expect("state")
                .map(|s| s.version()),
            Some(2)
        );
    }

    #[tokio::test]
    async fn a_fifo_at_a_set_source_is_refused_at_once_and_counted() {
        let w = world();
        let made = std::process::Command::new("mkfifo")
            .arg(set_file(&w))
            .status()
            .expect("run mkfifo");
        assert!(made.success());
        let report = tokio::time::timeout(std::time::Duration::from_secs(10), w.syncer.sync())
            .await
            .expect("a FIFO must not hang the sync")
            .expect("sync");
        let alpha = &report.anchors[0];
        assert_ne!(alpha.outcome, Outcome::Accepted);
        assert!(
            alpha
                .errors
                .iter()
                .any(|e| e.contains("a FIFO, not a regular file")),
            "{:?}",
            alpha.errors
        );
        assert_eq!(w.syncer.metrics.snapshot().sources_refused, 1);
        let err = fetch_source(&Source::File(set_file(&w).display().to_string()), None)
            .await
            .expect_err("fetch_source refuses it too");
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[tokio::test]
    async fn a_first_registry_not_signed_by_the_trust_root_is_refused_and_counted() {
        let mut w = world();
        w.syncer.root = TrustRoot::new(vec![key("real-root-1").public()], 1).expect("root");
        let err = w.syncer.sync().await.expect_err("planted registry");
        assert!(
            matches!(
                &err,
                SyncError::Registry {
                    error: RegistryError::UntrustedRoot { .. },
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(w.syncer.metrics.snapshot().registry_refused, 1);
        assert_eq!(
            w.syncer.index.registry_text().expect("index"),
            None,
            "nothing stored"
        );
    }

    #[tokio::test]
    async fn anchor_sets_keep_syncing_while_the_registry_host_is_down() {
        let w = world();
        let v1 = publish(&w, None, &[1], &set_file(&w));
        w.syncer.sync().await.expect("first sync");
        std::fs::remove_file(&w.syncer.registry_source).expect("the host goes down");
        publish(&w, Some(&v1), &[1, 2], &set_file(&w));
        let report = w
            .syncer
            .sync()
            .await
            .expect("sync with the stored registry");
        assert!(report
            .registry_error
            .is_some_and(|e| e.contains("registry.json")));
        assert_eq!(report.anchors[0].outcome, Outcome::Accepted);
        assert_eq!(report.anchors[0].version, Some(2));
    }

    #[tokio::test]
    async fn a_damaged_stored_registry_is_an_error_not_a_fresh_start() {
        let w = world();
        w.syncer.sync().await.expect("first sync");
        w.syncer
            .index
            .put_registry_text("{ damaged")
            .expect("damage it");
        let err = w.syncer.sync().await.expect_err("damaged");
        assert!(matches!(err, SyncError::StoredRegistry { .. }), "{err}");
        assert!(err.to_string().contains("index.redb"), "{err}");
    }

    #[tokio::test]
    async fn a_missing_set_is_rejected_and_a_missing_registry_stops_the_sync() {
        let w = world();
        let report = w.syncer.sync().await.expect("the registry loads");
        assert_eq!(report.anchors[0].outcome, Outcome::Rejected);
        assert_eq!(
            w.syncer.metrics.snapshot().sync_rejected,
            0,
            "nothing was refused, only missing"
        );

        // Without a stored registry to fall back on, a missing one stops it.
        let fresh = world();
        std::fs::remove_file(&fresh.syncer.registry_source).expect("remove registry");
        let err = fresh.syncer.sync().await.expect_err("no registry");
        assert!(matches!(err, SyncError::RegistrySource { .. }), "{err}");
        assert!(err.to_string().contains("registry.json"), "{err}");
    }

    #[tokio::test]
    async fn a_source_listed_for_one_anchor_cannot_install_another_anchors_set() {
        let mut w = world();
        let beta = key("beta-1");
        let beta_file = w.dir.path().join("beta.jsonl");
        next_registry(&mut w, |r| {
            r.add_anchor(anchor(&beta, "beta", &[beta_file.to_str().expect("utf-8")]))
                .expect("add beta");
        });
        // alpha's source serves beta's real set.
        let mut builder = MappingSetBuilder::first(
            SetKind::Anchor,
            anchor_registry::AnchorName::parse("beta").expect("name"),
        );
        builder.insert(mapping(&beta, path(1), &[1]));
        let mut bytes = Vec::new();
        builder
            .write(&beta, 1, FAR_FUTURE, &mut bytes)
            .expect("write set");
        std::fs::write(set_file(&w), bytes).expect("write set file");

        let report = w.syncer.sync().await.expect("sync");
        let alpha = &report.anchors[0];
        assert_eq!(alpha.outcome, Outcome::Rejected);
        assert!(
            alpha.errors[0].contains("installs only its own publisher's set"),
            "{:?}",
            alpha.errors
        );
        assert_eq!(w.syncer.metrics.snapshot().sync_rejected, 1);
        assert!(
            w.syncer.index.trusted_states().expect("states").is_empty(),
            "nothing installed under either name"
        );
    }

    #[tokio::test]
    async fn a_removed_anchors_set_is_purged_and_counts_for_nothing() {
        let mut w = world();
        publish(&w, None, &[1], &set_file(&w));
        w.syncer.sync().await.expect("first sync");
        assert_eq!(
            w.syncer
                .index
                .assertions(path(1).hash(), 0)
                .expect("index")
                .len(),
            1
        );

        next_registry(&mut w, |r| {
            r.remove_anchor(&alpha_name()).expect("remove alpha");
        });
        let report = w.syncer.sync().await.expect("sync");
        assert_eq!(report.registry_version, 2);
        assert!(report.anchors.is_empty());
        assert_eq!(w.syncer.metrics.snapshot().sets_purged, 1);
        assert!(w
            .syncer
            .index
            .assertions(path(1).hash(), 0)
            .expect("index")
            .is_empty());
        assert!(w.syncer.index.trusted_states().expect("states").is_empty());
    }

    #[tokio::test]
    async fn a_new_key_starts_a_new_chain_after_a_stolen_keys_huge_version() {
        let mut w = world();
        // The thief publishes the largest version with alpha's old key.
        let stolen = w.alpha.clone();
        let mut bytes = Vec::new();
        anchor_registry::write_set(
            &anchor_registry::SetParams {
                kind: SetKind::Anchor,
                anchor: alpha_name(),
                version: (1 << 53) - 1,
                created: 1,
                expires: FAR_FUTURE,
                previous: Some(anchor_registry::Sha256Hash::digest(b"any")),
            },
            [mapping(&stolen, path(1), b"backdoor")].iter(),
            &stolen,
            &mut bytes,
        )
        .expect("write set");
        std::fs::write(set_file(&w), bytes).expect("write set file");
        let report = w.syncer.sync().await.expect("sync");
        assert_eq!(report.anchors[0].version, Some((1 << 53) - 1));

        // The registry re-keys alpha; its new key publishes version 1.
        let fresh = key("alpha-2");
        let sources = [set_file(&w).to_str().expect("utf-8").to_owned()];
        next_registry(&mut w, |r| {
            r.remove_anchor(&alpha_name()).expect("remove alpha");
            r.add_anchor(anchor(&fresh, "alpha", &[sources[0].as_str()]))
                .expect("re-add alpha");
        });
        w.alpha = fresh;
        publish(&w, None, &[2], &set_file(&w));
        let report = w.syncer.sync().await.expect("sync");
        let alpha = &report.anchors[0];
        assert_eq!(
            (alpha.outcome, alpha.version),
            (Outcome::Accepted, Some(1)),
            "{:?}",
            alpha.errors
        );
        assert_eq!(
            w.syncer.metrics.snapshot().sets_purged,
            1,
            "the stolen chain is gone"
        );
        assert!(w
            .syncer
            .index
            .assertions(path(1).hash(), 0)
            .expect("index")
            .is_empty());
        assert_eq!(
            w.syncer
                .index
                .assertions(path(2).hash(), 0)
                .expect("index")
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn skipped_registry_versions_are_walked_through_their_versioned_copies() {
        let mut w = world();
        w.syncer.sync().await.expect("first sync");
        let beta = key("beta-1");
        next_registry(&mut w, |r| {
            r.add_anchor(anchor(&beta, "beta", &["/srv/beta.jsonl"]))
                .expect("add beta");
        });
        next_registry(&mut w, |r| {
            r.remove_anchor(&anchor_registry::AnchorName::parse("beta").expect("name"))
                .expect("remove beta");
        });
        let report = w.syncer.sync().await.expect("v1 to v3 through v2");
        assert_eq!((report.registry_version, report.registry_error), (3, None));

        // A missing intermediate copy is a fetch failure: the stored (v3)
        // registry keeps serving, and the error names what is missing.
        next_registry(&mut w, |_| {});
        next_registry(&mut w, |_| {});
        let missing = versioned_location(&w.syncer.registry_source, 4).expect("a file");
        std::fs::remove_file(&missing).expect("remove v4's copy");
        let report = w.syncer.sync().await.expect("falls back");
        assert_eq!(report.registry_version, 3);
        assert!(
            report
                .registry_error
                .as_deref()
                .is_some_and(|e| e.contains("4.registry.json")),
            "{:?}",
            report.registry_error
        );

        // An intermediate version the trusted roots did not sign is refused.
        let thief = key("thief-1");
        let mut forged =
            Registry::init(vec![thief.public()], 1, FAR_FUTURE).expect("a valid registry");
        for _ in 1..4 {
            forged = forged.next_version().expect("fits");
        }
        forged.sign(&thief);
        std::fs::write(&missing, forged.render()).expect("plant a rogue v4");
        let err = w.syncer.sync().await.expect_err("refused");
        assert!(
            matches!(
                &err,
                SyncError::Registry {
                    error: RegistryError::RotationNotAuthorised { .. },
                    source_name,
                } if source_name.ends_with("4.registry.json")
            ),
            "{err}"
        );
        assert_eq!(w.syncer.metrics.snapshot().registry_refused, 1);
    }
}
