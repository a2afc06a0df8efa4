//! Ending a device: deletion (STOP_DEV while the queues still serve, then the queues,
//! the char device, DEL_DEV_ASYNC), deletion only while nobody holds the disk open, and
//! detaching for the next ublkd, which leaves the device in the kernel.

use super::*;

impl Device {
    /// Removes the device from the kernel: stop (the driver drains in-flight IO through
    /// the queues), end the queues, close the char device, delete.
    pub fn shutdown(mut self) -> Result<()> {
        self.teardown()
    }

    /// Leaves the device in the kernel for the next ublkd (an upgrade): the queues stop
    /// taking requests, finish what their target has in flight and end; the driver
    /// holds every later request until the next ublkd recovers the device.
    pub fn detach(mut self) {
        self.watches.clear();
        for q in &self.queues {
            q.request_detach();
        }
        let deadline = Instant::now() + DETACH_TIMEOUT;
        while !self.queues.iter().all(QueueHandle::is_finished) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.queues.iter().all(QueueHandle::is_finished) {
            // Their memory stays with the process, which is about to exit (`Retired`).
            for q in &mut self.queues {
                q.join(&mut self.retired);
            }
            self.queues.clear();
            self.dev = None;
        } else {
            // A target request did not finish (a server that does not answer): the
            // process is about to exit, and its exit cancels what is left; the driver
            // reissues those requests to the next ublkd.
            log::warn!(
                "dev {}: a queue did not finish within {DETACH_TIMEOUT:?}; leaving it to exit",
                self.id
            );
            std::mem::forget(std::mem::take(&mut self.queues));
            std::mem::forget(self.dev.take());
        }
        self.disown();
        log::info!("dev {}: detached, the kernel holds its requests", self.id);
    }

    /// Makes dropping this device leave it in the kernel.
    pub(super) fn disown(&mut self) {
        if let Some(ctrl) = self.ctrl.take() {
            ctrl.disown();
        }
    }

    /// Lets go of a live device before STOP_DEV: the queues finish what their target
    /// holds and take nothing new, and the char device closes, so the driver holds
    /// later requests (state QUIESCED) and STOP_DEV fails them.
    ///
    /// STOP_DEV on a LIVE device instead quiesces the block queue and then waits for
    /// every started request to end (ublk_force_abort_dev). A file system's flush
    /// sequence caught half way (its data request started, its flush request parked in
    /// the dispatch list of the now quiesced queue) never ends, and STOP_DEV hangs with
    /// the queues idle: seen in the VM with ext4's journal commit racing `del`.
    fn release(&mut self, ctrl: &UblkCtrl) {
        for q in &self.queues {
            q.request_detach();
        }
        for q in &mut self.queues {
            q.join(&mut self.retired);
        }
        self.queues.clear();
        self.dev = None;
        let deadline = Instant::now() + RELEASE_TIMEOUT;
        loop {
            if let Err(e) = ctrl.read_dev_info() {
                log::warn!("dev {}: cannot read its state: {}", self.id, describe(&e));
                return;
            }
            if u32::from(ctrl.dev_info().state) != sys::UBLK_S_DEV_LIVE {
                return;
            }
            if Instant::now() >= deadline {
                log::warn!(
                    "dev {}: the driver still calls it live {RELEASE_TIMEOUT:?} after its queues ended; stopping it anyway",
                    self.id
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn teardown(&mut self) -> Result<()> {
        // Before the target and its backend go (an rbd image closes only once unwatched).
        self.watches.clear();
        let Some(ctrl) = self.ctrl.take() else {
            return Ok(());
        };
        ensure_ctrl_ring()?;
        let mut result = Ok(());
        // The target gives up on its own when its backend is unreachable or too slow
        // (`Target::stopping`), so neither the writeback nor the queues' last requests
        // can hold `del` up for longer than that.
        self.target.stopping();
        if self.started {
            // STOP_DEV fails what the kernel writes back after it began: write it back now.
            crate::writeback::write_back(self.id);
            self.release(&ctrl);
            if let Err(e) = ctrl.kill_dev() {
                result = Err(anyhow!("STOP_DEV failed: {}", describe(&e)));
            }
        }
        self.end_and_delete(&ctrl, result)
    }

    /// `del` without `--force`: on a kernel with UBLK_F_SAFE_STOP_DEV, the device is
    /// stopped only if nobody has it open (TRY_STOP_DEV, atomic in the kernel), and is
    /// handed back untouched, still serving, if somebody does. Elsewhere the caller has
    /// looked for holders (`in_use::holders`) and this is `shutdown`.
    pub fn delete_unless_open(mut self) -> Deletion {
        let safe_stop = self
            .ctrl
            .as_ref()
            .is_some_and(|c| c.dev_info().flags & u64::from(sys::UBLK_F_SAFE_STOP_DEV) != 0);
        if !self.started || !safe_stop {
            return Deletion::Done(self.teardown());
        }
        if let Err(e) = ensure_ctrl_ring() {
            return Deletion::Done(Err(e));
        }
        match in_use::try_stop(self.id) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Deletion::Open(Box::new(self));
            }
            Err(e) => {
                log::warn!("dev {}: TRY_STOP_DEV: {e}; stopping it as usual", self.id);
                return Deletion::Done(self.teardown());
            }
        }
        // Stopped while nobody had it open: its last closer wrote its page cache back,
        // and no request of a file system can be in flight.
        self.watches.clear();
        let Some(ctrl) = self.ctrl.take() else {
            return Deletion::Done(Ok(()));
        };
        self.target.stopping();
        Deletion::Done(self.end_and_delete(&ctrl, Ok(())))
    }

    /// After STOP_DEV: ends the target and the queues, then deletes the device.
    fn end_and_delete(&mut self, ctrl: &UblkCtrl, mut result: Result<()>) -> Result<()> {
        self.target.abort();
        for q in &self.queues {
            q.request_stop();
        }
        for q in &mut self.queues {
            q.join(&mut self.retired);
        }
        self.queues.clear();
        self.dev = None;
        self.release_retired();
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
        udev_name::forget(self.id);
        match &result {
            Ok(()) => log::info!("dev {}: deleted", self.id),
            Err(e) => log::error!("dev {}: delete: {e:#}", self.id),
        }
        result
    }

    /// Frees the memory the ended queues' commands pointed into once the kernel has
    /// released the char device, which it does only after every command on it has
    /// completed (`queue::Retired`). Called after STOP_DEV, with the queues joined and
    /// our descriptor closed: the release is then a matter of the rings' cancellations,
    /// and the char device opens again (ENOENT: the device is gone). If it does not
    /// within the bound, the memory is leaked rather than risked.
    fn release_retired(&mut self) {
        if self.retired.is_empty() {
            return;
        }
        let path = format!("/dev/ublkc{}", self.id);
        let deadline = Instant::now() + RELEASE_TIMEOUT;
        loop {
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
            {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    log::warn!(
                        "dev {}: {path} still busy {RELEASE_TIMEOUT:?} after its queues ended ({e}); \
                         the memory its commands pointed into is not freed",
                        self.id
                    );
                    return;
                }
            }
        }
        self.retired.release(self.id);
    }

    /// Who holds the device open, as far as userspace can tell.
    pub fn holder_text(&self) -> String {
        let holders = in_use::holders(self.id);
        if holders.is_empty() {
            "by the kernel or a process ublkd cannot see".into()
        } else {
            holders.join(", ")
        }
    }
}

/// What [`Device::delete_unless_open`] did.
pub enum Deletion {
    /// The device is gone from the kernel (or the delete failed, with the reason).
    Done(Result<()>),
    /// Somebody has the disk open: nothing changed, the device still serves.
    Open(Box<Device>),
}

/// Removes a device of this id from the kernel, if there is one, whatever its state.
/// Requests it still holds fail.
pub fn delete_from_kernel(id: u32) -> Result<()> {
    udev_name::forget(id);
    if !kernel_has(id) {
        return Ok(());
    }
    let ctrl = existing_ctrl(id, "ublkd")?;
    if u32::from(ctrl.dev_info().state) != sys::UBLK_S_DEV_DEAD {
        if let Err(e) = ctrl.kill_dev() {
            log::warn!("dev {id}: STOP_DEV: {}", describe(&e));
        }
    }
    ctrl.del_dev_async()
        .or_else(|_| ctrl.del_dev())
        .map_err(|e| anyhow!("cannot delete the kernel's device {id}: {}", describe(&e)))?;
    log::info!("dev {id}: deleted from the kernel");
    Ok(())
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}
