//! narinfo, store path, hash and key parsers on arbitrary text: errors, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(info) = anchor_registry::NarInfo::parse(text) {
            let _ = anchor_registry::NarInfo::parse(&info.to_string());
        }
        let _ = anchor_registry::StorePath::parse(text);
        let _ = anchor_registry::NarHash::parse(text);
        let _ = anchor_registry::PublicKey::parse(text);
        let _ = anchor_registry::Signature::parse(text);
    }
});
