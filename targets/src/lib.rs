//! ublkd targets and the one interface between the queue loop and them.
//!
//! The queue loop (in the daemon) owns the io_uring, the ublk commands and the buffers.
//! For every block request it calls [`dispatch`], which calls one method of the queue's
//! [`QueueTarget`]. A target either completes the request at once ([`Outcome::Done`]),
//! or pushes SQEs onto the queue's ring through [`Ring`] and returns
//! [`Outcome::Queued`]. Every completion of a target's SQE, whether it was pushed for a
//! request or for the target as a whole, comes back through one method,
//! [`QueueTarget::complete`], told whose it is ([`Owner`]). A target that cannot get
//! ring space returns [`Outcome::Busy`] and the queue retries after its next reap.
//!
//! The queue owns the request buffers: it registers a request's pages in the zero-copy
//! modes (counting the SQEs that takes, see [`Ring::reserve`]) and copies data into or
//! out of any request's buffer for targets that need to ([`Ring::copy_to_request`]).

pub mod fsfreeze;
mod io;
pub mod r#loop;
pub mod nbd;
pub mod null;
pub mod rbd;
mod staging;
#[cfg(test)]
#[path = "tests/ring.rs"]
mod test_ring;
mod thread;
mod throttle;

pub use io::{BlockOp, IoBuf, IoDesc, IoFlags};
pub use staging::Staging;
pub use thread::io_flusher;
pub use throttle::Throttle;
pub use ublkd_proto::BackingId;

use io_uring::squeue;
use std::fmt;

/// What the queue loop should do with a request after a target call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Complete the request now: bytes transferred (>= 0) or a negative errno.
    Done(i32),
    /// The target pushed SQEs; it will return `Done` from a later `complete` call.
    Queued,
    /// No ring space now; call the same method again after the next reap.
    Busy,
}

/// Whose SQE a completion belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// An SQE pushed with [`Ring::push`] for this request; `IoBuf` is its buffer.
    Request(IoDesc, IoBuf),
    /// An SQE pushed with [`Ring::push_event`], for the target as a whole (a receive
    /// loop, a timer, an eventfd read).
    Target,
}

/// The completion of one SQE a target pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub owner: Owner,
    /// The label the target gave the SQE when it pushed it.
    pub step: u16,
    /// The CQE's result.
    pub res: i32,
}

/// The submission queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingFull;

impl fmt::Display for RingFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("io_uring submission queue is full")
    }
}

/// The queue's io_uring as a target sees it.
pub trait Ring {
    /// Pushes `sqe` for request `tag`. `step` is the target's own label for this SQE
    /// and comes back with its completion. The SQE's user_data is set by the queue.
    ///
    /// # Safety
    /// Every buffer, file descriptor or struct the SQE points to must stay valid until
    /// its completion has been passed to [`QueueTarget::complete`].
    unsafe fn push(&mut self, tag: u16, step: u16, sqe: squeue::Entry) -> Result<(), RingFull>;

    /// Pushes `sqe` on behalf of the target as a whole, not of one request (a network
    /// target's receive loop). Its completion comes back as [`Owner::Target`] with `step`.
    ///
    /// # Safety
    /// What the SQE points to must stay valid until its completion has been passed to
    /// [`QueueTarget::complete`] (or the queue has ended).
    unsafe fn push_event(&mut self, step: u16, sqe: squeue::Entry) -> Result<(), RingFull>;

    /// Completes request `tag` with `result` (bytes or -errno) once the current call
    /// returns: for targets whose answers do not arrive on the request's own SQEs. The
    /// target must have no SQE of that request still in flight.
    fn finish(&mut self, tag: u16, result: i32);

    /// Makes sure the next `sqes` pushes fit in the submission queue without it being
    /// submitted in between (submitting what is already queued if needed), so that a
    /// chain of linked SQEs (IOSQE_IO_LINK) reaches the kernel whole. `requests` is how
    /// many requests' buffers those SQEs touch at most: the queue adds room for the SQEs
    /// it puts in front of them itself (in the zero-copy modes, the registration of a
    /// request's pages before its first SQE). False when there is no room. The default
    /// (a ring that cannot promise this) is false.
    fn reserve(&mut self, sqes: usize, requests: usize) -> bool {
        let _ = (sqes, requests);
        false
    }

    /// Copies `data` into request `tag`'s buffer at byte `offset`: a read's payload that
    /// arrived somewhere else (a network target's receive buffer). The queue reaches the
    /// buffer in every mode: daemon buffers directly, a request's own pages (zc, auto-zc)
    /// through the ublk char device (UBLK_F_USER_COPY, which it enables for targets that
    /// ask, [`Target::copies_in`]; [`QueueContext::user_copy`] says whether it did). An
    /// error means the bytes are not there. No SQE of the request may be writing to the
    /// same bytes. The default (a ring without buffers) fails.
    fn copy_to_request(&mut self, tag: u16, offset: usize, data: &[u8]) -> std::io::Result<()> {
        let _ = (tag, offset, data);
        Err(std::io::ErrorKind::Unsupported.into())
    }

    /// Pushes an SQE that copies `len` bytes of the target's staging buffer (the one
    /// the queue registered, [`QueueTarget::staging_buffer`]), from byte `at`, into
    /// request `tag`'s own pages at byte `offset`, and labels it `step` as [`Ring::push`]
    /// does: its completion comes back for the request, with the bytes copied or
    /// -errno. Only for a request whose buffer is its own pages (zc, auto-zc): a
    /// READ_FIXED of the staging buffer's memfd ([`Staging::file`]) into the request's
    /// registered pages (a kernel memcpy), or where the buffer has no file, in a queue
    /// with user copy, an io_uring WRITE of the staged bytes to the request's user-copy
    /// position on the ublk char device (the driver copies only from user memory, so it
    /// cannot be a WRITE_FIXED from the registered staging buffer). Either way the copy
    /// of [`Ring::copy_to_request`] without a system call per request. Err(Unsupported)
    /// where it does not apply ([`Ring::copy_to_request`] does), Err(WouldBlock) when
    /// the ring is full. The default pushes nothing.
    ///
    /// # Safety
    /// The staging bytes `at..at + len` must stay unchanged until the completion has
    /// been passed to [`QueueTarget::complete`].
    unsafe fn push_staged_copy(
        &mut self,
        tag: u16,
        step: u16,
        offset: usize,
        at: usize,
        len: usize,
    ) -> std::io::Result<()> {
        let _ = (tag, step, offset, at, len);
        Err(std::io::ErrorKind::Unsupported.into())
    }

    /// Pushes an SQE that copies `len` bytes of request `tag`'s own pages (zc, auto-zc),
    /// from byte `offset`, into daemon memory at `into` (a write's payload to be sent
    /// from there), labelled `step` as [`Ring::push`] does: its completion comes back for
    /// the request, with the bytes copied or -errno. Into the target's staging buffer
    /// where that has a file ([`Staging::writer`]) and `into` lies in it: a WRITE_FIXED
    /// of the request's registered pages into the memfd (a kernel memcpy), unless the
    /// copy is small (16 KiB or less) and the queue has user copy; otherwise, in a queue
    /// with user copy, an io_uring READ from the request's user-copy position on the ublk
    /// char device. Either way without a system call per request. With `link` the SQE
    /// carries IOSQE_IO_LINK: the next SQE pushed starts only after this one copied all
    /// `len` bytes, and is cancelled if it did not.
    /// Err(Unsupported) where it does not apply (daemon buffers; no staging file and no
    /// user copy), Err(WouldBlock) when the ring is full. The default pushes nothing.
    ///
    /// # Safety
    /// `into..into + len` must stay valid, and neither read nor written by anybody else,
    /// until the completion has been passed to [`QueueTarget::complete`].
    unsafe fn push_copy_from_request(
        &mut self,
        tag: u16,
        step: u16,
        offset: usize,
        into: *mut u8,
        len: usize,
        link: bool,
    ) -> std::io::Result<()> {
        let _ = (tag, step, offset, into, len, link);
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// Serves the requests of one hardware queue. Lives on that queue's thread.
///
/// When the queue ends, it cancels the SQEs the handler still has in the ring (a
/// receive, an eventfd read) and waits for them, then closes the ring, and only then
/// drops the handler: memory the handler's SQEs point into needs to live only as long
/// as the handler.
pub trait QueueTarget {
    fn read(&mut self, io: &IoDesc, buf: IoBuf, ring: &mut dyn Ring) -> Outcome;
    fn write(&mut self, io: &IoDesc, buf: IoBuf, ring: &mut dyn Ring) -> Outcome;
    fn flush(&mut self, io: &IoDesc, ring: &mut dyn Ring) -> Outcome;
    fn discard(&mut self, io: &IoDesc, ring: &mut dyn Ring) -> Outcome;
    fn write_zeroes(&mut self, io: &IoDesc, ring: &mut dyn Ring) -> Outcome;

    /// The target's staging buffer (a network target's receive buffer) for the queue to
    /// register in the ring's buffer table at [`QueueContext::staging_index`], asked
    /// once, right after the handler is created: the target can then receive into it
    /// with READ_FIXED (the kernel copies into registered pages without a user copy) and
    /// have parts of it copied into requests with [`Ring::push_staged_copy`] (from its
    /// memfd, [`Staging::file`], where it has one). The buffer must live as long as the
    /// handler; the queue closes its ring, and with it the registration, first. A
    /// buffer of request slots ([`Staging::for_requests`]) is not registered, only
    /// reached through its file, by [`Ring::push_staged_copy`] and
    /// [`Ring::push_copy_from_request`]. The default has none.
    fn staging_buffer(&mut self) -> Option<&mut Staging> {
        None
    }

    /// Called once on the queue thread before the first request, to post target-wide
    /// SQEs (a receive loop).
    fn start(&mut self, ring: &mut dyn Ring) {
        let _ = ring;
    }

    /// Called once per turn of the queue loop, after that turn's completions and requests
    /// were handled and before the ring is submitted: a target that collects work during
    /// the turn (a network target's sends) can push it here in one go.
    fn end_turn(&mut self, ring: &mut dyn Ring) {
        let _ = ring;
    }

    /// Called once on the queue thread as the queue ends, before the handler is
    /// dropped: a target whose requests a library holds outside the ring (librbd) waits
    /// here, within its own bound, for the library to let go of them. `false` if it may
    /// still use request memory: the queue then leaks the handler and the request
    /// buffers rather than free memory in use. The default has nothing to wait for.
    fn settle(&mut self) -> bool {
        true
    }

    /// The completion of an SQE this target pushed, for a request or for itself. For a
    /// request, what to do with it next; for the target's own SQEs ([`Owner::Target`])
    /// the outcome means nothing and the queue ignores it (requests answered there are
    /// finished with [`Ring::finish`]). The default completes a request with the CQE's
    /// result.
    fn complete(&mut self, done: Completion, ring: &mut dyn Ring) -> Outcome {
        let _ = ring;
        match done.owner {
            Owner::Request(..) => Outcome::Done(done.res),
            Owner::Target => Outcome::Queued,
        }
    }
}

/// Calls the target method for `io`'s operation. Operations the target interface does not
/// know (zoned commands, WRITE_SAME) complete with -EOPNOTSUPP.
pub fn dispatch(
    target: &mut dyn QueueTarget,
    io: &IoDesc,
    buf: IoBuf,
    ring: &mut dyn Ring,
) -> Outcome {
    match io.op {
        BlockOp::Read => target.read(io, buf, ring),
        BlockOp::Write => target.write(io, buf, ring),
        BlockOp::Flush => target.flush(io, ring),
        BlockOp::Discard => target.discard(io, ring),
        BlockOp::WriteZeroes => target.write_zeroes(io, ring),
        BlockOp::Other(op) => {
            log::warn!("tag {}: unsupported ublk op {op}", io.tag);
            Outcome::Done(-libc::EOPNOTSUPP)
        }
    }
}

/// The block device a target exports: what the daemon tells the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceShape {
    /// Size in bytes.
    pub size: u64,
    pub read_only: bool,
    /// The device has a volatile write cache: FLUSH is meaningful.
    pub volatile_cache: bool,
    /// The device honours FUA on writes.
    pub fua: bool,
    pub rotational: bool,
    pub discard: bool,
    pub write_zeroes: bool,
}

/// What a queue tells its target when it creates the target's handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueContext {
    pub qid: u16,
    /// Tags run from 0 to depth - 1.
    pub depth: u16,
    /// Index in the ring's registered file table of the first of [`Target::files`].
    pub first_file: u32,
    /// [`Ring::copy_to_request`], [`Ring::push_staged_copy`] and
    /// [`Ring::push_copy_from_request`] reach requests' own pages (`IoBuf::Pages`) in
    /// this queue (user copy; only for targets that ask, [`Target::copies_in`]).
    /// [`Ring::copy_to_request`] reaches daemon buffers (`User`, `Fixed`) always.
    pub user_copy: bool,
    /// Where in the ring's buffer table the queue registers the handler's
    /// [`QueueTarget::staging_buffer`], if it offers one: None where the ring has no
    /// buffer table for it (a test ring), and the target then uses plain receives.
    pub staging_index: Option<u16>,
    /// Requests come with their own pages as buffers (zc, auto-zc, `IoBuf::Pages`), not
    /// with daemon buffers: a target that needs the data in process memory stages it
    /// ([`Staging::for_requests`]).
    pub own_pages: bool,
    /// The most bytes one request carries.
    pub max_io_bytes: u32,
}

/// What a size watch calls when the backend's size may have changed
/// ([`Target::watch_size`]).
pub type SizeNotice = Box<dyn Fn() + Send + Sync>;

/// A size watch: dropping it ends the watch.
pub type SizeWatch = Box<dyn Send>;

/// Where a device is, for [`Target::watch_quiesce`].
#[derive(Debug, Clone)]
pub struct QuiesceSpot {
    /// `/dev/ublkb<dev_id>`.
    pub device: String,
    pub dev_id: u32,
    /// A file (its folder made as needed) that notes what is quiesced while it is, and
    /// is gone otherwise: a freeze outlives the process that made it (the kernel keeps
    /// it), so the next daemon undoes what a crashed one left.
    pub marker: std::path::PathBuf,
}

/// A target's watch on its backend ([`Target::watch_quiesce`]): dropping it ends it.
pub type Watch = Box<dyn Send>;

/// A device's backend: its shape and one [`QueueTarget`] per hardware queue.
pub trait Target: Send + Sync {
    /// Short name: `null`, `loop`, `nbd`.
    fn name(&self) -> &'static str;
    fn shape(&self) -> DeviceShape;
    /// Facts for `ublkctl show`, as (name, value).
    fn details(&self) -> Vec<(String, String)>;
    /// Files every queue registers in its ring, in this order, from
    /// [`QueueContext::first_file`] on; they stay open as long as the target lives.
    fn files(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }
    /// Whether the target wants the queue to copy data into and out of requests' pages
    /// in the zero-copy modes ([`Ring::copy_to_request`], [`QueueContext::user_copy`]):
    /// a network target that receives many small replies in one buffer.
    fn copies_in(&self) -> bool {
        false
    }
    /// The handler for one queue, created on that queue's thread.
    fn queue(&self, ctx: QueueContext) -> std::io::Result<Box<dyn QueueTarget>>;

    /// The most bytes one read or write may carry, when the backend has a limit below
    /// the daemon's own (an NBD server's maximum block size).
    fn max_io_bytes(&self) -> Option<u32> {
        None
    }

    /// The request size the backend serves best, when it says (an NBD server's
    /// preferred block size): the device's optimal IO size.
    fn optimal_io_bytes(&self) -> Option<u32> {
        None
    }

    /// The target's own counters for `ublkctl stats`, as (name, value), each counting
    /// up from the device's start (an nbd device's `reconnects`).
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// `ublkctl resize`: the size in bytes the device of `current` bytes is to have,
    /// given the size asked for (`None`: whatever the backend has now) and whether the
    /// backend may be grown to it. The daemon then tells the kernel
    /// (UBLK_U_CMD_UPDATE_SIZE). An error is one line saying why not and what to do.
    fn resize(
        &self,
        current: u64,
        requested: Option<u64>,
        grow_backend: bool,
    ) -> Result<u64, String> {
        let _ = (current, requested, grow_backend);
        Err(format!("a {} device cannot be resized", self.name()))
    }

    /// Watches the backend for size changes made outside ublkd (an rbd image resized
    /// with `rbd resize`) and calls `notice` after each; the daemon then asks
    /// [`Target::resize`] for the size now (no size requested, no growing) and resizes
    /// the device to it. `notice` may run on any thread and must not block. The watch
    /// ends when the returned handle is dropped, and `notice` is not called after.
    /// `None`: the backend changes size only through `ublkctl resize` (the default).
    fn watch_size(&self, notice: SizeNotice) -> Result<Option<SizeWatch>, String> {
        let _ = notice;
        Ok(None)
    }

    /// Once the device is live, starts what quiesces it when its backend takes a
    /// snapshot (an rbd device with `--quiesce`: its file systems are frozen while `rbd
    /// snap create` runs). `None`: nothing to do (the default). Dropping the watch thaws
    /// what it froze and ends it.
    fn watch_quiesce(&self, spot: QuiesceSpot) -> Result<Option<Watch>, String> {
        let _ = spot;
        Ok(None)
    }

    /// Whether the device follows its backend's size ([`Target::watch_size`]): then a
    /// backend that changed size while no ublkd ran is no reason to refuse recovery;
    /// the device is recovered at the size the kernel has and then follows. False (the
    /// default): a backend whose size changed behind ublkd's back stops recovery.
    fn follows_backend_size(&self) -> bool {
        false
    }

    /// The kernel's device (found at recovery) has no volatile write cache, but this
    /// target now says it has one ([`DeviceShape::volatile_cache`]): its backend came
    /// to complete writes before they are durable while no ublkd ran. The kernel sends
    /// no FLUSH to such a device, so the target must make every write durable before it
    /// completes; true if it does from now on. False (the default): it cannot.
    fn write_through(&self) -> bool {
        false
    }

    /// The device is being deleted and the kernel drains it (in-flight requests and
    /// the writeback of dirty pages) while the queues keep serving. A target that may
    /// wait on something slow calls [`Target::abort`] on itself when waiting is no
    /// longer worth it (a server that is unreachable); `abort` also follows once the
    /// kernel has stopped the device. The default: nothing to watch.
    fn stopping(&self) {}

    /// The device is being deleted: stop waiting for anything that may never come (a
    /// server that is down), so in-flight requests can complete.
    fn abort(&self) {}

    /// Which file or block device the target serves from, for targets backed by one
    /// (loop): recorded when the device is added and compared when it is restored.
    fn backing_id(&self) -> Option<BackingId> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records which method was called.
    #[derive(Default)]
    struct Recorder(Vec<&'static str>);

    impl QueueTarget for Recorder {
        fn read(&mut self, io: &IoDesc, _: IoBuf, _: &mut dyn Ring) -> Outcome {
            self.0.push("read");
            Outcome::Done(io.len as i32)
        }
        fn write(&mut self, _: &IoDesc, _: IoBuf, _: &mut dyn Ring) -> Outcome {
            self.0.push("write");
            Outcome::Queued
        }
        fn flush(&mut self, _: &IoDesc, _: &mut dyn Ring) -> Outcome {
            self.0.push("flush");
            Outcome::Busy
        }
        fn discard(&mut self, _: &IoDesc, _: &mut dyn Ring) -> Outcome {
            self.0.push("discard");
            Outcome::Done(0)
        }
        fn write_zeroes(&mut self, _: &IoDesc, _: &mut dyn Ring) -> Outcome {
            self.0.push("write_zeroes");
            Outcome::Done(0)
        }
    }

    struct NoRing;
    impl Ring for NoRing {
        unsafe fn push(&mut self, _: u16, _: u16, _: squeue::Entry) -> Result<(), RingFull> {
            Err(RingFull)
        }
        unsafe fn push_event(&mut self, _: u16, _: squeue::Entry) -> Result<(), RingFull> {
            Err(RingFull)
        }
        fn finish(&mut self, _: u16, _: i32) {}
    }

    fn io(op: BlockOp) -> IoDesc {
        IoDesc {
            tag: 3,
            op,
            flags: IoFlags::default(),
            offset: 4096,
            len: 8192,
        }
    }

    #[test]
    fn dispatch_calls_one_method_per_op() {
        let mut t = Recorder::default();
        let buf = IoBuf::None;
        assert_eq!(
            dispatch(&mut t, &io(BlockOp::Read), buf, &mut NoRing),
            Outcome::Done(8192)
        );
        assert_eq!(
            dispatch(&mut t, &io(BlockOp::Write), buf, &mut NoRing),
            Outcome::Queued
        );
        assert_eq!(
            dispatch(&mut t, &io(BlockOp::Flush), buf, &mut NoRing),
            Outcome::Busy
        );
        assert_eq!(
            dispatch(&mut t, &io(BlockOp::Discard), buf, &mut NoRing),
            Outcome::Done(0)
        );
        assert_eq!(
            dispatch(&mut t, &io(BlockOp::WriteZeroes), buf, &mut NoRing),
            Outcome::Done(0)
        );
        assert_eq!(t.0, ["read", "write", "flush", "discard", "write_zeroes"]);
    }

    #[test]
    fn unknown_ops_are_not_supported() {
        let mut t = Recorder::default();
        let out = dispatch(&mut t, &io(BlockOp::Other(13)), IoBuf::None, &mut NoRing);
        assert_eq!(out, Outcome::Done(-libc::EOPNOTSUPP));
        assert!(t.0.is_empty());
    }
}
