//! Counters of what the gateway did, security-relevant failures first. Plain
//! atomics: cheap on hot paths, read by `status` and `GET /metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Monotonic counters since the gateway started.
        #[derive(Debug, Default)]
        pub struct Metrics { $($(#[$doc])* pub $name: AtomicU64,)* }

        /// A point-in-time copy of [`Metrics`], for JSON and text output.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
        pub struct MetricsSnapshot { $(pub $name: u64,)* }

        impl Metrics {
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl MetricsSnapshot {
            /// Prometheus text exposition format.
            pub fn to_prometheus(&self) -> String {
                let mut out = String::new();
                $(out.push_str(&format!(concat!("nixpfs_", stringify!($name), " {}\n"), self.$name));)*
                out
            }
        }
    };
}

counters! {
    /// narinfo requests answered with a narinfo.
    narinfo_served,
    /// narinfo requests answered 404 (unknown or policy not met).
    narinfo_not_found,
    /// narinfo requests refused because registry anchors disagree.
    narinfo_conflict,
    /// narinfo requests refused because the registry naming the anchors
    /// that vouched for the path had expired.
    narinfo_registry_expired,
    /// NAR responses started.
    nar_served,
    /// NAR bytes sent.
    nar_bytes,
    /// NAR streams aborted because the bytes did not match the signed NarHash.
    nar_hash_mismatch,
    /// NAR streams aborted because a block could not be fetched or verified.
    nar_fetch_failed,
    /// Requests rejected for a missing or wrong token.
    auth_failures,
    /// Uploaded store paths accepted (narinfo matched its NAR; pinned).
    uploads_accepted,
    /// Upload requests refused (bad NAR, mismatching or unsigned narinfo…).
    uploads_rejected,
    /// Anchor sets rejected during sync (bad signature, rollback, fork…).
    sync_rejected,
    /// Anchor sets accepted during sync.
    sync_accepted,
    /// Registries refused during sync (not by the trust root, rollback,
    /// fork, expired, unauthorised rotation…).
    registry_refused,
    /// Stored anchor sets dropped because the registry no longer lists their
    /// owner under the key that signed them (removed, renamed, re-keyed).
    sets_purged,
    /// narinfo requests answered from an upstream cache's signed narinfo.
    upstream_narinfo_served,
    /// Upstream narinfos refused: no signature verified under that
    /// upstream's configured keys.
    upstream_bad_signature,
    /// Upstream requests that failed (transport, timeout, HTTP 5xx, a bad
    /// narinfo or NAR URL).
    upstream_errors,
    /// NARs downloaded from an upstream, verified and imported.
    upstream_nar_fetched,
    /// Upstream NAR downloads refused: NarHash, NarSize, FileHash or
    /// FileSize did not match, or the file did not decompress.
    upstream_nar_refused,
    /// Uncompressed NAR bytes that came from upstream caches.
    upstream_bytes,
    /// NAR bytes fetched over IPFS for Nix on a first fetch (from peers or
    /// blocks not yet verified whole).
    peer_bytes,
    /// Answers from peer gateways ignored: not a narinfo of the asked path
    /// signed by a configured upstream key, or not a valid answer at all.
    peer_answers_refused,
    /// narinfo requests answered from a peer gateway's upstream-signed narinfo.
    peer_narinfo_served,
    /// NARs pinned because `seed_fetched` is on.
    seeded_fetched,
    /// Cache pins (`seed_fetched`, `seed`) evicted to stay within
    /// `cache_max_size`.
    cache_evictions,
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
