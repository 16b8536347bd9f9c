//! Locks that outlive a panic.

use std::sync::{Mutex, MutexGuard};

/// Locks `m` even if a thread panicked while holding it: what these
/// mutexes guard (maps of work under way, queues) stays usable, and a
/// panic elsewhere must not take every later request down with it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
