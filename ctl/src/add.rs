//! `ublkctl add TARGET ...`: the targets' arguments and the `add` request made of them.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use ublkd_proto::ceph_option::MsMode;
use ublkd_proto::size::parse_size;
use ublkd_proto::validate::{DEFAULT_DEPTH, DEFAULT_NULL_SIZE, DEFAULT_QUEUES};
use ublkd_proto::{
    AddDevice, BufferMode, DirectIo, EncryptionFormat, QueueAffinity, RbdEncryption, RbdQuiesce,
    TargetSpec,
};

#[derive(Debug, Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once per ublkctl run; boxing the rbd arguments would only obscure them"
)]
pub(crate) enum AddTarget {
    /// A device that completes every request at once and stores nothing.
    Null {
        /// Device size: bytes, or with a K, M, G or T suffix (1024-based).
        #[arg(long, default_value_t = DEFAULT_NULL_SIZE.to_string(), value_parser = size_arg)]
        size: String,
        #[command(flatten)]
        common: CommonAddArgs,
    },
    /// A device backed by an NBD export; its size and capabilities are the server's.
    Nbd {
        /// nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (port 10809 by default);
        /// nbds:// and nbds+unix:// with tls-certificates=DIR for TLS.
        #[arg(long)]
        uri: String,
        /// Connections to the server, one per queue (more than one needs multi-conn);
        /// the same as --queues.
        #[arg(long)]
        connections: Option<u32>,
        /// Seconds to keep reconnecting after the connection drops; requests wait and are
        /// sent again, then fail with EIO. 0 fails them at once.
        #[arg(long, default_value_t = 30)]
        reconnect_timeout: u32,
        /// Seconds a request may wait for its reply; a server that stays connected but
        /// does not answer in time counts as lost (reconnect and resend). 0: no limit.
        /// Also the longest `del` waits for a connected server (30 s when 0).
        #[arg(long, default_value_t = 30)]
        request_timeout: u32,
        #[command(flatten)]
        common: CommonAddArgs,
    },
    /// A device backed by a Ceph RBD image (through librbd); its size is the image's.
    /// A snapshot maps read-only.
    Rbd {
        /// [POOL/[NAMESPACE/]]IMAGE[@SNAP], as for the rbd tool (pool rbd by default).
        #[arg(value_name = "POOL/[NAMESPACE/]IMAGE[@SNAP]")]
        image: String,
        /// Map the image's snapshot of this id (read-only), for snapshots without a name
        /// to give, such as mirroring's ('rbd snap ls --all IMAGE' lists the ids).
        #[arg(long, value_name = "ID")]
        snap_id: Option<u64>,
        /// The cluster's ceph.conf [default: /etc/ceph/ceph.conf; with --mon-host, only
        /// if it exists].
        #[arg(long)]
        conf: Option<PathBuf>,
        /// The cluster's monitors, as for the rbd tool's -m (e.g. 10.0.0.1,10.0.0.2:6789):
        /// no ceph.conf is needed then, as with rbd-nbd under ceph-csi.
        #[arg(long, value_name = "ADDRS")]
        mon_host: Option<String>,
        /// A file with the user's bare key (the rbd tool's --keyfile), for a host without a
        /// keyring (read by the daemon; never shown).
        #[arg(long)]
        keyfile: Option<PathBuf>,
        /// The Ceph user, without "client." (the rbd tool's --id/--user; ublkctl's --id
        /// is the device id).
        #[arg(long, default_value = "admin")]
        user: String,
        /// The keyring file with the user's key (read by the daemon; never shown).
        #[arg(long)]
        keyring: Option<PathBuf>,
        /// Map the image read-only.
        #[arg(long)]
        read_only: bool,
        /// Take the image's exclusive lock and keep it while the device exists: other
        /// clients cannot write (rbd-nbd's --exclusive). Needs the exclusive-lock image
        /// feature.
        #[arg(long, conflicts_with = "read_only")]
        exclusive: bool,
        /// The LUKS format of the image's encryption (as given to 'rbd encryption
        /// format'): librbd decrypts reads and encrypts writes; needs
        /// --encryption-passphrase-file.
        #[arg(
            long,
            value_name = "luks1|luks2",
            requires = "encryption_passphrase_file"
        )]
        encryption_format: Option<EncryptionFormat>,
        /// The file whose whole content is the passphrase (read by the daemon each time
        /// it opens the image; only its path is recorded and shown).
        #[arg(long, requires = "encryption_format")]
        encryption_passphrase_file: Option<PathBuf>,
        /// When a snapshot of the image is taken ('rbd snap create'), freeze the file
        /// systems mounted from the device until it is taken, so that the snapshot holds
        /// them consistent (rbd-nbd's --quiesce). A freeze that fails fails the snapshot.
        #[arg(long)]
        quiesce: bool,
        /// With --quiesce: run this program instead of freezing, as 'PROGRAM DEVICE
        /// quiesce' before the snapshot and 'PROGRAM DEVICE unquiesce' after it
        /// (rbd-nbd's --quiesce-hook; its hooks work unchanged). A non-zero exit fails
        /// the snapshot.
        #[arg(long, value_name = "PROGRAM", requires = "quiesce")]
        quiesce_hook: Option<PathBuf>,
        /// Seconds a request waits for its OSD before it fails with EIO; also the
        /// longest `del` waits for requests an unreachable cluster holds.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
        osd_timeout: u32,
        /// A Ceph configuration option for this device's cluster connection, over the
        /// conf file's and ublkd's librbd defaults (as rbd-nbd's --NAME=VALUE); may be
        /// repeated. E.g. rbd_qos_iops_limit=2000, or rbd_cache=true (librbd's write-back
        /// cache: writes complete before the OSD has them, until the kernel's next flush).
        #[arg(long = "ceph-option", value_name = "NAME=VALUE", value_parser = ublkd_proto::ceph_option::parse)]
        ceph_options: Vec<(String, String)>,
        /// Encrypt the device's connections to the monitors and OSDs (msgr2 'secure':
        /// AES-GCM) or only checksum them ('crc'), as krbd's -o ms_mode; 'prefer-'
        /// takes the other mode where the cluster refuses the first [default: the
        /// conf's; Ceph's own is crc to the OSDs].
        #[arg(long, value_name = "crc|secure|prefer-crc|prefer-secure")]
        ms_mode: Option<MsMode>,
        #[command(flatten)]
        common: CommonAddArgs,
    },
    /// A device backed by a regular file or a block device; its size is the file's.
    Loop {
        /// The backing file or block device.
        #[arg(long)]
        file: PathBuf,
        /// O_DIRECT on the backing file: auto (when possible), on (or fail), off.
        #[arg(long, default_value = "auto")]
        direct_io: DirectIo,
        /// Export the file read-only.
        #[arg(long)]
        read_only: bool,
        #[command(flatten)]
        common: CommonAddArgs,
    },
}

/// Options every target takes.
#[derive(Debug, Args)]
pub(crate) struct CommonAddArgs {
    /// Device id, so the device is /dev/ublkbID [default: the first free one].
    #[arg(long)]
    id: Option<u32>,
    /// A label for the device, unique among the daemon's devices.
    #[arg(long)]
    name: Option<String>,
    /// Hardware queues, one daemon thread each [default: 1].
    #[arg(long, help = format!("Hardware queues, one daemon thread each [default: {DEFAULT_QUEUES}]"))]
    queues: Option<u32>,
    /// Requests in flight per queue, 1-4096.
    #[arg(long, help = format!("Requests in flight per queue, 1-4096 [default: {DEFAULT_DEPTH}]"))]
    depth: Option<u32>,
    /// Logical block size: 512 or 4096 [default: 512].
    #[arg(long)]
    block_size: Option<u32>,
    /// How request data moves: copy, fixed, zc, auto-zc [default: the best the kernel supports].
    #[arg(long)]
    buffer: Option<BufferMode>,
    /// Fetch and commit requests in batches (UBLK_F_BATCH_IO, Linux 7.0) [default: off].
    #[arg(long, conflicts_with = "no_batch")]
    batch: bool,
    /// One command per request: the per-tag path (the default).
    #[arg(long)]
    no_batch: bool,
    /// Where the queue threads run: cpu (each pinned to one CPU of the CPUs the kernel
    /// maps to its queue), set (any of those CPUs) or off (not pinned) [default: set
    /// for nbd, cpu for the others].
    #[arg(long)]
    affinity: Option<QueueAffinity>,
}

pub(crate) fn size_arg(s: &str) -> Result<String, String> {
    parse_size(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// `path` made absolute (the daemon has its own working directory), as UTF-8.
fn absolute_utf8(path: &std::path::Path) -> Result<String> {
    let abs =
        std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    Ok(abs
        .to_str()
        .ok_or_else(|| anyhow!("{} is not valid UTF-8", abs.display()))?
        .to_string())
}

/// `path` made absolute, once it is known to be an executable file.
fn executable(path: &std::path::Path) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let abs = absolute_utf8(path)?;
    let meta = std::fs::metadata(&abs).with_context(|| format!("--quiesce-hook {abs}"))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        bail!("--quiesce-hook {abs}: not an executable file (chmod +x it, or give another)");
    }
    Ok(abs)
}

pub(crate) fn add_request(target: AddTarget) -> Result<AddDevice> {
    let (target, common) = match target {
        AddTarget::Null { size, common } => (
            TargetSpec::Null {
                size: parse_size(&size)?,
            },
            common,
        ),
        AddTarget::Loop {
            file,
            direct_io,
            read_only,
            common,
        } => {
            let file = absolute_utf8(&file)?;
            (
                TargetSpec::Loop {
                    file,
                    direct_io,
                    read_only,
                },
                common,
            )
        }
        AddTarget::Rbd {
            image,
            snap_id,
            conf,
            mon_host,
            keyfile,
            user,
            keyring,
            read_only,
            exclusive,
            encryption_format,
            encryption_passphrase_file,
            quiesce,
            quiesce_hook,
            osd_timeout,
            ceph_options,
            ms_mode,
            common,
        } => {
            // --mon-host, --keyfile and --ms-mode are Ceph options, set before the
            // user's own.
            let mut options = Vec::new();
            if let Some(m) = &mon_host {
                options.push(("mon_host".to_string(), m.clone()));
            }
            if let Some(k) = &keyfile {
                options.push(("keyfile".to_string(), absolute_utf8(k)?));
            }
            options.extend(ms_mode.iter().flat_map(|m| m.options()));
            options.extend(ceph_options);
            let conf = match (conf, &mon_host) {
                (Some(c), _) => Some(absolute_utf8(&c)?),
                // The daemon reads /etc/ceph/ceph.conf if there is one.
                (None, Some(_)) => None,
                (None, None) => Some(ublkd_proto::DEFAULT_CEPH_CONF.to_string()),
            };
            (
                TargetSpec::Rbd {
                    image,
                    snap_id,
                    conf,
                    user: Some(user),
                    keyring: keyring.as_deref().map(absolute_utf8).transpose()?,
                    read_only,
                    exclusive,
                    encryption: match (encryption_format, encryption_passphrase_file) {
                        (Some(format), Some(file)) => Some(RbdEncryption {
                            format,
                            passphrase_file: absolute_utf8(&file)?,
                        }),
                        _ => None,
                    },
                    quiesce: match (quiesce, quiesce_hook) {
                        (false, _) => None,
                        (true, None) => Some(RbdQuiesce::Freeze),
                        (true, Some(hook)) => Some(RbdQuiesce::Hook(executable(&hook)?)),
                    },
                    osd_timeout: Some(osd_timeout),
                    options,
                },
                common,
            )
        }
        AddTarget::Nbd {
            uri,
            connections,
            reconnect_timeout,
            request_timeout,
            mut common,
        } => {
            match (connections, common.queues) {
                (Some(c), Some(q)) if c != q => {
                    bail!("--connections {c} and --queues {q} disagree: there is one connection per queue")
                }
                (Some(c), _) => common.queues = Some(c),
                _ => {}
            }
            (
                TargetSpec::Nbd {
                    uri,
                    reconnect_timeout: Some(reconnect_timeout),
                    request_timeout: Some(request_timeout),
                },
                common,
            )
        }
    };
    Ok(AddDevice {
        target,
        id: common.id,
        name: common.name,
        queues: common.queues,
        depth: common.depth,
        block_size: common.block_size,
        buffer: common.buffer,
        batch: match (common.batch, common.no_batch) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        affinity: common.affinity,
    })
}
