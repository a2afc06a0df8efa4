//! One ublk device: created through libublk's control commands, served by our queues.
//!
//! Creation: ADD_DEV, one queue thread per hardware queue (each posts FETCH_REQ for all
//! its tags), SET_PARAMS + START_DEV, then a read through the block node to prove it
//! is live. Deletion: STOP_DEV (the driver drains and removes the disk while the queues
//! still serve), stop and join the queues, close the char device, DEL_DEV_ASYNC.

use crate::kernel::{describe, ensure_ctrl_ring, state_name, KernelInfo};
use crate::queue::{self, QueueCounters, QueueHandle, QueueSpec};
use anyhow::{anyhow, bail, Context, Result};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};
use std::io::Read;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use ublkd_proto::features;
use ublkd_proto::validate::{self, Geometry};
use ublkd_proto::{AddDevice, BufferMode, DeviceDetail, DeviceInfo, KernelDeviceInfo, TargetSpec};
use ublkd_targets::nbd::{NbdTarget, NbdUri};
use ublkd_targets::null::NullTarget;
use ublkd_targets::r#loop::{LoopOptions, LoopTarget};
use ublkd_targets::{DeviceShape, Target};

/// Largest request the daemon accepts from the driver, in bytes.
pub const MAX_IO_BYTES: u32 = 512 * 1024;

/// How long a queue thread may take to set up, and the block node to appear.
const START_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Device {
    pub id: u32,
    pub geometry: Geometry,
    pub buffer: BufferMode,
    target: Arc<dyn Target>,
    shape: DeviceShape,
    counters: Vec<Arc<QueueCounters>>,
    // Teardown order matters; see `Device::shutdown`.
    queues: Vec<QueueHandle>,
    dev: Option<UblkDev>,
    ctrl: Option<UblkCtrl>,
    started: bool,
}

/// Most memory `fixed` mode may pin per queue (depth x max IO size is registered).
const FIXED_PIN_LIMIT: u64 = 1 << 30;

fn has(kernel: &KernelInfo, feature: u32) -> bool {
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

/// ADD_DEV flags for a buffer mode.
fn device_flags(mode: BufferMode) -> u64 {
    let base = sys::UBLK_F_CMD_IOCTL_ENCODE;
    u64::from(match mode {
        BufferMode::Copy | BufferMode::Fixed => base,
        BufferMode::Zc => base | sys::UBLK_F_SUPPORT_ZERO_COPY,
        BufferMode::AutoZc => base | sys::UBLK_F_AUTO_BUF_REG,
    })
}

fn build_target(spec: &TargetSpec, geometry: &Geometry) -> Result<Arc<dyn Target>> {
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
            Ok(Arc::new(LoopTarget::open(&opts)?))
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
                NbdTarget::connect(&uri, geometry.queues, block_size, timeout)?
                    .with_request_timeout(request),
            ))
        }
    }
}

/// The device parameters the kernel gets (UBLK_U_CMD_SET_PARAMS).
fn params(shape: &DeviceShape, block_size: u32) -> sys::ublk_params {
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
            io_opt_shift: lbs_shift.max(12),
            io_min_shift: lbs_shift,
            max_sectors: MAX_IO_BYTES >> 9,
            dev_sectors: shape.size >> 9,
            ..Default::default()
        },
        ..Default::default()
    };
    if shape.discard || shape.write_zeroes {
        p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard = sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: if shape.discard {
                block_size.max(4096)
            } else {
                0
            },
            max_discard_sectors: if shape.discard { u32::MAX >> 9 } else { 0 },
            max_write_zeroes_sectors: if shape.write_zeroes { u32::MAX >> 9 } else { 0 },
            max_discard_segments: 1,
            reserved0: 0,
        };
    }
    p
}

impl Device {
    /// Validates `req`, creates the device in the kernel and starts serving it. Returns
    /// once `/dev/ublkbN` exists and has served a read.
    pub fn create(req: &AddDevice, kernel: &KernelInfo) -> Result<Device> {
        let geometry =
            validate::geometry(req.queues, req.depth, req.block_size, kernel.max_queues)?;
        let buffer = choose_buffer(req.buffer, kernel, geometry.depth)?;
        let target = build_target(&req.target, &geometry)?;
        let shape = target.shape();

        ensure_ctrl_ring()?;
        let ctrl = UblkCtrlBuilder::default()
            .name(target.name())
            .id(-1)
            .nr_queues(geometry.queues)
            .depth(geometry.depth)
            .io_buf_bytes(MAX_IO_BYTES)
            .ctrl_flags(device_flags(buffer))
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(|e| anyhow!("the kernel refused to add the device: {}", describe(&e)))?;
        let id = ctrl.dev_info().dev_id;
        log::info!(
            "dev {id}: added ({} target, {} bytes, {} queues x depth {}, {} buffers)",
            target.name(),
            shape.size,
            geometry.queues,
            geometry.depth,
            buffer
        );
        let mut device = Device {
            id,
            geometry,
            buffer,
            target,
            shape,
            counters: Vec::new(),
            queues: Vec::new(),
            dev: None,
            ctrl: Some(ctrl),
            started: false,
        };
        // On error `device` is dropped here, which tears down whatever was set up.
        device.start()?;
        Ok(device)
    }

    fn start(&mut self) -> Result<()> {
        let Some(ctrl) = self.ctrl.as_ref() else {
            bail!("device {} was already deleted", self.id);
        };
        let params = params(&self.shape, self.geometry.block_size);
        let size = self.shape.size;
        let dev = UblkDev::new(
            self.target.name().to_string(),
            |d| {
                d.tgt.dev_size = size;
                d.tgt.params = params;
                Ok(())
            },
            ctrl,
        )
        .map_err(|e| anyhow!("cannot open /dev/ublkc{}: {}", self.id, describe(&e)))?;
        let cdev_fd = dev.tgt.fds[0];
        // Owned by the device before any queue uses the fd: teardown joins the queues
        // before it closes the char device.
        let dev: &UblkDev = self.dev.insert(dev);

        let (tx, rx) = mpsc::channel();
        for qid in 0..self.geometry.queues {
            let spec = QueueSpec {
                dev_id: self.id,
                qid,
                depth: self.geometry.depth,
                max_io_bytes: MAX_IO_BYTES,
                cdev_fd,
                buffer: self.buffer,
            };
            let handle = queue::spawn(spec, self.target.clone(), tx.clone())
                .with_context(|| format!("cannot start the thread of queue {qid}"))?;
            self.counters.push(handle.counters.clone());
            self.queues.push(handle);
        }
        drop(tx);
        let deadline = Instant::now() + START_TIMEOUT;
        for _ in 0..self.geometry.queues {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(_tid)) => {}
                Ok(Err(e)) => bail!("{e}"),
                Err(_) => bail!("a queue did not start within {START_TIMEOUT:?}"),
            }
        }

        // Our queues have posted their FETCH_REQs; tell libublk's start gate so.
        for _ in 0..self.geometry.queues {
            dev.notify_buffer_registration_complete(false);
        }
        ctrl.start_dev(dev)
            .map_err(|e| anyhow!("the kernel refused to start the device: {}", describe(&e)))?;
        self.started = true;
        self.wait_live(deadline)?;
        log::info!("dev {}: live at {}", self.id, self.path());
        Ok(())
    }

    /// Waits for the block node and reads its first block through it.
    fn wait_live(&self, deadline: Instant) -> Result<()> {
        let path = self.path();
        loop {
            match std::fs::File::open(&path) {
                Ok(mut f) => {
                    let mut block = vec![0u8; self.geometry.block_size as usize];
                    f.read_exact(&mut block)
                        .with_context(|| format!("test read from {path} failed"))?;
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => {
                    bail!("{path} did not appear within {START_TIMEOUT:?}: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    pub fn path(&self) -> String {
        format!("/dev/ublkb{}", self.id)
    }

    fn kernel_info(&self) -> Option<sys::ublksrv_ctrl_dev_info> {
        if ensure_ctrl_ring().is_err() {
            return None;
        }
        let ctrl = self.ctrl.as_ref()?;
        match ctrl.read_dev_info() {
            Ok(_) => Some(ctrl.dev_info()),
            Err(e) => {
                log::warn!("dev {}: GET_DEV_INFO failed: {}", self.id, describe(&e));
                None
            }
        }
    }

    pub fn info(&self) -> DeviceInfo {
        let state = self
            .kernel_info()
            .map_or("unknown", |i| state_name(i.state));
        self.info_with_state(state)
    }

    fn info_with_state(&self, state: &str) -> DeviceInfo {
        DeviceInfo {
            id: self.id,
            target: self.target.name().to_string(),
            size: self.shape.size,
            block_size: self.geometry.block_size,
            queues: u32::from(self.geometry.queues),
            depth: u32::from(self.geometry.depth),
            buffer: self.buffer,
            state: state.to_string(),
            path: self.path(),
        }
    }

    pub fn detail(&self) -> DeviceDetail {
        let k = self.kernel_info();
        let state = k.map_or("unknown", |i| state_name(i.state));
        let kernel = match k {
            Some(i) => KernelDeviceInfo {
                state: state.to_string(),
                flags: i.flags,
                flag_names: features::decode(i.flags).0,
                ublksrv_pid: i.ublksrv_pid,
                max_io_buf_bytes: i.max_io_buf_bytes,
                nr_hw_queues: u32::from(i.nr_hw_queues),
                queue_depth: u32::from(i.queue_depth),
            },
            None => KernelDeviceInfo {
                state: state.to_string(),
                flags: 0,
                flag_names: Vec::new(),
                ublksrv_pid: 0,
                max_io_buf_bytes: 0,
                nr_hw_queues: 0,
                queue_depth: 0,
            },
        };
        DeviceDetail {
            info: self.info_with_state(state),
            char_path: format!("/dev/ublkc{}", self.id),
            target_details: self.target.details(),
            kernel,
            queue_stats: self
                .counters
                .iter()
                .enumerate()
                .map(|(q, c)| c.snapshot(q as u32))
                .collect(),
        }
    }

    /// Removes the device from the kernel: stop (the driver drains in-flight IO through
    /// the queues), end the queues, close the char device, delete.
    pub fn shutdown(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let Some(ctrl) = self.ctrl.take() else {
            return Ok(());
        };
        ensure_ctrl_ring()?;
        let mut result = Ok(());
        self.target.abort();
        if self.started {
            if let Err(e) = ctrl.kill_dev() {
                result = Err(anyhow!("STOP_DEV failed: {}", describe(&e)));
            }
        }
        for q in &self.queues {
            q.request_stop();
        }
        for q in &mut self.queues {
            q.join();
        }
        self.queues.clear();
        self.dev = None;
        // DEL_DEV_ASYNC (Linux 6.9+) returns at once even while an application still
        // holds the (already removed) disk open; plain DEL_DEV would wait for it to
        // close. Fall back to DEL_DEV on kernels without it.
        if let Err(e) = ctrl.del_dev_async() {
            log::debug!(
                "dev {}: DEL_DEV_ASYNC: {}; trying DEL_DEV",
                self.id,
                describe(&e)
            );
            if let Err(e) = ctrl.del_dev() {
                result = Err(anyhow!("DEL_DEV failed: {}", describe(&e)));
            }
        }
        match &result {
            Ok(()) => log::info!("dev {}: deleted", self.id),
            Err(e) => log::error!("dev {}: delete: {e:#}", self.id),
        }
        result
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
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
        let p = params(&shape(true, true), 4096);
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

        let p = params(&shape(false, false), 512);
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_BASIC);
        assert_eq!(p.basic.logical_bs_shift, 9);
        assert_eq!(p.basic.physical_bs_shift, 12);

        let p = params(&shape(false, true), 512);
        assert_eq!(p.discard.max_discard_sectors, 0);
        assert!(p.discard.max_write_zeroes_sectors > 0);
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
        assert_eq!(device_flags(BufferMode::Copy) & (zc | auto), 0);
        assert_eq!(device_flags(BufferMode::Fixed) & (zc | auto), 0);
        assert_eq!(device_flags(BufferMode::Zc) & (zc | auto), zc);
        assert_eq!(device_flags(BufferMode::AutoZc) & (zc | auto), auto);
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
                uri: "nbds://h/e".into(),
                reconnect_timeout: None,
                request_timeout: None,
            },
            &geo(512),
        )
        .err()
        .unwrap();
        assert!(
            e.to_string().contains("TLS (nbds://) is not supported yet"),
            "{e}"
        );
    }
}
