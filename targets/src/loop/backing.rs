//! Opening and probing the backing file or block device of the loop target.

use super::LoopError;
use crate::BackingId;
use nix::fcntl::{fallocate, fcntl, FallocateFlags, FcntlArg, OFlag};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Opens the backing store so that what is checked is what is served.
///
/// `path` is first opened with O_PATH: that never blocks (a FIFO with no writer would
/// hang a plain open) and never runs a driver's open (a terminal, a rewinding tape), and
/// `fstat` on that descriptor says what the path named at that moment. Only a regular
/// file or a block device is then opened for IO, through `/proc/self/fd/N`, which
/// reaches the inode the O_PATH descriptor holds, whatever has been renamed over `path`
/// in between: no check-then-open race. A block device is opened with O_EXCL, which the
/// kernel refuses (EBUSY) while it is mounted or held by md, LVM, another loop or ublk
/// device, and which keeps them away while ublkd serves it.
pub(super) fn open_backing(path: &Path, write: bool) -> Result<(File, bool), LoopError> {
    let located = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => LoopError::Missing(path.into()),
            _ => LoopError::Open {
                path: path.into(),
                source: e,
            },
        })?;
    let ft = located
        .metadata()
        .map_err(|source| LoopError::Open {
            path: path.into(),
            source,
        })?
        .file_type();
    let block_device = ft.is_block_device();
    let kind = if ft.is_dir() {
        return Err(LoopError::Directory(path.into()));
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_file() || block_device {
        ""
    } else {
        "special file"
    };
    if !kind.is_empty() {
        return Err(LoopError::NotFileOrBlock {
            path: path.into(),
            kind,
        });
    }
    let mut flags = libc::O_CLOEXEC;
    if block_device {
        flags |= libc::O_EXCL;
    }
    let reopen = PathBuf::from(format!("/proc/self/fd/{}", located.as_raw_fd()));
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(flags)
            .open(&reopen)
    };
    let mut result = open();
    // A device the previous ublkd served is released when that process's files are
    // closed, which can come just after the kernel reports the ublk device free.
    for _ in 0..10 {
        match &result {
            Err(e) if block_device && e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(100));
                result = open();
            }
            _ => break,
        }
    }
    let file = result.map_err(|source| {
        if block_device && source.raw_os_error() == Some(libc::EBUSY) {
            LoopError::InUse(path.into())
        } else if source.kind() == io::ErrorKind::NotFound {
            LoopError::NoProc {
                path: path.into(),
                source,
            }
        } else if write {
            LoopError::OpenForWrite {
                path: path.into(),
                source,
            }
        } else {
            LoopError::Open {
                path: path.into(),
                source,
            }
        }
    })?;
    Ok((file, block_device))
}

/// Turns O_DIRECT on or off on an open file (F_SETFL checks, as open does, that the
/// file system can do direct IO): one descriptor, so a block device's O_EXCL open is
/// never needed twice.
pub(super) fn set_direct(file: &File, on: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    let flags = if on {
        flags | OFlag::O_DIRECT
    } else {
        flags & !OFlag::O_DIRECT
    };
    fcntl(fd, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// The identity of what `file` is: see [`BackingId`].
pub(super) fn backing_id(file: &File, block_device: bool) -> io::Result<BackingId> {
    let meta = file.metadata()?;
    if block_device {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        return Ok(BackingId::BlockDevice {
            rdev: meta.rdev(),
            boot: boot.trim().to_string(),
        });
    }
    let mut generation: libc::c_long = 0;
    // SAFETY: FS_IOC_GETVERSION writes one long to the pointer, which points at
    // `generation` for the duration of the call; the fd is open.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_GETVERSION, &mut generation) };
    if r < 0 {
        // The file system keeps no generations (tmpfs): the device number stands in.
        generation = 0;
    }
    Ok(BackingId::File {
        dev: meta.dev(),
        ino: meta.ino(),
        generation: generation as u32 as u64,
    })
}

/// Reads one block with O_DIRECT into an aligned buffer: fails with EINVAL when the
/// block size is below what the backing store accepts for direct IO.
pub(super) fn probe_direct_read(file: &File, block_size: u32) -> io::Result<()> {
    let bs = block_size as usize;
    let mut raw = vec![0u8; bs + 4096];
    let start = raw.as_ptr().align_offset(4096);
    file.read_at(&mut raw[start..start + bs], 0).map(|_| ())
}

/// Whether fallocate `mode` works on `file`, tried on one block past its end so no data
/// is touched (anything allocated there by ZERO_RANGE is punched out again).
pub(super) fn probe_fallocate(
    file: &File,
    mode: FallocateFlags,
    size: u64,
    block_size: u32,
) -> bool {
    let off = size as libc::off_t;
    let len = libc::off_t::from(block_size);
    let ok = fallocate(
        file.as_raw_fd(),
        mode | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    )
    .is_ok();
    if ok && mode.contains(FallocateFlags::FALLOC_FL_ZERO_RANGE) {
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let _ = fallocate(file.as_raw_fd(), punch, off, len);
    }
    ok
}
