//! An anchor's signed, versioned publication of mappings (or a contributor's
//! claims): the file format, its writer and a streaming, verifying reader.
//! Trust decisions across versions (rollback, fork, freeze) live in `trust`.
//!
//! # File format (`nixpfs-mapping-set/1`)
//! UTF-8 JSON Lines, every line ending in `\n` (no CR, nothing after the last):
//! ```text
//! {"anchor":…,"count":N,"created":T,"entries":"sha256:…","expires":T,"format":"nixpfs-mapping-set/1","key":"name:base64","kind":"anchor","previous":null|"sha256:…","signature":"name:base64","version":V}
//! {"ca":…,"cid":…,"deriver":…,"narHash":…,"narSize":…,"path":…,"profile":…,"references":[…],"sig":…}
//! …one entry per line, sorted by store-path hash part, unique
//! ```
//! Each line must equal the RFC 8785 (JCS) rendering of what it parses to (see
//! [`crate::canonical`]): fields in sorted order, no whitespace, hashes as
//! `sha256:<nix32>`, CIDs in canonical base, references as base names in Nix's
//! order. JSON Lines because it streams (one entry per line, no framing state),
//! diffs and greps like text, needs no new dependency, and JCS gives it one
//! byte-exact form that any JCS library reproduces; CBOR would be smaller but
//! opaque to the tools anchors and auditors already have.
//!
//! # What is signed: every byte
//! - The header line minus its `signature` field, prefixed by
//!   [`HEADER_SIGNATURE_DOMAIN`], is signed with the anchor's ed25519 key; the
//!   signature's own bytes are bound because the line must be canonical.
//! - `entries` is sha256 over the exact bytes of all entry lines, newlines
//!   included, and `count` their number; so a changed, added, removed or
//!   reordered byte after the header changes the digest.
//! - The set's identity ([`SignedHeader::digest`], what `previous` points at and
//!   what gateways remember) is sha256 of the unsigned header rendering.
//!
//! Each entry also carries the anchor's Nix signature over Nix's fingerprint;
//! the reader checks it too (unless told to defer it, see [`EntryChecks`]), so
//! every entry can be passed on to Nix alone.
//!
//! # Goals
//! - One byte-exact, streamable file per set version that any JCS library
//!   reproduces, whose every byte the anchor's signature covers.
//! - Verify while reading, in bounded memory, so a set of millions of
//!   entries costs one pass and a bad set is refused before it is trusted.
//! - Chain versions (`previous`, `version`) so rollbacks and forks show.
//!
//! # Non-goals
//! - Deciding trust across versions or anchors (that is `trust` and
//!   `policy`), fetching sets, or lookups without downloading the whole set
//!   (a transparency log is the planned answer).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io::{self, BufRead, BufWriter, Read as _, Write};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::canonical::{self, MAX_SAFE_INTEGER};
use crate::hash::Sha256Hash;
use crate::keys::{PublicKey, SecretKey, Signature};
use crate::mapping::{Mapping, MappingError};
use crate::registry::AnchorName;
use crate::store_path::{StorePath, StorePathHash};

/// The `format` value of this version of the file format.
pub const SET_FORMAT: &str = "nixpfs-mapping-set/1";
/// Prefix of the signed header bytes, so a header signature can never be
/// mistaken for a Nix fingerprint or registry signature by the same key.
pub const HEADER_SIGNATURE_DOMAIN: &[u8] = b"nixpfs-mapping-set-header/1\n";
/// Longest line accepted (a path with tens of thousands of references fits).
pub const MAX_LINE_LEN: usize = 4 << 20;

/// Why a mapping set file or header was refused, or could not be written.
#[derive(Debug, Error)]
pub enum SetError {
    #[error("reading or writing the mapping set failed: {0}")]
    Io(#[from] io::Error),
    #[error("line {line} is longer than {MAX_LINE_LEN} bytes")]
    LineTooLong { line: u64 },
    #[error("line {line} does not end with a newline (truncated file or trailing bytes)")]
    NoFinalNewline { line: u64 },
    #[error("the mapping set is empty: no header line")]
    MissingHeader,
    #[error("line 1: header is malformed: {reason}")]
    MalformedHeader { reason: String },
    #[error("line 1: header is not in canonical form (fields, order, spacing or encodings differ from its rendering)")]
    HeaderNotCanonical,
    #[error("line 1: unsupported format `{found}`, expected `{SET_FORMAT}`")]
    UnsupportedFormat { found: String },
    #[error("header of `{anchor}` version {version} is invalid: {reason}")]
    InvalidHeader {
        anchor: AnchorName,
        version: u64,
        reason: &'static str,
    },
    #[error("header signature of `{anchor}` version {version} does not verify under key `{key}`")]
    BadHeaderSignature {
        anchor: AnchorName,
        version: u64,
        key: String,
    },
    #[error("`{anchor}` line {line}: malformed entry: {source}")]
    MalformedEntry {
        anchor: AnchorName,
        line: u64,
        source: MappingError,
    },
    #[error(
        "`{anchor}` line {line}: entry {path} repeats the store path hash of the previous entry"
    )]
    DuplicateEntry {
        anchor: AnchorName,
        line: u64,
        path: String,
    },
    #[error("`{anchor}` line {line}: entry {path} is not after {previous} (entries are sorted by hash part)")]
    UnsortedEntry {
        anchor: AnchorName,
        line: u64,
        path: String,
        previous: String,
    },
    #[error("`{anchor}` line {line}: Nix signature of {path} by key `{signer}` does not verify under the set key `{key}`")]
    EntrySignature {
        anchor: AnchorName,
        line: u64,
        path: String,
        signer: String,
        key: String,
    },
    #[error(
        "`{anchor}` version {version}: header counts {signed} entries, the file has {counted}"
    )]
    EntryCountMismatch {
        anchor: AnchorName,
        version: u64,
        signed: u64,
        counted: u64,
    },
    #[error(
        "`{anchor}` version {version}: entries digest is {computed}, the header signed {signed}"
    )]
    EntriesDigestMismatch {
        anchor: AnchorName,
        version: u64,
        signed: Sha256Hash,
        computed: Sha256Hash,
    },
    #[error("cannot sign for `{anchor}` with key `{given}`: the header names key `{expected}`")]
    WrongSigningKey {
        anchor: AnchorName,
        expected: String,
        given: String,
    },
    #[error("{path} in the set of `{anchor}` is signed by key `{signer}`, not the set's key `{key}`: a set carries only its own key's signatures")]
    ForeignEntry {
        anchor: AnchorName,
        path: String,
        signer: String,
        key: String,
    },
}

/// Who signed a set and what its mappings are worth: an anchor's assertions,
/// or a contributor's claims, which are evidence and never make a path servable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetKind {
    Anchor,
    Claims,
}

impl fmt::Display for SetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SetKind::Anchor => "anchor",
            SetKind::Claims => "claims",
        })
    }
}

/// What a set header states. `previous` is the digest of version − 1 and is
/// absent exactly for version 1; `entries` and `count` describe the entry lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetHeader {
    pub kind: SetKind,
    pub anchor: AnchorName,
    pub key: PublicKey,
    pub version: u64,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds; from then on the set no longer counts (freeze protection).
    pub expires: u64,
    pub previous: Option<Sha256Hash>,
    pub entries: Sha256Hash,
    pub count: u64,
}

impl SetHeader {
    fn check(&self) -> Result<(), SetError> {
        let invalid = |reason| SetError::InvalidHeader {
            anchor: self.anchor.clone(),
            version: self.version,
            reason,
        };
        if self.version == 0 {
            return Err(invalid("versions start at 1"));
        }
        if self.previous.is_some() != (self.version > 1) {
            return Err(invalid(
                "a previous digest is required after version 1 and forbidden in it",
            ));
        }
        if self.created > self.expires {
            return Err(invalid("created after it expires"));
        }
        if [self.version, self.created, self.expires, self.count]
            .iter()
            .any(|&n| n > MAX_SAFE_INTEGER)
        {
            return Err(invalid("a number exceeds 2^53 - 1"));
        }
        Ok(())
    }

    fn wire<'a>(&'a self, signature: Option<&'a Signature>) -> HeaderOut<'a> {
        HeaderOut {
            anchor: &self.anchor,
            count: self.count,
            created: self.created,
            entries: &self.entries,
            expires: self.expires,
            format: SET_FORMAT,
            key: &self.key,
            kind: self.kind,
            previous: self.previous.as_ref(),
            signature,
            version: self.version,
        }
    }

    /// The unsigned canonical rendering: hashed for the digest, signed after
    /// the domain prefix.
    fn unsigned_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        canonical::write(&mut out, &self.wire(None));
        out
    }
}

/// A header whose signature verified under the key it names, with its exact
/// line. Two of them with one anchor and version but different digests prove
/// a fork to anyone.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedHeader {
    header: SetHeader,
    signature: Signature,
    digest: Sha256Hash,
    line: String,
}

impl SignedHeader {
    /// Signs `header` with `key`, which must be the key the header names.
    pub fn sign(header: SetHeader, key: &SecretKey) -> Result<Self, SetError> {
        header.check()?;
        let public = key.public();
        if public != header.key {
            return Err(SetError::WrongSigningKey {
                anchor: header.anchor,
                expected: header.key.to_string(),
                given: public.to_string(),
            });
        }
        let unsigned = header.unsigned_bytes();
        let signature = key.sign(&[HEADER_SIGNATURE_DOMAIN, &unsigned].concat());
        let line = canonical::to_string(&header.wire(Some(&signature)));
        Ok(Self {
            digest: Sha256Hash::digest(&unsigned),
            header,
            signature,
            line,
        })
    }

    /// Reads a header line (without its newline): canonical, valid, and signed
    /// by the key it names. Whether that key may speak is the caller's question.
    pub fn parse(line: &[u8]) -> Result<Self, SetError> {
        let wire: HeaderIn =
            serde_json::from_slice(line).map_err(|err| SetError::MalformedHeader {
                reason: err.to_string(),
            })?;
        if wire.format != SET_FORMAT {
            return Err(SetError::UnsupportedFormat { found: wire.format });
        }
        let header = SetHeader {
            kind: wire.kind,
            anchor: wire.anchor,
            key: wire.key,
            version: wire.version,
            created: wire.created,
            expires: wire.expires,
            previous: wire.previous,
            entries: wire.entries,
            count: wire.count,
        };
        header.check()?;
        let rendered = canonical::to_string(&header.wire(Some(&wire.signature)));
        if rendered.as_bytes() != line {
            return Err(SetError::HeaderNotCanonical);
        }
        let unsigned = header.unsigned_bytes();
        if !header.key.verify(
            &[HEADER_SIGNATURE_DOMAIN, &unsigned].concat(),
            &wire.signature,
        ) {
            return Err(SetError::BadHeaderSignature {
                anchor: header.anchor,
                version: header.version,
                key: header.key.to_string(),
            });
        }
        Ok(Self {
            digest: Sha256Hash::digest(&unsigned),
            header,
            signature: wire.signature,
            line: rendered,
        })
    }

    pub fn header(&self) -> &SetHeader {
        &self.header
    }

    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// The set's identity: sha256 of the unsigned canonical header, which
    /// commits to every entry byte. The next version's `previous`.
    pub fn digest(&self) -> &Sha256Hash {
        &self.digest
    }

    /// The exact signed header line, without newline: portable evidence.
    pub fn line(&self) -> &str {
        &self.line
    }
}

impl fmt::Display for SignedHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.line)
    }
}

impl fmt::Debug for SignedHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SignedHeader({} v{} {})",
            self.header.anchor, self.header.version, self.digest
        )
    }
}

impl Serialize for SignedHeader {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.line)
    }
}

impl<'de> Deserialize<'de> for SignedHeader {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let line = String::deserialize(deserializer)?;
        SignedHeader::parse(line.as_bytes()).map_err(serde::de::Error::custom)
    }
}

#[derive(Serialize)]
struct HeaderOut<'a> {
    anchor: &'a AnchorName,
    count: u64,
    created: u64,
    entries: &'a Sha256Hash,
    expires: u64,
    format: &'static str,
    key: &'a PublicKey,
    kind: SetKind,
    previous: Option<&'a Sha256Hash>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signature: Option<&'a Signature>,
    version: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderIn {
    anchor: AnchorName,
    count: u64,
    created: u64,
    entries: Sha256Hash,
    expires: u64,
    format: String,
    key: PublicKey,
    kind: SetKind,
    previous: Option<Sha256Hash>,
    signature: Signature,
    version: u64,
}

/// The header fields a publisher chooses; the rest (`key`, `entries`, `count`)
/// follow from the signing key and the entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetParams {
    pub kind: SetKind,
    pub anchor: AnchorName,
    pub version: u64,
    pub created: u64,
    pub expires: u64,
    pub previous: Option<Sha256Hash>,
}

/// Writes a complete set: header line, then one line per entry. `entries` must
/// be sorted by hash part, unique, and Nix-signed by `key` (checked by name;
/// readers check the signatures); it is walked twice (digest, then output), so
/// memory stays flat however many entries there are. Returns the signed header.
pub fn write_set<'a, I, W>(
    params: &SetParams,
    entries: I,
    key: &SecretKey,
    out: W,
) -> Result<SignedHeader, SetError>
where
    I: IntoIterator<Item = &'a Mapping>,
    I::IntoIter: Clone,
    W: Write,
{
    let entries = entries.into_iter();
    let mut scratch = Vec::new();
    let mut hasher = Sha256::new();
    let mut count = 0u64;
    let mut last: Option<&StorePath> = None;
    for mapping in entries.clone() {
        count += 1;
        let line = count + 1;
        check_order(&params.anchor, line, last, mapping.path())?;
        last = Some(mapping.path());
        if mapping.signature().name() != key.name() {
            return Err(SetError::ForeignEntry {
                anchor: params.anchor.clone(),
                path: mapping.path().to_string(),
                signer: mapping.signature().name().to_owned(),
                key: key.name().to_owned(),
            });
        }
        if mapping.data().nar_size > MAX_SAFE_INTEGER {
            return Err(SetError::MalformedEntry {
                anchor: params.anchor.clone(),
                line,
                source: MappingError::SizeTooLarge {
                    path: mapping.path().to_string(),
                    nar_size: mapping.data().nar_size,
                },
            });
        }
        scratch.clear();
        mapping.write_canonical(&mut scratch);
        scratch.push(b'\n');
        hasher.update(&scratch);
    }
    let header = SignedHeader::sign(
        SetHeader {
            kind: params.kind,
            anchor: params.anchor.clone(),
            key: key.public(),
            version: params.version,
            created: params.created,
            expires: params.expires,
            previous: params.previous,
            entries: Sha256Hash::from_bytes(hasher.finalize().into()),
            count,
        },
        key,
    )?;
    let mut out = BufWriter::new(out);
    out.write_all(header.line.as_bytes())?;
    out.write_all(b"\n")?;
    for mapping in entries {
        scratch.clear();
        mapping.write_canonical(&mut scratch);
        scratch.push(b'\n');
        out.write_all(&scratch)?;
    }
    out.flush()?;
    Ok(header)
}

fn check_order(
    anchor: &AnchorName,
    line: u64,
    last: Option<&StorePath>,
    path: &StorePath,
) -> Result<(), SetError> {
    match last {
        Some(prev) if prev.hash() == path.hash() => Err(SetError::DuplicateEntry {
            anchor: anchor.clone(),
            line,
            path: path.to_string(),
        }),
        Some(prev) if prev.hash() > path.hash() => Err(SetError::UnsortedEntry {
            anchor: anchor.clone(),
            line,
            path: path.to_string(),
            previous: prev.to_string(),
        }),
        _ => Ok(()),
    }
}

/// An anchor's working set: mappings keyed by hash part, so they come out
/// sorted and unique, plus the header fields of the version to write next.
#[derive(Clone, Debug)]
pub struct MappingSetBuilder {
    kind: SetKind,
    anchor: AnchorName,
    version: u64,
    previous: Option<Sha256Hash>,
    entries: BTreeMap<StorePathHash, Mapping>,
}

impl MappingSetBuilder {
    /// An empty version 1.
    pub fn first(kind: SetKind, anchor: AnchorName) -> Self {
        Self {
            kind,
            anchor,
            version: 1,
            previous: None,
            entries: BTreeMap::new(),
        }
    }

    /// The version after `previous`, chained to it, same kind and anchor. Add the
    /// previous entries (e.g. with [`read_set`]) to carry them over.
    pub fn next_after(previous: &SignedHeader) -> Self {
        let h = previous.header();
        Self {
            kind: h.kind,
            anchor: h.anchor.clone(),
            version: h.version + 1,
            previous: Some(*previous.digest()),
            entries: BTreeMap::new(),
        }
    }

    /// Adds or replaces the mapping of its store path; returns the replaced one.
    pub fn insert(&mut self, mapping: Mapping) -> Option<Mapping> {
        self.entries.insert(*mapping.path().hash(), mapping)
    }

    pub fn remove(&mut self, path: &StorePath) -> Option<Mapping> {
        self.entries.remove(path.hash())
    }

    pub fn get(&self, path: &StorePath) -> Option<&Mapping> {
        self.entries.get(path.hash())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Entries in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Mapping> {
        self.entries.values()
    }

    /// Signs and writes this version; see [`write_set`].
    pub fn write<W: Write>(
        &self,
        key: &SecretKey,
        created: u64,
        expires: u64,
        out: W,
    ) -> Result<SignedHeader, SetError> {
        let params = SetParams {
            kind: self.kind,
            anchor: self.anchor.clone(),
            version: self.version,
            created,
            expires,
            previous: self.previous,
        };
        write_set(&params, self.entries.values(), key, out)
    }
}

impl Extend<Mapping> for MappingSetBuilder {
    fn extend<T: IntoIterator<Item = Mapping>>(&mut self, iter: T) {
        for mapping in iter {
            self.insert(mapping);
        }
    }
}

/// How much of each entry the reader checks. Every mode checks every byte
/// against the signed header (form, order, count, digest).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EntryChecks {
    /// Also verify each entry's Nix signature (in parallel batches). What
    /// `nixpfs set verify` must do: it reports an anchor's bad signatures.
    #[default]
    All,
    /// Leave Nix signatures to [`crate::Policy::evaluate`], which verifies the
    /// signature of every mapping it counts, when the path is requested. Sound
    /// because the header signature already binds every entry byte, signature
    /// included, to the anchor: deferring only delays noticing an anchor that
    /// signed badly, whose mappings then count for nothing. ~20× faster.
    DeferNixSignatures,
}

/// Entries parsed and verified together, at most.
const BATCH: usize = 2048;
/// Entry bytes parsed ahead of what has been handed out, at most (plus the
/// line that crosses it): entries may be up to [`MAX_LINE_LEN`] each, and
/// are read before the entries digest at the end can be checked, so the
/// batch is bounded by bytes as well as by count.
pub const MAX_BATCH_BYTES: usize = 4 << 20;

/// Reads a set one entry at a time, verifying as it goes: the header (format,
/// canonical form, signature) on open; each entry's form, order and (with
/// [`EntryChecks::All`]) Nix signature before it is yielded; count, digest and
/// the absence of trailing bytes when the entries end. Memory: one batch of
/// entries, at most [`MAX_BATCH_BYTES`] of lines. Entries yielded before an
/// error are not trustworthy as a set: stage them and commit only once the
/// reader has returned `Ok(None)`.
#[derive(Debug)]
pub struct SetReader<R> {
    reader: R,
    header: SignedHeader,
    checks: EntryChecks,
    line: Vec<u8>,
    scratch: Vec<u8>,
    hasher: Sha256,
    line_no: u64,
    count: u64,
    last: Option<StorePath>,
    /// Verified entries not yet handed out, in file order.
    pending: VecDeque<Mapping>,
    /// The error found after `pending`, reported once `pending` is drained.
    error: Option<SetError>,
    /// The end of the file was reached and every whole-file check passed.
    at_end: bool,
    finished: bool,
}

impl<R: BufRead> SetReader<R> {
    /// Reads and verifies the header line, so the caller can judge the header
    /// (registry, trusted state, expiry) before streaming any entry.
    pub fn open(reader: R) -> Result<Self, SetError> {
        Self::open_with(reader, EntryChecks::All)
    }

    /// [`SetReader::open`] with a choice of entry checks.
    pub fn open_with(mut reader: R, checks: EntryChecks) -> Result<Self, SetError> {
        let mut line = Vec::new();
        match read_line(&mut reader, &mut line, 1)? {
            LineEnd::Eof => return Err(SetError::MissingHeader),
            LineEnd::Newline => {}
        }
        let header = SignedHeader::parse(&line[..line.len() - 1])?;
        Ok(Self {
            reader,
            header,
            checks,
            line,
            scratch: Vec::new(),
            hasher: Sha256::new(),
            line_no: 1,
            count: 0,
            last: None,
            pending: VecDeque::new(),
            error: None,
            at_end: false,
            finished: false,
        })
    }

    pub fn header(&self) -> &SignedHeader {
        &self.header
    }

    /// The next verified entry, `Ok(None)` once the whole file verified.
    /// After an error, always `Ok(None)`.
    pub fn next_entry(&mut self) -> Result<Option<Mapping>, SetError> {
        loop {
            if let Some(mapping) = self.pending.pop_front() {
                return Ok(Some(mapping));
            }
            if self.finished {
                return Ok(None);
            }
            if let Some(err) = self.error.take() {
                self.finished = true;
                return Err(err);
            }
            if self.at_end {
                self.finished = true;
                return Ok(None);
            }
            self.fill();
        }
    }

    /// Drains the remaining entries into `on_entry`; returns the header once
    /// the whole set verified.
    pub fn for_each(mut self, mut on_entry: impl FnMut(Mapping)) -> Result<SignedHeader, SetError> {
        while let Some(mapping) = self.next_entry()? {
            on_entry(mapping);
        }
        Ok(self.header)
    }

    /// Reads up to [`BATCH`] entries or [`MAX_BATCH_BYTES`] of them, verifies
    /// their signatures together, and queues those before the first failure;
    /// the earliest error is kept.
    fn fill(&mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut bytes = 0usize;
        while batch.len() < BATCH && bytes < MAX_BATCH_BYTES {
            match self.read_entry() {
                Ok(Some(entry)) => {
                    bytes += self.line.len();
                    batch.push(entry);
                }
                Ok(None) => {
                    self.at_end = true;
                    break;
                }
                Err(err) => {
                    self.error = Some(err);
                    break;
                }
            }
        }
        if self.checks == EntryChecks::All {
            let key = &self.header.header.key;
            if let Some(bad) = first_bad_signature(&batch, key) {
                let (line, mapping) = &batch[bad];
                self.error = Some(SetError::EntrySignature {
                    anchor: self.header.header.anchor.clone(),
                    line: *line,
                    path: mapping.path().to_string(),
                    signer: mapping.signature().name().to_owned(),
                    key: key.name().to_owned(),
                });
                batch.truncate(bad);
            }
        }
        self.pending
            .extend(batch.into_iter().map(|(_, mapping)| mapping));
    }

    /// The next entry and its line number, checked for everything but its Nix
    /// signature; `Ok(None)` at the end of a file whose count and digest match.
    fn read_entry(&mut self) -> Result<Option<(u64, Mapping)>, SetError> {
        let line_no = self.line_no + 1;
        let h = &self.header.header;
        if read_line(&mut self.reader, &mut self.line, line_no)? == LineEnd::Eof {
            return self.finish().map(|()| None);
        }
        self.line_no = line_no;
        self.hasher.update(&self.line);
        self.count += 1;
        if self.count > h.count {
            return Err(SetError::EntryCountMismatch {
                anchor: h.anchor.clone(),
                version: h.version,
                signed: h.count,
                counted: self.count,
            });
        }
        let body = &self.line[..self.line.len() - 1];
        let mapping = Mapping::parse_canonical(body, &mut self.scratch).map_err(|source| {
            SetError::MalformedEntry {
                anchor: h.anchor.clone(),
                line: line_no,
                source,
            }
        })?;
        check_order(&h.anchor, line_no, self.last.as_ref(), mapping.path())?;
        // Checked in every mode (a string comparison): a set that carries
        // another key's signatures is refused whole, even with signature
        // checks deferred.
        if mapping.signature().name() != h.key.name() {
            return Err(SetError::ForeignEntry {
                anchor: h.anchor.clone(),
                path: mapping.path().to_string(),
                signer: mapping.signature().name().to_owned(),
                key: h.key.name().to_owned(),
            });
        }
        self.last = Some(mapping.path().clone());
        Ok(Some((line_no, mapping)))
    }

    fn finish(&mut self) -> Result<(), SetError> {
        let h = &self.header.header;
        if self.count != h.count {
            return Err(SetError::EntryCountMismatch {
                anchor: h.anchor.clone(),
                version: h.version,
                signed: h.count,
                counted: self.count,
            });
        }
        let computed = Sha256Hash::from_bytes(self.hasher.clone().finalize().into());
        if computed != h.entries {
            return Err(SetError::EntriesDigestMismatch {
                anchor: h.anchor.clone(),
                version: h.version,
                signed: h.entries,
                computed,
            });
        }
        Ok(())
    }
}

impl<R: BufRead> Iterator for SetReader<R> {
    type Item = Result<Mapping, SetError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_entry().transpose()
    }
}

/// Index of the first entry whose Nix signature does not verify under `key`.
/// Signature checks dominate the cost of reading a set (~50 µs each), so the
/// batch is split over the available cores.
fn first_bad_signature(batch: &[(u64, Mapping)], key: &PublicKey) -> Option<usize> {
    let bad = |chunk: &[(u64, Mapping)]| chunk.iter().position(|(_, m)| m.verify(key).is_err());
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    if threads < 2 || batch.len() < 64 {
        return bad(batch);
    }
    let chunk_len = batch.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = batch
            .chunks(chunk_len)
            .enumerate()
            .map(|(i, chunk)| scope.spawn(move || bad(chunk).map(|at| i * chunk_len + at)))
            .collect();
        workers
            .into_iter()
            .filter_map(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .min()
    })
}

/// Verifies a whole set from `reader`, handing each verified entry to
/// `on_entry`; returns the header once every byte checked out. Says nothing
/// about whether the signer may speak: see `trust::verify_set`.
pub fn read_set<R: BufRead>(
    reader: R,
    on_entry: impl FnMut(Mapping),
) -> Result<SignedHeader, SetError> {
    SetReader::open(reader)?.for_each(on_entry)
}

#[derive(Debug, PartialEq, Eq)]
enum LineEnd {
    Newline,
    Eof,
}

/// Reads one `\n`-terminated line into `buf` (newline kept), reading at most
/// [`MAX_LINE_LEN`] + 1 bytes, so a hostile file cannot make us buffer it whole.
fn read_line<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    line: u64,
) -> Result<LineEnd, SetError> {
    buf.clear();
    let limit = MAX_LINE_LEN as u64 + 1;
    let n = reader.by_ref().take(limit).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(LineEnd::Eof);
    }
    if buf.last() != Some(&b'\n') {
        return Err(if buf.len() > MAX_LINE_LEN {
            SetError::LineTooLong { line }
        } else {
            SetError::NoFinalNewline { line }
        });
    }
    Ok(LineEnd::Newline)
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::mapping::testing::data;

    pub const CREATED: u64 = 1_750_000_000;
    pub const EXPIRES: u64 = CREATED + 30 * 86_400;

    pub fn anchor_name(name: &str) -> AnchorName {
        AnchorName::parse(name).expect("valid")
    }

    /// `n` mappings signed by `key`, in file order.
    pub fn entries(key: &SecretKey, seeds: std::ops::Range<u64>) -> Vec<Mapping> {
        let mut builder = MappingSetBuilder::first(SetKind::Anchor, anchor_name("x"));
        builder.extend(seeds.map(|s| data(s, &s.to_le_bytes()).sign(key)));
        builder.iter().cloned().collect()
    }

    /// Writes a set and returns its bytes and header.
    pub fn write(
        params: &SetParams,
        entries: &[Mapping],
        key: &SecretKey,
    ) -> (Vec<u8>, SignedHeader) {
        let mut out = Vec::new();
        let header = write_set(params, entries, key, &mut out).expect("writes");
        (out, header)
    }

    pub fn params(anchor: &str, version: u64, previous: Option<Sha256Hash>) -> SetParams {
        SetParams {
            kind: SetKind::Anchor,
            anchor: anchor_name(anchor),
            version,
            created: CREATED,
            expires: EXPIRES,
            previous,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::mapping::testing::{data, key};
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn read(bytes: &[u8]) -> Result<(SignedHeader, Vec<Mapping>), SetError> {
        let mut got = Vec::new();
        let header = read_set(bytes, |m| got.push(m))?;
        Ok((header, got))
    }

    /// A header signed over whatever entry lines are given, digest and count
    /// computed honestly unless overridden: how a buggy or hostile publisher
    /// gets past the header check and must be caught by the entry checks.
    fn forge(
        key: &SecretKey,
        lines: &[Vec<u8>],
        count: Option<u64>,
        digest: Option<Sha256Hash>,
    ) -> Vec<u8> {
        let mut hasher = Sha256::new();
        for line in lines {
            hasher.update(line);
        }
        let header = SignedHeader::sign(
            SetHeader {
                kind: SetKind::Anchor,
                anchor: anchor_name("alpha"),
                key: key.public(),
                version: 1,
                created: CREATED,
                expires: EXPIRES,
                previous: None,
                entries: digest.unwrap_or_else(|| Sha256Hash::from_bytes(hasher.finalize().into())),
                count: count.unwrap_or(lines.len() as u64),
            },
            key,
        )
        .expect("valid header");
        let mut out = format!("{}\n", header.line()).into_bytes();
        for line in lines {
            out.extend_from_slice(line);
        }
        out
    }

    fn line_of(m: &Mapping) -> Vec<u8> {
        let mut out = Vec::new();
        m.write_canonical(&mut out);
        out.push(b'\n');
        out
    }

    #[test]
    fn written_set_reads_back_identically() {
        let k = key("alpha-1");
        let entries = entries(&k, 0..20);
        let (bytes, header) = write(&params("alpha", 1, None), &entries, &k);
        let (read_header, got) = read(&bytes).expect("verifies");
        assert_eq!(read_header, header);
        assert_eq!(got, entries);
        assert_eq!(header.header().count, 20);
        assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 21);
    }

    #[test]
    fn empty_set_round_trips() {
        let k = key("alpha-1");
        let (bytes, header) = write(&params("alpha", 1, None), &[], &k);
        assert_eq!(header.header().entries, Sha256Hash::digest(b""));
        assert_eq!(read(&bytes).expect("verifies"), (header, vec![]));
    }

    #[test]
    fn writing_is_deterministic() {
        let k = key("alpha-1");
        let entries = entries(&k, 0..5);
        assert_eq!(
            write(&params("alpha", 1, None), &entries, &k).0,
            write(&params("alpha", 1, None), &entries, &k).0
        );
    }

    #[test]
    fn header_line_is_canonical_and_signature_is_domain_separated() {
        let k = key("alpha-1");
        let (_, header) = write(&params("alpha", 1, None), &[], &k);
        assert!(
            header
                .line()
                .starts_with("{\"anchor\":\"alpha\",\"count\":0,\"created\":"),
            "{header}"
        );
        assert!(header
            .line()
            .contains(",\"format\":\"nixpfs-mapping-set/1\","));
        let unsigned = header.header().unsigned_bytes();
        assert_eq!(header.digest(), &Sha256Hash::digest(&unsigned));
        assert!(!k.public().verify(&unsigned, header.signature()));
        assert!(k.public().verify(
            &[HEADER_SIGNATURE_DOMAIN, &unsigned].concat(),
            header.signature()
        ));
    }

    #[test]
    fn builder_chains_versions_and_replaces_paths() {
        let k = key("alpha-1");
        let mut v1 = MappingSetBuilder::first(SetKind::Anchor, anchor_name("alpha"));
        v1.extend(entries(&k, 0..3));
        let mut out = Vec::new();
        let h1 = v1.write(&k, CREATED, EXPIRES, &mut out).expect("writes");
        let mut v2 = MappingSetBuilder::next_after(&h1);
        read_set(out.as_slice(), |m| {
            v2.insert(m);
        })
        .expect("verifies");
        let replaced = v2.insert(data(0, b"rebuilt").sign(&k));
        assert!(replaced.is_some());
        assert_eq!((v2.version(), v2.len()), (2, 3));
        let h2 = v2
            .write(&k, CREATED + 1, EXPIRES, std::io::sink())
            .expect("writes");
        assert_eq!(h2.header().previous, Some(*h1.digest()));
    }

    #[test]
    fn refuses_truncation_and_trailing_bytes() {
        let k = key("alpha-1");
        let (bytes, _) = write(&params("alpha", 1, None), &entries(&k, 0..3), &k);
        assert!(matches!(
            read(&bytes[..bytes.len() - 1]),
            Err(SetError::NoFinalNewline { line: 4 })
        ));
        let last_line = bytes[..bytes.len() - 1]
            .iter()
            .rposition(|&b| b == b'\n')
            .expect("lines")
            + 1;
        assert!(matches!(
            read(&bytes[..last_line]),
            Err(SetError::EntryCountMismatch {
                signed: 3,
                counted: 2,
                ..
            })
        ));
        let mut extra = bytes.clone();
        extra.extend_from_slice(b"x");
        assert!(matches!(
            read(&extra),
            Err(SetError::NoFinalNewline { line: 5 })
        ));
        let mut blank = bytes.clone();
        blank.extend_from_slice(b"\n");
        assert!(matches!(
            read(&blank),
            Err(SetError::EntryCountMismatch { counted: 4, .. })
        ));
        assert!(matches!(read(b""), Err(SetError::MissingHeader)));
    }

    #[test]
    fn refuses_crlf_line_endings() {
        let k = key("alpha-1");
        let (bytes, _) = write(&params("alpha", 1, None), &entries(&k, 0..2), &k);
        let crlf = String::from_utf8(bytes)
            .expect("utf8")
            .replace('\n', "\r\n");
        assert!(matches!(
            read(crlf.as_bytes()),
            Err(SetError::HeaderNotCanonical)
        ));
    }

    #[test]
    fn refuses_header_signed_by_another_key() {
        let k = key("alpha-1");
        let (bytes, header) = write(&params("alpha", 1, None), &[], &k);
        let other = key("alpha-1").public().to_string();
        let swapped = String::from_utf8(bytes)
            .expect("utf8")
            .replace(&header.header().key.to_string(), &other);
        assert!(matches!(
            read(swapped.as_bytes()),
            Err(SetError::BadHeaderSignature { version: 1, .. })
        ));
    }

    #[test]
    fn refuses_non_canonical_or_unknown_headers() {
        let k = key("alpha-1");
        let (bytes, _) = write(&params("alpha", 1, None), &[], &k);
        let text = String::from_utf8(bytes).expect("utf8");
        let spaced = text.replacen("\"count\":0", "\"count\": 0", 1);
        assert!(matches!(
            read(spaced.as_bytes()),
            Err(SetError::HeaderNotCanonical)
        ));
        let extra = text.replacen("{", "{\"extra\":1,", 1);
        assert!(matches!(
            read(extra.as_bytes()),
            Err(SetError::MalformedHeader { .. })
        ));
        let future = text.replacen("nixpfs-mapping-set/1", "nixpfs-mapping-set/2", 1);
        assert!(matches!(
            read(future.as_bytes()),
            Err(SetError::UnsupportedFormat { .. })
        ));
    }

    #[test]
    fn refuses_invalid_header_fields() {
        let k = key("alpha-1");
        let sign = |version, previous| {
            SignedHeader::sign(
                SetHeader {
                    kind: SetKind::Anchor,
                    anchor: anchor_name("alpha"),
                    key: k.public(),
                    version,
                    created: CREATED,
                    expires: EXPIRES,
                    previous,
                    entries: Sha256Hash::digest(b""),
                    count: 0,
                },
                &k,
            )
        };
        assert!(matches!(
            sign(0, None),
            Err(SetError::InvalidHeader { version: 0, .. })
        ));
        assert!(matches!(
            sign(1, Some(Sha256Hash::digest(b"x"))),
            Err(SetError::InvalidHeader { .. })
        ));
        assert!(matches!(sign(2, None), Err(SetError::InvalidHeader { .. })));
    }

    #[test]
    fn refuses_entries_digest_mismatch() {
        let k = key("alpha-1");
        let lines: Vec<Vec<u8>> = entries(&k, 0..2).iter().map(line_of).collect();
        let forged = forge(
            &k,
            &lines,
            None,
            Some(Sha256Hash::digest(b"something else")),
        );
        assert!(matches!(
            read(&forged),
            Err(SetError::EntriesDigestMismatch { version: 1, .. })
        ));
    }

    #[test]
    fn refuses_entry_count_mismatch() {
        let k = key("alpha-1");
        let lines: Vec<Vec<u8>> = entries(&k, 0..2).iter().map(line_of).collect();
        assert!(matches!(
            read(&forge(&k, &lines, Some(3), None)),
            Err(SetError::EntryCountMismatch {
                signed: 3,
                counted: 2,
                ..
            })
        ));
        assert!(matches!(
            read(&forge(&k, &lines, Some(1), None)),
            Err(SetError::EntryCountMismatch {
                signed: 1,
                counted: 2,
                ..
            })
        ));
    }

    #[test]
    fn refuses_duplicate_and_unsorted_entries() {
        let k = key("alpha-1");
        let sorted: Vec<Vec<u8>> = entries(&k, 0..3).iter().map(line_of).collect();
        let dup = vec![sorted[0].clone(), sorted[1].clone(), sorted[1].clone()];
        assert!(matches!(
            read(&forge(&k, &dup, None, None)),
            Err(SetError::DuplicateEntry { line: 4, .. })
        ));
        let unsorted = vec![sorted[1].clone(), sorted[0].clone(), sorted[2].clone()];
        assert!(matches!(
            read(&forge(&k, &unsorted, None, None)),
            Err(SetError::UnsortedEntry { line: 3, .. })
        ));
    }

    #[test]
    fn refuses_entry_whose_nix_signature_does_not_verify() {
        let k = key("alpha-1");
        let impostor = key("alpha-1");
        let mut mixed = entries(&k, 0..3);
        mixed[1] = data(1, &1u64.to_le_bytes()).sign(&impostor);
        let lines: Vec<Vec<u8>> = mixed.iter().map(line_of).collect();
        assert!(matches!(
            read(&forge(&k, &lines, None, None)),
            Err(SetError::EntrySignature { line: 3, .. })
        ));
    }

    /// Reads until the first error; returns how many entries came before it.
    fn entries_before_error(bytes: &[u8], checks: EntryChecks) -> (usize, Option<SetError>) {
        let mut reader = SetReader::open_with(bytes, checks).expect("header is fine");
        let mut yielded = 0;
        loop {
            match reader.next_entry() {
                Ok(Some(_)) => yielded += 1,
                Ok(None) => return (yielded, None),
                Err(err) => return (yielded, Some(err)),
            }
        }
    }

    #[test]
    fn reports_first_bad_signature_across_batches_after_the_entries_before_it() {
        let k = key("alpha-1");
        let impostor = key("alpha-1");
        let mut list = entries(&k, 0..BATCH as u64 + 300);
        for bad in [BATCH + 100, BATCH + 200] {
            list[bad] = list[bad].data().clone().sign(&impostor);
        }
        let lines: Vec<Vec<u8>> = list.iter().map(line_of).collect();
        let forged = forge(&k, &lines, None, None);
        let (yielded, err) = entries_before_error(&forged, EntryChecks::All);
        assert_eq!(yielded, BATCH + 100);
        let want_line = BATCH as u64 + 102;
        assert!(
            matches!(err, Some(SetError::EntrySignature { line, .. }) if line == want_line),
            "{err:?}"
        );
    }

    #[test]
    fn an_earlier_bad_signature_wins_over_a_later_malformed_line() {
        let k = key("alpha-1");
        let mut list = entries(&k, 0..6);
        list[2] = list[2].data().clone().sign(&key("alpha-1"));
        let mut lines: Vec<Vec<u8>> = list.iter().map(line_of).collect();
        lines[4] = b"garbage\n".to_vec();
        let (yielded, err) = entries_before_error(&forge(&k, &lines, None, None), EntryChecks::All);
        assert_eq!(yielded, 2);
        assert!(
            matches!(err, Some(SetError::EntrySignature { line: 4, .. })),
            "{err:?}"
        );
    }

    #[test]
    fn a_set_carrying_another_keys_signature_is_refused_in_every_mode() {
        let k = key("alpha-1");
        let mut list = entries(&k, 0..4);
        list[2] = list[2].data().clone().sign(&key("beta-1"));
        let lines: Vec<Vec<u8>> = list.iter().map(line_of).collect();
        let forged = forge(&k, &lines, None, None);
        for checks in [EntryChecks::All, EntryChecks::DeferNixSignatures] {
            let (yielded, err) = entries_before_error(&forged, checks);
            assert_eq!(yielded, 2, "{checks:?}");
            assert!(
                matches!(&err, Some(SetError::ForeignEntry { signer, .. }) if signer == "beta-1"),
                "{checks:?}: {err:?}"
            );
        }
    }

    #[test]
    fn deferring_nix_signatures_still_checks_every_byte() {
        let k = key("alpha-1");
        let mut list = entries(&k, 0..4);
        list[1] = list[1].data().clone().sign(&key("alpha-1"));
        let lines: Vec<Vec<u8>> = list.iter().map(line_of).collect();
        let forged = forge(&k, &lines, None, None);
        let mut got = Vec::new();
        SetReader::open_with(forged.as_slice(), EntryChecks::DeferNixSignatures)
            .expect("header is fine")
            .for_each(|m| got.push(m))
            .expect("bytes match the signed header");
        assert_eq!(got.len(), 4);
        assert!(
            got[1].verify(&k.public()).is_err(),
            "left for policy to refuse"
        );
        let mut flipped = forged.clone();
        let at = flipped.len() - 10;
        flipped[at] ^= 4;
        let (_, err) = entries_before_error(&flipped, EntryChecks::DeferNixSignatures);
        assert!(err.is_some());
    }

    #[test]
    fn reports_io_errors() {
        struct Broken;
        impl io::Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        assert!(matches!(
            SetReader::open(io::BufReader::new(Broken)),
            Err(SetError::Io(_))
        ));
    }

    #[test]
    fn refuses_malformed_entry_naming_its_line() {
        let k = key("alpha-1");
        let mut lines: Vec<Vec<u8>> = entries(&k, 0..2).iter().map(line_of).collect();
        lines.push(b"{\"not\":\"an entry\"}\n".to_vec());
        assert!(matches!(
            read(&forge(&k, &lines, None, None)),
            Err(SetError::MalformedEntry { line: 4, .. })
        ));
    }

    #[test]
    fn refuses_over_long_line_without_buffering_it() {
        let mut huge = vec![b'{'; MAX_LINE_LEN + 10];
        huge.push(b'\n');
        assert!(matches!(
            read(&huge),
            Err(SetError::LineTooLong { line: 1 })
        ));
    }

    #[test]
    fn writer_refuses_unsorted_foreign_or_wrongly_keyed_input() {
        let k = key("alpha-1");
        let mut list = entries(&k, 0..3);
        list.swap(0, 2);
        assert!(matches!(
            write_set(&params("alpha", 1, None), &list, &k, std::io::sink()),
            Err(SetError::UnsortedEntry { .. })
        ));
        let foreign = entries(&key("beta-1"), 0..1);
        assert!(matches!(
            write_set(&params("alpha", 1, None), &foreign, &k, std::io::sink()),
            Err(SetError::ForeignEntry { .. })
        ));
        let (_, header) = write(&params("alpha", 1, None), &[], &k);
        assert!(matches!(
            SignedHeader::sign(header.header().clone(), &key("alpha-1")),
            Err(SetError::WrongSigningKey { .. })
        ));
    }

    #[test]
    fn reader_yields_entries_before_the_end_and_verdict_at_the_end() {
        let k = key("alpha-1");
        let lines: Vec<Vec<u8>> = entries(&k, 0..3).iter().map(line_of).collect();
        let forged = forge(&k, &lines, None, Some(Sha256Hash::digest(b"x")));
        let mut reader = SetReader::open(forged.as_slice()).expect("header is fine");
        for _ in 0..3 {
            assert!(matches!(reader.next_entry(), Ok(Some(_))));
        }
        assert!(matches!(
            reader.next_entry(),
            Err(SetError::EntriesDigestMismatch { .. })
        ));
        assert!(matches!(reader.next_entry(), Ok(None)));
    }

    #[test]
    fn signed_header_serde_round_trips_and_reverifies() {
        let k = key("alpha-1");
        let (_, header) = write(&params("alpha", 1, None), &entries(&k, 0..2), &k);
        let json = serde_json::to_string(&header).expect("serialises");
        assert_eq!(
            serde_json::from_str::<SignedHeader>(&json).expect("parses"),
            header
        );
        let tampered = json.replacen("\"count\\\":2", "\"count\\\":3", 1);
        assert_ne!(tampered, json);
        assert!(serde_json::from_str::<SignedHeader>(&tampered).is_err());
    }

    /// One small signed set, shared by the bit-flip cases.
    fn fixture() -> &'static Vec<u8> {
        static SET: OnceLock<Vec<u8>> = OnceLock::new();
        SET.get_or_init(|| {
            let k = key("alpha-1");
            let mut list = entries(&k, 0..3);
            let mut with_ca = data(9, b"ca").sign(&k).into_data();
            with_ca.ca = Some(
                crate::mapping::ContentAddress::parse(
                    "fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
                )
                .expect("valid"),
            );
            with_ca.deriver = None;
            list.push(with_ca.sign(&k));
            list.sort_by(|a, b| a.path().cmp(b.path()));
            write(
                &params("alpha", 2, Some(Sha256Hash::digest(b"v1"))),
                &list,
                &k,
            )
            .0
        })
    }

    #[test]
    fn fixture_verifies() {
        assert!(read(fixture()).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn any_single_bit_flip_is_refused(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = fixture().clone();
            let at = pos.index(bytes.len());
            bytes[at] ^= 1 << bit;
            prop_assert!(read(&bytes).is_err(), "flip of bit {} at byte {} accepted", bit, at);
            let deferred = SetReader::open_with(bytes.as_slice(), EntryChecks::DeferNixSignatures)
                .and_then(|r| r.for_each(drop));
            prop_assert!(deferred.is_err(), "flip of bit {} at byte {} accepted when deferring", bit, at);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = read(&bytes);
        }

        #[test]
        fn spliced_lines_are_refused(from in any::<prop::sample::Index>(), to in any::<prop::sample::Index>()) {
            // Moving one line elsewhere keeps every line well-formed and signed.
            let text = String::from_utf8(fixture().clone()).expect("utf8");
            let mut lines: Vec<&str> = text.lines().collect();
            let (i, j) = (from.index(lines.len()), to.index(lines.len()));
            prop_assume!(i != j && lines[i] != lines[j]);
            let moved = lines.remove(i);
            lines.insert(j, moved);
            let spliced = format!("{}\n", lines.join("\n"));
            prop_assert!(read(spliced.as_bytes()).is_err());
        }

        #[test]
        fn any_truncation_is_refused(len in any::<prop::sample::Index>()) {
            let bytes = fixture();
            prop_assert!(read(&bytes[..len.index(bytes.len())]).is_err());
        }

        #[test]
        fn set_write_read_round_trip(seeds in proptest::collection::btree_set(0u64..10_000, 0..8), version in 1u64..5) {
            let k = key("alpha-1");
            let mut builder = MappingSetBuilder::first(SetKind::Anchor, anchor_name("alpha"));
            builder.extend(seeds.iter().map(|&s| data(s, &s.to_be_bytes()).sign(&k)));
            let previous = (version > 1).then(|| Sha256Hash::digest(b"prev"));
            let sorted: Vec<Mapping> = builder.iter().cloned().collect();
            let (bytes, header) = write(&params("alpha", version, previous), &sorted, &k);
            prop_assert_eq!(read(&bytes).expect("verifies"), (header, sorted));
        }
    }
}
