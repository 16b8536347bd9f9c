//! IPNS names and records: a mutable pointer from a name derived from an
//! ed25519 key to `/ipfs/<cid>`, signed by that key. Anchors publish their
//! newest mapping set under the name their own Nix key derives, so a
//! gateway can check that what `ipns://k51…` points at comes from the
//! anchor itself.
//!
//! Goals: records exactly as the IPNS record spec has them (protobuf
//! `IpnsEntry` with DAG-CBOR `data`, `signatureV2` over
//! `"ipns-signature:" ‖ data`, V1 fields kept for older resolvers), made and
//! checked with `rust-ipns`; names as CIDv1 `libp2p-key` in base36
//! (`k51…`), as Kubo and Helia print them; the DHT routing key `/ipns/` +
//! the *binary* peer id; at most [`MAX_RECORD_BYTES`] per record.
//!
//! Non-goals: values other than `/ipfs/<cid>` (no `/ipns/` chains, no
//! DNSLink), keys other than ed25519, records carrying only V2 fields
//! (rust-ipns requires the V1 fields to match `data`; Kubo and Helia write
//! both by default). Which record is newest for a name, and the memory of
//! the highest sequence seen, belong to the caller (see `trust::names`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cid::multibase::Base;
use cid::Cid;
use rust_ipfs::{Keypair, PeerId};

use super::routers::LIBP2P_KEY;

/// Records larger than this are refused unread (the spec's limit).
pub const MAX_RECORD_BYTES: usize = 10 * 1024;
/// The prefix of an IPNS record's key on the DHT.
const ROUTING_PREFIX: &[u8] = b"/ipns/";

/// Why a name or record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpnsError {
    #[error("{input:?} is not an IPNS name: expected a k51… name (CIDv1 libp2p-key) or a base58 peer id")]
    BadName { input: String },
    #[error("the IPNS record is {len} bytes, over the {MAX_RECORD_BYTES}-byte limit")]
    TooLarge { len: usize },
    #[error("the IPNS record for {name} is malformed: {reason}")]
    Malformed { name: String, reason: String },
    #[error(
        "the IPNS record for {name} is not signed by the key the name derives from ({reason})"
    )]
    BadSignature { name: String, reason: String },
    #[error("the IPNS record for {name} expired at {validity}")]
    Expired { name: String, validity: String },
    #[error(
        "the IPNS record for {name} points at {value:?}; only /ipfs/<cid> values are supported"
    )]
    UnsupportedValue { name: String, value: String },
    #[error("cannot sign an IPNS record: {reason}")]
    Sign { reason: String },
}

/// An IPNS name: the peer id of the key that signs its records.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpnsName(PeerId);

impl IpnsName {
    /// The name an ed25519 public key (e.g. an anchor's Nix key) owns.
    pub fn from_ed25519(public: &[u8; 32]) -> Result<Self, IpnsError> {
        let key = libp2p_identity::ed25519::PublicKey::try_from_bytes(public).map_err(|e| {
            IpnsError::BadName {
                input: format!("ed25519 key ({e})"),
            }
        })?;
        Ok(Self(libp2p_identity::PublicKey::from(key).to_peer_id()))
    }

    pub fn peer_id(&self) -> PeerId {
        self.0
    }

    /// The key its records are stored under on the DHT.
    pub fn routing_key(&self) -> Vec<u8> {
        let mut key = ROUTING_PREFIX.to_vec();
        key.extend_from_slice(&self.0.to_bytes());
        key
    }

    /// The name a DHT record key belongs to, if it is an IPNS key.
    pub fn from_routing_key(key: &[u8]) -> Option<Self> {
        let id = key.strip_prefix(ROUTING_PREFIX)?;
        PeerId::from_bytes(id).ok().map(Self)
    }

    fn cid(&self) -> Cid {
        Cid::new_v1(LIBP2P_KEY, *self.0.as_ref())
    }
}

/// Accepts `ipns://NAME`, `/ipns/NAME` or `NAME`, where NAME is a CID of
/// codec libp2p-key in any multibase (`k51…`, `bafz…`) or a base58 peer id.
impl FromStr for IpnsName {
    type Err = IpnsError;
    fn from_str(input: &str) -> Result<Self, IpnsError> {
        let bad = || IpnsError::BadName {
            input: input.chars().take(100).collect(),
        };
        let s = input
            .strip_prefix("ipns://")
            .or_else(|| input.strip_prefix("/ipns/"))
            .unwrap_or(input);
        super::routers::parse_peer_id(s)
            .map(Self)
            .map_err(|_| bad())
    }
}

/// The base36 CIDv1 form (`k51…`) Kubo and Helia print.
impl fmt::Display for IpnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.cid().to_string_of_base(Base::Base36Lower) {
            Ok(s) => f.write_str(&s),
            Err(_) => write!(f, "{}", self.0),
        }
    }
}

impl fmt::Debug for IpnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IpnsName({self})")
    }
}

impl serde::Serialize for IpnsName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for IpnsName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a record that passed every check says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub name: IpnsName,
    /// The CID the name points at (the record's `/ipfs/<cid>` value).
    pub value: Cid,
    pub sequence: u64,
    /// End of validity, Unix seconds (rounded down).
    pub validity: u64,
    /// How long resolvers may cache the answer.
    pub ttl: Duration,
}

impl Verified {
    /// Whether this record takes precedence over `other` for the same name:
    /// the higher sequence, then the later validity (the spec's order).
    pub fn supersedes(&self, other: &Verified) -> bool {
        (self.sequence, self.validity) > (other.sequence, other.validity)
    }
}

/// The libp2p identity an ed25519 seed (e.g. an anchor key's) determines.
pub fn keypair_from_seed(seed: [u8; 32]) -> Result<Keypair, IpnsError> {
    let mut seed = seed;
    Keypair::ed25519_from_bytes(&mut seed).map_err(|e| IpnsError::Sign {
        reason: e.to_string(),
    })
}

/// A signed record pointing the key's name at `value` until `validity`
/// (Unix seconds), with the given sequence and TTL, encoded for the wire.
pub fn sign(
    keypair: &Keypair,
    value: &Cid,
    sequence: u64,
    validity: u64,
    ttl: Duration,
) -> Result<Vec<u8>, IpnsError> {
    let sign_err = |e: rust_ipns::Error| IpnsError::Sign {
        reason: e.to_string(),
    };
    let eol = i64::try_from(validity)
        .ok()
        .and_then(|secs| DateTime::<Utc>::from_timestamp(secs, 0))
        .ok_or_else(|| IpnsError::Sign {
            reason: format!("validity {validity} is not a representable time"),
        })?;
    let value = format!("/ipfs/{value}");
    let record =
        rust_ipns::Record::new(keypair, value.as_bytes(), eol, sequence, ttl).map_err(sign_err)?;
    let bytes = record.encode().map_err(sign_err)?;
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(IpnsError::TooLarge { len: bytes.len() });
    }
    Ok(bytes)
}

/// Checks a record for `name` completely: size, encoding, that the V2
/// signature is by the key the name derives from and covers the fields it
/// states, the validity type and time (`now`, Unix seconds) and the value.
pub fn verify(name: &IpnsName, bytes: &[u8], now: u64) -> Result<Verified, IpnsError> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(IpnsError::TooLarge { len: bytes.len() });
    }
    let malformed = |reason: String| IpnsError::Malformed {
        name: name.to_string(),
        reason,
    };
    let record = rust_ipns::Record::decode(bytes).map_err(|e| malformed(e.to_string()))?;
    record
        .verify_signature(name.peer_id())
        .map_err(|e| match e {
            rust_ipns::Error::InvalidSignature
            | rust_ipns::Error::NameMismatch
            | rust_ipns::Error::MissingSignature
            | rust_ipns::Error::MissingPublicKey
            | rust_ipns::Error::InvalidPublicKey(_) => IpnsError::BadSignature {
                name: name.to_string(),
                reason: e.to_string(),
            },
            other => malformed(other.to_string()),
        })?;
    let data = record.data().map_err(|e| malformed(e.to_string()))?;
    let eol = record.validity().map_err(|e| malformed(e.to_string()))?;
    let validity = u64::try_from(eol.timestamp()).unwrap_or(0);
    if eol.with_timezone(&Utc).timestamp() < i64::try_from(now).unwrap_or(i64::MAX) {
        return Err(IpnsError::Expired {
            name: name.to_string(),
            validity: eol.to_rfc3339(),
        });
    }
    let text = String::from_utf8_lossy(data.value());
    let value = text
        .strip_prefix("/ipfs/")
        .and_then(|cid| Cid::from_str(cid).ok())
        .ok_or_else(|| IpnsError::UnsupportedValue {
            name: name.to_string(),
            value: text.chars().take(200).collect(),
        })?;
    Ok(Verified {
        name: *name,
        value,
        sequence: data.sequence(),
        validity,
        ttl: Duration::from_nanos(data.ttl()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn key(byte: u8) -> (Keypair, IpnsName) {
        let keypair = keypair_from_seed([byte; 32]).unwrap();
        let name = IpnsName(keypair.public().to_peer_id());
        (keypair, name)
    }

    fn target() -> Cid {
        "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
            .parse()
            .unwrap()
    }

    #[test]
    fn a_signed_record_verifies_and_says_what_was_signed() {
        let (keypair, name) = key(1);
        let bytes = sign(&keypair, &target(), 7, NOW + 3600, Duration::from_secs(300)).unwrap();
        let v = verify(&name, &bytes, NOW).unwrap();
        assert_eq!(v.value, target());
        assert_eq!(v.sequence, 7);
        assert_eq!(v.validity, NOW + 3600);
        assert_eq!(v.ttl, Duration::from_secs(300));
    }

    #[test]
    fn a_record_is_refused_for_another_name_when_expired_or_altered() {
        let (keypair, _) = key(1);
        let (_, other) = key(2);
        let bytes = sign(&keypair, &target(), 1, NOW + 10, Duration::from_secs(1)).unwrap();
        assert!(matches!(
            verify(&other, &bytes, NOW),
            Err(IpnsError::BadSignature { .. })
        ));
        let (_, name) = key(1);
        assert!(matches!(
            verify(&name, &bytes, NOW + 11),
            Err(IpnsError::Expired { .. })
        ));
        // Flip one bit anywhere: either it no longer verifies, or (the
        // legacy V1 signature, which the spec leaves unchecked) what it
        // says is unchanged.
        let good = verify(&name, &bytes, NOW).unwrap();
        let mut refused = 0;
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            match verify(&name, &bad, NOW) {
                Ok(v) => assert_eq!(v, good, "byte {i} flipped changed the record"),
                Err(_) => refused += 1,
            }
        }
        assert!(refused > bytes.len() / 2, "{refused} of {}", bytes.len());
        assert!(matches!(
            verify(&name, &vec![0u8; MAX_RECORD_BYTES + 1], NOW),
            Err(IpnsError::TooLarge { .. })
        ));
    }

    #[test]
    fn names_print_as_k51_and_parse_in_every_form() {
        let (_, name) = key(3);
        let text = name.to_string();
        assert!(text.starts_with("k51"), "{text}");
        for form in [
            text.clone(),
            format!("ipns://{text}"),
            format!("/ipns/{text}"),
            name.peer_id().to_string(),
            name.cid().to_string(),
        ] {
            assert_eq!(form.parse::<IpnsName>().unwrap(), name, "{form}");
        }
        assert!(
            "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
                .parse::<IpnsName>()
                .is_err()
        );
        assert!("k51nonsense".parse::<IpnsName>().is_err());
    }

    #[test]
    fn the_routing_key_is_the_binary_peer_id_behind_the_ipns_prefix() {
        let (_, name) = key(4);
        let key = name.routing_key();
        assert_eq!(&key[..6], b"/ipns/");
        assert_eq!(&key[6..], name.peer_id().to_bytes().as_slice());
        assert_eq!(IpnsName::from_routing_key(&key), Some(name));
        assert_eq!(IpnsName::from_routing_key(b"/pk/abc"), None);
    }

    #[test]
    fn the_name_of_an_ed25519_key_is_the_name_its_seed_signs_for() {
        let seed = [9u8; 32];
        let nix = anchor_registry::SecretKey::from_seed("anchor-1", seed).unwrap();
        let from_public = IpnsName::from_ed25519(nix.public().as_bytes()).unwrap();
        let keypair = keypair_from_seed(seed).unwrap();
        assert_eq!(from_public.peer_id(), keypair.public().to_peer_id());
    }

    #[test]
    fn precedence_is_sequence_then_validity() {
        let (_, name) = key(5);
        let at = |sequence, validity| Verified {
            name,
            value: target(),
            sequence,
            validity,
            ttl: Duration::ZERO,
        };
        assert!(at(2, 1).supersedes(&at(1, 9)));
        assert!(at(1, 9).supersedes(&at(1, 8)));
        assert!(!at(1, 8).supersedes(&at(1, 8)));
    }
}
