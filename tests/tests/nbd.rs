//! Real-kernel tests of the nbd target against real NBD servers (nbdkit, qemu-nbd) on
//! loopback and Unix sockets. They run inside the test VM (tests/run-vm-tests.sh);
//! without /dev/ublk-control they fail, never skip.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};
use ublkd_tests::nbd_server::{Listen, Server};
use ublkd_tests::remote_net::{self, RemoteNet};
use ublkd_tests::*;

fn require_ublk() {
    assert!(
        Path::new("/dev/ublk-control").exists(),
        "/dev/ublk-control is missing: these tests must run in the test VM (tests/run-vm-tests.sh)"
    );
}

/// fio crc32c verify as in the loop tests: 4k random writes, then 128k-512k sequential.
fn verify(dev: &str, size: &str) {
    fio(&verify_job(dev, "randwrite", "4k", size, 32));
    fio(&verify_job(dev, "write", "128k-512k", size, 8));
}

/// `verify` on `dev` of daemon `d` through a send or receive path under strain: no
/// request failed and the connection was never reset; then the device is deleted.
fn verify_unbroken(d: &Daemon, dev: &str, size: &str, mode: &str) {
    verify_unbroken_but(d, dev, size, mode, None)
}

/// `verify_unbroken`, except that resets whose reason contains `allowed` are accepted.
fn verify_unbroken_but(d: &Daemon, dev: &str, size: &str, mode: &str, allowed: Option<&str>) {
    verify(dev, size);
    let q = &d.show_json(dev_id(dev))["queue_stats"][0];
    assert_eq!(q["errors"].as_u64(), Some(0), "{mode}: {q}");
    // An nbd device has its export's size.
    let err = d.ctl_err(&["resize", &dev_id(dev).to_string(), "1G"]);
    assert!(err.contains("cannot be resized"), "{err}");
    let log = d.log_text();
    let broken = log
        .lines()
        .filter(|l| l.contains("connection lost"))
        .find(|l| allowed.is_none_or(|a| !l.contains(a)));
    assert!(broken.is_none(), "{mode}: the connection was reset:\n{log}");
    d.del(dev);
}

fn add_nbd(d: &Daemon, uri: &str, extra: &[&str]) -> String {
    let mut a = vec!["nbd", "--uri", uri];
    a.extend_from_slice(extra);
    let dev = d.add(&a);
    let show = d.show_json(dev_id(&dev));
    assert_eq!(show["target"].as_str(), Some("nbd"), "{show}");
    let details = show["target_details"].as_array().unwrap();
    assert!(
        details
            .iter()
            .any(|kv| kv[0] == "connections" && kv[1].as_str().unwrap().starts_with("connected")),
        "{show}"
    );
    dev
}

fn server_for(kind: &str, name: &str, port: u16) -> Server {
    let sock = format!("/tmp/nbd-{name}.sock");
    match kind {
        "nbdkit-tcp" => Server::nbdkit_memory(Listen::Tcp(port), "256M", &[]),
        "nbdkit-unix" => Server::nbdkit_memory(Listen::Unix(sock), "256M", &[]),
        _ => {
            let file = format!("/tmp/nbd-{name}.img");
            std::fs::File::create(&file)
                .unwrap()
                .set_len(256 << 20)
                .unwrap();
            match kind {
                "qemu-tcp" => Server::qemu_nbd(Listen::Tcp(port), &file),
                _ => Server::qemu_nbd(Listen::Unix(sock), &file),
            }
        }
    }
}

fn fio_verify_against(kind: &str, mode: Option<&str>, port: u16) {
    require_ublk();
    let name = format!("{kind}-{}", mode.unwrap_or("default"));
    let server = server_for(kind, &name, port);
    let d = Daemon::start(&format!("nbd-{name}"));
    let dev = match mode {
        Some(m) => add_nbd(&d, &server.uri, &["--buffer", m]),
        None => add_nbd(&d, &server.uri, &[]),
    };
    // The default is the best mode the kernel has: auto-zc on the VM's kernel (6.16+),
    // so the default variants are the auto-zc ones.
    let expect = mode.unwrap_or("auto-zc");
    assert_eq!(d.show_json(dev_id(&dev))["buffer"].as_str(), Some(expect));
    // 16 MiB keeps the suite's time in bounds (TCG runs NBD over loopback at a few
    // thousand IOPS).
    verify(&dev, "16M");
    let q = &d.show_json(dev_id(&dev))["queue_stats"][0];
    assert_eq!(q["errors"].as_u64(), Some(0), "{q}");
    d.del(&dev);
}

macro_rules! server_tests {
    ($($name:ident => $kind:literal, $mode:expr, $port:literal;)*) => {$(
        #[test]
        fn $name() {
            fio_verify_against($kind, $mode, $port)
        }
    )*};
}

// Every buffer mode against nbdkit over both transports (the default is auto-zc), and
// qemu-nbd, another server's handshake and replies, in the default mode: how a mode
// moves the data does not depend on the server.
server_tests! {
    nbdkit_tcp_copy => "nbdkit-tcp", Some("copy"), 10901;
    nbdkit_tcp_default => "nbdkit-tcp", None, 10902;
    nbdkit_unix_copy => "nbdkit-unix", Some("copy"), 0;
    nbdkit_unix_default => "nbdkit-unix", None, 0;
    qemu_nbd_tcp_default => "qemu-tcp", None, 10904;
    qemu_nbd_unix_default => "qemu-unix", None, 0;
    nbdkit_tcp_fixed => "nbdkit-tcp", Some("fixed"), 10905;
    nbdkit_tcp_zc => "nbdkit-tcp", Some("zc"), 10906;
    nbdkit_unix_zc => "nbdkit-unix", Some("zc"), 0;
}

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

/// Sets a sysctl for the life of the guard and restores it on drop.
struct Sysctl {
    path: &'static str,
    old: String,
}

impl Sysctl {
    fn set(path: &'static str, value: &str) -> Sysctl {
        let old = std::fs::read_to_string(path).unwrap();
        std::fs::write(path, value).unwrap();
        Sysctl { path, old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, self.old.trim());
    }
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

/// Deleting a device drains it: the pages a writer left dirty are written back while
/// the kernel removes the disk, and a slow but healthy server (each write answered
/// after 1 s) gets them all: no request fails, the data is on the server afterwards.
#[test]
fn del_drains_writeback_to_a_slow_server() {
    use ublkd_tests::fake_nbd::{serve, Fault, SLOW_WRITE};
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
    assert!(
        took >= SLOW_WRITE,
        "del took {took:?}: nothing was written back during it"
    );
    let log = d.log_text();
    assert!(
        !log.contains("EIO") && !log.contains("writing back"),
        "a request failed:\n{log}"
    );
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

/// `del` of a device with a mounted ext4 file system holding data not yet written back,
/// on a slow but healthy server (each write answered after 1 s): the file system is
/// written back during the deletion, and a new device on the same export mounts with
/// the file intact.
#[test]
fn del_writes_back_a_mounted_file_system_to_a_slow_server() {
    use std::sync::atomic::Ordering;
    use ublkd_tests::fake_nbd::{serve, Fault, SLOW_WRITE};
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
    assert!(
        took >= SLOW_WRITE,
        "del took {took:?}: nothing was written back during it"
    );
    let log = d.log_text();
    assert!(
        !log.contains("EIO") && !log.contains("writing back"),
        "a request failed:\n{log}"
    );
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
