//! The `nbd` target: a client of an NBD export (qemu-nbd, nbdkit, nbd-server, ...).
//!
//! Connections are made and negotiated (blocking, with timeouts) when the device is
//! added, one per hardware queue; more than one needs a server that advertises
//! multi-conn. After that each queue's handler uses only its queue's io_uring:
//!
//! - Requests queued while a send is in flight go out together as one linked chain of
//!   sends (`queue.rs`), so requests never interleave on the wire.
//! - Reply headers are received several at once when no read can be answered, else one
//!   at a time; the cookie is the tag. A read's payload is received straight into the
//!   request's buffer, linked with the next header's receive.
//! - In the zero-copy modes payloads move between the socket and the request's own
//!   registered pages (SEND_ZC, READ_FIXED); with daemon buffers, with SENDMSG/RECV.
//!
//! A connection that fails (EOF, error, a reply that breaks the protocol, no reply within
//! the request timeout) is shut down and reconnected in the background for up to the
//! reconnect timeout; requests without an answer are sent again on the new connection,
//! so applications see no error. After the timeout, or with the timeout 0, they and every
//! later one complete with -EIO. Before a resend the lost socket is closed with a reset,
//! so it cannot deliver the rest of a timed-out write after the resend (`queue.rs`).
//!
//! Connecting and the handshake share one deadline (CONNECT_TIMEOUT), at add and at each
//! reconnect. Deleting the device (`stopping`) keeps serving while the kernel drains it,
//! and aborts (fails what is left with -EIO, stops a reconnect and its handshake) once a
//! connection is down or after the drain grace, so `del` never waits on a dead server
//! and a slow one still gets the final writeback.

mod fixed_send;
pub mod proto;
mod queue;
mod relay;
pub mod tls;
#[cfg(test)]
mod tls_tests;
pub mod uri;

use crate::{DeviceShape, QueueContext, QueueTarget, Target};
use proto::{ExportInfo, HandshakeError};
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
pub use uri::{Address, NbdUri};

/// How long connecting and the whole handshake may take, at add and at each reconnect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request may wait for its reply before the connection counts as lost.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the drain watchdog (see `NbdTarget::stopping`) looks at the connections.
const DRAIN_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Error)]
pub enum NbdError {
    #[error("{0}")]
    Uri(#[from] uri::UriError),
    #[error("cannot connect to {uri}: {source}")]
    Connect { uri: String, source: io::Error },
    #[error("{uri}: {source}")]
    Handshake { uri: String, source: HandshakeError },
    #[error("{uri}: {source}")]
    Tls { uri: String, source: tls::TlsError },
    #[error("{uri}: the server does not advertise multi-conn, so the device can have only one queue (use --queues 1)")]
    NoMultiConn { uri: String },
    #[error("{uri}: the export needs a block size of at least {min} (use --block-size 4096)")]
    BlockSize { uri: String, min: u32 },
    #[error("{uri}: the server takes requests of at most {max} bytes, less than the device's block size or the kernel's smallest limit of 4096 bytes")]
    MaxBlockSize { uri: String, max: u32 },
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

/// How often a handshake that is waiting for the server checks `abort`.
const HANDSHAKE_POLL: Duration = Duration::from_millis(100);

/// A stream whose reads and writes fail once `deadline` has passed or `abort` is set:
/// connecting and the whole handshake share one deadline, however slowly the server
/// trickles its bytes, and deleting the device stops a reconnect's handshake.
struct Bounded<'a, S> {
    s: S,
    deadline: Instant,
    abort: &'a AtomicBool,
}

impl<S: Stream> Bounded<'_, S> {
    fn run<T>(&mut self, mut op: impl FnMut(&mut S) -> io::Result<T>) -> io::Result<T> {
        loop {
            if self.abort.load(Ordering::Acquire) {
                return Err(io::Error::other("the device is being deleted"));
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the server did not finish the NBD handshake within {} s",
                        CONNECT_TIMEOUT.as_secs()
                    ),
                ));
            }
            self.s.set_timeouts(Some(left.min(HANDSHAKE_POLL)))?;
            match op(&mut self.s) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                r => return r,
            }
        }
    }
}

impl<S: Stream> io::Read for Bounded<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.run(|s| s.read(buf))
    }
}

impl<S: Stream> io::Write for Bounded<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.run(|s| s.write(buf))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.run(|s| s.flush())
    }
}

/// Runs the handshake on `s` until `deadline`, then hands the socket over. With `tls`
/// (nbds), NBD_OPT_STARTTLS and the TLS handshake come first, the options go over TLS,
/// and the queue gets its end of the session's relay (`relay.rs`).
fn negotiate<S: Stream>(
    s: S,
    uri: &NbdUri,
    tls: Option<(Arc<rustls::ClientConfig>, &uri::TlsParams)>,
    deadline: Instant,
    abort: &AtomicBool,
) -> Result<(OwnedFd, ExportInfo), NbdError> {
    let u = uri.to_string();
    let hs = |source| NbdError::Handshake {
        uri: u.clone(),
        source,
    };
    let tls_err = |source| NbdError::Tls {
        uri: u.clone(),
        source,
    };
    let mut b = Bounded { s, deadline, abort };
    let greeting = proto::greet(&mut b).map_err(hs)?;
    let Some((config, params)) = tls else {
        let info = proto::options(&mut b, &uri.export, greeting).map_err(hs)?;
        b.s.set_timeouts(None)
            .map_err(|source| NbdError::Connect { uri: u, source })?;
        return Ok((b.s.into(), info));
    };
    proto::starttls(&mut b, greeting).map_err(hs)?;
    let mut conn = tls::connection(config, params, &uri.address).map_err(tls_err)?;
    tls::handshake(&mut conn, &mut b).map_err(tls_err)?;
    let info = match proto::options(
        &mut rustls::Stream::new(&mut conn, &mut b),
        &uri.export,
        greeting,
    ) {
        Ok(info) => info,
        Err(e) => {
            let why = match &e {
                HandshakeError::Io(io) => tls::refusal(&mut conn, &mut b, io),
                _ => None,
            };
            return Err(match why {
                Some(why) => tls_err(tls::TlsError::Handshake(why)),
                None => hs(e),
            });
        }
    };
    b.s.set_timeouts(None).map_err(|source| NbdError::Connect {
        uri: u.clone(),
        source,
    })?;
    let fd = relay::start(b.s.into(), conn).map_err(tls_err)?;
    Ok((fd, info))
}

/// Connects and negotiates within CONNECT_TIMEOUT in all; gives up when `abort` is set.
fn connect_one(uri: &NbdUri, abort: &AtomicBool) -> Result<(OwnedFd, ExportInfo), NbdError> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let connect_err = |source| NbdError::Connect {
        uri: uri.to_string(),
        source,
    };
    // Credentials are read before connecting: a missing file needs no server to tell.
    let tls = match &uri.tls {
        Some(params) => {
            let config =
                tls::client_config(params, &uri.address).map_err(|source| NbdError::Tls {
                    uri: uri.to_string(),
                    source,
                })?;
            Some((config, params))
        }
        None => None,
    };
    match &uri.address {
        Address::Tcp { host, port } => {
            let addrs: Vec<_> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(connect_err)?
                .collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "host has no address");
            for addr in addrs {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || abort.load(Ordering::Acquire) {
                    break;
                }
                match TcpStream::connect_timeout(&addr, left) {
                    Ok(s) => {
                        s.set_nodelay(true).map_err(connect_err)?;
                        return negotiate(s, uri, tls, deadline, abort);
                    }
                    Err(e) => last = e,
                }
            }
            Err(connect_err(last))
        }
        Address::Unix(path) => negotiate(
            UnixStream::connect(path).map_err(connect_err)?,
            uri,
            tls,
            deadline,
            abort,
        ),
    }
}

/// Fails every request still waiting on the server: sets `abort` and wakes the queues.
fn abort_all(abort: &AtomicBool, wakes: &Mutex<Vec<OwnedFd>>) {
    abort.store(true, Ordering::Release);
    let one = 1u64.to_ne_bytes();
    for w in wakes.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        // SAFETY: writing 8 bytes from a live buffer to an eventfd we own.
        unsafe { libc::write(w.as_raw_fd(), one.as_ptr().cast(), one.len()) };
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
    request_timeout: Duration,
    /// The queues' wake-up eventfds (see `abort`).
    wakes: Arc<Mutex<Vec<OwnedFd>>>,
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
        let no_abort = AtomicBool::new(false);
        let (first, info) = connect_one(uri, &no_abort)?;
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
        let mut conns = vec![Some(first)];
        for n in 1..usize::from(connections) {
            let (fd, other) = connect_one(uri, &no_abort)?;
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
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            wakes: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// Sets how long a request may wait for its reply before the connection counts as
    /// lost (zero: no limit).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
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
                match &self.uri.tls {
                    None => "no",
                    Some(_) => "yes (rustls, relayed by ublkd)",
                }
                .into(),
            ),
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
        Ok(Box::new(queue::NbdQueue::new(
            sock,
            depth,
            state,
            self.uri.clone(),
            self.info,
            self.reconnect_timeout,
            self.request_timeout,
            self.abort.clone(),
            wake,
            Arc::new(Mutex::new(None)),
            queue::PayloadSends {
                // With TLS the queue's socket is its end of the relay's socket pair.
                zc: matches!(self.uri.address, Address::Tcp { .. }) && self.uri.tls.is_none(),
                fixed: fixed_send::supported(),
            },
            ctx.user_copy_fd.map(|fd| (fd, ctx.qid)),
        )))
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

/// What the reconnect thread hands back: a negotiated socket, or why it gave up.
type Handoff = Arc<Mutex<Option<Result<OwnedFd, String>>>>;

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
            // The device's requests wait on this thread: it must not wait on them.
            if let Err(e) = crate::io_flusher() {
                log::warn!("{uri}: {e}");
            }
            let deadline = std::time::Instant::now() + timeout;
            let mut delay = Duration::from_millis(100);
            let result = loop {
                if abort.load(Ordering::Acquire) {
                    break Err("the device is being deleted".to_string());
                }
                match connect_one(&uri, &abort) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server that accepts and then sends a byte of its greeting every 500 ms (none
    /// when `mute`), for `secs`.
    fn slow_server(secs: u64, mute: bool) -> NbdUri {
        use std::io::Write;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            for b in b"NBDMAGICIHAVEOPT".iter().cycle().take(2 * secs as usize) {
                if !mute {
                    let _ = c.write_all(&[*b]);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        format!("nbd://127.0.0.1:{port}/x").parse().unwrap()
    }

    #[test]
    fn deleting_stops_a_handshake_that_hangs() {
        let uri = slow_server(5, true);
        let abort = Arc::new(AtomicBool::new(false));
        let a = abort.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            a.store(true, Ordering::Release);
        });
        let started = Instant::now();
        let err = connect_one(&uri, &abort).unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(1), "{err}");
        assert!(err.contains("the device is being deleted"), "{err}");
    }

    #[test]
    fn the_handshake_has_one_deadline() {
        // Trickling: every read gets a byte in time, the handshake as a whole does not.
        let uri = slow_server(CONNECT_TIMEOUT.as_secs() + 5, false);
        let started = Instant::now();
        let err = connect_one(&uri, &AtomicBool::new(false))
            .unwrap_err()
            .to_string();
        let took = started.elapsed();
        assert!(
            took >= CONNECT_TIMEOUT && took < CONNECT_TIMEOUT + Duration::from_secs(1),
            "{took:?}"
        );
        assert!(
            err.contains("did not finish the NBD handshake within 10 s"),
            "{err}"
        );
    }
}
