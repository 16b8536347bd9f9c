//! The compressions a Nix binary cache may store NARs in, and their
//! decoders with bounded memory: a hostile or broken upstream must not make
//! the gateway allocate more than a few hundred MiB for one stream.
//!
//! # Goals
//! - Read what `nix copy --to file://…?compression=…` and cache.nixos.org
//!   write: `none`, `xz`, `zstd`, `bzip2` (also what an absent
//!   `Compression:` means to Nix).
//! - Errors name the decoder, so a log reads "xz data: …".
//!
//! # Non-goals
//! - Compressing: nixpfs stores and serves NARs uncompressed.
//! - `br`, `lz4`, `gzip`: rare on real caches; refused by name.

use std::fmt;
use std::io::{self, Read};

/// Most memory the xz decoder may use (xz -9 needs 65 MiB, `-e` dictionaries
/// up to 1.5 GiB are refused).
pub const XZ_MEMLIMIT: u64 = 256 << 20;
/// Largest zstd window accepted, as a power of two (128 MiB, zstd's own
/// default limit; `--long=31` streams are refused).
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;

/// A NAR file's compression, as narinfo `Compression:` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Xz,
    Zstd,
    Bzip2,
}

/// A `Compression:` value this gateway cannot decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported NAR compression {0:?} (supported: none, xz, zstd, bzip2)")]
pub struct UnsupportedCompression(pub String);

impl Compression {
    /// Reads a narinfo's `Compression:` field; absent means bzip2 to Nix.
    pub fn from_narinfo(field: Option<&str>) -> Result<Self, UnsupportedCompression> {
        match field {
            None | Some("bzip2") => Ok(Compression::Bzip2),
            Some("none") | Some("") => Ok(Compression::None),
            Some("xz") => Ok(Compression::Xz),
            Some("zstd") => Ok(Compression::Zstd),
            Some(other) => Err(UnsupportedCompression(other.to_owned())),
        }
    }

    /// The name Nix uses in `?compression=` and narinfo `Compression:`.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
        }
    }

    /// A reader of the uncompressed bytes of `input`, within the memory
    /// limits above.
    pub fn decoder<'a, R: Read + Send + 'a>(
        self,
        input: R,
    ) -> io::Result<Box<dyn Read + Send + 'a>> {
        Ok(match self {
            Compression::None => Box::new(input),
            Compression::Xz => {
                let stream =
                    xz2::stream::Stream::new_stream_decoder(XZ_MEMLIMIT, xz2::stream::CONCATENATED)
                        .map_err(|e| io::Error::other(format!("xz decoder: {e}")))?;
                Box::new(Labeled {
                    what: "xz",
                    inner: xz2::read::XzDecoder::new_stream(io::BufReader::new(input), stream),
                })
            }
            Compression::Zstd => {
                let mut decoder = zstd::stream::read::Decoder::new(input)?;
                decoder.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
                Box::new(Labeled {
                    what: "zstd",
                    inner: decoder,
                })
            }
            Compression::Bzip2 => Box::new(Labeled {
                what: "bzip2",
                inner: bzip2::read::MultiBzDecoder::new(input),
            }),
        })
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Names the decompressor in its errors.
struct Labeled<R> {
    what: &'static str,
    inner: R,
}

impl<R: Read> Read for Labeled<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner
            .read(buf)
            .map_err(|e| io::Error::new(e.kind(), format!("{} data: {e}", self.what)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn roundtrip(c: Compression, compressed: Vec<u8>, plain: &[u8]) {
        let mut out = Vec::new();
        c.decoder(&compressed[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, plain, "{c}");
    }

    #[test]
    fn decodes_every_supported_compression() {
        let plain: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        roundtrip(Compression::None, plain.clone(), &plain);
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(&plain).unwrap();
        roundtrip(Compression::Xz, xz.finish().unwrap(), &plain);
        roundtrip(
            Compression::Zstd,
            zstd::stream::encode_all(&plain[..], 3).unwrap(),
            &plain,
        );
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        bz.write_all(&plain).unwrap();
        roundtrip(Compression::Bzip2, bz.finish().unwrap(), &plain);
    }

    #[test]
    fn garbage_is_an_error_naming_the_decoder() {
        let err = {
            let mut out = Vec::new();
            Compression::Xz
                .decoder(&b"not xz at all"[..])
                .unwrap()
                .read_to_end(&mut out)
                .unwrap_err()
        };
        assert!(err.to_string().starts_with("xz data"), "{err}");
    }

    #[test]
    fn narinfo_names_parse_and_absent_means_bzip2() {
        assert_eq!(Compression::from_narinfo(None), Ok(Compression::Bzip2));
        assert_eq!(Compression::from_narinfo(Some("xz")), Ok(Compression::Xz));
        assert_eq!(
            Compression::from_narinfo(Some("zstd")),
            Ok(Compression::Zstd)
        );
        assert_eq!(
            Compression::from_narinfo(Some("none")),
            Ok(Compression::None)
        );
        assert!(Compression::from_narinfo(Some("br")).is_err());
    }
}
