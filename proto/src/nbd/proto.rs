//! The NBD wire protocol, client side, as written in the NBD protocol specification
//! (NetworkBlockDevice/nbd, doc/proto.md): the fixed newstyle handshake with NBD_OPT_GO
//! (falling back to NBD_OPT_EXPORT_NAME), and the simple request/reply messages of the
//! transmission phase. All integers are big-endian.

use std::io::{self, Read, Write};
use thiserror::Error;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_GO: u32 = 7;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// NBD_REP_INFO types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

pub const REQUEST_LEN: usize = 28;
pub const REPLY_LEN: usize = 16;

/// Longest option reply the client accepts (the spec bounds strings to 4096 bytes).
const MAX_OPTION_REPLY: u32 = 64 * 1024;

#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not an NBD server (bad magic {0:#018x})")]
    BadMagic(u64),
    #[error("the server speaks the oldstyle NBD protocol, which is not supported")]
    Oldstyle,
    #[error("the server refused export '{export}': {reason}")]
    Refused { export: String, reason: String },
    #[error("the server requires TLS: use nbds:// (or nbds+unix://) with tls-certificates=DIR")]
    TlsRequired,
    #[error("the server does not offer TLS: {0}")]
    NoTls(String),
    #[error("protocol error during the handshake: {0}")]
    Protocol(String),
    #[error("the export has size 0")]
    ZeroSize,
}

/// What the server told us about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// (minimum, preferred, maximum) block size, when the server sent NBD_INFO_BLOCK_SIZE.
    pub block_size: Option<(u32, u32, u32)>,
}

impl ExportInfo {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & TFLAG_HAS_FLAGS != 0 && self.flags & flag != 0
    }
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// An option request: IHAVEOPT, option, length, data.
pub fn option_request(option: u32, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// NBD_OPT_GO's data: the export name and the information we ask for (block sizes).
pub fn go_data(export: &str) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d
}

fn reply_error_name(reply: u32) -> &'static str {
    match reply {
        REP_ERR_UNSUP => "option not supported",
        REP_ERR_POLICY => "forbidden by policy",
        REP_ERR_INVALID => "invalid request",
        REP_ERR_PLATFORM => "not supported on this platform",
        REP_ERR_TLS_REQD => "TLS required",
        REP_ERR_UNKNOWN => "no such export",
        REP_ERR_SHUTDOWN => "server is shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "block size negotiation required",
        REP_ERR_TOO_BIG => "request too big",
        _ => "error",
    }
}

/// Runs the client side of the handshake for `export` on a connected stream.
pub fn handshake<S: Read + Write>(s: &mut S, export: &str) -> Result<ExportInfo, HandshakeError> {
    let greeting = greet(s)?;
    options(s, export, greeting)
}

/// What the server's greeting allows the rest of the handshake.
#[derive(Debug, Clone, Copy)]
pub struct Greeting {
    /// Fixed newstyle: options (NBD_OPT_GO, NBD_OPT_STARTTLS) may be sent.
    fixed: bool,
    /// The export's 124 zero bytes are left out (NBD_OPT_EXPORT_NAME's reply).
    no_zeroes: bool,
}

/// Reads the server's greeting and sends the client flags.
pub fn greet<S: Read + Write>(s: &mut S) -> Result<Greeting, HandshakeError> {
    let magic = read_u64(s)?;
    if magic != NBDMAGIC {
        return Err(HandshakeError::BadMagic(magic));
    }
    let magic = read_u64(s)?;
    if magic == OLDSTYLE_MAGIC {
        return Err(HandshakeError::Oldstyle);
    }
    if magic != IHAVEOPT {
        return Err(HandshakeError::BadMagic(magic));
    }
    let server_flags = read_u16(s)?;
    let greeting = Greeting {
        fixed: server_flags & FLAG_FIXED_NEWSTYLE != 0,
        no_zeroes: server_flags & FLAG_NO_ZEROES != 0,
    };
    let mut client_flags = 0;
    if greeting.fixed {
        client_flags |= FLAG_C_FIXED_NEWSTYLE;
    }
    if greeting.no_zeroes {
        client_flags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&client_flags.to_be_bytes())?;
    Ok(greeting)
}

/// Asks the server to start TLS (NBD_OPT_STARTTLS). On `Ok` the client's TLS handshake
/// follows on the same stream; a server that refuses is an error (never plaintext).
pub fn starttls<S: Read + Write>(s: &mut S, greeting: Greeting) -> Result<(), HandshakeError> {
    if !greeting.fixed {
        return Err(HandshakeError::NoTls(
            "it speaks plain newstyle, which has no NBD_OPT_STARTTLS".into(),
        ));
    }
    s.write_all(&option_request(OPT_STARTTLS, &[]))?;
    let (reply, data) = option_reply(s, OPT_STARTTLS, "NBD_OPT_STARTTLS")?;
    let len = data.len();
    match reply {
        REP_ACK if len == 0 => Ok(()),
        REP_ACK => Err(HandshakeError::Protocol(format!(
            "NBD_OPT_STARTTLS acknowledged with {len} bytes of data"
        ))),
        err => {
            let text = String::from_utf8_lossy(&data).trim().to_string();
            let mut why = format!("NBD_OPT_STARTTLS: {}", reply_error_name(err));
            if !text.is_empty() {
                why.push_str(&format!(" ({text})"));
            }
            Err(HandshakeError::NoTls(why))
        }
    }
}

/// Negotiates `export` after the greeting (and after TLS, when it was started).
pub fn options<S: Read + Write>(
    s: &mut S,
    export: &str,
    greeting: Greeting,
) -> Result<ExportInfo, HandshakeError> {
    if greeting.fixed {
        s.write_all(&option_request(OPT_GO, &go_data(export)))?;
        if let Some(info) = go_replies(s, export)? {
            return finish(info);
        }
    }
    // Plain newstyle, or a server that does not know NBD_OPT_GO.
    s.write_all(&option_request(OPT_EXPORT_NAME, export.as_bytes()))?;
    let size = read_u64(s)?;
    let flags = read_u16(s)?;
    if !greeting.no_zeroes {
        let mut zeroes = [0u8; 124];
        s.read_exact(&mut zeroes)?;
    }
    finish(ExportInfo {
        size,
        flags,
        block_size: None,
    })
}

fn finish(info: ExportInfo) -> Result<ExportInfo, HandshakeError> {
    if info.size == 0 {
        return Err(HandshakeError::ZeroSize);
    }
    Ok(info)
}

/// Reads one option reply to `option` (named `name` in errors): its reply type and data.
fn option_reply<S: Read>(
    s: &mut S,
    option: u32,
    name: &str,
) -> Result<(u32, Vec<u8>), HandshakeError> {
    let magic = read_u64(s)?;
    if magic != OPT_REPLY_MAGIC {
        return Err(HandshakeError::Protocol(format!(
            "bad option reply magic {magic:#x}"
        )));
    }
    let got = read_u32(s)?;
    if got != option {
        return Err(HandshakeError::Protocol(format!(
            "reply for option {got}, not {name}"
        )));
    }
    let reply = read_u32(s)?;
    let len = read_u32(s)?;
    if len > MAX_OPTION_REPLY {
        return Err(HandshakeError::Protocol(format!(
            "option reply of {len} bytes"
        )));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok((reply, data))
}

/// Reads the replies to NBD_OPT_GO. `None`: the server does not support it.
fn go_replies<S: Read>(s: &mut S, export: &str) -> Result<Option<ExportInfo>, HandshakeError> {
    let mut info = ExportInfo::default();
    let mut have_export = false;
    loop {
        let (reply, data) = option_reply(s, OPT_GO, "NBD_OPT_GO")?;
        match reply {
            REP_ACK => {
                if !have_export {
                    return Err(HandshakeError::Protocol(
                        "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into(),
                    ));
                }
                return Ok(Some(info));
            }
            REP_INFO => parse_info(&data, &mut info, &mut have_export)?,
            REP_ERR_UNSUP => return Ok(None),
            REP_ERR_TLS_REQD => return Err(HandshakeError::TlsRequired),
            err if err & REP_FLAG_ERROR != 0 => {
                let text = String::from_utf8_lossy(&data).trim().to_string();
                let reason = match text.is_empty() {
                    true => reply_error_name(err).to_string(),
                    false => format!("{} ({text})", reply_error_name(err)),
                };
                return Err(HandshakeError::Refused {
                    export: export.to_string(),
                    reason,
                });
            }
            other => log::debug!("ignoring NBD option reply type {other}"),
        }
    }
}

fn parse_info(
    data: &[u8],
    info: &mut ExportInfo,
    have_export: &mut bool,
) -> Result<(), HandshakeError> {
    let short = || HandshakeError::Protocol(format!("short NBD_REP_INFO ({} bytes)", data.len()));
    let be16 = |o: usize| data.get(o..o + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let be32 = |o: usize| {
        data.get(o..o + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let be64 = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
    };
    match be16(0).ok_or_else(short)? {
        INFO_EXPORT => {
            info.size = be64(2).ok_or_else(short)?;
            info.flags = be16(10).ok_or_else(short)?;
            *have_export = true;
        }
        INFO_BLOCK_SIZE => {
            let (min, pref, max) = (
                be32(2).ok_or_else(short)?,
                be32(6).ok_or_else(short)?,
                be32(10).ok_or_else(short)?,
            );
            info.block_size = Some((min, pref, max));
        }
        _ => {}
    }
    Ok(())
}

/// A transmission request: magic, flags, type, cookie, offset, length.
///
/// `#[inline]` on the per-request functions: they are called for every block request
/// from another crate (ublkd-targets), where without it they could not be inlined.
#[inline]
pub fn request(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
    let mut m = [0u8; REQUEST_LEN];
    m[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m[4..6].copy_from_slice(&flags.to_be_bytes());
    m[6..8].copy_from_slice(&cmd.to_be_bytes());
    m[8..16].copy_from_slice(&cookie.to_be_bytes());
    m[16..24].copy_from_slice(&offset.to_be_bytes());
    m[24..28].copy_from_slice(&len.to_be_bytes());
    m
}

/// A simple reply's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// NBD error (an errno value in the spec's numbering), 0 for success.
    pub error: u32,
    pub cookie: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReplyError {
    #[error("structured replies were not negotiated")]
    Structured,
    #[error("bad reply magic {0:#010x}")]
    BadMagic(u32),
}

#[inline]
pub fn parse_reply(b: &[u8; REPLY_LEN]) -> Result<Reply, ReplyError> {
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic == STRUCTURED_REPLY_MAGIC {
        return Err(ReplyError::Structured);
    }
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(ReplyError::BadMagic(magic));
    }
    Ok(Reply {
        error: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        cookie: u64::from_be_bytes(b[8..16].try_into().unwrap_or_default()),
    })
}

/// Maps an NBD error to the negative errno that completes the block request.
#[inline]
pub fn errno(nbd_error: u32) -> i32 {
    -match nbd_error {
        1 => libc::EPERM,
        5 => libc::EIO,
        12 => libc::ENOMEM,
        22 => libc::EINVAL,
        28 => libc::ENOSPC,
        75 => libc::EOVERFLOW,
        95 => libc::EOPNOTSUPP,
        108 => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}

#[cfg(test)]
#[path = "tests/proto.rs"]
mod tests;
