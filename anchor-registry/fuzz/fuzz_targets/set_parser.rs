//! Mapping-set reader on arbitrary bytes: errors, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = anchor_registry::read_set(data, |_| {});
    let _ = anchor_registry::SignedHeader::parse(data);
});
