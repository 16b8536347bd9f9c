//! Routing V1 over HTTP (IPIP-337) as a client: the configured `routers`
//! are asked who provides a CID, beside the DHT, and the node dials what
//! they name. Also the record format both sides speak (the server is
//! `http::routing`).
//!
//! Goals: `GET /routing/v1/providers/{cid}` on every router at once, each
//! bounded by [`ROUTER_TIMEOUT`] and [`MAX_RESPONSE`] bytes, so a dead or
//! hostile router costs a fetch at most its timeout; JSON and NDJSON
//! answers; records of unknown schemas, unparsable peer ids and
//! unparsable addresses skipped; every failure logged with the router's URL
//! and counted (`router_errors`).
//!
//! Non-goals: IPNS records (the names module), `PUT` of provider records
//! (historic, IPIP-0526), peer lookups (`/routing/v1/peers`), caching
//! answers between fetches.

use std::io::Read;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use cid::Cid;
use rust_ipfs::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

use super::dht::Provider;
use crate::util::metrics::Metrics;

/// How long one router may take to answer, connection included.
pub const ROUTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes read from one answer (100 records are ~50 KiB).
pub const MAX_RESPONSE: u64 = 1 << 20;
/// Most providers taken from one answer.
pub const MAX_PROVIDERS: usize = 100;
/// The `Accept` header of a providers request: NDJSON preferred.
pub const ACCEPT: &str = "application/x-ndjson, application/json;q=0.8";
/// The protocol name of bitswap in `Protocols`.
pub const BITSWAP: &str = "transport-bitswap";
/// The protocol name of a trustless HTTP gateway in `Protocols`.
pub const GATEWAY_HTTP: &str = "transport-ipfs-gateway-http";

/// A `"Schema": "peer"` record as routers send it: the peer id as
/// base58btc (the form Helia's client parses), addresses as multiaddr
/// text without `/p2p/…`, protocols as names (`transport-bitswap`…).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    #[serde(rename = "Schema")]
    pub schema: String,
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "Addrs", default)]
    pub addrs: Vec<String>,
    #[serde(rename = "Protocols", default)]
    pub protocols: Vec<String>,
}

impl PeerRecord {
    /// A peer record for `peer`.
    pub fn new(peer: PeerId, addrs: &[Multiaddr], protocols: &[&str]) -> Self {
        PeerRecord {
            schema: "peer".to_owned(),
            id: peer.to_base58(),
            addrs: addrs.iter().map(ToString::to_string).collect(),
            protocols: protocols.iter().map(|p| (*p).to_owned()).collect(),
        }
    }
}

/// Parses a peer id in either form the spec allows: a base58btc multihash
/// (`12D3Koo…`, `Qm…`) or a CIDv1 with the `libp2p-key` codec (`bafz…`,
/// `k51…`).
pub fn parse_peer_id(text: &str) -> Result<PeerId, String> {
    if let Ok(peer) = PeerId::from_str(text) {
        return Ok(peer);
    }
    let cid = Cid::from_str(text).map_err(|_| {
        format!("{text:?} is not a peer id (base58btc multihash or libp2p-key CID)")
    })?;
    if cid.codec() != LIBP2P_KEY {
        return Err(format!(
            "{text:?} is a CID with codec 0x{:x}, not a libp2p-key (0x72) peer id",
            cid.codec()
        ));
    }
    PeerId::from_bytes(&cid.hash().to_bytes()).map_err(|e| format!("{text:?}: {e}"))
}

/// The multicodec of a CID that names a peer id (and an IPNS name).
pub(crate) const LIBP2P_KEY: u64 = 0x72;

/// Providers in an answer: `application/x-ndjson` (one record per line)
/// or a JSON object with `Providers`; records that are not `peer`, or
/// whose id does not parse, are left out, as are addresses that do not
/// parse. At most [`MAX_PROVIDERS`].
pub fn parse_providers(content_type: &str, body: &[u8]) -> Result<Vec<Provider>, String> {
    let values: Vec<serde_json::Value> = if content_type.starts_with("application/x-ndjson") {
        body.split(|b| *b == b'\n')
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .map(|line| serde_json::from_slice(line).map_err(|e| format!("NDJSON line: {e}")))
            .collect::<Result<_, _>>()?
    } else if content_type.starts_with("application/json") {
        #[derive(Deserialize)]
        struct Body {
            #[serde(rename = "Providers", default)]
            providers: Option<Vec<serde_json::Value>>,
        }
        let body: Body = serde_json::from_slice(body).map_err(|e| format!("JSON: {e}"))?;
        body.providers.unwrap_or_default()
    } else {
        return Err(format!("unexpected content type {content_type:?}"));
    };
    Ok(values
        .into_iter()
        .filter_map(|v| serde_json::from_value::<PeerRecord>(v).ok())
        .filter(|r| r.schema == "peer")
        .filter_map(|r| {
            let peer = parse_peer_id(&r.id).ok()?;
            let addrs = r.addrs.iter().filter_map(|a| a.parse().ok()).collect();
            Some(Provider { peer, addrs })
        })
        .take(MAX_PROVIDERS)
        .collect())
}

/// The configured routers and one HTTP agent for them.
#[derive(Debug)]
pub struct Routers {
    urls: Vec<String>,
    agent: ureq::Agent,
    metrics: Arc<Metrics>,
}

impl Routers {
    /// Routers at `urls` (`http(s)://host[:port][/prefix]`, checked by the
    /// config); failures count into `metrics.router_errors`.
    pub fn new(urls: Vec<String>, metrics: Arc<Metrics>) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(ROUTER_TIMEOUT)
            .timeout(ROUTER_TIMEOUT)
            .redirects(0)
            .build();
        Routers {
            urls: urls
                .into_iter()
                .map(|u| u.trim_end_matches('/').to_owned())
                .collect(),
            agent,
            metrics,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    /// Providers of `cid` from every router (asked at once), deduplicated
    /// by peer with their addresses merged; a router that fails or times
    /// out adds nothing and is logged.
    pub async fn find_providers(&self, cid: &Cid) -> Vec<Provider> {
        let asks = self.urls.iter().map(|base| {
            let url = format!("{base}/routing/v1/providers/{cid}");
            let agent = self.agent.clone();
            async move {
                let got = tokio::task::spawn_blocking({
                    let url = url.clone();
                    move || get_providers(&agent, &url)
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
                (url, got)
            }
        });
        let mut out: Vec<Provider> = Vec::new();
        for (url, got) in futures::future::join_all(asks).await {
            match got {
                Ok(providers) => {
                    tracing::debug!(%url, found = providers.len(), "router answered");
                    Metrics::add(&self.metrics.router_providers, providers.len() as u64);
                    for p in providers {
                        match out.iter_mut().find(|o| o.peer == p.peer) {
                            Some(known) => {
                                for a in p.addrs {
                                    if !known.addrs.contains(&a) {
                                        known.addrs.push(a);
                                    }
                                }
                            }
                            None => out.push(p),
                        }
                    }
                }
                Err(reason) => {
                    Metrics::inc(&self.metrics.router_errors);
                    tracing::warn!(%url, "router failed: {reason}");
                }
            }
        }
        out
    }
}

/// One blocking providers request; 404 is "none known".
fn get_providers(agent: &ureq::Agent, url: &str) -> Result<Vec<Provider>, String> {
    let response = match agent.get(url).set("Accept", ACCEPT).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(404, _)) => return Ok(Vec::new()),
        Err(ureq::Error::Status(status, _)) => return Err(format!("HTTP status {status}")),
        Err(e) => return Err(e.to_string()),
    };
    let content_type = response.content_type().to_owned();
    let mut body = Vec::new();
    response
        .into_reader()
        .take(MAX_RESPONSE + 1)
        .read_to_end(&mut body)
        .map_err(|e| format!("reading the answer: {e}"))?;
    if body.len() as u64 > MAX_RESPONSE {
        return Err(format!("answer larger than {MAX_RESPONSE} bytes"));
    }
    parse_providers(&content_type, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: &str = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";

    #[test]
    fn peer_ids_parse_as_base58_or_as_a_libp2p_key_cid() {
        let peer = parse_peer_id(PEER).unwrap();
        let cid = Cid::new_v1(
            LIBP2P_KEY,
            cid::multihash::Multihash::from_bytes(&peer.to_bytes()).unwrap(),
        );
        assert_eq!(parse_peer_id(&cid.to_string()).unwrap(), peer);
        let raw = Cid::new_v1(0x55, *cid.hash());
        assert!(parse_peer_id(&raw.to_string())
            .unwrap_err()
            .contains("libp2p-key"));
        assert!(parse_peer_id("not-a-peer")
            .unwrap_err()
            .contains("not a peer id"));
    }

    #[test]
    fn json_and_ndjson_answers_give_the_same_providers_and_skip_what_does_not_parse() {
        let good = format!(
            r#"{{"Schema":"peer","ID":"{PEER}","Addrs":["/ip4/127.0.0.1/tcp/4001","bogus"],"Protocols":["transport-bitswap"],"Extra":1}}"#
        );
        let other = r#"{"Schema":"bitswap","ID":"x","Addrs":[]}"#;
        let bad_id = r#"{"Schema":"peer","ID":"nope","Addrs":[]}"#;
        let json = format!(r#"{{"Providers":[{good},{other},{bad_id}]}}"#);
        let ndjson = format!("{good}\n{other}\n\n{bad_id}\n");
        let from_json = parse_providers("application/json", json.as_bytes()).unwrap();
        let from_nd = parse_providers("application/x-ndjson", ndjson.as_bytes()).unwrap();
        assert_eq!(from_json, from_nd);
        assert_eq!(from_json.len(), 1);
        assert_eq!(from_json[0].peer.to_base58(), PEER);
        assert_eq!(
            from_json[0].addrs,
            vec!["/ip4/127.0.0.1/tcp/4001".parse().unwrap()]
        );
        assert_eq!(
            parse_providers("application/json", br#"{"Providers":null}"#).unwrap(),
            vec![]
        );
        assert!(parse_providers("text/html", b"<html>").is_err());
        assert!(parse_providers("application/x-ndjson", b"{not json\n").is_err());
    }

    #[test]
    fn a_record_renders_with_the_spec_field_names() {
        let peer = parse_peer_id(PEER).unwrap();
        let record = PeerRecord::new(peer, &["/ip4/127.0.0.1/tcp/1".parse().unwrap()], &[BITSWAP]);
        let v = serde_json::to_value(&record).unwrap();
        assert_eq!(v["Schema"], "peer");
        assert_eq!(v["ID"], PEER);
        assert_eq!(v["Addrs"][0], "/ip4/127.0.0.1/tcp/1");
        assert_eq!(v["Protocols"][0], "transport-bitswap");
    }

    #[tokio::test]
    async fn a_dead_router_costs_at_most_its_timeout_and_is_counted() {
        // A listener that accepts and never answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let metrics = Arc::new(Metrics::default());
        let routers = Routers::new(vec![format!("http://127.0.0.1:{port}/")], metrics.clone());
        let cid: Cid = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
            .parse()
            .unwrap();
        let t0 = std::time::Instant::now();
        assert!(routers.find_providers(&cid).await.is_empty());
        let took = t0.elapsed();
        assert!(took < ROUTER_TIMEOUT + Duration::from_secs(2), "{took:?}");
        assert_eq!(metrics.snapshot().router_errors, 1);
        drop(listener);
    }
}
