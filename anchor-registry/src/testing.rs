//! Builders for tests, this crate's and the workspace's (feature `testing`):
//! keys, anchors, a registry under one root key, mappings and deterministic
//! noise, so every test builds its world the same way. Panics on misuse: it
//! only ever sees the values a test wrote.

use crate::{
    Anchor, AnchorName, ContentId, ImportProfile, Mapping, MappingData, NarHash, Registry,
    SecretKey, SetHeader, SetKind, Sha256Hash, SignedHeader, Source, StorePath,
};

/// An expiry no test outlives (2106).
pub const FAR_FUTURE: u64 = u32::MAX as u64;

/// A fresh key named `name` (e.g. `alpha-1`).
pub fn key(name: &str) -> SecretKey {
    SecretKey::generate(name).expect("a valid key name")
}

/// A registry entry for `key` under `name`, publishing at `sources`.
pub fn anchor(key: &SecretKey, name: &str, sources: &[&str]) -> Anchor {
    Anchor {
        key: key.public(),
        name: AnchorName::parse(name).expect("a valid anchor name"),
        note: None,
        sources: sources
            .iter()
            .map(|s| Source::parse(s).expect("a valid source"))
            .collect(),
    }
}

/// A registry listing `anchors`, signed by one fresh root key (threshold 1),
/// valid until `expires`.
pub fn one_root_registry(anchors: impl IntoIterator<Item = Anchor>, expires: u64) -> Registry {
    let root = key("root-1");
    let mut registry = Registry::init(vec![root.public()], 1, expires).expect("a valid registry");
    for anchor in anchors {
        registry.add_anchor(anchor).expect("distinct anchors");
    }
    registry.sign(&root);
    registry
}

/// `signer`'s mapping of `path` to a NAR whose bytes are `nar` (no
/// references, a fixed valid CID: tests using it fetch nothing).
pub fn mapping(signer: &SecretKey, path: StorePath, nar: &[u8]) -> Mapping {
    MappingData {
        path,
        nar_hash: NarHash::digest(nar),
        nar_size: nar.len() as u64,
        references: Default::default(),
        deriver: None,
        ca: None,
        cid: ContentId::parse("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")
            .expect("a valid CID"),
        profile: ImportProfile::unixfs_v1_2025(),
    }
    .sign(signer)
}

/// `len` deterministic, non-repeating bytes (xorshift64) from `seed`: data
/// whose 1 MiB chunks are all distinct blocks.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A set of `kind` under `name`, its header signed by `key`, carrying
/// `entries` exactly as given (sorted by the caller): unlike the writer it
/// lets a test put another key's signatures in, as an attacker would.
pub fn forged_set(
    key: &SecretKey,
    kind: SetKind,
    name: &str,
    version: u64,
    previous: Option<Sha256Hash>,
    entries: &[Mapping],
) -> Vec<u8> {
    let lines: Vec<String> = entries
        .iter()
        .map(|m| format!("{}\n", m.to_canonical_string()))
        .collect();
    let header = SignedHeader::sign(
        SetHeader {
            kind,
            anchor: AnchorName::parse(name).expect("a valid name"),
            key: key.public(),
            version,
            created: 1,
            expires: FAR_FUTURE,
            previous,
            entries: Sha256Hash::digest(lines.concat().as_bytes()),
            count: entries.len() as u64,
        },
        key,
    )
    .expect("a valid header");
    let mut out = format!("{}\n", header.line());
    out.push_str(&lines.concat());
    out.into_bytes()
}
