//! The TLS relay: after the handshake a thread per connection keeps the session in rustls
//! and relays plaintext to one end of a socket pair; the queue gets the other end and
//! uses it as it uses a plain Unix socket. When either side closes or fails, both are
//! shut down: the queue sees its connection end and reconnects (a new handshake, a new
//! relay), and the relay ends. rustls handles every record the server sends (alerts,
//! session tickets, key updates), so none of them can break the queue's stream.
//!
//! Only nbds+unix:// uses it: kernel TLS (`ktls.rs`) is TCP's, and over TCP the queue
//! sends and receives on the kTLS socket itself. Here TLS costs one copy each way
//! through this thread.

use super::tls::TlsError;
use rustls::ClientConnection;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// How much decrypted data waits for the queue before the relay stops reading the server.
const MAX_PENDING: usize = 1 << 20;

/// Starts the relay for `conn`, which ran on the socket `server` (TCP or Unix); returns
/// the queue's end.
pub fn start(server: OwnedFd, conn: ClientConnection) -> Result<OwnedFd, TlsError> {
    let (ours, queue) = UnixStream::pair().map_err(TlsError::Relay)?;
    set_nonblocking(&server).map_err(TlsError::Relay)?;
    ours.set_nonblocking(true).map_err(TlsError::Relay)?;
    // read(2) and write(2) on the socket (a File is only the handle for them).
    let server = File::from(server);
    std::thread::Builder::new()
        .name("nbd-tls-relay".into())
        .spawn(move || {
            // The device's requests wait on this thread: it must not wait on them.
            if let Err(e) = crate::io_flusher() {
                log::warn!("nbd: TLS relay: {e}");
            }
            if let Err(e) = run(&server, &ours, conn) {
                log::info!("nbd: TLS relay ends: {e}");
            }
            let _ =
                nix::sys::socket::shutdown(server.as_raw_fd(), nix::sys::socket::Shutdown::Both);
            let _ = ours.shutdown(Shutdown::Both);
        })
        .map_err(TlsError::Relay)?;
    Ok(queue.into())
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd.as_fd().as_raw_fd(), FcntlArg::F_GETFL)?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_fd().as_raw_fd(), FcntlArg::F_SETFL(flags))?;
    Ok(())
}

pub(super) fn gone(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what.to_string())
}

pub(super) fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Waits until the server's socket or the queue's end is ready for what is asked of it
/// (`poll` events); returns their `revents`, or None when interrupted (call again). The
/// queue's end failing is an error. Shared by the rustls relay and the OpenSSL one.
pub(super) fn poll_pair(
    (server, server_events): (i32, i16),
    (ours, ours_events): (i32, i16),
) -> io::Result<Option<(i16, i16)>> {
    let mut fds = [
        libc::pollfd {
            fd: server,
            events: server_events,
            revents: 0,
        },
        libc::pollfd {
            fd: ours,
            events: ours_events,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a live array of two pollfds.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if would_block(&e) {
            return Ok(None);
        }
        return Err(e);
    }
    if fds[1].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
        return Err(gone("the queue's end failed"));
    }
    Ok(Some((fds[0].revents, fds[1].revents)))
}

fn run(mut server: &File, mut ours: &UnixStream, mut conn: ClientConnection) -> io::Result<()> {
    // The queue's bytes are taken only when the last ones went out (see the poll below):
    // no limit is needed, and one with it could refuse part of a read.
    conn.set_buffer_limit(None);
    // Decrypted bytes the queue has not taken yet.
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Encrypted bytes out to the server.
        while conn.wants_write() {
            match conn.write_tls(&mut server) {
                Ok(_) => {}
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        // Decrypted bytes out to the queue.
        while !pending.is_empty() {
            match ours.write(&pending) {
                Ok(0) => return Err(gone("the queue closed its end")),
                Ok(n) => {
                    pending.drain(..n);
                }
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        let (mut to_server, mut to_ours) = (0, 0);
        if pending.len() < MAX_PENDING {
            to_server |= libc::POLLIN;
        }
        if conn.wants_write() {
            to_server |= libc::POLLOUT;
        } else {
            // Take the queue's requests only when the last ones went out.
            to_ours |= libc::POLLIN;
        }
        if !pending.is_empty() {
            to_ours |= libc::POLLOUT;
        }
        let polled = poll_pair((server.as_raw_fd(), to_server), (ours.as_raw_fd(), to_ours))?;
        let Some((sr, or)) = polled else {
            continue;
        };
        if sr & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            match conn.read_tls(&mut server) {
                Ok(0) => return Err(gone("the server closed the connection")),
                Ok(_) => {
                    let state = conn
                        .process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    let mut left = state.plaintext_bytes_to_read();
                    while left > 0 {
                        let n = conn.reader().read(&mut buf[..left.min(64 * 1024)])?;
                        if n == 0 {
                            break;
                        }
                        pending.extend_from_slice(&buf[..n]);
                        left -= n;
                    }
                    if state.peer_has_closed() {
                        // Whatever was decrypted goes to the queue first.
                        ours.set_nonblocking(false)?;
                        ours.write_all(&pending)?;
                        return Err(gone("the server ended the TLS session"));
                    }
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if or & (libc::POLLIN | libc::POLLHUP) != 0 && to_ours & libc::POLLIN != 0 {
            match ours.read(&mut buf) {
                Ok(0) => return Err(gone("the queue closed its end")),
                Ok(n) => conn.writer().write_all(&buf[..n])?,
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }
}
