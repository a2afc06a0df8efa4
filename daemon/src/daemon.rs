//! The daemon's devices and the requests that act on them.
//!
//! Every device has a record in the state directory from `add` until `del`, and an entry
//! in the device table under its id for as long as it has a record. An entry is served
//! (`Live`), recorded but not served (`Failed`, with the reason `list` shows; `recover`
//! tries again), or owned by one piece of work under way (restore at start, add,
//! recover, del), which no other request may change meanwhile.
//!
//! Ids are never taken over: `add` without `--id` gets the lowest id that has neither a
//! kernel device nor an entry (so not the id of a failed or restoring device), reserved
//! in the table before the kernel is asked, and `add --id N` is refused while N has an
//! entry. Requests that change devices are refused until the records have been restored.
//! With `--device-ids FIRST-LAST`, `add` without `--id` looks for its id in that range
//! only, so that ublk servers sharing a host (each restoring its devices under their
//! recorded ids) never hand out each other's ids.

mod connect;
mod delete;
mod entry;
mod sizes;

use crate::device::{self, Device, IdTaken, Persist};
use crate::fault;
use crate::kernel::KernelInfo;
use crate::state::{Record, StateDir};
use anyhow::{anyhow, bail, Result};
use entry::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use ublkd_proto::validate::{self, DEFAULT_BLOCK_SIZE, DEFAULT_DEPTH, DEFAULT_QUEUES};
use ublkd_proto::{
    features, AddDevice, BufferMode, DeviceDetail, DeviceInfo, DeviceRef, FeatureReport, Request,
    Response,
};

/// The start timeout systemd is asked to extend by before each local device is
/// restored (EXTEND_TIMEOUT_USEC).
const RESTORE_STEP: Duration = Duration::from_secs(90);

/// What happens to the devices when the daemon exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitMode {
    /// `systemctl stop`: remove the devices from the kernel once their IO has drained;
    /// keep their records, so the next start brings them back.
    RemoveDevices,
    /// An upgrade (`systemctl restart`): leave the devices in the kernel, which holds
    /// their IO, for the next ublkd to recover.
    HandOver,
}

pub struct Daemon {
    kernel: KernelInfo,
    /// The ids `add` without `--id` picks from (`--device-ids`).
    auto_ids: RangeInclusive<u32>,
    state: StateDir,
    devices: Mutex<BTreeMap<u32, Entry>>,
    /// Set until `restore_all` has run: requests that change devices are refused.
    restoring: AtomicBool,
    shutting_down: AtomicBool,
    /// Adds under way, so shutdown can wait for them.
    adding: (Mutex<usize>, Condvar),
    /// Ids of devices whose backend changed size by itself (`sizes.rs`), and their
    /// receiver until the thread that follows them starts.
    resized: mpsc::Sender<u32>,
    resized_rx: Mutex<Option<mpsc::Receiver<u32>>>,
}

impl Daemon {
    pub fn new(kernel: KernelInfo, state: StateDir, auto_ids: RangeInclusive<u32>) -> Self {
        let (resized, resized_rx) = mpsc::channel();
        Daemon {
            kernel,
            auto_ids,
            state,
            devices: Mutex::new(BTreeMap::new()),
            restoring: AtomicBool::new(true),
            shutting_down: AtomicBool::new(false),
            adding: (Mutex::new(0), Condvar::new()),
            resized,
            resized_rx: Mutex::new(Some(resized_rx)),
        }
    }

    fn devices(&self) -> MutexGuard<'_, BTreeMap<u32, Entry>> {
        // A panic while holding the lock leaves the map itself consistent.
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the device table can be taken: the watchdog's proof of life.
    pub fn responsive(&self) -> bool {
        drop(self.devices());
        true
    }

    /// Brings back every recorded device: recovers those the kernel still has, adds the
    /// others again under their ids, and finishes deletes a crash interrupted. A device
    /// that fails is logged and listed as failed; the others are served regardless.
    /// Until this returns, requests that change devices are refused. Returns (served,
    /// failed).
    ///
    /// Network devices (nbd) are not waited for: they connect in the background
    /// (`connect`), listed as connecting, and are not counted.
    pub fn restore_all(self: &Arc<Self>) -> Result<(usize, usize)> {
        self.follow_sizes()?;
        let result = self.restore_records();
        self.restoring.store(false, Ordering::Release);
        result
    }

    fn restore_records(self: &Arc<Self>) -> Result<(usize, usize)> {
        let (records, bad) = self.state.load()?;
        let mut failed = 0;
        {
            let mut devices = self.devices();
            for b in bad {
                let Some(id) = b.id else {
                    log::warn!("{}: {}", b.path.display(), b.error);
                    continue;
                };
                failed += 1;
                log::error!("device record {}: {}", b.path.display(), b.error);
                let error = format!("the record {} is unusable: {}", b.path.display(), b.error);
                devices.insert(
                    id,
                    Entry::Failed {
                        record: None,
                        error,
                    },
                );
            }
            // Every recorded id is held from the start, so nothing can take one over.
            for record in &records {
                devices.insert(record.id, Entry::Restoring(record.clone()));
            }
        }
        let mut served = 0;
        for record in records {
            let id = record.id;
            if !record.deleting && connect::is_network(&record) {
                self.connect_in_background(record);
                continue;
            }
            // A long restore (many devices, slow files) must not look like a hang.
            crate::service::extend_start_timeout(RESTORE_STEP);
            if record.deleting {
                log::info!("dev {id}: finishing a delete that was under way when ublkd ended");
                match self.delete_recorded(id, None, true) {
                    Ok(_) => {
                        self.devices().remove(&id);
                        continue;
                    }
                    Err(e) => {
                        failed += 1;
                        self.fail(id, Some(record), format!("{e:#}"));
                        continue;
                    }
                }
            }
            match Device::restore(&record, &self.kernel, &self.state) {
                Ok(dev) => {
                    served += 1;
                    self.insert_live(dev, None);
                }
                Err(e) => {
                    failed += 1;
                    log::error!("dev {id}: cannot be restored: {e:#}");
                    self.fail(id, Some(record), format!("{e:#}"));
                }
            }
        }
        Ok((served, failed))
    }

    /// Lists the device as recorded but not served, with the reason.
    fn fail(&self, id: u32, record: Option<Record>, error: String) {
        self.devices().insert(id, Entry::Failed { record, error });
    }

    /// Serves one control request.
    pub fn handle(&self, req: Request) -> Response {
        let changes = matches!(
            req,
            Request::Add(_)
                | Request::Del { .. }
                | Request::DelAll { .. }
                | Request::Recover { .. }
        );
        if changes && self.restoring.load(Ordering::Acquire) {
            return Response::Error(
                "ublkd is restoring its devices; try again in a moment \
                 ('ublkctl list' shows which are still restoring)"
                    .into(),
            );
        }
        let result = match req {
            Request::Add(add) => self.add(&add).map(Response::Added),
            Request::Del { ids, force } => self
                .resolve_all(&ids)
                .and_then(|ids| self.del(&ids, force))
                .map(|ids| Response::Deleted { ids }),
            Request::DelAll { force } => {
                let ids = self.devices().keys().copied().collect::<Vec<_>>();
                self.del(&ids, force).map(|ids| Response::Deleted { ids })
            }
            Request::List => Ok(Response::Devices(
                self.devices().iter().map(|(id, e)| e.info(*id)).collect(),
            )),
            Request::Show { id } => {
                self.resolve(&id)
                    .and_then(|id| match self.devices().get(&id) {
                        Some(e) => Ok(Response::Device(e.detail(id))),
                        None => Err(no_device(id)),
                    })
            }
            Request::Features => Ok(Response::Features(self.features())),
            Request::Stats => Ok(Response::Stats(
                self.devices().iter().map(|(id, e)| e.detail(*id)).collect(),
            )),
            Request::Recover { id } => self
                .resolve(&id)
                .and_then(|id| self.recover(id))
                .map(Response::Recovered),
            Request::Resize {
                id,
                size,
                grow_file,
            } => self
                .resolve(&id)
                .and_then(|id| self.resize(id, size, grow_file))
                .map(Response::Resized),
        };
        result.unwrap_or_else(|e| Response::Error(format!("{e:#}")))
    }

    /// `ublkctl resize`: see `Device::resize`.
    fn resize(&self, id: u32, size: Option<u64>, grow_file: bool) -> Result<DeviceInfo> {
        if self.kernel.features & u64::from(libublk::sys::UBLK_F_UPDATE_SIZE) == 0 {
            bail!(
                "resizing needs Linux 6.16 or later: this kernel's ublk driver lacks \
                 UBLK_F_UPDATE_SIZE (see 'ublkctl features')"
            );
        }
        let mut devices = self.devices();
        match devices.get_mut(&id) {
            Some(Entry::Live(dev)) => dev.resize(size, grow_file, &self.state),
            Some(e) => bail!(
                "device {id} is {}: only a served device can be resized",
                e.state()
            ),
            None => Err(no_device(id)),
        }
    }

    /// The id of the device a command names, by id or by name.
    fn resolve(&self, device: &DeviceRef) -> Result<u32> {
        match device {
            DeviceRef::Id(id) => Ok(*id),
            DeviceRef::Name(name) => self
                .devices()
                .iter()
                .find(|(_, e)| e.name() == Some(name.as_str()))
                .map(|(id, _)| *id)
                .ok_or_else(|| anyhow!("no device named '{name}' (see 'ublkctl list')")),
        }
    }

    fn resolve_all(&self, devices: &[DeviceRef]) -> Result<Vec<u32>> {
        devices.iter().map(|d| self.resolve(d)).collect()
    }

    fn features(&self) -> FeatureReport {
        let (names, unknown_bits) = features::decode(self.kernel.features);
        FeatureReport {
            bits: self.kernel.features,
            names,
            unknown_bits,
        }
    }

    fn add(&self, req: &AddDevice) -> Result<DeviceInfo> {
        if self.shutting_down.load(Ordering::Acquire) {
            bail!("ublkd is shutting down");
        }
        if let Some(name) = &req.name {
            validate::device_name(name)?;
        }
        if let Some(id) = req.id {
            validate::device_id(id)?;
        }
        let (count, cv) = &self.adding;
        *count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        let result = self.add_reserved(req);
        *count.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        cv.notify_all();
        if let Err(e) = &result {
            log::warn!("add {}: {e:#}", req.target.name());
        }
        result
    }

    /// Reserves an id, has the kernel create the device under it, and enters the
    /// device. An id another ublk server took meanwhile is skipped, unless it was asked
    /// for.
    fn add_reserved(&self, req: &AddDevice) -> Result<DeviceInfo> {
        let mut taken = BTreeSet::new();
        loop {
            let id = self.reserve(req, &taken)?;
            let with_id = AddDevice {
                id: Some(id),
                ..req.clone()
            };
            match Device::create(&with_id, &self.kernel, &self.state, Persist::New) {
                Ok(dev) => return self.insert_new(dev),
                Err(e) => {
                    self.devices().remove(&id);
                    let retry = req.id.is_none()
                        && taken.len() < 16
                        && e.downcast_ref::<IdTaken>().is_some();
                    if !retry {
                        return Err(e);
                    }
                    log::info!(
                        "dev {id}: taken by another ublk server meanwhile; trying the next id"
                    );
                    taken.insert(id);
                }
            }
        }
    }

    /// Holds an id for an add: the one asked for, or the lowest id with neither a kernel
    /// device nor an entry.
    fn reserve(&self, req: &AddDevice, skip: &BTreeSet<u32>) -> Result<u32> {
        let mut devices = self.devices();
        if let Some(name) = req.name.as_deref() {
            if let Some((id, _)) = devices.iter().find(|(_, e)| e.name() == Some(name)) {
                bail!("the name '{name}' is taken by device {id}");
            }
        }
        let id = match req.id {
            Some(id) => {
                if let Some(e) = devices.get(&id) {
                    bail!(
                        "device id {id} is in use: it belongs to {} (see 'ublkctl list')",
                        e.holder(id)
                    );
                }
                if device::kernel_has(id) {
                    bail!(
                        "device id {id} is in use by another ublk server (/dev/ublkc{id} exists)"
                    );
                }
                id
            }
            None => self
                .auto_ids
                .clone()
                .find(|id| {
                    !devices.contains_key(id) && !skip.contains(id) && !device::kernel_has(*id)
                })
                .ok_or_else(|| {
                    anyhow!(
                        "every device id from {} to {} is in use (ublkd --device-ids); \
                         delete a device or give one with --id",
                        self.auto_ids.start(),
                        self.auto_ids.end()
                    )
                })?,
        };
        devices.insert(id, Entry::Adding(req.clone()));
        Ok(id)
    }

    /// Enters a just-created device in place of its reservation, unless the daemon began
    /// shutting down meanwhile.
    fn insert_new(&self, dev: Device) -> Result<DeviceInfo> {
        let info = dev.info();
        let mut devices = self.devices();
        if self.shutting_down.load(Ordering::Acquire) {
            devices.remove(&dev.id);
            drop(devices);
            let id = dev.id;
            dev.shutdown()?;
            self.state.remove(id)?;
            bail!("ublkd is shutting down");
        }
        self.insert_live(dev, Some(&mut devices));
        Ok(info)
    }

    /// `ublkctl recover ID`: serve again a device that is recorded but not served.
    fn recover(&self, id: u32) -> Result<DeviceInfo> {
        if self.shutting_down.load(Ordering::Acquire) {
            bail!("ublkd is shutting down");
        }
        let record = {
            let mut devices = self.devices();
            let record = match devices.get(&id) {
                None => return Err(no_device(id)),
                Some(Entry::Live(_)) => bail!("device {id} is already served"),
                Some(Entry::Connecting { error, .. }) => bail!(
                    "device {id} is connecting: ublkd tries its server again every 30 s at \
                     most (last error: {error}); 'ublkctl del {id}' gives up on it"
                ),
                Some(Entry::Failed {
                    record: None,
                    error,
                }) => bail!("{error}"),
                Some(Entry::Failed {
                    record: Some(r), ..
                }) if r.deleting => bail!(
                    "device {id} is being deleted (a delete failed half-way); \
                     finish it with 'ublkctl del {id}'"
                ),
                Some(Entry::Failed {
                    record: Some(r), ..
                }) => r.clone(),
                Some(e) => bail!(
                    "device {id} is {}; try again when that is done",
                    e.busy().unwrap_or("busy")
                ),
            };
            devices.insert(id, Entry::Recovering(record.clone()));
            record
        };
        match Device::restore(&record, &self.kernel, &self.state) {
            Ok(dev) => {
                let info = dev.info();
                self.insert_live(dev, None);
                log::info!("dev {id}: recovered by request");
                Ok(info)
            }
            Err(e) => {
                let error = format!("{e:#}");
                self.fail(id, Some(record), error.clone());
                bail!("device {id}: {error}")
            }
        }
    }

    /// Refuses new devices, waits (bounded) for adds under way, then ends every served
    /// device as `mode` says. Records stay either way.
    pub fn shutdown(&self, mode: ExitMode) {
        self.shutting_down.store(true, Ordering::Release);
        let (count, cv) = &self.adding;
        let guard = count.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, timeout) = cv
            .wait_timeout_while(guard, Duration::from_secs(30), |n| *n > 0)
            .unwrap_or_else(|p| p.into_inner());
        if timeout.timed_out() {
            log::error!("shutdown: {} device adds still under way", *guard);
        }
        drop(guard);
        let entries = std::mem::take(&mut *self.devices());
        // All at once: each device may wait its own grace for a slow backend (an NBD
        // server's request timeout), and those waits must not add up against systemd's
        // stop timeout.
        std::thread::scope(|scope| {
            for (id, entry) in entries {
                let Entry::Live(dev) = entry else { continue };
                let end = move || match mode {
                    ExitMode::RemoveDevices => {
                        if let Err(e) = dev.shutdown() {
                            log::error!("dev {id}: {e:#}");
                        }
                    }
                    ExitMode::HandOver => dev.detach(),
                };
                // A thread that cannot be started aborts the daemon (panic = "abort"):
                // the kernel then keeps the devices for the next ublkd, which is safe
                // for either mode.
                scope.spawn(end);
            }
        });
    }

    /// Served, failed and connecting device counts, for the service status line.
    pub fn counts(&self) -> (usize, usize, usize) {
        let devices = self.devices();
        let count = |f: fn(&Entry) -> bool| devices.values().filter(|e| f(e)).count();
        (
            count(|e| matches!(e, Entry::Live(_))),
            count(|e| matches!(e, Entry::Failed { .. })),
            count(|e| matches!(e, Entry::Connecting { .. } | Entry::Recovering(_))),
        )
    }
}

fn no_device(id: u32) -> anyhow::Error {
    anyhow::anyhow!("no device with id {id} (see 'ublkctl list')")
}
