//! Safe handles over librados and librbd (`sys.rs`): a cluster connection, a pool's IO
//! context, an open image, and asynchronous image IO whose completions are reported to a
//! [`Completions`] list and signalled on its eventfd. Each handle keeps what it was made
//! from alive (an image its IO context, an IO context its cluster), so dropping them in
//! any order is sound.

use super::sys;
use super::{ImageSpec, RbdError};
use std::ffi::{c_char, c_void, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use ublkd_proto::EncryptionFormat;

/// How to reach a cluster: what `ublkctl add rbd` passes with `--conf`, `--id` and
/// `--keyring`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    pub conf: String,
    /// The client's name without `client.` (`admin`).
    pub user: String,
    pub keyring: Option<String>,
    /// Bound on reaching the monitors and on each monitor command.
    pub mon_timeout: Duration,
    /// Bound on each OSD operation; librbd then fails the request (EIO to the device).
    pub osd_timeout: Duration,
    /// `--ceph-option` pairs, set last (checked by [`ublkd_proto::ceph_option::check`]).
    pub options: Vec<(String, String)>,
}

/// librbd settings ublkd makes for every image, over the conf's (measured in
/// docs/research/issue-15-rbd-speed.md; each took CPU per request in librbd):
///
/// - `rbd_cache=false`: no write-around cache. With it, once the kernel has sent a flush,
///   librbd completes writes before the OSD has them (up to 24 MiB), so a daemon that
///   dies (kill -9, then recovered) loses writes the kernel saw complete. Without it, a
///   write completes once the OSD has it. The device still says it has a volatile cache
///   and flushes after FUA writes, which stays correct.
/// - `rbd_non_blocking_aio=false`: librbd starts each request in the queue thread that
///   calls it, instead of handing it to its own thread first (one thread hop less). The
///   call still only queues the request: librbd's image layers wait asynchronously, and
///   only librados' in-flight limits (`objecter_inflight_ops`, 1024 ops and 100 MiB by
///   default) can hold the queue thread, until earlier requests complete.
/// - `rbd_io_scheduler=none`: no object-level write scheduler (it merges small sequential
///   writes to one object; the block layer already merges them above the device).
pub const LIBRBD_SETTINGS: [(&str, &str); 3] = [
    ("rbd_cache", "false"),
    ("rbd_non_blocking_aio", "false"),
    ("rbd_io_scheduler", "none"),
];

fn cstring(what: &str, s: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Nul(what.to_string()))
}

fn errno(r: i64) -> io::Error {
    io::Error::from_raw_os_error((-r) as i32)
}

/// A connected cluster handle (`rados_t`). librados handles are thread safe.
pub struct Rados {
    raw: sys::rados_t,
    conf: String,
}

// SAFETY: librados documents its cluster handle as safe to use from many threads.
unsafe impl Send for Rados {}
// SAFETY: as above.
unsafe impl Sync for Rados {}

impl Rados {
    /// Reads `opts.conf`, sets the timeouts and connects: fails within about
    /// `opts.mon_timeout` when no monitor answers.
    pub fn connect(opts: &ConnectOptions) -> Result<Arc<Rados>, RbdError> {
        let user = cstring("user", &opts.user)?;
        let conf_c = cstring("conf", &opts.conf)?;
        let mut raw: sys::rados_t = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out pointer, `user` a NUL-terminated string.
        let r = unsafe { sys::rados_create(&mut raw, user.as_ptr()) };
        if r < 0 {
            return Err(RbdError::Create(errno(r.into())));
        }
        // From here on `rados` shuts the handle down on every error path.
        let rados = Rados {
            raw,
            conf: opts.conf.clone(),
        };
        // SAFETY: a created, not yet connected handle and a NUL-terminated path.
        let r = unsafe { sys::rados_conf_read_file(rados.raw, conf_c.as_ptr()) };
        if r < 0 {
            return Err(RbdError::Conf {
                conf: opts.conf.clone(),
                source: errno(r.into()),
            });
        }
        let mon = opts.mon_timeout.as_secs().max(1).to_string();
        let osd = opts.osd_timeout.as_secs().to_string();
        let mut settings = vec![
            ("client_mount_timeout", mon.as_str()),
            ("rados_mon_op_timeout", mon.as_str()),
            ("rados_osd_op_timeout", osd.as_str()),
            // librbd's own log would go to the conf's log file; ublkd logs its errors.
            ("log_to_stderr", "false"),
        ];
        settings.extend(LIBRBD_SETTINGS);
        if let Some(k) = &opts.keyring {
            settings.push(("keyring", k.as_str()));
        }
        for (name, value) in settings {
            rados.set(name, value)?;
        }
        ublkd_proto::ceph_option::check(&opts.options)?;
        for (name, value) in &opts.options {
            rados.set(name, value).map_err(|e| match e {
                RbdError::Option { source, .. } if source.raw_os_error() == Some(libc::ENOENT) => {
                    RbdError::UnknownOption { name: name.clone() }
                }
                RbdError::Option { source, .. } => RbdError::OptionValue {
                    name: name.clone(),
                    value: value.clone(),
                    source,
                },
                e => e,
            })?;
        }
        // SAFETY: a configured handle, connected once.
        let r = unsafe { sys::rados_connect(rados.raw) };
        if r < 0 {
            return Err(RbdError::Connect {
                conf: opts.conf.clone(),
                secs: opts.mon_timeout.as_secs(),
                source: errno(r.into()),
            });
        }
        Ok(Arc::new(rados))
    }

    fn set(&self, name: &str, value: &str) -> Result<(), RbdError> {
        let (n, v) = (cstring("option", name)?, cstring("option", value)?);
        // SAFETY: an unconnected handle and two NUL-terminated strings.
        let r = unsafe { sys::rados_conf_set(self.raw, n.as_ptr(), v.as_ptr()) };
        if r < 0 {
            return Err(RbdError::Option {
                name: name.to_string(),
                source: errno(r.into()),
            });
        }
        Ok(())
    }

    /// The value librados has for a configuration option (after the conf file, ublkd's
    /// settings and the device's `--ceph-option`s).
    pub fn conf_get(&self, name: &str) -> Result<String, RbdError> {
        let n = cstring("option", name)?;
        let mut buf = vec![0u8; 4096];
        // SAFETY: a NUL-terminated name and a writable buffer of the length passed;
        // librados writes a NUL-terminated value into it or fails.
        let r = unsafe {
            sys::rados_conf_get(self.raw, n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        };
        if r < 0 {
            return Err(RbdError::Option {
                name: name.to_string(),
                source: errno(r.into()),
            });
        }
        let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        buf.truncate(len);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Sends one monitor command (JSON, as the `ceph` tool does) and returns its output
    /// buffer; an error carries the monitor's status text.
    pub fn mon_command(&self, json: &str) -> Result<String, RbdError> {
        let cmd = cstring("command", json)?;
        let mut cmds = [cmd.as_ptr()];
        let (mut out, mut outlen) = (std::ptr::null_mut::<c_char>(), 0usize);
        let (mut st, mut stlen) = (std::ptr::null_mut::<c_char>(), 0usize);
        // SAFETY: one valid command string; the out pointers are valid and what librados
        // returns in them is freed below with rados_buffer_free.
        let r = unsafe {
            sys::rados_mon_command(
                self.raw,
                cmds.as_mut_ptr(),
                1,
                std::ptr::null(),
                0,
                &mut out,
                &mut outlen,
                &mut st,
                &mut stlen,
            )
        };
        let take = |p: *mut c_char, len: usize| {
            if p.is_null() {
                return String::new();
            }
            // SAFETY: librados returned `len` bytes at `p`; freed right after copying.
            let s = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) };
            let s = String::from_utf8_lossy(s).into_owned();
            // SAFETY: `p` came from rados_mon_command and is freed once.
            unsafe { sys::rados_buffer_free(p) };
            s
        };
        let (out, status) = (take(out, outlen), take(st, stlen));
        if r < 0 {
            return Err(RbdError::MonCommand {
                command: json.to_string(),
                status,
                source: errno(r.into()),
            });
        }
        Ok(out)
    }

    /// The IO context of `pool`, in `namespace` if one is given.
    pub fn ioctx(
        self: &Arc<Self>,
        pool: &str,
        namespace: Option<&str>,
    ) -> Result<Arc<IoCtx>, RbdError> {
        let p = cstring("pool", pool)?;
        let mut raw: sys::rados_ioctx_t = std::ptr::null_mut();
        // SAFETY: a connected handle, a NUL-terminated name and a valid out pointer.
        let r = unsafe { sys::rados_ioctx_create(self.raw, p.as_ptr(), &mut raw) };
        if r < 0 {
            return Err(RbdError::Pool {
                pool: pool.to_string(),
                conf: self.conf.clone(),
                source: errno(r.into()),
            });
        }
        let io = IoCtx {
            raw,
            _cluster: self.clone(),
        };
        if let Some(ns) = namespace {
            let ns = cstring("namespace", ns)?;
            // SAFETY: the context is new and not yet shared with any other thread.
            unsafe { sys::rados_ioctx_set_namespace(io.raw, ns.as_ptr()) };
        }
        Ok(Arc::new(io))
    }
}

impl Drop for Rados {
    fn drop(&mut self) {
        // SAFETY: the last reference: no IO context or image of this handle is left.
        unsafe { sys::rados_shutdown(self.raw) };
    }
}

/// A pool's IO context (`rados_ioctx_t`).
pub struct IoCtx {
    raw: sys::rados_ioctx_t,
    _cluster: Arc<Rados>,
}

// SAFETY: an IO context is thread safe once its settings (the namespace) are made,
// which happens before it is shared.
unsafe impl Send for IoCtx {}
// SAFETY: as above.
unsafe impl Sync for IoCtx {}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: the last reference: every image opened in it is closed.
        unsafe { sys::rados_ioctx_destroy(self.raw) };
    }
}

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

    /// The librbd handle, for `watch.rs`; valid as long as `self` is.
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
