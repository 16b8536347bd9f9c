//! Contributions: a contributor pins and seeds store paths and publishes a
//! *claims* set (the mapping-set format, kind `claims`, signed by their own
//! key), announced by its CID on IPFS. Gateways accept claims sets from any
//! key, as evidence for rebuilders and reports, never as a reason to serve.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anchor_registry::{Mapping, NarHash, PublicKey, Registry, SetKind, SetReader, Source};
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::publish::anchor::{key_file_name, KeyNameError};
use crate::publish::Publisher;
use crate::store::index::Index;
use crate::store::ipfs::ipns::IpnsName;
use crate::trust::sync::{verify_and_index, Indexed, Outcome, SetRejected};
use crate::util::time::unix_now;

/// Why a claims set was refused before or during verification.
#[derive(Debug, thiserror::Error)]
pub enum ClaimsError {
    #[error("`{name}` published an anchor set, not claims: anchors' sets come in through `nixpfs anchors sync`")]
    NotClaims { name: String },
    #[error("claimant name `{name}` is already held by key {held_by}; the set is signed by {key}")]
    NameTaken {
        name: String,
        held_by: String,
        key: String,
    },
    #[error("claims set of `{name}` refused: {reason}")]
    Refused { name: String, reason: String },
}

/// What `nixpfs contribute` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contribution {
    pub claimant: String,
    pub key: PublicKey,
    pub paths: Vec<String>,
    pub version: u64,
    pub digest: String,
    /// The claims set's file.
    pub out: PathBuf,
    /// The claims set on IPFS (pinned here): peers import `ipfs://<cid>`.
    pub cid: String,
    /// Where it was published under the key's IPNS name (`--ipns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipns: Option<crate::publish::names::NamePublished>,
}

/// What importing one claims set did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimsImport {
    pub source: String,
    pub claimant: String,
    pub key: PublicKey,
    /// `accepted` or `unchanged` (a refused set is an error).
    pub outcome: Outcome,
    pub version: u64,
    pub entries: Option<u64>,
}

/// One claim about a path: who (set name and key) said which NarHash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub claimant: String,
    pub key: PublicKey,
    pub nar_hash: NarHash,
    pub mapping: Mapping,
}

/// The claims about one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathClaims {
    pub store_path: String,
    pub claims: Vec<Claim>,
}

/// Where a contributor's claims set goes unless `--out` says otherwise.
pub fn default_claims_file(data_dir: &Path, key_name: &str) -> Result<PathBuf, KeyNameError> {
    let name = key_file_name(key_name)?;
    Ok(data_dir.join("claims").join(format!("{name}.jsonl")))
}

/// Pins, seeds and claims `paths`: signs each into the contributor's working
/// set, writes the next version of their claims set to `out`, adds that file
/// to IPFS (its CID is the announcement) and indexes it here too.
pub async fn contribute(
    p: &Publisher,
    paths: &[String],
    closure: bool,
    key_file: &Path,
    out: Option<PathBuf>,
    expires_in: u64,
) -> Result<Contribution> {
    let key = crate::util::keys::read_secret_key(key_file)?;
    let out = match out {
        Some(out) => out,
        None => default_claims_file(&p.data_dir, key.name())?,
    };
    let claimed =
        crate::publish::anchor::sign(&p.pinner, &p.data_dir, paths, closure, &key).await?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("while creating {}", parent.display()))?;
    }
    let data_dir = p.data_dir.clone();
    let (publish_key, publish_out) = (key.clone(), out.clone());
    let header = tokio::task::spawn_blocking(move || {
        crate::publish::anchor::publish(
            &data_dir,
            &publish_key,
            None,
            SetKind::Claims,
            expires_in,
            &publish_out,
        )
    })
    .await??;
    let pinned = p.pinner.add_file(&out).await?;
    crate::util::fs::write_atomically(
        &crate::publish::anchor::anchor_dir(&p.data_dir, &key)?.join("published.cid"),
        format!("{}\n", pinned.cid).as_bytes(),
    )?;
    let bytes = Bytes::from(
        tokio::fs::read(&out)
            .await
            .with_context(|| format!("while reading back {}", out.display()))?,
    );
    import_bytes(p, out.display().to_string(), bytes, None).await?;
    let h = header.header();
    Ok(Contribution {
        claimant: h.anchor.to_string(),
        key: h.key.clone(),
        paths: claimed,
        version: h.version,
        digest: header.digest().to_string(),
        out,
        cid: pinned.cid,
        ipns: None,
    })
}

/// Fetches a claims set (absolute file path, http(s) URL or `ipfs://<cid>`
/// from connected peers), verifies it and indexes it.
pub async fn import_claims(p: &Publisher, source: &str) -> Result<ClaimsImport> {
    let parsed =
        Source::parse(source).with_context(|| format!("invalid claims source {source}"))?;
    let bytes = crate::trust::sync::fetch_source(&parsed, Some(&p.node))
        .await
        .map_err(|e| anyhow!("cannot load claims from {source}: {e}"))?;
    import_bytes(p, source.to_owned(), bytes, None).await
}

/// [`import_claims`] of the set an IPNS name resolved to (`source` is its
/// `ipfs://`): the set must be signed by the key the name derives from, so
/// a name can only ever deliver its own key's claims.
pub async fn import_named_claims(
    p: &Publisher,
    source: &str,
    name: &IpnsName,
) -> Result<ClaimsImport> {
    let parsed =
        Source::parse(source).with_context(|| format!("invalid claims source {source}"))?;
    let bytes = crate::trust::sync::fetch_source(&parsed, Some(&p.node))
        .await
        .map_err(|e| anyhow!("cannot load claims from ipns://{name} ({source}): {e}"))?;
    import_bytes(p, format!("ipns://{name}"), bytes, Some(*name)).await
}

/// The registry that claims sets are verified against: the one in force,
/// or, with none loaded yet, an empty stand-in. Claims never need one
/// (only anchor sets are checked against the registry), but the verifier
/// takes it.
fn registry_for_claims(p: &Publisher) -> Result<Registry> {
    if let Some(registry) = p.catalog.trust().and_then(|t| t.registry) {
        return Ok(registry);
    }
    Ok(Registry::init(
        vec![p.catalog.public_key()],
        1,
        crate::util::time::now()?.saturating_add(86_400),
    )?)
}

async fn import_bytes(
    p: &Publisher,
    source: String,
    bytes: Bytes,
    name: Option<IpnsName>,
) -> Result<ClaimsImport> {
    let index = p.catalog.index().clone();
    let registry = registry_for_claims(p)?;
    tokio::task::spawn_blocking(move || {
        if let Some(name) = name {
            check_named(&name, &source, &bytes)?;
        }
        import_verified(&index, &registry, source, &bytes)
    })
    .await?
}

/// Refuses a set whose signing key does not own `name`.
fn check_named(name: &IpnsName, source: &str, bytes: &[u8]) -> Result<()> {
    let reader = SetReader::open(bytes).with_context(|| format!("{source}: not a mapping set"))?;
    let key = &reader.header().header().key;
    let owner = IpnsName::from_ed25519(key.as_bytes())?;
    if owner != *name {
        bail!("{source} resolved to a set signed by {key}, whose IPNS name is {owner}, not {name}: refused");
    }
    Ok(())
}

/// Verifies a claims set and, if every check passed, indexes it. A name
/// stays with the first key that used it: a set under another key is refused.
pub fn import_verified(
    index: &Index,
    registry: &Registry,
    source: String,
    bytes: &[u8],
) -> Result<ClaimsImport> {
    let reader = SetReader::open(bytes).with_context(|| format!("{source}: not a mapping set"))?;
    let h = reader.header().header().clone();
    let name = h.anchor.to_string();
    if h.kind != SetKind::Claims {
        bail!(ClaimsError::NotClaims { name });
    }
    let held_by = index.trusted_states()?.into_iter().find(|s| {
        let held = s.header().header();
        held.kind == SetKind::Claims && held.anchor == h.anchor
    });
    if let Some(state) = held_by {
        let held = &state.header().header().key;
        if *held != h.key {
            bail!(ClaimsError::NameTaken {
                name,
                held_by: held.to_string(),
                key: h.key.to_string(),
            });
        }
    }
    let (outcome, version, entries) =
        match verify_and_index(index, registry, SetKind::Claims, &name, bytes) {
            Ok(Indexed::Accepted { version, entries }) => {
                (Outcome::Accepted, version, Some(entries))
            }
            Ok(Indexed::Unchanged { version }) => (Outcome::Unchanged, version, None),
            Err(SetRejected::Index(e)) => return Err(e.into()),
            Err(e) => {
                bail!(ClaimsError::Refused {
                    name,
                    reason: e.to_string(),
                })
            }
        };
    tracing::info!(claimant = %name, version, %outcome, "claims set");
    Ok(ClaimsImport {
        source,
        claimant: name,
        key: h.key,
        outcome,
        version,
        entries,
    })
}

/// Every unexpired claim, by store path (sorted), claimants sorted by name.
pub fn claims_by_path(index: &Index, now: u64) -> Result<BTreeMap<String, Vec<Claim>>> {
    let mut by_path: BTreeMap<String, Vec<Claim>> = BTreeMap::new();
    for state in index.trusted_states()? {
        let h = state.header().header();
        if h.kind != SetKind::Claims || h.expires <= now {
            continue;
        }
        for mapping in index.owner_mappings(&state)? {
            by_path
                .entry(mapping.path().to_string())
                .or_default()
                .push(Claim {
                    claimant: h.anchor.to_string(),
                    key: h.key.clone(),
                    nar_hash: *mapping.nar_hash(),
                    mapping,
                });
        }
    }
    for claims in by_path.values_mut() {
        claims.sort_by(|a, b| a.claimant.cmp(&b.claimant));
    }
    Ok(by_path)
}

/// `nixpfs claims`: the claims seen, by path.
pub async fn list(p: &Publisher) -> Result<Vec<PathClaims>> {
    let index = p.catalog.index().clone();
    let by_path = tokio::task::spawn_blocking(move || claims_by_path(&index, unix_now())).await??;
    Ok(by_path
        .into_iter()
        .map(|(store_path, claims)| PathClaims { store_path, claims })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use anchor_registry::{AnchorName, MappingSetBuilder, Policy, SecretKey, StorePath};

    use crate::trust::catalog::{Catalog, Lookup, Trust};

    fn key(name: &str) -> SecretKey {
        SecretKey::from_seed(name, [name.len() as u8 + 7; 32]).unwrap()
    }

    fn path() -> StorePath {
        StorePath::parse("/nix/store/ja6626fva3fhh8mbc88bv9z4aa4agqch-det").unwrap()
    }

    fn claims_set(signer: &SecretKey, name: &str, nar: &[u8]) -> Vec<u8> {
        let mut builder =
            MappingSetBuilder::first(SetKind::Claims, AnchorName::parse(name).unwrap());
        builder.insert(anchor_registry::testing::mapping(signer, path(), nar));
        let now = unix_now();
        let mut out = Vec::new();
        builder.write(signer, now, now + 3600, &mut out).unwrap();
        out
    }

    fn world() -> (tempfile::TempDir, Arc<Index>, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let index = Arc::new(Index::open(&dir.path().join("index.redb")).unwrap());
        let registry = anchor_registry::testing::one_root_registry([], unix_now() + 3600);
        (dir, index, registry)
    }

    #[test]
    fn a_path_with_claims_only_is_not_served() {
        let (_dir, index, registry) = world();
        for i in 0..5 {
            let k = key(&format!("sock{i}-1"));
            let set = claims_set(&k, &format!("sock{i}"), b"nar");
            let done = import_verified(&index, &registry, "test".to_owned(), &set).unwrap();
            assert_eq!(done.outcome, Outcome::Accepted);
        }
        let catalog = Catalog::new(
            index.clone(),
            Arc::new(key("gateway-1")),
            Trust {
                registry: Some(registry),
                policy: Policy::default(),
            },
        );
        assert_eq!(catalog.lookup(path().hash()).unwrap(), Lookup::NotFound);
        let claims = claims_by_path(&index, unix_now()).unwrap();
        assert_eq!(claims[&path().to_string()].len(), 5);
    }

    #[test]
    fn a_claimant_name_stays_with_its_first_key() {
        let (_dir, index, registry) = world();
        let set = claims_set(&key("alice-1"), "alice", b"nar");
        import_verified(&index, &registry, "a".to_owned(), &set).unwrap();
        let again = import_verified(&index, &registry, "a".to_owned(), &set).unwrap();
        assert_eq!(again.outcome, Outcome::Unchanged);
        let squatter = claims_set(&key("mallory-1"), "alice", b"evil");
        let err = import_verified(&index, &registry, "m".to_owned(), &squatter).unwrap_err();
        assert!(err.to_string().contains("already held"), "{err}");
    }

    #[test]
    fn a_claims_entry_not_signed_by_the_claimant_is_refused_at_import() {
        let (_dir, index, registry) = world();
        let alice = key("alice-1");
        // Another key under alice's key name: only the signature check tells.
        let impostor = SecretKey::from_seed("alice-1", [99; 32]).unwrap();
        let forged = anchor_registry::testing::mapping(&impostor, path(), b"nar");
        let set = anchor_registry::testing::forged_set(
            &alice,
            SetKind::Claims,
            "alice",
            1,
            None,
            &[forged],
        );
        let err = import_verified(&index, &registry, "f".to_owned(), &set).unwrap_err();
        assert!(err.to_string().contains("signature"), "{err}");
        assert!(claims_by_path(&index, unix_now()).unwrap().is_empty());
    }

    #[test]
    fn claims_files_are_named_after_the_key() {
        let file = default_claims_file(Path::new("/data"), "alice-1").unwrap();
        assert_eq!(file, Path::new("/data/claims/alice-1.jsonl"));
    }

    #[test]
    fn key_names_that_would_leave_the_claims_directory_are_refused() {
        for name in ["../x", "a/b", ".", ".."] {
            let err = default_claims_file(Path::new("/data"), name).unwrap_err();
            assert_eq!(err.name, name);
            assert!(err.to_string().contains(&format!("`{name}`")), "{err}");
        }
    }

    #[test]
    fn anchor_sets_are_not_claims() {
        let (_dir, index, registry) = world();
        let k = key("anchor-1");
        let mut builder =
            MappingSetBuilder::first(SetKind::Anchor, AnchorName::parse("anchor").unwrap());
        builder.insert(anchor_registry::testing::mapping(&k, path(), b"x"));
        let mut set = Vec::new();
        builder
            .write(&k, unix_now(), unix_now() + 60, &mut set)
            .unwrap();
        let err = import_verified(&index, &registry, "x".to_owned(), &set).unwrap_err();
        assert!(err.to_string().contains("not claims"), "{err}");
    }
}
