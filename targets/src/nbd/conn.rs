//! One queue's connection to the server: the socket and its generation, its state as
//! `show` sees it, and reconnecting in the background (backoff until the reconnect
//! timeout, the handoff of the new socket, the wake-up of the queue's ring).
//!
//! The queue asks and this answers: `lost` says whether to reconnect or give up,
//! `take_reconnected` what the reconnect thread brought. Which requests are resent or
//! failed is the queue's business.

use super::connect::connect_one;
use super::proto::{self, ExportInfo};
use super::step::EVENT_WAKE;
use super::uri::NbdUri;
use crate::Ring;
use io_uring::{opcode, types};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Connection state, shared between a queue's handler and `show`.
pub(super) const CONN_UP: u8 = 0;
pub(super) const CONN_FAILED: u8 = 1;
pub(super) const CONN_RECONNECTING: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Link {
    Up,
    Reconnecting,
    Failed,
}

/// Why a part of the queue cannot go on with the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Broken {
    /// Reconnect and resend (`NbdQueue::connection_lost`).
    Lost(String),
    /// Fail every request on it (`NbdQueue::give_up`).
    Failed(String),
}

/// What `lost` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterLoss {
    /// The connection was not up: nothing to do.
    Nothing,
    /// Reconnecting is off or the device is going away: give up.
    GiveUp,
    /// Reconnecting: the queue resends, then calls `start_reconnect`.
    Reconnect,
}

/// What the reconnect thread brought (`take_reconnected`).
#[derive(Debug)]
pub(super) enum Reconnected {
    /// Nothing, or nothing that matters any more.
    Nothing,
    /// The new socket is in use: resend.
    Up,
    /// It gave up, for this reason.
    GaveUp(String),
}

/// What the reconnect thread hands back: a negotiated socket, or why it gave up.
type Handoff = Arc<Mutex<Option<Result<OwnedFd, String>>>>;

pub(super) struct Connection {
    sock: OwnedFd,
    /// The lost connection's socket after a reconnect, shut down, closed once none of
    /// its SQEs is in flight; nothing is resent before (see `close_old`).
    old_sock: Option<OwnedFd>,
    fd: types::Fd,
    generation: u16,
    link: Link,
    state: Arc<AtomicU8>,
    pub(super) uri: NbdUri,
    export: ExportInfo,
    reconnect_timeout: Duration,
    /// Set when the device is being deleted.
    abort: Arc<AtomicBool>,
    /// Wakes the ring: the reconnect thread is done, or the device is being deleted.
    wake: OwnedFd,
    wake_buf: Box<u64>,
    handoff: Handoff,
    /// The socket's SO_RCVLOWAT as last set (a new socket's is 1).
    lowat: usize,
    /// The socket is a Unix stream socket (a Unix address, or a TLS relay's socket pair),
    /// whose poll ignores SO_RCVLOWAT.
    unix: bool,
    /// The device's count of successful reconnects (`ublkctl stats`).
    reconnects: Arc<AtomicU64>,
}

impl Connection {
    pub(super) fn new(
        sock: OwnedFd,
        state: Arc<AtomicU8>,
        uri: NbdUri,
        export: ExportInfo,
        reconnect_timeout: Duration,
        abort: Arc<AtomicBool>,
        wake: OwnedFd,
    ) -> Self {
        Connection {
            fd: types::Fd(sock.as_raw_fd()),
            unix: is_unix(&sock),
            sock,
            old_sock: None,
            generation: 0,
            link: Link::Up,
            state,
            uri,
            export,
            reconnect_timeout,
            abort,
            wake,
            wake_buf: Box::new(0),
            handoff: Arc::new(Mutex::new(None)),
            lowat: 1,
            reconnects: Arc::default(),
        }
    }

    /// Counts this connection's successful reconnects into `reconnects` (the device's
    /// total, for `ublkctl stats`).
    pub(super) fn count_reconnects_in(mut self, reconnects: Arc<AtomicU64>) -> Self {
        self.reconnects = reconnects;
        self
    }

    /// Whether the socket is a kernel TLS one (nbds:// over TCP).
    pub(super) fn kernel_tls(&self) -> bool {
        super::kernel_tls(&self.uri)
    }

    /// Whether the socket is a Unix stream socket.
    pub(super) fn unix(&self) -> bool {
        self.unix
    }

    /// The socket, for SQEs.
    pub(super) fn fd(&self) -> types::Fd {
        self.fd
    }

    /// The generation of the current socket (it goes up by one at each reconnect).
    pub(super) fn generation(&self) -> u16 {
        self.generation
    }

    pub(super) fn link(&self) -> Link {
        self.link
    }

    /// Whether a completion of `generation` (its low 12 bits) belongs to the current
    /// connection, and that connection is up.
    pub(super) fn current(&self, generation: u16) -> bool {
        self.link == Link::Up && generation == (self.generation & 0x0fff)
    }

    /// Whether the device is being deleted.
    pub(super) fn aborting(&self) -> bool {
        self.abort.load(Ordering::Acquire)
    }

    /// Whether the lost connection's socket is still open: nothing may be sent yet.
    pub(super) fn closing_old(&self) -> bool {
        self.old_sock.is_some()
    }

    /// Shuts the connection down: pending receives and sends complete (with errors), the
    /// socket sends nothing more, and closing it later resets the connection (SO_LINGER
    /// 0) and drops whatever it still had queued for the server, such as the rest of a
    /// write that timed out, so that write cannot reach the server after its resend.
    fn shut_down(&self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let fd = self.sock.as_raw_fd();
        // SAFETY: setsockopt on a socket we own, reading one live struct.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        // SAFETY: shutdown on a socket we own.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }

    /// Closes the lost connection's socket once none of its SQEs is in flight (`idle`;
    /// they all complete soon after `shut_down`), so the kernel really closes it now (an
    /// SQE in flight holds the socket open) and resets the connection before any
    /// request is sent again on the new one.
    pub(super) fn close_old(&mut self, idle: bool) {
        if self.old_sock.is_some() && idle {
            self.old_sock = None;
        }
    }

    /// The connection broke (`why`): shuts it down and says what comes next. When that
    /// is reconnecting, the state says so from now on.
    pub(super) fn lost(&mut self, why: &str) -> AfterLoss {
        self.down(why, false)
    }

    /// The connection is to be replaced (`why`; a kernel TLS key that has done its
    /// work): as `lost`, logged as the plan it is.
    pub(super) fn renew(&mut self, why: &str) -> AfterLoss {
        self.down(why, true)
    }

    fn down(&mut self, why: &str, planned: bool) -> AfterLoss {
        if self.link != Link::Up {
            return AfterLoss::Nothing;
        }
        self.shut_down();
        // A planned renewal gets its one attempt even without reconnecting.
        if (self.reconnect_timeout.is_zero() && !planned) || self.aborting() {
            return AfterLoss::GiveUp;
        }
        if planned {
            log::info!("{}: {why}: a new connection, with new keys", self.uri);
        } else {
            log::error!(
                "{}: connection lost: {why}; reconnecting for up to {} s",
                self.uri,
                self.reconnect_timeout.as_secs()
            );
        }
        self.link = Link::Reconnecting;
        self.state.store(CONN_RECONNECTING, Ordering::Relaxed);
        AfterLoss::Reconnect
    }

    /// Starts the reconnect thread; Err when it cannot.
    pub(super) fn start_reconnect(&mut self) -> Result<(), String> {
        *self.handoff.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let wake = self
            .wake
            .try_clone()
            .map_err(|e| format!("cannot start reconnecting: {e}"))?;
        spawn_reconnect(
            self.uri.clone(),
            self.export,
            self.reconnect_timeout,
            self.abort.clone(),
            self.handoff.clone(),
            wake,
        );
        Ok(())
    }

    /// The connection is gone for good (`why`): shut down, and failed from now on.
    pub(super) fn give_up(&mut self, why: &str) {
        if self.link != Link::Failed {
            log::error!(
                "{}: connection failed: {why}; failing its requests with EIO",
                self.uri
            );
            self.shut_down();
        }
        self.link = Link::Failed;
        self.state.store(CONN_FAILED, Ordering::Relaxed);
    }

    /// Takes what the reconnect thread handed over: a new socket is put to use (the
    /// old one is kept until its SQEs are done, see `close_old`).
    pub(super) fn take_reconnected(&mut self) -> Reconnected {
        let result = self
            .handoff
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match result {
            None => Reconnected::Nothing,
            // Failed meanwhile (the device is being deleted): the socket just closes.
            Some(_) if self.link != Link::Reconnecting => Reconnected::Nothing,
            Some(Ok(sock)) => {
                self.fd = types::Fd(sock.as_raw_fd());
                self.unix = is_unix(&sock);
                self.old_sock = Some(std::mem::replace(&mut self.sock, sock));
                self.lowat = 1;
                self.generation = self.generation.wrapping_add(1);
                self.link = Link::Up;
                self.state.store(CONN_UP, Ordering::Relaxed);
                self.reconnects.fetch_add(1, Ordering::Relaxed);
                Reconnected::Up
            }
            Some(Err(why)) => Reconnected::GaveUp(why),
        }
    }

    /// Waits for the next wake-up (`EVENT_WAKE`).
    pub(super) fn arm_wake(&mut self, ring: &mut dyn Ring) {
        let buf: *mut u64 = &mut *self.wake_buf;
        let sqe = opcode::Read::new(types::Fd(self.wake.as_raw_fd()), buf.cast(), 8).build();
        // SAFETY: wake_buf is boxed and owned by this handler, which outlives the ring.
        if unsafe { ring.push_event(EVENT_WAKE, sqe) }.is_err() {
            log::error!("{}: the ring is full: cannot wait for wake-ups", self.uri);
        }
    }

    /// Sets the socket's SO_RCVLOWAT: how many bytes must be queued before it polls
    /// readable. Best effort: if the kernel refuses, receives only take more turns.
    pub(super) fn set_lowat(&mut self, n: usize) {
        if self.lowat == n {
            return;
        }
        let v = n as libc::c_int;
        // SAFETY: setsockopt on a socket we own, reading one live c_int.
        let r = unsafe {
            libc::setsockopt(
                self.sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            self.lowat = n;
        } else {
            log::debug!(
                "{}: SO_RCVLOWAT {n}: {}",
                self.uri,
                io::Error::last_os_error()
            );
        }
    }
}

impl Drop for Connection {
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
            let deadline = Instant::now() + timeout;
            let mut delay = Duration::from_millis(100);
            let result = loop {
                if abort.load(Ordering::Acquire) {
                    break Err("the device is being deleted".to_string());
                }
                match connect_one(&uri, &abort) {
                    Ok(n) if n.info.size == export.size && n.info.flags == export.flags => {
                        break Ok(n.sock)
                    }
                    Ok(n) => {
                        break Err(format!(
                            "the export changed (now {} bytes, flags {:#x})",
                            n.info.size, n.info.flags
                        ))
                    }
                    Err(e) => log::debug!("{uri}: reconnect attempt failed: {e}"),
                }
                let now = Instant::now();
                if now >= deadline {
                    break Err(format!(
                        "the server did not come back within {} s",
                        timeout.as_secs()
                    ));
                }
                let until = (now + delay).min(deadline);
                while Instant::now() < until && !abort.load(Ordering::Acquire) {
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

/// Whether `sock` is a Unix domain socket.
fn is_unix(sock: &OwnedFd) -> bool {
    use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};
    getsockname::<SockaddrStorage>(sock.as_raw_fd())
        .is_ok_and(|a| a.family() == Some(AddressFamily::Unix))
}
