//! NAR encoder: walks a filesystem tree without following symlinks and
//! produces its canonical NAR, pulled through `Read` or pushed into a `Write`.

use std::ffi::OsString;
use std::fs::{self, File, FileType};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::vec;

use super::layout::NarLayout;
use super::{
    name_problem, padding, target_problem, NarError, NarSummary, Sha256Tee, CHUNK, MAGIC, MAX_DEPTH,
};

/// Writes the NAR of `path` into `out` and returns the number of bytes written.
/// Files are streamed in [`CHUNK`]-sized reads, never held whole in memory.
pub fn dump(path: &Path, mut out: impl Write) -> Result<u64, NarError> {
    let mut reader = NarReader::new(path);
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    loop {
        let n = reader.read_nar(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .map_err(|source| NarError::Write { written, source })?;
        written += n as u64;
    }
    out.flush()
        .map_err(|source| NarError::Write { written, source })?;
    Ok(written)
}

/// NarHash and NarSize of `path`, computed without storing the NAR.
pub fn hash_path(path: &Path) -> Result<NarSummary, NarError> {
    let mut tee = Sha256Tee::new(io::sink());
    dump(path, &mut tee)?;
    Ok(tee.summary())
}

/// The NAR of a filesystem path as a pull stream: each `read` walks just far
/// enough to fill the caller's buffer, so an importer can consume a NAR of any
/// size with bounded memory. Errors surface from `Read` as `io::Error`s
/// wrapping a [`NarError`]; [`NarReader::read_nar`] returns them unwrapped.
/// After an error the stream is broken and must be dropped, not read on.
#[derive(Debug)]
pub struct NarReader {
    root: PathBuf,
    started: bool,
    /// Token bytes produced but not yet handed out, from `pending_pos` on.
    pending: Vec<u8>,
    pending_pos: usize,
    /// The regular file whose contents are being streamed.
    file: Option<OpenFile>,
    /// Open directories, outermost first, each with its remaining entries.
    dirs: Vec<OpenDir>,
    /// Where each byte came from, when asked for (see [`NarReader::recording`]).
    layout: Option<NarLayout>,
}

#[derive(Debug)]
struct OpenFile {
    file: File,
    path: PathBuf,
    size: u64,
    done: u64,
    /// Its index in the layout being recorded.
    index: u32,
}

#[derive(Debug)]
struct OpenDir {
    path: PathBuf,
    entries: vec::IntoIter<(OsString, FileType)>,
}

impl NarReader {
    /// Nothing is touched until the first read.
    pub fn new(path: &Path) -> Self {
        Self {
            root: path.to_path_buf(),
            started: false,
            pending: Vec::with_capacity(8192),
            pending_pos: 0,
            file: None,
            dirs: Vec::new(),
            layout: None,
        }
    }

    /// Like [`new`](Self::new), also recording the [`NarLayout`]: which
    /// bytes are framing and which come from which file.
    pub fn recording(path: &Path) -> Self {
        Self {
            layout: Some(NarLayout::default()),
            ..Self::new(path)
        }
    }

    /// The layout of the bytes read so far (complete once the NAR is),
    /// when [`recording`](Self::recording).
    pub fn layout(&self) -> Option<&NarLayout> {
        self.layout.as_ref()
    }

    /// Fills `buf` with the next NAR bytes; returns 0 once the NAR is complete.
    pub fn read_nar(&mut self, buf: &mut [u8]) -> Result<usize, NarError> {
        let mut n = 0;
        while n < buf.len() {
            if self.pending_pos < self.pending.len() {
                let k = (self.pending.len() - self.pending_pos).min(buf.len() - n);
                let bytes = &self.pending[self.pending_pos..self.pending_pos + k];
                buf[n..n + k].copy_from_slice(bytes);
                if let Some(layout) = self.layout.as_mut() {
                    layout.literal(bytes);
                }
                self.pending_pos += k;
                n += k;
                continue;
            }
            self.pending.clear();
            self.pending_pos = 0;
            if self.file.is_some() {
                n += self.read_contents(&mut buf[n..])?;
            } else if !self.advance()? {
                break;
            }
        }
        Ok(n)
    }

    /// Streams the open file into `buf`; when it is exhausted, checks its size
    /// held and queues the tokens that close it.
    fn read_contents(&mut self, buf: &mut [u8]) -> Result<usize, NarError> {
        let Some(open) = self.file.as_mut() else {
            return Ok(0);
        };
        let remaining = open.size - open.done;
        if remaining > 0 {
            let want = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
            let got =
                read_retrying(&mut open.file, &mut buf[..want]).map_err(|source| NarError::Io {
                    path: open.path.clone(),
                    source,
                })?;
            if got == 0 {
                return Err(NarError::FileChangedSize {
                    path: open.path.clone(),
                    expected: open.size,
                    got: open.done,
                });
            }
            if let Some(layout) = self.layout.as_mut() {
                layout.file_bytes(open.index, open.done, got as u64);
            }
            open.done += got as u64;
            return Ok(got);
        }
        let mut probe = [0u8; 1];
        let extra = read_retrying(&mut open.file, &mut probe).map_err(|source| NarError::Io {
            path: open.path.clone(),
            source,
        })?;
        if extra != 0 {
            return Err(NarError::FileChangedSize {
                path: open.path.clone(),
                expected: open.size,
                got: open.size + extra as u64,
            });
        }
        let pad = padding(open.size);
        self.file = None;
        self.pending.extend_from_slice(&[0u8; 8][..pad]);
        put_str(&mut self.pending, b")");
        self.close_node();
        Ok(0)
    }

    /// Queues the next tokens of the walk; false once the whole tree is out.
    fn advance(&mut self) -> Result<bool, NarError> {
        if !self.started {
            self.started = true;
            put_str(&mut self.pending, MAGIC);
            let root = self.root.clone();
            let kind = fs::symlink_metadata(&root)
                .map_err(|source| NarError::Io {
                    path: root.clone(),
                    source,
                })?
                .file_type();
            self.start_node(root, kind)?;
            return Ok(true);
        }
        let Some(dir) = self.dirs.last_mut() else {
            return Ok(false);
        };
        match dir.entries.next() {
            Some((name, kind)) => {
                let path = dir.path.join(&name);
                put_str(&mut self.pending, b"entry");
                put_str(&mut self.pending, b"(");
                put_str(&mut self.pending, b"name");
                put_str(&mut self.pending, name.as_bytes());
                put_str(&mut self.pending, b"node");
                self.start_node(path, kind)?;
            }
            None => {
                self.dirs.pop();
                put_str(&mut self.pending, b")");
                self.close_node();
            }
        }
        Ok(true)
    }

    /// Queues the opening of the node at `path`. A symlink is complete at
    /// once; a file or directory stays open until its contents are out.
    fn start_node(&mut self, path: PathBuf, kind: FileType) -> Result<(), NarError> {
        put_str(&mut self.pending, b"(");
        put_str(&mut self.pending, b"type");
        if kind.is_symlink() {
            let target = fs::read_link(&path)
                .map_err(|source| NarError::Io {
                    path: path.clone(),
                    source,
                })?
                .into_os_string()
                .into_vec();
            if let Some(reason) = target_problem(&target) {
                return Err(NarError::InvalidSymlink { path, reason });
            }
            put_str(&mut self.pending, b"symlink");
            put_str(&mut self.pending, b"target");
            put_str(&mut self.pending, &target);
            put_str(&mut self.pending, b")");
            self.close_node();
        } else if kind.is_file() {
            let (file, meta) = open_regular(&path)?;
            put_str(&mut self.pending, b"regular");
            if meta.permissions().mode() & 0o100 != 0 {
                put_str(&mut self.pending, b"executable");
                put_str(&mut self.pending, b"");
            }
            put_str(&mut self.pending, b"contents");
            self.pending.extend_from_slice(&meta.len().to_le_bytes());
            let index = match self.layout.as_mut() {
                Some(layout) => {
                    let rel = path.strip_prefix(&self.root).unwrap_or(Path::new(""));
                    layout.open_file(rel.as_os_str().as_bytes().to_vec(), &meta)
                }
                None => 0,
            };
            self.file = Some(OpenFile {
                file,
                path,
                size: meta.len(),
                done: 0,
                index,
            });
        } else if kind.is_dir() {
            if self.dirs.len() >= MAX_DEPTH {
                return Err(NarError::PathTooDeep {
                    path,
                    max: MAX_DEPTH,
                });
            }
            let entries = sorted_entries(&path)?;
            put_str(&mut self.pending, b"directory");
            self.dirs.push(OpenDir {
                path,
                entries: entries.into_iter(),
            });
        } else {
            return Err(NarError::UnsupportedFileType { path });
        }
        Ok(())
    }

    /// A node just ended: inside a directory, that also ends its entry.
    fn close_node(&mut self) {
        if !self.dirs.is_empty() {
            put_str(&mut self.pending, b")");
        }
    }
}

impl Read for NarReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_nar(buf).map_err(io::Error::other)
    }
}

/// Appends `bytes` as a NAR string: length, bytes, zero padding.
fn put_str(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
    out.extend_from_slice(&[0u8; 8][..padding(bytes.len() as u64)]);
}

/// Opens a regular file without following a symlink or blocking on a fifo
/// swapped in since the directory was listed, and returns its metadata from
/// the open descriptor so size and mode match what is read.
fn open_regular(path: &Path) -> Result<(File, fs::Metadata), NarError> {
    let io_err = |source| NarError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(NarError::UnsupportedFileType {
            path: path.to_path_buf(),
        });
    }
    Ok((file, meta))
}

/// The entries of directory `path`, sorted by raw name bytes as NAR requires,
/// each with its type as seen without following symlinks.
fn sorted_entries(path: &Path) -> Result<Vec<(OsString, FileType)>, NarError> {
    let io_err = |source| NarError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut entries = Vec::new();
    for entry in fs::read_dir(path).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let name = entry.file_name();
        if let Some(reason) = name_problem(name.as_bytes()) {
            return Err(NarError::InvalidFileName {
                path: entry.path(),
                reason,
            });
        }
        let kind = entry.file_type().map_err(|source| NarError::Io {
            path: entry.path(),
            source,
        })?;
        entries.push((name, kind));
    }
    entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(entries)
}

fn read_retrying(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match file.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::contains;
    use super::super::tests::s;
    use super::*;
    use std::ffi::OsStr;
    use std::os::unix::fs::symlink;

    fn nar_of(path: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        let n = dump(path, &mut out).expect("dump");
        assert_eq!(n, out.len() as u64);
        out
    }

    #[test]
    fn hello_file_matches_hand_computed_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hello");
        fs::write(&path, b"hello\n").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let mut expected = Vec::new();
        expected.extend_from_slice(b"\x0d\0\0\0\0\0\0\0nix-archive-1\0\0\0");
        expected.extend_from_slice(b"\x01\0\0\0\0\0\0\0(\0\0\0\0\0\0\0");
        expected.extend_from_slice(b"\x04\0\0\0\0\0\0\0type\0\0\0\0");
        expected.extend_from_slice(b"\x07\0\0\0\0\0\0\0regular\0");
        expected.extend_from_slice(b"\x08\0\0\0\0\0\0\0contents");
        expected.extend_from_slice(b"\x06\0\0\0\0\0\0\0hello\n\0\0");
        expected.extend_from_slice(b"\x01\0\0\0\0\0\0\0)\0\0\0\0\0\0\0");
        assert_eq!(nar_of(&path), expected);
        assert_eq!(expected.len(), 120);
    }

    #[test]
    fn matches_nix_store_dump_when_nix_is_installed() {
        let nix_store = Path::new("/usr/bin/nix-store");
        if !nix_store.exists() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("tree");
        fs::create_dir_all(root.join("sub/deeper")).expect("mkdir");
        fs::write(root.join("hello"), b"hello\n").expect("write");
        fs::write(root.join("run"), vec![7u8; 100_000]).expect("write");
        fs::set_permissions(root.join("run"), fs::Permissions::from_mode(0o744)).expect("chmod");
        fs::write(root.join("group-exec-only"), b"x").expect("write");
        fs::set_permissions(
            root.join("group-exec-only"),
            fs::Permissions::from_mode(0o654),
        )
        .expect("chmod");
        fs::write(root.join("sub/empty"), b"").expect("write");
        fs::write(root.join("B"), b"upper").expect("write");
        symlink("../hello", root.join("sub/link")).expect("symlink");
        symlink("x".repeat(2000), root.join("long-link")).expect("symlink");
        let nix = std::process::Command::new(nix_store)
            .arg("--dump")
            .arg(&root)
            .output()
            .expect("run nix-store");
        if !nix.status.success() {
            return;
        }
        assert_eq!(nar_of(&root), nix.stdout);
    }

    #[test]
    fn recorded_layout_rebuilds_the_nar_from_the_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("tree");
        fs::create_dir_all(root.join("sub")).expect("mkdir");
        fs::write(root.join("big"), vec![9u8; 3 * CHUNK + 5]).expect("write");
        fs::write(root.join("sub/small"), b"small").expect("write");
        fs::write(root.join("sub/empty"), b"").expect("write");
        symlink("big", root.join("link")).expect("symlink");
        let mut reader = NarReader::recording(&root);
        let mut nar = Vec::new();
        reader.read_to_end(&mut nar).expect("read");
        let layout = reader.layout().expect("recorded").clone();
        assert_eq!(layout.nar_size(), nar.len() as u64);
        let rels: Vec<&[u8]> = layout.files.iter().map(|f| f.rel.as_slice()).collect();
        assert_eq!(rels, [&b"big"[..], b"sub/empty", b"sub/small"]);
        let mut rebuilt = Vec::new();
        for seg in &layout.segments {
            match seg {
                super::super::layout::Segment::Literal(b) => rebuilt.extend_from_slice(b),
                super::super::layout::Segment::File { file, offset, len } => {
                    let rel = OsStr::from_bytes(&layout.files[*file as usize].rel);
                    let data = fs::read(root.join(rel)).expect("read file");
                    rebuilt.extend_from_slice(&data[*offset as usize..(*offset + *len) as usize]);
                }
            }
        }
        assert_eq!(rebuilt, nar);
        let one = root.join("sub/small");
        let mut single = NarReader::recording(&one);
        io::copy(&mut single, &mut io::sink()).expect("read");
        assert_eq!(single.layout().expect("recorded").files[0].rel, b"");
    }

    #[test]
    fn only_the_owner_exec_bit_makes_a_file_executable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        fs::write(&path, b"").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o655)).expect("chmod");
        assert!(!contains(&nar_of(&path), b"executable"));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).expect("chmod");
        assert!(contains(&nar_of(&path), &s(b"executable")));
    }

    #[test]
    fn directory_entries_come_out_in_byte_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["b", "a", "B", "ä", "a.b", "a-b"] {
            fs::write(dir.path().join(name), b"").expect("write");
        }
        let nar = nar_of(dir.path());
        let pos = |name: &str| {
            let token = s(name.as_bytes());
            nar.windows(token.len())
                .position(|w| w == token.as_slice())
                .expect("entry present")
        };
        let order = ["B", "a", "a-b", "a.b", "b", "ä"];
        for pair in order.windows(2) {
            assert!(pos(pair[0]) < pos(pair[1]), "{pair:?}");
        }
    }

    #[test]
    fn symlinks_are_archived_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("real")).expect("mkdir");
        fs::write(dir.path().join("real/secret"), b"do not include").expect("write");
        symlink("real", dir.path().join("link")).expect("symlink");
        let link_nar = nar_of(&dir.path().join("link"));
        let mut expected = s(b"nix-archive-1");
        for token in [&b"("[..], b"type", b"symlink", b"target", b"real", b")"] {
            expected.extend(s(token));
        }
        assert_eq!(link_nar, expected);
    }

    #[test]
    fn fifo_is_an_unsupported_file_type() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            return;
        }
        let err = dump(dir.path(), io::sink()).expect_err("fifo must fail");
        assert!(
            matches!(&err, NarError::UnsupportedFileType { path } if *path == fifo),
            "{err}"
        );
    }

    #[test]
    fn case_hack_names_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("foo~nix~case~hack~1"), b"").expect("write");
        let err = dump(dir.path(), io::sink()).expect_err("case hack must fail");
        assert!(matches!(err, NarError::InvalidFileName { .. }), "{err}");
    }

    #[test]
    fn missing_path_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing");
        let err = dump(&missing, io::sink()).expect_err("missing must fail");
        assert!(
            matches!(&err, NarError::Io { path, .. } if *path == missing),
            "{err}"
        );
    }

    #[test]
    fn file_shrinking_during_dump_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        fs::write(&path, vec![1u8; 3 * CHUNK]).expect("write");
        let mut reader = NarReader::new(&path);
        let mut buf = vec![0u8; CHUNK];
        reader.read_nar(&mut buf).expect("first chunk");
        File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(10))
            .expect("truncate");
        let err = loop {
            match reader.read_nar(&mut buf) {
                Ok(0) => panic!("shrunk file archived without error"),
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(
            matches!(err, NarError::FileChangedSize { expected, .. } if expected == 3 * CHUNK as u64),
            "{err}"
        );
    }

    #[test]
    fn file_growing_during_dump_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        fs::write(&path, vec![1u8; 100]).expect("write");
        let mut reader = NarReader::new(&path);
        let mut buf = vec![0u8; 64];
        reader.read_nar(&mut buf).expect("header");
        File::options()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"more"))
            .expect("append");
        let err = loop {
            match reader.read_nar(&mut buf) {
                Ok(0) => panic!("grown file archived without error"),
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(
            matches!(err, NarError::FileChangedSize { expected: 100, .. }),
            "{err}"
        );
    }

    #[test]
    fn pull_reader_with_tiny_reads_gives_the_same_bytes_as_dump() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("d")).expect("mkdir");
        fs::write(dir.path().join("d/f"), vec![9u8; 1000]).expect("write");
        symlink("d/f", dir.path().join("l")).expect("symlink");
        let mut pulled = Vec::new();
        let mut reader = NarReader::new(dir.path());
        let mut buf = [0u8; 3];
        loop {
            let n = reader.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            pulled.extend_from_slice(&buf[..n]);
        }
        assert_eq!(pulled, nar_of(dir.path()));
    }
}
