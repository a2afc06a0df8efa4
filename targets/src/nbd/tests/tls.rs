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
    let abort = std::sync::Arc::new(AtomicBool::new(false));
    connect_one(&uri.parse().unwrap(), &abort).map(|n| (n.sock, n.info))
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

/// A PSK file with `alice`'s key (32 random bytes) and a comment; returns its path and
/// the key in hex.
fn psk_file(dir: &str) -> (String, String) {
    std::fs::create_dir_all(dir).unwrap();
    let key: String = (0..32)
        .map(|i| format!("{:02x}", (i * 37 + std::process::id() as usize) as u8))
        .collect();
    let path = format!("{dir}/keys.psk");
    std::fs::write(
        &path,
        format!("# made by the test\nbob:00112233\nalice:{key}\n"),
    )
    .unwrap();
    (path, key)
}

/// nbdkit requiring TLS-PSK with the keys in `file`, on TCP.
fn nbdkit_psk(file: &str) -> Server {
    let psk = format!("--tls-psk={file}");
    Server::nbdkit_memory(
        Listen::Tcp(free_port()),
        "16M",
        &["--tls=require", psk.as_str()],
    )
}

/// One TLS 1.3 record of `kind` with `data`, sealed with `keys` (RFC 8446 5.2).
fn seal(cipher: ktls::Cipher, keys: &mut ktls::DirKeys, data: &[u8]) -> Vec<u8> {
    let mut inner = data.to_vec();
    inner.push(23);
    let len = (inner.len() + 16) as u16;
    let mut header = vec![23, 3, 3];
    header.extend_from_slice(&len.to_be_bytes());
    let mut tag = [0u8; 16];
    let ct = openssl::symm::encrypt_aead(
        symm(cipher),
        &keys.key,
        Some(&nonce(keys)),
        &header,
        &inner,
        &mut tag,
    )
    .unwrap();
    keys.seq += 1;
    [header, ct, tag.to_vec()].concat()
}

/// Opens the next TLS 1.3 record from `s` with `keys`: its content type and data.
fn open(cipher: ktls::Cipher, keys: &mut ktls::DirKeys, s: &mut impl Read) -> (u8, Vec<u8>) {
    let mut header = [0u8; 5];
    s.read_exact(&mut header).unwrap();
    assert_eq!(header[0], 23, "an encrypted record");
    let mut body = vec![0u8; u16::from_be_bytes([header[3], header[4]]) as usize];
    s.read_exact(&mut body).unwrap();
    let (ct, tag) = body.split_at(body.len() - 16);
    let mut inner = openssl::symm::decrypt_aead(
        symm(cipher),
        &keys.key,
        Some(&nonce(keys)),
        &header,
        ct,
        tag,
    )
    .unwrap_or_else(|e| panic!("record {} does not open: {e}", keys.seq));
    keys.seq += 1;
    while inner.last() == Some(&0) {
        inner.pop();
    }
    let kind = inner.pop().unwrap();
    (kind, inner)
}

fn symm(cipher: ktls::Cipher) -> openssl::symm::Cipher {
    match cipher {
        ktls::Cipher::Aes128Gcm => openssl::symm::Cipher::aes_128_gcm(),
        ktls::Cipher::Aes256Gcm => openssl::symm::Cipher::aes_256_gcm(),
        ktls::Cipher::Chacha20Poly1305 => openssl::symm::Cipher::chacha20_poly1305(),
    }
}

fn nonce(keys: &ktls::DirKeys) -> Vec<u8> {
    let mut n = keys.iv.clone();
    for (b, s) in n[4..].iter_mut().zip(keys.seq.to_be_bytes()) {
        *b ^= s;
    }
    n
}

/// The keys and sequence numbers handed to the kernel are the session's: with them, as
/// the kernel would, this test seals an NBD write and a read and opens the replies.
/// (This host has no kernel TLS; the VM tests use it.)
#[test]
fn psk_session_keys_are_the_ones_the_server_uses() {
    let (file, _) = psk_file(&format!("/tmp/ublkd-psk-keys-{}", std::process::id()));
    let server = nbdkit_psk(&file);
    let port: u16 = server
        .uri
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let greeting = proto::greet(&mut tcp).unwrap();
    proto::starttls(&mut tcp, greeting).unwrap();
    let c = psk::connector(Path::new(&file), Some("alice")).unwrap();
    let mut client = c.handshake(&mut tcp).unwrap();
    let info = proto::options(&mut client.stream, "", greeting).unwrap();
    assert_eq!(info.size, 16 << 20);
    let session = client.into_session().unwrap();
    assert_eq!(session.describe(), "TLS 1.3, AES-128-GCM");
    eprintln!(
        "records since the handshake: {} sent, {} received",
        session.tx.seq, session.rx.seq
    );
    // OpenSSL wrote our options after the handshake; nbdkit sent its replies (and
    // GnuTLS perhaps session tickets): none of them at sequence 0 would be wrong.
    assert!(
        session.tx.seq >= 1 && session.rx.seq >= 1,
        "{} {}",
        session.tx.seq,
        session.rx.seq
    );
    let ktls::Session {
        cipher,
        mut tx,
        mut rx,
        ..
    } = session;
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 13) as u8).collect();
    let mut write = proto::request(0, proto::CMD_WRITE, 1, 4096, 4096).to_vec();
    write.extend_from_slice(&data);
    tcp.write_all(&seal(cipher, &mut tx, &write)).unwrap();
    let (kind, reply) = open(cipher, &mut rx, &mut tcp);
    assert_eq!((kind, reply.len()), (23, proto::REPLY_LEN));
    let r = proto::parse_reply(reply[..].try_into().unwrap()).unwrap();
    assert_eq!((r.error, r.cookie), (0, 1));
    tcp.write_all(&seal(
        cipher,
        &mut tx,
        &proto::request(0, proto::CMD_READ, 2, 4096, 4096),
    ))
    .unwrap();
    let mut got = Vec::new();
    while got.len() < proto::REPLY_LEN + 4096 {
        let (kind, part) = open(cipher, &mut rx, &mut tcp);
        assert_eq!(kind, 23);
        got.extend_from_slice(&part);
    }
    let r = proto::parse_reply(got[..proto::REPLY_LEN].try_into().unwrap()).unwrap();
    assert_eq!((r.error, r.cookie), (0, 2));
    assert!(got[proto::REPLY_LEN..] == data[..]);
}

#[test]
fn psk_errors_are_one_clear_line() {
    let dir = format!("/tmp/ublkd-psk-bad-{}", std::process::id());
    let (file, key) = psk_file(&dir);
    let server = nbdkit_psk(&file);
    let uri = |user: &str, file: &str| {
        format!(
            "{}?tls-psk-file={file}&tls-username={user}",
            server.uri.replacen("nbd", "nbds", 1)
        )
    };
    let check = |uri: &str, expect: &str| {
        let e = connect(uri).unwrap_err().to_string();
        assert!(e.contains(expect), "{uri}: {e}");
        assert!(!e.contains('\n'), "{e}");
        assert!(!e.contains(&key), "the key is in: {e}");
    };
    // Over TCP the hand-off needs the kernel's tls module, which this host may lack.
    match connect(&uri("alice", &file)) {
        Ok((fd, _)) => assert!(ktls::active(fd.as_fd())),
        Err(e) => assert!(
            e.to_string().contains("load the kernel module `tls`"),
            "{e}"
        ),
    }
    check(
        &uri("alice", "/nonexistent/keys.psk"),
        "cannot read the PSK file /nonexistent/keys.psk",
    );
    check(&uri("carol", &file), "has no key for user 'carol'");
    // The server has the user with another key.
    let other = format!("{dir}/other.psk");
    std::fs::write(&other, format!("alice:{}\n", "ab".repeat(32))).unwrap();
    check(
        &uri("alice", &other),
        "the server refused the TLS-PSK handshake",
    );
    // The server does not know the user.
    std::fs::write(&other, format!("dave:{key}\n")).unwrap();
    check(
        &uri("dave", &other),
        "the server refused the TLS-PSK handshake",
    );
    // A plaintext server.
    let plain = Server::nbdkit_memory(Listen::Tcp(free_port()), "16M", &[]);
    let e = connect(&format!(
        "{}?tls-psk-file={file}&tls-username=alice",
        plain.uri.replacen("nbd", "nbds", 1)
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("the server does not offer TLS"), "{e}");
}

/// Over a Unix socket the PSK session stays in OpenSSL, in its relay: the queue's end
/// serves the export; the server going away ends the queue's end.
#[test]
fn psk_over_a_unix_socket_serves_the_export() {
    let dir = format!("/tmp/ublkd-psk-unix-{}", std::process::id());
    let (file, _) = psk_file(&dir);
    let sock = format!("{dir}/nbd.sock");
    let psk = format!("--tls-psk={file}");
    let mut server = Server::nbdkit_memory(
        Listen::Unix(sock.clone()),
        "16M",
        &["--tls=require", psk.as_str()],
    );
    let uri = format!("nbds+unix:///?socket={sock}&tls-psk-file={file}&tls-username=alice");
    let (fd, info) = connect(&uri).unwrap();
    assert_eq!(info.size, 16 << 20);
    let mut s = UnixStream::from(fd);
    write_and_read(s.try_clone().unwrap().into());
    server.kill();
    let mut rest = Vec::new();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        s.read_to_end(&mut rest).unwrap(),
        0,
        "the relay ends with the server"
    );
}

/// qemu-nbd with `tls-creds-psk` (DIR/keys.psk), over a Unix socket (the relay) and
/// with the default user, qemu's own default.
#[test]
fn qemu_nbd_over_tls_psk() {
    let dir = format!("/tmp/ublkd-psk-qemu-{}", std::process::id());
    std::fs::create_dir_all(&dir).unwrap();
    let file = format!("{dir}/disk.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let keys = format!("{dir}/keys.psk");
    std::fs::write(&keys, format!("qemu:{}\n", "5a".repeat(32))).unwrap();
    let creds = format!("tls-creds-psk,id=tls0,endpoint=server,dir={dir}");
    let server = Server::qemu_nbd_with(
        Listen::Unix(format!("{dir}/nbd.sock")),
        &file,
        &["--object", &creds, "--tls-creds", "tls0"],
    );
    let uri = server.uri.replacen("nbd+unix", "nbds+unix", 1) + &format!("&tls-psk-file={keys}");
    let (fd, info) = connect(&uri).unwrap();
    assert_eq!(info.size, 16 << 20);
    write_and_read(fd);
}
