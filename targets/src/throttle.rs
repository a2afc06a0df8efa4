//! A rate limit for log lines that a failing backend would repeat for every request.
//!
//! When a backend fails (a full file system under a loop file, an NBD server that
//! answers EIO, OSDs past their timeout), every request fails, thousands a second. A
//! line per request would flood the journal (and journald would then drop lines of
//! every service). [`Throttle`] lets the first few of each period through and counts
//! the rest, so that the log says what failed, why, and how often.

use std::time::{Duration, Instant};

/// Lets the first `burst` events of each `period` through and counts the others. A
/// period starts with the first event after the previous one ended.
#[derive(Debug)]
pub struct Throttle {
    burst: u32,
    period: Duration,
    /// When the current period started; None between periods.
    since: Option<Instant>,
    passed: u32,
    held: u64,
}

impl Throttle {
    pub const fn new(burst: u32, period: Duration) -> Self {
        Throttle {
            burst,
            period,
            since: None,
            passed: 0,
            held: 0,
        }
    }

    /// An event at `now`: true if it is to be logged, false if it was counted instead.
    /// Call [`Throttle::expire`] first, so that the count of the period before is not
    /// lost when this event starts a new one.
    pub fn admit(&mut self, now: Instant) -> bool {
        let since = *self.since.get_or_insert(now);
        if now.saturating_duration_since(since) >= self.period {
            // A period no one expired: this event starts the next one.
            self.since = Some(now);
            self.passed = 0;
        }
        if self.passed < self.burst {
            self.passed += 1;
            true
        } else {
            self.held += 1;
            false
        }
    }

    /// Whether events were counted and not yet reported.
    pub fn holding(&self) -> bool {
        self.held > 0
    }

    /// Ends the current period if it is over at `now`: how many events it counted
    /// without letting them through, and since when, if any.
    pub fn expire(&mut self, now: Instant) -> Option<(u64, Instant)> {
        let since = self.since?;
        if now.saturating_duration_since(since) < self.period {
            return None;
        }
        self.end()
    }

    /// Ends the current period now (the caller is going away): what it counted, as
    /// [`Throttle::expire`].
    pub fn end(&mut self) -> Option<(u64, Instant)> {
        let since = self.since.take()?;
        self.passed = 0;
        let held = std::mem::take(&mut self.held);
        (held > 0).then_some((held, since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn lets_a_burst_through_per_period_and_counts_the_rest() {
        let t0 = Instant::now();
        let mut t = Throttle::new(3, 10 * SEC);
        let admitted: Vec<bool> = (0..8).map(|_| t.admit(t0)).collect();
        assert_eq!(
            admitted,
            [true, true, true, false, false, false, false, false]
        );
        assert!(t.holding());
        assert_eq!(t.expire(t0 + 9 * SEC), None, "the period is not over");
        assert_eq!(t.expire(t0 + 10 * SEC), Some((5, t0)));
        assert!(!t.holding());
        // The next period lets a burst through again.
        let t1 = t0 + 11 * SEC;
        assert!(t.admit(t1) && t.admit(t1) && t.admit(t1));
        assert!(!t.admit(t1));
        assert_eq!(t.end(), Some((1, t1)));
        assert_eq!(t.end(), None, "reported once");
    }

    #[test]
    fn a_quiet_period_reports_nothing() {
        let t0 = Instant::now();
        let mut t = Throttle::new(3, 10 * SEC);
        assert!(t.admit(t0) && t.admit(t0));
        assert!(!t.holding());
        assert_eq!(t.expire(t0 + 20 * SEC), None);
        assert_eq!(t.end(), None);
    }

    #[test]
    fn an_event_after_an_unexpired_period_starts_a_new_one() {
        let t0 = Instant::now();
        let mut t = Throttle::new(1, 10 * SEC);
        assert!(t.admit(t0));
        assert!(!t.admit(t0 + SEC));
        // Nobody called expire: the count stays until it is reported.
        assert!(t.admit(t0 + 30 * SEC));
        assert!(!t.admit(t0 + 31 * SEC));
        assert_eq!(t.end(), Some((2, t0 + 30 * SEC)));
    }
}
