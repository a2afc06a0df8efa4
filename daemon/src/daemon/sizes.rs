//! Devices whose backend changes size by itself (an rbd image resized with `rbd
//! resize`) follow it. Each served device's target is asked to watch its backend
//! (`Target::watch_size`); a watch's notice, on the backend library's thread, only
//! sends the device's id here. One thread of ublkd's takes the ids, asks the target for
//! the size now (outside the device table's lock: librbd may ask the cluster), and
//! resizes the device as `ublkctl resize` does (`Device::follow_backend`).

use super::{Daemon, Entry};
use crate::device::Device;
use anyhow::{anyhow, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Daemon {
    /// Starts the thread that follows backend sizes (once).
    pub(super) fn follow_sizes(self: &Arc<Self>) -> Result<()> {
        let Some(rx) = self
            .resized_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return Ok(());
        };
        let daemon = self.clone();
        std::thread::Builder::new()
            .name("ublkd-sizes".into())
            .spawn(move || {
                while let Ok(id) = rx.recv() {
                    // Notices come in bursts (one per header change); one look each.
                    let mut ids = BTreeSet::from([id]);
                    ids.extend(rx.try_iter());
                    for id in ids {
                        daemon.follow_size(id);
                    }
                }
            })
            .map(drop)
            .context("cannot start the thread that follows backend sizes")
    }

    /// Puts a device that is now served into the device table (into `held` when the
    /// caller holds the table's lock), its backend watched for size changes when the
    /// target can do that (outside the lock, unless the caller holds it: librbd asks
    /// the cluster). The size is looked at once right away too: the backend may have
    /// changed between the target's open and the watch, or while no ublkd ran (a
    /// recovery). That look is asked for only once the entry is in the table, so that
    /// the size thread finds the device live.
    pub(super) fn insert_live(&self, mut dev: Device, held: Option<&mut BTreeMap<u32, Entry>>) {
        let id = dev.id;
        let resized = self.resized.clone();
        let marker = self.state.quiesce_marker(id);
        let watched = dev.watch_backend(
            Box::new(move || {
                let _ = resized.send(id);
            }),
            marker,
        );
        let entry = Entry::Live(Box::new(dev));
        match held {
            Some(devices) => devices.insert(id, entry),
            None => self.devices().insert(id, entry),
        };
        if watched {
            let _ = self.resized.send(id);
        }
    }

    /// Gives device `id` its backend's size now, if that changed.
    fn follow_size(&self, id: u32) {
        if self.shutting_down.load(Ordering::Acquire) {
            return;
        }
        let (target, current) = match self.devices().get(&id) {
            Some(Entry::Live(dev)) => dev.target_and_size(),
            _ => return,
        };
        let size = match target.resize(current, None, false) {
            Ok(size) => size,
            Err(e) => {
                log::warn!("dev {id}: its backend changed, but its size is unknown: {e}");
                return;
            }
        };
        if size == current {
            return;
        }
        let result = if self.kernel.features & u64::from(libublk::sys::UBLK_F_UPDATE_SIZE) == 0 {
            Err(anyhow!(
                "its {} backend is now {size} bytes, but this kernel's ublk driver cannot \
                 resize a device (UBLK_F_UPDATE_SIZE, Linux 6.16): the device stays at \
                 {current} bytes until it is deleted and added again",
                target.name()
            ))
        } else {
            match self.devices().get_mut(&id) {
                // Still the device that was asked, not one added under its id since.
                Some(Entry::Live(dev)) if Arc::ptr_eq(&dev.target_and_size().0, &target) => {
                    dev.follow_backend(size, &self.state)
                }
                _ => Ok(()),
            }
        };
        if let Err(e) = result {
            log::warn!("dev {id}: {e:#}");
        }
    }
}
