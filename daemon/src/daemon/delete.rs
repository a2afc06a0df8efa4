//! `ublkctl del`: devices out of the kernel and their records forgotten, each marked
//! first so that a daemon that dies half-way is followed by one that finishes.

use super::*;

impl Daemon {
    /// `ublkctl del`: removes the devices from the kernel and forgets their records.
    /// Each record is marked first, so a daemon that dies half-way is followed by one
    /// that finishes the delete. A device whose delete fails stays listed (failed, with
    /// the reason), and `del` may be tried again.
    ///
    /// Without `force`, a device that is mounted, stacked on or open is not deleted, and
    /// neither is any other of the request: the refusal names who holds it.
    pub(super) fn del(&self, ids: &[u32], force: bool) -> Result<Vec<u32>> {
        if ids.is_empty() {
            bail!("no device id given");
        }
        let ids: BTreeSet<u32> = ids.iter().copied().collect();
        // Looked at before the device table is locked: it may wait a moment for a
        // short-lived opener (udev's probe) to go.
        let holders: BTreeMap<u32, Vec<String>> = if force {
            BTreeMap::new()
        } else {
            ids.iter()
                .map(|id| (*id, device::in_use::settled_holders(*id)))
                .filter(|(_, h)| !h.is_empty())
                .collect()
        };
        let taken: Vec<(u32, Entry)> = {
            let mut devices = self.devices();
            let mut in_use = Vec::new();
            for id in &ids {
                match devices.get(id) {
                    None => return Err(no_device(*id)),
                    Some(e) => {
                        if let Some(busy) = e.busy() {
                            bail!("device {id} is {busy}; try again when that is done");
                        }
                        if let Some(h) = holders.get(id) {
                            in_use.push(format!("{} is {}", e.holder(*id), h.join(", ")));
                        }
                    }
                }
            }
            if !in_use.is_empty() {
                bail!(
                    "{}: unmount or close it first, or use 'ublkctl del --force' \
                     (IO still sent to it then fails)",
                    in_use.join("; ")
                );
            }
            ids.iter()
                .filter_map(|id| {
                    let record = devices.get(id)?.record().cloned();
                    let old = devices.insert(*id, Entry::Deleting(record))?;
                    Some((*id, old))
                })
                .collect()
        };
        let mut deleted = Vec::new();
        let mut failures = Vec::new();
        for (id, entry) in taken {
            let mut record = entry.record().cloned();
            if let Some(r) = record.as_mut().filter(|r| !r.deleting) {
                r.deleting = true;
                if let Err(e) = self.state.save(r) {
                    // Nothing was touched yet: the device stays as it was.
                    self.devices().insert(id, entry);
                    failures.push(format!("device {id}: {e:#}"));
                    continue;
                }
            }
            fault::crash_point("del-marked");
            let device = match entry {
                Entry::Live(dev) => Some(*dev),
                _ => None,
            };
            match self.delete_recorded(id, device, force) {
                Ok(None) => {
                    self.devices().remove(&id);
                    deleted.push(id);
                }
                Ok(Some(dev)) => {
                    // Opened since the look for holders: it still serves, as it was.
                    if let Some(r) = record.as_mut() {
                        r.deleting = false;
                        if let Err(e) = self.state.save(r) {
                            log::error!("dev {id}: cannot unmark its record: {e:#}");
                        }
                    }
                    let who = dev.holder_text();
                    self.devices().insert(id, Entry::Live(dev));
                    failures.push(format!(
                        "device {id} is open ({who}): unmount or close it first, or use \
                         'ublkctl del --force'"
                    ));
                }
                Err(e) => {
                    let error = format!("delete failed: {e:#}; 'ublkctl del {id}' tries again");
                    log::error!("dev {id}: {error}");
                    self.fail(id, record, error);
                    failures.push(format!("device {id}: {e:#}"));
                }
            }
        }
        if !deleted.is_empty() {
            release_freed_memory();
        }
        if failures.is_empty() {
            Ok(deleted)
        } else {
            bail!("{}", failures.join("; "))
        }
    }

    /// Removes a device from the kernel (through its queues when it is served, which
    /// drains its IO first), then its record. Without `force`, a served device that the
    /// kernel finds open is handed back, untouched.
    pub(super) fn delete_recorded(
        &self,
        id: u32,
        device: Option<Device>,
        force: bool,
    ) -> Result<Option<Box<Device>>> {
        match device {
            Some(dev) if force => dev.shutdown()?,
            Some(dev) => match dev.delete_unless_open() {
                device::Deletion::Done(result) => result?,
                device::Deletion::Open(dev) => return Ok(Some(dev)),
            },
            // Not served, but the kernel may still hold it (a crash, a failed recovery).
            None => device::delete_from_kernel(id)?,
        }
        self.state.remove(id)?;
        Ok(None)
    }
}

/// Gives the heap memory that the deleted devices freed back to the system. glibc keeps
/// freed memory in its arenas for reuse (one per thread that allocates, up to eight per
/// CPU); a device's threads (its queues, and librados's for an rbd device) leave theirs
/// behind. `malloc_trim(0)` returns the free pages inside every arena and the top of
/// the main heap (madvise DONTNEED, 0.1-2 ms in the VM). It cannot return the free space
/// at the top of another arena, which glibc keeps up to its dynamic trim threshold
/// (README, rbd, "Memory"). Other C libraries have no such call and keep their own
/// policy.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    {
        let start = std::time::Instant::now();
        // SAFETY: malloc_trim takes no pointers and is thread safe; it only walks the
        // allocator's free lists under the arenas' own locks.
        let released = unsafe { libc::malloc_trim(0) } != 0;
        log::debug!(
            "heap trimmed in {:?} (pages released: {released})",
            start.elapsed()
        );
    }
}
