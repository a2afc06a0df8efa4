//! Real-kernel tests of the faults that could lose data or send it to the wrong device:
//! ids and records taken over, a delete cut short by a crash, a queue that dies, a crash
//! during recovery, memory reclaim through our own device. They run inside the test VM
//! (tests/run-vm-tests.sh); without /dev/ublk-control they fail, never skip.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};
use ublkd_tests::*;

/// How a daemon ended by an injected fault ends: SIGABRT, as a crash.
fn assert_aborted(d: &mut Daemon, within: Duration) {
    let status = d
        .wait_exit(within)
        .unwrap_or_else(|| panic!("ublkd did not end within {within:?}:\n{}", d.log_text()));
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "{status}\n{}",
        d.log_text()
    );
}

fn ids(d: &Daemon) -> Vec<u64> {
    d.list_json()
        .iter()
        .map(|e| e["id"].as_u64().unwrap())
        .collect()
}

/// The story of issue 11: a device whose restore failed keeps its id and its record;
/// a new device never gets that id, and `--id` of it is refused naming the holder.
#[test]
fn a_failed_device_keeps_its_id_and_record() {
    require_ublk();
    let test = "safe-ids";
    let mut d = Daemon::start(test);
    let (a, _a) = backing_file("safe-ids-a", 32 << 20);
    let (b, _b) = backing_file("safe-ids-b", 32 << 20);
    let da = d.add(&["loop", "--file", &a]);
    let db = d.add(&["loop", "--file", &b, "--name", "bee"]);
    let (ia, ib) = (dev_id(&da), dev_id(&db));
    fio(&verify_job(&db, "write", "64k", "32M", 8));
    let sum = checksum(&db, 32 << 20);
    assert_eq!(d.stop(), Some(0));

    // b's file goes away while ublkd is down; a stray file sits among the records.
    let away = format!("{b}.away");
    std::fs::rename(&b, &away).unwrap();
    let stray = d.state_dir.join(format!("devices/0{ib}.json"));
    std::fs::copy(d.record_path(ib), &stray).unwrap();
    let d = Daemon::start_with(test, &[]);
    let e = list_entry(&d, ib);
    assert_eq!(e["state"], "failed", "{e}");
    assert!(e["error"].as_str().unwrap().contains(&b), "{e}");
    assert_eq!(ids(&d), vec![ia, ib], "the stray file became a device");
    assert!(
        d.log_text().contains(&format!(
            "{}: not a device record (records are named ID.json)",
            stray.display()
        )),
        "{}",
        d.log_text()
    );
    std::fs::remove_file(&stray).unwrap();

    // A new device takes neither the live id nor the failed one.
    let dn = d.add(&["null", "--size", "16M"]);
    let n = dev_id(&dn);
    assert!(n != ia && n != ib, "add took id {n} of a recorded device");
    let err = d.ctl_err(&["add", "null", "--id", &ib.to_string()]);
    assert!(
        err.contains(&format!(
            "device id {ib} is in use: it belongs to device {ib} 'bee' (loop, failed)"
        )),
        "{err}"
    );
    let err = d.ctl_err(&["add", "null", "--name", "bee"]);
    assert!(
        err.contains(&format!("'bee' is taken by device {ib}")),
        "{err}"
    );

    // The record was kept whole: once the file is back, the device serves its data.
    std::fs::rename(&away, &b).unwrap();
    d.ctl_ok(&["recover", &ib.to_string()]);
    assert_eq!(list_entry(&d, ib)["state"], "live");
    assert_eq!(checksum(&db, 32 << 20), sum, "device {ib} changed");
    for dev in [&dn, &da, &db] {
        d.del(dev);
    }
    assert!(ids(&d).is_empty());
}

/// A recorded network device whose server does not answer does not hold up the daemon:
/// it connects in the background, and while an attempt runs its id cannot be taken and
/// the device cannot be changed; between attempts it is `connecting`, with the reason,
/// and can be deleted.
#[test]
fn changes_wait_for_the_restore() {
    require_ublk();
    let test = "safe-restoring";
    let _ = std::fs::remove_dir_all(format!("/tmp/ublkd-{test}"));
    // An NBD server that accepts connections and never says a word: restoring a device
    // of it takes until the handshake's deadline.
    let silent = std::net::TcpListener::bind("127.0.0.1:11260").unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let hold = std::thread::spawn(move || {
        let mut held = Vec::new();
        silent.set_nonblocking(true).unwrap();
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until && !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((s, _)) = silent.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let dir = format!("/tmp/ublkd-{test}/state/devices");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        format!("{dir}/9.json"),
        r#"{"version":1,"id":9,"add":{"target":{"type":"nbd","uri":"nbd://127.0.0.1:11260/x"},"id":9},"buffer":"auto-zc"}"#,
    )
    .unwrap();
    // The network device connects in the background: the daemon is ready at once, and
    // while the attempt runs nothing can take the device's id or change the device.
    let d = Daemon::start_with(test, &[]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while list_entry(&d, 9)["state"] != "recovering" {
        assert!(Instant::now() < deadline, "{}", list_entry(&d, 9));
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = d.ctl_err(&["add", "null", "--id", "9"]);
    assert!(err.contains("device id 9 is in use"), "{err}");
    for args in [&["del", "9"][..], &["recover", "9"]] {
        let err = d.ctl_err(args);
        assert!(err.contains("device 9 is recovering; try again"), "{err}");
    }
    let dn = d.add(&["null", "--size", "16M"]);
    assert_ne!(dev_id(&dn), 9);
    d.del(&dn);
    // The server never answers: after the handshake's deadline the device waits for the
    // next attempt, with the reason, and can be deleted.
    let deadline = Instant::now() + Duration::from_secs(30);
    let e = loop {
        let e = list_entry(&d, 9);
        if e["state"] == "connecting" && e["error"] != "not tried yet" {
            break e;
        }
        assert!(Instant::now() < deadline, "{e}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(e["error"].as_str().unwrap().contains("11260"), "{e}");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    // An attempt may be under way again: del waits for it by being refused meanwhile.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.ctl(&["del", "9"]).status.success() {
        assert!(Instant::now() < deadline, "{}", list_entry(&d, 9));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ids(&d).is_empty());
    hold.join().unwrap();
}

/// A `del` that cannot mark the record changes nothing: the device stays listed and
/// served, and `del` can be tried again.
#[test]
fn a_del_that_fails_leaves_the_device_listed() {
    require_ublk();
    let d = Daemon::start("safe-delfail");
    let dev = d.add(&["null", "--size", "16M"]);
    let id = dev_id(&dev);
    let record = d.record_path(id);
    let text = std::fs::read_to_string(&record).unwrap();
    // A directory where the record was: the record cannot be rewritten.
    std::fs::remove_file(&record).unwrap();
    std::fs::create_dir(&record).unwrap();
    std::fs::write(record.join("x"), "").unwrap();
    let err = d.ctl_err(&["del", &id.to_string()]);
    assert!(err.contains("cannot write the device record"), "{err}");
    assert_eq!(list_entry(&d, id)["state"], "live");
    checksum(&dev, 1 << 20);

    std::fs::remove_dir_all(&record).unwrap();
    std::fs::write(&record, text).unwrap();
    d.del(&dev);
    assert!(!record.exists());
}

/// ublkd dies after `del` marked the record and before the kernel's device was
/// removed: the next ublkd finishes the delete instead of bringing the device back.
#[test]
fn a_delete_cut_short_by_a_crash_is_finished_at_the_next_start() {
    require_ublk();
    let test = "safe-delcrash";
    let mut d = Daemon::start_clean(test, &["--inject-fault", "crash:del-marked"]);
    let (file, _file) = backing_file(test, 32 << 20);
    let dev = d.add(&["loop", "--file", &file]);
    let id = dev_id(&dev);
    assert!(!d.ctl(&["del", &id.to_string()]).status.success());
    assert_aborted(&mut d, Duration::from_secs(10));
    let text = std::fs::read_to_string(d.record_path(id)).unwrap();
    assert!(text.contains("\"deleting\": true"), "{text}");
    assert!(Path::new(&format!("/dev/ublkc{id}")).exists());

    let d = Daemon::start_with(test, &[]);
    assert!(
        d.log_text()
            .contains(&format!("dev {id}: finishing a delete")),
        "{}",
        d.log_text()
    );
    assert!(wait_gone(&dev, Duration::from_secs(10)), "{dev} came back");
    assert!(!Path::new(&format!("/dev/ublkc{id}")).exists());
    assert!(!d.record_path(id).exists());
    assert!(ids(&d).is_empty());
}

/// A queue that fails (here an injected ring error) ends the daemon instead of
/// leaving a device that looks live while its IO hangs; the next ublkd recovers the
/// device and fio's verify sees no error.
#[test]
fn a_queue_that_fails_ends_the_daemon_and_the_device_recovers() {
    require_ublk();
    let test = "safe-queue-error";
    let mut d = Daemon::start_clean(test, &["--inject-fault", "queue-error:3000"]);
    let (file, _file) = backing_file(test, 128 << 20);
    let dev = d.add(&["loop", "--file", &file]);
    let fio = FioChild::start(&verify_job(&dev, "randwrite", "4k", "128M", 32));
    assert_aborted(&mut d, Duration::from_secs(60));
    assert!(
        d.log_text()
            .contains("stopped on ring error: injected fault"),
        "{}",
        d.log_text()
    );
    assert!(Path::new(&dev).exists(), "{dev} went away with the daemon");
    let d = Daemon::start_with(test, &[]);
    let run = fio.wait();
    assert!(run.total_ios() >= 2 * 32768, "{}", run.total_ios());
    assert_eq!(list_entry(&d, dev_id(&dev))["state"], "live");
    d.del(&dev);
}

/// The second ublkd dies while it recovers the device (after START_USER_RECOVERY); a
/// third one recovers it, and fio's verify sees no error.
#[test]
fn a_crash_during_recovery_is_recovered_by_the_next_daemon() {
    require_ublk();
    let test = "safe-recover-crash";
    let mut d = Daemon::start(test);
    let (file, _file) = backing_file(test, 128 << 20);
    let dev = d.add(&["loop", "--file", &file]);
    let fio = FioChild::start(&verify_job(&dev, "randwrite", "4k", "128M", 32));
    std::thread::sleep(Duration::from_millis(1500));
    d.kill9();
    let mut d2 = Daemon::spawn_with(test, &["--inject-fault", "crash:recovering"]);
    assert_aborted(&mut d2, Duration::from_secs(60));
    assert!(d2.log_text().contains("crashing at recovering"));
    assert!(Path::new(&dev).exists(), "{dev} went away");
    let d3 = Daemon::start_with(test, &[]);
    let run = fio.wait();
    assert!(run.total_ios() >= 2 * 32768, "{}", run.total_ios());
    assert_eq!(list_entry(&d3, dev_id(&dev))["state"], "live");
    d3.del(&dev);
}

/// `PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE` in /proc/PID/task/TID/stat: what
/// PR_SET_IO_FLUSHER sets.
const IO_FLUSHER_FLAGS: u64 = 0x0008_0000 | 0x0010_0000;

/// Queue threads are IO flushers, and the request buffers are locked in memory.
#[test]
fn queue_threads_are_io_flushers_with_locked_buffers() {
    require_ublk();
    let d = Daemon::start("safe-flusher");
    let dev = d.add(&[
        "null", "--size", "64M", "--queues", "2", "--depth", "16", "--buffer", "copy",
    ]);
    let id = dev_id(&dev);
    let pid = d.pid();
    let mut queues = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap();
        if !comm.trim().starts_with(&format!("ublk{id}q")) {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        // Fields after the parenthesised name start at field 3 (state); flags is 9.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let flags: u64 = rest.split_whitespace().nth(6).unwrap().parse().unwrap();
        assert_eq!(
            flags & IO_FLUSHER_FLAGS,
            IO_FLUSHER_FLAGS,
            "{comm}: {flags:#x}"
        );
        queues += 1;
    }
    assert_eq!(queues, 2, "queue threads of device {id} not found");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let locked_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    // Two queues x 16 tags x 512 KiB of buffers, locked whole.
    assert!(locked_kib >= 2 * 16 * 512, "VmLck {locked_kib} kB");
    d.del(&dev);
}
