//! The `loop` target: a regular file or a block device exported as a ublk device.
//!
//! All IO goes through the queue's io_uring on the backing file, registered in the ring
//! (fixed file): READ/WRITE (copy mode) or READ_FIXED/WRITE_FIXED (registered buffers
//! and zero copy). FLUSH is fdatasync, FUA is RWF_DSYNC on the write, DISCARD punches a
//! hole, WRITE_ZEROES zeroes the range. Short transfers are continued and -EAGAIN is
//! retried; any other error completes the request with that errno.

use crate::{BackingId, DeviceShape, QueueContext, QueueTarget, Target};
use io_uring::types;
use nix::fcntl::FallocateFlags;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use thiserror::Error;
use ublkd_proto::DirectIo;

#[derive(Debug, Error)]
pub enum LoopError {
    #[error("backing file {0} does not exist")]
    Missing(PathBuf),
    #[error("{0} is a directory, not a file or block device")]
    Directory(PathBuf),
    #[error("{path} is a {kind}, not a regular file or block device")]
    NotFileOrBlock { path: PathBuf, kind: &'static str },
    #[error("{0} is in use (mounted, or held by another user such as md, LVM or another ublk device); unmount or release it first")]
    InUse(PathBuf),
    #[error("cannot reopen {path} through /proc/self/fd: {source} (ublkd needs /proc mounted)")]
    NoProc { path: PathBuf, source: io::Error },
    #[error("cannot open {path} for writing: {source} (use --read-only to export it read-only)")]
    OpenForWrite { path: PathBuf, source: io::Error },
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot find the size of {path}: {source}")]
    Size { path: PathBuf, source: io::Error },
    #[error("{0} is empty")]
    Empty(PathBuf),
    #[error("the size of {path} ({size} bytes) is not a multiple of the block size {block_size}")]
    SizeNotAligned {
        path: PathBuf,
        size: u64,
        block_size: u32,
    },
    #[error("--direct-io on: {path} cannot be opened with O_DIRECT: {source} (use --direct-io auto or off)")]
    DirectUnsupported { path: PathBuf, source: io::Error },
    #[error("--direct-io on: block size {block_size} is below the direct-IO alignment of {path} (use --block-size 4096, or --direct-io auto or off)")]
    DirectAlignment { path: PathBuf, block_size: u32 },
}

/// What `add loop` asked for.
#[derive(Debug, Clone)]
pub struct LoopOptions {
    pub path: PathBuf,
    pub direct_io: DirectIo,
    pub read_only: bool,
    pub block_size: u32,
}

pub struct LoopTarget {
    file: File,
    path: PathBuf,
    /// What `file` is (see [`BackingId`]).
    id: BackingId,
    size: u64,
    direct: bool,
    read_only: bool,
    block_device: bool,
    punch_hole: bool,
    zero_range: bool,
}

mod backing;
mod queue;
#[cfg(test)]
mod tests;

use backing::{backing_id, open_backing, probe_direct_read, probe_fallocate, set_direct};
use queue::LoopQueue;

impl LoopTarget {
    /// Opens and checks the backing file.
    pub fn open(opts: &LoopOptions) -> Result<Self, LoopError> {
        let path = opts.path.clone();
        let write = !opts.read_only;
        let (file, block_device) = open_backing(&path, write)?;
        let size_error = |source| LoopError::Size {
            path: path.clone(),
            source,
        };
        let size = if block_device {
            (&file).seek(SeekFrom::End(0)).map_err(size_error)?
        } else {
            file.metadata().map_err(size_error)?.len()
        };
        if size == 0 {
            return Err(LoopError::Empty(path));
        }
        if size % u64::from(opts.block_size) != 0 {
            return Err(LoopError::SizeNotAligned {
                path,
                size,
                block_size: opts.block_size,
            });
        }
        let id = backing_id(&file, block_device).map_err(size_error)?;

        let direct = match opts.direct_io {
            DirectIo::Off => false,
            DirectIo::On => {
                set_direct(&file, true).map_err(|source| LoopError::DirectUnsupported {
                    path: path.clone(),
                    source,
                })?;
                match probe_direct_read(&file, opts.block_size) {
                    Ok(()) => true,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        return Err(LoopError::DirectAlignment {
                            path,
                            block_size: opts.block_size,
                        })
                    }
                    Err(source) => return Err(LoopError::DirectUnsupported { path, source }),
                }
            }
            DirectIo::Auto => {
                let ok = set_direct(&file, true).is_ok()
                    && probe_direct_read(&file, opts.block_size).is_ok();
                if !ok {
                    log::info!(
                        "{}: O_DIRECT not possible, using buffered IO",
                        path.display()
                    );
                    set_direct(&file, false).map_err(|source| LoopError::Open {
                        path: path.clone(),
                        source,
                    })?;
                }
                ok
            }
        };

        let (punch_hole, zero_range) = if block_device {
            // fallocate on a block device zeroes through the device (ZERO_RANGE always
            // works); PUNCH_HOLE needs a discard that guarantees zeroes, so no discard.
            (false, write)
        } else if write {
            (
                probe_fallocate(
                    &file,
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE,
                    size,
                    opts.block_size,
                ),
                probe_fallocate(
                    &file,
                    FallocateFlags::FALLOC_FL_ZERO_RANGE,
                    size,
                    opts.block_size,
                ),
            )
        } else {
            (false, false)
        };
        Ok(LoopTarget {
            file,
            path,
            id,
            size,
            direct,
            read_only: opts.read_only,
            block_device,
            punch_hole,
            zero_range,
        })
    }
}

impl Target for LoopTarget {
    fn name(&self) -> &'static str {
        "loop"
    }

    /// The device follows its backing file, which may only grow: to the file's size
    /// now, or (with `grow_backend`, a regular file) to the size asked for.
    fn resize(
        &self,
        current: u64,
        requested: Option<u64>,
        grow_backend: bool,
    ) -> Result<u64, String> {
        let path = self.path.display();
        let now = if self.block_device {
            (&self.file).seek(SeekFrom::End(0))
        } else {
            self.file.metadata().map(|m| m.len())
        }
        .map_err(|e| format!("cannot find the size of {path}: {e}"))?;
        let size = requested.unwrap_or(now);
        if size < current {
            return Err(format!(
                "a loop device does not shrink ({current} to {size} bytes): its data would be cut off"
            ));
        }
        if size > now {
            if !grow_backend || self.block_device || self.read_only {
                return Err(format!(
                    "{path} has {now} bytes, less than {size}: grow it first, or pass \
                     --grow-file (a writable regular file only)"
                ));
            }
            self.file
                .set_len(size)
                .map_err(|e| format!("cannot grow {path} to {size} bytes: {e}"))?;
        } else if size < now {
            return Err(format!(
                "{path} has {now} bytes: a loop device takes its file's whole size"
            ));
        }
        Ok(size)
    }

    fn shape(&self) -> DeviceShape {
        DeviceShape {
            size: self.size,
            read_only: self.read_only,
            volatile_cache: true,
            fua: true,
            rotational: false,
            discard: self.punch_hole,
            write_zeroes: self.punch_hole || self.zero_range,
        }
    }

    fn details(&self) -> Vec<(String, String)> {
        let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
        vec![
            ("backing file".into(), self.path.display().to_string()),
            (
                "backing type".into(),
                if self.block_device {
                    "block device"
                } else {
                    "file"
                }
                .into(),
            ),
            (
                "direct io".into(),
                if self.direct { "on" } else { "off" }.into(),
            ),
            ("read only".into(), yes(self.read_only)),
            ("discard".into(), yes(self.punch_hole)),
            (
                "write zeroes".into(),
                yes(self.punch_hole || self.zero_range),
            ),
        ]
    }

    fn files(&self) -> Vec<RawFd> {
        vec![self.file.as_raw_fd()]
    }

    fn backing_id(&self) -> Option<BackingId> {
        Some(self.id.clone())
    }

    fn queue(&self, ctx: QueueContext) -> io::Result<Box<dyn QueueTarget>> {
        Ok(Box::new(LoopQueue {
            file: types::Fixed(ctx.first_file),
            done: vec![0; usize::from(ctx.depth)],
            read_only: self.read_only,
            punch_hole: self.punch_hole,
            zero_range: self.zero_range,
        }))
    }
}
