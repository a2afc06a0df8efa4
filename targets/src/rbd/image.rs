//! An open rbd image over librbd (`sys.rs`): its size, its exclusive lock and LUKS
//! encryption, and asynchronous IO whose completions are reported to a [`Completions`]
//! list and signalled on its eventfd.

use super::rados::{cstring, errno, IoCtx};
use super::sys;
use super::{ImageSpec, RbdError};
use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use ublkd_proto::EncryptionFormat;

/// An open image (`rbd_image_t`). librbd's image handle is thread safe.
pub struct Image {
    raw: sys::rbd_image_t,
    spec: String,
    _io: Arc<IoCtx>,
}

// SAFETY: librbd serializes access to an image handle internally.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Image {
    /// Opens `spec`'s image (at its snapshot, if it names one) in `io`, which must be
    /// the context of its pool and namespace.
    pub fn open(io: &Arc<IoCtx>, spec: &ImageSpec, read_only: bool) -> Result<Image, RbdError> {
        let n = cstring("image", &spec.image)?;
        let s = spec
            .snap
            .as_deref()
            .map(|s| cstring("snapshot", s))
            .transpose()?;
        let sp = s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let mut raw: sys::rbd_image_t = std::ptr::null_mut();
        // SAFETY: a live IO context, NUL-terminated strings (or NULL for no snapshot)
        // and a valid out pointer.
        let r = unsafe {
            if read_only {
                sys::rbd_open_read_only(io.raw, n.as_ptr(), &mut raw, sp)
            } else {
                sys::rbd_open(io.raw, n.as_ptr(), &mut raw, sp)
            }
        };
        if r < 0 {
            return Err(RbdError::Open {
                spec: spec.to_string(),
                source: errno(r.into()),
            });
        }
        Ok(Image {
            raw,
            spec: spec.to_string(),
            _io: io.clone(),
        })
    }

    /// Reads the image at its snapshot of id `id` (`--snap-id`, as rbd-nbd's: also the
    /// snapshots that have no name a user can give, such as mirroring's and group
    /// snapshots' ones, which `rbd snap ls --all` lists with their ids).
    pub fn set_snap_by_id(&mut self, id: u64) -> Result<(), RbdError> {
        // SAFETY: an open image not yet shared with any other thread.
        let r = unsafe { sys::rbd_snap_set_by_id(self.raw, id) };
        if r < 0 {
            return Err(RbdError::SnapId {
                spec: self.spec.clone(),
                id,
                source: errno(r.into()),
            });
        }
        self.spec = format!("{} (snapshot id {id})", self.spec);
        Ok(())
    }

    /// Takes the image's exclusive lock and keeps it until the image is closed: librbd
    /// then refuses the lock to other clients (their writes fail with EROFS) instead of
    /// handing it over when they ask, as it does by default.
    pub fn lock_exclusive(&self) -> Result<(), RbdError> {
        // SAFETY: an open image.
        let r = unsafe { sys::rbd_lock_acquire(self.raw, sys::RBD_LOCK_MODE_EXCLUSIVE) };
        if r < 0 {
            let hint = match -r {
                libc::EINVAL | libc::EOPNOTSUPP => {
                    "the image lacks the exclusive-lock feature: 'rbd feature enable IMAGE exclusive-lock', or map without --exclusive"
                }
                _ => {
                    "another client keeps it ('rbd status IMAGE' lists the watchers); the lock of a client that died is broken once its watch times out (osd_client_watch_timeout)"
                }
            };
            return Err(RbdError::Lock {
                spec: self.spec.clone(),
                hint,
                source: errno(r.into()),
            });
        }
        Ok(())
    }

    /// Unlocks the image's LUKS encryption with the passphrase in `path`. From then on
    /// librbd encrypts and decrypts every request, and the image's size is that of its
    /// data. The passphrase is the file's content without its final newline, as Ceph
    /// 16's `rbd encryption format` reads it, or with it, as later versions read it:
    /// a file that ends with a newline is tried both ways. The buffer is wiped after.
    pub fn load_encryption(&self, format: EncryptionFormat, path: &str) -> Result<(), RbdError> {
        let mut content = std::fs::read(path).map_err(|source| RbdError::PassphraseFile {
            path: path.into(),
            source,
        })?;
        let mut tries = vec![&content[..]];
        if let Some(stripped) = content.strip_suffix(b"\n") {
            tries.insert(0, stripped);
        }
        let mut r = 0;
        for passphrase in tries {
            r = self.encryption_load(format, passphrase);
            if r != -libc::EPERM {
                break;
            }
        }
        content.fill(0);
        std::hint::black_box(&content);
        if r < 0 {
            let hint = match -r {
                libc::EPERM => "the passphrase does not open it: check the file",
                _ => "check that the image was formatted ('rbd encryption format') and with this format",
            };
            return Err(RbdError::Unlock {
                spec: self.spec.clone(),
                format: format.name(),
                path: path.into(),
                hint,
                source: errno(r.into()),
            });
        }
        Ok(())
    }

    /// One `rbd_encryption_load`; its result (negative errno on failure).
    fn encryption_load(&self, format: EncryptionFormat, passphrase: &[u8]) -> i32 {
        let mut opts = sys::rbd_encryption_luks_format_options_t {
            alg: sys::RBD_ENCRYPTION_ALGORITHM_AES256,
            passphrase: passphrase.as_ptr().cast(),
            passphrase_size: passphrase.len(),
        };
        let raw_format = match format {
            EncryptionFormat::Luks1 => sys::RBD_ENCRYPTION_FORMAT_LUKS1,
            EncryptionFormat::Luks2 => sys::RBD_ENCRYPTION_FORMAT_LUKS2,
        };
        // SAFETY: an open image and options of the size passed, whose passphrase
        // pointer is valid for the call (librbd copies it).
        unsafe {
            sys::rbd_encryption_load(
                self.raw,
                raw_format,
                (&mut opts as *mut sys::rbd_encryption_luks_format_options_t).cast(),
                std::mem::size_of_val(&opts),
            )
        }
    }

    /// Writes what librbd's cache holds to the OSDs (`rbd_flush`), before a snapshot
    /// (`quiesce.rs`). Skipped, as rbd-nbd does, on an image with the exclusive-lock
    /// feature whose lock another client owns: a flush there would ask that owner for
    /// the lock while it waits for this client to quiesce, and this client has no
    /// writes in flight without the lock anyway.
    pub fn flush_for_snapshot(&self) -> io::Result<()> {
        if self.features()? & sys::RBD_FEATURE_EXCLUSIVE_LOCK != 0 {
            let mut owner: libc::c_int = 0;
            // SAFETY: as above.
            let r = unsafe { sys::rbd_is_exclusive_lock_owner(self.raw, &mut owner) };
            if r < 0 {
                return Err(errno(r.into()));
            }
            if owner == 0 {
                return Ok(());
            }
        }
        // SAFETY: an open image; rbd_flush waits for the flush on the calling thread,
        // which is none of librbd's.
        let r = unsafe { sys::rbd_flush(self.raw) };
        if r < 0 {
            return Err(errno(r.into()));
        }
        Ok(())
    }

    /// The image's features (`RBD_FEATURE_*`).
    pub fn features(&self) -> io::Result<u64> {
        let mut features = 0u64;
        // SAFETY: an open image and a valid out pointer.
        let r = unsafe { sys::rbd_get_features(self.raw, &mut features) };
        if r < 0 {
            return Err(errno(r.into()));
        }
        Ok(features)
    }

    /// The image's configuration as librbd applies it to this handle: every rbd option
    /// with its value from the client's settings, overridden by the pool's and then the
    /// image's (`rbd config pool|image set`).
    pub fn config(&self) -> io::Result<Vec<(String, String)>> {
        let mut room: libc::c_int = 256;
        loop {
            let mut options = Vec::<sys::rbd_config_option_t>::with_capacity(room as usize);
            let mut count = room;
            // SAFETY: an open image, room for `count` options, and a valid out pointer.
            let r =
                unsafe { sys::rbd_config_image_list(self.raw, options.as_mut_ptr(), &mut count) };
            if r == -libc::ERANGE && count > room {
                room = count;
                continue;
            }
            if r < 0 {
                return Err(errno(r.into()));
            }
            let filled = count.clamp(0, room);
            // SAFETY: librbd filled `filled` options (no more than the room given).
            unsafe { options.set_len(filled as usize) };
            let text = |p: *mut libc::c_char| {
                if p.is_null() {
                    String::new()
                } else {
                    // SAFETY: librbd's NUL-terminated strings, alive until the cleanup.
                    unsafe { std::ffi::CStr::from_ptr(p) }
                        .to_string_lossy()
                        .into_owned()
                }
            };
            let list = options
                .iter()
                .map(|o| (text(o.name), text(o.value)))
                .collect();
            // SAFETY: the options librbd filled, freed once.
            unsafe { sys::rbd_config_image_list_cleanup(options.as_mut_ptr(), filled) };
            return Ok(list);
        }
    }

    /// The librbd handle, for `watch.rs` and `quiesce.rs`; valid as long as `self` is.
    pub(super) fn raw(&self) -> sys::rbd_image_t {
        self.raw
    }

    /// The image's spec (`pool/image`), for messages.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    pub fn size(&self) -> Result<u64, RbdError> {
        let mut size = 0u64;
        // SAFETY: an open image and a valid out pointer.
        let r = unsafe { sys::rbd_get_size(self.raw, &mut size) };
        if r < 0 {
            return Err(RbdError::Size {
                spec: self.spec.clone(),
                source: errno(r.into()),
            });
        }
        Ok(size)
    }

    /// Starts `op`; its result is reported to `sink` as request `id`. An error here
    /// means the request was not started (nothing will be reported).
    ///
    /// # Safety
    /// For `Read` and `Write`, the `len` bytes at `buf` must stay valid (and, for a
    /// read, not be touched by anyone else) until the result has been reported.
    pub unsafe fn aio(&self, op: AioOp, sink: &Arc<Completions>, id: u64) -> Result<(), i32> {
        let arg = Box::into_raw(Box::new(Pending {
            sink: sink.clone(),
            id,
        }));
        let mut c: sys::rbd_completion_t = std::ptr::null_mut();
        // SAFETY: `arg` is a leaked box that `completed` takes back exactly once.
        let r = unsafe { sys::rbd_aio_create_completion(arg.cast(), completed, &mut c) };
        if r < 0 {
            // SAFETY: librbd did not take `arg`.
            drop(unsafe { Box::from_raw(arg) });
            return Err(r);
        }
        // SAFETY: an open image and a fresh completion; the buffers are the caller's
        // promise (above).
        let r = unsafe {
            match op {
                AioOp::Read { off, buf, len } => {
                    sys::rbd_aio_read(self.raw, off, len, buf.cast(), c)
                }
                AioOp::Write { off, buf, len } => {
                    sys::rbd_aio_write(self.raw, off, len, buf.cast(), c)
                }
                AioOp::Flush => sys::rbd_aio_flush(self.raw, c),
                AioOp::Discard { off, len } => sys::rbd_aio_discard(self.raw, off, len, c),
                AioOp::WriteZeroes { off, len } => {
                    sys::rbd_aio_write_zeroes(self.raw, off, len as usize, c, 0, 0)
                }
            }
        };
        if r < 0 {
            // librbd refused the request before taking it: the callback never runs.
            // SAFETY: the completion and `arg` are ours alone again.
            unsafe {
                sys::rbd_aio_release(c);
                drop(Box::from_raw(arg));
            }
            return Err(r);
        }
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: the last reference; rbd_close waits for the image's in-flight IO.
        unsafe { sys::rbd_close(self.raw) };
    }
}

/// One asynchronous image operation.
#[derive(Debug, Clone, Copy)]
pub enum AioOp {
    Read {
        off: u64,
        buf: *mut u8,
        len: usize,
    },
    Write {
        off: u64,
        buf: *const u8,
        len: usize,
    },
    Flush,
    Discard {
        off: u64,
        len: u64,
    },
    WriteZeroes {
        off: u64,
        len: u64,
    },
}

/// What a started request carries to its callback.
struct Pending {
    sink: Arc<Completions>,
    id: u64,
}

/// librbd's completion callback (on one of librbd's threads): reports the result.
extern "C" fn completed(c: sys::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the box `Image::aio` leaked for this completion, taken once.
    let pending = unsafe { Box::from_raw(arg.cast::<Pending>()) };
    // SAFETY: `c` is the completion this callback belongs to, released once here.
    let res = unsafe {
        let res = sys::rbd_aio_get_return_value(c);
        sys::rbd_aio_release(c);
        res
    };
    pending.sink.push(pending.id, res as i64);
}

/// Finished requests of one consumer (a queue): `(id, result)` pairs, with an eventfd
/// that becomes readable when there are some. librbd's threads add to it; the consumer
/// takes them when the eventfd says so, and so never waits inside librbd.
pub struct Completions {
    done: Mutex<Vec<(u64, i64)>>,
    efd: OwnedFd,
}

impl Completions {
    pub fn new() -> io::Result<Arc<Completions>> {
        // SAFETY: eventfd has no memory preconditions; a non-negative result is a new fd.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(Completions {
            done: Mutex::new(Vec::new()),
            // SAFETY: `fd` is fresh and owned by nothing else.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
        }))
    }

    /// The eventfd: readable while results wait to be taken.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.efd.as_raw_fd()
    }

    /// Adds a result; signals the eventfd only when the list was empty, since a
    /// signal for the earlier results is still pending: the consumer takes the whole
    /// list after the eventfd read it started before, and any result pushed after it
    /// took the list finds the list empty and signals again.
    fn push(&self, id: u64, res: i64) {
        let first = {
            let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
            done.push((id, res));
            done.len() == 1
        };
        if !first {
            return;
        }
        let one = 1u64.to_ne_bytes();
        // SAFETY: 8 bytes from a live buffer to an eventfd this struct owns.
        unsafe { libc::write(self.efd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Moves every waiting result into `into` (the eventfd's count is the reader's).
    pub fn take(&self, into: &mut Vec<(u64, i64)>) {
        into.append(&mut self.done.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Blocks until at least one result waits (or `within` passes), then takes them:
    /// for callers without a ring (tests, a queue draining at its end).
    pub fn wait(&self, within: Duration, into: &mut Vec<(u64, i64)>) {
        let mut pfd = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = within.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } > 0 {
            let mut n = [0u8; 8];
            // SAFETY: reading 8 bytes into a live buffer from our eventfd.
            unsafe { libc::read(self.fd(), n.as_mut_ptr().cast(), 8) };
        }
        self.take(into);
    }
}
