//! Nix-format secret key files (`name:base64`, as `nix-store
//! --generate-binary-cache-key` writes them): the one place that reads them
//! and creates the gateway's own.

use std::path::{Path, PathBuf};

use anchor_registry::SecretKey;

use super::fs::{write_secret_file, WriteError};

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("while reading the secret key {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid secret key in {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: anchor_registry::KeyError,
    },
    #[error("cannot generate a key named {name:?}: {source}")]
    Generate {
        name: String,
        source: anchor_registry::KeyError,
    },
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// Reads a Nix-format secret key file.
pub fn read_secret_key(path: &Path) -> Result<SecretKey, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    SecretKey::parse(&text).map_err(|source| KeyFileError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Reads the key at `path`, or creates one named `name` there (mode 0600)
/// on first use.
pub fn load_or_create_key(path: &Path, name: &str) -> Result<SecretKey, KeyFileError> {
    if path.exists() {
        return read_secret_key(path);
    }
    let key = SecretKey::generate(name).map_err(|source| KeyFileError::Generate {
        name: name.to_owned(),
        source,
    })?;
    write_secret_file(path, &key.to_string())?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_key_is_read_back_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway.key");
        let created = load_or_create_key(&path, "host-nixpfs-1").expect("create");
        let again = load_or_create_key(&path, "ignored-name").expect("read");
        assert_eq!(created.public(), again.public());
        assert_eq!(again.name(), "host-nixpfs-1");
    }

    #[test]
    fn a_damaged_key_file_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.key");
        std::fs::write(&path, "not a key").expect("write");
        let err = read_secret_key(&path).expect_err("invalid");
        assert!(matches!(err, KeyFileError::Parse { .. }));
        assert!(err.to_string().contains("bad.key"), "{err}");
    }
}
