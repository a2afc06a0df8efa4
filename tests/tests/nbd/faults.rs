//! Servers that fail or misbehave: bad URIs, a dead server, protocol violations, a
//! restart, a server that is down at start, never answers or never finishes its
//! handshake, and a write that timed out.

use super::*;

#[test]
fn bad_uris_and_servers_get_clear_errors() {
    require_ublk();
    let d = Daemon::start("nbd-bad");
    let file = "/tmp/nbd-bad.img";
    std::fs::File::create(file)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let qemu = Server::qemu_nbd(Listen::Tcp(10912), file);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["nbd://127.0.0.1:1/x".into()],
            "cannot connect to nbd://127.0.0.1:1/x: Connection refused",
        ),
        (
            vec!["nbds://127.0.0.1/x".into()],
            "TLS needs credentials: add tls-certificates=DIR",
        ),
        (vec!["http://127.0.0.1/x".into()], "is not an NBD URI"),
        (vec!["nbd+unix:///x".into()], "needs ?socket=PATH"),
        (
            vec!["nbd+unix:///x?socket=/tmp/none.sock".into()],
            "cannot connect to nbd+unix:///x?socket=/tmp/none.sock",
        ),
        (
            vec!["nbd://127.0.0.1:10912/nosuch".into()],
            "the server refused export 'nosuch'",
        ),
    ];
    for (uri, expect) in &cases {
        let line = d.ctl_err(&["add", "nbd", "--uri", &uri[0]]);
        assert!(
            line.contains(expect),
            "uri {uri:?}: expected {expect:?} in {line:?}"
        );
    }
    let line = d.ctl_err(&[
        "add",
        "nbd",
        "--uri",
        &qemu.uri,
        "--connections",
        "2",
        "--queues",
        "1",
    ]);
    assert!(line.contains("disagree"), "{line}");
    // The daemon still serves: the same server works with a correct URI.
    let dev = add_nbd(&d, &qemu.uri, &[]);
    fio(&fio_job(&dev, "randrw", "4k", 16, 2));
    d.del(&dev);
}

#[test]
fn a_dead_server_fails_io_and_del_still_works() {
    require_ublk();
    let mut server = Server::nbdkit_memory(Listen::Tcp(10913), "64M", &[]);
    let d = Daemon::start("nbd-dead");
    let dev = add_nbd(&d, &server.uri, &["--reconnect-timeout", "3"]);
    fio(&fio_job(&dev, "randrw", "4k", 16, 1));
    server.kill();
    let f = open_direct(&dev, true);
    let buf = AlignedBuf::new(&[7u8; 4096]);
    let started = Instant::now();
    assert!(
        f.write_all_at(buf.as_slice(), 0).is_err(),
        "a write to a dead server succeeded"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    drop(f);
    let show = d.show_json(dev_id(&dev));
    let details = show["target_details"].as_array().unwrap();
    assert!(
        details
            .iter()
            .any(|kv| kv[0] == "connections" && kv[1] == "failed"),
        "{show}"
    );
    let started = Instant::now();
    d.del(&dev);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "del took {:?}",
        started.elapsed()
    );
}

/// A server that breaks the protocol: each fault is logged, the request gets an errno,
/// the connection is dropped (an error reply keeps it), and the daemon keeps serving.
#[test]
fn misbehaving_servers_fail_requests_not_the_daemon() {
    use ublkd_tests::fake_nbd::{serve, Fault, FAULT_OFFSET};
    require_ublk();
    let d = Daemon::start("nbd-faults");
    let read_at = |dev: &str, off: u64| {
        let f = open_direct(dev, false);
        let mut b = AlignedBuf::zeroed(4096);
        f.read_exact_at(b.as_mut_slice(), off).map(|_| ())
    };
    let faults = [
        (Fault::BadMagic, 10921u16, "bad reply"),
        (Fault::UnknownCookie, 10922, "unknown cookie"),
        (Fault::ShortReply, 10923, "closed the connection"),
    ];
    for (fault, port, log_says) in faults {
        serve(port, fault);
        // Default reconnect: the connection is reset and the request sent again, until
        // it has been lost with too many connections and fails.
        let dev = add_nbd(&d, &format!("nbd://127.0.0.1:{port}/"), &[]);
        assert!(read_at(&dev, 0).is_ok(), "{fault:?}: a good read failed");
        let started = Instant::now();
        let faulty = read_at(&dev, FAULT_OFFSET);
        assert!(faulty.is_err(), "{fault:?}: the faulty reply was accepted");
        assert!(started.elapsed() < Duration::from_secs(30));
        let log = d.log_text();
        assert!(
            log.contains(log_says),
            "{fault:?}: no log line with {log_says:?}:\n{log}"
        );
        assert!(
            log.contains("reconnected"),
            "{fault:?}: the connection was not reset:\n{log}"
        );
        // The reset connection serves good requests.
        assert!(
            read_at(&dev, 0).is_ok(),
            "{fault:?}: IO after the reset failed"
        );
        d.del(&dev);

        // Without reconnecting, the connection fails and later IO fails at once.
        let uri = format!("nbd://127.0.0.1:{port}/");
        let dev = add_nbd(&d, &uri, &["--reconnect-timeout", "0"]);
        assert!(
            read_at(&dev, FAULT_OFFSET).is_err(),
            "{fault:?}: the faulty reply was accepted"
        );
        assert!(
            read_at(&dev, 0).is_err(),
            "{fault:?}: IO on a failed connection succeeded"
        );
        d.del(&dev);
    }

    // An error reply is a valid answer: that request fails with the mapped errno, the
    // connection stays.
    serve(10924, Fault::Error(28));
    let dev = add_nbd(&d, "nbd://127.0.0.1:10924/", &[]);
    let f = open_direct(&dev, true);
    let e = f
        .write_all_at(AlignedBuf::new(&[1u8; 4096]).as_slice(), FAULT_OFFSET)
        .unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::ENOSPC),
        "NBD ENOSPC should reach the writer: {e}"
    );
    assert!(
        f.write_all_at(AlignedBuf::new(&[2u8; 4096]).as_slice(), 0)
            .is_ok(),
        "the connection did not survive an error reply"
    );
    drop(f);
    d.del(&dev);

    // Faults during the handshake make `add` fail with a clear line.
    serve(10925, Fault::CloseInHandshake);
    let line = d.ctl_err(&["add", "nbd", "--uri", "nbd://127.0.0.1:10925/"]);
    assert!(line.contains("nbd://127.0.0.1:10925/"), "{line}");
    serve(10926, Fault::ZeroSize);
    let line = d.ctl_err(&["add", "nbd", "--uri", "nbd://127.0.0.1:10926/"]);
    assert!(line.contains("the export has size 0"), "{line}");

    // Still serving.
    assert!(d.list_json().is_empty());
    let server = Server::nbdkit_memory(Listen::Tcp(10927), "64M", &[]);
    let dev = add_nbd(&d, &server.uri, &[]);
    assert!(read_at(&dev, 0).is_ok());
    d.del(&dev);
}

/// The server dies in the middle of a fio verify job and comes back within the reconnect
/// timeout: fio finishes with no error and its data verifies.
#[test]
fn server_restart_within_the_timeout_is_invisible() {
    require_ublk();
    let file = "/tmp/nbd-restart.img";
    std::fs::File::create(file)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let mut server = Server::qemu_nbd(Listen::Tcp(10930), file);
    let d = Daemon::start("nbd-restart");
    let dev = add_nbd(&d, &server.uri, &["--reconnect-timeout", "30"]);
    let fio_dev = dev.clone();
    // 32 MiB of 4k writes and their verify take 8 s or more in the VM: fio is still
    // writing or verifying when the server dies 1.5 s in.
    let job = std::thread::spawn(move || verify(&fio_dev, "32M"));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!job.is_finished(), "fio ended before the server died");
    server.kill();
    std::thread::sleep(Duration::from_secs(2));
    let states = d.show_json(dev_id(&dev))["target_details"].to_string();
    assert!(states.contains("reconnecting"), "{states}");
    let _server = Server::qemu_nbd(Listen::Tcp(10930), file);
    job.join()
        .expect("fio verify failed across the server restart");
    assert!(d.log_text().contains("reconnected"), "{}", d.log_text());
    let q = &d.show_json(dev_id(&dev))["queue_stats"][0];
    assert_eq!(q["errors"].as_u64(), Some(0), "{q}");
    // The reconnect is counted for `ublkctl stats --prometheus`.
    let reconnects = d.prometheus_value("ublkd_nbd_reconnects_total", dev_id(&dev));
    assert!(reconnects.is_some_and(|n| n >= 1.0), "{reconnects:?}");
    d.del(&dev);
}

/// A recorded nbd device whose server is down when ublkd starts is listed as
/// connecting, with the error, and is served on its own once the server answers, with
/// its data; one that is deleted while connecting goes away for good.
#[test]
fn a_server_that_is_down_at_start_is_waited_for_in_the_background() {
    require_ublk();
    let test = "nbd-connect-later";
    let (a_file, b_file) = ("/tmp/nbd-later-a.img", "/tmp/nbd-later-b.img");
    for f in [a_file, b_file] {
        std::fs::File::create(f).unwrap().set_len(64 << 20).unwrap();
    }
    let mut a = Server::qemu_nbd(Listen::Tcp(10931), a_file);
    let mut b = Server::qemu_nbd(Listen::Tcp(10932), b_file);
    let mut d = Daemon::start_clean(test, &[]);
    let dev = add_nbd(&d, &a.uri, &[]);
    let gone = add_nbd(&d, &b.uri, &[]);
    let (id, gone_id) = (dev_id(&dev), dev_id(&gone));
    fio(&verify_job(&dev, "randwrite", "4k", "2M", 16));
    let sum = checksum(&dev, 2 << 20);
    assert_eq!(d.stop(), Some(0));
    a.kill();
    b.kill();

    let d = Daemon::start_with(test, &[]);
    let e = list_entry(&d, id);
    assert_eq!(e["state"], "connecting", "{e}");
    assert!(e["error"].as_str().unwrap().contains("10931"), "{e}");
    assert!(!Path::new(&dev).exists());
    // Given up on while connecting: gone, and not tried again.
    d.ctl_ok(&["del", &gone_id.to_string()]);
    assert!(d
        .list_json()
        .iter()
        .all(|e| e["id"].as_u64() != Some(gone_id)));
    assert!(!d.record_path(gone_id).exists());

    let _a = Server::qemu_nbd(Listen::Tcp(10931), a_file);
    wait_live(&d, id, "after its server came back");
    assert_eq!(
        checksum(&dev, 2 << 20),
        sum,
        "the data is not what was written"
    );
    fio(&verify_job(&dev, "randwrite", "4k", "2M", 16));
    assert!(!Path::new(&gone).exists());
    d.del(&dev);
    for f in [a_file, b_file] {
        std::fs::remove_file(f).unwrap();
    }
}

/// A server that stays connected but never answers a request: after the request timeout
/// the connection counts as lost, the request is sent again on new connections, and after
/// too many it fails with EIO; requests the server does answer keep working.
#[test]
fn a_server_that_never_answers_times_out() {
    use ublkd_tests::fake_nbd::{serve, Fault, FAULT_OFFSET};
    require_ublk();
    serve(10941, Fault::NeverAnswers);
    let d = Daemon::start("nbd-silent");
    let dev = add_nbd(
        &d,
        "nbd://127.0.0.1:10941/",
        &["--request-timeout", "2", "--reconnect-timeout", "10"],
    );
    let show = d.show_json(dev_id(&dev)).to_string();
    assert!(show.contains("request timeout"), "{show}");
    let f = open_direct(&dev, false);
    let mut b = AlignedBuf::zeroed(4096);
    f.read_exact_at(b.as_mut_slice(), 0).unwrap();
    let started = Instant::now();
    let e = f
        .read_exact_at(b.as_mut_slice(), FAULT_OFFSET)
        .expect_err("a read the server never answered succeeded");
    let took = started.elapsed();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // Four connections, 2 s each plus the timeout's tick and the reconnects.
    assert!(
        took >= Duration::from_secs(6) && took < Duration::from_secs(25),
        "took {took:?}"
    );
    let log = d.log_text();
    assert!(
        log.contains("no reply within the request timeout (2 s) to a Read of 4096 bytes"),
        "{log}"
    );
    assert!(log.contains("reconnected"), "{log}");
    assert!(log.contains("failing it with EIO"), "{log}");
    // The connection serves what the server answers.
    f.read_exact_at(b.as_mut_slice(), 0).unwrap();
    drop(f);
    d.del(&dev);
}

/// A server that accepts and then trickles its greeting (a byte every 800 ms): `add`
/// fails when the handshake's overall deadline (10 s) passes, with one clear line.
#[test]
fn a_handshake_that_never_finishes_fails_add_in_time() {
    use ublkd_tests::fake_nbd::{serve, Fault};
    require_ublk();
    serve(10945, Fault::SlowGreeting);
    let d = Daemon::start("nbd-slow-handshake");
    let started = Instant::now();
    let line = d.ctl_err(&["add", "nbd", "--uri", "nbd://127.0.0.1:10945/"]);
    let took = started.elapsed();
    assert!(
        line.contains("nbd://127.0.0.1:10945/")
            && line.contains("did not finish the NBD handshake within 10 s"),
        "{line}"
    );
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(13),
        "took {took:?}"
    );
    assert!(d.list_json().is_empty());
}

/// A write the server does not answer within the request timeout, stuck half sent
/// (the server stops reading): it is sent again on a new connection only after the
/// old one was reset (the server sees it closed when the resend arrives), and the old
/// connection never delivers the rest of the stale write.
#[test]
fn a_timed_out_write_is_resent_only_after_the_old_connection_is_gone() {
    use ublkd_tests::fake_nbd::{serve, Fault, FAULT_OFFSET};
    require_ublk();
    let stats = serve(10948, Fault::StallOldWrite);
    let d = Daemon::start("nbd-stale-write");
    let dev = add_nbd(
        &d,
        "nbd://127.0.0.1:10948/",
        &["--request-timeout", "2", "--reconnect-timeout", "10"],
    );
    let data = pattern(48, 256 << 10);
    let f = open_direct(&dev, true);
    f.write_all_at(AlignedBuf::new(&data).as_slice(), FAULT_OFFSET)
        .expect("the write was not resent");
    let log = d.log_text();
    assert!(log.contains("no reply within the request timeout"), "{log}");
    assert!(log.contains("reconnected"), "{log}");
    let state = *stats.old_state_at_resend.lock().unwrap();
    // TCP_ESTABLISHED is 1: the old connection must be closed or reset by then.
    assert!(
        matches!(state, Some(s) if s != 1),
        "the old connection was still up (TCP state {state:?}) when the write was resent"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.stale_bytes.lock().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let stale = stats
        .stale_bytes
        .lock()
        .unwrap()
        .expect("the old connection was not read");
    assert!(
        stale < data.len(),
        "the old connection delivered the whole stale write after the resend"
    );
    let mut b = AlignedBuf::zeroed(data.len());
    f.read_exact_at(b.as_mut_slice(), FAULT_OFFSET).unwrap();
    assert!(
        b.as_slice() == &data[..],
        "the resent data is not on the server"
    );
    drop(f);
    d.del(&dev);
}
