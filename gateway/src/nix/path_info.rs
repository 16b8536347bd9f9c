//! Reading path metadata from the local Nix store, through the `nix` command
//! the user already has (`nix path-info --json`): it knows the store's
//! database schema and locking, so we never open that database ourselves.

use std::process::Command;

use anchor_registry::{NarHash, NarInfo, Signature, StorePath};
use serde::Deserialize;

/// Why the local store could not tell us about a path.
#[derive(Debug, thiserror::Error)]
pub enum NixStoreError {
    #[error("cannot run `nix` (is Nix installed and on PATH?): {0}")]
    Spawn(std::io::Error),
    #[error("`nix path-info` failed for {paths}: {stderr}")]
    PathInfo { paths: String, stderr: String },
    #[error("unexpected `nix path-info --json` output: {0}")]
    Json(String),
    #[error("`nix path-info` reported an invalid {field} {value:?}: {message}")]
    Field {
        field: &'static str,
        value: String,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPathInfo {
    path: String,
    nar_hash: String,
    nar_size: u64,
    #[serde(default)]
    references: Vec<String>,
    #[serde(default)]
    deriver: Option<String>,
    #[serde(default)]
    ca: Option<String>,
    #[serde(default)]
    signatures: Vec<String>,
    #[serde(default)]
    valid: Option<bool>,
}

/// Metadata of `paths` (and, with `closure`, everything they reference),
/// as narinfos with URL and compression left for the caller to fill in.
pub fn path_infos(paths: &[String], closure: bool) -> Result<Vec<NarInfo>, NixStoreError> {
    let mut cmd = Command::new("nix");
    cmd.args([
        "--extra-experimental-features",
        "nix-command",
        "path-info",
        "--json",
    ]);
    if closure {
        cmd.arg("--recursive");
    }
    cmd.arg("--").args(paths);
    let out = cmd.output().map_err(NixStoreError::Spawn)?;
    if !out.status.success() {
        return Err(NixStoreError::PathInfo {
            paths: paths.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    parse_path_infos(&out.stdout)
}

/// Parses Nix 2.8's `path-info --json` array.
pub fn parse_path_infos(json: &[u8]) -> Result<Vec<NarInfo>, NixStoreError> {
    let raw: Vec<RawPathInfo> =
        serde_json::from_slice(json).map_err(|e| NixStoreError::Json(e.to_string()))?;
    raw.into_iter().map(to_narinfo).collect()
}

fn to_narinfo(raw: RawPathInfo) -> Result<NarInfo, NixStoreError> {
    if raw.valid == Some(false) {
        return Err(NixStoreError::Field {
            field: "path",
            value: raw.path,
            message: "not valid in the local store (build or fetch it first)".to_owned(),
        });
    }
    let store_path = parse_store_path("path", &raw.path)?;
    let nar_hash = NarHash::parse(&raw.nar_hash).map_err(|e| NixStoreError::Field {
        field: "narHash",
        value: raw.nar_hash.clone(),
        message: e.to_string(),
    })?;
    let mut references = raw
        .references
        .iter()
        .map(|r| parse_store_path("reference", r))
        .collect::<Result<Vec<_>, _>>()?;
    references.sort();
    let deriver = raw
        .deriver
        .as_deref()
        .map(|d| parse_store_path("deriver", d))
        .transpose()?;
    let sigs = raw
        .signatures
        .iter()
        .map(|s| {
            Signature::parse(s).map_err(|e| NixStoreError::Field {
                field: "signature",
                value: s.clone(),
                message: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NarInfo {
        store_path,
        url: String::new(),
        compression: None,
        file_hash: None,
        file_size: None,
        nar_hash,
        nar_size: raw.nar_size,
        references,
        deriver,
        sigs,
        ca: raw.ca,
    })
}

fn parse_store_path(field: &'static str, value: &str) -> Result<StorePath, NixStoreError> {
    StorePath::parse(value).map_err(|e| NixStoreError::Field {
        field,
        value: value.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"[{"deriver":"/nix/store/0vkw1m51q34dr64z5i87dy99an4hfmyg-e2e-top.drv","narHash":"sha256-0H1ZxXNmClY2UKYpQZJlOpZyDjS4qbcPAtF5mRBEmTI=","narSize":600,"path":"/nix/store/9wgph3hsskb7zdmm9cbgvnq2zq4gj8y4-e2e-top","references":["/nix/store/3ixv7qwr7mkhzbbv5vdx3y6fdcvq5ixm-hello.txt","/nix/store/0c2jqhlnpsi5k8j4yz0kz0cqxks9aw8q-e2e-dep"],"registrationTime":1700000000,"signatures":[],"valid":true}]"#;

    #[test]
    fn parses_nix_path_info_json() {
        let infos = parse_path_infos(SAMPLE.as_bytes()).unwrap();
        assert_eq!(infos.len(), 1);
        let info = &infos[0];
        assert_eq!(
            info.store_path.to_string(),
            "/nix/store/9wgph3hsskb7zdmm9cbgvnq2zq4gj8y4-e2e-top"
        );
        assert_eq!(info.nar_size, 600);
        assert_eq!(info.references.len(), 2);
        assert!(
            info.references[0] < info.references[1],
            "sorted like Nix's set"
        );
        assert!(info.deriver.is_some());
    }

    #[test]
    fn rejects_invalid_paths_and_garbage() {
        let bad = SAMPLE.replace("\"valid\":true", "\"valid\":false");
        assert!(matches!(
            parse_path_infos(bad.as_bytes()),
            Err(NixStoreError::Field { field: "path", .. })
        ));
        assert!(matches!(
            parse_path_infos(b"not json"),
            Err(NixStoreError::Json(_))
        ));
        let bad_hash = SAMPLE.replace("sha256-0H1", "sha256-!!!");
        assert!(matches!(
            parse_path_infos(bad_hash.as_bytes()),
            Err(NixStoreError::Field {
                field: "narHash",
                ..
            })
        ));
    }
}
