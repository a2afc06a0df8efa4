//! The memory of ended queue threads that the kernel may still write into
//! ([`setup::KernelShared`]), kept until it has let go of it, and the test check that
//! it did.

use super::setup::KernelShared;
use std::time::Duration;

/// The memory that ended queue threads' commands pointed into, kept until the kernel
/// has ended every command of the device. A thread's exit does not end them: the
/// driver can still write a list of delivered tags into a batch fetch buffer after the
/// thread has exited and been joined (seen in the VM: 4 of 48 deletions under load,
/// and glibc aborting the daemon). The kernel releases the char device only once every
/// command on it has completed; whoever has seen that calls [`Retired::release`].
/// Dropped unreleased (a hand-over, whose process exits; a device whose release was
/// never seen), the memory is leaked on purpose, as is the memory of a queue whose
/// target may still use the request buffers (`QueueTarget::settle`).
#[derive(Default)]
pub struct Retired(Vec<KernelShared>);

/// The byte released memory is filled with under `--inject-fault poison-retired`.
const POISON: u8 = 0xA5;
/// How long poisoned memory is watched before it is freed.
const WATCH: Duration = Duration::from_secs(2);

impl Retired {
    pub(super) fn keep(&mut self, shared: KernelShared) {
        if shared.leak {
            std::mem::forget(shared);
        } else {
            self.0.push(shared);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The kernel has released the device's char device: the memory can go. With
    /// `--inject-fault poison-retired` (the tests), it is filled with a pattern first
    /// and freed only after [`WATCH`]; a byte changed by then, which only the kernel
    /// can have written, is logged as an error.
    pub fn release(&mut self, dev: u32) {
        if !crate::fault::poison_retired() {
            self.0.clear();
            return;
        }
        for shared in self.0.drain(..) {
            for &(ptr, len) in &shared.regions() {
                // SAFETY: the region is memory `shared` owns, and nothing of this
                // process touches it any more.
                unsafe { std::ptr::write_bytes(ptr, POISON, len) };
            }
            std::thread::spawn(move || {
                std::thread::sleep(WATCH);
                let bytes: usize = shared.regions().iter().map(|r| r.1).sum();
                let changed: usize = shared
                    .regions()
                    .iter()
                    .map(|&(ptr, len)| {
                        // SAFETY: as above; read only.
                        let s = unsafe { std::slice::from_raw_parts(ptr, len) };
                        s.iter().filter(|&&b| b != POISON).count()
                    })
                    .sum();
                if changed > 0 {
                    log::error!(
                        "dev {dev}: {changed} bytes of a queue's memory were written after \
                         it was released"
                    );
                } else {
                    log::info!(
                        "dev {dev}: a queue's released memory ({bytes} bytes) stayed untouched"
                    );
                }
            });
        }
    }
}

impl Drop for Retired {
    fn drop(&mut self) {
        for shared in self.0.drain(..) {
            std::mem::forget(shared);
        }
    }
}
