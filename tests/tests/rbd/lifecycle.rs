//! The device's life with the cluster: an OSD that pauses or goes away, a resized
//! image, and add/del cycles that leak nothing.

use super::*;

/// An OSD that stops answering for a while during a fio verify job: requests wait and
/// complete once it answers again; no error.
#[test]
fn an_osd_pause_during_fio_is_invisible() {
    let c = cluster();
    c.create_image("pause", "64M");
    let d = Daemon::start("rbd-pause");
    let dev = add_rbd(&d, "rbd/pause", &["--queues", "2"]);
    let job = verify_job(&dev, "randwrite", "4k", "4M", 16);
    let run = FioChild::start(&job);
    wait_io(&dev, 200);
    c.pause_osd(true);
    std::thread::sleep(std::time::Duration::from_secs(5));
    c.pause_osd(false);
    run.wait();
    d.del(&dev);
}

/// Resumes the shared cluster's OSD when dropped, also when a test fails half-way, and
/// waits until it serves: the tests after it need the cluster.
struct ResumeOsd(&'static ceph::Cluster);

impl Drop for ResumeOsd {
    fn drop(&mut self) {
        self.0.resume_osd();
    }
}

/// With the OSD stopped, a FUA write (O_DSYNC) waits for it (as every write does with
/// librbd's cache off, ublkd's default; with it on, the FUA write's flush would).
/// `del --force` of the device returns within a bound set by the device's --osd-timeout
/// (the request fails with EIO once it passes, the queue drains, librbd closes the
/// image), the daemon serves another device meanwhile, the log names the failed request
/// and the OSD timeout, and once the OSD resumes the image maps again with its data.
#[test]
fn del_while_the_osd_is_unreachable() {
    use std::time::{Duration, Instant};
    let c = cluster();
    c.create_image("unreach", "8M");
    let d = Daemon::start("rbd-unreach");
    let dev = add_rbd(&d, "rbd/unreach", &["--osd-timeout", "3"]);
    let id = dev_id(&dev);
    assert_eq!(d.detail(id, "osd op timeout"), "3 s");
    let other = d.add(&["null", "--size", "16M"]);
    let before = pattern(61, 64 << 10);
    write_direct(&dev, &before);

    let _resume = ResumeOsd(c);
    c.pause_osd(true);
    let start = Instant::now();
    let writer = {
        let dev = dev.clone();
        std::thread::spawn(move || {
            let f = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
                .open(&dev)
                .unwrap();
            let r = f.write_all_at(AlignedBuf::new(&pattern(62, 64 << 10)).as_slice(), 1 << 20);
            (r, start.elapsed())
        })
    };
    let inflight = |show: &serde_json::Value| {
        show["queue_stats"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["inflight"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    while inflight(&d.show_json(id)) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the write never reached ublkd: {}",
            d.show_json(id)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let del_start = Instant::now();
    let (out, del_time) = std::thread::scope(|s| {
        let del = s.spawn(|| {
            let out = d.ctl(&["del", "--force", &id.to_string()]);
            (out, del_start.elapsed())
        });
        // The other device (null: it stores nothing) serves while the delete waits on
        // the cluster.
        write_direct(&other, &pattern(63, 1 << 20));
        read_direct(&other, 1 << 20);
        assert!(!del.is_finished(), "del did not wait for the stuck request");
        del.join().unwrap()
    });
    let (write, write_time) = writer.join().unwrap();
    eprintln!(
        "rbd del with the OSD stopped (--osd-timeout 3): del {del_time:?}, the write ended after {write_time:?} with {write:?}"
    );
    assert!(
        out.status.success(),
        "del failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    assert_eq!(
        write.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(libc::EIO)),
        "the stuck write did not fail with EIO"
    );
    assert!(
        del_time < Duration::from_secs(20),
        "del took {del_time:?}:\n{}",
        d.log_text()
    );
    assert!(
        !std::path::Path::new(&dev).exists(),
        "{dev} is still there after del"
    );
    assert_eq!(d.list_json().len(), 1, "{:?}", d.list_json());
    // The log says what failed and why: the request, and the OSD timeout behind it.
    let log = d.log_text();
    assert!(
        log.contains("no OSD answered within the OSD timeout"),
        "the log does not name the timeout:\n{log}"
    );
    assert!(
        log.contains("failed: Input/output error"),
        "the log does not name the failed request:\n{log}"
    );

    drop(_resume);
    let again = add_rbd(&d, "rbd/unreach", &["--read-only"]);
    assert!(
        read_direct(&again, 64 << 10) == before,
        "the image lost what was written before the OSD stopped"
    );
    d.del(&again);
    d.del(&other);
}

/// `rbd resize` alone resizes the device: ublkd watches the image and follows a grow
/// and a shrink (the shrink with a warning in the log) within a few seconds, with no
/// ublkctl command. `show` and `list` say the new size, and IO at the new end works.
/// (An rbd record keeps no size to check: the image's is the truth, read when the
/// device is restored or recovered.) `ublkctl resize` with another size than the
/// image's is refused with one line; without a size it changes nothing. An image
/// resized while ublkd is down (kill -9) does not stop recovery: the device comes back
/// at the kernel's size with its data and then follows the image.
#[test]
fn resize_follows_the_image() {
    let c = cluster();
    c.create_image("grow", "8M");
    let mut d = Daemon::start("rbd-grow");
    let dev = add_rbd(&d, "rbd/grow", &[]);
    let id = dev_id(&dev);
    let sectors = || {
        let s = std::fs::read_to_string(format!("/sys/block/{}/size", &dev[5..])).unwrap();
        s.trim().parse::<u64>().unwrap()
    };
    assert_eq!(sectors(), (8 << 20) >> 9);
    let e = d.ctl_err(&["resize", &id.to_string(), "12M"]);
    assert!(e.contains("rbd resize"), "{e}");
    // The image's header watch tells librbd, librbd tells ublkd's watch.
    let follow = |d: &Daemon, size: u64| {
        let start = std::time::Instant::now();
        while sectors() != size >> 9 {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "the device has {} sectors 10 s after rbd resize to {size} bytes:\n{}",
                sectors(),
                d.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(d.show_json(id)["size"].as_u64(), Some(size));
        assert_eq!(list_entry(d, id)["size"].as_u64(), Some(size));
    };
    c.rbd(&["resize", "--size", "16M", "rbd/grow"]);
    follow(&d, 16 << 20);
    assert!(
        d.log_text()
            .contains("resized from 8388608 to 16777216 bytes, following its rbd backend"),
        "{}",
        d.log_text()
    );
    // The new end: written and read back, O_DIRECT.
    let tail = pattern(77, 64 << 10);
    let end = (16 << 20) - tail.len() as u64;
    let f = open_direct(&dev, true);
    f.write_all_at(AlignedBuf::new(&tail).as_slice(), end)
        .unwrap();
    f.sync_all().unwrap();
    let mut back = AlignedBuf::zeroed(tail.len());
    f.read_exact_at(back.as_mut_slice(), end).unwrap();
    assert!(back.as_slice() == tail, "the new end read back differently");
    drop(f);
    // By hand it is a no-op now.
    let out = d.ctl_ok(&["resize", &id.to_string()]);
    assert_eq!(out.trim(), format!("{dev} {}", 16 << 20));

    c.rbd(&["resize", "--size", "12M", "--allow-shrink", "rbd/grow"]);
    follow(&d, 12 << 20);
    assert!(
        d.log_text()
            .contains("shrank from 16777216 to 12582912 bytes"),
        "{}",
        d.log_text()
    );
    fio(&verify_job(&dev, "write", "64k", "12M", 4));

    // Resized while no ublkd runs: recovered at 12M, then grown to 20M.
    let head = pattern(78, 1 << 20);
    write_direct(&dev, &head);
    d.kill9();
    c.rbd(&["resize", "--size", "20M", "rbd/grow"]);
    let d = Daemon::start_with("rbd-grow", &[]);
    wait_live(&d, id, "after the restart");
    follow(&d, 20 << 20);
    assert!(
        d.log_text()
            .contains("changed size while it was not served"),
        "{}",
        d.log_text()
    );
    assert!(
        read_direct(&dev, head.len()) == head,
        "data changed across the recovery"
    );
    fio(&verify_job(&dev, "write", "64k", "20M", 4));
    d.del(&dev);
}

/// Adding and deleting rbd devices (a cluster connection and its librados threads
/// each) leaves the daemon as it was: after 2 cycles of warm-up, two rounds of 4 more
/// over the four buffer modes and both command paths (each of the eight pairs at least
/// once after the warm-up; the zero-copy modes with their memfd staging) leave its
/// descriptors and threads
/// where they were, and its resident memory grows by less than 1 MiB in at least one
/// round (`assert_cycles_leak_nothing`).
///
/// The daemon runs with one malloc arena (MALLOC_ARENA_MAX=1). With glibc's default of
/// up to 8 per CPU, the free space at the top of each arena that librados's and the
/// queues' threads used stays resident up to glibc's dynamic trim threshold (twice the
/// largest block freed from mmap), which `malloc_trim` after a `del` does not return:
/// the daemon grew by 11 MiB over the first round and 2 MiB over the second (README,
/// rbd, "Memory"). With one arena, `malloc_trim` returns all free memory and a leak of
/// the daemon's own would show here (measured: -24 KiB and +548 KiB).
///
/// An earlier version checked one round of 8 cycles, with no trim after `del`, and
/// failed once in CI with 2.9 MiB more (not reproduced; most likely the main heap's top
/// under the same threshold, which the trim now returns, and one round's step is what
/// the second round tolerates).
#[test]
fn add_and_del_cycles_leak_nothing() {
    let c = cluster();
    c.create_image("cycles", "16M");
    let mut d = Daemon::spawn_with_env("rbd-cycles", &[], &[("MALLOC_ARENA_MAX", "1")]);
    d.wait_ready();
    let kinds = [
        ("auto-zc", "--no-batch"),
        ("copy", "--batch"),
        ("zc", "--no-batch"),
        ("fixed", "--batch"),
        ("copy", "--no-batch"),
        ("auto-zc", "--batch"),
        ("fixed", "--no-batch"),
        ("zc", "--batch"),
    ];
    let data = pattern(11, 1 << 20);
    let cycle = |i: usize| {
        let (mode, commands) = kinds[i % kinds.len()];
        let dev = add_rbd(
            &d,
            "rbd/cycles",
            &["--queues", "2", "--buffer", mode, commands],
        );
        write_direct(&dev, &data);
        assert!(
            read_direct(&dev, data.len()) == data,
            "cycle {i}: data differ"
        );
        d.del(&dev);
    };
    // Two warm-up cycles, then two rounds of four: the eight kinds once each after the
    // warm-up, two of them twice.
    assert_cycles_leak_nothing(&d, 2, 4, cycle);
}
