//! The stress tier: deletes and crashes under heavy load, on every target and buffer
//! mode, in the spirit of the kernel's ublk selftests (test_stress_*). Every wait is
//! bounded: a hang is a failure. They run inside the test VM (tests/run-vm-tests.sh);
//! without /dev/ublk-control they fail, never skip.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use ublkd_tests::nbd_server::{Listen, Server};
use ublkd_tests::*;

const MODES: [&str; 4] = ["copy", "fixed", "zc", "auto-zc"];

/// A device that must keep serving while others are deleted or crash: reads its first
/// MiB with O_DIRECT within a bound.
fn assert_serves(dev: &str) {
    let start = Instant::now();
    let mut f = open_direct(dev, false);
    let mut buf = AlignedBuf::zeroed(1 << 20);
    f.read_exact(buf.as_mut_slice())
        .unwrap_or_else(|e| panic!("{dev}: {e}"));
    assert!(start.elapsed() < Duration::from_secs(10), "{dev} is slow");
}

/// `del` while two fio jobs (mixed sizes, QD 64) run, for every target and buffer mode,
/// with the queues on the command path `commands`: `del` returns, fio ends, and the
/// daemon keeps serving its other device. Each pair runs with 1 or with 2 queues,
/// alternating, and the two paths alternate the other way round: every target and mode
/// meets both queue counts, once on each path (which halves the tests' time).
fn del_under_load_every_target_and_mode(commands: &str) {
    require_ublk();
    let d = Daemon::start_clean(&format!("stress-del-{commands}"), &POISON_RETIRED);
    let sentinel = d.add(&["null", "--size", "64M"]);
    let (file, _file) = backing_file("stress-del", 128 << 20);
    for (t, target) in ["null", "loop", "nbd"].into_iter().enumerate() {
        for (m, mode) in MODES.into_iter().enumerate() {
            let queues = if (t + m) % 2 == usize::from(commands == "batch") {
                "1"
            } else {
                "2"
            };
            let what = format!("{target} {mode} queues {queues} {commands}");
            // A server per device: a del that gives up on requests cuts their
            // connections mid-request, which some nbdkit versions do not survive.
            let sock = "/tmp/stress-del-nbd.sock".to_string();
            let server =
                (target == "nbd").then(|| Server::nbdkit_memory(Listen::Unix(sock), "128M", &[]));
            let mut args = match target {
                "null" => vec!["null", "--size", "128M"],
                "loop" => vec!["loop", "--file", &file],
                _ => vec!["nbd", "--uri", &server.as_ref().unwrap().uri],
            };
            args.extend(["--buffer", mode, "--queues", queues]);
            args.push(commands_flag(commands));
            let dev = d.add(&args);
            assert_commands(&d.show_json(dev_id(&dev)), commands);
            del_under_load(&d, &dev, &what);
            assert_serves(&sentinel);
        }
    }
    assert_eq!(d.list_json().len(), 1, "{:?}", d.list_json());
    assert_released_memory_untouched(&d, 12);
    d.del(&sentinel);
}

/// `del --force` of `dev` while two fio jobs (mixed sizes, QD 64) run on it: `del`
/// succeeds within 30 s, the device goes, and fio ends.
fn del_under_load(d: &Daemon, dev: &str, what: &str) {
    let fio = FioChild::start(&load_job(dev, 2, 60));
    wait_io(dev, 200);
    let start = Instant::now();
    let out = d.ctl(&["del", "--force", &dev_id(dev).to_string()]);
    assert!(
        out.status.success(),
        "{what}: del failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{what}: del took {:?}",
        start.elapsed()
    );
    assert!(
        wait_gone(dev, Duration::from_secs(10)),
        "{what}: {dev} stayed"
    );
    if let Err(e) = fio.ended_within(Duration::from_secs(30)) {
        panic!("{what}: {e}\n{}", d.log_text());
    }
}

/// Makes the daemon fill the memory that ended queues' commands pointed into with a
/// pattern as each queue thread ends, and report any byte that changed when it frees
/// the memory 2 s after the kernel released the device.
const POISON_RETIRED: [&str; 2] = ["--inject-fault", "poison-retired"];

/// After `deletions` devices were deleted from a daemon started with
/// [`POISON_RETIRED`]: each freed its queues' memory, and the kernel wrote none of it
/// after the queue threads had ended.
fn assert_released_memory_untouched(d: &Daemon, deletions: usize) {
    std::thread::sleep(Duration::from_millis(2500));
    let log = d.log_text();
    assert!(
        !log.contains("written after its thread ended"),
        "the kernel wrote into a queue's memory after its thread ended:\n{log}"
    );
    let checked = log.matches("released memory").count();
    assert!(
        checked >= deletions,
        "{checked} queues freed their memory, fewer than the {deletions} devices deleted:\n{log}"
    );
}

/// `del` under load of batch devices, 16 times over: the driver writes lists of
/// delivered tags into the fetch buffers by address, and did so after the queue thread
/// had exited (from the thread's last task work or a kernel worker) until the queue
/// took its unused fetch buffers back before ending (`Batch::withdraw_buffers`); the
/// memory is also kept until the kernel has let go of the char device
/// (`queue::Retired`). With neither, 4 of 48 such deletions saw the kernel write into
/// freed memory, and glibc aborted the daemon.
#[test]
fn deleted_batch_devices_leave_the_kernel_no_freed_memory() {
    require_ublk();
    let d = Daemon::start_clean("stress-retired", &POISON_RETIRED);
    let sentinel = d.add(&["null", "--size", "64M"]);
    let mut deletions = 0;
    for queues in ["1", "2", "1", "2"] {
        for mode in MODES {
            let what = format!("null {mode} queues {queues}");
            let args = [
                "null", "--size", "128M", "--buffer", mode, "--queues", queues,
            ];
            let dev = d.add(&[&args[..], &["--batch"]].concat());
            del_under_load(&d, &dev, &what);
            deletions += 1;
        }
    }
    assert_serves(&sentinel);
    assert_released_memory_untouched(&d, deletions);
    d.del(&sentinel);
}

#[test]
fn del_under_load_every_target_and_mode_batch() {
    del_under_load_every_target_and_mode("batch");
}

#[test]
fn del_under_load_every_target_and_mode_per_tag() {
    del_under_load_every_target_and_mode("per-tag");
}

/// `kill -9` of the daemon five times in a row while two fio jobs write and verify on a
/// two-queue device: every block verifies.
fn kill9_five_times(mode: &str) {
    require_ublk();
    let test = format!("stress-kill-{mode}");
    let mut d = Daemon::start(&test);
    let (file, _file) = backing_file(&test, 128 << 20);
    let dev = d.add(&["loop", "--file", &file, "--queues", "2", "--buffer", mode]);
    // 2 x 64 MiB of 4k random writes, then their verify: about 25 s in the VM, so the five
    // kills (the first 6 s) land during the writes.
    let mut fio = FioChild::start(&parallel_verify_job(&dev, 2, "64M", 32));
    for round in 0..5 {
        std::thread::sleep(Duration::from_millis(800));
        assert!(fio.running(), "fio ended before kill {round}");
        d.kill9();
        d = Daemon::start_with(&test, &[]);
    }
    let run = fio.wait();
    assert!(run.total_ios() >= 2 * 2 * 16384, "{}", run.total_ios());
    assert_eq!(list_entry(&d, dev_id(&dev))["state"], "live");
    d.del(&dev);
}

#[test]
fn kill9_five_times_under_verify_copy() {
    kill9_five_times("copy");
}

#[test]
fn kill9_five_times_under_verify_fixed() {
    kill9_five_times("fixed");
}

#[test]
fn kill9_five_times_under_verify_zc() {
    kill9_five_times("zc");
}

#[test]
fn kill9_five_times_under_verify_auto_zc() {
    kill9_five_times("auto-zc");
}

/// Five hand-overs in a row (SIGTERM to a daemon started with `--on-exit hand-over`,
/// then the next daemon recovers the device) while two fio jobs write and verify on a
/// two-queue device on the batch command path: every daemon exits with 0 and every
/// block verifies. A hand-over leaves the batch fetch commands armed, and a queue that
/// freed their buffers on the way out let the driver write into freed heap memory:
/// glibc then aborted the exiting daemon (`KernelShared` in daemon/src/queue/setup.rs).
/// The per-tag path hands over once in recovery::hand_over_on_sigterm_*.
#[test]
fn hand_over_five_times_under_verify_batch() {
    require_ublk();
    let test = "stress-handover-batch";
    let hand_over = ["--on-exit", "hand-over"];
    let mut d = Daemon::start_with(test, &hand_over);
    let (file, _file) = backing_file(test, 128 << 20);
    let dev = d.add(&["loop", "--file", &file, "--queues", "2", "--batch"]);
    let mut fio = FioChild::start(&parallel_verify_job(&dev, 2, "64M", 32));
    for round in 0..5 {
        std::thread::sleep(Duration::from_millis(800));
        assert!(fio.running(), "fio ended before hand-over {round}");
        assert_eq!(d.stop(), Some(0), "hand-over {round}: {}", d.log_text());
        d = Daemon::start_with(test, &hand_over);
    }
    let run = fio.wait();
    assert!(run.total_ios() >= 2 * 2 * 16384, "{}", run.total_ios());
    let e = list_entry(&d, dev_id(&dev));
    assert_eq!(e["state"], "live", "{e}");
    assert_eq!(e["commands"], "batch", "{e}");
    d.del(&dev);
    // The six daemons share the log.
    assert_no_queue_outlived_its_cancel(&d);
}

/// A daemon that runs for years adds and deletes devices without growing: after 24
/// cycles of warm-up, two rounds of 24 more add/IO/del cycles of loop and nbd (TCP)
/// devices over the four buffer modes and both command paths (two queues each; every
/// pair three times a round) leave its descriptors and threads where they were, and its
/// resident memory grows by less than 1 MiB in at least one round
/// (`assert_cycles_leak_nothing`): a leak of more than about 43 KiB per cycle fails
/// it. A queue that kept its request buffers (16 MiB each here), a connection, a
/// staging memfd or a thread would fail it.
#[test]
fn add_and_del_cycles_leak_neither_memory_nor_descriptors() {
    require_ublk();
    let test = "stress-cycles";
    let d = Daemon::start(test);
    let (file, _file) = backing_file(test, 16 << 20);
    let server = Server::nbdkit_memory(Listen::Tcp(11230), "16M", &[]);
    let kinds = [
        ("loop", "copy", "--no-batch"),
        ("nbd", "auto-zc", "--batch"),
        ("loop", "fixed", "--batch"),
        ("nbd", "zc", "--no-batch"),
        ("loop", "auto-zc", "--no-batch"),
        ("nbd", "copy", "--batch"),
        ("loop", "zc", "--batch"),
        ("nbd", "fixed", "--no-batch"),
    ];
    let data = pattern(7, 1 << 20);
    let cycle = |i: usize| {
        let (target, mode, commands) = kinds[i % kinds.len()];
        let what = format!("cycle {i} ({target} {mode} {commands})");
        let mut args = match target {
            "loop" => vec!["loop", "--file", &file],
            _ => vec!["nbd", "--uri", &server.uri],
        };
        args.extend(["--queues", "2", "--depth", "32", "--buffer", mode, commands]);
        let dev = d.add(&args);
        write_direct(&dev, &data);
        assert!(read_direct(&dev, data.len()) == data, "{what}: data differ");
        d.del(&dev);
    };
    // The warm-up: glibc gives new threads their own malloc arenas, up to 8 per CPU,
    // and the daemon's resident memory grows by about 0.6 MiB over the first two dozen
    // cycles before it levels off (to within 8 KiB over the next 144, measured).
    assert_cycles_leak_nothing(&d, 3 * kinds.len(), 3 * kinds.len(), cycle);
}

/// Several devices under load: one is deleted, then the daemon is killed; the others
/// verify every block.
#[test]
fn several_devices_one_deleted_then_a_crash() {
    require_ublk();
    let test = "stress-many";
    let mut d = Daemon::start(test);
    let mut verifies = Vec::new();
    let mut devs = Vec::new();
    let mut files = Vec::new();
    for (i, mode) in ["copy", "zc", "auto-zc"].iter().enumerate() {
        let (file, cleanup) = backing_file(&format!("{test}-{i}"), 64 << 20);
        files.push(cleanup);
        let dev = d.add(&["loop", "--file", &file, "--buffer", mode]);
        verifies.push(FioChild::start(&verify_job(
            &dev,
            "randwrite",
            "4k",
            "64M",
            16,
        )));
        devs.push(dev);
    }
    let victim = d.add(&["null", "--size", "128M", "--queues", "2"]);
    let load = FioChild::start(&load_job(&victim, 2, 60));
    wait_io(&victim, 200);
    d.del(&victim);
    if let Err(e) = load.ended_within(Duration::from_secs(30)) {
        panic!(
            "after del: {e}
{}",
            d.log_text()
        );
    }
    for dev in &devs {
        assert_serves(dev);
    }
    d.kill9();
    let d = Daemon::start_with(test, &[]);
    for fio in verifies {
        fio.wait();
    }
    for dev in &devs {
        assert_eq!(list_entry(&d, dev_id(dev))["state"], "live");
        d.del(dev);
    }
}

/// Files written and fsynced by an application thread; the names of those whose fsync
/// (and the directory's) returned.
struct FsyncWorkload {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<u32>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn file_data(i: u32) -> Vec<u8> {
    pattern(u64::from(i) + 1, 16384 + 4096 * (i as usize % 7))
}

impl FsyncWorkload {
    fn start(dir: &str) -> FsyncWorkload {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (s, a, dir) = (stop.clone(), acked.clone(), dir.to_string());
        let thread = std::thread::spawn(move || {
            let d = std::fs::File::open(&dir).unwrap();
            let mut i = 0u32;
            while !s.load(Ordering::Relaxed) {
                let path = format!("{dir}/f{i}");
                let mut f = std::fs::File::create(&path).unwrap();
                f.write_all(&file_data(i)).unwrap();
                f.sync_all().unwrap_or_else(|e| panic!("fsync {path}: {e}"));
                d.sync_all().unwrap_or_else(|e| panic!("fsync {dir}: {e}"));
                a.lock().unwrap().push(i);
                i += 1;
            }
        });
        FsyncWorkload {
            stop,
            acked,
            thread: Some(thread),
        }
    }

    /// Stops the workload; the files it acknowledged.
    fn finish(mut self) -> Vec<u32> {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !t.is_finished() {
            assert!(Instant::now() < deadline, "the fsync workload hung");
            std::thread::sleep(Duration::from_millis(20));
        }
        t.join().expect("the fsync workload failed");
        std::mem::take(&mut *self.acked.lock().unwrap())
    }
}

fn check_files(dir: &str, acked: &[u32]) {
    for &i in acked {
        let got = std::fs::read(format!("{dir}/f{i}"))
            .unwrap_or_else(|e| panic!("fsynced file f{i} is gone: {e}"));
        assert!(got == file_data(i), "fsynced file f{i} has other data");
    }
}

/// An application on ext4 fsyncs files while ublkd is killed three times: every file
/// whose fsync returned is there, also after the device is re-created from its backing
/// file, and fsck finds nothing wrong.
#[test]
fn fsynced_files_survive_daemon_crashes() {
    require_ublk();
    let test = "stress-fsync";
    let mut d = Daemon::start(test);
    let (file, _file) = backing_file(test, 256 << 20);
    let dev = d.add(&["loop", "--file", &file, "--queues", "2"]);
    run_ok("/usr/sbin/mkfs.ext4", &["-q", "-F", &dev]);
    let mnt = format!("/tmp/{test}-mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run_ok("/bin/mount", &["-t", "ext4", &dev, &mnt]);
    let work = FsyncWorkload::start(&mnt);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1500));
        d.kill9();
        d = Daemon::start_with(test, &[]);
    }
    std::thread::sleep(Duration::from_millis(1000));
    let acked = work.finish();
    assert!(acked.len() > 10, "only {} files were fsynced", acked.len());
    check_files(&mnt, &acked);
    run_ok("/bin/umount", &[&mnt]);
    run_ok("/usr/sbin/e2fsck", &["-fn", &dev]);

    // Stop removes the device; start adds it again from the backing file.
    assert_eq!(d.stop(), Some(0));
    assert!(wait_gone(&dev, Duration::from_secs(10)));
    let d = Daemon::start_with(test, &[]);
    assert!(Path::new(&dev).exists());
    run_ok("/bin/mount", &["-t", "ext4", &dev, &mnt]);
    check_files(&mnt, &acked);
    run_ok("/bin/umount", &[&mnt]);
    run_ok("/usr/sbin/e2fsck", &["-fn", &dev]);
    d.del(&dev);
}
