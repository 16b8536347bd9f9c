//! Nix store paths (`/nix/store/<hash>-<name>`) and their 32-char hash part.
//! Parsing applies Nix's own rules once, so every `StorePath` downstream is one
//! Nix would accept, and ordering matches Nix's `StorePathSet`.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// The only store directory nixpfs serves: NAR contents embed it, so paths from
/// another store dir are different paths, not a spelling variant.
pub const STORE_DIR: &str = "/nix/store";

/// Length of the hash part of a store path (160 bits in Nix base32).
pub const HASH_PART_LEN: usize = 32;

/// Longest store path name Nix accepts.
pub const MAX_NAME_LEN: usize = 211;

/// Nix's base32 alphabet: digits and lowercase letters without `e`, `o`, `u`, `t`.
pub const NIX32_ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Value of each byte as a Nix base32 digit, `INVALID` for bytes outside the alphabet.
const NIX32_VALUES: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < NIX32_ALPHABET.len() {
        table[NIX32_ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};
const INVALID: u8 = 0xff;

/// Offending input is echoed in errors, but cut short: it may be a whole
/// untrusted request body.
const EXCERPT_CHARS: usize = 80;

/// `s` as shown in an error message: at most [`EXCERPT_CHARS`] chars, then `…`.
pub(crate) fn excerpt(s: &str) -> String {
    match s.char_indices().nth(EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

/// Why a string is not a store path (or hash part); each names the input and
/// what Nix expects instead.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StorePathError {
    #[error("`{path}` is not in {STORE_DIR}: expected {STORE_DIR}/<hash>-<name>")]
    NotInStore { path: String },
    #[error(
        "`{path}` has components after the store path: expected {STORE_DIR}/<hash>-<name> only"
    )]
    TrailingComponents { path: String },
    #[error("hash part `{hash}` is {len} chars: expected {HASH_PART_LEN} chars of Nix base32")]
    HashLength { hash: String, len: usize },
    #[error("hash part `{hash}` contains {ch:?}: expected only Nix base32 chars 0123456789abcdfghijklmnpqrsvwxyz")]
    HashChar { hash: String, ch: char },
    #[error("store path base name `{base}` lacks '-' after its {HASH_PART_LEN}-char hash part: expected <hash>-<name>")]
    MissingDash { base: String },
    #[error("store path base name `{base}` has an empty name: expected 1 to {MAX_NAME_LEN} chars after <hash>-")]
    EmptyName { base: String },
    #[error("store path name `{name}` is {len} chars: expected at most {MAX_NAME_LEN}")]
    NameTooLong { name: String, len: usize },
    #[error("store path name `{name}` starts with '.': Nix names must not")]
    NameLeadingDot { name: String },
    #[error("store path name `{name}` contains {ch:?}: expected only A-Z a-z 0-9 + - . _ ? =")]
    NameChar { name: String, ch: char },
}

/// The hash part of a store path: 32 chars of Nix base32, kept as ASCII so the
/// derived `Ord` is the order of the rendered hash part (Nix's order).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePathHash([u8; HASH_PART_LEN]);

impl StorePathHash {
    /// Accepts exactly 32 chars of the Nix base32 alphabet.
    pub fn parse(s: &str) -> Result<Self, StorePathError> {
        let length_error = || StorePathError::HashLength {
            hash: excerpt(s),
            len: s.chars().count(),
        };
        if s.chars().count() != HASH_PART_LEN {
            return Err(length_error());
        }
        if let Some(ch) = s
            .chars()
            .find(|&c| !c.is_ascii() || NIX32_VALUES[c as usize] == INVALID)
        {
            return Err(StorePathError::HashChar {
                hash: excerpt(s),
                ch,
            });
        }
        // All ASCII now, so 32 chars are 32 bytes.
        let hash = <[u8; HASH_PART_LEN]>::try_from(s.as_bytes()).map_err(|_| length_error())?;
        Ok(Self(hash))
    }

    /// The hash part of the store path whose 160-bit digest is `digest` (how Nix
    /// derives it from its truncated sha256).
    pub fn from_digest(digest: [u8; 20]) -> Self {
        let mut hash = [0u8; HASH_PART_LEN];
        // Nix base32 writes the most significant 5-bit group first; group n
        // covers bits 5n..5n+5 of the little-endian digest.
        for (out, n) in hash.iter_mut().zip((0..HASH_PART_LEN).rev()) {
            let bit = n * 5;
            let (i, j) = (bit / 8, bit % 8);
            let low = digest[i] >> j;
            let high = match digest.get(i + 1) {
                Some(next) if j > 3 => next << (8 - j),
                _ => 0,
            };
            *out = NIX32_ALPHABET[usize::from((low | high) & 0x1f)];
        }
        Self(hash)
    }

    pub fn as_str(&self) -> &str {
        // Only ever built from Nix base32 ASCII, so always valid UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The 160-bit digest this hash part encodes (inverse of [`Self::from_digest`]).
    pub fn to_digest(&self) -> [u8; 20] {
        let mut digest = [0u8; 20];
        for (n, &c) in self.0.iter().rev().enumerate() {
            let value = u16::from(NIX32_VALUES[usize::from(c)] & 0x1f);
            let bit = n * 5;
            let (i, j) = (bit / 8, bit % 8);
            let shifted = value << j;
            digest[i] |= (shifted & 0xff) as u8;
            if let Some(next) = digest.get_mut(i + 1) {
                *next |= (shifted >> 8) as u8;
            }
        }
        digest
    }
}

impl fmt::Display for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePathHash({})", self.as_str())
    }
}

impl FromStr for StorePathHash {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A store path as Nix accepts it. The derived `Ord` (hash part, then name)
/// equals Nix's set order, which compares base names as strings.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath {
    hash: StorePathHash,
    name: String,
}

impl StorePath {
    /// Parses `/nix/store/<hash>-<name>`, with nothing after the name.
    pub fn parse(full_path: &str) -> Result<Self, StorePathError> {
        let base = full_path
            .strip_prefix(STORE_DIR)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore {
                path: excerpt(full_path),
            })?;
        if base.contains('/') {
            return Err(StorePathError::TrailingComponents {
                path: excerpt(full_path),
            });
        }
        Self::from_base_name(base)
    }

    /// Parses `<hash>-<name>`, the form narinfo `References:` and `Deriver:` use.
    pub fn from_base_name(base: &str) -> Result<Self, StorePathError> {
        // Nix base32 has no '-', so the hash part is everything before the first
        // '-'; judging it alone makes the error name the real fault.
        let (hash, name) = match base.split_once('-') {
            Some((hash, name)) => (hash, Some(name)),
            None => (base, None),
        };
        let hash = StorePathHash::parse(hash)?;
        let name = name.ok_or_else(|| StorePathError::MissingDash {
            base: excerpt(base),
        })?;
        check_name(name, base)?;
        Ok(Self {
            hash,
            name: name.to_owned(),
        })
    }

    /// Builds a store path from parts, checking the name as [`Self::parse`] does.
    pub fn from_parts(hash: StorePathHash, name: &str) -> Result<Self, StorePathError> {
        check_name(name, &format!("{hash}-{name}"))?;
        Ok(Self {
            hash,
            name: name.to_owned(),
        })
    }

    pub fn hash(&self) -> &StorePathHash {
        &self.hash
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<hash>-<name>`, without the store directory.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash, self.name)
    }
}

/// Nix's name rule: 1..=211 chars of `[A-Za-z0-9+-._?=]`, not starting with '.'.
fn check_name(name: &str, base: &str) -> Result<(), StorePathError> {
    if name.is_empty() {
        return Err(StorePathError::EmptyName {
            base: excerpt(base),
        });
    }
    if let Some(ch) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "+-._?=".contains(c)))
    {
        return Err(StorePathError::NameChar {
            name: excerpt(name),
            ch,
        });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong {
            name: excerpt(name),
            len: name.len(),
        });
    }
    if name.starts_with('.') {
        return Err(StorePathError::NameLeadingDot {
            name: excerpt(name),
        });
    }
    Ok(())
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}-{}", self.hash, self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

impl FromStr for StorePath {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Implements serde for a type as its `Display` string, read back with `FromStr`,
/// so JSON carries the same text Nix and users see.
macro_rules! serde_as_string {
    ($ty:ty, $expecting:literal) => {
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl serde::de::Visitor<'_> for Visitor {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<$ty, E> {
                        s.parse().map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(Visitor)
            }
        }
    };
}
pub(crate) use serde_as_string;

serde_as_string!(StorePathHash, "a 32-char Nix base32 store path hash");
serde_as_string!(StorePath, "a store path /nix/store/<hash>-<name>");

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HASH: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";

    fn hash_strategy() -> impl Strategy<Value = StorePathHash> {
        any::<[u8; 20]>().prop_map(StorePathHash::from_digest)
    }

    fn name_strategy() -> impl Strategy<Value = String> {
        "[A-Za-z0-9+_?=-][A-Za-z0-9+._?=-]{0,210}"
    }

    #[test]
    fn parses_a_real_store_path() {
        let p = StorePath::parse(&format!("/nix/store/{HASH}-hello-2.12.1")).unwrap();
        assert_eq!(p.hash().as_str(), HASH);
        assert_eq!(p.name(), "hello-2.12.1");
        assert_eq!(p.base_name(), format!("{HASH}-hello-2.12.1"));
        assert_eq!(p.to_string(), format!("/nix/store/{HASH}-hello-2.12.1"));
    }

    #[test]
    fn accepts_every_allowed_name_char() {
        let name = "AZaz09+-._?=";
        assert!(StorePath::from_base_name(&format!("{HASH}-{name}")).is_ok());
    }

    #[test]
    fn rejects_paths_outside_the_store() {
        for p in [
            format!("/nix/stor/{HASH}-a"),
            format!("/nix/storex/{HASH}-a"),
            format!("nix/store/{HASH}-a"),
            format!("{HASH}-a"),
            String::new(),
        ] {
            assert!(
                matches!(StorePath::parse(&p), Err(StorePathError::NotInStore { .. })),
                "{p}"
            );
        }
    }

    #[test]
    fn rejects_trailing_components() {
        for p in [
            format!("/nix/store/{HASH}-a/bin/x"),
            format!("/nix/store/{HASH}-a/"),
        ] {
            assert!(matches!(
                StorePath::parse(&p),
                Err(StorePathError::TrailingComponents { .. })
            ));
        }
    }

    #[test]
    fn rejects_wrong_hash_length() {
        let short = &HASH[..31];
        assert!(matches!(
            StorePath::from_base_name(&format!("{short}-a")),
            Err(StorePathError::HashLength { len: 31, .. })
        ));
        assert!(matches!(
            StorePath::from_base_name("abc"),
            Err(StorePathError::HashLength { len: 3, .. })
        ));
        assert!(matches!(
            StorePathHash::parse(&format!("{HASH}0")),
            Err(StorePathError::HashLength { len: 33, .. })
        ));
    }

    #[test]
    fn rejects_hash_chars_outside_nix32() {
        for bad in ['e', 'o', 'u', 't', 'A', '_', 'é'] {
            let hash: String = std::iter::once(bad).chain(HASH.chars().skip(1)).collect();
            let err = StorePath::from_base_name(&format!("{hash}-a")).unwrap_err();
            assert_eq!(
                err,
                StorePathError::HashChar {
                    hash: hash.clone(),
                    ch: bad
                }
            );
        }
    }

    #[test]
    fn rejects_missing_dash_and_empty_name() {
        assert!(matches!(
            StorePath::from_base_name(&format!("{HASH}_a")),
            Err(StorePathError::HashLength { len: 34, .. })
        ));
        assert!(matches!(
            StorePath::from_base_name(HASH),
            Err(StorePathError::MissingDash { .. })
        ));
        assert!(matches!(
            StorePath::from_base_name(&format!("{HASH}-")),
            Err(StorePathError::EmptyName { .. })
        ));
    }

    #[test]
    fn rejects_bad_name_chars() {
        for bad in ['/', ' ', '@', '~', '\n', '\0', 'ü', ':'] {
            let err = StorePath::from_base_name(&format!("{HASH}-a{bad}b")).unwrap_err();
            assert_eq!(
                err,
                StorePathError::NameChar {
                    name: format!("a{bad}b"),
                    ch: bad
                }
            );
        }
    }

    #[test]
    fn name_length_limit_is_211() {
        let ok = "a".repeat(211);
        assert!(StorePath::from_base_name(&format!("{HASH}-{ok}")).is_ok());
        let long = "a".repeat(212);
        assert!(matches!(
            StorePath::from_base_name(&format!("{HASH}-{long}")),
            Err(StorePathError::NameTooLong { len: 212, .. })
        ));
    }

    #[test]
    fn rejects_leading_dot() {
        for name in [".", "..", ".a", "..-x"] {
            assert!(matches!(
                StorePath::from_base_name(&format!("{HASH}-{name}")),
                Err(StorePathError::NameLeadingDot { .. })
            ));
        }
        assert!(StorePath::from_base_name(&format!("{HASH}-a.")).is_ok());
    }

    #[test]
    fn errors_cut_long_input_short() {
        let long = format!("/x/{}", "a".repeat(10_000));
        let msg = StorePath::parse(&long).unwrap_err().to_string();
        assert!(msg.len() < 300, "{msg}");
    }

    #[test]
    fn digest_matches_nix_base32_crate() {
        // nix-hash --type sha1 --to-base32 1f74d74729abdc08f4f84e8f7f8c808c8ed92ee5
        let digest: [u8; 20] = hex::decode("1f74d74729abdc08f4f84e8f7f8c808c8ed92ee5")
            .unwrap()
            .try_into()
            .unwrap();
        let hash = StorePathHash::from_digest(digest);
        assert_eq!(hash.as_str(), "wlpdk3lch267z3sfz3s0ip5b553xfx0z");
        assert_eq!(hash.to_digest(), digest);
    }

    #[test]
    fn order_is_base_name_string_order() {
        let a = StorePath::from_base_name(&format!("{HASH}-a")).unwrap();
        let b = StorePath::from_base_name(&format!("{HASH}-a-b")).unwrap();
        let c = StorePath::from_base_name(&format!("1{}-a", &HASH[1..])).unwrap();
        let mut v = vec![c.clone(), b.clone(), a.clone()];
        v.sort();
        assert_eq!(v, vec![a, b, c]);
    }

    #[test]
    fn serde_uses_the_full_path_string() {
        let p = StorePath::from_base_name(&format!("{HASH}-x")).unwrap();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, format!("\"/nix/store/{HASH}-x\""));
        assert_eq!(serde_json::from_str::<StorePath>(&json).unwrap(), p);
        assert!(serde_json::from_str::<StorePath>("\"/nix/store/x\"").is_err());
        let h: StorePathHash = serde_json::from_str(&format!("\"{HASH}\"")).unwrap();
        assert_eq!(serde_json::to_string(&h).unwrap(), format!("\"{HASH}\""));
    }

    proptest! {
        #[test]
        fn store_path_round_trips(hash in hash_strategy(), name in name_strategy()) {
            let path = StorePath::from_parts(hash, &name).unwrap();
            let text = path.to_string();
            prop_assert_eq!(StorePath::parse(&text).unwrap(), path.clone());
            prop_assert_eq!(text.parse::<StorePath>().unwrap(), path.clone());
            prop_assert_eq!(StorePath::from_base_name(&path.base_name()).unwrap(), path);
        }

        #[test]
        fn digest_round_trips_and_agrees_with_nix_base32(digest in any::<[u8; 20]>()) {
            let hash = StorePathHash::from_digest(digest);
            prop_assert_eq!(hash.as_str(), nix_base32::to_nix_base32(&digest));
            prop_assert_eq!(hash.to_digest(), digest);
            prop_assert_eq!(StorePathHash::parse(hash.as_str()).unwrap(), hash);
        }

        #[test]
        fn order_matches_base_name_order(
            a in (hash_strategy(), name_strategy()),
            b in (hash_strategy(), name_strategy()),
        ) {
            let a = StorePath::from_parts(a.0, &a.1).unwrap();
            let b = StorePath::from_parts(b.0, &b.1).unwrap();
            prop_assert_eq!(a.cmp(&b), a.base_name().cmp(&b.base_name()));
        }

        #[test]
        fn parse_never_panics(s in "\\PC*") {
            let _ = StorePath::parse(&s);
            let _ = StorePath::from_base_name(&s);
            let _ = StorePathHash::parse(&s);
            let _ = StorePath::parse(&format!("/nix/store/{s}"));
        }
    }
}
