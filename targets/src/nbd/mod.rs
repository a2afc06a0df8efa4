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
//! and every request on it, and every later one, completes with -EIO, so `del` never
//! waits on a dead server. Reconnecting is not implemented yet.

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
use std::sync::atomic::{AtomicU8, Ordering};
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

fn connect_one(uri: &NbdUri) -> Result<(OwnedFd, ExportInfo), NbdError> {
    let u = uri.to_string();
    let connect_err = |source| NbdError::Connect {
        uri: u.clone(),
        source,
    };
    let hs_err = |source| NbdError::Handshake {
        uri: u.clone(),
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
                    Ok(mut s) => {
                        s.set_nodelay(true).map_err(connect_err)?;
                        s.set_read_timeout(Some(CONNECT_TIMEOUT))
                            .map_err(connect_err)?;
                        s.set_write_timeout(Some(CONNECT_TIMEOUT))
                            .map_err(connect_err)?;
                        let info = proto::handshake(&mut s, &uri.export).map_err(hs_err)?;
                        s.set_read_timeout(None).map_err(connect_err)?;
                        s.set_write_timeout(None).map_err(connect_err)?;
                        return Ok((s.into(), info));
                    }
                    Err(e) => last = e,
                }
            }
            Err(connect_err(last))
        }
        Address::Unix(path) => {
            let mut s = UnixStream::connect(path).map_err(connect_err)?;
            s.set_read_timeout(Some(CONNECT_TIMEOUT))
                .map_err(connect_err)?;
            s.set_write_timeout(Some(CONNECT_TIMEOUT))
                .map_err(connect_err)?;
            let info = proto::handshake(&mut s, &uri.export).map_err(hs_err)?;
            s.set_read_timeout(None).map_err(connect_err)?;
            s.set_write_timeout(None).map_err(connect_err)?;
            Ok((s.into(), info))
        }
    }
}

pub struct NbdTarget {
    uri: NbdUri,
    info: ExportInfo,
    /// One connection per queue, taken by the queue's handler.
    conns: Mutex<Vec<Option<OwnedFd>>>,
    states: Vec<Arc<AtomicU8>>,
}

impl NbdTarget {
    /// Connects `connections` times (one per queue) and negotiates the export.
    pub fn connect(uri: &NbdUri, connections: u16, block_size: u32) -> Result<Self, NbdError> {
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
                _ => "failed",
            })
            .collect();
        vec![
            ("uri".into(), self.uri.to_string()),
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
        Ok(Box::new(NbdQueue {
            fd: types::Fd(sock.as_raw_fd()),
            sock,
            state,
            uri: self.uri.to_string(),
            headers: vec![[0; proto::REQUEST_LEN]; depth],
            tags: vec![TagIo::default(); depth],
            send_queue: VecDeque::new(),
            sending: None,
            reply: Box::new([0; proto::REPLY_LEN]),
            reply_got: 0,
            payload_tag: None,
            dead: false,
        }))
    }
}

/// Labels of the SQEs this target pushes.
const STEP_SEND: u16 = 1;
const STEP_RECV_PAYLOAD: u16 = 2;
const EVENT_RECV_HEADER: u16 = 1;

#[derive(Debug, Clone, Copy, Default)]
struct TagIo {
    io: Option<IoDesc>,
    buf: Option<IoBuf>,
    /// Bytes of header + payload sent.
    sent: usize,
    /// SQEs of this request in flight.
    sqes: u32,
    /// The request's reply, kept until its own SQEs have all completed.
    result: Option<i32>,
    /// Bytes of a read's payload received.
    got: usize,
}

struct NbdQueue {
    sock: OwnedFd,
    fd: types::Fd,
    state: Arc<AtomicU8>,
    uri: String,
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
    dead: bool,
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

impl NbdQueue {
    /// Queues request `io` for sending.
    fn start_request(&mut self, io: &IoDesc, buf: IoBuf, ring: &mut dyn Ring) -> Outcome {
        if self.dead {
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
        self.tags[t] = TagIo {
            io: Some(*io),
            buf: Some(buf),
            ..TagIo::default()
        };
        self.send_queue.push_back(io.tag);
        self.pump_send(ring);
        if self.dead {
            // The send could not even start: the connection is gone.
            return self
                .take_result(io.tag)
                .map_or(Outcome::Queued, Outcome::Done);
        }
        Outcome::Queued
    }

    /// Starts the next send if the connection's send slot is free.
    fn pump_send(&mut self, ring: &mut dyn Ring) {
        while self.sending.is_none() && !self.dead {
            let Some(tag) = self.send_queue.pop_front() else {
                return;
            };
            self.sending = Some(tag);
            if !self.send_next(tag, ring) {
                return;
            }
        }
    }

    /// Pushes the next piece of `tag`'s request. Returns false when the ring was full
    /// (the request goes back to the front of the send queue).
    fn send_next(&mut self, tag: u16, ring: &mut dyn Ring) -> bool {
        let t = usize::from(tag);
        let Some(io) = self.tags[t].io else {
            return false;
        };
        let sent = self.tags[t].sent;
        let payload = if matches!(io.op, BlockOp::Write) {
            io.len as usize
        } else {
            0
        };
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
        match unsafe { ring.push(tag, STEP_SEND, sqe) } {
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
        if self.dead {
            return;
        }
        let at = self.reply[self.reply_got..].as_mut_ptr();
        let sqe =
            opcode::Recv::new(self.fd, at, (proto::REPLY_LEN - self.reply_got) as u32).build();
        // SAFETY: `reply` is boxed and owned by this handler, which lives as long as the
        // queue's ring.
        if unsafe { ring.push_event(EVENT_RECV_HEADER, sqe) }.is_err() {
            self.fail("the ring is full: cannot post the reply receive", ring);
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
            _ => return self.fail("a read reply for a request without a buffer", ring),
        };
        // SAFETY: the request's buffer stays valid until the request is finished, which
        // waits for this SQE's completion.
        match unsafe { ring.push(tag, STEP_RECV_PAYLOAD, sqe) } {
            Ok(()) => self.tags[t].sqes += 1,
            Err(_) => self.fail("the ring is full: cannot post a payload receive", ring),
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

    /// A reply header is complete: match it to its request.
    fn header_done(&mut self, ring: &mut dyn Ring) {
        self.reply_got = 0;
        let reply = match proto::parse_reply(&self.reply) {
            Ok(r) => r,
            Err(e) => return self.fail(&format!("bad reply: {e}"), ring),
        };
        let tag = reply.cookie;
        let known = usize::try_from(tag)
            .ok()
            .and_then(|t| self.tags.get(t))
            .is_some_and(|t| t.io.is_some() && t.result.is_none());
        if !known {
            return self.fail(&format!("reply with unknown cookie {tag:#x}"), ring);
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

    /// The connection is unusable: shut it down and fail every request on it.
    fn fail(&mut self, why: &str, ring: &mut dyn Ring) {
        if !self.dead {
            log::error!(
                "{}: connection failed: {why}; failing its requests with EIO",
                self.uri
            );
            self.dead = true;
            self.state.store(CONN_FAILED, Ordering::Relaxed);
            // Pending receives and sends complete (with errors) once the socket is down.
            // SAFETY: shutdown on a socket we own.
            unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
        }
        self.send_queue.clear();
        self.sending = None;
        self.payload_tag = None;
        for tag in 0..self.tags.len() as u16 {
            let t = &self.tags[usize::from(tag)];
            if t.io.is_some() && t.result.is_none() {
                self.settle(tag, -libc::EIO, ring);
            }
        }
    }

    /// Bookkeeping for a completed SQE of `tag`'s; returns the request's result when it
    /// can finish now.
    fn sqe_done(&mut self, tag: u16) -> Option<i32> {
        let t = &mut self.tags[usize::from(tag)];
        t.sqes = t.sqes.saturating_sub(1);
        if t.sqes == 0 {
            self.take_result(tag)
        } else {
            None
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
        step: u16,
        res: i32,
        ring: &mut dyn Ring,
    ) -> Outcome {
        let tag = io.tag;
        let t = usize::from(tag);
        match step {
            STEP_SEND => {
                if self.dead || self.sending != Some(tag) {
                    // Completed after the connection failed.
                } else if res == -libc::EAGAIN || res == -libc::EINTR {
                    self.tags[t].sqes = self.tags[t].sqes.saturating_sub(1);
                    self.send_next(tag, ring);
                    return Outcome::Queued;
                } else if res <= 0 {
                    self.tags[t].sqes = self.tags[t].sqes.saturating_sub(1);
                    let why = if res == 0 {
                        "send returned 0".into()
                    } else {
                        io::Error::from_raw_os_error(-res).to_string()
                    };
                    self.fail(&format!("send: {why}"), ring);
                    return self.take_result(tag).map_or(Outcome::Queued, Outcome::Done);
                } else {
                    self.tags[t].sent += res as usize;
                    let payload = if matches!(io.op, BlockOp::Write) {
                        io.len as usize
                    } else {
                        0
                    };
                    if self.tags[t].sent < proto::REQUEST_LEN + payload {
                        self.tags[t].sqes -= 1;
                        self.send_next(tag, ring);
                        return Outcome::Queued;
                    }
                    self.sending = None;
                    let out = self.sqe_done(tag);
                    self.pump_send(ring);
                    return out.map_or(Outcome::Queued, Outcome::Done);
                }
                self.sqe_done(tag).map_or(Outcome::Queued, Outcome::Done)
            }
            STEP_RECV_PAYLOAD => {
                if self.dead || self.payload_tag != Some(tag) {
                    return self.sqe_done(tag).map_or(Outcome::Queued, Outcome::Done);
                }
                if res == -libc::EAGAIN || res == -libc::EINTR {
                    self.tags[t].sqes -= 1;
                    self.post_payload_recv(tag, ring);
                    return Outcome::Queued;
                }
                if res <= 0 {
                    self.tags[t].sqes = self.tags[t].sqes.saturating_sub(1);
                    self.fail(
                        "the server closed the connection in the middle of a read reply",
                        ring,
                    );
                    return self.take_result(tag).map_or(Outcome::Queued, Outcome::Done);
                }
                self.tags[t].got += res as usize;
                if self.tags[t].got < io.len as usize {
                    self.tags[t].sqes -= 1;
                    self.post_payload_recv(tag, ring);
                    return Outcome::Queued;
                }
                self.payload_tag = None;
                self.tags[t].result = Some(io.len as i32);
                self.post_header_recv(ring);
                self.sqe_done(tag).map_or(Outcome::Queued, Outcome::Done)
            }
            _ => Outcome::Done(-libc::EIO),
        }
    }

    fn event(&mut self, step: u16, res: i32, ring: &mut dyn Ring) {
        if step != EVENT_RECV_HEADER || self.dead {
            return;
        }
        if res == -libc::EAGAIN || res == -libc::EINTR {
            return self.post_header_recv(ring);
        }
        if res <= 0 {
            let why = if res == 0 {
                "the server closed the connection".to_string()
            } else {
                io::Error::from_raw_os_error(-res).to_string()
            };
            return self.fail(&why, ring);
        }
        self.reply_got += res as usize;
        if self.reply_got < proto::REPLY_LEN {
            return self.post_header_recv(ring);
        }
        self.header_done(ring);
    }
}

impl Drop for NbdQueue {
    fn drop(&mut self) {
        if !self.dead {
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
