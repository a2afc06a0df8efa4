//! The control socket: one JSON request line per connection, one JSON response line.
//!
//! Who may talk to it: root, and the members of the group given with
//! `ublkd --socket-group GROUP` (the socket is then mode 0660 with that group, else 0600).
//! The file mode keeps others from connecting; on top of it every connection's peer
//! credentials (SO_PEERCRED, SO_PEERGROUPS, as they were at connect time) are checked,
//! and anyone else is answered with a refusal, which is logged. A client has
//! [`REQUEST_DEADLINE`] in all to send its request, and at most [`MAX_CONNECTIONS`] are
//! served at once.

use crate::daemon::Daemon;
use anyhow::{bail, Context, Result};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ublkd_proto::{Request, Response, MAX_REQUEST_BYTES};

/// How long a client may take to send its whole request line, however it trickles in.
/// Answering may take longer (adding an nbd device, deleting one).
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// Control connections served at once; more are answered "too many" and closed.
const MAX_CONNECTIONS: usize = 64;

/// The group whose members may use the socket besides root (`--socket-group`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketGroup {
    pub name: String,
    pub gid: u32,
}

impl SocketGroup {
    /// Looks the group up by name (in /etc/group or wherever NSS says).
    pub fn lookup(name: &str) -> Result<SocketGroup> {
        match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => Ok(SocketGroup {
                name: name.to_string(),
                gid: g.gid.as_raw(),
            }),
            Ok(None) => {
                bail!("--socket-group {name}: no such group (create it first: groupadd {name})")
            }
            Err(e) => bail!("--socket-group {name}: cannot look the group up: {e}"),
        }
    }
}

/// Whether a peer with user `uid`, group `gid` and supplementary `groups` may use the
/// socket: root always, members of `socket_group` when there is one. The error is the
/// one line the peer is answered with.
pub fn allowed(
    uid: u32,
    gid: u32,
    groups: &[u32],
    socket_group: Option<&SocketGroup>,
) -> Result<(), String> {
    if uid == 0 {
        return Ok(());
    }
    match socket_group {
        Some(g) if gid == g.gid || groups.contains(&g.gid) => Ok(()),
        Some(g) => Err(format!(
            "permission denied: uid {uid} is not root and not in group '{}' (ublkd --socket-group)",
            g.name
        )),
        None => Err(format!(
            "permission denied: uid {uid} is not root (ublkd --socket-group GROUP lets a group in)"
        )),
    }
}

/// Binds the socket at `path`: creates its directory, replaces a stale socket left by a
/// dead daemon, refuses to take over one a live daemon is serving, and sets mode 0600,
/// or 0660 with `group` as its group.
pub fn bind(path: &Path, group: Option<&SocketGroup>) -> Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("another ublkd is already serving {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    let mode = match group {
        Some(g) => {
            std::os::unix::fs::chown(path, None, Some(g.gid)).with_context(|| {
                format!(
                    "cannot give {} to group '{}' (ublkd needs CAP_CHOWN for --socket-group)",
                    path.display(),
                    g.name
                )
            })?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}

/// Counts the connections being served; one is released when its guard drops.
struct Slots(AtomicUsize);

struct Slot<'a>(&'a Slots);

impl Slots {
    fn take(&self, max: usize) -> Option<Slot<'_>> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

static SLOTS: Slots = Slots(AtomicUsize::new(0));

/// Accepts connections forever, each served on its own thread, at most
/// [`MAX_CONNECTIONS`] at once.
pub fn serve(
    listener: UnixListener,
    daemon: Arc<Daemon>,
    path: PathBuf,
    group: Option<SocketGroup>,
) {
    let group = Arc::new(group);
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let Some(slot) = SLOTS.take(MAX_CONNECTIONS) else {
                    let peer = peer_name(&stream);
                    log::warn!(
                        "control connection from {peer} refused: too many control connections ({MAX_CONNECTIONS})"
                    );
                    // Never blocks the accept loop: the answer fits the new socket's buffer.
                    let _ = stream.set_nonblocking(true);
                    answer(
                        stream,
                        &Response::Error(format!(
                            "too many control connections ({MAX_CONNECTIONS} at once); try again"
                        )),
                    );
                    continue;
                };
                let daemon = daemon.clone();
                let group = group.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("ublkd-conn".into())
                        .spawn(move || {
                            let _slot = slot;
                            handle_connection(stream, &daemon, (*group).as_ref())
                        });
                if let Err(e) = spawned {
                    log::error!("cannot start a connection thread: {e}");
                }
            }
            Err(e) => {
                log::error!("accept on {}: {e}", path.display());
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// "pid P uid U" of the peer, for log lines.
fn peer_name(stream: &UnixStream) -> String {
    match getsockopt(stream, PeerCredentials) {
        Ok(c) => format!("pid {} uid {}", c.pid(), c.uid()),
        Err(e) => format!("an unknown peer ({e})"),
    }
}

/// The peer's supplementary groups as they were when it connected (SO_PEERGROUPS).
fn peer_groups(stream: &UnixStream) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `groups`, which has room
        // for exactly that many, and updates `len` to what it wrote (or, with ERANGE,
        // to what it needs); the fd is the open socket.
        let r = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && n > groups.len() {
            groups.resize(n, 0);
            continue;
        }
        return Err(e);
    }
}

/// Checks the peer's credentials; the error is the refusal to answer.
fn check_peer(stream: &UnixStream, group: Option<&SocketGroup>) -> Result<(), String> {
    let creds = getsockopt(stream, PeerCredentials)
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    let (uid, gid) = (creds.uid(), creds.gid());
    // Supplementary groups matter only for a group member who is not root and whose
    // primary group is another one.
    let groups = match group {
        Some(g) if uid != 0 && gid != g.gid => {
            peer_groups(stream).map_err(|e| format!("cannot read the peer's groups: {e}"))?
        }
        _ => Vec::new(),
    };
    allowed(uid, gid, &groups, group)
}

fn handle_connection(stream: UnixStream, daemon: &Daemon, group: Option<&SocketGroup>) {
    if let Err(refusal) = check_peer(&stream, group) {
        log::warn!(
            "control connection from {} refused: {refusal}",
            peer_name(&stream)
        );
        answer(stream, &Response::Error(refusal));
        return;
    }
    let response = match read_request(&stream, REQUEST_DEADLINE) {
        Ok(None) => {
            log::debug!("a client connected and left without a request");
            return;
        }
        Ok(Some(req)) => {
            log::debug!("request from {}: {req:?}", peer_name(&stream));
            daemon.handle(req)
        }
        Err(e) => {
            log::warn!("bad control request from {}: {e:#}", peer_name(&stream));
            Response::Error(format!("{e:#}"))
        }
    };
    answer(stream, &response);
}

/// Writes `response` as one line.
fn answer(mut stream: UnixStream, response: &Response) {
    let mut line = match serde_json::to_string(response) {
        Ok(l) => l,
        Err(e) => format!(r#"{{"error":"cannot encode the response: {e}"}}"#),
    };
    line.push('\n');
    if let Err(e) = stream.write_all(line.as_bytes()) {
        log::debug!("client went away before its answer: {e}");
    }
}

/// Reads one request line (at most MAX_REQUEST_BYTES), all of it within `deadline`
/// however slowly it comes, and parses it; `None` when the client closed the
/// connection without sending a byte.
fn read_request(stream: &UnixStream, deadline: Duration) -> Result<Option<Request>> {
    let line = read_line_within(stream, deadline)?;
    if line.is_empty() {
        return Ok(None);
    }
    parse_request(&line).map(Some)
}

/// Reads up to the first newline, end of file, or MAX_REQUEST_BYTES + 1 bytes; fails
/// when that takes longer than `deadline` in all.
fn read_line_within(stream: &UnixStream, deadline: Duration) -> Result<Vec<u8>> {
    let end = Instant::now() + deadline;
    let mut line = Vec::new();
    let mut chunk = [0u8; 4096];
    let too_slow = || {
        anyhow::anyhow!(
            "cannot read the request: not sent within {} s",
            deadline.as_secs_f64()
        )
    };
    let mut reader = stream;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(too_slow());
        }
        stream.set_read_timeout(Some(left))?;
        let want = (MAX_REQUEST_BYTES + 1 - line.len()).min(chunk.len());
        let n = match reader.read(&mut chunk[..want]) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(too_slow())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(anyhow::Error::new(e).context("cannot read the request")),
        };
        if n == 0 {
            return Ok(line);
        }
        if let Some(nl) = chunk[..n].iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&chunk[..=nl]);
            return Ok(line);
        }
        line.extend_from_slice(&chunk[..n]);
        if line.len() > MAX_REQUEST_BYTES {
            return Ok(line);
        }
    }
}

pub fn parse_request(line: &[u8]) -> Result<Request> {
    // In the protocol crate, so that the fuzzer (fuzz/) runs the same code.
    Ok(ublkd_proto::parse_request(line)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good_requests() {
        assert_eq!(
            parse_request(b"{\"cmd\":\"list\"}\n").unwrap(),
            Request::List
        );
        assert_eq!(
            parse_request(b"{\"cmd\":\"show\",\"id\":2}").unwrap(),
            Request::Show { id: 2.into() }
        );
    }

    #[test]
    fn rejects_bad_requests_with_a_reason() {
        let e = parse_request(b"\n").unwrap_err();
        assert_eq!(format!("{e:#}"), "malformed request: empty");
        let e = parse_request(b"{\"cmd\":\"fly\"}").unwrap_err();
        assert!(
            format!("{e:#}").starts_with("malformed request: unknown variant `fly`"),
            "{e:#}"
        );
        let e = parse_request(&[0xff, 0xfe]).unwrap_err();
        assert!(format!("{e:#}").contains("not UTF-8"));
        let big = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert!(format!("{:#}", parse_request(&big).unwrap_err()).contains("longer than"));
    }

    #[test]
    fn bind_replaces_stale_sockets_and_refuses_live_ones() {
        let dir = std::env::temp_dir().join(format!("ublkd-test-{}", std::process::id()));
        let path = dir.join("sub/ublkd.sock");
        let first = bind(&path, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = bind(&path, None).unwrap_err();
        assert!(e.to_string().contains("already serving"), "{e}");
        drop(first);
        bind(&path, None).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_socket_group_gets_the_socket_mode_0660() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("ublkd-test-group-{}", std::process::id()));
        let path = dir.join("ublkd.sock");
        // Our own primary group: one a non-root owner may give a file to.
        let gid = nix::unistd::getgid().as_raw();
        let group = SocketGroup {
            name: "mine".into(),
            gid,
        };
        let _listener = bind(&path, Some(&group)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), gid);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_groups_are_a_clear_error() {
        let e = SocketGroup::lookup("no-such-group-ublkd").unwrap_err();
        assert_eq!(
            e.to_string(),
            "--socket-group no-such-group-ublkd: no such group (create it first: groupadd no-such-group-ublkd)"
        );
        assert_eq!(SocketGroup::lookup("root").unwrap().gid, 0);
    }

    #[test]
    fn root_and_group_members_are_allowed_and_no_one_else() {
        let ublk = SocketGroup {
            name: "ublk".into(),
            gid: 990,
        };
        assert_eq!(allowed(0, 0, &[], None), Ok(()));
        assert_eq!(allowed(0, 5, &[], Some(&ublk)), Ok(()));
        // Primary group, or one of the supplementary groups.
        assert_eq!(allowed(1000, 990, &[], Some(&ublk)), Ok(()));
        assert_eq!(allowed(1000, 1000, &[27, 990], Some(&ublk)), Ok(()));
        assert_eq!(
            allowed(1000, 1000, &[27], Some(&ublk)),
            Err("permission denied: uid 1000 is not root and not in group 'ublk' (ublkd --socket-group)".into())
        );
        // Without --socket-group only root; being in gid 0 does not make a user root.
        assert_eq!(
            allowed(1000, 0, &[0], None),
            Err("permission denied: uid 1000 is not root (ublkd --socket-group GROUP lets a group in)".into())
        );
    }

    #[test]
    fn our_own_credentials_are_read_from_the_socket() {
        let (a, _b) = UnixStream::pair().unwrap();
        let me = nix::unistd::getuid().as_raw();
        let result = check_peer(&a, None);
        assert_eq!(result.is_ok(), me == 0, "{result:?}");
        let own = SocketGroup {
            name: "own".into(),
            gid: nix::unistd::getgid().as_raw(),
        };
        assert_eq!(check_peer(&a, Some(&own)), Ok(()));
        // A supplementary group of ours, if we have one, comes through SO_PEERGROUPS.
        let groups = peer_groups(&a).unwrap();
        let mut ours: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .iter()
            .map(|g| g.as_raw())
            .collect();
        let mut got = groups.clone();
        ours.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, ours);
    }

    #[test]
    fn the_deadline_covers_the_whole_request_not_each_read() {
        let (server, mut client) = UnixStream::pair().unwrap();
        // One byte every 50 ms: every read is quick, the request never ends.
        let trickle = std::thread::spawn(move || {
            for _ in 0..40 {
                if client.write_all(b" ").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let start = Instant::now();
        let e = read_request(&server, Duration::from_millis(400)).unwrap_err();
        let took = start.elapsed();
        assert_eq!(
            format!("{e:#}"),
            "cannot read the request: not sent within 0.4 s"
        );
        assert!(took < Duration::from_millis(1000), "{took:?}");
        drop(server);
        trickle.join().unwrap();

        // A request in pieces within the deadline is read whole.
        let (server, mut client) = UnixStream::pair().unwrap();
        let pieces = std::thread::spawn(move || {
            for piece in [&b"{\"cmd\":"[..], b"\"list\"}", b"\n"] {
                client.write_all(piece).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let req = read_request(&server, Duration::from_secs(5)).unwrap();
        assert_eq!(req, Some(Request::List));
        pieces.join().unwrap();
    }

    #[test]
    fn connection_slots_are_capped_and_given_back() {
        let slots = Slots(AtomicUsize::new(0));
        let a = slots.take(2).unwrap();
        let b = slots.take(2).unwrap();
        assert!(slots.take(2).is_none());
        drop(a);
        let c = slots.take(2).unwrap();
        assert!(slots.take(2).is_none());
        drop((b, c));
        assert_eq!(slots.0.load(Ordering::Acquire), 0);
    }
}
