//! Strict streaming NAR parser: reads untrusted bytes in large buffered reads,
//! accepts only the canonical form, and reports each node to a [`NarSink`].
//! `validate` and `restore` are the two sinks everyone needs.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{
    escaped, name_problem, padding, target_problem, NarError, NarSummary, Sha256Tee, CHUNK, MAGIC,
    MAX_DEPTH, MAX_NAME_LEN, MAX_TARGET_LEN,
};

/// Longest keyword in the grammar is `nix-archive-1` (13 bytes); anything
/// longer where a keyword is due is rejected before it is read.
const MAX_TOKEN: usize = 16;

/// A keyword as the bytes to match and the quoted text errors show.
macro_rules! kw {
    ($s:literal) => {
        ($s.as_bytes(), concat!("\"", $s, "\""))
    };
}

/// Receives the nodes of a NAR in order as the parser accepts them. Names are
/// `None` for the root node and the entry name inside a directory. A sink
/// error stops parsing and is returned as is. Events arrive before the rest
/// of the archive is checked, so they are provisional until `parse` is Ok.
pub trait NarSink {
    /// A directory starts; its entries follow until [`NarSink::end_directory`].
    fn directory(&mut self, _name: Option<&[u8]>) -> Result<(), NarError> {
        Ok(())
    }

    fn end_directory(&mut self) -> Result<(), NarError> {
        Ok(())
    }

    /// A regular file of `size` bytes starts; its contents follow in chunks.
    fn regular(
        &mut self,
        _name: Option<&[u8]>,
        _executable: bool,
        _size: u64,
    ) -> Result<(), NarError> {
        Ok(())
    }

    fn contents(&mut self, _chunk: &[u8]) -> Result<(), NarError> {
        Ok(())
    }

    fn end_regular(&mut self) -> Result<(), NarError> {
        Ok(())
    }

    /// A symlink; `target` is raw bytes, never resolved.
    fn symlink(&mut self, _name: Option<&[u8]>, _target: &[u8]) -> Result<(), NarError> {
        Ok(())
    }
}

/// Parses one complete NAR from `r`, feeding `sink`, and returns the hash and
/// size of exactly the bytes consumed. Fails on anything non-canonical and on
/// any byte after the archive. Memory stays bounded whatever lengths the
/// input claims.
pub fn parse(r: impl Read, sink: &mut impl NarSink) -> Result<NarSummary, NarError> {
    let mut parser = Parser {
        input: Input::new(Sha256Tee::new(r)),
        sink,
        scratch: Vec::new(),
    };
    parser.archive()?;
    Ok(parser.input.inner.summary())
}

/// Checks that `r` holds one canonical NAR and returns its NarHash and NarSize.
pub fn validate(r: impl Read) -> Result<NarSummary, NarError> {
    struct Discard;
    impl NarSink for Discard {}
    parse(r, &mut Discard)
}

/// Unpacks the NAR read from `r` at `dest`, which must not exist. Files get
/// mode 0o755 or 0o644, symlinks are created as raw targets, and nothing is
/// written outside `dest`. On error, whatever was created is removed (best
/// effort). The caller compares the returned summary with the NarHash it
/// expects.
pub fn restore(r: impl Read, dest: &Path) -> Result<NarSummary, NarError> {
    if fs::symlink_metadata(dest).is_ok() {
        return Err(NarError::DestinationExists {
            path: dest.to_path_buf(),
        });
    }
    let mut sink = Restorer {
        root: dest.to_path_buf(),
        dirs: Vec::new(),
        file: None,
        created_root: false,
    };
    let result = parse(r, &mut sink);
    if result.is_err() && sink.created_root {
        sink.file = None;
        // Best effort: the parse error is what the caller needs to see.
        let _ = match fs::symlink_metadata(dest) {
            Ok(meta) if meta.is_dir() => fs::remove_dir_all(dest),
            _ => fs::remove_file(dest),
        };
    }
    result
}

struct Parser<'s, R, S> {
    input: Input<Sha256Tee<R>>,
    sink: &'s mut S,
    /// Reused buffer for names and targets (at most [`MAX_TARGET_LEN`] bytes).
    scratch: Vec<u8>,
}

impl<R: Read, S: NarSink> Parser<'_, R, S> {
    fn archive(&mut self) -> Result<(), NarError> {
        let magic = self.input.token("\"nix-archive-1\"").map_err(|e| match e {
            NarError::Unexpected { found, .. } => NarError::BadMagic { found },
            other => other,
        })?;
        if magic.bytes() != MAGIC {
            return Err(NarError::BadMagic {
                found: escaped(magic.bytes()),
            });
        }
        // One entry per open directory: the name of its last entry, empty
        // before the first (names are never empty).
        let mut dirs: Vec<Vec<u8>> = Vec::new();
        self.node(None, &mut dirs)?;
        while let Some(previous) = dirs.last_mut() {
            let token = self.input.token("\"entry\" or \")\"")?;
            match token.bytes() {
                b")" => {
                    dirs.pop();
                    self.sink.end_directory()?;
                    if !dirs.is_empty() {
                        self.input.expect(kw!(")"))?;
                    }
                }
                b"entry" => {
                    self.input.expect(kw!("("))?;
                    self.input.expect(kw!("name"))?;
                    let at = self
                        .input
                        .string(MAX_NAME_LEN, "entry name", &mut self.scratch)?;
                    let name = &self.scratch;
                    if let Some(reason) = name_problem(name) {
                        return Err(NarError::InvalidName {
                            offset: at,
                            name: escaped(name),
                            reason,
                        });
                    }
                    if !previous.is_empty() && name <= previous {
                        return Err(if name == previous {
                            NarError::DuplicateEntry {
                                offset: at,
                                name: escaped(name),
                            }
                        } else {
                            NarError::UnsortedEntry {
                                offset: at,
                                previous: escaped(previous),
                                name: escaped(name),
                            }
                        });
                    }
                    previous.clear();
                    previous.extend_from_slice(name);
                    self.input.expect(kw!("node"))?;
                    let name = std::mem::take(&mut self.scratch);
                    let opened_directory = self.node(Some(&name), &mut dirs);
                    self.scratch = name;
                    if !opened_directory? {
                        self.input.expect(kw!(")"))?;
                    }
                }
                _ => return Err(token.unexpected("\"entry\" or \")\"")),
            }
        }
        if self.input.fill(1)? {
            return Err(NarError::TrailingBytes {
                offset: self.input.offset,
            });
        }
        Ok(())
    }

    /// Parses one node. A file or symlink is parsed whole; a directory is
    /// only opened (pushed on `dirs`) and true is returned.
    fn node(&mut self, name: Option<&[u8]>, dirs: &mut Vec<Vec<u8>>) -> Result<bool, NarError> {
        self.input.expect(kw!("("))?;
        self.input.expect(kw!("type"))?;
        const KINDS: &str = "\"regular\", \"symlink\" or \"directory\"";
        let kind = self.input.token(KINDS)?;
        match kind.bytes() {
            b"regular" => {
                const ATTRS: &str = "\"executable\" or \"contents\"";
                let attr = self.input.token(ATTRS)?;
                let executable = match attr.bytes() {
                    b"executable" => {
                        self.input.expect(kw!(""))?;
                        self.input.expect(kw!("contents"))?;
                        true
                    }
                    b"contents" => false,
                    _ => return Err(attr.unexpected(ATTRS)),
                };
                let size = self.input.u64("file size")?;
                self.sink.regular(name, executable, size)?;
                self.contents(size)?;
                self.sink.end_regular()?;
                self.input.expect(kw!(")"))?;
                Ok(false)
            }
            b"symlink" => {
                self.input.expect(kw!("target"))?;
                let at = self
                    .input
                    .string(MAX_TARGET_LEN, "symlink target", &mut self.scratch)?;
                if let Some(reason) = target_problem(&self.scratch) {
                    return Err(NarError::InvalidTarget {
                        offset: at,
                        target: escaped(&self.scratch),
                        reason,
                    });
                }
                self.input.expect(kw!(")"))?;
                self.sink.symlink(name, &self.scratch)?;
                Ok(false)
            }
            b"directory" => {
                if dirs.len() >= MAX_DEPTH {
                    return Err(NarError::TooDeep {
                        offset: kind.offset,
                        max: MAX_DEPTH,
                    });
                }
                self.sink.directory(name)?;
                dirs.push(Vec::new());
                Ok(true)
            }
            _ => Err(kind.unexpected(KINDS)),
        }
    }

    /// Streams `size` bytes of file contents to the sink, then checks padding.
    fn contents(&mut self, size: u64) -> Result<(), NarError> {
        let mut remaining = size;
        while remaining > 0 {
            if self.input.available().is_empty() && !self.input.fill(1)? {
                return Err(NarError::Truncated {
                    offset: self.input.offset,
                    expected: "file contents",
                });
            }
            let available = self.input.available();
            let k = usize::try_from(remaining).map_or(available.len(), |r| r.min(available.len()));
            self.sink.contents(&available[..k])?;
            self.input.consume(k);
            remaining -= k as u64;
        }
        self.input.padding(size)
    }
}

/// A token read where a keyword is due, kept on the stack.
struct Token {
    offset: u64,
    len: usize,
    bytes: [u8; MAX_TOKEN],
}

impl Token {
    fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    fn unexpected(&self, expected: &'static str) -> NarError {
        NarError::Unexpected {
            offset: self.offset,
            expected,
            found: escaped(self.bytes()),
        }
    }
}

/// The input buffer starts this small so validating a tiny NAR stays cheap,
/// and doubles up to [`CHUNK`] while the reader keeps filling it.
const INITIAL_BUFFER: usize = 8 << 10;
// Every string the parser buffers whole (name, target, token) must fit.
const _: () = assert!(INITIAL_BUFFER >= MAX_TARGET_LEN + 8 && INITIAL_BUFFER <= CHUNK);

/// Buffered input that knows the absolute offset of every byte it hands out.
struct Input<R> {
    inner: R,
    buf: Vec<u8>,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Absolute offset of `buf[start]`: the number of bytes consumed.
    offset: u64,
    /// The last read filled all the space offered: a bigger buffer would help.
    starved: bool,
}

impl<R: Read> Input<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            buf: vec![0u8; INITIAL_BUFFER],
            start: 0,
            end: 0,
            offset: 0,
            starved: false,
        }
    }

    fn available(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.offset += n as u64;
    }

    /// Makes at least `min` (at most [`INITIAL_BUFFER`]) bytes available;
    /// false if the input ends first.
    fn fill(&mut self, min: usize) -> Result<bool, NarError> {
        while self.end - self.start < min {
            if self.start == self.end
                || self.buf.len() - self.start < min
                || self.end == self.buf.len()
            {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.starved && self.buf.len() < CHUNK {
                self.buf.resize(self.buf.len() * 2, 0);
            }
            let space = self.buf.len() - self.end;
            let n = loop {
                match self.inner.read(&mut self.buf[self.end..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(source) => {
                        return Err(NarError::Read {
                            offset: self.offset + (self.end - self.start) as u64,
                            source,
                        })
                    }
                }
            };
            if n == 0 {
                return Ok(false);
            }
            self.starved = n == space;
            self.end += n;
        }
        Ok(true)
    }

    /// Makes `n` bytes available or reports where the input ended.
    fn need(&mut self, n: usize, expected: &'static str) -> Result<(), NarError> {
        if self.fill(n)? {
            Ok(())
        } else {
            Err(NarError::Truncated {
                offset: self.offset + self.available().len() as u64,
                expected,
            })
        }
    }

    fn u64(&mut self, expected: &'static str) -> Result<u64, NarError> {
        self.need(8, expected)?;
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&self.available()[..8]);
        self.consume(8);
        Ok(u64::from_le_bytes(bytes))
    }

    /// Consumes the zero padding after a string of `len` bytes.
    fn padding(&mut self, len: u64) -> Result<(), NarError> {
        let pad = padding(len);
        self.need(pad, "padding")?;
        if let Some(i) = self.available()[..pad].iter().position(|&b| b != 0) {
            return Err(NarError::BadPadding {
                offset: self.offset + i as u64,
            });
        }
        self.consume(pad);
        Ok(())
    }

    /// Reads a string of at most `max` bytes into `out`; returns its offset.
    fn string(
        &mut self,
        max: usize,
        what: &'static str,
        out: &mut Vec<u8>,
    ) -> Result<u64, NarError> {
        let offset = self.offset;
        let len = self.u64(what)?;
        if len > max as u64 {
            return Err(NarError::TooLong {
                offset,
                what,
                len,
                max: max as u64,
            });
        }
        // Bounded by `max` just above.
        let len = len as usize;
        self.need(len, what)?;
        out.clear();
        out.extend_from_slice(&self.available()[..len]);
        self.consume(len);
        self.padding(len as u64)?;
        Ok(offset)
    }

    /// Reads a string where a keyword is due, without allocating.
    fn token(&mut self, expected: &'static str) -> Result<Token, NarError> {
        let offset = self.offset;
        let len = self.u64(expected)?;
        if len > MAX_TOKEN as u64 {
            return Err(NarError::Unexpected {
                offset,
                expected,
                found: format!("a string of {len} bytes"),
            });
        }
        // Bounded by MAX_TOKEN just above.
        let len = len as usize;
        self.need(len, expected)?;
        let mut bytes = [0u8; MAX_TOKEN];
        bytes[..len].copy_from_slice(&self.available()[..len]);
        self.consume(len);
        self.padding(len as u64)?;
        Ok(Token { offset, len, bytes })
    }

    fn expect(&mut self, (keyword, quoted): (&[u8], &'static str)) -> Result<(), NarError> {
        let token = self.token(quoted)?;
        if token.bytes() == keyword {
            Ok(())
        } else {
            Err(token.unexpected(quoted))
        }
    }
}

/// Creates the tree under `root` as the parser reports it.
struct Restorer {
    root: PathBuf,
    /// Paths of the directories currently open, outermost first.
    dirs: Vec<PathBuf>,
    file: Option<(File, PathBuf)>,
    created_root: bool,
}

impl Restorer {
    /// Where the node named `name` goes. Names were checked by the parser to
    /// be single components other than `.` and `..`, so the result is always
    /// inside the root.
    fn place(&mut self, name: Option<&[u8]>) -> PathBuf {
        match (name, self.dirs.last()) {
            (Some(name), Some(dir)) => dir.join(OsStr::from_bytes(name)),
            _ => {
                self.created_root = true;
                self.root.clone()
            }
        }
    }

    fn io_error(&self, path: PathBuf, source: io::Error) -> NarError {
        if source.kind() == io::ErrorKind::AlreadyExists && path == self.root {
            NarError::DestinationExists { path }
        } else {
            NarError::Io { path, source }
        }
    }
}

impl NarSink for Restorer {
    fn directory(&mut self, name: Option<&[u8]>) -> Result<(), NarError> {
        let path = self.place(name);
        fs::create_dir(&path).map_err(|e| self.io_error(path.clone(), e))?;
        self.dirs.push(path);
        Ok(())
    }

    fn end_directory(&mut self) -> Result<(), NarError> {
        self.dirs.pop();
        Ok(())
    }

    fn regular(
        &mut self,
        name: Option<&[u8]>,
        executable: bool,
        _size: u64,
    ) -> Result<(), NarError> {
        let path = self.place(name);
        let mode = if executable { 0o755 } else { 0o644 };
        // create_new: never follows or replaces anything already there.
        let file = File::options()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .and_then(|file| {
                file.set_permissions(fs::Permissions::from_mode(mode))?;
                Ok(file)
            })
            .map_err(|e| self.io_error(path.clone(), e))?;
        self.file = Some((file, path));
        Ok(())
    }

    fn contents(&mut self, chunk: &[u8]) -> Result<(), NarError> {
        if let Some((file, path)) = &mut self.file {
            file.write_all(chunk).map_err(|source| NarError::Io {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    fn end_regular(&mut self) -> Result<(), NarError> {
        self.file = None;
        Ok(())
    }

    fn symlink(&mut self, name: Option<&[u8]>, target: &[u8]) -> Result<(), NarError> {
        let path = self.place(name);
        symlink(OsStr::from_bytes(target), &path).map_err(|e| self.io_error(path.clone(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::s;
    use super::*;
    use anchor_registry::NarHash;

    fn nar(tokens: &[&[u8]]) -> Vec<u8> {
        tokens.iter().flat_map(|t| s(t)).collect()
    }

    fn hello() -> Vec<u8> {
        nar(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"hello\n",
            b")",
        ])
    }

    /// A directory NAR holding one empty file per name, in the given order.
    fn dir_with(names: &[&[u8]]) -> Vec<u8> {
        let mut v = nar(&[b"nix-archive-1", b"(", b"type", b"directory"]);
        for name in names {
            v.extend(nar(&[b"entry", b"(", b"name", name, b"node"]));
            v.extend(nar(&[
                b"(",
                b"type",
                b"regular",
                b"contents",
                b"",
                b")",
                b")",
            ]));
        }
        v.extend(s(b")"));
        v
    }

    /// `depth` directories nested in each other, each holding the next as "a".
    fn nested(depth: usize) -> Vec<u8> {
        let mut v = s(b"nix-archive-1");
        for i in 0..depth {
            v.extend(nar(&[b"(", b"type", b"directory"]));
            if i + 1 < depth {
                v.extend(nar(&[b"entry", b"(", b"name", b"a", b"node"]));
            }
        }
        for i in 0..depth {
            v.extend(s(b")"));
            if i + 1 < depth {
                v.extend(s(b")"));
            }
        }
        v
    }

    fn err(bytes: &[u8]) -> NarError {
        validate(bytes).expect_err("must be rejected")
    }

    #[test]
    fn accepts_hello_and_hashes_exactly_its_bytes() {
        let bytes = hello();
        let summary = validate(bytes.as_slice()).expect("valid");
        assert_eq!(summary.nar_size, 120);
        assert_eq!(summary.nar_hash, NarHash::digest(&bytes));
    }

    #[test]
    fn rejects_wrong_magic() {
        let mut bytes = hello();
        bytes[8 + 12] = b'2';
        assert!(
            matches!(err(&bytes), NarError::BadMagic { found } if found == "\"nix-archive-2\"")
        );
        assert!(matches!(
            err(b"not a nar at all"),
            NarError::BadMagic { .. }
        ));
    }

    #[test]
    fn rejects_non_zero_padding_in_contents_and_keywords() {
        let mut bytes = hello();
        // magic 24, "(" 16, "type" 16, "regular" 16, "contents" 16, length 8, "hello\n" 6.
        bytes[102] = 1;
        assert!(matches!(err(&bytes), NarError::BadPadding { offset: 102 }));
        let mut bytes = hello();
        bytes[24 + 9] = b' ';
        assert!(matches!(err(&bytes), NarError::BadPadding { offset: 33 }));
    }

    #[test]
    fn rejects_unsorted_entries() {
        let e = err(&dir_with(&[b"b", b"a"]));
        assert!(
            matches!(&e, NarError::UnsortedEntry { previous, name, .. } if previous == "\"b\"" && name == "\"a\""),
            "{e}"
        );
        assert!(validate(dir_with(&[b"B", b"a", b"b"]).as_slice()).is_ok());
    }

    #[test]
    fn sorts_by_raw_bytes_not_utf8_or_locale() {
        assert!(
            validate(dir_with(&[b"Z", b"a", b"\x7f", b"\xc3\xa4", b"\xff"]).as_slice()).is_ok()
        );
        assert!(matches!(
            err(&dir_with(&[b"\xff", b"\xc3\xa4"])),
            NarError::UnsortedEntry { .. }
        ));
    }

    #[test]
    fn rejects_duplicate_entries() {
        assert!(matches!(
            err(&dir_with(&[b"a", b"a"])),
            NarError::DuplicateEntry { name, .. } if name == "\"a\""
        ));
    }

    #[test]
    fn rejects_names_that_are_not_one_path_component() {
        let bad: [&[u8]; 7] = [
            b"..",
            b".",
            b"",
            b"a/b",
            b"/",
            b"a\0b",
            b"x~nix~case~hack~1",
        ];
        for name in bad {
            let e = err(&dir_with(&[name]));
            assert!(matches!(e, NarError::InvalidName { .. }), "{name:?}: {e}");
        }
        let long = vec![b'n'; MAX_NAME_LEN + 1];
        let e = err(&dir_with(&[&long]));
        assert!(
            matches!(
                e,
                NarError::TooLong {
                    len: 256,
                    max: 255,
                    ..
                }
            ),
            "{e}"
        );
        let longest = vec![b'n'; MAX_NAME_LEN];
        assert!(validate(dir_with(&[&longest]).as_slice()).is_ok());
    }

    #[test]
    fn absurd_lengths_are_rejected_without_allocating() {
        let huge = (1u64 << 60).to_le_bytes();
        // As the magic's length.
        assert!(matches!(err(&huge), NarError::BadMagic { .. }));
        // As a keyword's length.
        let mut bytes = s(b"nix-archive-1");
        bytes.extend_from_slice(&huge);
        assert!(matches!(
            err(&bytes),
            NarError::Unexpected { offset: 24, .. }
        ));
        // As an entry name's length.
        let mut bytes = nar(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
        ]);
        bytes.extend_from_slice(&huge);
        assert!(matches!(err(&bytes), NarError::TooLong { len, .. } if len == 1 << 60));
        // As a symlink target's length.
        let mut bytes = nar(&[b"nix-archive-1", b"(", b"type", b"symlink", b"target"]);
        bytes.extend_from_slice(&huge);
        assert!(matches!(
            err(&bytes),
            NarError::TooLong {
                what: "symlink target",
                ..
            }
        ));
        // As a file size: streamed, so the input simply ends.
        let mut bytes = nar(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents"]);
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        bytes.extend_from_slice(b"some data");
        assert!(matches!(
            err(&bytes),
            NarError::Truncated { expected: "file contents", offset } if offset == bytes.len() as u64
        ));
    }

    #[test]
    fn every_truncation_is_reported_as_truncated() {
        let valid = dir_with(&[b"a", b"b"]);
        for end in 0..valid.len() {
            let e = err(&valid[..end]);
            assert!(matches!(e, NarError::Truncated { .. }), "prefix {end}: {e}");
        }
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut bytes = hello();
        bytes.push(0);
        assert!(matches!(
            err(&bytes),
            NarError::TrailingBytes { offset: 120 }
        ));
        let mut bytes = hello();
        bytes.extend(hello());
        assert!(matches!(
            err(&bytes),
            NarError::TrailingBytes { offset: 120 }
        ));
    }

    #[test]
    fn rejects_nesting_deeper_than_the_cap() {
        assert!(validate(nested(MAX_DEPTH).as_slice()).is_ok());
        assert!(matches!(
            err(&nested(MAX_DEPTH + 1)),
            NarError::TooDeep { max: MAX_DEPTH, .. }
        ));
    }

    #[test]
    fn rejects_non_canonical_attribute_order_and_values() {
        let cases: [&[&[u8]]; 6] = [
            // executable after contents
            &[
                b"nix-archive-1",
                b"(",
                b"type",
                b"regular",
                b"contents",
                b"",
                b"executable",
                b"",
                b")",
            ],
            // executable with a value
            &[
                b"nix-archive-1",
                b"(",
                b"type",
                b"regular",
                b"executable",
                b"1",
                b"contents",
                b"",
                b")",
            ],
            // executable twice
            &[
                b"nix-archive-1",
                b"(",
                b"type",
                b"regular",
                b"executable",
                b"",
                b"executable",
                b"",
                b"contents",
                b"",
                b")",
            ],
            // contents missing
            &[b"nix-archive-1", b"(", b"type", b"regular", b")"],
            // unknown node type
            &[b"nix-archive-1", b"(", b"type", b"fifo", b")"],
            // contents inside a directory
            &[
                b"nix-archive-1",
                b"(",
                b"type",
                b"directory",
                b"contents",
                b"",
                b")",
            ],
        ];
        for tokens in cases {
            let e = err(&nar(tokens));
            assert!(matches!(e, NarError::Unexpected { .. }), "{e}");
        }
    }

    #[test]
    fn rejects_symlink_targets_no_filesystem_can_hold() {
        for target in [&b""[..], b"a\0b"] {
            let bytes = nar(&[
                b"nix-archive-1",
                b"(",
                b"type",
                b"symlink",
                b"target",
                target,
                b")",
            ]);
            assert!(matches!(err(&bytes), NarError::InvalidTarget { .. }));
        }
        let long = vec![b'x'; MAX_TARGET_LEN + 1];
        let bytes = nar(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"symlink",
            b"target",
            &long,
            b")",
        ]);
        assert!(matches!(err(&bytes), NarError::TooLong { len: 4096, .. }));
    }

    #[test]
    fn unexpected_token_error_names_offset_expectation_and_finding() {
        let bytes = nar(&[b"nix-archive-1", b"(", b"tpye"]);
        let e = err(&bytes);
        assert_eq!(
            e.to_string(),
            "at byte 40: expected \"type\", found \"tpye\""
        );
    }

    #[test]
    fn read_errors_are_reported_with_their_offset() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let bytes = hello();
        let e = validate(bytes[..30].chain(Failing)).expect_err("read error");
        assert!(matches!(e, NarError::Read { offset: 30, .. }), "{e}");
    }

    #[test]
    fn restore_refuses_an_existing_destination() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = restore(hello().as_slice(), dir.path()).expect_err("exists");
        assert!(matches!(e, NarError::DestinationExists { .. }));
    }

    #[test]
    fn restore_removes_what_it_created_when_the_nar_is_bad() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("out");
        let e = restore(dir_with(&[b"b", b"a"]).as_slice(), &dest).expect_err("unsorted");
        assert!(matches!(e, NarError::UnsortedEntry { .. }));
        assert!(fs::symlink_metadata(&dest).is_err());
    }

    #[test]
    fn restore_creates_files_with_exact_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bytes = nar(&[b"nix-archive-1", b"(", b"type", b"directory"]);
        bytes.extend(nar(&[
            b"entry", b"(", b"name", b"run", b"node", b"(", b"type", b"regular",
        ]));
        bytes.extend(nar(&[
            b"executable",
            b"",
            b"contents",
            b"#!/bin/sh\n",
            b")",
            b")",
        ]));
        bytes.extend(nar(&[
            b"entry", b"(", b"name", b"txt", b"node", b"(", b"type", b"regular",
        ]));
        bytes.extend(nar(&[b"contents", b"text", b")", b")", b")"]));
        let dest = dir.path().join("out");
        restore(bytes.as_slice(), &dest).expect("restore");
        let mode = |name: &str| {
            fs::metadata(dest.join(name))
                .expect("stat")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("run"), 0o755);
        assert_eq!(mode("txt"), 0o644);
        assert_eq!(fs::read(dest.join("txt")).expect("read"), b"text");
    }
}
