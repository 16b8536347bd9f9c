//! Which store paths a build result refers to, found as Nix finds them: by
//! the 32-character hash part of each candidate path, anywhere in its NAR.
//! Needed for a `<out>.check` result, which Nix never registers.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read};

use anchor_registry::StorePath;

/// Length of a store path's hash part.
const HASH_LEN: usize = 32;

/// Nix's base32 alphabet: the only bytes a hash part is made of.
fn is_nix32(byte: u8) -> bool {
    matches!(byte, b'0'..=b'9' | b'a'..=b'd' | b'f'..=b'n' | b'p'..=b's' | b'v'..=b'z')
}

/// Scans a byte stream, fed in pieces of any size, for candidate paths.
#[derive(Debug, Clone)]
pub struct RefScan {
    wanted: HashMap<[u8; HASH_LEN], StorePath>,
    found: BTreeSet<StorePath>,
    /// The last bytes seen (fewer than a hash part), so a hash part split
    /// across two pieces is still found.
    tail: Vec<u8>,
}

impl RefScan {
    /// A scanner for these candidates (Nix's are the build's input closure
    /// and its own outputs).
    pub fn new(candidates: impl IntoIterator<Item = StorePath>) -> Self {
        let mut wanted = HashMap::new();
        for path in candidates {
            let mut key = [0u8; HASH_LEN];
            key.copy_from_slice(path.hash().as_str().as_bytes());
            wanted.insert(key, path);
        }
        Self {
            wanted,
            found: BTreeSet::new(),
            tail: Vec::new(),
        }
    }

    /// Scans the next piece of the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        if !self.tail.is_empty() {
            let mut joined = std::mem::take(&mut self.tail);
            joined.extend_from_slice(&bytes[..bytes.len().min(HASH_LEN - 1)]);
            self.scan(&joined);
            self.tail = joined;
        }
        self.scan(bytes);
        let keep = HASH_LEN - 1;
        if bytes.len() >= keep {
            self.tail.clear();
            self.tail.extend_from_slice(&bytes[bytes.len() - keep..]);
        } else {
            // `tail` now holds the old tail followed by all of `bytes`.
            if self.tail.is_empty() {
                self.tail.extend_from_slice(bytes);
            }
            let excess = self.tail.len().saturating_sub(keep);
            self.tail.drain(..excess);
        }
    }

    /// Every window of `data`; a byte outside the alphabet skips all windows
    /// that contain it, so the scan is linear.
    fn scan(&mut self, data: &[u8]) {
        let mut i = 0;
        while i + HASH_LEN <= data.len() {
            let window = &data[i..i + HASH_LEN];
            match window.iter().rposition(|b| !is_nix32(*b)) {
                Some(bad) => i += bad + 1,
                None => {
                    if let Some(path) = <[u8; HASH_LEN]>::try_from(window)
                        .ok()
                        .and_then(|key| self.wanted.get(&key))
                    {
                        self.found.insert(path.clone());
                    }
                    i += 1;
                }
            }
        }
    }

    /// The candidates seen so far.
    pub fn found(&self) -> &BTreeSet<StorePath> {
        &self.found
    }
}

/// A pass-through reader that scans every byte read for references.
#[derive(Debug)]
pub struct ScanReader<R> {
    inner: R,
    scan: RefScan,
}

impl<R> ScanReader<R> {
    pub fn new(inner: R, scan: RefScan) -> Self {
        Self { inner, scan }
    }

    /// The candidates referred to by the bytes read so far.
    pub fn references(&self) -> &BTreeSet<StorePath> {
        self.scan.found()
    }

    /// The wrapped reader.
    pub fn inner(&self) -> &R {
        &self.inner
    }
}

impl<R: Read> Read for ScanReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.scan.feed(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn path(hash: &str, name: &str) -> StorePath {
        StorePath::parse(&format!("/nix/store/{hash}-{name}")).unwrap()
    }

    fn candidates() -> Vec<StorePath> {
        vec![
            path("lla3swdphcnspmq04zaq3hqk1rwclcdm", "self"),
            path("ja6626fva3fhh8mbc88bv9z4aa4agqch", "dep"),
            path("v73qyz82r620bqm2l7yb0fgd6lvfmd5r", "unused"),
        ]
    }

    fn sample() -> Vec<u8> {
        let mut bytes =
            b"\0\0nix-archive-1 /nix/store/lla3swdphcnspmq04zaq3hqk1rwclcdm-self/bin ".to_vec();
        bytes.extend_from_slice(&[0xff; 40]);
        bytes.extend_from_slice(b"xxja6626fva3fhh8mbc88bv9z4aa4agqch");
        bytes.extend_from_slice(b" v73qyz82r620bqm2l7yb0fgd6lvfmd5 (one char short)");
        bytes
    }

    #[test]
    fn finds_hash_parts_anywhere_but_not_prefixes() {
        let mut scan = RefScan::new(candidates());
        scan.feed(&sample());
        let names: Vec<_> = scan.found().iter().map(|p| p.name().to_owned()).collect();
        assert_eq!(names, ["dep", "self"]);
    }

    #[test]
    fn reader_scans_what_passes_through() {
        let bytes = sample();
        let mut reader = ScanReader::new(&bytes[..], RefScan::new(candidates()));
        let mut sink = Vec::new();
        reader.read_to_end(&mut sink).unwrap();
        assert_eq!(sink, sample());
        assert_eq!(reader.references().len(), 2);
    }

    proptest! {
        #[test]
        fn split_points_do_not_change_what_is_found(cuts in proptest::collection::vec(0usize..200, 0..12)) {
            let bytes = sample();
            let mut whole = RefScan::new(candidates());
            whole.feed(&bytes);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut pieces = RefScan::new(candidates());
            let mut start = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                pieces.feed(&bytes[start..cut]);
                start = cut;
            }
            prop_assert_eq!(whole.found(), pieces.found());
        }
    }
}
