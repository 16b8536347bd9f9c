//! Where a NAR's bytes live on IPFS: its CID, and the import profile that turns
//! NAR bytes into that CID. Both travel in every mapping; the profile name lets
//! a future profile coexist with `unixfs-v1-2025`.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::store_path::serde_as_string;

/// Longest CID string accepted; real CIDs are under 100 chars.
const MAX_CID_LEN: usize = 256;
/// Longest import profile name accepted.
const MAX_PROFILE_LEN: usize = 64;

/// Why a string is not a canonical CID or profile name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ContentIdError {
    #[error("`{input}` is not a CID: {reason}")]
    Invalid { input: String, reason: String },
    #[error("CID `{input}` is not in canonical form: expected `{canonical}`")]
    NotCanonical { input: String, canonical: String },
    #[error("CID is {len} chars long, more than {MAX_CID_LEN}")]
    TooLong { len: usize },
    #[error("import profile `{input}` must be 1-{MAX_PROFILE_LEN} chars of [a-z0-9.-]")]
    InvalidProfile { input: String },
}

/// A CID accepted only in its canonical text form (CIDv1: base32 lower-case;
/// CIDv0: base58btc), so mapping sets render one way only.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContentId(cid::Cid);

impl ContentId {
    /// Accepts a CID only in the form the `cid` crate (like Kubo and Helia) prints it.
    pub fn parse(s: &str) -> Result<Self, ContentIdError> {
        if s.len() > MAX_CID_LEN {
            return Err(ContentIdError::TooLong { len: s.len() });
        }
        let cid = cid::Cid::try_from(s).map_err(|err| ContentIdError::Invalid {
            input: s.to_owned(),
            reason: err.to_string(),
        })?;
        let canonical = cid.to_string();
        if canonical != s {
            return Err(ContentIdError::NotCanonical {
                input: s.to_owned(),
                canonical,
            });
        }
        Ok(Self(cid))
    }

    /// Wraps a CID, e.g. one the IPFS node computed.
    pub fn from_cid(cid: cid::Cid) -> Self {
        Self(cid)
    }

    /// The CID, for handing to the IPFS node.
    pub fn cid(&self) -> cid::Cid {
        self.0
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({})", self.0)
    }
}

impl FromStr for ContentId {
    type Err = ContentIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

serde_as_string!(ContentId, "a CID string");

/// The name of the recipe that turned NAR bytes into a CID (chunker, DAG shape,
/// leaf codec). Two anchors may publish different CIDs for one NAR under
/// different profiles; the NarHash decides what the bytes must be.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImportProfile(String);

impl ImportProfile {
    /// The fixed profile of the design: CIDv1, UnixFS, raw leaves, sha2-256,
    /// 1 MiB chunks, balanced DAG of width 1024 (IPIP-499).
    pub const UNIXFS_V1_2025: &'static str = "unixfs-v1-2025";

    pub fn parse(s: &str) -> Result<Self, ContentIdError> {
        let valid = !s.is_empty()
            && s.len() <= MAX_PROFILE_LEN
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !valid {
            return Err(ContentIdError::InvalidProfile {
                input: s.chars().take(MAX_PROFILE_LEN + 8).collect(),
            });
        }
        Ok(Self(s.to_owned()))
    }

    /// The profile every nixpfs gateway uses today.
    pub fn unixfs_v1_2025() -> Self {
        Self(Self::UNIXFS_V1_2025.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ImportProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ImportProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImportProfile({})", self.0)
    }
}

impl FromStr for ImportProfile {
    type Err = ContentIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

serde_as_string!(ImportProfile, "an import profile name");

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const V1_RAW: &str = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy";
    const V0: &str = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG";

    #[test]
    fn accepts_canonical_v1_and_v0() {
        assert_eq!(
            ContentId::parse(V1_RAW).map(|c| c.to_string()),
            Ok(V1_RAW.to_owned())
        );
        assert_eq!(
            ContentId::parse(V0).map(|c| c.to_string()),
            Ok(V0.to_owned())
        );
    }

    #[test]
    fn rejects_upper_case_base32_as_not_canonical() {
        let upper = format!("B{}", V1_RAW[1..].to_ascii_uppercase());
        assert!(matches!(
            ContentId::parse(&upper),
            Err(ContentIdError::NotCanonical { .. })
        ));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            ContentId::parse("bafy-not-a-cid"),
            Err(ContentIdError::Invalid { .. })
        ));
        assert!(ContentId::parse("").is_err());
    }

    #[test]
    fn rejects_over_long_input_before_decoding() {
        assert!(matches!(
            ContentId::parse(&"b".repeat(MAX_CID_LEN + 1)),
            Err(ContentIdError::TooLong { .. })
        ));
    }

    #[test]
    fn round_trips_through_cid_crate() {
        let id = ContentId::parse(V1_RAW).expect("valid");
        assert_eq!(ContentId::from_cid(id.cid()), id);
    }

    #[test]
    fn profile_rejects_upper_case_and_spaces() {
        assert!(ImportProfile::parse("UnixFS").is_err());
        assert!(ImportProfile::parse("a b").is_err());
        assert!(ImportProfile::parse("").is_err());
        assert_eq!(
            ImportProfile::parse(ImportProfile::UNIXFS_V1_2025),
            Ok(ImportProfile::unixfs_v1_2025())
        );
    }

    proptest! {
        #[test]
        fn cid_render_parse_round_trip(digest in proptest::array::uniform32(any::<u8>()), raw in any::<bool>()) {
            let hash = cid::multihash::Multihash::<64>::wrap(0x12, &digest).expect("32 bytes fit");
            let cid = cid::Cid::new_v1(if raw { 0x55 } else { 0x70 }, hash);
            let id = ContentId::from_cid(cid);
            prop_assert_eq!(ContentId::parse(&id.to_string()), Ok(id));
        }

        #[test]
        fn profile_render_parse_round_trip(s in "[a-z0-9.-]{1,64}") {
            let p = ImportProfile::parse(&s).expect("valid by construction");
            prop_assert_eq!(ImportProfile::parse(&p.to_string()), Ok(p));
        }
    }
}
