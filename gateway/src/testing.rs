//! Builders shared by this crate's unit tests.

use anchor_registry::{
    ContentId, ImportProfile, Mapping, MappingData, NarHash, SecretKey, StorePath,
};

/// `signer`'s mapping of `path` to a NAR whose bytes are `nar` (no
/// references, any valid CID: the tests using it fetch nothing).
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
