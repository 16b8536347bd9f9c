//! 100,000 random, truncated and mutated inputs to every parser of untrusted
//! text: each must return an error or a value, never panic. And inputs that
//! are valid but large: a set of big entries is read a bounded number of
//! bytes ahead of what it yields; a registry of 50,000 anchors is checked
//! for duplicate keys in one pass.

// Test fixtures built from constants: a failure is a bug in the test itself.
#![allow(clippy::unwrap_used)]

use std::io::{BufReader, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anchor_registry::{
    read_set, Anchor, CacheInfo, ContentId, MappingData, MappingSetBuilder, NarHash, NarInfo,
    PublicKey, Registry, RegistryError, SecretKey, SetKind, SetReader, Signature, SignedHeader,
    StorePath, MAX_BATCH_BYTES,
};

/// xorshift64*: deterministic, dependency-free input generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One hostile variant of a valid sample: random bytes, a truncation, flipped
/// bytes, or a spliced-in chunk of another sample.
fn variant(rng: &mut Rng, samples: &[Vec<u8>]) -> Vec<u8> {
    let base = &samples[rng.below(samples.len())];
    match rng.below(4) {
        0 => (0..rng.below(300)).map(|_| rng.next() as u8).collect(),
        1 => base[..rng.below(base.len() + 1)].to_vec(),
        2 => {
            let mut v = base.clone();
            for _ in 0..=rng.below(4) {
                if !v.is_empty() {
                    let i = rng.below(v.len());
                    v[i] ^= 1 << rng.below(8);
                }
            }
            v
        }
        _ => {
            let other = &samples[rng.below(samples.len())];
            let mut v = base[..rng.below(base.len() + 1)].to_vec();
            v.extend_from_slice(&other[rng.below(other.len() + 1)..]);
            v
        }
    }
}

fn samples() -> Vec<Vec<u8>> {
    let key = SecretKey::generate("sample-1").unwrap();
    let path = StorePath::parse("/nix/store/0c2jqhlnpsi5k8j4yz0kz0cqxks9aw8q-sample").unwrap();
    let nar_hash = NarHash::digest(b"nar");
    let narinfo = NarInfo {
        store_path: path.clone(),
        url: "nar/x.nar".into(),
        compression: Some("none".into()),
        file_hash: None,
        file_size: None,
        nar_hash,
        nar_size: 3,
        references: vec![path.clone()],
        deriver: None,
        sigs: vec![key.sign(b"x")],
        ca: None,
    };
    let mapping = MappingData {
        path: path.clone(),
        nar_hash,
        nar_size: 3,
        references: Default::default(),
        deriver: None,
        ca: None,
        cid: ContentId::parse("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")
            .unwrap(),
        profile: anchor_registry::ImportProfile::unixfs_v1_2025(),
    }
    .sign(&key);
    let mut builder = MappingSetBuilder::first(SetKind::Anchor, "sample".parse().unwrap());
    builder.insert(mapping);
    let mut set = Vec::new();
    builder
        .write(&key, 1, u64::from(u32::MAX), &mut set)
        .unwrap();
    let mut registry = Registry::init(vec![key.public()], 1, u64::from(u32::MAX)).unwrap();
    registry.sign(&key);
    vec![
        path.to_string().into_bytes(),
        nar_hash.to_string().into_bytes(),
        nar_hash.to_sri().into_bytes(),
        key.to_string().into_bytes(),
        key.public().to_string().into_bytes(),
        key.sign(b"m").to_string().into_bytes(),
        narinfo.to_string().into_bytes(),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
            .as_bytes()
            .to_vec(),
        set,
        registry.render().into_bytes(),
    ]
}

#[test]
fn hundred_thousand_hostile_inputs_never_panic_any_parser() {
    let samples = samples();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut accepted = 0usize;
    for _ in 0..100_000 {
        let input = variant(&mut rng, &samples);
        let text = String::from_utf8_lossy(&input);
        accepted += usize::from(StorePath::parse(&text).is_ok());
        accepted += usize::from(NarHash::parse(&text).is_ok());
        accepted += usize::from(SecretKey::parse(&text).is_ok());
        accepted += usize::from(PublicKey::parse(&text).is_ok());
        accepted += usize::from(Signature::parse(&text).is_ok());
        accepted += usize::from(NarInfo::parse(&text).is_ok());
        accepted += usize::from(CacheInfo::parse(&text).is_ok());
        accepted += usize::from(ContentId::parse(&text).is_ok());
        accepted += usize::from(Registry::parse(&text).is_ok());
        accepted += usize::from(SignedHeader::parse(&input).is_ok());
        accepted += usize::from(read_set(&input[..], |_| {}).is_ok());
    }
    // Unchanged truncations of full samples parse; mutated ones mostly not.
    assert!(accepted > 0, "the generator never produced a valid input");
}

/// A reader that counts the bytes taken from it.
struct Counting<'a> {
    inner: &'a [u8],
    taken: Arc<AtomicUsize>,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.taken.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }
}

/// A valid store path `/nix/store/<hash>-<name>` whose hash encodes `i`.
fn numbered_path(i: u64, name: &str) -> StorePath {
    const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut hash = [b'0'; 32];
    let mut v = i;
    for c in hash.iter_mut().rev() {
        *c = NIX32[(v % 32) as usize];
        v /= 32;
    }
    let hash = String::from_utf8(hash.to_vec()).unwrap();
    StorePath::parse(&format!("/nix/store/{hash}-{name}")).unwrap()
}

#[test]
fn a_set_of_big_entries_is_read_at_most_a_batch_of_bytes_ahead() {
    // 800 entries of ~12 KiB (300 references each): ~10 MiB, more than
    // twice what the reader may parse before handing entries out.
    let key = SecretKey::generate("big-1").unwrap();
    let refs: std::collections::BTreeSet<StorePath> = (0..300)
        .map(|i| numbered_path(1_000_000 + i, "ref"))
        .collect();
    let mut builder = MappingSetBuilder::first(SetKind::Anchor, "big".parse().unwrap());
    for i in 0..800 {
        let path = numbered_path(i, "big");
        let mapping = MappingData {
            nar_hash: NarHash::digest(path.to_string().as_bytes()),
            path,
            nar_size: 1,
            references: refs.clone(),
            deriver: None,
            ca: None,
            cid: ContentId::parse("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")
                .unwrap(),
            profile: anchor_registry::ImportProfile::unixfs_v1_2025(),
        }
        .sign(&key);
        builder.insert(mapping);
    }
    let mut set = Vec::new();
    builder
        .write(&key, 1, u64::from(u32::MAX), &mut set)
        .unwrap();
    let line = set.len() / 801;
    assert!(set.len() > 2 * MAX_BATCH_BYTES, "{} bytes", set.len());

    let taken = Arc::new(AtomicUsize::new(0));
    let buffer = 64 << 10;
    let counting = Counting {
        inner: &set,
        taken: taken.clone(),
    };
    let mut reader = SetReader::open(BufReader::with_capacity(buffer, counting)).unwrap();
    assert!(reader.next_entry().unwrap().is_some());
    let ahead = taken.load(Ordering::Relaxed);
    assert!(
        ahead <= MAX_BATCH_BYTES + 2 * line + buffer,
        "read {ahead} bytes of a {} byte set before the first entry",
        set.len()
    );
    let mut count = 1;
    while reader.next_entry().unwrap().is_some() {
        count += 1;
    }
    assert_eq!(count, 800);
}

/// `n` anchors named `a00000`…, each with its own key.
fn numbered_anchors(n: usize) -> Vec<Anchor> {
    (0..n)
        .map(|i| Anchor {
            key: SecretKey::generate(&format!("a{i:05}-1")).unwrap().public(),
            name: format!("a{i:05}").parse().unwrap(),
            note: None,
            sources: Vec::new(),
        })
        .collect()
}

/// A signed registry's text with `anchors` in that order, built as JSON:
/// `add_anchor` checks each new anchor against all the others, too slow for
/// tens of thousands (the signature no longer matches; parsing does not
/// check it).
fn registry_text(anchors: &[Anchor]) -> String {
    let root = SecretKey::generate("root-1").unwrap();
    let mut registry = Registry::init(vec![root.public()], 1, u64::from(u32::MAX)).unwrap();
    registry.add_anchor(anchors[0].clone()).unwrap();
    registry.sign(&root);
    let mut json: serde_json::Value = serde_json::from_str(&registry.render()).unwrap();
    let template = json["signed"]["anchors"][0].clone();
    let list: Vec<serde_json::Value> = anchors
        .iter()
        .map(|a| {
            let mut v = template.clone();
            v["key"] = serde_json::Value::String(a.key.to_string());
            v["name"] = serde_json::Value::String(a.name.to_string());
            v
        })
        .collect();
    json["signed"]["anchors"] = serde_json::Value::Array(list);
    serde_json::to_string(&json).unwrap()
}

#[test]
fn a_registry_of_50000_anchors_is_checked_and_a_reused_key_at_its_end_refused() {
    // Checked pairwise, this is 1.25e9 key comparisons (tens of seconds);
    // with one lookup per anchor, well under a second.
    let mut anchors = numbered_anchors(50_000);
    let registry = Registry::parse(&registry_text(&anchors)).unwrap();
    assert_eq!(registry.anchors().len(), anchors.len());

    // The last anchor reuses the first one's key bytes under a new key name.
    let first = anchors[0].key.to_string();
    let bytes = first.split_once(':').unwrap().1;
    anchors.push(Anchor {
        key: PublicKey::parse(&format!("zz-1:{bytes}")).unwrap(),
        name: "zz".parse().unwrap(),
        note: None,
        sources: Vec::new(),
    });
    match Registry::parse(&registry_text(&anchors)) {
        Err(RegistryError::DuplicateAnchorKey { name, other, .. }) => {
            assert_eq!(name.to_string(), "zz");
            assert_eq!(other.to_string(), "a00000");
        }
        other => panic!("expected DuplicateAnchorKey, got {other:?}"),
    }
}
