//! Writing back a device's dirty pages before it is stopped.
//!
//! The driver fails every request that arrives after STOP_DEV began when the device has
//! UBLK_F_USER_RECOVERY (ublk_stop_dev force-aborts its queues once the requests in
//! flight are done), so the writeback `del_gendisk` starts would fail. ublkd therefore
//! writes the device's page cache back itself first, while its queues still serve: the
//! raw device's (`fsync`) and that of every file system mounted from it (`syncfs`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// Writes back what the page cache holds for `/dev/ublkb{id}`. Best effort: a failure
/// is logged (the requests that failed have already been counted as errors).
pub fn write_back(id: u32) {
    let path = format!("/dev/ublkb{id}");
    let dev = match File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            log::debug!("dev {id}: cannot open {path} to write it back: {e}");
            return;
        }
    };
    if let Ok(meta) = dev.metadata() {
        let rdev = meta.rdev();
        let id_str = format!("{}:{}", libc::major(rdev), libc::minor(rdev));
        for dir in mount_points(
            &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
            &id_str,
        ) {
            match File::open(&dir) {
                // SAFETY: syncfs on a descriptor we own.
                Ok(d) if unsafe { libc::syncfs(d.as_raw_fd()) } == 0 => {}
                Ok(_) => log::warn!(
                    "dev {id}: writing back the file system at {dir}: {}",
                    std::io::Error::last_os_error()
                ),
                Err(e) => log::warn!("dev {id}: cannot open {dir} to write it back: {e}"),
            }
        }
    }
    if let Err(e) = dev.sync_all() {
        log::warn!("dev {id}: writing back {path}: {e}");
    }
}

/// The mount points in `mountinfo` (proc_pid_mountinfo(5)) of the device `maj:min`.
fn mount_points(mountinfo: &str, maj_min: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(2) == Some(&maj_min)).then(|| f.get(4).map(|m| unescape(m)))?
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_of_a_device() {
        let info = "22 1 259:1 / / rw shared:1 - ext4 /dev/vda rw\n\
                    40 22 259:3 / /mnt/my\\040disk rw - xfs /dev/ublkb3 rw\n\
                    41 22 259:3 /sub /srv rw - xfs /dev/ublkb3 rw\n";
        assert_eq!(mount_points(info, "259:3"), ["/mnt/my disk", "/srv"]);
        assert!(mount_points(info, "259:4").is_empty());
        assert_eq!(unescape("a\\134b\\"), "a\\b\\");
    }
}
