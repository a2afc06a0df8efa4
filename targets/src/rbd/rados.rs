//! Safe handles over librados (`sys.rs`): a cluster connection and a pool's IO
//! context; the image and its IO are in `image.rs` (re-exported here). Each handle keeps
//! what it was made from alive (an image its IO context, an IO context its cluster), so
//! dropping them in any order is sound.

pub use super::image::{AioOp, Completions, Image};
use super::sys;
use super::RbdError;
use std::ffi::{c_char, CString};
use std::io;
use std::sync::Arc;
use std::time::Duration;

/// How to reach a cluster: what `ublkctl add rbd` passes with `--conf`, `--id` and
/// `--keyring` (`--mon-host` and `--keyfile` come as `options`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// The conf file; `None`: /etc/ceph/ceph.conf if there is one, as the Ceph tools
    /// read it (the monitors then come from `mon_host` among the options).
    pub conf: Option<String>,
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

impl ConnectOptions {
    /// The conf file to read, if any.
    pub fn conf_file(&self) -> Option<String> {
        match &self.conf {
            Some(c) => Some(c.clone()),
            None => std::path::Path::new(super::DEFAULT_CONF)
                .exists()
                .then(|| super::DEFAULT_CONF.to_string()),
        }
    }

    /// The cluster as messages name it: its conf file, or its monitors.
    pub fn cluster(&self) -> String {
        if let Some(c) = self.conf_file() {
            return c;
        }
        match self.options.iter().rev().find(|(k, _)| k == "mon_host") {
            Some((_, m)) => format!("mon_host {m}"),
            None => format!("{} (missing)", super::DEFAULT_CONF),
        }
    }
}

/// librbd settings ublkd makes for every image, over the conf's (measured in
/// docs/research/issue-15-rbd-speed.md; each took CPU per request in librbd):
///
/// - `rbd_cache=false`: no write-around cache. With it, once the kernel has sent a flush,
///   librbd completes writes before the OSD has them (up to 24 MiB), so a daemon that
///   dies (kill -9, then recovered) loses writes the kernel saw complete. Without it, a
///   write completes once the OSD has it, and the device is write-through (`cache.rs`,
///   which also finds a cache the pool's or the image's configuration turns on).
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

pub(super) fn cstring(what: &str, s: &str) -> Result<CString, RbdError> {
    CString::new(s).map_err(|_| RbdError::Nul(what.to_string()))
}

pub(super) fn errno(r: i64) -> io::Error {
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
        let conf_file = opts.conf_file();
        let conf_c = conf_file
            .as_deref()
            .map(|c| cstring("conf", c))
            .transpose()?;
        let cluster = opts.cluster();
        if conf_file.is_none() && !opts.options.iter().any(|(k, _)| k == "mon_host") {
            return Err(RbdError::Conf {
                conf: super::DEFAULT_CONF.into(),
                source: io::ErrorKind::NotFound.into(),
            });
        }
        let mut raw: sys::rados_t = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out pointer, `user` a NUL-terminated string.
        let r = unsafe { sys::rados_create(&mut raw, user.as_ptr()) };
        if r < 0 {
            return Err(RbdError::Create(errno(r.into())));
        }
        // From here on `rados` shuts the handle down on every error path.
        let rados = Rados {
            raw,
            conf: cluster.clone(),
        };
        if let Some(conf_c) = &conf_c {
            // SAFETY: a created, not yet connected handle and a NUL-terminated path.
            let r = unsafe { sys::rados_conf_read_file(rados.raw, conf_c.as_ptr()) };
            if r < 0 {
                return Err(RbdError::Conf {
                    conf: cluster,
                    source: errno(r.into()),
                });
            }
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
            return Err(rados.connect_error(opts, cluster, errno(r.into())));
        }
        Ok(Arc::new(rados))
    }

    /// Why `rados_connect` failed, from its errno and what librados was given. An
    /// authentication error (EACCES, EPERM, EOPNOTSUPP, ENOENT) with no key anywhere
    /// librados looks is a missing key: which of those errnos it gives then depends on
    /// the conf's auth settings and on timing (with no key librados offers only `none`,
    /// which a cephx monitor refuses as EOPNOTSUPP, or, seen under load, EACCES).
    /// Otherwise: the client may not use cephx (`auth_client_required`) or shares no
    /// other method with the cluster (EOPNOTSUPP), the monitors refused the key (EACCES,
    /// EPERM), the keyring holds no key for the user or the conf names no monitors
    /// (ENOENT), or no monitor answered in time.
    fn connect_error(&self, opts: &ConnectOptions, cluster: String, source: io::Error) -> RbdError {
        let setting = |name| self.conf_get(name).unwrap_or_default();
        let auth = [libc::EACCES, libc::EPERM, libc::EOPNOTSUPP, libc::ENOENT];
        let Some(errno) = source.raw_os_error().filter(|e| auth.contains(e)) else {
            return RbdError::Connect {
                conf: cluster,
                secs: opts.mon_timeout.as_secs(),
                source,
            };
        };
        if errno == libc::ENOENT && setting("mon_host").is_empty() {
            return RbdError::NoMonitors {
                conf: cluster,
                source,
            };
        }
        // A monitor that refuses the one messenger mode the client accepts answers as
        // it does a wrong key (EACCES): a second connection that accepts both modes
        // tells the two apart.
        let mon_modes = setting("ms_mon_client_mode");
        if let Some(mode) = ublkd_proto::ceph_option::single_mode(&mon_modes) {
            let mut both = opts.clone();
            both.options
                .push(("ms_mon_client_mode".into(), "secure crc".into()));
            if Rados::connect(&both).is_ok() {
                return RbdError::MonMode {
                    conf: cluster,
                    mode: mode.to_string(),
                    source,
                };
            }
        }
        let keyring = setting("keyring");
        let keyrings: Vec<&str> = ublkd_proto::ceph_option::list_items(&keyring).collect();
        let keyfile = setting("keyfile");
        let exists = |p: &str| std::path::Path::new(p).exists();
        let some_key = !setting("key").is_empty()
            || (!keyfile.is_empty() && exists(&keyfile))
            || keyrings.iter().any(|k| exists(k));
        let user = opts.user.clone();
        let offers_cephx = setting("auth_client_required").contains("cephx");
        match errno {
            _ if some_key && !offers_cephx => RbdError::NoAuth {
                conf: cluster,
                user,
                source,
            },
            _ if !some_key || errno == libc::ENOENT => RbdError::NoKey {
                user,
                keyring: keyrings.join(", "),
                keyfile: match keyfile {
                    f if f.is_empty() => f,
                    f => format!(", nor in key file {f}"),
                },
                source,
            },
            libc::EOPNOTSUPP => RbdError::NoAuth {
                conf: cluster,
                user,
                source,
            },
            _ => RbdError::Auth {
                conf: cluster,
                user,
                source,
            },
        }
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
    pub(super) raw: sys::rados_ioctx_t,
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
