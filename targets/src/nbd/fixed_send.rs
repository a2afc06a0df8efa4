//! How a write's payload that is the request's own registered pages (zc, auto-zc) goes
//! out: copied out with the headers when small (`stage_payload`), else sent from the
//! registered buffer with the op `PayloadSends::pick` chooses: SEND from a registered
//! buffer (IORING_OP_SEND with IORING_RECVSEND_FIXED_BUF) when the kernel has it (the
//! probe `fixed_io::send_supported` says), SEND_ZC for a large one on TCP to another machine
//! (`PayloadSends::for_connection`), WRITE_FIXED otherwise.
//!
//! With MSG_WAITALL such a SEND on a stream socket is all or a failure, like a SENDMSG
//! (io_uring retries a partial send itself), so it links into a send chain and more
//! requests may follow it, on TCP and Unix sockets alike; unlike SEND_ZC it completes
//! once, so the request is not held until a zero-copy notification.

use super::fixed_io;
use crate::Ring;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

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
    /// The kernel sends from registered buffers (`fixed_io::send_supported`).
    pub(super) fixed: bool,
}

impl PayloadSends {
    /// What a queue's connection `sock` uses: SEND_ZC only over plain TCP (`tcp`: not a
    /// Unix socket, which copies anyway, nor kernel TLS, which refuses it), and not to a
    /// server on this machine where plain SEND from the registered buffer can take its
    /// place (see `ends`). Decided once per queue: a reconnect goes to the same URI.
    pub(super) fn for_connection(sock: BorrowedFd<'_>, tcp: bool) -> Self {
        let fixed = fixed_io::send_supported();
        if !tcp {
            return PayloadSends { zc: false, fixed };
        }
        let ends = ends(sock);
        let peer = ends.map_or_else(|| "?".to_string(), |(_, p)| p.to_string());
        if fixed && ends.is_some_and(|(me, peer)| is_local(me, peer)) {
            log::info!(
                "nbd: server {peer} is on this machine: large write payloads go with SEND \
                 (a zero-copy send would be copied on its way back in)"
            );
            return PayloadSends { zc: false, fixed };
        }
        log::info!("nbd: server {peer}: large write payloads go with SEND_ZC");
        PayloadSends { zc: true, fixed }
    }

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

/// The two addresses of TCP connection `sock`, (this end, the server), or None when one
/// cannot be read.
fn ends(sock: BorrowedFd<'_>) -> Option<(IpAddr, IpAddr)> {
    use nix::sys::socket::{getpeername, getsockname, SockaddrStorage};
    let ip = |a: SockaddrStorage| -> Option<IpAddr> {
        if let Some(v4) = a.as_sockaddr_in() {
            Some(IpAddr::V4(v4.ip()))
        } else {
            a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        }
    };
    let fd = sock.as_raw_fd();
    let me = getsockname::<SockaddrStorage>(fd).ok().and_then(ip)?;
    let peer = getpeername::<SockaddrStorage>(fd).ok().and_then(ip)?;
    Some((me, peer))
}

/// Whether a connection from `me` to `peer` stays on this machine: the server's address
/// is a loopback address or this end's own (the kernel picks a local destination
/// address as the source). A zero-copy send to a local socket is copied when it is
/// looped back (the kernel's "deferred copy", Documentation/networking/msg_zerocopy.rst),
/// so SEND_ZC only adds a notification to wait for and holds the request until it:
/// measured on 512 KiB writes to nbdkit on 127.0.0.1, SEND from the registered buffer
/// cost 15% less CPU per write (docs/research/issue-12-speed.md 12.1).
fn is_local(me: IpAddr, peer: IpAddr) -> bool {
    let canon = |a: IpAddr| a.to_canonical();
    let (me, peer) = (canon(me), canon(peer));
    peer.is_loopback() || me == peer
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_ring::TestRing;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

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
    fn a_server_on_this_machine_is_told_apart_by_its_address() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(is_local(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(is_local(ip("127.0.0.1"), ip("127.0.0.2")));
        assert!(is_local(ip("::1"), ip("::1")));
        assert!(is_local(ip("::ffff:127.0.0.1"), ip("::ffff:127.0.0.1")));
        assert!(is_local(ip("10.0.0.5"), ip("10.0.0.5")));
        assert!(!is_local(ip("10.0.0.5"), ip("10.0.0.6")));
        assert!(!is_local(ip("2001:db8::1"), ip("2001:db8::2")));
        assert!(!is_local(ip("::ffff:10.0.0.5"), ip("10.0.0.6")));
    }

    #[test]
    fn connections_to_this_machine_send_large_payloads_without_zero_copy() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (unix, _peer) = UnixStream::pair().unwrap();
        let (me, peer) = ends(tcp.as_fd()).unwrap();
        assert!(is_local(me, peer), "{me} -> {peer}");
        assert!(
            ends(unix.as_fd()).is_none(),
            "a Unix socket has no IP address"
        );
        let on_tcp = PayloadSends::for_connection(tcp.as_fd(), true);
        let on_unix = PayloadSends::for_connection(unix.as_fd(), false);
        assert!(!on_unix.zc);
        // Where the kernel cannot SEND from registered buffers, SEND_ZC stays: the only
        // other way is a WRITE_FIXED, which ends the chain.
        assert_eq!(on_tcp.zc, !on_tcp.fixed);
        assert_eq!(
            on_tcp.pick(512 << 10) == PayloadSend::Zc,
            !fixed_io::send_supported()
        );
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
