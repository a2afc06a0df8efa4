//! ublkd under a real systemd as PID 1: the installed unit (scripts/install.sh), a crash
//! and its recovery, the upgrade restart, stop and start, a file system through a crash,
//! a device that cannot be restored. They run inside the systemd test VM
//! (tests/run-vm-tests.sh boots it with tests/vm/run.sh --systemd), one at a time, all
//! against the one `ublkd.service`; outside it they fail, never skip.

use serde_json::Value;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use ublkd_tests::*;

const UNIT: &str = "ublkd.service";
const SOCKET: &str = "/run/ublkd/ublkd.sock";
const RECORDS: &str = "/var/lib/ublkd/devices";
const MKFS: &str = "/usr/sbin/mkfs.ext4";
const E2FSCK: &str = "/usr/sbin/e2fsck";

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn journal() -> String {
    journal_with(&[])
}

/// The unit's journal of this boot, with more journalctl arguments (matches, -p).
fn journal_with(args: &[&str]) -> String {
    let mut all = vec!["-u", UNIT, "-b", "--no-pager", "-o", "cat"];
    all.extend_from_slice(args);
    let out = run("/usr/bin/journalctl", &all);
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn systemctl(args: &[&str]) {
    let out = run("/usr/bin/systemctl", args);
    assert!(
        out.status.success(),
        "systemctl {args:?} failed ({}): {}\n---- journal ----\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        journal()
    );
}

/// A property of any unit (`systemctl show UNIT -p NAME --value`).
fn unit_property(unit: &str, name: &str) -> String {
    let out = run("/usr/bin/systemctl", &["show", unit, "-p", name, "--value"]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn property(name: &str) -> String {
    unit_property(UNIT, name)
}

fn main_pid() -> i32 {
    property("MainPID").parse().unwrap_or(0)
}

/// Waits until the service is active with a main process other than `not_pid`.
fn wait_active(not_pid: i32) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let pid = main_pid();
        if property("ActiveState") == "active" && pid != 0 && pid != not_pid {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "ublkd did not become active again (state {}, pid {pid}):\n{}",
            property("ActiveState"),
            journal()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ctl(args: &[&str]) -> Output {
    ctl_at(Path::new(SOCKET), args)
}

fn ctl_ok(args: &[&str]) -> String {
    let out = ctl(args);
    assert!(
        out.status.success(),
        "ublkctl {args:?} failed: {}\n---- journal ----\n{}",
        String::from_utf8_lossy(&out.stderr),
        journal()
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn list() -> Vec<Value> {
    let v: Value = serde_json::from_str(&ctl_ok(&["list", "--json"])).unwrap();
    v.as_array().unwrap().clone()
}

fn entry(id: u64) -> Value {
    list()
        .into_iter()
        .find(|e| e["id"].as_u64() == Some(id))
        .unwrap_or_else(|| panic!("device {id} is not listed:\n{}", journal()))
}

fn add_loop(file: &Path, extra: &[&str]) -> String {
    let mut args = vec!["add", "loop", "--file", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let dev = ctl_ok(&args).trim().to_string();
    assert!(Path::new(&dev).exists(), "{dev}");
    dev
}

fn backing(name: &str, size: u64) -> PathBuf {
    let path = PathBuf::from(format!("/var/tmp/backing-{name}.img"));
    let _ = std::fs::remove_file(&path);
    File::create(&path).unwrap().set_len(size).unwrap();
    path
}

/// A clean slate: ublkd running with no devices and no records.
fn fresh_start() {
    let _ = run("/usr/bin/systemctl", &["stop", UNIT]);
    let _ = run("/usr/bin/systemctl", &["reset-failed", UNIT]);
    let _ = std::fs::remove_dir_all(RECORDS);
    systemctl(&["start", UNIT]);
    wait_active(0);
    assert_eq!(list().len(), 0);
}

/// Takes the boot test's device and fstab line away again, whatever the test found.
struct BootSeed;

impl Drop for BootSeed {
    fn drop(&mut self) {
        let _ = run("/usr/bin/systemctl", &["stop", "mnt-boot.mount"]);
        let _ = std::fs::write("/etc/fstab", "");
        let _ = run("/usr/bin/systemctl", &["daemon-reload"]);
        let _ = ctl(&["del", "--force", "boot"]);
        let _ = std::fs::remove_file("/var/tmp/backing-boot.img");
    }
}

/// A server's boot with a file system on a ublk device in fstab. tests/run-vm-tests.sh
/// leaves in the guest what an earlier boot would have: ublkd's record of a loop device
/// named `boot` (id 7), its backing file holding ext4 with one file, the README's fstab
/// line (`/dev/ublkd/boot /mnt/boot ext4 _netdev,x-systemd.requires=ublkd.service`) and
/// ublkd.service enabled. Nobody started anything: systemd started ublkd, ublkd restored
/// the device, udev made the link and systemd mounted the file system. Named to run first
/// (libtest runs tests in name order), before any test restarts ublkd.
#[test]
fn a_boot_restores_the_recorded_device_and_mounts_it_from_fstab() {
    let _cleanup = BootSeed;
    let mount = "mnt-boot.mount";
    // The mount may still be on its way when the test command starts.
    let deadline = Instant::now() + Duration::from_secs(60);
    while unit_property(mount, "ActiveState") != "active" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let boot = run("/usr/bin/journalctl", &["-b", "--no-pager", "-o", "cat"]);
    let boot = String::from_utf8_lossy(&boot.stdout).to_string();
    assert_eq!(
        unit_property(mount, "ActiveState"),
        "active",
        "{mount} is not mounted after boot:\n{boot}"
    );
    assert!(!boot.contains("ordering cycle"), "{boot}");
    // Both were started by the boot itself, ublkd first.
    let ublkd_up: u64 = property("ActiveEnterTimestampMonotonic").parse().unwrap();
    let mount_up: u64 = unit_property(mount, "ActiveEnterTimestampMonotonic")
        .parse()
        .unwrap();
    assert!(
        ublkd_up > 0 && ublkd_up <= mount_up,
        "ublkd active at {ublkd_up} us, the mount at {mount_up} us"
    );
    let e = entry(7);
    assert_eq!(e["name"], "boot", "{e}");
    assert_eq!(e["state"], "live", "{e}");
    let link = std::fs::canonicalize("/dev/ublkd/boot").unwrap();
    assert_eq!(link, Path::new("/dev/ublkb7"));
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        mounts
            .lines()
            .any(|l| l.starts_with("/dev/ublkb7 /mnt/boot ext4 ")),
        "/dev/ublkb7 is not mounted on /mnt/boot:\n{mounts}"
    );
    assert_eq!(
        std::fs::read("/mnt/boot/before-boot").unwrap(),
        b"written before the boot\n"
    );
    // And the file system is writable through the restored device.
    std::fs::write("/mnt/boot/after-boot", b"written after the boot").unwrap();
    systemctl(&["stop", mount]);
    run_ok(E2FSCK, &["-f", "-n", "/dev/ublkb7"]);
}

#[test]
fn the_unit_verifies_and_is_what_the_readme_says() {
    let out = run(
        "/usr/bin/systemd-analyze",
        &["verify", "/usr/local/lib/systemd/system/ublkd.service"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("ublkd"),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
    fresh_start();
    assert_eq!(property("Type"), "notify");
    assert_eq!(property("WatchdogUSec"), "30s");
    assert_eq!(property("Restart"), "on-failure");
    assert!(Path::new(SOCKET).exists());
    assert!(Path::new(RECORDS).is_dir());
    // Ready means the socket answers at once.
    ctl_ok(&["features"]);
    // The daemon has no mount namespace of its own (see the unit file).
    let pid = main_pid();
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let its = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    assert_eq!(ours, its, "ublkd runs in a private mount namespace");
}

/// kill -9 of the main process during a fio verify job: systemd restarts ublkd, the
/// new process recovers the device, fio finishes with no error and verifies.
#[test]
fn a_crash_is_recovered_without_io_errors() {
    fresh_start();
    let file = backing("crash", 256 << 20);
    let dev = add_loop(&file, &[]);
    let id = dev_id(&dev);
    let restarts: u32 = property("NRestarts").parse().unwrap();
    let mut fio = FioChild::start(&verify_job(&dev, "randwrite", "4k", "256M", 32));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(fio.running());
    let old = main_pid();
    // SAFETY: sending SIGKILL to the service's main process, as the OOM killer would.
    assert_eq!(unsafe { libc::kill(old, libc::SIGKILL) }, 0);
    wait_active(old);
    let run = fio.wait();
    assert!(run.total_ios() >= 2 * 65536);
    let now: u32 = property("NRestarts").parse().unwrap();
    assert_eq!(now, restarts + 1, "systemd restarted ublkd once");
    assert_eq!(entry(id)["state"], "live");
    assert!(journal().contains(&format!("dev {id}: recovering")));
    ctl_ok(&["del", &id.to_string()]);
    std::fs::remove_file(&file).unwrap();
}

/// `systemctl restart ublkd` (the upgrade path) during a fio verify job: no error.
#[test]
fn restart_is_an_upgrade_without_io_errors() {
    fresh_start();
    let file = backing("restart", 256 << 20);
    let dev = add_loop(&file, &["--name", "up"]);
    let id = dev_id(&dev);
    let mut job = FioChild::start(&verify_job(&dev, "randwrite", "4k", "256M", 32));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(job.running());
    let old = main_pid();
    systemctl(&["restart", UNIT]);
    wait_active(old);
    job.wait();
    assert_eq!(entry(id)["state"], "live");
    assert_eq!(entry(id)["name"], "up");
    let j = journal();
    assert!(j.contains("leaving the devices to the next ublkd"), "{j}");
    assert!(j.contains(&format!("dev {id}: recovering")), "{j}");
    // reload is refused and changes nothing.
    assert!(!run("/usr/bin/systemctl", &["reload", UNIT])
        .status
        .success());
    assert_eq!(main_pid(), wait_active(old));
    fio(&verify_job(&dev, "randwrite", "4k", "16M", 16));
    ctl_ok(&["del", &id.to_string()]);
    std::fs::remove_file(&file).unwrap();
}

/// stop removes the device, start brings it back with the same id and the same data.
#[test]
fn stop_and_start_keep_the_id_and_the_data() {
    fresh_start();
    let file = backing("stop", 64 << 20);
    let dev = add_loop(&file, &["--id", "5"]);
    assert_eq!(dev, "/dev/ublkb5");
    fio(&verify_job(&dev, "write", "128k", "64M", 8));
    let sum = checksum(&dev, 64 << 20);
    systemctl(&["stop", UNIT]);
    assert!(wait_gone(&dev, Duration::from_secs(10)), "stop left {dev}");
    assert!(Path::new(&format!("{RECORDS}/5.json")).exists());
    systemctl(&["start", UNIT]);
    wait_active(0);
    assert!(Path::new(&dev).exists(), "start did not bring {dev} back");
    assert_eq!(checksum(&dev, 64 << 20), sum);
    assert_eq!(entry(5)["state"], "live");
    ctl_ok(&["del", "5"]);
    assert!(!Path::new(&format!("{RECORDS}/5.json")).exists());
    std::fs::remove_file(&file).unwrap();
}

/// A file system mounted on the device through a crash: files written before and during
/// the crash read back intact after sync, and the file system checks clean.
#[test]
fn a_mounted_file_system_survives_a_crash() {
    fresh_start();
    let file = backing("fs", 256 << 20);
    let dev = add_loop(&file, &[]);
    run_ok(MKFS, &["-q", "-F", &dev]);
    let mnt = "/mnt/ublk-fs";
    std::fs::create_dir_all(mnt).unwrap();
    run_ok("/usr/bin/mount", &[&dev, mnt]);
    let write = |name: &str, seed: u64| {
        let data = pattern(seed, 1 << 20);
        let mut f = File::create(format!("{mnt}/{name}")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    };
    for i in 0..8 {
        write(&format!("before-{i}"), i);
    }
    // A writer keeps going across the crash.
    let writer = std::thread::spawn(move || {
        for i in 0..24u64 {
            let data = pattern(100 + i, 1 << 20);
            let mut f = File::create(format!("{mnt}/during-{i}")).unwrap();
            f.write_all(&data).unwrap();
            f.sync_all().unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let old = main_pid();
    // SAFETY: SIGKILL to the service's main process.
    assert_eq!(unsafe { libc::kill(old, libc::SIGKILL) }, 0);
    wait_active(old);
    writer.join().expect("the writer saw an error");
    run_ok("/usr/bin/sync", &[]);
    for i in 0..8 {
        assert_eq!(
            std::fs::read(format!("{mnt}/before-{i}")).unwrap(),
            pattern(i, 1 << 20)
        );
    }
    for i in 0..24 {
        assert_eq!(
            std::fs::read(format!("{mnt}/during-{i}")).unwrap(),
            pattern(100 + i, 1 << 20),
            "during-{i}"
        );
    }
    run_ok("/usr/bin/umount", &[mnt]);
    run_ok(E2FSCK, &["-fn", &dev]);
    ctl_ok(&["del", &dev_id(&dev).to_string()]);
    std::fs::remove_file(&file).unwrap();
}

/// A record whose backing file was deleted: the daemon starts, serves the other
/// device, and `ublkctl list` shows the failure and why.
#[test]
fn a_lost_backing_file_fails_one_device_only() {
    fresh_start();
    let good = backing("good", 64 << 20);
    let lost = backing("lost", 64 << 20);
    let good_dev = add_loop(&good, &[]);
    let lost_dev = add_loop(&lost, &[]);
    systemctl(&["stop", UNIT]);
    std::fs::remove_file(&lost).unwrap();
    systemctl(&["start", UNIT]);
    wait_active(0);
    assert_eq!(property("ActiveState"), "active");
    fio(&verify_job(&good_dev, "randwrite", "4k", "32M", 16));
    let e = entry(dev_id(&lost_dev));
    assert_eq!(e["state"], "failed", "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains(lost.to_str().unwrap()),
        "{e}"
    );
    let table = ctl_ok(&["list"]);
    assert!(table.contains("failed"), "{table}");
    assert!(
        property("StatusText").contains("1 failed"),
        "{}",
        property("StatusText")
    );
    // The journal has the failure at priority err, with the device as a field, and
    // `-p err` leaves out the info lines (README, "Running under systemd").
    let id = dev_id(&lost_dev).to_string();
    let errors = journal_with(&["-p", "err"]);
    assert!(errors.contains("cannot be restored"), "{errors}");
    assert!(
        !errors.contains("listening on"),
        "info lines at err:\n{errors}"
    );
    assert!(journal().contains("listening on"), "{}", journal());
    let by_device = journal_with(&[&format!("UBLKD_DEVICE={id}")]);
    assert!(by_device.contains("cannot be restored"), "{by_device}");
    assert!(!by_device.contains("listening on"), "{by_device}");
    ctl_ok(&["del", &id]);
    ctl_ok(&["del", &dev_id(&good_dev).to_string()]);
    std::fs::remove_file(&good).unwrap();
}

/// A named device gets /dev/ublkd/NAME and /dev/disk/by-id/ublkd-NAME from the installed
/// udev rule; the links survive an upgrade restart and a change event after it, and go
/// with `del`.
#[test]
fn named_devices_get_dev_links() {
    fresh_start();
    let file = backing("linked", 32 << 20);
    let dev = add_loop(&file, &["--name", "db"]);
    let settle = || run_ok("/usr/bin/udevadm", &["settle", "--timeout=30"]);
    settle();
    let target = |link: &str| std::fs::canonicalize(link).ok();
    let want = Some(PathBuf::from(&dev));
    assert_eq!(target("/dev/ublkd/db"), want, "/dev/ublkd/db");
    assert_eq!(target("/dev/disk/by-id/ublkd-db"), want);

    let old = main_pid();
    systemctl(&["restart", UNIT]);
    wait_active(old);
    run_ok(
        "/usr/bin/udevadm",
        &["trigger", "--action=change", "--settle", &dev],
    );
    settle();
    assert_eq!(
        target("/dev/ublkd/db"),
        want,
        "after restart and a change event"
    );

    ctl_ok(&["del", "db"]);
    settle();
    assert!(
        !Path::new("/dev/ublkd/db").exists(),
        "the link outlived the device"
    );
    assert!(!Path::new("/run/ublkd/names")
        .join(dev.trim_start_matches("/dev/"))
        .exists());
    std::fs::remove_file(&file).unwrap();
}

/// Puts /etc/fstab back and reloads systemd, whatever the test did.
struct FstabLine {
    old: String,
}

impl Drop for FstabLine {
    fn drop(&mut self) {
        let _ = run("/usr/bin/umount", &["/mnt/ublk"]);
        let _ = std::fs::write("/etc/fstab", &self.old);
        let _ = run("/usr/bin/systemctl", &["daemon-reload"]);
    }
}

/// The fstab line of the README for a file system on a ublk device: systemd orders its
/// mount after ublkd (no ordering cycle in the journal), mounts it, and unmounts it
/// before ublkd stops; the data is there when both start again.
#[test]
fn an_fstab_mount_is_unmounted_before_ublkd_stops() {
    fresh_start();
    let file = backing("fstab", 64 << 20);
    let dev = add_loop(&file, &["--name", "data"]);
    run_ok(MKFS, &["-q", "-F", &dev]);
    run_ok("/usr/bin/udevadm", &["settle", "--timeout=30"]);
    std::fs::create_dir_all("/mnt/ublk").unwrap();
    let old = std::fs::read_to_string("/etc/fstab").unwrap_or_default();
    let _restore = FstabLine { old: old.clone() };
    let line = "/dev/ublkd/data /mnt/ublk ext4 _netdev,x-systemd.requires=ublkd.service 0 2\n";
    std::fs::write("/etc/fstab", format!("{old}{line}")).unwrap();
    systemctl(&["daemon-reload"]);
    let mount = "mnt-ublk.mount";
    let show = |p: &str| unit_property(mount, p);
    assert!(show("After").contains(UNIT), "After={}", show("After"));
    assert!(
        show("Requires").contains(UNIT),
        "Requires={}",
        show("Requires")
    );
    systemctl(&["start", mount]);
    // systemd logs an ordering cycle it had to break when it loads the units.
    let boot = run("/usr/bin/journalctl", &["-b", "--no-pager", "-o", "cat"]);
    let boot = String::from_utf8_lossy(&boot.stdout);
    assert!(!boot.contains("ordering cycle"), "{boot}");
    std::fs::write("/mnt/ublk/kept", b"written through the fstab mount").unwrap();

    // Stopping ublkd stops the mount first: unmounted, nothing failed, no hang.
    let started = Instant::now();
    systemctl(&["stop", UNIT]);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "stop took {:?}",
        started.elapsed()
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains("/mnt/ublk"),
        "still mounted after ublkd stopped"
    );
    assert_eq!(show("ActiveState").trim(), "inactive");
    assert_eq!(property("ActiveState"), "inactive");

    systemctl(&["start", UNIT]);
    wait_active(0);
    run_ok("/usr/bin/udevadm", &["settle", "--timeout=30"]);
    systemctl(&["start", mount]);
    assert_eq!(
        std::fs::read("/mnt/ublk/kept").unwrap(),
        b"written through the fstab mount"
    );
    systemctl(&["stop", mount]);
    drop(_restore);
    ctl_ok(&["del", "data"]);
    std::fs::remove_file(&file).unwrap();
}

/// Removes the socket-group drop-in again, whatever the test did.
struct DropIn(&'static str);

impl Drop for DropIn {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
        let _ = run("/usr/bin/systemctl", &["daemon-reload"]);
        let _ = run("/usr/bin/systemctl", &["restart", UNIT]);
    }
}

/// The drop-in example of the README (systemd/ublkd-socket-group.conf) as a user
/// installs it: the group's members may use ublkctl, others may not. The unit's
/// capability bounding set needs the drop-in's CAP_CHOWN for this.
#[test]
fn the_socket_group_drop_in_lets_the_group_in() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let _ = run("/usr/sbin/groupadd", &["--gid", "990", "ublk"]);
    let dir = "/etc/systemd/system/ublkd.service.d";
    std::fs::create_dir_all(dir).unwrap();
    let guard = DropIn("/etc/systemd/system/ublkd.service.d/socket-group.conf");
    std::fs::write(
        guard.0,
        include_str!("../../systemd/ublkd-socket-group.conf"),
    )
    .unwrap();
    systemctl(&["daemon-reload"]);
    fresh_start();
    let meta = std::fs::metadata(SOCKET).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 990);
    // nobody, with ublk as a supplementary group: served.
    let out = ctl_as(Path::new(SOCKET), 65534, 65534, &[990], &["list"]);
    assert!(
        out.status.success(),
        "{}\n---- journal ----\n{}",
        String::from_utf8_lossy(&out.stderr),
        journal()
    );
    // nobody alone: refused, in one line.
    let out = ctl_as(Path::new(SOCKET), 65534, 65534, &[], &["list"]);
    let line = expect_one_line_error(&out, "list as nobody");
    assert!(line.contains("Permission denied"), "{line}");
    drop(guard);
    wait_active(0);
    let mode = std::fs::metadata(SOCKET).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}
