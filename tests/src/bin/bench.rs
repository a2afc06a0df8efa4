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
//!        [--backing ext4|tmpfs] [--nbdkit-threads N] [--sync] [--ms-mode MODE]
//!
//! `--sync` adds two rows of writes that must be durable when they complete (a 4 KiB
//! write then an fsync of the device, one at a time; O_SYNC 4 KiB writes, QD8), as
//! databases and journals write: they measure what a device's FLUSH and FUA cost. Their
//! names hold "sync" (`--only sync` runs just them). Their first FLUSH switches librbd's
//! default cache (rbd-nbd's; ublkd turns it off) from write-through to write-around,
//! which completes writes before the OSD has them: the rbd benchmark's plain write
//! rows that follow in later rounds then measure rbd-nbd in that mode.
//! `--ms-mode crc|secure|prefer-crc|prefer-secure` (rbd) connects every client to the
//! cluster in that msgr2 mode: rbd-nbd (`--ms_client_mode`, `--ms_mon_client_mode`),
//! krbd (`ms_mode=`, through the monitors' msgr2 port) and each ublkd device that does
//! not name its own `--ms-mode`.
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
//! `--profile` for the server's pid); see `measure::hook_start` (bench/measure.rs).
//! scripts/bench.sh copies the hook (and perf) into the guest.
//!
//! The rest of the benchmark, by concern: bench/measure.rs (one fio run and its CPU
//! cost), bench/table.rs and bench/paired.rs (rounds, medians, ratios), bench/rublk.rs
//! (the peer daemon), bench/null_loop.rs, bench/nbd.rs and bench/rbd.rs (each suite's
//! devices).

#[cfg(feature = "rbd")]
#[path = "bench/rbd.rs"]
mod rbd;

#[path = "bench/measure.rs"]
mod measure;
#[path = "bench/nbd.rs"]
mod nbd;
#[path = "bench/null_loop.rs"]
mod null_loop;
#[path = "bench/paired.rs"]
mod paired;
#[path = "bench/rublk.rs"]
mod rublk;
#[path = "bench/table.rs"]
mod table;

use ublkd_tests::{run_ok, Daemon};

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
    /// Also print where the CPU time goes per IO (see [`measure::Cost`]).
    profile: bool,
    /// loop: where the backing file lives (see `null_loop::loop_backing_dir`).
    backing: Option<String>,
    /// nbd: nbdkit's `--threads` (its default when None).
    nbdkit_threads: Option<String>,
    /// Also the durable-write rows ([`SYNC_ROWS`]).
    sync: bool,
    /// rbd: every client's msgr2 mode (`--ms-mode`); None: Ceph's defaults.
    ms_mode: Option<String>,
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
    let mut args = vec![path.as_str()];
    args.extend_from_slice(params);
    run_ok("insmod", &args);
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
        ms_mode: text("--ms-mode"),
    };
    match args.first().map(String::as_str) {
        Some("null") => null_loop::bench_null(&s),
        Some("loop") => null_loop::bench_loop(&s),
        Some("nbd") => nbd::bench(&s),
        #[cfg(feature = "rbd")]
        Some("rbd") => rbd::bench(&s),
        _ => {
            eprintln!("usage: ublkd-bench null|loop|nbd|rbd [--runtime SECS] [--rounds N] [--only TEXT] [--export nbdkit|qemu] [--buffers MODE,...] [--ublkd \"ARGS;ARGS\"] [--connections N] [--rublk-multi-cpus] [--profile] [--backing ext4|tmpfs] [--nbdkit-threads N] [--sync] [--ms-mode MODE]");
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
