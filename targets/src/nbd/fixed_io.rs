//! SEND from and RECV into registered buffers (IORING_OP_SEND / IORING_OP_RECV with
//! IORING_RECVSEND_FIXED_BUF), and the probes that say whether this kernel has them.
//!
//! Both are recent additions to io_uring (older kernels refuse the flag with EINVAL), and
//! both keep MSG_WAITALL's meaning on a stream socket: io_uring retries a partial transfer
//! itself, inside the kernel, until all bytes have gone or come, or the socket fails. For
//! a payload in a request's registered pages (zc, auto-zc) that is what a READ_FIXED or
//! WRITE_FIXED on the socket cannot do: those stop at what the socket takes or holds, and
//! every short one costs a ring round trip. For a registered daemon buffer (fixed) they
//! copy with the kernel's memcpy instead of the user-copy routine.

use io_uring::{opcode, squeue, types, IoUring};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

/// `IORING_RECVSEND_FIXED_BUF` in the SQE's `ioprio` (not exported by the io-uring crate).
const RECVSEND_FIXED_BUF: u16 = 1 << 2;

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

/// A RECV of `len` bytes with MSG_WAITALL into registered buffer `index` at `addr`.
pub(super) fn recv_all(fd: types::Fd, index: u16, addr: u64, len: u32) -> squeue::Entry {
    opcode::Recv::new(fd, addr as *mut u8, len)
        .ioprio(RECVSEND_FIXED_BUF)
        // As for `send`: buf_group is the SQE's buf_index field.
        .buf_group(index)
        .flags(libc::MSG_WAITALL)
        .build()
}

/// Whether this kernel sends from registered buffers. Probed once per process.
pub(super) fn send_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| probed(Dir::Send))
}

/// Whether this kernel receives into registered buffers. Probed once per process.
pub(super) fn recv_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| probed(Dir::Recv))
}

#[derive(Clone, Copy)]
enum Dir {
    Send,
    Recv,
}

/// The probe's answer for `dir`, logged (a probe that cannot run counts as no).
fn probed(dir: Dir) -> bool {
    let (op, yes, no) = match dir {
        Dir::Send => (
            "SEND from registered buffers",
            "nbd: the kernel sends write payloads from registered buffers",
            "nbd: the kernel cannot SEND from registered buffers: zero-copy write payloads go out with SEND_ZC (TCP) or WRITE_FIXED (Unix sockets)",
        ),
        Dir::Recv => (
            "RECV into registered buffers",
            "nbd: the kernel receives large read payloads into registered buffers, whole",
            "nbd: the kernel cannot RECV into registered buffers: large zero-copy read payloads on Unix sockets are read with READ_FIXED, piece by piece",
        ),
    };
    let supported = probe(dir).unwrap_or_else(|e| {
        log::warn!("nbd: cannot probe {op}: {e}");
        false
    });
    log::info!("{}", if supported { yes } else { no });
    supported
}

/// Moves 8 bytes over a socket pair with the registered-buffer op of `dir` (the other
/// end a plain write or read) and checks that they arrived.
fn probe(dir: Dir) -> io::Result<bool> {
    const DATA: [u8; 8] = *b"ublkdnbd";
    let (a, b) = UnixStream::pair()?;
    let mut buf = Box::new(match dir {
        Dir::Send => DATA,
        Dir::Recv => [0u8; 8],
    });
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut ring = IoUring::new(2)?;
    // SAFETY: `buf` is boxed and outlives `ring`, which holds the registration (the ring
    // is dropped first: it is declared after `buf`).
    unsafe { ring.submitter().register_buffers(&[iov])? };
    let fd = types::Fd(a.as_raw_fd());
    let (addr, len) = (buf.as_ptr() as u64, buf.len() as u32);
    let sqe = match dir {
        Dir::Send => send(fd, 0, addr, len, libc::MSG_NOSIGNAL | libc::MSG_WAITALL),
        Dir::Recv => {
            io::Write::write_all(&mut &b, &DATA)?;
            recv_all(fd, 0, addr, len)
        }
    };
    // SAFETY: the SQE points into `buf`, registered above and alive until the
    // completion is reaped below.
    unsafe { ring.submission().push(&sqe) }.map_err(io::Error::other)?;
    ring.submit_and_wait(1)?;
    let res = ring
        .completion()
        .next()
        .map(|c| c.result())
        .ok_or_else(|| io::Error::other("no completion"))?;
    if res != len as i32 {
        return Ok(false);
    }
    let got = match dir {
        Dir::Send => {
            let mut got = [0u8; 8];
            io::Read::read_exact(&mut &b, &mut got)?;
            got
        }
        Dir::Recv => *buf,
    };
    Ok(got == DATA)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probes_run_on_this_kernel() {
        // Whether or not this kernel has the ops, the probes' own setup (socket pair,
        // ring, registration, the plain read and write) works, so a "no" is the kernel's.
        for dir in [Dir::Send, Dir::Recv] {
            if let Err(e) = probe(dir) {
                panic!("the probe failed: {e}");
            }
        }
    }
}
