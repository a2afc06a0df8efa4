//! Who holds a device open, and the kernel's "stop only if nobody does"
//! (UBLK_U_CMD_TRY_STOP_DEV), for `ublkctl del` without `--force`.
//!
//! [`holders`] looks from userspace, to name the holders in the refusal: mounts
//! (/proc/self/mountinfo), stacked devices (/sys/block/ublkbN/holders: dm, md, ...),
//! swap, and processes with the disk or one of its partitions open (/proc/PID/fd).
//! It cannot see kernel users outside those, and a holder may come between the look
//! and the stop: on kernels with UBLK_F_SAFE_STOP_DEV (7.0), [`try_stop`] closes that
//! gap, stopping the device only while the disk has no opener and blocking new opens.

use io_uring::{opcode, squeue, types, IoUring};
use libublk::sys;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::time::{Duration, Instant};

/// How long a device only briefly open (udev's blkid probe after add or a partition
/// rescan, a monitoring tool) is waited for before `del` calls it in use.
pub const SETTLE: Duration = Duration::from_secs(2);

/// [`holders`], waiting up to [`SETTLE`] while only processes hold the device (mounts,
/// stacked devices and swap do not go away by themselves).
pub fn settled_holders(id: u32) -> Vec<String> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let found = holders(id);
        let only_processes = found.iter().all(|h| h.starts_with(OPEN_BY));
        if found.is_empty() || !only_processes || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How [`holders`] words a process that has the device open.
const OPEN_BY: &str = "open by pid";

/// What holds `/dev/ublkbID` (or a partition of it), in words; empty when nothing
/// userspace can see does.
pub fn holders(id: u32) -> Vec<String> {
    let disk = format!("ublkb{id}");
    let devs = disk_devs(&disk);
    if devs.is_empty() {
        return Vec::new();
    }
    let mut found = Vec::new();
    // Mounts: field 3 of mountinfo is MAJOR:MINOR, field 5 the mount point.
    if let Ok(info) = fs::read_to_string("/proc/self/mountinfo") {
        for line in info.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() > 4 && devs.iter().any(|(_, mm)| mm == f[2]) {
                found.push(format!("mounted on {}", unescape(f[4])));
            }
        }
    }
    // Stacked devices (device mapper, md, bcache...).
    for (name, _) in &devs {
        let dir = if *name == disk {
            format!("/sys/block/{disk}/holders")
        } else {
            format!("/sys/block/{disk}/{name}/holders")
        };
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            found.push(format!("held by {}", e.file_name().to_string_lossy()));
        }
    }
    if let Ok(swaps) = fs::read_to_string("/proc/swaps") {
        for line in swaps.lines().skip(1) {
            let dev = line.split_whitespace().next().unwrap_or("");
            if devs.iter().any(|(name, _)| dev == format!("/dev/{name}")) {
                found.push(format!("used as swap ({dev})"));
            }
        }
    }
    found.extend(openers(&devs));
    found.dedup();
    found
}

/// The disk and its partitions as (name, "MAJOR:MINOR").
fn disk_devs(disk: &str) -> Vec<(String, String)> {
    let read = |p: String| fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    let Some(mm) = read(format!("/sys/block/{disk}/dev")) else {
        return Vec::new();
    };
    let mut devs = vec![(disk.to_string(), mm)];
    for e in fs::read_dir(format!("/sys/block/{disk}"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(disk) {
            if let Some(mm) = read(format!("/sys/block/{disk}/{name}/dev")) {
                devs.push((name, mm));
            }
        }
    }
    devs
}

/// Processes (other than this one) with one of `devs` open.
fn openers(devs: &[(String, String)]) -> Vec<String> {
    let me = std::process::id().to_string();
    let wanted: Vec<(u64, &str)> = devs
        .iter()
        .filter_map(|(name, mm)| {
            let (ma, mi) = mm.split_once(':')?;
            Some((
                libc::makedev(ma.parse().ok()?, mi.parse().ok()?),
                name.as_str(),
            ))
        })
        .collect();
    let mut found = Vec::new();
    for proc_entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = proc_entry.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(meta) = fs::metadata(fd.path()) else {
                continue;
            };
            if !meta.file_type().is_block_device() {
                continue;
            }
            if let Some((_, name)) = wanted.iter().find(|(dev, _)| *dev == meta.rdev()) {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                found.push(format!("{OPEN_BY} {pid} ({}) as /dev/{name}", comm.trim()));
                break;
            }
        }
    }
    found
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// UBLK_U_CMD_TRY_STOP_DEV: stops device `id` as STOP_DEV does, but only if its disk
/// has no opener, and then lets nobody open it. Err(EBUSY) when it is still open after
/// [`SETTLE`]: nothing changed, the device still serves.
pub fn try_stop(id: u32) -> io::Result<()> {
    let deadline = Instant::now() + SETTLE;
    loop {
        match try_stop_once(id) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

fn try_stop_once(id: u32) -> io::Result<()> {
    let control = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(crate::kernel::CONTROL_DEVICE)?;
    let mut ring: IoUring<squeue::Entry128> = IoUring::builder().build(2)?;
    let cmd = sys::ublksrv_ctrl_cmd {
        dev_id: id,
        queue_id: u16::MAX,
        ..Default::default()
    };
    let mut bytes = [0u8; 80];
    // SAFETY: ublksrv_ctrl_cmd is a plain C struct of 32 bytes (bindgen checks its
    // layout), read here as bytes into a larger buffer; nothing is aliased.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&cmd as *const sys::ublksrv_ctrl_cmd).cast::<u8>(),
            bytes.as_mut_ptr(),
            std::mem::size_of::<sys::ublksrv_ctrl_cmd>(),
        );
    }
    let sqe = opcode::UringCmd80::new(types::Fd(control.as_raw_fd()), sys::UBLK_U_CMD_TRY_STOP_DEV)
        .cmd(bytes)
        .build();
    // SAFETY: the command's bytes are copied into the SQE and it points at no memory;
    // the control file outlives the ring's wait below.
    unsafe { ring.submission().push(&sqe) }
        .map_err(|_| io::Error::other("the control ring is full"))?;
    ring.submit_and_wait(1)?;
    let res = ring
        .completion()
        .next()
        .map(|c| c.result())
        .ok_or_else(|| io::Error::other("no completion for TRY_STOP_DEV"))?;
    if res < 0 {
        return Err(io::Error::from_raw_os_error(-res));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_unescaped() {
        assert_eq!(unescape("/mnt/my\\040disk"), "/mnt/my disk");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn a_device_that_does_not_exist_has_no_holders() {
        assert!(holders(1_048_575).is_empty());
    }
}
