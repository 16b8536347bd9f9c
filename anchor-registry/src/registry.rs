//! The registry: the signed list of well-known trust anchors (name, Nix public
//! key, where each publishes), itself signed by root keys with a threshold and
//! rotated TUF-style. Owns its file format, the editing API the CLI calls, and
//! the rules that decide whether a registry version may be trusted.
//!
//! # File format (`nixpfs-registry/1`)
//! A JSON object `{"signed": {…}, "signatures": [{"key": …, "sig": …}]}`,
//! rendered indented for review in diffs. JSON rather than TOML because what is
//! signed needs one canonical byte form: RFC 8785 (JCS) gives JSON one, TOML has
//! none, and TUF, which this mimics, made the same choice. Signatures cover
//! [`REGISTRY_SIGNATURE_DOMAIN`] followed by the JCS rendering of `signed`, so
//! whitespace in the file does not matter but every value does; unknown fields,
//! unsorted or duplicate entries are refused, so one registry has one rendering.
//!
//! # Trust rules
//! A version is trusted when it has not expired and distinct root keys of its
//! own meeting its threshold signed it. Version N+1 after a trusted N also
//! needs N's threshold of N's root keys (so a stolen new key set cannot take
//! over, and rotation is explicit); a lower version is a rollback, the same
//! version with other content a fork, and skipping versions is refused.
//!
//! # Walking skipped versions
//! A gateway that trusts N and fetches N+k (two or more versions published
//! within one sync interval) walks N+1 … N+k−1 the way a TUF client walks
//! root versions: each must follow the one before under the rules above,
//! except that only the newest must be unexpired ([`Registry::verify_successor`]).
//! Publishers therefore keep every version beside the newest, named by
//! [`versioned_location`]: `registry.json` → `7.registry.json` in the same
//! folder (or URL path), as TUF names `7.root.json`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::canonical::{self, MAX_SAFE_INTEGER};
use crate::content_id::ContentId;
use crate::hash::Sha256Hash;
use crate::keys::{PublicKey, SecretKey, Signature};
use crate::store_path::{excerpt, serde_as_string};

/// The `format` value of this version of the registry format.
pub const REGISTRY_FORMAT: &str = "nixpfs-registry/1";
/// Prefix of the signed registry bytes, so a registry signature can never be
/// mistaken for a Nix fingerprint or set header signature by the same key.
pub const REGISTRY_SIGNATURE_DOMAIN: &[u8] = b"nixpfs-registry/1\n";

const MAX_NAME_LEN: usize = 128;
const MAX_SOURCE_LEN: usize = 2048;
const MAX_NOTE_LEN: usize = 1024;

/// Why a registry (or a name or source in it) was refused; each names the
/// versions, keys or values involved.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RegistryError {
    #[error("registry is not valid JSON of the registry schema: {reason}")]
    Json { reason: String },
    #[error("unsupported registry format `{found}`, expected `{REGISTRY_FORMAT}`")]
    UnsupportedFormat { found: String },
    #[error("anchor name `{input}` must be 1-{MAX_NAME_LEN} chars of [A-Za-z0-9._-], starting with a letter or digit")]
    InvalidName { input: String },
    #[error("source `{input}` is invalid: {reason}")]
    InvalidSource { input: String, reason: &'static str },
    #[error(
        "note of anchor `{anchor}` must be at most {MAX_NOTE_LEN} chars without control characters"
    )]
    InvalidNote { anchor: AnchorName },
    #[error("registry version {version} is invalid: versions run from 1 to 2^53 - 1")]
    InvalidVersion { version: u64 },
    #[error("registry expiry {expires} is beyond 2^53 - 1")]
    InvalidExpiry { expires: u64 },
    #[error("threshold {threshold} is invalid for {keys} distinct root keys (need 1 <= threshold <= keys)")]
    InvalidThreshold { threshold: u64, keys: usize },
    #[error("root key `{key}` appears twice (keys are compared by their bytes)")]
    DuplicateRootKey { key: String },
    #[error("anchor `{name}` appears twice")]
    DuplicateAnchor { name: AnchorName },
    #[error("anchor `{name}` reuses key `{key}` (or its name) of anchor `{other}`")]
    DuplicateAnchorKey {
        name: AnchorName,
        other: AnchorName,
        key: String,
    },
    #[error("key `{key}` signed twice")]
    DuplicateSignature { key: String },
    #[error("{what} are not in canonical order")]
    NotSorted { what: &'static str },
    #[error("no anchor named `{name}` in the registry")]
    UnknownAnchor { name: AnchorName },
    #[error("registry version {version} expired at {expires} (now {now})")]
    Expired {
        version: u64,
        expires: u64,
        now: u64,
    },
    #[error(
        "registry version {version} has {have} valid signatures from its root keys, needs {need}"
    )]
    NotEnoughSignatures {
        version: u64,
        have: usize,
        need: u64,
    },
    #[error("registry version {to} has {have} valid signatures from the root keys of version {from}, needs {need}")]
    RotationNotAuthorised {
        from: u64,
        to: u64,
        have: usize,
        need: u64,
    },
    #[error("registry version {version} has {have} valid signatures from the configured trust root, needs {need}: it is not the registry this gateway was set up to follow (check `registry_root_keys`)")]
    UntrustedRoot {
        version: u64,
        have: usize,
        need: u64,
    },
    #[error("registry version {found} is older than trusted version {trusted} (rollback)")]
    Rollback { trusted: u64, found: u64 },
    #[error("registry version {version} has digest {found_digest}, but the trusted one has {trusted_digest} (fork)")]
    Fork {
        version: u64,
        trusted_digest: Sha256Hash,
        found_digest: Sha256Hash,
    },
    #[error("registry version {found} does not follow trusted version {trusted}: every version in between must be verified")]
    SkippedVersion { trusted: u64, found: u64 },
}

/// An anchor's stable, human-chosen name (e.g. `cache.example.org`); its Nix
/// key name may change with key rotation.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AnchorName(String);

impl AnchorName {
    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        let valid = !s.is_empty()
            && s.len() <= MAX_NAME_LEN
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !valid {
            return Err(RegistryError::InvalidName { input: excerpt(s) });
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AnchorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AnchorName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AnchorName({})", self.0)
    }
}

impl FromStr for AnchorName {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

serde_as_string!(AnchorName, "an anchor name");

/// Where an anchor publishes its mapping set.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// An absolute file path (`/srv/anchor/set.jsonl`), for local setups and tests.
    File(String),
    /// An `http://` or `https://` URL, kept verbatim.
    Http(String),
    /// `ipfs://<cid>`: one immutable version.
    Ipfs(ContentId),
    /// `ipns://<name>`: the anchor's mutable pointer to its newest version.
    Ipns(String),
}

impl Source {
    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        let invalid = |reason| RegistryError::InvalidSource {
            input: excerpt(s),
            reason,
        };
        if s.len() > MAX_SOURCE_LEN || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid(
                "too long, or contains whitespace or control characters",
            ));
        }
        if let Some(cid) = s.strip_prefix("ipfs://") {
            return ContentId::parse(cid)
                .map(Source::Ipfs)
                .map_err(|_| invalid("ipfs:// must be followed by exactly one canonical CID"));
        }
        if let Some(name) = s.strip_prefix("ipns://") {
            if name.is_empty() || name.contains('/') {
                return Err(invalid("ipns:// must be followed by exactly one name"));
            }
            return Ok(Source::Ipns(name.to_owned()));
        }
        for scheme in ["http://", "https://"] {
            if let Some(rest) = s.strip_prefix(scheme) {
                if rest.is_empty() || rest.starts_with('/') {
                    return Err(invalid("URL has no host"));
                }
                return Ok(Source::Http(s.to_owned()));
            }
        }
        if s.starts_with('/') {
            return Ok(Source::File(s.to_owned()));
        }
        Err(invalid(
            "expected an absolute path, http(s)://, ipfs://<cid> or ipns://<name>",
        ))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(path) => f.write_str(path),
            Source::Http(url) => f.write_str(url),
            Source::Ipfs(cid) => write!(f, "ipfs://{cid}"),
            Source::Ipns(name) => write!(f, "ipns://{name}"),
        }
    }
}

impl FromStr for Source {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

serde_as_string!(
    Source,
    "a source: absolute path, http(s) URL, ipfs://<cid> or ipns://<name>"
);

/// A well-known anchor. Fields are in canonical (sorted) order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    /// The key that signs its mapping sets and the Nix signatures in them.
    pub key: PublicKey,
    pub name: AnchorName,
    /// Free text for people (operator, contact); not interpreted.
    pub note: Option<String>,
    /// Where its sets can be fetched, in the anchor's order of preference.
    pub sources: Vec<Source>,
}

/// One signature over the registry's signed part, with the key that made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrySignature {
    pub key: PublicKey,
    pub sig: Signature,
}

/// The signed part. Fields in canonical (sorted) order; root keys sorted by
/// their text, anchors by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    anchors: Vec<Anchor>,
    expires: u64,
    format: String,
    root_keys: Vec<PublicKey>,
    threshold: u64,
    version: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    signed: Body,
    signatures: Vec<RegistrySignature>,
}

/// The keys a gateway trusts to sign the first registry it accepts, and how
/// many of them must: configured, never learned from what a source sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustRoot {
    keys: Vec<PublicKey>,
    threshold: u64,
}

impl TrustRoot {
    /// `threshold` of `keys` (distinct by bytes), 1 <= threshold <= keys.
    pub fn new(keys: Vec<PublicKey>, threshold: u64) -> Result<Self, RegistryError> {
        check_root_keys(&keys, threshold)?;
        Ok(Self { keys, threshold })
    }

    /// The trust root a registry names for itself: what its root-key
    /// holders tell users to configure.
    pub fn of(registry: &Registry) -> Self {
        Self {
            keys: registry.root_keys().to_vec(),
            threshold: registry.threshold(),
        }
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    pub fn threshold(&self) -> u64 {
        self.threshold
    }
}

/// A registry document: anchors, root keys and threshold, version, expiry and
/// the signatures collected so far. Editing it drops the signatures (they
/// would no longer verify); [`Registry::verify`] decides whether to trust it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registry {
    body: Body,
    signatures: Vec<RegistrySignature>,
}

impl Registry {
    /// Version 1 with no anchors and no signatures.
    pub fn init(
        root_keys: Vec<PublicKey>,
        threshold: u64,
        expires: u64,
    ) -> Result<Self, RegistryError> {
        let mut registry = Self {
            body: Body {
                anchors: Vec::new(),
                expires,
                format: REGISTRY_FORMAT.to_owned(),
                root_keys: Vec::new(),
                threshold,
                version: 1,
            },
            signatures: Vec::new(),
        };
        registry.set_root_keys(root_keys, threshold)?;
        registry.set_expires(expires)?;
        Ok(registry)
    }

    /// Reads a registry file; checks its structure, not its signatures.
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        let file: File = serde_json::from_str(text).map_err(|err| RegistryError::Json {
            reason: err.to_string(),
        })?;
        let registry = Self {
            body: file.signed,
            signatures: file.signatures,
        };
        registry.check()?;
        Ok(registry)
    }

    /// The file text: indented JSON and a final newline.
    pub fn render(&self) -> String {
        let file = FileRef {
            signed: &self.body,
            signatures: &self.signatures,
        };
        // Plain structs of strings and integers always serialise.
        let mut text = serde_json::to_string_pretty(&file)
            .unwrap_or_else(|err| unreachable!("registry failed to serialise: {err}"));
        text.push('\n');
        text
    }

    pub fn version(&self) -> u64 {
        self.body.version
    }

    /// Unix seconds after which this version is not trusted.
    pub fn expires(&self) -> u64 {
        self.body.expires
    }

    pub fn threshold(&self) -> u64 {
        self.body.threshold
    }

    pub fn root_keys(&self) -> &[PublicKey] {
        &self.body.root_keys
    }

    /// Sorted by name.
    pub fn anchors(&self) -> &[Anchor] {
        &self.body.anchors
    }

    pub fn signatures(&self) -> &[RegistrySignature] {
        &self.signatures
    }

    pub fn anchor(&self, name: &AnchorName) -> Option<&Anchor> {
        self.body
            .anchors
            .binary_search_by(|a| a.name.cmp(name))
            .ok()
            .map(|i| &self.body.anchors[i])
    }

    /// sha256 of the canonical signed part: equal digests, equal registries.
    pub fn digest(&self) -> Sha256Hash {
        Sha256Hash::digest(&self.body_bytes())
    }

    /// Adds an anchor; its name, key and key name must all be new. Drops signatures.
    pub fn add_anchor(&mut self, anchor: Anchor) -> Result<(), RegistryError> {
        check_anchor(&anchor)?;
        for other in &self.body.anchors {
            if other.name == anchor.name {
                return Err(RegistryError::DuplicateAnchor { name: anchor.name });
            }
            if same_key_or_name(&other.key, &anchor.key) {
                return Err(RegistryError::DuplicateAnchorKey {
                    name: anchor.name,
                    other: other.name.clone(),
                    key: anchor.key.to_string(),
                });
            }
        }
        let at = self.body.anchors.partition_point(|a| a.name < anchor.name);
        self.body.anchors.insert(at, anchor);
        self.signatures.clear();
        Ok(())
    }

    /// Removes and returns an anchor. Drops signatures.
    pub fn remove_anchor(&mut self, name: &AnchorName) -> Result<Anchor, RegistryError> {
        let at = self
            .body
            .anchors
            .binary_search_by(|a| a.name.cmp(name))
            .map_err(|_| RegistryError::UnknownAnchor { name: name.clone() })?;
        self.signatures.clear();
        Ok(self.body.anchors.remove(at))
    }

    /// Replaces the root keys and threshold (a rotation, once versioned with
    /// [`Registry::next_version`]). Drops signatures.
    pub fn set_root_keys(
        &mut self,
        mut keys: Vec<PublicKey>,
        threshold: u64,
    ) -> Result<(), RegistryError> {
        keys.sort_by_cached_key(|k| k.to_string());
        check_root_keys(&keys, threshold)?;
        self.body.root_keys = keys;
        self.body.threshold = threshold;
        self.signatures.clear();
        Ok(())
    }

    /// Sets the expiry (unix seconds). Drops signatures.
    pub fn set_expires(&mut self, expires: u64) -> Result<(), RegistryError> {
        if expires > MAX_SAFE_INTEGER {
            return Err(RegistryError::InvalidExpiry { expires });
        }
        self.body.expires = expires;
        self.signatures.clear();
        Ok(())
    }

    /// The same content as the next version, unsigned: the start of any change
    /// to a published registry.
    pub fn next_version(&self) -> Result<Self, RegistryError> {
        let version = self.body.version + 1;
        if version > MAX_SAFE_INTEGER {
            return Err(RegistryError::InvalidVersion { version });
        }
        Ok(Self {
            body: Body {
                version,
                ..self.body.clone()
            },
            signatures: Vec::new(),
        })
    }

    /// Adds (or replaces) `key`'s signature. Any key may sign: during a
    /// rotation the old root keys sign a version that no longer lists them.
    pub fn sign(&mut self, key: &SecretKey) {
        let public = key.public();
        let sig = key.sign(&self.signed_message());
        self.signatures
            .retain(|s| s.key.as_bytes() != public.as_bytes());
        let signature = RegistrySignature { key: public, sig };
        let at = self
            .signatures
            .partition_point(|s| s.key.to_string() < signature.key.to_string());
        self.signatures.insert(at, signature);
    }

    /// Decides whether to trust this version as a gateway configured with
    /// `root` does: with no version trusted yet, it must also carry a
    /// threshold of signatures by the configured root keys, so whoever
    /// answers the first fetch cannot plant a registry of their own (as a TUF
    /// client ships its root). Later versions rotate as [`Registry::verify`]
    /// says.
    pub fn verify_from(
        &self,
        root: &TrustRoot,
        previous: Option<&Registry>,
        now: u64,
    ) -> Result<(), RegistryError> {
        self.verify(previous, now)?;
        if previous.is_none() {
            let have = self.count_signers(&self.signed_message(), &root.keys);
            if (have as u64) < root.threshold {
                return Err(RegistryError::UntrustedRoot {
                    version: self.body.version,
                    have,
                    need: root.threshold,
                });
            }
        }
        Ok(())
    }

    /// Decides whether to trust this version at `now` (unix seconds), given the
    /// newest version already trusted, if any (see the module docs).
    pub fn verify(&self, previous: Option<&Registry>, now: u64) -> Result<(), RegistryError> {
        if now >= self.body.expires {
            return Err(RegistryError::Expired {
                version: self.body.version,
                expires: self.body.expires,
                now,
            });
        }
        self.verify_signed(previous)
    }

    /// Whether this version is the next after `previous` as a step of a walk
    /// through skipped versions: signed by its own and `previous`'s root
    /// thresholds, exactly one version later. Its expiry is not checked: an
    /// intermediate version only carries the trust forward, as in TUF.
    pub fn verify_successor(&self, previous: &Registry) -> Result<(), RegistryError> {
        if self.body.version != previous.body.version.saturating_add(1) {
            return Err(RegistryError::SkippedVersion {
                trusted: previous.body.version,
                found: self.body.version,
            });
        }
        self.verify_signed(Some(previous))
    }

    fn verify_signed(&self, previous: Option<&Registry>) -> Result<(), RegistryError> {
        let version = self.body.version;
        let message = self.signed_message();
        let have = self.count_signers(&message, &self.body.root_keys);
        if (have as u64) < self.body.threshold {
            return Err(RegistryError::NotEnoughSignatures {
                version,
                have,
                need: self.body.threshold,
            });
        }
        let Some(previous) = previous else {
            return Ok(());
        };
        let trusted = previous.body.version;
        if version < trusted {
            return Err(RegistryError::Rollback {
                trusted,
                found: version,
            });
        }
        if version == trusted {
            let (trusted_digest, found_digest) = (previous.digest(), self.digest());
            if trusted_digest != found_digest {
                return Err(RegistryError::Fork {
                    version,
                    trusted_digest,
                    found_digest,
                });
            }
            return Ok(());
        }
        if version != trusted + 1 {
            return Err(RegistryError::SkippedVersion {
                trusted,
                found: version,
            });
        }
        let have = self.count_signers(&message, &previous.body.root_keys);
        if (have as u64) < previous.body.threshold {
            return Err(RegistryError::RotationNotAuthorised {
                from: trusted,
                to: version,
                have,
                need: previous.body.threshold,
            });
        }
        Ok(())
    }

    /// How many distinct keys among `keys` (by bytes) made a valid signature.
    fn count_signers(&self, message: &[u8], keys: &[PublicKey]) -> usize {
        let allowed: BTreeSet<&[u8; 32]> = keys.iter().map(PublicKey::as_bytes).collect();
        self.signatures
            .iter()
            .filter(|s| allowed.contains(s.key.as_bytes()) && s.key.verify(message, &s.sig))
            .map(|s| s.key.as_bytes())
            .collect::<BTreeSet<_>>()
            .len()
    }

    fn body_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        canonical::write(&mut out, &self.body);
        out
    }

    fn signed_message(&self) -> Vec<u8> {
        [REGISTRY_SIGNATURE_DOMAIN, &self.body_bytes()].concat()
    }

    /// Structural rules that make the rendering canonical and lookups unambiguous.
    fn check(&self) -> Result<(), RegistryError> {
        let body = &self.body;
        if body.format != REGISTRY_FORMAT {
            return Err(RegistryError::UnsupportedFormat {
                found: body.format.clone(),
            });
        }
        if body.version == 0 || body.version > MAX_SAFE_INTEGER {
            return Err(RegistryError::InvalidVersion {
                version: body.version,
            });
        }
        if body.expires > MAX_SAFE_INTEGER {
            return Err(RegistryError::InvalidExpiry {
                expires: body.expires,
            });
        }
        if !is_sorted_by_text(&body.root_keys) {
            return Err(RegistryError::NotSorted { what: "root keys" });
        }
        check_root_keys(&body.root_keys, body.threshold)?;
        // Key bytes and key names seen so far, to the anchor that has them:
        // one lookup per anchor, not a scan of all before it.
        let mut by_bytes: BTreeMap<&[u8], &AnchorName> = BTreeMap::new();
        let mut by_name: BTreeMap<&str, &AnchorName> = BTreeMap::new();
        for (i, anchor) in body.anchors.iter().enumerate() {
            check_anchor(anchor)?;
            if let Some(prev) = i.checked_sub(1).map(|p| &body.anchors[p]) {
                if prev.name == anchor.name {
                    return Err(RegistryError::DuplicateAnchor {
                        name: anchor.name.clone(),
                    });
                }
                if prev.name > anchor.name {
                    return Err(RegistryError::NotSorted { what: "anchors" });
                }
            }
            // As `same_key_or_name` against every anchor before this one.
            let bytes: &[u8] = anchor.key.as_bytes();
            let other = by_bytes
                .insert(bytes, &anchor.name)
                .or(by_name.insert(anchor.key.name(), &anchor.name));
            if let Some(other) = other {
                return Err(RegistryError::DuplicateAnchorKey {
                    name: anchor.name.clone(),
                    other: other.clone(),
                    key: anchor.key.to_string(),
                });
            }
        }
        let keys: Vec<PublicKey> = self.signatures.iter().map(|s| s.key.clone()).collect();
        if !is_sorted_by_text(&keys) {
            return Err(RegistryError::NotSorted { what: "signatures" });
        }
        if let Some(dup) = first_duplicate_bytes(&keys) {
            return Err(RegistryError::DuplicateSignature {
                key: dup.to_string(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

impl FromStr for Registry {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[derive(Serialize)]
struct FileRef<'a> {
    signed: &'a Body,
    signatures: &'a [RegistrySignature],
}

fn check_root_keys(keys: &[PublicKey], threshold: u64) -> Result<(), RegistryError> {
    if let Some(dup) = first_duplicate_bytes(keys) {
        return Err(RegistryError::DuplicateRootKey {
            key: dup.to_string(),
        });
    }
    if threshold == 0 || threshold > keys.len() as u64 {
        return Err(RegistryError::InvalidThreshold {
            threshold,
            keys: keys.len(),
        });
    }
    Ok(())
}

fn check_anchor(anchor: &Anchor) -> Result<(), RegistryError> {
    if let Some(note) = &anchor.note {
        if note.chars().count() > MAX_NOTE_LEN || note.chars().any(char::is_control) {
            return Err(RegistryError::InvalidNote {
                anchor: anchor.name.clone(),
            });
        }
    }
    Ok(())
}

/// Two anchors may share neither key bytes nor key name: a Nix signature names
/// its key, and must lead to exactly one anchor.
fn same_key_or_name(a: &PublicKey, b: &PublicKey) -> bool {
    a.as_bytes() == b.as_bytes() || a.name() == b.name()
}

fn is_sorted_by_text(keys: &[PublicKey]) -> bool {
    keys.windows(2)
        .all(|w| w[0].to_string() <= w[1].to_string())
}

fn first_duplicate_bytes(keys: &[PublicKey]) -> Option<&PublicKey> {
    let mut seen = BTreeSet::new();
    keys.iter().find(|k| !seen.insert(k.as_bytes()))
}

/// Where version `version` of the registry published at `location` (a file
/// path or http(s) URL) is kept: the last path component gets the version as
/// a prefix, `…/registry.json` → `…/7.registry.json`. `None` for a location
/// without a file name (a bare host, a folder, an `ipfs://` CID).
pub fn versioned_location(location: &str, version: u64) -> Option<String> {
    let end = location.find(['?', '#']).unwrap_or(location.len());
    let (path, suffix) = location.split_at(end);
    let after_scheme = path.find("://").map_or(0, |i| {
        // `scheme://host/…`: the file name starts after the host.
        path[i + 3..].find('/').map_or(path.len(), |j| i + 3 + j)
    });
    if path.starts_with("ipfs://") || path.starts_with("ipns://") || after_scheme == path.len() {
        return None;
    }
    let slash = path[after_scheme..]
        .rfind('/')
        .map(|i| after_scheme + i + 1);
    let start = slash.unwrap_or(0);
    let name = &path[start..];
    if name.is_empty() || name == "." || name == ".." {
        return None;
    }
    Some(format!("{}{version}.{name}{suffix}", &path[..start]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::testing::key;
    use proptest::prelude::*;

    const NOW: u64 = 1_750_000_000;
    const LATER: u64 = NOW + 86_400;

    fn anchor(name: &str) -> (SecretKey, Anchor) {
        let secret = key(&format!("{name}-1"));
        let anchor = Anchor {
            key: secret.public(),
            name: AnchorName::parse(name).expect("valid"),
            note: Some(format!("run by {name}")),
            sources: vec![
                Source::parse(&format!("https://{name}.example/set.jsonl")).expect("valid")
            ],
        };
        (secret, anchor)
    }

    fn roots(n: usize) -> Vec<SecretKey> {
        (0..n).map(|i| key(&format!("root-{i}"))).collect()
    }

    fn publics(keys: &[SecretKey]) -> Vec<PublicKey> {
        keys.iter().map(SecretKey::public).collect()
    }

    fn signed_v1(roots: &[SecretKey], threshold: u64) -> Registry {
        let mut reg = Registry::init(publics(roots), threshold, LATER).expect("valid");
        reg.add_anchor(anchor("alpha").1).expect("new");
        reg.add_anchor(anchor("beta").1).expect("new");
        for k in roots.iter().take(threshold as usize) {
            reg.sign(k);
        }
        reg
    }

    #[test]
    fn a_first_registry_needs_the_configured_root() {
        let real = roots(3);
        let root = TrustRoot::new(publics(&real), 2).expect("valid root");
        assert_eq!(signed_v1(&real, 2).verify_from(&root, None, NOW), Ok(()));
        // Self-consistent, signed by its own roots: planted, so refused.
        let planted = signed_v1(&roots(3), 2);
        assert_eq!(planted.verify(None, NOW), Ok(()));
        assert_eq!(
            planted.verify_from(&root, None, NOW),
            Err(RegistryError::UntrustedRoot {
                version: 1,
                have: 0,
                need: 2
            })
        );
        // One configured key is not a threshold of two.
        let mut mixed = Registry::init(vec![real[0].public(), key("other-1").public()], 1, LATER)
            .expect("valid");
        mixed.sign(&real[0]);
        assert_eq!(
            mixed.verify_from(&root, None, NOW),
            Err(RegistryError::UntrustedRoot {
                version: 1,
                have: 1,
                need: 2
            })
        );
    }

    #[test]
    fn later_versions_rotate_from_the_trusted_one_not_the_configured_root() {
        let r = roots(2);
        let root = TrustRoot::new(publics(&r[..1]), 1).expect("valid root");
        let v1 = signed_v1(&r[..1], 1);
        let mut v2 = v1.next_version().expect("v2");
        v2.set_root_keys(publics(&r[1..]), 1).expect("rotate");
        v2.sign(&r[0]);
        v2.sign(&r[1]);
        assert_eq!(v2.verify_from(&root, Some(&v1), NOW), Ok(()));
        // A gateway that starts at version 2 accepts it: a configured key signed it.
        assert_eq!(v2.verify_from(&root, None, NOW), Ok(()));
        // Without that signature, it does not.
        let mut unsigned_by_root = v1.next_version().expect("v2");
        unsigned_by_root
            .set_root_keys(publics(&r[1..]), 1)
            .expect("rotate");
        unsigned_by_root.sign(&r[1]);
        assert!(matches!(
            unsigned_by_root.verify_from(&root, None, NOW),
            Err(RegistryError::UntrustedRoot { version: 2, .. })
        ));
    }

    #[test]
    fn trust_roots_need_distinct_keys_and_a_reachable_threshold() {
        let r = roots(2);
        assert!(TrustRoot::new(publics(&r), 2).is_ok());
        assert!(matches!(
            TrustRoot::new(publics(&r), 3),
            Err(RegistryError::InvalidThreshold { .. })
        ));
        assert!(matches!(
            TrustRoot::new(publics(&r), 0),
            Err(RegistryError::InvalidThreshold { .. })
        ));
        assert!(matches!(
            TrustRoot::new(vec![r[0].public(), r[0].public()], 1),
            Err(RegistryError::DuplicateRootKey { .. })
        ));
    }

    #[test]
    fn threshold_of_root_keys_verifies() {
        let r = roots(3);
        assert_eq!(signed_v1(&r, 2).verify(None, NOW), Ok(()));
    }

    #[test]
    fn rejects_below_threshold() {
        let r = roots(3);
        let mut reg = signed_v1(&r, 2);
        reg.signatures.truncate(1);
        assert_eq!(
            reg.verify(None, NOW),
            Err(RegistryError::NotEnoughSignatures {
                version: 1,
                have: 1,
                need: 2
            })
        );
    }

    #[test]
    fn signatures_from_non_root_keys_count_for_nothing() {
        let r = roots(2);
        let mut reg = Registry::init(publics(&r), 1, LATER).expect("valid");
        reg.sign(&key("stranger"));
        reg.sign(&key("root-0"));
        assert!(matches!(
            reg.verify(None, NOW),
            Err(RegistryError::NotEnoughSignatures { have: 0, .. })
        ));
    }

    #[test]
    fn same_key_signing_twice_counts_once() {
        let r = roots(2);
        let mut reg = Registry::init(publics(&r), 2, LATER).expect("valid");
        reg.sign(&r[0]);
        reg.sign(&r[0]);
        assert_eq!(reg.signatures().len(), 1);
        // Even a file listing the signature twice counts it once.
        reg.signatures.push(reg.signatures[0].clone());
        assert!(matches!(
            reg.verify(None, NOW),
            Err(RegistryError::NotEnoughSignatures { have: 1, .. })
        ));
        assert!(matches!(
            Registry::parse(&reg.render()),
            Err(RegistryError::DuplicateSignature { .. })
        ));
    }

    #[test]
    fn same_key_bytes_under_two_names_is_one_root_key() {
        let r = roots(1);
        let alias = PublicKey::parse(&r[0].public().to_string().replacen("root-0", "alias", 1))
            .expect("valid");
        assert!(matches!(
            Registry::init(vec![r[0].public(), alias], 2, LATER),
            Err(RegistryError::DuplicateRootKey { .. })
        ));
    }

    #[test]
    fn rejects_expired_registry() {
        let r = roots(1);
        let reg = signed_v1(&r, 1);
        assert_eq!(
            reg.verify(None, LATER),
            Err(RegistryError::Expired {
                version: 1,
                expires: LATER,
                now: LATER
            })
        );
    }

    #[test]
    fn tampered_content_no_longer_verifies() {
        let r = roots(1);
        let reg = signed_v1(&r, 1);
        let text = reg.render().replace("run by alpha", "run by mallory");
        let tampered = Registry::parse(&text).expect("still well-formed");
        assert!(matches!(
            tampered.verify(None, NOW),
            Err(RegistryError::NotEnoughSignatures { have: 0, .. })
        ));
    }

    #[test]
    fn editing_drops_signatures() {
        let r = roots(1);
        let mut reg = signed_v1(&r, 1);
        reg.remove_anchor(&AnchorName::parse("beta").expect("valid"))
            .expect("present");
        assert!(reg.signatures().is_empty());
    }

    #[test]
    fn rotation_signed_by_old_and_new_thresholds_is_accepted() {
        let old = roots(3);
        let v1 = signed_v1(&old, 2);
        let new: Vec<SecretKey> = (0..2).map(|i| key(&format!("new-root-{i}"))).collect();
        let mut v2 = v1.next_version().expect("fits");
        v2.set_root_keys(publics(&new), 2).expect("valid");
        for k in new.iter().chain(&old[..2]) {
            v2.sign(k);
        }
        assert_eq!(v2.verify(Some(&v1), NOW), Ok(()));
    }

    #[test]
    fn rotation_signed_only_by_new_keys_is_refused() {
        let old = roots(3);
        let v1 = signed_v1(&old, 2);
        let new: Vec<SecretKey> = (0..2).map(|i| key(&format!("new-root-{i}"))).collect();
        let mut v2 = v1.next_version().expect("fits");
        v2.set_root_keys(publics(&new), 2).expect("valid");
        for k in new.iter().chain(&old[..1]) {
            v2.sign(k);
        }
        assert_eq!(
            v2.verify(Some(&v1), NOW),
            Err(RegistryError::RotationNotAuthorised {
                from: 1,
                to: 2,
                have: 1,
                need: 2
            })
        );
        // Without a trusted predecessor the new keys alone look fine: callers
        // must pass what they trust.
        assert_eq!(v2.verify(None, NOW), Ok(()));
    }

    #[test]
    fn rotation_signed_only_by_old_keys_is_refused() {
        let old = roots(2);
        let v1 = signed_v1(&old, 2);
        let new: Vec<SecretKey> = (0..2).map(|i| key(&format!("new-root-{i}"))).collect();
        let mut v2 = v1.next_version().expect("fits");
        v2.set_root_keys(publics(&new), 2).expect("valid");
        for k in &old {
            v2.sign(k);
        }
        assert!(matches!(
            v2.verify(Some(&v1), NOW),
            Err(RegistryError::NotEnoughSignatures {
                version: 2,
                have: 0,
                need: 2
            })
        ));
    }

    #[test]
    fn rejects_rollback_fork_and_skipped_versions() {
        let r = roots(1);
        let v1 = signed_v1(&r, 1);
        let mut v2 = v1.next_version().expect("fits");
        v2.sign(&r[0]);
        assert_eq!(
            v1.verify(Some(&v2), NOW),
            Err(RegistryError::Rollback {
                trusted: 2,
                found: 1
            })
        );
        let mut v3 = v2.next_version().expect("fits");
        v3.sign(&r[0]);
        assert_eq!(
            v3.verify(Some(&v1), NOW),
            Err(RegistryError::SkippedVersion {
                trusted: 1,
                found: 3
            })
        );
        let mut other_v2 = v1.next_version().expect("fits");
        other_v2
            .remove_anchor(&AnchorName::parse("alpha").expect("valid"))
            .expect("present");
        other_v2.sign(&r[0]);
        assert!(matches!(
            other_v2.verify(Some(&v2), NOW),
            Err(RegistryError::Fork { version: 2, .. })
        ));
        assert_eq!(v2.verify(Some(&v2), NOW), Ok(()));
    }

    #[test]
    fn rejects_duplicate_anchor_names_keys_and_key_names() {
        let r = roots(1);
        let mut reg = Registry::init(publics(&r), 1, LATER).expect("valid");
        let (_, alpha) = anchor("alpha");
        reg.add_anchor(alpha.clone()).expect("new");
        assert!(matches!(
            reg.add_anchor(alpha.clone()),
            Err(RegistryError::DuplicateAnchor { .. })
        ));
        let same_key = Anchor {
            name: AnchorName::parse("gamma").expect("valid"),
            ..alpha.clone()
        };
        assert!(matches!(
            reg.add_anchor(same_key),
            Err(RegistryError::DuplicateAnchorKey { .. })
        ));
        let same_key_name = Anchor {
            name: AnchorName::parse("delta").expect("valid"),
            key: key("alpha-1").public(),
            ..alpha
        };
        assert!(matches!(
            reg.add_anchor(same_key_name),
            Err(RegistryError::DuplicateAnchorKey { .. })
        ));
    }

    #[test]
    fn parse_refuses_unknown_fields_unsorted_anchors_and_bad_threshold() {
        let r = roots(2);
        let reg = signed_v1(&r, 1);
        let text = reg.render();
        let extra = text.replacen("\"expires\"", "\"extra\": 1,\n    \"expires\"", 1);
        assert!(matches!(
            Registry::parse(&extra),
            Err(RegistryError::Json { .. })
        ));
        let mut unsorted = reg.clone();
        unsorted.body.anchors.reverse();
        assert_eq!(
            Registry::parse(&unsorted.render()),
            Err(RegistryError::NotSorted { what: "anchors" })
        );
        let mut zero = reg.clone();
        zero.body.threshold = 0;
        assert!(matches!(
            Registry::parse(&zero.render()),
            Err(RegistryError::InvalidThreshold { .. })
        ));
        let mut wrong_format = reg;
        wrong_format.body.format = "nixpfs-registry/2".into();
        assert!(matches!(
            Registry::parse(&wrong_format.render()),
            Err(RegistryError::UnsupportedFormat { .. })
        ));
    }

    #[test]
    fn refuses_bad_notes_versions_expiry_and_unknown_removals() {
        let r = roots(1);
        let mut reg = Registry::init(publics(&r), 1, LATER).expect("valid");
        let (_, mut a) = anchor("alpha");
        a.note = Some("line\nbreak".into());
        assert!(matches!(
            reg.add_anchor(a),
            Err(RegistryError::InvalidNote { .. })
        ));
        assert!(matches!(
            reg.remove_anchor(&AnchorName::parse("ghost").expect("valid")),
            Err(RegistryError::UnknownAnchor { .. })
        ));
        assert!(matches!(
            reg.set_expires(MAX_SAFE_INTEGER + 1),
            Err(RegistryError::InvalidExpiry { .. })
        ));
        let mut v0 = reg.clone();
        v0.body.version = 0;
        assert!(matches!(
            Registry::parse(&v0.render()),
            Err(RegistryError::InvalidVersion { version: 0 })
        ));
        reg.body.version = MAX_SAFE_INTEGER;
        assert!(matches!(
            reg.next_version(),
            Err(RegistryError::InvalidVersion { .. })
        ));
    }

    #[test]
    fn sources_parse_each_scheme() {
        for ok in [
            "/srv/anchor/set.jsonl",
            "https://a.example/set",
            "http://127.0.0.1:8080/set",
            "ipfs://bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",
            "ipns://k51qzi5uqu5dlvj2baxnqndepeb86cbk3ng7n3i46uzyxzyqj2xjonzllnv0v8",
        ] {
            assert_eq!(Source::parse(ok).map(|s| s.to_string()), Ok(ok.to_owned()));
        }
        for bad in [
            "relative/path",
            "ftp://x",
            "https://",
            "ipfs://nope",
            "ipns://a/b",
            "/with space",
        ] {
            assert!(Source::parse(bad).is_err(), "accepted {bad}");
        }
    }

    #[test]
    fn anchor_names_are_restricted() {
        assert!(AnchorName::parse("cache.example.org").is_ok());
        for bad in ["", "-x", ".x", "a b", "a\"b", &"a".repeat(MAX_NAME_LEN + 1)] {
            assert!(AnchorName::parse(bad).is_err(), "accepted {bad}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in "\\PC{0,400}") {
            let _ = Registry::parse(&text);
        }

        #[test]
        fn parse_never_panics_on_mutated_registries(at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let r = roots(2);
            let mut bytes = signed_v1(&r, 2).render().into_bytes();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            if let Ok(text) = std::str::from_utf8(&bytes) {
                if let Ok(reg) = Registry::parse(text) {
                    let _ = reg.verify(None, NOW);
                }
            }
        }

        #[test]
        fn render_parse_round_trip(
            n_anchors in 0usize..4,
            n_roots in 1usize..4,
            note in proptest::option::of("[ -~]{0,40}"),
            version in 1u64..1000,
            expires in 0u64..MAX_SAFE_INTEGER,
        ) {
            let r = roots(n_roots);
            let mut reg = Registry::init(publics(&r), n_roots as u64, expires).expect("valid");
            for i in 0..n_anchors {
                let (_, mut a) = anchor(&format!("anchor{i}"));
                a.note = note.clone();
                reg.add_anchor(a).expect("new");
            }
            reg.body.version = version;
            for k in &r {
                reg.sign(k);
            }
            let text = reg.render();
            let back = Registry::parse(&text).expect("parses");
            prop_assert_eq!(&back, &reg);
            prop_assert_eq!(back.render(), text);
        }
    }

    #[test]
    fn versioned_locations_prefix_the_file_name() {
        for (location, expected) in [
            ("/srv/registry.json", Some("/srv/7.registry.json")),
            ("registry.json", Some("7.registry.json")),
            (
                "https://example.org/nix/registry.json",
                Some("https://example.org/nix/7.registry.json"),
            ),
            (
                "https://example.org/registry.json?x=1",
                Some("https://example.org/7.registry.json?x=1"),
            ),
            ("https://example.org", None),
            ("https://example.org/", None),
            ("/srv/", None),
            (
                "ipfs://bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",
                None,
            ),
        ] {
            assert_eq!(
                versioned_location(location, 7).as_deref(),
                expected,
                "{location}"
            );
        }
    }

    #[test]
    fn a_walk_through_skipped_versions_checks_each_step_but_only_the_newest_expiry() {
        let r = [key("root-a"), key("root-b")];
        let mut v1 = Registry::init(vec![r[0].public()], 1, NOW + 10).expect("valid");
        v1.sign(&r[0]);
        // v2 rotates to root-b and expires before now; v3 is current.
        let mut v2 = v1.next_version().expect("fits");
        v2.set_root_keys(vec![r[1].public()], 1).expect("valid");
        v2.set_expires(NOW - 1).expect("valid");
        v2.sign(&r[0]);
        v2.sign(&r[1]);
        let mut v3 = v2.next_version().expect("fits");
        v3.set_expires(NOW + 100).expect("valid");
        v3.sign(&r[1]);
        assert!(matches!(
            v3.verify(Some(&v1), NOW),
            Err(RegistryError::SkippedVersion { .. })
        ));
        assert_eq!(v2.verify_successor(&v1), Ok(()));
        assert_eq!(v3.verify(Some(&v2), NOW), Ok(()));
        // A step not signed by the previous roots breaks the walk.
        let mut rogue_v2 = v1.next_version().expect("fits");
        rogue_v2
            .set_root_keys(vec![r[1].public()], 1)
            .expect("valid");
        rogue_v2.sign(&r[1]);
        assert!(matches!(
            rogue_v2.verify_successor(&v1),
            Err(RegistryError::RotationNotAuthorised { .. })
        ));
        assert!(matches!(
            v3.verify_successor(&v1),
            Err(RegistryError::SkippedVersion { .. })
        ));
    }
}
