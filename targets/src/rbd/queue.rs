//! One queue of an rbd device: starts each request with a librbd asynchronous call and
//! completes it when librbd reports the result.
//!
//! librbd calls back on its own threads; the callback adds the result to this queue's
//! [`Completions`] and signals its eventfd. A read of that eventfd is always in flight on
//! the queue's ring ([`Ring::push_event`]); when it completes, [`RbdQueue::complete`] takes
//! the results, finishes their requests ([`Ring::finish`]) and reads the eventfd again.
//! A FUA write is finished only after a flush that follows it; so is every write when
//! the device has no volatile cache but librbd caches (`flush_writes`, after a
//! recovery: [`crate::Target::write_through`]).
//!
//! librbd reads and writes process memory. With daemon buffers (copy, fixed) it gets
//! the request's buffer. In the zero-copy modes the request's buffer is its own pages,
//! which a process cannot address, so each tag has a slot of a memfd-backed staging
//! buffer ([`Staging::for_requests`]): a write's data is copied from the request's pages
//! into its slot on the ring (WRITE_FIXED) before librbd gets the slot, a read's data
//! from the slot into the request's pages (READ_FIXED) after librbd filled it. Both are
//! the kernel's memcpy, where copy mode has the driver copy to and from user memory,
//! which an emulated CPU runs several times slower (docs/research/issue-15-rbd-speed.md 7).
//! A write of up to 16 KiB is copied into its slot with user copy instead (an io_uring
//! READ of the request on the char device): there a write into the memfd costs more than
//! the copy it saves ([`Ring::push_copy_from_request`] decides).

use super::rados::{AioOp, Completions, Image};
use crate::{Completion, IoBuf, IoDesc, Outcome, Owner, QueueTarget, Ring, Staging, Throttle};
use io_uring::{opcode, types};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The `push_event` step of the eventfd read.
const EVENT_DONE: u16 = 1;
/// The `push` step that copies a write's data from its pages into its staging slot.
const STEP_STAGE_WRITE: u16 = 1;
/// The `push` step that copies a read's data from its staging slot into its pages.
const STEP_UNSTAGE_READ: u16 = 2;

/// What a request id says besides its tag: which of its calls reported.
const STAGE_SHIFT: u32 = 16;
const STAGE_MAIN: u64 = 0;
/// The flush after a FUA write.
const STAGE_FUA_FLUSH: u64 = 1;

fn request_id(tag: u16, stage: u64) -> u64 {
    u64::from(tag) | stage << STAGE_SHIFT
}

fn split_id(id: u64) -> (u16, u64) {
    ((id & 0xffff) as u16, id >> STAGE_SHIFT)
}

#[derive(Debug, Clone, Copy, Default)]
struct TagState {
    /// The request's length: a successful read or write completes with it.
    len: u32,
    /// A FUA write: flush before completing.
    fua: bool,
    /// A read whose data librbd puts in the tag's staging slot.
    staged_read: bool,
}

pub(super) struct RbdQueue {
    image: Arc<Image>,
    sink: Arc<Completions>,
    qid: u16,
    tags: Vec<TagState>,
    /// Calls started and not yet reported.
    inflight: usize,
    /// The eventfd read's target; boxed so it does not move while the read is in flight.
    wake_buf: Box<u64>,
    done: Vec<(u64, i64)>,
    /// How long dropping the queue waits for librbd to report what is in flight.
    drain: Duration,
    /// One slot of `slot` bytes per tag, for the zero-copy modes (librbd may hold
    /// pointers into it until `Drop` has waited for what is in flight).
    staging: Option<Staging>,
    slot: usize,
    /// Flush after every write, discard and write-zeroes, FUA or not.
    flush_writes: bool,
    /// The warning that requests time out, at most once per period (the queue logs
    /// the failed requests themselves).
    timeouts: Throttle,
    /// The same for requests the cluster refuses the Ceph user (EACCES, EPERM).
    denials: Throttle,
}

impl RbdQueue {
    /// A queue of `depth` tags; with `staging` of `slot` bytes per tag where requests
    /// bring their own pages.
    pub(super) fn new(
        image: Arc<Image>,
        qid: u16,
        depth: u16,
        drain: Duration,
        staging: Option<usize>,
        flush_writes: bool,
    ) -> std::io::Result<RbdQueue> {
        let staging = staging
            .map(|slot| Staging::for_requests(depth, slot))
            .transpose()
            .map_err(|e| {
                let why = format!(
                    "cannot make the staging buffer for the zero-copy modes: {e}; use --buffer copy"
                );
                std::io::Error::new(e.kind(), why)
            })?;
        // Slots are rounded up to pages.
        let slot = staging
            .as_ref()
            .map_or(0, |s| s.len() / usize::from(depth.max(1)));
        Ok(RbdQueue {
            image,
            sink: Completions::new()?,
            qid,
            tags: vec![TagState::default(); usize::from(depth)],
            inflight: 0,
            wake_buf: Box::new(0),
            done: Vec::new(),
            drain,
            staging,
            slot,
            flush_writes,
            timeouts: Throttle::new(1, Duration::from_secs(10)),
            denials: Throttle::new(1, Duration::from_secs(10)),
        })
    }

    fn arm(&mut self, ring: &mut dyn Ring) {
        let buf: *mut u64 = &mut *self.wake_buf;
        let sqe = opcode::Read::new(types::Fd(self.sink.fd()), buf.cast(), 8).build();
        // SAFETY: wake_buf is boxed and owned by this handler, which outlives the ring's
        // use of it (the queue drains its ring before dropping its target); the eventfd
        // lives in `sink`, which this handler holds.
        if unsafe { ring.push_event(EVENT_DONE, sqe) }.is_err() {
            log::error!(
                "rbd q{}: the ring is full: cannot wait for librbd's results",
                self.qid
            );
        }
    }

    /// Starts `op` for `tag`: Queued, or the error librbd refused it with.
    fn start(&mut self, tag: u16, stage: u64, op: AioOp) -> Outcome {
        // SAFETY: the buffers of reads and writes are the request's daemon buffer, which
        // stays the request's until it completes, and it completes only once librbd has
        // reported (`event`), or when the queue ends after `Drop` has waited.
        match unsafe { self.image.aio(op, &self.sink, request_id(tag, stage)) } {
            Ok(()) => {
                self.inflight += 1;
                Outcome::Queued
            }
            Err(e) => {
                log::warn!(
                    "rbd q{} tag {tag}: librbd refused {op:?}: errno {}",
                    self.qid,
                    -e
                );
                Outcome::Done(e)
            }
        }
    }

    /// Records what `io`'s completion needs: its result on success (the length for
    /// reads and writes, 0 for the others), whether a flush must follow, and whether
    /// its data is to be copied from its staging slot into its pages.
    fn state(&mut self, io: &IoDesc, data: bool, fua: bool, staged_read: bool) {
        let len = if data { io.len } else { 0 };
        if let Some(t) = self.tags.get_mut(usize::from(io.tag)) {
            *t = TagState {
                len,
                fua,
                staged_read,
            };
        }
    }

    /// Whether a change of data must be flushed before it completes: FUA, or every
    /// change while `flush_writes`.
    fn durable(&self, io: &IoDesc) -> bool {
        io.flags.fua || self.flush_writes
    }

    /// Where librbd reads or writes a request's data: the request's daemon buffer, or
    /// for the request's own pages (zero-copy modes) the tag's staging slot, with true.
    /// None when there is neither.
    fn addr(&mut self, tag: u16, buf: IoBuf) -> Option<(*mut u8, bool)> {
        match buf {
            IoBuf::User { addr, .. } => Some((addr, false)),
            IoBuf::Fixed { addr, .. } => Some((addr as *mut u8, false)),
            IoBuf::Pages { len, .. } => self.slot_addr(tag, len).map(|a| (a, true)),
            IoBuf::None => None,
        }
    }

    /// The address of `tag`'s staging slot, if it has one that holds `len` bytes.
    fn slot_addr(&mut self, tag: u16, len: usize) -> Option<*mut u8> {
        let at = usize::from(tag) * self.slot;
        let staging = self.staging.as_mut()?;
        (len <= self.slot && at + len <= staging.len()).then(|| staging[at..].as_mut_ptr())
    }

    /// Starts the copy of read `tag`'s data (`len` bytes librbd put in its slot) into
    /// its pages; the request completes when that copy does.
    fn unstage_read(&mut self, tag: u16, len: u32, ring: &mut dyn Ring) {
        let at = usize::from(tag) * self.slot;
        // Room first: a full submission queue is submitted to make it (this runs
        // inside a completion, where "busy" cannot be answered).
        let _ = ring.reserve(1, 1);
        // SAFETY: the slot belongs to this tag until the request completes, which it
        // does only through this copy's completion; librbd is done with it.
        match unsafe { ring.push_staged_copy(tag, STEP_UNSTAGE_READ, 0, at, len as usize) } {
            Ok(()) => {}
            Err(e) => {
                log::error!(
                    "rbd q{} tag {tag}: cannot copy the read's data into the request: {e}",
                    self.qid
                );
                ring.finish(tag, -libc::EIO);
            }
        }
    }

    /// Hands write `io` to librbd from `addr` (its daemon buffer or its staging slot).
    fn write_from(&mut self, io: &IoDesc, addr: *mut u8) -> Outcome {
        let op = AioOp::Write {
            off: io.offset,
            buf: addr,
            len: io.len as usize,
        };
        self.start(io.tag, STAGE_MAIN, op)
    }

    /// A copy between request `io`'s pages and its staging slot completed with `res`.
    fn copied(&mut self, io: &IoDesc, step: u16, res: i32) -> Outcome {
        if res != io.len as i32 {
            log::error!(
                "rbd q{} tag {}: copying {} bytes {} the staging slot gave {res}",
                self.qid,
                io.tag,
                io.len,
                if step == STEP_STAGE_WRITE {
                    "into"
                } else {
                    "out of"
                }
            );
            return Outcome::Done(-libc::EIO);
        }
        match step {
            STEP_STAGE_WRITE => match self.slot_addr(io.tag, io.len as usize) {
                Some(addr) => self.write_from(io, addr),
                None => Outcome::Done(-libc::EIO),
            },
            _ => Outcome::Done(res),
        }
    }

    fn reported(&mut self, id: u64, res: i64, ring: &mut dyn Ring) {
        self.inflight = self.inflight.saturating_sub(1);
        let (tag, stage) = split_id(id);
        let Some(t) = self.tags.get(usize::from(tag)).copied() else {
            log::error!("rbd q{}: a result for unknown tag {tag}", self.qid);
            return;
        };
        if res < 0 {
            if res == -i64::from(libc::ETIMEDOUT) && self.timeouts.admit(Instant::now()) {
                log::warn!(
                    "rbd q{}: requests time out: no OSD answered within the OSD timeout \
                     (--osd-timeout); they fail with EIO (the cluster's health says why)",
                    self.qid
                );
            }
            let denied = [libc::EACCES, libc::EPERM].map(|e| -i64::from(e));
            if denied.contains(&res) && self.denials.admit(Instant::now()) {
                // Seen after a crash with a user whose mon caps are only `allow r`: the
                // first write must take the image's lock from the dead client, and
                // breaking it means blocklisting that client, which `profile rbd` allows.
                log::error!(
                    "rbd q{}: the cluster refuses requests to this device's Ceph user \
                     (errno {}); they fail with an IO error. Check the user's caps \
                     ('ceph auth get client.USER'): writes after a crash take the \
                     image's lock from the dead client, which needs mon 'profile rbd'",
                    self.qid,
                    -res
                );
            }
            log::debug!(
                "rbd q{} tag {tag}: librbd failed the request: errno {}",
                self.qid,
                -res
            );
            return ring.finish(tag, device_errno(res));
        }
        if stage == STAGE_MAIN && t.fua {
            if let Outcome::Done(e) = self.start(tag, STAGE_FUA_FLUSH, AioOp::Flush) {
                ring.finish(tag, e);
            }
            return;
        }
        if stage == STAGE_MAIN && t.staged_read {
            return self.unstage_read(tag, t.len, ring);
        }
        ring.finish(tag, t.len as i32);
    }
}

/// The result a request fails with for librbd's error `res` (< 0). An OSD that did not
/// answer within the OSD timeout is ETIMEDOUT in librados, which the block layer would
/// hand to applications as ETIMEDOUT; a disk that cannot reach its data is an IO error
/// (EIO), as with every other target. The rest pass as they are (ENOSPC, EROFS...).
fn device_errno(res: i64) -> i32 {
    match res.clamp(i64::from(i32::MIN), -1) as i32 {
        e if e == -libc::ETIMEDOUT => -libc::EIO,
        e => e,
    }
}

impl QueueTarget for RbdQueue {
    fn start(&mut self, ring: &mut dyn Ring) {
        self.arm(ring);
    }

    fn settle(&mut self) -> bool {
        self.wait_for_librbd()
    }

    /// The request slots of the zero-copy modes: not registered, reached through their
    /// memfd.
    fn staging_buffer(&mut self) -> Option<&mut Staging> {
        self.staging.as_mut()
    }

    fn read(&mut self, io: &IoDesc, buf: IoBuf, _: &mut dyn Ring) -> Outcome {
        let Some((addr, staged)) = self.addr(io.tag, buf) else {
            return Outcome::Done(-libc::EOPNOTSUPP);
        };
        self.state(io, true, false, staged);
        let op = AioOp::Read {
            off: io.offset,
            buf: addr,
            len: io.len as usize,
        };
        self.start(io.tag, STAGE_MAIN, op)
    }

    fn write(&mut self, io: &IoDesc, buf: IoBuf, ring: &mut dyn Ring) -> Outcome {
        let Some((addr, staged)) = self.addr(io.tag, buf) else {
            return Outcome::Done(-libc::EOPNOTSUPP);
        };
        self.state(io, true, self.durable(io), false);
        if !staged {
            return self.write_from(io, addr);
        }
        if !ring.reserve(1, 1) {
            return Outcome::Busy;
        }
        // SAFETY: the slot belongs to this tag until the request completes; librbd gets
        // it only once this copy has completed (`complete`).
        match unsafe {
            ring.push_copy_from_request(io.tag, STEP_STAGE_WRITE, 0, addr, io.len as usize, false)
        } {
            Ok(()) => Outcome::Queued,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Outcome::Busy,
            Err(e) => {
                log::error!(
                    "rbd q{} tag {}: cannot stage the write's data: {e}",
                    self.qid,
                    io.tag
                );
                Outcome::Done(-libc::EIO)
            }
        }
    }

    fn flush(&mut self, io: &IoDesc, _: &mut dyn Ring) -> Outcome {
        self.state(io, false, false, false);
        self.start(io.tag, STAGE_MAIN, AioOp::Flush)
    }

    fn discard(&mut self, io: &IoDesc, _: &mut dyn Ring) -> Outcome {
        self.state(io, false, self.durable(io), false);
        let op = AioOp::Discard {
            off: io.offset,
            len: u64::from(io.len),
        };
        self.start(io.tag, STAGE_MAIN, op)
    }

    fn write_zeroes(&mut self, io: &IoDesc, _: &mut dyn Ring) -> Outcome {
        self.state(io, false, self.durable(io), false);
        let op = AioOp::WriteZeroes {
            off: io.offset,
            len: u64::from(io.len),
        };
        self.start(io.tag, STAGE_MAIN, op)
    }

    /// The eventfd read ([`Owner::Target`]) completed: librbd reported requests; or a
    /// copy between a request's pages and its staging slot did ([`Owner::Request`]).
    fn complete(&mut self, c: Completion, ring: &mut dyn Ring) -> Outcome {
        if let Owner::Request(io, _) = c.owner {
            return self.copied(&io, c.step, c.res);
        }
        if c.step != EVENT_DONE {
            return Outcome::Queued;
        }
        let res = c.res;
        let mut done = std::mem::take(&mut self.done);
        self.sink.take(&mut done);
        for (id, r) in done.drain(..) {
            self.reported(id, r, ring);
        }
        self.done = done;
        if res == -libc::ECANCELED {
            return Outcome::Queued; // the queue is ending
        }
        if res < 0 {
            log::warn!(
                "rbd q{}: reading the completion eventfd: errno {}",
                self.qid,
                -res
            );
        }
        self.arm(ring);
        Outcome::Queued
    }
}

impl Drop for RbdQueue {
    fn drop(&mut self) {
        self.wait_for_librbd();
    }
}

impl RbdQueue {
    /// librbd still holds pointers into the request buffers of what is in flight: wait
    /// (bounded by the OSD timeout, after which librbd fails each request) until it has
    /// reported everything, before the queue frees those buffers. Whether it has.
    fn wait_for_librbd(&mut self) -> bool {
        let until = Instant::now() + self.drain;
        let mut done = Vec::new();
        while self.inflight > 0 && Instant::now() < until {
            self.sink.wait(Duration::from_millis(100), &mut done);
            self.inflight = self.inflight.saturating_sub(done.len());
            done.clear();
        }
        if self.inflight > 0 {
            log::error!(
                "rbd q{}: {} librbd request(s) still unanswered after {} s; their buffers are leaked, not freed",
                self.qid,
                self.inflight,
                self.drain.as_secs()
            );
        }
        self.inflight == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_osd_timeout_is_an_io_error() {
        assert_eq!(device_errno(-i64::from(libc::ETIMEDOUT)), -libc::EIO);
        assert_eq!(device_errno(-i64::from(libc::ENOSPC)), -libc::ENOSPC);
        assert_eq!(device_errno(i64::MIN), i32::MIN);
    }

    #[test]
    fn request_ids_round_trip() {
        for (tag, stage) in [(0, STAGE_MAIN), (65535, STAGE_FUA_FLUSH), (7, STAGE_MAIN)] {
            assert_eq!(split_id(request_id(tag, stage)), (tag, stage));
        }
    }
}
