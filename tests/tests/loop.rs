//! Real-kernel tests of the loop target in every buffer mode. They run inside the test
//! VM (tests/run-vm-tests.sh); without /dev/ublk-control they fail, never skip.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use ublkd_tests::*;

const MKFS: &str = "/usr/sbin/mkfs.ext4";
const E2FSCK: &str = "/usr/sbin/e2fsck";
const BLKDISCARD: &str = "/usr/sbin/blkdiscard";

fn require_ublk() {
    assert!(
        Path::new("/dev/ublk-control").exists(),
        "/dev/ublk-control is missing: these tests must run in the test VM (tests/run-vm-tests.sh)"
    );
}

/// A sparse backing file of `size` bytes under /tmp.
fn backing(name: &str, size: u64) -> PathBuf {
    let path = PathBuf::from(format!("/tmp/backing-{name}.img"));
    let _ = std::fs::remove_file(&path);
    File::create(&path).unwrap().set_len(size).unwrap();
    path
}

/// Adds a loop device on `file` in buffer mode `mode` and checks what `show` reports.
fn add_loop(d: &Daemon, file: &Path, mode: &str, extra: &[&str]) -> String {
    let f = file.to_str().unwrap();
    let mut args = vec!["loop", "--file", f, "--buffer", mode];
    args.extend_from_slice(extra);
    let dev = d.add(&args);
    let show = d.show_json(dev_id(&dev));
    assert_eq!(show["buffer"].as_str(), Some(mode), "{show}");
    assert_eq!(show["target"].as_str(), Some("loop"), "{show}");
    let details = show["target_details"].as_array().unwrap();
    assert!(
        details
            .iter()
            .any(|kv| kv[0] == "backing file" && kv[1] == f),
        "show does not name the backing file: {show}"
    );
    dev
}

/// fio writes 32 MiB with 4k random writes, then with 128k-512k sequential writes, and
/// reads everything back checking crc32c; the queues run the command path `commands`
/// ("batch" or "per-tag").
fn fio_verify(mode: &str, commands: &str) {
    require_ublk();
    let d = Daemon::start(&format!("loop-fio-{mode}-{commands}"));
    let file = backing(&format!("fio-{mode}-{commands}"), 320 << 20);
    let dev = add_loop(&d, &file, mode, &[commands_flag(commands)]);
    assert_commands(&d.show_json(dev_id(&dev)), commands);
    // 32 MiB each way: a 4k job of 8192 writes then reads at QD 32, in every buffer mode
    // and command path (8 runs), within the suite's time.
    let rand = verify_job(&dev, "randwrite", "4k", "32M", 32);
    let run = fio(&rand);
    assert!(
        run.total_ios() >= 2 * 8192,
        "wrote and verified 32 MiB in 4k: {}",
        run.total_ios()
    );
    let seq = verify_job(&dev, "write", "128k-512k", "32M", 8);
    fio(&seq);
    let show = d.show_json(dev_id(&dev));
    for q in show["queue_stats"].as_array().unwrap() {
        assert_eq!(q["errors"].as_u64(), Some(0), "{show}");
    }
    d.del(&dev);
    std::fs::remove_file(&file).unwrap();
}

/// Data written through the device, O_DIRECT and buffered + fsync, is exactly what the
/// backing file holds after `del`; what was not written keeps its old content.
fn content_matches_backing_file(mode: &str) {
    require_ublk();
    let d = Daemon::start(&format!("loop-sum-{mode}"));
    let size = 64usize << 20;
    let file = PathBuf::from(format!("/tmp/backing-sum-{mode}.img"));
    let mut expected = pattern(1, size);
    std::fs::write(&file, &expected).unwrap();
    let dev = add_loop(&d, &file, mode, &[]);

    // O_DIRECT: scattered 4k blocks and one 1 MiB run.
    let direct = open_direct(&dev, true);
    let mut writes: Vec<(usize, usize)> =
        (0..64).map(|i| ((i * 977 % 16000) * 4096, 4096)).collect();
    writes.push((40 << 20, 1 << 20));
    for (n, &(off, len)) in writes.iter().enumerate() {
        let data = pattern(100 + n as u64, len);
        direct
            .write_all_at(AlignedBuf::new(&data).as_slice(), off as u64)
            .unwrap();
        expected[off..off + len].copy_from_slice(&data);
    }
    drop(direct);
    // Buffered, then fsync (a FLUSH to the target).
    let mut buffered = OpenOptions::new().write(true).open(&dev).unwrap();
    let data = pattern(7, 3 << 20);
    buffered.seek(SeekFrom::Start(50 << 20)).unwrap();
    buffered.write_all(&data).unwrap();
    buffered.sync_all().unwrap();
    expected[50 << 20..(50 << 20) + data.len()].copy_from_slice(&data);
    drop(buffered);

    // Read back through the device with O_DIRECT before deleting it.
    let reader = open_direct(&dev, false);
    let mut back = AlignedBuf::zeroed(size);
    reader.read_exact_at(back.as_mut_slice(), 0).unwrap();
    drop(reader);
    assert!(
        back.as_slice() == expected.as_slice(),
        "device content differs from what was written"
    );

    d.del(&dev);
    let mut on_disk = Vec::new();
    File::open(&file)
        .unwrap()
        .read_to_end(&mut on_disk)
        .unwrap();
    assert_eq!(on_disk.len(), size);
    if let Some(i) = (0..size).find(|&i| on_disk[i] != expected[i]) {
        panic!("backing file differs from the data written through the device at byte {i}");
    }
    std::fs::remove_file(&file).unwrap();
}

/// ext4 on the device: files written, unmounted, mounted again, read back; fsck clean.
fn ext4(mode: &str) {
    require_ublk();
    let d = Daemon::start(&format!("loop-ext4-{mode}"));
    let file = backing(&format!("ext4-{mode}"), 256 << 20);
    let dev = add_loop(&d, &file, mode, &[]);
    run_ok(MKFS, &["-q", "-F", &dev]);
    let mnt = format!("/tmp/mnt-{mode}");
    std::fs::create_dir_all(&mnt).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| {
            (
                format!("{mnt}/file{i}"),
                pattern(1000 + i, (i as usize + 1) * 1_000_003),
            )
        })
        .collect();
    run_ok("/bin/mount", &["-t", "ext4", &dev, &mnt]);
    for (path, data) in &files {
        let mut f = File::create(path).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }
    run_ok("/bin/umount", &[&mnt]);
    run_ok("/bin/mount", &["-t", "ext4", &dev, &mnt]);
    for (path, data) in &files {
        assert!(
            std::fs::read(path).unwrap() == *data,
            "{path} read back differently"
        );
    }
    run_ok("/bin/umount", &[&mnt]);
    run_ok(E2FSCK, &["-f", "-n", &dev]);
    d.del(&dev);
    std::fs::remove_file(&file).unwrap();
}

/// `resize` of a loop device follows its backing file: after the file grew, or growing
/// it with --grow-file; data written past the old end reads back; it never shrinks.
#[test]
fn resize_follows_the_backing_file() {
    require_ublk();
    let d = Daemon::start("loop-resize");
    let file = backing("resize", 32 << 20);
    let dev = d.add(&["loop", "--file", file.to_str().unwrap(), "--name", "img"]);
    let id = dev_id(&dev);
    fio(&verify_job(&dev, "randwrite", "4k", "8M", 16));
    let before = checksum(&dev, 32 << 20);

    OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    d.ctl_ok(&["resize", "img"]);
    assert_eq!(d.show_json(id)["size"].as_u64(), Some(64 << 20));
    d.ctl_ok(&["resize", "img", "96M", "--grow-file"]);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 96 << 20);
    assert_eq!(d.show_json(id)["size"].as_u64(), Some(96 << 20));
    // The new space, from both resizes, serves IO; the old data is still there.
    let mut job = verify_job(&dev, "randwrite", "4k", "16M", 16);
    job.push("--offset=56M".into());
    fio(&job);
    assert_eq!(checksum(&dev, 32 << 20), before);

    let err = d.ctl_err(&["resize", "img", "64M"]);
    assert!(err.contains("does not shrink"), "{err}");
    let err = d.ctl_err(&["resize", "img", "128M"]);
    assert!(err.contains("--grow-file"), "{err}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 96 << 20);
    d.del(&dev);
    std::fs::remove_file(&file).unwrap();
}

/// `del` without `--force` refuses a device that is mounted or open, naming who holds
/// it, and deletes nothing of the request; the device keeps serving. Once let go, it
/// is deleted; `--force` deletes one that is open.
#[test]
fn del_refuses_a_device_in_use() {
    require_ublk();
    let d = Daemon::start("loop-safe-del");
    let file = backing("safe-del", 64 << 20);
    let dev = d.add(&["loop", "--file", file.to_str().unwrap(), "--name", "db"]);
    let other = d.add(&["null", "--size", "16M"]);
    let other_id = dev_id(&other).to_string();
    run_ok(MKFS, &["-q", "-F", &dev]);
    let mnt = "/tmp/mnt-safe-del";
    std::fs::create_dir_all(mnt).unwrap();
    run_ok("/bin/mount", &["-t", "ext4", &dev, mnt]);

    let err = d.ctl_err(&["del", &other_id, "db"]);
    assert!(err.contains(&format!("mounted on {mnt}")), "{err}");
    assert!(err.contains("'db'") && err.contains("--force"), "{err}");
    let err = d.ctl_err(&["del", "--all"]);
    assert!(err.contains(&format!("mounted on {mnt}")), "{err}");
    assert_eq!(d.list_json().len(), 2, "a refused del deleted something");
    std::fs::write(format!("{mnt}/after"), b"still served").unwrap();
    run_ok("/bin/sync", &[]);
    run_ok("/bin/umount", &[mnt]);

    // Open by a process (this one): refused, naming the process.
    let held = File::open(&dev).unwrap();
    let err = d.ctl_err(&["del", "db"]);
    assert!(
        err.contains(&format!("open by pid {}", std::process::id())),
        "{err}"
    );
    drop(held);
    run_ok(E2FSCK, &["-f", "-n", &dev]);
    d.ctl_ok(&["del", "db"]);
    assert!(wait_gone(&dev, std::time::Duration::from_secs(10)));

    // --force deletes an open device.
    let held = File::open(&other).unwrap();
    d.ctl_ok(&["del", "--force", &other_id]);
    assert!(wait_gone(&other, std::time::Duration::from_secs(10)));
    drop(held);
    assert!(d.list_json().is_empty());
    std::fs::remove_file(&file).unwrap();
}

/// blkdiscard frees the backing file's blocks and the range reads back as zeroes.
fn discard(mode: &str) {
    require_ublk();
    let d = Daemon::start(&format!("loop-discard-{mode}"));
    let file = backing(&format!("discard-{mode}"), 128 << 20);
    let dev = add_loop(&d, &file, mode, &[]);
    let sys = format!("/sys/block/ublkb{}/queue/discard_max_bytes", dev_id(&dev));
    assert_ne!(
        std::fs::read_to_string(&sys).unwrap().trim(),
        "0",
        "discard not advertised"
    );

    let len = 32usize << 20;
    let f = open_direct(&dev, true);
    f.write_all_at(AlignedBuf::new(&pattern(9, len)).as_slice(), 0)
        .unwrap();
    f.sync_all().unwrap();
    let before = allocated_bytes(&file);
    assert!(
        before >= len as u64,
        "backing file has only {before} bytes allocated after writing {len}"
    );

    run_ok(BLKDISCARD, &["-o", "0", "-l", &len.to_string(), &dev]);
    let after = allocated_bytes(&file);
    assert!(
        after + (len as u64) <= before + 4096,
        "discard freed too little: {before} -> {after}"
    );
    let mut back = AlignedBuf::zeroed(len);
    back.as_mut_slice().fill(0xff);
    f.read_exact_at(back.as_mut_slice(), 0).unwrap();
    assert!(
        back.as_slice().iter().all(|&b| b == 0),
        "discarded range does not read back as zeroes"
    );

    // Write-zeroes (blkdiscard -z) over written data reads back as zeroes too.
    f.write_all_at(AlignedBuf::new(&pattern(10, 1 << 20)).as_slice(), 0)
        .unwrap();
    run_ok(BLKDISCARD, &["-z", "-o", "0", "-l", "1048576", &dev]);
    let mut back = AlignedBuf::zeroed(1 << 20);
    f.read_exact_at(back.as_mut_slice(), 0).unwrap();
    assert!(
        back.as_slice().iter().all(|&b| b == 0),
        "write-zeroes range is not zero"
    );
    drop(f);
    let q = &d.show_json(dev_id(&dev))["queue_stats"][0];
    assert!(
        q["discards"].as_u64().unwrap() > 0 && q["write_zeroes"].as_u64().unwrap() > 0,
        "{q}"
    );
    assert_eq!(q["errors"].as_u64(), Some(0), "{q}");
    d.del(&dev);
    std::fs::remove_file(&file).unwrap();
}

macro_rules! mode_tests {
    ($($mode:ident => $name:literal),* $(,)?) => {$(
        mod $mode {
            #[test]
            fn fio_verify_batch() {
                super::fio_verify($name, "batch")
            }
            #[test]
            fn fio_verify_per_tag() {
                super::fio_verify($name, "per-tag")
            }
            #[test]
            fn content_matches_backing_file() {
                super::content_matches_backing_file($name)
            }
            #[test]
            fn ext4_and_fsck() {
                super::ext4($name)
            }
            #[test]
            fn discard() {
                super::discard($name)
            }
        }
    )*};
}

mode_tests!(copy => "copy", fixed => "fixed", zc => "zc", auto_zc => "auto-zc");

#[test]
fn default_buffer_mode_is_the_best_the_kernel_has() {
    require_ublk();
    let d = Daemon::start("loop-default");
    let features = d.ctl_ok(&["features"]);
    let expected = if features.contains("AUTO_BUF_REG") {
        "auto-zc"
    } else if features.contains("SUPPORT_ZERO_COPY") {
        "zc"
    } else {
        "fixed"
    };
    let file = backing("default", 64 << 20);
    let dev = d.add(&["loop", "--file", file.to_str().unwrap()]);
    assert_eq!(d.show_json(dev_id(&dev))["buffer"].as_str(), Some(expected));
    let null = d.add(&["null", "--size", "64M"]);
    assert_eq!(
        d.show_json(dev_id(&null))["buffer"].as_str(),
        Some(expected)
    );
    d.ctl_ok(&["del", "--all"]);
}

#[test]
fn bad_backing_files_get_clear_errors() {
    require_ublk();
    let d = Daemon::start("loop-bad");
    let dir = PathBuf::from("/tmp/loop-bad");
    std::fs::create_dir_all(&dir).unwrap();
    let odd = dir.join("odd.img");
    File::create(&odd).unwrap().set_len(6144).unwrap();
    let empty = dir.join("empty.img");
    File::create(&empty).unwrap();
    let odd_s = odd.to_str().unwrap();
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["add", "loop", "--file", "/tmp/loop-bad/nope.img"],
            "backing file /tmp/loop-bad/nope.img does not exist".into(),
        ),
        (
            vec!["add", "loop", "--file", "/tmp/loop-bad"],
            "/tmp/loop-bad is a directory".into(),
        ),
        (
            vec!["add", "loop", "--file", "/dev/null"],
            "not a regular file or block device".into(),
        ),
        (
            vec!["add", "loop", "--file", empty.to_str().unwrap()],
            "is empty".into(),
        ),
        (
            vec!["add", "loop", "--file", odd_s, "--block-size", "4096"],
            format!("the size of {odd_s} (6144 bytes) is not a multiple of the block size 4096"),
        ),
        (
            vec!["add", "loop", "--file", odd_s, "--direct-io", "sometimes"],
            "unknown direct-io setting 'sometimes'".into(),
        ),
        (vec!["add", "loop"], "--file".into()),
    ];
    for (args, expect) in &cases {
        let line = d.ctl_err(args);
        assert!(
            line.contains(expect.as_str()),
            "ublkctl {args:?}: expected {expect:?} in {line:?}"
        );
    }

    // A file the daemon cannot open for writing: on a read-only mount.
    let ro = dir.join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    run_ok(
        "/bin/mount",
        &["-t", "tmpfs", "tmpfs", ro.to_str().unwrap()],
    );
    let locked = ro.join("disk.img");
    File::create(&locked).unwrap().set_len(64 << 20).unwrap();
    std::fs::write(&locked, pattern(3, 64 << 20)).unwrap();
    run_ok("/bin/mount", &["-o", "remount,ro", ro.to_str().unwrap()]);
    let l = locked.to_str().unwrap();
    let line = d.ctl_err(&["add", "loop", "--file", l]);
    assert!(
        line.contains(&format!("cannot open {l} for writing")) && line.contains("--read-only"),
        "{line}"
    );
    // --read-only works, and the device refuses writes while reads see the data.
    let dev = d.add(&["loop", "--file", l, "--read-only"]);
    let id = dev_id(&dev);
    let ro_flag = std::fs::read_to_string(format!("/sys/block/ublkb{id}/ro")).unwrap();
    assert_eq!(ro_flag.trim(), "1", "device is not read-only");
    // The kernel may let the node be opened for writing; the write itself must fail.
    if let Ok(w) = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev)
    {
        let err = w.write_all_at(AlignedBuf::new(&[0u8; 4096]).as_slice(), 0);
        assert!(err.is_err(), "a write to a read-only device succeeded");
    }
    let mut head = vec![0u8; 1 << 20];
    File::open(&dev).unwrap().read_exact(&mut head).unwrap();
    assert!(
        head == pattern(3, 1 << 20),
        "read-only device reads wrong data"
    );
    d.del(&dev);
    run_ok("/bin/umount", &[ro.to_str().unwrap()]);

    // The daemon still serves after all that.
    let file = backing("after-bad", 64 << 20);
    let dev = add_loop(&d, &file, "copy", &[]);
    fio(&fio_job(&dev, "randrw", "4k", 16, 2));
    d.del(&dev);
}

#[test]
fn direct_io_setting_is_honoured() {
    require_ublk();
    let d = Daemon::start("loop-dio");
    let file = backing("dio", 64 << 20);
    let f = file.to_str().unwrap();
    for (setting, expect) in [("on", "on"), ("off", "off")] {
        let dev = d.add(&["loop", "--file", f, "--direct-io", setting]);
        let show = d.show_json(dev_id(&dev));
        let details = show["target_details"].as_array().unwrap();
        assert!(
            details
                .iter()
                .any(|kv| kv[0] == "direct io" && kv[1] == expect),
            "{show}"
        );
        fio(&fio_job(&dev, "randrw", "4k", 16, 2));
        d.del(&dev);
    }
}

/// A backing file on a full file system: every write past the space fails with ENOSPC
/// at the writer (nothing is acknowledged that was not written), and the daemon's log
/// names the error for the first few failures and then counts the rest, instead of a
/// line per request; the count and the lines add up to the queue's error counter.
#[test]
fn a_full_backing_file_system_fails_writes_with_enospc_and_a_bounded_log() {
    require_ublk();
    let mnt = "/tmp/loop-full-fs";
    std::fs::create_dir_all(mnt).unwrap();
    // Left mounted by an earlier run that failed.
    let _ = std::process::Command::new("/bin/umount").arg(mnt).output();
    run_ok(
        "/bin/mount",
        &["-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt],
    );
    let file = PathBuf::from(format!("{mnt}/backing.img"));
    File::create(&file).unwrap().set_len(64 << 20).unwrap();
    let d = Daemon::start("loop-full-fs");
    let dev = add_loop(&d, &file, "auto-zc", &["--direct-io", "off"]);
    let out = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev)
        .unwrap();
    let buf = AlignedBuf::new(&[0x5a; 4096]);
    // 1 MiB of tmpfs holds at most 256 blocks of 4 KiB; 400 writes to distinct blocks
    // run past it.
    let (mut written, mut failed) = (0u64, 0u64);
    for block in 0..400u64 {
        match out.write_at(buf.as_slice(), block * 4096) {
            Ok(n) => {
                assert_eq!(n, 4096);
                written += 1;
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "block {block}: {e}");
                failed += 1;
            }
        }
    }
    assert!(
        written > 0 && failed >= 144,
        "{written} written, {failed} failed"
    );
    drop(out);
    let show = d.show_json(dev_id(&dev));
    let errors: u64 = show["queue_stats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["errors"].as_u64().unwrap())
        .sum();
    assert_eq!(errors, failed, "{show}");
    // The end of the queue reports what it counted.
    d.del(&dev);
    let log = d.log_text();
    let one_by_one = log
        .lines()
        .filter(|l| l.contains("failed: No space left on device"))
        .count() as u64;
    let counted: u64 = log
        .lines()
        .filter_map(|l| {
            let (head, _) = l.split_once(" more requests failed in ")?;
            head.rsplit(' ').next()?.parse::<u64>().ok()
        })
        .sum();
    assert!(
        (1..=10).contains(&one_by_one),
        "{one_by_one} failures logged one by one (5 per 10 s per queue):\n{log}"
    );
    assert_eq!(one_by_one + counted, failed, "logged and counted:\n{log}");
    std::fs::remove_file(&file).unwrap();
    run_ok("/bin/umount", &[mnt]);
}
