//! `ublkd` and `ublkctl` for the tests: a daemon with its own socket, state directory
//! and log; `ublkctl` calls against it, as root or as another user; what `list` says.

use crate::{traced, wait_gone};
use serde_json::Value;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn bin(name: &str, env: &str) -> String {
    std::env::var(env).unwrap_or_else(|_| name.to_string())
}

/// A running `ublkd` with its own socket; SIGTERM and wait on drop.
pub struct Daemon {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    log: PathBuf,
    /// How many times the log said "ready" before this process started.
    readies_before: usize,
    child: Option<Child>,
}

/// What ublkd logs once it has restored its recorded devices.
const READY: &str = "INFO  ublkd] ready:";

impl Daemon {
    /// Starts `ublkd` for test `name`, with an empty state directory, and waits until
    /// its socket accepts connections.
    pub fn start(name: &str) -> Daemon {
        Daemon::start_clean(name, &[])
    }

    /// `start` with extra arguments.
    pub fn start_clean(name: &str, extra: &[&str]) -> Daemon {
        let _ = std::fs::remove_dir_all(format!("/tmp/ublkd-{name}/state"));
        let _ = std::fs::remove_file(format!("/tmp/ublkd-{name}.log"));
        Daemon::start_with(name, extra)
    }

    /// Starts `ublkd` for test `name` with extra arguments, keeping the state directory
    /// (the devices an earlier daemon of this test recorded), and waits until it is
    /// ready: it logs so once it has restored the recorded devices.
    pub fn start_with(name: &str, extra: &[&str]) -> Daemon {
        traced(
            || format!("ublkd start {name} {extra:?}"),
            || {
                let mut d = Daemon::spawn_with(name, extra);
                d.wait_ready();
                d
            },
        )
    }

    /// Waits until this daemon has logged that it is ready.
    pub fn wait_ready(&mut self) {
        let d = self;
        let deadline = Instant::now() + Duration::from_secs(60);
        while d.log_text().matches(READY).count() <= d.readies_before {
            if let Some(status) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("ublkd exited early ({status}):\n{}", d.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "ublkd did not get ready in time:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            UnixStream::connect(&d.socket).is_ok(),
            "ready but not listening"
        );
    }

    /// The path of device `id`'s record.
    pub fn record_path(&self, id: u64) -> PathBuf {
        self.state_dir.join(format!("devices/{id}.json"))
    }

    /// Starts `ublkd` as `start_with` does, but returns as soon as the process runs:
    /// for daemons that are meant to die, or to be talked to while they restore.
    pub fn spawn_with(name: &str, extra: &[&str]) -> Daemon {
        Daemon::spawn_with_env(name, extra, &[])
    }

    /// `spawn_with` with extra environment variables for the daemon.
    pub fn spawn_with_env(name: &str, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let socket = PathBuf::from(format!("/tmp/ublkd-{name}/ublkd.sock"));
        let state_dir = PathBuf::from(format!("/tmp/ublkd-{name}/state"));
        let log = PathBuf::from(format!("/tmp/ublkd-{name}.log"));
        let readies_before = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches(READY)
            .count();
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open daemon log");
        let child = Command::new(bin("ublkd", "UBLKD_BIN"))
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state_dir)
            // Test binaries that run side by side in the VM (tests/vm/guest-run-tests.sh)
            // get id ranges of their own, so a device one restores under its recorded
            // id is never taken by the other's `add`.
            .args(
                std::env::var("UBLKD_TEST_DEVICE_IDS")
                    .ok()
                    .filter(|_| !extra.contains(&"--device-ids"))
                    .map(|r| vec!["--device-ids".to_string(), r])
                    .unwrap_or_default(),
            )
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log"))
            .stderr(log_file)
            .spawn()
            .expect("spawn ublkd");
        Daemon {
            socket,
            state_dir,
            log,
            readies_before,
            child: Some(child),
        }
    }

    /// Waits (at most `within`) for the daemon to end by itself; returns how it ended.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let status = self.child.as_mut()?.try_wait().ok().flatten();
            if status.is_some() {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Runs `ublkctl --socket <ours> args...`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        traced(
            || format!("ublkctl {args:?}"),
            || ctl_at(&self.socket, args),
        )
    }

    /// `ublkctl` that must succeed; returns its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "ublkctl {args:?} failed ({}): {}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// `ublkctl` that must fail with exactly one line on stderr and nothing on stdout;
    /// returns that line.
    pub fn ctl_err(&self, args: &[&str]) -> String {
        expect_one_line_error(&self.ctl(args), &format!("{args:?}"))
    }

    /// `add` that must succeed; returns the device path it printed.
    pub fn add(&self, args: &[&str]) -> String {
        let mut full = vec!["add"];
        full.extend_from_slice(args);
        let out = self.ctl_ok(&full);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "add printed more than the path: {out:?}");
        let path = lines[0].to_string();
        assert!(
            path.starts_with("/dev/ublkb"),
            "unexpected add output {path:?}"
        );
        assert!(
            Path::new(&path).exists(),
            "{path} does not exist after add returned"
        );
        path
    }

    /// `del --force` of the device at `path` (tests delete devices under load and
    /// mounted; `loop::del_refuses_a_device_in_use` tests plain `del`), then waits
    /// (10 s at most) for its node to go.
    pub fn del(&self, path: &str) {
        self.ctl_ok(&["del", "--force", &dev_id(path).to_string()]);
        assert!(
            wait_gone(path, Duration::from_secs(10)),
            "{path} still exists after del"
        );
    }

    pub fn list_json(&self) -> Vec<Value> {
        let v: Value =
            serde_json::from_str(&self.ctl_ok(&["list", "--json"])).expect("list --json is JSON");
        v.as_array().expect("list --json is an array").clone()
    }

    pub fn show_json(&self, id: u64) -> Value {
        serde_json::from_str(&self.ctl_ok(&["show", &id.to_string(), "--json"]))
            .expect("show --json is JSON")
    }

    /// The value of `key` among device `id`'s target details (`show`); panics with the
    /// whole `show` when there is none.
    pub fn detail(&self, id: u64, key: &str) -> String {
        let show = self.show_json(id);
        show["target_details"]
            .as_array()
            .unwrap()
            .iter()
            .find(|kv| kv[0] == key)
            .and_then(|kv| kv[1].as_str())
            .unwrap_or_else(|| panic!("no {key} in {show}"))
            .to_string()
    }

    /// The value of the Prometheus sample `name` of device `id` (`stats --prometheus`).
    pub fn prometheus_value(&self, name: &str, id: u64) -> Option<f64> {
        let text = self.ctl_ok(&["stats", "--prometheus"]);
        crate::prometheus_samples(&text)
            .into_iter()
            .find(|(n, labels, _)| n == name && labels.contains(&("id".into(), id.to_string())))
            .map(|s| s.2)
    }

    /// Sends raw bytes to the control socket and returns the raw answer.
    pub fn raw_request(&self, bytes: &[u8]) -> String {
        use std::io::Write;
        let mut s = UnixStream::connect(&self.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        s.write_all(bytes).expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    }

    /// SIGTERM, then waits (bounded) for exit; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        self.signal_and_wait(libc::SIGTERM)
    }

    /// SIGKILL (a crash), then waits for the process to be gone; returns nothing, as
    /// there is no exit code.
    pub fn kill9(&mut self) {
        let _ = self.signal_and_wait(libc::SIGKILL);
    }

    fn signal_and_wait(&mut self, sig: i32) -> Option<i32> {
        let child = self.child.take()?;
        traced(
            || format!("ublkd signal {sig}"),
            || self.signal_child_and_wait(child, sig),
        )
    }

    fn signal_child_and_wait(&self, mut child: Child, sig: i32) -> Option<i32> {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "ublkd did not exit within 60 s of SIGTERM:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- ublkd log ----\n{}", self.log_text());
        }
        if self.child.is_none() {
            return; // the test stopped it and checked the exit itself
        }
        let code = self.stop();
        if !std::thread::panicking() {
            assert_eq!(
                code,
                Some(0),
                "ublkd did not exit cleanly:\n{}",
                self.log_text()
            );
        }
    }
}

/// The ublkd binary the tests run (`UBLKD_BIN`, else `ublkd` on PATH).
pub fn ublkd_bin() -> String {
    bin("ublkd", "UBLKD_BIN")
}

/// Runs `ublkctl --socket SOCKET args...` as user `uid`, group `gid`, with exactly the
/// supplementary `groups` (the tests run as root).
pub fn ctl_as(socket: &Path, uid: u32, gid: u32, groups: &[u32], args: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    let groups: Vec<libc::gid_t> = groups.to_vec();
    let mut cmd = Command::new(bin("ublkctl", "UBLKCTL_BIN"));
    cmd.arg("--socket").arg(socket).args(args);
    // SAFETY: the closure runs in the forked child before exec and calls only
    // setgroups, setgid and setuid, which are async-signal-safe, on memory the child
    // owns (its copy of `groups`). It drops root itself: Command's own uid() would
    // do it before this closure runs, and setgroups then fails.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("run ublkctl")
}

/// Runs `ublkctl --socket SOCKET args...`.
pub fn ctl_at(socket: &Path, args: &[&str]) -> Output {
    Command::new(bin("ublkctl", "UBLKCTL_BIN"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run ublkctl")
}

/// Checks a failed command: non-zero exit, nothing on stdout, one line on stderr.
pub fn expect_one_line_error(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "{what} succeeded but should have failed"
    );
    assert!(
        out.stdout.is_empty(),
        "{what} printed to stdout: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected one error line, got {stderr:?}"
    );
    assert!(
        lines[0].starts_with("ublkctl: "),
        "{what}: error line {:?}",
        lines[0]
    );
    lines[0].to_string()
}

/// The entry of device `id` in `list --json`.
pub fn list_entry(d: &Daemon, id: u64) -> Value {
    d.list_json()
        .into_iter()
        .find(|e| e["id"].as_u64() == Some(id))
        .unwrap_or_else(|| panic!("device {id} is not listed:\n{}", d.log_text()))
}

/// Waits until device `id` is served (`live` in `list`), for at most 60 s: a network
/// or rbd device is restored or reconnected in the background. `what` says after what,
/// for the failure message.
pub fn wait_live(d: &Daemon, id: u64, what: &str) {
    traced(
        || format!("wait for device {id} to be live {what}"),
        || wait_live_untraced(d, id, what),
    )
}

fn wait_live_untraced(d: &Daemon, id: u64, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while list_entry(d, id)["state"] != "live" {
        assert!(
            std::time::Instant::now() < deadline,
            "device {id} not served 60 s {what}:\n{}",
            d.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The command path ublkd gives a device by default, also on the test VM's kernel,
/// which has UBLK_F_BATCH_IO (batch is asked for with --batch).
pub const DEFAULT_COMMANDS: &str = "per-tag";

/// The `ublkctl add` flag that picks a command path: "batch" or "per-tag".
pub fn commands_flag(commands: &str) -> &'static str {
    match commands {
        "batch" => "--batch",
        "per-tag" => "--no-batch",
        other => panic!("unknown command path {other:?}"),
    }
}

/// Asserts that a device's queues run the command path `want` ("batch" or "per-tag"),
/// both by what `show --json` says and by the kernel's device flags (BATCH_IO), so a
/// test of batch mode fails when the device silently runs per tag.
pub fn assert_commands(show: &Value, want: &str) {
    assert_eq!(show["commands"].as_str(), Some(want), "{show}");
    let names = show["kernel"]["flag_names"]
        .as_array()
        .unwrap_or_else(|| panic!("show has no kernel flag names: {show}"));
    let batch = names.iter().any(|n| n == "BATCH_IO");
    assert_eq!(batch, want == "batch", "kernel flags vs {want}: {show}");
}

/// The id in `/dev/ublkbN`.
pub fn dev_id(path: &str) -> u64 {
    path.trim_start_matches("/dev/ublkb")
        .parse()
        .expect("device id")
}
