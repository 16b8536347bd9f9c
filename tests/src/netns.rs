//! Network namespaces a test makes for itself (`ip netns add`, loopback up,
//! deleted when dropped), and running code inside one from a thread.
//!
//! Why: a gateway learns a peer's real listen addresses through identify
//! and dials them by peer id when it needs that peer again (bitswap opens a
//! stream, libp2p asks the address book). A provider behind a [`Link`]
//! therefore runs in its own namespace, where its loopback is not the test's:
//! the only way to reach it is the link, which dials into the namespace.
//!
//! [`Link`]: crate::link::Link

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// One namespace, removed on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `nixpfs-<tag>-<pid>-<n>` with its loopback up. Needs root.
    pub fn new(tag: &str) -> io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "nixpfs-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file, as `setns(2)` takes it.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip netns exec NAME program`: a process whose sockets live in here.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `f` on a new thread that has entered this namespace: sockets it
    /// creates (a connect, an HTTP request) live here.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path)?;
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("thread inside the namespace panicked"))?
    }
}

/// Moves the calling thread into the namespace at `path` (a network
/// namespace is per thread; the rest of the process stays where it is).
pub fn enter(path: &std::path::Path) -> io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: setns on a valid, open namespace fd; it affects only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
