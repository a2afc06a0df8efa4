//! Transmission-phase reply headers as the nbd queue receives them: the fuzz input is cut
//! into 16-byte headers and each is parsed, as `replies_received` does with its staging
//! buffer (that function itself drives sockets and the ring, so it is not called here).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ublkd_proto::nbd::proto::{self, parse_reply, ReplyError, REPLY_LEN};

fuzz_target!(|data: &[u8]| {
    for chunk in data.chunks_exact(REPLY_LEN) {
        let hdr: &[u8; REPLY_LEN] = chunk.try_into().expect("chunks_exact gives REPLY_LEN");
        let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        match parse_reply(hdr) {
            Ok(reply) => {
                assert_eq!(magic, proto::SIMPLE_REPLY_MAGIC);
                assert_eq!(reply.cookie.to_be_bytes(), hdr[8..16]);
                let errno = proto::errno(reply.error);
                assert!(errno < 0, "NBD error {} maps to {errno}", reply.error);
            }
            Err(ReplyError::Structured) => assert_eq!(magic, proto::STRUCTURED_REPLY_MAGIC),
            Err(ReplyError::BadMagic(m)) => assert_eq!(m, magic),
        }
    }
});
