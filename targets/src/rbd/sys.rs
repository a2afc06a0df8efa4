//! The few librados and librbd functions the rbd target and the test cluster use,
//! declared by hand from Debian's `rados/librados.h` and `rbd/librbd.h` (Ceph 16). Only
//! `rados.rs`, `image.rs`, `watch.rs` and `quiesce.rs` call them; everything here is as unsafe as the C it names.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void};

pub type rados_t = *mut c_void;
pub type rados_ioctx_t = *mut c_void;
pub type rbd_image_t = *mut c_void;
pub type rbd_completion_t = *mut c_void;
pub type rbd_callback_t = extern "C" fn(c: rbd_completion_t, arg: *mut c_void);
pub type rbd_update_callback_t = extern "C" fn(arg: *mut c_void);

#[link(name = "rados")]
extern "C" {
    pub fn rados_create(cluster: *mut rados_t, id: *const c_char) -> c_int;
    pub fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_conf_get(
        cluster: rados_t,
        option: *const c_char,
        buf: *mut c_char,
        len: usize,
    ) -> c_int;
    pub fn rados_connect(cluster: rados_t) -> c_int;
    pub fn rados_shutdown(cluster: rados_t);
    pub fn rados_ioctx_create(
        cluster: rados_t,
        pool: *const c_char,
        ioctx: *mut rados_ioctx_t,
    ) -> c_int;
    pub fn rados_ioctx_destroy(ioctx: rados_ioctx_t);
    pub fn rados_ioctx_set_namespace(ioctx: rados_ioctx_t, nspace: *const c_char);
    pub fn rados_mon_command(
        cluster: rados_t,
        cmd: *mut *const c_char,
        cmdlen: usize,
        inbuf: *const c_char,
        inbuflen: usize,
        outbuf: *mut *mut c_char,
        outbuflen: *mut usize,
        outs: *mut *mut c_char,
        outslen: *mut usize,
    ) -> c_int;
    pub fn rados_buffer_free(buf: *mut c_char);
}

/// `rbd_lock_mode_t`'s exclusive mode (librbd.h).
pub const RBD_LOCK_MODE_EXCLUSIVE: c_int = 0;
/// `RBD_FEATURE_EXCLUSIVE_LOCK` (rbd/features.h).
pub const RBD_FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
/// `rbd_encryption_format_t` (librbd.h).
pub const RBD_ENCRYPTION_FORMAT_LUKS1: c_int = 0;
pub const RBD_ENCRYPTION_FORMAT_LUKS2: c_int = 1;
/// `rbd_encryption_algorithm_t`'s AES-256 (ignored when loading: the header says).
pub const RBD_ENCRYPTION_ALGORITHM_AES256: c_int = 1;

/// `rbd_encryption_luks1_format_options_t` and `rbd_encryption_luks2_format_options_t`,
/// which have the same layout.
#[repr(C)]
pub struct rbd_encryption_luks_format_options_t {
    pub alg: c_int,
    pub passphrase: *const c_char,
    pub passphrase_size: usize,
}

/// One option of an image's configuration (`rbd_config_image_list`): its effective
/// value and where it came from (`rbd_config_source_t`: the client, the pool or the
/// image).
#[repr(C)]
pub struct rbd_config_option_t {
    pub name: *mut c_char,
    pub value: *mut c_char,
    pub source: c_int,
}

#[link(name = "rbd")]
extern "C" {
    pub fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub fn rbd_close(image: rbd_image_t) -> c_int;
    /// `lock_mode`: [`RBD_LOCK_MODE_EXCLUSIVE`].
    pub fn rbd_lock_acquire(image: rbd_image_t, lock_mode: c_int) -> c_int;
    /// `opts`: a [`rbd_encryption_luks_format_options_t`] of `opts_size` bytes.
    pub fn rbd_encryption_load(
        image: rbd_image_t,
        format: c_int,
        opts: *mut c_void,
        opts_size: usize,
    ) -> c_int;
    pub fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    pub fn rbd_snap_set_by_id(image: rbd_image_t, snap_id: u64) -> c_int;
    pub fn rbd_update_watch(
        image: rbd_image_t,
        handle: *mut u64,
        watch_cb: rbd_update_callback_t,
        arg: *mut c_void,
    ) -> c_int;
    pub fn rbd_update_unwatch(image: rbd_image_t, handle: u64) -> c_int;
    pub fn rbd_quiesce_watch(
        image: rbd_image_t,
        quiesce_cb: rbd_update_callback_t,
        unquiesce_cb: rbd_update_callback_t,
        arg: *mut c_void,
        handle: *mut u64,
    ) -> c_int;
    pub fn rbd_quiesce_unwatch(image: rbd_image_t, handle: u64) -> c_int;
    /// `r`: 0, or a negative errno that fails the snapshot.
    pub fn rbd_quiesce_complete(image: rbd_image_t, handle: u64, r: c_int);
    pub fn rbd_get_features(image: rbd_image_t, features: *mut u64) -> c_int;
    /// Fills up to `*max_options` options and sets `*max_options` to their count;
    /// -ERANGE (with the count needed) when there is not room for all.
    pub fn rbd_config_image_list(
        image: rbd_image_t,
        options: *mut rbd_config_option_t,
        max_options: *mut c_int,
    ) -> c_int;
    pub fn rbd_config_image_list_cleanup(options: *mut rbd_config_option_t, max_options: c_int);
    pub fn rbd_is_exclusive_lock_owner(image: rbd_image_t, is_owner: *mut c_int) -> c_int;
    pub fn rbd_flush(image: rbd_image_t) -> c_int;
    pub fn rbd_aio_create_completion(
        cb_arg: *mut c_void,
        complete_cb: rbd_callback_t,
        c: *mut rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_get_return_value(c: rbd_completion_t) -> isize;
    pub fn rbd_aio_release(c: rbd_completion_t);
    pub fn rbd_aio_read(
        image: rbd_image_t,
        off: u64,
        len: usize,
        buf: *mut c_char,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_write(
        image: rbd_image_t,
        off: u64,
        len: usize,
        buf: *const c_char,
        c: rbd_completion_t,
    ) -> c_int;
    pub fn rbd_aio_flush(image: rbd_image_t, c: rbd_completion_t) -> c_int;
    pub fn rbd_aio_discard(image: rbd_image_t, off: u64, len: u64, c: rbd_completion_t) -> c_int;
    pub fn rbd_aio_write_zeroes(
        image: rbd_image_t,
        off: u64,
        len: usize,
        c: rbd_completion_t,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
}
