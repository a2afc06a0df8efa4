//! ublkd-bench: runs inside the test VM (scripts/bench.sh) and prints ublkd against the
//! kernel's own drivers and, for null and loop, against rublk (its `-z` mode), measured
//! side by side in one run. Not a test: it checks no threshold, it reports.
//!
//! All devices are created first. Every cell is measured in several rounds; within a
//! round each workload runs on every device in turn, the order rotating by one device
//! each round, so slow phases of the (emulated) machine hit all devices alike. The table
//! shows the median of the rounds, the spread (min-max) of IOPS, and the ratio of the
//! medians to the kernel's device and (null, loop) to rublk -z; a second table pairs each
//! round's IOPS with the reference's in the same round (`bench/paired.rs`).
//!
//! Usage: ublkd-bench null|loop|nbd|rbd [--runtime SECS] [--rounds N] [--only TEXT]
//!        [--export nbdkit|nbdkit-tcp|nbdkit-unix|nbdkit-tls|qemu] [--buffers MODE,...]
//!        [--ublkd "ARGS;ARGS"] [--connections N] [--rublk-multi-cpus] [--profile]
//!        [--backing ext4|tmpfs] [--nbdkit-threads N] [--sync]
//!
//! `--sync` adds two rows of writes that must be durable when they complete (a 4 KiB
//! write then an fsync of the device, one at a time; O_SYNC 4 KiB writes, QD8), as
//! databases and journals write: they measure what a device's FLUSH and FUA cost. Their
//! names hold "sync" (`--only sync` runs just them). Their first FLUSH switches librbd's
//! default cache (rbd-nbd's; ublkd turns it off) from write-through to write-around,
//! which completes writes before the OSD has them: the rbd benchmark's plain write
//! rows that follow in later rounds then measure rbd-nbd in that mode.
//! `--only TEXT` keeps the workloads whose name contains TEXT (`4k`, `randwrite`, ...);
//! `--export` keeps the nbd exports whose key starts with it (`nbdkit-tcp`, `nbdkit-unix`,
//! `qemu-tcp`; `nbdkit` keeps both nbdkit ones); `--export nbdkit-tls` (only when named)
//! serves nbdkit memory over TCP with TLS optional (`--tls=on`, certificates made by
//! rcgen): the kernel client and one ublkd device per variant connect in plaintext,
//! and one more ublkd device per variant over TLS (kernel TLS after a rustls handshake),
//! beside the kernel client over TLS
//! (`nbd-client -enable-tls`, which relays through GnuTLS in userspace), side by side.
//! `--buffers copy,auto-zc` measures a ublkd
//! device in each of those buffer modes, and `--ublkd "ARGS;ARGS"` one device per
//! `;`-separated set of extra `ublkctl add` arguments (`--ublkd ";--no-batch"`: the
//! defaults beside `--no-batch`); neither given: one device with the daemon's defaults.
//! rublk (`/usr/local/bin/rublk`, copied in by scripts/bench.sh) pins each queue thread
//! to one CPU by default; `--rublk-multi-cpus` adds a second rublk device created with
//! `--multi-cpus-affinity` (queue threads on all CPUs of the queue's mask, like ublkd). `--connections N`
//! gives both nbd clients N connections (`nbd-client -C N`, `ublkctl add nbd --connections
//! N`, one per hardware queue on both) and splits each workload's queue depth over N fio
//! jobs, so that more than one queue and connection carries IO (the jobs are not pinned
//! to CPUs: pinning fio changes how the two clients compare, and users rarely pin); it
//! needs an export that advertises multi-conn; for rbd it only splits each workload over
//! N fio jobs, so that a ublkd device with `--queues N` gets IO on more than one queue. `--profile` adds a table of CPU time and
//! context switches per IO: the ublk server's (from /proc of the process holding
//! /dev/ublkcN; rbd-nbd's for the rbd benchmark's nbd device), its io-wq workers' and fio's. `--backing tmpfs` puts the loop backing
//! file on tmpfs instead of ext4 on a memory-backed null_blk device. `--nbdkit-threads N`
//! runs the nbdkit exports with `--threads=N` (nbdkit's default is 16 per connection):
//! the same server for both clients, and on two CPUs it decides how they compare (the
//! README's nbd section).
//!
//! `UBLKD_BENCH_HOOK=COMMAND` (environment) runs COMMAND with `sh -c` beside every fio
//! run, e.g. a profiler (`scripts/prof/nbd-hook.sh`, `scripts/prof/rbd-hook.sh`, with
//! `--profile` for the server's pid); see `hook_start`. scripts/bench.sh copies the hook
//! (and perf) into the guest.

#[cfg(feature = "rbd")]
#[path = "bench/rbd.rs"]
mod rbd;

#[path = "bench/paired.rs"]
mod paired;

use std::process::Command;
use ublkd_tests::nbd_server::{Listen, Server};
use ublkd_tests::{fio, run_ok, thread_cpus, Daemon};

struct Row {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
    /// More fio arguments (the durable-write rows' fsync or O_SYNC).
    fio: &'static [&'static str],
}

const LOOP_ROWS: [Row; 4] = [
    Row {
        name: "4k randread QD32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
        fio: &[],
    },
    Row {
        name: "4k randwrite QD32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        fio: &[],
    },
    Row {
        name: "512k read QD8",
        rw: "read",
        bs: "512k",
        iodepth: 8,
        fio: &[],
    },
    Row {
        name: "512k write QD8",
        rw: "write",
        bs: "512k",
        iodepth: 8,
        fio: &[],
    },
];

/// `--sync`: writes that must be durable when they complete, as databases and journals
/// make them: a write then an fsync of the device (a FLUSH request where the device
/// has a volatile write cache), one at a time; and O_SYNC writes (FUA writes, or a
/// write and a FLUSH where the device has no FUA).
const SYNC_ROWS: [Row; 2] = [
    Row {
        name: "4k sync randwrite+fsync QD1",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        fio: &["--fsync=1"],
    },
    Row {
        name: "4k sync O_SYNC randwrite QD8",
        rw: "randwrite",
        bs: "4k",
        iodepth: 8,
        fio: &["--sync=1"],
    },
];

struct Settings {
    runtime: u32,
    rounds: usize,
    /// Only workloads whose name contains this.
    only: Option<String>,
    /// nbd: only the exports whose key starts with this.
    export: Option<String>,
    /// The ublkd devices to measure, each as extra `ublkctl add` arguments: one per
    /// `--buffers` mode and one per `--ublkd` variant (none given: the defaults).
    variants: Vec<Vec<String>>,
    /// fio jobs per workload, sharing its queue depth (nbd: also the connections of
    /// each client).
    jobs: u32,
    /// null, loop: also measure rublk with `--multi-cpus-affinity`.
    rublk_multi: bool,
    /// Also print where the CPU time goes per IO (see [`Cost`]).
    profile: bool,
    /// loop: where the backing file lives (see [`loop_backing_dir`]).
    backing: Option<String>,
    /// nbd: nbdkit's `--threads` (its default when None).
    nbdkit_threads: Option<String>,
    /// Also the durable-write rows ([`SYNC_ROWS`]).
    sync: bool,
}

impl Settings {
    fn rows<'a>(&self, rows: &'a [Row]) -> Vec<&'a Row> {
        let sync: &[Row] = if self.sync { &SYNC_ROWS } else { &[] };
        rows.iter()
            .chain(sync)
            .filter(|r| {
                self.only
                    .as_ref()
                    .is_none_or(|o| r.name.contains(o.as_str()))
            })
            .collect()
    }
}

/// One measurement.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    iops: f64,
    mbps: f64,
    cost: Cost,
}

/// Where the CPU time of one run went, per IO (`--profile`): the server process of a
/// ublk device (every thread but its io-wq workers), its io-wq workers (`iou-wrk-*`,
/// IO that io_uring could not issue inline), and fio (user plus system time, which holds
/// the kernel's driver work for the kernel's own devices); and the share of the guest's
/// CPU time that was idle during the fio command (every CPU, from /proc/stat; fio's start
/// and ramp included, so it is a few percent even for a device that keeps the CPUs busy):
/// requests waiting with nothing to run show there, not in any process's time.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    server_us: f64,
    server_switches: f64,
    iowq_us: f64,
    fio_us: f64,
    fio_switches: f64,
    idle_pct: f64,
}

/// The guest's CPU time so far, in clock ticks: (busy, idle), idle counting iowait.
fn guest_cpu() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0);
    let idle = at(3) + at(4);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    (busy, idle)
}

/// CPU nanoseconds and context switches of a process's threads so far: (the threads
/// other than io-wq workers, the io-wq workers).
fn process_cpu(pid: u32) -> ((u64, u64), (u64, u64)) {
    let mut own = (0, 0);
    let mut iowq = (0, 0);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (own, iowq);
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let ns: u64 = read("schedstat")
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let switches: u64 = read("status")
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        let sum = if read("comm").starts_with("iou-wrk") {
            &mut iowq
        } else {
            &mut own
        };
        sum.0 += ns;
        sum.1 += switches;
    }
    (own, iowq)
}

/// The process serving ublk device `dev` (`/dev/ublkbN`): the one holding `/dev/ublkcN`;
/// for an nbd device (`/dev/nbdN`), rbd-nbd if one runs (the rbd benchmark maps one), so
/// librbd's cost is measured on both sides.
fn server_pid(dev: &str) -> Option<u32> {
    if dev.starts_with("/dev/nbd") {
        return std::fs::read_dir("/proc").ok()?.flatten().find_map(|p| {
            let pid: u32 = p.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(p.path().join("comm")).ok()?;
            (comm.trim() == "rbd-nbd").then_some(pid)
        });
    }
    let cdev = format!("/dev/ublkc{}", dev.strip_prefix("/dev/ublkb")?);
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|p| {
        let pid: u32 = p.file_name().to_str()?.parse().ok()?;
        let fds = std::fs::read_dir(p.path().join("fd")).ok()?;
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == cdev.as_str()))
            .then_some(pid)
    })
}

/// `UBLKD_BENCH_HOOK`: a shell command started beside every fio run (a profiler in the
/// guest), with the device in `BENCH_DEV`, the row in `BENCH_ROW` and the serving
/// process, if any, in `BENCH_PID`; waited for after fio.
fn hook_start(dev: &str, row: &Row, server: Option<u32>) -> Option<std::process::Child> {
    let cmd = std::env::var("UBLKD_BENCH_HOOK").ok()?;
    std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .env("BENCH_DEV", dev)
        .env("BENCH_ROW", format!("{} {}", row.bs, row.rw))
        .env(
            "BENCH_PID",
            server.map(|p| p.to_string()).unwrap_or_default(),
        )
        .spawn()
        .ok()
}

fn measure(dev: &str, row: &Row, s: &Settings) -> Sample {
    let jobs = s.jobs;
    let server = if s.profile { server_pid(dev) } else { None };
    let before = server.map(process_cpu);
    let guest_before = guest_cpu();
    let hook = hook_start(dev, row, server);
    let filename = format!("--filename={dev}");
    let rw = format!("--rw={}", row.rw);
    let bs = format!("--bs={}", row.bs);
    let iodepth = format!("--iodepth={}", (row.iodepth / jobs).max(1));
    let numjobs = format!("--numjobs={jobs}");
    let runtime = format!("--runtime={}", s.runtime);
    let mut args = vec![
        "--name=bench",
        &filename,
        "--ioengine=io_uring",
        "--direct=1",
        &rw,
        &bs,
        &iodepth,
        &numjobs,
        "--group_reporting",
        "--time_based",
        &runtime,
        "--ramp_time=1",
    ];
    args.extend(row.fio);
    let run = fio(&args);
    let dir = if row.rw.contains("write") {
        "write"
    } else {
        "read"
    };
    let guest_after = guest_cpu();
    if let Some(mut hook) = hook {
        let _ = hook.wait();
    }
    let iops = run.iops(0, dir);
    let mut cost = Cost::default();
    if s.profile && iops > 0.0 {
        // The server's counters also cover the ramp: count its IOs at the same rate.
        let ios = iops * f64::from(s.runtime + 1);
        if let (Some(pid), Some(((a, b), (c, _)))) = (server, before) {
            // io-wq workers come and go: a worker that exited took its time with it.
            let ((a2, b2), (c2, _)) = process_cpu(pid);
            cost.server_us = a2.saturating_sub(a) as f64 / 1e3 / ios;
            cost.server_switches = b2.saturating_sub(b) as f64 / ios;
            cost.iowq_us = c2.saturating_sub(c) as f64 / 1e3 / ios;
        }
        let job = &run.jobs()[0];
        let pct = job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0);
        let fio_ios = iops * f64::from(s.runtime);
        cost.fio_us = pct / 100.0 * f64::from(s.runtime) * f64::from(jobs) * 1e6 / fio_ios;
        cost.fio_switches = job["ctx"].as_f64().unwrap_or(0.0) / fio_ios;
        let busy = guest_after.0.saturating_sub(guest_before.0) as f64;
        let idle = guest_after.1.saturating_sub(guest_before.1) as f64;
        if busy + idle > 0.0 {
            cost.idle_pct = 100.0 * idle / (busy + idle);
        }
    }
    Sample {
        iops,
        mbps: run.bw_bytes(0, dir) / 1e6,
        cost,
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Measures every row on every device (`(label, path)`) and prints the table, with the
/// ratio of each device's median to that of every device in `refs` (`(index, column
/// name)`).
fn compare(devices: &[(String, String)], refs: &[(usize, &str)], rows: &[Row], s: &Settings) {
    let rows = s.rows(rows);
    let n = devices.len();
    // samples[row][dev] = one Sample per round
    let mut samples = vec![vec![Vec::new(); n]; rows.len()];
    for round in 0..s.rounds {
        eprintln!("round {}/{}", round + 1, s.rounds);
        for (r, row) in rows.iter().enumerate() {
            // Each round starts one device later, so no device always runs first.
            for i in 0..n {
                let d = (i + round) % n;
                let sample = measure(&devices[d].1, row, s);
                // Each round's result as it comes (stderr, beside the tables): the
                // spread of a cell is only its min and max, this shows every round.
                let cost = if s.profile {
                    let c = sample.cost;
                    format!(
                        ", server {:.1} us {:.2} cs, fio {:.1} us, idle {:.0}%",
                        c.server_us, c.server_switches, c.fio_us, c.idle_pct
                    )
                } else {
                    String::new()
                };
                eprintln!(
                    "  {:<18} {:<16} {:>9.0} IOPS{cost}",
                    row.name, devices[d].0, sample.iops
                );
                samples[r][d].push(sample);
            }
        }
    }
    let mut header = format!(
        "| {:<18} | {:<16} | {:>9} | {:>15} | {:>9} |",
        "workload", "device", "IOPS", "IOPS min-max", "MB/s"
    );
    let mut rule = format!(
        "|{:-<20}|{:-<18}|{:->10}:|{:->16}:|{:->10}:|",
        "", "", "", "", ""
    );
    for (_, name) in refs {
        header.push_str(&format!(" {name:>9} |"));
        rule.push_str(&format!("{:->10}:|", ""));
    }
    println!("{header}");
    println!("{rule}");
    for (r, row) in rows.iter().enumerate() {
        let medians: Vec<(f64, f64)> = samples[r]
            .iter()
            .map(|v| {
                let mut iops: Vec<f64> = v.iter().map(|x| x.iops).collect();
                let mut mbps: Vec<f64> = v.iter().map(|x| x.mbps).collect();
                (median(&mut iops), median(&mut mbps))
            })
            .collect();
        for (d, (label, _)) in devices.iter().enumerate() {
            let iops = samples[r][d].iter().map(|x| x.iops);
            let (lo, hi) = (
                iops.clone().fold(f64::INFINITY, f64::min),
                iops.fold(0.0, f64::max),
            );
            let (mi, mb) = medians[d];
            let spread = format!("{lo:.0}-{hi:.0}");
            let mut line = format!(
                "| {:<18} | {label:<16} | {mi:>9.0} | {spread:>15} | {mb:>9.1} |",
                row.name
            );
            for (i, _) in refs {
                line.push_str(&format!(" {:>9} |", format!("{:.2}x", mi / medians[*i].0)));
            }
            println!("{line}");
        }
    }
    if s.rounds > 1 {
        let labels: Vec<&str> = devices.iter().map(|(l, _)| l.as_str()).collect();
        let names: Vec<&str> = rows.iter().map(|r| r.name).collect();
        let iops: Vec<Vec<Vec<f64>>> = samples
            .iter()
            .map(|row| {
                row.iter()
                    .map(|v| v.iter().map(|x| x.iops).collect())
                    .collect()
            })
            .collect();
        paired::print(&labels, &names, &iops, refs);
    }
    let placed: Vec<String> = devices
        .iter()
        .filter_map(|(label, dev)| Some(format!("{label} {}", queue_cpus(dev)?)))
        .collect();
    if !placed.is_empty() {
        println!();
        println!("queue threads' CPUs: {}", placed.join("; "));
    }
    if s.profile {
        println!();
        print_costs(devices, &rows, &samples);
    }
}

/// The CPUs the queue threads of ublk device `dev` may run on (their Cpus_allowed_list,
/// one entry per queue): ublkd names its queue threads `ublk<dev>q<queue>`; for another
/// server (rublk) they are its threads pinned to a single CPU. The CPU a queue is pinned
/// to moves some rows by several percent in the VM, and rublk picks it at random, so the
/// tables say where each one ran. None for a kernel device or an unpinned peer.
fn queue_cpus(dev: &str) -> Option<String> {
    let id = dev.strip_prefix("/dev/ublkb")?;
    let pid = server_pid(dev)?;
    let prefix = format!("ublk{id}q");
    let (mut named, mut pinned) = (Vec::new(), Vec::new());
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let tid = t.file_name().to_str().and_then(|n| n.parse().ok());
        let Some(cpus) = tid.and_then(thread_cpus) else {
            continue;
        };
        if comm.trim().starts_with(&prefix) {
            named.push(cpus);
        } else if !cpus.contains([',', '-']) {
            pinned.push(cpus);
        }
    }
    let list = if named.is_empty() { pinned } else { named };
    (!list.is_empty()).then(|| format!("CPU {}", list.join(" ")))
}

/// The `--profile` table: medians over the rounds of each device's CPU time per IO.
fn print_costs(devices: &[(String, String)], rows: &[&Row], samples: &[Vec<Vec<Sample>>]) {
    println!(
        "| {:<18} | {:<16} | {:>10} | {:>10} | {:>10} | {:>10} | {:>10} | {:>10} |",
        "workload",
        "device",
        "server us",
        "server cs",
        "io-wq us",
        "fio us",
        "fio cs",
        "guest idle"
    );
    println!(
        "|{:-<20}|{:-<18}|{:->11}:|{:->11}:|{:->11}:|{:->11}:|{:->11}:|{:->11}:|",
        "", "", "", "", "", "", "", ""
    );
    for (r, row) in rows.iter().enumerate() {
        for (d, (label, _)) in devices.iter().enumerate() {
            let v = &samples[r][d];
            let med = |f: fn(&Cost) -> f64| {
                let mut x: Vec<f64> = v.iter().map(|s| f(&s.cost)).collect();
                median(&mut x)
            };
            println!(
                "| {:<18} | {label:<16} | {:>10.1} | {:>10.2} | {:>10.1} | {:>10.1} | {:>10.2} | {:>9.0}% |",
                row.name,
                med(|c| c.server_us),
                med(|c| c.server_switches),
                med(|c| c.iowq_us),
                med(|c| c.fio_us),
                med(|c| c.fio_switches),
                med(|c| c.idle_pct),
            );
        }
    }
    println!("per IO, medians: CPU microseconds of the ublk server's threads (not io-wq), its context switches, CPU microseconds of its io-wq workers (iou-wrk), and of fio (user + system), and fio's context switches; the share of the guest's CPU time that was idle during the fio command (every CPU, fio's start and ramp included)");
}

/// rublk, the peer daemon (`/usr/local/bin/rublk`): its devices get fixed ids from
/// `RUBLK_FIRST_ID` on, clear of the ids ublkd assigns (from 0) in these runs.
const RUBLK: &str = "/usr/local/bin/rublk";
const RUBLK_FIRST_ID: u32 = 10;

/// Creates rublk devices of `target` (`null`, or `loop` with `extra` = `-f FILE`):
/// 1 queue, depth 128, auto-buf-reg zero copy (`-z`, rublk's fastest mode), pinned (its
/// default), and with `--rublk-multi-cpus` also one unpinned. Returns `(label, path)`.
fn rublk_add(target: &str, extra: &[&str], s: &Settings) -> Vec<(String, String)> {
    let mut kinds = vec![("rublk -z", false)];
    if s.rublk_multi {
        kinds.push(("rublk -z multi", true));
    }
    let mut devices = Vec::new();
    for (n, (label, multi)) in kinds.into_iter().enumerate() {
        let id = (RUBLK_FIRST_ID + n as u32).to_string();
        let mut args = vec![
            "add", target, "-n", &id, "-q", "1", "-d", "128", "-z", "--quiet",
        ];
        if multi {
            args.push("--multi-cpus-affinity");
        }
        args.extend_from_slice(extra);
        let out = Command::new(RUBLK).args(&args).output().expect("run rublk");
        assert!(
            out.status.success(),
            "rublk {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let path = format!("/dev/ublkb{id}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !std::path::Path::new(&path).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "rublk {}: {path} did not appear",
                args.join(" ")
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        devices.push((label.to_string(), path));
    }
    devices
}

/// Deletes the rublk devices `rublk_add` made.
fn rublk_del(devices: &[(String, String)]) {
    for (_, path) in devices {
        if let Some(id) = path.strip_prefix("/dev/ublkb") {
            let _ = Command::new(RUBLK).args(["del", "-n", id]).status();
        }
    }
}

/// `--buffers a,b` and `--ublkd "ARGS;ARGS"` as lists of extra `ublkctl add` arguments;
/// one empty list (the daemon's defaults) when neither is given.
fn variants(buffers: Option<String>, ublkd: Option<String>) -> Vec<Vec<String>> {
    let mut v: Vec<Vec<String>> = buffers
        .iter()
        .flat_map(|b| b.split(','))
        .filter(|m| !m.is_empty())
        .map(|m| vec!["--buffer".to_string(), m.to_string()])
        .collect();
    v.extend(
        ublkd
            .iter()
            .flat_map(|u| u.split(';'))
            .map(|a| a.split_whitespace().map(str::to_string).collect()),
    );
    if v.is_empty() {
        v.push(Vec::new());
    }
    v
}

fn insmod(module: &str, params: &[&str]) {
    let path = format!("/lib/modules/{module}.ko");
    let out = Command::new("insmod")
        .arg(&path)
        .args(params)
        .output()
        .expect("run insmod");
    assert!(
        out.status.success(),
        "insmod {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn bench_null(s: &Settings) {
    insmod("null_blk", &["nr_devices=1", "queue_mode=2", "irqmode=0"]);
    let d = Daemon::start("bench");
    let rublk = rublk_add("null", &[], s);
    let mut devices = vec![("null_blk".to_string(), "/dev/nullb0".to_string())];
    devices.extend(rublk.iter().cloned());
    for extra in &s.variants {
        let args = vec!["null", "--size", "250G", "--queues", "1", "--depth", "128"];
        devices.push(add_ublkd(&d, args, extra));
    }
    let labels: Vec<&str> = devices[1 + rublk.len()..]
        .iter()
        .map(|(l, _)| &l[6..])
        .collect();
    println!("null_blk (/dev/nullb0: queue_mode=2 irqmode=0) vs rublk null (250 GiB, 1 queue, depth 128, -z; pinned to one CPU unless \"multi\") vs ublkd null (250 GiB, 1 queue, depth 128, buffers: {})", labels.join(", "));
    println!(
        "fio io_uring, direct, 1 job, {} s per run (+1 s ramp), {} rounds, order rotating, median shown; ratios = device / null_blk, device / rublk -z",
        s.runtime, s.rounds
    );
    println!();
    compare(
        &devices,
        &[(0, "vs kernel"), (1, "vs rublk")],
        &LOOP_ROWS[..3],
        s,
    );
    d.ctl_ok(&["del", "--all"]);
    rublk_del(&rublk);
}

/// Where the loop backing file lives: `ext4` (the default), a file system on a
/// memory-backed null_blk device, as a file on a fast disk would be; or `tmpfs`, which
/// cannot read or write without blocking (no FMODE_NOWAIT), so io_uring hands every
/// request of both ublk daemons to an io-wq worker thread.
fn loop_backing_dir(s: &Settings) -> &'static str {
    if s.backing.as_deref() == Some("tmpfs") {
        return "/tmp";
    }
    insmod("null_blk", &["nr_devices=0"]);
    let dev = "/sys/kernel/config/nullb/loopbench";
    std::fs::create_dir(dev).expect("create a null_blk device in configfs");
    for (attr, value) in [
        ("size", "1024"),
        ("memory_backed", "1"),
        ("blocksize", "512"),
        ("index", "7"),
        ("power", "1"),
    ] {
        std::fs::write(format!("{dev}/{attr}"), value)
            .unwrap_or_else(|e| panic!("null_blk {attr}={value}: {e}"));
    }
    // Newer kernels name a configfs null_blk device after its directory.
    let node = ["/dev/loopbench", "/dev/nullb7"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("the null_blk device for the loop backing file did not appear");
    run_ok("/usr/sbin/mkfs.ext4", &["-q", "-F", node]);
    std::fs::create_dir_all("/mnt/loopbench").expect("create /mnt/loopbench");
    run_ok("/bin/mount", &["-t", "ext4", node, "/mnt/loopbench"]);
    "/mnt/loopbench"
}

fn bench_loop(s: &Settings) {
    let dir = loop_backing_dir(s);
    let file = &format!("{dir}/bench-loop.img");
    // A fully written file, so reads hit data rather than holes.
    let chunk = vec![0x5au8; 1 << 20];
    let mut f = std::fs::File::create(file).expect("create backing file");
    for _ in 0..512 {
        std::io::Write::write_all(&mut f, &chunk).expect("fill backing file");
    }
    f.sync_all().expect("sync backing file");
    drop(f);

    let out = Command::new("/usr/sbin/losetup")
        .args(["--direct-io=on", "--show", "-f", file])
        .output()
        .expect("run losetup");
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kloop = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let name = kloop.trim_start_matches("/dev/");
    let dio = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).unwrap_or_default();

    let rublk = rublk_add("loop", &["-f", file], s);
    let d = Daemon::start("bench-loop");
    let mut devices = vec![("kernel loop".to_string(), kloop.clone())];
    devices.extend(rublk.iter().cloned());
    for extra in &s.variants {
        let args = vec![
            "loop",
            "--file",
            file,
            "--direct-io",
            "on",
            "--queues",
            "1",
            "--depth",
            "128",
        ];
        devices.push(add_ublkd(&d, args, extra));
    }
    let modes: Vec<&str> = devices[1 + rublk.len()..]
        .iter()
        .map(|(l, _)| &l[6..])
        .collect();
    println!(
        "kernel loop ({kloop}: --direct-io=on, dio={}) vs rublk loop (1 queue, depth 128, -z, direct IO; pinned to one CPU unless \"multi\") vs ublkd loop (1 queue, depth 128, O_DIRECT, buffers: {})",
        dio.trim(),
        modes.join(", ")
    );
    println!(
        "same 512 MiB backing file on {}; fio io_uring, direct, 1 job, {} s per run (+1 s ramp), {} rounds, order rotating, median shown; ratios = device / kernel loop, device / rublk -z",
        if dir == "/tmp" {
            "tmpfs"
        } else {
            "ext4 on a memory-backed null_blk"
        },
        s.runtime,
        s.rounds
    );
    println!();
    compare(
        &devices,
        &[(0, "vs kernel"), (1, "vs rublk")],
        &LOOP_ROWS,
        s,
    );
    d.ctl_ok(&["del", "--all"]);
    rublk_del(&rublk);
    let _ = Command::new("/usr/sbin/losetup")
        .args(["-d", &kloop])
        .status();
}

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

fn bench_nbd(s: &Settings) {
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
        let out = Command::new("/usr/sbin/nbd-client")
            .args(&client)
            .output()
            .expect("run nbd-client");
        assert!(
            out.status.success(),
            "nbd-client {}: {}{}",
            client.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let text = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let s = Settings {
        runtime: opt("--runtime", 4) as u32,
        rounds: opt("--rounds", 3).max(1),
        only: text("--only"),
        export: text("--export"),
        variants: variants(text("--buffers"), text("--ublkd")),
        jobs: opt("--connections", 1).max(1) as u32,
        rublk_multi: args.iter().any(|a| a == "--rublk-multi-cpus"),
        profile: args.iter().any(|a| a == "--profile"),
        backing: text("--backing"),
        nbdkit_threads: text("--nbdkit-threads"),
        sync: args.iter().any(|a| a == "--sync"),
    };
    match args.first().map(String::as_str) {
        Some("null") => bench_null(&s),
        Some("loop") => bench_loop(&s),
        Some("nbd") => bench_nbd(&s),
        #[cfg(feature = "rbd")]
        Some("rbd") => rbd::bench(&s),
        _ => {
            eprintln!("usage: ublkd-bench null|loop|nbd|rbd [--runtime SECS] [--rounds N] [--only TEXT] [--export nbdkit|qemu] [--buffers MODE,...] [--ublkd \"ARGS;ARGS\"] [--connections N] [--rublk-multi-cpus] [--profile] [--backing ext4|tmpfs] [--nbdkit-threads N] [--sync]");
            std::process::exit(2);
        }
    }
}

/// Adds a ublkd device with `args` plus the variant's `extra` arguments; its label names
/// the buffer mode the daemon chose and the variant's other arguments, and its path.
fn add_ublkd(d: &Daemon, args: Vec<&str>, extra: &[String]) -> (String, String) {
    let mut all = args;
    all.extend(extra.iter().map(String::as_str));
    let udev = d.add(&all);
    let buffer = d.show_json(ublkd_tests::dev_id(&udev))["buffer"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    let mut label = format!("ublkd {buffer}");
    let mut rest = extra.iter().peekable();
    while let Some(a) = rest.next() {
        if a == "--buffer" {
            rest.next();
        } else {
            label.push(' ');
            label.push_str(a);
        }
    }
    (label, udev)
}

#[cfg(test)]
mod tests {
    use super::variants;

    #[test]
    fn variants_come_from_buffers_and_ublkd_args() {
        assert_eq!(variants(None, None), vec![Vec::<String>::new()]);
        assert_eq!(
            variants(
                Some("copy,auto-zc".into()),
                Some(";--no-batch --depth 64".into())
            ),
            vec![
                vec!["--buffer".to_string(), "copy".into()],
                vec!["--buffer".into(), "auto-zc".into()],
                vec![],
                vec!["--no-batch".into(), "--depth".into(), "64".into()],
            ]
        );
    }
}
