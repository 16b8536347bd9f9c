//! The last line of defence before bytes reach Nix: a NAR stream whose whole
//! sha256 and size are checked against the NarHash the anchors signed, with
//! the final chunk held back until the check passes. On a mismatch the stream
//! ends in an error, so the HTTP response is cut short and Nix never receives
//! a complete body that claims to be valid.

use std::pin::Pin;
use std::task::{Context, Poll};

use anchor_registry::NarHash;
use bytes::Bytes;
use futures::Stream;
use sha2::{Digest, Sha256};

/// Why a NAR stream was cut off.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("NAR hash mismatch: anchors signed {expected}, bytes hash to {got}")]
    HashMismatch { expected: NarHash, got: NarHash },
    #[error("NAR size mismatch: anchors signed {expected} bytes, got {got}")]
    SizeMismatch { expected: u64, got: u64 },
    #[error("NAR source failed: {0}")]
    Source(String),
}

/// Called once when a stream fails verification (to log and count it).
type OnMismatch = Box<dyn FnOnce(&VerifyError) + Send>;

/// Wraps a stream of NAR chunks; see the module docs.
pub struct VerifiedNar<S> {
    inner: S,
    hasher: Sha256,
    expected_hash: NarHash,
    expected_size: u64,
    seen: u64,
    held: Option<Bytes>,
    done: bool,
    on_mismatch: Option<OnMismatch>,
}

impl<S> std::fmt::Debug for VerifiedNar<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedNar")
            .field("expected_hash", &self.expected_hash)
            .field("expected_size", &self.expected_size)
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

impl<S> VerifiedNar<S> {
    /// `on_mismatch` runs once when verification fails (log and count it).
    pub fn new(
        inner: S,
        expected_hash: NarHash,
        expected_size: u64,
        on_mismatch: impl FnOnce(&VerifyError) + Send + 'static,
    ) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            expected_hash,
            expected_size,
            seen: 0,
            held: None,
            done: false,
            on_mismatch: Some(Box::new(on_mismatch)),
        }
    }

    fn fail(&mut self, err: VerifyError) -> Poll<Option<Result<Bytes, VerifyError>>> {
        self.done = true;
        self.held = None;
        if let Some(report) = self.on_mismatch.take() {
            report(&err);
        }
        Poll::Ready(Some(Err(err)))
    }

    fn finish(&mut self) -> Poll<Option<Result<Bytes, VerifyError>>> {
        let digest: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
        let got = NarHash::from_bytes(digest);
        if self.seen != self.expected_size {
            let (expected, got) = (self.expected_size, self.seen);
            return self.fail(VerifyError::SizeMismatch { expected, got });
        }
        if got != self.expected_hash {
            let expected = self.expected_hash;
            return self.fail(VerifyError::HashMismatch { expected, got });
        }
        self.done = true;
        Poll::Ready(self.held.take().map(Ok))
    }
}

impl<S, E> Stream for VerifiedNar<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    type Item = Result<Bytes, VerifyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return this.finish(),
                Poll::Ready(Some(Err(e))) => return this.fail(VerifyError::Source(e.to_string())),
                Poll::Ready(Some(Ok(chunk))) => {
                    if chunk.is_empty() {
                        continue;
                    }
                    this.seen += chunk.len() as u64;
                    if this.seen > this.expected_size {
                        let (expected, got) = (this.expected_size, this.seen);
                        return this.fail(VerifyError::SizeMismatch { expected, got });
                    }
                    this.hasher.update(&chunk);
                    if let Some(previous) = this.held.replace(chunk) {
                        return Poll::Ready(Some(Ok(previous)));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{executor::block_on, stream, StreamExt};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn chunks(data: &[u8], size: usize) -> Vec<Result<Bytes, std::io::Error>> {
        data.chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect()
    }

    fn collect(data: &[u8], hash: NarHash, size: u64) -> (Vec<Result<Bytes, VerifyError>>, usize) {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let s = VerifiedNar::new(stream::iter(chunks(data, 7)), hash, size, move |_| {
            c.fetch_add(1, Ordering::SeqCst);
        });
        let items = block_on(s.collect::<Vec<_>>());
        (items, count.load(Ordering::SeqCst))
    }

    #[test]
    fn passes_through_matching_bytes_unchanged() {
        let data: Vec<u8> = (0..100u8).collect();
        let (items, mismatches) = collect(&data, NarHash::digest(&data), 100);
        let out: Vec<u8> = items
            .into_iter()
            .flat_map(|r| r.unwrap().to_vec())
            .collect();
        assert_eq!(out, data);
        assert_eq!(mismatches, 0);
    }

    #[test]
    fn withholds_the_last_chunk_when_the_hash_differs() {
        let data: Vec<u8> = (0..100u8).collect();
        let mut bad = data.clone();
        bad[99] ^= 1;
        let (items, mismatches) = collect(&bad, NarHash::digest(&data), 100);
        let delivered: usize = items
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|b| b.len())
            .sum();
        assert!(delivered < 100, "a full body must never be delivered");
        assert!(matches!(
            items.last(),
            Some(Err(VerifyError::HashMismatch { .. }))
        ));
        assert_eq!(mismatches, 1);
    }

    #[test]
    fn rejects_short_and_long_streams() {
        let data: Vec<u8> = (0..100u8).collect();
        let (items, _) = collect(&data[..50], NarHash::digest(&data), 100);
        assert!(matches!(
            items.last(),
            Some(Err(VerifyError::SizeMismatch { .. }))
        ));
        let (items, _) = collect(&data, NarHash::digest(&data[..50]), 50);
        assert!(matches!(
            items.last(),
            Some(Err(VerifyError::SizeMismatch { .. }))
        ));
    }
}
