//! The daemon's devices and the requests that act on them.
//!
//! Every device has a record in the state directory from `add` until `del`. A device is
//! either served (`Entry::Live`) or recorded but not served (`Entry::Failed`: its
//! restore or recovery failed, or its record cannot be read), with the reason, which
//! `list` shows. `recover` tries a failed one again.

use crate::device::{self, Device, Persist};
use crate::kernel::KernelInfo;
use crate::state::{Record, StateDir};
use anyhow::{anyhow, bail, Result};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;
use ublkd_proto::validate::{self, DEFAULT_BLOCK_SIZE, DEFAULT_DEPTH, DEFAULT_QUEUES};
use ublkd_proto::{features, AddDevice, BufferMode, DeviceInfo, FeatureReport, Request, Response};

enum Entry {
    Live(Box<Device>),
    /// Recorded but not served. `record` is None when the record file is unreadable.
    Failed {
        record: Option<Record>,
        error: String,
    },
    /// A `recover` is under way.
    Recovering(Record),
}

impl Entry {
    fn name(&self) -> Option<&str> {
        let record = match self {
            Entry::Live(d) => Some(&d.record),
            Entry::Failed { record, .. } => record.as_ref(),
            Entry::Recovering(r) => Some(r),
        };
        record.and_then(|r| r.add.name.as_deref())
    }

    fn info(&self, id: u32) -> DeviceInfo {
        let (record, state, error) = match self {
            Entry::Live(d) => return d.info(),
            Entry::Failed { record, error } => (record.as_ref(), "failed", Some(error.clone())),
            Entry::Recovering(r) => (Some(r), "recovering", None),
        };
        let add = record.map(|r| &r.add);
        DeviceInfo {
            id,
            target: add.map_or("?", |a| a.target.name()).to_string(),
            size: match add.map(|a| &a.target) {
                Some(ublkd_proto::TargetSpec::Null { size }) => *size,
                _ => 0,
            },
            block_size: add.and_then(|a| a.block_size).unwrap_or(DEFAULT_BLOCK_SIZE),
            queues: add.and_then(|a| a.queues).unwrap_or(DEFAULT_QUEUES),
            depth: add.and_then(|a| a.depth).unwrap_or(DEFAULT_DEPTH),
            buffer: record.map_or(BufferMode::Copy, |r| r.buffer),
            state: state.to_string(),
            path: format!("/dev/ublkb{id}"),
            name: add.and_then(|a| a.name.clone()),
            error,
        }
    }
}

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
    state: StateDir,
    devices: Mutex<BTreeMap<u32, Entry>>,
    shutting_down: AtomicBool,
    /// Adds under way, so shutdown can wait for them.
    adding: (Mutex<usize>, Condvar),
}

impl Daemon {
    pub fn new(kernel: KernelInfo, state: StateDir) -> Self {
        Daemon {
            kernel,
            state,
            devices: Mutex::new(BTreeMap::new()),
            shutting_down: AtomicBool::new(false),
            adding: (Mutex::new(0), Condvar::new()),
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
    /// others again under their ids. A device that fails is logged and listed as
    /// failed; the others are served regardless. Returns (served, failed).
    pub fn restore_all(&self) -> Result<(usize, usize)> {
        let (records, bad) = self.state.load()?;
        let mut failed = 0;
        for b in bad {
            failed += 1;
            log::error!("device record {}: {}", b.path.display(), b.error);
            if let Some(id) = b.id {
                let error = format!("the record {} is unusable: {}", b.path.display(), b.error);
                self.devices().insert(
                    id,
                    Entry::Failed {
                        record: None,
                        error,
                    },
                );
            }
        }
        let mut served = 0;
        for record in records {
            let id = record.id;
            match Device::restore(&record, &self.kernel, &self.state) {
                Ok(dev) => {
                    served += 1;
                    self.devices().insert(id, Entry::Live(Box::new(dev)));
                }
                Err(e) => {
                    failed += 1;
                    log::error!("dev {id}: cannot be restored: {e:#}");
                    let error = format!("{e:#}");
                    self.devices().insert(
                        id,
                        Entry::Failed {
                            record: Some(record),
                            error,
                        },
                    );
                }
            }
        }
        Ok((served, failed))
    }

    /// Serves one control request.
    pub fn handle(&self, req: Request) -> Response {
        let result = match req {
            Request::Add(add) => self.add(&add).map(Response::Added),
            Request::Del { ids } => self.del(&ids).map(|ids| Response::Deleted { ids }),
            Request::DelAll => {
                let ids = self.devices().keys().copied().collect::<Vec<_>>();
                self.del(&ids).map(|ids| Response::Deleted { ids })
            }
            Request::List => Ok(Response::Devices(
                self.devices().iter().map(|(id, e)| e.info(*id)).collect(),
            )),
            Request::Show { id } => match self.devices().get(&id) {
                Some(Entry::Live(d)) => Ok(Response::Device(d.detail())),
                Some(_) => Err(anyhow!(
                    "device {id} is not served (see 'ublkctl list' for why)"
                )),
                None => Err(no_device(id)),
            },
            Request::Features => Ok(Response::Features(self.features())),
            Request::Recover { id } => self.recover(id).map(Response::Recovered),
        };
        result.unwrap_or_else(|e| Response::Error(format!("{e:#}")))
    }

    fn features(&self) -> FeatureReport {
        let (names, unknown_bits) = features::decode(self.kernel.features);
        FeatureReport {
            bits: self.kernel.features,
            names,
            unknown_bits,
        }
    }

    fn check_name(&self, name: Option<&str>) -> Result<()> {
        if let Some(name) = name {
            validate::device_name(name)?;
            if let Some((id, _)) = self.devices().iter().find(|(_, e)| e.name() == Some(name)) {
                bail!("the name '{name}' is taken by device {id}");
            }
        }
        Ok(())
    }

    fn add(&self, req: &AddDevice) -> Result<DeviceInfo> {
        if self.shutting_down.load(Ordering::Acquire) {
            bail!("ublkd is shutting down");
        }
        self.check_name(req.name.as_deref())?;
        if let Some(id) = req.id {
            if self.devices().contains_key(&id) {
                bail!("device id {id} is in use (see 'ublkctl list')");
            }
        }
        let (count, cv) = &self.adding;
        *count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        let result = Device::create(req, &self.kernel, &self.state, Persist::New)
            .and_then(|dev| self.insert_new(dev));
        *count.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        cv.notify_all();
        if let Err(e) = &result {
            log::warn!("add {}: {e:#}", req.target.name());
        }
        result
    }

    /// Enters a just-created device, unless the daemon began shutting down or another
    /// add took its name meanwhile.
    fn insert_new(&self, dev: Device) -> Result<DeviceInfo> {
        let info = dev.info();
        let mut devices = self.devices();
        let clash = info
            .name
            .as_deref()
            .and_then(|n| devices.values().find(|e| e.name() == Some(n)).map(|_| n));
        let why = if self.shutting_down.load(Ordering::Acquire) {
            Some("ublkd is shutting down".to_string())
        } else {
            clash.map(|n| format!("the name '{n}' was taken meanwhile"))
        };
        if let Some(why) = why {
            drop(devices);
            let id = dev.id;
            dev.shutdown()?;
            self.state.remove(id)?;
            bail!("{why}");
        }
        devices.insert(dev.id, Entry::Live(Box::new(dev)));
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
                Some(Entry::Recovering(_)) => bail!("device {id} is being recovered already"),
                Some(Entry::Failed {
                    record: None,
                    error,
                }) => bail!("{error}"),
                Some(Entry::Failed {
                    record: Some(r), ..
                }) => r.clone(),
            };
            devices.insert(id, Entry::Recovering(record.clone()));
            record
        };
        match Device::restore(&record, &self.kernel, &self.state) {
            Ok(dev) => {
                let info = dev.info();
                self.devices().insert(id, Entry::Live(Box::new(dev)));
                log::info!("dev {id}: recovered by request");
                Ok(info)
            }
            Err(e) => {
                let error = format!("{e:#}");
                self.devices().insert(
                    id,
                    Entry::Failed {
                        record: Some(record),
                        error: error.clone(),
                    },
                );
                bail!("device {id}: {error}")
            }
        }
    }

    /// `ublkctl del`: removes the devices from the kernel and forgets their records.
    fn del(&self, ids: &[u32]) -> Result<Vec<u32>> {
        if ids.is_empty() {
            bail!("no device id given");
        }
        let removed: Vec<(u32, Entry)> = {
            let mut devices = self.devices();
            if let Some(id) = ids.iter().find(|id| !devices.contains_key(id)) {
                return Err(no_device(*id));
            }
            if let Some(id) = ids
                .iter()
                .find(|id| matches!(devices.get(id), Some(Entry::Recovering(_))))
            {
                bail!("device {id} is being recovered; try again when that is done");
            }
            ids.iter()
                .filter_map(|id| devices.remove_entry(id))
                .collect()
        };
        let mut deleted = Vec::new();
        let mut failures = Vec::new();
        for (id, entry) in removed {
            let gone = match entry {
                Entry::Live(dev) => dev.shutdown(),
                // Not served, but the kernel may still hold it (a failed recovery).
                _ => device::delete_from_kernel(id),
            }
            .and_then(|()| self.state.remove(id));
            match gone {
                Ok(()) => deleted.push(id),
                Err(e) => failures.push(format!("device {id}: {e:#}")),
            }
        }
        if failures.is_empty() {
            Ok(deleted)
        } else {
            bail!("{}", failures.join("; "))
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
        for (id, entry) in entries {
            let Entry::Live(dev) = entry else { continue };
            match mode {
                ExitMode::RemoveDevices => {
                    if let Err(e) = dev.shutdown() {
                        log::error!("dev {id}: {e:#}");
                    }
                }
                ExitMode::HandOver => dev.detach(),
            }
        }
    }

    /// Served and failed device counts, for the service status line.
    pub fn counts(&self) -> (usize, usize) {
        let devices = self.devices();
        let live = devices
            .values()
            .filter(|e| matches!(e, Entry::Live(_)))
            .count();
        (live, devices.len() - live)
    }
}

fn no_device(id: u32) -> anyhow::Error {
    anyhow::anyhow!("no device with id {id} (see 'ublkctl list')")
}
