//! The one copy of the file writes a crash must not tear: documents replaced
//! through a temporary file and a rename, and secret files no umask can
//! widen.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A file operation that failed, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("while writing {}: {source}", path.display())]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl WriteError {
    fn at(path: &Path) -> impl FnOnce(io::Error) -> Self + '_ {
        move |source| Self {
            path: path.to_owned(),
            source,
        }
    }
}

/// The directory a file at `path` lives in (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes `contents` to `path` through a temporary file in the same
/// directory, synced before the rename, so a crash leaves either the old
/// document or the new one, never half of one. The file is private to its
/// owner (mode 0600, as `tempfile` creates it): identities and tokens go
/// through here too.
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), WriteError> {
    let mut tmp =
        tempfile::NamedTempFile::new_in(parent_dir(path)).map_err(WriteError::at(path))?;
    tmp.write_all(contents)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(WriteError::at(path))?;
    tmp.persist(path)
        .map_err(|e| WriteError::at(path)(e.error))?;
    Ok(())
}

/// Like [`write_atomically`], then syncs the directory as well, so the
/// rename itself survives a power loss. For files whose order on disk is
/// part of a protocol: a later write must never be durable without this one.
pub fn write_durably(path: &Path, contents: &[u8]) -> Result<(), WriteError> {
    write_atomically(path, contents)?;
    sync_dir(parent_dir(path)).map_err(WriteError::at(path))
}

/// Removes `path` (one already gone is fine) and syncs its directory, so
/// the removal is durable before whatever comes next.
pub fn remove_durably(path: &Path) -> Result<(), WriteError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(WriteError::at(path)(e)),
    }
    sync_dir(parent_dir(path)).map_err(WriteError::at(path))
}

/// Syncs a directory's entries (creations, renames, removals) to disk.
fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Creates a new file readable only by its owner and writes `contents`:
/// secret keys must not leak through a permissive umask, and an existing
/// key is never overwritten.
pub fn write_secret_file(path: &Path, contents: &str) -> Result<(), WriteError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(WriteError::at(path))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(WriteError::at(path))
}

/// Creates `dir` (and its parents) private to its owner, or tightens an
/// existing one to mode 0700: the data directory holds keys and the admin
/// socket, whose safety rests on nobody else being able to enter it or
/// create files in it.
pub fn ensure_private_dir(dir: &Path) -> Result<(), WriteError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(WriteError::at(dir))?;
    let mode = std::fs::metadata(dir)
        .map_err(WriteError::at(dir))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(WriteError::at(dir))?;
        tracing::warn!(
            "made {} private (mode {:o} -> 700)",
            dir.display(),
            mode & 0o777
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn atomic_writes_replace_the_whole_document_and_stay_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("doc");
        write_atomically(&path, b"first version").expect("write");
        write_atomically(&path, b"second").expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("ls").count(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn atomic_write_into_a_missing_directory_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing").join("doc");
        let err = write_atomically(&path, b"x").expect_err("no such directory");
        assert!(err.to_string().contains("missing/doc"), "{err}");
    }

    #[test]
    fn durable_writes_and_removals_are_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("doc");
        write_durably(&path, b"one").expect("write");
        write_durably(&path, b"one").expect("rewrite");
        assert_eq!(std::fs::read(&path).expect("read"), b"one");
        remove_durably(&path).expect("remove");
        remove_durably(&path).expect("already gone");
        assert!(!path.exists());
    }

    #[test]
    fn private_dirs_are_created_0700_and_loose_ones_tightened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        let fresh = dir.path().join("a").join("data");
        ensure_private_dir(&fresh).expect("create");
        assert_eq!(mode(&fresh), 0o700);
        let loose = dir.path().join("loose");
        std::fs::create_dir(&loose).expect("mkdir");
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        ensure_private_dir(&loose).expect("tighten");
        assert_eq!(mode(&loose), 0o700);
    }

    #[test]
    fn secret_files_are_private_and_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        write_secret_file(&path, "secret").expect("write");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(write_secret_file(&path, "other").is_err());
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "secret");
    }
}
