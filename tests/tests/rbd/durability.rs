//! What was written survives: kill -9 during IO, librbd's write-back cache, a cache that
//! appears while ublkd is down, journaling, and quiesced snapshots.

use super::*;

/// kill -9 of ublkd during a fio verify job: the next ublkd recovers the device and the
/// job ends without an error.
#[test]
fn kill9_during_fio_verify_recovers() {
    let c = cluster();
    c.create_image("kill9", "64M");
    let name = "rbd-kill9";
    let d = Daemon::start(name);
    let dev = add_rbd(&d, "rbd/kill9", &["--queues", "2"]);
    let job = verify_job(&dev, "randwrite", "4k", "4M", 16);
    let run = FioChild::start(&job);
    wait_io(&dev, 200);
    let d = kill9_and_restart(d, name, dev_id(&dev));
    run.wait();
    d.del(&dev);
}

/// With librbd's write-back cache turned on per device (`--ceph-option rbd_cache=true`,
/// write-back from the first write, dirty data kept for up to 600 s), what the kernel
/// flushed is on the OSD: it survives kill -9 of ublkd, read back through the recovered
/// device. A FLUSH that completed without librbd's flush would leave the data in the
/// dead daemon's cache (checked: the test then fails).
#[test]
fn flushed_writes_survive_kill9_with_librbds_write_back_cache() {
    let c = cluster();
    c.create_image("wbcache", "8M");
    let name = "rbd-wbcache";
    let d = Daemon::start(name);
    let options =
        "rbd_cache=true, rbd_cache_writethrough_until_flush=false, rbd_cache_max_dirty_age=600";
    let mut args = Vec::new();
    for o in options.split(", ") {
        args.extend(["--ceph-option", o]);
    }
    let dev = add_rbd(&d, "rbd/wbcache", &args);
    let shows_options = |d: &Daemon| {
        let show = d.show_json(dev_id(&dev));
        let details = show["target_details"].as_array().unwrap();
        assert!(
            details
                .iter()
                .any(|kv| kv[0] == "ceph options" && kv[1] == options),
            "{show}"
        );
        assert!(
            !details
                .iter()
                .any(|kv| kv[0] == "librbd" && kv[1].as_str().unwrap().contains("rbd_cache")),
            "{show}"
        );
    };
    shows_options(&d);
    assert_eq!(queue_write_cache(&dev), "write back");
    let want = pattern(72, 2 << 20);
    let f = open_direct(&dev, true);
    f.write_all_at(AlignedBuf::new(&want).as_slice(), 0)
        .unwrap();
    f.sync_all().unwrap();
    drop(f);
    let d = kill9_and_restart(d, name, dev_id(&dev));
    shows_options(&d);
    assert!(
        read_direct(&dev, want.len()) == want,
        "flushed data lost with the daemon"
    );
    d.del(&dev);
}

/// With librbd's cache off (ublkd's default) a completed write is on the OSD, and the
/// device is write-through, as krbd's are: the kernel sends it no FLUSH. If the image
/// turns librbd's write-back cache on while no ublkd runs (`rbd config image set`, which
/// overrides the client's settings), the recovered device is still write-through, so
/// ublkd flushes every write before it completes: writes survive the next kill -9
/// although the kernel never flushed. (Checked: with the writes not flushed they stay
/// in the dead daemon's cache and the test fails.)
#[test]
fn write_through_unless_librbd_caches_and_a_cache_that_appears_is_flushed() {
    let c = cluster();
    c.create_image("wthrough", "8M");
    let name = "rbd-wthrough";
    let d = Daemon::start(name);
    let dev = add_rbd(&d, "rbd/wthrough", &[]);
    let id = dev_id(&dev);
    assert_eq!(queue_write_cache(&dev), "write through");
    let cache = d.detail(id, "write cache");
    assert!(
        cache.starts_with("none: a write completes once the OSDs have it"),
        "{cache}"
    );
    for (option, value) in [
        ("rbd_cache", "true"),
        ("rbd_cache_policy", "writeback"),
        ("rbd_cache_writethrough_until_flush", "false"),
        ("rbd_cache_max_dirty_age", "600"),
    ] {
        c.rbd(&["config", "image", "set", "rbd/wthrough", option, value]);
    }
    let d = kill9_and_restart(d, name, id);
    assert_eq!(queue_write_cache(&dev), "write through");
    let cache = d.detail(id, "write cache");
    assert!(cache.contains("every write is flushed"), "{cache}");
    assert!(cache.contains("rbd_cache=true"), "{cache}");
    let want = pattern(73, 2 << 20);
    let f = open_direct(&dev, true);
    f.write_all_at(AlignedBuf::new(&want).as_slice(), 0)
        .unwrap();
    drop(f);
    let d = kill9_and_restart(d, name, id);
    assert!(
        read_direct(&dev, want.len()) == want,
        "completed writes lost in librbd's cache with the daemon"
    );
    d.del(&dev);
}

/// The journaling feature adds no cache: librbd lets an object write go only once its
/// journal entry is safe, and completes it once the object write has, so a journaled
/// image's device is write-through too, and 2 MiB written with O_DIRECT and no flush
/// are there after kill -9 of ublkd. (The data part cannot tell ublkd's decision apart:
/// with librbd's write-back cache forced on, the same writes survived too; the sysfs
/// check is what fails when journaling counts as a cache.)
#[test]
fn a_journaled_image_is_write_through_and_keeps_unflushed_writes_across_kill9() {
    let c = cluster();
    let features = "layering,exclusive-lock,journaling";
    c.rbd(&[
        "create",
        "--size",
        "8M",
        "--image-feature",
        features,
        "rbd/journaled",
    ]);
    let name = "rbd-journaled";
    let d = Daemon::start(name);
    let dev = add_rbd(&d, "rbd/journaled", &[]);
    assert_eq!(queue_write_cache(&dev), "write through");
    let d = written_survives_kill9(d, name, &dev, pattern(77, 2 << 20));
    d.del(&dev);
}

/// `--quiesce`: a file written through the page cache just before `rbd snap create`
/// (never synced) is in the snapshot, whose ext4 is clean (it mounts read-only from the
/// read-only snapshot device, which needs no journal replay: without `--quiesce` that
/// mount fails, checked), and the file system takes writes again after the snapshot.
/// The device is restored after kill -9 before the snapshot, so the watch of a restored
/// device is what answers (a new device's is the same code after `add`); the file
/// system was frozen when ublkd was killed, as during a snapshot, and the restored
/// device thaws it.
#[test]
fn quiesce_freezes_the_file_system_for_a_consistent_snapshot() {
    let c = cluster();
    c.create_image("quiesce", "64M");
    let name = "rbd-quiesce";
    let d = Daemon::start(name);
    let dev = add_rbd(&d, "rbd/quiesce", &["--quiesce"]);
    let id = dev_id(&dev);
    run_ok(MKFS, &["-q", "-F", &dev]);
    let mnt = "/tmp/mnt-rbd-quiesce";
    let snap_mnt = "/tmp/mnt-rbd-quiesce-snap";
    std::fs::create_dir_all(mnt).unwrap();
    std::fs::create_dir_all(snap_mnt).unwrap();
    run_ok("/bin/mount", &["-t", "ext4", &dev, mnt]);
    // Writes `data` to `path` through the page cache, within 30 s. A file system left
    // frozen would hold the write forever, and the test process with it (and the VM
    // until its timeout): it is thawed before the test fails.
    let write_within = |path: String, data: Vec<u8>, sync: bool| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut f = File::create(&path).unwrap();
            f.write_all(&data).unwrap();
            if sync {
                f.sync_all().unwrap();
            }
            let _ = tx.send(());
        });
        if rx.recv_timeout(std::time::Duration::from_secs(30)).is_err() {
            let _ = ublkd_targets::fsfreeze::thaw(mnt);
            panic!("a write to the file system did not end within 30 s: it was left frozen");
        }
    };
    let synced = pattern(90, 1 << 20);
    write_within(format!("{mnt}/synced"), synced.clone(), true);
    // What a ublkd killed while a snapshot is taken leaves: the file system frozen (the
    // kernel keeps a freeze after its process is gone) and the marker that says so. The
    // restored device thaws it.
    ublkd_targets::fsfreeze::Frozen::freeze(&[mnt.to_string()])
        .unwrap()
        .abandon();
    let marker = d.state_dir.join(format!("quiesced/{id}"));
    std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
    std::fs::write(&marker, format!("{{\"frozen\":[\"{mnt}\"]}}")).unwrap();
    let d = kill9_and_restart(d, name, id);
    assert!(!marker.exists(), "the restored device left its marker");
    let how = d.detail(id, "quiesce");
    assert!(how.contains("freezes"), "{how}");
    let unsynced = pattern(91, 3 << 20);
    write_within(format!("{mnt}/unsynced"), unsynced.clone(), false);
    c.rbd(&["snap", "create", "rbd/quiesce@s1"]);
    write_within(format!("{mnt}/after"), pattern(92, 1 << 20), true);
    let sdev = add_rbd(&d, "rbd/quiesce@s1", &[]);
    run_ok(E2FSCK, &["-f", "-n", &sdev]);
    run_ok("/bin/mount", &["-t", "ext4", "-o", "ro", &sdev, snap_mnt]);
    let back = (
        std::fs::read(format!("{snap_mnt}/synced")),
        std::fs::read(format!("{snap_mnt}/unsynced")),
    );
    run_ok("/bin/umount", &[snap_mnt]);
    assert!(
        back.0.is_ok_and(|b| b == synced),
        "the snapshot lacks a synced file"
    );
    assert!(
        back.1.is_ok_and(|b| b == unsynced),
        "the snapshot lacks the file written just before it"
    );
    d.del(&sdev);
    // Counted for `ublkctl stats --prometheus`.
    let quiesced = d.prometheus_value("ublkd_rbd_snapshots_quiesced_total", id);
    assert_eq!(quiesced, Some(1.0));
    run_ok("/bin/umount", &[mnt]);
    run_ok(E2FSCK, &["-f", "-n", &dev]);
    d.del(&dev);
}
