//! The batch command path (UBLK_F_BATCH_IO, Linux 7.0): a queue's tags are registered
//! once with UBLK_U_IO_PREP_IO_CMDS; two multishot UBLK_U_IO_FETCH_IO_CMDS deliver
//! lists of tags, each list written by the driver into a provided buffer (legacy
//! PROVIDE_BUFFERS, one buffer per CQE, given back once its tags are read); the
//! results of one loop turn go back in one UBLK_U_IO_COMMIT_IO_CMDS, which also
//! re-arms those tags.
//!
//! Commit buffers: two element arrays, one filling while the other is with the driver.
//! A tag is in at most one of them (the driver delivers it again only after its
//! commit), so each holds `depth` elements and never overflows. The driver may commit
//! part of an array: its result is then the bytes it processed, or an errno when it
//! refused the first element. The rest goes back into the filling array; an element
//! the driver refuses on its own is logged with its tag and dropped (the driver only
//! refuses a tag it does not consider ours).
//!
//! Zero copy with manual registration: a request's pages are unregistered before its
//! tag is committed; the UNREGISTER_IO_BUF goes out on its own and the tag joins the
//! commit array when that completes.

use super::user_data::{encode, Kind, UserData};
use super::{ensure_room, push_all, uapi};
use io_uring::{cqueue, opcode, squeue, IoUring};
use libublk::sys;
use std::alloc::{self, Layout};
use std::collections::VecDeque;
use std::io;
use std::ptr::NonNull;
use ublkd_proto::BufferMode;

/// Bytes of one fetch buffer: the driver puts at most 128 tags in one CQE.
const FETCH_BUF_LEN: usize = 256;
/// The provided-buffer group of the fetch buffers (the ring is the queue's own).
const FETCH_GROUP: u16 = 0;
/// Fetch commands kept armed (as kublk and libublk do): while the driver completes
/// one, the other takes new requests.
const FETCH_CMDS: u16 = 2;

/// How the elements of a PREP/COMMIT array look for a buffer mode: the header flags
/// and the element size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElemFormat {
    pub flags: u16,
    pub bytes: u8,
}

impl ElemFormat {
    pub fn for_mode(mode: BufferMode) -> Self {
        match mode {
            // The driver copies to and from the daemon's buffer at buf_addr.
            BufferMode::Copy | BufferMode::Fixed => ElemFormat {
                flags: sys::UBLK_BATCH_F_HAS_BUF_ADDR as u16,
                bytes: 16,
            },
            // buf_index: where the driver registers the request's pages (= tag); with
            // the fallback it delivers UBLK_IO_F_NEED_REG_BUF instead of failing.
            BufferMode::AutoZc => ElemFormat {
                flags: sys::UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK as u16,
                bytes: 8,
            },
            BufferMode::Zc => ElemFormat { flags: 0, bytes: 8 },
        }
    }

    fn has_addr(self) -> bool {
        self.flags & sys::UBLK_BATCH_F_HAS_BUF_ADDR as u16 != 0
    }
}

/// The `struct ublk_batch_io` payload of a batch command (native endian).
pub fn header(q_id: u16, flags: u16, nr_elem: u16, elem_bytes: u8) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..2].copy_from_slice(&q_id.to_ne_bytes());
    h[2..4].copy_from_slice(&flags.to_ne_bytes());
    h[4..6].copy_from_slice(&nr_elem.to_ne_bytes());
    h[6] = elem_bytes;
    h
}

/// One element: `struct ublk_elem_header { u16 tag; u16 buf_index; s32 result; }`,
/// then `u64 buf_addr` when the format has it. Only `fmt.bytes` bytes are meaningful.
pub fn element(fmt: ElemFormat, tag: u16, buf_index: u16, result: i32, addr: u64) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[0..2].copy_from_slice(&tag.to_ne_bytes());
    e[2..4].copy_from_slice(&buf_index.to_ne_bytes());
    e[4..8].copy_from_slice(&result.to_ne_bytes());
    if fmt.has_addr() {
        e[8..16].copy_from_slice(&addr.to_ne_bytes());
    }
    e
}

/// Heap memory handed to the kernel by address: only ever touched through raw
/// pointers, so the kernel writing part of it never aliases a Rust reference.
struct RawBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: plain memory owned by one queue thread at a time.
unsafe impl Send for RawBuf {}

impl RawBuf {
    fn new(len: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(8), 64)
            .map_err(|e| io::Error::other(format!("batch buffer layout: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(RawBuf { ptr, layout })
    }

    fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for RawBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout. The queue drops its ring, which
        // cancels every command pointing here, before its command path.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// An array of PREP/COMMIT elements.
struct ElemArray {
    mem: RawBuf,
    fmt: ElemFormat,
    cap: u16,
    len: u16,
}

impl ElemArray {
    fn new(fmt: ElemFormat, cap: u16) -> io::Result<Self> {
        Ok(ElemArray {
            mem: RawBuf::new(usize::from(cap) * usize::from(fmt.bytes))?,
            fmt,
            cap,
            len: 0,
        })
    }

    fn bytes(&self) -> usize {
        usize::from(self.len) * usize::from(self.fmt.bytes)
    }

    fn push(&mut self, elem: &[u8; 16]) -> bool {
        if self.len == self.cap {
            return false;
        }
        let n = usize::from(self.fmt.bytes);
        // SAFETY: len < cap, so the element's n bytes lie inside the allocation; the
        // array is not with the driver while it is being filled.
        unsafe {
            std::ptr::copy_nonoverlapping(elem.as_ptr(), self.mem.ptr().add(self.bytes()), n)
        };
        self.len += 1;
        true
    }

    fn get(&self, i: u16) -> [u8; 16] {
        let mut e = [0u8; 16];
        if i < self.len {
            let n = usize::from(self.fmt.bytes);
            // SAFETY: i < len <= cap: inside the allocation; the driver only reads it.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.mem.ptr().add(usize::from(i) * n),
                    e.as_mut_ptr(),
                    n,
                )
            };
        }
        e
    }

    fn tag(&self, i: u16) -> u16 {
        let e = self.get(i);
        u16::from_ne_bytes([e[0], e[1]])
    }

    /// The PREP or COMMIT command for the elements, on the registered char device.
    fn sqe(&self, op: u32, q_id: u16, user_data: u64) -> squeue::Entry {
        let h = header(q_id, self.fmt.flags, self.len, self.fmt.bytes);
        opcode::UringCmd16::new(uapi::CDEV_FIXED_FD, op)
            .cmd(h)
            .addr(Some(self.mem.ptr() as u64))
            .build()
            .user_data(user_data)
    }
}

/// The first element of an array of `n` that a COMMIT_IO_CMDS with result `res` left
/// for another commit: `n` when all were committed (res = the array's bytes), the
/// number committed when the driver stopped at a refused element (res = the bytes
/// before it), and 1 when it refused the first one (res = its errno): that element is
/// dropped, the driver does not take it.
fn uncommitted_from(res: i32, n: u16, elem_bytes: u8) -> u16 {
    if res < 0 {
        return 1.min(n);
    }
    let done = res as usize / usize::from(elem_bytes.max(1));
    done.min(usize::from(n)) as u16
}

pub struct Batch {
    dev_id: u32,
    qid: u16,
    /// Per tag: the daemon buffer the driver copies to and from (copy, fixed).
    addrs: Vec<u64>,
    auto_reg: bool,
    arrays: [ElemArray; 2],
    /// The array results go into; the other one may be with the driver.
    filling: usize,
    committing: bool,
    fetch_mem: RawBuf,
    nbufs: u16,
    /// Fetch buffers whose tags were read: given back to the driver at the flush.
    to_provide: Vec<u16>,
    fetches_armed: u16,
    /// Fetch commands that ended and are to be posted again.
    fetches_wanted: u16,
    /// The driver aborted the fetch commands: the queue is going away.
    aborted: bool,
    /// Zero copy: the result of a tag waiting for its buffer's unregistration.
    unreg_result: Vec<Option<i32>>,
    /// ... and those whose UNREGISTER_IO_BUF is not posted yet.
    unreg_to_push: VecDeque<u16>,
    unregs: usize,
}

impl Batch {
    pub fn new(
        dev_id: u32,
        qid: u16,
        depth: u16,
        mode: BufferMode,
        addrs: Vec<u64>,
    ) -> io::Result<Self> {
        let fmt = ElemFormat::for_mode(mode);
        let nbufs = depth.max(8);
        Ok(Batch {
            dev_id,
            qid,
            addrs,
            auto_reg: mode == BufferMode::AutoZc,
            arrays: [ElemArray::new(fmt, depth)?, ElemArray::new(fmt, depth)?],
            filling: 0,
            committing: false,
            fetch_mem: RawBuf::new(usize::from(nbufs) * FETCH_BUF_LEN)?,
            nbufs,
            to_provide: Vec::with_capacity(usize::from(nbufs)),
            fetches_armed: 0,
            fetches_wanted: 0,
            aborted: false,
            unreg_result: vec![None; usize::from(depth)],
            unreg_to_push: VecDeque::with_capacity(usize::from(depth)),
            unregs: 0,
        })
    }

    fn element(&self, tag: u16, result: i32) -> [u8; 16] {
        let fmt = self.arrays[0].fmt;
        let addr = self.addrs.get(usize::from(tag)).copied().unwrap_or(0);
        let index = if self.auto_reg { tag } else { 0 };
        element(fmt, tag, index, result, addr)
    }

    /// Registers every tag (PREP_IO_CMDS, waited for), then provides the fetch buffers
    /// and arms the fetch commands (submitted with the caller's next submit).
    pub fn start(&mut self, ring: &mut IoUring) -> io::Result<()> {
        let depth = self.unreg_result.len() as u16;
        for tag in 0..depth {
            let e = self.element(tag, 0);
            self.arrays[0].push(&e);
        }
        let prep = self.arrays[0].sqe(uapi::PREP_IO_CMDS, self.qid, encode(Kind::BatchPrep, 0, 0));
        // SAFETY: the element array lives in `self`, which outlives the ring's use of
        // it: we wait for the command's completion below.
        if !unsafe { push_all(ring, &[prep]) } {
            return Err(io::Error::other(
                "submission queue full while posting PREP_IO_CMDS",
            ));
        }
        let res = loop {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            let prep = ring.completion().find_map(|c| {
                let ud = super::user_data::decode(c.user_data());
                (ud.map(|u| u.kind) == Some(Kind::BatchPrep)).then_some(c.result())
            });
            if let Some(res) = prep {
                break res;
            }
        };
        self.arrays[0].len = 0;
        if res < 0 {
            return Err(io::Error::other(format!(
                "PREP_IO_CMDS failed: {}",
                io::Error::from_raw_os_error(-res)
            )));
        }
        let all = opcode::ProvideBuffers::new(
            self.fetch_mem.ptr(),
            FETCH_BUF_LEN as i32,
            self.nbufs,
            FETCH_GROUP,
            0,
        )
        .build()
        .user_data(encode(Kind::FetchBuf, 0, 0))
        .flags(squeue::Flags::SKIP_SUCCESS);
        // SAFETY: the fetch buffers live in `self`, dropped after the ring.
        if !unsafe { push_all(ring, &[all]) } {
            return Err(io::Error::other(
                "submission queue full while providing fetch buffers",
            ));
        }
        self.fetches_wanted = FETCH_CMDS;
        self.flush(ring, true);
        if self.fetches_armed != FETCH_CMDS {
            return Err(io::Error::other(
                "submission queue full while posting FETCH_IO_CMDS",
            ));
        }
        Ok(())
    }

    /// Queues `tag`'s result for this turn's commit; with `registered` pages, behind
    /// their unregistration.
    pub fn commit(&mut self, ring: &mut IoUring, tag: u16, res: i32, registered: bool) {
        if registered {
            if let Some(slot) = self.unreg_result.get_mut(usize::from(tag)) {
                *slot = Some(res);
                self.unregs += 1;
                self.unreg_to_push.push_back(tag);
                self.push_unregs(ring);
                return;
            }
        }
        self.queue_commit(tag, res);
    }

    fn queue_commit(&mut self, tag: u16, res: i32) {
        let e = self.element(tag, res);
        if !self.arrays[self.filling].push(&e) {
            // Cannot happen: a tag is in at most one array, and each holds depth.
            log::error!(
                "dev {} queue {} tag {tag}: commit array full; the request is lost",
                self.dev_id,
                self.qid
            );
        }
    }

    fn push_unregs(&mut self, ring: &mut IoUring) {
        while let Some(&tag) = self.unreg_to_push.front() {
            let sqe = uapi::io_cmd_sqe(uapi::UNREGISTER_IO_BUF, self.qid, tag, 0, u64::from(tag))
                .user_data(encode(Kind::UnregBuf, tag, 0));
            // SAFETY: the command carries no pointer.
            if !unsafe { push_all(ring, &[sqe]) } {
                return;
            }
            self.unreg_to_push.pop_front();
        }
    }

    /// End of a loop turn: give back read fetch buffers, re-arm ended fetch commands
    /// (unless `take_new` is false: the queue is stopping or handing over), and post
    /// the turn's commit.
    pub fn flush(&mut self, ring: &mut IoUring, take_new: bool) {
        self.push_unregs(ring);
        while let Some(&bid) = self.to_provide.last() {
            // SAFETY: bid < nbufs (checked when it was taken), so the buffer lies in
            // fetch_mem, which outlives the ring.
            let addr = unsafe { self.fetch_mem.ptr().add(usize::from(bid) * FETCH_BUF_LEN) };
            let sqe = opcode::ProvideBuffers::new(addr, FETCH_BUF_LEN as i32, 1, FETCH_GROUP, bid)
                .build()
                .user_data(encode(Kind::FetchBuf, 0, 0))
                .flags(squeue::Flags::SKIP_SUCCESS);
            // SAFETY: as above.
            if !unsafe { push_all(ring, &[sqe]) } {
                break;
            }
            self.to_provide.pop();
        }
        while take_new && !self.aborted && self.fetches_wanted > 0 {
            let sqe = uapi::batch_fetch_sqe(
                header(self.qid, 0, (FETCH_BUF_LEN / 2) as u16, 2),
                FETCH_GROUP,
            )
            .user_data(encode(Kind::BatchFetch, 0, 0));
            // SAFETY: the command carries no pointer; its buffers come from the group.
            if !unsafe { push_all(ring, &[sqe]) } {
                break;
            }
            self.fetches_wanted -= 1;
            self.fetches_armed += 1;
        }
        if !self.committing && self.arrays[self.filling].len > 0 && ensure_room(ring, 1) {
            let ud = encode(Kind::BatchCommit, 0, self.filling as u16);
            let sqe = self.arrays[self.filling].sqe(uapi::COMMIT_IO_CMDS, self.qid, ud);
            // SAFETY: the array stays untouched (not filling) until its completion.
            if unsafe { push_all(ring, &[sqe]) } {
                self.committing = true;
                self.filling = 1 - self.filling;
            }
        }
    }

    /// A completion of one of the batch commands; tags the driver delivered go to
    /// `delivered`.
    pub fn completed(&mut self, ud: UserData, res: i32, flags: u32, delivered: &mut Vec<u16>) {
        let (dev, q) = (self.dev_id, self.qid);
        match ud.kind {
            Kind::BatchFetch => self.fetched(res, flags, delivered),
            Kind::BatchCommit => self.committed(usize::from(ud.step) & 1, res),
            Kind::UnregBuf => {
                let tag = ud.tag;
                let Some(result) = self
                    .unreg_result
                    .get_mut(usize::from(tag))
                    .and_then(Option::take)
                else {
                    log::error!("dev {dev} queue {q} tag {tag}: unexpected unregistration");
                    return;
                };
                if res < 0 {
                    log::error!(
                        "dev {dev} queue {q} tag {tag}: unregistering the request buffer failed: {}",
                        io::Error::from_raw_os_error(-res)
                    );
                }
                self.unregs -= 1;
                self.queue_commit(tag, result);
            }
            Kind::FetchBuf => log::error!(
                "dev {dev} queue {q}: providing fetch buffers failed: {}",
                io::Error::from_raw_os_error(-res)
            ),
            _ => log::error!("dev {dev} queue {q}: unexpected {:?} completion", ud.kind),
        }
    }

    fn fetched(&mut self, res: i32, flags: u32, delivered: &mut Vec<u16>) {
        let (dev, q) = (self.dev_id, self.qid);
        if let Some(bid) = cqueue::buffer_select(flags) {
            if bid >= self.nbufs {
                log::error!("dev {dev} queue {q}: fetch completion names buffer {bid}");
            } else {
                let n = (res.max(0) as usize).min(FETCH_BUF_LEN) / 2;
                let base = usize::from(bid) * FETCH_BUF_LEN;
                for i in 0..n {
                    // SAFETY: base + 2i + 2 <= (bid + 1) * FETCH_BUF_LEN, inside
                    // fetch_mem; the driver wrote these bytes before the CQE and does
                    // not touch the buffer until we provide it again.
                    let tag = unsafe {
                        self.fetch_mem
                            .ptr()
                            .add(base + 2 * i)
                            .cast::<u16>()
                            .read_unaligned()
                    };
                    delivered.push(tag);
                }
                self.to_provide.push(bid);
            }
        }
        if cqueue::more(flags) {
            return;
        }
        self.fetches_armed = self.fetches_armed.saturating_sub(1);
        match res {
            uapi::IO_RES_ABORT => {
                log::trace!("dev {dev} queue {q}: fetch aborted");
                self.aborted = true;
            }
            r if r >= 0 || r == -libc::ENOBUFS => self.fetches_wanted += 1,
            err => log::error!(
                "dev {dev} queue {q}: FETCH_IO_CMDS failed: {}",
                io::Error::from_raw_os_error(-err)
            ),
        }
    }

    fn committed(&mut self, idx: usize, res: i32) {
        let (dev, q) = (self.dev_id, self.qid);
        self.committing = false;
        let n = self.arrays[idx].len;
        let first_left = uncommitted_from(res, n, self.arrays[idx].fmt.bytes);
        if res < 0 && n > 0 {
            log::error!(
                "dev {dev} queue {q} tag {}: the driver refused its commit: {}; dropping it",
                self.arrays[idx].tag(0),
                io::Error::from_raw_os_error(-res)
            );
        } else if first_left < n {
            log::debug!(
                "dev {dev} queue {q}: partial commit ({first_left} of {n}); committing the rest again"
            );
        }
        let filling = self.filling;
        for i in first_left.min(n)..n {
            let e = self.arrays[idx].get(i);
            if !self.arrays[filling].push(&e) {
                log::error!(
                    "dev {dev} queue {q} tag {}: commit array full; the request is lost",
                    self.arrays[idx].tag(i)
                );
            }
        }
        self.arrays[idx].len = 0;
    }

    pub fn describe(&self) -> String {
        format!(
            "batch: fetches armed {} wanted {} aborted {}, fetch buffers to give back {}, \
             committing {} (array {} holds {}, the other {}), unregistrations {} ({} to post)",
            self.fetches_armed,
            self.fetches_wanted,
            self.aborted,
            self.to_provide.len(),
            self.committing,
            self.filling,
            self.arrays[self.filling].len,
            self.arrays[1 - self.filling].len,
            self.unregs,
            self.unreg_to_push.len()
        )
    }

    /// Nothing is waiting to be committed.
    pub fn idle(&self) -> bool {
        !self.committing && self.arrays[self.filling].len == 0 && self.unregs == 0
    }

    /// The driver may still deliver requests.
    pub fn armed(&self) -> bool {
        !self.aborted && self.fetches_armed + self.fetches_wanted > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn header_matches_uapi_layout() {
        assert_eq!(size_of::<sys::ublk_batch_io>(), 16);
        let h = header(0x0102, 0x0304, 0x0506, 16);
        let at = |o: usize, n: usize| &h[o..o + n];
        assert_eq!(
            at(offset_of!(sys::ublk_batch_io, q_id), 2),
            &0x0102u16.to_ne_bytes()
        );
        assert_eq!(
            at(offset_of!(sys::ublk_batch_io, flags), 2),
            &0x0304u16.to_ne_bytes()
        );
        assert_eq!(
            at(offset_of!(sys::ublk_batch_io, nr_elem), 2),
            &0x0506u16.to_ne_bytes()
        );
        assert_eq!(h[offset_of!(sys::ublk_batch_io, elem_bytes)], 16);
        assert_eq!(h[offset_of!(sys::ublk_batch_io, reserved)], 0);
        assert_eq!(at(offset_of!(sys::ublk_batch_io, reserved2), 8), &[0; 8]);
    }

    #[test]
    fn elements_match_uapi_layout() {
        assert_eq!(size_of::<sys::ublk_elem_header>(), 8);
        let copy = ElemFormat::for_mode(BufferMode::Copy);
        assert_eq!(copy, ElemFormat::for_mode(BufferMode::Fixed));
        assert_eq!(
            (copy.flags, copy.bytes),
            (sys::UBLK_BATCH_F_HAS_BUF_ADDR as u16, 16)
        );
        let e = element(copy, 7, 0, -5, 0x1122_3344_5566_7788);
        let tag = offset_of!(sys::ublk_elem_header, tag);
        let idx = offset_of!(sys::ublk_elem_header, buf_index);
        let res = offset_of!(sys::ublk_elem_header, result);
        assert_eq!(&e[tag..tag + 2], &7u16.to_ne_bytes());
        assert_eq!(&e[idx..idx + 2], &0u16.to_ne_bytes());
        assert_eq!(&e[res..res + 4], &(-5i32).to_ne_bytes());
        // buf_addr follows the 8-byte header.
        assert_eq!(&e[8..16], &0x1122_3344_5566_7788u64.to_ne_bytes());

        let auto = ElemFormat::for_mode(BufferMode::AutoZc);
        assert_eq!(
            (auto.flags, auto.bytes),
            (sys::UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK as u16, 8)
        );
        let e = element(auto, 3, 3, 4096, 0xdead);
        assert_eq!(&e[idx..idx + 2], &3u16.to_ne_bytes());
        assert_eq!(&e[8..16], &[0; 8], "no address without HAS_BUF_ADDR");

        let zc = ElemFormat::for_mode(BufferMode::Zc);
        assert_eq!((zc.flags, zc.bytes), (0, 8));
    }

    #[test]
    fn partial_commits_leave_the_rest() {
        // All 5 of 16 bytes each.
        assert_eq!(uncommitted_from(80, 5, 16), 5);
        // Stopped at the third: the third and later go again.
        assert_eq!(uncommitted_from(32, 5, 16), 2);
        assert_eq!(uncommitted_from(0, 5, 8), 0);
        // The first refused: it is dropped, the rest go again.
        assert_eq!(uncommitted_from(-libc::EBUSY, 5, 8), 1);
        assert_eq!(uncommitted_from(-libc::EINVAL, 0, 8), 0);
        // A result beyond the array commits it all.
        assert_eq!(uncommitted_from(1 << 20, 3, 8), 3);
    }

    #[test]
    fn commit_sqe_points_at_the_elements() {
        let fmt = ElemFormat::for_mode(BufferMode::Copy);
        let mut a = ElemArray::new(fmt, 4).unwrap();
        assert!(a.push(&element(fmt, 1, 0, 512, 0x1000)));
        assert!(a.push(&element(fmt, 2, 0, -5, 0x2000)));
        assert_eq!((a.len, a.bytes(), a.tag(1)), (2, 32, 2));
        let sqe = a.sqe(uapi::COMMIT_IO_CMDS, 3, 99);
        // SAFETY: reading the bytes of a 64-byte repr(C) SQE.
        let raw: [u8; 64] = unsafe { std::mem::transmute(sqe) };
        assert_eq!(
            u64::from_ne_bytes(raw[16..24].try_into().unwrap()),
            a.mem.ptr() as u64
        );
        assert_eq!(&raw[48..64], &header(3, fmt.flags, 2, 16));
        assert!(a.push(&element(fmt, 3, 0, 0, 0x3000)));
        assert!(a.push(&element(fmt, 4, 0, 0, 0x4000)));
        assert!(
            !a.push(&element(fmt, 5, 0, 0, 0x5000)),
            "holds depth elements"
        );
    }
}
