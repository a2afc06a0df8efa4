//! Real-kernel tests of the nbd target over TLS (nbds://, nbds+unix://) against nbdkit and
//! qemu-nbd with certificates made at test time; the session is in ublkd's relay (rustls).
//! They run inside the test VM (tests/run-vm-tests.sh); without /dev/ublk-control they
//! fail.

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
    let show = d.show_json(dev_id(dev));
    show["target_details"]
        .as_array()
        .unwrap()
        .iter()
        .find(|kv| kv[0] == key)
        .and_then(|kv| kv[1].as_str())
        .unwrap_or_else(|| panic!("no {key} in {show}"))
        .to_string()
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
    let tls = detail(&d, &dev, "tls");
    assert!(tls.contains("relayed by ublkd"), "{tls}");
    assert!(
        detail(&d, &dev, "connections").starts_with("connected"),
        "{}",
        d.log_text()
    );
    verify(&dev, "24M");
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
    nbdkit_tls_tcp_copy => "nbdkit-tcp", Some("copy"), 10941;
    nbdkit_tls_tcp_default => "nbdkit-tcp", None, 10942;
    nbdkit_tls_tcp_zc => "nbdkit-tcp", Some("zc"), 10943;
    nbdkit_tls_unix_copy => "nbdkit-unix", Some("copy"), 0;
    nbdkit_tls_unix_default => "nbdkit-unix", None, 0;
    qemu_nbd_tls_tcp_default => "qemu-tcp", None, 10944;
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
        let (_server, uri) = tls_server("nbdkit-tcp", &format!("bad-{n}"), 10950 + n as u16, &pki);
        let line = d.ctl_err(&["add", "nbd", "--uri", &uri]);
        assert!(line.contains(expect), "{what:?}: {line}");
        assert!(d.list_json().is_empty(), "{what:?}: {:?}", d.list_json());
    }
    let pki = pki::make("/tmp/pki-plain", ServerCert::Good, false);
    let plain = Server::nbdkit_memory(Listen::Tcp(10955), "64M", &[]);
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
        "nbds://127.0.0.1:10955/?tls-psk-file=/k",
    ]);
    assert!(line.contains("TLS-PSK is not supported yet"), "{line}");
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
    let mut server = nbdkit_file_tls(file, 10960, &pki);
    let uri = pki::tls_uri(&server.uri, &pki.client);
    let d = Daemon::start("nbd-tls-restart");
    let dev = d.add(&["nbd", "--uri", &uri, "--reconnect-timeout", "30"]);
    let fio_dev = dev.clone();
    let job = std::thread::spawn(move || verify(&fio_dev, "64M"));
    std::thread::sleep(Duration::from_millis(1500));
    server.kill();
    std::thread::sleep(Duration::from_secs(2));
    let states = detail(&d, &dev, "connections");
    assert!(states.contains("reconnecting"), "{states}");
    let _server = nbdkit_file_tls(file, 10960, &pki);
    job.join()
        .expect("fio verify failed across the server restart");
    assert!(d.log_text().contains("reconnected"), "{}", d.log_text());
    let q = &d.show_json(dev_id(&dev))["queue_stats"][0];
    assert_eq!(q["errors"].as_u64(), Some(0), "{q}");
    d.del(&dev);
}
