//! One queue's handler of the nbd target, on that queue's io_uring: it starts requests,
//! routes completions to the part whose SQE it was, and decides what the parts report
//! (replies to settle, a connection that broke).
//!
//! - `conn`: the connection, its generation, reconnecting in the background.
//! - `send`: the send chain (which op sends what lives there and in `fixed_send`).
//! - `recv`: the receive side: staging, header matching, payload placement.
//! - `tags`: where each request stands, and the timers.
//!
//! Requests that have no answer within the request timeout count as a lost connection
//! (reconnect and resend); once the device's deletion aborts (see `NbdTarget::stopping`),
//! what is left unanswered fails after a short grace.

use super::conn::{AfterLoss, Broken, Connection, Link, Reconnected};
use super::durable::{Durability, Plan};
use super::fixed_send::PayloadSends;
use super::proto;
use super::recv::{self, Receiver};
use super::send::{payload_len, Pace, SendChain};
use super::step::{split_step, EVENT_ABORT, EVENT_RECV, EVENT_TICK, EVENT_WAKE};
use super::step::{STEP_COPY, STEP_PAYLOAD, STEP_SEND, STEP_STAGE};
use super::tags::{Tags, Timers, ABORT_GRACE};
use crate::{Completion, IoBuf, IoDesc, Outcome, Owner, QueueTarget, Ring, Staging};
use std::collections::VecDeque;
use std::time::Duration;

/// A request that was in flight on this many lost connections fails instead of being
/// sent again: a server that breaks on one request must not cause endless reconnects.
const MAX_RESENDS: u8 = 3;

pub(super) struct NbdQueue {
    conn: Connection,
    tags: Tags,
    timers: Timers,
    send: SendChain,
    recv: Receiver,
    /// The queue copies payloads into and out of requests' own pages (user copy,
    /// `Ring::copy_to_request`).
    user_copy: bool,
    /// How requests are made durable on this server.
    durability: Durability,
}

/// The header of request `io`'s command `cmd`; the cookie is the tag.
fn header(io: &IoDesc, cmd: u16, flags: u16) -> [u8; proto::REQUEST_LEN] {
    // A FLUSH must have offset and length 0 (the NBD spec; nbdkit refuses anything
    // else with EINVAL), whatever position the kernel's flush request carries.
    let (offset, len) = if cmd == proto::CMD_FLUSH {
        (0, 0)
    } else {
        (io.offset, io.len)
    };
    proto::request(flags, cmd, u64::from(io.tag), offset, len)
}

impl NbdQueue {
    pub(super) fn new(
        conn: Connection,
        depth: usize,
        request_timeout: Duration,
        payload_sends: PayloadSends,
        pace: Pace,
        user_copy: bool,
        staging_index: Option<u16>,
    ) -> std::io::Result<Self> {
        Ok(NbdQueue {
            conn,
            tags: Tags::new(depth),
            timers: Timers::new(request_timeout),
            send: SendChain::new(depth, payload_sends, pace, user_copy),
            recv: Receiver::new(user_copy, staging_index)?,
            user_copy,
            durability: Durability::default(),
        })
    }

    /// Makes requests durable on the server as `durability` says.
    pub(super) fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Queues request `io` for sending.
    fn start_request(&mut self, io: &IoDesc, buf: IoBuf) -> Outcome {
        if self.conn.link() == Link::Failed {
            return Outcome::Done(-libc::EIO);
        }
        let (cmd, flags, then_flush) = match self.durability.plan(io) {
            Plan::Send { cmd, flags } => (cmd, flags, false),
            Plan::SendThenFlush { cmd, flags } => (cmd, flags, true),
            Plan::Done(res) => return Outcome::Done(res),
        };
        if payload_len(io) > 0 && buf.len() < payload_len(io) {
            return Outcome::Done(-libc::EIO);
        }
        let direct = recv::is_direct(io, buf, self.user_copy);
        self.tags
            .start(io, buf, direct, then_flush, self.timers.now());
        // Sent with the others of this turn of the queue loop (`end_turn`).
        self.send.enqueue(io.tag, header(io, cmd, flags));
        Outcome::Queued
    }

    /// Starts what can start now: the next send chain, the next receive, the timers.
    /// Called at the end of each turn of the queue loop, so that a chain carries all the
    /// requests that came in during the turn.
    fn kick(&mut self, ring: &mut dyn Ring) {
        let idle = self.send.inflight() == 0 && self.recv.inflight() == 0;
        self.conn.close_old(idle);
        if self.conn.link() != Link::Up {
            return;
        }
        // A worn-out key (kernel TLS) sends the rest of its chain, and no new one: once
        // every request sent has its reply, a new connection takes over.
        let worn = self.send.key_worn_out();
        if worn
            && self.send.inflight() == 0
            && !self.send.mid_chain()
            && self.tags.awaiting().0 == 0
        {
            return self.renew(ring);
        }
        if self.send.ready() && !self.conn.closing_old() && (!worn || self.send.mid_chain()) {
            let staging = self.recv.staging();
            if let Err(b) = self.send.pump(&self.conn, &mut self.tags, staging, ring) {
                self.broken(b, ring);
            }
        }
        if self.recv.inflight() == 0 {
            if let Err(b) = self.recv.post(&mut self.conn, &mut self.tags, ring) {
                self.broken(b, ring);
            }
        }
        self.timers
            .arm(self.tags.active(), self.conn.aborting(), ring);
    }

    /// What a part reported: the connection is lost, or has failed for good.
    fn broken(&mut self, b: Broken, ring: &mut dyn Ring) {
        match b {
            Broken::Lost(why) => self.connection_lost(&why, ring),
            Broken::Failed(why) => self.give_up(&why, ring),
        }
    }

    /// Settles the requests the last receive answered, in the server's order; a
    /// request whose command must be followed by a flush sends that flush next, with
    /// the same cookie.
    fn settle_replies(&mut self, ring: &mut dyn Ring) {
        for r in self.recv.replies() {
            let flush = if r.res >= 0 {
                self.tags.flush_next(r.tag, self.timers.now())
            } else {
                None
            };
            if let Some(io) = flush {
                self.send.enqueue(r.tag, header(&io, proto::CMD_FLUSH, 0));
                continue;
            }
            self.tags.settle(r.tag, r.res, ring);
        }
    }

    /// Requests waiting for their flush go back to their command, to be sent again
    /// on a new connection (`Tags::rewind`).
    fn rewind(&mut self, tags: &VecDeque<u16>) {
        for &tag in tags {
            if !self.tags.rewind(tag) {
                continue;
            }
            let Some(io) = self.tags.get(tag).io else {
                continue;
            };
            if let Plan::SendThenFlush { cmd, flags } = self.durability.plan(&io) {
                self.send.set_header(tag, header(&io, cmd, flags));
            }
        }
    }

    /// The connection broke. Reconnect in the background and resend what has no answer,
    /// or fail it all when reconnecting is off or the device is going away.
    fn connection_lost(&mut self, why: &str, ring: &mut dyn Ring) {
        match self.conn.lost(why) {
            AfterLoss::Nothing => return,
            AfterLoss::GiveUp => return self.give_up(why, ring),
            AfterLoss::Reconnect => {}
        }
        self.recv.reset();
        let mut resend = VecDeque::new();
        for tag in self.tags.unanswered() {
            let resends = self.tags.unsend(tag);
            if resends > MAX_RESENDS {
                log::error!(
                    "{}: tag {tag}: lost with {resends} connections; failing it with EIO",
                    self.conn.uri,
                );
                self.tags.settle(tag, -libc::EIO, ring);
            } else {
                resend.push_back(tag);
            }
        }
        self.rewind(&resend);
        let direct = resend.iter().filter(|&&t| self.tags.is_direct(t)).count();
        self.tags.forget_sent(direct);
        self.send.reset(resend);
        if let Err(why) = self.conn.start_reconnect() {
            self.give_up(&why, ring);
        }
    }

    /// The kernel TLS session's send key has encrypted all it may
    /// (`SendChain::key_worn_out`) and nothing sent waits for its reply: a new
    /// connection, with new keys, takes the requests waiting to be sent; none of them
    /// counts as resent.
    fn renew(&mut self, ring: &mut dyn Ring) {
        let why = format!(
            "the TLS session has sent about {} records, the most its key may encrypt",
            self.send.records()
        );
        match self.conn.renew(&why) {
            AfterLoss::Nothing => return,
            AfterLoss::GiveUp => return self.give_up(&why, ring),
            AfterLoss::Reconnect => {}
        }
        self.recv.reset();
        let queued = self.send.queued().clone();
        self.rewind(&queued);
        let direct = queued.iter().filter(|&&t| self.tags.is_direct(t)).count();
        self.tags.forget_sent(direct);
        self.send.reset(queued);
        if let Err(why) = self.conn.start_reconnect() {
            self.give_up(&why, ring);
        }
    }

    /// The connection is gone for good: fail every request on it and every later one.
    fn give_up(&mut self, why: &str, ring: &mut dyn Ring) {
        self.conn.give_up(why);
        self.send.clear();
        self.tags.forget_sent(0);
        self.recv.reset();
        for tag in self.tags.unanswered() {
            self.tags.settle(tag, -libc::EIO, ring);
        }
    }

    /// The reconnect thread is done: use the new socket and resend, or give up.
    fn reconnected(&mut self, ring: &mut dyn Ring) {
        match self.conn.take_reconnected() {
            Reconnected::Nothing => {}
            Reconnected::Up => {
                let now = self.timers.now();
                for &tag in self.send.queued() {
                    self.tags.get_mut(tag).since = now;
                }
                log::info!(
                    "{}: reconnected; resending {} request(s)",
                    self.conn.uri,
                    self.send.queued().len()
                );
            }
            Reconnected::GaveUp(why) => self.give_up(&why, ring),
        }
    }

    /// The eventfd fired: a reconnect finished, or the device is being deleted.
    fn woken(&mut self, res: i32, ring: &mut dyn Ring) {
        if res < 0 && res != -libc::EINTR && res != -libc::EAGAIN {
            return; // the ring is going away
        }
        self.reconnected(ring);
        if self.conn.aborting() {
            self.log_outstanding();
            if self.conn.link() == Link::Reconnecting {
                self.give_up("the device is being deleted", ring);
            }
            self.tags.doom_unanswered();
        }
        // With the connection up, `kick` arms the abort grace timer.
        self.conn.arm_wake(ring);
    }

    /// The request-timeout tick: has the oldest unanswered request waited too long?
    fn tick(&mut self, ring: &mut dyn Ring) {
        self.timers.ticked();
        if self.conn.link() != Link::Up {
            return;
        }
        let Some((since, io)) = self.tags.oldest(self.timers.now()) else {
            return;
        };
        if self.timers.expired(since) {
            let why = format!(
                "no reply within the request timeout ({} s) to a {:?} of {} bytes at offset {}: the server is not answering",
                self.timers.request_timeout.as_secs_f32(),
                io.op,
                io.len,
                io.offset
            );
            self.connection_lost(&why, ring);
        }
    }

    /// The abort grace timer: what was unanswered at the last one and still is fails.
    fn abort_timer(&mut self, ring: &mut dyn Ring) {
        self.timers.abort_fired();
        let stuck = self.tags.doomed_left();
        self.tags.doom_unanswered();
        self.log_outstanding();
        if stuck && self.conn.link() != Link::Failed {
            let why = format!(
                "the device is being deleted and the server did not answer within {} s",
                ABORT_GRACE.as_secs_f32()
            );
            self.give_up(&why, ring);
        }
    }

    /// Logs what the queue still holds during deletion, a few times at most.
    fn log_outstanding(&mut self) {
        if self.tags.active() > 0 && self.timers.may_log_outstanding() {
            log::warn!("{}: deleting: {}", self.conn.uri, self.outstanding());
        }
    }

    /// What the queue still holds, for the log when deletion must cut it short: the
    /// connection's state and the first few requests with where each one stands.
    fn outstanding(&self) -> String {
        let mut s = format!(
            "{} request(s) outstanding (link {:?}, {} send SQE(s) and {} receive(s) in flight, {} to send)",
            self.tags.active(),
            self.conn.link(),
            self.send.inflight(),
            self.recv.inflight(),
            self.send.queued().len()
        );
        self.tags.describe(&mut s);
        s
    }
}

impl QueueTarget for NbdQueue {
    fn staging_buffer(&mut self) -> Option<&mut Staging> {
        self.recv.staging_buffer()
    }

    fn start(&mut self, ring: &mut dyn Ring) {
        self.conn.arm_wake(ring);
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

    fn complete(&mut self, done: Completion, ring: &mut dyn Ring) -> Outcome {
        let Owner::Request(io, _) = done.owner else {
            self.target_completed(done.step, done.res, ring);
            return Outcome::Queued;
        };
        let (tag, res) = (io.tag, done.res);
        let (kind, generation) = split_step(done.step);
        self.tags.sqe_completed(tag);
        match kind {
            STEP_SEND => {
                self.send.sqe_completed();
                if self.conn.current(generation) {
                    if let Err(b) = self.send.done(res, &self.conn, &mut self.tags, ring) {
                        self.broken(b, ring);
                    }
                }
            }
            STEP_PAYLOAD => {
                self.recv.sqe_completed();
                if self.conn.current(generation) {
                    let r = self
                        .recv
                        .done(Some(tag), res, &self.conn, &mut self.tags, ring);
                    self.settle_replies(ring);
                    if let Err(b) = r {
                        self.broken(b, ring);
                    }
                }
            }
            STEP_STAGE => {
                self.send.sqe_completed();
                if self.conn.current(generation) {
                    if let Err(b) = self.send.staged(tag, res, &self.tags) {
                        self.broken(b, ring);
                    }
                }
            }
            STEP_COPY => self.recv.copied(tag, res, &self.conn, &mut self.tags),
            _ => {}
        }
        self.tags.take_result_if_idle(tag)
    }

    fn end_turn(&mut self, ring: &mut dyn Ring) {
        self.kick(ring);
    }
}

impl NbdQueue {
    /// A completion of the target's own SQEs (`Ring::push_event`): the staging receive,
    /// the reconnect wake-up, the timers.
    fn target_completed(&mut self, step: u16, res: i32, ring: &mut dyn Ring) {
        let (kind, generation) = split_step(step);
        match kind {
            EVENT_RECV => {
                self.recv.sqe_completed();
                if self.conn.current(generation) {
                    let r = self.recv.done(None, res, &self.conn, &mut self.tags, ring);
                    self.settle_replies(ring);
                    if let Err(b) = r {
                        self.broken(b, ring);
                    }
                }
            }
            EVENT_WAKE => self.woken(res, ring),
            EVENT_TICK => self.tick(ring),
            EVENT_ABORT => self.abort_timer(ring),
            _ => {}
        }
    }
}
