//! null and loop: ublkd against the kernel's null_blk and loop drivers and rublk.

use super::rublk::{rublk_add, rublk_del};
use super::table::compare;
use super::{add_ublkd, insmod, Settings, LOOP_ROWS};
use std::process::Command;
use ublkd_tests::{run_ok, Daemon};

pub(crate) fn bench_null(s: &Settings) {
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

pub(crate) fn bench_loop(s: &Settings) {
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

    let kloop = run_ok(
        "/usr/sbin/losetup",
        &["--direct-io=on", "--show", "-f", file],
    )
    .trim()
    .to_string();
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
