//! One hardware queue: a thread with its own io_uring that fetches block requests from
//! the ublk driver, hands them to the device's target, and commits the results.
//!
//! Life of a tag: `FETCH_REQ` is posted once per tag at start. When its CQE arrives the
//! driver has written the request into the descriptor table; the queue dispatches it to
//! the target, which completes it at once or through SQEs of its own on this ring. The
//! result goes back with `COMMIT_AND_FETCH_REQ`, which also waits for the tag's next
//! request. The queue ends when the driver aborts every command (the device stopped), or
//! when the daemon asks it to stop and no request is left in the target. A queue asked
//! to detach (a hand-over to the next ublkd) also stops taking new requests: the driver
//! holds them and reissues them to its successor (user recovery).
//!
//! That is the per-tag command path. With UBLK_F_BATCH_IO the driver takes the same
//! steps in batches instead: every tag is registered at once, lists of delivered tags
//! arrive through a multishot fetch, and each loop turn commits all its results in one
//! command. The loop sees one interface for both ([`commands::Commands`]).
//!
//! Buffer modes are the queue's business; targets only see an [`IoBuf`]:
//! - `copy`: per-tag daemon buffers, passed by address in FETCH/COMMIT (`IoBuf::User`).
//! - `fixed`: the same buffers, also registered in the ring (buffer index = tag;
//!   `IoBuf::Fixed`).
//! - `zc` and `auto-zc` give the target the request's own pages (`IoBuf::Pages`).
//! - `zc`: a sparse buffer table; before a target's first SQE for a request, the queue
//!   links UBLK_U_IO_REGISTER_IO_BUF (the request's pages at index = tag) in front of
//!   it, and the commit goes out hard-linked behind UBLK_U_IO_UNREGISTER_IO_BUF. A
//!   target that never touches the data (null) causes no registration at all.
//! - `auto-zc`: the driver registers the request's pages at index = tag before it
//!   delivers the request and unregisters them at commit; when it cannot, it says so
//!   (UBLK_IO_F_NEED_REG_BUF) and the queue registers by hand as in `zc`.
//!
//! The buffer table has one slot more, index `depth`, for a target's staging buffer
//! (a network target's receive buffer, [`QueueTarget::staging_buffer`]); setting up the
//! ring, its files and buffers, and taking them down is in `setup`. The ring a target
//! pushes on, the registrations it puts in front, and the copies into and out of request
//! buffers it makes for targets are in `target_ring`.
//!
//! Zero-copy sends (IORING_OP_SEND_ZC) a target pushes complete twice: the result, with
//! IORING_CQE_F_MORE, goes to the target; the notification (IORING_CQE_F_NOTIF) that the
//! network no longer holds the buffer stays here. A request whose buffer is still held
//! that way is committed only when the last of its notifications has arrived.

mod batch;
mod commands;
mod failures;
mod handle;
mod per_tag;
mod placement;
mod retired;
mod setup;
mod stats;
mod target_ring;
mod uapi;
mod user_data;

pub use handle::{request_dump, spawn, QueueHandle};
pub use placement::{allowed_cpus, place, Placement};
pub use retired::Retired;
pub use stats::QueueCounters;

use commands::Commands;
use handle::DUMP_GENERATION;
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use target_ring::{io_buf, StagingArea, TagState, TargetRing};
use ublkd_proto::BufferMode;
use ublkd_targets::{
    dispatch, BlockOp, Completion, IoBuf, IoDesc, Outcome, Owner, QueueContext, QueueTarget, Ring,
    Target,
};
use user_data::{decode, encode, Kind};

/// What a queue thread needs to know about its device.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    pub dev_id: u32,
    pub qid: u16,
    pub depth: u16,
    /// Largest request in bytes (the device's max_io_buf_bytes).
    pub max_io_bytes: u32,
    /// The open `/dev/ublkcN`; it outlives the queue thread.
    pub cdev_fd: RawFd,
    pub buffer: BufferMode,
    /// The device has UBLK_F_USER_COPY: the target may write into requests' pages
    /// through `cdev_fd`.
    pub user_copy: bool,
    /// The device has UBLK_F_BATCH_IO: the batch command path (see [`commands`]).
    pub batch: bool,
}

/// Taken down by [`Queue::close`] (in `setup`), never simply dropped: the buffers its
/// commands point into must outlive the thread.
struct Queue {
    ring: IoUring,
    spec: QueueSpec,
    handler: Box<dyn QueueTarget>,
    /// Keeps the target's registered files open for as long as the ring.
    _target: Arc<dyn Target>,
    iods: uapi::IoDescTable,
    /// Daemon-owned buffers (copy and fixed modes).
    bufs: Option<uapi::BufferArena>,
    tags: Vec<TagState>,
    /// Tags whose target call returned Busy: called again after the next reap.
    retry: VecDeque<u16>,
    /// The commands that fetch requests and commit results (per tag or batched).
    cmds: Commands,
    /// Tags the driver delivered in the completion being handled.
    delivered: Vec<u16>,
    counters: Arc<QueueCounters>,
    stop: Arc<AtomicBool>,
    /// Hand-over to a later ublkd: take no new requests (see `request_detach`).
    detach: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
    wake_buf: Box<u64>,
    /// The last state dump generation this queue answered ([`request_dump`]).
    dumped: u64,
    /// (user_data, result, flags) of the completions being handled.
    cqes: Vec<(u64, i32, u32)>,
    /// Requests the target finished by tag during a call (see `Ring::finish`).
    finished: Vec<(u16, i32)>,
    /// Requests the target holds.
    in_target: usize,
    /// Fault injection: fail as on a ring error after this many requests.
    fail_after: Option<u64>,
    /// The target's staging buffer, registered at index `depth`.
    staging: Option<StagingArea>,
    /// Failed requests in the log, rate-limited.
    failures: failures::FailureLog,
}

/// Makes sure the submission queue has room for `n` more SQEs, flushing it once.
fn ensure_room(ring: &mut IoUring, n: usize) -> bool {
    let room = |ring: &mut IoUring| {
        let sq = ring.submission();
        sq.capacity() - sq.len() >= n
    };
    if room(ring) {
        return true;
    }
    if let Err(e) = ring.submit() {
        log::debug!("flushing a full submission queue failed: {e}");
        return false;
    }
    room(ring)
}

/// Pushes SQEs that must go in together (a linked chain), or none of them.
///
/// # Safety
/// Memory the SQEs point to must stay valid until their completions are reaped.
unsafe fn push_all(ring: &mut IoUring, sqes: &[squeue::Entry]) -> bool {
    if !ensure_room(ring, sqes.len()) {
        return false;
    }
    // SAFETY: forwarded from the caller; room for all of them was checked above.
    unsafe { ring.submission().push_multiple(sqes) }.is_ok()
}

/// The uring_cmd that registers (or unregisters) request `tag`'s pages at index `tag`.
fn buf_cmd(op: u32, kind: Kind, qid: u16, tag: u16) -> squeue::Entry {
    uapi::io_cmd_sqe(op, qid, tag, 0, u64::from(tag))
        .user_data(encode(kind, tag, 0))
        .flags(squeue::Flags::IO_HARDLINK | squeue::Flags::SKIP_SUCCESS)
}

impl Queue {
    fn io_buf(&self, io: &IoDesc) -> IoBuf {
        io_buf(self.spec.buffer, self.bufs.as_ref(), io)
    }

    fn arm_wake(&mut self) -> bool {
        let buf: *mut u64 = &mut *self.wake_buf;
        let sqe = opcode::Read::new(types::Fd(self.wake.as_raw_fd()), buf.cast(), 8)
            .build()
            .user_data(encode(Kind::Wake, 0, 0));
        // SAFETY: wake_buf is boxed and lives until the kernel has released
        // the char device (`Retired`).
        unsafe { push_all(&mut self.ring, &[sqe]) }
    }

    /// Hands every tag to the driver (FETCH_REQ each, or PREP_IO_CMDS and the
    /// fetches in batch mode).
    fn fetch_all(&mut self) -> io::Result<()> {
        self.cmds.start(&mut self.ring)?;
        if !self.arm_wake() {
            return Err(io::Error::other(
                "submission queue full while arming the wake-up",
            ));
        }
        self.call_target(|t, ring| t.start(ring));
        self.ring.submit()?;
        Ok(())
    }

    /// Logs what the queue holds (see [`request_dump`]).
    fn dump(&self) {
        let (dev, q) = (self.spec.dev_id, self.spec.qid);
        let in_flight: Vec<String> = self
            .tags
            .iter()
            .enumerate()
            .filter_map(|(tag, t)| {
                t.io.map(|io| {
                    format!(
                        "{tag}:{:?}{}{}",
                        io.op,
                        if t.needs_reg { "+needs-reg" } else { "" },
                        if t.registered { "+registered" } else { "" }
                    )
                })
            })
            .collect();
        log::warn!(
            "dev {dev} queue {q}: state: {} in the target, {} to retry, stop {} detach {}; {}; \
             tags in flight: [{}]",
            self.in_target,
            self.retry.len(),
            self.stop_requested(),
            self.detaching(),
            self.cmds.describe(),
            in_flight.join(" ")
        );
    }

    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn finished(&self) -> bool {
        self.in_target == 0 && self.cmds.idle() && (!self.cmds.armed() || self.stop_requested())
    }

    fn run(&mut self) -> io::Result<()> {
        loop {
            if self
                .fail_after
                .is_some_and(|n| self.counters.completed() >= n)
            {
                return Err(io::Error::other(
                    "injected fault (--inject-fault queue-error)",
                ));
            }
            if self.failures.holding() {
                self.failures.tick(std::time::Instant::now());
            }
            self.flush_backlog();
            self.call_target(|t, ring| t.end_turn(ring));
            let take_new = !self.stop_requested();
            self.cmds.flush(&mut self.ring, take_new);
            if self.finished() {
                self.ring.submit()?;
                return Ok(());
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is full: reap below, then submit again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            self.cqes.clear();
            self.cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for i in 0..self.cqes.len() {
                let (data, res, flags) = self.cqes[i];
                self.handle_cqe(data, res, flags);
            }
        }
    }

    fn detaching(&self) -> bool {
        self.detach.load(Ordering::Acquire)
    }

    /// Leaves a request to the driver, uncompleted: with UBLK_F_USER_RECOVERY_REISSUE
    /// it gives the request to the next ublkd once that one has recovered the device.
    fn leave_to_successor(&mut self, tag: u16) {
        if self.tags[usize::from(tag)].io.take().is_some() {
            self.in_target -= 1;
        }
    }

    /// Retries target calls that returned Busy.
    fn flush_backlog(&mut self) {
        if self.detaching() {
            // Nothing of these reached the target yet.
            while let Some(tag) = self.retry.pop_front() {
                self.leave_to_successor(tag);
            }
        }
        for _ in 0..self.retry.len() {
            let Some(tag) = self.retry.pop_front() else {
                break;
            };
            self.dispatch(tag);
        }
    }

    fn handle_cqe(&mut self, data: u64, res: i32, flags: u32) {
        let (dev, q) = (self.spec.dev_id, self.spec.qid);
        let Some(ud) = decode(data) else {
            log::error!(
                "dev {dev} queue {q}: completion with unknown user_data {data:#x} (res {res})"
            );
            return;
        };
        if usize::from(ud.tag) >= self.tags.len() {
            log::error!(
                "dev {dev} queue {q}: completion for tag {} beyond depth",
                ud.tag
            );
            return;
        }
        match ud.kind {
            kind if Commands::owns(kind) => {
                self.delivered.clear();
                self.cmds.completed(ud, res, flags, &mut self.delivered);
                for i in 0..self.delivered.len() {
                    let tag = self.delivered[i];
                    self.deliver(tag);
                }
            }
            Kind::Target if io_uring::cqueue::notif(flags) => self.notif_done(ud.tag),
            Kind::Target => {
                if io_uring::cqueue::more(flags) {
                    // A zero-copy send: its notification follows.
                    self.tags[usize::from(ud.tag)].notifs += 1;
                }
                self.target_done(ud.tag, ud.step, res)
            }
            Kind::Wake => {
                let generation = DUMP_GENERATION.load(Ordering::Acquire);
                if generation != self.dumped {
                    self.dumped = generation;
                    self.dump();
                }
                if !self.stop_requested() && !self.arm_wake() {
                    log::error!("dev {dev} queue {q}: cannot re-arm the wake-up");
                }
            }
            Kind::RegBuf => {
                // Only failures complete (SKIP_SUCCESS); the target's SQE behind it fails
                // too and the request completes with that error. Cancelled (an earlier
                // SQE of the target's chain failed) is not an error of its own; the
                // target may try again, so the next SQE registers again.
                if res != -libc::ECANCELED {
                    log::error!(
                        "dev {dev} queue {q} tag {}: registering the request buffer failed: {}",
                        ud.tag,
                        io::Error::from_raw_os_error(-res)
                    );
                }
                let t = &mut self.tags[usize::from(ud.tag)];
                t.registered = false;
                t.needs_reg = t.io.is_some();
            }
            Kind::TargetEvent => {
                let done = Completion {
                    owner: Owner::Target,
                    step: ud.step,
                    res,
                };
                self.call_target(|t, ring| t.complete(done, ring));
            }
            kind => log::error!("dev {dev} queue {q}: unexpected {kind:?} completion"),
        }
    }

    /// The driver delivered a request on `tag`: it goes to the target, or, while the
    /// queue hands over, stays with the driver for the next ublkd.
    fn deliver(&mut self, tag: u16) {
        let (dev, q) = (self.spec.dev_id, self.spec.qid);
        let Some(t) = self.tags.get(usize::from(tag)) else {
            log::error!("dev {dev} queue {q}: the driver delivered tag {tag}, beyond depth");
            return;
        };
        if t.io.is_some() {
            log::error!("dev {dev} queue {q} tag {tag}: delivered while still in flight");
            return;
        }
        if self.detaching() {
            log::trace!("dev {dev} queue {q} tag {tag}: left for the next ublkd");
            return;
        }
        let (io, op_flags) = self.iods.get(tag);
        let carries_data = io.len > 0 && matches!(io.op, BlockOp::Read | BlockOp::Write);
        let needs_reg = carries_data
            && match self.spec.buffer {
                BufferMode::Zc => true,
                BufferMode::AutoZc => op_flags & uapi::IO_F_NEED_REG_BUF != 0,
                BufferMode::Copy | BufferMode::Fixed => false,
            };
        self.counters.started(&io);
        let t = &mut self.tags[usize::from(tag)];
        t.io = Some(io);
        t.needs_reg = needs_reg;
        t.registered = false;
        self.in_target += 1;
        self.dispatch(tag);
    }

    fn dispatch(&mut self, tag: u16) {
        let Some(io) = self.tags[usize::from(tag)].io else {
            return;
        };
        let buf = self.io_buf(&io);
        let outcome = self.call_target(|t, ring| dispatch(t, &io, buf, ring));
        self.settle(tag, outcome);
    }

    /// Calls the target with the queue's ring, then commits what it finished by tag.
    fn call_target<R>(&mut self, f: impl FnOnce(&mut dyn QueueTarget, &mut dyn Ring) -> R) -> R {
        let mut ring = TargetRing {
            ring: &mut self.ring,
            tags: &mut self.tags,
            finished: &mut self.finished,
            qid: self.spec.qid,
            buffer: self.spec.buffer,
            bufs: self.bufs.as_ref(),
            user_copy: self.spec.user_copy.then_some(self.spec.cdev_fd),
            staging: self.staging,
        };
        let r = f(self.handler.as_mut(), &mut ring);
        while let Some((tag, res)) = self.finished.pop() {
            if self
                .tags
                .get(usize::from(tag))
                .is_some_and(|t| t.io.is_some())
            {
                self.commit(tag, res);
            } else {
                log::error!(
                    "dev {} queue {} tag {tag}: target finished a request that is not in flight",
                    self.spec.dev_id,
                    self.spec.qid
                );
            }
        }
        r
    }

    fn target_done(&mut self, tag: u16, step: u16, res: i32) {
        let Some(io) = self.tags[usize::from(tag)].io else {
            log::error!(
                "dev {} queue {} tag {tag}: target completion with no request",
                self.spec.dev_id,
                self.spec.qid
            );
            return;
        };
        let done = Completion {
            owner: Owner::Request(io, self.io_buf(&io)),
            step,
            res,
        };
        let outcome = self.call_target(|t, ring| t.complete(done, ring));
        self.settle(tag, outcome);
    }

    fn settle(&mut self, tag: u16, outcome: Outcome) {
        match outcome {
            Outcome::Done(res) => self.commit(tag, res),
            Outcome::Queued => {}
            Outcome::Busy => self.retry.push_back(tag),
        }
    }

    fn commit(&mut self, tag: u16, res: i32) {
        let Some(io) = self.tags[usize::from(tag)].io.take() else {
            return;
        };
        self.counters.finished(&io, res);
        if res < 0 {
            self.failures.failed(tag, &io, res);
        }
        if self.tags[usize::from(tag)].notifs > 0 {
            // The network still holds the buffer (zero-copy send): commit on the last
            // notification.
            self.tags[usize::from(tag)].deferred = Some(res);
            return;
        }
        self.in_target -= 1;
        self.send_commit(tag, res);
    }

    fn send_commit(&mut self, tag: u16, res: i32) {
        let registered = std::mem::take(&mut self.tags[usize::from(tag)].registered);
        self.cmds.commit(&mut self.ring, tag, res, registered);
    }

    /// A zero-copy send's notification: its buffer is free again.
    fn notif_done(&mut self, tag: u16) {
        let t = &mut self.tags[usize::from(tag)];
        t.notifs = t.notifs.saturating_sub(1);
        if t.notifs > 0 {
            return;
        }
        if let Some(res) = t.deferred.take() {
            self.in_target -= 1;
            self.send_commit(tag, res);
        }
    }
}
