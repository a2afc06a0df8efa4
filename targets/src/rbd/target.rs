//! The rbd device: its cluster connection and image, shared by its queues.

use super::queue::RbdQueue;
use super::quiesce::{QuiesceCounts, QuiesceWatch};
use super::rados::{ConnectOptions, Image, Rados};
use super::watch::UpdateWatch;
use super::{ImageSpec, RbdError};
use crate::{
    DeviceShape, QueueContext, QueueTarget, QuiesceSpot, SizeNotice, SizeWatch, Target, Watch,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use ublkd_proto::{RbdEncryption, RbdQuiesce};

/// What `ublkctl add rbd` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdOptions {
    pub spec: ImageSpec,
    /// The snapshot by its id instead of a name in `spec` (`--snap-id`).
    pub snap_id: Option<u64>,
    pub connect: ConnectOptions,
    /// Map read-only (always so for a snapshot).
    pub read_only: bool,
    /// Take the image's exclusive lock and refuse it to other clients (`--exclusive`).
    pub exclusive: bool,
    /// Unlock the image's encryption (`--encryption-format`).
    pub encryption: Option<RbdEncryption>,
    /// Quiesce the device at snapshots of the image (`--quiesce`).
    pub quiesce: Option<RbdQuiesce>,
    pub block_size: u32,
}

pub struct RbdTarget {
    opts: RbdOptions,
    image: Arc<Image>,
    size: u64,
    quiesce_counts: Arc<QuiesceCounts>,
    /// Why librbd may complete writes before the OSDs have them (`cache.rs`): the
    /// device then has a volatile write cache. None: write-through.
    write_back: Option<String>,
    /// The device is write-through although librbd caches (a recovered device, see
    /// [`Target::write_through`]): every write is flushed before it completes.
    flush_writes: AtomicBool,
}

impl RbdTarget {
    /// Connects to the cluster and opens the image: fails within the options' monitor
    /// timeout when the cluster cannot be reached.
    pub fn open(opts: &RbdOptions) -> Result<RbdTarget, RbdError> {
        let mut opts = opts.clone();
        if opts.spec.snap.is_some() && opts.snap_id.is_some() {
            return Err(RbdError::SnapTwice(opts.spec.to_string()));
        }
        opts.read_only |= opts.snapshot();
        if opts.exclusive && opts.read_only {
            return Err(RbdError::ExclusiveReadOnly);
        }
        if opts.quiesce.is_some() && opts.read_only {
            return Err(RbdError::QuiesceReadOnly);
        }
        if let Some(RbdQuiesce::Hook(hook)) = &opts.quiesce {
            super::quiesce::check_hook(hook)?;
        }
        let rados = Rados::connect(&opts.connect)?;
        let io = rados.ioctx(&opts.spec.pool, opts.spec.namespace.as_deref())?;
        let mut image = Image::open(&io, &opts.spec, opts.read_only).map_err(|e| match e {
            // A pool the user's OSD caps leave out: the image is there, but not for it.
            RbdError::Open { spec, source }
                if matches!(source.raw_os_error(), Some(libc::EPERM | libc::EACCES)) =>
            {
                RbdError::Denied {
                    user: opts.connect.user.clone(),
                    spec,
                    pool: opts.spec.pool.clone(),
                    source,
                }
            }
            // No OSD answered: down, or refusing the only messenger mode the client
            // accepts (the OSDs' refusal shows only as this timeout).
            RbdError::Open { spec, source } if source.raw_os_error() == Some(libc::ETIMEDOUT) => {
                let modes = rados.conf_get("ms_client_mode").unwrap_or_default();
                let hint = match ublkd_proto::ceph_option::single_mode(&modes) {
                    Some(m) => format!(", and that they accept messenger mode '{m}', the only one this device accepts (--ms-mode; the cluster's ms_service_mode)"),
                    None => String::new(),
                };
                RbdError::OpenTimeout {
                    spec,
                    secs: opts.connect.osd_timeout.as_secs(),
                    hint,
                    source,
                }
            }
            e => e,
        })?;
        if let Some(id) = opts.snap_id {
            image.set_snap_by_id(id)?;
        }
        if opts.exclusive {
            image.lock_exclusive()?;
        }
        if let Some(e) = &opts.encryption {
            image.load_encryption(e.format, &e.passphrase_file)?;
        }
        let size = image.size()?;
        let write_back = if opts.read_only {
            None
        } else {
            super::cache::write_back(&image)
        };
        if size % u64::from(opts.block_size) != 0 {
            return Err(RbdError::NotAligned {
                spec: opts.spec.to_string(),
                size,
                block_size: opts.block_size,
            });
        }
        log::info!(
            "rbd {}: {size} bytes{}, conf {}, user {}, {}",
            opts.spec,
            match (opts.read_only, opts.exclusive) {
                (true, _) => ", read-only",
                (false, true) => ", exclusive lock held",
                (false, false) => "",
            },
            opts.connect.cluster(),
            opts.connect.user,
            match &write_back {
                Some(why) => format!("volatile write cache: {why}"),
                None => "write-through".into(),
            }
        );
        Ok(RbdTarget {
            opts,
            image: Arc::new(image),
            size,
            quiesce_counts: Arc::default(),
            write_back,
            flush_writes: AtomicBool::new(false),
        })
    }
}

impl Target for RbdTarget {
    fn name(&self) -> &'static str {
        "rbd"
    }

    fn shape(&self) -> DeviceShape {
        DeviceShape {
            size: self.size,
            read_only: self.opts.read_only,
            // Write-through when a completed write is on the OSDs (`cache.rs`); with a
            // cache, FLUSH is rbd_aio_flush.
            volatile_cache: self.write_back.is_some(),
            // Done as a write followed by a flush.
            fua: self.write_back.is_some(),
            rotational: false,
            discard: !self.opts.read_only,
            write_zeroes: !self.opts.read_only,
        }
    }

    /// Never a key: the keyring is shown by its path.
    fn details(&self) -> Vec<(String, String)> {
        let c = &self.opts.connect;
        let mut d = vec![("image".into(), self.opts.spec.to_string())];
        if let Some(id) = self.opts.snap_id {
            d.push(("snapshot id".into(), id.to_string()));
        }
        d.extend([
            (
                "conf".into(),
                c.conf_file()
                    .unwrap_or_else(|| "none (mon_host given)".into()),
            ),
            ("user".into(), c.user.clone()),
        ]);
        if let Some(k) = &c.keyring {
            d.push(("keyring".into(), k.clone()));
        }
        if let Some(e) = &self.opts.encryption {
            d.push(("encryption".into(), e.to_string()));
        }
        if let Some(q) = &self.opts.quiesce {
            d.push(("quiesce".into(), q.to_string()));
        }
        if self.opts.exclusive {
            d.push((
                "exclusive lock".into(),
                "held, refused to other clients".into(),
            ));
        }
        d.push((
            "write cache".into(),
            match (&self.write_back, self.flush_writes.load(Ordering::Relaxed)) {
                _ if self.opts.read_only => "none (read-only)".into(),
                (None, _) => "none: a write completes once the OSDs have it".into(),
                (Some(why), false) => format!("volatile, FLUSH waits for it: {why}"),
                (Some(why), true) => format!(
                    "none on the device, which was created without one: every write is flushed ({why})"
                ),
            },
        ));
        d.push((
            "osd op timeout".into(),
            format!("{} s", c.osd_timeout.as_secs()),
        ));
        // ublkd's defaults that no --ceph-option overrides, then the options.
        let librbd: Vec<String> = super::rados::LIBRBD_SETTINGS
            .iter()
            .filter(|(k, _)| !ublkd_proto::ceph_option::sets(&c.options, k))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        d.push(("librbd".into(), librbd.join(", ")));
        if !c.options.is_empty() {
            d.push((
                "ceph options".into(),
                ublkd_proto::ceph_option::list(&c.options),
            ));
        }
        d.push((
            "image handle".into(),
            "one per device, shared by its queues".into(),
        ));
        d
    }

    /// In the zero-copy modes a small write's data is copied out of the request with
    /// user copy, which costs less than a write into the staging memfd (`queue.rs`).
    fn copies_in(&self) -> bool {
        true
    }

    fn queue(&self, ctx: QueueContext) -> std::io::Result<Box<dyn QueueTarget>> {
        Ok(Box::new(RbdQueue::new(
            self.image.clone(),
            ctx.qid,
            ctx.depth,
            self.opts.osd_wait(),
            ctx.own_pages.then_some(ctx.max_io_bytes as usize),
            self.flush_writes.load(Ordering::Relaxed),
        )?))
    }

    /// librbd caches writes, but the kernel's device (recovered) was created
    /// write-through, when librbd did not: each write is flushed before it completes.
    fn write_through(&self) -> bool {
        self.flush_writes.store(true, Ordering::Relaxed);
        true
    }

    /// An image resized while no ublkd ran is followed after recovery, as any resize.
    fn follows_backend_size(&self) -> bool {
        !self.opts.snapshot()
    }

    /// A snapshot never changes size; an image is watched for `rbd resize`.
    fn watch_size(&self, notice: SizeNotice) -> Result<Option<SizeWatch>, String> {
        if self.opts.snapshot() {
            return Ok(None);
        }
        let watch = UpdateWatch::new(&self.image, notice).map_err(|e| e.to_string())?;
        Ok(Some(Box::new(watch)))
    }

    /// With `--quiesce`: freezes the device's file systems (or runs the hook) whenever a
    /// snapshot of the image is taken.
    fn watch_quiesce(&self, spot: QuiesceSpot) -> Result<Option<Watch>, String> {
        let Some(how) = self.opts.quiesce.clone() else {
            // Nothing of this device's can be quiesced; a marker would be a stale one.
            super::quiesce::undo_leftover(&spot.marker, &spot.device);
            return Ok(None);
        };
        let watch = QuiesceWatch::new(&self.image, how, spot, self.quiesce_counts.clone())
            .map_err(|e| e.to_string())?;
        Ok(Some(Box::new(watch)))
    }

    /// With `--quiesce`: the snapshots quiesced for, and the quiesces that failed.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        if self.opts.quiesce.is_none() {
            return Vec::new();
        }
        let c = &self.quiesce_counts;
        vec![
            (
                "snapshots_quiesced",
                c.quiesced.load(std::sync::atomic::Ordering::Relaxed),
            ),
            (
                "quiesce_failures",
                c.failed.load(std::sync::atomic::Ordering::Relaxed),
            ),
        ]
    }

    /// The image's size now: the device follows `rbd resize` by itself (`watch_size`);
    /// `ublkctl resize ID` asks for the image's size at once.
    fn resize(&self, _current: u64, requested: Option<u64>, grow: bool) -> Result<u64, String> {
        if grow {
            return Err(
                "ublkd does not resize rbd images: resize the image with 'rbd resize' and the device follows"
                    .into(),
            );
        }
        let size = self.image.size().map_err(|e| e.to_string())?;
        match requested {
            Some(want) if want != size => Err(format!(
                "rbd image {} is {size} bytes: resize the image with 'rbd resize' and the device follows",
                self.opts.spec
            )),
            _ => Ok(size),
        }
    }
}

impl RbdOptions {
    /// Whether a snapshot is mapped (by name or by id).
    fn snapshot(&self) -> bool {
        self.spec.snap.is_some() || self.snap_id.is_some()
    }

    /// How long a queue that ends waits for librbd to answer what it still has: the
    /// OSD timeout, after which librbd fails each request, and a margin.
    fn osd_wait(&self) -> std::time::Duration {
        self.connect.osd_timeout + std::time::Duration::from_secs(5)
    }
}
