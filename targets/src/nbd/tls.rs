//! TLS for the nbd target (nbds://, nbds+unix://): the client's TLS handshake runs in
//! userspace with rustls after NBD_OPT_STARTTLS; the rest of the option haggling (OPT_GO)
//! runs over it; then over TCP the session goes to the kernel (kTLS, `ktls.rs`) and the
//! queue's io_uring sends and receives plaintext on the TCP socket; over a Unix socket,
//! which has no kTLS, a relay thread (`relay.rs`) keeps the session and hands the queue
//! one end of a socket pair.
//!
//! Credentials are laid out as qemu and nbdkit lay them out: `tls-certificates=DIR` holds
//! `ca-cert.pem` (the CA that signs the server's certificate) and, for client
//! authentication, `client-cert.pem` and `client-key.pem`. TLS-PSK (`tls-psk-file=FILE`)
//! runs in OpenSSL instead (`psk.rs`): rustls has no client support for external
//! pre-shared keys.

use super::uri::{Address, TlsCreds, TlsParams};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

pub const CA_CERT: &str = "ca-cert.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read the PSK file {path}: {source}")]
    PskFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the PSK file {path} has no key for user '{user}' (lines are USERNAME:HEXKEY; the user is tls-username=NAME or the URI's NAME@, by default 'qemu')")]
    PskUser { path: PathBuf, user: String },
    #[error("the key of user '{user}' in {path} is bad: {why} (lines are USERNAME:HEXKEY, as psktool writes them)")]
    PskKey {
        path: PathBuf,
        user: String,
        why: &'static str,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
    #[error("{have} is there but {missing} is not: client authentication needs both")]
    HalfClientCert { have: PathBuf, missing: PathBuf },
    #[error("bad TLS credentials in {dir}: {source}")]
    Config {
        dir: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the TLS handshake failed: {0}")]
    Handshake(String),
    #[error("cannot set up certificate checks: {0}")]
    Verifier(String),
    #[error("cannot start the TLS relay: {0}")]
    Relay(io::Error),
    #[error("{0}")]
    Kernel(#[from] super::ktls::KtlsError),
}

/// The ring provider: it builds with a C compiler alone (aws-lc-rs, rustls' default, needs
/// more). rustls 0.23.48 deprecates it for having no post-quantum key exchange; the NBD
/// servers (GnuTLS) negotiate X25519 or the NIST curves with it.
///
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        path: path.into(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.into()));
    }
    Ok(certs)
}

/// A connection's TLS client: rustls with X.509 certificates, or OpenSSL with a
/// pre-shared key.
#[derive(Debug)]
pub enum Client {
    X509(Arc<ClientConfig>),
    Psk(super::psk::Connector),
}

/// The client for `params`, with its credentials read now, at every connect, so a
/// reconnect sees renewed files.
pub fn client(params: &TlsParams, address: &Address) -> Result<Client, TlsError> {
    match &params.creds {
        TlsCreds::X509 { dir } => client_config(params, dir, address).map(Client::X509),
        TlsCreds::Psk { file, username } => {
            super::psk::connector(file, username.as_deref()).map(Client::Psk)
        }
    }
}

/// The rustls configuration for the certificates in `dir`.
fn client_config(
    params: &TlsParams,
    dir: &Path,
    address: &Address,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let cfg_err = |source| TlsError::Config {
        dir: dir.into(),
        source,
    };
    let inner = if params.verify_peer {
        let mut roots = rustls::RootCertStore::empty();
        for c in certificates(&dir.join(CA_CERT))? {
            roots.add(c).map_err(cfg_err)?;
        }
        let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        Some(v)
    } else {
        None
    };
    let verifier = Arc::new(Verifier {
        inner,
        // Over a Unix socket without tls-hostname the chain is checked, not the name (as
        // qemu and libnbd do): there is no name to check.
        check_name: params.hostname.is_some() || matches!(address, Address::Tcp { .. }),
        provider: provider.clone(),
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(cfg_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let (cert, key) = (dir.join(CLIENT_CERT), dir.join(CLIENT_KEY));
    let mut config = match (cert.exists(), key.exists()) {
        (false, false) => builder.with_no_client_auth(),
        (true, true) => {
            let k = PrivateKeyDer::from_pem_file(&key).map_err(|source| TlsError::Read {
                path: key.clone(),
                source,
            })?;
            builder
                .with_client_auth_cert(certificates(&cert)?, k)
                .map_err(cfg_err)?
        }
        (true, false) => {
            return Err(TlsError::HalfClientCert {
                have: cert,
                missing: key,
            })
        }
        (false, true) => {
            return Err(TlsError::HalfClientCert {
                have: key,
                missing: cert,
            })
        }
    };
    // Every connect makes a full handshake: session tickets are of no use.
    config.resumption = Resumption::disabled();
    // Over TCP the session's keys go to the kernel after the options (`ktls.rs`).
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// A client session for a server at `address` (see `Verifier` for the name checked).
pub fn connection(
    config: Arc<ClientConfig>,
    params: &TlsParams,
    address: &Address,
) -> Result<ClientConnection, TlsError> {
    let name = match (&params.hostname, address) {
        (Some(h), _) => h.clone(),
        (None, Address::Tcp { host, .. }) => host.clone(),
        // Over a Unix socket without tls-hostname: a placeholder (see `Verifier`).
        (None, Address::Unix(_)) => "localhost".into(),
    };
    let name = ServerName::try_from(name)
        .map_err(|e| TlsError::Handshake(format!("bad server name: {e}")))?;
    ClientConnection::new(config, name).map_err(|e| TlsError::Handshake(e.to_string()))
}

/// Runs the TLS handshake on `io` (which bounds it in time).
pub fn handshake<T: io::Read + io::Write>(
    conn: &mut ClientConnection,
    io: &mut T,
) -> Result<(), TlsError> {
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(io) {
            return Err(TlsError::Handshake(explain(&e)));
        }
    }
    Ok(())
}

/// Why the server ended a session whose handshake looked complete to us: in TLS 1.3 the
/// server checks the client's certificate after the client is done, so its refusal (an
/// alert, or just a closed connection) comes when the NBD options are under way. `None`
/// if `failed` (how the options failed) is not that.
pub fn refusal<T: io::Read + io::Write>(
    conn: &mut ClientConnection,
    io: &mut T,
    failed: &io::Error,
) -> Option<String> {
    if !matches!(
        failed.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
    ) {
        return None;
    }
    for _ in 0..4 {
        match conn.read_tls(io) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if let Err(e) = conn.process_new_packets() {
            return Some(explain(&io::Error::new(io::ErrorKind::InvalidData, e)));
        }
    }
    Some(format!(
        "the server closed the connection after the TLS handshake ({failed}): does it want a client certificate it trusts ({CLIENT_CERT} and {CLIENT_KEY})?"
    ))
}

/// Says what went wrong in words a user can act on.
fn explain(e: &io::Error) -> String {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => {
                "the server's certificate is not signed by the CA in ca-cert.pem".into()
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("the server's certificate has expired ({tls})")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("the server's certificate is not valid yet ({tls})")
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("the server's certificate is for another host ({tls}); tls-hostname=NAME sets the name to check")
            }
            _ => format!("the server's certificate is refused: {tls}"),
        },
        rustls::Error::AlertReceived(a) => format!(
            "the server refused the TLS session (alert {a:?}; does it need a client certificate, client-cert.pem and client-key.pem?)"
        ),
        _ => tls.to_string(),
    }
}

/// Checks the server's certificate against the CA (`inner`; `None` with
/// tls-verify-peer=0) and, when `check_name`, its name (the chain is checked first). Signatures over the handshake are
/// always checked: they prove the server holds the certificate's key.
#[derive(Debug)]
struct Verifier {
    inner: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(inner) = &self.inner else {
            return Ok(ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            // The chain was checked before the name (webpki's order): only the name failed.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
