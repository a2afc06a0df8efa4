//! The memory of one send chain and its segments, one SQE each (`send.rs` decides what
//! goes in them): the iovecs and msghdrs the SENDMSGs point to, which stay put while the
//! chain is in flight; the SQE that sends a segment, or what is left of it after a short
//! send (`advance`).

use super::fixed_io;
use super::fixed_send::PayloadSend;
use io_uring::{opcode, squeue, types};

/// One SQE of a send chain, before it is built; with `Pace::OneByOne`, what is left of
/// it to send (`advance`).
#[derive(Debug, Clone, Copy)]
pub(super) enum SendSeg {
    /// SENDMSG of iovecs `first..first + count`, accounted to request `owner`, the last
    /// one whose bytes are in it: its reply cannot come before the SENDMSG is done, so
    /// it is still in flight when what is left is sent.
    Msg {
        owner: u16,
        first: usize,
        count: usize,
        bytes: usize,
    },
    /// A send of request `tag`'s payload from its own pages, registered at `index`,
    /// from byte `at`.
    Pages {
        tag: u16,
        index: u16,
        at: u32,
        len: u32,
        how: PayloadSend,
    },
}

/// Ends the SENDMSG being filled, `(owner, first iovec, bytes)`, at iovec `end`.
pub(super) fn close_run(segs: &mut Vec<SendSeg>, run: Option<(u16, usize, usize)>, end: usize) {
    if let Some((owner, first, bytes)) = run {
        segs.push(SendSeg::Msg {
            owner,
            first,
            count: end - first,
            bytes,
        });
    }
}

/// What a send SQE of the chain in flight must achieve.
#[derive(Debug, Clone, Copy)]
pub(super) enum Sent {
    /// All of these bytes (MSG_WAITALL).
    Bytes(usize),
    /// A WRITE_FIXED of request `tag`'s payload from `addr` (may be short: continued).
    Write {
        tag: u16,
        index: u16,
        addr: u64,
        len: u32,
    },
    /// `Pace::OneByOne`: what is left of segment `seg` (may be short: continued).
    Part(usize),
}

/// A chain's segments and the memory their SENDMSGs point to (boxed: never moved).
pub(super) struct Segments {
    pub(super) iovecs: Box<[libc::iovec]>,
    msgs: Box<[libc::msghdr]>,
    pub(super) list: Vec<SendSeg>,
}

impl Segments {
    /// Room for `iovecs` iovecs and `msgs` SENDMSGs.
    pub(super) fn new(iovecs: usize, msgs: usize) -> Self {
        // SAFETY: iovec and msghdr are plain C structs for which all-zero is valid.
        let zero_iov: libc::iovec = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let zero_msg: libc::msghdr = unsafe { std::mem::zeroed() };
        Segments {
            iovecs: vec![zero_iov; iovecs].into_boxed_slice(),
            msgs: vec![zero_msg; msgs].into_boxed_slice(),
            list: Vec::with_capacity(iovecs + 1),
        }
    }

    /// The SQE that sends segment `i` (what is left of it) with `flags`, its SENDMSG
    /// header in `msgs[msg]`; with the request it is accounted to and its bytes.
    pub(super) fn build(
        &mut self,
        i: usize,
        msg: usize,
        fd: types::Fd,
        flags: i32,
    ) -> (u16, Sent, squeue::Entry) {
        match self.list[i] {
            SendSeg::Msg {
                owner,
                first,
                count,
                bytes,
            } => {
                let m = &mut self.msgs[msg];
                // SAFETY: all-zero is a valid msghdr.
                *m = unsafe { std::mem::zeroed() };
                m.msg_iov = self.iovecs[first..].as_mut_ptr();
                m.msg_iovlen = count as _;
                let sqe = opcode::SendMsg::new(fd, m).flags(flags as u32).build();
                (owner, Sent::Bytes(bytes), sqe)
            }
            SendSeg::Pages {
                tag,
                index,
                at,
                len,
                how: PayloadSend::Send,
            } => {
                let sqe = fixed_io::send(fd, index, u64::from(at), len, flags);
                (tag, Sent::Bytes(len as usize), sqe)
            }
            SendSeg::Pages {
                tag,
                index,
                at,
                len,
                how: PayloadSend::Zc,
            } => {
                let sqe = opcode::SendZc::new(fd, at as usize as *const u8, len)
                    .buf_index(Some(index))
                    .flags(flags)
                    .build();
                (tag, Sent::Bytes(len as usize), sqe)
            }
            SendSeg::Pages {
                tag,
                index,
                at,
                len,
                how: PayloadSend::Write,
            } => {
                let sent = Sent::Write {
                    tag,
                    index,
                    addr: u64::from(at),
                    len,
                };
                (tag, sent, write_sqe(fd, sent))
            }
        }
    }

    /// Bytes left to send of segment `i`.
    pub(super) fn left(&self, i: usize) -> usize {
        match self.list[i] {
            SendSeg::Msg { bytes, .. } => bytes,
            SendSeg::Pages { len, .. } => len as usize,
        }
    }

    /// `n` more bytes of segment `i` went out (fewer than were left).
    pub(super) fn advance(&mut self, i: usize, n: usize) {
        match &mut self.list[i] {
            SendSeg::Msg {
                first,
                count,
                bytes,
                ..
            } => {
                *bytes -= n;
                let mut n = n;
                while *count > 0 && n >= self.iovecs[*first].iov_len {
                    n -= self.iovecs[*first].iov_len;
                    *first += 1;
                    *count -= 1;
                }
                if n > 0 {
                    let v = &mut self.iovecs[*first];
                    v.iov_base = v.iov_base.wrapping_byte_add(n);
                    v.iov_len -= n;
                }
            }
            SendSeg::Pages { at, len, .. } => {
                *at += n as u32;
                *len -= n as u32;
            }
        }
    }
}

/// The WRITE_FIXED that sends `w` (a payload in registered pages) on `fd`.
pub(super) fn write_sqe(fd: types::Fd, w: Sent) -> squeue::Entry {
    match w {
        Sent::Write {
            index, addr, len, ..
        } => opcode::WriteFixed::new(fd, addr as *const u8, len, index)
            .offset(u64::MAX)
            .build(),
        Sent::Bytes(_) | Sent::Part(_) => opcode::Nop::new().build(),
    }
}
