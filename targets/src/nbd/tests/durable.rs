//! Writes completed by a queue are durable as the device was promised, whatever the
//! server now advertises (`durable.rs`): the fake server answers writes from a
//! volatile cache and loses it on demand.

use super::{check_blocks, server, write_blocks, Harness, NbdTarget};
use crate::{BlockOp, Target};
use std::sync::atomic::Ordering;
use std::time::Duration;
use ublkd_tests::fake_nbd::{Fault, Stats, SEND_FLUSH, SEND_FUA};

/// A caching server advertising `flags`, and a queue of a device on it; with
/// `write_through`, the device was created without a write cache (recovered).
fn caching(fault: Fault, flags: u16, write_through: bool) -> (Harness, std::sync::Arc<Stats>) {
    let (port, stats) = server(fault);
    stats.advertise.store(flags, Ordering::SeqCst);
    stats.caching.store(true, Ordering::SeqCst);
    let uri = format!("nbd://127.0.0.1:{port}/x").parse().unwrap();
    let t = NbdTarget::connect(&uri, 1, 512, Duration::from_secs(10)).unwrap();
    if write_through {
        assert!(t.write_through());
        let details = t.details();
        let cache = details.iter().find(|(k, _)| k == "write cache").unwrap();
        assert!(cache.1.contains("every write is"), "{cache:?}");
    }
    (Harness::on(&t, false), stats)
}

/// Reads `n` blocks of 4 KiB from 0 and says whether each holds zeroes only.
fn zeroed(h: &mut Harness, n: u16) -> Vec<bool> {
    for tag in 0..n {
        h.start(tag, BlockOp::Read, u64::from(tag) * 4096, 4096, 0);
    }
    h.run();
    (0..n).map(|t| h.data(t).iter().all(|&b| b == 0)).collect()
}

#[test]
fn the_servers_cache_loses_writes_that_were_not_flushed() {
    // The control for the tests below: without a flush the cache is lost.
    let (mut h, stats) = caching(Fault::None, SEND_FLUSH | SEND_FUA, false);
    write_blocks(&mut h, 0, 8, 4096);
    stats.power_loss();
    assert_eq!(zeroed(&mut h, 8), [true; 8]);
    assert_eq!(stats.flushes.load(Ordering::SeqCst), 0);
}

#[test]
fn a_write_through_device_over_a_caching_server_loses_no_completed_write() {
    for (flags, fua_writes, flushes) in [(SEND_FLUSH | SEND_FUA, 8, 0), (SEND_FLUSH, 0, 8)] {
        let (mut h, stats) = caching(Fault::None, flags, true);
        write_blocks(&mut h, 0, 8, 4096);
        stats.power_loss();
        check_blocks(&mut h, 0, 8, 4096);
        assert_eq!(stats.fua_writes.load(Ordering::SeqCst), fua_writes);
        assert_eq!(stats.flushes.load(Ordering::SeqCst), flushes);
    }
}

#[test]
fn fua_without_the_servers_fua_is_a_write_and_then_a_flush() {
    let (mut h, stats) = caching(Fault::None, SEND_FLUSH, false);
    h.flags.fua = true;
    h.start(0, BlockOp::Write, 0, 4096, 0x40);
    assert_eq!(h.run()[&0], 4096);
    h.flags.fua = false;
    stats.power_loss();
    check_blocks(&mut h, 0, 1, 4096);
    assert_eq!(stats.flushes.load(Ordering::SeqCst), 1);
}

#[test]
fn a_server_without_a_cache_gets_no_flush_and_no_fua() {
    // The server fails a flush or FUA it did not advertise (EINVAL).
    let (mut h, stats) = caching(Fault::None, 0, false);
    stats.caching.store(false, Ordering::SeqCst);
    h.start(0, BlockOp::Flush, 0, 0, 0);
    assert_eq!(h.run()[&0], 0);
    h.flags.fua = true;
    h.start(0, BlockOp::Write, 0, 4096, 0x40);
    assert_eq!(h.run()[&0], 4096);
    h.flags.fua = false;
    check_blocks(&mut h, 0, 1, 4096);
    assert_eq!(stats.flushes.load(Ordering::SeqCst), 0);
    assert_eq!(stats.fua_writes.load(Ordering::SeqCst), 0);
}

#[test]
fn a_flush_lost_with_the_servers_cache_sends_the_write_again() {
    // The write is answered from the cache; the server loses power at its flush and
    // the connection with it: the write must go again, not only the flush.
    let (mut h, stats) = caching(Fault::PowerLossAtFlush, SEND_FLUSH, true);
    write_blocks(&mut h, 0, 1, 4096);
    assert!(stats.connections.load(Ordering::SeqCst) >= 2);
    stats.power_loss();
    check_blocks(&mut h, 0, 1, 4096);
}
