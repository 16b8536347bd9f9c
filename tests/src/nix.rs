//! An isolated real-Nix environment (Debian `nix-bin`, single-user as root):
//! its own `NIX_CONF_DIR`, narinfo cache and chroot stores, so tests never see
//! each other's cached lookups and never reach a public substituter.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::run_ok_str;

/// One test's Nix: config and caches under a temporary directory.
#[derive(Debug)]
pub struct NixEnv {
    pub dir: tempfile::TempDir,
}

impl Default for NixEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl NixEnv {
    /// A fresh environment; panics when Nix is not installed (tests that
    /// need it are ignored then, see `build.rs`).
    pub fn new() -> Self {
        crate::require_tool("nix-store");
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("conf")).expect("mkdir conf");
        fs::write(
            dir.path().join("conf/nix.conf"),
            "build-users-group =\nsandbox = false\nexperimental-features = nix-command\n\
             substituters =\nnarinfo-cache-negative-ttl = 0\nnarinfo-cache-positive-ttl = 0\n",
        )
        .expect("write nix.conf");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A command for a Nix tool with this environment's config.
    pub fn cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("NIX_CONF_DIR", self.path().join("conf"))
            .env("XDG_CACHE_HOME", self.path().join("xdg"))
            .env_remove("NIX_REMOTE");
        cmd
    }

    /// `nix copy --from URL --to STORE PATH` trusting only `key` (a public
    /// key as in `trusted-public-keys`): the substitution every test makes.
    /// More options may follow; Nix reads them after the path too.
    pub fn copy_from(&self, url: &str, key: &str, store: &str, path: &str) -> Command {
        let mut cmd = self.cmd("nix");
        cmd.args([
            "copy",
            "--from",
            url,
            "--to",
            store,
            "--option",
            "trusted-public-keys",
            key,
            path,
        ]);
        cmd
    }

    /// A fresh, empty chroot store to substitute into.
    pub fn empty_store(&self, name: &str) -> String {
        format!("local?root={}", self.path().join(name).display())
    }

    /// Evaluates and builds `expr` (a Nix file's text taking `{ nonce }`),
    /// returning the output path. The nonce makes every run's paths fresh.
    pub fn build(&self, file_name: &str, expr: &str) -> String {
        let file = self.path().join(file_name);
        fs::write(&file, expr).expect("write nix file");
        run_ok_str(self.cmd("nix-build").arg(&file).args([
            "--argstr",
            "nonce",
            &nonce(),
            "--no-out-link",
        ]))
    }

    /// `nix path-info --json` of one path, parsed.
    pub fn path_info(&self, path: &str) -> serde_json::Value {
        let out = run_ok_str(self.cmd("nix").args(["path-info", "--json", path]));
        let v: serde_json::Value = serde_json::from_str(&out).expect("path-info json");
        v.as_array()
            .and_then(|a| a.first())
            .cloned()
            .expect("one path-info entry")
    }

    /// The closure of `path` (the path itself included).
    pub fn closure(&self, path: &str) -> Vec<String> {
        run_ok_str(self.cmd("nix-store").args(["-qR", path]))
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// A key pair made by `nix-store --generate-binary-cache-key`: (secret file, public key).
    pub fn nix_keypair(&self, name: &str) -> (PathBuf, String) {
        let sk = self.path().join(format!("{name}.sk"));
        let pk = self.path().join(format!("{name}.pk"));
        run_ok_str(
            self.cmd("nix-store")
                .arg("--generate-binary-cache-key")
                .arg(name)
                .arg(&sk)
                .arg(&pk),
        );
        let public = fs::read_to_string(&pk).expect("read pk").trim().to_owned();
        (sk, public)
    }
}

/// Unique per call: time plus process id plus a counter.
pub fn nonce() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{nanos}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A closure exercising every NAR node kind: regular files (empty, small and
/// over 1 MiB), an executable, symlinks (relative, absolute, dangling), empty and
/// nested directories, and a reference to another store path.
pub const FIXTURE_CLOSURE: &str = r#"{ nonce }:
let
  sys = builtins.currentSystem;
  dep = builtins.derivation {
    name = "nixpfs-fixture-dep"; system = sys; builder = "/bin/sh";
    args = [ "-c" "echo dep-${nonce} > $out" ];
  };
in builtins.derivation {
  name = "nixpfs-fixture-top"; system = sys; builder = "/bin/sh";
  inherit dep;
  PATH = "/usr/bin:/bin";
  args = [ "-c" ''
    set -e
    mkdir -p $out/a/b/c $out/empty-dir $out/bin
    echo ${nonce} > $out/a/file
    : > $out/a/empty-file
    printf x > $out/a/b/c/deep
    head -c 3000000 /dev/zero | tr '\0' 'z' > $out/big
    printf '#!/bin/sh\necho hi\n' > $out/bin/tool
    chmod 755 $out/bin/tool
    ln -s a/file $out/rel-link
    ln -s /nix/store/not-there-dangling $out/dangling
    ln -s $dep $out/dep-link
    echo $dep > $out/ref
    mkdir $out/Zsorted $out/zsorted
    echo upper > $out/Zsorted/x
  '' ];
}
"#;

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
