//! Our Nix formats checked against the real Nix client: NAR bytes, NarHash and
//! NarSize, narinfo parse/render, fingerprints and signatures both ways.

use std::fs;
use std::path::Path;

use anchor_registry::{fingerprint, NarHash, NarInfo, PublicKey, SecretKey, Signature, StorePath};
use e2e::nix::{NixEnv, FIXTURE_CLOSURE};
use e2e::{nixpfs, run_ok, run_ok_str};

/// Builds the fixture closure; returns (env, top path, its closure).
fn fixture() -> (NixEnv, String, Vec<String>) {
    let env = NixEnv::new();
    let top = env.build("fixture.nix", FIXTURE_CLOSURE);
    let closure = env.closure(&top);
    assert_eq!(
        closure.len(),
        2,
        "fixture closure is top + dep: {closure:?}"
    );
    (env, top, closure)
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn nar_dump_matches_nix_store_dump_for_every_node_kind() {
    let (env, _top, closure) = fixture();
    for path in &closure {
        let theirs = run_ok(env.cmd("nix-store").args(["--dump", path]));
        let ours = run_ok(nixpfs().args(["nar", "dump", path]));
        assert_eq!(ours.len(), theirs.len(), "NAR size differs for {path}");
        assert!(ours == theirs, "NAR bytes differ for {path}");

        let mut lib = Vec::new();
        gateway::store::nar::dump(Path::new(path), &mut lib).expect("library dump");
        assert!(lib == theirs, "library NAR differs for {path}");
    }
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn nar_hash_and_size_match_nix_path_info() {
    let (env, _top, closure) = fixture();
    for path in &closure {
        let info = env.path_info(path);
        let nix_hash = NarHash::parse(info["narHash"].as_str().expect("narHash")).expect("parse");
        let nix_size = info["narSize"].as_u64().expect("narSize");

        let out = run_ok_str(nixpfs().args(["nar", "hash", path]));
        let (hash, size) = out.split_once(' ').expect("`<hash> <size>`");
        assert_eq!(
            NarHash::parse(hash).expect("our hash parses"),
            nix_hash,
            "{path}"
        );
        assert_eq!(size.parse::<u64>().expect("size"), nix_size, "{path}");
        assert_eq!(hash, nix_hash.to_string(), "printed as sha256:<nix32>");
    }
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn restoring_nix_dump_reproduces_the_same_nar() {
    let (env, top, _) = fixture();
    let theirs = run_ok(env.cmd("nix-store").args(["--dump", &top]));
    let dest = env.path().join("restored");
    let summary = gateway::store::nar::restore(&theirs[..], &dest).expect("restore");
    assert_eq!(summary.nar_size, theirs.len() as u64);
    let mut again = Vec::new();
    gateway::store::nar::dump(&dest, &mut again).expect("dump restored");
    assert!(again == theirs, "restore + dump is not the identity");
    // And Nix restores what we dump into the same tree.
    let nix_dest = env.path().join("nix-restored");
    let mut child = env
        .cmd("nix-store")
        .arg("--restore")
        .arg(&nix_dest)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("spawn nix-store --restore");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&again).expect("feed NAR");
    }
    assert!(child.wait().expect("wait").success());
    let mut third = Vec::new();
    gateway::store::nar::dump(&nix_dest, &mut third).expect("dump nix-restored");
    assert!(third == theirs);
}

/// Exports `path`'s closure to a `file://` cache with `nix copy` and returns the cache dir.
fn export_file_cache(env: &NixEnv, path: &str) -> std::path::PathBuf {
    let cache = env.path().join("cache");
    run_ok(env.cmd("nix").args([
        "copy",
        "--to",
        &format!("file://{}?compression=none", cache.display()),
        path,
    ]));
    cache
}

fn narinfo_file(cache: &Path, path: &str) -> std::path::PathBuf {
    let sp = StorePath::parse(path).expect("store path");
    cache.join(format!("{}.narinfo", sp.hash()))
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn narinfo_written_by_nix_copy_parses_and_renders_identically() {
    let (env, top, closure) = fixture();
    let (sk, _pk) = env.nix_keypair("fixture-signer-1");
    run_ok(
        env.cmd("nix")
            .args(["store", "sign", "-r", "--key-file"])
            .arg(&sk)
            .arg(&top),
    );
    let cache = export_file_cache(&env, &top);
    for path in &closure {
        let text = fs::read_to_string(narinfo_file(&cache, path)).expect("narinfo");
        let parsed = NarInfo::parse(&text).expect("parse Nix's narinfo");
        assert_eq!(parsed.store_path.to_string(), *path);
        assert_eq!(
            parsed.to_string(),
            text,
            "render differs from Nix's narinfo"
        );
        assert_eq!(parsed.sigs.len(), 1, "signed by fixture-signer-1");
        let info = env.path_info(path);
        assert_eq!(parsed.nar_size, info["narSize"].as_u64().expect("narSize"));
    }
    let cache_info = fs::read_to_string(cache.join("nix-cache-info")).expect("nix-cache-info");
    let parsed = anchor_registry::CacheInfo::parse(&cache_info).expect("parse nix-cache-info");
    assert_eq!(parsed.store_dir, "/nix/store");
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn signature_by_nix_store_sign_verifies_with_our_code() {
    let (env, top, _) = fixture();
    let (sk, pk) = env.nix_keypair("nix-made-key-1");
    run_ok(
        env.cmd("nix")
            .args(["store", "sign", "--key-file"])
            .arg(&sk)
            .arg(&top),
    );
    let info = env.path_info(&top);
    let sig_text = info["signatures"]
        .as_array()
        .and_then(|s| {
            s.iter()
                .filter_map(|v| v.as_str())
                .find(|s| s.starts_with("nix-made-key-1:"))
        })
        .expect("signature by nix-made-key-1");
    let sig = Signature::parse(sig_text).expect("parse Nix signature");
    let public = PublicKey::parse(&pk).expect("parse Nix public key");
    let refs: Vec<StorePath> = info["references"]
        .as_array()
        .expect("references")
        .iter()
        .map(|r| StorePath::parse(r.as_str().expect("str")).expect("ref"))
        .collect();
    let fp = fingerprint(
        &StorePath::parse(&top).expect("top"),
        &NarHash::parse(info["narHash"].as_str().expect("narHash")).expect("hash"),
        info["narSize"].as_u64().expect("size"),
        &refs,
    );
    assert!(
        public.verify(fp.as_bytes(), &sig),
        "Nix's signature must verify: {fp}"
    );
    assert!(
        !public.verify(format!("{fp}x").as_bytes(), &sig),
        "a changed fingerprint must not"
    );
    // The secret key file Nix wrote parses too, and signs identically (ed25519 is deterministic).
    let ours =
        SecretKey::parse(&fs::read_to_string(&sk).expect("sk")).expect("parse Nix secret key");
    assert_eq!(ours.sign(fp.as_bytes()), sig);
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn our_key_signs_narinfos_that_nix_store_verify_accepts() {
    let (env, top, closure) = fixture();
    let key_file = env.path().join("ours.sk");
    let public = run_ok_str(
        nixpfs()
            .args(["key", "generate", "--name", "nixpfs-test-1", "--out"])
            .arg(&key_file),
    );
    let secret =
        SecretKey::parse(&fs::read_to_string(&key_file).expect("key file")).expect("parse");
    assert_eq!(secret.public().to_string(), public);

    let cache = export_file_cache(&env, &top);
    for path in &closure {
        let file = narinfo_file(&cache, path);
        let mut info = NarInfo::parse(&fs::read_to_string(&file).expect("read")).expect("parse");
        info.sigs.clear();
        info.sign(&secret);
        fs::write(&file, info.to_string()).expect("write signed narinfo");
    }
    let store = format!("file://{}", cache.display());
    run_ok(env.cmd("nix").args([
        "store",
        "verify",
        "--store",
        &store,
        "--trusted-public-keys",
        &public,
        "-r",
        &top,
    ]));

    // Nix must refuse the same paths under an unrelated key: the check is real.
    let (_sk, other) = env.nix_keypair("unrelated-1");
    let out = env
        .cmd("nix")
        .args([
            "store",
            "verify",
            "--store",
            &store,
            "--trusted-public-keys",
            &other,
            &top,
        ])
        .output()
        .expect("spawn");
    assert!(
        !out.status.success(),
        "verify under an unrelated key must fail"
    );
}

#[test]
fn key_generate_refuses_to_overwrite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("k");
    run_ok(
        nixpfs()
            .args(["key", "generate", "--name", "a-1", "--out"])
            .arg(&key_file),
    );
    let before = fs::read(&key_file).expect("read");
    let out = nixpfs()
        .args(["key", "generate", "--name", "a-1", "--out"])
        .arg(&key_file)
        .output()
        .expect("spawn");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));
    assert_eq!(fs::read(&key_file).expect("read"), before);
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(&key_file).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// sha256 and length of everything a command writes to stdout, streamed.
fn stdout_digest(cmd: &mut std::process::Command) -> ([u8; 32], u64) {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = out.read(&mut buf).expect("read stdout");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    assert!(child.wait().expect("wait").success(), "{cmd:?} failed");
    (hasher.finalize().into(), len)
}

#[test]
#[cfg_attr(
    missing_nix,
    ignore = "needs the real Nix client (nix-store on PATH); .ci/run installs nix-bin"
)]
fn odd_trees_and_a_1_gib_file_agree_with_nix_byte_for_byte() {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{symlink, PermissionsExt};
    let env = NixEnv::new();
    let root = env.path().join("odd");
    fs::create_dir_all(root.join("empty-dir")).unwrap();
    fs::create_dir_all(root.join("a/b/c/d")).unwrap();
    fs::write(
        root.join(std::ffi::OsStr::from_bytes(b"caf\xe9-latin1")),
        b"not utf-8 name",
    )
    .unwrap();
    fs::write(root.join("n".repeat(255)), b"255-byte name").unwrap();
    for (name, mode) in [
        ("m0654", 0o654),
        ("m0700", 0o700),
        ("m0755", 0o755),
        ("m0600", 0o600),
    ] {
        let p = root.join(name);
        fs::write(&p, name).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }
    fs::write(root.join("empty-file"), b"").unwrap();
    symlink("t".repeat(4000), root.join("long-link")).unwrap();
    symlink("/nonexistent/dangling", root.join("dangling")).unwrap();
    symlink("a/b", root.join("dir-link")).unwrap();
    fs::write(root.join("a/b/c/d/deep"), b"deep").unwrap();
    let big = fs::File::create(root.join("big-1gib")).unwrap();
    big.set_len(1 << 30).unwrap();
    drop(big);

    let theirs = stdout_digest(env.cmd("nix-store").arg("--dump").arg(&root));
    let ours = stdout_digest(nixpfs().args(["nar", "dump"]).arg(&root));
    assert_eq!(ours.1, theirs.1, "NAR sizes differ");
    assert_eq!(ours.0, theirs.0, "NAR bytes differ");

    let nix_hash = run_ok_str(
        env.cmd("nix-hash")
            .args(["--type", "sha256", "--base32"])
            .arg(&root),
    );
    let out = run_ok_str(nixpfs().args(["nar", "hash"]).arg(&root));
    assert_eq!(out, format!("sha256:{nix_hash} {}", theirs.1));
}
