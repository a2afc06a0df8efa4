//! The control socket: one JSON request line per connection, one JSON response line.

use crate::daemon::Daemon;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use ublkd_proto::{Request, Response, MAX_REQUEST_BYTES};

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the socket at `path`: creates its directory, replaces a stale socket left by a
/// dead daemon, refuses to take over one a live daemon is serving, and sets mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener> {
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}

/// Accepts connections forever, each served on its own thread.
pub fn serve(listener: UnixListener, daemon: Arc<Daemon>, path: PathBuf) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let daemon = daemon.clone();
                let spawned = std::thread::Builder::new()
                    .name("ublkd-conn".into())
                    .spawn(move || handle_connection(stream, &daemon));
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

fn handle_connection(stream: UnixStream, daemon: &Daemon) {
    let response = match read_request(&stream) {
        Ok(None) => {
            log::debug!("a client connected and left without a request");
            return;
        }
        Ok(Some(req)) => {
            log::debug!("request: {req:?}");
            daemon.handle(req)
        }
        Err(e) => {
            log::warn!("bad control request: {e:#}");
            Response::Error(format!("{e:#}"))
        }
    };
    let mut stream = stream;
    let mut line = match serde_json::to_string(&response) {
        Ok(l) => l,
        Err(e) => format!(r#"{{"error":"cannot encode the response: {e}"}}"#),
    };
    line.push('\n');
    if let Err(e) = stream.write_all(line.as_bytes()) {
        log::debug!("client went away before its answer: {e}");
    }
}

/// Reads one request line (at most MAX_REQUEST_BYTES) and parses it; `None` when the
/// client closed the connection without sending a byte.
fn read_request(stream: &UnixStream) -> Result<Option<Request>> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut reader = BufReader::new(stream.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = Vec::new();
    reader
        .read_until(b'\n', &mut line)
        .context("cannot read the request")?;
    if line.is_empty() {
        return Ok(None);
    }
    parse_request(&line).map(Some)
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
            Request::Show { id: 2 }
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
        let first = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = bind(&path).unwrap_err();
        assert!(e.to_string().contains("already serving"), "{e}");
        drop(first);
        bind(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
