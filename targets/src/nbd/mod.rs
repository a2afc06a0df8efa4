//! The `nbd` target: a client of an NBD export (qemu-nbd, nbdkit, nbd-server, ...).
//!
//! Connections are made and negotiated (blocking, with timeouts) when the device is
//! added, one per hardware queue; more than one needs a server that advertises
//! multi-conn. After that each queue's handler uses only its queue's io_uring:
//!
//! - Sends are serialized per connection: one SQE in flight, the request header then a
//!   write's payload, short sends continued, so requests never interleave on the wire.
//! - One receive loop per connection reads 16-byte reply headers; the cookie is the tag.
//!   A read's payload is then received straight into the request's buffer.
//! - Payloads move with READ_FIXED/WRITE_FIXED on the socket when the queue's buffer is
//!   registered (fixed, zc, auto-zc: zero copy for zc modes) and RECV/SEND otherwise.
//!
//! A connection that fails (EOF, error, a reply that breaks the protocol) is shut down
//! and reconnected in the background for up to the reconnect timeout; requests without
//! an answer are sent again on the new connection, so applications see no error. After
//! the timeout, or with the timeout 0, they and every later one complete with -EIO.
//! Deleting the device stops the waiting at once, so `del` never waits on a dead server.

pub mod proto;
pub mod uri;

use crate::{
    BlockOp, DeviceShape, IoBuf, IoDesc, Outcome, QueueContext, QueueTarget, Ring, Target,
};
use io_uring::{opcode, types};
use proto::{ExportInfo, HandshakeError};
use std::collections::VecDeque;
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
pub use uri::{Address, NbdUri};

/// How long connecting and the handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum NbdError {
    #[error("{0}")]
    Uri(#[from] uri::UriError),
    #[error("cannot connect to {uri}: {source}")]
    Connect { uri: String, source: io::Error },
    #[error("{uri}: {source}")]
    Handshake { uri: String, source: HandshakeError },
    #[error("{uri}: the server does not advertise multi-conn, so the device can have only one queue (use --queues 1)")]
    NoMultiConn { uri: String },
    #[error("{uri}: the export needs a block size of at least {min} (use --block-size 4096)")]
    BlockSize { uri: String, min: u32 },
    #[error("{uri}: the export size {size} is not a multiple of the block size {block_size}")]
    SizeNotAligned {
        uri: String,
        size: u64,
        block_size: u32,
    },
    #[error("{uri}: connection {n} sees a different export ({size} bytes, flags {flags:#x})")]
    Mismatch {
        uri: String,
        n: usize,
        size: u64,
        flags: u16,
    },
}

/// Connection state, shared between a queue's handler and `show`.
const CONN_UP: u8 = 0;
const CONN_FAILED: u8 = 1;
const CONN_RECONNECTING: u8 = 2;

/// A connected stream the handshake can run on with timeouts.
trait Stream: io::Read + io::Write + Into<OwnedFd> {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Stream for TcpStream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl Stream for UnixStream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

/// Runs the handshake on `s` within CONNECT_TIMEOUT, then hands the socket over.
fn negotiate<S: Stream>(mut s: S, uri: &NbdUri) -> Result<(OwnedFd, ExportInfo), NbdError> {
    let u = uri.to_string();
    let io_err = |source| NbdError::Connect {
        uri: u.clone(),
        source,
    };
    s.set_timeouts(Some(CONNECT_TIMEOUT)).map_err(io_err)?;
    let info = proto::handshake(&mut s, &uri.export).map_err(|source| NbdError::Handshake {
        uri: u.clone(),
        source,
    })?;
    s.set_timeouts(None).map_err(io_err)?;
    Ok((s.into(), info))
}

fn connect_one(uri: &NbdUri) -> Result<(OwnedFd, ExportInfo), NbdError> {
    let connect_err = |source| NbdError::Connect {
        uri: uri.to_string(),
        source,
    };
    match &uri.address {
        Address::Tcp { host, port } => {
            let addrs: Vec<_> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(connect_err)?
                .collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "host has no address");
            for addr in addrs {
                match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                    Ok(s) => {
                        s.set_nodelay(true).map_err(connect_err)?;
                        return negotiate(s, uri);
                    }
                    Err(e) => last = e,
                }
            }
            Err(connect_err(last))
        }
        Address::Unix(path) => negotiate(UnixStream::connect(path).map_err(connect_err)?, uri),
    }
}

pub struct NbdTarget {
    uri: NbdUri,
    info: ExportInfo,
    reconnect_timeout: Duration,
    /// Set when the device is being deleted: stop waiting for the server.
    abort: Arc<AtomicBool>,
    /// One connection per queue, taken by the queue's handler.
    conns: Mutex<Vec<Option<OwnedFd>>>,
    states: Vec<Arc<AtomicU8>>,
}

impl NbdTarget {
    /// Connects `connections` times (one per queue) and negotiates the export.
    pub fn connect(
        uri: &NbdUri,
        connections: u16,
        block_size: u32,
        reconnect_timeout: Duration,
    ) -> Result<Self, NbdError> {
        let u = uri.to_string();
        let (first, info) = connect_one(uri)?;
        if connections > 1 && !info.has(proto::TFLAG_CAN_MULTI_CONN) {
            return Err(NbdError::NoMultiConn { uri: u });
        }
        if let Some((min, _, _)) = info.block_size {
            if min > block_size {
                return Err(NbdError::BlockSize { uri: u, min });
            }
        }
        if info.size % u64::from(block_size) != 0 {
            return Err(NbdError::SizeNotAligned {
                uri: u,
                size: info.size,
                block_size,
            });
        }
        let mut conns = vec![Some(first)];
        for n in 1..usize::from(connections) {
            let (fd, other) = connect_one(uri)?;
            if other.size != info.size || other.flags != info.flags {
                return Err(NbdError::Mismatch {
                    uri: u,
                    n,
                    size: other.size,
                    flags: other.flags,
                });
            }
            conns.push(Some(fd));
        }
        log::info!(
            "{u}: export of {} bytes, flags {:#x}, block sizes {:?}, {connections} connection(s)",
            info.size,
            info.flags,
            info.block_size
        );
        Ok(NbdTarget {
            uri: uri.clone(),
            info,
            reconnect_timeout,
            abort: Arc::new(AtomicBool::new(false)),
            states: (0..connections)
                .map(|_| Arc::new(AtomicU8::new(CONN_UP)))
                .collect(),
            conns: Mutex::new(conns),
        })
    }
}

impl Target for NbdTarget {
    fn name(&self) -> &'static str {
        "nbd"
    }

    fn shape(&self) -> DeviceShape {
        let i = &self.info;
        DeviceShape {
            size: i.size,
            read_only: i.has(proto::TFLAG_READ_ONLY),
            volatile_cache: i.has(proto::TFLAG_SEND_FLUSH),
            fua: i.has(proto::TFLAG_SEND_FUA),
            rotational: i.has(proto::TFLAG_ROTATIONAL),
            discard: i.has(proto::TFLAG_SEND_TRIM),
            write_zeroes: i.has(proto::TFLAG_SEND_WRITE_ZEROES),
        }
    }

    fn details(&self) -> Vec<(String, String)> {
        let i = &self.info;
        let yes = |f| if i.has(f) { "yes" } else { "no" }.to_string();
        let states: Vec<&str> = self
            .states
            .iter()
            .map(|s| match s.load(Ordering::Relaxed) {
                CONN_UP => "connected",
                CONN_RECONNECTING => "reconnecting",
                _ => "failed",
            })
            .collect();
        vec![
            ("uri".into(), self.uri.to_string()),
            (
                "reconnect timeout".into(),
                format!("{} s", self.reconnect_timeout.as_secs()),
            ),
            ("connections".into(), states.join(", ")),
            ("server flags".into(), format!("{:#x}", i.flags)),
            ("multi-conn".into(), yes(proto::TFLAG_CAN_MULTI_CONN)),
            ("flush".into(), yes(proto::TFLAG_SEND_FLUSH)),
            ("fua".into(), yes(proto::TFLAG_SEND_FUA)),
            ("trim".into(), yes(proto::TFLAG_SEND_TRIM)),
            ("write zeroes".into(), yes(proto::TFLAG_SEND_WRITE_ZEROES)),
            (
                "block sizes".into(),
                match i.block_size {
                    Some((min, pref, max)) => format!("min {min}, preferred {pref}, max {max}"),
                    None => "not advertised".into(),
                },
            ),
        ]
    }

    fn queue(&self, ctx: QueueContext) -> io::Result<Box<dyn QueueTarget>> {
        let q = usize::from(ctx.qid);
        let sock = self
            .conns
            .lock()
            .map_err(|_| io::Error::other("connection table poisoned"))?
            .get_mut(q)
            .and_then(Option::take)
            .ok_or_else(|| io::Error::other(format!("no NBD connection for queue {q}")))?;
        let state = self.states.get(q).cloned().unwrap_or_default();
        let depth = usize::from(ctx.depth);
        // SAFETY: eventfd has no memory preconditions; a non-negative result is a new fd.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if wake < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `wake` is a fresh descriptor that nothing else owns.
        let wake = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(wake) };
        Ok(Box::new(NbdQueue {
            fd: types::Fd(sock.as_raw_fd()),
            sock,
            generation: 0,
            link: Link::Up,
            state,
            uri: self.uri.clone(),
            export: self.info,
            reconnect_timeout: self.reconnect_timeout,
            abort: self.abort.clone(),
            wake,
            wake_buf: Box::new(0),
            handoff: Arc::new(Mutex::new(None)),
            headers: vec![[0; proto::REQUEST_LEN]; depth],
            tags: vec![TagIo::default(); depth],
            send_queue: VecDeque::new(),
            sending: None,
            reply: Box::new([0; proto::REPLY_LEN]),
            reply_got: 0,
            payload_tag: None,
            batch: Vec::with_capacity(MAX_BATCH * proto::REQUEST_LEN),
            batch_len: 0,
        }))
    }

    fn abort(&self) {
        self.abort.store(true, Ordering::Release);
    }
}

/// Labels of the SQEs this target pushes: a kind in the low 4 bits, the connection's
/// generation above, so completions from a socket that was replaced are recognized.
const STEP_SEND: u16 = 1;
const STEP_RECV_PAYLOAD: u16 = 2;
const STEP_SEND_BATCH: u16 = 3;

/// Most request headers one batched SEND carries.
const MAX_BATCH: usize = 128;
const EVENT_RECV_HEADER: u16 = 1;
const EVENT_RECONNECT: u16 = 2;

fn step(kind: u16, generation: u16) -> u16 {
    kind | ((generation & 0x0fff) << 4)
}

fn split_step(step: u16) -> (u16, u16) {
    (step & 0xf, step >> 4)
}

#[derive(Debug, Clone, Copy, Default)]
struct TagIo {
    io: Option<IoDesc>,
    buf: Option<IoBuf>,
    /// Bytes of header + payload sent on the current connection.
    sent: usize,
    /// SQEs of this request in flight (on any connection).
    sqes: u32,
    /// The request's result, kept until its own SQEs have all completed.
    result: Option<i32>,
    /// Bytes of a read's payload received.
    got: usize,
    /// Times the request was sent again after a connection was lost.
    resends: u8,
}

/// A request that was in flight on this many lost connections fails instead of being
/// sent again: a server that breaks on one request must not cause endless reconnects.
const MAX_RESENDS: u8 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    Reconnecting,
    Failed,
}

/// What the reconnect thread hands back: a negotiated socket, or why it gave up.
type Handoff = Arc<Mutex<Option<Result<OwnedFd, String>>>>;

struct NbdQueue {
    sock: OwnedFd,
    fd: types::Fd,
    generation: u16,
    link: Link,
    state: Arc<AtomicU8>,
    uri: NbdUri,
    export: ExportInfo,
    reconnect_timeout: Duration,
    abort: Arc<AtomicBool>,
    /// Wakes the ring when the reconnect thread is done.
    wake: OwnedFd,
    wake_buf: Box<u64>,
    handoff: Handoff,
    /// Request headers, one per tag: stable memory for the send SQEs.
    headers: Vec<[u8; proto::REQUEST_LEN]>,
    tags: Vec<TagIo>,
    /// Requests waiting for the connection's send slot.
    send_queue: VecDeque<u16>,
    /// The request whose bytes are on their way out.
    sending: Option<u16>,
    /// The reply header being received (boxed: the receive SQE points into it).
    reply: Box<[u8; proto::REPLY_LEN]>,
    reply_got: usize,
    /// The read whose payload is being received instead of a header.
    payload_tag: Option<u16>,
    /// Headers of several payload-less requests sent with one SEND (see `send_batch`).
    batch: Vec<u8>,
    /// Bytes of the batch in flight; 0 when no batch is.
    batch_len: usize,
}

/// Bytes that follow a request's header on the wire: a write's data.
fn payload_len(io: &IoDesc) -> usize {
    if matches!(io.op, BlockOp::Write) {
        io.len as usize
    } else {
        0
    }
}

/// What a socket operation's result says went wrong (0 is end of stream).
fn socket_failure(res: i32, closed: &str) -> String {
    if res == 0 {
        closed.to_string()
    } else {
        io::Error::from_raw_os_error(-res).to_string()
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

/// Reconnects in the background: retries with backoff until `timeout`, then hands the
/// result over and wakes the queue's ring through `wake`.
fn spawn_reconnect(
    uri: NbdUri,
    export: ExportInfo,
    timeout: Duration,
    abort: Arc<AtomicBool>,
    handoff: Handoff,
    wake: OwnedFd,
) {
    let spawned = std::thread::Builder::new()
        .name("nbd-reconnect".into())
        .spawn(move || {
            let deadline = std::time::Instant::now() + timeout;
            let mut delay = Duration::from_millis(100);
            let result = loop {
                if abort.load(Ordering::Acquire) {
                    break Err("the device is being deleted".to_string());
                }
                match connect_one(&uri) {
                    Ok((fd, info)) if info.size == export.size && info.flags == export.flags => {
                        break Ok(fd)
                    }
                    Ok((_, info)) => {
                        break Err(format!(
                            "the export changed (now {} bytes, flags {:#x})",
                            info.size, info.flags
                        ))
                    }
                    Err(e) => log::debug!("{uri}: reconnect attempt failed: {e}"),
                }
                let now = std::time::Instant::now();
                if now >= deadline {
                    break Err(format!(
                        "the server did not come back within {} s",
                        timeout.as_secs()
                    ));
                }
                let until = (now + delay).min(deadline);
                while std::time::Instant::now() < until && !abort.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            };
            *handoff.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
            let one = 1u64.to_ne_bytes();
            // SAFETY: writing 8 bytes from a live buffer to an eventfd we own.
            unsafe { libc::write(wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        });
    if let Err(e) = spawned {
        log::error!("cannot start the reconnect thread: {e}");
    }
}

impl NbdQueue {
    /// Queues request `io` for sending.
    fn start_request(&mut self, io: &IoDesc, buf: IoBuf, ring: &mut dyn Ring) -> Outcome {
        if self.link == Link::Failed {
            return Outcome::Done(-libc::EIO);
        }
        let Some((cmd, flags)) = nbd_command(io) else {
            return Outcome::Done(-libc::EOPNOTSUPP);
        };
        let t = usize::from(io.tag);
        let len = if matches!(io.op, BlockOp::Flush) {
            0
        } else {
            io.len
        };
        self.headers[t] = proto::request(flags, cmd, u64::from(io.tag), io.offset, len);
        let sqes = self.tags[t].sqes;
        self.tags[t] = TagIo {
            io: Some(*io),
            buf: Some(buf),
            sqes,
            ..TagIo::default()
        };
        self.send_queue.push_back(io.tag);
        self.pump_send(ring);
        Outcome::Queued
    }

    /// Starts the next send if the connection is up and its send slot is free.
    fn pump_send(&mut self, ring: &mut dyn Ring) {
        while self.sending.is_none() && self.link == Link::Up {
            if self.send_batch(ring) {
                return;
            }
            let Some(tag) = self.send_queue.pop_front() else {
                return;
            };
            self.sending = Some(tag);
            if !self.send_next(tag, ring) {
                return;
            }
        }
    }

    /// Whether `tag` is a request with no payload and nothing sent yet.
    fn batchable(&self, tag: u16) -> bool {
        let t = &self.tags[usize::from(tag)];
        t.sent == 0 && t.io.is_some_and(|io| !matches!(io.op, BlockOp::Write))
    }

    /// Sends the headers of the payload-less requests at the front of the queue (reads,
    /// flushes, trims) with one SEND, still the only send in flight on the connection.
    /// Returns true when a batch went out. The SQE is accounted to the first request;
    /// the headers are copied into `batch`, so the others hold no memory of their own.
    fn send_batch(&mut self, ring: &mut dyn Ring) -> bool {
        let n = self
            .send_queue
            .iter()
            .take(MAX_BATCH)
            .take_while(|&&t| self.batchable(t))
            .count();
        if n < 2 {
            return false;
        }
        self.batch.clear();
        let tags: Vec<u16> = self.send_queue.iter().take(n).copied().collect();
        for &tag in &tags {
            self.batch
                .extend_from_slice(&self.headers[usize::from(tag)]);
        }
        let first = tags[0];
        let sqe = opcode::Send::new(self.fd, self.batch.as_ptr(), self.batch.len() as u32)
            .flags(libc::MSG_NOSIGNAL | libc::MSG_WAITALL)
            .build();
        // SAFETY: `batch` is not touched again until this SQE completes (it is the only
        // send in flight), and it lives as long as the handler.
        if unsafe { ring.push(first, step(STEP_SEND_BATCH, self.generation), sqe) }.is_err() {
            return false;
        }
        self.tags[usize::from(first)].sqes += 1;
        for &tag in &tags {
            self.send_queue.pop_front();
            // Counted as sent now: a request answered and reused before this SQE's
            // completion must not be marked later; a failed batch is resent through
            // connection_lost, which resets `sent`.
            self.tags[usize::from(tag)].sent = proto::REQUEST_LEN;
        }
        self.batch_len = self.batch.len();
        self.sending = Some(first);
        true
    }

    /// Pushes the next piece of `tag`'s request. Returns false when the ring was full
    /// (the request goes back to the front of the send queue).
    fn send_next(&mut self, tag: u16, ring: &mut dyn Ring) -> bool {
        let t = usize::from(tag);
        let Some(io) = self.tags[t].io else {
            return false;
        };
        let sent = self.tags[t].sent;
        let payload = payload_len(&io);
        let sqe = if sent < proto::REQUEST_LEN {
            let hdr = self.headers[t][sent..].as_ptr();
            opcode::Send::new(self.fd, hdr, (proto::REQUEST_LEN - sent) as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build()
        } else {
            let off = sent - proto::REQUEST_LEN;
            let left = (payload - off) as u32;
            match self.tags[t].buf {
                Some(IoBuf::User { addr, .. }) => {
                    opcode::Send::new(self.fd, addr.wrapping_add(off), left)
                        .flags(libc::MSG_NOSIGNAL)
                        .build()
                }
                Some(IoBuf::Fixed { addr, index, .. }) => {
                    let at = (addr + off as u64) as *const u8;
                    opcode::WriteFixed::new(self.fd, at, left, index)
                        .offset(u64::MAX)
                        .build()
                }
                _ => return false,
            }
        };
        // SAFETY: the header lives in `self.headers` and the payload in the request's
        // buffer; neither is released before this SQE's completion comes back (a
        // request is finished only when its SQE count is zero).
        match unsafe { ring.push(tag, step(STEP_SEND, self.generation), sqe) } {
            Ok(()) => {
                self.tags[t].sqes += 1;
                true
            }
            Err(_) => {
                self.sending = None;
                self.send_queue.push_front(tag);
                false
            }
        }
    }

    fn post_header_recv(&mut self, ring: &mut dyn Ring) {
        if self.link != Link::Up {
            return;
        }
        let at = self.reply[self.reply_got..].as_mut_ptr();
        let sqe =
            opcode::Recv::new(self.fd, at, (proto::REPLY_LEN - self.reply_got) as u32).build();
        // SAFETY: `reply` is boxed and owned by this handler, which lives as long as the
        // queue's ring.
        if unsafe { ring.push_event(step(EVENT_RECV_HEADER, self.generation), sqe) }.is_err() {
            self.give_up("the ring is full: cannot post the reply receive", ring);
        }
    }

    fn post_payload_recv(&mut self, tag: u16, ring: &mut dyn Ring) {
        let t = usize::from(tag);
        let Some(io) = self.tags[t].io else { return };
        let got = self.tags[t].got;
        let left = io.len - got as u32;
        let sqe = match self.tags[t].buf {
            Some(IoBuf::User { addr, .. }) => {
                opcode::Recv::new(self.fd, addr.wrapping_add(got), left).build()
            }
            Some(IoBuf::Fixed { addr, index, .. }) => {
                let at = (addr + got as u64) as *mut u8;
                opcode::ReadFixed::new(self.fd, at, left, index)
                    .offset(u64::MAX)
                    .build()
            }
            _ => return self.connection_lost("a read reply for a request without a buffer", ring),
        };
        // SAFETY: the request's buffer stays valid until the request is finished, which
        // waits for this SQE's completion.
        match unsafe { ring.push(tag, step(STEP_RECV_PAYLOAD, self.generation), sqe) } {
            Ok(()) => self.tags[t].sqes += 1,
            Err(_) => self.give_up("the ring is full: cannot post a payload receive", ring),
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
        t.io = None;
        Some(r)
    }

    /// Bookkeeping for a completed SQE of `tag`'s; the request's result when it can
    /// finish now.
    fn sqe_done(&mut self, tag: u16) -> Option<i32> {
        let t = &mut self.tags[usize::from(tag)];
        t.sqes = t.sqes.saturating_sub(1);
        if t.sqes == 0 {
            self.take_result(tag)
        } else {
            None
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

    /// A reply header is complete: match it to its request.
    fn header_done(&mut self, ring: &mut dyn Ring) {
        self.reply_got = 0;
        let reply = match proto::parse_reply(&self.reply) {
            Ok(r) => r,
            Err(e) => return self.connection_lost(&format!("bad reply: {e}"), ring),
        };
        let tag = reply.cookie;
        let known = usize::try_from(tag)
            .ok()
            .and_then(|t| self.tags.get(t))
            .is_some_and(|t| t.io.is_some() && t.result.is_none());
        if !known {
            return self.connection_lost(&format!("reply with unknown cookie {tag:#x}"), ring);
        }
        let tag = tag as u16;
        let Some(io) = self.tags[usize::from(tag)].io else {
            return;
        };
        if reply.error != 0 {
            log::debug!(
                "{}: tag {tag} {:?}: server error {}",
                self.uri,
                io.op,
                reply.error
            );
            self.settle(tag, proto::errno(reply.error), ring);
        } else if matches!(io.op, BlockOp::Read) && io.len > 0 {
            self.payload_tag = Some(tag);
            self.post_payload_recv(tag, ring);
            return;
        } else {
            let ok = if matches!(io.op, BlockOp::Read | BlockOp::Write) {
                io.len as i32
            } else {
                0
            };
            self.settle(tag, ok, ring);
        }
        self.post_header_recv(ring);
    }

    /// The connection broke. Reconnect in the background and resend what has no answer,
    /// or fail it all when reconnecting is off or the device is going away.
    fn connection_lost(&mut self, why: &str, ring: &mut dyn Ring) {
        if self.link != Link::Up {
            return;
        }
        // Pending receives and sends complete (with errors) once the socket is down.
        // SAFETY: shutdown on a socket we own.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
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
        self.sending = None;
        self.batch_len = 0;
        self.payload_tag = None;
        self.reply_got = 0;
        let mut resend = VecDeque::new();
        for tag in self.unanswered() {
            let t = &mut self.tags[usize::from(tag)];
            t.sent = 0;
            t.got = 0;
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
        self.send_queue = resend;
        let wake = match self.wake.try_clone() {
            Ok(w) => w,
            Err(e) => return self.give_up(&format!("cannot start reconnecting: {e}"), ring),
        };
        *self.handoff.lock().unwrap_or_else(|p| p.into_inner()) = None;
        spawn_reconnect(
            self.uri.clone(),
            self.export,
            self.reconnect_timeout,
            self.abort.clone(),
            self.handoff.clone(),
            wake,
        );
        let buf: *mut u64 = &mut *self.wake_buf;
        let sqe = opcode::Read::new(types::Fd(self.wake.as_raw_fd()), buf.cast(), 8).build();
        // SAFETY: wake_buf is boxed and owned by this handler, which outlives the ring.
        if unsafe { ring.push_event(step(EVENT_RECONNECT, 0), sqe) }.is_err() {
            self.give_up("the ring is full: cannot wait for the reconnect", ring);
        }
    }

    /// The connection is gone for good: fail every request on it and every later one.
    fn give_up(&mut self, why: &str, ring: &mut dyn Ring) {
        if self.link != Link::Failed {
            log::error!(
                "{}: connection failed: {why}; failing its requests with EIO",
                self.uri
            );
            // SAFETY: shutdown on a socket we own.
            unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
        }
        self.link = Link::Failed;
        self.state.store(CONN_FAILED, Ordering::Relaxed);
        self.send_queue.clear();
        self.sending = None;
        self.batch_len = 0;
        self.payload_tag = None;
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
            Some(Ok(sock)) => {
                self.fd = types::Fd(sock.as_raw_fd());
                self.sock = sock;
                self.generation = self.generation.wrapping_add(1);
                self.link = Link::Up;
                self.state.store(CONN_UP, Ordering::Relaxed);
                log::info!(
                    "{}: reconnected; resending {} request(s)",
                    self.uri,
                    self.send_queue.len()
                );
                self.post_header_recv(ring);
                self.pump_send(ring);
            }
            Some(Err(why)) => self.give_up(&why, ring),
            None => log::warn!("{}: reconnect wake-up without a result", self.uri),
        }
    }
}

impl QueueTarget for NbdQueue {
    fn start(&mut self, ring: &mut dyn Ring) {
        self.post_header_recv(ring);
    }

    fn read(&mut self, io: &IoDesc, buf: IoBuf, ring: &mut dyn Ring) -> Outcome {
        self.start_request(io, buf, ring)
    }
    fn write(&mut self, io: &IoDesc, buf: IoBuf, ring: &mut dyn Ring) -> Outcome {
        self.start_request(io, buf, ring)
    }
    fn flush(&mut self, io: &IoDesc, ring: &mut dyn Ring) -> Outcome {
        self.start_request(io, IoBuf::None, ring)
    }
    fn discard(&mut self, io: &IoDesc, ring: &mut dyn Ring) -> Outcome {
        self.start_request(io, IoBuf::None, ring)
    }
    fn write_zeroes(&mut self, io: &IoDesc, ring: &mut dyn Ring) -> Outcome {
        self.start_request(io, IoBuf::None, ring)
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
        let current = self.link == Link::Up && generation == (self.generation & 0x0fff);
        let retry = res == -libc::EAGAIN || res == -libc::EINTR;
        let done = |q: &mut Self| q.sqe_done(tag).map_or(Outcome::Queued, Outcome::Done);
        match kind {
            STEP_SEND_BATCH if current && self.sending == Some(tag) && self.batch_len > 0 => {
                self.tags[t].sqes = self.tags[t].sqes.saturating_sub(1);
                let expected = std::mem::take(&mut self.batch_len);
                if res < 0 || res as usize != expected {
                    // MSG_WAITALL: anything but all of it means the socket is in trouble.
                    let why = if res < 0 {
                        io::Error::from_raw_os_error(-res).to_string()
                    } else {
                        format!("{res} of {expected} bytes")
                    };
                    self.connection_lost(&format!("send: {why}"), ring);
                    return self.take_result_if_idle(tag);
                }
                self.sending = None;
                self.pump_send(ring);
                self.take_result_if_idle(tag)
            }
            STEP_SEND if current && self.sending == Some(tag) => {
                self.tags[t].sqes = self.tags[t].sqes.saturating_sub(1);
                if retry {
                    self.send_next(tag, ring);
                    return Outcome::Queued;
                }
                if res <= 0 {
                    let why = socket_failure(res, "send returned 0");
                    self.connection_lost(&format!("send: {why}"), ring);
                    return self.take_result_if_idle(tag);
                }
                self.tags[t].sent += res as usize;
                let payload = payload_len(io);
                if self.tags[t].sent < proto::REQUEST_LEN + payload {
                    self.send_next(tag, ring);
                    return Outcome::Queued;
                }
                self.sending = None;
                self.pump_send(ring);
                self.take_result_if_idle(tag)
            }
            STEP_RECV_PAYLOAD if current && self.payload_tag == Some(tag) => {
                self.tags[t].sqes = self.tags[t].sqes.saturating_sub(1);
                if retry {
                    self.post_payload_recv(tag, ring);
                    return Outcome::Queued;
                }
                if res <= 0 {
                    self.connection_lost(
                        "the server closed the connection in the middle of a read reply",
                        ring,
                    );
                    return self.take_result_if_idle(tag);
                }
                self.tags[t].got += res as usize;
                if self.tags[t].got < io.len as usize {
                    self.post_payload_recv(tag, ring);
                    return Outcome::Queued;
                }
                self.payload_tag = None;
                self.tags[t].result = Some(io.len as i32);
                self.post_header_recv(ring);
                self.take_result_if_idle(tag)
            }
            // A completion from a replaced or failed connection: only the bookkeeping.
            _ => done(self),
        }
    }

    fn event(&mut self, step_: u16, res: i32, ring: &mut dyn Ring) {
        let (kind, generation) = split_step(step_);
        if kind == EVENT_RECONNECT {
            return self.reconnected(ring);
        }
        if kind != EVENT_RECV_HEADER
            || self.link != Link::Up
            || generation != (self.generation & 0x0fff)
        {
            return;
        }
        if res == -libc::EAGAIN || res == -libc::EINTR {
            return self.post_header_recv(ring);
        }
        if res <= 0 {
            let why = socket_failure(res, "the server closed the connection");
            return self.connection_lost(&why, ring);
        }
        self.reply_got += res as usize;
        if self.reply_got < proto::REPLY_LEN {
            return self.post_header_recv(ring);
        }
        self.header_done(ring);
    }
}

impl NbdQueue {
    /// The request's result if it has one and no SQE of it is in flight.
    fn take_result_if_idle(&mut self, tag: u16) -> Outcome {
        if self.tags[usize::from(tag)].sqes == 0 {
            self.take_result(tag).map_or(Outcome::Queued, Outcome::Done)
        } else {
            Outcome::Queued
        }
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
    fn steps_carry_the_generation() {
        for g in [0u16, 1, 0x0fff, 0x1000, 0xffff] {
            for k in [STEP_SEND, STEP_RECV_PAYLOAD, EVENT_RECONNECT] {
                assert_eq!(split_step(step(k, g)), (k, g & 0x0fff));
            }
        }
    }
}
