//! TLS-PSK for nbds:// (`tls-psk-file=FILE`): rustls has no client support for external
//! pre-shared keys, so this handshake runs in the system's OpenSSL. It is TLS 1.3 only,
//! with the SHA-256 suites (AES-128-GCM, ChaCha20-Poly1305) an external PSK is bound to.
//!
//! The hand-off to the kernel is ours, not OpenSSL's: OpenSSL 3.0 (Debian 12) gives
//! kernel TLS only the send side of a TLS 1.3 session, and only on a socket BIO. So the
//! handshake and the NBD options run through OpenSSL on our own stream, which counts the
//! records going each way (`Records`); OpenSSL's key log gives the two application
//! traffic secrets; the keys are derived from them (HKDF-Expand-Label "key" and "iv",
//! RFC 8446 7.3) and go to the kernel with the number of records each side has already
//! sent under them (the server's session tickets and option replies, our options), as
//! `ktls::install` does for a rustls session. The queue then sends and receives on the
//! TCP socket as it does with X.509.
//!
//! The file holds `username:hexkey` lines (psktool's format, which nbdkit and qemu
//! read); the username is `tls-username=` or the URI's userinfo, by default "qemu" (as
//! qemu's tls-creds-psk). Keys never appear in messages or logs.

use super::ktls::{Cipher, DirKeys, Session};
use super::tls::TlsError;
use openssl::md::Md;
use openssl::pkey::Id;
use openssl::pkey_ctx::{HkdfMode, PkeyCtx};
use openssl::ssl::{
    ErrorCode, HandshakeError, Ssl, SslContext, SslContextBuilder, SslMethod, SslMode, SslOptions,
    SslStream, SslVerifyMode, SslVersion,
};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The username when neither tls-username nor userinfo names one (qemu's default).
pub const DEFAULT_USERNAME: &str = "qemu";

/// The TLS 1.3 suites an external PSK made with OpenSSL's PSK callback can use (the
/// callback's keys are bound to SHA-256).
const SUITES: &str = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";

/// A pre-shared key and the identity it goes with. Debug shows the identity only.
pub struct Psk {
    pub identity: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Psk({}, {} bytes)", self.identity, self.key.len())
    }
}

impl Drop for Psk {
    fn drop(&mut self) {
        self.key.fill(0);
    }
}

/// The longest key OpenSSL's PSK callback takes (PSK_MAX_PSK_LEN).
const MAX_KEY: usize = 256;

/// The key of `user` in the text of a PSK file (`path` names it in errors). As GnuTLS
/// reads these files, a line is `username:hexkey`; lines for other users (and lines
/// without a colon, such as comments and blank lines) are not looked at.
pub fn parse(text: &str, path: &Path, user: &str) -> Result<Psk, TlsError> {
    let bad = |why: &'static str| TlsError::PskKey {
        path: path.into(),
        user: user.into(),
        why,
    };
    for line in text.lines() {
        let Some((name, hex)) = line.split_once(':') else {
            continue;
        };
        if name != user {
            continue;
        }
        let hex = hex.trim_end();
        if hex.is_empty() {
            return Err(bad("it is empty"));
        }
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("it is not hexadecimal"));
        }
        if hex.len() % 2 != 0 {
            return Err(bad("it has an odd number of hex digits"));
        }
        if hex.len() / 2 > MAX_KEY {
            return Err(bad("it is longer than 256 bytes"));
        }
        let key = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|_| bad("bad hex")))
            .collect::<Result<Vec<u8>, _>>()?;
        return Ok(Psk {
            identity: user.into(),
            key,
        });
    }
    Err(TlsError::PskUser {
        path: path.into(),
        user: user.into(),
    })
}

/// Reads the key for the URI's user from `file`, at every connect (a reconnect sees a
/// changed file).
pub fn read(file: &Path, username: Option<&str>) -> Result<Psk, TlsError> {
    let mut text = std::fs::read_to_string(file).map_err(|source| TlsError::PskFile {
        path: file.into(),
        source,
    })?;
    let psk = parse(&text, file, username.unwrap_or(DEFAULT_USERNAME));
    // SAFETY: zeroes are valid UTF-8; the string is dropped right after.
    unsafe { text.as_bytes_mut().fill(0) };
    psk
}

/// The traffic secrets OpenSSL's key log hands out during a handshake.
#[derive(Default)]
struct Secrets {
    client: Option<Vec<u8>>,
    server: Option<Vec<u8>>,
}

impl Drop for Secrets {
    fn drop(&mut self) {
        for s in [&mut self.client, &mut self.server].into_iter().flatten() {
            s.fill(0);
        }
    }
}

/// A client for one connection: the PSK read from the file and the secrets' slot.
pub struct Connector {
    ctx: SslContext,
    secrets: Arc<Mutex<Secrets>>,
    file: PathBuf,
    user: String,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Connector({}, {})", self.file.display(), self.user)
    }
}

fn ssl_err(e: openssl::error::ErrorStack) -> TlsError {
    TlsError::Handshake(format!("OpenSSL: {e}"))
}

/// The client for the PSK in `file` (`tls-psk-file`) of `user` (`tls-username`).
pub fn connector(file: &Path, user: Option<&str>) -> Result<Connector, TlsError> {
    let psk = read(file, user)?;
    let mut b = SslContextBuilder::new(SslMethod::tls_client()).map_err(ssl_err)?;
    b.set_min_proto_version(Some(SslVersion::TLS1_3))
        .map_err(ssl_err)?;
    b.set_max_proto_version(Some(SslVersion::TLS1_3))
        .map_err(ssl_err)?;
    b.set_ciphersuites(SUITES).map_err(ssl_err)?;
    // One record read at a time: what the stream counts is what OpenSSL processed.
    b.set_read_ahead(false);
    b.set_options(SslOptions::NO_TICKET);
    // Partial writes that may be retried from a moved buffer (the relay's).
    b.set_mode(SslMode::ACCEPT_MOVING_WRITE_BUFFER | SslMode::ENABLE_PARTIAL_WRITE);
    // The server proves itself with the key. A server that ignores it and shows a
    // certificate instead fails verification (no CA is trusted here); `handshake`
    // checks that the key was used, too.
    b.set_verify(SslVerifyMode::PEER);
    let identity = psk.identity.clone();
    b.set_psk_client_callback(move |_, _hint, id, key| {
        let name = identity.as_bytes();
        if name.len() >= id.len() || psk.key.len() > key.len() {
            return Ok(0);
        }
        id[..name.len()].copy_from_slice(name);
        id[name.len()] = 0;
        key[..psk.key.len()].copy_from_slice(&psk.key);
        Ok(psk.key.len())
    });
    let secrets = Arc::new(Mutex::new(Secrets::default()));
    let slot = secrets.clone();
    b.set_keylog_callback(move |_, line| {
        // "LABEL <client random> <secret>", hex.
        let mut parts = line.split(' ');
        let (Some(label), Some(_), Some(hex)) = (parts.next(), parts.next(), parts.next()) else {
            return;
        };
        let Ok(mut s) = slot.lock() else { return };
        let target = match label {
            "CLIENT_TRAFFIC_SECRET_0" => &mut s.client,
            "SERVER_TRAFFIC_SECRET_0" => &mut s.server,
            _ => return,
        };
        let bytes: Option<Vec<u8>> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
            .collect();
        *target = bytes;
    });
    Ok(Connector {
        ctx: b.build(),
        secrets,
        file: file.into(),
        user: user.unwrap_or(DEFAULT_USERNAME).into(),
    })
}

/// Counts the TLS records going one way through a stream: their 5-byte headers give
/// each one's type and length.
#[derive(Debug, Default, Clone, Copy)]
pub struct Records {
    header: [u8; 5],
    have: usize,
    body_left: usize,
    /// Whole records of type application_data (23): in TLS 1.3 every encrypted record.
    pub encrypted: u64,
    /// Whole records of another type (plaintext: handshake, change_cipher_spec, alert).
    pub plain: u64,
}

impl Records {
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                if self.body_left == 0 {
                    self.end();
                }
                continue;
            }
            let n = (5 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 5 {
                self.body_left = u16::from_be_bytes([self.header[3], self.header[4]]) as usize;
                if self.body_left == 0 {
                    self.end();
                }
            }
        }
    }

    fn end(&mut self) {
        if self.header[0] == 23 {
            self.encrypted += 1;
        } else {
            self.plain += 1;
        }
        self.have = 0;
    }

    /// Whether the bytes so far end with a whole record.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.body_left == 0
    }
}

/// A stream that counts the records read from it and written to it.
pub struct Counted<S> {
    pub inner: S,
    pub rx: Records,
    pub tx: Records,
}

impl<S: Read> Read for Counted<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.rx.feed(&buf[..n]);
        Ok(n)
    }
}

impl<S: Write> Write for Counted<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.tx.feed(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A session after its handshake: the stream the NBD options run over, and how many
/// records each way the handshake took.
pub struct Client<S> {
    pub stream: SslStream<Counted<S>>,
    handshake_rx: Records,
    handshake_tx: Records,
    secrets: Arc<Mutex<Secrets>>,
}

impl Connector {
    /// What the user can check when the server refuses the handshake.
    fn refused(&self, what: &str) -> TlsError {
        TlsError::Handshake(format!(
            "the server refused the TLS-PSK handshake ({what}): does it have the key of user '{}' in {}?",
            self.user,
            self.file.display()
        ))
    }

    /// Runs the TLS handshake on `io` (which bounds it in time).
    pub fn handshake<S: Read + Write>(&self, io: S) -> Result<Client<S>, TlsError> {
        let ssl = Ssl::new(&self.ctx).map_err(ssl_err)?;
        let counted = Counted {
            inner: io,
            rx: Records::default(),
            tx: Records::default(),
        };
        let stream = match ssl.connect(counted) {
            Ok(s) => s,
            Err(HandshakeError::SetupFailure(e)) => return Err(ssl_err(e)),
            Err(HandshakeError::Failure(m)) | Err(HandshakeError::WouldBlock(m)) => {
                let e = m.error();
                if let Some(io) = e.io_error() {
                    if io.kind() == io::ErrorKind::ConnectionReset {
                        return Err(self.refused("it reset the connection"));
                    }
                    return Err(TlsError::Handshake(io.to_string()));
                }
                if e.code() == ErrorCode::SYSCALL && e.ssl_error().is_none() {
                    // GnuTLS (nbdkit, qemu-nbd) closes without an alert.
                    return Err(self.refused("it closed the connection"));
                }
                let text = e
                    .ssl_error()
                    .and_then(|s| s.errors().first())
                    .and_then(|e| e.reason())
                    .unwrap_or("the connection ended")
                    .to_string();
                if text.contains("certificate verify failed") {
                    return Err(self
                        .refused("it offered a certificate instead: it has no key for this user"));
                }
                if text.contains("alert") {
                    return Err(self.refused(&text));
                }
                return Err(TlsError::Handshake(text));
            }
        };
        if !stream.ssl().session_reused() {
            return Err(self.refused("it did not use the key"));
        }
        let (rx, tx) = (stream.get_ref().rx, stream.get_ref().tx);
        if !rx.at_boundary() || !tx.at_boundary() {
            let why = "the handshake did not end on a record boundary".into();
            return Err(TlsError::Kernel(super::ktls::KtlsError::Extract(why)));
        }
        Ok(Client {
            stream,
            handshake_rx: rx,
            handshake_tx: tx,
            secrets: self.secrets.clone(),
        })
    }
}

/// HKDF-Expand-Label(secret, label, "", len) (RFC 8446 7.1).
fn expand_label(
    md: &openssl::md::MdRef,
    secret: &[u8],
    label: &str,
    len: usize,
) -> Result<Vec<u8>, TlsError> {
    let full = format!("tls13 {label}");
    let mut info = (len as u16).to_be_bytes().to_vec();
    info.push(full.len() as u8);
    info.extend_from_slice(full.as_bytes());
    info.push(0);
    let derive = || -> Result<Vec<u8>, openssl::error::ErrorStack> {
        let mut ctx = PkeyCtx::new_id(Id::HKDF)?;
        ctx.derive_init()?;
        ctx.set_hkdf_mode(HkdfMode::EXPAND_ONLY)?;
        ctx.set_hkdf_md(md)?;
        ctx.set_hkdf_key(secret)?;
        ctx.add_hkdf_info(&info)?;
        let mut out = vec![0u8; len];
        ctx.derive(Some(&mut out))?;
        Ok(out)
    };
    derive().map_err(|e| {
        TlsError::Kernel(super::ktls::KtlsError::Extract(format!(
            "cannot derive the traffic keys: {e}"
        )))
    })
}

/// One direction's keys from its traffic secret.
pub fn traffic_keys(cipher: Cipher, secret: &[u8], seq: u64) -> Result<DirKeys, TlsError> {
    let md = Md::sha256();
    let key_len = match cipher {
        Cipher::Aes128Gcm => 16,
        Cipher::Aes256Gcm | Cipher::Chacha20Poly1305 => 32,
    };
    Ok(DirKeys {
        key: expand_label(md, secret, "key", key_len)?,
        iv: expand_label(md, secret, "iv", 12)?,
        seq,
    })
}

impl<S: Read + Write> Client<S> {
    /// The session's keys for the kernel, once the options are over: OpenSSL must hold
    /// no record it has not handed out, and every record since the handshake must be
    /// whole and encrypted. Ends the OpenSSL session (without a close_notify: the
    /// kernel carries on).
    pub fn into_session(self) -> Result<Session, TlsError> {
        let extract = |why: &str| TlsError::Kernel(super::ktls::KtlsError::Extract(why.into()));
        let cipher = match self.stream.ssl().current_cipher().map(|c| c.name()) {
            Some("TLS_AES_128_GCM_SHA256") => Cipher::Aes128Gcm,
            Some("TLS_CHACHA20_POLY1305_SHA256") => Cipher::Chacha20Poly1305,
            _ => return Err(TlsError::Kernel(super::ktls::KtlsError::Cipher)),
        };
        if self.stream.ssl().pending() > 0 {
            return Err(extract("the server sent more than the reply to NBD_OPT_GO"));
        }
        let (rx, tx) = (self.stream.get_ref().rx, self.stream.get_ref().tx);
        if !rx.at_boundary() || !tx.at_boundary() {
            return Err(extract(
                "a TLS record is cut in half at the end of the options",
            ));
        }
        if rx.plain != self.handshake_rx.plain || tx.plain != self.handshake_tx.plain {
            return Err(extract("a plaintext record came after the handshake"));
        }
        let secrets = self.secrets.lock().map_err(|_| extract("lock"))?;
        let (Some(client), Some(server)) = (&secrets.client, &secrets.server) else {
            return Err(extract("OpenSSL logged no traffic secrets"));
        };
        let session = Session {
            tls13: true,
            cipher,
            tx: traffic_keys(cipher, client, tx.encrypted - self.handshake_tx.encrypted)?,
            rx: traffic_keys(cipher, server, rx.encrypted - self.handshake_rx.encrypted)?,
        };
        // Dropping the stream frees the OpenSSL session without SSL_shutdown: nothing
        // more is written to the socket.
        Ok(session)
    }
}

#[cfg(test)]
#[path = "tests/psk.rs"]
mod tests;
