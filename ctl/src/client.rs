//! Talking to the daemon: one request, one response, per connection.

use anyhow::{anyhow, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use ublkd_proto::{Request, Response};

/// How long the daemon may take to answer (adding a device waits for it to go live).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

pub fn call(socket: &Path, request: &Request) -> Result<Response> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                " (is ublkd running?)"
            }
            std::io::ErrorKind::PermissionDenied => {
                " (ublkctl needs root, or the group given to ublkd --socket-group)"
            }
            _ => "",
        };
        anyhow!("cannot connect to ublkd at {}: {e}{hint}", socket.display())
    })?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    // A refusal (permission, too many connections) may come and the connection close
    // before the request is sent: the answer is still there to read.
    let sent = stream.write_all(line.as_bytes());
    let mut answer = String::new();
    let read = BufReader::new(&stream).read_line(&mut answer);
    if answer.is_empty() {
        sent.context("cannot send the request to ublkd")?;
        read.context("no answer from ublkd")?;
        return Err(anyhow!("ublkd closed the connection without answering"));
    }
    serde_json::from_str(&answer)
        .with_context(|| format!("cannot understand ublkd's answer: {}", answer.trim()))
}
