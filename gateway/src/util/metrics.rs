//! Counters of what the gateway did, security-relevant failures first, and
//! request-duration histograms. Plain atomics: cheap on hot paths, read by
//! `status` and `GET /metrics`, which writes them in Prometheus' text
//! exposition format (a `# HELP` and `# TYPE` line per family, counters
//! named `…_total`, as `promtool check metrics` wants).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Monotonic counters since the gateway started, and the request
        /// durations.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
            /// How long narinfo requests took to answer.
            pub narinfo_seconds: Histogram,
            /// How long NAR requests took until the response started (the
            /// body then streams as fast as the client reads).
            pub nar_seconds: Histogram,
            /// NARs being imported into the block store now (a gauge): an
            /// import may go on after Nix got every verified byte.
            pub nar_imports_running: AtomicU64,
        }

        /// A point-in-time copy of the counters of [`Metrics`], for JSON and
        /// text output.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
        pub struct MetricsSnapshot { $(pub $name: u64,)* }

        impl Metrics {
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }

            /// Every counter and histogram, in the text exposition format.
            pub fn to_prometheus(&self) -> String {
                let mut out = Exposition::default();
                self.expose(&mut out);
                out.finish()
            }

            /// Writes every counter and histogram into `out`.
            pub fn expose(&self, out: &mut Exposition) {
                $(out.counter(
                    concat!("nixpfs_", stringify!($name)),
                    &help(&[$($doc),*]),
                    self.$name.load(Ordering::Relaxed),
                );)*
                out.histogram(
                    "nixpfs_narinfo_request_seconds",
                    "How long narinfo requests took to answer.",
                    &self.narinfo_seconds,
                );
                out.histogram(
                    "nixpfs_nar_response_seconds",
                    "How long NAR requests took until the response started.",
                    &self.nar_seconds,
                );
                out.gauge(
                    "nixpfs_nar_imports_running",
                    "NARs being imported into the block store now.",
                    self.nar_imports_running.load(Ordering::Relaxed),
                );
            }
        }
    };
}

/// A metric's help text from its doc comment's lines, on one line.
fn help(lines: &[&str]) -> String {
    lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
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
    /// Reads of store-backed blocks refused because the pinned store path
    /// vanished or changed since it was pinned (nothing served from it).
    store_blocks_refused,
    /// HTTP connections closed because the client did not send a request
    /// header within the header read timeout (slowloris).
    http_header_timeouts,
    /// HTTP connections closed because no request came for the idle
    /// timeout (keep-alive between requests, HTTP/2 with no stream).
    http_idle_timeouts,
    /// HTTP connections closed because the client accepted no byte of its
    /// response for the send timeout (it stopped reading).
    http_send_timeouts,
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
    /// Set sources refused before reading: not a regular file (a FIFO, a
    /// device, a directory) or over the 1 GiB document limit.
    sources_refused,
    /// Stored anchor sets dropped because the registry no longer lists their
    /// owner under the key that signed them (removed, renamed, re-keyed).
    sets_purged,
    /// IPNS records resolved and believed (the newest for their name).
    ipns_resolved,
    /// IPNS records refused: not signed by the name's key, expired,
    /// malformed, oversized, or older than the highest sequence seen.
    ipns_refused,
    /// IPNS records this gateway signed and published (or republished).
    ipns_published,
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
    /// Of those, fetched ahead of Nix's request, once their narinfo was
    /// served (`upstream_prefetch_max`).
    upstream_nar_prefetched,
    /// Upstream-signed narinfos looked up (from the upstreams or peer
    /// gateways) ahead of Nix's request, as references of one it asked for.
    narinfo_looked_ahead,
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
    /// Upstream-signed narinfos taken from a peer gateway's answer (for a
    /// request, or looked up ahead of one).
    peer_narinfo_served,
    /// NARs of upstream paths fetched from peer gateways over IPFS ahead
    /// of Nix's request, once their narinfo was served.
    peer_nar_prefetched,
    /// NARs pinned because `seed_fetched` is on.
    seeded_fetched,
    /// Seed candidates refused because the DAG behind the CID held more
    /// bytes than the `--max-size` budget left (whatever its declared size).
    seed_refused,
    /// Cache pins (`seed_fetched`, `seed`) evicted to stay within
    /// `cache_max_size`.
    cache_evictions,
    /// Routing V1 requests (`/routing/v1/providers`, `/routing/v1/peers`)
    /// answered with records.
    routing_answered,
    /// Routing V1 requests refused: over the rate limit (429) or a bad
    /// CID or peer id (400).
    routing_refused,
    /// Providers the configured `routers` named.
    router_providers,
    /// Requests to configured `routers` that failed (transport, timeout,
    /// HTTP status, oversized or unparsable answer).
    router_errors,
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

/// Upper bounds of the duration buckets, in seconds: a narinfo from the
/// index takes well under a millisecond, a NAR's first bytes from a far
/// peer seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// A duration histogram with fixed buckets (Prometheus' cumulative form is
/// computed when written, so an observation is two relaxed adds).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last counts those
    /// above every bound.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// The sum of all observations, in microseconds.
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

/// Writes metric families in Prometheus' text exposition format (version
/// 0.0.4): each family's `# HELP` and `# TYPE` lines, then its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// A counter; its sample is named `<name>_total`.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        let name = format!("{name}_total");
        self.family(&name, help, "counter");
        let _ = writeln!(self.out, "{name} {value}");
    }

    /// A gauge: a value that goes up and down.
    pub fn gauge(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, help, "gauge");
        let _ = writeln!(self.out, "{name} {value}");
    }

    /// A histogram: cumulative buckets, `+Inf`, sum and count.
    pub fn histogram(&mut self, name: &str, help: &str, histogram: &Histogram) {
        self.family(name, help, "histogram");
        let mut cumulative = 0u64;
        for (i, count) in histogram.buckets.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            match BUCKETS.get(i) {
                Some(bound) => {
                    let _ = writeln!(self.out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(self.out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = histogram.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(self.out, "{name}_sum {sum}");
        let _ = writeln!(self.out, "{name}_count {cumulative}");
    }

    fn family(&mut self, name: &str, help: &str, kind: &str) {
        // Help text escapes backslashes and newlines, nothing else.
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// The text to serve.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_help_and_type_and_counters_end_in_total() {
        let metrics = Metrics::default();
        Metrics::add(&metrics.nar_bytes, 42);
        metrics.narinfo_seconds.observe(Duration::from_micros(300));
        metrics.narinfo_seconds.observe(Duration::from_millis(30));
        metrics.narinfo_seconds.observe(Duration::from_secs(60));
        let text = metrics.to_prometheus();
        assert!(text.contains("# HELP nixpfs_nar_bytes_total NAR bytes sent.\n# TYPE nixpfs_nar_bytes_total counter\nnixpfs_nar_bytes_total 42\n"), "{text}");
        assert!(text.contains("# TYPE nixpfs_narinfo_request_seconds histogram\n"));
        assert!(text.contains("nixpfs_narinfo_request_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(text.contains("nixpfs_narinfo_request_seconds_bucket{le=\"0.025\"} 1\n"));
        assert!(text.contains("nixpfs_narinfo_request_seconds_bucket{le=\"0.05\"} 2\n"));
        assert!(text.contains("nixpfs_narinfo_request_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("nixpfs_narinfo_request_seconds_count 3\n"));
        assert!(
            text.contains("nixpfs_narinfo_request_seconds_sum 60.03"),
            "{text}"
        );
        // Every sample line belongs to a family announced just before it.
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap_or_default().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                    .unwrap_or(name);
                assert!(typed.contains(family), "{line} has no # TYPE");
            }
        }
    }

    #[test]
    fn help_text_is_one_escaped_line() {
        let mut out = Exposition::default();
        out.gauge("nixpfs_x", "a \\ b\nc", 1);
        assert_eq!(
            out.finish(),
            "# HELP nixpfs_x a \\\\ b\\nc\n# TYPE nixpfs_x gauge\nnixpfs_x 1\n"
        );
    }
}
