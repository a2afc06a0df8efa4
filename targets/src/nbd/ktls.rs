//! Kernel TLS (kTLS) for nbds:// over TCP: once rustls (or for a pre-shared key OpenSSL,
//! `psk.rs`) has made the handshake and the NBD options have gone through it, the
//! session's keys and sequence numbers go to the
//! kernel (TCP_ULP "tls", then SOL_TLS TLS_TX and TLS_RX), and the queue's io_uring sends
//! and receives plaintext on the TCP socket itself: the kernel encrypts and decrypts.
//!
//! The hand-off happens only when rustls holds nothing the kernel would miss: no
//! records to send, no decrypted bytes unread. After NBD_OPT_GO's reply the server says
//! nothing until it gets a request, so nothing is on its way either (a TLS 1.3 server
//! sends its session tickets right after the handshake, before it answers the first
//! option; the tickets are thus read by rustls).
//!
//! A record that is not application data arriving later (an alert such as close_notify,
//! a TLS 1.3 KeyUpdate or a late session ticket) makes the kernel fail the receive with
//! EIO: the queue takes that as a lost connection and reconnects, with a new handshake
//! (`recv.rs` says so in the log). No NBD server sends such records on a healthy
//! session; a server that ends the session sends close_notify, and reconnecting is
//! what should happen then.
//!
//! Unix sockets have no kTLS (TCP_ULP is TCP's): nbds+unix:// goes through the relay
//! (`relay.rs`).

use rustls::{ConnectionTrafficSecrets, ProtocolVersion};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use thiserror::Error;

/// From linux/tls.h and linux/tcp.h (the libc crate has SOL_TLS only).
const TCP_ULP: libc::c_int = 31;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_RX_EXPECT_NO_PAD: libc::c_int = 4;
const TLS_1_2_VERSION: u16 = 0x0303;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

/// Why a receive on a kernel TLS socket failed with EIO, for the log.
pub const CONTROL_RECORD: &str = "the server sent a TLS record that is not data (an alert such as close_notify, a key update or a late session ticket), which kernel TLS cannot take (EIO); a new connection makes a new TLS handshake";

#[derive(Debug, Error)]
pub enum KtlsError {
    #[error("kernel TLS is not available: load the kernel module `tls` (modprobe tls)")]
    NoModule,
    #[error("cannot enable kernel TLS on the socket (TCP_ULP tls): {0}")]
    Ulp(io::Error),
    #[error("the kernel refuses the TLS session's {dir} keys ({session}): {source}{hint}")]
    Keys {
        dir: &'static str,
        session: String,
        source: io::Error,
        /// What to load when the cipher's kernel module is missing.
        hint: &'static str,
    },
    #[error("the TLS session uses a cipher kernel TLS does not know")]
    Cipher,
    #[error("the TLS session cannot be handed to the kernel: {0}")]
    Extract(String),
}

/// An AEAD cipher kernel TLS takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Cipher {
    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes128Gcm => "AES-128-GCM",
            Cipher::Aes256Gcm => "AES-256-GCM",
            Cipher::Chacha20Poly1305 => "ChaCha20-Poly1305",
        }
    }
}

/// One direction's traffic keys and the sequence number of its next record, from
/// whichever TLS library made the handshake (rustls here, OpenSSL in `psk.rs`).
pub struct DirKeys {
    pub key: Vec<u8>,
    /// The 12-byte static iv (for AES-GCM the 4-byte salt, then the nonce part).
    pub iv: Vec<u8>,
    pub seq: u64,
}

impl Drop for DirKeys {
    fn drop(&mut self) {
        // Key material does not outlive its use (best effort: not a volatile write).
        self.key.fill(0);
        self.iv.fill(0);
    }
}

/// A session ready for the kernel: version, cipher, and both directions' keys.
pub struct Session {
    pub tls13: bool,
    pub cipher: Cipher,
    pub tx: DirKeys,
    pub rx: DirKeys,
}

impl Session {
    /// The version and cipher, as `show` and the log name them.
    pub fn describe(&self) -> String {
        let v = if self.tls13 { "TLS 1.3" } else { "TLS 1.2" };
        format!("{v}, {}", self.cipher.name())
    }
}

/// The session rustls made, once it holds nothing the kernel would miss.
fn from_rustls(mut conn: rustls::ClientConnection) -> Result<Session, KtlsError> {
    let tls13 = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => true,
        Some(ProtocolVersion::TLSv1_2) => false,
        _ => return Err(KtlsError::Cipher),
    };
    if conn.wants_write() {
        return Err(KtlsError::Extract(
            "rustls still has records to send".into(),
        ));
    }
    // Decrypted bytes nobody asked for would be lost: the server sends nothing after
    // NBD_OPT_GO's reply until it gets a request.
    match io::Read::read(&mut conn.reader(), &mut [0u8; 1]) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        _ => {
            let why = "the server sent more than the reply to NBD_OPT_GO";
            return Err(KtlsError::Extract(why.into()));
        }
    }
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(|e| KtlsError::Extract(e.to_string()))?;
    let split = |(seq, s): &(u64, ConnectionTrafficSecrets)| -> Result<_, KtlsError> {
        let (cipher, key, iv) = match s {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Cipher::Chacha20Poly1305, key, iv)
            }
            _ => return Err(KtlsError::Cipher),
        };
        let keys = DirKeys {
            key: key.as_ref().to_vec(),
            iv: iv.as_ref().to_vec(),
            seq: *seq,
        };
        Ok((cipher, keys))
    };
    let (cipher, tx) = split(&secrets.tx)?;
    let (_, rx) = split(&secrets.rx)?;
    Ok(Session {
        tls13,
        cipher,
        tx,
        rx,
    })
}

/// `struct tls12_crypto_info_aes_gcm_128`, `_aes_gcm_256` and `_chacha20_poly1305`: the
/// header, then iv, key, salt and rec_seq, sized per cipher (ChaCha20 has a 12-byte iv
/// and no salt).
#[repr(C)]
struct CryptoInfo<const IV: usize, const KEY: usize, const SALT: usize> {
    version: u16,
    cipher_type: u16,
    iv: [u8; IV],
    key: [u8; KEY],
    salt: [u8; SALT],
    rec_seq: [u8; 8],
}

impl<const IV: usize, const KEY: usize, const SALT: usize> CryptoInfo<IV, KEY, SALT> {
    fn new(version: u16, cipher_type: u16, key: &[u8], iv: &[u8], seq: u64) -> Option<Self> {
        let mut c = CryptoInfo {
            version,
            cipher_type,
            iv: [0; IV],
            key: [0; KEY],
            salt: [0; SALT],
            rec_seq: seq.to_be_bytes(),
        };
        // The TLS iv is the salt (4 bytes for AES-GCM) followed by the nonce part.
        if key.len() != KEY || iv.len() != SALT + IV {
            return None;
        }
        c.key.copy_from_slice(key);
        c.salt.copy_from_slice(&iv[..SALT]);
        c.iv.copy_from_slice(&iv[SALT..]);
        Some(c)
    }

    fn set(&self, fd: BorrowedFd<'_>, dir: libc::c_int) -> io::Result<()> {
        // SAFETY: setsockopt reads size_of::<Self>() bytes from a live repr(C) struct laid
        // out as the kernel's tls12_crypto_info_* (no padding: u16s, then byte arrays).
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_TLS,
                dir,
                (self as *const Self).cast(),
                std::mem::size_of::<Self>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl<const IV: usize, const KEY: usize, const SALT: usize> Drop for CryptoInfo<IV, KEY, SALT> {
    fn drop(&mut self) {
        // Key material does not outlive its use (best effort: not a volatile write).
        self.key.fill(0);
    }
}

/// The nonce part of the iv kernel TLS starts TX at for a TLS 1.2 AES-GCM session.
/// There the 8-byte explicit nonce goes in each record: rustls made it `nonce XOR seq`
/// for records 0..seq, and the kernel counts up from what it is given. Starting at the
/// next aligned block above the one those values lie in keeps every nonce unique under
/// the key (the kernel would need 2^64 records to come back).
fn tls12_tx_nonce(iv: &[u8], seq: u64) -> Vec<u8> {
    let mut out = iv.to_vec();
    if iv.len() == 12 {
        let mut n = [0u8; 8];
        n.copy_from_slice(&iv[4..]);
        let n = u64::from_be_bytes(n);
        let span = seq.max(1).next_power_of_two();
        let start = (n | (span - 1)).wrapping_add(1);
        out[4..].copy_from_slice(&start.to_be_bytes());
    }
    out
}

/// Sets one direction's keys.
fn set_keys(
    fd: BorrowedFd<'_>,
    dir: libc::c_int,
    version: u16,
    cipher: Cipher,
    keys: &DirKeys,
) -> Result<(), (io::Error, &'static str)> {
    let bad = || (io::Error::from_raw_os_error(libc::EINVAL), "");
    let gcm = "; the kernel needs the modules `gcm` and `ctr` (and `aesni_intel` for speed)";
    let (key, seq) = (keys.key.as_slice(), keys.seq);
    match cipher {
        Cipher::Aes128Gcm => {
            let iv = nonce(dir, version, &keys.iv, seq);
            CryptoInfo::<8, 16, 4>::new(version, TLS_CIPHER_AES_GCM_128, key, &iv, seq)
                .ok_or_else(bad)?
                .set(fd, dir)
                .map_err(|e| (e, gcm))
        }
        Cipher::Aes256Gcm => {
            let iv = nonce(dir, version, &keys.iv, seq);
            CryptoInfo::<8, 32, 4>::new(version, TLS_CIPHER_AES_GCM_256, key, &iv, seq)
                .ok_or_else(bad)?
                .set(fd, dir)
                .map_err(|e| (e, gcm))
        }
        Cipher::Chacha20Poly1305 => {
            CryptoInfo::<12, 32, 0>::new(version, TLS_CIPHER_CHACHA20_POLY1305, key, &keys.iv, seq)
                .ok_or_else(bad)?
                .set(fd, dir)
                .map_err(|e| (e, "; the kernel needs the module `chacha20poly1305`"))
        }
    }
}

/// The iv handed to the kernel for AES-GCM: the session's own, but for TLS 1.2 TX see
/// `tls12_tx_nonce`.
fn nonce(dir: libc::c_int, version: u16, iv: &[u8], seq: u64) -> Vec<u8> {
    if dir == TLS_TX && version == TLS_1_2_VERSION {
        tls12_tx_nonce(iv, seq)
    } else {
        iv.to_vec()
    }
}

/// Hands the session rustls made in `conn` (handshake done, options over) to the kernel
/// on the TCP socket `fd`; returns what `Session::describe` says of it.
pub fn hand_off(fd: BorrowedFd<'_>, conn: rustls::ClientConnection) -> Result<String, KtlsError> {
    install(fd, &from_rustls(conn)?)
}

/// Hands `session` to the kernel on the TCP socket `fd`: TCP_ULP "tls", then the send
/// and receive keys; returns what `Session::describe` says of it.
pub fn install(fd: BorrowedFd<'_>, session: &Session) -> Result<String, KtlsError> {
    let v = if session.tls13 {
        TLS_1_3_VERSION
    } else {
        TLS_1_2_VERSION
    };
    let described = session.describe();
    let ulp = b"tls";
    // SAFETY: setsockopt reads `ulp.len()` bytes from a live byte string.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            TCP_ULP,
            ulp.as_ptr().cast(),
            ulp.len() as libc::socklen_t,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::ENOENT) {
            KtlsError::NoModule
        } else {
            KtlsError::Ulp(e)
        });
    }
    for (dir, name, keys) in [
        (TLS_TX, "send", &session.tx),
        (TLS_RX, "receive", &session.rx),
    ] {
        set_keys(fd, dir, v, session.cipher, keys).map_err(|(source, hint)| KtlsError::Keys {
            dir: name,
            session: described.clone(),
            source,
            hint,
        })?;
    }
    if v == TLS_1_3_VERSION {
        // TLS 1.3 records may be padded; GnuTLS does not pad, and told so the kernel
        // decrypts straight into the receive's buffer (a padded record is still taken,
        // decrypted a second time). Best effort: kernels before 6.0 lack it.
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads one live c_int.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_TLS,
                TLS_RX_EXPECT_NO_PAD,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            log::debug!("TLS_RX_EXPECT_NO_PAD: {}", io::Error::last_os_error());
        }
    }
    Ok(described)
}

/// Whether kernel TLS sends and receives on `fd` (getsockopt SOL_TLS TLS_TX works).
#[cfg(test)]
pub fn active(fd: BorrowedFd<'_>) -> bool {
    let mut buf = [0u8; 64];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `buf`, which has them.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_TLS,
            TLS_TX,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    buf.fill(0);
    r == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_info_sizes_are_the_kernels() {
        assert_eq!(std::mem::size_of::<CryptoInfo<8, 16, 4>>(), 40);
        assert_eq!(std::mem::size_of::<CryptoInfo<8, 32, 4>>(), 56);
        assert_eq!(std::mem::size_of::<CryptoInfo<12, 32, 0>>(), 56);
    }

    #[test]
    fn aes_gcm_ivs_split_into_salt_and_nonce() {
        let key = [7u8; 32];
        let iv: Vec<u8> = (1..=12).collect();
        let c = CryptoInfo::<8, 16, 4>::new(TLS_1_3_VERSION, 51, &key, &iv, 5);
        assert!(c.is_none(), "a 32-byte key is not AES-128's");
        let c = CryptoInfo::<8, 32, 4>::new(TLS_1_3_VERSION, 52, &key, &iv, 5).unwrap();
        assert_eq!(c.salt, [1, 2, 3, 4]);
        assert_eq!(c.iv, [5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(c.rec_seq, 5u64.to_be_bytes());
        let c = CryptoInfo::<12, 32, 0>::new(TLS_1_3_VERSION, 54, &key, &iv, 0).unwrap();
        assert_eq!(c.iv.to_vec(), iv);
    }

    /// rustls used `n ^ s` for s < seq: the kernel's `start + k` never meets them.
    #[test]
    fn tls12_nonces_never_repeat_rustls_ones() {
        for n in [0u64, 3, 0x13, 0xff, u64::MAX - 2, 0x8000_0000_0000_0003] {
            for seq in [0u64, 1, 2, 3, 7, 100] {
                let mut iv = vec![9, 9, 9, 9];
                iv.extend_from_slice(&n.to_be_bytes());
                let out = tls12_tx_nonce(&iv, seq);
                assert_eq!(out[..4], [9, 9, 9, 9]);
                let start = u64::from_be_bytes(out[4..].try_into().unwrap());
                let used: Vec<u64> = (0..seq).map(|s| n ^ s).collect();
                for k in 0..1000u64 {
                    let next = start.wrapping_add(k);
                    assert!(!used.contains(&next), "n {n:#x} seq {seq} k {k}");
                }
            }
        }
    }
}
