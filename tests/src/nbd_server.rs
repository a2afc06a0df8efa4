//! Real NBD servers for the tests: nbdkit and qemu-nbd on loopback, in another network
//! namespace (`remote_net`), or on a Unix socket.

use crate::remote_net::RemoteNet;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running NBD server, killed on drop.
pub struct Server {
    child: Child,
    pub uri: String,
}

pub enum Listen {
    Tcp(u16),
    Unix(String),
    /// TCP on another host's address (`remote_net::HOST`).
    TcpAt(&'static str, u16),
}

impl Listen {
    /// The TCP address to listen on (unused for a Unix socket).
    fn host(&self) -> &'static str {
        match self {
            Listen::TcpAt(host, _) => host,
            _ => "127.0.0.1",
        }
    }
}

impl Server {
    pub fn spawn(program: &str, args: &[String], listen: Listen, uri: String) -> Server {
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        let mut s = Server { child, uri };
        // Generous: a server that starts in a second here once took over 20 s in the
        // VM on a busy host.
        let started = Instant::now();
        loop {
            let up = match &listen {
                Listen::Tcp(port) | Listen::TcpAt(_, port) => {
                    TcpStream::connect((listen.host(), *port)).is_ok()
                }
                Listen::Unix(path) => UnixStream::connect(path).is_ok(),
            };
            if up {
                if started.elapsed() > Duration::from_secs(5) {
                    eprintln!("{program} took {:?} to listen", started.elapsed());
                }
                return s;
            }
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("{program} {args:?} exited before listening: {status}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{program} {args:?} did not start listening in 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// nbdkit's memory plugin: a RAM disk of `size` (multi-conn capable).
    pub fn nbdkit_memory(listen: Listen, size: &str, extra: &[&str]) -> Server {
        Server::nbdkit_memory_via(None, listen, size, extra)
    }

    /// `nbdkit_memory` in network namespace `net`, on TCP at `remote_net::HOST`.
    pub fn nbdkit_memory_in(net: &RemoteNet, port: u16, size: &str) -> Server {
        let listen = Listen::TcpAt(crate::remote_net::HOST, port);
        Server::nbdkit_memory_via(Some(net), listen, size, &[])
    }

    fn nbdkit_memory_via(
        net: Option<&RemoteNet>,
        listen: Listen,
        size: &str,
        extra: &[&str],
    ) -> Server {
        let mut args: Vec<String> = vec!["-f".into(), "--exit-with-parent".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let uri = match &listen {
            Listen::Tcp(port) | Listen::TcpAt(_, port) => {
                let host = listen.host();
                args.extend(["-i".into(), host.into(), "-p".into(), port.to_string()]);
                format!("nbd://{host}:{port}/")
            }
            Listen::Unix(path) => {
                let _ = std::fs::remove_file(path);
                args.extend(["-U".into(), path.clone()]);
                format!("nbd+unix:///?socket={path}")
            }
        };
        args.extend(["memory".into(), format!("size={size}")]);
        match net {
            Some(net) => {
                let args = net.wrap("/usr/bin/nbdkit", &args);
                Server::spawn("nsenter", &args, listen, uri)
            }
            None => Server::spawn("/usr/bin/nbdkit", &args, listen, uri),
        }
    }

    /// qemu-nbd exporting a raw file as export "disk".
    pub fn qemu_nbd(listen: Listen, file: &str) -> Server {
        Server::qemu_nbd_with(listen, file, &[])
    }

    /// `qemu_nbd` with more arguments (`extra`).
    pub fn qemu_nbd_with(listen: Listen, file: &str, extra: &[&str]) -> Server {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.extend(["-f".into(), "raw".into(), "-x".into(), "disk".into()]);
        args.extend(["-t".into(), "-e".into(), "4".into(), "--cache=none".into()]);
        let uri = match &listen {
            Listen::Tcp(port) | Listen::TcpAt(_, port) => {
                let host = listen.host();
                args.extend(["-b".into(), host.into(), "-p".into(), port.to_string()]);
                format!("nbd://{host}:{port}/disk")
            }
            Listen::Unix(path) => {
                let _ = std::fs::remove_file(path);
                args.extend(["-k".into(), path.clone()]);
                format!("nbd+unix:///disk?socket={path}")
            }
        };
        args.push(file.into());
        Server::spawn("/usr/bin/qemu-nbd", &args, listen, uri)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}
