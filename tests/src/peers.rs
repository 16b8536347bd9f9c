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

/// A running Helia node (`helia/peer.mjs`), stopped when dropped.
#[derive(Debug)]
pub struct HeliaPeer {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    /// Multiaddrs ending in `/p2p/<id>`.
    pub addrs: Vec<String>,
    pub version: String,
}

impl HeliaPeer {
    /// Starts a loopback-only Helia node and waits for its addresses.
    pub fn start(peers: &Path) -> anyhow::Result<Self> {
        let mut child = Command::new("node")
            .arg("peer.mjs")
            .current_dir(peers.join("helia"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning node peer.mjs")?;
        let stdin = child.stdin.take();
        let stdout = std::io::BufReader::new(child.stdout.take().context("node stdout")?);
        let mut peer = HeliaPeer {
            child,
            stdin,
            stdout,
            addrs: Vec::new(),
            version: String::new(),
        };
        let hello = peer.read_json()?;
        peer.addrs = hello["addrs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        peer.version = hello["helia"].as_str().unwrap_or_default().to_owned();
        if peer.addrs.is_empty() {
            bail!("helia peer reported no addresses: {hello}");
        }
        Ok(peer)
    }

    fn read_json(&mut self) -> anyhow::Result<serde_json::Value> {
        use std::io::BufRead;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("helia peer exited");
        }
        serde_json::from_str(&line).with_context(|| format!("helia peer said {line:?}"))
    }

    /// Sends one command line; returns the JSON answer, failing on `error`.
    pub fn request(&mut self, line: &str) -> anyhow::Result<serde_json::Value> {
        let stdin = self.stdin.as_mut().context("helia peer stdin closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        let v = self.read_json()?;
        if let Some(e) = v.get("error") {
            bail!("helia peer: {line}: {e}");
        }
        Ok(v)
    }
}

impl Drop for HeliaPeer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
