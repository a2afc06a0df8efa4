//! NBD URIs as the NBD URI specification (NetworkBlockDevice/nbd, doc/uri.md) and
//! libnbd write them: `nbd://[USER@]HOST[:PORT]/EXPORT` and
//! `nbd+unix:///EXPORT?socket=PATH`, with `nbds` and `nbds+unix` for TLS.
//!
//! Query parameters: `socket` (Unix sockets), and for TLS `tls-certificates=DIR`
//! (ca-cert.pem, and client-cert.pem + client-key.pem for client authentication, as
//! qemu and nbdkit lay them out), `tls-hostname`, `tls-verify-peer=0|1`, `tls-type`,
//! `tls-psk-file` and `tls-username` (or the userinfo). Anything else is an error. A URI
//! names files holding secrets, never the secrets, so it is safe to show and log.

use std::path::PathBuf;
use thiserror::Error;

pub const DEFAULT_PORT: u16 = 10809;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub address: Address,
    pub export: String,
    /// `Some` for nbds:// and nbds+unix://: TLS is required.
    pub tls: Option<TlsParams>,
}

/// How a TLS connection authenticates (the URI's TLS parameters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    pub creds: TlsCreds,
    /// The name the server's certificate must carry (`tls-hostname`); by default the
    /// URI's host, and none over a Unix socket (the chain is checked, not the name).
    pub hostname: Option<String>,
    /// Whether the server's certificate is checked (`tls-verify-peer`, default 1).
    pub verify_peer: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsCreds {
    /// `tls-certificates=DIR`: X.509 certificates.
    X509 { dir: PathBuf },
    /// `tls-psk-file=FILE` (`username:hexkey` lines) and the username to pick.
    Psk {
        file: PathBuf,
        username: Option<String>,
    },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum UriError {
    #[error("'{0}' is not an NBD URI (expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)")]
    NotNbd(String),
    #[error(
        "{0}: unsupported NBD URI scheme '{1}' (use nbd://, nbds://, nbd+unix:// or nbds+unix://)"
    )]
    Scheme(String, String),
    #[error("{0}: no host")]
    NoHost(String),
    #[error("{0}: bad host '{1}' (use a host name, an IPv4 address or [IPv6])")]
    Host(String, String),
    #[error("{0}: bad port '{1}'")]
    Port(String, String),
    #[error("{0}: nbd+unix needs ?socket=PATH and no host")]
    UnixSocket(String),
    #[error("{0}: bad percent-encoding")]
    Encoding(String),
    #[error("{0}: unknown query parameter '{1}' (known: socket, tls-certificates, tls-hostname, tls-verify-peer, tls-type, tls-psk-file, tls-username)")]
    UnknownParam(String, String),
    #[error("{0}: query parameter '{1}' is given twice")]
    DuplicateParam(String, String),
    #[error("{0}: bad value for '{1}': {2}")]
    BadParam(String, String, String),
    #[error("{0}: '{1}' is a TLS parameter: use nbds:// or nbds+unix:// (TLS is never optional)")]
    TlsParamWithoutTls(String, String),
    #[error("{0}: TLS needs credentials: add tls-certificates=DIR (ca-cert.pem, optionally client-cert.pem and client-key.pem) or tls-psk-file=FILE")]
    NoCredentials(String),
    #[error("{0}: {1}")]
    Conflict(String, String),
}

fn percent_decode(s: &str, uri: &str) -> Result<String, UriError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| UriError::Encoding(uri.into()))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| UriError::Encoding(uri.into()))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UriError::Encoding(uri.into()))
}

/// Percent-encodes all but unreserved characters and `keep`, so that the text reads back
/// as itself in its part of the URI.
fn percent_encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A host name or IPv4 address (no ':', no '@', nothing to escape).
fn plain_host(h: &str) -> bool {
    h.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// The query parameters, decoded, each at most once.
#[derive(Default)]
struct Query {
    socket: Option<String>,
    certificates: Option<String>,
    hostname: Option<String>,
    verify_peer: Option<String>,
    tls_type: Option<String>,
    psk_file: Option<String>,
    username: Option<String>,
}

impl Query {
    fn parse(query: Option<&str>, uri: &str) -> Result<Query, UriError> {
        let mut q = Query::default();
        for kv in query.into_iter().flat_map(|q| q.split('&')) {
            if kv.is_empty() {
                continue;
            }
            let (key, value) = kv.split_once('=').unwrap_or((kv, ""));
            let slot = match key {
                "socket" => &mut q.socket,
                "tls-certificates" => &mut q.certificates,
                "tls-hostname" => &mut q.hostname,
                "tls-verify-peer" => &mut q.verify_peer,
                "tls-type" => &mut q.tls_type,
                "tls-psk-file" => &mut q.psk_file,
                "tls-username" => &mut q.username,
                _ => return Err(UriError::UnknownParam(uri.into(), key.into())),
            };
            if slot.is_some() {
                return Err(UriError::DuplicateParam(uri.into(), key.into()));
            }
            *slot = Some(percent_decode(value, uri)?);
        }
        Ok(q)
    }

    /// The first TLS parameter given, by name.
    fn first_tls(&self) -> Option<&'static str> {
        [
            ("tls-certificates", &self.certificates),
            ("tls-hostname", &self.hostname),
            ("tls-verify-peer", &self.verify_peer),
            ("tls-type", &self.tls_type),
            ("tls-psk-file", &self.psk_file),
            ("tls-username", &self.username),
        ]
        .into_iter()
        .find_map(|(name, v)| v.as_ref().map(|_| name))
    }
}

/// The TLS parameters of an nbds URI; `userinfo` is the TLS username.
fn tls_params(q: &mut Query, userinfo: Option<String>, uri: &str) -> Result<TlsParams, UriError> {
    let bad = |name: &str, why: &str| UriError::BadParam(uri.into(), name.into(), why.into());
    let conflict = |why: &str| UriError::Conflict(uri.into(), why.into());
    let verify_peer = match q.verify_peer.as_deref() {
        None | Some("1") => true,
        Some("0") => false,
        Some(_) => return Err(bad("tls-verify-peer", "use 0 or 1")),
    };
    let hostname = q.hostname.take();
    if let Some(h) = &hostname {
        if rustls_pki_types::ServerName::try_from(h.as_str()).is_err() {
            return Err(bad("tls-hostname", "not a DNS name or IP address"));
        }
    }
    let username = match (userinfo, q.username.take()) {
        (Some(a), Some(b)) if a != b => {
            return Err(conflict(
                "the userinfo and tls-username name two different users",
            ))
        }
        (a, b) => a.or(b),
    };
    if username.as_deref() == Some("") {
        return Err(bad("tls-username", "empty"));
    }
    if q.certificates.is_some() && username.is_some() {
        return Err(conflict(
            "a TLS username is for tls-psk-file, not for certificates",
        ));
    }
    let creds = match (q.certificates.take(), q.psk_file.take()) {
        (Some(_), Some(_)) => {
            return Err(conflict(
                "tls-certificates and tls-psk-file exclude each other",
            ))
        }
        (Some(dir), None) if !dir.is_empty() => TlsCreds::X509 { dir: dir.into() },
        (None, Some(file)) if !file.is_empty() => TlsCreds::Psk {
            file: file.into(),
            username,
        },
        (None, None) => return Err(UriError::NoCredentials(uri.into())),
        (Some(_), None) => return Err(bad("tls-certificates", "empty")),
        (None, Some(_)) => return Err(bad("tls-psk-file", "empty")),
    };
    match (q.tls_type.as_deref(), &creds) {
        (None, _) | (Some("x509"), TlsCreds::X509 { .. }) | (Some("psk"), TlsCreds::Psk { .. }) => {
        }
        (Some("x509"), _) => return Err(conflict("tls-type=x509 needs tls-certificates=DIR")),
        (Some("psk"), _) => return Err(conflict("tls-type=psk needs tls-psk-file=FILE")),
        (Some("anon"), _) => {
            return Err(bad(
                "tls-type",
                "anonymous TLS is not supported (it does not authenticate the server)",
            ))
        }
        (Some(_), _) => return Err(bad("tls-type", "use x509 or psk")),
    }
    Ok(TlsParams {
        creds,
        hostname,
        verify_peer,
    })
}

impl std::str::FromStr for NbdUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<Self, UriError> {
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| UriError::NotNbd(uri.into()))?;
        let (tls, unix) = match scheme {
            "nbd" | "nbd+tcp" => (false, false),
            "nbd+unix" => (false, true),
            "nbds" | "nbds+tcp" => (true, false),
            "nbds+unix" => (true, true),
            s if s.starts_with("nbd") => return Err(UriError::Scheme(uri.into(), s.into())),
            _ => return Err(UriError::NotNbd(uri.into())),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path, uri)?;
        let mut q = Query::parse(query, uri)?;
        let (userinfo, authority) = match authority.rsplit_once('@') {
            Some((user, host)) => {
                if user.contains(':') {
                    return Err(UriError::BadParam(
                        uri.into(),
                        "userinfo".into(),
                        "a password in the URI is not supported (use tls-psk-file=FILE)".into(),
                    ));
                }
                (Some(percent_decode(user, uri)?), host)
            }
            None => (None, authority),
        };
        let tls = if tls {
            Some(tls_params(&mut q, userinfo, uri)?)
        } else if let Some(name) = q.first_tls() {
            return Err(UriError::TlsParamWithoutTls(uri.into(), name.into()));
        } else if userinfo.is_some() {
            return Err(UriError::TlsParamWithoutTls(uri.into(), "userinfo".into()));
        } else {
            None
        };
        if unix {
            let socket = q.socket.filter(|s| !s.is_empty());
            let Some(socket) = socket.filter(|_| authority.is_empty()) else {
                return Err(UriError::UnixSocket(uri.into()));
            };
            return Ok(NbdUri {
                address: Address::Unix(socket.into()),
                export,
                tls,
            });
        }
        if q.socket.is_some() {
            return Err(UriError::BadParam(
                uri.into(),
                "socket".into(),
                "only nbd+unix:// and nbds+unix:// take a socket".into(),
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| UriError::NoHost(uri.into()))?;
            if host.parse::<std::net::Ipv6Addr>().is_err()
                || !after.is_empty() && !after.starts_with(':')
            {
                return Err(UriError::Host(uri.into(), authority.into()));
            }
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(UriError::NoHost(uri.into()));
        }
        if !authority.starts_with('[') && !plain_host(host) {
            return Err(UriError::Host(uri.into(), host.into()));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => p
                .parse()
                .map_err(|_| UriError::Port(uri.into(), p.into()))?,
        };
        Ok(NbdUri {
            address: Address::Tcp {
                host: host.into(),
                port,
            },
            export,
            tls,
        })
    }
}

/// Prints a URI that parses back to the same `NbdUri` (found by fuzzing). It holds paths
/// to credentials, never key material.
impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let export = percent_encode(&self.export, b"/:@!$&'()*+,;=");
        let s = if self.tls.is_some() { "s" } else { "" };
        let value = |v: &str| percent_encode(v, b"/:@!$'()*+,;=");
        let mut query = Vec::new();
        match &self.address {
            Address::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd{s}://[{host}]:{port}/{export}")?
            }
            Address::Tcp { host, port } => write!(f, "nbd{s}://{host}:{port}/{export}")?,
            Address::Unix(p) => {
                write!(f, "nbd{s}+unix:///{export}")?;
                query.push(format!("socket={}", value(&p.to_string_lossy())));
            }
        }
        if let Some(tls) = &self.tls {
            match &tls.creds {
                TlsCreds::X509 { dir } => {
                    query.push(format!(
                        "tls-certificates={}",
                        value(&dir.to_string_lossy())
                    ));
                }
                TlsCreds::Psk { file, username } => {
                    query.push(format!("tls-psk-file={}", value(&file.to_string_lossy())));
                    if let Some(u) = username {
                        query.push(format!("tls-username={}", value(u)));
                    }
                }
            }
            if let Some(h) = &tls.hostname {
                query.push(format!("tls-hostname={}", value(h)));
            }
            if !tls.verify_peer {
                query.push("tls-verify-peer=0".into());
            }
        }
        if !query.is_empty() {
            write!(f, "?{}", query.join("&"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "tests/uri.rs"]
mod tests;
