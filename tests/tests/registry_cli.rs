//! The registry tool path as a root-key holder uses it: init, add anchors,
//! sign to threshold, verify, rotate.

use std::path::Path;
use std::process::Output;

use e2e::{nixpfs, run_ok_str};

fn keygen(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    let file = dir.join(format!("{name}.sk"));
    let public = run_ok_str(
        nixpfs()
            .args(["key", "generate", "--name", name, "--out"])
            .arg(&file),
    );
    (file, public)
}

fn nixpfs_out(args: &[&str]) -> Output {
    nixpfs().args(args).output().expect("spawn nixpfs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn registry_needs_a_threshold_of_root_signatures_and_rotation_needs_both_sets() {
    let dir = tempfile::tempdir().unwrap();
    let (sk1, pk1) = keygen(dir.path(), "root-1");
    let (sk2, pk2) = keygen(dir.path(), "root-2");
    let (_sk3, pk3) = keygen(dir.path(), "root-3");
    let (_ask, apk) = keygen(dir.path(), "anchor-a-1");
    let reg = dir.path().join("registry.json");
    let reg_s = reg.to_str().unwrap();

    run_ok_str(nixpfs().args([
        "registry",
        "init",
        "--root-key",
        &pk1,
        "--root-key",
        &pk2,
        "--root-key",
        &pk3,
        "--threshold",
        "2",
        "--out",
        reg_s,
    ]));
    run_ok_str(nixpfs().args([
        "registry",
        "add-anchor",
        reg_s,
        "--name",
        "anchor-a",
        "--key",
        &apk,
        "--source",
        "/srv/anchor-a/set.jsonl",
    ]));

    let out = nixpfs_out(&["registry", "verify", reg_s]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "unsigned registry must not verify"
    );
    assert!(stderr(&out).contains("not trustworthy"), "{}", stderr(&out));

    run_ok_str(
        nixpfs()
            .args(["registry", "sign", reg_s, "--key"])
            .arg(&sk1),
    );
    let out = nixpfs_out(&["registry", "verify", reg_s]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "1 of 2 signatures must not verify"
    );

    run_ok_str(
        nixpfs()
            .args(["registry", "sign", reg_s, "--key"])
            .arg(&sk1),
    );
    let out = nixpfs_out(&["registry", "verify", reg_s]);
    assert_eq!(out.status.code(), Some(1), "the same key twice counts once");

    run_ok_str(
        nixpfs()
            .args(["registry", "sign", reg_s, "--key"])
            .arg(&sk2),
    );
    let ok = run_ok_str(nixpfs().args(["registry", "verify", reg_s]));
    assert!(ok.contains("version 1 OK: 1 anchors"), "{ok}");

    // Version 2 (a change to a signed registry bumps the version).
    let v1 = dir.path().join("registry-v1.json");
    std::fs::copy(&reg, &v1).unwrap();
    let v1_s = v1.to_str().unwrap();
    let msg = run_ok_str(nixpfs().args(["registry", "remove-anchor", reg_s, "--name", "anchor-a"]));
    assert!(msg.contains("version 2"), "{msg}");
    run_ok_str(
        nixpfs()
            .args(["registry", "sign", reg_s, "--key"])
            .arg(&sk1),
    );
    run_ok_str(
        nixpfs()
            .args(["registry", "sign", reg_s, "--key"])
            .arg(&sk2),
    );
    run_ok_str(nixpfs().args(["registry", "verify", reg_s, "--previous", v1_s]));

    // Rollback: version 1 after version 2 is refused.
    let out = nixpfs_out(&["registry", "verify", v1_s, "--previous", reg_s]);
    assert_eq!(out.status.code(), Some(1));

    // Tampering with any byte of a signed registry is refused.
    let text = std::fs::read_to_string(&reg).unwrap();
    std::fs::write(
        &reg,
        text.replacen("\"threshold\": 2", "\"threshold\": 1", 1),
    )
    .unwrap();
    let out = nixpfs_out(&["registry", "verify", reg_s]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "tampered registry verified: {text}"
    );
}

#[test]
fn bad_registry_input_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("r.json");
    std::fs::write(&reg, "{ not json").unwrap();
    let out = nixpfs_out(&["registry", "verify", reg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("invalid registry"),
        "{}",
        stderr(&out)
    );
    let out = nixpfs_out(&[
        "registry",
        "init",
        "--root-key",
        "nonsense",
        "--threshold",
        "1",
        "--out",
        dir.path().join("x.json").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("invalid --root-key"),
        "{}",
        stderr(&out)
    );
    let out = nixpfs_out(&["registry", "frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}
