//! The queue of the nbd target against the fake NBD server (`ublkd_tests::fake_nbd`) on
//! a real io_uring, without ublk: a test ring (`crate::test_ring`) stands in for the
//! daemon's queue loop, and requests use daemon buffers as in the copy mode, or
//! (`Harness::with_pages`) stand-ins for their own pages as in the zero-copy modes.

use super::NbdTarget;
use crate::test_ring::{decode, TestRing};
use crate::Target;
use crate::{
    dispatch, BlockOp, Completion, IoBuf, IoDesc, IoFlags, Outcome, Owner, QueueContext,
    QueueTarget,
};
use io_uring::types;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use ublkd_tests::fake_nbd::{serve_any, Fault, Stats, FAULT_OFFSET};

mod durable;

/// One queue of an nbd device on a test ring, and its requests' buffers.
struct Harness {
    // The ring goes first: its SQEs point into the queue's buffers.
    ring: TestRing,
    q: Box<dyn QueueTarget>,
    /// Requests in the queue, with their buffers (kept alive here).
    inflight: HashMap<u16, (IoDesc, IoBuf)>,
    bufs: HashMap<u16, Vec<u8>>,
    done: HashMap<u16, i32>,
    /// Tags in the order their requests finished.
    order: Vec<u16>,
    /// Reads and writes use the requests' own pages (`TestRing::lend_pages`).
    pages: bool,
    /// The flags of the requests started next (FUA).
    flags: IoFlags,
}

const DEPTH: u16 = 32;

impl Harness {
    fn new(port: u16, reconnect: Duration) -> Harness {
        Self::with(port, reconnect, None)
    }

    /// With `one_by_one` (a record limit), sends go out as on a kernel TLS socket
    /// (`Pace::OneByOne`).
    fn with(port: u16, reconnect: Duration, one_by_one: Option<u64>) -> Harness {
        Self::build(port, reconnect, one_by_one, false)
    }

    /// Requests in their own pages (zc), reached with user copy; only payloads the
    /// queue copies (up to 16 KiB written, below 64 KiB read), as the test ring has no
    /// registered buffers to send from or receive into.
    fn with_pages(port: u16, reconnect: Duration, one_by_one: Option<u64>) -> Harness {
        Self::build(port, reconnect, one_by_one, true)
    }

    fn build(port: u16, reconnect: Duration, one_by_one: Option<u64>, pages: bool) -> Harness {
        let uri = format!("nbd://127.0.0.1:{port}/x").parse().unwrap();
        let t = NbdTarget::connect(&uri, 1, 512, reconnect).unwrap();
        let t = match one_by_one {
            Some(limit) => t.one_send_at_a_time(limit),
            None => t,
        };
        Self::on(&t, pages)
    }

    /// The first queue of `t`.
    fn on(t: &NbdTarget, pages: bool) -> Harness {
        let mut ring = TestRing::new(256);
        let mut q = t
            .queue(QueueContext {
                qid: 0,
                depth: DEPTH,
                first_file: 0,
                user_copy: pages,
                staging_index: None,
                own_pages: false,
                max_io_bytes: 512 << 10,
            })
            .unwrap();
        q.start(&mut ring);
        Harness {
            ring,
            q,
            inflight: HashMap::new(),
            bufs: HashMap::new(),
            done: HashMap::new(),
            order: Vec::new(),
            pages,
            flags: IoFlags::default(),
        }
    }

    /// Starts request `tag`: `op` of `len` bytes at `offset`; a write's payload is
    /// `fill`.
    fn start(&mut self, tag: u16, op: BlockOp, offset: u64, len: u32, fill: u8) {
        let io = IoDesc {
            tag,
            op,
            flags: self.flags,
            offset,
            len,
        };
        let data = self.bufs.entry(tag).or_default();
        *data = vec![if op == BlockOp::Write { fill } else { 0 }; len as usize];
        let buf = match op {
            BlockOp::Read | BlockOp::Write if self.pages => self.ring.lend_pages(tag, data),
            BlockOp::Read | BlockOp::Write => IoBuf::User {
                addr: data.as_mut_ptr(),
                len: data.len(),
            },
            _ => IoBuf::None,
        };
        self.done.remove(&tag);
        // `data` stays in `bufs`, untouched, until the request is finished.
        if !self.pages {
            self.ring.lend(tag, buf);
        }
        match dispatch(self.q.as_mut(), &io, buf, &mut self.ring) {
            Outcome::Done(r) => {
                self.done.insert(tag, r);
            }
            Outcome::Queued => {
                self.inflight.insert(tag, (io, buf));
            }
            Outcome::Busy => panic!("tag {tag}: busy"),
        }
    }

    /// Runs the queue loop until every started request has finished; their results.
    fn run(&mut self) -> HashMap<u16, i32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.q.end_turn(&mut self.ring);
            for (tag, r) in self.ring.finished.drain(..) {
                assert!(
                    self.inflight.remove(&tag).is_some(),
                    "tag {tag} finished twice"
                );
                self.done.insert(tag, r);
                self.order.push(tag);
            }
            if self.inflight.is_empty() {
                return std::mem::take(&mut self.done);
            }
            assert!(
                Instant::now() < deadline,
                "requests left: {:?}",
                self.inflight
            );
            let ts = types::Timespec::new().sec(1);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
                Err(e) => panic!("io_uring_enter: {e}"),
            }
            let cqes: Vec<_> = self
                .ring
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (ud, res) in cqes {
                let (event, step, tag) = decode(ud);
                let owner = if event {
                    Owner::Target
                } else {
                    let (io, buf) = self.inflight[&tag];
                    Owner::Request(io, buf)
                };
                let out = self
                    .q
                    .complete(Completion { owner, step, res }, &mut self.ring);
                if event {
                    continue;
                }
                match out {
                    Outcome::Done(r) => {
                        self.inflight.remove(&tag);
                        self.done.insert(tag, r);
                        self.order.push(tag);
                    }
                    Outcome::Queued => {}
                    Outcome::Busy => panic!("tag {tag}: busy on completion"),
                }
            }
        }
    }

    /// The payload the last request of `tag` read.
    fn data(&self, tag: u16) -> Vec<u8> {
        if self.pages {
            self.ring.pages_data(tag)
        } else {
            self.bufs[&tag].clone()
        }
    }

    /// Per-request send SQEs pushed so far (each carries a chain's part).
    fn sends(&self) -> usize {
        let send = super::step::STEP_SEND;
        self.ring
            .pushed
            .iter()
            .filter(|&&s| s & 0xf == send)
            .count()
    }
}

/// Writes `fill` + tag to `n` blocks of `len` bytes from `base`, in one turn.
fn write_blocks(h: &mut Harness, base: u64, n: u16, len: u32) {
    for tag in 0..n {
        let off = base + u64::from(tag) * u64::from(len);
        h.start(tag, BlockOp::Write, off, len, 0x40 + tag as u8);
    }
    let res = h.run();
    for tag in 0..n {
        assert_eq!(res[&tag], len as i32, "write {tag}");
    }
}

/// Reads them back in one turn and checks them.
fn check_blocks(h: &mut Harness, base: u64, n: u16, len: u32) {
    for tag in 0..n {
        let off = base + u64::from(tag) * u64::from(len);
        h.start(tag, BlockOp::Read, off, len, 0);
    }
    let res = h.run();
    for tag in 0..n {
        assert_eq!(res[&tag], len as i32, "read {tag}");
        assert!(
            h.data(tag).iter().all(|&b| b == 0x40 + tag as u8),
            "read {tag} got other data"
        );
    }
}

fn server(fault: Fault) -> (u16, std::sync::Arc<Stats>) {
    serve_any(fault)
}

#[test]
fn requests_of_a_turn_go_out_in_one_chain() {
    let (port, _) = server(Fault::None);
    let mut h = Harness::new(port, Duration::ZERO);
    let before = h.sends();
    write_blocks(&mut h, 0, 16, 4096);
    // Headers and payloads in daemon memory: one SENDMSG for all 16.
    assert_eq!(h.sends() - before, 1);
    let before = h.sends();
    check_blocks(&mut h, 0, 16, 4096);
    assert_eq!(h.sends() - before, 1);
    // A flush goes out with offset and length 0, as the server wants.
    h.start(0, BlockOp::Flush, 4096, 0, 0);
    let res = h.run();
    assert_eq!(res[&0], 0);
}

#[test]
fn replies_out_of_order_reach_their_requests() {
    let (port, _) = server(Fault::Reorder);
    let mut h = Harness::new(port, Duration::ZERO);
    // Small reads go through the staging buffer, large ones straight to their buffer.
    write_blocks(&mut h, FAULT_OFFSET, 8, 4096);
    h.order.clear();
    check_blocks(&mut h, FAULT_OFFSET, 8, 4096);
    assert_eq!(
        h.order,
        [7, 6, 5, 4, 3, 2, 1, 0],
        "the server answers last first"
    );
    write_blocks(&mut h, FAULT_OFFSET, 4, 128 << 10);
    h.order.clear();
    check_blocks(&mut h, FAULT_OFFSET, 4, 128 << 10);
    assert_eq!(h.order, [3, 2, 1, 0]);
}

#[test]
fn partial_headers_and_payloads_are_put_together() {
    let (port, _) = server(Fault::Dribble);
    let mut h = Harness::new(port, Duration::ZERO);
    write_blocks(&mut h, 0, 8, 4096);
    check_blocks(&mut h, 0, 8, 4096);
    write_blocks(&mut h, 1 << 20, 3, 256 << 10);
    check_blocks(&mut h, 1 << 20, 3, 256 << 10);
}

#[test]
fn a_lost_connection_is_reconnected_and_its_requests_resent() {
    let (port, stats) = server(Fault::DropOnce);
    let mut h = Harness::new(port, Duration::from_secs(10));
    write_blocks(&mut h, 0, 4, 4096);
    // The first connection closes at the write to FAULT_OFFSET: those before it in
    // the chain were answered, it and the ones after are sent again.
    for tag in 0..8u16 {
        let off = FAULT_OFFSET - 4 * 4096 + u64::from(tag) * 4096;
        h.start(tag, BlockOp::Write, off, 4096, 0x80 + tag as u8);
    }
    let res = h.run();
    assert!((0..8).all(|t| res[&t] == 4096), "{res:?}");
    assert_eq!(
        stats.connections.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    for tag in 0..8u16 {
        let off = FAULT_OFFSET - 4 * 4096 + u64::from(tag) * 4096;
        h.start(tag, BlockOp::Read, off, 4096, 0);
    }
    let res = h.run();
    for tag in 0..8u16 {
        assert_eq!(res[&tag], 4096);
        assert!(
            h.data(tag).iter().all(|&b| b == 0x80 + tag as u8),
            "tag {tag}"
        );
    }
}

#[test]
fn a_request_that_breaks_every_connection_fails_after_three_resends() {
    let (port, stats) = server(Fault::ShortReply);
    let mut h = Harness::new(port, Duration::from_secs(20));
    h.start(0, BlockOp::Read, FAULT_OFFSET, 4096, 0);
    let res = h.run();
    assert_eq!(res[&0], -libc::EIO);
    // The first connection and three more, one per resend; the fifth, made after the
    // request failed, serves the next ones.
    write_blocks(&mut h, 0, 2, 4096);
    assert_eq!(
        stats.connections.load(std::sync::atomic::Ordering::SeqCst),
        5
    );
}

#[test]
fn without_reconnecting_a_lost_connection_fails_its_requests() {
    let (port, _) = server(Fault::BadMagic);
    let mut h = Harness::new(port, Duration::ZERO);
    h.start(0, BlockOp::Read, FAULT_OFFSET, 4096, 0);
    h.start(1, BlockOp::Write, 0, 4096, 1);
    let res = h.run();
    // The bad reply comes first: nothing after it is taken.
    assert_eq!((res[&0], res[&1]), (-libc::EIO, -libc::EIO));
    // And every later request.
    h.start(2, BlockOp::Read, 0, 4096, 0);
    assert_eq!(h.run()[&2], -libc::EIO);
}

/// As on a kernel TLS socket: a chain's sends one at a time, without MSG_WAITALL. A
/// server that reads slowly through a small window makes them short; each is continued
/// where it stopped, before the next one, so the server sees every request whole.
#[test]
fn short_sends_one_at_a_time_are_continued() {
    let (port, _) = server(Fault::Dribble);
    let mut h = Harness::with(port, Duration::ZERO, Some(super::send::RECORD_LIMIT));
    let before = h.sends();
    // 8 MiB in one chain: more than a socket's largest send buffer (tcp_wmem's 4 MiB).
    write_blocks(&mut h, 0, 32, 256 << 10);
    // One SENDMSG for the chain, and more for what the short ones left.
    assert!(h.sends() - before > 1, "no send was short");
    check_blocks(&mut h, 0, 32, 256 << 10);
    write_blocks(&mut h, 4 << 20, 16, 4096);
    check_blocks(&mut h, 4 << 20, 16, 4096);
}

/// A lost connection in the middle of a chain sent one SQE at a time: what has no reply
/// is sent again, whole, on the next connection.
#[test]
fn one_at_a_time_a_lost_connection_is_resent() {
    let (port, stats) = server(Fault::DropOnce);
    let mut h = Harness::with(
        port,
        Duration::from_secs(10),
        Some(super::send::RECORD_LIMIT),
    );
    for tag in 0..8u16 {
        let off = FAULT_OFFSET - 4 * (64 << 10) + u64::from(tag) * (64 << 10);
        h.start(tag, BlockOp::Write, off, 64 << 10, 0x80 + tag as u8);
    }
    let res = h.run();
    assert!((0..8).all(|t| res[&t] == 64 << 10), "{res:?}");
    assert_eq!(
        stats.connections.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    for tag in 0..8u16 {
        let off = FAULT_OFFSET - 4 * (64 << 10) + u64::from(tag) * (64 << 10);
        h.start(tag, BlockOp::Read, off, 64 << 10, 0);
    }
    let res = h.run();
    for tag in 0..8u16 {
        assert_eq!(res[&tag], 64 << 10);
        assert!(
            h.data(tag).iter().all(|&b| b == 0x80 + tag as u8),
            "tag {tag}"
        );
    }
}

/// On kernel TLS a connection is renewed before its send key has encrypted as many
/// records as it may (`RECORD_LIMIT`; 64 here): the requests go on on the next one.
#[test]
fn a_worn_out_tls_key_makes_a_new_connection() {
    let (port, stats) = server(Fault::None);
    let mut h = Harness::with(port, Duration::from_secs(10), Some(64));
    // 32 x 64 KiB: more than 64 records of 16 KiB.
    write_blocks(&mut h, 0, 32, 64 << 10);
    check_blocks(&mut h, 0, 32, 64 << 10);
    let n = stats.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(n >= 2, "{n} connection(s)");
}

/// Per-request SQEs pushed so far that copy a write's payload out of its pages.
fn payload_copies(h: &Harness) -> usize {
    let stage = super::step::STEP_STAGE;
    h.ring.pushed.iter().filter(|&&s| s & 0xf == stage).count()
}

#[test]
fn small_writes_in_pages_are_copied_on_the_ring_and_sent_in_one_chain() {
    let (port, _) = server(Fault::None);
    let mut h = Harness::with_pages(port, Duration::ZERO, None);
    let (sends, copies) = (h.sends(), payload_copies(&h));
    write_blocks(&mut h, 0, 16, 4096);
    // One copy SQE per payload (no system call), linked in front of one SENDMSG.
    assert_eq!(payload_copies(&h) - copies, 16);
    assert_eq!(h.sends() - sends, 1);
    check_blocks(&mut h, 0, 16, 4096);
}

#[test]
fn with_sends_one_at_a_time_the_chain_waits_for_its_payload_copies() {
    let (port, _) = server(Fault::None);
    let mut h = Harness::with_pages(port, Duration::ZERO, Some(u64::MAX));
    write_blocks(&mut h, 0, 16, 4096);
    check_blocks(&mut h, 0, 16, 4096);
    write_blocks(&mut h, 1 << 20, 4, 16 << 10);
    check_blocks(&mut h, 1 << 20, 4, 16 << 10);
}

/// A payload copy that fails cancels its chain before anything of it is sent; the
/// connection counts as lost and the requests go out again on the next one.
#[test]
fn a_failed_payload_copy_resends_the_chain_on_a_new_connection() {
    // Linked chains, and sends one at a time (where nothing cancels the sends: the
    // chain must not go out with a payload that was not copied).
    for one_by_one in [None, Some(u64::MAX)] {
        let (port, stats) = server(Fault::None);
        let mut h = Harness::with_pages(port, Duration::from_secs(10), one_by_one);
        h.ring.fail_copies = 1;
        write_blocks(&mut h, 0, 4, 4096);
        assert_eq!(h.ring.fail_copies, 0, "the fault was used");
        assert_eq!(
            stats.connections.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "{one_by_one:?}"
        );
        check_blocks(&mut h, 0, 4, 4096);
    }
}
