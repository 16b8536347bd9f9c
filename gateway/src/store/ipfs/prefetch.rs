//! The memory that reads fetch ahead of their readers, shared by every read
//! of a node: NAR responses (32 blocks ahead), CAR exports (16), pins.
//! Without a shared bound, each slow HTTP client holds its window of blocks
//! (32 MiB for a NAR), and a few hundred of them hold gigabytes.
//!
//! # Goals
//! - A fixed total for blocks fetched ahead, whatever the number of reads.
//! - Every read still progresses: the block a reader waits for is fetched
//!   without a charge; only blocks beyond it are.
//!
//! # Non-goals
//! - Fairness between reads: a read takes what is free when it looks.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What one block fetched ahead is charged, in bytes: the largest block the
/// import profile makes (foreign DAGs use 256 KiB leaves; charging the
/// largest keeps the bound true for both).
pub const BLOCK_CHARGE: usize = 1 << 20;
/// Default total for blocks fetched ahead, over all reads of a node.
pub const DEFAULT_BUDGET: usize = 256 << 20;

/// A node's budget for blocks fetched ahead; cheap to clone.
#[derive(Debug, Clone)]
pub struct PrefetchBudget {
    blocks: Arc<Semaphore>,
    total: usize,
}

/// One block's share of a [`PrefetchBudget`], given back on drop.
#[derive(Debug)]
pub struct Charge {
    _permit: OwnedSemaphorePermit,
}

impl PrefetchBudget {
    /// A budget of `bytes` (at least one block).
    pub fn new(bytes: usize) -> Self {
        let blocks = (bytes / BLOCK_CHARGE).max(1);
        Self {
            blocks: Arc::new(Semaphore::new(blocks)),
            total: blocks,
        }
    }

    /// A block's share if one is free now; `None` tells the read to fetch
    /// no further ahead for the moment.
    pub fn try_charge(&self) -> Option<Charge> {
        self.blocks
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|permit| Charge { _permit: permit })
    }

    /// Bytes charged now (for tests and metrics).
    pub fn in_use(&self) -> usize {
        (self.total - self.blocks.available_permits()) * BLOCK_CHARGE
    }
}

impl Default for PrefetchBudget {
    fn default() -> Self {
        Self::new(DEFAULT_BUDGET)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_stop_at_the_budget_and_come_back_on_drop() {
        let budget = PrefetchBudget::new(3 * BLOCK_CHARGE);
        let charges: Vec<Charge> = std::iter::from_fn(|| budget.try_charge()).collect();
        assert_eq!(charges.len(), 3);
        assert_eq!(budget.in_use(), 3 * BLOCK_CHARGE);
        drop(charges);
        assert_eq!(budget.in_use(), 0);
        assert!(budget.try_charge().is_some());
    }
}
