//! A small NBD server for fault tests: it negotiates properly (fixed newstyle, NBD_OPT_GO)
//! and serves a RAM disk, but breaks the protocol in one chosen way for requests at or
//! beyond [`FAULT_OFFSET`], so a device can be added (its first read is at offset 0) and
//! then hit the fault on purpose. Real servers are used for everything else.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Requests at or beyond this offset get the fault.
pub const FAULT_OFFSET: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Behaves.
    None,
    /// Replies with a bad magic number.
    BadMagic,
    /// Replies with a cookie that was never sent.
    UnknownCookie,
    /// Sends half a reply header and closes the connection.
    ShortReply,
    /// Replies with this NBD error (and keeps the connection).
    Error(u32),
    /// Closes the connection right after the client's first option.
    CloseInHandshake,
    /// Advertises an export of size 0.
    ZeroSize,
    /// Never answers (but keeps the connection and answers the requests before it).
    NeverAnswers,
    /// Answers everything correctly, but writes each reply in small pieces (5-byte
    /// pieces of the header, 1000-byte pieces of a payload) and reads requests through
    /// a small receive buffer: the client sees partial headers and payloads, and its
    /// sends are held up by a small window.
    Dribble,
}

const SIZE: u64 = 16 << 20;

/// Listens on 127.0.0.1:`port` and serves every connection with `fault`, in the
/// background, for as long as the test process lives.
pub fn serve(port: u16, fault: Fault) -> JoinHandle<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind fake NBD server");
    if fault == Fault::Dribble {
        // Inherited by accepted connections.
        let small: libc::c_int = 4096;
        // SAFETY: setsockopt with a live int on a socket we own.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&listener),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&small as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
    let disk = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let disk = disk.clone();
            std::thread::spawn(move || {
                let _ = session(conn, fault, &disk);
            });
        }
    })
}

fn read_n<const N: usize>(c: &mut TcpStream) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    c.read_exact(&mut b)?;
    Ok(b)
}

fn session(mut c: TcpStream, fault: Fault, disk: &Mutex<Vec<u8>>) -> std::io::Result<()> {
    c.write_all(b"NBDMAGIC")?;
    c.write_all(b"IHAVEOPT")?;
    c.write_all(&3u16.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
    let _client_flags = read_n::<4>(&mut c)?;
    loop {
        let hdr = read_n::<16>(&mut c)?;
        let opt = u32::from_be_bytes(hdr[8..12].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(hdr[12..16].try_into().unwrap_or_default());
        let mut data = vec![0u8; len as usize];
        c.read_exact(&mut data)?;
        if fault == Fault::CloseInHandshake {
            return Ok(());
        }
        if opt != 7 {
            // Anything but NBD_OPT_GO: NBD_REP_ERR_UNSUP.
            reply_opt(&mut c, opt, 0x8000_0001, &[])?;
            continue;
        }
        let size = if fault == Fault::ZeroSize { 0 } else { SIZE };
        let mut info = 0u16.to_be_bytes().to_vec(); // NBD_INFO_EXPORT
        info.extend_from_slice(&size.to_be_bytes());
        info.extend_from_slice(&(1u16 | 4).to_be_bytes()); // HAS_FLAGS | SEND_FLUSH
        reply_opt(&mut c, opt, 3, &info)?;
        reply_opt(&mut c, opt, 1, &[])?;
        break;
    }
    loop {
        let req = read_n::<28>(&mut c)?;
        let cmd = u16::from_be_bytes([req[6], req[7]]);
        let cookie = u64::from_be_bytes(req[8..16].try_into().unwrap_or_default());
        let offset = u64::from_be_bytes(req[16..24].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(req[24..28].try_into().unwrap_or_default()) as usize;
        if cmd == 2 {
            return Ok(()); // NBD_CMD_DISC
        }
        let mut payload = vec![0u8; if cmd == 1 { len } else { 0 }];
        c.read_exact(&mut payload)?;
        let in_range = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= SIZE);
        let faulty = offset >= FAULT_OFFSET;
        if faulty && fault == Fault::NeverAnswers {
            continue;
        }
        let mut reply = Vec::with_capacity(16);
        let magic: u32 = if faulty && fault == Fault::BadMagic {
            0xdead_beef
        } else {
            0x6744_6698
        };
        let error: u32 = match fault {
            Fault::Error(e) if faulty => e,
            _ if !in_range => 22,
            _ => 0,
        };
        let cookie = if faulty && fault == Fault::UnknownCookie {
            cookie + 1000
        } else {
            cookie
        };
        reply.extend_from_slice(&magic.to_be_bytes());
        reply.extend_from_slice(&error.to_be_bytes());
        reply.extend_from_slice(&cookie.to_be_bytes());
        if faulty && fault == Fault::ShortReply {
            c.write_all(&reply[..8])?;
            return Ok(());
        }
        if error == 0 {
            let mut d = disk.lock().unwrap_or_else(|p| p.into_inner());
            let range = offset as usize..offset as usize + len;
            match cmd {
                0 => reply.extend_from_slice(&d[range]),
                1 => d[range].copy_from_slice(&payload),
                _ => {}
            }
        }
        if fault == Fault::Dribble {
            c.set_nodelay(true)?;
            let (hdr, payload) = reply.split_at(16);
            for piece in hdr.chunks(5).chain(payload.chunks(1000)) {
                c.write_all(piece)?;
            }
            continue;
        }
        c.write_all(&reply)?;
    }
}

fn reply_opt(c: &mut TcpStream, opt: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    c.write_all(&0x0003_e889_0455_65a9u64.to_be_bytes())?;
    c.write_all(&opt.to_be_bytes())?;
    c.write_all(&kind.to_be_bytes())?;
    c.write_all(&(data.len() as u32).to_be_bytes())?;
    c.write_all(data)
}
