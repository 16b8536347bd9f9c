//! Blocks and their CIDs: the only place that hashes bytes into a CID or
//! checks bytes against one. A [`Block`] value always holds bytes that match
//! its CID (or came from our own store, which only accepts such bytes).

use bytes::Bytes;
use cid::multihash::Multihash;
use cid::{Cid, Version};
use sha2::{Digest, Sha256};

use super::IpfsError;

/// Multicodec of raw leaves.
pub const RAW: u64 = 0x55;
/// Multicodec of dag-pb (UnixFS) nodes.
pub const DAG_PB: u64 = 0x70;
/// Multihash code of sha2-256, the only real hash we accept.
pub const SHA2_256: u64 = 0x12;
/// Multihash code of the identity "hash" (bytes inlined in the CID).
pub const IDENTITY: u64 = 0x00;
/// Bitswap's block size limit; larger blocks are refused everywhere.
pub const MAX_BLOCK_SIZE: usize = 2 * 1024 * 1024;

/// A block whose bytes are known to match its CID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    cid: Cid,
    data: Bytes,
}

impl Block {
    /// Checks `data` against `cid` (hashing it) and wraps both.
    pub fn new(cid: Cid, data: Bytes) -> Result<Self, IpfsError> {
        verify(&cid, &data)?;
        Ok(Block { cid, data })
    }

    /// Hashes `data` into a CIDv1 (sha2-256) with `codec`.
    pub fn from_data(codec: u64, data: Bytes) -> Self {
        let cid = Cid::new_v1(codec, sha256_multihash(&data));
        Block { cid, data }
    }

    /// Wraps bytes read back from our own store, which checked them at write
    /// time; re-hashing every local read would halve serving speed.
    pub(crate) fn from_store(cid: Cid, data: Bytes) -> Self {
        Block { cid, data }
    }

    pub fn cid(&self) -> &Cid {
        &self.cid
    }

    pub fn data(&self) -> &Bytes {
        &self.data
    }

    pub fn into_data(self) -> Bytes {
        self.data
    }
}

/// sha2-256 multihash of `data`.
pub fn sha256_multihash(data: &[u8]) -> Multihash<64> {
    let digest = Sha256::digest(data);
    // A 32-byte digest always fits the 64-byte multihash.
    Multihash::wrap(SHA2_256, &digest).unwrap_or_default()
}

/// Fails unless `data` hashes to `cid`'s multihash.
pub fn verify(cid: &Cid, data: &[u8]) -> Result<(), IpfsError> {
    if data.len() > MAX_BLOCK_SIZE {
        return Err(IpfsError::BlockTooLarge {
            cid: *cid,
            size: data.len(),
        });
    }
    let mh = cid.hash();
    let ok = match mh.code() {
        SHA2_256 => Sha256::digest(data).as_slice() == mh.digest(),
        IDENTITY => data == mh.digest(),
        _ => {
            return Err(IpfsError::UnsupportedCid {
                cid: *cid,
                reason: "multihash is neither sha2-256 nor identity",
            })
        }
    };
    if ok {
        Ok(())
    } else {
        Err(IpfsError::HashMismatch { cid: *cid })
    }
}

/// Rejects CIDs whose codec or hash we cannot walk or verify.
pub fn check_supported(cid: &Cid) -> Result<(), IpfsError> {
    if cid.codec() != RAW && cid.codec() != DAG_PB {
        return Err(IpfsError::UnsupportedCid {
            cid: *cid,
            reason: "codec is neither raw nor dag-pb",
        });
    }
    match cid.hash().code() {
        SHA2_256 if cid.hash().size() == 32 => Ok(()),
        IDENTITY => Ok(()),
        _ => Err(IpfsError::UnsupportedCid {
            cid: *cid,
            reason: "multihash is neither 32-byte sha2-256 nor identity",
        }),
    }
}

/// The bytes inlined in an identity CID, which needs no storage or network.
pub fn inline_data(cid: &Cid) -> Option<Bytes> {
    (cid.hash().code() == IDENTITY).then(|| Bytes::copy_from_slice(cid.hash().digest()))
}

/// Bitswap 1.1+ block prefix: version, codec, multihash code and length.
pub fn prefix(cid: &Cid) -> Vec<u8> {
    let mut out = Vec::with_capacity(8);
    let version: u64 = match cid.version() {
        Version::V0 => 0,
        Version::V1 => 1,
    };
    for v in [
        version,
        cid.codec(),
        cid.hash().code(),
        u64::from(cid.hash().size()),
    ] {
        super::pb::put_varint(&mut out, v);
    }
    out
}

/// Rebuilds the CID of `data` from a bitswap prefix by hashing it: the result
/// is verified by construction. `None` for prefixes we do not accept.
pub fn cid_from_prefix(prefix: &[u8], data: &[u8]) -> Option<Cid> {
    let mut pos = 0;
    let mut next = || super::pb::get_varint(prefix, &mut pos).ok();
    let (version, codec, code, len) = (next()?, next()?, next()?, next()?);
    if data.len() > MAX_BLOCK_SIZE {
        return None;
    }
    let mh = match (code, len) {
        (SHA2_256, 32) => sha256_multihash(data),
        (IDENTITY, _) => Multihash::wrap(IDENTITY, data).ok()?,
        _ => return None,
    };
    match version {
        0 if codec == DAG_PB => Cid::new_v0(mh).ok(),
        1 => Some(Cid::new_v1(codec, mh)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_data_computes_known_raw_cid() {
        let b = Block::from_data(RAW, Bytes::new());
        assert_eq!(
            b.cid().to_string(),
            "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
        );
    }

    #[test]
    fn new_rejects_bytes_that_do_not_match() {
        let cid = *Block::from_data(RAW, Bytes::from_static(b"a")).cid();
        let err = Block::new(cid, Bytes::from_static(b"b"));
        assert!(matches!(err, Err(IpfsError::HashMismatch { cid: c }) if c == cid));
    }

    #[test]
    fn prefix_rebuilds_cid_v1_and_v0() {
        let data = b"hello";
        let v1 = *Block::from_data(DAG_PB, Bytes::from_static(data)).cid();
        assert_eq!(cid_from_prefix(&prefix(&v1), data), Some(v1));
        let v0 = Cid::new_v0(sha256_multihash(data)).unwrap();
        assert_eq!(cid_from_prefix(&prefix(&v0), data), Some(v0));
    }

    #[test]
    fn identity_cid_is_inline() {
        let cid: Cid = "bafkqaaa".parse().unwrap();
        assert_eq!(inline_data(&cid), Some(Bytes::new()));
        assert!(verify(&cid, b"").is_ok());
    }
}
