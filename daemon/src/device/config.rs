//! What a device is made of, decided before the kernel is asked: the buffer mode, the
//! ADD_DEV flags, the target built from its spec (and checked against its record), and
//! the parameters the kernel gets. Pure functions, unit-tested here.

use crate::kernel::KernelInfo;
use crate::state::Record;
use anyhow::{bail, Result};
use libublk::sys;
use std::sync::Arc;
use std::time::Duration;
use ublkd_proto::validate::{self, Geometry};
use ublkd_proto::{BufferMode, TargetSpec};
use ublkd_targets::nbd::{NbdTarget, NbdUri};
use ublkd_targets::null::NullTarget;
use ublkd_targets::r#loop::{LoopOptions, LoopTarget};
use ublkd_targets::{DeviceShape, Target};

/// Largest request the daemon accepts from the driver, in bytes.
pub const MAX_IO_BYTES: u32 = 512 * 1024;

/// Most memory `fixed` mode may pin per queue (depth x max IO size is registered).
const FIXED_PIN_LIMIT: u64 = 1 << 30;

pub(super) fn has(kernel: &KernelInfo, feature: u32) -> bool {
    kernel.features & u64::from(feature) != 0
}

/// Picks the buffer mode: the one asked for, if the kernel has it, or else the best the
/// kernel offers (auto-zc, then zc, then fixed).
pub fn choose_buffer(
    requested: Option<BufferMode>,
    kernel: &KernelInfo,
    depth: u16,
) -> Result<BufferMode> {
    let zc = has(kernel, sys::UBLK_F_SUPPORT_ZERO_COPY);
    let auto = has(kernel, sys::UBLK_F_AUTO_BUF_REG);
    let mode = match requested {
        None if auto => BufferMode::AutoZc,
        None if zc => BufferMode::Zc,
        None => BufferMode::Fixed,
        Some(BufferMode::Zc) if !zc => bail!(
            "buffer mode zc needs UBLK_F_SUPPORT_ZERO_COPY (Linux 6.15 or later), \
             which this kernel lacks (see 'ublkctl features'); use fixed or copy"
        ),
        Some(BufferMode::AutoZc) if !auto => bail!(
            "buffer mode auto-zc needs UBLK_F_AUTO_BUF_REG (Linux 6.16 or later), \
             which this kernel lacks (see 'ublkctl features'); use zc, fixed or copy"
        ),
        Some(m) => m,
    };
    let pinned = u64::from(depth) * u64::from(MAX_IO_BYTES);
    if mode == BufferMode::Fixed && pinned > FIXED_PIN_LIMIT {
        bail!(
            "buffer mode fixed with depth {depth} would pin {} MiB per queue \
             (limit {} MiB): lower --depth or use another buffer mode",
            pinned >> 20,
            FIXED_PIN_LIMIT >> 20
        );
    }
    Ok(mode)
}

/// Whether the queues use the batch command path (UBLK_F_BATCH_IO): only when asked
/// for. Per tag is the default: in the benchmark (README, Performance) batch did not
/// measure at least as fast.
pub fn use_batch(requested: Option<bool>, kernel: &KernelInfo) -> Result<bool> {
    let has_batch = has(kernel, sys::UBLK_F_BATCH_IO);
    match requested {
        None => Ok(false),
        Some(true) if !has_batch => bail!(
            "batch commands need UBLK_F_BATCH_IO (Linux 7.0 or later), which this kernel \
             lacks (see 'ublkctl features'); leave out --batch"
        ),
        Some(b) => Ok(b),
    }
}

/// User recovery with reissue: when ublkd dies the driver keeps the device and holds
/// its requests, and gives them to the next ublkd once it has recovered the device.
pub(super) const RECOVERY_FLAGS: u32 =
    sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE;

/// ADD_DEV flags for a buffer mode, with user recovery where the kernel has it, and
/// user copy for a target that copies into requests' pages in the zero-copy modes
/// (`copies_in`; in copy and fixed mode the driver itself copies, which user copy
/// would turn off), and UBLK_F_BATCH_IO for the batch command path (`batch`, from
/// [`use_batch`]).
pub(super) fn device_flags(
    mode: BufferMode,
    kernel: &KernelInfo,
    copies_in: bool,
    batch: bool,
) -> u64 {
    let mut flags = sys::UBLK_F_CMD_IOCTL_ENCODE;
    if batch {
        flags |= sys::UBLK_F_BATCH_IO;
    }
    flags |= match mode {
        BufferMode::Copy | BufferMode::Fixed => 0,
        BufferMode::Zc => sys::UBLK_F_SUPPORT_ZERO_COPY,
        BufferMode::AutoZc => sys::UBLK_F_AUTO_BUF_REG,
    };
    if copies_in
        && matches!(mode, BufferMode::Zc | BufferMode::AutoZc)
        && has(kernel, sys::UBLK_F_USER_COPY)
    {
        flags |= sys::UBLK_F_USER_COPY;
    }
    if has(kernel, RECOVERY_FLAGS) {
        flags |= RECOVERY_FLAGS;
    }
    u64::from(flags)
}

/// The buffer mode a device the kernel already has was created with: the zero-copy
/// modes are flags of the device; copy and fixed differ only in the daemon, so the
/// record tells.
pub(super) fn recovered_buffer(kernel_flags: u64, recorded: BufferMode) -> BufferMode {
    let flag = |f: u32| kernel_flags & u64::from(f) != 0;
    if flag(sys::UBLK_F_AUTO_BUF_REG) {
        BufferMode::AutoZc
    } else if flag(sys::UBLK_F_SUPPORT_ZERO_COPY) {
        BufferMode::Zc
    } else if recorded == BufferMode::Copy {
        BufferMode::Copy
    } else {
        BufferMode::Fixed
    }
}

pub(super) fn build_target(spec: &TargetSpec, geometry: &Geometry) -> Result<Arc<dyn Target>> {
    let block_size = geometry.block_size;
    match spec {
        TargetSpec::Null { size } => {
            validate::device_size(*size, block_size)?;
            Ok(Arc::new(NullTarget::new(*size)))
        }
        TargetSpec::Loop {
            file,
            direct_io,
            read_only,
        } => {
            let opts = LoopOptions {
                path: file.into(),
                direct_io: *direct_io,
                read_only: *read_only,
                block_size,
            };
            Ok(Arc::new(LoopTarget::open(&opts).map_err(one_line)?))
        }
        TargetSpec::Rbd { osd_timeout, .. } => {
            let osd_timeout = match osd_timeout {
                None => RBD_OSD_TIMEOUT,
                Some(0) => bail!("--osd-timeout must be at least 1 s: librados' 0 would let a request wait forever"),
                Some(s) => Duration::from_secs(u64::from(*s)),
            };
            rbd_target(spec, osd_timeout, block_size)
        }
        TargetSpec::Nbd {
            uri,
            reconnect_timeout,
            request_timeout,
        } => {
            let uri: NbdUri = uri.parse()?;
            let timeout = Duration::from_secs(u64::from(reconnect_timeout.unwrap_or(30)));
            let request = Duration::from_secs(u64::from(request_timeout.unwrap_or(30)));
            Ok(Arc::new(
                NbdTarget::connect(&uri, geometry.queues, block_size, timeout)
                    .map_err(one_line)?
                    .with_request_timeout(request),
            ))
        }
    }
}

/// A target's error as its message alone. The targets' messages already name their
/// cause (`cannot connect to URI: Connection refused (os error 111)`, then what to do),
/// so the cause is not chained once more after the advice, as `{e:#}` would print it.
fn one_line(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::msg(e.to_string())
}

/// Opens the image of `spec` (an rbd spec).
#[cfg(feature = "rbd")]
fn rbd_target(
    spec: &TargetSpec,
    osd_timeout: Duration,
    block_size: u32,
) -> Result<Arc<dyn Target>> {
    use ublkd_targets::rbd::rados::ConnectOptions;
    use ublkd_targets::rbd::{RbdOptions, RbdTarget, DEFAULT_USER};
    let TargetSpec::Rbd {
        image,
        snap_id,
        conf,
        user,
        keyring,
        read_only,
        exclusive,
        encryption,
        quiesce,
        options,
        ..
    } = spec
    else {
        unreachable!("rbd_target is called for rbd specs")
    };
    let opts = RbdOptions {
        spec: image.parse().map_err(anyhow::Error::msg)?,
        snap_id: *snap_id,
        connect: ConnectOptions {
            conf: conf.clone(),
            user: user.clone().unwrap_or_else(|| DEFAULT_USER.into()),
            keyring: keyring.clone(),
            mon_timeout: RBD_MON_TIMEOUT,
            osd_timeout,
            options: options.clone(),
        },
        read_only: *read_only,
        exclusive: *exclusive,
        encryption: encryption.clone(),
        quiesce: quiesce.clone(),
        block_size,
    };
    Ok(Arc::new(RbdTarget::open(&opts).map_err(one_line)?))
}

/// How long `add rbd` waits for the monitors (and each monitor command).
#[cfg(feature = "rbd")]
const RBD_MON_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an rbd request waits for its OSD before it fails with EIO, unless the
/// device says (`--osd-timeout`).
const RBD_OSD_TIMEOUT: Duration = Duration::from_secs(60);

#[cfg(not(feature = "rbd"))]
fn rbd_target(_: &TargetSpec, _: Duration, _: u32) -> Result<Arc<dyn Target>> {
    bail!("this ublkd was built without the rbd target (cargo feature rbd, which needs librbd-dev); rebuild it with the feature")
}

/// Refuses to serve a recorded device from another file than the one it was created on
/// (the path now names another inode): that would hand its users different data.
pub(super) fn check_backing(record: &Record, target: &dyn Target) -> Result<()> {
    let (Some(was), Some(now)) = (&record.backing, target.backing_id()) else {
        return Ok(());
    };
    if was.same_as(&now) {
        return Ok(());
    }
    let id = record.id;
    let path = match &record.add.target {
        TargetSpec::Loop { file, .. } => file.as_str(),
        _ => "",
    };
    bail!(
        "the backing file {path} is no longer the file this device was created on \
         ({was}, now {now}); if the file was moved, put it back and run 'ublkctl recover \
         {id}'; to serve the file now there, 'ublkctl del {id}' to forget the device and \
         add it again"
    )
}

/// The device parameters the kernel gets (UBLK_U_CMD_SET_PARAMS).
/// What the target says of its request sizes (both optional).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct IoSizes {
    /// The most bytes one request may carry.
    pub max: Option<u32>,
    /// The request size it serves best.
    pub optimal: Option<u32>,
}

pub(super) fn params(shape: &DeviceShape, block_size: u32, io: IoSizes) -> sys::ublk_params {
    let lbs_shift = block_size.trailing_zeros() as u8;
    let mut attrs = 0;
    if shape.read_only {
        attrs |= sys::UBLK_ATTR_READ_ONLY;
    }
    if shape.rotational {
        attrs |= sys::UBLK_ATTR_ROTATIONAL;
    }
    if shape.volatile_cache {
        attrs |= sys::UBLK_ATTR_VOLATILE_CACHE;
    }
    if shape.fua {
        attrs |= sys::UBLK_ATTR_FUA;
    }
    let mut p = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ublk_param_basic {
            attrs,
            logical_bs_shift: lbs_shift,
            physical_bs_shift: lbs_shift.max(12),
            io_opt_shift: optimal_io_shift(io, block_size),
            io_min_shift: lbs_shift,
            max_sectors: max_io_bytes(io.max, block_size) >> 9,
            dev_sectors: shape.size >> 9,
            ..Default::default()
        },
        ..Default::default()
    };
    if shape.discard || shape.write_zeroes {
        p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard = sys::ublk_param_discard {
            discard_alignment: 0,
            // The driver refuses a discard parameter block with granularity 0, even
            // when only write-zeroes is offered (a block device as loop backing).
            discard_granularity: block_size.max(4096),
            max_discard_sectors: if shape.discard { u32::MAX >> 9 } else { 0 },
            max_write_zeroes_sectors: if shape.write_zeroes { u32::MAX >> 9 } else { 0 },
            max_discard_segments: 1,
            reserved0: 0,
        };
    }
    p
}

/// The most bytes one request carries: MAX_IO_BYTES, or the target's own limit if lower,
/// a whole number of blocks and at least one page.
/// log2 of the optimal IO size: the target's, when it is a power of two between the
/// block size and the largest request; else the page size (or the block size above it).
fn optimal_io_shift(io: IoSizes, block_size: u32) -> u8 {
    let max = max_io_bytes(io.max, block_size);
    match io.optimal {
        Some(o) if o.is_power_of_two() && o >= block_size && o <= max => o.trailing_zeros() as u8,
        _ => block_size.max(4096).trailing_zeros() as u8,
    }
}

pub(super) fn max_io_bytes(target_max: Option<u32>, block_size: u32) -> u32 {
    let max = target_max.map_or(MAX_IO_BYTES, |m| m.min(MAX_IO_BYTES));
    (max - max % block_size).max(block_size.max(4096))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(discard: bool, write_zeroes: bool) -> DeviceShape {
        DeviceShape {
            size: 1 << 30,
            read_only: false,
            volatile_cache: true,
            fua: true,
            rotational: false,
            discard,
            write_zeroes,
        }
    }

    #[test]
    fn params_describe_the_shape() {
        let p = params(&shape(true, true), 4096, IoSizes::default());
        assert_eq!(
            p.types,
            sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD
        );
        assert_eq!(p.basic.logical_bs_shift, 12);
        assert_eq!(p.basic.dev_sectors, (1 << 30) >> 9);
        assert_eq!(p.basic.max_sectors, MAX_IO_BYTES >> 9);
        assert_eq!(
            p.basic.attrs,
            sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA
        );
        assert!(p.discard.max_discard_sectors > 0 && p.discard.max_write_zeroes_sectors > 0);
        assert_eq!(p.discard.max_discard_segments, 1);

        let p = params(&shape(false, false), 512, IoSizes::default());
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_BASIC);
        assert_eq!(p.basic.logical_bs_shift, 9);
        assert_eq!(p.basic.physical_bs_shift, 12);

        let p = params(&shape(false, true), 512, IoSizes::default());
        assert_eq!(p.discard.max_discard_sectors, 0);
        assert!(p.discard.max_write_zeroes_sectors > 0);
    }

    #[test]
    fn a_target_limit_caps_the_request_size() {
        assert_eq!(max_io_bytes(None, 512), MAX_IO_BYTES);
        assert_eq!(max_io_bytes(Some(64 << 10), 512), 64 << 10);
        assert_eq!(max_io_bytes(Some(u32::MAX), 4096), MAX_IO_BYTES);
        assert_eq!(max_io_bytes(Some(65535), 4096), 61440);
        let io = IoSizes {
            max: Some(64 << 10),
            optimal: None,
        };
        let p = params(&shape(false, false), 4096, io);
        assert_eq!(p.basic.max_sectors, 128);
    }

    #[test]
    fn a_target_preferred_size_is_the_optimal_io_size() {
        let with = |max, optimal, bs| {
            let io = IoSizes { max, optimal };
            params(&shape(false, false), bs, io).basic.io_opt_shift
        };
        assert_eq!(with(None, None, 512), 12);
        assert_eq!(with(None, None, 8192), 13);
        assert_eq!(with(None, Some(64 << 10), 512), 16);
        // Not a power of two, below the block size, or above the largest request: ignored.
        assert_eq!(with(None, Some(3 << 10), 512), 12);
        assert_eq!(with(None, Some(512), 4096), 12);
        assert_eq!(with(Some(32 << 10), Some(64 << 10), 512), 12);
    }

    fn kernel(features: u32) -> KernelInfo {
        KernelInfo {
            features: u64::from(features),
            max_queues: 2,
        }
    }

    #[test]
    fn buffer_mode_is_the_best_the_kernel_has() {
        let all = sys::UBLK_F_SUPPORT_ZERO_COPY | sys::UBLK_F_AUTO_BUF_REG;
        assert_eq!(
            choose_buffer(None, &kernel(all), 128).unwrap(),
            BufferMode::AutoZc
        );
        let zc_only = kernel(sys::UBLK_F_SUPPORT_ZERO_COPY);
        assert_eq!(choose_buffer(None, &zc_only, 128).unwrap(), BufferMode::Zc);
        assert_eq!(
            choose_buffer(None, &kernel(0), 128).unwrap(),
            BufferMode::Fixed
        );
        for m in BufferMode::ALL {
            assert_eq!(choose_buffer(Some(m), &kernel(all), 128).unwrap(), m);
        }
        let e = choose_buffer(Some(BufferMode::AutoZc), &zc_only, 128).unwrap_err();
        assert!(e.to_string().contains("UBLK_F_AUTO_BUF_REG"), "{e}");
        let e = choose_buffer(Some(BufferMode::Zc), &kernel(0), 128).unwrap_err();
        assert!(e.to_string().contains("UBLK_F_SUPPORT_ZERO_COPY"), "{e}");
        let e = choose_buffer(Some(BufferMode::Fixed), &kernel(all), 4096).unwrap_err();
        assert!(e.to_string().contains("would pin 2048 MiB"), "{e}");
        assert!(choose_buffer(Some(BufferMode::Copy), &kernel(all), 4096).is_ok());
    }

    #[test]
    fn device_flags_follow_the_mode() {
        let zc = u64::from(sys::UBLK_F_SUPPORT_ZERO_COPY);
        let auto = u64::from(sys::UBLK_F_AUTO_BUF_REG);
        let k = kernel(sys::UBLK_F_SUPPORT_ZERO_COPY | sys::UBLK_F_AUTO_BUF_REG);
        assert_eq!(
            device_flags(BufferMode::Copy, &k, false, false) & (zc | auto),
            0
        );
        assert_eq!(
            device_flags(BufferMode::Fixed, &k, false, false) & (zc | auto),
            0
        );
        assert_eq!(
            device_flags(BufferMode::Zc, &k, false, false) & (zc | auto),
            zc
        );
        assert_eq!(
            device_flags(BufferMode::AutoZc, &k, false, false) & (zc | auto),
            auto
        );
        let recovery = u64::from(RECOVERY_FLAGS);
        assert_eq!(
            device_flags(BufferMode::Copy, &k, false, false) & recovery,
            0
        );
        let k = kernel(RECOVERY_FLAGS);
        assert_eq!(
            device_flags(BufferMode::Copy, &k, false, false) & recovery,
            recovery
        );
    }

    #[test]
    fn user_copy_only_for_zero_copy_modes_of_targets_that_copy_in() {
        let uc = u64::from(sys::UBLK_F_USER_COPY);
        let all = kernel(
            sys::UBLK_F_SUPPORT_ZERO_COPY | sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_USER_COPY,
        );
        for mode in [BufferMode::Zc, BufferMode::AutoZc] {
            assert_eq!(device_flags(mode, &all, true, false) & uc, uc, "{mode}");
            assert_eq!(device_flags(mode, &all, false, false) & uc, 0, "{mode}");
        }
        // In copy and fixed mode user copy would stop the driver's own copying.
        for mode in [BufferMode::Copy, BufferMode::Fixed] {
            assert_eq!(device_flags(mode, &all, true, false) & uc, 0, "{mode}");
        }
        let no_uc = kernel(sys::UBLK_F_SUPPORT_ZERO_COPY | sys::UBLK_F_AUTO_BUF_REG);
        assert_eq!(
            device_flags(BufferMode::AutoZc, &no_uc, true, false) & uc,
            0
        );
    }

    #[test]
    fn batch_only_when_asked_for() {
        let with = kernel(sys::UBLK_F_BATCH_IO);
        let without = kernel(sys::UBLK_F_AUTO_BUF_REG);
        assert!(!use_batch(None, &with).unwrap());
        assert!(!use_batch(None, &without).unwrap());
        assert!(!use_batch(Some(false), &with).unwrap());
        assert!(use_batch(Some(true), &with).unwrap());
        let e = use_batch(Some(true), &without).unwrap_err();
        assert!(e.to_string().contains("UBLK_F_BATCH_IO"), "{e}");

        let flag = u64::from(sys::UBLK_F_BATCH_IO);
        for mode in BufferMode::ALL {
            assert_eq!(
                device_flags(mode, &with, false, true) & flag,
                flag,
                "{mode}"
            );
            assert_eq!(device_flags(mode, &with, false, false) & flag, 0, "{mode}");
        }
    }

    #[test]
    fn recovery_uses_the_devices_buffer_mode() {
        let auto = u64::from(sys::UBLK_F_AUTO_BUF_REG);
        let zc = u64::from(sys::UBLK_F_SUPPORT_ZERO_COPY);
        assert_eq!(recovered_buffer(auto, BufferMode::Copy), BufferMode::AutoZc);
        assert_eq!(recovered_buffer(zc, BufferMode::AutoZc), BufferMode::Zc);
        assert_eq!(recovered_buffer(0, BufferMode::Copy), BufferMode::Copy);
        assert_eq!(recovered_buffer(0, BufferMode::Fixed), BufferMode::Fixed);
        // Recorded as zero copy but the device has no such flag: the daemon's buffers.
        assert_eq!(recovered_buffer(0, BufferMode::AutoZc), BufferMode::Fixed);
    }

    #[test]
    fn null_target_sizes_are_validated() {
        let geo = |block_size| Geometry {
            queues: 1,
            depth: 1,
            block_size,
        };
        assert!(build_target(&TargetSpec::Null { size: 0 }, &geo(512)).is_err());
        assert!(build_target(&TargetSpec::Null { size: 1000 }, &geo(512)).is_err());
        assert!(build_target(&TargetSpec::Null { size: 4096 }, &geo(4096)).is_ok());
        let e = build_target(
            &TargetSpec::Nbd {
                uri: "nbds://h/e?tls-psk-file=/k".into(),
                reconnect_timeout: None,
                request_timeout: None,
            },
            &geo(512),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("cannot read the PSK file /k"), "{e}");
    }

    #[test]
    fn a_targets_error_names_its_cause_once() {
        // Nothing listens on port 1: the connect is refused at once.
        let spec = TargetSpec::Nbd {
            uri: "nbd://127.0.0.1:1/".into(),
            reconnect_timeout: None,
            request_timeout: None,
        };
        let geometry = Geometry {
            queues: 1,
            depth: 4,
            block_size: 512,
        };
        let Err(e) = build_target(&spec, &geometry) else {
            panic!("connected to port 1")
        };
        let text = format!("{e:#}");
        assert!(
            text.contains("cannot connect to nbd://127.0.0.1:1/"),
            "{text}"
        );
        assert_eq!(text.matches("(os error").count(), 1, "{text}");
    }
}
