//! What a device is served by (`TargetSpec`): the target and its own options, as
//! `ublkctl add` sends them and the device's record keeps them.

use crate::message::is_false;
use crate::options::{DirectIo, QueueAffinity, RbdEncryption, RbdQuiesce};
use serde::{Deserialize, Serialize};

/// Which backend serves the device, with its own options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum TargetSpec {
    /// Completes every request at once without touching data.
    Null { size: u64 },
    /// A client of an NBD export; one connection per queue.
    Nbd {
        uri: String,
        /// Seconds to keep reconnecting after a connection drops (0: fail at once);
        /// 30 when left out.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reconnect_timeout: Option<u32>,
        /// Seconds a request may wait for its reply before the connection counts as lost
        /// (0: no limit); 30 when left out.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_timeout: Option<u32>,
    },
    /// A Ceph RBD image through librbd.
    Rbd {
        /// `[POOL/[NAMESPACE/]]IMAGE[@SNAP]`, as the `rbd` tool writes it.
        image: String,
        /// A snapshot by its id, for an image without `@SNAP` (rbd-nbd's `--snap-id`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snap_id: Option<u64>,
        /// The cluster's ceph.conf; when left out, /etc/ceph/ceph.conf if it exists (the
        /// monitors may come from a `mon_host` option instead).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conf: Option<String>,
        /// The Ceph user without `client.`; `admin` when left out.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// The keyring file's path (the key itself is never sent or recorded).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        keyring: Option<String>,
        /// Map read-only (a snapshot always is).
        #[serde(default, skip_serializing_if = "is_false")]
        read_only: bool,
        /// Take the image's exclusive lock at open and refuse it to other clients while
        /// the device exists (rbd-nbd's `--exclusive`).
        #[serde(default, skip_serializing_if = "is_false")]
        exclusive: bool,
        /// Unlock the image's LUKS encryption with the passphrase in this file (rbd-nbd's
        /// `--encryption-format` and `--encryption-passphrase-file`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        encryption: Option<RbdEncryption>,
        /// Quiesce the device's file systems when a snapshot of the image is taken
        /// (rbd-nbd's `--quiesce` and `--quiesce-hook`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quiesce: Option<RbdQuiesce>,
        /// Seconds a request waits for its OSD before it fails with EIO (librados'
        /// `rados_osd_op_timeout`, at least 1); 60 when left out. Also bounds how long
        /// `del` waits for requests an unreachable cluster holds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        osd_timeout: Option<u32>,
        /// Ceph configuration options for this device's cluster connection, as
        /// `(name, value)` in the order given: over the conf file's and over ublkd's own
        /// librbd defaults, as `rbd-nbd map --NAME=VALUE` gives them. The daemon refuses
        /// `key` (a secret belongs in the keyring file) and the options its own flags set.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        options: Vec<(String, String)>,
    },
    /// Exports a regular file or a block device.
    Loop {
        file: String,
        #[serde(default)]
        direct_io: DirectIo,
        #[serde(default)]
        read_only: bool,
    },
}

impl TargetSpec {
    pub fn name(&self) -> &'static str {
        match self {
            TargetSpec::Null { .. } => "null",
            TargetSpec::Loop { .. } => "loop",
            TargetSpec::Nbd { .. } => "nbd",
            TargetSpec::Rbd { .. } => "rbd",
        }
    }

    /// Where the queue threads run when the request does not say. The nbd target's
    /// requests are served by another process (the server, often on the same host),
    /// and its queue thread mostly waits for the socket: pinned to one CPU it queues
    /// behind the server or the submitter while the other CPUs idle, so it may run on
    /// any CPU of its queue's set. The other targets do a request's work in the queue
    /// thread (null, loop) or measured no difference (rbd), and are pinned as rublk
    /// and ublksrv pin theirs. Measured in docs/research/issue-12-speed.md 8.
    pub fn default_affinity(&self) -> QueueAffinity {
        match self {
            TargetSpec::Nbd { .. } => QueueAffinity::Set,
            _ => QueueAffinity::Cpu,
        }
    }
}
