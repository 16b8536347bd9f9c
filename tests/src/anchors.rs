//! Keys, anchor registries and published anchor sets for end-to-end tests,
//! made through the CLI as a registry's root-key holder and an anchor would
//! make them.

use std::fs;
use std::path::{Path, PathBuf};

use anchor_registry::Mapping;

use crate::{nixpfs, run_ok, run_ok_str};

/// `nixpfs key generate` into `dir`: (secret key file, public key).
pub fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let file = dir.join(format!("{name}.sk"));
    let public = run_ok_str(
        nixpfs()
            .args(["key", "generate", "--name", name, "--out"])
            .arg(&file),
    );
    (file, public)
}

/// A registry file and the trust root a gateway must be configured with to
/// follow it.
#[derive(Debug, Clone)]
pub struct TestRegistry {
    pub file: PathBuf,
    pub root_key: String,
}

impl TestRegistry {
    /// `serve` flags that follow this registry from its trust root.
    pub fn serve_args(&self) -> [&str; 4] {
        [
            "--registry",
            self.file.to_str().expect("utf-8 path"),
            "--registry-root-key",
            &self.root_key,
        ]
    }
}

/// A registry signed by a fresh root key listing `anchors` (name, public key, source).
pub fn registry(dir: &Path, anchors: &[(&str, &str, &[&Path])]) -> TestRegistry {
    fs::create_dir_all(dir).expect("registry dir");
    let (root, root_pub) = keygen(dir, "root-1");
    let reg = dir.join("registry.json");
    run_ok(
        nixpfs()
            .args([
                "registry",
                "init",
                "--root-key",
                &root_pub,
                "--threshold",
                "1",
                "--out",
            ])
            .arg(&reg),
    );
    for (name, key, sources) in anchors {
        let mut cmd = nixpfs();
        cmd.args(["registry", "add-anchor"])
            .arg(&reg)
            .args(["--name", name, "--key", key]);
        for s in *sources {
            cmd.arg("--source").arg(s);
        }
        run_ok(&mut cmd);
    }
    run_ok(
        nixpfs()
            .args(["registry", "sign"])
            .arg(&reg)
            .arg("--key")
            .arg(&root),
    );
    TestRegistry {
        file: reg,
        root_key: root_pub,
    }
}

/// As an anchor with `key` and data directory `data_dir`: pins and signs the
/// closures of `paths` (`anchor sign --closure`), publishes the set to `out`
/// (`anchor publish`) and returns its mappings as read back from the file.
pub fn sign_and_publish(data_dir: &Path, key: &Path, paths: &[&str], out: &Path) -> Vec<Mapping> {
    run_ok(
        nixpfs()
            .arg("--data-dir")
            .arg(data_dir)
            .args(["anchor", "sign", "--closure"])
            .args(paths)
            .arg("--key")
            .arg(key),
    );
    run_ok(
        nixpfs()
            .arg("--data-dir")
            .arg(data_dir)
            .args(["anchor", "publish", "--key"])
            .arg(key)
            .arg("--out")
            .arg(out),
    );
    let mut mappings = Vec::new();
    anchor_registry::read_set(
        std::io::BufReader::new(fs::File::open(out).expect("the published set")),
        |m| mappings.push(m),
    )
    .expect("a valid set");
    mappings
}
