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

/// Pushes the copy of a small write's payload out of the request's own pages (user copy:
/// a READ on the char device, `Ring::push_copy_from_request`, labelled `step`, linked to
/// what follows if `link`) into the start of `room` (free space in `wstage`), so that it
/// goes out in the chain's SENDMSG beside the headers: a copy SQE that runs inline instead
/// of a send from the registered buffer per write, whose completion the chain would wait
/// for (measured: section 2.4 of docs/research/issue-12-speed.md). None when it is too
/// large, does not fit, or the copy cannot be pushed: the payload is then sent from its
/// pages.
///
/// # Safety
/// `room` must stay valid and untouched until the copy's completion has been handed to
/// the target.
pub(super) unsafe fn stage_payload(
    room: &mut [u8],
    ring: &mut dyn Ring,
    tag: u16,
    len: usize,
    step: u16,
    link: bool,
) -> Option<*mut u8> {
    if len > STAGE_MAX || len > room.len() {
        return None;
    }
    let into = room.as_mut_ptr();
    // SAFETY: the caller's guarantee.
    if let Err(e) = unsafe { ring.push_copy_from_request(tag, step, 0, into, len, link) } {
        log::debug!(
            "tag {tag}: cannot copy a write payload out of the request ({e}): sent from its pages"
        );
        return None;
    }
    Some(into)
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
        let mut room = vec![0u8; 8192];
        let mut stage = |room: &mut [u8], len: usize| {
            // SAFETY: `room` outlives the ring's use of it: nothing is pushed here (the
            // asserts below), so nothing writes to it.
            unsafe { stage_payload(room, &mut ring, 3, len, 5, true) }
        };
        // Too large, or more than the room left: not staged.
        assert!(stage(&mut room, STAGE_MAX + 1).is_none());
        assert!(stage(&mut room[4096..], 8192).is_none());
        // A copy the ring cannot push (tag 3 has no buffer lent) falls back to a send
        // from the pages.
        assert!(stage(&mut room, 4096).is_none());
        assert!(ring.pushed.is_empty());
    }
}
