//! How a write's payload that is the request's own registered pages (zc, auto-zc) goes
//! out: copied out with the headers when small (`stage_payload`), else sent from the
//! registered buffer with the op `PayloadSends::pick` chooses: SEND from a registered
//! buffer (IORING_OP_SEND with IORING_RECVSEND_FIXED_BUF) when the kernel has it (the
//! probe `supported` says), SEND_ZC for a large one on TCP, WRITE_FIXED otherwise.
//!
//! With MSG_WAITALL such a SEND on a stream socket is all or a failure, like a SENDMSG
//! (io_uring retries a partial send itself), so it links into a send chain and more
//! requests may follow it, on TCP and Unix sockets alike; unlike SEND_ZC it completes
//! once, so the request is not held until a zero-copy notification.

use crate::Ring;
use io_uring::{opcode, squeue, types, IoUring};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

/// `IORING_RECVSEND_FIXED_BUF` in the SQE's `ioprio` (not exported by the io-uring crate).
const RECVSEND_FIXED_BUF: u16 = 1 << 2;

/// Writes in registered pages up to this size are copied out (user copy) into `wstage`
/// and sent with the headers (`stage_payload`).
const STAGE_MAX: usize = 16 << 10;
/// Payloads in registered pages from this size on go out with SEND_ZC where it may be
/// used (`PayloadSends::pick`).
const ZC_MIN: usize = 64 << 10;

/// How a write's payload in the request's registered pages (zc, auto-zc) is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PayloadSend {
    /// SEND from the registered buffer with MSG_WAITALL: all or a failure, so the chain
    /// goes on after it; completes once (see `send`).
    Send,
    /// SEND_ZC: all or a failure too; the request is held until its notification.
    Zc,
    /// WRITE_FIXED on the socket: can be short, so it ends the chain.
    Write,
}

/// What the connection and the kernel offer for payloads in registered pages.
#[derive(Debug, Clone, Copy)]
pub(super) struct PayloadSends {
    /// SEND_ZC may be used (TCP; a Unix socket copies anyway).
    pub(super) zc: bool,
    /// The kernel sends from registered buffers (`supported`).
    pub(super) fixed: bool,
}

impl PayloadSends {
    /// The send for a payload of `len` bytes: zero copy pays for its pinning and
    /// notification only on large payloads (below `ZC_MIN` a copy costs less).
    pub(super) fn pick(self, len: usize) -> PayloadSend {
        if self.zc && (len >= ZC_MIN || !self.fixed) {
            PayloadSend::Zc
        } else if self.fixed {
            PayloadSend::Send
        } else {
            PayloadSend::Write
        }
    }
}

/// Copies a small write's payload out of the request's own pages (user copy) into the
/// start of `room` (free space in `wstage`), so that it goes out in the chain's SENDMSG
/// beside the headers: one SQE and one completion fewer per write than a send from the
/// registered buffer, which is what the payload gets when this returns None.
pub(super) fn stage_payload(
    room: &mut [u8],
    ring: &mut dyn Ring,
    tag: u16,
    len: usize,
) -> Option<*mut u8> {
    if len > STAGE_MAX || len > room.len() {
        return None;
    }
    // No SQE points into `wstage` now: a chain is built only when none is in flight.
    if let Err(e) = ring.copy_from_request(tag, 0, &mut room[..len]) {
        log::debug!(
            "tag {tag}: copying a write payload out of the request failed ({e}): sent from its pages"
        );
        return None;
    }
    Some(room.as_mut_ptr())
}

/// A SEND of `len` bytes at `addr` in registered buffer `index`, with `flags`.
pub(super) fn send(fd: types::Fd, index: u16, addr: u64, len: u32, flags: i32) -> squeue::Entry {
    opcode::Send::new(fd, addr as *const u8, len)
        .ioprio(RECVSEND_FIXED_BUF)
        // The SQE's buf_index and buf_group share one field: for a fixed-buffer SEND it
        // is the registered buffer's index (the crate names only buf_group for SEND).
        .buf_group(index)
        .flags(flags)
        .build()
}

/// Whether this kernel sends from registered buffers (a recent addition: older kernels
/// refuse the flag with EINVAL). Probed once per process.
pub(super) fn supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let yes = probe().unwrap_or_else(|e| {
            log::warn!("nbd: cannot probe SEND from registered buffers: {e}");
            false
        });
        if yes {
            log::info!("nbd: the kernel sends write payloads from registered buffers");
        } else {
            log::info!(
                "nbd: the kernel cannot SEND from registered buffers: zero-copy write payloads go out with SEND_ZC (TCP) or WRITE_FIXED (Unix sockets)"
            );
        }
        yes
    })
}

/// Sends 8 bytes from a registered buffer over a socket pair and reads them back.
fn probe() -> io::Result<bool> {
    let (tx, rx) = UnixStream::pair()?;
    let mut data = Box::new(*b"ublkdnbd");
    let iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut ring = IoUring::new(2)?;
    // SAFETY: `data` is boxed and outlives `ring`, which holds the registration (the ring
    // is dropped first: it is declared after `data`).
    unsafe { ring.submitter().register_buffers(&[iov])? };
    let sqe = send(
        types::Fd(tx.as_raw_fd()),
        0,
        data.as_ptr() as u64,
        data.len() as u32,
        libc::MSG_NOSIGNAL | libc::MSG_WAITALL,
    );
    // SAFETY: the SQE points into `data`, registered above and alive until the
    // completion is reaped below.
    unsafe { ring.submission().push(&sqe) }.map_err(io::Error::other)?;
    ring.submit_and_wait(1)?;
    let res = ring
        .completion()
        .next()
        .map(|c| c.result())
        .ok_or_else(|| io::Error::other("no completion"))?;
    if res != data.len() as i32 {
        return Ok(false);
    }
    let mut got = [0u8; 8];
    io::Read::read_exact(&mut &rx, &mut got)?;
    Ok(got == *data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_ring::TestRing;
    use crate::IoBuf;

    #[test]
    fn payload_sends_pick_send_zc_only_for_large_tcp_payloads() {
        let tcp = PayloadSends {
            zc: true,
            fixed: true,
        };
        let unix = PayloadSends {
            zc: false,
            fixed: true,
        };
        assert_eq!(tcp.pick(4096), PayloadSend::Send);
        assert_eq!(tcp.pick(ZC_MIN - 1), PayloadSend::Send);
        assert_eq!(tcp.pick(ZC_MIN), PayloadSend::Zc);
        assert_eq!(unix.pick(4096), PayloadSend::Send);
        assert_eq!(unix.pick(512 << 10), PayloadSend::Send);
        // Without SEND from registered buffers: what the kernel has.
        let old_tcp = PayloadSends {
            fixed: false,
            ..tcp
        };
        let old_unix = PayloadSends {
            fixed: false,
            ..unix
        };
        assert_eq!(old_tcp.pick(4096), PayloadSend::Zc);
        assert_eq!(old_unix.pick(4096), PayloadSend::Write);
        assert_eq!(old_unix.pick(512 << 10), PayloadSend::Write);
    }

    #[test]
    fn only_small_payloads_that_fit_are_staged() {
        let mut ring = TestRing::new(4);
        let mut request = vec![7u8; STAGE_MAX + 1];
        let buf = IoBuf::User {
            addr: request.as_mut_ptr(),
            len: request.len(),
        };
        ring.lend(3, buf);
        let mut room = vec![0u8; 8192];
        // Too large, or more than the room left: not staged (and nothing is read).
        assert!(stage_payload(&mut room, &mut ring, 3, STAGE_MAX + 1).is_none());
        assert!(stage_payload(&mut room[4096..], &mut ring, 3, 8192).is_none());
        assert!(room.iter().all(|&b| b == 0));
        // A copy the queue cannot make (no buffer for the tag) falls back to a send from
        // the pages.
        assert!(stage_payload(&mut room, &mut ring, 4, 4096).is_none());
    }

    /// The staged bytes are the request's, copied by the queue.
    #[test]
    fn a_staged_payload_is_the_requests() {
        let mut ring = TestRing::new(4);
        let mut request = b"payload!".to_vec();
        let buf = IoBuf::User {
            addr: request.as_mut_ptr(),
            len: request.len(),
        };
        ring.lend(3, buf);
        let mut room = vec![0u8; 64];
        let got = stage_payload(&mut room, &mut ring, 3, 8);
        assert_eq!(got, Some(room.as_mut_ptr()));
        assert_eq!(&room[..8], b"payload!");
    }
}
