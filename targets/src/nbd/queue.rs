//! The data path of one NBD connection: one queue's handler, on that queue's io_uring.
//!
//! Sending: requests wait in `send_queue` while a send chain is in flight, then go out
//! together as the next chain. A chain is one SENDMSG of every header and payload when
//! the payloads are in daemon memory (copy, fixed), and in the zero-copy modes, where a
//! payload is the request's own registered pages, SENDMSG of the headers up to a write's
//! payload, a send of that payload from the registered buffer (`PayloadSends::pick`:
//! SEND, or SEND_ZC for a large one on TCP), SENDMSG of what follows, and so on. Every
//! SQE of a chain has MSG_WAITALL and the chain is linked (IO_LINK): each starts when
//! the one before has sent all of its bytes, and a failed or short one cancels the
//! rest, so requests never interleave on the wire. (Kernels that cannot SEND from a
//! registered buffer get WRITE_FIXED on Unix sockets, which can be short and so ends
//! its chain, and SEND_ZC for every payload on TCP.)
//!
//! Receiving: replies land in `rbuf`, a staging buffer, as many as have arrived in one
//! RECV (up to `RBUF_LEN`): every reply header in it is matched, and a read's payload
//! is copied from it into the request's buffer: `memcpy` when that is daemon memory
//! (copy, fixed), `pwrite` to `/dev/ublkcN` at the request's user-copy position when it
//! is the request's own pages (zc, auto-zc; UBLK_F_USER_COPY). Replies to small reads
//! thus cost no ring round trip each. A large read's payload (from `DIRECT_MIN` bytes on)
//! goes straight into the request's buffer instead: RECV with MSG_WAITALL into daemon
//! memory, or READ_FIXED into the registered pages; while such a read may answer, a
//! receive takes exactly one header, so its payload never passes through `rbuf`, and
//! such reads wait to be sent while a staging receive is in flight. Without user copy
//! (a kernel that refuses it), every read in the zero-copy modes is received that way.
//! A READ_FIXED on a socket can be short, and a short one does not fail an IO_LINK
//! (seen on Linux 7.2), so receives are never linked to each other: one is in flight at
//! a time. A READ_FIXED goes behind a linked POLL_ADD that waits, through SO_RCVLOWAT,
//! for the rest of the payload to be queued, so that a large payload still arriving is
//! not taken in many short pieces, a ring round trip each.
//!
//! Requests that have no answer within the request timeout count as a lost connection
//! (reconnect and resend); once the device's deletion aborts (see `NbdTarget::stopping`),
//! what is left unanswered fails after a short grace.

use super::fixed_send;
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
/// The POLL_ADD linked in front of a READ_FIXED payload receive (see `post_recv_item`).
const STEP_POLL: u16 = 3;
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

/// Most requests one send chain carries.
const MAX_CHAIN: usize = 64;
/// Writes in registered pages up to this size are copied out (user copy) into `wstage`
/// and sent with the headers (`stage_payload`).
const STAGE_MAX: usize = 16 << 10;
/// The staging buffer for small write payloads of one send chain.
const STAGE_LEN: usize = MAX_CHAIN * 4096;
/// Payloads in registered pages from this size on go out with SEND_ZC where it may be
/// used (`PayloadSends::pick`).
const ZC_MIN: usize = 64 << 10;
/// The staging buffer for replies: what one receive can take.
const RBUF_LEN: usize = 256 << 10;
/// Reads of at least this many bytes receive their payload straight into the request's
/// buffer, not through `rbuf` (one copy fewer, one ring round trip more).
const DIRECT_MIN: usize = 64 << 10;
/// The most a READ_FIXED payload receive waits to have in the socket before it starts
/// (SO_RCVLOWAT); a larger payload is received in pieces of this size.
const LOWAT_MAX: usize = 1 << 20;
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
    /// Copying part of its payload into the request's pages failed: fails with EIO once
    /// the rest of the payload has been taken off the connection.
    copy_failed: bool,
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
    /// A send of request `tag`'s payload from its registered buffer.
    Fixed {
        tag: u16,
        index: u16,
        addr: u64,
        len: u32,
        how: PayloadSend,
    },
}

/// How a write's payload in the request's registered pages (zc, auto-zc) is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PayloadSend {
    /// SEND from the registered buffer with MSG_WAITALL: all or a failure, so the chain
    /// goes on after it; completes once (see `fixed_send`).
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
    /// The kernel sends from registered buffers (`fixed_send::supported`).
    pub(super) fixed: bool,
}

impl PayloadSends {
    /// The send for a payload of `len` bytes: zero copy pays for its pinning and
    /// notification only on large payloads (below `ZC_MIN` a copy costs less).
    fn pick(self, len: usize) -> PayloadSend {
        if self.zc && (len >= ZC_MIN || !self.fixed) {
            PayloadSend::Zc
        } else if self.fixed {
            PayloadSend::Send
        } else {
            PayloadSend::Write
        }
    }
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

/// The receive in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvItem {
    /// Replies into `rbuf`: `len` bytes at most, exactly `len` when `all` (MSG_WAITALL:
    /// the rest of one header).
    Staged { len: usize, all: bool },
    /// The rest of a read's payload, straight into the request's buffer.
    Payload(u16),
}

pub(super) struct NbdQueue {
    pub(super) sock: OwnedFd,
    /// The lost connection's socket after a reconnect, shut down, closed once none of
    /// its SQEs is in flight; nothing is resent before (see `close_old`).
    old_sock: Option<OwnedFd>,
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
    /// Small write payloads copied out of requests' own pages for the chain being built
    /// or in flight (empty without user copy).
    wstage: Box<[u8]>,
    /// What each SQE of the current connection's send chain must send, in order.
    send_expect: VecDeque<Sent>,
    /// How payloads in registered pages may be sent.
    payload_sends: PayloadSends,
    /// Send SQEs in flight, of any connection: the next chain waits for zero.
    send_inflight: u32,
    /// The receive of the current connection in flight, if any.
    recv_item: Option<RecvItem>,
    /// Receive SQEs in flight, of any connection: the next receive waits for zero.
    recv_inflight: u32,
    /// Replies received and not yet handled (boxed: receive SQEs point into it): the
    /// first `rhave` bytes; between receives only a partial header stays.
    rbuf: Box<[u8]>,
    rhave: usize,
    /// The read whose payload is being received.
    partial: Option<u16>,
    /// The socket's SO_RCVLOWAT as last set (a new socket's is 1).
    lowat: usize,
    /// `/dev/ublkcN` and this queue's id, when payloads may be copied into requests'
    /// own pages (user copy).
    user_copy: Option<(libc::c_int, u16)>,
    /// Requests between start and finish.
    active: usize,
    /// Requests sent on this connection whose reply header has not come, and how many
    /// of them are reads whose payload is received directly (`is_direct`); such reads
    /// waiting in `send_queue`.
    awaiting: usize,
    awaiting_direct: usize,
    queued_direct: usize,
    tick_ts: Box<types::Timespec>,
    tick_armed: bool,
    /// Timeout ticks so far, and how many mean a request waited the request timeout.
    ticks: u32,
    expire_ticks: u32,
    abort_ts: Box<types::Timespec>,
    abort_armed: bool,
    /// How often the requests still held during deletion have been logged.
    abort_logged: u8,
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

/// Copies a small write's payload out of the request's own pages (user copy) into the
/// start of `room` (free space in `wstage`), so that it goes out in the chain's SENDMSG
/// beside the headers: one SQE and one completion fewer per write than a send from the
/// registered buffer, which is what the payload gets when this returns None.
fn stage_payload(
    room: &mut [u8],
    user_copy: Option<(libc::c_int, u16)>,
    tag: u16,
    len: usize,
) -> Option<*mut u8> {
    let (fd, qid) = user_copy?;
    if len > STAGE_MAX || len > room.len() {
        return None;
    }
    let dst = room.as_mut_ptr();
    let pos = crate::user_copy_pos(qid, tag, 0);
    // SAFETY: reads `len` bytes into `room`, which has space for them (checked above),
    // from the ublk char device: the request's pages. No SQE points into `wstage` now:
    // a chain is built only when none is in flight.
    let n = unsafe { libc::pread(fd, dst.cast(), len, pos as i64) };
    if n != len as isize {
        let why = if n < 0 {
            io::Error::last_os_error().to_string()
        } else {
            format!("{n} of {len} bytes")
        };
        log::debug!("tag {tag}: copying a write payload out of the request failed ({why}): sent from its pages");
        return None;
    }
    Some(dst)
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
        payload_sends: PayloadSends,
        user_copy: Option<(libc::c_int, u16)>,
    ) -> Self {
        // SAFETY: iovec and msghdr are plain C structs for which all-zero is valid.
        let zero_iov: libc::iovec = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let zero_msg: libc::msghdr = unsafe { std::mem::zeroed() };
        let tick = (request_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(1));
        NbdQueue {
            fd: types::Fd(sock.as_raw_fd()),
            sock,
            old_sock: None,
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
            wstage: vec![0u8; if user_copy.is_some() { STAGE_LEN } else { 0 }].into_boxed_slice(),
            send_expect: VecDeque::with_capacity(2 * MAX_CHAIN + 1),
            send_inflight: 0,
            payload_sends,
            recv_item: None,
            recv_inflight: 0,
            rbuf: vec![0u8; RBUF_LEN].into_boxed_slice(),
            rhave: 0,
            partial: None,
            lowat: 1,
            user_copy,

            active: 0,
            awaiting: 0,
            awaiting_direct: 0,
            queued_direct: 0,
            tick_ts: Box::new(timespec(tick)),
            tick_armed: false,
            ticks: 0,
            // The first tick can come right after a request started: one more.
            expire_ticks: (request_timeout.as_nanos().div_ceil(tick.as_nanos()) + 1) as u32,
            abort_ts: Box::new(timespec(ABORT_GRACE)),
            abort_armed: false,
            abort_logged: 0,
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
        // A FLUSH must have offset and length 0 (the NBD spec; nbdkit refuses anything
        // else with EINVAL), whatever position the kernel's flush request carries.
        let (offset, len) = if matches!(io.op, BlockOp::Flush) {
            (0, 0)
        } else {
            (io.offset, io.len)
        };
        self.headers[t] = proto::request(flags, cmd, u64::from(io.tag), offset, len);
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
        if self.is_direct(io.tag) {
            self.queued_direct += 1;
        }
        Outcome::Queued
    }

    /// Starts what can start now: the next send chain, the next peek, the timeout tick.
    /// Called at the end of each turn of the queue loop, so that a chain carries all the
    /// requests that came in during the turn.
    fn kick(&mut self, ring: &mut dyn Ring) {
        self.close_old();
        if self.link != Link::Up {
            return;
        }
        if self.send_inflight == 0 && self.old_sock.is_none() && !self.send_queue.is_empty() {
            self.pump_send(ring);
        }
        if self.recv_inflight == 0 {
            self.post_recv(ring);
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
        // Bytes of `wstage` this chain uses.
        let mut staged = 0usize;
        // While a receive into `rbuf` may take several replies, the reply of a read
        // whose payload must go straight to its buffer must not arrive: such reads wait
        // for that receive to end.
        let staging = matches!(self.recv_item, Some(RecvItem::Staged { all: false, .. }));
        for &tag in self.send_queue.iter().take(n) {
            if staging && self.is_direct(tag) {
                break;
            }
            taken += 1;
            let t = usize::from(tag);
            let Some(io) = self.tags[t].io else { continue };
            self.tags[t].sent = true;
            self.awaiting += 1;
            if self.is_direct(tag) {
                self.awaiting_direct += 1;
                self.queued_direct -= 1;
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
                Some(IoBuf::Fixed { .. }) => {
                    stage_payload(&mut self.wstage[staged..], self.user_copy, tag, payload)
                        .inspect(|_| staged += payload)
                }
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
                let how = self.payload_sends.pick(payload);
                self.segs.push(SendSeg::Fixed {
                    tag,
                    index,
                    addr,
                    len: payload as u32,
                    how,
                });
                if how == PayloadSend::Write {
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
                    how: PayloadSend::Send,
                } => {
                    let sqe = fixed_send::send(self.fd, index, addr, len, flags);
                    (tag, Sent::Bytes(len as usize), sqe)
                }
                SendSeg::Fixed {
                    tag,
                    index,
                    addr,
                    len,
                    how: PayloadSend::Zc,
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
                    how: PayloadSend::Write,
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
    /// whether one of them is a read whose payload must go straight to its buffer.
    fn awaiting(&self) -> (usize, bool) {
        debug_assert_eq!(
            (self.awaiting, self.awaiting_direct > 0),
            {
                let mut n = 0;
                let mut direct = false;
                for (tag, t) in self.tags.iter().enumerate() {
                    if t.io.is_some() && t.sent && !t.replied && t.result.is_none() {
                        n += 1;
                        direct |= self.is_direct(tag as u16);
                    }
                }
                (n, direct)
            },
            "reply counters"
        );
        (self.awaiting, self.awaiting_direct > 0)
    }

    /// Posts the next receive: the rest of a large read's payload into its buffer, else
    /// replies into `rbuf`: as many as have arrived when every awaited reply may pass
    /// through it, exactly one header otherwise.
    fn post_recv(&mut self, ring: &mut dyn Ring) {
        if let Some(tag) = self.partial {
            let t = &self.tags[usize::from(tag)];
            let left = t.io.map_or(0, |io| io.len as usize) - t.got;
            if left >= DIRECT_MIN || !self.can_stage(tag) {
                debug_assert_eq!(self.rhave, 0, "payload bytes staged for a direct read");
                return self.post_recv_item(RecvItem::Payload(tag), ring);
            }
        }
        let (waiting, direct) = self.awaiting();
        let bulk = self.partial.is_some() || (waiting > 0 && !direct && self.queued_direct == 0);
        let item = if bulk {
            RecvItem::Staged {
                len: RBUF_LEN - self.rhave,
                all: false,
            }
        } else {
            RecvItem::Staged {
                len: proto::REPLY_LEN - self.rhave,
                all: true,
            }
        };
        self.post_recv_item(item, ring);
    }

    fn is_read(&self, tag: u16) -> bool {
        self.tags[usize::from(tag)]
            .io
            .is_some_and(|io| matches!(io.op, BlockOp::Read) && io.len > 0)
    }

    /// Whether `tag`'s payload can be copied from `rbuf` into its buffer.
    fn can_stage(&self, tag: u16) -> bool {
        match self.tags[usize::from(tag)].buf {
            Some(IoBuf::Fixed { addr: 0, .. }) => self.user_copy.is_some(),
            _ => true,
        }
    }

    /// A read whose payload is received straight into its buffer, never through `rbuf`:
    /// a large one, or one whose buffer `rbuf` cannot be copied into.
    fn is_direct(&self, tag: u16) -> bool {
        self.is_read(tag)
            && (!self.can_stage(tag)
                || self.tags[usize::from(tag)]
                    .io
                    .is_some_and(|io| io.len as usize >= DIRECT_MIN))
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
        if self.is_direct(tag) {
            self.awaiting_direct -= 1;
        }
        self.tags[t].replied = true;
        self.awaiting -= 1;
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

    /// Copies `rbuf[at..at + len]` into `tag`'s buffer at its payload offset `got`.
    fn copy_in(&mut self, tag: u16, at: usize, len: usize) {
        let t = &self.tags[usize::from(tag)];
        let got = t.got;
        let src = &self.rbuf[at..at + len];
        let ok = match t.buf {
            Some(IoBuf::User { addr, .. }) => {
                // SAFETY: the request's buffer holds io.len bytes (checked at start) and
                // got + len <= io.len; it is daemon memory that nothing else writes while
                // the request is in this target.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), addr.add(got), len) };
                true
            }
            Some(IoBuf::Fixed { addr, .. }) if addr != 0 => {
                // SAFETY: as above, for the registered arena slot of the request.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), (addr as *mut u8).add(got), len)
                };
                true
            }
            Some(IoBuf::Fixed { .. }) => match self.user_copy {
                Some((fd, qid)) => {
                    let pos = crate::user_copy_pos(qid, tag, got as u32);
                    // SAFETY: writes `len` bytes from a live buffer to the ublk char
                    // device, which copies them into the request's pages.
                    let n = unsafe { libc::pwrite(fd, src.as_ptr().cast(), len, pos as i64) };
                    if n != len as isize {
                        let why = if n < 0 {
                            io::Error::last_os_error().to_string()
                        } else {
                            format!("{n} of {len} bytes")
                        };
                        log::error!(
                            "{}: tag {tag}: copying the read payload into the request failed: {why}",
                            self.uri
                        );
                    }
                    n == len as isize
                }
                None => false,
            },
            _ => false,
        };
        if !ok {
            self.tags[usize::from(tag)].copy_failed = true;
        }
    }

    /// A read's payload is complete: its result.
    fn payload_done(&mut self, tag: u16) -> i32 {
        let t = &mut self.tags[usize::from(tag)];
        let len = t.io.map_or(0, |io| io.len as i32);
        if std::mem::take(&mut t.copy_failed) {
            -libc::EIO
        } else {
            len
        }
    }

    /// Handles what `rbuf` holds: payload for the read in progress, then every
    /// complete reply; keeps a partial header.
    fn replies_received(&mut self, ring: &mut dyn Ring) {
        let mut pos = 0;
        loop {
            if let Some(tag) = self.partial {
                let t = &self.tags[usize::from(tag)];
                let len = t.io.map_or(0, |io| io.len as usize);
                let n = (len - t.got).min(self.rhave - pos);
                if n > 0 {
                    if !self.can_stage(tag) {
                        // Cannot happen: such a read's reply is received header only.
                        return self
                            .connection_lost("read payload bytes in the staging buffer", ring);
                    }
                    self.copy_in(tag, pos, n);
                    self.tags[usize::from(tag)].got += n;
                    pos += n;
                }
                if self.tags[usize::from(tag)].got < len {
                    break;
                }
                self.partial = None;
                let r = self.payload_done(tag);
                self.settle(tag, r, ring);
                continue;
            }
            if self.rhave - pos < proto::REPLY_LEN {
                break;
            }
            let mut hdr = [0u8; proto::REPLY_LEN];
            hdr.copy_from_slice(&self.rbuf[pos..pos + proto::REPLY_LEN]);
            pos += proto::REPLY_LEN;
            match self.accept_reply(&hdr, ring) {
                Err(why) => return self.connection_lost(&why, ring),
                Ok(None) => {}
                Ok(Some(tag)) => {
                    self.tags[usize::from(tag)].got = 0;
                    self.partial = Some(tag);
                }
            }
        }
        self.rbuf.copy_within(pos..self.rhave, 0);
        self.rhave -= pos;
    }

    /// Sets the socket's SO_RCVLOWAT: how many bytes must be queued before it polls
    /// readable. Best effort: if the kernel refuses, receives only take more turns.
    fn set_lowat(&mut self, n: usize) {
        if self.lowat == n {
            return;
        }
        let v = n as libc::c_int;
        // SAFETY: setsockopt on a socket we own, reading one live c_int.
        let r = unsafe {
            libc::setsockopt(
                self.sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            self.lowat = n;
        } else {
            log::debug!(
                "{}: SO_RCVLOWAT {n}: {}",
                self.uri,
                io::Error::last_os_error()
            );
        }
    }

    /// Pushes one receive. Replies into `rbuf` are taken as soon as a byte is there
    /// (SO_RCVLOWAT 1). A READ_FIXED of a payload into the request's pages stops at
    /// whatever the socket holds when it runs, which for a large payload that is still
    /// arriving means many short reads, each a ring round trip; so it goes behind a
    /// linked POLL_ADD that completes once SO_RCVLOWAT (the rest of the payload, at most
    /// `LOWAT_MAX`) bytes are queued (TCP honours it; on a Unix socket the poll
    /// completes on any data and short reads continue as before). A RECV into daemon
    /// memory needs none of this: MSG_WAITALL keeps it going inside the kernel.
    fn post_recv_item(&mut self, item: RecvItem, ring: &mut dyn Ring) {
        // A zero-copy registration, the poll and the receive.
        if !ring.reserve(3) {
            return self.give_up("the ring is full: cannot post a receive", ring);
        }
        let generation = self.generation;
        let pushed = match item {
            RecvItem::Staged { len, all } => {
                self.set_lowat(1);
                let at = self.rbuf[self.rhave..].as_mut_ptr();
                let flags = if all { libc::MSG_WAITALL } else { 0 };
                let sqe = opcode::Recv::new(self.fd, at, len as u32)
                    .flags(flags)
                    .build();
                // SAFETY: `rbuf` is boxed and owned by this handler, which outlives the
                // ring; nothing else writes there while the receive is in flight.
                unsafe { ring.push_event(step(EVENT_RECV, generation), sqe) }
            }
            RecvItem::Payload(tag) => {
                let Some(sqe) = self.payload_sqe(tag) else {
                    return self
                        .connection_lost("a read reply for a request without a buffer", ring);
                };
                let t = &self.tags[usize::from(tag)];
                if let Some(IoBuf::Fixed { addr: 0, .. }) = t.buf {
                    let left = t.io.map_or(0, |io| io.len as usize) - t.got;
                    self.set_lowat(left.min(LOWAT_MAX));
                    let poll = opcode::PollAdd::new(self.fd, libc::POLLIN as u32)
                        .build()
                        .flags(squeue::Flags::IO_LINK);
                    // Pushed for the request, so that a zero-copy registration goes in
                    // front of the poll, not between the poll and the read.
                    // SAFETY: a poll points to no memory.
                    if unsafe { ring.push(tag, step(STEP_POLL, generation), poll) }.is_err() {
                        return self.give_up("the ring is full: cannot post a receive", ring);
                    }
                    self.tags[usize::from(tag)].sqes += 1;
                }
                // SAFETY: a payload's buffer stays valid until its request is finished,
                // which waits for this SQE's completion.
                let r = unsafe { ring.push(tag, step(STEP_PAYLOAD, generation), sqe) };
                if r.is_ok() {
                    self.tags[usize::from(tag)].sqes += 1;
                }
                r
            }
        };
        if pushed.is_err() {
            // Cannot happen after `reserve`; fail safe if it does.
            return self.give_up("the ring is full: cannot post a receive", ring);
        }
        self.recv_inflight += 1;
        self.recv_item = Some(item);
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
            // Can be short: continued on its own.
            IoBuf::Fixed { addr, index, .. } => {
                opcode::ReadFixed::new(self.fd, (addr + got as u64) as *mut u8, left, index)
                    .offset(u64::MAX)
                    .build()
            }
            IoBuf::None => return None,
        })
    }

    /// The receive of the current connection completed (`tag`: a payload's request).
    fn recv_done(&mut self, tag: Option<u16>, res: i32, ring: &mut dyn Ring) {
        let Some(item) = self.recv_item.take() else {
            return self.connection_lost("a receive completion nobody waited for", ring);
        };
        match (item, tag) {
            (RecvItem::Staged { len, all }, None) => {
                if res == -libc::EAGAIN || res == -libc::EINTR {
                    return; // nothing was taken: `kick` receives again
                }
                if res <= 0 || (all && res as usize != len) {
                    let why = recv_failure(res, len);
                    return self.connection_lost(&why, ring);
                }
                self.rhave += res as usize;
                self.replies_received(ring);
            }
            (RecvItem::Payload(want), Some(tag)) if want == tag => {
                let t = usize::from(tag);
                let len = self.tags[t].io.map_or(0, |io| io.len as usize);
                if res <= 0 {
                    let left = len - self.tags[t].got;
                    return self.connection_lost(&recv_failure(res, left), ring);
                }
                self.tags[t].got += res as usize;
                if self.tags[t].got >= len {
                    // The SQE's own completion (`complete`) finishes the request.
                    self.partial = None;
                    self.tags[t].result = Some(self.payload_done(tag));
                }
                // Else `kick` receives the rest.
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
        self.shut_down();
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
        self.recv_item = None;
        self.rhave = 0;
        self.partial = None;
        let mut resend = VecDeque::new();
        for tag in self.unanswered() {
            let t = &mut self.tags[usize::from(tag)];
            t.got = 0;
            t.copy_failed = false;
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
        self.awaiting_direct = 0;
        self.queued_direct = resend.iter().filter(|&&t| self.is_direct(t)).count();
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

    /// Shuts the connection down: pending receives and sends complete (with errors), the
    /// socket sends nothing more, and closing it later resets the connection (SO_LINGER
    /// 0) and drops whatever it still had queued for the server, such as the rest of a
    /// write that timed out, so that write cannot reach the server after its resend.
    fn shut_down(&self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let fd = self.sock.as_raw_fd();
        // SAFETY: setsockopt on a socket we own, reading one live struct.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        // SAFETY: shutdown on a socket we own.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }

    /// Closes the lost connection's socket once none of its SQEs is in flight (they
    /// all complete soon after `shut_down`), so the kernel really closes it now (an
    /// SQE in flight holds the socket open) and resets the connection before any
    /// request is sent again on the new one.
    fn close_old(&mut self) {
        if self.old_sock.is_some() && self.send_inflight == 0 && self.recv_inflight == 0 {
            self.old_sock = None;
        }
    }

    /// The connection is gone for good: fail every request on it and every later one.
    pub(super) fn give_up(&mut self, why: &str, ring: &mut dyn Ring) {
        if self.link != Link::Failed {
            log::error!(
                "{}: connection failed: {why}; failing its requests with EIO",
                self.uri
            );
            self.shut_down();
        }
        self.link = Link::Failed;
        self.state.store(CONN_FAILED, Ordering::Relaxed);
        self.send_queue.clear();
        self.awaiting = 0;
        self.awaiting_direct = 0;
        self.queued_direct = 0;
        self.send_expect.clear();
        self.recv_item = None;
        self.rhave = 0;
        self.partial = None;
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
                self.old_sock = Some(std::mem::replace(&mut self.sock, sock));
                self.lowat = 1;
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
            self.log_outstanding();
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

    /// Logs what the queue still holds during deletion, a few times at most.
    fn log_outstanding(&mut self) {
        if self.active > 0 && self.abort_logged < 4 {
            self.abort_logged += 1;
            log::warn!("{}: deleting: {}", self.uri, self.outstanding());
        }
    }

    /// What the queue still holds, for the log when deletion must cut it short: the
    /// connection's state and the first few requests with where each one stands.
    fn outstanding(&self) -> String {
        let mut s = format!(
            "{} request(s) outstanding (link {:?}, {} send SQE(s) and {} receive(s) in flight, {} to send)",
            self.active,
            self.link,
            self.send_inflight,
            self.recv_inflight,
            self.send_queue.len()
        );
        let busy = self.tags.iter().enumerate().filter(|(_, t)| t.io.is_some());
        for (tag, t) in busy.take(8) {
            if let Some(io) = t.io {
                s.push_str(&format!(
                    "; tag {tag}: {:?} {}@{} sent {} replied {} result {:?} SQEs {}",
                    io.op, io.len, io.offset, t.sent, t.replied, t.result, t.sqes
                ));
            }
        }
        s
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
                self.log_outstanding();
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
        let mut room = vec![0u8; 8192];
        // No user copy: never staged.
        assert!(stage_payload(&mut room, None, 0, 4096).is_none());
        // Too large, or more than the room left: not staged (and nothing is read).
        assert!(stage_payload(&mut room, Some((-1, 0)), 0, STAGE_MAX + 1).is_none());
        assert!(stage_payload(&mut room[4096..], Some((-1, 0)), 0, 8192).is_none());
        // A failing copy (a bad descriptor here) falls back to a send from the pages.
        assert!(stage_payload(&mut room, Some((-1, 0)), 0, 4096).is_none());
    }

    /// The copy reads the request's bytes at its user-copy position (a sparse file
    /// stands in for /dev/ublkcN).
    #[test]
    fn a_staged_payload_is_read_at_the_requests_position() {
        use std::os::unix::fs::FileExt;
        let path = std::env::temp_dir().join(format!("ublkd-stage-{}", std::process::id()));
        let f = std::fs::File::create_new(&path).unwrap();
        let pos = crate::user_copy_pos(1, 3, 0);
        f.write_all_at(b"payload!", pos).unwrap();
        let mut room = vec![0u8; 64];
        let got = stage_payload(&mut room, Some((f.as_raw_fd(), 1)), 3, 8);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(got, Some(room.as_mut_ptr()));
        assert_eq!(&room[..8], b"payload!");
    }

    #[test]
    fn steps_carry_the_generation() {
        for g in [0u16, 1, 0x0fff, 0x1000, 0xffff] {
            for k in [STEP_SEND, STEP_PAYLOAD, STEP_POLL, EVENT_RECV, EVENT_TICK] {
                assert_eq!(split_step(step(k, g)), (k, g & 0x0fff));
            }
        }
    }
}
