//! Sizes as people write them in config files and flags (`50G`).

/// Parses sizes such as `10G`, `500M`, `64K` (powers of 1024) or plain bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid size {text:?}: expected e.g. 10G, 500M or 1048576"))?;
    let scale: u64 = match unit.trim_end_matches(['B', 'b', 'i']) {
        "" => 1,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        "T" | "t" => 1 << 40,
        _ => return Err(format!("invalid size unit in {text:?}: use K, M, G or T")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("size {text:?} is too large"))
}
