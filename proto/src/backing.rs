//! The identity of a device's backing file or block device, as a device record keeps it.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The identity of a backing file or block device, as found by `fstat` on the open
/// descriptor: what a device record keeps so that a restore never serves a different
/// file that took the recorded one's path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum BackingId {
    /// A regular file: its file system's device number, inode number, and inode
    /// generation (FS_IOC_GETVERSION; 0 where the file system has none).
    File { dev: u64, ino: u64, generation: u64 },
    /// A block device: its device number (major:minor), and the boot it was taken in
    /// (`/proc/sys/kernel/random/boot_id`): device numbers are handed out anew at
    /// every boot, so they are compared only within one.
    BlockDevice {
        rdev: u64,
        #[serde(default)]
        boot: String,
    },
}

impl BackingId {
    /// Whether `now` is still the file or device this identity was taken from.
    ///
    /// A file is the same when its inode number and generation are. The generation
    /// tells a reused inode number apart (ext4 gives a new file the number of one just
    /// deleted). The file system's device number is compared only where the file system
    /// has no generations: on some (btrfs, or disks found in another order) it changes
    /// between boots while the file does not.
    pub fn same_as(&self, now: &BackingId) -> bool {
        match (self, now) {
            (
                BackingId::File {
                    dev,
                    ino,
                    generation,
                },
                BackingId::File {
                    dev: dev2,
                    ino: ino2,
                    generation: generation2,
                },
            ) => ino == ino2 && generation == generation2 && (*generation != 0 || dev == dev2),
            (
                BackingId::BlockDevice { rdev, boot },
                BackingId::BlockDevice {
                    rdev: rdev2,
                    boot: boot2,
                },
            ) => rdev == rdev2 || (!boot.is_empty() && !boot2.is_empty() && boot != boot2),
            _ => false,
        }
    }
}

impl fmt::Display for BackingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackingId::File {
                ino, generation: 0, ..
            } => write!(f, "inode {ino}"),
            BackingId::File {
                ino, generation, ..
            } => write!(f, "inode {ino} generation {generation}"),
            BackingId::BlockDevice { rdev, .. } => write!(
                f,
                "block device {}:{}",
                libc::major(*rdev as libc::dev_t),
                libc::minor(*rdev as libc::dev_t)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_ids_tell_replaced_files_apart() {
        let file = |dev, ino, generation| BackingId::File {
            dev,
            ino,
            generation,
        };
        assert!(file(1, 12, 7).same_as(&file(1, 12, 7)));
        // Another inode, or the same number reused by a new file.
        assert!(!file(1, 12, 7).same_as(&file(1, 13, 7)));
        assert!(!file(1, 12, 7).same_as(&file(1, 12, 8)));
        // A file system's device number may change between boots; the generation
        // does not.
        assert!(file(1, 12, 7).same_as(&file(2, 12, 7)));
        // Without generations the device number has to do.
        assert!(!file(1, 12, 0).same_as(&file(2, 12, 0)));
        assert!(file(1, 12, 0).same_as(&file(1, 12, 0)));
        let disk = |major, boot: &str| BackingId::BlockDevice {
            rdev: libc::makedev(major, 16),
            boot: boot.into(),
        };
        assert!(disk(8, "a").same_as(&disk(8, "a")));
        assert!(!disk(8, "a").same_as(&disk(9, "a")));
        // After a reboot, a device number says nothing.
        assert!(disk(8, "a").same_as(&disk(9, "b")));
        assert!(!disk(8, "").same_as(&disk(9, "b")));
        assert!(!disk(8, "a").same_as(&file(8, 16, 0)));
        let disk = disk(8, "a");
        assert_eq!(disk.to_string(), "block device 8:16");
        assert_eq!(file(1, 12, 0).to_string(), "inode 12");
        assert_eq!(file(1, 12, 7).to_string(), "inode 12 generation 7");
        let json = serde_json::to_string(&file(1, 12, 7)).unwrap();
        assert_eq!(json, r#"{"kind":"file","dev":1,"ino":12,"generation":7}"#);
        assert_eq!(
            serde_json::from_str::<BackingId>(&json).unwrap(),
            file(1, 12, 7)
        );
    }
}
