//! `nixpfs repo verify` on a data directory holding a real Nix closure
//! (its leaves backed by the store, only the inner node a block file) and
//! an added file (ordinary blocks): clean after the pin (exit 0, directly
//! and through a running gateway); after the closure's inner node is
//! flipped and a leaf of the file deleted, the flipped block, the broken
//! pins and the path they held are reported and the exit code is 1, in
//! text and in JSON.

use std::fs;
use std::path::Path;
use std::process::Output;

use e2e::gateway::Gateway;
use e2e::nix::{NixEnv, FIXTURE_CLOSURE};
use e2e::{nixpfs, run_ok_str};
use serde_json::Value;

fn verify(data_dir: &Path, json: bool) -> Output {
    let mut cmd = nixpfs();
    cmd.arg("--data-dir").arg(data_dir).args(["repo", "verify"]);
    if json {
        cmd.arg("--json");
    }
    cmd.output().expect("run nixpfs repo verify")
}

fn report(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "repo verify --json printed no JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn damaged(report: &Value, part: &str) -> Vec<Value> {
    report["damaged"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["part"] == part)
        .cloned()
        .collect()
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn repo_verify_is_clean_after_a_pin_and_names_a_flipped_and_a_deleted_block() {
    let env = NixEnv::new();
    let top = env.build("fixture.nix", FIXTURE_CLOSURE);
    let dir = env.path().join("gw");
    run_ok_str(
        nixpfs()
            .arg("--data-dir")
            .arg(&dir)
            .args(["pin", "--closure", &top]),
    );
    let pinned = e2e::gateway::block_files(&dir);
    assert_eq!(
        pinned.len(),
        1,
        "only top's inner node is a file: {pinned:?}"
    );
    let flipped = pinned[0].0.clone();
    let extra = env.path().join("extra");
    fs::write(
        &extra,
        (0..3 << 20)
            .map(|i: u32| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    run_ok_str(nixpfs().arg("--data-dir").arg(&dir).arg("add").arg(&extra));

    let out = verify(&dir, false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("clean"), "{text}");

    // Through a running gateway's admin API: the same report.
    {
        let gw = Gateway::start(&dir, &[]);
        let out = verify(&dir, true);
        assert!(out.status.success(), "{}", gw.log_text());
        let r = report(&out);
        assert_eq!(r["damaged"], serde_json::json!([]));
        assert!(r["blocks"].as_u64().unwrap() >= 3, "{r}");
        assert_eq!(r["pins"], 3, "top, dep and the file: {r}");
        assert_eq!(r["paths"], 2, "{r}");
    }

    let blocks = e2e::gateway::block_files(&dir);
    let (deleted, _) = &blocks[0];
    assert_eq!(blocks[0].1, 1 << 20, "a leaf of the file");
    // A byte of the first link's CID digest (after the link's tag, length,
    // the Hash tag, length and the 4-byte CID prefix).
    let mut bytes = fs::read(&flipped).unwrap();
    bytes[12] ^= 0x20;
    fs::write(&flipped, bytes).unwrap();
    fs::remove_file(deleted).unwrap();
    let flipped_cid = flipped.file_name().unwrap().to_str().unwrap();

    for through_gateway in [false, true] {
        let gw = through_gateway.then(|| Gateway::start(&dir, &[]));
        let out = verify(&dir, true);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("damaged"), "{stderr}");
        let r = report(&out);
        let bad_blocks = damaged(&r, "block");
        assert_eq!(bad_blocks.len(), 1, "{r}");
        assert_eq!(bad_blocks[0]["item"], flipped_cid, "{r}");
        assert!(
            bad_blocks[0]["problem"]
                .as_str()
                .unwrap()
                .contains("does not match"),
            "{r}"
        );
        assert!(
            !damaged(&r, "pin").is_empty(),
            "the deleted block breaks a pin: {r}"
        );
        assert!(
            damaged(&r, "pin").iter().any(|d| d["problem"]
                .as_str()
                .unwrap()
                .contains("not in the local store")),
            "{r}"
        );
        assert!(!damaged(&r, "path").is_empty(), "{r}");
        drop(gw);
    }

    // The text form names the damage too.
    let out = verify(&dir, false);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("damaged block {flipped_cid}")) && text.contains("DAMAGED"),
        "{text}"
    );
}
