//! nbd: ublkd against the kernel's nbd client, on the same nbdkit or qemu-nbd export.

use super::table::compare;
use super::{add_ublkd, Settings, LOOP_ROWS};
use std::process::Command;
use ublkd_tests::nbd_server::{Listen, Server};
use ublkd_tests::{run_ok, Daemon};

/// The nbd exports: `(key for --export, label, TCP port or Unix socket)`. `--export
/// TEXT` keeps those whose key starts with TEXT: `nbdkit` both nbdkit ones.
const NBD_EXPORTS: [(&str, &str, Result<u16, &str>); 4] = [
    ("nbdkit-tcp", "nbdkit memory", Ok(10809)),
    ("nbdkit-tls", "nbdkit memory (TLS optional)", Ok(10811)),
    (
        "nbdkit-unix",
        "nbdkit memory",
        Err("/tmp/bench-nbdkit.sock"),
    ),
    ("qemu-tcp", "qemu-nbd file", Ok(10810)),
];

pub(crate) fn bench(s: &Settings) {
    let file = "/tmp/bench-nbd.img";
    let chunk = vec![0x5au8; 1 << 20];
    let mut f = std::fs::File::create(file).expect("create export file");
    for _ in 0..512 {
        std::io::Write::write_all(&mut f, &chunk).expect("fill export file");
    }
    drop(f);
    let wanted: Vec<_> = NBD_EXPORTS
        .iter()
        .filter(|(key, ..)| match &s.export {
            // TLS only when asked for by name.
            _ if *key == "nbdkit-tls" => s.export.as_deref() == Some("nbdkit-tls"),
            Some(e) => key.starts_with(e.as_str()),
            None => true,
        })
        .collect();
    // Client certificates too: nbd-client -enable-tls will not start without one.
    let pki = ublkd_tests::pki::make("/tmp/bench-pki", ublkd_tests::pki::ServerCert::Good, true);
    let tls_certs = format!("--tls-certificates={}", pki.server.display());
    let threads: Vec<String> = s
        .nbdkit_threads
        .iter()
        .map(|n| format!("--threads={n}"))
        .collect();
    let threads: Vec<&str> = threads.iter().map(String::as_str).collect();
    let servers: Vec<Server> = wanted
        .iter()
        .map(|(key, _, at)| {
            let listen = match at {
                Ok(port) => Listen::Tcp(*port),
                Err(path) => Listen::Unix(path.to_string()),
            };
            if *key == "nbdkit-tls" {
                let mut args = vec!["--tls=on", &tls_certs];
                args.extend(&threads);
                Server::nbdkit_memory(listen, "512M", &args)
            } else if key.starts_with("nbdkit") {
                Server::nbdkit_memory(listen, "512M", &threads)
            } else {
                Server::qemu_nbd(listen, file)
            }
        })
        .collect();
    let d = Daemon::start("bench-nbd");
    for (n, ((key, label, at), server)) in wanted.iter().zip(&servers).enumerate() {
        let kdev = format!("/dev/nbd{n}");
        let conns = s.jobs.to_string();
        let uri = server.uri.clone();
        let export = if label.starts_with("qemu") {
            "disk"
        } else {
            ""
        };
        let (mut client, place) = match at {
            Ok(port) => (
                vec!["127.0.0.1".to_string(), port.to_string()],
                format!("127.0.0.1:{port} (TCP)"),
            ),
            Err(path) => (
                vec!["-u".to_string(), path.to_string()],
                format!("{path} (unix socket)"),
            ),
        };
        if s.jobs > 1 {
            // More than one connection needs multi-conn: ask ublkd, which checks.
            let probe = d.ctl(&["add", "nbd", "--uri", &uri, "--connections", &conns]);
            if !probe.status.success() {
                println!(
                    "{label} export on {place}: skipped: {}",
                    String::from_utf8_lossy(&probe.stderr).trim()
                );
                println!();
                continue;
            }
            let path = String::from_utf8_lossy(&probe.stdout).trim().to_string();
            d.del(&path);
        }
        client.extend([
            kdev.clone(),
            "-N".into(),
            export.to_string(),
            "-b".into(),
            "512".into(),
            "-C".into(),
            conns.clone(),
        ]);
        let args: Vec<&str> = client.iter().map(String::as_str).collect();
        run_ok("/usr/sbin/nbd-client", &args);
        let mut devices = vec![("kernel nbd".to_string(), kdev.clone())];
        // The kernel client over TLS too: nbd-client does the TLS in userspace (GnuTLS)
        // and relays the kernel's plaintext socket through it.
        let ktls_dev = format!("/dev/nbd{}", n + 8);
        if *key == "nbdkit-tls" {
            let mut tls_client = client.clone();
            let at = tls_client.iter().position(|a| *a == kdev).unwrap();
            tls_client[at] = ktls_dev.clone();
            let dir = &pki.client;
            tls_client.extend([
                "-enable-tls".into(),
                "-cacertfile".into(),
                dir.join("ca-cert.pem").display().to_string(),
                "-certfile".into(),
                dir.join("client-cert.pem").display().to_string(),
                "-keyfile".into(),
                dir.join("client-key.pem").display().to_string(),
                "-tlshostname".into(),
                "localhost".into(),
            ]);
            let tls_client: Vec<&str> = tls_client.iter().map(String::as_str).collect();
            run_ok("/usr/sbin/nbd-client", &tls_client);
            devices.push(("kernel nbd tls".to_string(), ktls_dev.clone()));
        }
        for extra in &s.variants {
            let args = vec![
                "nbd",
                "--uri",
                &uri,
                "--depth",
                "128",
                "--connections",
                &conns,
            ];
            devices.push(add_ublkd(&d, args.clone(), extra));
            if *key == "nbdkit-tls" {
                let tls_uri = ublkd_tests::pki::tls_uri(&uri, &pki.client);
                let mut args = args;
                args[2] = &tls_uri;
                let (label, dev) = add_ublkd(&d, args, extra);
                devices.push((label.replacen("ublkd", "ublkd tls", 1), dev));
            }
        }
        let modes: Vec<&str> = devices
            .iter()
            .filter_map(|(l, _)| l.strip_prefix("ublkd "))
            .collect();
        println!(
            "{label} export on {place}{}: kernel nbd client ({kdev}, nbd-client -C {conns}) vs ublkd nbd ({uri}: {conns} queue(s) and connection(s), depth 128, buffers: {})",
            match (&s.nbdkit_threads, key.starts_with("nbdkit")) {
                (Some(n), true) => format!(" (nbdkit --threads={n})"),
                _ => String::new(),
            },
            modes.join(", ")
        );
        println!(
            "fio io_uring, direct, {} job(s) sharing the queue depth, {} s per run (+1 s ramp), {} rounds, median shown; ratio = device / kernel nbd",
            s.jobs, s.runtime, s.rounds
        );
        println!();
        if *key == "nbdkit-tls" {
            compare(
                &devices,
                &[(0, "vs kernel"), (1, "vs k. tls")],
                &LOOP_ROWS,
                s,
            );
        } else {
            compare(&devices, &[(0, "vs kernel")], &LOOP_ROWS, s);
        }
        println!();
        for (label, dev) in &devices {
            if label.starts_with("kernel") {
                let _ = Command::new("/usr/sbin/nbd-client")
                    .args(["-d", dev])
                    .status();
            } else {
                d.ctl_ok(&["del", &ublkd_tests::dev_id(dev).to_string()]);
            }
        }
    }
    drop(servers);
}
