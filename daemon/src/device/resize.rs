//! `ublkctl resize`: a served device gets a new size (UBLK_U_CMD_UPDATE_SIZE, Linux
//! 6.16), which the target decides (`Target::resize`: null any size, loop its file's,
//! nbd none) and the record keeps, so a restart or a recovery finds the same size.

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
        log::info!("dev {id}: resized from {current} to {size} bytes");
        Ok(self.info())
    }
}
