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

/// The byte retired memory is filled with under `--inject-fault poison-retired`.
const POISON: u8 = 0xA5;
/// How long released poisoned memory is still watched before it is freed.
const WATCH: Duration = Duration::from_secs(2);

impl Retired {
    /// Keeps an ended queue thread's memory. With `--inject-fault poison-retired` (the
    /// tests) it is filled with a pattern here, as the thread has just ended; see
    /// [`Retired::release`].
    pub(super) fn keep(&mut self, shared: KernelShared) {
        if shared.leak {
            std::mem::forget(shared);
            return;
        }
        if crate::fault::poison_retired() {
            for &(ptr, len) in &shared.regions() {
                // SAFETY: the region is memory `shared` owns, and nothing of this
                // process touches it any more.
                unsafe { std::ptr::write_bytes(ptr, POISON, len) };
            }
        }
        self.0.push(shared);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The kernel has released the device's char device: the memory can go. With
    /// `--inject-fault poison-retired`, it is freed only [`WATCH`] later, and a byte of
    /// the pattern changed by then, which only the kernel can have written after the
    /// queue thread ended (the driver should have nothing left to write into then:
    /// `Batch::withdraw_buffers`), is logged as an error.
    pub fn release(&mut self, dev: u32) {
        if !crate::fault::poison_retired() {
            self.0.clear();
            return;
        }
        for shared in self.0.drain(..) {
            std::thread::spawn(move || {
                std::thread::sleep(WATCH);
                let bytes: usize = shared.regions().iter().map(|r| r.1).sum();
                let changed: usize = shared
                    .regions()
                    .iter()
                    .map(|&(ptr, len)| {
                        // SAFETY: memory `shared` owns, which nothing of this process
                        // touches any more; read only.
                        let s = unsafe { std::slice::from_raw_parts(ptr, len) };
                        s.iter().filter(|&&b| b != POISON).count()
                    })
                    .sum();
                if changed > 0 {
                    log::error!(
                        "dev {dev}: {changed} bytes of a queue's memory were written after \
                         its thread ended"
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
