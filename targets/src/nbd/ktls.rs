//! Kernel TLS (kTLS): a TCP socket whose TLS session was set up by rustls gets the
//! session's keys and record sequence numbers (setsockopt TCP_ULP "tls", then SOL_TLS
//! TLS_TX and TLS_RX), and from then on the kernel encrypts what is sent and decrypts
//! what is received: the queue's io_uring reads and writes plaintext as on a plain socket.
//!
//! What the kernel does not do for us: a record that is not application data (an alert,
//! a TLS 1.3 KeyUpdate or NewSessionTicket) fails the receive (EIO, or EKEYEXPIRED), which
//! the queue takes as a lost connection and reconnects with a new handshake. SEND_ZC is
//! refused on such a socket (EOPNOTSUPP), so the queue does not use it there.

use super::tls::TlsError;
use rustls::{ClientConnection, ConnectionTrafficSecrets, ProtocolVersion};
use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};

// From <linux/tls.h> and <linux/tcp.h> (libc has SOL_TLS only).
const TCP_ULP: libc::c_int = 31;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_1_2_VERSION: u16 = 0x0303;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

/// Hands the session of `conn`, which ran on `tcp`, to the kernel.
pub fn offload(tcp: TcpStream, mut conn: ClientConnection) -> Result<OwnedFd, TlsError> {
    let state = conn
        .process_new_packets()
        .map_err(|e| TlsError::Ktls(e.to_string()))?;
    // The handshake ends with the server's answer to NBD_OPT_GO: nothing may be left in
    // rustls (it would be lost to the kernel), and the server sends nothing before our
    // first request.
    if state.plaintext_bytes_to_read() != 0 || conn.wants_write() {
        return Err(TlsError::Ktls(
            "data is left in the TLS session after the NBD handshake".into(),
        ));
    }
    let version = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => TLS_1_3_VERSION,
        Some(ProtocolVersion::TLSv1_2) => TLS_1_2_VERSION,
        v => return Err(TlsError::Ktls(format!("unexpected TLS version {v:?}"))),
    };
    let suite = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(|e| TlsError::Ktls(e.to_string()))?;
    let fd = tcp.as_raw_fd();
    set(fd, libc::SOL_TCP, TCP_ULP, b"tls").map_err(TlsError::NoKtls)?;
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    // ENOENT here: the kernel has no AES-GCM AEAD (crypto_alloc_aead("gcm(aes)")).
    let keys_err = |dir: &str, e: io::Error| {
        let hint = match e.raw_os_error() {
            Some(libc::ENOENT) => " (the kernel lacks AES-GCM: load the module 'gcm')",
            _ => "",
        };
        TlsError::Ktls(format!("{dir}: {e}{hint}"))
    };
    let info = crypto_info(version, tx_seq, &tx)?;
    set(fd, libc::SOL_TLS, TLS_TX, &info).map_err(|e| keys_err("TLS_TX", e))?;
    let info = crypto_info(version, rx_seq, &rx)?;
    set(fd, libc::SOL_TLS, TLS_RX, &info).map_err(|e| keys_err("TLS_RX", e))?;
    log::info!(
        "nbd: {suite} session handed to the kernel (kTLS) at record {tx_seq} sent, {rx_seq} received"
    );
    Ok(tcp.into())
}

/// The bytes of `struct tls12_crypto_info_*` for one direction: version, cipher, IV
/// (the nonce's last 8 bytes, or all 12 for ChaCha20), key, salt (the nonce's first 4),
/// record sequence number (big endian). The structs are all bytes after the two u16s, so
/// they have no padding.
fn crypto_info(
    version: u16,
    seq: u64,
    secrets: &ConnectionTrafficSecrets,
) -> Result<Vec<u8>, TlsError> {
    let (cipher, key, iv, salt_len) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (TLS_CIPHER_AES_GCM_128, key, iv, 4),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (TLS_CIPHER_AES_GCM_256, key, iv, 4),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (TLS_CIPHER_CHACHA20_POLY1305, key, iv, 0)
        }
        _ => return Err(TlsError::Ktls("cipher suite unknown to the kernel".into())),
    };
    let iv = iv.as_ref();
    if iv.len() != 12 {
        return Err(TlsError::Ktls(format!("IV of {} bytes", iv.len())));
    }
    let mut info = Vec::with_capacity(4 + 12 + 32 + 8);
    info.extend_from_slice(&version.to_ne_bytes());
    info.extend_from_slice(&cipher.to_ne_bytes());
    info.extend_from_slice(&iv[salt_len..]);
    info.extend_from_slice(key.as_ref());
    info.extend_from_slice(&iv[..salt_len]);
    info.extend_from_slice(&seq.to_be_bytes());
    Ok(info)
}

fn set(fd: libc::c_int, level: libc::c_int, name: libc::c_int, value: &[u8]) -> io::Result<()> {
    // SAFETY: `value` is a live buffer of `value.len()` bytes that the kernel only reads.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout of `struct tls12_crypto_info_aes_gcm_256` and of
    /// `struct tls12_crypto_info_chacha20_poly1305` (56 bytes each), from <linux/tls.h>.
    #[test]
    fn crypto_info_layout() {
        let iv: [u8; 12] = core::array::from_fn(|i| i as u8);
        let gcm = ConnectionTrafficSecrets::Aes256Gcm {
            key: [0xaa; 32].into(),
            iv: rustls::crypto::cipher::Iv::new(iv),
        };
        let b = crypto_info(TLS_1_3_VERSION, 0x0102, &gcm).unwrap();
        assert_eq!(b.len(), 56);
        assert_eq!(&b[0..2], &TLS_1_3_VERSION.to_ne_bytes());
        assert_eq!(&b[2..4], &52u16.to_ne_bytes());
        assert_eq!(&b[4..12], &iv[4..]);
        assert_eq!(&b[12..44], &[0xaa; 32]);
        assert_eq!(&b[44..48], &iv[..4]);
        assert_eq!(&b[48..56], &[0, 0, 0, 0, 0, 0, 1, 2]);
        let chacha = ConnectionTrafficSecrets::Chacha20Poly1305 {
            key: [0xbb; 32].into(),
            iv: rustls::crypto::cipher::Iv::new(iv),
        };
        let b = crypto_info(TLS_1_2_VERSION, 7, &chacha).unwrap();
        assert_eq!(b.len(), 56);
        assert_eq!(&b[4..16], &iv);
        assert_eq!(&b[16..48], &[0xbb; 32]);
        assert_eq!(b[55], 7);
    }
}
