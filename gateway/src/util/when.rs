//! Times as a person reads them in `status`: a UTC date and how long ago
//! (or how soon). Signed documents keep unix seconds; only output is
//! rendered, so no time-zone database is needed.

/// `2026-12-02 00:24:41 UTC`.
pub fn utc(secs: u64) -> String {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// `3 min ago`, `in 2 h`, `just now`: the distance from `now`, in its
/// largest whole unit.
pub fn relative(secs: u64, now: u64) -> String {
    let (distance, past) = if secs <= now {
        (now - secs, true)
    } else {
        (secs - now, false)
    };
    let amount = match distance {
        0..=9 => return "just now".to_owned(),
        10..=119 => format!("{distance} s"),
        120..=7_199 => format!("{} min", distance / 60),
        7_200..=172_799 => format!("{} h", distance / 3600),
        _ => format!("{} d", distance / 86_400),
    };
    if past {
        format!("{amount} ago")
    } else {
        format!("in {amount}")
    }
}

/// [`utc`] followed by [`relative`] in parentheses.
pub fn human(secs: u64, now: u64) -> String {
    format!("{} ({})", utc(secs), relative(secs, now))
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_match_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_171_081), "2026-12-02 00:24:41 UTC");
        assert_eq!(utc(u64::from(u32::MAX)), "2106-02-07 06:28:15 UTC");
    }

    #[test]
    fn every_day_follows_the_one_before() {
        let mut last = civil_from_days(0);
        for days in 1..200_000 {
            let next = civil_from_days(days);
            let (y, m, d) = last;
            let same_month = next == (y, m, d + 1);
            let next_month = next.2 == 1 && (next.1 == m + 1 && next.0 == y);
            let next_year = next == (y + 1, 1, 1) && (m, d) == (12, 31);
            assert!(same_month || next_month || next_year, "{last:?} → {next:?}");
            last = next;
        }
    }

    #[test]
    fn relative_times_use_the_largest_whole_unit() {
        assert_eq!(relative(100, 100), "just now");
        assert_eq!(relative(100, 145), "45 s ago");
        assert_eq!(relative(0, 600), "10 min ago");
        assert_eq!(relative(10_000, 0), "in 2 h");
        assert_eq!(relative(0, 3 * 86_400), "3 d ago");
        assert_eq!(human(0, 60), "1970-01-01 00:00:00 UTC (60 s ago)");
    }
}
