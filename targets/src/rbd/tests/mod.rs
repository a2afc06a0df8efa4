//! The rbd queue against the host's single-node test cluster (tests/src/ceph.rs), with a
//! real io_uring standing in for the queue loop: requests finish through the eventfd.

use super::rados::ConnectOptions;
use super::{RbdOptions, RbdTarget};
use crate::test_ring::{decode, TestRing};
use crate::{
    dispatch, BlockOp, Completion, IoBuf, IoDesc, IoFlags, Outcome, Owner, QueueContext, Target,
};
use std::time::{Duration, Instant};

fn target(image: &str) -> RbdTarget {
    let c = ublkd_tests::ceph::shared();
    c.create_image(image, "4M");
    open(image, &[])
}

/// Opens the existing image `image` with `options` as `--ceph-option`s.
fn open(image: &str, options: &[(&str, &str)]) -> RbdTarget {
    RbdTarget::open(&rbd_options(&format!("rbd/{image}"), options)).unwrap()
}

fn rbd_options(spec: &str, options: &[(&str, &str)]) -> RbdOptions {
    let c = ublkd_tests::ceph::shared();
    RbdOptions {
        spec: spec.parse().unwrap(),
        snap_id: None,
        connect: ConnectOptions {
            conf: Some(c.conf.to_str().unwrap().into()),
            user: "admin".into(),
            keyring: None,
            mon_timeout: Duration::from_secs(10),
            osd_timeout: Duration::from_secs(30),
            options: options
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        },
        read_only: false,
        exclusive: false,
        encryption: None,
        quiesce: None,
        block_size: 512,
    }
}

/// Queue 0 of `depth` tags with daemon buffers.
fn queue_context(depth: u16) -> QueueContext {
    QueueContext {
        qid: 0,
        depth,
        first_file: 0,
        user_copy: false,
        staging_index: None,
        own_pages: false,
        max_io_bytes: 512 << 10,
    }
}

fn io(tag: u16, op: BlockOp, fua: bool, offset: u64, len: u32) -> IoDesc {
    IoDesc {
        tag,
        op,
        flags: IoFlags {
            fua,
            no_unmap: false,
        },
        offset,
        len,
    }
}

/// Runs the ring until request `tag` is finished; returns its result.
fn finish(q: &mut dyn crate::QueueTarget, ring: &mut TestRing, tag: u16) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(i) = ring.finished.iter().position(|&(t, _)| t == tag) {
            return ring.finished.remove(i).1;
        }
        assert!(Instant::now() < deadline, "tag {tag} not finished in 30 s");
        ring.ring.submit_and_wait(1).unwrap();
        let cqes: Vec<_> = ring.ring.completion().collect();
        for cqe in cqes {
            let (event, step, _) = decode(cqe.user_data());
            assert!(event, "the rbd queue pushes only its eventfd read");
            let done = Completion {
                owner: Owner::Target,
                step,
                res: cqe.result(),
            };
            q.complete(done, ring);
        }
    }
}

#[test]
fn requests_finish_through_the_eventfd() {
    let t = target("queue-unit");
    let shape = t.shape();
    assert_eq!(shape.size, 4 << 20);
    // librbd's cache is off: a completed write is on the OSD, the device write-through.
    assert!(!shape.fua && !shape.volatile_cache && shape.discard && shape.write_zeroes);
    let ctx = queue_context(4);
    let mut q = t.queue(ctx).unwrap();
    let mut ring = TestRing::new(8);
    q.start(&mut ring);
    let mut data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    let buf = IoBuf::User {
        addr: data.as_mut_ptr(),
        len: data.len(),
    };
    // A FUA write: written, then flushed, then finished with its length.
    let w = io(1, BlockOp::Write, true, 8192, 65536);
    assert_eq!(dispatch(q.as_mut(), &w, buf, &mut ring), Outcome::Queued);
    assert_eq!(finish(q.as_mut(), &mut ring, 1), 65536);
    let mut back = vec![0u8; 65536];
    let rbuf = IoBuf::User {
        addr: back.as_mut_ptr(),
        len: back.len(),
    };
    let r = io(2, BlockOp::Read, false, 8192, 65536);
    assert_eq!(dispatch(q.as_mut(), &r, rbuf, &mut ring), Outcome::Queued);
    assert_eq!(finish(q.as_mut(), &mut ring, 2), 65536);
    assert!(back == data, "read back differs");
    for (tag, op) in [
        (3, BlockOp::Flush),
        (0, BlockOp::WriteZeroes),
        (1, BlockOp::Discard),
    ] {
        let d = io(
            tag,
            op,
            false,
            8192,
            if op == BlockOp::Flush { 0 } else { 4096 },
        );
        assert_eq!(
            dispatch(q.as_mut(), &d, IoBuf::None, &mut ring),
            Outcome::Queued
        );
        assert_eq!(finish(q.as_mut(), &mut ring, tag), 0, "{op:?}");
    }
    // The request's own pages (zero copy) are not daemon memory: refused.
    let pages = IoBuf::Pages {
        index: 0,
        len: 4096,
    };
    let r = io(2, BlockOp::Read, false, 0, 4096);
    assert_eq!(
        dispatch(q.as_mut(), &r, pages, &mut ring),
        Outcome::Done(-libc::EOPNOTSUPP)
    );
}

fn write_cache(t: &RbdTarget) -> String {
    let d = t.details();
    d.iter()
        .find(|(k, _)| k == "write cache")
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// The device has a volatile write cache exactly when librbd may complete writes
/// before the OSDs have them: librbd's cache set by `--ceph-option` or by the image's
/// own configuration (which overrides the client's); write-through otherwise. A device
/// recovered write-through over a caching librbd flushes every write.
#[test]
fn the_write_cache_follows_librbds_effective_configuration() {
    let c = ublkd_tests::ceph::shared();
    let plain = target("cache-plain");
    assert!(!plain.shape().volatile_cache);
    assert!(write_cache(&plain).starts_with("none: a write completes once the OSDs have it"));

    // Journaling holds each write until its journal entry is safe: no cache.
    let features = "layering,exclusive-lock,journaling";
    let spec = "rbd/cache-journaled";
    c.rbd(&["create", "--size", "4M", "--image-feature", features, spec]);
    assert!(!open("cache-journaled", &[]).shape().volatile_cache);

    let cached = open("cache-plain", &[("rbd_cache", "true")]);
    let shape = cached.shape();
    assert!(shape.volatile_cache && shape.fua);
    assert!(
        write_cache(&cached).contains("rbd_cache=true"),
        "{}",
        write_cache(&cached)
    );

    c.create_image("cache-image-conf", "4M");
    c.rbd(&[
        "config",
        "image",
        "set",
        "rbd/cache-image-conf",
        "rbd_cache",
        "true",
    ]);
    let by_image = open("cache-image-conf", &[]);
    assert!(
        by_image.shape().volatile_cache,
        "the image's own rbd_cache=true was not seen"
    );
    // Recovered onto a device that was created write-through: every write is flushed,
    // and still completes with its length.
    assert!(by_image.write_through());
    assert!(write_cache(&by_image).contains("every write is flushed"));
    let ctx = queue_context(2);
    let mut q = by_image.queue(ctx).unwrap();
    let mut ring = TestRing::new(8);
    q.start(&mut ring);
    let mut data = vec![7u8; 4096];
    let buf = IoBuf::User {
        addr: data.as_mut_ptr(),
        len: data.len(),
    };
    let w = io(0, BlockOp::Write, false, 0, 4096);
    assert_eq!(dispatch(q.as_mut(), &w, buf, &mut ring), Outcome::Queued);
    assert_eq!(finish(q.as_mut(), &mut ring, 0), 4096);

    c.rbd(&["snap", "create", "rbd/cache-image-conf@s"]);
    let snap = RbdTarget::open(&rbd_options("rbd/cache-image-conf@s", &[])).unwrap();
    assert!(!snap.shape().volatile_cache, "a snapshot takes no writes");
    assert_eq!(write_cache(&snap), "none (read-only)");
}

/// `rbd resize` by another client reaches the image's watch, on librbd's thread; the
/// target then reports the new size. Dropping the watch frees its notice, and nothing
/// is reported after.
#[test]
fn the_size_watch_reports_rbd_resize() {
    use std::sync::mpsc::{channel, RecvTimeoutError};
    use std::sync::Arc;
    let t = target("watch-unit");
    let c = ublkd_tests::ceph::shared();
    let (tx, rx) = channel();
    let keep = tx.clone();
    let alive = Arc::new(());
    let held = alive.clone();
    let watch = t
        .watch_size(Box::new(move || {
            let _ = &held;
            let _ = tx.send(std::thread::current().id());
        }))
        .unwrap()
        .expect("an image is watched");
    c.rbd(&["resize", "--size", "8M", "rbd/watch-unit"]);
    let thread = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("no notice within 10 s of rbd resize");
    assert_ne!(thread, std::thread::current().id());
    assert_eq!(t.resize(4 << 20, None, false), Ok(8 << 20));
    assert!(t.resize(4 << 20, Some(12 << 20), false).is_err());
    drop(watch);
    assert_eq!(
        Arc::strong_count(&alive),
        1,
        "the notice outlived its watch"
    );
    while rx.try_recv().is_ok() {}
    c.rbd(&["resize", "--size", "4M", "--allow-shrink", "rbd/watch-unit"]);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(2)),
        Err(RecvTimeoutError::Timeout),
        "a notice after the watch was dropped"
    );
    drop(keep);
    assert_eq!(t.resize(8 << 20, None, false), Ok(4 << 20));
}
