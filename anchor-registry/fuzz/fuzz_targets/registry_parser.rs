//! Registry parser on arbitrary text: errors, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(registry) = anchor_registry::Registry::parse(text) {
            let _ = registry.verify(None, 0);
            let _ = registry.render();
        }
    }
});
