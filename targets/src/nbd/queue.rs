//! The data path of one NBD connection: one queue's handler, on that queue's io_uring.
//!
//! Sending: requests wait in `send_queue` while a send chain is in flight, then go out
//! together as the next chain. A chain is one SENDMSG of every header and payload when
//! the payloads are in daemon memory (copy, fixed), and in the zero-copy modes, where a
//! payload is the request's own registered pages, SENDMSG of the headers up to a write's
//! payload, SEND_ZC of that payload from the registered buffer, SENDMSG of what follows,
//! and so on. Every SQE of a chain has MSG_WAITALL and the chain is linked (IO_LINK):
//! each starts when the one before has sent all of its bytes, and a failed or short one
//! cancels the rest, so requests never interleave on the wire.
//!
//! Receiving: reply headers land in `hdrs`. While no read can be answered (every
//! request waiting for its reply is a write, flush or trim) one receive takes as many
//! headers as have arrived, up to one per waiting request, and reads wait to be sent
//! until it is done. Otherwise a receive takes exactly one header; for a read, the
//! payload goes straight into the request's buffer: RECV with MSG_WAITALL into daemon
//! memory, linked with the next header's receive (one round trip per read reply), or
//! READ_FIXED into the request's registered pages. A READ_FIXED on a socket can be short
//! and a short one does not fail its link (seen on Linux 7.2: the linked receive took
//! payload bytes), so nothing is linked behind it: the rest of a short one is received
//! on its own, then the next header.
//!
//! Requests that have no answer within the request timeout count as a lost connection
//! (reconnect and resend); deleting the device fails what is left unanswered after a
//! short grace, so `del` never waits on a server that stopped answering.

use super::proto;
use super::{spawn_reconnect, Handoff, NbdUri, CONN_FAILED, CONN_RECONNECTING, CONN_UP};
use crate::{BlockOp, IoBuf, IoDesc, Outcome, QueueTarget, Ring};
use io_uring::{opcode, squeue, types};
use proto::ExportInfo;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Labels of the SQEs this target pushes: a kind in the low 4 bits, the connection's
/// generation above, so completions from a socket that was replaced are recognized.
/// Per request (`Ring::push`):
const STEP_SEND: u16 = 1;
const STEP_PAYLOAD: u16 = 2;
/// Target-wide (`Ring::push_event`):
const EVENT_RECV: u16 = 1;
const EVENT_WAKE: u16 = 2;
const EVENT_TICK: u16 = 3;
const EVENT_ABORT: u16 = 4;

pub(super) fn step(kind: u16, generation: u16) -> u16 {
    kind | ((generation & 0x0fff) << 4)
}

pub(super) fn split_step(step: u16) -> (u16, u16) {
    (step & 0xf, step >> 4)
}

/// Most requests one send chain carries, and most replies one receive chain takes.
const MAX_CHAIN: usize = 64;
/// After the device's deletion began, how long unanswered requests may still get an
/// answer before they fail with EIO.
const ABORT_GRACE: Duration = Duration::from_secs(1);
/// A request that was in flight on this many lost connections fails instead of being
/// sent again: a server that breaks on one request must not cause endless reconnects.
const MAX_RESENDS: u8 = 3;

#[derive(Debug, Clone, Copy, Default)]
struct TagIo {
    io: Option<IoDesc>,
    buf: Option<IoBuf>,
    /// SQEs of this request in flight (on any connection).
    sqes: u32,
    /// The request's result, kept until its own SQEs have all completed.
    result: Option<i32>,
    /// Its reply header has been seen on the current connection.
    replied: bool,
    /// Bytes of a read's payload received.
    got: usize,
    /// Times the request was sent again after a connection was lost.
    resends: u8,
    /// Its header went out (in a send chain) on the current connection.
    sent: bool,
    /// The timeout tick count when the request started waiting for its answer on the
    /// current connection (a clock read per request costs more than it must).
    since: u32,
    /// Unanswered when the device's deletion began or at the last abort timer: fails
    /// with EIO at the next one.
    doomed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Link {
    Up,
    Reconnecting,
    Failed,
}

/// One SQE of a send chain, before it is built.
#[derive(Debug, Clone, Copy)]
enum SendSeg {
    /// SENDMSG of iovecs `first..first + count`, accounted to request `owner`.
    Msg {
        owner: u16,
        first: usize,
        count: usize,
        bytes: usize,
    },
    /// SEND_ZC of request `tag`'s registered buffer (`zc` false: WRITE_FIXED, which
    /// can be short, so it ends the chain).
    Fixed {
        tag: u16,
        index: u16,
        addr: u64,
        len: u32,
        zc: bool,
    },
}

/// Ends the SENDMSG being filled, `(owner, first iovec, bytes)`, at iovec `end`.
fn close_run(segs: &mut Vec<SendSeg>, run: Option<(u16, usize, usize)>, end: usize) {
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
enum Sent {
    /// All of these bytes (MSG_WAITALL).
    Bytes(usize),
    /// A WRITE_FIXED of request `tag`'s payload from `addr` (may be short: continued).
    Write {
        tag: u16,
        index: u16,
        addr: u64,
        len: u32,
    },
}

/// One SQE of a receive chain, in chain order (completions come back in that order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvItem {
    /// Receives reply headers into `hdrs`: `len` bytes, all of them unless `multi`.
    Header { len: usize, multi: bool },
    /// Receives the rest of a read's payload into the request's buffer.
    Payload(u16),
}

pub(super) struct NbdQueue {
    pub(super) sock: OwnedFd,
    pub(super) fd: types::Fd,
    pub(super) generation: u16,
    pub(super) link: Link,
    pub(super) state: Arc<AtomicU8>,
    pub(super) uri: NbdUri,
    pub(super) export: ExportInfo,
    pub(super) reconnect_timeout: Duration,
    /// Unanswered for this long counts as a lost connection (zero: never).
    pub(super) request_timeout: Duration,
    /// Set when the device is being deleted.
    pub(super) abort: Arc<AtomicBool>,
    /// Wakes the ring: the reconnect thread is done, or the device is being deleted.
    pub(super) wake: OwnedFd,
    pub(super) wake_buf: Box<u64>,
    pub(super) handoff: Handoff,
    /// Request headers, one per tag: stable memory for the send SQEs.
    headers: Vec<[u8; proto::REQUEST_LEN]>,
    tags: Vec<TagIo>,
    /// Requests waiting for the next send chain.
    send_queue: VecDeque<u16>,
    /// The send chain's memory: SENDMSG headers and their iovecs (never moved).
    iovecs: Box<[libc::iovec]>,
    msgs: Box<[libc::msghdr]>,
    segs: Vec<SendSeg>,
    /// What each SQE of the current connection's send chain must send, in order.
    send_expect: VecDeque<Sent>,
    /// Zero-copy sends of registered payloads (SEND_ZC): TCP; Unix sockets have none.
    zc_send: bool,
    /// Send SQEs in flight, of any connection: the next chain waits for zero.
    send_inflight: u32,
    /// What each SQE of the current connection's receive chain does, in order.
    recv_items: VecDeque<RecvItem>,
    /// Receive SQEs in flight, of any connection: the next receive waits for zero.
    recv_inflight: u32,
    /// Reply headers being received (boxed: receive SQEs point into it), and how many
    /// bytes of it are filled (a partial header waits there for its rest).
    hdrs: Box<[u8]>,
    hdrs_have: usize,
    plan: Vec<RecvItem>,
    /// Requests between start and finish.
    active: usize,
    /// Requests sent on this connection whose reply header has not come, and how many
    /// of them are reads; reads waiting in `send_queue`.
    awaiting: usize,
    awaiting_reads: usize,
    queued_reads: usize,
    tick_ts: Box<types::Timespec>,
    tick_armed: bool,
    /// Timeout ticks so far, and how many mean a request waited the request timeout.
    ticks: u32,
    expire_ticks: u32,
    abort_ts: Box<types::Timespec>,
    abort_armed: bool,
}

/// Bytes that follow a request's header on the wire: a write's data.
fn payload_len(io: &IoDesc) -> usize {
    if matches!(io.op, BlockOp::Write) {
        io.len as usize
    } else {
        0
    }
}

fn nbd_command(io: &IoDesc) -> Option<(u16, u16)> {
    let fua = if io.flags.fua { proto::CMD_FLAG_FUA } else { 0 };
    Some(match io.op {
        BlockOp::Read => (proto::CMD_READ, 0),
        BlockOp::Write => (proto::CMD_WRITE, fua),
        BlockOp::Flush => (proto::CMD_FLUSH, 0),
        BlockOp::Discard => (proto::CMD_TRIM, 0),
        BlockOp::WriteZeroes => {
            let no_hole = if io.flags.no_unmap {
                proto::CMD_FLAG_NO_HOLE
            } else {
                0
            };
            (proto::CMD_WRITE_ZEROES, no_hole | fua)
        }
        BlockOp::Other(_) => return None,
    })
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

/// Why a MSG_WAITALL receive of `expected` bytes ended with `res`: short only at the
/// end of the stream.
fn recv_failure(res: i32, expected: usize) -> String {
    if res < 0 {
        format!("receive: {}", io::Error::from_raw_os_error(-res))
    } else {
        format!(
            "the server closed the connection in the middle of a reply ({res} of {expected} bytes)"
        )
    }
}

fn timespec(d: Duration) -> types::Timespec {
    types::Timespec::new()
        .sec(d.as_secs())
        .nsec(d.subsec_nanos())
}

impl NbdQueue {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        sock: OwnedFd,
        depth: usize,
        state: Arc<AtomicU8>,
        uri: NbdUri,
        export: ExportInfo,
        reconnect_timeout: Duration,
        request_timeout: Duration,
        abort: Arc<AtomicBool>,
        wake: OwnedFd,
        handoff: Handoff,
        zc_send: bool,
    ) -> Self {
        // SAFETY: iovec and msghdr are plain C structs for which all-zero is valid.
        let zero_iov: libc::iovec = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let zero_msg: libc::msghdr = unsafe { std::mem::zeroed() };
        let tick = (request_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(1));
        NbdQueue {
            fd: types::Fd(sock.as_raw_fd()),
            sock,
            generation: 0,
            link: Link::Up,
            state,
            uri,
            export,
            reconnect_timeout,
            request_timeout,
            abort,
            wake,
            wake_buf: Box::new(0),
            handoff,
            headers: vec![[0; proto::REQUEST_LEN]; depth],
            tags: vec![TagIo::default(); depth],
            send_queue: VecDeque::with_capacity(depth),
            iovecs: vec![zero_iov; 2 * MAX_CHAIN].into_boxed_slice(),
            msgs: vec![zero_msg; MAX_CHAIN + 1].into_boxed_slice(),
            segs: Vec::with_capacity(2 * MAX_CHAIN + 1),
            send_expect: VecDeque::with_capacity(2 * MAX_CHAIN + 1),
            send_inflight: 0,
            zc_send,
            recv_items: VecDeque::with_capacity(2 * MAX_CHAIN + 2),
            recv_inflight: 0,
            hdrs: vec![0u8; MAX_CHAIN * proto::REPLY_LEN].into_boxed_slice(),
            hdrs_have: 0,
            plan: Vec::with_capacity(2 * MAX_CHAIN + 2),

            active: 0,
            awaiting: 0,
            awaiting_reads: 0,
            queued_reads: 0,
            tick_ts: Box::new(timespec(tick)),
            tick_armed: false,
            ticks: 0,
            // The first tick can come right after a request started: one more.
            expire_ticks: (request_timeout.as_nanos().div_ceil(tick.as_nanos()) + 1) as u32,
            abort_ts: Box::new(timespec(ABORT_GRACE)),
            abort_armed: false,
        }
    }

    fn current(&self, generation: u16) -> bool {
        self.link == Link::Up && generation == (self.generation & 0x0fff)
    }

    /// Queues request `io` for sending.
    fn start_request(&mut self, io: &IoDesc, buf: IoBuf) -> Outcome {
        if self.link == Link::Failed {
            return Outcome::Done(-libc::EIO);
        }
        let Some((cmd, flags)) = nbd_command(io) else {
            return Outcome::Done(-libc::EOPNOTSUPP);
        };
        if payload_len(io) > 0 && buf.len() < payload_len(io) {
            return Outcome::Done(-libc::EIO);
        }
        let t = usize::from(io.tag);
        let len = if matches!(io.op, BlockOp::Flush) {
            0
        } else {
            io.len
        };
        self.headers[t] = proto::request(flags, cmd, u64::from(io.tag), io.offset, len);
        let sqes = self.tags[t].sqes;
        self.tags[t] = TagIo {
            io: Some(*io),
            buf: Some(buf),
            sqes,
            since: self.ticks,
            ..TagIo::default()
        };
        self.active += 1;
        // Sent with the others of this turn of the queue loop (`end_turn`).
        self.send_queue.push_back(io.tag);
        if self.is_read(io.tag) {
            self.queued_reads += 1;
        }
        Outcome::Queued
    }

    /// Starts what can start now: the next send chain, the next peek, the timeout tick.
    /// Called at the end of each turn of the queue loop, so that a chain carries all the
    /// requests that came in during the turn.
    fn kick(&mut self, ring: &mut dyn Ring) {
        if self.link != Link::Up {
            return;
        }
        if self.send_inflight == 0 && !self.send_queue.is_empty() {
            self.pump_send(ring);
        }
        if self.recv_inflight == 0 {
            self.post_header_recv(ring);
        }
        if !self.abort_armed && self.active > 0 && self.abort.load(Ordering::Acquire) {
            let sqe = opcode::Timeout::new(&*self.abort_ts).build();
            // SAFETY: abort_ts is boxed and owned by this handler; one at a time.
            if unsafe { ring.push_event(EVENT_ABORT, sqe) }.is_ok() {
                self.abort_armed = true;
            }
        }
        if !self.tick_armed && self.active > 0 && !self.request_timeout.is_zero() {
            let sqe = opcode::Timeout::new(&*self.tick_ts).build();
            // SAFETY: tick_ts is boxed and owned by this handler, which outlives the ring;
            // only one tick is in flight at a time.
            if unsafe { ring.push_event(EVENT_TICK, sqe) }.is_ok() {
                self.tick_armed = true;
            }
        }
    }

    /// Sends the queued requests as one linked chain (see the module comment).
    fn pump_send(&mut self, ring: &mut dyn Ring) {
        let n = self.send_queue.len().min(MAX_CHAIN);
        // Per request at most a SENDMSG and a SEND_ZC, plus the queue's registration.
        if n == 0 || !ring.reserve(3 * n + 1) {
            return;
        }
        self.segs.clear();
        let mut iov = 0usize;
        // The SENDMSG being filled: (owner, first iovec, bytes).
        let mut run: Option<(u16, usize, usize)> = None;
        let mut taken = 0;
        // While a receive may take several headers, a read's reply (with its payload)
        // must not arrive: reads wait for that receive to end.
        let multi = self
            .recv_items
            .iter()
            .any(|i| matches!(i, RecvItem::Header { multi: true, .. }));
        for &tag in self.send_queue.iter().take(n) {
            if multi && self.is_read(tag) {
                break;
            }
            taken += 1;
            let t = usize::from(tag);
            let Some(io) = self.tags[t].io else { continue };
            self.tags[t].sent = true;
            self.awaiting += 1;
            if self.is_read(tag) {
                self.awaiting_reads += 1;
                self.queued_reads -= 1;
            }
            let hdr = self.headers[t].as_ptr();
            self.iovecs[iov] = libc::iovec {
                iov_base: hdr as *mut libc::c_void,
                iov_len: proto::REQUEST_LEN,
            };
            iov += 1;
            let (owner, first, bytes) = run.unwrap_or((tag, iov - 1, 0));
            run = Some((owner, first, bytes + proto::REQUEST_LEN));
            let payload = payload_len(&io);
            if payload == 0 {
                continue;
            }
            let user = match self.tags[t].buf {
                Some(IoBuf::User { addr, .. }) => Some(addr),
                Some(IoBuf::Fixed { addr, .. }) if addr != 0 => Some(addr as *mut u8),
                _ => None,
            };
            if let Some(addr) = user {
                self.iovecs[iov] = libc::iovec {
                    iov_base: addr.cast(),
                    iov_len: payload,
                };
                iov += 1;
                if let Some((o, f, b)) = run {
                    run = Some((o, f, b + payload));
                }
            } else if let Some(IoBuf::Fixed { addr, index, .. }) = self.tags[t].buf {
                close_run(&mut self.segs, run.take(), iov);
                self.segs.push(SendSeg::Fixed {
                    tag,
                    index,
                    addr,
                    len: payload as u32,
                    zc: self.zc_send,
                });
                if !self.zc_send {
                    // A WRITE_FIXED can be short: nothing may follow it in the chain.
                    break;
                }
            }
        }
        close_run(&mut self.segs, run.take(), iov);
        self.send_queue.drain(..taken);

        let generation = self.generation;
        let last = self.segs.len().saturating_sub(1);
        let mut msg = 0usize;
        for i in 0..self.segs.len() {
            let more = if i < last { libc::MSG_MORE } else { 0 };
            let flags = libc::MSG_NOSIGNAL | libc::MSG_WAITALL | more;
            let (owner, sent, sqe) = match self.segs[i] {
                SendSeg::Msg {
                    owner,
                    first,
                    count,
                    bytes,
                } => {
                    let m = &mut self.msgs[msg];
                    msg += 1;
                    // SAFETY: all-zero is a valid msghdr.
                    *m = unsafe { std::mem::zeroed() };
                    m.msg_iov = self.iovecs[first..].as_mut_ptr();
                    m.msg_iovlen = count as _;
                    let sqe = opcode::SendMsg::new(self.fd, m).flags(flags as u32).build();
                    (owner, Sent::Bytes(bytes), sqe)
                }
                SendSeg::Fixed {
                    tag,
                    index,
                    addr,
                    len,
                    zc: true,
                } => {
                    let sqe = opcode::SendZc::new(self.fd, addr as *const u8, len)
                        .buf_index(Some(index))
                        .flags(flags)
                        .build();
                    (tag, Sent::Bytes(len as usize), sqe)
                }
                SendSeg::Fixed {
                    tag,
                    index,
                    addr,
                    len,
                    zc: false,
                } => {
                    let sent = Sent::Write {
                        tag,
                        index,
                        addr,
                        len,
                    };
                    (tag, sent, self.write_sqe(sent))
                }
            };
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
                    self.tags[usize::from(owner)].sqes += 1;
                    self.send_inflight += 1;
                    self.send_expect.push_back(sent);
                }
                Err(_) => {
                    // Cannot happen after `reserve`; fail safe if it does.
                    return self.connection_lost("the ring is full in the middle of a send", ring);
                }
            }
        }
    }

    fn write_sqe(&self, w: Sent) -> squeue::Entry {
        match w {
            Sent::Write {
                index, addr, len, ..
            } => opcode::WriteFixed::new(self.fd, addr as *const u8, len, index)
                .offset(u64::MAX)
                .build(),
            Sent::Bytes(_) => opcode::Nop::new().build(),
        }
    }

    /// A send SQE of the current connection completed.
    fn send_done(&mut self, res: i32, ring: &mut dyn Ring) {
        let Some(sent) = self.send_expect.pop_front() else {
            return self.connection_lost("a send completion nobody waited for", ring);
        };
        match sent {
            Sent::Bytes(expected) if res < 0 || res as usize != expected => {
                let why = socket_failure(res, expected);
                self.connection_lost(&format!("send: {why}"), ring);
            }
            Sent::Bytes(_) => {}
            Sent::Write {
                tag,
                index,
                addr,
                len,
            } => {
                if res == -libc::EAGAIN || res == -libc::EINTR {
                    return self.push_write(sent, ring);
                }
                if res <= 0 || res as u32 > len {
                    let why = socket_failure(res, len as usize);
                    return self.connection_lost(&format!("send: {why}"), ring);
                }
                if (res as u32) < len {
                    // Short: the rest, on its own (it ended its chain).
                    let rest = Sent::Write {
                        tag,
                        index,
                        addr: addr + res as u64,
                        len: len - res as u32,
                    };
                    self.push_write(rest, ring);
                }
            }
        }
    }

    /// Continues a WRITE_FIXED payload as a chain of its own.
    fn push_write(&mut self, w: Sent, ring: &mut dyn Ring) {
        let Sent::Write { tag, .. } = w else { return };
        let sqe = self.write_sqe(w);
        // SAFETY: the payload is the request's registered buffer, valid until the
        // request is finished, which waits for this SQE.
        match unsafe { ring.push(tag, step(STEP_SEND, self.generation), sqe) } {
            Ok(()) => {
                self.tags[usize::from(tag)].sqes += 1;
                self.send_inflight += 1;
                self.send_expect.push_back(w);
            }
            Err(_) => self.connection_lost("the ring is full: cannot continue a send", ring),
        }
    }

    /// Requests sent on this connection whose reply has not been seen: how many, and
    /// whether one of them is a read (whose reply carries a payload).
    fn awaiting(&self) -> (usize, bool) {
        debug_assert_eq!(
            (self.awaiting, self.awaiting_reads > 0),
            {
                let mut n = 0;
                let mut read = false;
                for t in &self.tags {
                    if let Some(io) = t.io.filter(|_| t.sent && !t.replied && t.result.is_none()) {
                        n += 1;
                        read |= matches!(io.op, BlockOp::Read);
                    }
                }
                (n, read)
            },
            "reply counters"
        );
        (self.awaiting, self.awaiting_reads > 0)
    }

    /// Posts the receive of the next reply headers: exactly one header when a read may
    /// answer (its payload must go to the request's buffer, not to `hdrs`), else up to
    /// one header per request waiting for its reply (see `multi`).
    fn post_header_recv(&mut self, ring: &mut dyn Ring) {
        let (waiting, read) = self.awaiting();
        let read_queued = self.queued_reads > 0;
        let multi = waiting > 1 && !read && !read_queued;
        let want = if multi {
            (waiting * proto::REPLY_LEN).min(self.hdrs.len())
        } else {
            proto::REPLY_LEN
        };
        let len = want.saturating_sub(self.hdrs_have);
        self.plan.clear();
        self.plan.push(RecvItem::Header { len, multi });
        self.post_chain(ring);
    }

    fn is_read(&self, tag: u16) -> bool {
        self.tags[usize::from(tag)]
            .io
            .is_some_and(|io| matches!(io.op, BlockOp::Read) && io.len > 0)
    }

    /// Whether `cookie` names a request that is waiting for its reply.
    fn expects_reply(&self, cookie: u64) -> Option<u16> {
        let t = usize::try_from(cookie).ok()?;
        let tag = self.tags.get(t)?;
        (tag.io.is_some() && tag.sent && !tag.replied && tag.result.is_none()).then_some(t as u16)
    }

    /// Matches a reply header to its request: settles it, or returns the tag of a read
    /// whose payload follows. Err when the reply breaks the protocol.
    fn accept_reply(
        &mut self,
        hdr: &[u8; proto::REPLY_LEN],
        ring: &mut dyn Ring,
    ) -> Result<Option<u16>, String> {
        let reply = proto::parse_reply(hdr).map_err(|e| format!("bad reply: {e}"))?;
        let tag = self
            .expects_reply(reply.cookie)
            .ok_or_else(|| format!("reply with unknown cookie {:#x}", reply.cookie))?;
        let t = usize::from(tag);
        self.tags[t].replied = true;
        self.awaiting -= 1;
        if self.is_read(tag) {
            self.awaiting_reads -= 1;
        }
        let Some(io) = self.tags[t].io else {
            return Ok(None);
        };
        if reply.error != 0 {
            log::debug!(
                "{}: tag {tag} {:?}: server error {}",
                self.uri,
                io.op,
                reply.error
            );
            self.settle(tag, proto::errno(reply.error), ring);
            Ok(None)
        } else if matches!(io.op, BlockOp::Read) && io.len > 0 {
            Ok(Some(tag))
        } else {
            let ok = if matches!(io.op, BlockOp::Read | BlockOp::Write) {
                io.len as i32
            } else {
                0
            };
            self.settle(tag, ok, ring);
            Ok(None)
        }
    }

    /// Header bytes arrived: handle every complete header, keep a partial one.
    fn headers_received(&mut self, ring: &mut dyn Ring) {
        let mut pos = 0;
        while self.hdrs_have - pos >= proto::REPLY_LEN {
            let mut hdr = [0u8; proto::REPLY_LEN];
            hdr.copy_from_slice(&self.hdrs[pos..pos + proto::REPLY_LEN]);
            pos += proto::REPLY_LEN;
            match self.accept_reply(&hdr, ring) {
                Err(why) => return self.connection_lost(&why, ring),
                Ok(None) => {}
                Ok(Some(tag)) => {
                    if pos != self.hdrs_have {
                        // Only a single-header receive can end in a read's reply.
                        return self.connection_lost("reply bytes after a read reply", ring);
                    }
                    self.hdrs_have = 0;
                    self.plan.clear();
                    self.plan.push(RecvItem::Payload(tag));
                    if self.payload_waits_all(tag) {
                        // Then (linked) the next header: one round trip.
                        self.plan.push(RecvItem::Header {
                            len: proto::REPLY_LEN,
                            multi: false,
                        });
                    }
                    return self.post_chain(ring);
                }
            }
        }
        self.hdrs.copy_within(pos..self.hdrs_have, 0);
        self.hdrs_have -= pos;
    }

    /// Pushes the receive chain in `plan`, linked in order.
    fn post_chain(&mut self, ring: &mut dyn Ring) {
        if !ring.reserve(2 * self.plan.len()) {
            return self.give_up("the ring is full: cannot post a receive", ring);
        }
        let last = self.plan.len().saturating_sub(1);
        let generation = self.generation;
        for i in 0..self.plan.len() {
            let item = self.plan[i];
            let sqe = match item {
                RecvItem::Header { len, multi } => {
                    let at = self.hdrs[self.hdrs_have..].as_mut_ptr();
                    // One header: all of it (MSG_WAITALL). Several: what is there.
                    let flags = if multi { 0 } else { libc::MSG_WAITALL };
                    opcode::Recv::new(self.fd, at, len as u32)
                        .flags(flags)
                        .build()
                }
                RecvItem::Payload(tag) => match self.payload_sqe(tag) {
                    Some(sqe) => sqe,
                    None => {
                        return self
                            .connection_lost("a read reply for a request without a buffer", ring)
                    }
                },
            };
            let sqe = if i < last {
                sqe.flags(squeue::Flags::IO_LINK)
            } else {
                sqe
            };
            let pushed = match item {
                RecvItem::Payload(tag) => {
                    // SAFETY: a payload's buffer stays valid until its request is
                    // finished, which waits for this SQE's completion.
                    let r = unsafe { ring.push(tag, step(STEP_PAYLOAD, generation), sqe) };
                    if r.is_ok() {
                        self.tags[usize::from(tag)].sqes += 1;
                    }
                    r
                }
                // SAFETY: `hdrs` is boxed and owned by this handler, which outlives the
                // ring; a header receive is linked behind a payload only when `hdrs` is
                // empty, so nothing else writes there meanwhile.
                _ => unsafe { ring.push_event(step(EVENT_RECV, generation), sqe) },
            };
            if pushed.is_err() {
                // Cannot happen after `reserve`; fail safe if it does.
                return self.give_up("the ring is full in the middle of a receive", ring);
            }
            self.recv_inflight += 1;
            self.recv_items.push_back(item);
        }
    }

    /// Whether `tag`'s payload is received with MSG_WAITALL (all of it or an error), so
    /// that a receive may be linked behind it.
    fn payload_waits_all(&self, tag: u16) -> bool {
        match self.tags[usize::from(tag)].buf {
            Some(IoBuf::User { .. }) => true,
            Some(IoBuf::Fixed { addr, .. }) => addr != 0,
            _ => false,
        }
    }

    /// The SQE that receives the rest of `tag`'s payload into its buffer.
    fn payload_sqe(&self, tag: u16) -> Option<squeue::Entry> {
        let t = &self.tags[usize::from(tag)];
        let io = t.io?;
        let got = t.got;
        let left = io.len - got as u32;
        Some(match t.buf? {
            IoBuf::User { addr, .. } => opcode::Recv::new(self.fd, addr.wrapping_add(got), left)
                .flags(libc::MSG_WAITALL)
                .build(),
            IoBuf::Fixed { addr, .. } if addr != 0 => {
                opcode::Recv::new(self.fd, (addr + got as u64) as *mut u8, left)
                    .flags(libc::MSG_WAITALL)
                    .build()
            }
            // Can be short: never linked to anything behind it (see the module comment).
            IoBuf::Fixed { addr, index, .. } => {
                opcode::ReadFixed::new(self.fd, (addr + got as u64) as *mut u8, left, index)
                    .offset(u64::MAX)
                    .build()
            }
            IoBuf::None => return None,
        })
    }

    /// A receive SQE of the current connection completed (`tag`: a payload's request).
    fn recv_done(&mut self, tag: Option<u16>, res: i32, ring: &mut dyn Ring) {
        let Some(item) = self.recv_items.pop_front() else {
            return self.connection_lost("a receive completion nobody waited for", ring);
        };
        match (item, tag) {
            (RecvItem::Header { len, multi }, None) => {
                let retry = res == -libc::EAGAIN || res == -libc::EINTR;
                if retry && self.recv_items.is_empty() {
                    return; // nothing was taken: `kick` receives again
                }
                if res <= 0 || (!multi && res as usize != len) {
                    let why = recv_failure(res, len);
                    return self.connection_lost(&why, ring);
                }
                self.hdrs_have += res as usize;

                self.headers_received(ring);
            }
            (RecvItem::Payload(want), Some(tag)) if want == tag => {
                let t = usize::from(tag);
                let len = self.tags[t].io.map_or(0, |io| io.len as usize);
                if res <= 0 {
                    return self.connection_lost(
                        "the server closed the connection in the middle of a read reply",
                        ring,
                    );
                }
                self.tags[t].got += res as usize;
                if self.tags[t].got < len {
                    if !self.recv_items.is_empty() {
                        // A receive linked behind it may have taken payload bytes.
                        return self.connection_lost("a short receive inside a chain", ring);
                    }
                    // The rest, on its own.
                    self.plan.clear();
                    self.plan.push(RecvItem::Payload(tag));
                    return self.post_chain(ring);
                }
                self.tags[t].result = Some(len as i32);
            }
            _ => self.connection_lost("receive completions out of order", ring),
        }
    }

    /// Records `result` for `tag` and finishes it once none of its SQEs is in flight.
    fn settle(&mut self, tag: u16, result: i32, ring: &mut dyn Ring) {
        let t = usize::from(tag);
        self.tags[t].result = Some(result);
        if self.tags[t].sqes == 0 {
            if let Some(r) = self.take_result(tag) {
                ring.finish(tag, r);
            }
        }
    }

    fn take_result(&mut self, tag: u16) -> Option<i32> {
        let t = &mut self.tags[usize::from(tag)];
        let r = t.result.take()?;
        if t.io.take().is_some() {
            self.active -= 1;
        }
        Some(r)
    }

    /// The request's result if it has one and no SQE of it is in flight.
    fn take_result_if_idle(&mut self, tag: u16) -> Outcome {
        if self.tags[usize::from(tag)].sqes == 0 {
            self.take_result(tag).map_or(Outcome::Queued, Outcome::Done)
        } else {
            Outcome::Queued
        }
    }

    /// Requests that have no answer yet.
    fn unanswered(&self) -> Vec<u16> {
        (0..self.tags.len() as u16)
            .filter(|&t| {
                self.tags[usize::from(t)].io.is_some() && self.tags[usize::from(t)].result.is_none()
            })
            .collect()
    }

    /// The connection broke. Reconnect in the background and resend what has no answer,
    /// or fail it all when reconnecting is off or the device is going away.
    pub(super) fn connection_lost(&mut self, why: &str, ring: &mut dyn Ring) {
        if self.link != Link::Up {
            return;
        }
        // Pending receives and sends complete (with errors) once the socket is down.
        // SAFETY: shutdown on a socket we own.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
        if self.reconnect_timeout.is_zero() || self.abort.load(Ordering::Acquire) {
            return self.give_up(why, ring);
        }
        log::error!(
            "{}: connection lost: {why}; reconnecting for up to {} s",
            self.uri,
            self.reconnect_timeout.as_secs()
        );
        self.link = Link::Reconnecting;
        self.state.store(CONN_RECONNECTING, Ordering::Relaxed);
        self.send_expect.clear();
        self.recv_items.clear();
        self.hdrs_have = 0;
        let mut resend = VecDeque::new();
        for tag in self.unanswered() {
            let t = &mut self.tags[usize::from(tag)];
            t.got = 0;
            t.sent = false;
            t.replied = false;
            t.resends += 1;
            if t.resends > MAX_RESENDS {
                log::error!(
                    "{}: tag {tag}: lost with {} connections; failing it with EIO",
                    self.uri,
                    t.resends
                );
                self.settle(tag, -libc::EIO, ring);
            } else {
                resend.push_back(tag);
            }
        }
        self.awaiting = 0;
        self.awaiting_reads = 0;
        self.queued_reads = resend.iter().filter(|&&t| self.is_read(t)).count();
        self.send_queue = resend;
        *self.handoff.lock().unwrap_or_else(|p| p.into_inner()) = None;
        match self.wake.try_clone() {
            Ok(wake) => spawn_reconnect(
                self.uri.clone(),
                self.export,
                self.reconnect_timeout,
                self.abort.clone(),
                self.handoff.clone(),
                wake,
            ),
            Err(e) => self.give_up(&format!("cannot start reconnecting: {e}"), ring),
        }
    }

    /// The connection is gone for good: fail every request on it and every later one.
    pub(super) fn give_up(&mut self, why: &str, ring: &mut dyn Ring) {
        if self.link != Link::Failed {
            log::error!(
                "{}: connection failed: {why}; failing its requests with EIO",
                self.uri
            );
            // SAFETY: shutdown on a socket we own.
            unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
        }
        self.link = Link::Failed;
        self.state.store(CONN_FAILED, Ordering::Relaxed);
        self.send_queue.clear();
        self.awaiting = 0;
        self.awaiting_reads = 0;
        self.queued_reads = 0;
        self.send_expect.clear();
        self.recv_items.clear();
        self.hdrs_have = 0;
        for tag in self.unanswered() {
            self.settle(tag, -libc::EIO, ring);
        }
    }

    /// The reconnect thread is done: use the new socket and resend, or give up.
    fn reconnected(&mut self, ring: &mut dyn Ring) {
        let result = self
            .handoff
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match result {
            None => {}
            // Failed meanwhile (the device is being deleted): the socket just closes.
            Some(_) if self.link != Link::Reconnecting => {}
            Some(Ok(sock)) => {
                self.fd = types::Fd(sock.as_raw_fd());
                self.sock = sock;
                self.generation = self.generation.wrapping_add(1);
                self.link = Link::Up;
                self.state.store(CONN_UP, Ordering::Relaxed);
                for &tag in &self.send_queue {
                    self.tags[usize::from(tag)].since = self.ticks;
                }
                log::info!(
                    "{}: reconnected; resending {} request(s)",
                    self.uri,
                    self.send_queue.len()
                );
            }
            Some(Err(why)) => self.give_up(&why, ring),
        }
    }

    fn arm_wake(&mut self, ring: &mut dyn Ring) {
        let buf: *mut u64 = &mut *self.wake_buf;
        let sqe = opcode::Read::new(types::Fd(self.wake.as_raw_fd()), buf.cast(), 8).build();
        // SAFETY: wake_buf is boxed and owned by this handler, which outlives the ring.
        if unsafe { ring.push_event(EVENT_WAKE, sqe) }.is_err() {
            log::error!("{}: the ring is full: cannot wait for wake-ups", self.uri);
        }
    }

    /// The eventfd fired: a reconnect finished, or the device is being deleted.
    fn woken(&mut self, res: i32, ring: &mut dyn Ring) {
        if res < 0 && res != -libc::EINTR && res != -libc::EAGAIN {
            return; // the ring is going away
        }
        self.reconnected(ring);
        if self.abort.load(Ordering::Acquire) {
            if self.link == Link::Reconnecting {
                self.give_up("the device is being deleted", ring);
            }
            self.doom_unanswered();
        }
        // With the connection up, `kick` arms the abort grace timer.
        self.arm_wake(ring);
    }

    /// The request that has waited longest for its answer, and since when.
    fn oldest(&self) -> Option<(u32, IoDesc)> {
        self.tags
            .iter()
            .filter(|t| t.result.is_none())
            .filter_map(|t| Some((t.since, t.io?)))
            .max_by_key(|(since, _)| self.ticks.wrapping_sub(*since))
    }

    /// The request-timeout tick: has the oldest unanswered request waited too long?
    fn tick(&mut self, ring: &mut dyn Ring) {
        self.ticks = self.ticks.wrapping_add(1);
        if self.link != Link::Up {
            return;
        }
        let Some((since, io)) = self.oldest() else {
            return;
        };
        if self.ticks.wrapping_sub(since) >= self.expire_ticks {
            let why = format!(
                "no reply within the request timeout ({} s) to a {:?} of {} bytes at offset {}: the server is not answering",
                self.request_timeout.as_secs_f32(),
                io.op,
                io.len,
                io.offset
            );
            self.connection_lost(&why, ring);
        }
    }

    /// Marks every unanswered request: it fails at the next abort timer if still so.
    fn doom_unanswered(&mut self) {
        for t in &mut self.tags {
            if t.io.is_some() && t.result.is_none() {
                t.doomed = true;
            }
        }
    }
}

impl QueueTarget for NbdQueue {
    fn start(&mut self, ring: &mut dyn Ring) {
        self.arm_wake(ring);
        self.kick(ring);
    }

    fn read(&mut self, io: &IoDesc, buf: IoBuf, _: &mut dyn Ring) -> Outcome {
        self.start_request(io, buf)
    }
    fn write(&mut self, io: &IoDesc, buf: IoBuf, _: &mut dyn Ring) -> Outcome {
        self.start_request(io, buf)
    }
    fn flush(&mut self, io: &IoDesc, _: &mut dyn Ring) -> Outcome {
        self.start_request(io, IoBuf::None)
    }
    fn discard(&mut self, io: &IoDesc, _: &mut dyn Ring) -> Outcome {
        self.start_request(io, IoBuf::None)
    }
    fn write_zeroes(&mut self, io: &IoDesc, _: &mut dyn Ring) -> Outcome {
        self.start_request(io, IoBuf::None)
    }

    fn complete(
        &mut self,
        io: &IoDesc,
        _: IoBuf,
        step_: u16,
        res: i32,
        ring: &mut dyn Ring,
    ) -> Outcome {
        let tag = io.tag;
        let t = usize::from(tag);
        let (kind, generation) = split_step(step_);
        self.tags[t].sqes = self.tags[t].sqes.saturating_sub(1);
        match kind {
            STEP_SEND => {
                self.send_inflight = self.send_inflight.saturating_sub(1);
                if self.current(generation) {
                    self.send_done(res, ring);
                }
            }
            STEP_PAYLOAD => {
                self.recv_inflight = self.recv_inflight.saturating_sub(1);
                if self.current(generation) {
                    self.recv_done(Some(tag), res, ring);
                }
            }
            _ => {}
        }
        self.take_result_if_idle(tag)
    }

    fn event(&mut self, step_: u16, res: i32, ring: &mut dyn Ring) {
        let (kind, generation) = split_step(step_);
        match kind {
            EVENT_RECV => {
                self.recv_inflight = self.recv_inflight.saturating_sub(1);
                if self.current(generation) {
                    self.recv_done(None, res, ring);
                }
            }
            EVENT_WAKE => self.woken(res, ring),
            EVENT_TICK => {
                self.tick_armed = false;
                self.tick(ring);
            }
            EVENT_ABORT => {
                self.abort_armed = false;
                let stuck = self
                    .tags
                    .iter()
                    .any(|t| t.doomed && t.io.is_some() && t.result.is_none());
                self.doom_unanswered();
                if stuck && self.link != Link::Failed {
                    let why = format!(
                        "the device is being deleted and the server did not answer within {} s",
                        ABORT_GRACE.as_secs_f32()
                    );
                    self.give_up(&why, ring);
                }
            }
            _ => {}
        }
    }

    fn end_turn(&mut self, ring: &mut dyn Ring) {
        self.kick(ring);
    }
}

impl Drop for NbdQueue {
    fn drop(&mut self) {
        if self.link == Link::Up {
            // Tell the server we are leaving (best effort, never blocks).
            let disc = proto::request(0, proto::CMD_DISC, 0, 0, 0);
            // SAFETY: sending a local buffer on a socket we own.
            unsafe {
                libc::send(
                    self.sock.as_raw_fd(),
                    disc.as_ptr().cast(),
                    disc.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_carry_the_generation() {
        for g in [0u16, 1, 0x0fff, 0x1000, 0xffff] {
            for k in [STEP_SEND, STEP_PAYLOAD, EVENT_RECV, EVENT_TICK] {
                assert_eq!(split_step(step(k, g)), (k, g & 0x0fff));
            }
        }
    }
}
