//! 100,000 random, truncated and mutated NARs: the strict parser returns an
//! error or a summary whose hash is that of the bytes, never a panic. And
//! compressed NARs whose headers ask for more decoder memory than allowed
//! (an xz dictionary of 4 GiB, a zstd window of 1 GiB) are refused before
//! the decoder allocates it, while the same streams with modest headers
//! decode.

// Test fixtures built from constants: a failure is a bug in the test itself.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};

use gateway::store::nar;
use gateway::store::nar::compression::{Compression, XZ_MEMLIMIT, ZSTD_WINDOW_LOG_MAX};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn sample_nar() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("t");
    std::fs::create_dir_all(root.join("d/e")).unwrap();
    std::fs::write(root.join("d/file"), b"contents").unwrap();
    std::fs::write(root.join("d/e/x"), vec![1u8; 300]).unwrap();
    std::os::unix::fs::symlink("d/file", root.join("link")).unwrap();
    let mut out = Vec::new();
    nar::dump(&root, &mut out).unwrap();
    out
}

#[test]
fn hundred_thousand_hostile_nars_never_panic() {
    let valid = sample_nar();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut accepted = 0;
    for _ in 0..100_000 {
        let input: Vec<u8> = match rng.below(3) {
            0 => (0..rng.below(600)).map(|_| rng.next() as u8).collect(),
            1 => valid[..rng.below(valid.len() + 1)].to_vec(),
            _ => {
                let mut v = valid.clone();
                for _ in 0..=rng.below(3) {
                    let i = rng.below(v.len());
                    v[i] = rng.next() as u8;
                }
                v
            }
        };
        if let Ok(summary) = nar::validate(&input[..]) {
            accepted += 1;
            assert_eq!(summary.nar_size, input.len() as u64);
            assert_eq!(
                summary.nar_hash,
                anchor_registry::NarHash::digest(&input),
                "an accepted NAR's hash is the hash of its bytes"
            );
        }
    }
    assert!(accepted > 0, "the full sample itself must validate");
}

/// Decodes `data` whole with the gateway's decoder for `c`.
fn decode(c: Compression, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    c.decoder(data)?.read_to_end(&mut out)?;
    Ok(out)
}

/// CRC-32 (IEEE), as xz block headers carry it.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// `plain` as xz whose LZMA2 block header declares dictionary size code
/// `props` (2^(props/2+12) bytes for even codes; 40 means 4 GiB), with the
/// header's CRC fixed: what a hostile cache may send without the encoder
/// memory such a dictionary would need.
fn xz_declaring_dictionary(plain: &[u8], props: u8) -> Vec<u8> {
    let mut enc = xz2::write::XzEncoder::new(Vec::new(), 0);
    enc.write_all(plain).unwrap();
    let mut xz = enc.finish().unwrap();
    let start = 12; // after the stream header
    let size = (usize::from(xz[start]) + 1) * 4;
    let flags = xz[start + 1];
    assert_eq!(flags & 0x03, 0, "one filter");
    let mut at = start + 2;
    // Optional compressed and uncompressed sizes (varints).
    for present in [flags & 0x40 != 0, flags & 0x80 != 0] {
        if present {
            while xz[at] & 0x80 != 0 {
                at += 1;
            }
            at += 1;
        }
    }
    assert_eq!(
        &xz[at..at + 2],
        &[0x21, 0x01],
        "LZMA2 filter with one props byte"
    );
    xz[at + 2] = props;
    let crc = crc32(&xz[start..start + size - 4]);
    xz[start + size - 4..start + size].copy_from_slice(&crc.to_le_bytes());
    xz
}

#[test]
fn an_xz_nar_declaring_a_4_gib_dictionary_is_refused_and_64_mib_decodes() {
    const { assert!(XZ_MEMLIMIT < 4 << 30) };
    let plain = sample_nar();
    let modest = xz_declaring_dictionary(&plain, 28); // 2^26: 64 MiB
    assert_eq!(decode(Compression::Xz, &modest).unwrap(), plain);
    let hostile = xz_declaring_dictionary(&plain, 40); // 4 GiB
    let err = decode(Compression::Xz, &hostile).unwrap_err().to_string();
    assert!(
        err.contains("xz") && err.to_lowercase().contains("memory"),
        "{err}"
    );
}

/// `plain` as one zstd frame whose header declares a window of
/// 2^`window_log` bytes.
fn zstd_declaring_window(plain: &[u8], window_log: u8) -> Vec<u8> {
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    enc.include_contentsize(false).unwrap();
    enc.write_all(plain).unwrap();
    let mut frame = enc.finish().unwrap();
    assert_eq!(&frame[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
    let descriptor = frame[4];
    assert_eq!(
        descriptor & 0x20,
        0,
        "not single-segment: a window descriptor follows"
    );
    assert_eq!(descriptor & 0x03, 0, "no dictionary id");
    // Window descriptor: exponent (window log - 10) in the top 5 bits.
    frame[5] = (window_log - 10) << 3;
    frame
}

#[test]
fn a_zstd_nar_declaring_a_1_gib_window_is_refused_and_the_limit_decodes() {
    let plain = sample_nar();
    let modest = zstd_declaring_window(&plain, ZSTD_WINDOW_LOG_MAX as u8);
    assert_eq!(decode(Compression::Zstd, &modest).unwrap(), plain);
    let hostile = zstd_declaring_window(&plain, 30);
    let err = decode(Compression::Zstd, &hostile).unwrap_err().to_string();
    assert!(err.contains("zstd"), "{err}");
}
