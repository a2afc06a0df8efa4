//! Connecting to the server and the NBD handshake, with one deadline for both, at add
//! and at each reconnect; deleting the device stops a handshake that hangs.

use super::proto::{self, ExportInfo, HandshakeError};
use super::uri::{self, Address, NbdUri};
use super::{ktls, psk, psk_relay, relay, tls};
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// How long connecting and the whole handshake may take, at add and at each reconnect.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum NbdError {
    #[error("{0}")]
    Uri(#[from] uri::UriError),
    #[error("cannot connect to {uri}: {source}")]
    Connect { uri: String, source: io::Error },
    #[error("{uri}: {source}")]
    Handshake { uri: String, source: HandshakeError },
    #[error("{uri}: {source}")]
    Tls {
        uri: String,
        source: super::tls::TlsError,
    },
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

/// A negotiated connection, ready for the queue.
#[derive(Debug)]
pub(super) struct Negotiated {
    /// The socket the queue sends and receives on: the TCP or Unix socket, or with TLS
    /// over a Unix socket the queue's end of the relay.
    pub(super) sock: OwnedFd,
    pub(super) info: ExportInfo,
    /// With TLS, how the session runs ("kernel TLS, TLS 1.3, AES-256-GCM").
    pub(super) tls: Option<String>,
}

/// A connected stream the handshake can run on with timeouts.
trait Stream: io::Read + io::Write + Into<OwnedFd> + AsFd + Send + Sized + 'static {
    /// Whether kernel TLS can take the session (TCP; Unix sockets have none).
    const KTLS: bool;

    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()>;
    fn try_clone(&self) -> io::Result<Self>;
}

impl Stream for TcpStream {
    const KTLS: bool = true;
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
}

impl Stream for UnixStream {
    const KTLS: bool = false;
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
}

/// How often a handshake that is waiting for the server checks `abort`.
const HANDSHAKE_POLL: Duration = Duration::from_millis(100);

/// A stream whose reads and writes fail once `deadline` has passed or `abort` is set:
/// connecting and the whole handshake share one deadline, however slowly the server
/// trickles its bytes, and deleting the device stops a reconnect's handshake. Once
/// `relaying` (a PSK relay's session, after the handshake), reads and writes go
/// straight to the socket.
struct Bounded<S> {
    s: S,
    deadline: Instant,
    abort: Arc<AtomicBool>,
    relaying: bool,
}

impl<S: Stream> Bounded<S> {
    fn run<T>(&mut self, mut op: impl FnMut(&mut S) -> io::Result<T>) -> io::Result<T> {
        if self.relaying {
            return op(&mut self.s);
        }
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

impl<S: Stream> io::Read for Bounded<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.run(|s| s.read(buf))
    }
}

impl<S: Stream> io::Write for Bounded<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.run(|s| s.write(buf))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.run(|s| s.flush())
    }
}

impl<S: Stream> psk_relay::RelayIo for Bounded<S> {
    fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.s.as_fd().as_raw_fd()
    }

    fn relay(&mut self) -> io::Result<()> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        use std::os::fd::AsRawFd;
        self.relaying = true;
        self.s.set_timeouts(None)?;
        let fd = self.s.as_fd().as_raw_fd();
        let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
        fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        Ok(())
    }
}

/// Runs the handshake on `s` until `deadline`, then hands the socket over. With `tls`
/// (nbds), NBD_OPT_STARTTLS and the TLS handshake come first, the options go over TLS,
/// and then the session goes to the kernel (TCP, `ktls.rs`) or the queue gets its end
/// of the session's relay (Unix sockets, `relay.rs`). A pre-shared key's session runs
/// in OpenSSL (`psk.rs`) and goes to the kernel the same way, or to its own relay
/// (`psk_relay.rs`).
fn negotiate<S: Stream>(
    s: S,
    uri: &NbdUri,
    tls: Option<(tls::Client, &uri::TlsParams)>,
    deadline: Instant,
    abort: &Arc<AtomicBool>,
) -> Result<Negotiated, NbdError> {
    let u = uri.to_string();
    let hs = |source| NbdError::Handshake {
        uri: u.clone(),
        source,
    };
    let tls_err = |source| NbdError::Tls {
        uri: u.clone(),
        source,
    };
    let mut b = Bounded {
        s,
        deadline,
        abort: abort.clone(),
        relaying: false,
    };
    let greeting = proto::greet(&mut b).map_err(hs)?;
    let Some((client, params)) = tls else {
        let info = proto::options(&mut b, &uri.export, greeting).map_err(hs)?;
        b.s.set_timeouts(None)
            .map_err(|source| NbdError::Connect { uri: u, source })?;
        return Ok(Negotiated {
            sock: b.s.into(),
            info,
            tls: None,
        });
    };
    proto::starttls(&mut b, greeting).map_err(hs)?;
    let config = match client {
        tls::Client::X509(config) => config,
        tls::Client::Psk(c) => return negotiate_psk(b, &c, uri, greeting),
    };
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
    if S::KTLS {
        let session =
            ktls::hand_off(b.s.as_fd(), conn).map_err(|e| tls_err(tls::TlsError::Kernel(e)))?;
        let how = format!("kernel TLS (kTLS), {session}");
        log::info!("{u}: {how}");
        return Ok(Negotiated {
            sock: b.s.into(),
            info,
            tls: Some(how),
        });
    }
    let sock = relay::start(b.s.into(), conn).map_err(tls_err)?;
    Ok(Negotiated {
        sock,
        info,
        tls: Some("rustls, relayed by ublkd (a Unix socket has no kernel TLS)".into()),
    })
}

/// The rest of a TLS-PSK negotiation on `b`, after NBD_OPT_STARTTLS: OpenSSL's
/// handshake and the options on a handle of the socket that OpenSSL owns, then the
/// session to the kernel on the other handle (TCP) or to its relay (Unix sockets).
fn negotiate_psk<S: Stream>(
    b: Bounded<S>,
    c: &psk::Connector,
    uri: &NbdUri,
    greeting: proto::Greeting,
) -> Result<Negotiated, NbdError> {
    let u = uri.to_string();
    let tls_err = |source| NbdError::Tls {
        uri: u.clone(),
        source,
    };
    let connect_err = |source| NbdError::Connect {
        uri: u.clone(),
        source,
    };
    let sock = b.s.try_clone().map_err(connect_err)?;
    let mut session = c.handshake(b).map_err(tls_err)?;
    let info = proto::options(&mut session.stream, &uri.export, greeting).map_err(|source| {
        NbdError::Handshake {
            uri: u.clone(),
            source,
        }
    })?;
    if !S::KTLS {
        let relayed = psk_relay::start(session.stream).map_err(tls_err)?;
        let how = "OpenSSL, pre-shared key, relayed by ublkd (a Unix socket has no kernel TLS)";
        return Ok(Negotiated {
            sock: relayed,
            info,
            tls: Some(how.into()),
        });
    }
    // Ends the OpenSSL session and closes its handle.
    let keys = session.into_session().map_err(tls_err)?;
    sock.set_timeouts(None).map_err(connect_err)?;
    let session =
        ktls::install(sock.as_fd(), &keys).map_err(|e| tls_err(tls::TlsError::Kernel(e)))?;
    let how = format!("kernel TLS (kTLS), {session}, pre-shared key");
    log::info!("{u}: {how}");
    Ok(Negotiated {
        sock: sock.into(),
        info,
        tls: Some(how),
    })
}

/// Connects and negotiates within CONNECT_TIMEOUT in all; gives up when `abort` is set.
pub(super) fn connect_one(uri: &NbdUri, abort: &Arc<AtomicBool>) -> Result<Negotiated, NbdError> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let connect_err = |source| NbdError::Connect {
        uri: uri.to_string(),
        source,
    };
    // Credentials are read before connecting: a missing file needs no server to tell.
    let tls = match &uri.tls {
        Some(params) => {
            let client = tls::client(params, &uri.address).map_err(|source| NbdError::Tls {
                uri: uri.to_string(),
                source,
            })?;
            Some((client, params))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::Arc;

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
        let err = connect_one(&uri, &Arc::new(AtomicBool::new(false)))
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
