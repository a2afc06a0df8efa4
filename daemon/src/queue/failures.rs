//! Failed requests in the daemon's log, without flooding it.
//!
//! Every request that fails is counted (`errors` in `ublkctl show`), and the kernel
//! logs its own rate-limited "I/O error" lines with the sectors. The queue logs what
//! the kernel cannot know, the operation and the error the target met, for the first
//! few failures of every ten seconds, and then how many more there were: a backend that
//! fails every request does not flood the journal.

use std::io;
use std::time::{Duration, Instant};
use ublkd_targets::{IoDesc, Throttle};

/// Failures logged one by one per period.
const BURST: u32 = 5;
const PERIOD: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct FailureLog {
    dev: u32,
    qid: u16,
    throttle: Throttle,
}

impl FailureLog {
    pub fn new(dev: u32, qid: u16) -> Self {
        FailureLog {
            dev,
            qid,
            throttle: Throttle::new(BURST, PERIOD),
        }
    }

    /// Request `io` on `tag` failed with `res` (-errno).
    pub fn failed(&mut self, tag: u16, io: &IoDesc, res: i32) {
        let now = Instant::now();
        self.tick(now);
        if self.throttle.admit(now) {
            log::warn!(
                "dev {} queue {} tag {tag}: {:?} of {} bytes at offset {} failed: {}",
                self.dev,
                self.qid,
                io.op,
                io.len,
                io.offset,
                io::Error::from_raw_os_error(-res)
            );
        }
    }

    /// Whether failures are counted and not yet reported (the queue loop then calls
    /// [`FailureLog::tick`] every turn).
    pub fn holding(&self) -> bool {
        self.throttle.holding()
    }

    /// Reports the failures of a period that is over at `now`.
    pub fn tick(&mut self, now: Instant) {
        if let Some((n, since)) = self.throttle.expire(now) {
            self.report(n, now.saturating_duration_since(since));
        }
    }

    /// Reports what is counted; the queue is ending.
    pub fn end(&mut self) {
        if let Some((n, since)) = self.throttle.end() {
            self.report(n, since.elapsed());
        }
    }

    fn report(&self, n: u64, over: Duration) {
        log::warn!(
            "dev {} queue {}: {n} more requests failed in {} s, not logged one by one (`ublkctl show` counts every failure)",
            self.dev,
            self.qid,
            over.as_secs().max(1)
        );
    }
}
