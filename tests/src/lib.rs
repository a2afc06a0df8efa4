//! Helpers for the real-kernel tests: `ublkd` and `ublkctl` (daemon.rs), fio jobs and
//! their reports (fio.rs), step timing (trace.rs), NBD servers real and fake, TLS keys,
//! the Ceph cluster; here the rest: data patterns, O_DIRECT IO, the leak check. The
//! tests themselves are in `tests/tests/*.rs` (one binary per area) and run inside the
//! test VM (`tests/run-vm-tests.sh`).

#[cfg(feature = "rbd")]
pub mod ceph;
pub mod fake_nbd;
pub mod nbd_server;
pub mod pki;
pub mod remote_net;
pub mod tls_nbd;

mod daemon;
mod fio;
mod trace;

pub use daemon::*;
pub use fio::*;
pub use trace::traced;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

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

/// What the kernel says of device `dev`'s write cache: "write back" or "write through".
pub fn queue_write_cache(dev: &str) -> String {
    let name = dev.trim_start_matches("/dev/");
    std::fs::read_to_string(format!("/sys/block/{name}/queue/write_cache"))
        .unwrap_or_else(|e| panic!("{dev}: write_cache: {e}"))
        .trim()
        .to_string()
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
