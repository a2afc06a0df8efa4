//! Real-kernel tests of who and what ublkd trusts: the control socket's peer checks
//! (root, or the `--socket-group` group), its whole-request deadline and connection cap,
//! the loop target's refusal of FIFOs, sockets, character devices and block devices in
//! use, and a restore that refuses a backing file replaced by another. They run inside
//! the test VM (tests/run-vm-tests.sh) as root; without /dev/ublk-control they fail.

use serde_json::Value;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use ublkd_tests::*;

fn require_ublk() {
    assert!(
        Path::new("/dev/ublk-control").exists(),
        "/dev/ublk-control is missing: these tests must run in the test VM (tests/run-vm-tests.sh)"
    );
}

/// The group the tests let in, and an unprivileged user that is not in it.
const GROUP: &str = "ublk";
const GID: u32 = 990;
const USER: u32 = 1000;

/// Adds group `ublk` (gid 990) to the throwaway VM's /etc/group.
fn ensure_group() {
    let groups = std::fs::read_to_string("/etc/group").unwrap();
    if !groups.lines().any(|l| l.starts_with("ublk:")) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open("/etc/group")
            .unwrap();
        writeln!(f, "{GROUP}:x:{GID}:").unwrap();
    }
}

/// A daemon for `test` with an empty state directory and `extra` arguments.
fn fresh_daemon(test: &str, extra: &[&str]) -> Daemon {
    let _ = std::fs::remove_dir_all(format!("/tmp/ublkd-{test}/state"));
    let _ = std::fs::remove_file(format!("/tmp/ublkd-{test}.log"));
    Daemon::start_with(test, extra)
}

fn backing(name: &str, size: u64) -> PathBuf {
    let path = PathBuf::from(format!("/tmp/backing-sec-{name}.img"));
    let _ = std::fs::remove_file(&path);
    File::create(&path).unwrap().set_len(size).unwrap();
    path
}

fn entry(d: &Daemon, id: u64) -> Value {
    d.list_json()
        .into_iter()
        .find(|e| e["id"].as_u64() == Some(id))
        .unwrap_or_else(|| panic!("device {id} is not listed:\n{}", d.log_text()))
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn only_root_and_the_socket_group_may_use_the_socket() {
    require_ublk();
    ensure_group();
    let d = fresh_daemon("sec-group", &["--socket-group", GROUP]);
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), GID);

    // Not in the group: the socket's mode keeps the user out.
    let out = ctl_as(&d.socket, USER, USER, &[], &["list"]);
    let line = expect_one_line_error(&out, "list as a stranger");
    assert!(
        line.contains("Permission denied") && line.contains("--socket-group"),
        "{line}"
    );
    // With the mode opened by mistake, the peer check still refuses, and logs it.
    set_mode(&d.socket, 0o666);
    let out = ctl_as(&d.socket, USER, USER, &[], &["list"]);
    let line = expect_one_line_error(&out, "list as a stranger, socket 0666");
    assert_eq!(
        line,
        "ublkctl: permission denied: uid 1000 is not root and not in group 'ublk' (ublkd --socket-group)"
    );
    let log = d.log_text();
    assert!(
        log.contains("refused: permission denied: uid 1000") && log.contains("uid 1000"),
        "{log}"
    );
    set_mode(&d.socket, 0o660);

    // In the group, as the primary group or a supplementary one: served.
    for (gid, groups) in [(GID, vec![]), (USER, vec![7, GID])] {
        let out = ctl_as(&d.socket, USER, gid, &groups, &["list", "--json"]);
        assert!(
            out.status.success(),
            "gid {gid} groups {groups:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v.is_array(), "{v}");
    }
    // Root, of course.
    assert!(d.list_json().is_empty());
}

#[test]
fn without_a_socket_group_only_root_is_served() {
    require_ublk();
    ensure_group();
    let d = fresh_daemon("sec-root", &[]);
    assert_eq!(
        std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
    set_mode(&d.socket, 0o666);
    // Even a member of the group a daemon started with --socket-group would let in.
    let out = ctl_as(&d.socket, USER, GID, &[GID], &["list"]);
    let line = expect_one_line_error(&out, "list as a user, no socket group");
    assert_eq!(
        line,
        "ublkctl: permission denied: uid 1000 is not root (ublkd --socket-group GROUP lets a group in)"
    );
    assert!(d.log_text().contains("refused"), "{}", d.log_text());
    d.ctl_ok(&["list"]);
}

#[test]
fn an_unknown_socket_group_stops_the_start() {
    let out = Command::new(ublkd_bin())
        .args([
            "--socket",
            "/tmp/ublkd-sec-nogroup/ublkd.sock",
            "--state-dir",
            "/tmp/ublkd-sec-nogroup/state",
            "--socket-group",
            "no-such-group",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "ublkd: --socket-group no-such-group: no such group (create it first: groupadd no-such-group)"
        ),
        "{err}"
    );
    assert!(!Path::new("/tmp/ublkd-sec-nogroup/ublkd.sock").exists());
}

#[test]
fn a_trickling_client_is_cut_off_while_others_are_served() {
    require_ublk();
    let d = fresh_daemon("sec-slow", &[]);
    let mut slow = UnixStream::connect(&d.socket).unwrap();
    let mut answer = slow.try_clone().unwrap();
    let start = Instant::now();
    // One byte a second: no single read waits long, the request never ends.
    let trickle = std::thread::spawn(move || {
        for _ in 0..30 {
            if slow.write_all(b" ").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    for _ in 0..3 {
        let t = Instant::now();
        d.ctl_ok(&["list"]);
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        std::thread::sleep(Duration::from_secs(1));
    }
    answer
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut text = String::new();
    let _ = answer.read_to_string(&mut text);
    let took = start.elapsed();
    assert_eq!(
        text,
        "{\"error\":\"cannot read the request: not sent within 10 s\"}\n"
    );
    assert!(
        took >= Duration::from_millis(9500) && took < Duration::from_secs(14),
        "cut off after {took:?}"
    );
    trickle.join().unwrap();
    assert!(
        d.log_text().contains("not sent within 10 s"),
        "{}",
        d.log_text()
    );
}

#[test]
fn control_connections_are_capped() {
    require_ublk();
    let d = fresh_daemon("sec-cap", &[]);
    let idle: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    let line = d.ctl_err(&["list"]);
    assert_eq!(
        line,
        "ublkctl: too many control connections (64 at once); try again"
    );
    assert!(
        d.log_text().contains("too many control connections"),
        "{}",
        d.log_text()
    );
    drop(idle);
    // The idle clients' slots come back once the daemon sees them gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !d.ctl(&["list"]).status.success() {
        assert!(Instant::now() < deadline, "slots not given back");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn fifos_sockets_and_character_devices_are_refused() {
    require_ublk();
    let d = fresh_daemon("sec-types", &[]);
    let fifo = PathBuf::from("/tmp/sec-fifo");
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new("/tmp/sec-fifo").unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let sock_path = PathBuf::from("/tmp/sec-sock");
    let _ = std::fs::remove_file(&sock_path);
    let _listener = std::os::unix::net::UnixListener::bind(&sock_path).unwrap();
    for (path, kind) in [
        ("/tmp/sec-fifo", "FIFO"),
        ("/tmp/sec-sock", "socket"),
        ("/dev/null", "character device"),
    ] {
        let t = Instant::now();
        let line = d.ctl_err(&["add", "loop", "--file", path]);
        assert!(
            line.contains(&format!(
                "{path} is a {kind}, not a regular file or block device"
            )),
            "{line}"
        );
        // A FIFO with no writer must not hang the add.
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
    assert!(d.list_json().is_empty());
    std::fs::remove_file(&fifo).unwrap();
    std::fs::remove_file(&sock_path).unwrap();
}

#[test]
fn a_block_device_in_use_is_refused_and_held_while_served() {
    require_ublk();
    let d = fresh_daemon("sec-busy", &[]);
    let img = backing("ext4", 64 << 20);
    let img = img.to_str().unwrap();
    run_ok("/usr/sbin/mkfs.ext4", &["-q", "-F", img]);
    let loopdev = run_ok("/usr/sbin/losetup", &["-f", "--show", img])
        .trim()
        .to_string();
    let mnt = "/tmp/sec-busy-mnt";
    std::fs::create_dir_all(mnt).unwrap();
    run_ok("/bin/mount", &["-t", "ext4", &loopdev, mnt]);
    let line = d.ctl_err(&["add", "loop", "--file", &loopdev]);
    assert!(
        line.contains(&format!(
            "{loopdev} is in use (mounted, or held by another user such as md, LVM or another ublk device); unmount or release it first"
        )),
        "{line}"
    );
    run_ok("/bin/umount", &[mnt]);
    // Free now: served, and held so that nobody mounts it behind ublkd's back.
    let dev = d.add(&["loop", "--file", &loopdev]);
    let out = Command::new("/bin/mount")
        .args(["-t", "ext4", &loopdev, mnt])
        .output()
        .unwrap();
    assert!(!out.status.success(), "mounted a device ublkd serves");
    // A second ublk device on the same block device: refused the same way.
    let line = d.ctl_err(&["add", "loop", "--file", &loopdev]);
    assert!(line.contains("is in use"), "{line}");
    // The file system is there through the ublk device.
    run_ok("/usr/sbin/e2fsck", &["-fn", &dev]);
    d.del(&dev);
    run_ok("/usr/sbin/losetup", &["-d", &loopdev]);
    std::fs::remove_file(img).unwrap();
}

#[test]
fn a_replaced_backing_file_fails_its_device_and_the_others_serve() {
    require_ublk();
    let test = "sec-replaced";
    let mut d = fresh_daemon(test, &[]);
    let keep = backing("keep", 32 << 20);
    let swap = backing("swap", 32 << 20);
    let keep_dev = d.add(&["loop", "--file", keep.to_str().unwrap()]);
    let swap_dev = d.add(&["loop", "--file", swap.to_str().unwrap()]);
    let swap_id = dev_id(&swap_dev);
    let record =
        std::fs::read_to_string(format!("/tmp/ublkd-{test}/state/devices/{swap_id}.json")).unwrap();
    assert!(record.contains("\"backing\""), "{record}");

    // Stopped (devices removed, records kept); the file is replaced by another one of
    // the same size at the same path.
    assert_eq!(d.stop(), Some(0));
    std::fs::remove_file(&swap).unwrap();
    File::create(&swap).unwrap().set_len(32 << 20).unwrap();
    let mut d = Daemon::start_with(test, &[]);
    fio(&verify_job(&keep_dev, "randwrite", "4k", "16M", 16));
    let e = entry(&d, swap_id);
    assert_eq!(e["state"], "failed", "{e}");
    let why = e["error"].as_str().unwrap();
    let expected = format!(
        "the backing file {} is no longer the file this device was created on (inode ",
        swap.display()
    );
    assert!(
        why.starts_with(&expected) && why.contains(", now inode "),
        "{why}"
    );
    assert!(!Path::new(&swap_dev).exists(), "{swap_dev} is served");
    let err = d.ctl_err(&["recover", &swap_id.to_string()]);
    assert!(err.contains("is no longer the file"), "{err}");
    // Forgotten and added again: the new file is served.
    d.ctl_ok(&["del", &swap_id.to_string()]);
    let swap_dev = d.add(&["loop", "--file", swap.to_str().unwrap()]);
    let swap_id = dev_id(&swap_dev);

    // A crash, and the file replaced before the next daemon recovers the device the
    // kernel kept: that device fails too, the other is recovered.
    d.kill9();
    std::fs::remove_file(&swap).unwrap();
    File::create(&swap).unwrap().set_len(32 << 20).unwrap();
    let d = Daemon::start_with(test, &[]);
    fio(&verify_job(&keep_dev, "randwrite", "4k", "16M", 16));
    let e = entry(&d, swap_id);
    assert_eq!(e["state"], "failed", "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("is no longer the file this device was created on"),
        "{e}"
    );
    // del gives the held device up.
    d.del(&swap_dev);
    d.del(&keep_dev);
    std::fs::remove_file(&keep).unwrap();
    std::fs::remove_file(&swap).unwrap();
}
