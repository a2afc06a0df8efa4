//! A watch on an image's header (`rbd_update_watch`): librbd calls back whenever the
//! image changes outside this handle (`rbd resize`, a snapshot taken), on a thread of
//! its own. The callback only runs the caller's `notice`, which must return at once
//! (the daemon's notice sends the device's id to a thread of ublkd's).
//!
//! The callback's argument is a box that the watch owns. Dropping the watch first
//! unregisters it (`rbd_update_unwatch` returns only once a callback under way has
//! returned, and none starts after), then frees the box; the watch holds its image, so
//! the image closes only after that.

use super::rados::Image;
use super::{sys, RbdError};
use std::ffi::c_void;
use std::io;
use std::sync::Arc;

/// What an image's watch calls on each change; any thread, must not block.
pub type Notice = Box<dyn Fn() + Send + Sync>;

pub struct UpdateWatch {
    image: Arc<Image>,
    handle: u64,
    /// The callback's argument, freed in `drop` after the unwatch.
    notice: *mut Notice,
}

// SAFETY: `notice` points to a `Notice`, which is Send + Sync; the watch only frees it
// (once, in drop), and librbd's handle is thread safe.
unsafe impl Send for UpdateWatch {}

impl UpdateWatch {
    /// Registers `notice` to be called on each change of `image`.
    pub fn new(image: &Arc<Image>, notice: Notice) -> Result<UpdateWatch, RbdError> {
        let arg = Box::into_raw(Box::new(notice));
        let mut handle = 0u64;
        // SAFETY: an open image, a valid out pointer, and an argument that stays valid
        // until after rbd_update_unwatch (`drop`), or is freed below if librbd refuses.
        let r = unsafe { sys::rbd_update_watch(image.raw(), &mut handle, updated, arg.cast()) };
        if r < 0 {
            // SAFETY: librbd did not take `arg`.
            drop(unsafe { Box::from_raw(arg) });
            return Err(RbdError::Watch {
                spec: image.spec().to_string(),
                source: io::Error::from_raw_os_error(-r),
            });
        }
        Ok(UpdateWatch {
            image: image.clone(),
            handle,
            notice: arg,
        })
    }
}

impl Drop for UpdateWatch {
    fn drop(&mut self) {
        // SAFETY: the image is open (held by `self.image`) and `handle` is this watch's.
        let r = unsafe { sys::rbd_update_unwatch(self.image.raw(), self.handle) };
        if r < 0 {
            // librbd no longer knows the handle, so it holds no pointer to the
            // argument either; freeing it is still sound, but say so.
            log::warn!(
                "rbd {}: unwatching the image failed: errno {}",
                self.image.spec(),
                -r
            );
        }
        // SAFETY: the unwatch has returned: no callback runs now or later with this
        // argument, which `new` leaked once and is freed here once.
        drop(unsafe { Box::from_raw(self.notice) });
    }
}

/// librbd's update callback, on one of librbd's threads.
extern "C" fn updated(arg: *mut c_void) {
    // SAFETY: `arg` is the `Notice` of a registered watch; it is freed only after the
    // unwatch, which waits for this call to return.
    let notice = unsafe { &*arg.cast::<Notice>() };
    notice();
}
