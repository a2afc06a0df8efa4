//! ublkd-bench: runs inside the test VM (scripts/bench.sh) and prints ublkd against the
//! kernel's own drivers, measured side by side in one run. Not a test: it checks no
//! threshold, it reports.
//!
//! Every cell is measured in several rounds; within a round each workload runs on every
//! device in turn, so slow phases of the (emulated) machine hit all devices alike. The
//! table shows the median of the rounds and the spread (min-max) of IOPS.
//!
//! Usage: ublkd-bench null|loop|nbd [--runtime SECS] [--rounds N] [--only TEXT]
//!        [--export nbdkit|qemu] [--buffers MODE,...] [--connections N]
//!
//! `--only TEXT` keeps the workloads whose name contains TEXT (`4k`, `randwrite`, ...);
//! `--export` keeps one of the nbd exports; `--buffers copy,auto-zc` measures ublkd's nbd
//! target in those buffer modes (default: the daemon's default mode). `--connections N`
//! gives both nbd clients N connections (`nbd-client -C N`, `ublkctl add nbd --connections
//! N`, one per hardware queue on both) and splits each workload's queue depth over N fio
//! jobs, so that more than one queue and connection carries IO (the jobs are not pinned
//! to CPUs: pinning fio changes how the two clients compare, and users rarely pin); it
//! needs an export that advertises multi-conn.

use std::process::Command;
use ublkd_tests::{fio, Daemon};

struct Row {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
}

const LOOP_ROWS: [Row; 4] = [
    Row {
        name: "4k randread QD32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
    },
    Row {
        name: "4k randwrite QD32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
    },
    Row {
        name: "512k read QD8",
        rw: "read",
        bs: "512k",
        iodepth: 8,
    },
    Row {
        name: "512k write QD8",
        rw: "write",
        bs: "512k",
        iodepth: 8,
    },
];

struct Settings {
    runtime: u32,
    rounds: usize,
    /// Only workloads whose name contains this.
    only: Option<String>,
    /// nbd: only the export whose label starts with this.
    export: Option<String>,
    /// nbd: the buffer modes to measure (empty: the default mode only).
    buffers: Vec<String>,
    /// fio jobs per workload, sharing its queue depth (nbd: also the connections of
    /// each client).
    jobs: u32,
}

impl Settings {
    fn rows<'a>(&self, rows: &'a [Row]) -> Vec<&'a Row> {
        rows.iter()
            .filter(|r| {
                self.only
                    .as_ref()
                    .is_none_or(|o| r.name.contains(o.as_str()))
            })
            .collect()
    }
}

/// One measurement: IOPS and MB/s.
fn measure(dev: &str, row: &Row, s: &Settings) -> (f64, f64) {
    let jobs = s.jobs;
    let run = fio(&[
        "--name=bench",
        &format!("--filename={dev}"),
        "--ioengine=io_uring",
        "--direct=1",
        &format!("--rw={}", row.rw),
        &format!("--bs={}", row.bs),
        &format!("--iodepth={}", (row.iodepth / jobs).max(1)),
        &format!("--numjobs={jobs}"),
        "--group_reporting",
        "--time_based",
        &format!("--runtime={}", s.runtime),
        "--ramp_time=1",
    ]);
    let dir = if row.rw.contains("write") {
        "write"
    } else {
        "read"
    };
    (run.iops(0, dir), run.bw_bytes(0, dir) / 1e6)
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

/// Measures every row on every device (`(label, path)`, the first is the reference) and
/// prints the table.
fn compare(devices: &[(String, String)], rows: &[Row], s: &Settings) {
    let rows = s.rows(rows);
    // samples[row][dev] = [(iops, mbps)] over the rounds
    let mut samples = vec![vec![Vec::new(); devices.len()]; rows.len()];
    for round in 0..s.rounds {
        eprintln!("round {}/{}", round + 1, s.rounds);
        for (r, row) in rows.iter().enumerate() {
            for (d, (_, path)) in devices.iter().enumerate() {
                samples[r][d].push(measure(path, row, s));
            }
        }
    }
    println!(
        "| {:<18} | {:<14} | {:>9} | {:>15} | {:>9} | {:>8} |",
        "workload", "device", "IOPS", "IOPS min-max", "MB/s", "ratio"
    );
    println!(
        "|{:-<20}|{:-<16}|{:->10}:|{:->16}:|{:->10}:|{:->9}:|",
        "", "", "", "", "", ""
    );
    for (r, row) in rows.iter().enumerate() {
        let mut reference = 0.0;
        for (d, (label, _)) in devices.iter().enumerate() {
            let mut iops: Vec<f64> = samples[r][d].iter().map(|x| x.0).collect();
            let mut mbps: Vec<f64> = samples[r][d].iter().map(|x| x.1).collect();
            let (lo, hi) = (
                iops.iter().copied().fold(f64::INFINITY, f64::min),
                iops.iter().copied().fold(0.0, f64::max),
            );
            let (mi, mb) = (median(&mut iops), median(&mut mbps));
            if d == 0 {
                reference = mi;
            }
            let spread = format!("{lo:.0}-{hi:.0}");
            let ratio = format!("{:.2}x", mi / reference);
            println!(
                "| {:<18} | {label:<14} | {mi:>9.0} | {spread:>15} | {mb:>9.1} | {ratio:>8} |",
                row.name
            );
        }
    }
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
    let dev = d.add(&["null", "--size", "250G", "--queues", "1", "--depth", "128"]);
    let buffer = d.list_json()[0]["buffer"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    println!("ublkd null ({dev}: 1 queue, depth 128, {buffer} buffers) vs null_blk (/dev/nullb0: queue_mode=2 irqmode=0)");
    println!(
        "fio io_uring, direct, 1 job, {} s per run (+1 s ramp), {} rounds, median shown; ratio = ublkd / null_blk",
        s.runtime, s.rounds
    );
    println!();
    let devices = [
        ("null_blk".to_string(), "/dev/nullb0".to_string()),
        (format!("ublkd {buffer}"), dev),
    ];
    compare(&devices, &LOOP_ROWS[..3], s);
}

fn bench_loop(s: &Settings) {
    let file = "/tmp/bench-loop.img";
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

    let d = Daemon::start("bench-loop");
    let mut devices = vec![("kernel loop".to_string(), kloop.clone())];
    for mode in ["copy", "fixed", "zc", "auto-zc"] {
        let args = [
            "loop",
            "--file",
            file,
            "--buffer",
            mode,
            "--direct-io",
            "on",
            "--queues",
            "1",
            "--depth",
            "128",
        ];
        devices.push((format!("ublkd {mode}"), d.add(&args)));
    }
    println!(
        "kernel loop ({kloop}: --direct-io=on, dio={}) vs ublkd loop (1 queue, depth 128, O_DIRECT) in each buffer mode",
        dio.trim()
    );
    println!(
        "same 512 MiB backing file on tmpfs; fio io_uring, direct, 1 job, {} s per run (+1 s ramp), {} rounds, median shown; ratio = device / kernel loop",
        s.runtime, s.rounds
    );
    println!();
    compare(&devices, &LOOP_ROWS, s);
    d.ctl_ok(&["del", "--all"]);
    let _ = Command::new("/usr/sbin/losetup")
        .args(["-d", &kloop])
        .status();
}

/// Starts an NBD server in the background and waits until it accepts connections.
fn start_server(program: &str, args: &[&str], port: u16) -> std::process::Child {
    let child = Command::new(program)
        .args(args)
        .spawn()
        .expect("start NBD server");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{program} did not listen"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child
}

fn bench_nbd(s: &Settings) {
    let file = "/tmp/bench-nbd.img";
    let chunk = vec![0x5au8; 1 << 20];
    let mut f = std::fs::File::create(file).expect("create export file");
    for _ in 0..512 {
        std::io::Write::write_all(&mut f, &chunk).expect("fill export file");
    }
    drop(f);
    let mut servers = vec![
        start_server(
            "/usr/bin/nbdkit",
            &[
                "-f",
                "--exit-with-parent",
                "-i",
                "127.0.0.1",
                "-p",
                "10809",
                "memory",
                "size=512M",
            ],
            10809,
        ),
        start_server(
            "/usr/bin/qemu-nbd",
            &[
                "-f",
                "raw",
                "-x",
                "disk",
                "-t",
                "-e",
                "4",
                "--cache=none",
                "-b",
                "127.0.0.1",
                "-p",
                "10810",
                file,
            ],
            10810,
        ),
    ];
    let d = Daemon::start("bench-nbd");
    let exports = [
        ("nbdkit memory", 10809u16, ""),
        ("qemu-nbd file", 10810, "disk"),
    ];
    for (n, (label, port, export)) in exports.iter().enumerate() {
        if s.export
            .as_ref()
            .is_some_and(|e| !label.starts_with(e.as_str()))
        {
            continue;
        }
        let kdev = format!("/dev/nbd{n}");
        let conns = s.jobs.to_string();
        let uri = format!("nbd://127.0.0.1:{port}/{export}");
        if s.jobs > 1 {
            // More than one connection needs multi-conn: ask ublkd, which checks.
            let probe = d.ctl(&["add", "nbd", "--uri", &uri, "--connections", &conns]);
            if !probe.status.success() {
                println!(
                    "{label} export: skipped: {}",
                    String::from_utf8_lossy(&probe.stderr).trim()
                );
                println!();
                continue;
            }
            let path = String::from_utf8_lossy(&probe.stdout).trim().to_string();
            d.del(&path);
        }
        let out = Command::new("/usr/sbin/nbd-client")
            .args([
                "127.0.0.1",
                &port.to_string(),
                &kdev,
                "-N",
                export,
                "-b",
                "512",
                "-C",
                &conns,
            ])
            .output()
            .expect("run nbd-client");
        assert!(
            out.status.success(),
            "nbd-client: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut devices = vec![("kernel nbd".to_string(), kdev.clone())];
        let modes: Vec<Option<&str>> = if s.buffers.is_empty() {
            vec![None]
        } else {
            s.buffers.iter().map(|b| Some(b.as_str())).collect()
        };
        for mode in modes {
            let mut args = vec![
                "nbd",
                "--uri",
                &uri,
                "--depth",
                "128",
                "--connections",
                &conns,
            ];
            if let Some(m) = mode {
                args.extend(["--buffer", m]);
            }
            let udev = d.add(&args);
            let buffer = d.show_json(ublkd_tests::dev_id(&udev))["buffer"]
                .as_str()
                .unwrap_or("?")
                .to_string();
            devices.push((format!("ublkd {buffer}"), udev));
        }
        let modes: Vec<&str> = devices[1..].iter().map(|(l, _)| &l[6..]).collect();
        println!(
            "{label} export on 127.0.0.1:{port}: kernel nbd client ({kdev}, nbd-client -C {conns}) vs ublkd nbd ({conns} queue(s) and connection(s), depth 128, buffers: {})",
            modes.join(", ")
        );
        println!(
            "fio io_uring, direct, {} job(s) sharing the queue depth, {} s per run (+1 s ramp), {} rounds, median shown; ratio = device / kernel nbd",
            s.jobs, s.runtime, s.rounds
        );
        println!();
        compare(&devices, &LOOP_ROWS, s);
        println!();
        let _ = Command::new("/usr/sbin/nbd-client")
            .args(["-d", &kdev])
            .status();
        for (_, udev) in &devices[1..] {
            d.ctl_ok(&["del", &ublkd_tests::dev_id(udev).to_string()]);
        }
    }
    for srv in &mut servers {
        let _ = srv.kill();
        let _ = srv.wait();
    }
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
        buffers: text("--buffers")
            .map(|b| b.split(',').map(str::to_string).collect())
            .unwrap_or_default(),
        jobs: opt("--connections", 1).max(1) as u32,
    };
    match args.first().map(String::as_str) {
        Some("null") => bench_null(&s),
        Some("loop") => bench_loop(&s),
        Some("nbd") => bench_nbd(&s),
        _ => {
            eprintln!("usage: ublkd-bench null|loop|nbd [--runtime SECS] [--rounds N] [--only TEXT] [--export nbdkit|qemu] [--buffers MODE,...] [--connections N]");
            std::process::exit(2);
        }
    }
}
