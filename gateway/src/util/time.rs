//! The wall clock in the unit every signed document here uses, failing
//! closed: a clock before 1970 is an error for whatever signs, and counts
//! as the end of time for whatever checks an expiry.

use std::sync::Once;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The system clock reads a time before the Unix epoch: no expiry can be
/// checked and no document dated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the system clock is {} s before 1970; set the clock and retry", .behind.as_secs())]
pub struct ClockError {
    /// How far before the epoch the clock reads.
    pub behind: Duration,
}

/// Seconds since the Unix epoch at `at`.
pub fn unix_time(at: SystemTime) -> Result<u64, ClockError> {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|e| ClockError {
            behind: e.duration(),
        })
}

/// Seconds since the Unix epoch now, for what a timestamp goes into
/// (signed `created`/`expires`, records): dating a document 1970 + 0 would
/// make it look ancient or, worse, valid forever, so it is an error.
pub fn now() -> Result<u64, ClockError> {
    unix_time(SystemTime::now())
}

/// Refuses to start with a clock before 1970: the gateway would otherwise
/// run with every expiry check answering "expired".
pub fn check_clock() -> Result<(), ClockError> {
    now().map(drop)
}

/// Seconds since the Unix epoch now, for expiry checks (`now < expires`).
/// With a clock before 1970 this is `u64::MAX`, so everything counts as
/// expired (fail closed; 0 would make nothing expire), and the first such
/// read logs an error.
pub fn unix_now() -> u64 {
    or_end_of_time(now())
}

fn or_end_of_time(now: Result<u64, ClockError>) -> u64 {
    static LOGGED: Once = Once::new();
    now.unwrap_or_else(|e| {
        LOGGED.call_once(|| tracing::error!("{e}: treating every signature as expired"));
        u64::MAX
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_seconds_since_the_epoch() {
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(999);
        assert_eq!(unix_time(at), Ok(1_700_000_000));
        assert_eq!(unix_time(UNIX_EPOCH), Ok(0));
    }

    #[test]
    fn rejects_a_clock_before_1970_with_how_far_behind() {
        let at = UNIX_EPOCH - Duration::from_secs(86_400);
        let err = unix_time(at).expect_err("before the epoch");
        assert_eq!(err.behind, Duration::from_secs(86_400));
        assert!(err.to_string().contains("before 1970"), "{err}");
    }

    #[test]
    fn a_clock_before_1970_makes_everything_expired() {
        let before = unix_time(UNIX_EPOCH - Duration::from_secs(1));
        assert_eq!(or_end_of_time(before), u64::MAX);
        assert_eq!(or_end_of_time(Ok(42)), 42);
    }
}
