//! How the data moves: zero-copy sends, several connections, read-only exports, send
//! and receive chains cut into pieces, user copy, the server's block size limits and
//! flushes.

use super::*;

/// Large write payloads in the zero-copy modes go with SEND_ZC only to a server on
/// another host (here a network namespace behind a veth pair, `remote_net`): fio
/// verifies 4k and 128k-512k writes through SEND_ZC in auto-zc and zc there, and the
/// daemon says which send it chose for each connection; to a server on 127.0.0.1 it is
/// SEND from the registered buffer (what the nbdkit_tcp_* tests verify).
#[test]
fn large_writes_to_a_server_on_another_host_go_with_send_zc() {
    require_ublk();
    let net = RemoteNet::start();
    let remote = Server::nbdkit_memory_in(&net, 10908, "256M");
    let local = Server::nbdkit_memory(Listen::Tcp(10909), "64M", &[]);
    let d = Daemon::start("nbd-remote-zc");
    let zc = format!(
        "server {}: large write payloads go with SEND_ZC",
        remote_net::HOST
    );
    for (n, mode) in ["auto-zc", "zc"].into_iter().enumerate() {
        let dev = add_nbd(&d, &remote.uri, &["--buffer", mode]);
        assert_eq!(d.log_text().matches(&zc).count(), n + 1, "{}", d.log_text());
        verify_unbroken(&d, &dev, "16M", mode);
    }
    let dev = add_nbd(&d, &local.uri, &[]);
    let log = d.log_text();
    assert!(
        log.contains("server 127.0.0.1 is on this machine: large write payloads go with SEND "),
        "{log}"
    );
    assert_eq!(log.matches(&zc).count(), 2, "{log}");
    d.del(&dev);
}

#[test]
fn multi_conn_with_two_queues() {
    require_ublk();
    let server = Server::nbdkit_memory(Listen::Tcp(10910), "256M", &[]);
    let d = Daemon::start("nbd-multiconn");
    let dev = add_nbd(&d, &server.uri, &["--connections", "2"]);
    let show = d.show_json(dev_id(&dev));
    assert_eq!(show["queues"].as_u64(), Some(2));
    let details = show["target_details"].as_array().unwrap();
    assert!(
        details
            .iter()
            .any(|kv| kv[0] == "connections" && kv[1] == "connected, connected"),
        "{show}"
    );
    // One job per CPU, so both queues (and so both connections) carry IO.
    let mut job: Vec<String> = vec![
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=16".into(),
        "--size=16M".into(),
        "--verify=crc32c".into(),
        "--do_verify=1".into(),
        "--verify_fatal=1".into(),
        "--verify_state_save=0".into(),
    ];
    for cpu in 0..2 {
        job.push(format!("--name=cpu{cpu}"));
        job.push(format!("--filename={dev}"));
        job.push(format!("--cpus_allowed={cpu}"));
        job.push(format!("--offset={}M", cpu * 128));
    }
    fio(&job);
    let show = d.show_json(dev_id(&dev));
    // nbd queue threads are not pinned to one CPU by default: each may run on every
    // CPU of its queue's set, and its thread is placed as `show` says.
    assert_eq!(show["affinity"], "set", "{show}");
    for q in show["queue_stats"].as_array().unwrap() {
        assert!(
            q["requests"].as_u64().unwrap() > 0,
            "a queue carried no IO: {show}"
        );
        assert_eq!(q["errors"].as_u64(), Some(0), "{show}");
        let listed = q["cpus"].as_str().unwrap();
        let actual =
            thread_cpus(q["tid"].as_i64().unwrap()).expect("the queue thread's Cpus_allowed_list");
        assert_eq!(listed, actual, "show says {listed}, /proc says {actual}");
    }
    d.del(&dev);
}

#[test]
fn read_only_export_gives_a_read_only_device() {
    require_ublk();
    let server = Server::nbdkit_memory(Listen::Tcp(10911), "64M", &["-r"]);
    let d = Daemon::start("nbd-ro");
    let dev = add_nbd(&d, &server.uri, &[]);
    let ro = std::fs::read_to_string(format!("/sys/block/ublkb{}/ro", dev_id(&dev))).unwrap();
    assert_eq!(ro.trim(), "1");
    let mut buf = AlignedBuf::zeroed(4096);
    // Kept open across `del` on purpose: del must not wait for readers to close.
    let f = std::fs::File::open(&dev).unwrap();
    f.read_exact_at(buf.as_mut_slice(), 0).unwrap();
    if let Ok(w) = std::fs::OpenOptions::new().write(true).open(&dev) {
        assert!(
            w.write_all_at(&[1u8; 4096], 0)
                .and_then(|_| w.sync_all())
                .is_err(),
            "write to a read-only export succeeded"
        );
    }
    d.del(&dev);
}

/// Linked send and receive chains against a server that makes everything partial: the
/// client's socket buffers are tiny (short sends, continued inside a chain), and the
/// server writes replies in pieces (partial headers and payloads in every peek). In every
/// buffer mode, fio's verify passes and the connection is never reset for a broken
/// stream (a chain that let requests interleave would show up as a reset for a bad
/// reply).
///
/// A reset for a request without a reply within the request timeout is accepted: with
/// these 4 KiB buffers the kernel's TCP can stall (measured in zc mode with busy CPUs, 4
/// to 8 times in 40 runs of the zc part: ublkd's socket held 60-800 KiB of zero-copy
/// payload unsent, with the zero-window probe timer armed and no probe counted, while the
/// server had read everything and waited in recv with an empty receive queue; ublkd's
/// ring had nothing unsubmitted). ublkd then reconnects and resends, which verify checks.
#[test]
fn chains_survive_partial_sends_and_replies() {
    use ublkd_tests::fake_nbd::{serve, Fault};
    require_ublk();
    serve(10940, Fault::Dribble);
    let d = Daemon::start("nbd-dribble");
    for mode in ["copy", "fixed", "zc", "auto-zc"] {
        let dev = {
            let _w = Sysctl::set("/proc/sys/net/ipv4/tcp_wmem", "4096 4096 4096");
            let _r = Sysctl::set("/proc/sys/net/ipv4/tcp_rmem", "4096 4096 4096");
            // A TCP stall (above) costs one request timeout.
            let args = ["--buffer", mode, "--request-timeout", "10"];
            add_nbd(&d, "nbd://127.0.0.1:10940/", &args)
        };
        let stall = Some("no reply within the request timeout");
        verify_unbroken_but(&d, &dev, "4M", mode, stall);
    }
}

/// Over a Unix socket with a send buffer smaller than one write, every send of a chain
/// goes out in pieces. In the zero-copy modes a small write's payload is copied out of
/// the request's pages into the chain's SENDMSG (user copy), or without user copy is a
/// SEND from the request's registered pages, as is every large payload (this kernel
/// has it: the daemon says so): several per chain, each continued by io_uring until all
/// of it is out (MSG_WAITALL) before the next starts. The server's replies come in
/// pieces too: a large read's payload is one RECV into the request's registered pages
/// that io_uring continues until all of it is in (this kernel has that too). fio's
/// verify passes and the connection is never reset.
#[test]
fn unix_chains_survive_a_tiny_send_buffer() {
    require_ublk();
    let server = Server::nbdkit_memory(Listen::Unix("/tmp/nbd-tiny.sock".into()), "64M", &[]);
    for user_copy in [true, false] {
        let name = format!("nbd-tiny-{user_copy}");
        let d = if user_copy {
            Daemon::start(&name)
        } else {
            Daemon::start_with(&name, &["--without-features", "USER_COPY"])
        };
        for mode in ["copy", "zc", "auto-zc"] {
            let dev = {
                // Sockets made while this is set (the daemon's connection) get it.
                let _w = Sysctl::set("/proc/sys/net/core/wmem_default", "8192");
                add_nbd(&d, &server.uri, &["--buffer", mode])
            };
            verify_unbroken(&d, &dev, "4M", mode);
        }
        let log = d.log_text();
        assert!(
            log.contains("sends write payloads from registered buffers"),
            "the daemon did not find SEND from registered buffers on this kernel:\n{log}"
        );
        assert!(
            log.contains("receives large read payloads into registered buffers, whole"),
            "the daemon did not find RECV into registered buffers on this kernel:\n{log}"
        );
    }
}

/// In the zero-copy modes small reads' payloads are received many replies at a time and
/// copied into the requests' pages with user copy (the device has UBLK_F_USER_COPY); on
/// a kernel without it (emulated with --without-features) every payload goes straight
/// into the request's pages. Both verify, with read sizes on both sides of the size
/// from which payloads always go straight to the request.
#[test]
fn reads_with_and_without_user_copy() {
    require_ublk();
    let server = Server::nbdkit_memory(Listen::Tcp(10907), "256M", &[]);
    for user_copy in [true, false] {
        let name = format!("nbd-user-copy-{user_copy}");
        let _ = std::fs::remove_dir_all(format!("/tmp/ublkd-{name}/state"));
        let d = if user_copy {
            Daemon::start(&name)
        } else {
            Daemon::start_with(&name, &["--without-features", "USER_COPY"])
        };
        for mode in ["zc", "auto-zc"] {
            let dev = add_nbd(&d, &server.uri, &["--buffer", mode]);
            let show = d.show_json(dev_id(&dev));
            let flags: Vec<&str> = show["kernel"]["flag_names"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|f| f.as_str())
                .collect();
            assert_eq!(flags.contains(&"USER_COPY"), user_copy, "{mode}: {show}");
            verify(&dev, "4M");
            fio(&verify_job(&dev, "randwrite", "512-256k", "4M", 16));
            let q = &d.show_json(dev_id(&dev))["queue_stats"][0];
            assert_eq!(q["errors"].as_u64(), Some(0), "{mode}: {q}");
            d.del(&dev);
        }
    }
}

/// A server whose maximum block size (NBD_INFO_BLOCK_SIZE) is 64 KiB: the device's
/// largest request is 64 KiB, and 512 KiB writes verify with no longer request
/// reaching the server.
#[test]
fn the_servers_maximum_block_size_caps_requests() {
    use std::sync::atomic::Ordering;
    use ublkd_tests::fake_nbd::{serve, Fault};
    require_ublk();
    let stats = serve(10947, Fault::MaxBlockSize(64 << 10));
    let d = Daemon::start("nbd-max-block");
    let dev = add_nbd(&d, "nbd://127.0.0.1:10947/", &[]);
    let id = dev_id(&dev);
    let kb =
        std::fs::read_to_string(format!("/sys/block/ublkb{id}/queue/max_hw_sectors_kb")).unwrap();
    assert_eq!(kb.trim(), "64");
    // The server's preferred block size is the device's optimal IO size.
    let opt =
        std::fs::read_to_string(format!("/sys/block/ublkb{id}/queue/optimal_io_size")).unwrap();
    assert_eq!(opt.trim(), "16384");
    let show = d.show_json(id).to_string();
    assert!(show.contains("max 65536"), "{show}");
    fio(&verify_job(&dev, "write", "512k", "8M", 8));
    let longest = stats.max_len.load(Ordering::SeqCst);
    assert!(
        longest > 4096 && longest <= 64 << 10,
        "longest request {longest}"
    );
    let q = &d.show_json(id)["queue_stats"][0];
    assert_eq!(q["errors"].as_u64(), Some(0), "{q}");
    d.del(&dev);
}

/// `fsync` on the device reaches the server as an NBD_CMD_FLUSH it accepts (offset and
/// length 0: nbdkit refuses anything else).
#[test]
fn fsync_is_a_flush_the_server_accepts() {
    require_ublk();
    let server = Server::nbdkit_memory(Listen::Tcp(10949), "64M", &[]);
    let d = Daemon::start("nbd-flush");
    let dev = add_nbd(&d, &server.uri, &[]);
    let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
    f.write_all_at(&pattern(49, 64 << 10), 1 << 20).unwrap();
    f.sync_all().expect("fsync of the nbd device failed");
    drop(f);
    let q = &d.show_json(dev_id(&dev))["queue_stats"][0];
    assert_eq!(q["errors"].as_u64(), Some(0), "{q}");
    d.del(&dev);
}
