//! Unit tests of proto.rs.

use super::*;
use std::io::Cursor;

/// A stream that reads from a scripted server and records what the client wrote.
struct Script {
    from_server: Cursor<Vec<u8>>,
    to_server: Vec<u8>,
}

impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.from_server.read(buf)
    }
}
impl Write for Script {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.to_server.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn greeting(flags: u16) -> Vec<u8> {
    let mut v = NBDMAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

fn opt_reply(reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&OPT_GO.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

fn run(server: Vec<u8>, export: &str) -> (Result<ExportInfo, HandshakeError>, Vec<u8>) {
    let mut s = Script {
        from_server: Cursor::new(server),
        to_server: Vec::new(),
    };
    let r = handshake(&mut s, export);
    (r, s.to_server)
}

#[test]
fn opt_go_with_block_sizes() {
    let mut server = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    let flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
    server.extend(opt_reply(REP_INFO, &info_export(1 << 30, flags)));
    let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [512u32, 4096, 32 << 20] {
        bs.extend_from_slice(&v.to_be_bytes());
    }
    server.extend(opt_reply(REP_INFO, &bs));
    server.extend(opt_reply(REP_ACK, &[]));
    let (r, sent) = run(server, "disk");
    let info = r.unwrap();
    assert_eq!(info.size, 1 << 30);
    assert!(
        info.has(TFLAG_SEND_FLUSH) && info.has(TFLAG_CAN_MULTI_CONN) && !info.has(TFLAG_READ_ONLY)
    );
    assert_eq!(info.block_size, Some((512, 4096, 32 << 20)));
    let mut expect = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    expect.extend(option_request(OPT_GO, &go_data("disk")));
    assert_eq!(sent, expect);
}

#[test]
fn falls_back_to_export_name() {
    let mut server = greeting(FLAG_FIXED_NEWSTYLE);
    server.extend(opt_reply(REP_ERR_UNSUP, &[]));
    server.extend_from_slice(&(64u64 << 20).to_be_bytes());
    server.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
    server.extend_from_slice(&[0u8; 124]);
    let (r, sent) = run(server, "x");
    let info = r.unwrap();
    assert_eq!(info.size, 64 << 20);
    assert!(info.has(TFLAG_READ_ONLY));
    assert!(sent.ends_with(&option_request(OPT_EXPORT_NAME, b"x")));
}

#[test]
fn refusals_and_garbage_are_errors() {
    let mut server = greeting(FLAG_FIXED_NEWSTYLE);
    server.extend(opt_reply(REP_ERR_UNKNOWN, b"no such export: foo"));
    let e = run(server, "foo").0.unwrap_err().to_string();
    assert!(
        e.contains("refused export 'foo'") && e.contains("no such export"),
        "{e}"
    );

    let mut server = greeting(FLAG_FIXED_NEWSTYLE);
    server.extend(opt_reply(REP_ERR_TLS_REQD, &[]));
    assert!(matches!(
        run(server, "").0,
        Err(HandshakeError::TlsRequired)
    ));

    assert!(matches!(
        run(b"HTTP/1.1 400 Bad".to_vec(), "").0,
        Err(HandshakeError::BadMagic(_))
    ));
    let mut old = NBDMAGIC.to_be_bytes().to_vec();
    old.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
    assert!(matches!(run(old, "").0, Err(HandshakeError::Oldstyle)));

    // The server closes in the middle of the handshake.
    let mut cut = greeting(FLAG_FIXED_NEWSTYLE);
    cut.extend(&opt_reply(REP_INFO, &info_export(1 << 20, 1))[..10]);
    assert!(matches!(run(cut, "").0, Err(HandshakeError::Io(_))));

    // Size 0.
    let mut zero = greeting(FLAG_FIXED_NEWSTYLE);
    zero.extend(opt_reply(REP_INFO, &info_export(0, 1)));
    zero.extend(opt_reply(REP_ACK, &[]));
    assert!(matches!(run(zero, "").0, Err(HandshakeError::ZeroSize)));

    // ACK without the export information.
    let mut bare = greeting(FLAG_FIXED_NEWSTYLE);
    bare.extend(opt_reply(REP_ACK, &[]));
    assert!(matches!(run(bare, "").0, Err(HandshakeError::Protocol(_))));

    // An absurdly long option reply.
    let mut huge = greeting(FLAG_FIXED_NEWSTYLE);
    let mut r = opt_reply(REP_INFO, &[]);
    r[16..20].copy_from_slice(&(1u32 << 30).to_be_bytes());
    huge.extend(r);
    assert!(matches!(run(huge, "").0, Err(HandshakeError::Protocol(_))));
}

/// A server that stops anywhere in a good handshake is an I/O error, never a
/// panic or a half-read export (the fuzz target nbd_handshake goes further).
#[test]
fn every_truncated_handshake_is_an_error() {
    let mut server = greeting(FLAG_FIXED_NEWSTYLE);
    server.extend(opt_reply(REP_ERR_UNSUP, &[]));
    server.extend_from_slice(&(1u64 << 20).to_be_bytes());
    server.extend_from_slice(&TFLAG_HAS_FLAGS.to_be_bytes());
    server.extend_from_slice(&[0u8; 124]);
    let mut go = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    go.extend(opt_reply(REP_INFO, &info_export(1 << 20, 1)));
    let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [512u32, 4096, 1 << 20] {
        bs.extend_from_slice(&v.to_be_bytes());
    }
    go.extend(opt_reply(REP_INFO, &bs));
    go.extend(opt_reply(REP_ACK, &[]));
    for full in [server, go] {
        assert!(run(full.clone(), "e").0.is_ok());
        for n in 0..full.len() {
            let r = run(full[..n].to_vec(), "e").0;
            assert!(matches!(r, Err(HandshakeError::Io(_))), "{n}: {r:?}");
        }
    }
}

#[test]
fn requests_and_replies() {
    let r = request(CMD_FLAG_FUA, CMD_WRITE, 0x0102, 4096, 8192);
    assert_eq!(&r[0..4], &[0x25, 0x60, 0x95, 0x13]);
    assert_eq!(&r[4..8], &[0, 1, 0, 1]);
    assert_eq!(u64::from_be_bytes(r[8..16].try_into().unwrap()), 0x0102);
    assert_eq!(u64::from_be_bytes(r[16..24].try_into().unwrap()), 4096);
    assert_eq!(u32::from_be_bytes(r[24..28].try_into().unwrap()), 8192);

    let mut b = [0u8; REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&5u32.to_be_bytes());
    b[8..16].copy_from_slice(&77u64.to_be_bytes());
    assert_eq!(
        parse_reply(&b),
        Ok(Reply {
            error: 5,
            cookie: 77
        })
    );
    b[0] = 0;
    assert!(matches!(parse_reply(&b), Err(ReplyError::BadMagic(_))));
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    assert_eq!(parse_reply(&b), Err(ReplyError::Structured));
}

#[test]
fn nbd_errors_map_to_errno() {
    assert_eq!(errno(1), -libc::EPERM);
    assert_eq!(errno(28), -libc::ENOSPC);
    assert_eq!(errno(95), -libc::EOPNOTSUPP);
    assert_eq!(errno(9999), -libc::EIO);
}
