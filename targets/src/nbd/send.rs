//! The send side of one connection: requests wait in a queue while a send chain is in
//! flight, then go out together as the next chain.
//!
//! A chain is one SENDMSG of every header and payload when the payloads are in daemon
//! memory (copy, fixed), and in the zero-copy modes, where a payload is the request's
//! own registered pages, SENDMSG of the headers up to a write's payload, a send of that
//! payload from the registered buffer (`PayloadSends::pick`: SEND, or SEND_ZC for a
//! large one on TCP), SENDMSG of what follows, and so on. Small payloads in registered
//! pages are copied out (user copy: a READ on the char device that the queue pushes,
//! `stage_payload`) and sent with the headers instead; those READs go first in the
//! chain. Every SQE of a chain has MSG_WAITALL and the chain is linked (IO_LINK): each
//! starts when the one before has sent (or copied) all of its bytes, and a failed or
//! short one cancels the rest, so requests never interleave on the wire. (Kernels
//! that cannot SEND from a registered buffer get WRITE_FIXED on Unix sockets, which can
//! be short and so ends its chain, and SEND_ZC for every payload on TCP.)
//!
//! On a kernel TLS socket (nbds:// over TCP) a send with MSG_WAITALL fails (EOPNOTSUPP),
//! and without it a send may be short, and a short send in a link does not stop the
//! next one, which would put its bytes after a gap. There a chain's SQEs go out one at
//! a time instead (`Pace::OneByOne`), unlinked and without MSG_WAITALL; a short one is
//! continued from where it stopped before the next one goes (and the first goes only
//! once the payload copies have completed). A request's bytes still
//! never interleave with another's, at the cost of a ring round trip per SQE of a chain
//! (one per chain when the payloads are in daemon memory: one SENDMSG).
//!
//! Which operation sends what is decided in one place, `SendChain::pump` (with
//! `PayloadSends::pick` for payloads in registered pages).

use super::conn::{Broken, Connection};
use super::fixed_send::{stage_payload, PayloadSend, PayloadSends};
use super::proto;
use super::segs::{close_run, write_sqe, Segments, SendSeg, Sent};
use super::step::{step, STEP_SEND, STEP_STAGE};
use super::tags::Tags;
use crate::{BlockOp, IoBuf, IoDesc, Ring};
use io_uring::squeue;
use std::collections::VecDeque;
use std::io;

/// `Pace::OneByOne` (kernel TLS): how many TLS records one connection may send before
/// the queue makes a new one, with new keys. The kernel does not renew its send key, and
/// AES-GCM may encrypt at most 2^24.5 records under one (RFC 8446, 5.5): about 256 GiB
/// of full 16 KiB records here.
pub(super) const RECORD_LIMIT: u64 = 1 << 24;
/// The largest TLS record's plaintext.
const RECORD_LEN: u64 = 16 << 10;

/// Most requests one send chain carries.
const MAX_CHAIN: usize = 64;
/// The staging buffer for small write payloads of one send chain.
const STAGE_LEN: usize = MAX_CHAIN * 4096;
/// How the SQEs of a chain go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pace {
    /// All at once, linked, each with MSG_WAITALL: all or a failure.
    Linked,
    /// One at a time, without MSG_WAITALL; a short one is continued (kernel TLS). After
    /// `record_limit` TLS records (`RECORD_LIMIT`) the connection is renewed.
    OneByOne { record_limit: u64 },
}

/// Bytes that follow a request's header on the wire: a write's data.
pub(super) fn payload_len(io: &IoDesc) -> usize {
    if matches!(io.op, BlockOp::Write) {
        io.len as usize
    } else {
        0
    }
}

/// What a socket operation's result says went wrong (0 is end of stream).
fn socket_failure(res: i32, expected: usize) -> String {
    if res == 0 {
        "the server closed the connection".to_string()
    } else if res < 0 {
        io::Error::from_raw_os_error(-res).to_string()
    } else {
        format!("{res} of {expected} bytes")
    }
}

pub(super) struct SendChain {
    /// Request headers, one per tag: stable memory for the send SQEs.
    headers: Vec<[u8; proto::REQUEST_LEN]>,
    /// Requests waiting for the next send chain.
    queue: VecDeque<u16>,
    /// The send chain's segments and their memory.
    segs: Segments,
    /// Small write payloads copied out of requests' own pages for the chain being built
    /// or in flight (empty without user copy).
    wstage: Box<[u8]>,
    /// What each SQE of the current connection's send chain must send, in order.
    expect: VecDeque<Sent>,
    /// How payloads in registered pages may be sent.
    payload_sends: PayloadSends,
    pace: Pace,
    /// `Pace::OneByOne`: the chain's segments from this one on are still to be sent.
    next: Option<usize>,
    /// `Pace::OneByOne`: the most TLS records the connection's sends can have made, and
    /// how many it may make (`RECORD_LIMIT`).
    records: u64,
    record_limit: u64,
    /// Send SQEs in flight, of any connection: the next chain waits for zero.
    inflight: u32,
}

impl SendChain {
    pub(super) fn new(
        depth: usize,
        payload_sends: PayloadSends,
        pace: Pace,
        // The queue copies payloads out of requests' own pages (user copy): small ones
        // are staged in `wstage`.
        user_copy: bool,
    ) -> Self {
        SendChain {
            headers: vec![[0; proto::REQUEST_LEN]; depth],
            queue: VecDeque::with_capacity(depth),
            segs: Segments::new(2 * MAX_CHAIN, MAX_CHAIN + 1),
            wstage: vec![0u8; if user_copy { STAGE_LEN } else { 0 }].into_boxed_slice(),
            expect: VecDeque::with_capacity(2 * MAX_CHAIN + 1),
            payload_sends,
            pace,
            next: None,
            records: 0,
            record_limit: match pace {
                Pace::Linked => u64::MAX,
                Pace::OneByOne { record_limit } => record_limit,
            },
            inflight: 0,
        }
    }

    /// Request `tag` will go out with this header instead of the one it was queued
    /// with.
    pub(super) fn set_header(&mut self, tag: u16, header: [u8; proto::REQUEST_LEN]) {
        self.headers[usize::from(tag)] = header;
    }

    /// Request `tag` with this header waits for the next chain.
    pub(super) fn enqueue(&mut self, tag: u16, header: [u8; proto::REQUEST_LEN]) {
        self.set_header(tag, header);
        self.queue.push_back(tag);
    }

    /// The requests waiting for the next chain.
    pub(super) fn queued(&self) -> &VecDeque<u16> {
        &self.queue
    }

    /// Whether the connection has sent as many TLS records as one key may encrypt
    /// (`RECORD_LIMIT`; kernel TLS only): time for a new connection.
    pub(super) fn key_worn_out(&self) -> bool {
        self.records >= self.record_limit
    }

    /// Whether part of a chain (`Pace::OneByOne`) is still to be sent.
    pub(super) fn mid_chain(&self) -> bool {
        self.next.is_some()
    }

    /// The most TLS records the connection's sends can have made.
    pub(super) fn records(&self) -> u64 {
        self.records
    }

    /// Send SQEs in flight, of any connection.
    pub(super) fn inflight(&self) -> u32 {
        self.inflight
    }

    /// Whether a send can go out now: none in flight, and the rest of a chain or
    /// requests waiting.
    pub(super) fn ready(&self) -> bool {
        self.inflight == 0 && (self.next.is_some() || !self.queue.is_empty())
    }

    /// A send SQE completed, of any connection.
    pub(super) fn sqe_completed(&mut self) {
        self.inflight = self.inflight.saturating_sub(1);
    }

    /// The copy of request `tag`'s payload into `wstage` (`stage_payload`) completed
    /// with `res`, on the current connection. Nothing of the chain has gone out before
    /// it: a failed or short copy cancelled the rest of a linked chain, and a chain
    /// sent one by one waits for its copies. Either way the connection's sends no longer
    /// match what was built, so it is treated as lost and its requests are sent again
    /// (each a limited number of times) on the next one.
    pub(super) fn staged(&self, tag: u16, res: i32, tags: &Tags) -> Result<(), Broken> {
        let want = tags.get(tag).payload_len();
        if res >= 0 && res as usize == want {
            return Ok(());
        }
        let why = if res < 0 {
            io::Error::from_raw_os_error(-res).to_string()
        } else {
            format!("{res} of {want} bytes")
        };
        let why = format!("copying tag {tag}'s write payload out of its pages failed: {why}");
        Err(Broken::Lost(why))
    }

    /// The connection is gone: what was expected of it is forgotten, and `resend` waits
    /// for the next chain (on the next connection).
    pub(super) fn reset(&mut self, resend: VecDeque<u16>) {
        self.expect.clear();
        self.next = None;
        self.records = 0;
        self.queue = resend;
    }

    /// The connection is gone for good: nothing more is sent.
    pub(super) fn clear(&mut self) {
        self.expect.clear();
        self.next = None;
        self.queue.clear();
    }

    /// Sends the queued requests as one chain (see the module comment), or with
    /// `Pace::OneByOne` the next part of the chain under way. While
    /// a receive into the staging buffer may take several replies (`staging`), the
    /// reply of a read whose payload must go straight to its buffer must not arrive:
    /// such reads wait for that receive to end.
    pub(super) fn pump(
        &mut self,
        conn: &Connection,
        tags: &mut Tags,
        staging: bool,
        ring: &mut dyn Ring,
    ) -> Result<(), Broken> {
        if let Some(i) = self.next {
            return self.push_part(i, conn, tags, ring);
        }
        let n = self.queue.len().min(MAX_CHAIN);
        // Per request at most a payload copy, a SENDMSG and a SEND_ZC (the queue adds its
        // registrations).
        if n == 0 || !ring.reserve(3 * n + 1, n) {
            return Ok(());
        }
        self.segs.list.clear();
        let mut iov = 0usize;
        // The SENDMSG being filled: (owner, first iovec, bytes).
        let mut run: Option<(u16, usize, usize)> = None;
        let mut taken = 0;
        // Bytes of `wstage` this chain uses, and the copies into it pushed.
        let mut staged = 0usize;
        let mut copies = 0u32;
        let link = self.pace == Pace::Linked;
        let generation = conn.generation();
        for &tag in self.queue.iter().take(n) {
            if staging && tags.is_direct(tag) {
                break;
            }
            taken += 1;
            let t = usize::from(tag);
            if tags.get(tag).io.is_none() {
                continue;
            }
            tags.sent(tag);
            let hdr = self.headers[t].as_ptr();
            self.segs.iovecs[iov] = libc::iovec {
                iov_base: hdr as *mut libc::c_void,
                iov_len: proto::REQUEST_LEN,
            };
            iov += 1;
            let (_, first, bytes) = run.unwrap_or((tag, iov - 1, 0));
            run = Some((tag, first, bytes + proto::REQUEST_LEN));
            let payload = tags.get(tag).payload_len();
            if payload == 0 {
                continue;
            }
            let user = match tags.get(tag).buf {
                Some(IoBuf::User { addr, .. }) => Some(addr),
                Some(IoBuf::Fixed { addr, .. }) => Some(addr as *mut u8),
                Some(IoBuf::Pages { .. }) => {
                    let room = &mut self.wstage[staged..];
                    let label = step(STEP_STAGE, generation);
                    // SAFETY: `wstage` is not touched again before every SQE of this
                    // chain has completed (`inflight`, which counts the copy; a chain
                    // is built only when it is zero), and outlives the queue's ring.
                    unsafe { stage_payload(room, ring, tag, payload, label, link) }.inspect(|_| {
                        staged += payload;
                        copies += 1;
                        tags.get_mut(tag).sqes += 1;
                    })
                }
                _ => None,
            };
            if let Some(addr) = user {
                self.segs.iovecs[iov] = libc::iovec {
                    iov_base: addr.cast(),
                    iov_len: payload,
                };
                iov += 1;
                if let Some((o, f, b)) = run {
                    run = Some((o, f, b + payload));
                }
            } else if let Some(IoBuf::Pages { index, .. }) = tags.get(tag).buf {
                close_run(&mut self.segs.list, run.take(), iov);
                let how = self.payload_sends.pick(payload);
                self.segs.list.push(SendSeg::Pages {
                    tag,
                    index,
                    at: 0,
                    len: payload as u32,
                    how,
                });
                if how == PayloadSend::Write {
                    // A WRITE_FIXED can be short: nothing may follow it in the chain.
                    break;
                }
            }
        }
        close_run(&mut self.segs.list, run.take(), iov);
        self.queue.drain(..taken);
        self.inflight += copies;
        match self.pace {
            Pace::Linked => self.push_linked(conn, tags, ring),
            Pace::OneByOne { .. } if self.segs.list.is_empty() => Ok(()),
            Pace::OneByOne { .. } => {
                self.next = Some(0);
                if copies > 0 {
                    // The first send waits for the copies (`ready`): unlinked, they
                    // could otherwise be overtaken.
                    return Ok(());
                }
                self.push_part(0, conn, tags, ring)
            }
        }
    }

    /// Pushes the chain built in `segs`, linked, every SQE with MSG_WAITALL.
    fn push_linked(
        &mut self,
        conn: &Connection,
        tags: &mut Tags,
        ring: &mut dyn Ring,
    ) -> Result<(), Broken> {
        let generation = conn.generation();
        let fd = conn.fd();
        let last = self.segs.list.len().saturating_sub(1);
        let mut msg = 0usize;
        for i in 0..self.segs.list.len() {
            let more = if i < last { libc::MSG_MORE } else { 0 };
            let flags = libc::MSG_NOSIGNAL | libc::MSG_WAITALL | more;
            let (owner, sent, sqe) = self.segs.build(i, msg, fd, flags);
            if matches!(self.segs.list[i], SendSeg::Msg { .. }) {
                msg += 1;
            }
            let sqe = if i < last {
                sqe.flags(squeue::Flags::IO_LINK)
            } else {
                sqe
            };
            // SAFETY: the msghdrs and iovecs live in boxed slices of this handler that
            // are not touched while a chain is in flight (the kernel copies them at
            // submission anyway); the headers and payloads they point to stay valid
            // until the request is finished, which waits for the request's own SQEs,
            // and a reply (which lets a request finish) comes only after the server
            // has got all of the request's bytes. A zero-copy payload is held until its
            // notification by the queue.
            match unsafe { ring.push(owner, step(STEP_SEND, generation), sqe) } {
                Ok(()) => {
                    tags.get_mut(owner).sqes += 1;
                    self.inflight += 1;
                    self.expect.push_back(sent);
                }
                Err(_) => {
                    // Cannot happen after `reserve`; fail safe if it does.
                    let why = "the ring is full in the middle of a send";
                    return Err(Broken::Lost(why.into()));
                }
            }
        }
        Ok(())
    }

    /// `Pace::OneByOne`: pushes what is left of segment `i`, on its own, without
    /// MSG_WAITALL. The ring being full only delays it to the next `pump`.
    fn push_part(
        &mut self,
        i: usize,
        conn: &Connection,
        tags: &mut Tags,
        ring: &mut dyn Ring,
    ) -> Result<(), Broken> {
        // The send, of one request's bytes.
        if !ring.reserve(1, 1) {
            return Ok(());
        }
        let more = if i + 1 < self.segs.list.len() {
            libc::MSG_MORE
        } else {
            0
        };
        let (owner, _, sqe) = self.segs.build(i, 0, conn.fd(), libc::MSG_NOSIGNAL | more);
        // SAFETY: as in `push_linked`; the one msghdr in use is `msgs[0]`, and what is
        // left of a segment belongs to requests whose bytes are not all sent, so none of
        // them can have been answered and finished.
        match unsafe { ring.push(owner, step(STEP_SEND, conn.generation()), sqe) } {
            Ok(()) => {
                tags.get_mut(owner).sqes += 1;
                self.inflight += 1;
                self.expect.push_back(Sent::Part(i));
                Ok(())
            }
            Err(_) => Ok(()),
        }
    }

    /// A send SQE of the current connection completed.
    pub(super) fn done(
        &mut self,
        res: i32,
        conn: &Connection,
        tags: &mut Tags,
        ring: &mut dyn Ring,
    ) -> Result<(), Broken> {
        let Some(sent) = self.expect.pop_front() else {
            let why = "a send completion nobody waited for";
            return Err(Broken::Lost(why.into()));
        };
        match sent {
            Sent::Bytes(expected) if res < 0 || res as usize != expected => {
                let why = socket_failure(res, expected);
                Err(Broken::Lost(format!("send: {why}")))
            }
            Sent::Bytes(_) => Ok(()),
            Sent::Part(i) => {
                if res == -libc::EAGAIN || res == -libc::EINTR {
                    return Ok(()); // nothing went: `pump` sends it again
                }
                let left = self.segs.left(i);
                if res <= 0 || res as usize > left {
                    let why = socket_failure(res, left);
                    return Err(Broken::Lost(format!("send: {why}")));
                }
                // Full records, and one the send may have closed or left open.
                self.records += (res as u64).div_ceil(RECORD_LEN) + 1;
                if (res as usize) < left {
                    self.segs.advance(i, res as usize);
                } else {
                    self.next = Some(i + 1).filter(|&n| n < self.segs.list.len());
                }
                Ok(())
            }
            Sent::Write {
                tag,
                index,
                addr,
                len,
            } => {
                if res == -libc::EAGAIN || res == -libc::EINTR {
                    return self.push_write(sent, conn, tags, ring);
                }
                if res <= 0 || res as u32 > len {
                    let why = socket_failure(res, len as usize);
                    return Err(Broken::Lost(format!("send: {why}")));
                }
                if (res as u32) < len {
                    // Short: the rest, on its own (it ended its chain).
                    let rest = Sent::Write {
                        tag,
                        index,
                        addr: addr + res as u64,
                        len: len - res as u32,
                    };
                    return self.push_write(rest, conn, tags, ring);
                }
                Ok(())
            }
        }
    }

    /// Continues a WRITE_FIXED payload as a chain of its own.
    fn push_write(
        &mut self,
        w: Sent,
        conn: &Connection,
        tags: &mut Tags,
        ring: &mut dyn Ring,
    ) -> Result<(), Broken> {
        let Sent::Write { tag, .. } = w else {
            return Ok(());
        };
        let sqe = write_sqe(conn.fd(), w);
        // SAFETY: the payload is the request's registered buffer, valid until the
        // request is finished, which waits for this SQE.
        match unsafe { ring.push(tag, step(STEP_SEND, conn.generation()), sqe) } {
            Ok(()) => {
                tags.get_mut(tag).sqes += 1;
                self.inflight += 1;
                self.expect.push_back(w);
                Ok(())
            }
            Err(_) => {
                let why = "the ring is full: cannot continue a send";
                Err(Broken::Lost(why.into()))
            }
        }
    }
}
