//! Real-kernel tests of device records and user recovery: a daemon that crashes or hands
//! its devices over, stop and start, records that cannot be restored. They run inside
//! the test VM (tests/run-vm-tests.sh); without /dev/ublk-control they fail, never skip.
//! The same stories under systemd are in tests/systemd.rs.

use serde_json::Value;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use ublkd_tests::*;

fn require_ublk() {
    assert!(
        Path::new("/dev/ublk-control").exists(),
        "/dev/ublk-control is missing: these tests must run in the test VM (tests/run-vm-tests.sh)"
    );
}

/// A sparse backing file of `size` bytes under /tmp.
fn backing(name: &str, size: u64) -> PathBuf {
    let path = PathBuf::from(format!("/tmp/backing-rec-{name}.img"));
    let _ = std::fs::remove_file(&path);
    File::create(&path).unwrap().set_len(size).unwrap();
    path
}

fn record_path(test: &str, id: u64) -> PathBuf {
    PathBuf::from(format!("/tmp/ublkd-{test}/state/devices/{id}.json"))
}

fn entry(d: &Daemon, id: u64) -> Value {
    d.list_json()
        .into_iter()
        .find(|e| e["id"].as_u64() == Some(id))
        .unwrap_or_else(|| panic!("device {id} is not listed:\n{}", d.log_text()))
}

/// fio writes and verifies 128 MiB in 4k blocks while the daemon is taken away by
/// `interrupt` and a new daemon started on the same state directory: fio must end with
/// no error and every block verified. The device's queues run the command path
/// `commands` ("batch" or "per-tag"), before and after the recovery.
fn survive(test: &str, mode: &str, commands: &str, interrupt: impl FnOnce(&mut Daemon)) {
    require_ublk();
    let mut d = Daemon::start(test);
    let file = backing(test, 256 << 20);
    let dev = d.add(&[
        "loop",
        "--file",
        file.to_str().unwrap(),
        "--buffer",
        mode,
        commands_flag(commands),
    ]);
    let id = dev_id(&dev);
    assert_commands(&d.show_json(id), commands);
    // 32768 writes: still writing when the daemon goes 1.5 s in, on a fast host too.
    let job = verify_job(&dev, "randwrite", "4k", "128M", 32);
    let mut fio = FioChild::start(&job);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(fio.running(), "fio ended before the daemon was interrupted");
    interrupt(&mut d);
    assert!(Path::new(&dev).exists(), "{dev} went away with the daemon");
    let d2 = Daemon::start_with(test, &[]);
    let run = fio.wait();
    assert!(run.total_ios() >= 2 * 32768, "{}", run.total_ios());
    let e = entry(&d2, id);
    assert_eq!(e["state"], "live", "{e}");
    assert_eq!(e["buffer"], mode, "{e}");
    assert_eq!(e["commands"], commands, "{e}");
    assert_commands(&d2.show_json(id), commands);
    let log = d2.log_text();
    assert!(log.contains(&format!("dev {id}: recovering")), "{log}");
    d2.del(&dev);
    assert!(!record_path(test, id).exists(), "del keeps the record");
    std::fs::remove_file(&file).unwrap();
}

macro_rules! kill9_tests {
    ($($name:ident => $mode:literal, $commands:literal),* $(,)?) => {$(
        #[test]
        fn $name() {
            survive(
                &format!("rec-kill-{}-{}", $mode, $commands),
                $mode,
                $commands,
                Daemon::kill9,
            );
        }
    )*};
}

// The per-tag command path (the default) is killed under fio verify in all four buffer
// modes, five times each, by the stress tier (tests/stress.rs, kill9_five_times_*); here
// the batch path, and the hand-over below on both paths.
kill9_tests!(
    kill9_during_fio_verify_auto_zc_batch => "auto-zc", "batch",
    kill9_during_fio_verify_copy_batch => "copy", "batch",
    kill9_during_fio_verify_zc_batch => "zc", "batch",
);

/// A daemon started with --on-exit hand-over leaves its devices on SIGTERM: the
/// requests its queues hold are left to the next daemon.
fn hand_over(test: &str, commands: &str) {
    survive(test, "auto-zc", commands, |d| {
        d.kill9();
        let mut old = Daemon::start_with(test, &["--on-exit", "hand-over"]);
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(old.stop(), Some(0), "{}", old.log_text());
        assert!(
            old.log_text()
                .contains("leaving the devices to the next ublkd"),
            "{}",
            old.log_text()
        );
    });
}

#[test]
fn hand_over_on_sigterm_during_fio_verify_batch() {
    hand_over("rec-handover-batch", "batch");
}

#[test]
fn hand_over_on_sigterm_during_fio_verify_per_tag() {
    hand_over("rec-handover-per-tag", "per-tag");
}

#[test]
fn stop_and_start_bring_the_device_back_with_its_id_and_data() {
    require_ublk();
    let test = "rec-restart";
    let mut d = Daemon::start(test);
    let file = backing(test, 64 << 20);
    let dev = d.add(&[
        "loop",
        "--file",
        file.to_str().unwrap(),
        "--id",
        "7",
        "--name",
        "data",
    ]);
    assert_eq!(dev, "/dev/ublkb7");
    fio(&verify_job(&dev, "write", "64k", "64M", 8));
    let sum = checksum(&dev, 64 << 20);
    let rec: Value =
        serde_json::from_str(&std::fs::read_to_string(record_path(test, 7)).unwrap()).unwrap();
    assert_eq!(rec["id"], 7, "{rec}");
    assert_eq!(rec["add"]["name"], "data", "{rec}");
    assert_eq!(
        rec["add"]["target"]["file"],
        file.to_str().unwrap(),
        "{rec}"
    );

    // A plain stop removes the device from the kernel and keeps its record.
    assert_eq!(d.stop(), Some(0));
    assert!(wait_gone(&dev, Duration::from_secs(10)), "{dev} stayed");
    assert!(record_path(test, 7).exists());
    let d = Daemon::start_with(test, &[]);
    assert!(Path::new(&dev).exists(), "{dev} did not come back");
    assert_eq!(
        checksum(&dev, 64 << 20),
        sum,
        "data changed over stop/start"
    );
    let e = entry(&d, 7);
    assert_eq!(
        (e["state"].as_str(), e["name"].as_str()),
        (Some("live"), Some("data"))
    );
    assert!(d.ctl_ok(&["list"]).contains("data"));

    // Ids and names are unique; bad ones are refused with one line.
    let err = d.ctl_err(&["add", "null", "--id", "7"]);
    assert!(err.contains("id 7 is in use"), "{err}");
    let err = d.ctl_err(&["add", "null", "--name", "data"]);
    assert!(err.contains("'data' is taken by device 7"), "{err}");
    let err = d.ctl_err(&["add", "null", "--name", "no/slash"]);
    assert!(err.contains("not valid"), "{err}");
    let err = d.ctl_err(&["add", "null", "--id", "2000000"]);
    assert!(err.contains("out of range"), "{err}");
    let err = d.ctl_err(&["recover", "7"]);
    assert!(err.contains("already served"), "{err}");
    d.del(&dev);
    assert!(!record_path(test, 7).exists());
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn a_device_that_cannot_be_restored_is_listed_and_the_others_served() {
    require_ublk();
    let test = "rec-missing";
    let mut d = Daemon::start(test);
    let good = backing("good", 32 << 20);
    let gone = backing("gone", 32 << 20);
    let good_dev = d.add(&["loop", "--file", good.to_str().unwrap()]);
    let gone_dev = d.add(&["loop", "--file", gone.to_str().unwrap(), "--name", "lost"]);
    let gone_id = dev_id(&gone_dev);
    assert_eq!(d.stop(), Some(0));
    // Moved away (a new file at the path would be another file: tests/security.rs).
    let moved = gone.with_extension("moved");
    std::fs::rename(&gone, &moved).unwrap();
    // And a record that is cut short, as a crash of the file system might leave it.
    std::fs::write(
        record_path(test, 9),
        "{\"version\":1,\"id\":9,\"add\":{\"tar",
    )
    .unwrap();

    let d = Daemon::start_with(test, &[]);
    fio(&verify_job(&good_dev, "randwrite", "4k", "16M", 16));
    let e = entry(&d, gone_id);
    assert_eq!(e["state"], "failed", "{e}");
    assert_eq!(e["name"], "lost", "{e}");
    let why = e["error"].as_str().unwrap();
    assert!(why.contains(gone.to_str().unwrap()), "{why}");
    let e9 = entry(&d, 9);
    assert_eq!(e9["state"], "failed", "{e9}");
    assert!(
        e9["error"].as_str().unwrap().contains("not valid JSON"),
        "{e9}"
    );
    let table = d.ctl_ok(&["list"]);
    assert!(
        table.contains("failed") && table.contains("error: "),
        "{table}"
    );
    // show, by name, says what the record holds and why it is not served.
    let show = d.ctl_ok(&["show", "lost"]);
    assert!(show.contains("failed"), "{show}");
    assert!(show.contains(gone.to_str().unwrap()), "{show}");
    let json: Value = serde_json::from_str(&d.ctl_ok(&["show", "lost", "--json"])).unwrap();
    assert_eq!(json["id"].as_u64(), Some(gone_id), "{json}");
    assert_eq!(json["spec"]["file"], gone.to_str().unwrap(), "{json}");
    assert!(json["error"]
        .as_str()
        .unwrap()
        .contains(gone.to_str().unwrap()));
    assert!(json.get("kernel").is_none(), "{json}");
    let show9 = d.ctl_ok(&["show", "9"]);
    assert!(show9.contains("not valid JSON"), "{show9}");
    // Recovering without the file fails again, with the reason (by name).
    let err = d.ctl_err(&["recover", "lost"]);
    assert!(err.contains(gone.to_str().unwrap()), "{err}");
    // Put the file back: recover serves the device under its id.
    std::fs::rename(&moved, &gone).unwrap();
    let out = d.ctl_ok(&["recover", &gone_id.to_string()]);
    assert_eq!(out.trim(), gone_dev);
    fio(&verify_job(&gone_dev, "randwrite", "4k", "16M", 16));
    // del works for the unusable record too, and removes its file.
    d.ctl_ok(&["del", "9"]);
    assert!(!record_path(test, 9).exists());
    d.del(&gone_dev);
    d.del(&good_dev);
    for f in [good, gone] {
        std::fs::remove_file(f).unwrap();
    }
}

/// A loop device whose daemon crashed and whose backing file was then moved away: a
/// new daemon lists it as failed, and the fio job writing to it waits in the kernel.
struct Held {
    d: Daemon,
    dev: String,
    id: u64,
    file: PathBuf,
    moved: PathBuf,
    fio: FioChild,
}

fn crash_and_move_the_backing_file(test: &str) -> Held {
    let mut d = Daemon::start(test);
    let file = backing(test, 32 << 20);
    let moved = PathBuf::from(format!("{}.moved", file.display()));
    let dev = d.add(&["loop", "--file", file.to_str().unwrap()]);
    let id = dev_id(&dev);
    d.kill9();
    std::fs::rename(&file, &moved).unwrap();
    // IO issued while no daemon serves the device waits in the kernel.
    let mut fio = FioChild::start(&verify_job(&dev, "randwrite", "4k", "8M", 8));
    let d = Daemon::start_with(test, &[]);
    let e = entry(&d, id);
    assert_eq!(e["state"], "failed", "{e}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(fio.running(), "IO must wait for the device, not fail");
    Held {
        d,
        dev,
        id,
        file,
        moved,
        fio,
    }
}

#[test]
fn a_crashed_device_whose_recovery_fails_holds_its_io_until_recover() {
    require_ublk();
    let h = crash_and_move_the_backing_file("rec-held");
    std::fs::rename(&h.moved, &h.file).unwrap();
    h.d.ctl_ok(&["recover", &h.id.to_string()]);
    let started = Instant::now();
    h.fio.wait();
    assert!(started.elapsed() < Duration::from_secs(120));
    assert_eq!(entry(&h.d, h.id)["state"], "live");
    h.d.del(&h.dev);
    std::fs::remove_file(&h.file).unwrap();
}

#[test]
fn del_gives_up_a_crashed_device_that_cannot_be_recovered() {
    require_ublk();
    let test = "rec-giveup";
    let mut h = crash_and_move_the_backing_file(test);
    // del removes the device from the kernel: the held IO fails, nothing hangs.
    let started = Instant::now();
    h.d.del(&h.dev);
    assert!(started.elapsed() < Duration::from_secs(15));
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.fio.running() {
        assert!(Instant::now() < deadline, "fio still waits after del");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!record_path(test, h.id).exists());
    assert!(h.d.list_json().is_empty());
    std::fs::remove_file(&h.moved).unwrap();
}

/// An nbd device keeps at recovery the write cache it was created with, whatever its
/// server advertises now. A device created over a server without a cache (write
/// through) whose server came to cache writes (SEND_FLUSH, no FUA) while no ublkd ran:
/// each write is followed by a flush before it completes, so 2 MiB written with O_DIRECT
/// and no fsync survive the server's power loss. A device created with a cache whose
/// server no longer has one: the kernel's FLUSH is not sent to that server (which fails
/// it, as the spec lets it), so fsync still succeeds.
#[test]
fn an_nbd_device_recovered_over_a_server_whose_cache_changed_loses_no_write() {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::Ordering::SeqCst;
    use ublkd_tests::fake_nbd::{serve_any, Fault, SEND_FLUSH};
    require_ublk();
    let (through_port, through) = serve_any(Fault::None);
    through.advertise.store(0, SeqCst);
    let (back_port, back) = serve_any(Fault::None);
    let name = "rec-nbd-cache";
    let mut d = Daemon::start(name);
    let add = |d: &Daemon, port: u16| d.add(&["nbd", "--uri", &format!("nbd://127.0.0.1:{port}/")]);
    let (dev, cached) = (add(&d, through_port), add(&d, back_port));
    let id = dev_id(&dev);
    assert_eq!(queue_write_cache(&dev), "write through");
    assert_eq!(queue_write_cache(&cached), "write back");
    assert!(d
        .detail(id, "write cache")
        .starts_with("none: the server answers"));
    d.kill9();
    through.advertise.store(SEND_FLUSH, SeqCst);
    through.caching.store(true, SeqCst);
    back.advertise.store(0, SeqCst);
    let d = Daemon::start_with(name, &[]);
    wait_live(&d, id, "after kill -9 and a restart");
    wait_live(&d, dev_id(&cached), "after kill -9 and a restart");
    assert_eq!(queue_write_cache(&dev), "write through");
    let cache = d.detail(id, "write cache");
    assert!(
        cache.contains("every write is followed by a flush"),
        "{cache}"
    );
    let want = pattern(91, 2 << 20);
    write_direct(&dev, &want);
    through.power_loss();
    assert!(
        read_direct(&dev, want.len()) == want,
        "completed writes lost in the server's cache"
    );
    assert!(through.flushes.load(SeqCst) > 0);
    let f = open_direct(&cached, true);
    f.write_all_at(AlignedBuf::new(&want[..4096]).as_slice(), 0)
        .unwrap();
    f.sync_all()
        .unwrap_or_else(|e| panic!("fsync of a device whose server has no cache: {e}"));
    assert_eq!(back.flushes.load(SeqCst), 0);
    d.del(&dev);
    d.del(&cached);
}
