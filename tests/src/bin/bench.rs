//! ublkd-bench: runs inside the test VM (scripts/bench.sh) and prints ublkd against the
//! kernel's own drivers, measured side by side in one run. Not a test: it checks no
//! threshold, it reports.
//!
//! Usage: ublkd-bench null [--runtime SECS]

use std::path::Path;
use std::process::Command;
use ublkd_tests::{fio, Daemon};

struct Row {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
}

const ROWS: [Row; 3] = [
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
];

/// One measurement: IOPS and MB/s.
fn measure(dev: &str, row: &Row, runtime: u32) -> (f64, f64) {
    let run = fio(&[
        "--name=bench",
        &format!("--filename={dev}"),
        "--ioengine=io_uring",
        "--direct=1",
        &format!("--rw={}", row.rw),
        &format!("--bs={}", row.bs),
        &format!("--iodepth={}", row.iodepth),
        "--numjobs=1",
        "--time_based",
        &format!("--runtime={runtime}"),
        "--ramp_time=1",
    ]);
    let dir = if row.rw.contains("write") {
        "write"
    } else {
        "read"
    };
    (run.iops(0, dir), run.bw_bytes(0, dir) / 1e6)
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

fn bench_null(runtime: u32) {
    insmod("null_blk", &["nr_devices=1", "queue_mode=2", "irqmode=0"]);
    assert!(
        Path::new("/dev/nullb0").exists(),
        "null_blk did not create /dev/nullb0"
    );
    let d = Daemon::start("bench");
    let dev = d.add(&["null", "--size", "250G", "--queues", "1", "--depth", "128"]);
    let info = d.list_json();
    let buffer = info[0]["buffer"].as_str().unwrap_or("?").to_string();

    println!("ublkd null ({dev}, 1 queue, depth 128, {buffer} buffers) vs null_blk (/dev/nullb0, queue_mode=2 irqmode=0)");
    println!(
        "fio io_uring, direct, 1 job, {runtime} s per run (+1 s ramp), alternating devices per row"
    );
    println!();
    let header = [
        "workload",
        "null_blk IOPS",
        "null_blk MB/s",
        "ublkd IOPS",
        "ublkd MB/s",
    ];
    println!(
        "| {:<18} | {:>13} | {:>13} | {:>13} | {:>13} | {:>14} |",
        header[0], header[1], header[2], header[3], header[4], "ublkd/null_blk"
    );
    println!(
        "|{:-<20}|{:->14}:|{:->14}:|{:->14}:|{:->14}:|{:->15}:|",
        "", "", "", "", "", ""
    );
    for row in &ROWS {
        let (kio, kbw) = measure("/dev/nullb0", row, runtime);
        let (uio, ubw) = measure(&dev, row, runtime);
        let ratio = format!("{:.2}x", uio / kio);
        println!(
            "| {:<18} | {kio:>13.0} | {kbw:>13.1} | {uio:>13.0} | {ubw:>13.1} | {ratio:>14} |",
            row.name
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = args
        .iter()
        .position(|a| a == "--runtime")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    match args.first().map(String::as_str) {
        Some("null") => bench_null(runtime),
        _ => {
            eprintln!("usage: ublkd-bench null [--runtime SECS]");
            std::process::exit(2);
        }
    }
}
