//! TLS against a real server (nbdkit with GnuTLS) on this host: the handshake, the
//! options over TLS, the Unix socket relay end to end, the hand-off to kernel TLS where
//! the host has it, and the errors a user can cause.
//! The device on top is proven in the VM (tests/tests/nbd_tls.rs).

use super::connect::connect_one;
use super::*;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use ublkd_tests::nbd_server::{Listen, Server};
use ublkd_tests::pki::{self, ServerCert};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nbdkit_tls(listen: Listen, server_dir: &std::path::Path, extra: &[&str]) -> Server {
    let certs = format!("--tls-certificates={}", server_dir.display());
    let mut args = vec!["--tls=require", certs.as_str()];
    args.extend_from_slice(extra);
    Server::nbdkit_memory(listen, "16M", &args)
}

fn connect(uri: &str) -> Result<(OwnedFd, ExportInfo), NbdError> {
    connect_one(&uri.parse().unwrap(), &AtomicBool::new(false)).map(|n| (n.sock, n.info))
}

/// Writes a block and reads it back over the connection's socket.
fn write_and_read(fd: OwnedFd) {
    let mut s = UnixStream::from(fd);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    s.write_all(&proto::request(0, proto::CMD_WRITE, 1, 8192, 4096))
        .unwrap();
    s.write_all(&data).unwrap();
    let mut reply = [0u8; proto::REPLY_LEN];
    s.read_exact(&mut reply).unwrap();
    let r = proto::parse_reply(&reply).unwrap();
    assert_eq!((r.error, r.cookie), (0, 1));
    s.write_all(&proto::request(0, proto::CMD_READ, 2, 8192, 4096))
        .unwrap();
    s.read_exact(&mut reply).unwrap();
    let r = proto::parse_reply(&reply).unwrap();
    assert_eq!((r.error, r.cookie), (0, 2));
    let mut back = vec![0u8; 4096];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn tls_over_a_unix_socket_serves_the_export() {
    let dir = format!("/tmp/ublkd-tls-unix-{}", std::process::id());
    let pki = pki::make(&dir, ServerCert::Good, false);
    let sock = format!("{dir}/nbd.sock");
    let server = nbdkit_tls(Listen::Unix(sock), &pki.server, &[]);
    let (fd, info) = connect(&pki::tls_uri(&server.uri, &pki.client)).unwrap();
    assert_eq!(info.size, 16 << 20);
    write_and_read(fd);
}

#[test]
fn client_certificates_are_presented() {
    let dir = format!("/tmp/ublkd-tls-client-{}", std::process::id());
    let pki = pki::make(&dir, ServerCert::Good, true);
    let sock = format!("{dir}/nbd.sock");
    let server = nbdkit_tls(Listen::Unix(sock), &pki.server, &["--tls-verify-peer"]);
    let (fd, _) = connect(&pki::tls_uri(&server.uri, &pki.client)).unwrap();
    write_and_read(fd);
    // Without them the server ends the handshake.
    std::fs::remove_file(pki.client.join(tls::CLIENT_CERT)).unwrap();
    let e = connect(&pki::tls_uri(&server.uri, &pki.client))
        .unwrap_err()
        .to_string();
    assert!(e.contains("client authentication needs both"), "{e}");
    std::fs::remove_file(pki.client.join(tls::CLIENT_KEY)).unwrap();
    let e = connect(&pki::tls_uri(&server.uri, &pki.client))
        .unwrap_err()
        .to_string();
    assert!(e.contains("the TLS handshake failed"), "{e}");
    assert!(e.contains("client certificate"), "{e}");
}

#[test]
fn tls_over_tcp_serves_the_export() {
    let dir = format!("/tmp/ublkd-tls-tcp-{}", std::process::id());
    let pki = pki::make(&dir, ServerCert::Good, false);
    let server = nbdkit_tls(Listen::Tcp(free_port()), &pki.server, &[]);
    // Over TCP the session goes to the kernel: where it has no kernel TLS (this host
    // may not), that is one clear line naming the module, and no connection.
    match connect(&pki::tls_uri(&server.uri, &pki.client)) {
        Ok((fd, info)) => {
            assert_eq!(info.size, 16 << 20);
            assert!(ktls::active(fd.as_fd()), "kernel TLS is not on the socket");
            write_and_read(fd);
        }
        Err(e) => {
            let e = e.to_string();
            assert!(
                !Path::new("/sys/module/tls").exists(),
                "the tls module is loaded but: {e}"
            );
            assert!(e.contains("load the kernel module `tls`"), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}

#[test]
fn bad_certificates_and_servers_are_clear_errors() {
    let cases = [
        (ServerCert::OtherCa, "not signed by the CA in ca-cert.pem"),
        (ServerCert::OtherHost, "certificate is for another host"),
        (ServerCert::Expired, "certificate has expired"),
    ];
    for (what, expect) in cases {
        let dir = format!("/tmp/ublkd-tls-bad-{}-{what:?}", std::process::id());
        let pki = pki::make(&dir, what, false);
        let server = nbdkit_tls(Listen::Tcp(free_port()), &pki.server, &[]);
        let e = connect(&pki::tls_uri(&server.uri, &pki.client))
            .unwrap_err()
            .to_string();
        assert!(e.contains(expect), "{what:?}: {e}");
        assert!(!e.contains('\n'), "{e}");
    }

    let dir = format!("/tmp/ublkd-tls-plain-{}", std::process::id());
    let pki = pki::make(&dir, ServerCert::Good, false);
    let plain = Server::nbdkit_memory(Listen::Tcp(free_port()), "16M", &[]);
    let e = connect(&pki::tls_uri(&plain.uri, &pki.client))
        .unwrap_err()
        .to_string();
    assert!(e.contains("the server does not offer TLS"), "{e}");

    // A server that requires TLS, asked in plaintext.
    let tls = nbdkit_tls(Listen::Tcp(free_port()), &pki.server, &[]);
    let e = connect(&tls.uri).unwrap_err().to_string();
    assert!(e.contains("the server requires TLS: use nbds://"), "{e}");

    let e = connect(&pki::tls_uri(&tls.uri, Path::new("/nonexistent")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/ca-cert.pem"), "{e}");

    let uri = tls.uri.replacen("nbd", "nbds", 1) + "?tls-psk-file=/etc/keys.psk";
    let e = connect(&uri).unwrap_err().to_string();
    assert!(e.contains("TLS-PSK is not supported yet"), "{e}");
}

#[test]
fn qemu_nbd_over_tls() {
    let dir = format!("/tmp/ublkd-tls-qemu-{}", std::process::id());
    let pki = pki::make(&dir, ServerCert::Good, false);
    let file = format!("{dir}/disk.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let creds = format!(
        "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir={}",
        pki.server.display()
    );
    let server = Server::qemu_nbd_with(
        Listen::Unix(format!("{dir}/nbd.sock")),
        &file,
        &["--object", &creds, "--tls-creds", "tls0"],
    );
    let (fd, info) = connect(&pki::tls_uri(&server.uri, &pki.client)).unwrap();
    assert_eq!(info.size, 16 << 20);
    write_and_read(fd);
}
