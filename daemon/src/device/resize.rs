//! A served device gets a new size (UBLK_U_CMD_UPDATE_SIZE, Linux 6.16), which the
//! target decides (`Target::resize`: null any size, loop its file's, rbd its image's,
//! nbd none) and the record keeps, so a restart or a recovery finds the same size.
//! Two ways in: `ublkctl resize`, and a backend that changed size by itself (an rbd
//! image resized with `rbd resize`), which the device follows (`follow_backend`).

use super::{in_use, Device};
use crate::kernel::{describe, ensure_ctrl_ring};
use crate::state::StateDir;
use anyhow::{anyhow, bail, Result};
use ublkd_proto::validate;
use ublkd_proto::{DeviceInfo, TargetSpec};

impl Device {
    /// Resizes the device to `requested` bytes (or, for loop, its file's size now),
    /// growing a loop device's file first when `grow_file` asks for it.
    pub fn resize(
        &mut self,
        requested: Option<u64>,
        grow_file: bool,
        state: &StateDir,
    ) -> Result<DeviceInfo> {
        let id = self.id;
        // libublk sends control commands on a ring of the calling thread.
        ensure_ctrl_ring()?;
        let block_size = self.geometry.block_size;
        if let Some(size) = requested {
            validate::device_size(size, block_size)?;
        }
        let current = self.shape.size;
        let size = self
            .target
            .resize(current, requested, grow_file)
            .map_err(|e| anyhow!("device {id}: {e}"))?;
        validate::device_size(size, block_size)?;
        if size == current {
            return Ok(self.info());
        }
        if size < current {
            let holders = in_use::holders(id);
            if !holders.is_empty() {
                bail!(
                    "device {id} is {}: shrinking it would cut off the end of what uses it",
                    holders.join(", ")
                );
            }
        }
        self.set_size(size, state)?;
        log::info!("dev {id}: resized from {current} to {size} bytes");
        Ok(self.info())
    }

    /// Gives the device `size` bytes, the size its backend has now after changing by
    /// itself. A shrink is followed too, holders or not: the backend's end has moved
    /// already, and the block layer fails IO past the device's new end.
    pub fn follow_backend(&mut self, size: u64, state: &StateDir) -> Result<()> {
        let id = self.id;
        let current = self.shape.size;
        if size == current {
            return Ok(());
        }
        ensure_ctrl_ring()?;
        validate::device_size(size, self.geometry.block_size).map_err(|e| {
            anyhow!("its {} backend is now {size} bytes, which the device cannot follow ({e}); it stays at {current} bytes", self.target.name())
        })?;
        if size < current {
            let holders = in_use::holders(id);
            let who = if holders.is_empty() {
                String::new()
            } else {
                format!(" while it is {}", holders.join(", "))
            };
            log::warn!(
                "dev {id}: its {} backend shrank from {current} to {size} bytes{who}: \
                 the device shrinks with it, and what was past the new end is gone",
                self.target.name()
            );
        }
        self.set_size(size, state)?;
        log::info!(
            "dev {id}: resized from {current} to {size} bytes, following its {} backend",
            self.target.name()
        );
        Ok(())
    }

    /// The record (where it keeps the size), then the kernel's device; the record is
    /// put back if the kernel refuses.
    fn set_size(&mut self, size: u64, state: &StateDir) -> Result<()> {
        let id = self.id;
        // The record first: a daemon that dies after the kernel's resize must find the
        // new size there, or its recovery would see a device of another size.
        let old_record = self.record.clone();
        if let TargetSpec::Null { size: recorded } = &mut self.record.add.target {
            *recorded = size;
            state.save(&self.record)?;
        }
        let ctrl = self
            .ctrl
            .as_ref()
            .ok_or_else(|| anyhow!("device {id} is going away"))?;
        if let Err(e) = ctrl.update_size(size) {
            if self.record != old_record {
                self.record = old_record;
                if let Err(e) = state.save(&self.record) {
                    log::error!("dev {id}: cannot put its record back: {e:#}");
                }
            }
            bail!(
                "the kernel refused the new size of device {id}: {}",
                describe(&e)
            );
        }
        self.shape.size = size;
        Ok(())
    }
}
