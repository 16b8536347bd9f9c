//! Nix GC roots for store paths we seed: a pinned path's NAR is rebuilt
//! from its files (see `store::ipfs::storeblocks`), so `nix-collect-garbage`
//! must not delete it while it is pinned. Each root is an indirect root
//! `<dir>/<store path basename>` registered with `nix-store --add-root`;
//! removing the symlink releases it (Nix drops dangling indirect roots).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why a GC root could not be made or removed.
#[derive(Debug, thiserror::Error)]
pub enum GcRootError {
    #[error("{path} is not a store path: it has no file name")]
    NotAStorePath { path: String },
    #[error("cannot run `nix-store` (is Nix installed and on PATH?): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("`nix-store --add-root {root} --indirect --realise {path}` failed: {stderr}")]
    Failed {
        root: PathBuf,
        path: String,
        stderr: String,
    },
    #[error("GC root {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the root of `store_path` lives under `dir`.
pub fn root_of(dir: &Path, store_path: &str) -> Result<PathBuf, GcRootError> {
    Path::new(store_path)
        .file_name()
        .map(|name| dir.join(name))
        .ok_or_else(|| GcRootError::NotAStorePath {
            path: store_path.to_owned(),
        })
}

/// Makes `store_path` a GC root (idempotent); returns the root's path.
pub fn add(dir: &Path, store_path: &str) -> Result<PathBuf, GcRootError> {
    let root = root_of(dir, store_path)?;
    std::fs::create_dir_all(dir).map_err(|source| GcRootError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let out = Command::new("nix-store")
        .arg("--add-root")
        .arg(&root)
        .args(["--indirect", "--realise", "--", store_path])
        .output()
        .map_err(GcRootError::Spawn)?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr);
        let stderr = text
            .lines()
            .rfind(|l| !l.trim().is_empty() && !l.starts_with("warning:"))
            .unwrap_or("no message")
            .to_owned();
        return Err(GcRootError::Failed {
            root,
            path: store_path.to_owned(),
            stderr,
        });
    }
    Ok(root)
}

/// Releases the root of `store_path`; whether there was one.
pub fn remove(dir: &Path, store_path: &str) -> Result<bool, GcRootError> {
    let root = root_of(dir, store_path)?;
    match std::fs::remove_file(&root) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(source) => Err(GcRootError::Io { path: root, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_named_after_the_store_path() {
        let dir = Path::new("/data/gcroots");
        assert_eq!(
            root_of(dir, "/nix/store/abc-hello").unwrap(),
            dir.join("abc-hello")
        );
        assert!(root_of(dir, "/").is_err());
    }

    #[test]
    fn removing_an_absent_root_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!remove(dir.path(), "/nix/store/abc-hello").unwrap());
        std::os::unix::fs::symlink("/nix/store/abc-hello", dir.path().join("abc-hello")).unwrap();
        assert!(remove(dir.path(), "/nix/store/abc-hello").unwrap());
    }
}
