//! The `nbd` target: a client of an NBD export (qemu-nbd, nbdkit, nbd-server, ...).
//!
//! Connections are made and negotiated (blocking, with timeouts; `connect.rs`) when the
//! device is added, one per hardware queue; more than one needs a server that
//! advertises multi-conn. After that each queue's handler (`queue.rs`) uses only its
//! queue's io_uring:
//!
//! - Requests queued while a send is in flight go out together as one linked chain of
//!   sends (`send.rs`), so requests never interleave on the wire.
//! - Replies are received into a staging buffer, many at once, and a small read's
//!   payload is copied from there into the request's buffer; a large read's payload is
//!   received straight into the request's buffer, and while such a read may answer a
//!   receive takes one header at a time. The cookie is the tag. One receive is in
//!   flight at a time: receives are never linked (`recv.rs`).
//! - In the zero-copy modes payloads move between the socket and the request's own
//!   registered pages (SEND, SEND_ZC, READ_FIXED; small ones are copied with user copy:
//!   `fixed_send.rs`); with daemon buffers, with SENDMSG/RECV.
//!
//! A connection that fails (EOF, error, a reply that breaks the protocol, no reply within
//! the request timeout) is shut down and reconnected in the background for up to the
//! reconnect timeout (`conn.rs`); requests without an answer are sent again on the new
//! connection, so applications see no error. After the timeout, or with the timeout 0,
//! they and every later one complete with -EIO. Before a resend the lost socket is
//! closed with a reset, so it cannot deliver the rest of a timed-out write after the
//! resend (`Connection::close_old`).
//!
//! Connecting and the handshake share one deadline (CONNECT_TIMEOUT), at add and at each
//! reconnect. Deleting the device (`stopping`) keeps serving while the kernel drains it,
//! and aborts (fails what is left with -EIO, stops a reconnect and its handshake) once a
//! connection is down or after the drain grace, so `del` never waits on a dead server
//! and a slow one still gets the final writeback.

mod conn;
mod connect;
mod durable;
mod fixed_io;
mod fixed_send;
mod ktls;
mod psk;
mod psk_relay;
mod queue;
mod recv;
mod relay;
mod segs;
mod send;
mod step;
mod tags;
#[cfg(test)]
mod tests;
pub mod tls;
#[cfg(test)]
#[path = "tests/tls.rs"]
mod tls_tests;

use crate::{DeviceShape, QueueContext, QueueTarget, Target};
use conn::{Connection, CONN_RECONNECTING, CONN_UP};
use connect::connect_one;
pub use connect::NbdError;
use proto::ExportInfo;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
// The wire format and URIs live in ublkd-proto (pure parsers, shared with the fuzzers).
pub use ublkd_proto::nbd::{proto, uri};
pub use uri::{Address, NbdUri};

/// How long a request may wait for its reply before the connection counts as lost.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the drain watchdog (see `NbdTarget::stopping`) looks at the connections.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Fails every request still waiting on the server: sets `abort` and wakes the queues.
fn abort_all(abort: &AtomicBool, wakes: &Mutex<Vec<OwnedFd>>) {
    abort.store(true, Ordering::Release);
    let one = 1u64.to_ne_bytes();
    for w in wakes.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        // SAFETY: writing 8 bytes from a live buffer to an eventfd we own.
        unsafe { libc::write(w.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

/// Whether `uri`'s connections are kernel TLS sockets (nbds:// over TCP).
fn kernel_tls(uri: &NbdUri) -> bool {
    uri.tls.is_some() && matches!(uri.address, Address::Tcp { .. })
}

pub struct NbdTarget {
    uri: NbdUri,
    info: ExportInfo,
    /// With TLS, how the session runs (`show`).
    tls: Option<String>,
    /// How send chains go out: one SQE at a time on kernel TLS sockets, which refuse
    /// MSG_WAITALL sends (`send.rs`).
    pace: send::Pace,
    reconnect_timeout: Duration,
    /// Set when the device is being deleted: stop waiting for the server.
    abort: Arc<AtomicBool>,
    /// One connection per queue, taken by the queue's handler.
    conns: Mutex<Vec<Option<OwnedFd>>>,
    states: Vec<Arc<AtomicU8>>,
    /// Successful reconnects of all the device's connections (`ublkctl stats`).
    reconnects: Arc<AtomicU64>,
    request_timeout: Duration,
    /// The queues' wake-up eventfds (see `abort`).
    wakes: Arc<Mutex<Vec<OwnedFd>>>,
    /// The device is write-through although the server caches (a recovered device,
    /// see [`Target::write_through`]): every write is made durable before it completes.
    every_write: AtomicBool,
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
        let no_abort = Arc::new(AtomicBool::new(false));
        let first = connect_one(uri, &no_abort)?;
        let (info, tls) = (first.info, first.tls);
        if connections > 1 && !info.has(proto::TFLAG_CAN_MULTI_CONN) {
            return Err(NbdError::NoMultiConn { uri: u });
        }
        if let Some((min, _, max)) = info.block_size {
            if min > block_size {
                return Err(NbdError::BlockSize { uri: u, min });
            }
            if max < block_size.max(4096) {
                return Err(NbdError::MaxBlockSize { uri: u, max });
            }
        }
        if info.size % u64::from(block_size) != 0 {
            return Err(NbdError::SizeNotAligned {
                uri: u,
                size: info.size,
                block_size,
            });
        }
        let mut conns = vec![Some(first.sock)];
        for n in 1..usize::from(connections) {
            let next = connect_one(uri, &no_abort)?;
            let other = next.info;
            if other.size != info.size || other.flags != info.flags {
                return Err(NbdError::Mismatch {
                    uri: u,
                    n,
                    size: other.size,
                    flags: other.flags,
                });
            }
            conns.push(Some(next.sock));
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
            tls,
            pace: if kernel_tls(uri) {
                send::Pace::OneByOne {
                    record_limit: send::RECORD_LIMIT,
                }
            } else {
                send::Pace::Linked
            },
            reconnect_timeout,
            abort: Arc::new(AtomicBool::new(false)),
            states: (0..connections)
                .map(|_| Arc::new(AtomicU8::new(CONN_UP)))
                .collect(),
            reconnects: Arc::new(AtomicU64::new(0)),
            conns: Mutex::new(conns),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            wakes: Arc::new(Mutex::new(Vec::new())),
            every_write: AtomicBool::new(false),
        })
    }

    /// Sets how long a request may wait for its reply before the connection counts as
    /// lost (zero: no limit).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sends one SQE at a time, as on a kernel TLS socket, over a plain one, renewing
    /// the connection after `record_limit` records (the unit tests, on a host without
    /// kernel TLS).
    #[cfg(test)]
    fn one_send_at_a_time(mut self, record_limit: u64) -> Self {
        self.pace = send::Pace::OneByOne { record_limit };
        self
    }

    /// How the queues make requests durable on this server.
    fn durability(&self) -> durable::Durability {
        durable::Durability {
            flush: self.info.has(proto::TFLAG_SEND_FLUSH),
            fua: self.info.has(proto::TFLAG_SEND_FUA),
            every_write: self.every_write.load(Ordering::Relaxed),
        }
    }

    /// How long deleting the device waits for a connected server to answer what the
    /// kernel still writes back: the request timeout, or the default when that is 0.
    pub fn drain_grace(&self) -> Duration {
        if self.request_timeout.is_zero() {
            DEFAULT_REQUEST_TIMEOUT
        } else {
            self.request_timeout
        }
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
            (
                "request timeout".into(),
                format!("{} s", self.request_timeout.as_secs()),
            ),
            ("connections".into(), states.join(", ")),
            (
                "tls".into(),
                match &self.tls {
                    None => "no".into(),
                    Some(how) => format!("yes: {how}"),
                },
            ),
            ("server flags".into(), format!("{:#x}", i.flags)),
            ("multi-conn".into(), yes(proto::TFLAG_CAN_MULTI_CONN)),
            ("flush".into(), yes(proto::TFLAG_SEND_FLUSH)),
            ("write cache".into(), self.durability().describe()),
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

    /// Small reads' replies are received many at a time and copied into the requests.
    fn copies_in(&self) -> bool {
        true
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
        self.wakes
            .lock()
            .map_err(|_| io::Error::other("wake-up table poisoned"))?
            .push(wake.try_clone()?);
        // SEND_ZC only on plain TCP: a Unix socket copies anyway, and kernel TLS refuses it
        // (it encrypts into pages of its own).
        let tcp = matches!(self.uri.address, Address::Tcp { .. }) && self.uri.tls.is_none();
        let sends = fixed_send::PayloadSends::for_connection(sock.as_fd(), tcp);
        let conn = Connection::new(
            sock,
            state,
            self.uri.clone(),
            self.info,
            self.reconnect_timeout,
            self.abort.clone(),
            wake,
        )
        .count_reconnects_in(self.reconnects.clone());
        Ok(Box::new(
            queue::NbdQueue::new(
                conn,
                depth,
                self.request_timeout,
                sends,
                self.pace,
                ctx.user_copy,
                ctx.staging_index,
            )?
            .with_durability(self.durability()),
        ))
    }

    /// The server now caches writes, but the kernel's device (recovered) was created
    /// write-through, when it did not: each write is sent with FUA, or followed by a
    /// flush, before it completes.
    fn write_through(&self) -> bool {
        self.every_write.store(true, Ordering::Relaxed);
        true
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("reconnects", self.reconnects.load(Ordering::Relaxed))]
    }

    fn max_io_bytes(&self) -> Option<u32> {
        self.info.block_size.map(|(_, _, max)| max)
    }

    fn optimal_io_bytes(&self) -> Option<u32> {
        self.info.block_size.map(|(_, preferred, _)| preferred)
    }

    /// Keeps serving while the kernel drains the device (its writeback of dirty pages
    /// goes to the server), and aborts once a connection is down (reconnecting or
    /// failed: the server is unreachable) or after the drain grace.
    fn stopping(&self) {
        let grace = self.drain_grace();
        let (abort, wakes, states) = (self.abort.clone(), self.wakes.clone(), self.states.clone());
        let uri = self.uri.clone();
        let watch = move || {
            let started = Instant::now();
            while !abort.load(Ordering::Acquire) {
                let down = states.iter().any(|s| s.load(Ordering::Relaxed) != CONN_UP);
                let late = started.elapsed() >= grace;
                if down || late {
                    if late {
                        log::warn!(
                            "{uri}: the device is being deleted and the server has not answered everything within {} s: failing what is left with EIO",
                            grace.as_secs()
                        );
                    }
                    return abort_all(&abort, &wakes);
                }
                std::thread::sleep(DRAIN_POLL);
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("nbd-drain".into())
            .spawn(watch)
        {
            log::error!("{}: cannot start the drain watchdog: {e}", self.uri);
            self.abort();
        }
    }

    fn abort(&self) {
        // Wake every queue: requests a server leaves unanswered must not hold up `del`.
        abort_all(&self.abort, &self.wakes);
    }
}
