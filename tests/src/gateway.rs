//! A `nixpfs serve` process on loopback for a test: started on a free port,
//! awaited until it answers, stopped with SIGTERM when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::{nixpfs, run_ok_str};

/// One running gateway.
#[derive(Debug)]
pub struct Gateway {
    pub data_dir: PathBuf,
    pub url: String,
    child: Child,
    log: PathBuf,
    /// The network namespace it runs in, if not the test's own.
    netns: Option<PathBuf>,
}

/// A port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Resident memory of process `pid` in bytes (`VmRSS` in
/// `/proc/PID/status`); panics if the process is gone.
pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

impl Gateway {
    /// Starts `nixpfs --data-dir DIR serve --listen … EXTRA…` and waits until
    /// `nix-cache-info` answers.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Self {
        Self::spawn(data_dir, extra, None)
    }

    /// [`start`](Self::start) inside `netns`: its HTTP and IPFS listeners
    /// exist only there (reach its IPFS node through a [`crate::link::Link`]
    /// into the namespace); [`get`](Self::get) and the CLI (a Unix socket)
    /// still work from the test.
    pub fn start_in(netns: &Netns, data_dir: &Path, extra: &[&str]) -> Self {
        Self::spawn(data_dir, extra, Some(netns))
    }

    fn spawn(data_dir: &Path, extra: &[&str], netns: Option<&Netns>) -> Self {
        let port = free_port();
        let log = data_dir.with_extension("log");
        std::fs::create_dir_all(data_dir).expect("data dir");
        let log_file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let mut cmd = match netns {
            Some(ns) => ns.command(crate::nixpfs_bin()),
            None => nixpfs(),
        };
        let child = cmd
            .arg("--data-dir")
            .arg(data_dir)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--ipfs-listen", "/ip4/127.0.0.1/tcp/0"])
            .args(extra)
            .env("RUST_LOG", "info,gateway=debug")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn nixpfs serve");
        let mut gateway = Self {
            data_dir: data_dir.to_owned(),
            url: format!("http://127.0.0.1:{port}"),
            child,
            log,
            netns: netns.map(Netns::path),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if gateway.get_ok("/nix-cache-info") && data_dir.join("admin.sock").exists() {
                return gateway;
            }
            if let Ok(Some(status)) = gateway.child.try_wait() {
                panic!("nixpfs serve exited ({status}):\n{}", gateway.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "nixpfs serve did not answer within 30 s:\n{}",
                gateway.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id of `nixpfs serve` (to read its memory use).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the gateway process now, in bytes (VmRSS).
    pub fn rss(&self) -> u64 {
        rss_of(self.pid())
    }

    /// The gateway's log so far (for assertion messages). Restarts on the
    /// same data directory append to it.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The listening TCP port of the IPFS node (from `nixpfs id`), e.g. to
    /// put a [`crate::link::Link`] in front of it.
    pub fn ipfs_port(&self) -> u16 {
        let (_, addr, _) = self.id();
        addr.split('/')
            .skip_while(|p| *p != "tcp")
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no /tcp/PORT in {addr}"))
    }

    /// The peer id of the IPFS node.
    pub fn peer_id(&self) -> String {
        self.id().0
    }

    /// Kills the process with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill_9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn get_ok(&self, path: &str) -> bool {
        let url = format!("{}{path}", self.url);
        self.in_netns(move || ureq::get(&url).call().is_ok())
    }

    /// Runs `f` where this gateway's listeners are: here, or on a thread
    /// inside its namespace.
    fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        match &self.netns {
            None => f(),
            Some(path) => {
                let path = path.clone();
                std::thread::spawn(move || {
                    crate::netns::enter(&path).expect("enter the gateway's namespace");
                    f()
                })
                .join()
                .expect("request inside the namespace")
            }
        }
    }

    /// A `nixpfs --data-dir DIR …` command (goes through the admin API).
    pub fn cli(&self) -> Command {
        let mut cmd = nixpfs();
        cmd.arg("--data-dir").arg(&self.data_dir);
        cmd
    }

    /// `nixpfs id` as JSON-ish fields: (peer id, first listen multiaddr, gateway public key).
    pub fn id(&self) -> (String, String, String) {
        let out = run_ok_str(self.cli().arg("id"));
        let field = |prefix: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .unwrap_or_else(|| panic!("`{prefix}` missing in `nixpfs id`: {out}"))
                .trim()
                .to_owned()
        };
        (field("peer id:"), field("listen:"), field("gateway key:"))
    }

    /// A dialable multiaddr of this gateway's IPFS node.
    pub fn multiaddr(&self) -> String {
        let (peer, addr, _) = self.id();
        if addr.contains("/p2p/") {
            addr
        } else {
            format!("{addr}/p2p/{peer}")
        }
    }

    /// The counter `nixpfs_<name>` from `/metrics`; panics if absent.
    pub fn metric(&self, name: &str) -> u64 {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200);
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| {
                // Counters end in `_total`; gauges are named as they are.
                l.strip_prefix(&format!("nixpfs_{name}_total "))
                    .or_else(|| l.strip_prefix(&format!("nixpfs_{name} ")))
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name}"))
    }

    /// `HEAD path` answers 200 with no body and the `Content-Length`,
    /// `Content-Type` and `Accept-Ranges` that `GET path` sends; panics
    /// otherwise. Returns that `Content-Length`.
    pub fn assert_head_is_get(&self, path: &str) -> u64 {
        let url = format!("{}{path}", self.url);
        self.in_netns(move || {
            let head = ureq::head(&url)
                .call()
                .unwrap_or_else(|e| panic!("HEAD {url}: {e}"));
            let get = ureq::get(&url)
                .call()
                .unwrap_or_else(|e| panic!("GET {url}: {e}"));
            assert_eq!((head.status(), get.status()), (200, 200), "{url}");
            for name in ["Content-Length", "Content-Type", "Accept-Ranges"] {
                assert_eq!(
                    head.header(name),
                    get.header(name),
                    "{name} of HEAD and GET {url}"
                );
            }
            let length: u64 = get
                .header("Content-Length")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("GET {url} sent no Content-Length"));
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut head.into_reader(), &mut body).ok();
            assert!(body.is_empty(), "HEAD {url} sent {} body bytes", body.len());
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut get.into_reader(), &mut body).ok();
            assert_eq!(body.len() as u64, length, "GET {url}: its body");
            length
        })
    }

    /// GET a path: (status, body).
    pub fn get(&self, path: &str) -> (u16, Vec<u8>) {
        self.get_with(path, &[])
    }

    /// GET with extra headers: (status, body).
    pub fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> (u16, Vec<u8>) {
        let url = format!("{}{path}", self.url);
        let path = path.to_owned();
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.in_netns(move || {
            let mut req = ureq::get(&url);
            for (k, v) in &headers {
                req = req.set(k, v);
            }
            let resp = match req.call() {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(e) => panic!("GET {path}: {e}"),
            };
            let status = resp.status();
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut resp.into_reader(), &mut body).ok();
            (status, body)
        })
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if !self.is_running() {
            // Reaped already (e.g. by `kill_9`): its pid may be someone else's now.
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every block file under a data directory with its size, largest first.
pub fn block_files(data_dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(data_dir.join("ipfs/blocks")).expect("read the block store") {
        let shard = shard.expect("block store entry").path();
        if !shard.is_dir() || shard.ends_with("tmp") {
            continue;
        }
        for f in std::fs::read_dir(&shard).expect("read a block shard") {
            let f = f.expect("block shard entry");
            out.push((f.path(), f.metadata().expect("block file metadata").len()));
        }
    }
    out.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    out
}
