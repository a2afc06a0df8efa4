//! The client side of the NBD handshake against a server whose every byte is the fuzz
//! input: greeting, flags, NBD_OPT_GO replies (NBD_REP_INFO with NBD_INFO_EXPORT and
//! NBD_INFO_BLOCK_SIZE, ACK, errors), and the NBD_OPT_EXPORT_NAME fallback.
//! What the client writes is kept and checked, not sent anywhere.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::{self, Read, Write};
use ublkd_proto::nbd::proto::{self, handshake, HandshakeError};

/// A server that says the fuzz input, then closes the connection.
struct Server<'a> {
    says: &'a [u8],
    heard: Vec<u8>,
}

impl Read for Server<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.says.read(buf)
    }
}

impl Write for Server<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.heard.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut server = Server {
        says: data,
        heard: Vec::new(),
    };
    let result = handshake(&mut server, "disk");
    // The error text is what the user sees: formatting it must not panic either.
    let _ = result.as_ref().map_err(|e| e.to_string());
    match result {
        Ok(info) => {
            assert_ne!(info.size, 0, "a zero-sized export was accepted");
            // The client answered the greeting with its flags and asked for the export.
            assert!(server.heard.len() > 4);
            assert_eq!(
                &server.heard[4..12],
                &proto::IHAVEOPT.to_be_bytes(),
                "the client's first option"
            );
        }
        Err(HandshakeError::BadMagic(_)) | Err(HandshakeError::Oldstyle) => {
            // Refused before answering: the client said nothing.
            assert!(server.heard.is_empty());
        }
        Err(_) => {}
    }
    // Never more than the flags and two option requests (NBD_OPT_GO, then
    // NBD_OPT_EXPORT_NAME): a server cannot make the client talk on and on.
    let most = 4
        + proto::option_request(proto::OPT_GO, &proto::go_data("disk")).len()
        + proto::option_request(proto::OPT_EXPORT_NAME, b"disk").len();
    assert!(server.heard.len() <= most, "{}", server.heard.len());
});
