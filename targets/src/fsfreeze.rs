//! Freezing the file systems mounted from a block device, as `fsfreeze -f` does: FIFREEZE
//! on each mount point makes its file system write back what it holds (data, journal)
//! and hold every new write until FITHAW. The device then holds a consistent file
//! system, which is what a snapshot of its backend needs (the rbd target's `--quiesce`).
//!
//! The mounts are the ones of the daemon's mount namespace (`/proc/self/mountinfo`), of
//! the device itself and of its partitions; a file system mounted at several places is
//! frozen once.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` (linux/fs.h).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// File systems this freezes hold until dropped (or [`Frozen::thaw`]).
#[derive(Debug, Default)]
pub struct Frozen {
    /// Each frozen file system's mount point, open.
    mounts: Vec<(String, File)>,
}

impl Frozen {
    /// The mount points of the file systems mounted from `device` (`/dev/ublkbN`) or
    /// one of its partitions, one per file system.
    pub fn mounts_of(device: &str) -> Result<Vec<String>, String> {
        let rdev = std::fs::metadata(device)
            .map_err(|e| format!("cannot stat {device}: {e}"))?
            .rdev();
        let name = Path::new(device)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(device)
            .to_string();
        let info = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let mut seen = Vec::new();
        let mut points = Vec::new();
        for Mount { dev, point, source } in mounts(&info) {
            let ours = of_device(dev, rdev, &name) || of_source(&source, device);
            if ours && !seen.contains(&dev) {
                seen.push(dev);
                points.push(point);
            }
        }
        Ok(points)
    }

    /// Freezes the file systems at `points`. On an error, those frozen already are
    /// thawed again.
    pub fn freeze(points: &[String]) -> Result<Frozen, String> {
        let mut frozen = Frozen::default();
        for mount in points {
            let f = File::open(mount).map_err(|e| format!("cannot open {mount}: {e}"))?;
            // SAFETY: FIFREEZE takes no argument memory; `f` is an open directory.
            if unsafe { libc::ioctl(f.as_raw_fd(), FIFREEZE, 0) } != 0 {
                let e = io::Error::last_os_error();
                return Err(format!("cannot freeze the file system on {mount}: {e}"));
            }
            log::info!("froze the file system on {mount}");
            frozen.mounts.push((mount.clone(), f));
        }
        Ok(frozen)
    }

    /// Freezes every file system mounted from `device` or one of its partitions. None
    /// mounted is no error.
    pub fn device(device: &str) -> Result<Frozen, String> {
        Frozen::freeze(&Frozen::mounts_of(device)?)
    }

    /// The mount points frozen.
    pub fn mount_points(&self) -> Vec<&str> {
        self.mounts.iter().map(|(m, _)| m.as_str()).collect()
    }

    /// Thaws what this froze.
    pub fn thaw(self) {
        drop(self)
    }

    /// Closes the mount points and leaves their file systems frozen, as a process that
    /// dies while they are does (the kernel keeps the freeze): for tests of what undoes it.
    pub fn abandon(mut self) {
        self.mounts.clear();
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for (mount, f) in self.mounts.drain(..) {
            // SAFETY: FITHAW takes no argument memory; `f` is an open directory.
            if unsafe { libc::ioctl(f.as_raw_fd(), FITHAW, 0) } != 0 {
                let e = io::Error::last_os_error();
                log::error!(
                    "cannot thaw the file system on {mount}: {e}; run 'fsfreeze -u {mount}'"
                );
            } else {
                log::info!("thawed the file system on {mount}");
            }
        }
    }
}

/// Thaws the file system at `mount` if it is frozen (whoever froze it): true when it
/// was.
pub fn thaw(mount: &str) -> io::Result<bool> {
    let f = File::open(mount)?;
    // SAFETY: FITHAW takes no argument memory; `f` is an open directory.
    if unsafe { libc::ioctl(f.as_raw_fd(), FITHAW, 0) } == 0 {
        return Ok(true);
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        e => Err(e),
    }
}

/// One line of a mountinfo.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    /// Field 3, `MAJ:MIN` (an anonymous 0:N for btrfs and the like).
    dev: u64,
    /// Field 5, unescaped.
    point: String,
    /// The mount source after the ` - ` separator, unescaped (`/dev/ublkb0p1`).
    source: String,
}

/// The mounts of a mountinfo, lines it cannot read left out.
fn mounts(info: &str) -> impl Iterator<Item = Mount> + '_ {
    info.lines().filter_map(|line| {
        let (head, tail) = line.split_once(" - ")?;
        let mut f = head.split(' ');
        let (maj, min) = f.nth(2)?.split_once(':')?;
        let point = unescape(f.nth(1)?);
        let source = unescape(tail.split(' ').nth(1)?);
        let dev = libc::makedev(maj.parse().ok()?, min.parse().ok()?);
        Some(Mount { dev, point, source })
    })
}

/// Whether device number `dev` is `rdev` (the disk `name`) or one of its partitions.
fn of_device(dev: u64, rdev: u64, name: &str) -> bool {
    if dev == rdev {
        return true;
    }
    let link = format!("/sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev));
    match std::fs::read_link(&link) {
        Ok(target) => {
            let parent = target.parent().and_then(|p| p.file_name());
            parent.and_then(|p| p.to_str()) == Some(name)
                && Path::new(&link).join("partition").exists()
        }
        Err(_) => false,
    }
}

/// Whether a mount source names `device` or one of its partitions (`DEVICEpN`).
fn of_source(source: &str, device: &str) -> bool {
    match source.strip_prefix(device) {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix('p')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit())),
        None => false,
    }
}

/// A mountinfo path with its octal escapes (`\040` for a space) decoded.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_the_device_and_the_unescaped_mount_point() {
        let info = "36 35 98:0 / /mnt1 rw,noatime master:1 - ext4 /dev/root rw\n\
                    37 35 259:3 /sub /mnt\\040two rw shared:2 - xfs /dev/ublkb0p1 rw\n\
                    bad line\n";
        let m: Vec<_> = mounts(info).collect();
        assert_eq!(
            m,
            vec![
                Mount {
                    dev: libc::makedev(98, 0),
                    point: "/mnt1".into(),
                    source: "/dev/root".into()
                },
                Mount {
                    dev: libc::makedev(259, 3),
                    point: "/mnt two".into(),
                    source: "/dev/ublkb0p1".into()
                },
            ]
        );
        assert_eq!(unescape("a\\134b\\"), "a\\b\\");
        assert!(of_source("/dev/ublkb0p1", "/dev/ublkb0"));
        assert!(of_source("/dev/ublkb0", "/dev/ublkb0"));
        assert!(!of_source("/dev/ublkb01", "/dev/ublkb0"));
        assert!(!of_source("/dev/ublkb0p", "/dev/ublkb0"));
    }

    #[test]
    fn a_device_with_nothing_mounted_freezes_nothing() {
        // /dev/null is a device no file system is mounted from.
        let f = Frozen::device("/dev/null").unwrap();
        assert!(f.mount_points().is_empty());
        assert!(Frozen::device("/dev/no-such-device")
            .unwrap_err()
            .contains("cannot stat /dev/no-such-device"));
    }
}
