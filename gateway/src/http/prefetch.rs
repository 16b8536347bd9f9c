//! Which upstream NARs are being fetched ahead of Nix's request for them.
//!
//! Nix substitutes one request at a time: each path's narinfo, later its
//! NAR. Once an upstream's narinfo is served, its NAR is nearly always
//! asked for next, so a small one is fetched (and verified and imported)
//! at once, behind the narinfo's answer; the NAR request then finds it in
//! the local blocks, or waits for the fetch under way instead of starting
//! a second one.
//!
//! # Goals
//! - At most one fetch of a NAR at a time, and a bounded number at once.
//! - A NAR request for a NAR being prefetched waits for that fetch (for a
//!   bounded time), then is served as usual.
//!
//! # Non-goals
//! - Large NARs: their time is the transfer, not the round trip, and a
//!   narinfo asked for without its NAR (`nix path-info`) should not cost
//!   much upstream bandwidth. Only NARs up to `upstream_prefetch_max` bytes.
//! - Queueing: with every slot taken, a NAR is fetched when Nix asks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anchor_registry::NarHash;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// Prefetches running at once.
pub const CONCURRENT: usize = 4;

/// How long a NAR request waits for a prefetch of its NAR under way.
const WAIT: Duration = Duration::from_secs(30);

/// The prefetches under way; shared by the narinfo and NAR handlers.
#[derive(Debug)]
pub struct Prefetch {
    max_size: u64,
    slots: Arc<Semaphore>,
    running: Arc<Mutex<HashMap<NarHash, watch::Receiver<()>>>>,
}

/// One NAR's prefetch, under way while this lives; dropping it wakes
/// whoever waits for that NAR.
#[derive(Debug)]
pub struct Claim {
    nar_hash: NarHash,
    running: Arc<Mutex<HashMap<NarHash, watch::Receiver<()>>>>,
    _done: watch::Sender<()>,
    _slot: OwnedSemaphorePermit,
}

impl Prefetch {
    /// Prefetches NARs of at most `max_size` bytes, [`CONCURRENT`] at once.
    pub fn new(max_size: u64) -> Self {
        Self {
            max_size,
            slots: Arc::new(Semaphore::new(CONCURRENT)),
            running: Arc::default(),
        }
    }

    /// Claims a prefetch of this NAR: `None` when it is too large, already
    /// being fetched, or every slot is taken.
    pub fn claim(&self, nar_hash: NarHash, size: u64) -> Option<Claim> {
        if size > self.max_size {
            return None;
        }
        let mut running = lock(&self.running);
        if running.contains_key(&nar_hash) {
            return None;
        }
        let slot = self.slots.clone().try_acquire_owned().ok()?;
        let (done, waiter) = watch::channel(());
        running.insert(nar_hash, waiter);
        Some(Claim {
            nar_hash,
            running: self.running.clone(),
            _done: done,
            _slot: slot,
        })
    }

    /// Waits until a prefetch of this NAR under way ends (at most [`WAIT`]);
    /// returns at once when there is none.
    pub async fn wait(&self, nar_hash: &NarHash) {
        let waiter = lock(&self.running).get(nar_hash).cloned();
        if let Some(mut waiter) = waiter {
            // Err once the claim is dropped: that is the end being waited for.
            let _ = tokio::time::timeout(WAIT, waiter.changed()).await;
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        lock(&self.running).remove(&self.nar_hash);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nar_is_claimed_once_within_its_size_and_the_slots() {
        let prefetch = Prefetch::new(100);
        let a = NarHash::digest(b"a");
        assert!(prefetch.claim(a, 101).is_none(), "too large");
        let claim = prefetch.claim(a, 100).unwrap();
        assert!(prefetch.claim(a, 100).is_none(), "already under way");
        drop(claim);
        let again = prefetch.claim(a, 100);
        assert!(again.is_some(), "claimable again once ended");
        let others: Vec<Claim> = (1..CONCURRENT)
            .map(|i| prefetch.claim(NarHash::digest(&[i as u8]), 1).unwrap())
            .collect();
        assert!(
            prefetch
                .claim(NarHash::digest(b"one too many"), 1)
                .is_none(),
            "every slot taken"
        );
        drop(others);
        assert!(prefetch
            .claim(NarHash::digest(b"one too many"), 1)
            .is_some());
    }

    #[tokio::test]
    async fn waiting_ends_when_the_prefetch_does() {
        let prefetch = Arc::new(Prefetch::new(100));
        let a = NarHash::digest(b"a");
        // Nothing under way: no wait.
        tokio::time::timeout(Duration::from_millis(100), prefetch.wait(&a))
            .await
            .unwrap();
        let claim = prefetch.claim(a, 1).unwrap();
        let waiter = tokio::spawn({
            let prefetch = prefetch.clone();
            async move { prefetch.wait(&a).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "waits while the prefetch runs");
        drop(claim);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
