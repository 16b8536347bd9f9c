//! NAR (Nix ARchive): the one canonical byte serialisation of a filesystem
//! tree that Nix hashes and ships. This module owns the streaming encoder, the
//! strict streaming parser (validate, restore) and the NAR-level error type.
//!
//! Both sides accept exactly the canonical form: whatever `validate` accepts,
//! `restore` then `dump` reproduces byte for byte.

pub mod compression;
mod decode;
mod encode;
pub mod layout;

use std::io::{self, Read, Write};
use std::path::PathBuf;

use anchor_registry::NarHash;
use sha2::{Digest, Sha256};

pub use decode::{parse, restore, validate, NarSink};
pub use encode::{dump, hash_path, NarReader};

/// The string every NAR starts with.
const MAGIC: &[u8] = b"nix-archive-1";
/// Longest entry name: Linux `NAME_MAX`, the limit Nix relies on too.
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target: Linux `PATH_MAX` minus the terminating NUL.
pub const MAX_TARGET_LEN: usize = 4095;
/// Deepest directory nesting accepted or produced. Deeper trees cannot be
/// restored below `PATH_MAX` anyway; the cap bounds the parser's memory.
pub const MAX_DEPTH: usize = 1024;
/// Nix's macOS case-collision marker; a canonical NAR never contains it.
const CASE_HACK: &[u8] = b"~nix~case~hack~";
/// Size of the read and write buffers: big enough that syscalls and hash
/// updates are amortised, small enough to run many streams at once.
const CHUNK: usize = 1 << 20;

/// What identifies a NAR to Nix: `NarHash` (sha256 of all bytes) and `NarSize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NarSummary {
    /// sha256 over exactly the NAR's bytes.
    pub nar_hash: NarHash,
    /// Number of bytes in the NAR.
    pub nar_size: u64,
}

/// Everything that can go wrong reading, writing or checking a NAR. Parse
/// errors carry the byte offset of the offending token; byte strings from the
/// input are shown with non-printable bytes escaped.
#[derive(Debug, thiserror::Error)]
pub enum NarError {
    /// The input does not start with `nix-archive-1`.
    #[error("not a NAR: expected \"nix-archive-1\" at byte 0, found {found}")]
    BadMagic { found: String },
    /// A token other than the grammar allows at this point.
    #[error("at byte {offset}: expected {expected}, found {found}")]
    Unexpected {
        offset: u64,
        expected: &'static str,
        found: String,
    },
    /// A non-zero byte where a string's padding must be zero.
    #[error("at byte {offset}: padding byte is not zero")]
    BadPadding { offset: u64 },
    /// A length field beyond what the grammar allows for this string.
    #[error("at byte {offset}: {what} of {len} bytes is longer than the maximum {max}")]
    TooLong {
        offset: u64,
        what: &'static str,
        len: u64,
        max: u64,
    },
    /// The input ended inside the archive.
    #[error("at byte {offset}: input ends where {expected} was expected")]
    Truncated { offset: u64, expected: &'static str },
    /// Bytes follow the end of the root node.
    #[error("at byte {offset}: trailing bytes after the end of the archive")]
    TrailingBytes { offset: u64 },
    /// A directory entry not strictly after its predecessor in byte order.
    #[error("at byte {offset}: entry {name} is not sorted after {previous}")]
    UnsortedEntry {
        offset: u64,
        previous: String,
        name: String,
    },
    /// The same name twice in one directory.
    #[error("at byte {offset}: duplicate entry {name}")]
    DuplicateEntry { offset: u64, name: String },
    /// An entry name that cannot be a single path component.
    #[error("at byte {offset}: invalid entry name {name}: {reason}")]
    InvalidName {
        offset: u64,
        name: String,
        reason: &'static str,
    },
    /// A symlink target that no filesystem can hold.
    #[error("at byte {offset}: invalid symlink target {target}: {reason}")]
    InvalidTarget {
        offset: u64,
        target: String,
        reason: &'static str,
    },
    /// Directories nested deeper than [`MAX_DEPTH`].
    #[error("at byte {offset}: directories nested deeper than {max}")]
    TooDeep { offset: u64, max: usize },
    /// Reading the NAR stream failed.
    #[error("reading the NAR at byte {offset}: {source}")]
    Read { offset: u64, source: io::Error },
    /// Writing the NAR stream failed.
    #[error("writing the NAR after {written} bytes: {source}")]
    Write { written: u64, source: io::Error },
    /// A fifo, socket or device: NAR has no representation for it.
    #[error("{}: unsupported file type (only regular files, directories and symlinks)", path.display())]
    UnsupportedFileType { path: PathBuf },
    /// A regular file grew or shrank while it was being archived.
    #[error("{}: file changed size while being archived (expected {expected} bytes, got {got})", path.display())]
    FileChangedSize {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    /// A file name on disk that a canonical NAR cannot carry.
    #[error("{}: cannot archive this name: {reason}", path.display())]
    InvalidFileName { path: PathBuf, reason: &'static str },
    /// A symlink on disk whose target a canonical NAR cannot carry.
    #[error("{}: cannot archive this symlink target: {reason}", path.display())]
    InvalidSymlink { path: PathBuf, reason: &'static str },
    /// A directory tree on disk nested deeper than [`MAX_DEPTH`].
    #[error("{}: directories nested deeper than {max}", path.display())]
    PathTooDeep { path: PathBuf, max: usize },
    /// `restore` refuses to merge into or replace something that exists.
    #[error("{}: restore destination already exists", path.display())]
    DestinationExists { path: PathBuf },
    /// A filesystem operation on `path` failed.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// Why `name` cannot be a NAR directory entry, if it cannot.
fn name_problem(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty")
    } else if name == b"." || name == b".." {
        Some("is . or ..")
    } else if name.contains(&b'/') {
        Some("contains '/'")
    } else if name.contains(&0) {
        Some("contains a NUL byte")
    } else if name.len() > MAX_NAME_LEN {
        Some("longer than 255 bytes")
    } else if contains(name, CASE_HACK) {
        Some("contains Nix's case-hack marker ~nix~case~hack~")
    } else {
        None
    }
}

/// Why `target` cannot be a NAR symlink target, if it cannot.
fn target_problem(target: &[u8]) -> Option<&'static str> {
    if target.is_empty() {
        Some("empty")
    } else if target.contains(&0) {
        Some("contains a NUL byte")
    } else if target.len() > MAX_TARGET_LEN {
        Some("longer than 4095 bytes")
    } else {
        None
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Input bytes for error messages: printable ASCII kept, the rest escaped.
fn escaped(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

/// Zero bytes needed after a string of `len` bytes to reach a multiple of 8.
fn padding(len: u64) -> usize {
    // The result is below 8, so the cast cannot truncate.
    ((8 - len % 8) % 8) as usize
}

/// A pass-through reader or writer that computes the [`NarSummary`] of every
/// byte going through it, so a NAR can be hashed while it is copied elsewhere
/// (an importer, a file, an HTTP body) without a second pass.
#[derive(Debug)]
pub struct Sha256Tee<T> {
    inner: T,
    hasher: Sha256,
    size: u64,
}

impl<T> Sha256Tee<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    /// Hash and size of the bytes seen so far.
    pub fn summary(&self) -> NarSummary {
        NarSummary {
            nar_hash: NarHash::from_bytes(self.hasher.clone().finalize().into()),
            nar_size: self.size,
        }
    }

    /// The wrapped reader or writer.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The wrapped reader or writer, and the summary of all bytes seen.
    pub fn into_parts(self) -> (T, NarSummary) {
        let summary = self.summary();
        (self.inner, summary)
    }

    fn account(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
    }
}

impl<R: Read> Read for Sha256Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.account(&buf[..n]);
        Ok(n)
    }
}

impl<W: Write> Write for Sha256Tee<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.account(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests;
