//! The relay of a TLS-PSK session over a Unix socket (nbds+unix://...&tls-psk-file=):
//! `relay.rs` for an OpenSSL session. After the handshake and the NBD options a thread
//! keeps the session in OpenSSL and relays plaintext to one end of a socket pair; the
//! queue gets the other end. When either side closes or fails, both are shut down: the
//! queue sees its connection end and reconnects (a new handshake, a new relay).

use super::psk::Counted;
use super::relay::{gone, poll_pair, would_block};
use super::tls::TlsError;
use openssl::ssl::{ErrorCode, SslStream};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// How much decrypted data waits for the queue before the relay stops reading the server.
const MAX_PENDING: usize = 1 << 20;

/// The socket under an OpenSSL session, as the relay needs it.
pub(super) trait RelayIo: Read + Write + Send + 'static {
    /// The socket, for poll(2) and shutdown(2).
    fn fd(&self) -> RawFd;
    /// From now on: no handshake deadline, and a nonblocking socket.
    fn relay(&mut self) -> io::Result<()>;
}

/// Starts the relay for the session `tls` (handshake and options done); returns the
/// queue's end.
pub(super) fn start<T: RelayIo>(mut tls: SslStream<Counted<T>>) -> Result<OwnedFd, TlsError> {
    let (ours, queue) = UnixStream::pair().map_err(TlsError::Relay)?;
    tls.get_mut().inner.relay().map_err(TlsError::Relay)?;
    ours.set_nonblocking(true).map_err(TlsError::Relay)?;
    std::thread::Builder::new()
        .name("nbd-psk-relay".into())
        .spawn(move || {
            // The device's requests wait on this thread: it must not wait on them.
            if let Err(e) = crate::io_flusher() {
                log::warn!("nbd: TLS-PSK relay: {e}");
            }
            let fd = tls.get_ref().inner.fd();
            if let Err(e) = run(&mut tls, &ours) {
                log::info!("nbd: TLS-PSK relay ends: {e}");
            }
            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
            // The session is freed before the queue sees its end close: after that the
            // relay no longer touches OpenSSL, so a process that ends then (a test, the
            // daemon) does not free OpenSSL's state under it.
            drop(tls);
            let _ = ours.shutdown(Shutdown::Both);
        })
        .map_err(TlsError::Relay)?;
    Ok(queue.into())
}

/// What OpenSSL waits for before it can go on.
#[derive(Default)]
struct Wants {
    read: bool,
    write: bool,
}

/// Sorts an OpenSSL error: waiting (recorded in `wants`), or the end of the session.
fn blocked(e: openssl::ssl::Error, wants: &mut Wants) -> io::Result<()> {
    match e.code() {
        ErrorCode::WANT_READ => wants.read = true,
        ErrorCode::WANT_WRITE => wants.write = true,
        ErrorCode::ZERO_RETURN => return Err(gone("the server ended the TLS session")),
        _ => {
            return Err(e
                .into_io_error()
                .unwrap_or_else(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string())))
        }
    }
    Ok(())
}

fn run<T: RelayIo>(tls: &mut SslStream<Counted<T>>, mut ours: &UnixStream) -> io::Result<()> {
    let mut to_queue: Vec<u8> = Vec::new();
    let mut to_server: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut wants = Wants::default();
        let mut moved = false;
        // Decrypted bytes from the server.
        while to_queue.len() < MAX_PENDING {
            match tls.ssl_read(&mut buf) {
                Ok(n) => {
                    to_queue.extend_from_slice(&buf[..n]);
                    moved = true;
                }
                Err(e) => {
                    if e.code() == ErrorCode::ZERO_RETURN {
                        // Whatever was decrypted goes to the queue first.
                        ours.set_nonblocking(false)?;
                        ours.write_all(&to_queue)?;
                    }
                    blocked(e, &mut wants)?;
                    break;
                }
            }
        }
        // The queue's bytes to the server (taken only when the last ones went out).
        if !to_server.is_empty() {
            match tls.ssl_write(&to_server) {
                Ok(n) => {
                    to_server.drain(..n);
                    moved = true;
                }
                Err(e) => blocked(e, &mut wants)?,
            }
        }
        while !to_queue.is_empty() {
            match ours.write(&to_queue) {
                Ok(0) => return Err(gone("the queue closed its end")),
                Ok(n) => {
                    to_queue.drain(..n);
                    moved = true;
                }
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        if to_server.is_empty() {
            match ours.read(&mut buf) {
                Ok(0) => return Err(gone("the queue closed its end")),
                Ok(n) => {
                    to_server.extend_from_slice(&buf[..n]);
                    moved = true;
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if moved {
            continue;
        }
        let (mut server_events, mut ours_events) = (0, 0);
        if wants.read || to_queue.len() < MAX_PENDING {
            server_events |= libc::POLLIN;
        }
        if wants.write {
            server_events |= libc::POLLOUT;
        }
        if to_server.is_empty() {
            ours_events |= libc::POLLIN;
        }
        if !to_queue.is_empty() {
            ours_events |= libc::POLLOUT;
        }
        // Whatever became ready, the next turn tries every direction again.
        poll_pair(
            (tls.get_ref().inner.fd(), server_events),
            (ours.as_raw_fd(), ours_events),
        )?;
    }
}
