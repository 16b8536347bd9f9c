//! Fuzzes the HTTP `Range` header parser of NAR responses: any header
//! value gives no range, a satisfiable range inside the NAR, or
//! "unsatisfiable", never a panic or a range past the end.
#![no_main]

use gateway::http::cache::parse_range;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((size_bytes, header)) = data.split_first_chunk::<8>() else {
        return;
    };
    let size = u64::from_le_bytes(*size_bytes) % (1 << 40);
    let Ok(value) = axum::http::HeaderValue::from_bytes(header) else {
        return;
    };
    if let Ok(Some((start, end))) = parse_range(&value, size) {
        assert!(start <= end && end < size, "{start}-{end} of {size}");
    }
});
