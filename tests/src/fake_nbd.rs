//! A small NBD server for fault tests: it negotiates properly (fixed newstyle, NBD_OPT_GO)
//! and serves a RAM disk, but breaks the protocol in one chosen way for requests at or
//! beyond [`FAULT_OFFSET`], so a device can be added (its first read is at offset 0) and
//! then hit the fault on purpose. Real servers are used for everything else.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Answers every write only after `SLOW_WRITE` (a slow but healthy server) while
    /// [`Stats::slow`] is set (it starts set).
    SlowWrites,
    /// Sends its greeting one byte every 800 ms (about 14 s in all), then behaves.
    SlowGreeting,
    /// The first connection closes at a request at or beyond FAULT_OFFSET; every later
    /// connection is accepted but the server never says a word on it.
    HangOnReconnect,
    /// Advertises this maximum block size (NBD_INFO_BLOCK_SIZE) and fails longer
    /// requests with EINVAL.
    MaxBlockSize(u32),
    /// On the first connection, a write at or beyond FAULT_OFFSET: the server takes its
    /// header, then reads nothing more (through a small receive buffer) until the write
    /// was sent again on a later connection and answered there; then it reads what the
    /// first connection still delivers. Later connections behave.
    StallOldWrite,
    /// Holds back the replies to requests at or beyond FAULT_OFFSET while more requests
    /// keep coming (another arrives within 50 ms), then sends them last first: replies
    /// out of order.
    Reorder,
    /// The first connection closes, unanswered, at a request at or beyond FAULT_OFFSET;
    /// later connections behave.
    DropOnce,
    /// The first flush on the first connection is not answered: the server loses
    /// power ([`Stats::power_loss`]) and the connection closes. Later connections
    /// behave.
    PowerLossAtFlush,
}

/// How long [`Fault::SlowWrites`] takes to answer a write.
pub const SLOW_WRITE: Duration = Duration::from_secs(1);

/// What the server saw, for the tests to check.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted.
    pub connections: AtomicUsize,
    /// Connections on which the server never spoke ([`Fault::HangOnReconnect`]) that
    /// the client has closed.
    pub silent_closed: AtomicUsize,
    /// The longest read or write request seen.
    pub max_len: AtomicUsize,
    /// [`Fault::StallOldWrite`]: the first connection's TCP state (as in TCP_INFO; 1 is
    /// ESTABLISHED) when the stalled write arrived again on a later connection.
    pub old_state_at_resend: Mutex<Option<u8>>,
    /// [`Fault::StallOldWrite`]: bytes of the stalled write's payload the first
    /// connection delivered after the resend was answered.
    pub stale_bytes: Mutex<Option<usize>>,
    /// [`Fault::SlowWrites`] is slow while this is set.
    pub slow: AtomicBool,
    /// The transmission flags advertised to the next connections, besides HAS_FLAGS
    /// ([`SEND_FLUSH`] to begin with). A command the flags do not allow (a flush
    /// without SEND_FLUSH, FUA without SEND_FUA) fails with EINVAL, as on a strict
    /// server.
    pub advertise: AtomicU16,
    /// While set, writes without FUA are answered from a volatile cache that a flush
    /// (or a FUA write) writes to the disk and [`Stats::power_loss`] drops.
    pub caching: AtomicBool,
    /// Flushes received.
    pub flushes: AtomicUsize,
    /// Writes received with FUA.
    pub fua_writes: AtomicUsize,
    /// The cache: writes answered but not on the disk yet, oldest first.
    cache: Mutex<Vec<(usize, Vec<u8>)>>,
    old_conn: Mutex<Option<TcpStream>>,
    resent: AtomicBool,
}

/// NBD_FLAG_SEND_FLUSH and NBD_FLAG_SEND_FUA, for [`Stats::advertise`].
pub const SEND_FLUSH: u16 = 1 << 2;
pub const SEND_FUA: u16 = 1 << 3;

impl Stats {
    /// The server loses power: what its cache held is gone.
    pub fn power_loss(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Writes what the cache holds to `disk`, oldest first.
    fn write_back(&self, disk: &mut [u8]) {
        for (at, data) in self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            disk[at..at + data.len()].copy_from_slice(&data);
        }
    }

    /// `disk` as a reader sees it: with what the cache holds on top.
    fn read(&self, disk: &[u8], at: usize, len: usize) -> Vec<u8> {
        let mut out = disk[at..at + len].to_vec();
        for (w, data) in self.cache.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let (from, to) = ((*w).max(at), (w + data.len()).min(at + len));
            if from < to {
                out[from - at..to - at].copy_from_slice(&data[from - w..to - w]);
            }
        }
        out
    }
}

/// The TCP state of `c` (TCP_INFO's tcpi_state).
fn tcp_state(c: &TcpStream) -> Option<u8> {
    // SAFETY: all-zero is a valid tcp_info.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt into a live struct of `len` bytes on a socket we own.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(c),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(info.tcpi_state)
}

const SIZE: u64 = 16 << 20;

/// Listens on 127.0.0.1:`port` and serves every connection with `fault`, in the
/// background, for as long as the test process lives.
pub fn serve(port: u16, fault: Fault) -> Arc<Stats> {
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind fake NBD server");
    serve_on(listener, fault)
}

/// `serve` on a free port: the port, and what the server sees.
pub fn serve_any(fault: Fault) -> (u16, Arc<Stats>) {
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind fake NBD server");
    let port = listener.local_addr().expect("bound address").port();
    (port, serve_on(listener, fault))
}

fn serve_on(listener: TcpListener, fault: Fault) -> Arc<Stats> {
    if matches!(fault, Fault::Dribble | Fault::StallOldWrite) {
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
    let stats = Arc::new(Stats::default());
    stats.slow.store(true, Ordering::SeqCst);
    stats.advertise.store(SEND_FLUSH, Ordering::SeqCst);
    let st = stats.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let disk = disk.clone();
            let n = st.connections.fetch_add(1, Ordering::SeqCst);
            let st = st.clone();
            std::thread::spawn(move || {
                if fault == Fault::HangOnReconnect && n > 0 {
                    return silent(conn, &st);
                }
                let _ = session(conn, fault, n, &disk, &st);
            });
        }
    });
    stats
}

/// Says nothing; counts the connection once the client closes it.
fn silent(mut c: TcpStream, stats: &Stats) {
    let mut b = [0u8; 64];
    while matches!(c.read(&mut b), Ok(n) if n > 0) {}
    stats.silent_closed.fetch_add(1, Ordering::SeqCst);
}

/// [`Fault::StallOldWrite`] on the first connection: waits until the stalled write was
/// answered on another connection, then counts what `c` still delivers of `len` bytes.
fn stall(c: &mut TcpStream, len: usize, stats: &Stats) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stats.resent.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    let mut got = 0;
    let mut b = vec![0u8; 64 << 10];
    while got < len {
        match c.read(&mut b) {
            Ok(n) if n > 0 => got += n,
            _ => break,
        }
    }
    *stats.stale_bytes.lock().unwrap_or_else(|p| p.into_inner()) = Some(got.min(len));
}

fn read_n<const N: usize>(c: &mut TcpStream) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    c.read_exact(&mut b)?;
    Ok(b)
}

fn session(
    mut c: TcpStream,
    fault: Fault,
    conn: usize,
    disk: &Mutex<Vec<u8>>,
    stats: &Stats,
) -> std::io::Result<()> {
    let mut greeting = b"NBDMAGICIHAVEOPT".to_vec();
    greeting.extend_from_slice(&3u16.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    if fault == Fault::SlowGreeting {
        c.set_nodelay(true)?;
        for b in greeting.chunks(1) {
            c.write_all(b)?;
            std::thread::sleep(Duration::from_millis(800));
        }
    } else {
        c.write_all(&greeting)?;
    }
    let _client_flags = read_n::<4>(&mut c)?;
    // The transmission flags this connection was given.
    let advertised;
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
        advertised = stats.advertise.load(Ordering::SeqCst);
        info.extend_from_slice(&(1 | advertised).to_be_bytes()); // HAS_FLAGS | ...
        reply_opt(&mut c, opt, 3, &info)?;
        if let Fault::MaxBlockSize(max) = fault {
            let mut bs = 3u16.to_be_bytes().to_vec(); // NBD_INFO_BLOCK_SIZE
                                                      // Minimum 1, preferred 16 KiB (or the maximum when that is smaller).
            for v in [1u32, max.min(16 << 10), max] {
                bs.extend_from_slice(&v.to_be_bytes());
            }
            reply_opt(&mut c, opt, 3, &bs)?;
        }
        reply_opt(&mut c, opt, 1, &[])?;
        break;
    }
    // Fault::Reorder: replies held back, in the order of their requests.
    let mut held: Vec<Vec<u8>> = Vec::new();
    loop {
        let req = read_n::<28>(&mut c)?;
        let cmd_flags = u16::from_be_bytes([req[4], req[5]]);
        let cmd = u16::from_be_bytes([req[6], req[7]]);
        let cookie = u64::from_be_bytes(req[8..16].try_into().unwrap_or_default());
        let offset = u64::from_be_bytes(req[16..24].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(req[24..28].try_into().unwrap_or_default()) as usize;
        if cmd == 2 {
            return Ok(()); // NBD_CMD_DISC
        }
        if cmd <= 1 {
            stats.max_len.fetch_max(len, Ordering::SeqCst);
        }
        let faulty = offset >= FAULT_OFFSET;
        if fault == Fault::HangOnReconnect && faulty {
            return Ok(());
        }
        if fault == Fault::DropOnce && faulty && conn == 0 {
            return Ok(());
        }
        if fault == Fault::PowerLossAtFlush && cmd == 3 && conn == 0 {
            stats.power_loss();
            return Ok(());
        }
        if fault == Fault::StallOldWrite && cmd == 1 && faulty {
            if conn == 0 {
                *stats.old_conn.lock().unwrap_or_else(|p| p.into_inner()) = c.try_clone().ok();
                stall(&mut c, len, stats);
                return Ok(());
            }
            let old = stats.old_conn.lock().unwrap_or_else(|p| p.into_inner());
            let state = old.as_ref().and_then(tcp_state);
            *stats
                .old_state_at_resend
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = state;
        }
        let mut payload = vec![0u8; if cmd == 1 { len } else { 0 }];
        c.read_exact(&mut payload)?;
        let in_range = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= SIZE);
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
            // NBD_CMD_FLUSH must have offset and length 0 (nbdkit insists too).
            _ if cmd == 3 && (offset != 0 || len != 0) => 22,
            _ if cmd == 3 && advertised & SEND_FLUSH == 0 => 22,
            _ if cmd_flags & 1 != 0 && advertised & SEND_FUA == 0 => 22,
            Fault::MaxBlockSize(max) if cmd <= 1 && len > max as usize => 22,
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
            let fua = cmd_flags & 1 != 0;
            match cmd {
                0 => reply.extend_from_slice(&stats.read(&d, range.start, len)),
                1 if !fua && stats.caching.load(Ordering::SeqCst) => stats
                    .cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((range.start, payload.clone())),
                1 => {
                    // A FUA write after the cached ones: they go to the disk first.
                    stats.write_back(&mut d);
                    d[range].copy_from_slice(&payload);
                    if fua {
                        stats.fua_writes.fetch_add(1, Ordering::SeqCst);
                    }
                }
                3 => {
                    stats.write_back(&mut d);
                    stats.flushes.fetch_add(1, Ordering::SeqCst);
                }
                _ => {}
            }
        }
        if fault == Fault::SlowWrites && cmd == 1 && stats.slow.load(Ordering::SeqCst) {
            std::thread::sleep(SLOW_WRITE);
        }
        if fault == Fault::StallOldWrite && cmd == 1 && faulty {
            c.write_all(&reply)?;
            stats.resent.store(true, Ordering::SeqCst);
            continue;
        }
        if fault == Fault::Reorder && faulty {
            held.push(reply);
            flush_when_idle(&mut c, &mut held)?;
            continue;
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
        flush_when_idle(&mut c, &mut held)?;
    }
}

/// [`Fault::Reorder`]: sends the held replies, last first, unless another request
/// arrives within 50 ms.
fn flush_when_idle(c: &mut TcpStream, held: &mut Vec<Vec<u8>>) -> std::io::Result<()> {
    if held.is_empty() || more_within(c, Duration::from_millis(50))? {
        return Ok(());
    }
    for r in held.drain(..).rev() {
        c.write_all(&r)?;
    }
    Ok(())
}

/// Whether `c` has more to read within `wait`.
fn more_within(c: &mut TcpStream, wait: Duration) -> std::io::Result<bool> {
    c.set_read_timeout(Some(wait))?;
    let more = match c.peek(&mut [0u8; 1]) {
        Ok(n) => n > 0,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            false
        }
        Err(e) => return Err(e),
    };
    c.set_read_timeout(None)?;
    Ok(more)
}

fn reply_opt(c: &mut TcpStream, opt: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    c.write_all(&0x0003_e889_0455_65a9u64.to_be_bytes())?;
    c.write_all(&opt.to_be_bytes())?;
    c.write_all(&kind.to_be_bytes())?;
    c.write_all(&(data.len() as u32).to_be_bytes())?;
    c.write_all(data)
}
