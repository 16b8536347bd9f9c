//! The status page at `GET /` and the liveness check at `GET /health`, on
//! the HTTP port beside the cache.
//!
//! Goals: one server-rendered HTML page a user can open in any browser to
//! see what `nixpfs status` shows and more (the nix.conf lines, pins, each
//! anchor's last sync with its reason, conflicts with their evidence,
//! peers): no external assets, readable without JavaScript (a meta refresh
//! keeps it current), every string that came from outside (anchor names,
//! reasons, agent versions, store paths) escaped.
//! Non-goals: controls. The page only reads; whatever changes the gateway
//! stays on the admin socket, which nothing on the TCP port can reach.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::future::BoxFuture;

use crate::http::admin::{Conflict, PeerReply, Status};
use crate::publish::pin::PinEntry;
use crate::util::when::human;

/// Seconds between the page's own refreshes.
const REFRESH_SECS: u32 = 10;
/// Rows shown per list; a node with 100,000 pins shows the first ones and
/// the count (`nixpfs pins` has them all).
const MAX_ROWS: usize = 200;

/// Everything the page shows, gathered by whoever owns the state.
#[derive(Debug, Clone)]
pub struct PageView {
    pub status: Status,
    /// The gateway's public key, for `trusted-public-keys`.
    pub gateway_key: String,
    /// The URL Nix uses, for `substituters`.
    pub substituter: String,
    /// The root keys of the registry in force (or the configured trust root
    /// before one synced).
    pub root_keys: Vec<String>,
    pub pins: Vec<PinEntry>,
    pub peers: Vec<PeerReply>,
    pub conflicts: Vec<Conflict>,
}

/// What gathers a [`PageView`] (`app` implements it), so this layer never
/// depends on the one that wires it.
pub trait PageSource: Send + Sync + 'static {
    fn view(&self) -> BoxFuture<'_, anyhow::Result<PageView>>;
}

/// `/` and `/health`.
pub fn router(source: Arc<dyn PageSource>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .with_state(source)
}

async fn health() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "ok\n",
    )
        .into_response()
}

async fn page(State(source): State<Arc<dyn PageSource>>) -> Response {
    match source.view().await {
        Ok(view) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                // No script runs here, and nothing may frame the page.
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
                ),
                (header::CACHE_CONTROL, "no-store"),
            ],
            render(&view, crate::util::time::unix_now()),
        )
            .into_response(),
        Err(e) => {
            tracing::error!("while gathering the status page: {e:#}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error while gathering the status page\n",
            )
                .into_response()
        }
    }
}

/// Text made safe inside HTML elements and quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

/// A table: header cells, then rows of cells already escaped.
fn table(out: &mut String, id: &str, headers: &[&str], rows: &[Vec<String>], total: usize) {
    if rows.is_empty() {
        let _ = writeln!(out, "<p id=\"{id}\" class=\"none\">none</p>");
        return;
    }
    let _ = write!(out, "<table id=\"{id}\"><tr>");
    for h in headers {
        let _ = write!(out, "<th>{h}</th>");
    }
    out.push_str("</tr>\n");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
    if total > rows.len() {
        let _ = writeln!(
            out,
            "<p>and {} more (see <code>nixpfs</code> on the command line)</p>",
            total - rows.len()
        );
    }
}

/// The whole page as of `now` (unix seconds).
pub fn render(view: &PageView, now: u64) -> String {
    let s = &view.status;
    let when = |t: Option<u64>| t.map_or_else(|| "never".to_owned(), |t| human(t, now));
    let mut out = String::with_capacity(16 * 1024);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>nixpfs gateway</title><style>{STYLE}</style></head><body>\n\
         <h1>nixpfs gateway</h1>\n"
    );

    out.push_str("<h2>Use it</h2>\n<p>Add to <code>nix.conf</code>:</p>\n<pre id=\"nix-conf\">");
    let _ = write!(
        out,
        "extra-substituters = {}\nextra-trusted-public-keys = {}</pre>\n",
        escape(&view.substituter),
        escape(&view.gateway_key)
    );

    out.push_str("<h2>This node</h2>\n<dl id=\"node\">");
    let mut item = |name: &str, value: String| {
        let _ = write!(out, "<dt>{name}</dt><dd>{value}</dd>");
    };
    item(
        "IPFS peer",
        format!("<code id=\"peer-id\">{}</code>", escape(&s.peer_id)),
    );
    item(
        "listening on",
        s.listen_addrs
            .iter()
            .map(|a| format!("<code>{}</code>", escape(a)))
            .collect::<Vec<_>>()
            .join("<br>"),
    );
    item("pins", format!("{} ({})", s.pins, bytes(s.pinned_bytes)));
    item("own store paths", s.local_paths.to_string());
    item(
        "DHT",
        match &s.dht {
            Some(d) => format!(
                "{} peers in the routing table, {} keys provided",
                d.routing_peers, d.provided_keys
            ),
            None => "off".to_owned(),
        },
    );
    out.push_str("</dl>\n");

    out.push_str("<h2>Registry</h2>\n<dl id=\"registry\">");
    let registry = match (s.registry_version, s.registry_expires) {
        (Some(version), Some(expires)) if expires <= now => format!(
            "version {version}, <strong class=\"bad\">expired {}</strong>: no path is served on anchor policy",
            escape(&human(expires, now))
        ),
        (Some(version), Some(expires)) => {
            format!("version {version}, expires {}", escape(&human(expires, now)))
        }
        (Some(version), None) => format!("version {version}"),
        _ => "none synced".to_owned(),
    };
    let _ = write!(out, "<dt>in force</dt><dd>{registry}</dd>");
    let _ = write!(
        out,
        "<dt>last sync</dt><dd>{}</dd>",
        escape(&when(s.last_sync))
    );
    if let Some(error) = &s.registry_error {
        let _ = write!(
            out,
            "<dt>last fetch</dt><dd class=\"bad\">{}</dd>",
            escape(error)
        );
    }
    let keys = if view.root_keys.is_empty() {
        "none".to_owned()
    } else {
        view.root_keys
            .iter()
            .map(|k| format!("<code>{}</code>", escape(k)))
            .collect::<Vec<_>>()
            .join("<br>")
    };
    let _ = writeln!(out, "<dt>root keys</dt><dd>{keys}</dd></dl>");

    out.push_str("<h2>Anchors</h2>\n");
    let rows: Vec<Vec<String>> = s
        .anchors
        .iter()
        .take(MAX_ROWS)
        .map(|a| {
            let sync = match (a.last_sync, &a.reason) {
                (None, _) => "not since start".to_owned(),
                (Some(outcome), Some(reason)) => format!(
                    "<span class=\"bad\">{}</span>: {}",
                    escape(&outcome.to_string()),
                    escape(reason)
                ),
                (Some(outcome), None) => escape(&outcome.to_string()),
            };
            vec![
                escape(&a.name),
                escape(&a.kind),
                a.version
                    .map_or_else(|| "none trusted".to_owned(), |v| v.to_string()),
                a.entries.map_or_else(|| "-".to_owned(), |n| n.to_string()),
                a.expires
                    .map_or_else(|| "-".to_owned(), |t| escape(&human(t, now))),
                sync,
            ]
        })
        .collect();
    table(
        &mut out,
        "anchors",
        &["name", "kind", "version", "entries", "expires", "last sync"],
        &rows,
        s.anchors.len(),
    );

    let _ = writeln!(
        out,
        "<h2>Conflicts</h2>\n<p>{} paths registry anchors disagree about (never served), {} forks seen.</p>",
        view.conflicts.len(),
        s.forks
    );
    let rows: Vec<Vec<String>> = view
        .conflicts
        .iter()
        .take(MAX_ROWS)
        .map(|c| {
            let evidence = c
                .evidence
                .iter()
                .map(|v| {
                    let data = v.mapping.data();
                    format!(
                        "{} says <code>{}</code> ({} bytes, CID <code>{}</code>)",
                        escape(v.anchor.as_str()),
                        escape(&data.nar_hash.to_string()),
                        data.nar_size,
                        escape(&data.cid.to_string())
                    )
                })
                .collect::<Vec<_>>()
                .join("<br>");
            vec![format!("<code>{}</code>", escape(&c.store_path)), evidence]
        })
        .collect();
    table(
        &mut out,
        "conflicts",
        &["store path", "evidence"],
        &rows,
        view.conflicts.len(),
    );

    let r = &s.repro;
    out.push_str("<h2>Upstreams</h2>\n");
    let counter = |name: &str| {
        serde_json::to_value(&s.counters)
            .ok()
            .and_then(|c| c.get(name).and_then(serde_json::Value::as_u64))
            .unwrap_or(0)
    };
    let _ = writeln!(
        out,
        "<p id=\"bytes-by-source\">NAR bytes fetched from upstreams: {}, from IPFS peers: {}.</p>",
        bytes(counter("upstream_bytes")),
        bytes(counter("peer_bytes"))
    );
    let rows: Vec<Vec<String>> = s
        .upstreams
        .iter()
        .take(MAX_ROWS)
        .map(|u| {
            let state = match (&u.last_error, u.backing_off) {
                (Some(error), true) => format!(
                    "<span class=\"bad\">failing, skipped for now</span>: {} ({})",
                    escape(error),
                    escape(&when(u.last_error_at))
                ),
                (Some(error), false) => format!(
                    "last error {}: {}",
                    escape(&when(u.last_error_at)),
                    escape(error)
                ),
                (None, _) => "ok".to_owned(),
            };
            vec![
                format!("<code>{}</code>", escape(&u.url)),
                u.priority.to_string(),
                u.keys
                    .iter()
                    .map(|k| format!("<code>{}</code>", escape(k)))
                    .collect::<Vec<_>>()
                    .join("<br>"),
                escape(&when(u.last_ok_at)),
                state,
            ]
        })
        .collect();
    table(
        &mut out,
        "upstreams",
        &["URL", "priority", "keys", "last answer", "state"],
        &rows,
        s.upstreams.len(),
    );

    let _ = writeln!(
        out,
        "<h2>Reproducibility</h2>\n<p id=\"repro\">{} paths: {} reproduced, {} differ, {} not checked.</p>",
        r.paths, r.reproduced, r.differs, r.not_checked
    );

    let _ = writeln!(out, "<h2>Pins</h2>");
    let rows: Vec<Vec<String>> = view
        .pins
        .iter()
        .take(MAX_ROWS)
        .map(|p| {
            vec![
                p.store_path.as_deref().map_or_else(
                    || "-".to_owned(),
                    |path| format!("<code>{}</code>", escape(path)),
                ),
                format!("<code>{}</code>", escape(&p.cid)),
                bytes(p.size),
            ]
        })
        .collect();
    table(
        &mut out,
        "pins",
        &["store path", "CID", "size"],
        &rows,
        view.pins.len(),
    );

    let _ = writeln!(out, "<h2>Peers</h2>");
    let rows: Vec<Vec<String>> = view
        .peers
        .iter()
        .take(MAX_ROWS)
        .map(|p| {
            vec![
                format!("<code>{}</code>", escape(&p.peer_id)),
                escape(p.agent_version.as_deref().unwrap_or("unknown")),
            ]
        })
        .collect();
    table(
        &mut out,
        "peers",
        &["peer", "agent"],
        &rows,
        view.peers.len(),
    );

    out.push_str("<h2>Counters</h2>\n");
    let counters = serde_json::to_value(&s.counters).unwrap_or_default();
    let rows: Vec<Vec<String>> = counters
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, n)| vec![escape(name), n.to_string()])
        .collect();
    let total = rows.len();
    table(&mut out, "counters", &["counter", "count"], &rows, total);
    let _ = write!(
        out,
        "<p class=\"foot\">as of {} · refreshes every {REFRESH_SECS} s · <a href=\"/metrics\">metrics</a></p>\n</body></html>\n",
        escape(&crate::util::when::utc(now))
    );
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:70em;margin:1em auto;padding:0 1em;color:#222}\
code,pre{font-family:ui-monospace,monospace;font-size:.9em}pre{background:#f4f4f4;padding:.6em}\
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}\
dt{font-weight:bold;float:left;clear:left;width:10em}dd{margin-left:11em}.bad{color:#b00}.none{color:#777}.foot{color:#777;margin-top:2em}";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::admin::AnchorStatus;
    use crate::trust::sync::Outcome;

    fn view() -> PageView {
        PageView {
            status: Status {
                peer_id: "12D3KooWPeer".to_owned(),
                listen_addrs: vec!["/ip4/127.0.0.1/tcp/4001".to_owned()],
                connected_peers: 1,
                pins: 1,
                pinned_bytes: 2048,
                local_paths: 1,
                registry_version: Some(3),
                registry_expires: Some(10_000),
                registry_error: None,
                last_sync: Some(90),
                anchors: vec![AnchorStatus {
                    name: "<script>alert(1)</script>".to_owned(),
                    kind: "anchor".to_owned(),
                    version: None,
                    expires: None,
                    entries: None,
                    last_sync: Some(Outcome::Rejected),
                    reason: Some("rollback: version 1 < 2 & \"worse\"".to_owned()),
                }],
                forks: 0,
                conflicts: 0,
                dht: None,
                repro: Default::default(),
                upstreams: vec![crate::trust::upstream::UpstreamStatus {
                    url: "http://cache.example/<i>".to_owned(),
                    keys: vec!["u-1:key=".to_owned()],
                    priority: 50,
                    last_error: Some("HTTP 502".to_owned()),
                    last_error_at: Some(95),
                    last_ok_at: None,
                    backing_off: true,
                }],
                counters: Default::default(),
            },
            gateway_key: "gw-1:abc=".to_owned(),
            substituter: "http://127.0.0.1:8480".to_owned(),
            root_keys: vec!["root-1:xyz=".to_owned()],
            pins: vec![PinEntry {
                cid: "bafyfoo".to_owned(),
                size: 2048,
                store_path: Some("/nix/store/aaaa-hello".to_owned()),
            }],
            peers: vec![PeerReply {
                peer_id: "12D3KooWOther".to_owned(),
                agent_version: Some("<b>kubo</b>".to_owned()),
            }],
            conflicts: Vec::new(),
        }
    }

    #[test]
    fn outside_strings_are_escaped_everywhere() {
        let html = render(&view(), 100);
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("<b>kubo"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("rollback: version 1 &lt; 2 &amp; &quot;worse&quot;"));
        assert!(html.contains("&lt;b&gt;kubo&lt;/b&gt;"));
        assert!(html.contains("http://cache.example/&lt;i&gt;"));
    }

    #[test]
    fn the_page_shows_the_nix_conf_lines_pins_peers_and_empty_lists_as_none() {
        let html = render(&view(), 100);
        assert!(html.contains(
            "extra-substituters = http://127.0.0.1:8480\nextra-trusted-public-keys = gw-1:abc="
        ));
        assert!(html.contains("/nix/store/aaaa-hello"));
        assert!(html.contains("12D3KooWOther"));
        assert!(html.contains("<p id=\"conflicts\" class=\"none\">none</p>"));
        assert!(html.contains("version 3, expires"));
        assert!(html.contains("failing, skipped for now</span>: HTTP 502"));
        assert!(html.contains("from upstreams: 0 B, from IPFS peers: 0 B."));
    }
}
