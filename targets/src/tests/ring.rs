//! A real io_uring standing in for the daemon's queue loop in the targets' unit tests:
//! it labels SQEs the way a queue does (step and tag, or a target-wide event), hands
//! completions back, takes requests finished through `Ring::finish`, and copies into
//! the daemon buffers a test lends it (`lend`), as a queue does. A request's own pages
//! (zc) are stood in for by a memfd per request (`lend_pages`), reached as the queue
//! reaches real pages with user copy: copies in at once, copies out with a READ SQE.

use crate::{IoBuf, Ring, RingFull};
use io_uring::{squeue, IoUring};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

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
    /// The stand-ins for requests' own pages (`lend_pages`).
    pages: HashMap<u16, File>,
    /// A fault: this many of the next copies out of pages fail (EBADF), as a user copy
    /// the driver refuses would.
    pub(crate) fail_copies: u32,
}

impl TestRing {
    pub(crate) fn new(entries: u32) -> TestRing {
        TestRing {
            ring: IoUring::new(entries).expect("io_uring"),
            finished: Vec::new(),
            pushed: Vec::new(),
            bufs: HashMap::new(),
            pages: HashMap::new(),
            fail_copies: 0,
        }
    }

    /// Request `tag`'s buffer is its own pages, holding `data`: `IoBuf::Pages`, whose
    /// bytes only copies through this ring reach (`pages_data` reads them back).
    pub(crate) fn lend_pages(&mut self, tag: u16, data: &[u8]) -> IoBuf {
        // SAFETY: a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"test-pages".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: a new descriptor owned by nothing else.
        let f = unsafe { File::from_raw_fd(fd) };
        f.write_all_at(data, 0).expect("fill the pages");
        self.pages.insert(tag, f);
        let buf = IoBuf::Pages {
            index: tag,
            len: data.len(),
        };
        self.bufs.insert(tag, buf);
        buf
    }

    /// What request `tag`'s pages hold.
    pub(crate) fn pages_data(&self, tag: u16) -> Vec<u8> {
        let Some(IoBuf::Pages { len, .. }) = self.bufs.get(&tag) else {
            panic!("tag {tag} has no pages")
        };
        let mut out = vec![0u8; *len];
        self.pages[&tag]
            .read_exact_at(&mut out, 0)
            .expect("read the pages");
        out
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
        match self.buf(tag)? {
            buf @ IoBuf::Pages { .. } => {
                buf.check_range(offset, data.len())?;
                self.pages[&tag].write_all_at(data, offset as u64)
            }
            // SAFETY: `lend`'s contract.
            buf => unsafe { buf.copy_in(offset, data) },
        }
    }
    unsafe fn push_copy_from_request(
        &mut self,
        tag: u16,
        step: u16,
        offset: usize,
        into: *mut u8,
        len: usize,
        link: bool,
    ) -> io::Result<()> {
        let buf @ IoBuf::Pages { .. } = self.buf(tag)? else {
            return Err(io::ErrorKind::Unsupported.into());
        };
        buf.check_range(offset, len)?;
        let fd = if self.fail_copies > 0 {
            self.fail_copies -= 1;
            -1
        } else {
            self.pages[&tag].as_raw_fd()
        };
        let sqe = io_uring::opcode::Read::new(io_uring::types::Fd(fd), into, len as u32)
            .offset(offset as u64)
            .build();
        let sqe = if link {
            sqe.flags(squeue::Flags::IO_LINK)
        } else {
            sqe
        };
        // SAFETY: `into` is the caller's to keep valid (the trait's contract); the file
        // lives as long as this ring.
        unsafe { self.push(tag, step, sqe) }.map_err(|_| io::ErrorKind::WouldBlock.into())
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
