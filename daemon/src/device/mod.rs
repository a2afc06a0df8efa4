//! One ublk device: created through libublk's control commands, served by our queues.
//!
//! Creation: ADD_DEV (with user recovery), the device's record in the state directory,
//! one queue thread per hardware queue (each hands all its tags to the driver),
//! SET_PARAMS + START_DEV, then a read through the block node to prove it is live.
//!
//! Recovery (the kernel kept the device when the previous ublkd died or handed it
//! over): START_USER_RECOVERY, new queue threads, END_USER_RECOVERY; the driver then
//! reissues the requests it held.
//!
//! Deletion: STOP_DEV (the driver drains and removes the disk while the queues still
//! serve), stop and join the queues, close the char device, DEL_DEV_ASYNC. Detaching
//! (for the next ublkd) leaves the device in the kernel instead.

mod config;
pub mod in_use;
mod resize;
mod teardown;
mod udev_name;
mod write_cache;

use crate::fault;
use crate::kernel::{describe, ensure_ctrl_ring, errno, state_name, KernelInfo};
use crate::queue::{self, QueueCounters, QueueHandle, QueueSpec};
use crate::state::{Record, StateDir};
use anyhow::{anyhow, bail, Context, Result};
pub use config::MAX_IO_BYTES;
use config::{
    build_target, check_backing, choose_buffer, device_flags, params, recovered_buffer, use_batch,
    IoSizes,
};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};
use std::io::Read;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
pub use teardown::{delete_from_kernel, Deletion};
use ublkd_proto::features;
use ublkd_proto::validate::{self, Geometry};
use ublkd_proto::{AddDevice, BufferMode, CommandMode, DeviceDetail, DeviceInfo, KernelDeviceInfo};
use ublkd_targets::{DeviceShape, QuiesceSpot, SizeNotice, Target, Watch};
use write_cache::check_write_cache;

/// How long a queue thread may take to set up, and the block node to appear.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The same for a recovered device; the driver may first wait for the old server's
/// requests to be released.
const RECOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long detaching waits for the target's requests in flight.
const DETACH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `del` waits for the driver to see a device's queues and char device gone.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Device {
    pub id: u32,
    pub record: Record,
    pub geometry: Geometry,
    pub buffer: BufferMode,
    /// The queues run the batch command path (the device has UBLK_F_BATCH_IO).
    batch: bool,
    target: Arc<dyn Target>,
    shape: DeviceShape,
    counters: Vec<Arc<QueueCounters>>,
    /// The target's watches on its backend (`Device::watch_backend`: its size, its
    /// snapshots), ended first when the device goes.
    watches: Vec<Watch>,
    // Teardown order matters; see `Device::shutdown`.
    queues: Vec<QueueHandle>,
    /// What ended queues' commands pointed into, until the kernel lets go of it.
    retired: queue::Retired,
    dev: Option<UblkDev>,
    ctrl: Option<UblkCtrl>,
    started: bool,
}

/// Whether the kernel has a device with this id (its char device node exists).
pub fn kernel_has(id: u32) -> bool {
    std::path::Path::new(&format!("/dev/ublkc{id}")).exists()
}

/// The kernel has a device with the id an add asked for: another ublk server took it.
#[derive(Debug, thiserror::Error)]
#[error("device id {0} is in use by another ublk server (/dev/ublkc{0} exists)")]
pub struct IdTaken(pub u32);

/// A device the kernel has that was added but never started.
#[derive(Debug, thiserror::Error)]
#[error("the kernel's device {0} was added but never started")]
struct NeverStarted(u32);

/// Whether a new device's record is the caller's to keep when the device fails to
/// start (`Restore`: the record stays, to be tried again) or to remove (`New`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persist {
    New,
    Restore,
}

impl Device {
    /// Validates `req`, creates the device in the kernel and starts serving it. Returns
    /// once `/dev/ublkbN` exists and has served a read.
    ///
    /// The device's record is written as soon as the kernel has given it its id, so a
    /// crash at any later point leaves a device the next ublkd can recover.
    pub fn create(
        req: &AddDevice,
        kernel: &KernelInfo,
        state: &StateDir,
        persist: Persist,
    ) -> Result<Device> {
        Device::create_from(req, None, kernel, state, persist)
    }

    /// `create`, for a recorded device when `restoring` is its record.
    fn create_from(
        req: &AddDevice,
        restoring: Option<&Record>,
        kernel: &KernelInfo,
        state: &StateDir,
        persist: Persist,
    ) -> Result<Device> {
        let geometry =
            validate::geometry(req.queues, req.depth, req.block_size, kernel.max_queues)?;
        let buffer = choose_buffer(req.buffer, kernel, geometry.depth)?;
        let batch = use_batch(req.batch, kernel)?;
        let target = build_target(&req.target, &geometry)?;
        if let Some(record) = restoring {
            check_backing(record, &*target)?;
        }
        let shape = target.shape();

        ensure_ctrl_ring()?;
        let requested_id = match req.id {
            Some(id) => {
                validate::device_id(id)?;
                if kernel_has(id) {
                    return Err(IdTaken(id).into());
                }
                id as i32
            }
            None => -1,
        };
        let add = |flags: u64| {
            UblkCtrlBuilder::default()
                .name(target.name())
                .id(requested_id)
                .nr_queues(geometry.queues)
                .depth(geometry.depth)
                .io_buf_bytes(MAX_IO_BYTES)
                .ctrl_flags(flags)
                .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
                .build()
        };
        let flags = device_flags(buffer, kernel, target.copies_in(), batch);
        let user_copy = u64::from(sys::UBLK_F_USER_COPY);
        let ctrl = match add(flags) {
            // A kernel that does not take user copy together with zero copy: without it
            // the target receives straight into each request's pages.
            Err(e) if flags & user_copy != 0 => {
                log::info!(
                    "the kernel refused user copy with {buffer} buffers ({}); adding without",
                    describe(&e)
                );
                add(flags & !user_copy)
            }
            r => r,
        }
        .map_err(|e| match (req.id, errno(&e)) {
            (Some(id), Some(libc::EEXIST)) => IdTaken(id).into(),
            _ => anyhow!("the kernel refused to add the device: {}", describe(&e)),
        })?;
        let id = ctrl.dev_info().dev_id;
        let mut record = Record::new(id, req, buffer);
        record.backing = target.backing_id();
        log::info!(
            "dev {id}: added ({} target, {} bytes, {} queues x depth {}, {} buffers)",
            target.name(),
            shape.size,
            geometry.queues,
            geometry.depth,
            buffer
        );
        udev_name::publish(id, req.name.as_deref());
        let mut device = Device::new(record, geometry, buffer, target, ctrl);
        // On error `device` is dropped, which deletes whatever the kernel has of it.
        let started = state
            .save(&device.record)
            .and_then(|()| device.start(START_TIMEOUT));
        if let Err(e) = started {
            if persist == Persist::New {
                if let Err(e) = state.remove(id) {
                    log::error!("dev {id}: {e:#}");
                }
            }
            udev_name::forget(id);
            return Err(e);
        }
        Ok(device)
    }

    /// Serves the device of a record: recovers it when the kernel still has it (the
    /// previous ublkd crashed or handed it over), creates it with its old id otherwise
    /// (after a reboot, or `systemctl stop`).
    pub fn restore(record: &Record, kernel: &KernelInfo, state: &StateDir) -> Result<Device> {
        if kernel_has(record.id) {
            match Device::recover(record) {
                // The previous ublkd died while adding it: it never held any data.
                Err(e) if e.downcast_ref::<NeverStarted>().is_some() => {
                    log::info!("dev {}: {e}; adding it again", record.id);
                    delete_from_kernel(record.id)?;
                }
                result => return result,
            }
        }
        Device::create_from(&record.add, Some(record), kernel, state, Persist::Restore)
    }

    /// Serves again a device the kernel kept after the previous ublkd ended: the
    /// driver holds its requests (state quiesced) until END_USER_RECOVERY.
    fn recover(record: &Record) -> Result<Device> {
        let id = record.id;
        // The disk and its links exist already, but the name file went with the last
        // daemon's runtime directory; the next change event (a resize, `udevadm
        // trigger`) would drop the links without it.
        udev_name::publish(id, record.add.name.as_deref());
        let ctrl = existing_ctrl(id, record.add.target.name())?;
        let info = wait_released(&ctrl, id)?;
        match u32::from(info.state) {
            sys::UBLK_S_DEV_QUIESCED | sys::UBLK_S_DEV_FAIL_IO => {}
            sys::UBLK_S_DEV_LIVE => bail!(
                "the kernel's device {id} is live: another ublkd (pid {}) serves it",
                info.ublksrv_pid
            ),
            sys::UBLK_S_DEV_DEAD => return Err(NeverStarted(id).into()),
            _ => bail!(
                "the kernel's device {id} is {} and cannot be recovered; \
                 delete it ('ublkctl del {id}') and add it again",
                state_name(info.state)
            ),
        }
        if info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) == 0 {
            bail!("the kernel's device {id} was created without user recovery");
        }
        let geometry = Geometry {
            queues: info.nr_hw_queues,
            depth: info.queue_depth,
            block_size: record
                .add
                .block_size
                .unwrap_or(validate::DEFAULT_BLOCK_SIZE),
        };
        let buffer = recovered_buffer(info.flags, record.buffer);
        let target = build_target(&record.add.target, &geometry)?;
        check_backing(record, &*target)?;
        let shape = target.shape();
        let mut params = sys::ublk_params {
            len: std::mem::size_of::<sys::ublk_params>() as u32,
            types: sys::UBLK_PARAM_TYPE_BASIC,
            ..Default::default()
        };
        ctrl.get_params(&mut params).map_err(|e| {
            anyhow!(
                "cannot read the parameters of device {id}: {}",
                describe(&e)
            )
        })?;
        let kernel_size = params.basic.dev_sectors << 9;
        if kernel_size != shape.size {
            if !target.follows_backend_size() {
                bail!(
                    "the backing store of device {id} is now {} bytes, but the device has {} bytes",
                    shape.size,
                    kernel_size
                );
            }
            // Recovered as the kernel has it; once served, the device follows its
            // backend (`Daemon::live` looks at the size right away).
            log::warn!(
                "dev {id}: its {} backend changed size while it was not served ({kernel_size} -> {} bytes): \
                 recovering it at {kernel_size} bytes, then following the backend",
                target.name(),
                shape.size
            );
        }
        check_write_cache(id, &params, &shape, &*target);
        ctrl.start_user_recover().map_err(|e| {
            anyhow!(
                "the kernel refused to start recovering device {id}: {}",
                describe(&e)
            )
        })?;
        fault::crash_point("recovering");
        log::info!(
            "dev {id}: recovering ({} target, {kernel_size} bytes, {} queues x depth {}, {buffer} buffers)",
            target.name(),
            geometry.queues,
            geometry.depth
        );
        let mut device = Device::new(record.clone(), geometry, buffer, target, ctrl);
        device.shape.size = kernel_size;
        if let Err(e) = device.start(RECOVER_TIMEOUT) {
            // Leave the device to a later attempt: never delete what holds user data.
            device.disown();
            return Err(e);
        }
        Ok(device)
    }

    /// A device not served yet: `start` brings up its queues.
    fn new(
        record: Record,
        geometry: Geometry,
        buffer: BufferMode,
        target: Arc<dyn Target>,
        ctrl: UblkCtrl,
    ) -> Device {
        Device {
            id: record.id,
            record,
            geometry,
            buffer,
            batch: false,
            shape: target.shape(),
            target,
            counters: Vec::new(),
            watches: Vec::new(),
            queues: Vec::new(),
            retired: queue::Retired::default(),
            dev: None,
            ctrl: Some(ctrl),
            started: false,
        }
    }

    fn start(&mut self, timeout: Duration) -> Result<()> {
        let Some(ctrl) = self.ctrl.as_ref() else {
            bail!("device {} was already deleted", self.id);
        };
        let io = IoSizes {
            max: self.target.max_io_bytes(),
            optimal: self.target.optimal_io_bytes(),
        };
        let params = params(&self.shape, self.geometry.block_size, io);
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
        // The device's flags decide, so a recovered device is served as it was created.
        self.batch = dev.dev_info.flags & u64::from(sys::UBLK_F_BATCH_IO) != 0;

        let (tx, rx) = mpsc::channel();
        let affinity = self.record.add.affinity();
        for qid in 0..self.geometry.queues {
            let placement = queue::place(affinity, &queue_cpus(ctrl, qid), queue::allowed_cpus());
            let spec = QueueSpec {
                dev_id: self.id,
                qid,
                depth: self.geometry.depth,
                max_io_bytes: MAX_IO_BYTES,
                cdev_fd,
                buffer: self.buffer,
                user_copy: dev.dev_info.flags & u64::from(sys::UBLK_F_USER_COPY) != 0,
                batch: self.batch,
            };
            let handle = queue::spawn(spec, self.target.clone(), placement, tx.clone())
                .with_context(|| format!("cannot start the thread of queue {qid}"))?;
            self.counters.push(handle.counters.clone());
            self.queues.push(handle);
        }
        drop(tx);
        let deadline = Instant::now() + timeout;
        for _ in 0..self.geometry.queues {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(_tid)) => {}
                Ok(Err(e)) => bail!("{e}"),
                Err(_) => bail!("a queue did not start within {timeout:?}"),
            }
        }

        // Our queues have handed their tags to the driver; tell libublk's start gate so.
        for _ in 0..self.geometry.queues {
            dev.notify_buffer_registration_complete(false);
        }
        ctrl.start_dev(dev)
            .map_err(|e| anyhow!("the kernel refused to start the device: {}", describe(&e)))?;
        self.started = true;
        self.wait_live(deadline, timeout)?;
        log::info!("dev {}: live at {}", self.id, self.path());
        Ok(())
    }

    /// Waits for the block node and reads its first block through it.
    fn wait_live(&self, deadline: Instant, timeout: Duration) -> Result<()> {
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
                    bail!("{path} did not appear within {timeout:?}: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Has the target watch its backend: its size, calling `notice` on a change, when
    /// it can (an rbd image), and its snapshots, quiescing the device (an rbd device
    /// with `--quiesce`, which notes what it quiesced in `marker` meanwhile). True when
    /// the size is watched.
    pub fn watch_backend(&mut self, notice: SizeNotice, marker: PathBuf) -> bool {
        let spot = QuiesceSpot {
            device: self.path(),
            dev_id: self.id,
            marker,
        };
        match self.target.watch_quiesce(spot) {
            Ok(watch) => self.watches.extend(watch),
            Err(e) => log::error!(
                "dev {}: {e}; snapshots of its backend are taken without quiescing it",
                self.id
            ),
        }
        match self.target.watch_size(notice) {
            Ok(watch) => {
                let watched = watch.is_some();
                self.watches.extend(watch);
                watched
            }
            Err(e) => {
                log::warn!(
                    "dev {}: {e}; after resizing its backend, run 'ublkctl resize {}'",
                    self.id,
                    self.id
                );
                false
            }
        }
    }

    /// The target and the device's size now: what following the backend's size
    /// (`follow_backend`) asks the target about, outside the device table's lock.
    pub fn target_and_size(&self) -> (Arc<dyn Target>, u64) {
        (self.target.clone(), self.shape.size)
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
            name: self.record.add.name.clone(),
            error: None,
            spec: Some(self.record.add.target.clone()),
            target: self.target.name().to_string(),
            size: self.shape.size,
            block_size: self.geometry.block_size,
            queues: u32::from(self.geometry.queues),
            depth: u32::from(self.geometry.depth),
            buffer: self.buffer,
            commands: Some(if self.batch {
                CommandMode::Batch
            } else {
                CommandMode::PerTag
            }),
            affinity: self.record.add.affinity(),
            state: state.to_string(),
            path: self.path(),
        }
    }

    pub fn detail(&self) -> DeviceDetail {
        let k = self.kernel_info();
        let state = k.map_or("unknown", |i| state_name(i.state));
        let kernel = k.map(|i| KernelDeviceInfo {
            state: state.to_string(),
            flags: i.flags,
            flag_names: features::decode(i.flags).0,
            ublksrv_pid: i.ublksrv_pid,
            max_io_buf_bytes: i.max_io_buf_bytes,
            nr_hw_queues: u32::from(i.nr_hw_queues),
            queue_depth: u32::from(i.queue_depth),
        });
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
            target_counters: self
                .target
                .counters()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }
    }
}

/// The CPUs the kernel maps to queue `qid` (UBLK_U_CMD_GET_QUEUE_AFFINITY); none when it
/// cannot say, and then the queue is not pinned.
fn queue_cpus(ctrl: &UblkCtrl, qid: u16) -> Vec<usize> {
    let mut mask = libublk::ctrl::UblkQueueAffinity::new();
    match ctrl.get_queue_affinity(u32::from(qid), &mut mask) {
        Ok(_) => mask.to_bits_vec(),
        Err(e) => {
            log::warn!(
                "dev {} queue {qid}: cannot read the queue's CPUs from the kernel ({}); \
                 its thread runs unpinned",
                ctrl.dev_info().dev_id,
                describe(&e)
            );
            Vec::new()
        }
    }
}

/// The kernel's view of a device whose server is gone. The driver quiesces a device
/// once the old server's rings and char device are released, which can finish a little
/// after the process is gone: wait for that, as long as the old server is dead.
fn wait_released(ctrl: &UblkCtrl, id: u32) -> Result<sys::ublksrv_ctrl_dev_info> {
    let deadline = Instant::now() + RECOVER_TIMEOUT;
    loop {
        let info = ctrl.dev_info();
        let server_alive = info.ublksrv_pid > 0
            && info.ublksrv_pid != std::process::id() as i32
            // SAFETY: signal 0 only checks whether the process exists.
            && unsafe { libc::kill(info.ublksrv_pid, 0) } == 0;
        if u32::from(info.state) != sys::UBLK_S_DEV_LIVE
            || server_alive
            || Instant::now() >= deadline
        {
            return Ok(info);
        }
        std::thread::sleep(Duration::from_millis(50));
        ctrl.read_dev_info()
            .map_err(|e| anyhow!("cannot read the kernel's device {id}: {}", describe(&e)))?;
    }
}

/// A control handle on a device the kernel already has (it reads the device's info);
/// dropping it leaves the device alone.
fn existing_ctrl(id: u32, name: &str) -> Result<UblkCtrl> {
    ensure_ctrl_ring()?;
    UblkCtrlBuilder::default()
        .name(name)
        .id(id as i32)
        .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
        .build()
        .map_err(|e| anyhow!("cannot read the kernel's device {id}: {}", describe(&e)))
}
