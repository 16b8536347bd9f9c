//! Foreign IPFS peers installed by `scripts/install-peers DIR` (Helia via
//! npm, Kubo via PyPI) and found through `NIXPFS_PEERS_DIR`: a test that
//! needs them is ignored when they are absent (see `build.rs`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// The peers directory; panics naming what is missing (tests that need the
/// peers are ignored when they are absent, see `build.rs`).
pub fn peers_dir() -> PathBuf {
    let dir = std::env::var_os("NIXPFS_PEERS_DIR").map(PathBuf::from);
    let problem = match &dir {
        None => "NIXPFS_PEERS_DIR is not set".to_owned(),
        Some(d) => match [
            "helia/hash.mjs",
            "helia/car.mjs",
            "helia/vfetch.mjs",
            "helia/routed.mjs",
            "kubo.py",
        ]
        .into_iter()
        .find(|f| !d.join(f).is_file())
        {
            Some(f) => format!("{} has no {f} (rerun scripts/install-peers)", d.display()),
            None => return d.clone(),
        },
    };
    panic!(
        "{problem}: run scripts/install-peers DIR and export NIXPFS_PEERS_DIR=DIR (.ci/run does)"
    );
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

/// A peer process driven by JSON lines: one command per stdin line, one
/// JSON answer per stdout line; closing stdin stops it.
#[derive(Debug)]
struct Driven {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    name: &'static str,
}

impl Driven {
    /// Spawns `cmd` and reads its first line (its addresses and version).
    fn start(name: &'static str, mut cmd: Command) -> anyhow::Result<(Self, serde_json::Value)> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning the {name} peer"))?;
        let stdin = child.stdin.take();
        let stdout = std::io::BufReader::new(child.stdout.take().context("peer stdout")?);
        let mut peer = Driven {
            child,
            stdin,
            stdout,
            name,
        };
        let hello = peer.read_json()?;
        Ok((peer, hello))
    }

    fn read_json(&mut self) -> anyhow::Result<serde_json::Value> {
        use std::io::BufRead;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("{} peer exited", self.name);
        }
        serde_json::from_str(&line).with_context(|| format!("{} peer said {line:?}", self.name))
    }

    fn request(&mut self, line: &str) -> anyhow::Result<serde_json::Value> {
        let name = self.name;
        let stdin = self
            .stdin
            .as_mut()
            .with_context(|| format!("{name} peer stdin closed"))?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        let v = self.read_json()?;
        if let Some(e) = v.get("error") {
            bail!("{name} peer: {line}: {e}");
        }
        Ok(v)
    }
}

impl Drop for Driven {
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

fn addrs_of(hello: &serde_json::Value) -> Vec<String> {
    hello["addrs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A running Helia node (`helia/peer.mjs`), stopped when dropped.
#[derive(Debug)]
pub struct HeliaPeer {
    driven: Driven,
    /// Multiaddrs ending in `/p2p/<id>`.
    pub addrs: Vec<String>,
    pub peer_id: String,
    pub version: String,
}

impl HeliaPeer {
    /// Starts a loopback-only Helia node and waits for its addresses.
    pub fn start(peers: &Path) -> anyhow::Result<Self> {
        Self::start_with(peers, false)
    }

    /// [`HeliaPeer::start`] with the Kademlia DHT on Kubo's LAN protocol in
    /// server mode (commands `provide CID`, `findprovs CID SECS`).
    pub fn start_with_lan_dht(peers: &Path) -> anyhow::Result<Self> {
        Self::start_with(peers, true)
    }

    fn start_with(peers: &Path, lan_dht: bool) -> anyhow::Result<Self> {
        let mut cmd = Command::new("node");
        cmd.arg("peer.mjs").current_dir(peers.join("helia"));
        if lan_dht {
            cmd.env("HELIA_DHT", "lan");
        }
        let (driven, hello) = Driven::start("helia", cmd)?;
        let addrs = addrs_of(&hello);
        if addrs.is_empty() {
            bail!("helia peer reported no addresses: {hello}");
        }
        Ok(HeliaPeer {
            driven,
            addrs,
            peer_id: hello["peer_id"].as_str().unwrap_or_default().to_owned(),
            version: hello["helia"].as_str().unwrap_or_default().to_owned(),
        })
    }

    /// Sends one command line; returns the JSON answer, failing on `error`.
    pub fn request(&mut self, line: &str) -> anyhow::Result<serde_json::Value> {
        self.driven.request(line)
    }
}

/// Which key a Kubo node identifies with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KuboKey {
    /// Peer ids `12D3KooW…`.
    Ed25519,
    /// Kubo's own default (RSA-2048, peer ids `Qm…`).
    Rsa,
}

/// A running Kubo node (`kubo.py` in the peers venv), stopped when dropped.
/// Commands: `add FILE`, `connect MADDR`, `get CID OUT SECS`, `pin CID SECS`.
#[derive(Debug)]
pub struct KuboPeer {
    driven: Driven,
    /// Multiaddrs ending in `/p2p/<id>`.
    pub addrs: Vec<String>,
    pub peer_id: String,
    pub version: String,
}

impl KuboPeer {
    /// Starts a loopback-only Kubo node and waits for its addresses.
    pub fn start(peers: &Path, key: KuboKey) -> anyhow::Result<Self> {
        let mut cmd = Command::new(peers.join("venv/bin/python"));
        // Kubo's Go side writes ./kubo.log: keep it out of the source tree.
        cmd.current_dir(std::env::temp_dir());
        cmd.arg("-u").arg(peers.join("kubo.py")).env(
            "KUBO_KEY",
            match key {
                KuboKey::Ed25519 => "ed25519",
                KuboKey::Rsa => "rsa",
            },
        );
        let (driven, hello) = Driven::start("kubo", cmd)?;
        let addrs = addrs_of(&hello);
        if addrs.is_empty() {
            bail!("kubo peer reported no addresses: {hello}");
        }
        Ok(KuboPeer {
            driven,
            addrs,
            peer_id: hello["peer_id"].as_str().unwrap_or_default().to_owned(),
            version: hello["kubo"].as_str().unwrap_or_default().to_owned(),
        })
    }

    /// Sends one command line; returns the JSON answer, failing on `error`.
    pub fn request(&mut self, line: &str) -> anyhow::Result<serde_json::Value> {
        self.driven.request(line)
    }
}

/// Runs `node SCRIPT ARGS…` in the Helia directory (car.mjs, vfetch.mjs)
/// and parses the last line it prints as JSON.
pub fn node_script(peers: &Path, script: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new("node")
        .arg(script)
        .args(args)
        .current_dir(peers.join("helia"))
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("spawning node {script}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    if !out.status.success() {
        bail!("node {script} {args:?} failed ({}): {text}", out.status);
    }
    let v: serde_json::Value =
        serde_json::from_str(last).with_context(|| format!("node {script} said {text:?}"))?;
    if let Some(e) = v.get("error") {
        bail!("node {script} {args:?}: {e}");
    }
    Ok(v)
}
