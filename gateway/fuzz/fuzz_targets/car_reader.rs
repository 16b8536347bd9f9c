//! Fuzzes the CAR reader (`car import`, trustless-gateway clients' files):
//! arbitrary bytes give roots and blocks or an error, never a panic or an
//! allocation from a claimed length.
#![no_main]

use gateway::store::car::CarReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let Ok(mut reader) = CarReader::open(data).await else {
            return;
        };
        let _ = reader.roots();
        while let Ok(Some(_block)) = reader.next_block().await {}
    });
});
