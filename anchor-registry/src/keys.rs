//! Ed25519 keys and signatures in Nix's own text format (`name:base64`), and the
//! fingerprint Nix signs for a store path. Keys made by
//! `nix-store --generate-binary-cache-key` work here, and Nix checks ours.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use rand_core::{OsRng, RngCore as _};
use thiserror::Error;

use crate::hash::{NarHash, BASE64_LENIENT};
use crate::store_path::{excerpt, serde_as_string, StorePath};

const SEED_LEN: usize = 32;
const PUBLIC_LEN: usize = 32;
const SECRET_LEN: usize = SEED_LEN + PUBLIC_LEN;
const SIGNATURE_LEN: usize = 64;

/// Why a key or signature was refused. Secret material is never echoed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    #[error("{what} `{input}` lacks ':': expected `<name>:<base64>`")]
    MissingColon { what: &'static str, input: String },
    #[error("secret key lacks ':' (input not shown, it may be secret): expected `<name>:<base64 of 64 bytes>`")]
    SecretMissingColon,
    #[error("key name `{name}` is invalid: expected a non-empty name without ':' or whitespace")]
    InvalidName { name: String },
    #[error("{what} `{name}` is not valid base64: {reason}")]
    Base64 {
        what: &'static str,
        name: String,
        reason: String,
    },
    #[error("{what} `{name}` holds {len} bytes: expected {expected}")]
    Length {
        what: &'static str,
        name: String,
        len: usize,
        expected: usize,
    },
    #[error("{what} `{name}` has {chars} base64 chars: expected at most {max}")]
    TooLong {
        what: &'static str,
        name: String,
        chars: usize,
        max: usize,
    },
    #[error("secret key `{name}`: its public half does not match its seed")]
    PublicHalfMismatch { name: String },
    #[error("public key `{name}` is not a valid ed25519 point")]
    InvalidPoint { name: String },
    #[error("cannot read OS randomness for key `{name}`: {reason}")]
    Randomness { name: String, reason: String },
}

/// Key names end up in `Sig:` lines and `trusted-public-keys`, which split on
/// ':' and whitespace.
fn check_name(name: &str) -> Result<(), KeyError> {
    if name.is_empty()
        || name
            .chars()
            .any(|c| c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(KeyError::InvalidName {
            name: excerpt(name),
        });
    }
    Ok(())
}

/// Splits `name:base64` and decodes exactly `N` bytes.
fn parse_named<const N: usize>(
    what: &'static str,
    name: &str,
    b64: &str,
) -> Result<[u8; N], KeyError> {
    check_name(name)?;
    // Refuse oversized input before allocating for it.
    let max_chars = N.div_ceil(3) * 4;
    if b64.len() > max_chars {
        return Err(KeyError::TooLong {
            what,
            name: excerpt(name),
            chars: b64.len(),
            max: max_chars,
        });
    }
    let bytes = BASE64_LENIENT.decode(b64).map_err(|e| KeyError::Base64 {
        what,
        name: excerpt(name),
        reason: e.to_string(),
    })?;
    let len = bytes.len();
    <[u8; N]>::try_from(bytes).map_err(|_| KeyError::Length {
        what,
        name: excerpt(name),
        len,
        expected: N,
    })
}

fn split_public<'a>(what: &'static str, s: &'a str) -> Result<(&'a str, &'a str), KeyError> {
    s.split_once(':').ok_or_else(|| KeyError::MissingColon {
        what,
        input: excerpt(s),
    })
}

/// A named ed25519 signing key, as in Nix's secret key files.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// A fresh key from OS randomness.
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        check_name(name)?;
        let mut seed = [0u8; SEED_LEN];
        OsRng
            .try_fill_bytes(&mut seed)
            .map_err(|e| KeyError::Randomness {
                name: name.to_owned(),
                reason: e.to_string(),
            })?;
        Self::from_seed(name, seed)
    }

    /// The key a 32-byte seed determines: for deterministic keys (tests,
    /// seeds kept elsewhere).
    pub fn from_seed(name: &str, seed: [u8; SEED_LEN]) -> Result<Self, KeyError> {
        check_name(name)?;
        Ok(Self {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Reads `name:base64(seed32 || pub32)`; trailing whitespace (a key file's
    /// newline) is ignored. The public half must be the one the seed derives.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, b64) = s
            .trim_end()
            .split_once(':')
            .ok_or(KeyError::SecretMissingColon)?;
        let bytes: [u8; SECRET_LEN] = parse_named("secret key", name, b64)?;
        // Fails unless the public half is the one the seed derives.
        let key =
            SigningKey::from_keypair_bytes(&bytes).map_err(|_| KeyError::PublicHalfMismatch {
                name: excerpt(name),
            })?;
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: Box::new(self.key.verifying_key()),
        }
    }

    /// The 32-byte ed25519 seed: the same key can then own other
    /// identities, such as the IPNS name an anchor publishes its set under.
    /// Treat it as the secret it is.
    pub fn seed(&self) -> [u8; SEED_LEN] {
        self.key.to_bytes()
    }

    /// Deterministic ed25519 signature of `msg`, named after this key.
    pub fn sign(&self, msg: &[u8]) -> Signature {
        Signature {
            name: self.name.clone(),
            bytes: self.key.sign(msg).to_bytes(),
        }
    }
}

/// Renders the secret: `name:base64(seed || pub)`, byte-identical to
/// `nix-store --generate-binary-cache-key` output. Write it only to key files.
impl fmt::Display for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}",
            self.name,
            STANDARD.encode(self.key.to_keypair_bytes())
        )
    }
}

/// Shows the name and public key only, so logs never leak the secret.
impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("name", &self.name)
            .field(
                "public",
                &STANDARD.encode(self.key.verifying_key().as_bytes()),
            )
            .finish_non_exhaustive()
    }
}

impl FromStr for SecretKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A named ed25519 public key, as in Nix's `trusted-public-keys`. The
/// decompressed point is boxed: it keeps verification fast while this type,
/// which many error variants carry, stays small.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PublicKey {
    name: String,
    key: Box<VerifyingKey>,
}

impl PublicKey {
    /// Reads `name:base64(pub32)`; trailing whitespace is ignored. Bytes that are
    /// not a curve point are refused here rather than failing every verify.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, b64) = split_public("public key", s.trim_end())?;
        let bytes: [u8; PUBLIC_LEN] = parse_named("public key", name, b64)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::InvalidPoint {
            name: excerpt(name),
        })?;
        Ok(Self {
            name: name.to_owned(),
            key: Box::new(key),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        self.key.as_bytes()
    }

    /// True only if `sig` carries this key's name and is a valid signature of
    /// `msg`. Uses strict verification (rejects weak keys and malleable
    /// signatures), as libsodium does for Nix.
    pub fn verify(&self, msg: &[u8], sig: &Signature) -> bool {
        sig.name == self.name
            && self
                .key
                .verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&sig.bytes))
                .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, STANDARD.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A named ed25519 signature, as on narinfo `Sig:` lines.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Signature {
    name: String,
    bytes: [u8; SIGNATURE_LEN],
}

impl Signature {
    /// Reads `name:base64(sig64)`.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, b64) = split_public("signature", s)?;
        let bytes = parse_named("signature", name, b64)?;
        Ok(Self {
            name: name.to_owned(),
            bytes,
        })
    }

    /// Name of the key that made this signature.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn as_bytes(&self) -> &[u8; 64] {
        &self.bytes
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, STANDARD.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

impl FromStr for Signature {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

serde_as_string!(PublicKey, "a Nix public key <name>:<base64>");
serde_as_string!(Signature, "a Nix signature <name>:<base64>");

/// What Nix signs for a store path:
/// `1;<store path>;<sha256:nix32 NarHash>;<NarSize>;<references>`, references as
/// full paths in Nix's set order (sorted, deduplicated), joined by ','. URL,
/// compression, deriver and CA are not covered.
pub fn fingerprint(
    path: &StorePath,
    nar_hash: &NarHash,
    nar_size: u64,
    references: &[StorePath],
) -> String {
    let mut refs: Vec<&StorePath> = references.iter().collect();
    refs.sort();
    refs.dedup();
    let refs: Vec<String> = refs.iter().map(|r| r.to_string()).collect();
    format!("1;{path};{nar_hash};{nar_size};{}", refs.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::Sha256Hash;
    use crate::store_path::StorePathHash;
    use proptest::prelude::*;

    // RFC 8032 test 1: seed, public key, and the signature of the empty message.
    const RFC_SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
    const RFC_PUB: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
    const RFC_SIG: &str = "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b";

    fn rfc_secret(name: &str) -> String {
        let mut bytes = hex::decode(RFC_SEED).unwrap();
        bytes.extend(hex::decode(RFC_PUB).unwrap());
        format!("{name}:{}", STANDARD.encode(bytes))
    }

    fn path(base: &str) -> StorePath {
        StorePath::from_base_name(base).unwrap()
    }

    #[test]
    fn signs_like_rfc8032() {
        let sk = SecretKey::parse(&rfc_secret("rfc-1")).unwrap();
        assert_eq!(hex::encode(sk.public().as_bytes()), RFC_PUB);
        let sig = sk.sign(b"");
        assert_eq!(hex::encode(sig.as_bytes()), RFC_SIG);
        assert_eq!(sig.name(), "rfc-1");
        assert!(sk.public().verify(b"", &sig));
    }

    #[test]
    fn secret_key_tolerates_trailing_newline_and_renders_back() {
        let text = rfc_secret("cache.example.org-1");
        let sk = SecretKey::parse(&format!("{text}\n")).unwrap();
        assert_eq!(sk.to_string(), text);
        assert_eq!(sk.name(), "cache.example.org-1");
        let pk = PublicKey::parse(&format!("{}\n", sk.public())).unwrap();
        assert_eq!(pk, sk.public());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let sk = SecretKey::parse(&rfc_secret("k")).unwrap();
        let debug = format!("{sk:?}");
        let seed_b64 = STANDARD.encode(hex::decode(RFC_SEED).unwrap());
        assert!(!debug.contains(&seed_b64[..20]), "{debug}");
        assert!(!debug.contains(&sk.to_string()), "{debug}");
        assert!(debug.contains("\"k\""));
    }

    #[test]
    fn rejects_secret_key_with_wrong_public_half() {
        let mut bytes = hex::decode(RFC_SEED).unwrap();
        bytes.extend([7u8; 32]);
        let text = format!("k:{}", STANDARD.encode(bytes));
        assert_eq!(
            SecretKey::parse(&text).unwrap_err(),
            KeyError::PublicHalfMismatch { name: "k".into() }
        );
    }

    #[test]
    fn rejects_wrong_key_and_signature_lengths() {
        let b32 = STANDARD.encode([1u8; 32]);
        let b64 = STANDARD.encode([1u8; 64]);
        assert!(matches!(
            SecretKey::parse(&format!("k:{b32}")),
            Err(KeyError::Length {
                len: 32,
                expected: 64,
                ..
            })
        ));
        assert!(matches!(
            PublicKey::parse(&format!("k:{b64}")),
            Err(KeyError::TooLong {
                chars: 88,
                max: 44,
                ..
            })
        ));
        assert!(matches!(
            Signature::parse(&format!("k:{b32}")),
            Err(KeyError::Length {
                len: 32,
                expected: 64,
                ..
            })
        ));
        assert!(matches!(
            Signature::parse(&format!("k:{}", "A".repeat(10_000))),
            Err(KeyError::TooLong {
                chars: 10_000,
                max: 88,
                ..
            })
        ));
    }

    #[test]
    fn rejects_bad_names() {
        let b32 = STANDARD.encode(hex::decode(RFC_PUB).unwrap());
        for name in ["", "a b", "a\tb"] {
            assert!(
                matches!(
                    PublicKey::parse(&format!("{name}:{b32}")),
                    Err(KeyError::InvalidName { .. })
                ),
                "{name:?}"
            );
        }
        assert!(matches!(
            SecretKey::generate("a:b"),
            Err(KeyError::InvalidName { .. })
        ));
        assert!(matches!(
            SecretKey::generate(""),
            Err(KeyError::InvalidName { .. })
        ));
    }

    #[test]
    fn rejects_missing_colon_without_echoing_secrets() {
        let raw = STANDARD.encode([9u8; 64]);
        let err = SecretKey::parse(&raw).unwrap_err();
        assert_eq!(err, KeyError::SecretMissingColon);
        assert!(!err.to_string().contains(&raw));
        assert!(matches!(
            PublicKey::parse("abc"),
            Err(KeyError::MissingColon { .. })
        ));
        assert!(matches!(
            Signature::parse("abc"),
            Err(KeyError::MissingColon { .. })
        ));
    }

    #[test]
    fn rejects_bad_base64_and_non_points() {
        assert!(matches!(
            PublicKey::parse("k:!!!!"),
            Err(KeyError::Base64 { .. })
        ));
        // y = 2 is not on the curve.
        let mut not_point = [0u8; 32];
        not_point[0] = 2;
        assert!(matches!(
            PublicKey::parse(&format!("k:{}", STANDARD.encode(not_point))),
            Err(KeyError::InvalidPoint { .. })
        ));
    }

    #[test]
    fn verify_refuses_signature_under_another_name() {
        let sk = SecretKey::parse(&rfc_secret("a-1")).unwrap();
        let sig = sk.sign(b"msg");
        let renamed =
            Signature::parse(&format!("b-1:{}", STANDARD.encode(sig.as_bytes()))).unwrap();
        assert!(!sk.public().verify(b"msg", &renamed));
        let other = SecretKey::generate("a-1").unwrap();
        assert!(!other.public().verify(b"msg", &sig));
    }

    #[test]
    fn fingerprint_matches_nix_format() {
        let top = path("0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-top");
        let dep = path("1ysj00x31q08vxsznqd9pmvwa0rrzza8-dep");
        let hash = Sha256Hash::digest(b"");
        let leaf = fingerprint(&dep, &hash, 120, &[]);
        assert_eq!(
            leaf,
            "1;/nix/store/1ysj00x31q08vxsznqd9pmvwa0rrzza8-dep;sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73;120;"
        );
        let fp = fingerprint(&top, &hash, 5, &[dep.clone(), top.clone(), dep.clone()]);
        assert_eq!(
            fp,
            format!(
                "1;{top};sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73;5;{top},{dep}"
            )
        );
    }

    #[test]
    fn serde_uses_nix_strings() {
        let sk = SecretKey::parse(&rfc_secret("k-1")).unwrap();
        let pk = sk.public();
        let sig = sk.sign(b"x");
        let json = serde_json::to_string(&(&pk, &sig)).unwrap();
        assert_eq!(json, format!("[\"{pk}\",\"{sig}\"]"));
        let back: (PublicKey, Signature) = serde_json::from_str(&json).unwrap();
        assert_eq!(back, (pk, sig));
    }

    fn name_strategy() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,40}"
    }

    fn store_path_strategy() -> impl Strategy<Value = StorePath> {
        (any::<[u8; 20]>(), "[a-z0-9][a-z0-9.-]{0,20}")
            .prop_map(|(d, n)| StorePath::from_parts(StorePathHash::from_digest(d), &n).unwrap())
    }

    proptest! {
        #[test]
        fn keys_and_signatures_round_trip(name in name_strategy(), seed in any::<[u8; 32]>(), msg in any::<Vec<u8>>()) {
            let sk = SecretKey::from_seed(&name, seed).unwrap();
            let sk2 = SecretKey::parse(&sk.to_string()).unwrap();
            prop_assert_eq!(sk2.to_string(), sk.to_string());
            let pk = sk.public();
            prop_assert_eq!(PublicKey::parse(&pk.to_string()).unwrap(), pk.clone());
            let sig = sk.sign(&msg);
            prop_assert_eq!(Signature::parse(&sig.to_string()).unwrap(), sig.clone());
            prop_assert!(pk.verify(&msg, &sig));
            let mut tampered = msg.clone();
            tampered.push(0);
            prop_assert!(!pk.verify(&tampered, &sig));
        }

        #[test]
        fn tampered_fingerprint_fails(
            seed in any::<[u8; 32]>(),
            top in store_path_strategy(),
            refs in proptest::collection::vec(store_path_strategy(), 0..4),
            nar in any::<[u8; 32]>(),
            size in 1u64..,
            flip in any::<prop::sample::Index>(),
        ) {
            let sk = SecretKey::from_seed("k-1", seed).unwrap();
            let hash = Sha256Hash::from_bytes(nar);
            let fp = fingerprint(&top, &hash, size, &refs);
            let sig = sk.sign(fp.as_bytes());
            prop_assert!(sk.public().verify(fp.as_bytes(), &sig));
            let mut bytes = fp.into_bytes();
            let i = flip.index(bytes.len());
            bytes[i] ^= 1;
            prop_assert!(!sk.public().verify(&bytes, &sig));
            // Reference order does not change what is signed.
            let mut reversed = refs.clone();
            reversed.reverse();
            prop_assert_eq!(fingerprint(&top, &hash, size, &reversed), fingerprint(&top, &hash, size, &refs));
        }

        #[test]
        fn parse_never_panics(s in "\\PC*") {
            let _ = SecretKey::parse(&s);
            let _ = PublicKey::parse(&s);
            let _ = Signature::parse(&s);
            let _ = Signature::parse(&format!("k:{s}"));
        }
    }
}
