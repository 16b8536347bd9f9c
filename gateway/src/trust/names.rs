//! What an IPNS name points at now, believed only after every check: the
//! record verifies for the name (signature by the key the name derives
//! from, validity not passed, value `/ipfs/<cid>`), and its sequence is not
//! below the highest this gateway ever accepted for the name (persisted in
//! the index, so a replayed or rolled-back record is refused after a
//! restart too). Also where a record goes when this gateway publishes one.
//!
//! Goals: candidates from everywhere we can ask — the index (our own and
//! earlier answers), the DHT, and the configured Routing V1 routers — with
//! the newest valid one winning; every refused candidate logged with its
//! source and reason, and counted; a dead router costs at most
//! [`ROUTER_TIMEOUT`].
//!
//! Non-goals: caching answers for their TTL (every sync asks again: sets
//! change rarely and the answer must follow promptly), IPNS over pubsub,
//! DNSLink.

use std::io::Read;
use std::time::Duration;

use crate::store::index::{Index, IndexError, NameRecord, Offered};
use crate::store::ipfs::ipns::{self, IpnsError, IpnsName, Verified, MAX_RECORD_BYTES};
use crate::store::ipfs::Node;
use crate::util::metrics::Metrics;

/// How long the DHT is asked for records of one name.
pub const DHT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one router may take to answer or accept a record.
pub const ROUTER_TIMEOUT: Duration = Duration::from_secs(5);
/// The media type of an IPNS record in Routing V1.
pub const RECORD_MEDIA_TYPE: &str = "application/vnd.ipfs.ipns-record";

/// Why a name could not be resolved or a record not published.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error("no valid IPNS record found for {name}{}", reasons_suffix(.reasons))]
    NotFound {
        name: IpnsName,
        reasons: Vec<String>,
    },
    #[error(transparent)]
    Record(#[from] IpnsError),
    #[error("{name}: sequence {sequence} is below {highest}, the highest seen for this name (a replayed or rolled-back record; a publisher must use a higher sequence)")]
    Older {
        name: IpnsName,
        sequence: u64,
        highest: u64,
    },
    #[error("{name}: this gateway keeps no more IPNS names for others")]
    NoRoom { name: IpnsName },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("the system clock is before 1970")]
    Clock,
    #[error("the IPNS record for {name} reached no one: {reasons}")]
    Unpublished { name: IpnsName, reasons: String },
}

fn reasons_suffix(reasons: &[String]) -> String {
    if reasons.is_empty() {
        String::new()
    } else {
        format!(" ({})", reasons.join("; "))
    }
}

fn now() -> Result<u64, NameError> {
    crate::util::time::now().map_err(|_| NameError::Clock)
}

/// Where names are looked up and records sent.
#[derive(Debug, Clone)]
pub struct Names<'a> {
    pub index: &'a Index,
    pub node: Option<&'a Node>,
    /// Routing V1 base URLs (`http://host:port`).
    pub routers: &'a [String],
    pub metrics: &'a Metrics,
}

impl Names<'_> {
    /// The newest valid record for `name` from every source, once it passed
    /// the checks in the module docs; it becomes the floor for later
    /// answers.
    pub async fn resolve(&self, name: &IpnsName) -> Result<Verified, NameError> {
        let now = now()?;
        let held = self.index.name_record(&name.to_string())?;
        let floor = held.as_ref().map_or(0, |h| h.sequence);
        let mut best: Option<(Verified, Vec<u8>)> = held.as_ref().and_then(|h| {
            ipns::verify(name, &h.record, now)
                .ok()
                .map(|v| (v, h.record.clone()))
        });
        let mut reasons = Vec::new();
        for (source, bytes) in self.candidates(name).await {
            let verified = match ipns::verify(name, &bytes, now) {
                Ok(v) if v.sequence < floor => Err(format!(
                    "sequence {} is below {floor}, the highest seen for this name (a replayed or rolled-back record)",
                    v.sequence
                )),
                Ok(v) => Ok(v),
                Err(e) => Err(e.to_string()),
            };
            match verified {
                Ok(v) => {
                    if best.as_ref().is_none_or(|(b, _)| v.supersedes(b)) {
                        best = Some((v, bytes));
                    }
                }
                Err(reason) => {
                    Metrics::inc(&self.metrics.ipns_refused);
                    tracing::warn!(%name, %source, "refused an IPNS record: {reason}");
                    reasons.push(format!("{source}: {reason}"));
                }
            }
        }
        let Some((verified, bytes)) = best else {
            if let Some(h) = &held {
                reasons.push(format!(
                    "the last record accepted (sequence {}) is no longer valid",
                    h.sequence
                ));
            }
            return Err(NameError::NotFound {
                name: *name,
                reasons,
            });
        };
        self.index.offer_name_record(
            &name.to_string(),
            NameRecord {
                sequence: verified.sequence,
                validity: verified.validity,
                own: false,
                record: bytes,
            },
        )?;
        Metrics::inc(&self.metrics.ipns_resolved);
        tracing::info!(%name, sequence = verified.sequence, value = %verified.value, "resolved IPNS name");
        Ok(verified)
    }

    /// Checks a record someone handed us (a Routing V1 PUT) and keeps it
    /// if it is the newest for its name; refusals are logged and counted.
    pub fn accept(&self, name: &IpnsName, bytes: Vec<u8>) -> Result<Verified, NameError> {
        let refuse = |e: NameError| {
            Metrics::inc(&self.metrics.ipns_refused);
            tracing::warn!(%name, "refused an IPNS record: {e}");
            e
        };
        let verified = ipns::verify(name, &bytes, now()?).map_err(|e| refuse(e.into()))?;
        let offer = NameRecord {
            sequence: verified.sequence,
            validity: verified.validity,
            own: false,
            record: bytes,
        };
        match self.index.offer_name_record(&name.to_string(), offer)? {
            Offered::Stored | Offered::Kept => Ok(verified),
            Offered::Older { highest } => Err(refuse(NameError::Older {
                name: *name,
                sequence: verified.sequence,
                highest,
            })),
            Offered::Full => Err(refuse(NameError::NoRoom { name: *name })),
        }
    }

    /// The newest valid record held for `name` (ours, resolved or PUT
    /// earlier, or in the DHT's local store), without asking anyone.
    pub async fn local(&self, name: &IpnsName) -> Result<Option<Vec<u8>>, NameError> {
        let now = now()?;
        let mut best: Option<(Verified, Vec<u8>)> = None;
        let held = self.index.name_record(&name.to_string())?.map(|h| h.record);
        let dht = match self.node {
            Some(node) => node.local_ipns_record(name).await,
            None => None,
        };
        for bytes in held.into_iter().chain(dht) {
            if let Ok(v) = ipns::verify(name, &bytes, now) {
                if best.as_ref().is_none_or(|(b, _)| v.supersedes(b)) {
                    best = Some((v, bytes));
                }
            }
        }
        Ok(best.map(|(_, bytes)| bytes))
    }

    /// Stores a record this gateway signed as its own (republished while
    /// serving) and sends it to the DHT and every router. Fails only when
    /// it reached none of them and there is nowhere else to find it.
    pub async fn publish(&self, name: &IpnsName, bytes: Vec<u8>) -> Result<Published, NameError> {
        let verified = ipns::verify(name, &bytes, now()?)?;
        let offer = NameRecord {
            sequence: verified.sequence,
            validity: verified.validity,
            own: true,
            record: bytes.clone(),
        };
        if let Offered::Older { highest } =
            self.index.offer_name_record(&name.to_string(), offer)?
        {
            return Err(NameError::Older {
                name: *name,
                sequence: verified.sequence,
                highest,
            });
        }
        let published = self.send(name, &bytes).await;
        Metrics::inc(&self.metrics.ipns_published);
        Ok(published)
    }

    /// Sends every own record still valid to the DHT and the routers again
    /// (DHT peers drop records after 48 h, and new peers join).
    pub async fn republish(&self) -> Result<usize, NameError> {
        let now = now()?;
        let mut sent = 0;
        for (text, record) in self.index.own_name_records()? {
            let Ok(name) = text.parse::<IpnsName>() else {
                continue;
            };
            if ipns::verify(&name, &record.record, now).is_err() {
                continue;
            }
            let published = self.send(&name, &record.record).await;
            tracing::info!(%name, sequence = record.sequence, dht_peers = published.dht_peers, routers = published.routers.len(), "republished IPNS record");
            Metrics::inc(&self.metrics.ipns_published);
            sent += 1;
        }
        Ok(sent)
    }

    async fn send(&self, name: &IpnsName, bytes: &[u8]) -> Published {
        let mut published = Published::default();
        if let Some(node) = self.node {
            match node.put_ipns_record(name, bytes.to_vec()).await {
                Ok(peers) => published.dht_peers = peers,
                Err(e) => published.errors.push(format!("DHT: {e}")),
            }
        }
        for router in self.routers {
            let (url, body) = (record_url(router, name), bytes.to_vec());
            let result = tokio::task::spawn_blocking(move || put_record(&url, &body))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
            match result {
                Ok(()) => published.routers.push(router.clone()),
                Err(e) => {
                    tracing::warn!(%name, %router, "router refused the IPNS record: {e}");
                    published.errors.push(format!("{router}: {e}"));
                }
            }
        }
        published
    }

    /// Records for `name` from the DHT and the routers, each with where it
    /// came from.
    async fn candidates(&self, name: &IpnsName) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        if let Some(node) = self.node {
            if let Ok(records) = node.get_ipns_records(name, DHT_TIMEOUT).await {
                out.extend(records.into_iter().map(|r| ("DHT".to_owned(), r)));
            }
        }
        let asks = self.routers.iter().map(|router| {
            let url = record_url(router, name);
            let router = router.clone();
            async move {
                let result = tokio::task::spawn_blocking(move || get_record(&url))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r);
                (router, result)
            }
        });
        for (router, result) in futures::future::join_all(asks).await {
            match result {
                Ok(Some(bytes)) => out.push((router, bytes)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(%name, %router, "router failed to answer for an IPNS name: {e}")
                }
            }
        }
        out
    }
}

/// Where a published record went.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Published {
    /// DHT peers that accepted it (0 without a DHT or peers).
    pub dht_peers: usize,
    /// Routers that accepted it.
    pub routers: Vec<String>,
    /// What failed, by destination.
    pub errors: Vec<String>,
}

/// `ROUTER/routing/v1/ipns/NAME`.
pub fn record_url(router: &str, name: &IpnsName) -> String {
    format!("{}/routing/v1/ipns/{name}", router.trim_end_matches('/'))
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(ROUTER_TIMEOUT)
        .redirects(0)
        .build()
}

/// A router's record for a name: `None` for 404, at most
/// [`MAX_RECORD_BYTES`] read.
fn get_record(url: &str) -> Result<Option<Vec<u8>>, String> {
    let response = match agent().get(url).set("Accept", RECORD_MEDIA_TYPE).call() {
        Ok(response) => response,
        Err(ureq::Error::Status(404, _)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let mut body = Vec::new();
    response
        .into_reader()
        .take(MAX_RECORD_BYTES as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| e.to_string())?;
    if body.len() > MAX_RECORD_BYTES {
        return Err(format!("answer larger than {MAX_RECORD_BYTES} bytes"));
    }
    Ok(Some(body))
}

fn put_record(url: &str, body: &[u8]) -> Result<(), String> {
    match agent()
        .put(url)
        .set("Content-Type", RECORD_MEDIA_TYPE)
        .send_bytes(body)
    {
        Ok(_) => Ok(()),
        Err(ureq::Error::Status(code, response)) => {
            let reason = response.into_string().unwrap_or_default();
            Err(format!("HTTP {code}: {}", reason.trim()))
        }
        Err(e) => Err(e.to_string()),
    }
}
