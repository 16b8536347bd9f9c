//! SHA-256 hashes in every form Nix writes them: `sha256:<nix32>` (narinfo,
//! fingerprints), `sha256:<hex>` (old narinfos) and SRI `sha256-<base64>`
//! (`nix path-info --json`). Any form parses; one canonical form renders.

use std::fmt;
use std::str::FromStr;

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::store_path::{excerpt, serde_as_string};

/// Standard base64 that, like Nix, also reads input without `=` padding.
/// Rendering always uses padded [`STANDARD`].
pub(crate) const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

const NIX32_LEN: usize = 52;
const HEX_LEN: usize = 64;
const BASE64_LEN: usize = 44;
const BASE64_UNPADDED_LEN: usize = 43;

/// Why a string is not a sha256 hash; each names the input and the forms expected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HashError {
    #[error("hash `{input}` has no algorithm prefix: expected `sha256:<nix32|hex|base64>` or `sha256-<base64>`")]
    MissingPrefix { input: String },
    #[error("hash `{input}` uses algorithm `{algorithm}`: only sha256 is supported")]
    UnsupportedAlgorithm { input: String, algorithm: String },
    #[error("hash `{input}` has a {len}-char digest: expected 52 (nix32), 64 (hex) or 44 (base64) chars")]
    Length { input: String, len: usize },
    #[error("hash `{input}` is not valid {encoding} for a 32-byte sha256 digest")]
    Encoding {
        input: String,
        encoding: &'static str,
    },
}

/// A sha256 digest. Derived `Ord` compares raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256Hash([u8; 32]);

/// The sha256 of a NAR, as narinfo `NarHash:` and fingerprints carry it.
pub type NarHash = Sha256Hash;

impl Sha256Hash {
    /// Accepts `sha256:<52 nix32>`, `sha256:<64 hex>`, `sha256:<44 base64>` and SRI
    /// `sha256-<base64>`, the forms Nix itself accepts with an algorithm prefix.
    pub fn parse(s: &str) -> Result<Self, HashError> {
        if let Some(digest) = s.strip_prefix("sha256:") {
            return match digest.len() {
                NIX32_LEN => decode_nix32(digest, s),
                HEX_LEN => decode(s, "hex", hex::decode(digest).ok()),
                BASE64_LEN => decode(s, "base64", BASE64_LENIENT.decode(digest).ok()),
                _ => Err(HashError::Length {
                    input: excerpt(s),
                    len: digest.chars().count(),
                }),
            };
        }
        if let Some(digest) = s.strip_prefix("sha256-") {
            return match digest.len() {
                BASE64_LEN | BASE64_UNPADDED_LEN => {
                    decode(s, "SRI base64", BASE64_LENIENT.decode(digest).ok())
                }
                _ => Err(HashError::Length {
                    input: excerpt(s),
                    len: digest.chars().count(),
                }),
            };
        }
        match s.find([':', '-']) {
            Some(end) => Err(HashError::UnsupportedAlgorithm {
                input: excerpt(s),
                algorithm: excerpt(&s[..end]),
            }),
            None => Err(HashError::MissingPrefix { input: excerpt(s) }),
        }
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The sha256 of `data`, for data small enough to hold at once (use
    /// [`Sha256`] with [`Self::from_bytes`] to stream).
    pub fn digest(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    /// The 52-char Nix base32 form, without prefix (as in NAR URLs).
    pub fn to_nix32(&self) -> String {
        nix_base32::to_nix_base32(&self.0)
    }

    /// `sha256-<base64>`, the form `nix path-info --json` prints.
    pub fn to_sri(&self) -> String {
        format!("sha256-{}", STANDARD.encode(self.0))
    }

    /// 64 lowercase hex chars, without prefix.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// Nix base32 of exactly 52 chars; the crate rejects unknown chars and digits
/// that overflow 256 bits, so every digest has exactly one accepted spelling.
fn decode_nix32(digest: &str, input: &str) -> Result<Sha256Hash, HashError> {
    decode(input, "Nix base32", nix_base32::from_nix_base32(digest))
}

fn decode(
    input: &str,
    encoding: &'static str,
    bytes: Option<Vec<u8>>,
) -> Result<Sha256Hash, HashError> {
    bytes
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .map(Sha256Hash)
        .ok_or_else(|| HashError::Encoding {
            input: excerpt(input),
            encoding,
        })
}

impl fmt::Display for Sha256Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_nix32())
    }
}

impl fmt::Debug for Sha256Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Hash({self})")
    }
}

impl FromStr for Sha256Hash {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

serde_as_string!(
    Sha256Hash,
    "a sha256 hash: sha256:<nix32|hex|base64> or sha256-<base64>"
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EMPTY_NIX32: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
    const EMPTY_HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const EMPTY_SRI: &str = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";

    #[test]
    fn empty_input_matches_nix_hash() {
        // nix-hash --type sha256 --flat --base32 /dev/null
        let h = Sha256Hash::digest(b"");
        assert_eq!(h.to_nix32(), EMPTY_NIX32);
        assert_eq!(h.to_hex(), EMPTY_HEX);
        assert_eq!(h.to_sri(), EMPTY_SRI);
        assert_eq!(h.to_string(), format!("sha256:{EMPTY_NIX32}"));
    }

    #[test]
    fn known_vector_from_nix_hash_to_base32() {
        // nix-hash --type sha256 --to-base32 ab3352…527b
        let h = Sha256Hash::parse(
            "sha256:ab335240fd942ab8191c5e628cd4ff3903c577bda961fb75df08e0303a00527b",
        )
        .unwrap();
        assert_eq!(
            h.to_nix32(),
            "0ysj00x31q08vxsznqd9pmvwa0rrzza8qqjy3hcvhallzm054cxb"
        );
    }

    #[test]
    fn parses_every_form_to_the_same_digest() {
        let want = Sha256Hash::digest(b"");
        let forms = [
            format!("sha256:{EMPTY_NIX32}"),
            format!("sha256:{EMPTY_HEX}"),
            format!("sha256:{}", EMPTY_HEX.to_uppercase()),
            format!("sha256:{}", &EMPTY_SRI[7..]),
            EMPTY_SRI.to_owned(),
            EMPTY_SRI.trim_end_matches('=').to_owned(),
        ];
        for form in forms {
            assert_eq!(Sha256Hash::parse(&form), Ok(want), "{form}");
        }
    }

    #[test]
    fn rejects_missing_or_other_algorithm() {
        assert!(matches!(
            Sha256Hash::parse(EMPTY_NIX32),
            Err(HashError::MissingPrefix { .. })
        ));
        assert!(matches!(
            Sha256Hash::parse(&format!("sha512:{EMPTY_NIX32}")),
            Err(HashError::UnsupportedAlgorithm { algorithm, .. }) if algorithm == "sha512"
        ));
        assert!(matches!(
            Sha256Hash::parse("md5-1B2M2Y8AsgTpgAmY7PhCfg=="),
            Err(HashError::UnsupportedAlgorithm { algorithm, .. }) if algorithm == "md5"
        ));
    }

    #[test]
    fn rejects_wrong_lengths() {
        for bad in [
            format!("sha256:{}", &EMPTY_NIX32[1..]),
            format!("sha256:{EMPTY_NIX32}0"),
            format!("sha256:{}", &EMPTY_HEX[2..]),
            "sha256:".to_owned(),
            "sha256-AAAA".to_owned(),
        ] {
            assert!(
                matches!(Sha256Hash::parse(&bad), Err(HashError::Length { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn rejects_bad_encodings() {
        let mut not_nix32 = EMPTY_NIX32.to_owned();
        not_nix32.replace_range(5..6, "e");
        let overflow = format!("2{}", &EMPTY_NIX32[1..]);
        let mut not_hex = EMPTY_HEX.to_owned();
        not_hex.replace_range(0..1, "g");
        let mut not_b64 = EMPTY_SRI.to_owned();
        not_b64.replace_range(10..11, "!");
        for bad in [
            format!("sha256:{not_nix32}"),
            format!("sha256:{overflow}"),
            format!("sha256:{not_hex}"),
            not_b64,
        ] {
            assert!(
                matches!(Sha256Hash::parse(&bad), Err(HashError::Encoding { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn serde_writes_nix32_and_reads_every_form() {
        let h = Sha256Hash::digest(b"");
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"sha256:{EMPTY_NIX32}\""));
        assert_eq!(serde_json::from_str::<Sha256Hash>(&json).unwrap(), h);
        assert_eq!(
            serde_json::from_str::<Sha256Hash>(&format!("\"{EMPTY_SRI}\"")).unwrap(),
            h
        );
        assert!(serde_json::from_str::<Sha256Hash>("\"sha256:xyz\"").is_err());
    }

    proptest! {
        #[test]
        fn every_form_round_trips(bytes in any::<[u8; 32]>()) {
            let h = Sha256Hash::from_bytes(bytes);
            prop_assert_eq!(Sha256Hash::parse(&h.to_string()).unwrap(), h);
            prop_assert_eq!(h.to_string().parse::<Sha256Hash>().unwrap(), h);
            prop_assert_eq!(Sha256Hash::parse(&format!("sha256:{}", h.to_hex())).unwrap(), h);
            prop_assert_eq!(Sha256Hash::parse(&h.to_sri()).unwrap(), h);
            prop_assert_eq!(h.to_nix32().len(), 52);
            prop_assert_eq!(h.as_bytes(), &bytes);
        }

        #[test]
        fn parse_never_panics(s in "\\PC*") {
            let _ = Sha256Hash::parse(&s);
            let _ = Sha256Hash::parse(&format!("sha256:{s}"));
            let _ = Sha256Hash::parse(&format!("sha256-{s}"));
        }

        #[test]
        fn parse_never_panics_on_right_lengths(s in "[0-9a-z+/=!é]{43,64}") {
            let _ = Sha256Hash::parse(&format!("sha256:{s}"));
            let _ = Sha256Hash::parse(&format!("sha256-{s}"));
        }
    }
}
