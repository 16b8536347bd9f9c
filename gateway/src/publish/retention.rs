//! Retention of cache pins: what `seed_fetched` and `seed` pinned is kept
//! within `cache_max_size`, the least recently accessed evicted first. User
//! pins (`nixpfs pin`) and uploads are never evicted: they are not cache
//! pins, and a cache pin the user also pinned stops being one.
//!
//! An eviction unpins the NAR and forgets its local location, so a later
//! request fetches it again (from peers or the upstream) instead of looking
//! for blocks the next gc deletes.

use std::collections::HashSet;
use std::sync::Arc;

use anchor_registry::NarHash;
use serde::{Deserialize, Serialize};

use crate::store::index::{CachePin, Index, IndexError};
use crate::store::ipfs::{Cid, Node, Pin};
use crate::util::metrics::Metrics;

/// One evicted cache pin, as `gc` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evicted {
    pub cid: String,
    pub nar_hash: String,
    pub dag_size: u64,
}

/// Why retention could not run.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error("while reading cache pins: {0}")]
    Index(#[from] IndexError),
    #[error("while unpinning {cid}: {reason}")]
    Unpin { cid: String, reason: String },
    #[error("while listing pins: {0}")]
    Pins(String),
    #[error("retention task failed: {0}")]
    Join(String),
}

/// Milliseconds since the epoch: accesses within one second still order.
fn now_ms() -> u64 {
    crate::util::time::unix_now().saturating_mul(1000)
        + u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_millis())
                .unwrap_or(0),
        )
}

/// Records `pin` as a cache pin holding `nar_hash`, accessed now.
pub async fn record(index: &Arc<Index>, pin: Pin, nar_hash: NarHash) {
    let index = index.clone();
    let cache_pin = CachePin {
        cid: pin.cid.to_string(),
        nar_hash: nar_hash.to_string(),
        dag_size: pin.dag_size,
        last_access: now_ms(),
    };
    match tokio::task::spawn_blocking(move || index.put_cache_pin(&cache_pin)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(cid = %pin.cid, "cannot record a cache pin: {e}"),
        Err(e) => tracing::error!(cid = %pin.cid, "cannot record a cache pin: {e}"),
    }
}

/// Unpins cache pins, least recently accessed first, until they fit in
/// `budget` bytes (DAG sizes). Records of cache pins that are no longer
/// pinned, or that are also the user's own paths, are dropped first.
pub async fn enforce(
    node: &Node,
    index: &Arc<Index>,
    budget: u64,
    metrics: &Metrics,
) -> Result<Vec<Evicted>, RetentionError> {
    let idx = index.clone();
    let (cache_pins, own) = tokio::task::spawn_blocking(move || {
        let own: HashSet<String> = idx.locals()?.into_iter().map(|l| l.cid).collect();
        Ok::<_, IndexError>((idx.cache_pins()?, own))
    })
    .await
    .map_err(|e| RetentionError::Join(e.to_string()))??;
    let pinned: HashSet<String> = node
        .pins()
        .await
        .map_err(|e| RetentionError::Pins(e.to_string()))?
        .into_iter()
        .map(|p| p.cid.to_string())
        .collect();
    let mut live = Vec::new();
    for pin in cache_pins {
        if pinned.contains(&pin.cid) && !own.contains(&pin.cid) {
            live.push(pin);
        } else {
            forget(index, &pin.cid, false).await?;
        }
    }
    let mut total: u64 = live.iter().map(|p| p.dag_size).sum();
    let mut evicted = Vec::new();
    for pin in live {
        if total <= budget {
            break;
        }
        let cid: Cid = pin.cid.parse().map_err(|e| RetentionError::Unpin {
            cid: pin.cid.clone(),
            reason: format!("not a CID: {e}"),
        })?;
        node.unpin(cid).await.map_err(|e| RetentionError::Unpin {
            cid: pin.cid.clone(),
            reason: e.to_string(),
        })?;
        forget(index, &pin.cid, true).await?;
        total = total.saturating_sub(pin.dag_size);
        Metrics::inc(&metrics.cache_evictions);
        tracing::info!(
            cid = %pin.cid,
            nar = %pin.nar_hash,
            bytes = pin.dag_size,
            "evicted a cache pin (cache_max_size {budget} bytes)"
        );
        evicted.push(Evicted {
            cid: pin.cid,
            nar_hash: pin.nar_hash,
            dag_size: pin.dag_size,
        });
    }
    Ok(evicted)
}

async fn forget(index: &Arc<Index>, cid: &str, location: bool) -> Result<(), RetentionError> {
    let index = index.clone();
    let cid = cid.to_owned();
    tokio::task::spawn_blocking(move || index.remove_cache_pin(&cid, location))
        .await
        .map_err(|e| RetentionError::Join(e.to_string()))??;
    Ok(())
}

/// A gateway's retention: the budget, and what serving calls on it.
#[derive(Debug)]
pub struct Retention {
    node: Node,
    index: Arc<Index>,
    budget: u64,
    metrics: Arc<Metrics>,
    /// One enforcement at a time.
    running: tokio::sync::Mutex<()>,
}

impl Retention {
    pub fn new(node: Node, index: Arc<Index>, budget: u64, metrics: Arc<Metrics>) -> Self {
        Self {
            node,
            index,
            budget,
            metrics,
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// Marks a NAR's CID as just served (in the background; a CID that is
    /// no cache pin is left alone).
    pub fn touch(&self, cid: Cid) {
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = index.touch_cache_pin(&cid.to_string(), now_ms()) {
                tracing::warn!(%cid, "cannot record a cache pin's access: {e}");
            }
        });
    }

    /// Records a new cache pin, then evicts what no longer fits and collects
    /// the evicted blocks.
    pub async fn admit(&self, pin: Pin, nar_hash: NarHash) {
        record(&self.index, pin, nar_hash).await;
        let _running = self.running.lock().await;
        match enforce(&self.node, &self.index, self.budget, &self.metrics).await {
            Ok(evicted) if evicted.is_empty() => {}
            Ok(_) => {
                if let Err(e) = self.node.gc().await {
                    tracing::warn!("gc after evictions failed: {e}");
                }
            }
            Err(e) => tracing::error!("cache retention failed: {e}"),
        }
    }
}
