//! What is fetched ahead of Nix's requests for it: upstream narinfos and
//! small NARs.
//!
//! Nix substitutes one request at a time: it walks a closure narinfo by
//! narinfo, then asks for the NARs. Every round trip to a cold gateway
//! costs an upstream request (or a question to peer gateways), so the
//! gateway asks ahead of Nix:
//! - once a narinfo an upstream signed is served, the narinfos of its
//!   references (Nix asks for them next, unless it holds them) are looked
//!   up in the background, so they are answered from memory;
//! - once such a narinfo is served to Nix, its NAR, if small, is fetched
//!   (and verified and imported) at once; the NAR request then finds it in
//!   the local blocks, or waits for the fetch under way instead of
//!   starting a second one. A NAR that only peers offer, on a gateway
//!   that does not seed what it fetches (`seed_fetched` off), is not
//!   imported: it is held in memory, verified, until Nix asks for it.
//!
//! # Goals
//! - At most one lookup of a narinfo and one fetch of a NAR at a time, and
//!   a bounded number at once; a request for either under way waits for it
//!   (for a bounded time), then is answered as usual.
//! - Work waiting for a free slot holds up no request: Nix's request for
//!   that narinfo or NAR takes it off the queue and does it itself.
//!
//! # Non-goals
//! - Large NARs: their time is the transfer, not the round trip, and a
//!   narinfo asked for without its NAR (`nix path-info`) should not cost
//!   much upstream bandwidth. Only NARs up to `upstream_prefetch_max` bytes,
//!   and only those of narinfos Nix asked for (a reference Nix already
//!   holds costs its narinfo, never its NAR).
//! - Looking further ahead than one step: each narinfo Nix asks for leads
//!   to its own references' lookups.
//! - Unbounded queues: past [`QUEUED`] waiting, Nix's requests do the work.
//! - Unbounded memory: past [`HELD_BYTES`] held, the oldest NARs held go
//!   (Nix's request for one of them then fetches it again).

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anchor_registry::{NarHash, StorePathHash};
use bytes::Bytes;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::store::index::UpstreamPath;
use crate::util::sync::lock;

/// NAR prefetches running at once.
pub const CONCURRENT: usize = 4;

/// Narinfo lookups ahead of Nix running at once: each is mostly waiting for
/// an upstream's answer.
pub const LOOKUPS: usize = 8;

/// Fetches or lookups waiting for a slot, at most, of each kind; more are
/// left for Nix to ask.
const QUEUED: usize = 4096;

/// Narinfos looked up ahead and not yet asked for, at most (then forgotten).
const AHEAD: usize = 8192;

/// Bytes of verified NARs held in memory for Nix, at most.
pub const HELD_BYTES: u64 = 64 * 1024 * 1024;

/// How long a request waits for a fetch or lookup of the same thing.
const WAIT: Duration = Duration::from_secs(30);

/// The fetches and lookups ahead of Nix; shared by the narinfo and NAR
/// handlers.
#[derive(Debug)]
pub struct Prefetch {
    max_size: u64,
    /// NAR fetches, by NarHash.
    pub nars: Ahead<NarHash>,
    /// Narinfo lookups, by store path hash.
    pub narinfos: Ahead<StorePathHash>,
    looked_ahead: Mutex<HashMap<StorePathHash, UpstreamPath>>,
    held: Mutex<Held>,
}

/// Verified NARs held in memory until Nix asks for them, oldest first.
#[derive(Debug, Default)]
struct Held {
    order: VecDeque<NarHash>,
    nars: HashMap<NarHash, Bytes>,
    bytes: u64,
}

impl Prefetch {
    /// Prefetches NARs of at most `max_size` bytes, [`CONCURRENT`] at once,
    /// and looks up narinfos [`LOOKUPS`] at once.
    pub fn new(max_size: u64) -> Self {
        Self {
            max_size,
            nars: Ahead::new(CONCURRENT),
            narinfos: Ahead::new(LOOKUPS),
            looked_ahead: Mutex::default(),
            held: Mutex::default(),
        }
    }

    /// Holds a NAR's bytes, verified against `nar_hash` by the caller,
    /// until [`take_held`](Self::take_held); the oldest held go while more
    /// than [`HELD_BYTES`] are.
    pub fn hold(&self, nar_hash: NarHash, nar: Bytes) {
        let len = nar.len() as u64;
        if len > HELD_BYTES {
            return;
        }
        let mut held = lock(&self.held);
        if let Some(old) = held.nars.insert(nar_hash, nar) {
            held.bytes -= old.len() as u64;
        } else {
            held.order.push_back(nar_hash);
        }
        held.bytes += len;
        while held.bytes > HELD_BYTES {
            let Some(oldest) = held.order.pop_front() else {
                break;
            };
            if let Some(gone) = held.nars.remove(&oldest) {
                held.bytes -= gone.len() as u64;
            }
        }
    }

    /// The held bytes of this NAR, once: Nix asked for it.
    pub fn take_held(&self, nar_hash: &NarHash) -> Option<Bytes> {
        let mut held = lock(&self.held);
        let nar = held.nars.remove(nar_hash)?;
        held.bytes -= nar.len() as u64;
        if let Some(at) = held.order.iter().position(|h| h == nar_hash) {
            held.order.remove(at);
        }
        Some(nar)
    }

    /// Whether a NAR of this size is fetched ahead.
    pub fn small_enough(&self, size: u64) -> bool {
        size <= self.max_size
    }

    /// Keeps a path looked up ahead until Nix asks for its narinfo.
    pub fn looked_ahead(&self, path: UpstreamPath) {
        let mut ahead = lock(&self.looked_ahead);
        if ahead.len() >= AHEAD {
            ahead.clear();
        }
        ahead.insert(*path.narinfo.store_path.hash(), path);
    }

    /// The path looked up ahead under this hash, once: Nix asked for it.
    pub fn take_looked_ahead(&self, hash: &StorePathHash) -> Option<UpstreamPath> {
        lock(&self.looked_ahead).remove(hash)
    }
}

/// Work of one kind done ahead of Nix: queued, then run in a bounded number
/// of slots, one run per key at a time.
#[derive(Debug)]
pub struct Ahead<K> {
    slots: Arc<Semaphore>,
    queued: Arc<Mutex<HashSet<K>>>,
    running: Arc<Mutex<HashMap<K, watch::Receiver<()>>>>,
}

/// A key queued ahead of Nix; dropping it unqueues the key.
#[derive(Debug)]
pub struct Queued<K: Eq + Hash> {
    key: K,
    queued: Arc<Mutex<HashSet<K>>>,
}

/// One key's work, under way while this lives; dropping it wakes whoever
/// waits for that key.
#[derive(Debug)]
pub struct Running<K: Eq + Hash> {
    key: K,
    running: Arc<Mutex<HashMap<K, watch::Receiver<()>>>>,
    _done: watch::Sender<()>,
}

impl<K: Eq + Hash + Copy> Ahead<K> {
    fn new(slots: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(slots)),
            queued: Arc::default(),
            running: Arc::default(),
        }
    }

    /// Queues work on `key`: `None` when it is queued already or the queue
    /// is full.
    pub fn queue(&self, key: K) -> Option<Queued<K>> {
        let mut queued = lock(&self.queued);
        if queued.len() >= QUEUED || !queued.insert(key) {
            return None;
        }
        Some(Queued {
            key,
            queued: self.queued.clone(),
        })
    }

    /// Takes `key` off the queue: a request does that work itself.
    pub fn unqueue(&self, key: &K) {
        lock(&self.queued).remove(key);
    }

    /// A slot for one run, once one is free; then whether its key is still
    /// queued (not taken off by a request meanwhile).
    pub async fn slot(&self, queued: &Queued<K>) -> Option<OwnedSemaphorePermit> {
        let slot = self.slots.clone().acquire_owned().await.ok()?;
        lock(&self.queued).contains(&queued.key).then_some(slot)
    }

    /// A queued key's turn to run: a free slot, the key still queued, and
    /// no run of it under way; `None` when a request took it meanwhile.
    pub async fn turn(&self, queued: &Queued<K>) -> Option<(OwnedSemaphorePermit, Running<K>)> {
        let slot = self.slot(queued).await?;
        Some((slot, self.claim(queued.key)?))
    }

    /// Claims the work on `key`: `None` when it is under way.
    pub fn claim(&self, key: K) -> Option<Running<K>> {
        let mut running = lock(&self.running);
        if running.contains_key(&key) {
            return None;
        }
        let (done, waiter) = watch::channel(());
        running.insert(key, waiter);
        Some(Running {
            key,
            running: self.running.clone(),
            _done: done,
        })
    }

    /// Waits until work on `key` under way ends (at most [`WAIT`]); returns
    /// at once when there is none.
    pub async fn wait(&self, key: &K) {
        let waiter = lock(&self.running).get(key).cloned();
        if let Some(mut waiter) = waiter {
            // Err once the claim is dropped: that is the end being waited for.
            let _ = tokio::time::timeout(WAIT, waiter.changed()).await;
        }
    }
}

impl<K: Eq + Hash> Drop for Queued<K> {
    fn drop(&mut self) {
        lock(&self.queued).remove(&self.key);
    }
}

impl<K: Eq + Hash> Drop for Running<K> {
    fn drop(&mut self) {
        lock(&self.running).remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_is_queued_once_run_in_the_slots_and_skipped_once_a_request_took_it() {
        let ahead = Ahead::new(2);
        let a = NarHash::digest(b"a");
        let queued = ahead.queue(a).unwrap();
        assert!(ahead.queue(a).is_none(), "queued already");
        drop(queued);
        let queued = ahead.queue(a).expect("queueable again once unqueued");
        let slot = ahead.slot(&queued).await;
        assert!(slot.is_some(), "a free slot, and still queued");
        drop(slot);
        ahead.unqueue(&a);
        assert!(
            ahead.slot(&queued).await.is_none(),
            "a request took it off the queue"
        );
        // Both slots taken: a third run waits for one.
        let (b, c, d) = (
            NarHash::digest(b"b"),
            NarHash::digest(b"c"),
            NarHash::digest(b"d"),
        );
        let (qb, qc, qd) = (
            ahead.queue(b).unwrap(),
            ahead.queue(c).unwrap(),
            ahead.queue(d).unwrap(),
        );
        let sb = ahead.slot(&qb).await.unwrap();
        let _sc = ahead.slot(&qc).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), ahead.slot(&qd))
                .await
                .is_err(),
            "every slot taken"
        );
        drop(sb);
        assert!(ahead.slot(&qd).await.is_some());
    }

    #[test]
    fn held_nars_are_taken_once_and_the_oldest_go_past_the_budget() {
        let prefetch = Prefetch::new(100);
        let (a, b, c) = (
            NarHash::digest(b"a"),
            NarHash::digest(b"b"),
            NarHash::digest(b"c"),
        );
        let half = (HELD_BYTES / 2) as usize;
        prefetch.hold(a, Bytes::from(vec![1; half]));
        prefetch.hold(b, Bytes::from(vec![2; half]));
        assert_eq!(prefetch.take_held(&b).map(|n| n[0]), Some(2));
        assert_eq!(prefetch.take_held(&b), None, "taken once");
        // b's room is free again: c fits beside a.
        prefetch.hold(c, Bytes::from(vec![3; half]));
        assert!(lock(&prefetch.held).nars.contains_key(&a));
        // One byte more than fits: the oldest, a, goes.
        prefetch.hold(b, Bytes::from(vec![2; 1]));
        assert_eq!(prefetch.take_held(&a), None, "evicted");
        assert_eq!(prefetch.take_held(&c).map(|n| n.len()), Some(half));
        assert_eq!(prefetch.take_held(&b).map(|n| n.len()), Some(1));
        let held = lock(&prefetch.held);
        assert_eq!((held.bytes, held.order.len()), (0, 0));
        drop(held);
        // Larger than the whole budget: not held at all.
        prefetch.hold(a, Bytes::from(vec![0; HELD_BYTES as usize + 1]));
        assert_eq!(prefetch.take_held(&a), None);
    }

    #[tokio::test]
    async fn one_run_per_key_and_waiting_ends_when_it_does() {
        let ahead = Arc::new(Ahead::new(1));
        let a = NarHash::digest(b"a");
        // Nothing under way: no wait.
        tokio::time::timeout(Duration::from_millis(100), ahead.wait(&a))
            .await
            .unwrap();
        let claim = ahead.claim(a).unwrap();
        assert!(ahead.claim(a).is_none(), "one run at a time");
        let waiter = tokio::spawn({
            let ahead = ahead.clone();
            async move { ahead.wait(&a).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "waits while the run is under way");
        drop(claim);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(ahead.claim(a).is_some(), "claimable again once ended");
    }

    #[test]
    fn a_path_looked_up_ahead_is_kept_until_asked_once() {
        let prefetch = Prefetch::new(100);
        assert!(prefetch.small_enough(100) && !prefetch.small_enough(101));
        let store_path =
            anchor_registry::StorePath::parse("/nix/store/0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-up")
                .unwrap();
        let hash = *store_path.hash();
        prefetch.looked_ahead(UpstreamPath {
            upstream: "http://127.0.0.1:1".to_owned(),
            narinfo: anchor_registry::NarInfo {
                store_path,
                url: "nar/x.nar".into(),
                compression: None,
                file_hash: None,
                file_size: None,
                nar_hash: NarHash::digest(b"nar"),
                nar_size: 3,
                references: Vec::new(),
                deriver: None,
                sigs: Vec::new(),
                ca: None,
            },
        });
        assert!(prefetch.take_looked_ahead(&hash).is_some());
        assert!(prefetch.take_looked_ahead(&hash).is_none(), "taken once");
    }
}
