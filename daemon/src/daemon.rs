//! The daemon's devices and the requests that act on them.

use crate::device::Device;
use crate::kernel::KernelInfo;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;
use ublkd_proto::{features, AddDevice, FeatureReport, Request, Response};

pub struct Daemon {
    kernel: KernelInfo,
    devices: Mutex<BTreeMap<u32, Device>>,
    shutting_down: AtomicBool,
    /// Adds under way, so shutdown can wait for them.
    adding: (Mutex<usize>, Condvar),
}

impl Daemon {
    pub fn new(kernel: KernelInfo) -> Self {
        Daemon {
            kernel,
            devices: Mutex::new(BTreeMap::new()),
            shutting_down: AtomicBool::new(false),
            adding: (Mutex::new(0), Condvar::new()),
        }
    }

    fn devices(&self) -> MutexGuard<'_, BTreeMap<u32, Device>> {
        // A panic while holding the lock leaves the map itself consistent.
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves one control request.
    pub fn handle(&self, req: Request) -> Response {
        let result = match req {
            Request::Add(add) => self.add(&add).map(Response::Added),
            Request::Del { ids } => self.del(&ids).map(|ids| Response::Deleted { ids }),
            Request::DelAll => self.del_all().map(|ids| Response::Deleted { ids }),
            Request::List => Ok(Response::Devices(
                self.devices().values().map(Device::info).collect(),
            )),
            Request::Show { id } => match self.devices().get(&id) {
                Some(d) => Ok(Response::Device(d.detail())),
                None => Err(no_device(id)),
            },
            Request::Features => Ok(Response::Features(self.features())),
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

    fn add(&self, req: &AddDevice) -> Result<ublkd_proto::DeviceInfo> {
        if self.shutting_down.load(Ordering::Acquire) {
            bail!("ublkd is shutting down");
        }
        let (count, cv) = &self.adding;
        *count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        let result = Device::create(req, &self.kernel).and_then(|dev| {
            let info = dev.info();
            let mut devices = self.devices();
            if self.shutting_down.load(Ordering::Acquire) {
                drop(devices);
                dev.shutdown()?;
                bail!("ublkd is shutting down");
            }
            devices.insert(dev.id, dev);
            Ok(info)
        });
        *count.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        cv.notify_all();
        if let Err(e) = &result {
            log::warn!("add {}: {e:#}", req.target.name());
        }
        result
    }

    fn del(&self, ids: &[u32]) -> Result<Vec<u32>> {
        if ids.is_empty() {
            bail!("no device id given");
        }
        let removed: Vec<Device> = {
            let mut devices = self.devices();
            if let Some(id) = ids.iter().find(|id| !devices.contains_key(id)) {
                return Err(no_device(*id));
            }
            ids.iter().filter_map(|id| devices.remove(id)).collect()
        };
        shutdown_all(removed)
    }

    fn del_all(&self) -> Result<Vec<u32>> {
        let removed: Vec<Device> = std::mem::take(&mut *self.devices()).into_values().collect();
        shutdown_all(removed)
    }

    /// Deletes every device and refuses new ones; waits (bounded) for adds under way.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        if let Err(e) = self.del_all() {
            log::error!("shutdown: {e:#}");
        }
        let (count, cv) = &self.adding;
        let guard = count.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, timeout) = cv
            .wait_timeout_while(guard, Duration::from_secs(30), |n| *n > 0)
            .unwrap_or_else(|p| p.into_inner());
        if timeout.timed_out() {
            log::error!("shutdown: {} device adds still under way", *guard);
        }
    }
}

fn no_device(id: u32) -> anyhow::Error {
    anyhow::anyhow!("no device with id {id} (see 'ublkctl list')")
}

/// Deletes each device; reports every id deleted, or the failures.
fn shutdown_all(devices: Vec<Device>) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    let mut failures = Vec::new();
    for dev in devices {
        let id = dev.id;
        match dev.shutdown() {
            Ok(()) => ids.push(id),
            Err(e) => failures.push(format!("device {id}: {e:#}")),
        }
    }
    if failures.is_empty() {
        Ok(ids)
    } else {
        bail!("{}", failures.join("; "))
    }
}
