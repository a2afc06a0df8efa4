//! The per-device options that are named values on the wire and on the command line
//! (`--direct-io`, `--buffer`, `--affinity`, the command path): their names, parsing
//! and defaults.

use serde::{Deserialize, Serialize};

/// Whether the loop target opens its backing file with O_DIRECT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirectIo {
    /// O_DIRECT when the file system and the block size allow it, buffered otherwise.
    #[default]
    Auto,
    /// O_DIRECT or fail.
    On,
    /// Buffered (page cache).
    Off,
}

impl DirectIo {
    pub const ALL: [DirectIo; 3] = [DirectIo::Auto, DirectIo::On, DirectIo::Off];

    pub fn name(self) -> &'static str {
        match self {
            DirectIo::Auto => "auto",
            DirectIo::On => "on",
            DirectIo::Off => "off",
        }
    }
}

impl std::str::FromStr for DirectIo {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DirectIo::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown direct-io setting '{s}' (expected auto, on or off)"))
    }
}

/// How request data moves between the kernel and the target. A property of the queue:
/// every target works with every mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BufferMode {
    /// The daemon owns one buffer per tag; the driver copies data in and out of it.
    Copy,
    /// The same per-tag buffers, registered with the queue's ring (READ_FIXED/WRITE_FIXED).
    Fixed,
    /// Zero copy: the request's own pages are registered in the ring for the time the
    /// target uses them (UBLK_U_IO_REGISTER_IO_BUF / UNREGISTER_IO_BUF, Linux 6.15).
    Zc,
    /// Zero copy with the driver registering the request's pages itself before it
    /// delivers the request (UBLK_F_AUTO_BUF_REG, Linux 6.16).
    AutoZc,
}

impl BufferMode {
    pub const ALL: [BufferMode; 4] = [
        BufferMode::Copy,
        BufferMode::Fixed,
        BufferMode::Zc,
        BufferMode::AutoZc,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BufferMode::Copy => "copy",
            BufferMode::Fixed => "fixed",
            BufferMode::Zc => "zc",
            BufferMode::AutoZc => "auto-zc",
        }
    }
}

impl std::fmt::Display for BufferMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BufferMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BufferMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = BufferMode::ALL.iter().map(|m| m.name()).collect();
                format!(
                    "unknown buffer mode '{s}' (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

/// Which CPUs a device's queue threads run on. The kernel maps every CPU to one hardware
/// queue (UBLK_U_CMD_GET_QUEUE_AFFINITY tells which); requests submitted on those CPUs
/// reach that queue's thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueAffinity {
    /// Pinned to one CPU of the queue's set: the one with the fewest of the daemon's
    /// queue threads, among the CPUs the daemon may use.
    #[default]
    Cpu,
    /// Free to run on any CPU of the queue's set (that the daemon may use).
    Set,
    /// Not pinned: wherever the scheduler puts it.
    Off,
}

impl QueueAffinity {
    pub const ALL: [QueueAffinity; 3] =
        [QueueAffinity::Cpu, QueueAffinity::Set, QueueAffinity::Off];

    pub fn name(self) -> &'static str {
        match self {
            QueueAffinity::Cpu => "cpu",
            QueueAffinity::Set => "set",
            QueueAffinity::Off => "off",
        }
    }
}

impl std::fmt::Display for QueueAffinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for QueueAffinity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        QueueAffinity::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown queue affinity '{s}' (expected cpu, set or off)"))
    }
}

/// How a device's queues exchange requests with the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CommandMode {
    /// One FETCH_REQ / COMMIT_AND_FETCH_REQ per request.
    PerTag,
    /// UBLK_F_BATCH_IO (Linux 7.0): lists of requests fetched and committed in batches.
    Batch,
}

impl CommandMode {
    pub fn name(self) -> &'static str {
        match self {
            CommandMode::PerTag => "per-tag",
            CommandMode::Batch => "batch",
        }
    }
}

impl std::fmt::Display for CommandMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The Ceph configuration an rbd device reads unless told otherwise (`--conf`).
pub const DEFAULT_CEPH_CONF: &str = "/etc/ceph/ceph.conf";

/// The LUKS format of an encrypted rbd image (`rbd encryption format IMAGE luks1|luks2`),
/// which librbd unlocks with a passphrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EncryptionFormat {
    Luks1,
    Luks2,
}

impl EncryptionFormat {
    pub const ALL: [EncryptionFormat; 2] = [EncryptionFormat::Luks1, EncryptionFormat::Luks2];

    pub fn name(self) -> &'static str {
        match self {
            EncryptionFormat::Luks1 => "luks1",
            EncryptionFormat::Luks2 => "luks2",
        }
    }
}

impl std::str::FromStr for EncryptionFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EncryptionFormat::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown encryption format '{s}' (expected luks1 or luks2)"))
    }
}

/// How an rbd device unlocks its encrypted image: the format and the file with the
/// passphrase (its path only: the daemon reads the file each time it opens the image).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RbdEncryption {
    pub format: EncryptionFormat,
    pub passphrase_file: String,
}

/// As `show` lists it: the format and the file's path (never its content).
impl std::fmt::Display for RbdEncryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, passphrase file {}",
            self.format.name(),
            self.passphrase_file
        )
    }
}

/// What an rbd device does when a snapshot of its image is taken (`rbd snap create`), so
/// that the snapshot holds a consistent file system (rbd-nbd's `--quiesce`). librbd asks
/// every client with such a watch before it takes the snapshot and waits for the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RbdQuiesce {
    /// Freeze every file system mounted from the device (FIFREEZE, as `fsfreeze -f`)
    /// and thaw them once the snapshot is taken.
    Freeze,
    /// Run this program as `PROGRAM DEVICE quiesce` before the snapshot and `PROGRAM
    /// DEVICE unquiesce` after it (rbd-nbd's `--quiesce-hook`, same arguments); a
    /// non-zero exit fails the snapshot.
    Hook(String),
}

/// As `show` lists it.
impl std::fmt::Display for RbdQuiesce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RbdQuiesce::Freeze => {
                f.write_str("at snapshots, freezes the file systems mounted from the device")
            }
            RbdQuiesce::Hook(p) => write!(f, "at snapshots, runs {p} DEVICE quiesce|unquiesce"),
        }
    }
}
