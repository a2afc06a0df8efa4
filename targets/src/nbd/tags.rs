//! Per-request bookkeeping of one queue (where each request stands: sent, replied,
//! its result, its SQEs in flight) and the queue's timers (the request timeout's tick
//! and the grace of a deletion).
//!
//! A request finishes when it has a result and none of its own SQEs is in flight: its
//! buffer is the kernel's again only then.

use super::send::payload_len;
use super::step::{EVENT_ABORT, EVENT_TICK};
use crate::{IoBuf, IoDesc, Outcome, Ring};
use io_uring::{opcode, types};
use std::time::Duration;

/// After the device's deletion began, how long unanswered requests may still get an
/// answer before they fail with EIO.
pub(super) const ABORT_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, Default)]
pub(super) struct TagIo {
    pub(super) io: Option<IoDesc>,
    pub(super) buf: Option<IoBuf>,
    /// A read whose payload is received straight into its buffer (`recv::is_direct`).
    direct: bool,
    /// SQEs of this request in flight (on any connection).
    pub(super) sqes: u32,
    /// The request's result, kept until its own SQEs have all completed.
    pub(super) result: Option<i32>,
    /// Its reply header has been seen on the current connection.
    pub(super) replied: bool,
    /// Bytes of a read's payload received.
    pub(super) got: usize,
    /// Times the request was sent again after a connection was lost.
    pub(super) resends: u8,
    /// Its header went out (in a send chain) on the current connection.
    pub(super) sent: bool,
    /// The timeout tick count when the request started waiting for its answer on the
    /// current connection (a clock read per request costs more than it must).
    pub(super) since: u32,
    /// Unanswered when the device's deletion began or at the last abort timer: fails
    /// with EIO at the next one.
    doomed: bool,
    /// Copying part of its payload into the request's pages failed: fails with EIO once
    /// the rest of the payload has been taken off the connection.
    pub(super) copy_failed: bool,
    /// Once its command has succeeded, a flush follows, whose reply completes it
    /// (`durable::Plan::SendThenFlush`).
    then_flush: bool,
    /// That flush is what goes out, or is out, for it now: no payload follows.
    flushing: bool,
}

impl TagIo {
    /// In this target and without an answer yet.
    fn unanswered(&self) -> bool {
        self.io.is_some() && self.result.is_none()
    }

    /// Bytes that follow its header on the wire: a write's data, unless its flush is
    /// what goes out.
    pub(super) fn payload_len(&self) -> usize {
        match self.io {
            Some(io) if !self.flushing => payload_len(&io),
            _ => 0,
        }
    }
}

/// The requests of one queue, by tag.
pub(super) struct Tags {
    slots: Vec<TagIo>,
    /// Requests between start and finish.
    active: usize,
    /// Requests sent on this connection whose reply header has not come, and how many
    /// of them are reads whose payload is received directly (`is_direct`); such reads
    /// waiting to be sent.
    awaiting: usize,
    awaiting_direct: usize,
    queued_direct: usize,
}

impl Tags {
    pub(super) fn new(depth: usize) -> Self {
        Tags {
            slots: vec![TagIo::default(); depth],
            active: 0,
            awaiting: 0,
            awaiting_direct: 0,
            queued_direct: 0,
        }
    }

    pub(super) fn get(&self, tag: u16) -> &TagIo {
        &self.slots[usize::from(tag)]
    }

    pub(super) fn get_mut(&mut self, tag: u16) -> &mut TagIo {
        &mut self.slots[usize::from(tag)]
    }

    /// Requests between start and finish.
    pub(super) fn active(&self) -> usize {
        self.active
    }

    /// Request `io` starts, waiting to be sent, at tick `now`; `direct` as in
    /// `is_direct`; `then_flush`: a flush follows its command.
    pub(super) fn start(
        &mut self,
        io: &IoDesc,
        buf: IoBuf,
        direct: bool,
        then_flush: bool,
        now: u32,
    ) {
        let t = &mut self.slots[usize::from(io.tag)];
        *t = TagIo {
            io: Some(*io),
            buf: Some(buf),
            direct,
            sqes: t.sqes,
            since: now,
            then_flush,
            ..TagIo::default()
        };
        self.active += 1;
        if direct {
            self.queued_direct += 1;
        }
    }

    /// A read whose payload is received straight into its buffer, never through the
    /// staging buffer.
    pub(super) fn is_direct(&self, tag: u16) -> bool {
        let t = self.get(tag);
        t.io.is_some() && t.direct
    }

    /// Reads whose payload is received directly that wait to be sent.
    pub(super) fn queued_direct(&self) -> usize {
        self.queued_direct
    }

    /// `tag`'s header goes out in a send chain.
    pub(super) fn sent(&mut self, tag: u16) {
        self.get_mut(tag).sent = true;
        self.awaiting += 1;
        if self.is_direct(tag) {
            self.awaiting_direct += 1;
            self.queued_direct -= 1;
        }
    }

    /// `tag`'s reply header arrived.
    pub(super) fn replied(&mut self, tag: u16) {
        if self.is_direct(tag) {
            self.awaiting_direct -= 1;
        }
        self.get_mut(tag).replied = true;
        self.awaiting -= 1;
    }

    /// Requests sent on this connection whose reply has not been seen: how many, and
    /// whether one of them is a read whose payload must go straight to its buffer.
    pub(super) fn awaiting(&self) -> (usize, bool) {
        debug_assert_eq!(
            (self.awaiting, self.awaiting_direct > 0),
            {
                let mut n = 0;
                let mut direct = false;
                for (tag, t) in self.slots.iter().enumerate() {
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

    /// `tag`'s command succeeded (at tick `now`): if a flush is to follow it, the tag
    /// waits to send that flush, and its request is returned.
    pub(super) fn flush_next(&mut self, tag: u16, now: u32) -> Option<IoDesc> {
        let t = self.get_mut(tag);
        if !t.then_flush || t.flushing {
            return None;
        }
        t.flushing = true;
        t.sent = false;
        t.replied = false;
        t.since = now;
        t.io
    }

    /// `tag` waits to be sent again on another connection, with its command: the flush
    /// it may have waited for does not cover a write answered on the lost connection
    /// (the server may have lost its cache with it). True if it was at its flush.
    pub(super) fn rewind(&mut self, tag: u16) -> bool {
        std::mem::take(&mut self.get_mut(tag).flushing)
    }

    /// `tag` was in flight on a lost connection and is to be sent again: how many
    /// connections it has been lost with now.
    pub(super) fn unsend(&mut self, tag: u16) -> u8 {
        let t = self.get_mut(tag);
        t.got = 0;
        t.copy_failed = false;
        t.sent = false;
        t.replied = false;
        t.resends += 1;
        t.resends
    }

    /// Nothing is sent on the connection any more; `queued_direct` of the requests
    /// waiting to be sent are direct reads.
    pub(super) fn forget_sent(&mut self, queued_direct: usize) {
        self.awaiting = 0;
        self.awaiting_direct = 0;
        self.queued_direct = queued_direct;
    }

    /// Whether `cookie` names a request that is waiting for its reply.
    pub(super) fn expects_reply(&self, cookie: u64) -> Option<u16> {
        let t = usize::try_from(cookie).ok()?;
        let tag = self.slots.get(t)?;
        (tag.io.is_some() && tag.sent && !tag.replied && tag.result.is_none()).then_some(t as u16)
    }

    /// Records `result` for `tag` and finishes it once none of its SQEs is in flight.
    pub(super) fn settle(&mut self, tag: u16, result: i32, ring: &mut dyn Ring) {
        self.get_mut(tag).result = Some(result);
        if self.get(tag).sqes == 0 {
            if let Some(r) = self.take_result(tag) {
                ring.finish(tag, r);
            }
        }
    }

    fn take_result(&mut self, tag: u16) -> Option<i32> {
        let t = &mut self.slots[usize::from(tag)];
        let r = t.result.take()?;
        if t.io.take().is_some() {
            self.active -= 1;
        }
        Some(r)
    }

    /// One of `tag`'s SQEs completed.
    pub(super) fn sqe_completed(&mut self, tag: u16) {
        let t = self.get_mut(tag);
        t.sqes = t.sqes.saturating_sub(1);
    }

    /// The request's result if it has one and no SQE of it is in flight.
    pub(super) fn take_result_if_idle(&mut self, tag: u16) -> Outcome {
        if self.get(tag).sqes == 0 {
            self.take_result(tag).map_or(Outcome::Queued, Outcome::Done)
        } else {
            Outcome::Queued
        }
    }

    /// Requests that have no answer yet.
    pub(super) fn unanswered(&self) -> Vec<u16> {
        (0..self.slots.len() as u16)
            .filter(|&t| self.get(t).unanswered())
            .collect()
    }

    /// The request that has waited longest for its answer at tick `now`, and since when.
    pub(super) fn oldest(&self, now: u32) -> Option<(u32, IoDesc)> {
        self.slots
            .iter()
            .filter(|t| t.result.is_none())
            .filter_map(|t| Some((t.since, t.io?)))
            .max_by_key(|(since, _)| now.wrapping_sub(*since))
    }

    /// Whether a request doomed at the last abort timer is still unanswered.
    pub(super) fn doomed_left(&self) -> bool {
        self.slots.iter().any(|t| t.doomed && t.unanswered())
    }

    /// Marks every unanswered request: it fails at the next abort timer if still so.
    pub(super) fn doom_unanswered(&mut self) {
        for t in &mut self.slots {
            if t.unanswered() {
                t.doomed = true;
            }
        }
    }

    /// Where the first few requests stand, for the log.
    pub(super) fn describe(&self, s: &mut String) {
        let busy = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, t)| t.io.is_some());
        for (tag, t) in busy.take(8) {
            if let Some(io) = t.io {
                s.push_str(&format!(
                    "; tag {tag}: {:?} {}@{}{} sent {} replied {} result {:?} SQEs {}",
                    io.op,
                    io.len,
                    io.offset,
                    if t.flushing { " (its flush)" } else { "" },
                    t.sent,
                    t.replied,
                    t.result,
                    t.sqes
                ));
            }
        }
    }
}

fn timespec(d: Duration) -> types::Timespec {
    types::Timespec::new()
        .sec(d.as_secs())
        .nsec(d.subsec_nanos())
}

/// The request-timeout tick (`EVENT_TICK`) and the abort grace timer (`EVENT_ABORT`),
/// at most one of each in flight.
pub(super) struct Timers {
    /// Unanswered for this long counts as a lost connection (zero: never).
    pub(super) request_timeout: Duration,
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

impl Timers {
    pub(super) fn new(request_timeout: Duration) -> Self {
        let tick = (request_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(1));
        Timers {
            request_timeout,
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

    /// Timeout ticks so far.
    pub(super) fn now(&self) -> u32 {
        self.ticks
    }

    /// Arms what should run while `active` requests are in the queue: the abort grace
    /// timer once the device's deletion aborts, the tick unless the timeout is zero.
    pub(super) fn arm(&mut self, active: usize, aborting: bool, ring: &mut dyn Ring) {
        if !self.abort_armed && active > 0 && aborting {
            let sqe = opcode::Timeout::new(&*self.abort_ts).build();
            // SAFETY: abort_ts is boxed and owned by this handler; one at a time.
            if unsafe { ring.push_event(EVENT_ABORT, sqe) }.is_ok() {
                self.abort_armed = true;
            }
        }
        if !self.tick_armed && active > 0 && !self.request_timeout.is_zero() {
            let sqe = opcode::Timeout::new(&*self.tick_ts).build();
            // SAFETY: tick_ts is boxed and owned by this handler, which outlives the ring;
            // only one tick is in flight at a time.
            if unsafe { ring.push_event(EVENT_TICK, sqe) }.is_ok() {
                self.tick_armed = true;
            }
        }
    }

    /// The tick fired.
    pub(super) fn ticked(&mut self) {
        self.tick_armed = false;
        self.ticks = self.ticks.wrapping_add(1);
    }

    /// Whether a request waiting since tick `since` has waited the request timeout.
    pub(super) fn expired(&self, since: u32) -> bool {
        self.ticks.wrapping_sub(since) >= self.expire_ticks
    }

    /// The abort grace timer fired.
    pub(super) fn abort_fired(&mut self) {
        self.abort_armed = false;
    }

    /// Whether what is held during deletion may be logged once more (a few times).
    pub(super) fn may_log_outstanding(&mut self) -> bool {
        if self.abort_logged < 4 {
            self.abort_logged += 1;
            true
        } else {
            false
        }
    }
}
