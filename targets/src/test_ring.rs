//! A real io_uring standing in for the daemon's queue loop in the targets' unit tests:
//! it labels SQEs the way a queue does (step and tag, or a target-wide event), hands
//! completions back, takes requests finished through `Ring::finish`, and copies into
//! the daemon buffers a test lends it (`lend`), as a queue does.

use crate::{IoBuf, Ring, RingFull};
use io_uring::{squeue, IoUring};
use std::collections::HashMap;
use std::io;

/// user_data: bit 63 marks a target-wide SQE, bits 16..32 the step, 0..16 the tag.
pub(crate) const EVENT: u64 = 1 << 63;

pub(crate) struct TestRing {
    pub(crate) ring: IoUring,
    /// Requests finished through `Ring::finish`.
    pub(crate) finished: Vec<(u16, i32)>,
    /// Steps of the per-request SQEs pushed, in order.
    pub(crate) pushed: Vec<u16>,
    /// The buffers of the requests in flight, for `copy_to_request`.
    bufs: HashMap<u16, IoBuf>,
}

impl TestRing {
    pub(crate) fn new(entries: u32) -> TestRing {
        TestRing {
            ring: IoUring::new(entries).expect("io_uring"),
            finished: Vec::new(),
            pushed: Vec::new(),
            bufs: HashMap::new(),
        }
    }

    /// Request `tag`'s buffer, which the queue would know: daemon memory that stays valid
    /// and untouched by the test until the request is finished.
    pub(crate) fn lend(&mut self, tag: u16, buf: IoBuf) {
        self.bufs.insert(tag, buf);
    }

    fn buf(&self, tag: u16) -> io::Result<IoBuf> {
        self.bufs
            .get(&tag)
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no buffer lent"))
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
    fn reserve(&mut self, sqes: usize, _requests: usize) -> bool {
        // No zero copy here: nothing of the ring's own goes in front.
        let n = sqes;
        let free = |r: &mut IoUring| {
            let sq = r.submission();
            sq.capacity() - sq.len()
        };
        if free(&mut self.ring) < n {
            let _ = self.ring.submit();
        }
        free(&mut self.ring) >= n
    }
    fn copy_to_request(&mut self, tag: u16, offset: usize, data: &[u8]) -> io::Result<()> {
        // SAFETY: `lend`'s contract.
        unsafe { self.buf(tag)?.copy_in(offset, data) }
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
