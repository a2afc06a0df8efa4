//! `del` while the server is slow, silent or gone: it neither hangs nor loses written
//! data.

use super::*;

/// Deleting a device whose server never answers a request in flight: `del` waits for
/// the server no longer than the request timeout (3 s here), then the request fails
/// with EIO.
#[test]
fn del_does_not_wait_for_a_silent_server() {
    use ublkd_tests::fake_nbd::{serve, Fault, FAULT_OFFSET};
    require_ublk();
    serve(10942, Fault::NeverAnswers);
    let d = Daemon::start("nbd-silent-del");
    let dev = add_nbd(&d, "nbd://127.0.0.1:10942/", &["--request-timeout", "3"]);
    let path = dev.clone();
    let reader = std::thread::spawn(move || {
        let f = open_direct(&path, false);
        let mut b = AlignedBuf::zeroed(4096);
        f.read_exact_at(b.as_mut_slice(), FAULT_OFFSET)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(!reader.is_finished(), "the unanswered read completed");
    let started = Instant::now();
    d.del(&dev);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "del took {took:?}");
    let r = reader.join().unwrap();
    assert!(r.is_err(), "the unanswered read succeeded");
    let log = d.log_text();
    assert!(log.contains("the device is being deleted"), "{log}");
}

/// Checks a `del` that took `took` against a server that answers each write after
/// `SLOW_WRITE`: it wrote something back while it ran, and no request failed.
fn written_back_during_del(d: &Daemon, took: Duration) {
    assert!(
        took >= ublkd_tests::fake_nbd::SLOW_WRITE,
        "del took {took:?}: nothing was written back during it"
    );
    let log = d.log_text();
    assert!(
        !log.contains("EIO") && !log.contains("writing back"),
        "a request failed:\n{log}"
    );
}

/// Deleting a device drains it: the pages a writer left dirty are written back while
/// the kernel removes the disk, and a slow but healthy server (each write answered
/// after 1 s) gets them all: no request fails, the data is on the server afterwards.
#[test]
fn del_drains_writeback_to_a_slow_server() {
    use ublkd_tests::fake_nbd::{serve, Fault};
    require_ublk();
    serve(10943, Fault::SlowWrites);
    let d = Daemon::start("nbd-slow-del");
    let uri = "nbd://127.0.0.1:10943/";
    let dev = add_nbd(&d, uri, &[]);
    let data = pattern(43, 16 << 10);
    // Buffered, and kept open across `del`: closing the device would write its dirty
    // pages back before, not during, the deletion.
    let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
    f.write_all_at(&data, 0).unwrap();
    let started = Instant::now();
    d.del(&dev);
    let took = started.elapsed();
    drop(f);
    written_back_during_del(&d, took);
    // The server has the data: read it back through a new device.
    let dev = add_nbd(&d, uri, &[]);
    let mut b = AlignedBuf::zeroed(data.len());
    open_direct(&dev, false)
        .read_exact_at(b.as_mut_slice(), 0)
        .unwrap();
    assert!(
        b.as_slice() == &data[..],
        "the data written back during del is not on the server"
    );
    d.del(&dev);
}

/// Deleting a device whose server is unreachable (reconnecting, with a long reconnect
/// timeout): `del` returns at once and the writer waiting for the server gets EIO.
#[test]
fn del_while_reconnecting_fails_waiters_at_once() {
    require_ublk();
    let mut server = Server::nbdkit_memory(Listen::Tcp(10944), "64M", &[]);
    let d = Daemon::start("nbd-unreachable-del");
    let dev = add_nbd(&d, &server.uri, &["--reconnect-timeout", "120"]);
    server.kill();
    let path = dev.clone();
    let writer = std::thread::spawn(move || {
        let buf = AlignedBuf::new(&[9u8; 4096]);
        open_direct(&path, true).write_all_at(buf.as_slice(), 0)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !writer.is_finished(),
        "the write to a dead server completed"
    );
    let states = d.show_json(dev_id(&dev))["target_details"].to_string();
    assert!(states.contains("reconnecting"), "{states}");
    let started = Instant::now();
    d.del(&dev);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "del took {took:?}");
    let e = writer
        .join()
        .unwrap()
        .expect_err("a write to a dead server succeeded");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
}

/// The connection drops and the server accepts the reconnect but never speaks: `del`
/// does not wait for that handshake, the waiting read fails with EIO, and the
/// reconnect's connection is closed at once, not when its deadline passes.
#[test]
fn del_stops_a_hanging_reconnect_handshake() {
    use std::sync::atomic::Ordering;
    use ublkd_tests::fake_nbd::{serve, Fault, FAULT_OFFSET};
    require_ublk();
    let stats = serve(10946, Fault::HangOnReconnect);
    let d = Daemon::start("nbd-hanging-reconnect");
    let dev = add_nbd(&d, "nbd://127.0.0.1:10946/", &[]);
    let path = dev.clone();
    let reader = std::thread::spawn(move || {
        let mut b = AlignedBuf::zeroed(4096);
        open_direct(&path, false).read_exact_at(b.as_mut_slice(), FAULT_OFFSET)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(!reader.is_finished(), "the read completed");
    assert_eq!(
        stats.connections.load(Ordering::SeqCst),
        2,
        "no reconnect is hanging in its handshake"
    );
    let started = Instant::now();
    d.del(&dev);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "del took {took:?}");
    let e = reader.join().unwrap().expect_err("the read succeeded");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let deadline = Instant::now() + Duration::from_secs(3);
    while stats.silent_closed.load(Ordering::SeqCst) < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        stats.silent_closed.load(Ordering::SeqCst),
        1,
        "the reconnect still holds its connection 3 s after del"
    );
}

/// `del` of a device with a mounted ext4 file system holding data not yet written back,
/// on a slow but healthy server (each write answered after 1 s): the file system is
/// written back during the deletion, and a new device on the same export mounts with
/// the file intact.
#[test]
fn del_writes_back_a_mounted_file_system_to_a_slow_server() {
    use std::sync::atomic::Ordering;
    use ublkd_tests::fake_nbd::{serve, Fault};
    require_ublk();
    let stats = serve(10950, Fault::SlowWrites);
    stats.slow.store(false, Ordering::SeqCst);
    let d = Daemon::start("nbd-slow-fs");
    let uri = "nbd://127.0.0.1:10950/";
    let dev = add_nbd(&d, uri, &["--request-timeout", "60"]);
    run_ok("/usr/sbin/mkfs.ext4", &["-q", "-F", &dev]);
    let mnt = "/tmp/mnt-nbd-slow-fs";
    std::fs::create_dir_all(mnt).unwrap();
    run_ok("/bin/mount", &["-t", "ext4", &dev, mnt]);
    let data = pattern(50, 300_001);
    let file = format!("{mnt}/file");
    std::fs::write(&file, &data).unwrap();
    stats.slow.store(true, Ordering::SeqCst);
    let started = Instant::now();
    d.del(&dev);
    let took = started.elapsed();
    // The file system was shut down with its device; unmounting still works.
    run_ok("/bin/umount", &[mnt]);
    stats.slow.store(false, Ordering::SeqCst);
    written_back_during_del(&d, took);
    let dev = add_nbd(&d, uri, &[]);
    run_ok("/bin/mount", &["-t", "ext4", &dev, mnt]);
    let got = std::fs::read(&file);
    run_ok("/bin/umount", &[mnt]);
    assert!(
        got.as_deref().ok() == Some(&data[..]),
        "the file written back during del is not intact: {:?}",
        got.map(|g| g.len())
    );
    d.del(&dev);
}
