//! Real-kernel tests of the nbd target over TLS (nbds://, nbds+unix://) against nbdkit and
//! qemu-nbd with certificates made at test time. Over TCP the session is in the kernel
//! (kTLS, the guest loads net/tls/tls.ko): `show` says so and /proc/net/tls_stat counts
//! the sockets; over a Unix socket it is in ublkd's relay (rustls; OpenSSL for a
//! pre-shared key). They run inside the test VM (tests/run-vm-tests.sh); without
//! /dev/ublk-control they fail.

use std::path::Path;
use std::time::Duration;
use ublkd_tests::nbd_server::{Listen, Server};
use ublkd_tests::pki::{self, Pki, ServerCert};
use ublkd_tests::*;

fn require_ublk() {
    assert!(
        Path::new("/dev/ublk-control").exists(),
        "/dev/ublk-control is missing: these tests must run in the test VM (tests/run-vm-tests.sh)"
    );
}

fn verify(dev: &str, size: &str) {
    fio(&verify_job(dev, "randwrite", "4k", size, 32));
    fio(&verify_job(dev, "write", "128k-512k", size, 8));
}

fn listen(kind: &str, name: &str, port: u16) -> Listen {
    if kind.ends_with("unix") {
        Listen::Unix(format!("/tmp/nbd-tls-{name}.sock"))
    } else {
        Listen::Tcp(port)
    }
}

/// An NBD server of `kind` that requires TLS with the certificates in `pki.server`;
/// returns it and the nbds URI with the client's certificates.
fn tls_server(kind: &str, name: &str, port: u16, pki: &Pki) -> (Server, String) {
    let l = listen(kind, name, port);
    let server = if kind.starts_with("qemu") {
        let file = format!("/tmp/nbd-tls-{name}.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(256 << 20)
            .unwrap();
        let creds = format!(
            "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir={}",
            pki.server.display()
        );
        Server::qemu_nbd_with(l, &file, &["--object", &creds, "--tls-creds", "tls0"])
    } else {
        let certs = format!("--tls-certificates={}", pki.server.display());
        Server::nbdkit_memory(l, "256M", &["--tls=require", &certs])
    };
    let uri = pki::tls_uri(&server.uri, &pki.client);
    (server, uri)
}

fn detail(d: &Daemon, dev: &str, key: &str) -> String {
    d.detail(dev_id(dev), key)
}

/// A counter of /proc/net/tls_stat (kernel TLS; the file exists once `tls` is loaded).
fn tls_stat(name: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/net/tls_stat")
        .expect("/proc/net/tls_stat: is the kernel module tls loaded (tests/vm/run.sh)?");
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(char::is_whitespace)?;
            (k == name).then(|| v.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {name} in /proc/net/tls_stat:\n{text}"))
}

/// Checks how the device's session runs: in the kernel over TCP, with `expect` (version
/// and cipher) in `show`, and the kernel counting sockets with software kTLS in both
/// directions; in the relay over a Unix socket.
fn check_tls_path(d: &Daemon, dev: &str, kind: &str, expect: &str) {
    let tls = detail(d, dev, "tls");
    if kind.ends_with("unix") {
        assert!(tls.contains("relayed by ublkd"), "{tls}");
        return;
    }
    assert!(tls.contains("kernel TLS (kTLS)"), "{tls}");
    assert!(tls.contains(expect), "{tls}");
    assert!(tls_stat("TlsCurrTxSw") >= 1, "no kTLS TX socket");
    assert!(tls_stat("TlsCurrRxSw") >= 1, "no kTLS RX socket");
}

fn fio_verify_over_tls(kind: &str, mode: Option<&str>, port: u16) {
    require_ublk();
    let name = format!("{kind}-{}", mode.unwrap_or("default"));
    let pki = pki::make(&format!("/tmp/pki-{name}"), ServerCert::Good, false);
    let (_server, uri) = tls_server(kind, &name, port, &pki);
    let d = Daemon::start(&format!("nbd-tls-{name}"));
    let mut args = vec!["nbd", "--uri", &uri];
    if let Some(m) = mode {
        args.extend(["--buffer", m]);
    }
    let dev = d.add(&args);
    check_tls_path(&d, &dev, kind, "TLS 1.3");
    assert!(
        detail(&d, &dev, "connections").starts_with("connected"),
        "{}",
        d.log_text()
    );
    verify(&dev, "8M");
    let q = &d.show_json(dev_id(&dev))["queue_stats"][0];
    assert_eq!(q["errors"].as_u64(), Some(0), "{q}");
    let log = d.log_text();
    assert!(!log.contains("connection lost"), "{log}");
    // `list` and `show` name the certificate directory, never key material.
    let shown = format!("{:?} {}", d.list_json(), d.show_json(dev_id(&dev)));
    assert!(shown.contains("nbds"), "{shown}");
    assert!(!shown.contains("PRIVATE KEY") && !log.contains("PRIVATE KEY"));
    d.del(&dev);
}

macro_rules! tls_tests {
    ($($name:ident => $kind:literal, $mode:expr, $port:literal;)*) => {$(
        #[test]
        fn $name() {
            fio_verify_over_tls($kind, $mode, $port)
        }
    )*};
}

tls_tests! {
    nbdkit_tls_tcp_copy => "nbdkit-tcp", Some("copy"), 11141;
    nbdkit_tls_tcp_default => "nbdkit-tcp", None, 11142;
    nbdkit_tls_tcp_zc => "nbdkit-tcp", Some("zc"), 11143;
    nbdkit_tls_unix_copy => "nbdkit-unix", Some("copy"), 0;
    nbdkit_tls_unix_default => "nbdkit-unix", None, 0;
    qemu_nbd_tls_tcp_default => "qemu-tcp", None, 11144;
}

/// The ciphers and versions kernel TLS takes from rustls, each negotiated with qemu-nbd
/// (GnuTLS priority strings) and used for a verify job.
#[test]
fn every_cipher_goes_to_the_kernel() {
    require_ublk();
    let pki = pki::make("/tmp/pki-ciphers", ServerCert::Good, false);
    let d = Daemon::start("nbd-tls-ciphers");
    let cases = [
        (
            "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM",
            "TLS 1.3, AES-128-GCM",
        ),
        (
            "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-256-GCM",
            "TLS 1.3, AES-256-GCM",
        ),
        (
            "NORMAL:-VERS-ALL:+VERS-TLS1.2:-CIPHER-ALL:+AES-128-GCM",
            "TLS 1.2, AES-128-GCM",
        ),
        (
            "NORMAL:-VERS-ALL:+VERS-TLS1.2:-CIPHER-ALL:+AES-256-GCM",
            "TLS 1.2, AES-256-GCM",
        ),
    ];
    for (n, (priority, expect)) in cases.into_iter().enumerate() {
        let port = 11170 + n as u16;
        let file = format!("/tmp/nbd-tls-cipher-{n}.img");
        std::fs::File::create(&file)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let creds = format!(
            "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir={},priority={priority}",
            pki.server.display()
        );
        let server = Server::qemu_nbd_with(
            Listen::Tcp(port),
            &file,
            &["--object", &creds, "--tls-creds", "tls0"],
        );
        let uri = pki::tls_uri(&server.uri, &pki.client);
        let dev = d.add(&["nbd", "--uri", &uri]);
        check_tls_path(&d, &dev, "qemu-tcp", expect);
        // A few hundred records each way per cipher: enough to show the kernel encrypts
        // and decrypts with the keys rustls negotiated, small enough for four ciphers.
        // (Large payloads over many records: the other TLS tests.)
        fio(&verify_job(&dev, "randwrite", "4k", "1M", 16));
        let q = &d.show_json(dev_id(&dev))["queue_stats"][0];
        assert_eq!(q["errors"].as_u64(), Some(0), "{expect}: {q}");
        d.del(&dev);
    }
    let log = d.log_text();
    assert!(!log.contains("connection lost"), "{log}");
}

/// A certificate the client must not accept, and a server without TLS: `add` fails with
/// one line naming the cause, and no device is made.
#[test]
fn bad_certificates_and_plaintext_servers_make_no_device() {
    require_ublk();
    let d = Daemon::start("nbd-tls-bad");
    let cases = [
        (ServerCert::OtherCa, "not signed by the CA in ca-cert.pem"),
        (ServerCert::OtherHost, "certificate is for another host"),
        (ServerCert::Expired, "certificate has expired"),
    ];
    for (n, (what, expect)) in cases.into_iter().enumerate() {
        let pki = pki::make(&format!("/tmp/pki-bad-{n}"), what, false);
        let (_server, uri) = tls_server("nbdkit-tcp", &format!("bad-{n}"), 11150 + n as u16, &pki);
        let line = d.ctl_err(&["add", "nbd", "--uri", &uri]);
        assert!(line.contains(expect), "{what:?}: {line}");
        assert!(d.list_json().is_empty(), "{what:?}: {:?}", d.list_json());
    }
    let pki = pki::make("/tmp/pki-plain", ServerCert::Good, false);
    let plain = Server::nbdkit_memory(Listen::Tcp(11155), "64M", &[]);
    let line = d.ctl_err(&[
        "add",
        "nbd",
        "--uri",
        &pki::tls_uri(&plain.uri, &pki.client),
    ]);
    assert!(line.contains("the server does not offer TLS"), "{line}");
    let line = d.ctl_err(&[
        "add",
        "nbd",
        "--uri",
        "nbds://127.0.0.1:11155/?tls-psk-file=/k",
    ]);
    assert!(line.contains("cannot read the PSK file /k"), "{line}");
    assert!(d.list_json().is_empty(), "{:?}", d.list_json());
}

/// nbdkit's file plugin serving `file` over TLS on `port`.
fn nbdkit_file_tls(file: &str, port: u16, pki: &Pki) -> Server {
    let args: Vec<String> = vec![
        "-f".into(),
        "--exit-with-parent".into(),
        "--tls=require".into(),
        format!("--tls-certificates={}", pki.server.display()),
        "-i".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "file".into(),
        format!("file={file}"),
    ];
    let uri = format!("nbd://127.0.0.1:{port}/");
    Server::spawn("/usr/bin/nbdkit", &args, Listen::Tcp(port), uri)
}

/// The server is killed and restarted during a verify job: the reconnect redoes the TLS
/// handshake with a new relay; fio sees no error.
#[test]
fn server_restart_over_tls_is_invisible() {
    require_ublk();
    let file = "/tmp/nbd-tls-restart.img";
    std::fs::File::create(file)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let pki = pki::make("/tmp/pki-restart", ServerCert::Good, false);
    let mut server = nbdkit_file_tls(file, 11160, &pki);
    let uri = pki::tls_uri(&server.uri, &pki.client);
    let d = Daemon::start("nbd-tls-restart");
    let dev = d.add(&["nbd", "--uri", &uri, "--reconnect-timeout", "30"]);
    let fio_dev = dev.clone();
    // 16 MiB of 4k writes and their verify take 8 s or more over emulated AES-GCM in
    // the VM, so the kill at 1.5 s and the restart at 3.5 s land inside them.
    let job = std::thread::spawn(move || verify(&fio_dev, "16M"));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!job.is_finished(), "fio ended before the server died");
    server.kill();
    std::thread::sleep(Duration::from_secs(2));
    let states = detail(&d, &dev, "connections");
    assert!(states.contains("reconnecting"), "{states}");
    let _server = nbdkit_file_tls(file, 11160, &pki);
    job.join()
        .expect("fio verify failed across the server restart");
    assert!(d.log_text().contains("reconnected"), "{}", d.log_text());
    let q = &d.show_json(dev_id(&dev))["queue_stats"][0];
    assert_eq!(q["errors"].as_u64(), Some(0), "{q}");
    d.del(&dev);
}

/// Kernel TLS as the queue uses it, on a loopback pair with made-up keys (kTLS needs no
/// handshake: one end encrypts with the keys the other decrypts with), so the README's
/// claims about kTLS sockets are checked on the guest kernel: a send with MSG_WAITALL
/// is refused, so is SEND_ZC, and a plain SEND from a registered buffer and READ_FIXED
/// into one work.
#[test]
fn kernel_tls_sockets_as_the_queue_uses_them() {
    use io_uring::{opcode, types, IoUring};
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    /// struct tls12_crypto_info_aes_gcm_128 (linux/tls.h).
    #[repr(C)]
    struct Info {
        version: u16,
        cipher: u16,
        iv: [u8; 8],
        key: [u8; 16],
        salt: [u8; 4],
        rec_seq: [u8; 8],
    }
    fn ktls(fd: i32, dir: i32) {
        let ulp = b"tls";
        // SAFETY: setsockopt reads live memory of the given sizes.
        let r = unsafe { libc::setsockopt(fd, libc::SOL_TCP, 31, ulp.as_ptr().cast(), 3) };
        assert_eq!(r, 0, "TCP_ULP tls: {}", std::io::Error::last_os_error());
        let info = Info {
            version: 0x0304,
            cipher: 51,
            iv: [1; 8],
            key: [2; 16],
            salt: [3; 4],
            rec_seq: [0; 8],
        };
        let len = std::mem::size_of::<Info>() as libc::socklen_t;
        // SAFETY: as above.
        let r =
            unsafe { libc::setsockopt(fd, libc::SOL_TLS, dir, (&info as *const Info).cast(), len) };
        assert_eq!(r, 0, "SOL_TLS {dir}: {}", std::io::Error::last_os_error());
    }

    require_ublk();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut rx, _) = l.accept().unwrap();
    // Sockets that took kTLS so far (counters of sockets, not of records).
    let (tx_before, rx_before) = (tls_stat("TlsTxSw"), tls_stat("TlsRxSw"));
    ktls(tx.as_raw_fd(), 1);
    ktls(rx.as_raw_fd(), 2);
    assert_eq!(tls_stat("TlsTxSw"), tx_before + 1);
    assert_eq!(tls_stat("TlsRxSw"), rx_before + 1);

    const LEN: usize = 64 << 10;
    let mut bufs = [vec![0u8; LEN], vec![0u8; LEN]];
    for (i, b) in bufs[0].iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    let iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: LEN,
        })
        .collect();
    let mut ring = IoUring::new(8).unwrap();
    // SAFETY: `bufs` outlives the ring's use of them (every SQE is reaped below).
    unsafe { ring.submitter().register_buffers(&iovs).unwrap() };
    let fd = types::Fd(tx.as_raw_fd());
    let mut run = |sqe: io_uring::squeue::Entry, cqes: usize| -> Vec<(i32, u32)> {
        // SAFETY: the SQEs point into `bufs`, registered and alive until reaped here.
        unsafe { ring.submission().push(&sqe).unwrap() };
        ring.submit_and_wait(cqes).unwrap();
        let mut got: Vec<(i32, u32)> = ring.completion().map(|c| (c.result(), c.flags())).collect();
        // IORING_CQE_F_MORE: a zero-copy notification follows.
        while got.last().is_some_and(|c| c.1 & (1 << 1) != 0) {
            ring.submit_and_wait(1).unwrap();
            got.extend(ring.completion().map(|c| (c.result(), c.flags())));
        }
        got
    };
    let src = bufs[0].as_ptr();

    // MSG_WAITALL: refused, as the queue's linked chains would need it.
    let waitall = run(
        opcode::Send::new(fd, src, 4096)
            .flags(libc::MSG_WAITALL | libc::MSG_NOSIGNAL)
            .build(),
        1,
    );
    assert_eq!(waitall[0].0, -libc::EOPNOTSUPP, "send with MSG_WAITALL");

    // A SEND from the registered buffer (what zc mode sends a payload with): encrypted
    // by the kernel, read back decrypted.
    let send = run(
        opcode::Send::new(fd, src, LEN as u32)
            .ioprio(1 << 2)
            .buf_group(0)
            .flags(libc::MSG_NOSIGNAL)
            .build(),
        1,
    );
    let sent = send[0].0;
    assert!(sent > 0, "fixed-buffer SEND on kTLS: {sent}");
    let mut got = vec![0u8; sent as usize];
    rx.read_exact(&mut got).unwrap();
    assert!(
        got == bufs[0][..sent as usize],
        "kTLS SEND: other bytes came out"
    );
    assert_eq!(tls_stat("TlsDecryptError"), 0);

    // SEND_ZC: refused (software kTLS encrypts into pages of its own: nothing to pin);
    // its notification still comes.
    let zc = run(
        opcode::SendZc::new(fd, src, 4096)
            .buf_index(Some(0))
            .flags(libc::MSG_NOSIGNAL)
            .build(),
        1,
    );
    assert_eq!(zc[0].0, -libc::EOPNOTSUPP, "SEND_ZC on kTLS: {zc:?}");

    // READ_FIXED on the receiving socket: decrypted into the registered buffer.
    let mut tx2 = &tx;
    std::io::Write::write_all(&mut tx2, &bufs[0][..4096]).unwrap();
    let dst = bufs[1].as_mut_ptr();
    let read = run(
        opcode::ReadFixed::new(types::Fd(rx.as_raw_fd()), dst, 4096, 1)
            .offset(u64::MAX)
            .build(),
        1,
    );
    assert_eq!(read[0].0, 4096, "READ_FIXED on kTLS");
    assert!(bufs[1][..4096] == bufs[0][..4096]);
    drop(ring);
}

/// A record that is not data after the hand-off to the kernel: the server sends a TLS
/// KeyUpdate in the middle of a verify job. Kernel TLS fails the receive (EIO); the log
/// says why, the connection is made again with a new handshake, and fio sees no error.
#[test]
fn a_key_update_after_the_hand_off_reconnects() {
    require_ublk();
    let pki = pki::make("/tmp/pki-keyupdate", ServerCert::Good, false);
    let server = ublkd_tests::tls_nbd::serve(&pki.server, 64 << 20, 200);
    let uri = pki::tls_uri(&server.uri, &pki.client);
    let d = Daemon::start("nbd-tls-keyupdate");
    let dev = d.add(&["nbd", "--uri", &uri, "--reconnect-timeout", "30"]);
    check_tls_path(&d, &dev, "tcp", "TLS 1.3");
    verify(&dev, "8M");
    let stats = &server.stats;
    assert_eq!(
        stats.key_updates.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(stats.sessions.load(std::sync::atomic::Ordering::SeqCst), 2);
    let log = d.log_text();
    assert!(log.contains("a TLS record that is not data"), "{log}");
    assert!(log.contains("reconnected"), "{log}");
    let q = &d.show_json(dev_id(&dev))["queue_stats"][0];
    assert_eq!(q["errors"].as_u64(), Some(0), "{q}");
    d.del(&dev);
}

/// A PSK file as psktool writes it: `alice` and `qemu` (the default user) with keys of
/// their own; returns its path and alice's key in hex.
fn psk_file(name: &str) -> (String, String) {
    let key = |seed: u64| -> String {
        pattern(seed, 32)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let (alice, qemu) = (key(1), key(2));
    let path = format!("/tmp/{name}.psk");
    std::fs::write(&path, format!("alice:{alice}\nqemu:{qemu}\n")).unwrap();
    (path, alice)
}

fn nbdkit_psk(file: &str, port: u16) -> Server {
    let psk = format!("--tls-psk={file}");
    Server::nbdkit_memory(Listen::Tcp(port), "64M", &["--tls=require", &psk])
}

/// TLS-PSK against nbdkit `--tls-psk`: a wrong key is one line and no device; the user
/// from the URI's userinfo and the default user `qemu` each get a device whose session
/// is in the kernel (OpenSSL's handshake, then our hand-off: `psk.rs`) and passes a
/// verify job; the key is nowhere in `list`, `show` or the log; a restarted server is
/// reconnected to with a new PSK handshake.
#[test]
fn nbdkit_tls_psk_over_kernel_tls() {
    require_ublk();
    let (file, key) = psk_file("nbd-psk");
    let mut server = nbdkit_psk(&file, 11180);
    let d = Daemon::start("nbd-tls-psk");

    let wrong = "/tmp/nbd-psk-wrong.psk";
    std::fs::write(wrong, format!("alice:{}\n", "ab".repeat(32))).unwrap();
    let line = d.ctl_err(&[
        "add",
        "nbd",
        "--uri",
        &format!("nbds://alice@127.0.0.1:11180/?tls-psk-file={wrong}"),
    ]);
    assert!(
        line.contains("the server refused the TLS-PSK handshake")
            && line.contains("user 'alice' in /tmp/nbd-psk-wrong.psk"),
        "{line}"
    );
    assert!(d.list_json().is_empty(), "{:?}", d.list_json());

    let uri = format!("nbds://alice@127.0.0.1:11180/?tls-psk-file={file}");
    let dev = d.add(&["nbd", "--uri", &uri, "--reconnect-timeout", "30"]);
    check_tls_path(&d, &dev, "tcp", "TLS 1.3, AES-128-GCM, pre-shared key");
    verify(&dev, "4M");
    let default_user = format!("nbds://127.0.0.1:11180/?tls-psk-file={file}");
    let dev2 = d.add(&["nbd", "--uri", &default_user]);
    check_tls_path(&d, &dev2, "tcp", "pre-shared key");
    fio(&verify_job(&dev2, "randwrite", "4k", "4M", 16));

    // The server restarts: the next requests wait for a reconnect, which makes a new
    // PSK handshake.
    server.kill();
    server = nbdkit_psk(&file, 11180);
    fio(&verify_job(&dev, "randwrite", "4k", "4M", 16));
    let log = d.log_text();
    assert!(log.contains("reconnected"), "{log}");
    for dev in [&dev, &dev2] {
        let q = &d.show_json(dev_id(dev))["queue_stats"][0];
        assert_eq!(q["errors"].as_u64(), Some(0), "{q}");
    }
    let shown = format!("{:?} {}", d.list_json(), d.show_json(dev_id(&dev)));
    assert!(shown.contains("tls-psk-file=/tmp/nbd-psk.psk"), "{shown}");
    assert!(shown.contains("tls-username=alice"), "{shown}");
    assert!(
        !shown.contains(&key) && !log.contains(&key),
        "the key is shown"
    );
    d.del(&dev);
    d.del(&dev2);
    drop(server);
}

/// TLS-PSK over a Unix socket: the session stays in OpenSSL, in ublkd's relay.
#[test]
fn nbdkit_tls_psk_over_a_unix_socket() {
    require_ublk();
    let (file, _) = psk_file("nbd-psk-unix");
    let sock = "/tmp/nbd-psk.sock";
    let psk = format!("--tls-psk={file}");
    let _server = Server::nbdkit_memory(Listen::Unix(sock.into()), "64M", &["--tls=require", &psk]);
    let d = Daemon::start("nbd-tls-psk-unix");
    let uri = format!("nbds+unix:///?socket={sock}&tls-psk-file={file}&tls-username=alice");
    let dev = d.add(&["nbd", "--uri", &uri]);
    let tls = detail(&d, &dev, "tls");
    assert!(tls.contains("pre-shared key, relayed by ublkd"), "{tls}");
    verify(&dev, "4M");
    let q = &d.show_json(dev_id(&dev))["queue_stats"][0];
    assert_eq!(q["errors"].as_u64(), Some(0), "{q}");
    d.del(&dev);
}

/// TLS-PSK against qemu-nbd's `tls-creds-psk` (DIR/keys.psk) over TCP: the default user
/// `qemu`, the session in the kernel, a verify job; then a copy of the key file without
/// that user is one line naming the user and the file, and no device.
#[test]
fn qemu_nbd_tls_psk_over_kernel_tls() {
    require_ublk();
    let dir = "/tmp/nbd-qemu-psk";
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let (file, _) = psk_file("nbd-qemu-psk");
    std::fs::copy(&file, format!("{dir}/keys.psk")).unwrap();
    pki::write_dh_params(std::path::Path::new(dir));
    let image = "/tmp/nbd-qemu-psk.img";
    std::fs::File::create(image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let creds = format!("tls-creds-psk,id=tls0,endpoint=server,dir={dir}");
    let _server = Server::qemu_nbd_with(
        Listen::Tcp(11185),
        image,
        &["--object", &creds, "--tls-creds", "tls0"],
    );
    let d = Daemon::start("nbd-tls-qemu-psk");
    let uri = format!("nbds://127.0.0.1:11185/disk?tls-psk-file={file}");
    let dev = d.add(&["nbd", "--uri", &uri]);
    check_tls_path(&d, &dev, "tcp", "pre-shared key");
    fio(&verify_job(&dev, "randwrite", "4k", "4M", 16));
    let q = &d.show_json(dev_id(&dev))["queue_stats"][0];
    assert_eq!(q["errors"].as_u64(), Some(0), "{q}");
    d.del(&dev);

    let only_alice = "/tmp/nbd-qemu-psk-alice.psk";
    let alice = std::fs::read_to_string(&file).unwrap();
    std::fs::write(only_alice, alice.lines().next().unwrap()).unwrap();
    let uri = format!("nbds://127.0.0.1:11185/disk?tls-psk-file={only_alice}");
    let line = d.ctl_err(&["add", "nbd", "--uri", &uri]);
    assert!(
        line.contains("has no key for user 'qemu'") && line.contains(only_alice),
        "{line}"
    );
    assert!(d.list_json().is_empty(), "{:?}", d.list_json());
}
