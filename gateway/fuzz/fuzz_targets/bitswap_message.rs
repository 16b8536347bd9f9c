//! Fuzzes the bitswap 1.2.0 message decoder (every peer's wantlists and
//! blocks pass through it): arbitrary bytes decode or fail, never panic;
//! what decodes re-encodes to a message that decodes to the same thing.
#![no_main]

use bytes::Bytes;
use gateway::store::ipfs::bitswap::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = Message::decode(&Bytes::copy_from_slice(data)) {
        let again = Message::decode(&Bytes::from(message.encode())).expect("re-encoded");
        assert_eq!(again.encode(), message.encode());
    }
});
