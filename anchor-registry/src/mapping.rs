//! One signed assertion about one store path: what its NAR is (NarHash, NarSize,
//! References, Deriver, CA) and where its bytes live (CID + import profile),
//! with the signer's Nix signature over Nix's fingerprint. Owns the canonical
//! one-line JSON form that mapping sets are made of.
//!
//! The Nix signature covers only what Nix signs (path, NarHash, NarSize,
//! References), so it passes straight through to narinfo `Sig:` lines. The CID,
//! profile, Deriver and CA are bound by the mapping set's header signature.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::canonical::{self, MAX_SAFE_INTEGER};
use crate::content_id::{ContentId, ImportProfile};
use crate::hash::NarHash;
use crate::keys::{fingerprint, PublicKey, SecretKey, Signature};
use crate::store_path::{excerpt, serde_as_string, StorePath};

/// Longest content-address string accepted (Nix's are under 80 chars).
const MAX_CA_LEN: usize = 256;

/// Why a mapping was refused; each names the store path or the offending text.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MappingError {
    #[error("mapping is not valid JSON of the entry schema: {reason}")]
    Json { reason: String },
    #[error("mapping of {path} is not in canonical form (fields, order, spacing or encodings differ from its rendering)")]
    NotCanonical { path: String },
    #[error("mapping of {path}: NarSize {nar_size} exceeds {MAX_SAFE_INTEGER}, the largest size canonical JSON carries exactly")]
    SizeTooLarge { path: String, nar_size: u64 },
    #[error("mapping of {path}: signature by key `{signer}` does not verify under key `{key}`")]
    BadSignature {
        path: String,
        signer: String,
        key: String,
    },
    #[error("content address `{input}` must be `fixed:…` or `text:…`, 1-{MAX_CA_LEN} chars of [A-Za-z0-9:+/=_-]")]
    InvalidContentAddress { input: String },
}

/// A Nix content address (`fixed:r:sha256:…`, `text:sha256:…`), kept verbatim
/// as narinfo `CA:` carries it. Restricted to the characters Nix uses, so it
/// never needs escaping in JSON.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContentAddress(String);

impl ContentAddress {
    pub fn parse(s: &str) -> Result<Self, MappingError> {
        let charset_ok = s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":+/=_-".contains(&b));
        let valid = s.len() <= MAX_CA_LEN
            && charset_ok
            && (s.starts_with("fixed:") || s.starts_with("text:"));
        if !valid {
            return Err(MappingError::InvalidContentAddress { input: excerpt(s) });
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentAddress({})", self.0)
    }
}

impl FromStr for ContentAddress {
    type Err = MappingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

serde_as_string!(ContentAddress, "a Nix content address fixed:… or text:…");

/// What a mapping asserts, before anyone signs it. References are a set, so
/// they are always in Nix's order and unique, as the fingerprint needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappingData {
    pub path: StorePath,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    pub ca: Option<ContentAddress>,
    pub cid: ContentId,
    pub profile: ImportProfile,
}

impl MappingData {
    /// Nix's fingerprint `1;<path>;<NarHash>;<NarSize>;<refs>`: what the
    /// signature covers, and what anchors must agree on.
    pub fn fingerprint(&self) -> String {
        let refs: Vec<StorePath> = self.references.iter().cloned().collect();
        fingerprint(&self.path, &self.nar_hash, self.nar_size, &refs)
    }

    /// Signs the fingerprint, exactly as Nix signs a narinfo.
    pub fn sign(self, key: &SecretKey) -> Mapping {
        let signature = key.sign(self.fingerprint().as_bytes());
        Mapping {
            data: self,
            signature,
        }
    }
}

/// A mapping with a Nix signature. Holding one proves nothing until
/// [`Mapping::verify`] passes under a key the caller trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    data: MappingData,
    signature: Signature,
}

impl Mapping {
    /// Pairs data with a signature made elsewhere (a narinfo `Sig:`, the index),
    /// unchecked: call [`Mapping::verify`] before relying on it.
    pub fn new(data: MappingData, signature: Signature) -> Self {
        Self { data, signature }
    }

    pub fn data(&self) -> &MappingData {
        &self.data
    }

    pub fn into_data(self) -> MappingData {
        self.data
    }

    pub fn path(&self) -> &StorePath {
        &self.data.path
    }

    pub fn nar_hash(&self) -> &NarHash {
        &self.data.nar_hash
    }

    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    pub fn fingerprint(&self) -> String {
        self.data.fingerprint()
    }

    /// Checks the Nix signature over the fingerprint under `key` (the key name
    /// must match the signature's, as Nix requires).
    pub fn verify(&self, key: &PublicKey) -> Result<(), MappingError> {
        if key.verify(self.fingerprint().as_bytes(), &self.signature) {
            Ok(())
        } else {
            Err(MappingError::BadSignature {
                path: self.data.path.to_string(),
                signer: self.signature.name().to_owned(),
                key: key.name().to_owned(),
            })
        }
    }

    /// Appends the canonical JSON line body (no newline) to `out`.
    pub fn write_canonical(&self, out: &mut Vec<u8>) {
        canonical::write(out, &WireOut::from(self));
    }

    /// The canonical JSON object, e.g. for exporting conflict evidence.
    pub fn to_canonical_string(&self) -> String {
        canonical::to_string(&WireOut::from(self))
    }

    /// Reads a mapping that must be byte-for-byte its own canonical rendering:
    /// no extra fields or spaces, no alternative hash or CID encodings, sorted
    /// references. `scratch` is reused for the comparison to spare allocations.
    pub fn parse_canonical(line: &[u8], scratch: &mut Vec<u8>) -> Result<Self, MappingError> {
        let mapping: Mapping = serde_json::from_slice::<WireIn>(line)
            .map_err(|err| MappingError::Json {
                reason: err.to_string(),
            })?
            .into();
        if mapping.data.nar_size > MAX_SAFE_INTEGER {
            return Err(MappingError::SizeTooLarge {
                path: mapping.data.path.to_string(),
                nar_size: mapping.data.nar_size,
            });
        }
        scratch.clear();
        mapping.write_canonical(scratch);
        if scratch.as_slice() != line {
            return Err(MappingError::NotCanonical {
                path: mapping.data.path.to_string(),
            });
        }
        Ok(mapping)
    }
}

impl Serialize for Mapping {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        WireOut::from(self).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Mapping {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        WireIn::deserialize(deserializer).map(Mapping::from)
    }
}

/// A store path written as its base name, as narinfo `References:` and
/// `Deriver:` do: shorter lines, and the form gateways copy into narinfos.
struct BaseName(StorePath);

impl<'de> Deserialize<'de> for BaseName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = BaseName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a store path base name <hash>-<name>")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<BaseName, E> {
                StorePath::from_base_name(s)
                    .map(BaseName)
                    .map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// Borrowed view rendered as the canonical entry. Field order is sorted, which
/// makes serde_json's output the RFC 8785 form (see [`crate::canonical`]).
#[derive(Serialize)]
struct WireOut<'a> {
    ca: Option<&'a ContentAddress>,
    cid: &'a ContentId,
    deriver: Option<BaseNameRef<'a>>,
    #[serde(rename = "narHash")]
    nar_hash: &'a NarHash,
    #[serde(rename = "narSize")]
    nar_size: u64,
    path: &'a StorePath,
    profile: &'a ImportProfile,
    references: Vec<BaseNameRef<'a>>,
    sig: &'a Signature,
}

struct BaseNameRef<'a>(&'a StorePath);

impl Serialize for BaseNameRef<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{}-{}", self.0.hash(), self.0.name()))
    }
}

impl<'a> From<&'a Mapping> for WireOut<'a> {
    fn from(m: &'a Mapping) -> Self {
        let d = &m.data;
        WireOut {
            ca: d.ca.as_ref(),
            cid: &d.cid,
            deriver: d.deriver.as_ref().map(BaseNameRef),
            nar_hash: &d.nar_hash,
            nar_size: d.nar_size,
            path: &d.path,
            profile: &d.profile,
            references: d.references.iter().map(BaseNameRef).collect(),
            sig: &m.signature,
        }
    }
}

/// The entry schema as read; anything it does not name is refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireIn {
    ca: Option<ContentAddress>,
    cid: ContentId,
    deriver: Option<BaseName>,
    #[serde(rename = "narHash")]
    nar_hash: NarHash,
    #[serde(rename = "narSize")]
    nar_size: u64,
    path: StorePath,
    profile: ImportProfile,
    references: Vec<BaseName>,
    sig: Signature,
}

impl From<WireIn> for Mapping {
    fn from(w: WireIn) -> Self {
        Mapping {
            data: MappingData {
                path: w.path,
                nar_hash: w.nar_hash,
                nar_size: w.nar_size,
                references: w.references.into_iter().map(|r| r.0).collect(),
                deriver: w.deriver.map(|d| d.0),
                ca: w.ca,
                cid: w.cid,
                profile: w.profile,
            },
            signature: w.sig,
        }
    }
}

/// Builders of valid mappings for this crate's tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::hash::Sha256Hash;
    use crate::store_path::StorePathHash;

    /// A store path whose hash part is derived from `seed`.
    pub fn store_path(seed: u64, name: &str) -> StorePath {
        let digest = Sha256Hash::digest(&seed.to_le_bytes());
        let mut d20 = [0u8; 20];
        d20.copy_from_slice(&digest.as_bytes()[..20]);
        StorePath::from_parts(StorePathHash::from_digest(d20), name).expect("valid name")
    }

    /// A CIDv1 raw-leaf CID of `bytes`.
    pub fn cid_of(bytes: &[u8]) -> ContentId {
        let digest = Sha256Hash::digest(bytes);
        let hash =
            cid::multihash::Multihash::<64>::wrap(0x12, digest.as_bytes()).expect("32 bytes fit");
        ContentId::from_cid(cid::Cid::new_v1(0x55, hash))
    }

    /// Mapping data for path `seed` with a NAR made of `nar`.
    pub fn data(seed: u64, nar: &[u8]) -> MappingData {
        MappingData {
            path: store_path(seed, "hello-2.12"),
            nar_hash: Sha256Hash::digest(nar),
            nar_size: nar.len() as u64,
            references: [
                store_path(seed, "hello-2.12"),
                store_path(seed + 1_000_000, "glibc-2.40"),
            ]
            .into_iter()
            .collect(),
            deriver: Some(store_path(seed + 2_000_000, "hello-2.12.drv")),
            ca: None,
            cid: cid_of(nar),
            profile: ImportProfile::unixfs_v1_2025(),
        }
    }

    pub fn key(name: &str) -> SecretKey {
        SecretKey::generate(name).expect("valid key name")
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use proptest::prelude::*;

    fn canonical_bytes(m: &Mapping) -> Vec<u8> {
        let mut out = Vec::new();
        m.write_canonical(&mut out);
        out
    }

    #[test]
    fn signed_mapping_verifies_under_its_key_only() {
        let anchor = key("anchor-1");
        let other = key("anchor-1");
        let m = data(1, b"nar").sign(&anchor);
        assert_eq!(m.verify(&anchor.public()), Ok(()));
        assert!(matches!(
            m.verify(&other.public()),
            Err(MappingError::BadSignature { .. })
        ));
    }

    #[test]
    fn signature_covers_nix_fingerprint_not_cid() {
        let anchor = key("anchor-1");
        let m = data(1, b"nar").sign(&anchor);
        let mut moved = m.data().clone();
        moved.cid = cid_of(b"elsewhere");
        assert_eq!(
            Mapping::new(moved, m.signature().clone()).verify(&anchor.public()),
            Ok(())
        );
        let mut lied = m.data().clone();
        lied.nar_size += 1;
        assert!(Mapping::new(lied, m.signature().clone())
            .verify(&anchor.public())
            .is_err());
    }

    #[test]
    fn fingerprint_is_nix_format_with_full_reference_paths() {
        let d = data(7, b"x");
        let fp = d.fingerprint();
        let refs: Vec<String> = d.references.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            fp,
            format!("1;{};{};1;{}", d.path, d.nar_hash, refs.join(","))
        );
    }

    #[test]
    fn canonical_form_has_sorted_fields_base_names_and_no_spaces() {
        let m = data(3, b"nar").sign(&key("a-1"));
        let s = m.to_canonical_string();
        assert!(s.starts_with("{\"ca\":null,\"cid\":\"bafk"), "{s}");
        assert!(!s.contains(' '));
        assert!(s.contains(&format!("\"path\":\"{}\"", m.path())));
        assert!(s.contains(&format!(
            "\"deriver\":\"{}\"",
            m.data().deriver.as_ref().expect("set").base_name()
        )));
    }

    #[test]
    fn rejects_non_canonical_spellings() {
        let m = data(3, b"nar").sign(&key("a-1"));
        let s = m.to_canonical_string();
        let hex_hash = s.replace(
            &m.nar_hash().to_string(),
            &format!("sha256:{}", m.nar_hash().to_hex()),
        );
        let spaced = s.replacen(':', ": ", 1);
        let extra = s.replacen('{', "{\"extra\":1,", 1);
        let missing_ca = s.replacen("\"ca\":null,", "", 1);
        let full_deriver = s.replacen("\"deriver\":\"", "\"deriver\":\"/nix/store/", 1);
        let mut scratch = Vec::new();
        for bad in [hex_hash, spaced, extra, missing_ca, full_deriver] {
            assert!(
                Mapping::parse_canonical(bad.as_bytes(), &mut scratch).is_err(),
                "accepted {bad}"
            );
        }
    }

    #[test]
    fn rejects_unsorted_references() {
        let m = data(3, b"nar").sign(&key("a-1"));
        let refs: Vec<String> = m
            .data()
            .references
            .iter()
            .map(|r| format!("\"{}\"", r.base_name()))
            .collect();
        let mut reversed = refs.clone();
        reversed.reverse();
        let s = m
            .to_canonical_string()
            .replace(&refs.join(","), &reversed.join(","));
        assert!(matches!(
            Mapping::parse_canonical(s.as_bytes(), &mut Vec::new()),
            Err(MappingError::NotCanonical { .. })
        ));
    }

    #[test]
    fn rejects_size_beyond_safe_integer() {
        let mut d = data(3, b"nar");
        d.nar_size = MAX_SAFE_INTEGER + 1;
        let m = d.sign(&key("a-1"));
        assert!(matches!(
            Mapping::parse_canonical(&canonical_bytes(&m), &mut Vec::new()),
            Err(MappingError::SizeTooLarge { .. })
        ));
    }

    #[test]
    fn content_address_accepts_nix_forms_only() {
        assert!(ContentAddress::parse(
            "fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
        )
        .is_ok());
        assert!(ContentAddress::parse(
            "text:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
        )
        .is_ok());
        assert!(ContentAddress::parse("sha256:abc").is_err());
        assert!(ContentAddress::parse("fixed:\"quoted\"").is_err());
    }

    proptest! {
        #[test]
        fn canonical_render_parse_round_trip(
            seed in 0u64..1_000_000,
            nar in proptest::collection::vec(any::<u8>(), 0..64),
            with_ca in any::<bool>(),
            with_deriver in any::<bool>(),
            extra_refs in proptest::collection::vec(0u64..50, 0..6),
        ) {
            let mut d = data(seed, &nar);
            if with_ca {
                d.ca = Some(ContentAddress::parse(&format!("fixed:r:{}", d.nar_hash)).expect("valid"));
            }
            if !with_deriver {
                d.deriver = None;
            }
            d.references.extend(extra_refs.iter().map(|r| store_path(*r, "dep")));
            let m = d.sign(&key("anchor-1"));
            let bytes = canonical_bytes(&m);
            let back = Mapping::parse_canonical(&bytes, &mut Vec::new());
            prop_assert_eq!(back.as_ref(), Ok(&m));
            let json = serde_json::to_string(&m).expect("serialises");
            prop_assert_eq!(serde_json::from_str::<Mapping>(&json).ok(), Some(m));
        }
    }
}
