//! The write cache of a device found at recovery: the kernel keeps the one the device
//! was created with, which may no longer be what the target's backend has.

use libublk::sys;
use ublkd_targets::{DeviceShape, Target};

/// At recovery: the kernel's device keeps the write cache it was created with. If it has
/// none but the target's backend now completes writes before they are durable, the
/// kernel sends no FLUSH: the target must make every write durable itself
/// ([`Target::write_through`]), or the operator is told.
pub(super) fn check_write_cache(
    id: u32,
    kernel: &sys::ublk_params,
    shape: &DeviceShape,
    target: &dyn Target,
) {
    if !shape.volatile_cache || kernel.basic.attrs & sys::UBLK_ATTR_VOLATILE_CACHE != 0 {
        return;
    }
    let name = target.name();
    if target.write_through() {
        log::warn!(
            "dev {id}: its {name} backend now caches writes, but the device was created \
             without a write cache: every write is made durable before it completes; \
             delete and add the device again to give it the cache"
        );
    } else {
        log::warn!(
            "dev {id}: its {name} backend now caches writes, but the device was created \
             without a write cache, so the kernel sends it no flush: delete and add \
             the device again before relying on fsync"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target whose backend caches writes, counting `write_through` calls.
    struct Caching(std::sync::atomic::AtomicU32);

    impl Target for Caching {
        fn name(&self) -> &'static str {
            "caching"
        }
        fn shape(&self) -> DeviceShape {
            DeviceShape {
                size: 4096,
                read_only: false,
                volatile_cache: true,
                fua: true,
                rotational: false,
                discard: false,
                write_zeroes: false,
            }
        }
        fn details(&self) -> Vec<(String, String)> {
            Vec::new()
        }
        fn queue(
            &self,
            _: ublkd_targets::QueueContext,
        ) -> std::io::Result<Box<dyn ublkd_targets::QueueTarget>> {
            Err(std::io::Error::other("no queues"))
        }
        fn write_through(&self) -> bool {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            true
        }
    }

    #[test]
    fn a_write_through_device_over_a_caching_backend_asks_the_target_to_flush() {
        let t = Caching(Default::default());
        let mut kernel = sys::ublk_params::default();
        kernel.basic.attrs = sys::UBLK_ATTR_VOLATILE_CACHE;
        check_write_cache(1, &kernel, &t.shape(), &t);
        assert_eq!(t.0.load(std::sync::atomic::Ordering::Relaxed), 0);
        kernel.basic.attrs = 0;
        check_write_cache(1, &kernel, &t.shape(), &t);
        assert_eq!(t.0.load(std::sync::atomic::Ordering::Relaxed), 1);
        let mut uncached = t.shape();
        uncached.volatile_cache = false;
        check_write_cache(1, &kernel, &uncached, &t);
        assert_eq!(t.0.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
