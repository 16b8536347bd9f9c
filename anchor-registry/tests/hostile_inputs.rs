//! 100,000 random, truncated and mutated inputs to every parser of untrusted
//! text: each must return an error or a value, never panic.

// Test fixtures built from constants: a failure is a bug in the test itself.
#![allow(clippy::unwrap_used)]

use anchor_registry::{
    read_set, CacheInfo, ContentId, MappingData, MappingSetBuilder, NarHash, NarInfo, PublicKey,
    Registry, SecretKey, SetKind, Signature, SignedHeader, StorePath,
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
