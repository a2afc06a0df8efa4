//! NBD URIs as `ublkctl add nbd URI` and the control socket pass them to the daemon.
//! A URI that parses must print (as `ublkctl show` and the logs do) to a URI that
//! parses back to the same thing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ublkd_proto::nbd::NbdUri;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<NbdUri>() {
        Ok(uri) => {
            let shown = uri.to_string();
            let again: NbdUri = shown.parse().unwrap_or_else(|e| {
                panic!("{text:?} shows as {shown:?}, which does not parse: {e}")
            });
            assert_eq!(again, uri, "{text:?} shows as {shown:?}");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
