//! Real-kernel tests of the nbd target against real NBD servers (nbdkit, qemu-nbd) on
//! loopback and Unix sockets. They run inside the test VM (tests/run-vm-tests.sh);
//! without /dev/ublk-control they fail, never skip.
//!
//! Here: the helpers and fio verify in every buffer mode against each server; how data
//! moves in `transfer`, servers that fail or misbehave in `faults`, `del` while a server
//! is slow, silent or gone in `del`.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};
use ublkd_tests::nbd_server::{Listen, Server};
use ublkd_tests::remote_net::{self, RemoteNet};
use ublkd_tests::*;

mod del;
mod faults;
mod transfer;

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
