//! Canonical JSON for everything this crate signs: the bytes of RFC 8785 (JCS)
//! for the restricted values we emit, so any JCS implementation reproduces them.
//! Owns the rendering helper and the "must equal its own rendering" check.
//!
//! Why this is JCS: our structs declare their fields in sorted (UTF-16) order,
//! serde_json writes them in declaration order with no whitespace, escapes
//! strings exactly as JCS does (`\"`, `\\`, `\b\f\n\r\t`, other controls as
//! lowercase `\u00xx`, nothing else), and every number is an integer no larger
//! than [`MAX_SAFE_INTEGER`], which JCS prints as plain decimal.

use serde::Serialize;

/// Largest integer JCS (and every JavaScript implementation) prints exactly as
/// decimal; larger values would render differently elsewhere, so we refuse them.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Appends the canonical JSON of `value` to `out`.
pub(crate) fn write<T: Serialize>(out: &mut Vec<u8>, value: &T) {
    // Serialising our own plain structs into a Vec cannot fail: no maps with
    // non-string keys, no I/O, no custom serializers that error.
    if let Err(err) = serde_json::to_writer(&mut *out, value) {
        unreachable!("canonical JSON of an in-memory struct failed: {err}");
    }
}

/// Canonical JSON of `value` as a string.
pub(crate) fn to_string<T: Serialize>(value: &T) -> String {
    let mut out = Vec::new();
    write(&mut out, value);
    // serde_json only ever writes UTF-8.
    String::from_utf8_lossy(&out).into_owned()
}
