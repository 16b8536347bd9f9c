//! What is true and who says so. Pure: no network, no async runtime, no global
//! state, so every decision about trust can be unit- and property-tested.

mod canonical;
pub mod content_id;
pub mod hash;
pub mod keys;
pub mod mapping;
pub mod mapping_set;
pub mod narinfo;
pub mod policy;
pub mod registry;
pub mod store_path;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod trust;

pub use content_id::{ContentId, ContentIdError, ImportProfile};
pub use hash::{HashError, NarHash, Sha256Hash};
pub use keys::{fingerprint, KeyError, PublicKey, SecretKey, Signature};
pub use mapping::{ContentAddress, Mapping, MappingData, MappingError};
pub use mapping_set::{
    read_set, write_set, EntryChecks, MappingSetBuilder, SetError, SetHeader, SetKind, SetParams,
    SetReader, SignedHeader, MAX_BATCH_BYTES,
};
pub use narinfo::{CacheInfo, NarInfo, NarInfoError};
pub use policy::{Assertion, Decision, Policy, PolicyError, Vouch};
pub use registry::{
    versioned_location, Anchor, AnchorName, Registry, RegistryError, RegistrySignature, Source,
    TrustRoot,
};
pub use store_path::{StorePath, StorePathError, StorePathHash, STORE_DIR};
pub use trust::{check_header, verify_set, verify_set_with, TrustError, TrustedState, VerifiedSet};
