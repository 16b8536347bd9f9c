//! Fuzzes the strict NAR parser with arbitrary bytes: it must return an error
//! or a summary, never panic, hang or allocate from a claimed length.
//! The module is compiled from source so a fuzz build stays small and fast.
#![no_main]

#[path = "../../src/store/nar/mod.rs"]
#[allow(dead_code, unused_imports)]
mod nar;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = nar::validate(data);
});
