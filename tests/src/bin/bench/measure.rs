//! One fio run on one device: its IOPS and bandwidth and, with `--profile`, where the
//! CPU time went per IO (the serving process, its io-wq workers, fio, the guest's idle
//! share), with `UBLKD_BENCH_HOOK` started beside it.

use super::{Row, Settings};
use ublkd_tests::fio;

/// One measurement.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sample {
    pub(crate) iops: f64,
    pub(crate) mbps: f64,
    pub(crate) cost: Cost,
}

/// Where the CPU time of one run went, per IO (`--profile`): the server process of a
/// ublk device (every thread but its io-wq workers), its io-wq workers (`iou-wrk-*`,
/// IO that io_uring could not issue inline), and fio (user plus system time, which holds
/// the kernel's driver work for the kernel's own devices); and the share of the guest's
/// CPU time that was idle during the fio command (every CPU, from /proc/stat; fio's start
/// and ramp included, so it is a few percent even for a device that keeps the CPUs busy):
/// requests waiting with nothing to run show there, not in any process's time.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cost {
    pub(crate) server_us: f64,
    pub(crate) server_switches: f64,
    pub(crate) iowq_us: f64,
    pub(crate) fio_us: f64,
    pub(crate) fio_switches: f64,
    pub(crate) idle_pct: f64,
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
pub(crate) fn server_pid(dev: &str) -> Option<u32> {
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

pub(crate) fn measure(dev: &str, row: &Row, s: &Settings) -> Sample {
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
