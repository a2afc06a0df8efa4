//! SEND from a registered buffer (IORING_OP_SEND with IORING_RECVSEND_FIXED_BUF): how a
//! write's payload that is the request's own registered pages (zc, auto-zc) goes out
//! when the kernel has it, and the probe that says whether it does.
//!
//! With MSG_WAITALL such a SEND on a stream socket is all or a failure, like a SENDMSG
//! (io_uring retries a partial send itself), so it links into a send chain and more
//! requests may follow it, on TCP and Unix sockets alike; unlike SEND_ZC it completes
//! once, so the request is not held until a zero-copy notification.

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
