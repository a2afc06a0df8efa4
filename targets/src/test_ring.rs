//! A real io_uring standing in for the daemon's queue loop in the targets' unit tests:
//! it labels SQEs the way a queue does (step and tag, or a target-wide event), hands
//! completions back, and takes requests finished through `Ring::finish`.

use crate::{Ring, RingFull};
use io_uring::{squeue, IoUring};

/// user_data: bit 63 marks a target-wide SQE, bits 16..32 the step, 0..16 the tag.
pub(crate) const EVENT: u64 = 1 << 63;

pub(crate) struct TestRing {
    pub(crate) ring: IoUring,
    /// Requests finished through `Ring::finish`.
    pub(crate) finished: Vec<(u16, i32)>,
    /// Steps of the per-request SQEs pushed, in order.
    pub(crate) pushed: Vec<u16>,
}

impl TestRing {
    pub(crate) fn new(entries: u32) -> TestRing {
        TestRing {
            ring: IoUring::new(entries).expect("io_uring"),
            finished: Vec::new(),
            pushed: Vec::new(),
        }
    }
}

/// `(event, step, tag)` of a completion's user_data.
pub(crate) fn decode(user_data: u64) -> (bool, u16, u16) {
    (
        user_data & EVENT != 0,
        (user_data >> 16) as u16,
        user_data as u16,
    )
}

impl Ring for TestRing {
    unsafe fn push(&mut self, tag: u16, step: u16, sqe: squeue::Entry) -> Result<(), RingFull> {
        let sqe = sqe.user_data((u64::from(step) << 16) | u64::from(tag));
        // SAFETY: forwarded from the caller.
        unsafe { self.ring.submission().push(&sqe) }.map_err(|_| RingFull)?;
        self.pushed.push(step);
        Ok(())
    }
    unsafe fn push_event(&mut self, step: u16, sqe: squeue::Entry) -> Result<(), RingFull> {
        let sqe = sqe.user_data(EVENT | (u64::from(step) << 16));
        // SAFETY: forwarded from the caller.
        unsafe { self.ring.submission().push(&sqe) }.map_err(|_| RingFull)
    }
    fn finish(&mut self, tag: u16, result: i32) {
        self.finished.push((tag, result));
    }
    fn reserve(&mut self, n: usize) -> bool {
        let free = |r: &mut IoUring| {
            let sq = r.submission();
            sq.capacity() - sq.len()
        };
        if free(&mut self.ring) < n {
            let _ = self.ring.submit();
        }
        free(&mut self.ring) >= n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        let mut r = TestRing::new(4);
        for (event, step, tag) in [
            (false, 3u16, 7u16),
            (true, 0x1234, 0),
            (false, 0xffff, 0xffff),
        ] {
            let sqe = io_uring::opcode::Nop::new().build();
            // SAFETY: a NOP points to no memory.
            unsafe {
                if event {
                    r.push_event(step, sqe).unwrap();
                } else {
                    r.push(tag, step, sqe).unwrap();
                }
            }
            r.ring.submit_and_wait(1).unwrap();
            let ud = r.ring.completion().next().unwrap().user_data();
            let tag = if event { 0 } else { tag };
            assert_eq!(decode(ud), (event, step, tag));
        }
    }
}
