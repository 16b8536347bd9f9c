//! How far a long operation (a pin, a seed, a fetch, a sync) has got, for
//! progress bars. The operation counts into a [`Meter`]; whoever shows the
//! bar (the CLI in the same process, or the admin socket for a CLI in
//! another) reads a [`Progress`] snapshot when it redraws. Counting is one
//! relaxed atomic add, so the hot loops pay nothing measurable, and an
//! operation nobody watches counts into a meter nobody reads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// What a meter counts: bytes (drawn with rates in MiB/s) or items.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    #[default]
    Bytes,
    Items,
}

/// A snapshot of a meter: the current step's label, how much of it is done,
/// and its total when known.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub label: String,
    pub unit: Unit,
    pub done: u64,
    pub total: Option<u64>,
}

/// The current step: label, unit and total change together under one lock,
/// so a reader never sees one step's label with another's total.
#[derive(Debug, Default)]
struct Step {
    label: String,
    unit: Unit,
    total: Option<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    step: Mutex<Step>,
    done: AtomicU64,
}

/// A shared counter of one operation's progress; clones count into the same
/// meter.
#[derive(Debug, Clone, Default)]
pub struct Meter(Arc<Inner>);

impl Meter {
    /// A meter at zero with no step yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Begins a step: `label` (e.g. "pinning"), counted in `unit`, out of
    /// `total` when known. Resets what is done.
    pub fn start(&self, label: &str, unit: Unit, total: Option<u64>) {
        if let Ok(mut step) = self.0.step.lock() {
            *step = Step {
                label: label.to_owned(),
                unit,
                total,
            };
            self.0.done.store(0, Ordering::Relaxed);
        }
    }

    /// Counts `n` more units done.
    pub fn add(&self, n: u64) {
        self.0.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Where the operation stands now.
    pub fn snapshot(&self) -> Progress {
        match self.0.step.lock() {
            Ok(step) => Progress {
                label: step.label.clone(),
                unit: step.unit,
                done: self.0.done.load(Ordering::Relaxed),
                total: step.total,
            },
            Err(_) => Progress::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_count_into_one_meter_and_a_step_resets_it() {
        let meter = Meter::new();
        assert_eq!(meter.snapshot().total, None);
        meter.start("pinning", Unit::Bytes, Some(100));
        let clone = meter.clone();
        clone.add(30);
        meter.add(12);
        let now = meter.snapshot();
        assert_eq!(
            (now.label.as_str(), now.done, now.total),
            ("pinning", 42, Some(100))
        );
        meter.start("signing", Unit::Items, None);
        let now = clone.snapshot();
        assert_eq!((now.unit, now.done, now.total), (Unit::Items, 0, None));
    }
}
