//! Helpers for the real-kernel tests: run `ublkd`, call `ublkctl`, run fio and read its
//! JSON report. The tests themselves are in `tests/tests/*.rs` (one binary per area)
//! and run inside the test VM (`tests/run-vm-tests.sh`).

#[cfg(feature = "rbd")]
pub mod ceph;
pub mod fake_nbd;
pub mod nbd_server;
pub mod pki;
pub mod tls_nbd;

use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// fio, called by absolute path (busybox's shell would prefer its own applets).
pub const FIO: &str = "/usr/bin/fio";

/// With `UBLKD_TEST_TRACE` set, runs `f` and prints how long it took as
/// `trace TEST +T what: D` on stderr (T since the test's first traced step; run the
/// binary with `--nocapture`): where a slow test spends its time. Without, just `f`.
pub fn traced<T>(what: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    thread_local!(static FIRST: Instant = Instant::now());
    if std::env::var_os("UBLKD_TEST_TRACE").is_none() {
        return f();
    }
    let since = FIRST.with(|t| t.elapsed());
    let start = Instant::now();
    let out = f();
    let thread = std::thread::current();
    eprintln!(
        "trace {} +{:.1}s {}: {:.2}s",
        thread.name().unwrap_or("?"),
        since.as_secs_f64(),
        what(),
        start.elapsed().as_secs_f64()
    );
    out
}

fn bin(name: &str, env: &str) -> String {
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

/// Fails the test at once outside the test VM: real-kernel tests never skip.
pub fn require_ublk() {
    assert!(
        Path::new("/dev/ublk-control").exists(),
        "/dev/ublk-control is missing: these tests must run in the test VM (tests/run-vm-tests.sh)"
    );
}

/// A sparse file of `size` bytes at `/tmp/backing-NAME.img`, replacing any older one;
/// it is removed when the returned guard is dropped, also when the test fails: the
/// guest's /tmp is memory, and files left behind would fill it for later tests.
pub fn backing_file(name: &str, size: u64) -> (String, RemoveOnDrop) {
    let path = format!("/tmp/backing-{name}.img");
    let _ = std::fs::remove_file(&path);
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    (path.clone(), RemoveOnDrop(path))
}

/// Removes a file when dropped.
pub struct RemoveOnDrop(pub String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
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

/// A finished fio run.
#[derive(Debug)]
pub struct FioRun {
    pub json: Value,
}

impl FioRun {
    /// Total IOs completed by every job, reads plus writes.
    pub fn total_ios(&self) -> u64 {
        self.jobs()
            .iter()
            .map(|j| ios(j, "read") + ios(j, "write"))
            .sum()
    }

    pub fn jobs(&self) -> Vec<Value> {
        self.json["jobs"].as_array().cloned().unwrap_or_default()
    }

    /// IOPS of job `i` in `dir` ("read" or "write").
    pub fn iops(&self, i: usize, dir: &str) -> f64 {
        self.jobs()[i][dir]["iops"].as_f64().unwrap_or(0.0)
    }

    /// Bandwidth of job `i` in `dir`, bytes/s.
    pub fn bw_bytes(&self, i: usize, dir: &str) -> f64 {
        self.jobs()[i][dir]["bw_bytes"].as_f64().unwrap_or(0.0)
    }
}

fn ios(job: &Value, dir: &str) -> u64 {
    job[dir]["total_ios"].as_u64().unwrap_or(0)
}

/// Runs fio with `args` (plus JSON output) and checks that it exited 0, that every job
/// reports error 0, and that IO was done.
pub fn fio<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> FioRun {
    traced(
        || format!("fio {args:?}"),
        || {
            let out = Command::new(FIO)
                .args(args)
                .arg("--output-format=json")
                .output()
                .expect("run fio");
            check_fio(args, out)
        },
    )
}

fn check_fio<S: std::fmt::Debug>(args: &[S], out: Output) -> FioRun {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio {args:?} failed ({}):\n{}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // fio may print notes before the JSON object.
    let start = stdout.find('{').unwrap_or(0);
    let json: Value = serde_json::from_str(&stdout[start..]).expect("fio JSON output");
    let run = FioRun { json };
    for (i, job) in run.jobs().iter().enumerate() {
        assert_eq!(
            job["error"].as_i64(),
            Some(0),
            "fio job {i} reported an error: {job}"
        );
    }
    assert!(run.total_ios() > 0, "fio did no IO: {args:?}");
    run
}

/// fio started in the background; `wait` checks it as `fio` does.
pub struct FioChild {
    child: Child,
    args: Vec<String>,
}

impl FioChild {
    pub fn start(args: &[String]) -> FioChild {
        let child = Command::new(FIO)
            .args(args)
            .arg("--output-format=json")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fio");
        FioChild {
            child,
            args: args.to_vec(),
        }
    }

    /// Waits (at most `within`) for fio to end, however it ends. For runs that are meant
    /// to fail, such as a device deleted under them. If fio is still there, returns
    /// where its processes wait in the kernel (after killing them).
    pub fn ended_within(mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let stacks = kernel_stacks(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
        Err(format!("fio did not end within {within:?}:\n{stacks}"))
    }

    /// Whether fio is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for fio and checks, as `fio` does, that it ended well.
    pub fn wait(self) -> FioRun {
        traced(
            || "wait for the fio started before".into(),
            || {
                let out = self.child.wait_with_output().expect("wait for fio");
                check_fio(&self.args, out)
            },
        )
    }
}

/// One fio io_uring job with O_DIRECT on `dev`, plus `more` options.
/// `bs` is one block size ("4k") or a range of them ("128k-512k", fio's `--bsrange`).
fn job(dev: &str, rw: &str, bs: &str, iodepth: u32, more: &[String]) -> Vec<String> {
    let bs_opt = if bs.contains('-') { "bsrange" } else { "bs" };
    let mut v = vec![
        format!("--name={rw}-{bs}"),
        format!("--filename={dev}"),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        format!("--rw={rw}"),
        format!("--{bs_opt}={bs}"),
        format!("--iodepth={iodepth}"),
    ];
    v.extend_from_slice(more);
    v
}

/// Waits (10 s at most) until block device `dev` (/dev/NAME) has completed `ios`
/// requests since it appeared: the load on it has really started.
pub fn wait_io(dev: &str, ios: u64) {
    traced(
        || format!("wait for {ios} IOs on {dev}"),
        || wait_io_untraced(dev, ios),
    )
}

fn wait_io_untraced(dev: &str, ios: u64) {
    let stat = format!("/sys/block/{}/stat", dev.trim_start_matches("/dev/"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&stat).unwrap_or_default();
        let f: Vec<u64> = text
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        // Fields 1 and 5: reads and writes completed.
        if f.len() > 4 && f[0] + f[4] >= ios {
            return;
        }
        assert!(Instant::now() < deadline, "no IO reached {dev}: {text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The kernel stacks and states of process `pid`'s threads and of its children's: where
/// a hung process waits.
pub fn kernel_stacks(pid: u32) -> String {
    let mut pids = vec![pid];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            pids.extend(
                entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok()),
            );
        }
    }
    let mut out = String::new();
    for p in pids {
        for task in std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let dir = task.path();
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
            let state = read("status")
                .lines()
                .find(|l| l.starts_with("State:"))
                .unwrap_or("")
                .to_string();
            out += &format!(
                "{} {} {state}\n{}",
                dir.display(),
                read("comm").trim(),
                read("stack")
            );
        }
    }
    out
}

/// A write-then-verify fio job on `dev`: `size` bytes in `bs` blocks (or a range of
/// sizes, "128k-512k"), crc32c.
pub fn verify_job(dev: &str, rw: &str, bs: &str, size: &str, iodepth: u32) -> Vec<String> {
    let verify = [
        format!("--size={size}"),
        "--verify=crc32c".into(),
        "--do_verify=1".into(),
        "--verify_fatal=1".into(),
        "--verify_state_save=0".into(),
    ];
    job(dev, rw, bs, iodepth, &verify)
}

/// Load for stress tests: `jobs` fio jobs of random reads and writes of mixed sizes
/// (4 KiB to 256 KiB) at queue depth 64 each, for at most `seconds`; no verification.
pub fn load_job(dev: &str, jobs: u32, seconds: u32) -> Vec<String> {
    let timed = [
        "--time_based".into(),
        format!("--runtime={seconds}"),
        format!("--numjobs={jobs}"),
        "--size=64M".into(),
        // Never a regular file in /dev if the device is already gone.
        "--allow_file_create=0".into(),
    ];
    job(dev, "randrw", "4k-256k", 64, &timed)
}

/// A write-then-verify job with `jobs` fio jobs, each on its own `size` region of the
/// device (job n starts at n x size).
pub fn parallel_verify_job(dev: &str, jobs: u32, size: &str, iodepth: u32) -> Vec<String> {
    let mut v = verify_job(dev, "randwrite", "4k", size, iodepth);
    v.push(format!("--numjobs={jobs}"));
    v.push(format!("--offset_increment={size}"));
    v
}

/// Standard fio options for a short random-IO run against `dev`.
pub fn fio_job(dev: &str, rw: &str, bs: &str, iodepth: u32, seconds: u32) -> Vec<String> {
    let timed = [
        "--time_based".into(),
        format!("--runtime={seconds}"),
        "--numjobs=1".into(),
    ];
    job(dev, rw, bs, iodepth, &timed)
}

/// What of a process can leak across devices: its resident memory (KiB), its open
/// descriptors, its threads.
pub fn footprint(pid: i32) -> (u64, usize, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (field("VmRSS:"), fds, field("Threads:") as usize)
}

/// Writes `data` at offset 0 of `dev`, O_DIRECT, and syncs.
pub fn write_direct(dev: &str, data: &[u8]) {
    let mut f = open_direct(dev, true);
    f.write_all(AlignedBuf::new(data).as_slice())
        .unwrap_or_else(|e| panic!("{dev}: write: {e}"));
    f.sync_all().unwrap_or_else(|e| panic!("{dev}: fsync: {e}"));
}

/// Reads the first `len` bytes of `dev`, O_DIRECT.
pub fn read_direct(dev: &str, len: usize) -> Vec<u8> {
    let mut f = open_direct(dev, false);
    let mut buf = AlignedBuf::zeroed(len);
    f.read_exact(buf.as_mut_slice())
        .unwrap_or_else(|e| panic!("{dev}: read: {e}"));
    buf.as_slice().to_vec()
}

/// No queue of the daemons that wrote `d`'s log waited out the cancellation of its
/// target's requests when it ended (daemon/src/queue/setup.rs, `Queue::close`).
pub fn assert_no_queue_outlived_its_cancel(d: &Daemon) {
    let log = d.log_text();
    assert!(!log.contains("after cancelling them"), "{log}");
}

/// Runs `cycle(i)` (add a device, use it, delete it) `warm_up` times, then two rounds
/// of `cycles` more, and checks that no queue waited out the cancellation of its
/// target's requests, that the daemon's descriptors and threads stay where the warm-up
/// left them, and that its resident memory grew by less than 1 MiB in at least one of
/// the two rounds.
///
/// A leak grows the daemon in every round, by the same amount; the allocator's caching
/// (a thread that happens to pick up a new arena, a free list that grew) shows as a
/// step in one round. So the check fails on any leak of more than 1 MiB per `cycles`
/// cycles and does not fail on one such step.
///
/// Each measurement waits 300 ms first: the drain watchdog of a deleted nbd device (a
/// thread with two eventfds) ends within 50 ms of its `del`.
pub fn assert_cycles_leak_nothing(
    d: &Daemon,
    warm_up: usize,
    cycles: usize,
    cycle: impl Fn(usize),
) {
    let settled = || {
        std::thread::sleep(Duration::from_millis(300));
        footprint(d.pid())
    };
    (0..warm_up).for_each(&cycle);
    let before = settled();
    (warm_up..warm_up + cycles).for_each(&cycle);
    let middle = settled();
    (warm_up + cycles..warm_up + 2 * cycles).for_each(&cycle);
    let after = settled();
    eprintln!(
        "footprint (RSS KiB, fds, threads): after the warm-up {before:?}, \
         after round 1 {middle:?}, after round 2 {after:?}"
    );
    assert_no_queue_outlived_its_cancel(d);
    for (what, (_, fds, threads)) in [("round 1", middle), ("round 2", after)] {
        assert_eq!(
            fds, before.1,
            "open descriptors after {what}: {before:?} -> {middle:?} -> {after:?}"
        );
        assert_eq!(
            threads, before.2,
            "threads after {what}: {before:?} -> {middle:?} -> {after:?}"
        );
    }
    let growth = |from: (u64, usize, usize), to: (u64, usize, usize)| to.0.saturating_sub(from.0);
    assert!(
        growth(before, middle).min(growth(middle, after)) < 1024,
        "resident memory grew in both rounds: {before:?} -> {middle:?} -> {after:?}"
    );
}

/// FNV-1a of the first `len` bytes of `path`: compares two reads of a device.
pub fn checksum(path: &str, len: usize) -> u64 {
    let mut f = std::fs::File::open(path).expect("open for checksum");
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).expect("read for checksum");
    buf.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// Waits until `path` no longer exists (device nodes go away with the disk).
pub fn wait_gone(path: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Path::new(path).exists() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// How many CPUs the kernel may ever bring up (its per-device queue limit).
pub fn possible_cpus() -> u32 {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").expect("possible CPUs");
    text.trim()
        .split(',')
        .map(|p| match p.split_once('-') {
            Some((a, b)) => b.parse::<u32>().unwrap() - a.parse::<u32>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

/// The CPUs a thread may run on, from /proc (`Cpus_allowed_list`); None when the thread
/// is gone.
pub fn thread_cpus(tid: i64) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|c| c.trim().to_string())
}

/// Fills `len` bytes from a seeded xorshift generator: reproducible test data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `dev` opened with O_DIRECT, for reading, and for writing too with `write`.
pub fn open_direct(dev: &str, write: bool) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap_or_else(|e| panic!("{dev}: {e}"))
}

/// A buffer of `len` bytes aligned for O_DIRECT (4096), filled with `data`.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(data: &[u8]) -> Self {
        let mut raw = vec![0u8; data.len() + 4096];
        let start = raw.as_ptr().align_offset(4096);
        raw[start..start + data.len()].copy_from_slice(data);
        AlignedBuf {
            raw,
            start,
            len: data.len(),
        }
    }

    pub fn zeroed(len: usize) -> Self {
        Self::new(&vec![0u8; len])
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// Runs a program by absolute path and checks that it succeeded; returns stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Bytes allocated to a file (st_blocks x 512).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// One sample of a Prometheus text exposition: metric, labels, value.
pub type PromSample = (String, Vec<(String, String)>, f64);

/// The samples of a Prometheus text exposition as (metric, labels, value), checking its
/// form on the way: every sample line is `name{k="v",...} value` with a `# TYPE` line
/// for its metric before it.
pub fn prometheus_samples(text: &str) -> Vec<PromSample> {
    let mut typed = std::collections::HashSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect(line);
            assert!(matches!(kind, "counter" | "gauge"), "{line}");
            assert!(typed.insert(name.to_string()), "{name} typed twice");
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (name, rest) = line
            .split_once('{')
            .unwrap_or_else(|| panic!("bad sample: {line}"));
        let (labels, value) = rest
            .rsplit_once("} ")
            .unwrap_or_else(|| panic!("bad sample: {line}"));
        assert!(typed.contains(name), "{name} has no TYPE line before it");
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name {name}"
        );
        let labels = labels
            .split(',')
            .map(|kv| {
                let (k, v) = kv
                    .split_once('=')
                    .unwrap_or_else(|| panic!("bad label in {line}"));
                let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
                (
                    k.to_string(),
                    v.unwrap_or_else(|| panic!("unquoted label in {line}"))
                        .to_string(),
                )
            })
            .collect();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        samples.push((name.to_string(), labels, value));
    }
    samples
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_ids() {
        assert_eq!(dev_id("/dev/ublkb12"), 12);
    }

    #[test]
    fn fio_job_options() {
        let j = fio_job("/dev/x", "randread", "4k", 32, 3);
        assert!(j.contains(&"--filename=/dev/x".to_string()));
        assert!(j.contains(&"--iodepth=32".to_string()));
    }
}
