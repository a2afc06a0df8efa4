//! A small NBD server over TLS 1.3 (rustls) for the kernel TLS tests: NBD_OPT_STARTTLS,
//! NBD_OPT_GO, then reads, writes and flushes on a RAM disk. Once, on the first
//! connection, after `key_update_after` requests, it sends a TLS KeyUpdate: a record
//! that is not application data, which the client's kernel TLS cannot take.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const OPT_GO: u32 = 7;
const OPT_STARTTLS: u32 = 5;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;
/// NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH.
const TFLAGS: u16 = 1 | 4;

/// What the server did, for the tests to check.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections that got through NBD_OPT_GO.
    pub sessions: AtomicUsize,
    /// KeyUpdates sent.
    pub key_updates: AtomicUsize,
}

pub struct TlsNbd {
    pub uri: String,
    pub stats: Arc<Stats>,
}

/// Serves a RAM disk of `size` bytes on 127.0.0.1 with the certificate in `server_dir`
/// (`server-cert.pem`, `server-key.pem`, as `pki::make` writes them).
pub fn serve(server_dir: &Path, size: usize, key_update_after: usize) -> TlsNbd {
    let certs = CertificateDer::pem_file_iter(server_dir.join("server-cert.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(server_dir.join("server-key.pem")).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let config = Arc::new(config);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let stats = Arc::new(Stats::default());
    let st = stats.clone();
    let disk = Arc::new(Mutex::new(vec![0u8; size]));
    let updated = Arc::new(AtomicBool::new(false));
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let (config, disk, st) = (config.clone(), disk.clone(), st.clone());
            let after = (!updated.swap(true, Ordering::SeqCst)).then_some(key_update_after);
            std::thread::spawn(move || {
                let _ = session(c, config, &disk, after, &st);
            });
        }
    });
    TlsNbd {
        uri: format!("nbd://127.0.0.1:{port}/"),
        stats,
    }
}

fn read_n<const N: usize>(s: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

/// Reads an option request: (option, data).
fn read_opt(s: &mut impl Read) -> io::Result<(u32, Vec<u8>)> {
    let h: [u8; 16] = read_n(s)?;
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
    let mut data = vec![0u8; len.min(4096)];
    s.read_exact(&mut data)?;
    Ok((opt, data))
}

fn reply_opt(s: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut r = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&opt.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    s.write_all(&r)?;
    s.flush()
}

fn session(
    mut c: TcpStream,
    config: Arc<ServerConfig>,
    disk: &Mutex<Vec<u8>>,
    key_update_after: Option<usize>,
    stats: &Stats,
) -> io::Result<()> {
    c.set_nodelay(true)?;
    c.write_all(b"NBDMAGICIHAVEOPT")?;
    c.write_all(&3u16.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
    let _client_flags: [u8; 4] = read_n(&mut c)?;
    loop {
        let (opt, _) = read_opt(&mut c)?;
        if opt == OPT_STARTTLS {
            reply_opt(&mut c, opt, REP_ACK, &[])?;
            break;
        }
        reply_opt(&mut c, opt, REP_ERR_TLS_REQD, &[])?;
    }
    let conn = ServerConnection::new(config).map_err(io::Error::other)?;
    let mut s = StreamOwned::new(conn, c);
    loop {
        let (opt, _) = read_opt(&mut s)?;
        if opt != OPT_GO {
            reply_opt(&mut s, opt, REP_ERR_UNSUP, &[])?;
            continue;
        }
        let size = disk.lock().unwrap().len() as u64;
        let mut info = 0u16.to_be_bytes().to_vec(); // NBD_INFO_EXPORT
        info.extend_from_slice(&size.to_be_bytes());
        info.extend_from_slice(&TFLAGS.to_be_bytes());
        reply_opt(&mut s, opt, REP_INFO, &info)?;
        reply_opt(&mut s, opt, REP_ACK, &[])?;
        break;
    }
    stats.sessions.fetch_add(1, Ordering::SeqCst);
    let mut served = 0usize;
    loop {
        let h: [u8; 28] = read_n(&mut s)?;
        let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
        let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let cookie = &h[8..16];
        let offset = u64::from_be_bytes(h[16..24].try_into().unwrap()) as usize;
        let len = u32::from_be_bytes(h[24..28].try_into().unwrap()) as usize;
        if magic != REQUEST_MAGIC {
            return Err(io::Error::other("bad request magic"));
        }
        let mut reply = REPLY_MAGIC.to_be_bytes().to_vec();
        let mut error = 0u32;
        let mut payload = Vec::new();
        match kind {
            0 => {
                let d = disk.lock().unwrap();
                match d.get(offset..offset + len) {
                    Some(b) => payload.extend_from_slice(b),
                    None => error = 22,
                }
            }
            1 => {
                let mut data = vec![0u8; len];
                s.read_exact(&mut data)?;
                let mut d = disk.lock().unwrap();
                match d.get_mut(offset..offset + len) {
                    Some(b) => b.copy_from_slice(&data),
                    None => error = 22,
                }
            }
            2 => return Ok(()), // NBD_CMD_DISC
            3 => {}             // NBD_CMD_FLUSH: RAM
            _ => error = 22,
        }
        reply.extend_from_slice(&error.to_be_bytes());
        reply.extend_from_slice(cookie);
        if error == 0 {
            reply.extend_from_slice(&payload);
        }
        s.write_all(&reply)?;
        s.flush()?;
        served += 1;
        if Some(served) == key_update_after {
            s.conn.refresh_traffic_keys().map_err(io::Error::other)?;
            while s.conn.wants_write() {
                s.conn.write_tls(&mut s.sock)?;
            }
            stats.key_updates.fetch_add(1, Ordering::SeqCst);
        }
    }
}
