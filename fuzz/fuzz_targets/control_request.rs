//! A control-socket request line, through the daemon's own parser
//! (`ublkd_proto::parse_request`), then the checks the daemon makes before it acts on an
//! `add`: geometry, device id, name, size, and the NBD URI. A request that parses must
//! also survive a round trip through its JSON form (what `ublkctl` sends).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ublkd_proto::{parse_request, validate, Request, TargetSpec};
use ublkd_proto::nbd::NbdUri;

fuzz_target!(|data: &[u8]| {
    let req = match parse_request(data) {
        Ok(req) => req,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let json = serde_json::to_string(&req).expect("a parsed request serializes");
    assert_eq!(
        serde_json::from_str::<Request>(&json).ok().as_ref(),
        Some(&req),
        "{json}"
    );
    let Request::Add(add) = req else {
        return;
    };
    // The kernel's queue limit varies by machine: take a few.
    for max_queues in [0, 1, 2, 4096, u32::MAX] {
        let geometry = validate::geometry(add.queues, add.depth, add.block_size, max_queues);
        if let Ok(g) = geometry {
            assert!(g.queues >= 1 && u32::from(g.queues) <= max_queues.max(1));
            assert!(g.depth >= 1 && u32::from(g.depth) <= validate::MAX_DEPTH);
            assert!(validate::BLOCK_SIZES.contains(&g.block_size));
            if let TargetSpec::Null { size } = add.target {
                if let Ok(s) = validate::device_size(size, g.block_size) {
                    assert!(s > 0 && s % u64::from(g.block_size) == 0);
                }
            }
        }
    }
    if let Some(id) = add.id {
        let _ = validate::device_id(id).map_err(|e| e.to_string());
    }
    if let Some(name) = &add.name {
        let _ = validate::device_name(name).map_err(|e| e.to_string());
    }
    if let TargetSpec::Nbd { uri, .. } = &add.target {
        let _ = uri.parse::<NbdUri>().map_err(|e| e.to_string());
    }
});
