//! The receive side of one connection: reply headers matched to their requests, and
//! read payloads placed into the requests' buffers.
//!
//! Replies land in `rbuf`, a staging buffer, as many as have arrived in one receive (up
//! to `RBUF_LEN`): every reply header in it is matched, and a read's payload is copied
//! from it into the request's buffer: `memcpy` when that is daemon memory (copy,
//! fixed); when it is the request's own pages (zc, auto-zc; UBLK_F_USER_COPY), an
//! io_uring WRITE of the staged bytes to `/dev/ublkcN` at the request's user-copy
//! position, which the request waits for (`Ring::push_staged_copy`: no system call per
//! request), or a `pwrite` where the ring has no staging buffer. Replies to small reads
//! thus cost no ring round trip each.
//!
//! The queue registers `rbuf` in its ring (`QueueTarget::staging_buffer`), and a
//! receive into it is a READ_FIXED: the kernel copies socket data into the pinned pages
//! with its own memcpy, not with the user-copy routine, which under QEMU's TCG (the
//! test VM) runs `rep movsb` a byte per step and cost about 15 us per 4 KiB. (The copy
//! into the request cannot be done that way: the driver copies only from user memory.)
//! While copies are in flight the staged bytes stay where they are: the next receive
//! waits for them (they count as receive SQEs) and moves a partial header to the front
//! only then.
//!
//! A large read's payload (from `DIRECT_MIN` bytes on) goes straight into the request's
//! buffer instead: RECV with MSG_WAITALL into daemon memory, or READ_FIXED into the
//! registered pages; while such a read may answer, a receive takes exactly one header,
//! so its payload never passes through `rbuf`, and such reads wait to be sent while a
//! staging receive is in flight (`staging`). Without user copy (a kernel that refuses
//! it), every read in the zero-copy modes is received that way.
//!
//! A READ_FIXED on a socket can be short, and a short one does not fail an IO_LINK
//! (seen on Linux 7.2), so receives are never linked to each other: one is in flight at
//! a time. On TCP a READ_FIXED goes behind a linked POLL_ADD that waits, through
//! SO_RCVLOWAT, for the rest of the payload to be queued, so that a large payload still
//! arriving is not taken in many short pieces, a ring round trip each. A Unix socket's
//! poll ignores SO_RCVLOWAT; there, where the kernel has it (`Receiver::fixed_recv`),
//! the payload is one RECV with MSG_WAITALL into the registered pages, which io_uring
//! continues inside the kernel as the pieces arrive.
//!
//! What a receive brings back to the queue: the requests it answered (`replies`, in
//! the order the server answered them), and `Broken` when the connection cannot go on.

use super::conn::{Broken, Connection};
use super::fixed_io;
use super::proto;
use super::step::{step, EVENT_RECV, STEP_COPY, STEP_PAYLOAD, STEP_POLL};
use super::tags::Tags;
use crate::{BlockOp, IoBuf, IoDesc, Ring, Staging};
use io_uring::{opcode, squeue};
use std::io;

/// The staging buffer for replies: what one receive can take.
const RBUF_LEN: usize = 256 << 10;
/// Reads of at least this many bytes receive their payload straight into the request's
/// buffer, not through `rbuf` (one copy fewer, one ring round trip more).
const DIRECT_MIN: usize = 64 << 10;
/// The most a READ_FIXED payload receive waits to have in the socket before it starts
/// (SO_RCVLOWAT); a larger payload is received in pieces of this size.
const LOWAT_MAX: usize = 1 << 20;

/// The receive in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvItem {
    /// Replies into `rbuf`: `len` bytes at most, exactly `len` when `all` (MSG_WAITALL:
    /// the rest of one header).
    Staged { len: usize, all: bool },
    /// The rest of a read's payload, straight into the request's buffer.
    Payload(u16),
}

/// A request the server answered: settle it with `res`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reply {
    pub(super) tag: u16,
    pub(super) res: i32,
}

/// Why a MSG_WAITALL receive of `expected` bytes on `conn` ended with `res`: short
/// only at the end of the stream.
fn recv_failure(res: i32, expected: usize, conn: &Connection) -> String {
    if res == -libc::EIO && conn.kernel_tls() {
        format!("receive: {}", super::ktls::CONTROL_RECORD)
    } else if res < 0 {
        format!("receive: {}", io::Error::from_raw_os_error(-res))
    } else {
        format!(
            "the server closed the connection in the middle of a reply ({res} of {expected} bytes)"
        )
    }
}

/// Whether a payload can be copied from `rbuf` into the buffer `buf`: always, but into
/// the request's own pages only with user copy.
fn can_stage(buf: Option<IoBuf>, user_copy: bool) -> bool {
    match buf {
        Some(IoBuf::Pages { .. }) => user_copy,
        _ => true,
    }
}

/// Whether request `io` in `buf` is a read whose payload is received straight into its
/// buffer, never through `rbuf`: a large one, or one whose buffer `rbuf` cannot be
/// copied into.
pub(super) fn is_direct(io: &IoDesc, buf: IoBuf, user_copy: bool) -> bool {
    matches!(io.op, BlockOp::Read)
        && io.len > 0
        && (!can_stage(Some(buf), user_copy) || io.len as usize >= DIRECT_MIN)
}

pub(super) struct Receiver {
    /// The receive of the current connection in flight, if any.
    item: Option<RecvItem>,
    /// Receive SQEs in flight, of any connection: the next receive waits for zero.
    inflight: u32,
    /// Replies received and not yet handled (a mapping that never moves: receive SQEs
    /// and copies point into it): bytes `rstart..rhave`; between receives only a
    /// partial header stays.
    rbuf: Staging,
    /// Bytes before `rstart` were handled; those up to `rhave` not yet.
    rstart: usize,
    rhave: usize,
    /// `rbuf` is registered in the ring's buffer table at this index.
    index: Option<u16>,
    /// The read whose payload is being received.
    partial: Option<u16>,
    /// The queue copies payloads into requests' own pages (user copy).
    user_copy: bool,
    /// The kernel receives into registered buffers (`fixed_io::recv_supported`, probed
    /// when the queue is made, not on its first large read).
    fixed_recv: bool,
    /// The requests answered by the last receive, for the queue to settle.
    replies: Vec<Reply>,
}

impl Receiver {
    /// A receiver; `index`: where the queue registers its staging buffer, if it does.
    pub(super) fn new(user_copy: bool, index: Option<u16>) -> io::Result<Self> {
        Ok(Receiver {
            item: None,
            inflight: 0,
            rbuf: Staging::new(RBUF_LEN)?,
            rstart: 0,
            rhave: 0,
            index,
            partial: None,
            user_copy,
            fixed_recv: fixed_io::recv_supported(),
            replies: Vec::new(),
        })
    }

    /// The staging buffer, for the queue to register (when it gave an index).
    pub(super) fn staging_buffer(&mut self) -> Option<&mut Staging> {
        self.index.map(|_| &mut self.rbuf)
    }

    /// Receive SQEs in flight, of any connection, and copies out of `rbuf`.
    pub(super) fn inflight(&self) -> u32 {
        self.inflight
    }

    /// A receive SQE completed, of any connection.
    pub(super) fn sqe_completed(&mut self) {
        self.inflight = self.inflight.saturating_sub(1);
    }

    /// Whether a receive into `rbuf` that may take several replies is in flight.
    pub(super) fn staging(&self) -> bool {
        matches!(self.item, Some(RecvItem::Staged { all: false, .. }))
    }

    /// Whether a payload for registered pages is received whole, with one RECV: on a
    /// Unix socket (where a READ_FIXED behind a poll would still be taken in pieces: its
    /// poll ignores SO_RCVLOWAT), when the kernel receives into registered buffers.
    /// Measured on 512 KiB reads over a Unix socket: docs/research/issue-12-speed.md 13.
    fn whole_into_pages(&self, conn: &Connection) -> bool {
        self.fixed_recv && conn.unix()
    }

    /// The connection is gone: nothing is received on it any more.
    pub(super) fn reset(&mut self) {
        self.item = None;
        self.rstart = 0;
        self.rhave = 0;
        self.partial = None;
    }

    /// The requests answered since the last call, in the server's order.
    pub(super) fn replies(&mut self) -> std::vec::Drain<'_, Reply> {
        self.replies.drain(..)
    }

    fn can_stage(&self, tags: &Tags, tag: u16) -> bool {
        can_stage(tags.get(tag).buf, self.user_copy)
    }

    /// Posts the next receive: the rest of a large read's payload into its buffer, else
    /// replies into `rbuf`: as many as have arrived when every awaited reply may pass
    /// through it, exactly one header otherwise.
    pub(super) fn post(
        &mut self,
        conn: &mut Connection,
        tags: &mut Tags,
        ring: &mut dyn Ring,
    ) -> Result<(), Broken> {
        // Nothing copies out of `rbuf` now (posts wait for that): keep only what is
        // not handled, at the front.
        self.rbuf.copy_within(self.rstart..self.rhave, 0);
        self.rhave -= self.rstart;
        self.rstart = 0;
        if let Some(tag) = self.partial {
            let t = tags.get(tag);
            let left = t.io.map_or(0, |io| io.len as usize) - t.got;
            if left >= DIRECT_MIN || !self.can_stage(tags, tag) {
                debug_assert_eq!(self.rhave, 0, "payload bytes staged for a direct read");
                return self.post_item(RecvItem::Payload(tag), conn, tags, ring);
            }
        }
        let (waiting, direct) = tags.awaiting();
        let bulk = self.partial.is_some() || (waiting > 0 && !direct && tags.queued_direct() == 0);
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
        self.post_item(item, conn, tags, ring)
    }

    /// Matches a reply header to its request: records the answer in `replies`, or
    /// returns the tag of a read whose payload follows. Err when the reply breaks the
    /// protocol.
    fn accept_reply(
        &mut self,
        hdr: &[u8; proto::REPLY_LEN],
        conn: &Connection,
        tags: &mut Tags,
    ) -> Result<Option<u16>, String> {
        let reply = proto::parse_reply(hdr).map_err(|e| format!("bad reply: {e}"))?;
        let tag = tags
            .expects_reply(reply.cookie)
            .ok_or_else(|| format!("reply with unknown cookie {:#x}", reply.cookie))?;
        tags.replied(tag);
        let Some(io) = tags.get(tag).io else {
            return Ok(None);
        };
        if reply.error != 0 {
            log::debug!(
                "{}: tag {tag} {:?}: server error {}",
                conn.uri,
                io.op,
                reply.error
            );
            let res = proto::errno(reply.error);
            self.replies.push(Reply { tag, res });
            Ok(None)
        } else if matches!(io.op, BlockOp::Read) && io.len > 0 {
            Ok(Some(tag))
        } else {
            let res = if matches!(io.op, BlockOp::Read | BlockOp::Write) {
                io.len as i32
            } else {
                0
            };
            self.replies.push(Reply { tag, res });
            Ok(None)
        }
    }

    /// Copies `rbuf[at..at + len]` into `tag`'s buffer at its payload offset `got`
    /// (the queue's copy: no SQE of the request writes there, a staged read has none):
    /// with an SQE when the buffer is the request's pages and `rbuf` is registered, at
    /// once otherwise.
    fn copy_in(
        &mut self,
        conn: &Connection,
        tags: &mut Tags,
        tag: u16,
        (at, len): (usize, usize),
        ring: &mut dyn Ring,
    ) {
        let got = tags.get(tag).got;
        if self.index.is_some() && matches!(tags.get(tag).buf, Some(IoBuf::Pages { .. })) {
            let label = step(STEP_COPY, conn.generation());
            // SAFETY: `rbuf[at..at + len]` stays as it is until the copy completes: the
            // copy counts as a receive in flight, and the next receive (the only writer
            // of `rbuf`, and the one that moves its bytes) waits until none is.
            match unsafe { ring.push_staged_copy(tag, label, got, at, len) } {
                Ok(()) => {
                    tags.get_mut(tag).sqes += 1;
                    self.inflight += 1;
                    return;
                }
                // A full ring: copy now instead.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    log::error!(
                        "{}: tag {tag}: cannot copy the read payload into the request: {e}",
                        conn.uri
                    );
                    tags.get_mut(tag).copy_failed = true;
                    return;
                }
            }
        }
        if let Err(e) = ring.copy_to_request(tag, got, &self.rbuf[at..at + len]) {
            log::error!(
                "{}: tag {tag}: copying the read payload into the request failed: {e}",
                conn.uri
            );
            tags.get_mut(tag).copy_failed = true;
        }
    }

    /// Handles what `rbuf` holds: payload for the read in progress, then every
    /// complete reply; keeps a partial header.
    fn replies_received(
        &mut self,
        conn: &Connection,
        tags: &mut Tags,
        ring: &mut dyn Ring,
    ) -> Result<(), Broken> {
        let mut pos = self.rstart;
        loop {
            if let Some(tag) = self.partial {
                let t = tags.get(tag);
                let len = t.io.map_or(0, |io| io.len as usize);
                let n = (len - t.got).min(self.rhave - pos);
                if n > 0 {
                    if !self.can_stage(tags, tag) {
                        // Cannot happen: such a read's reply is received header only.
                        let why = "read payload bytes in the staging buffer";
                        return Err(Broken::Lost(why.into()));
                    }
                    self.copy_in(conn, tags, tag, (pos, n), ring);
                    tags.get_mut(tag).got += n;
                    pos += n;
                }
                if tags.get(tag).got < len {
                    break;
                }
                self.partial = None;
                let res = payload_done(tags, tag);
                self.replies.push(Reply { tag, res });
                continue;
            }
            if self.rhave - pos < proto::REPLY_LEN {
                break;
            }
            let mut hdr = [0u8; proto::REPLY_LEN];
            hdr.copy_from_slice(&self.rbuf[pos..pos + proto::REPLY_LEN]);
            pos += proto::REPLY_LEN;
            match self.accept_reply(&hdr, conn, tags) {
                Err(why) => return Err(Broken::Lost(why)),
                Ok(None) => {}
                Ok(Some(tag)) => {
                    tags.get_mut(tag).got = 0;
                    self.partial = Some(tag);
                }
            }
        }
        // Moved to the front by the next `post`, once no copy reads `rbuf`.
        self.rstart = pos;
        Ok(())
    }

    /// A copy out of `rbuf` into `tag`'s pages completed with `res`.
    pub(super) fn copied(&mut self, tag: u16, res: i32, conn: &Connection, tags: &mut Tags) {
        self.sqe_completed();
        if res > 0 {
            return;
        }
        log::error!(
            "{}: tag {tag}: copying the read payload into the request failed: {}",
            conn.uri,
            io::Error::from_raw_os_error(-res)
        );
        let t = tags.get_mut(tag);
        match t.result {
            // Already answered: the answer is now an error.
            Some(r) if r >= 0 => t.result = Some(-libc::EIO),
            Some(_) => {}
            None => t.copy_failed = true,
        }
    }

    /// Pushes one receive. Replies into `rbuf` are taken as soon as a byte is there
    /// (SO_RCVLOWAT 1). A READ_FIXED of a payload into the request's pages stops at
    /// whatever the socket holds when it runs, which for a large payload that is still
    /// arriving means many short reads, each a ring round trip; so it goes behind a
    /// linked POLL_ADD that completes once SO_RCVLOWAT (the rest of the payload, at most
    /// `LOWAT_MAX`) bytes are queued (TCP honours it). A RECV with MSG_WAITALL, into
    /// daemon memory or (`whole_into_pages`) into the registered pages, needs none of
    /// this: io_uring keeps it going inside the kernel.
    fn post_item(
        &mut self,
        item: RecvItem,
        conn: &mut Connection,
        tags: &mut Tags,
        ring: &mut dyn Ring,
    ) -> Result<(), Broken> {
        let full = || Broken::Failed("the ring is full: cannot post a receive".into());
        // The poll and the receive of one request (or one receive into `rbuf`).
        if !ring.reserve(2, 1) {
            return Err(full());
        }
        let generation = conn.generation();
        let fd = conn.fd();
        let pushed = match item {
            RecvItem::Staged { len, all } => {
                conn.set_lowat(1);
                let at = self.rbuf[self.rhave..].as_mut_ptr();
                let sqe = match (all, self.index) {
                    // Into the registered pages: a kernel-to-kernel copy (a READ stops at
                    // what the socket holds, as a RECV without MSG_WAITALL does).
                    (false, Some(index)) => opcode::ReadFixed::new(fd, at, len as u32, index)
                        .offset(u64::MAX)
                        .build(),
                    (false, None) => opcode::Recv::new(fd, at, len as u32).build(),
                    (true, _) => opcode::Recv::new(fd, at, len as u32)
                        .flags(libc::MSG_WAITALL)
                        .build(),
                };
                // SAFETY: `rbuf` is boxed and owned by this handler, which outlives the
                // ring; nothing else writes there while the receive is in flight.
                unsafe { ring.push_event(step(EVENT_RECV, generation), sqe) }
            }
            RecvItem::Payload(tag) => {
                let whole = self.whole_into_pages(conn);
                let Some(sqe) = payload_sqe(fd, tags, tag, self.fixed_recv, whole) else {
                    let why = "a read reply for a request without a buffer";
                    return Err(Broken::Lost(why.into()));
                };
                let t = tags.get(tag);
                if let (Some(IoBuf::Pages { .. }), false) = (t.buf, whole) {
                    let left = t.io.map_or(0, |io| io.len as usize) - t.got;
                    conn.set_lowat(left.min(LOWAT_MAX));
                    let poll = opcode::PollAdd::new(fd, libc::POLLIN as u32)
                        .build()
                        .flags(squeue::Flags::IO_LINK);
                    // Pushed for the request, so that a zero-copy registration goes in
                    // front of the poll, not between the poll and the read.
                    // SAFETY: a poll points to no memory.
                    if unsafe { ring.push(tag, step(STEP_POLL, generation), poll) }.is_err() {
                        return Err(full());
                    }
                    tags.get_mut(tag).sqes += 1;
                }
                // SAFETY: a payload's buffer stays valid until its request is finished,
                // which waits for this SQE's completion.
                let r = unsafe { ring.push(tag, step(STEP_PAYLOAD, generation), sqe) };
                if r.is_ok() {
                    tags.get_mut(tag).sqes += 1;
                }
                r
            }
        };
        if pushed.is_err() {
            // Cannot happen after `reserve`; fail safe if it does.
            return Err(full());
        }
        self.inflight += 1;
        self.item = Some(item);
        Ok(())
    }

    /// The receive of the current connection completed (`tag`: a payload's request).
    pub(super) fn done(
        &mut self,
        tag: Option<u16>,
        res: i32,
        conn: &Connection,
        tags: &mut Tags,
        ring: &mut dyn Ring,
    ) -> Result<(), Broken> {
        let Some(item) = self.item.take() else {
            let why = "a receive completion nobody waited for";
            return Err(Broken::Lost(why.into()));
        };
        match (item, tag) {
            (RecvItem::Staged { len, all }, None) => {
                if res == -libc::EAGAIN || res == -libc::EINTR {
                    return Ok(()); // nothing was taken: `kick` receives again
                }
                if res <= 0 || (all && res as usize != len) {
                    return Err(Broken::Lost(recv_failure(res, len, conn)));
                }
                self.rhave += res as usize;
                self.replies_received(conn, tags, ring)
            }
            (RecvItem::Payload(want), Some(tag)) if want == tag => {
                let len = tags.get(tag).io.map_or(0, |io| io.len as usize);
                if res <= 0 {
                    let left = len - tags.get(tag).got;
                    return Err(Broken::Lost(recv_failure(res, left, conn)));
                }
                tags.get_mut(tag).got += res as usize;
                if tags.get(tag).got >= len {
                    // The SQE's own completion (`complete`) finishes the request.
                    self.partial = None;
                    tags.get_mut(tag).result = Some(payload_done(tags, tag));
                }
                // Else `kick` receives the rest.
                Ok(())
            }
            _ => Err(Broken::Lost("receive completions out of order".into())),
        }
    }
}

/// A read's payload is complete: its result.
fn payload_done(tags: &mut Tags, tag: u16) -> i32 {
    let t = tags.get_mut(tag);
    let len = t.io.map_or(0, |io| io.len as i32);
    if std::mem::take(&mut t.copy_failed) {
        -libc::EIO
    } else {
        len
    }
}

/// The SQE that receives the rest of `tag`'s payload into its buffer, on `fd`; into
/// registered pages with one RECV of all of it if `whole` (`whole_into_pages`). Where
/// the kernel receives into registered buffers (`fixed_recv`), a RECV into a registered
/// daemon buffer (fixed) copies with the kernel's memcpy, not with `copy_to_user` (byte
/// by byte under the test VM's TCG).
fn payload_sqe(
    fd: io_uring::types::Fd,
    tags: &Tags,
    tag: u16,
    fixed_recv: bool,
    whole: bool,
) -> Option<squeue::Entry> {
    let t = tags.get(tag);
    let io = t.io?;
    let got = t.got;
    let left = io.len - got as u32;
    Some(match t.buf? {
        IoBuf::User { addr, .. } => opcode::Recv::new(fd, addr.wrapping_add(got), left)
            .flags(libc::MSG_WAITALL)
            .build(),
        // Into the registered buffer where the kernel can: its memcpy, not a user copy.
        IoBuf::Fixed { addr, index, .. } if fixed_recv => {
            fixed_io::recv_all(fd, index, addr + got as u64, left)
        }
        IoBuf::Fixed { addr, .. } => opcode::Recv::new(fd, (addr + got as u64) as *mut u8, left)
            .flags(libc::MSG_WAITALL)
            .build(),
        IoBuf::Pages { index, .. } if whole => fixed_io::recv_all(fd, index, got as u64, left),
        // Can be short: continued on its own.
        IoBuf::Pages { index, .. } => opcode::ReadFixed::new(fd, got as *mut u8, left, index)
            .offset(u64::MAX)
            .build(),
        IoBuf::None => return None,
    })
}
