//! Sizes as `ublkctl add null --size` takes them (`512`, `4k`, `10G`, ...). A size that
//! parses must format to text that parses back to the same number.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ublkd_proto::size::{format_size, parse_size};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_size(text) {
        Ok(n) => {
            let shown = format_size(n);
            assert_eq!(parse_size(&shown), Ok(n), "{text:?} shows as {shown:?}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
