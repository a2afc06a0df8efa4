//! The `rbd` target: a Ceph RBD image through librbd.
//!
//! One cluster connection and one open image per device, shared by its queues (librbd's
//! image handle is thread safe). One handle per queue would be one exclusive-lock owner
//! per queue, and librbd would pass the image's lock back and forth between them on
//! every write (measured: 4k random writes at 0.58x over two queues; on images without
//! exclusive-lock no reproducible gain; docs/research/issue-15-rbd-speed.md section 5).
//! Each queue starts its requests with librbd's asynchronous calls (`queue.rs`); librbd
//! reports each result from its own threads to the queue's [`rados::Completions`], which
//! signals an eventfd that the queue's io_uring reads, so the queue thread never waits
//! inside librbd.
//!
//! librbd reads and writes process memory. In `copy` and `fixed` mode it gets the
//! request's daemon buffer; in the zero-copy modes (`auto-zc`, the default where the
//! kernel has it, and `zc`) each tag has a slot of a memfd, and the queue copies the
//! data between the request's pages and the slot on its ring (`queue.rs`).
//!
//! The device follows the image's size: a watch on the image (`watch.rs`) tells the
//! daemon of every change made elsewhere (`rbd resize`), and the daemon resizes the
//! device to the image's new size ([`crate::Target::watch_size`]). With `--quiesce`, a
//! second watch freezes the device's file systems while a snapshot of the image is
//! taken (`quiesce.rs`, [`crate::Target::watch_quiesce`]).
//!
//! The unsafe FFI (`sys.rs`) and its safe handles (`rados.rs`, `image.rs`) are built with the `rbd`
//! feature (default on; it links librbd and librados); the image spec parser always is.

mod spec;
pub use spec::{ImageSpec, DEFAULT_POOL};
/// Part of [`RbdOptions`].
pub use ublkd_proto::{EncryptionFormat, RbdEncryption, RbdQuiesce};

#[cfg(feature = "rbd")]
mod cache;
#[cfg(feature = "rbd")]
mod image;
#[cfg(feature = "rbd")]
mod queue;
#[cfg(feature = "rbd")]
mod quiesce;
#[cfg(feature = "rbd")]
pub mod rados;
#[cfg(feature = "rbd")]
mod sys;
#[cfg(feature = "rbd")]
mod target;
#[cfg(all(test, feature = "rbd"))]
mod tests;
#[cfg(feature = "rbd")]
pub mod watch;
#[cfg(feature = "rbd")]
pub use target::{RbdOptions, RbdTarget};

use std::io;

/// The Ceph configuration `ublkctl add rbd` reads when `--conf` is left out.
pub const DEFAULT_CONF: &str = ublkd_proto::DEFAULT_CEPH_CONF;
/// The Ceph user when `--id` is left out.
pub const DEFAULT_USER: &str = "admin";

/// Why a cluster, pool or image could not be reached. Each message is one line saying
/// what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    #[error("the {0} contains a NUL byte")]
    Nul(String),
    #[error("cannot create a librados handle: {0}")]
    Create(#[source] io::Error),
    #[error("cannot read the Ceph configuration {conf}: {source}; pass the cluster's ceph.conf with --conf, or its monitors with --mon-host")]
    Conf {
        conf: String,
        #[source]
        source: io::Error,
    },
    #[error("librados refused the setting {name}: {source}")]
    Option {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    BadOption(#[from] ublkd_proto::ceph_option::CephOptionError),
    #[error("--ceph-option {name}: Ceph has no option of that name; check its spelling ('ceph config help NAME' describes an option)")]
    UnknownOption { name: String },
    #[error("--ceph-option {name}={value}: Ceph refused the value ({source}); 'ceph config help {name}' gives its type and range")]
    OptionValue {
        name: String,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot connect to the Ceph cluster of {conf} within {secs} s: {source}; check that its monitors (mon host) are up and reachable and the user and keyring are right")]
    Connect {
        conf: String,
        secs: u64,
        #[source]
        source: io::Error,
    },
    #[error("the Ceph cluster of {conf} refused user client.{user}: {source}; check --user and the user's key in --keyring or --keyfile ('ceph auth get client.{user}' shows the key the cluster has)")]
    Auth {
        conf: String,
        user: String,
        #[source]
        source: io::Error,
    },
    #[error("no key for user client.{user} in keyring {keyring}{keyfile}: {source}; pass the user's keyring with --keyring or its bare key with --keyfile")]
    NoKey {
        user: String,
        keyring: String,
        /// ", nor in key file PATH" when one was given.
        keyfile: String,
        #[source]
        source: io::Error,
    },
    #[error("the Ceph cluster of {conf} and user client.{user} have no authentication method in common: {source}; the conf's or --ceph-option's 'auth client required' must allow one the cluster requires (cephx on most clusters)")]
    NoAuth {
        conf: String,
        user: String,
        #[source]
        source: io::Error,
    },
    #[error("the monitors of the Ceph cluster of {conf} refuse messenger mode '{mode}', the only one this device accepts (--ms-mode, or ms_mon_client_mode): {source}; ask for a mode the cluster accepts (its ms_mon_service_mode), or --ms-mode prefer-{mode}")]
    MonMode {
        conf: String,
        mode: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open rbd image {spec}: no OSD answered within {secs} s (--osd-timeout): {source}; check that the pool's OSDs are up ('ceph osd stat'){hint}")]
    OpenTimeout {
        spec: String,
        secs: u64,
        /// What else to check: the messenger mode, when the device accepts only one.
        hint: String,
        #[source]
        source: io::Error,
    },
    #[error("the Ceph configuration {conf} names no monitors: {source}; set 'mon host' in it or pass --mon-host")]
    NoMonitors {
        conf: String,
        #[source]
        source: io::Error,
    },
    #[error("user client.{user} may not open rbd image {spec}: {source}; check the user's caps ('ceph auth get client.{user}'); an rbd client needs mon 'profile rbd' and osd 'profile rbd pool={pool}' (or 'profile rbd-read-only pool={pool}' with --read-only)")]
    Denied {
        user: String,
        spec: String,
        pool: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open pool '{pool}' of the cluster of {conf}: {source}; check the pool name ('rbd pool ls' lists them)")]
    Pool {
        pool: String,
        conf: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open rbd image {spec}: {source}; check the image and snapshot names ('rbd ls POOL', 'rbd snap ls IMAGE')")]
    Open {
        spec: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot open snapshot id {id} of rbd image {spec}: {source}; 'rbd snap ls --all IMAGE' lists the snapshots with their ids")]
    SnapId {
        spec: String,
        id: u64,
        #[source]
        source: io::Error,
    },
    #[error("rbd image {0} names a snapshot, and --snap-id another: give one of them")]
    SnapTwice(String),
    #[error("cannot take the exclusive lock of rbd image {spec} (--exclusive): {source}; {hint}")]
    Lock {
        spec: String,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the passphrase file {path}: {source}; pass a readable file with --encryption-passphrase-file")]
    PassphraseFile {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot unlock the {format} encryption of rbd image {spec} with the passphrase in {path}: {source}; {hint}")]
    Unlock {
        spec: String,
        format: &'static str,
        path: String,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("--quiesce is for an image mapped for writing; a snapshot or a read-only mapping has nothing to quiesce")]
    QuiesceReadOnly,
    #[error("--quiesce-hook {0}: the hook's path must be absolute (the daemon runs it from its own directory)")]
    QuiesceHookPath(String),
    #[error("--exclusive takes the image's lock for writing; a read-only mapping or a snapshot takes none (leave out one of them)")]
    ExclusiveReadOnly,
    #[error("cannot read the size of rbd image {spec}: {source}")]
    Size {
        spec: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot watch rbd image {spec} for changes: {source}")]
    Watch {
        spec: String,
        #[source]
        source: io::Error,
    },
    #[error("rbd image {spec} is {size} bytes, not a multiple of the block size {block_size}; resize it ('rbd resize') or pick another --block-size")]
    NotAligned {
        spec: String,
        size: u64,
        block_size: u32,
    },
    #[error("monitor command {command} failed: {status} ({source})")]
    MonCommand {
        command: String,
        status: String,
        #[source]
        source: io::Error,
    },
}
