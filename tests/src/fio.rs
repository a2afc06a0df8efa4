//! fio for the tests: the jobs they run (verify, load), runs in the foreground and the
//! background, and the checks of fio's JSON report.

use crate::traced;
use serde_json::Value;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// fio, called by absolute path (busybox's shell would prefer its own applets).
pub const FIO: &str = "/usr/bin/fio";

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
