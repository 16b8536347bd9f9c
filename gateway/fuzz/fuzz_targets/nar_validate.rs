//! Fuzzes the strict NAR parser with arbitrary bytes: it must return an error
//! or a summary, never panic, hang or allocate from a claimed length.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = gateway::store::nar::validate(data);
});
