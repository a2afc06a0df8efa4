//! The queue's ring as a target sees it ([`TargetRing`], the `Ring` of the targets'
//! interface), and the per-tag state it keeps: every SQE a target pushes gets the
//! Target user_data of its tag; in the zero-copy modes a request's pages are registered
//! in front of its first SQE (and counted when a target reserves room for a chain); and
//! the queue copies data into and out of request buffers for targets that ask.

use super::uapi;
use super::user_data::{encode, Kind};
use super::{buf_cmd, ensure_room, push_all};
use io_uring::{opcode, squeue, types, IoUring};
use std::io;
use std::os::fd::RawFd;
use ublkd_proto::BufferMode;
use ublkd_targets::{IoBuf, IoDesc, Ring, RingFull};

/// Where a tag is in its life.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct TagState {
    /// The request being served (between FETCH completion and commit).
    pub(super) io: Option<IoDesc>,
    /// Zero copy: the request's pages must be registered before the target's first SQE.
    pub(super) needs_reg: bool,
    /// Zero copy: the request's pages are registered by us and must be unregistered.
    pub(super) registered: bool,
    /// Zero-copy sends of this request whose notification has not arrived yet.
    pub(super) notifs: u32,
    /// The result of a request the target finished while `notifs` was not 0: committed
    /// when the last notification arrives.
    pub(super) deferred: Option<i32>,
}

/// Where request `io`'s data is: a daemon buffer of `bufs` (copy, fixed) or its own
/// pages (zc, auto-zc).
pub(super) fn io_buf(buffer: BufferMode, bufs: Option<&uapi::BufferArena>, io: &IoDesc) -> IoBuf {
    let len = io.len as usize;
    if len == 0 {
        return IoBuf::None;
    }
    match (buffer, bufs.map(|b| b.addr(io.tag))) {
        (BufferMode::Copy, Some(addr)) => IoBuf::User { addr, len },
        (BufferMode::Fixed, Some(addr)) => IoBuf::Fixed {
            addr: addr as u64,
            index: io.tag,
            len,
        },
        _ => IoBuf::Pages { index: io.tag, len },
    }
}

/// The queue ring as targets see it: every SQE gets the Target user_data of its tag, and
/// in zero-copy mode the first one of a request is preceded by the buffer registration.
pub(super) struct TargetRing<'a> {
    pub(super) ring: &'a mut IoUring,
    pub(super) tags: &'a mut [TagState],
    /// Requests the target finished with [`Ring::finish`], committed after the call.
    pub(super) finished: &'a mut Vec<(u16, i32)>,
    pub(super) qid: u16,
    pub(super) buffer: BufferMode,
    pub(super) bufs: Option<&'a uapi::BufferArena>,
    /// `/dev/ublkcN` when the device has UBLK_F_USER_COPY.
    pub(super) user_copy: Option<RawFd>,
    /// The target's staging buffer (registered in the ring).
    pub(super) staging: Option<StagingArea>,
}

/// [`Ring::push_copy_from_request`] copies up to this many bytes with user copy (where
/// the queue has it) even into a staging memfd: below it, the memfd write's fixed cost
/// is more than the user copy's (rbd 4k random writes: 10% less CPU per write, 10% more
/// IOPS; docs/research/issue-15-rbd-speed.md 7).
const USER_COPY_MAX: usize = 16 << 10;

/// Where a target's staging buffer is ([`QueueTarget::staging_buffer`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct StagingArea {
    pub(super) addr: u64,
    pub(super) len: usize,
    /// Its memfd, read from to copy staged bytes into a request's registered pages.
    pub(super) file: Option<RawFd>,
    /// The memfd to write a request's pages into (opened for inline writes).
    pub(super) writer: Option<RawFd>,
    /// Registered in the ring's buffer table (a receive buffer), or reached only
    /// through its file (request slots).
    pub(super) registered: bool,
}

impl StagingArea {
    /// Byte `at` of the buffer where `addr..addr + len` lies inside it.
    fn offset_of(&self, addr: *mut u8, len: usize) -> Option<u64> {
        let at = (addr as u64).checked_sub(self.addr)?;
        let end = at.checked_add(len as u64)?;
        (end <= self.len as u64).then_some(at)
    }
}

impl TargetRing<'_> {
    /// The buffer of request `tag`, which must be in flight.
    fn request_buf(&self, tag: u16) -> io::Result<IoBuf> {
        match self.tags.get(usize::from(tag)).and_then(|t| t.io) {
            Some(io) => Ok(io_buf(self.buffer, self.bufs, &io)),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("tag {tag} has no request in flight"),
            )),
        }
    }

    /// Request pages are reached through user copy; no user copy is an error.
    fn cdev(&self) -> io::Result<RawFd> {
        self.user_copy.ok_or_else(|| {
            let why = "the request's pages are not reachable: the device has no user copy";
            io::Error::new(io::ErrorKind::Unsupported, why)
        })
    }
}

impl Ring for TargetRing<'_> {
    unsafe fn push(&mut self, tag: u16, step: u16, sqe: squeue::Entry) -> Result<(), RingFull> {
        let sqe = sqe.user_data(encode(Kind::Target, tag, step));
        let Some(state) = self.tags.get_mut(usize::from(tag)) else {
            return Err(RingFull);
        };
        let pushed = if state.needs_reg {
            let reg = buf_cmd(uapi::REGISTER_IO_BUF, Kind::RegBuf, self.qid, tag);
            // SAFETY: the registration carries no pointers; the target's SQE is covered
            // by the caller's guarantee (the Ring::push contract).
            let ok = unsafe { push_all(self.ring, &[reg, sqe]) };
            if ok {
                state.needs_reg = false;
                state.registered = true;
            }
            ok
        } else {
            // SAFETY: the caller's guarantee (the Ring::push contract).
            unsafe { push_all(self.ring, &[sqe]) }
        };
        pushed.then_some(()).ok_or(RingFull)
    }

    unsafe fn push_event(&mut self, step: u16, sqe: squeue::Entry) -> Result<(), RingFull> {
        let sqe = sqe.user_data(encode(Kind::TargetEvent, 0, step));
        // SAFETY: the caller's guarantee (the Ring::push_event contract).
        unsafe { push_all(self.ring, &[sqe]) }
            .then_some(())
            .ok_or(RingFull)
    }

    fn finish(&mut self, tag: u16, result: i32) {
        self.finished.push((tag, result));
    }

    fn reserve(&mut self, sqes: usize, requests: usize) -> bool {
        // Zero copy registers a request's pages with one SQE before its first one.
        let ours = match self.buffer {
            BufferMode::Zc | BufferMode::AutoZc => requests,
            BufferMode::Copy | BufferMode::Fixed => 0,
        };
        ensure_room(self.ring, sqes + ours)
    }

    fn copy_to_request(&mut self, tag: u16, offset: usize, data: &[u8]) -> io::Result<()> {
        match self.request_buf(tag)? {
            buf @ IoBuf::Pages { .. } => {
                buf.check_range(offset, data.len())?;
                uapi::user_copy_write(self.cdev()?, self.qid, tag, offset, data)
            }
            // SAFETY: the queue's own buffer of a request in flight in the target, which
            // asks for the copy and has no SQE writing there (the trait's contract).
            buf => unsafe { buf.copy_in(offset, data) },
        }
    }

    unsafe fn push_staged_copy(
        &mut self,
        tag: u16,
        step: u16,
        offset: usize,
        at: usize,
        len: usize,
    ) -> io::Result<()> {
        let unsupported = |why: &str| io::Error::new(io::ErrorKind::Unsupported, why.to_owned());
        let Some(staging) = self.staging else {
            return Err(unsupported("the target has no staging buffer"));
        };
        let buf @ IoBuf::Pages { index, .. } = self.request_buf(tag)? else {
            return Err(unsupported("the request's buffer is daemon memory"));
        };
        buf.check_range(offset, len)?;
        if at.checked_add(len).is_none_or(|end| end > staging.len) {
            let why = format!(
                "bytes {at}+{len} are outside the staging buffer ({})",
                staging.len
            );
            return Err(io::Error::new(io::ErrorKind::InvalidInput, why));
        }
        if let Some(file) = staging.file {
            // The staging buffer's memfd at `at` into the request's registered pages at
            // `offset` (a ublk-registered buffer is addressed from 0): the kernel's
            // memcpy. The file is non-blocking, so the read runs inline.
            let sqe = opcode::ReadFixed::new(types::Fd(file), offset as *mut u8, len as u32, index)
                .offset(at as u64)
                .build();
            // SAFETY: the staging bytes stay unchanged until the completion is handed to
            // the target (the caller's guarantee); the memfd lives as long as the
            // buffer, which outlives the ring; the request's pages are registered (in
            // front of this SQE in zc mode) until the request is committed, which waits
            // for this completion.
            return match unsafe { self.push(tag, step, sqe) } {
                Ok(()) => Ok(()),
                Err(RingFull) => Err(io::ErrorKind::WouldBlock.into()),
            };
        }
        if self.user_copy.is_none() {
            return Err(unsupported("the device has no user copy"));
        }
        if !ensure_room(self.ring, 1) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // The char device is file 0 of the ring's table (non-blocking: runs inline). A
        // plain WRITE, not WRITE_FIXED: the driver refuses to copy from anything but
        // user memory (a registered buffer is a kernel bvec to it: EACCES).
        let pos = uapi::user_copy_pos(self.qid, tag, offset as u32);
        let addr = staging.addr + at as u64;
        let sqe = opcode::Write::new(types::Fixed(0), addr as *const u8, len as u32)
            .offset(pos)
            .build()
            .user_data(encode(Kind::Target, tag, step));
        // SAFETY: the staging bytes stay unchanged until the completion is handed to the
        // target (the caller's guarantee); the buffer itself outlives the ring.
        if unsafe { push_all(self.ring, &[sqe]) } {
            Ok(())
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    unsafe fn push_copy_from_request(
        &mut self,
        tag: u16,
        step: u16,
        offset: usize,
        into: *mut u8,
        len: usize,
        link: bool,
    ) -> io::Result<()> {
        let buf @ IoBuf::Pages { index, .. } = self.request_buf(tag)? else {
            let why = "the request's buffer is daemon memory";
            return Err(io::Error::new(io::ErrorKind::Unsupported, why));
        };
        buf.check_range(offset, len)?;
        // A small write's user copy costs less than a write into the memfd (its inode
        // lock, time update and page lookup): measured on rbd 4k writes.
        let small = self.user_copy.is_some() && len <= USER_COPY_MAX;
        let staged = self
            .staging
            .filter(|_| !small)
            .and_then(|s| Some((s.writer?, s.offset_of(into, len)?)));
        if let Some((file, at)) = staged {
            // Into the staging buffer's memfd at `at`, from the request's registered
            // pages at `offset` (addressed from 0): the kernel's memcpy, inline where
            // the memfd was opened O_DIRECT.
            let sqe =
                opcode::WriteFixed::new(types::Fd(file), offset as *const u8, len as u32, index)
                    .offset(at)
                    .build();
            let sqe = if link {
                sqe.flags(squeue::Flags::IO_LINK)
            } else {
                sqe
            };
            // SAFETY: the staging bytes are the caller's until the completion (the
            // caller's guarantee); the memfd lives as long as the buffer, which outlives
            // the ring; the request's pages stay registered (in front of this SQE in zc
            // mode) until its commit, which waits for this completion.
            return match unsafe { self.push(tag, step, sqe) } {
                Ok(()) => Ok(()),
                Err(RingFull) => Err(io::ErrorKind::WouldBlock.into()),
            };
        }
        self.cdev()?;
        // The char device is file 0 of the ring's table (non-blocking: runs inline). A
        // plain READ into daemon memory: the driver copies only to user memory.
        let pos = uapi::user_copy_pos(self.qid, tag, offset as u32);
        let sqe = opcode::Read::new(types::Fixed(0), into, len as u32)
            .offset(pos)
            .build()
            .user_data(encode(Kind::Target, tag, step));
        let sqe = if link {
            sqe.flags(squeue::Flags::IO_LINK)
        } else {
            sqe
        };
        // SAFETY: `into..into + len` stays valid and untouched until the completion is
        // handed to the target (the caller's guarantee).
        if unsafe { push_all(self.ring, &[sqe]) } {
            Ok(())
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }
}
