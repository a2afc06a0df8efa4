//! The `loop` target: a regular file or a block device exported as a ublk device.
//!
//! All IO goes through the queue's io_uring on the backing file, registered in the ring
//! (fixed file): READ/WRITE (copy mode) or READ_FIXED/WRITE_FIXED (registered buffers
//! and zero copy). FLUSH is fdatasync, FUA is RWF_DSYNC on the write, DISCARD punches a
//! hole, WRITE_ZEROES zeroes the range. Short transfers are continued and -EAGAIN is
//! retried; any other error completes the request with that errno.

use crate::{
    BackingId, DeviceShape, IoBuf, IoDesc, Outcome, QueueContext, QueueTarget, Ring, Target,
};
use io_uring::{opcode, squeue, types};
use nix::fcntl::{fallocate, fcntl, FallocateFlags, FcntlArg, OFlag};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
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
fn open_backing(path: &Path, write: bool) -> Result<(File, bool), LoopError> {
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
fn set_direct(file: &File, on: bool) -> io::Result<()> {
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
fn backing_id(file: &File, block_device: bool) -> io::Result<BackingId> {
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
fn probe_direct_read(file: &File, block_size: u32) -> io::Result<()> {
    let bs = block_size as usize;
    let mut raw = vec![0u8; bs + 4096];
    let start = raw.as_ptr().align_offset(4096);
    file.read_at(&mut raw[start..start + bs], 0).map(|_| ())
}

/// Whether fallocate `mode` works on `file`, tried on one block past its end so no data
/// is touched (anything allocated there by ZERO_RANGE is punched out again).
fn probe_fallocate(file: &File, mode: FallocateFlags, size: u64, block_size: u32) -> bool {
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

/// Labels of the SQEs this target pushes.
const STEP_RW: u16 = 1;
const STEP_FLUSH: u16 = 2;
const STEP_DISCARD: u16 = 3;
const STEP_WRITE_ZEROES: u16 = 4;

struct LoopQueue {
    file: types::Fixed,
    /// Bytes of each tag's read or write done so far.
    done: Vec<u32>,
    read_only: bool,
    punch_hole: bool,
    zero_range: bool,
}

/// Pushes `sqe` for `io`, or asks to be called again when the ring has room.
fn submit(ring: &mut dyn Ring, io: &IoDesc, step: u16, sqe: squeue::Entry) -> Outcome {
    // SAFETY: every SQE this target builds points only at the request's own buffer,
    // which stays valid until the request is committed; the queue commits only after
    // this SQE's completion has come back through `complete`.
    match unsafe { ring.push(io.tag, step, sqe) } {
        Ok(()) => Outcome::Queued,
        Err(_) => Outcome::Busy,
    }
}

impl LoopQueue {
    /// The READ/WRITE SQE for the part of `io` not done yet.
    fn rw_sqe(&self, io: &IoDesc, buf: IoBuf) -> Option<squeue::Entry> {
        let done = self.done[usize::from(io.tag)];
        let offset = io.offset + u64::from(done);
        let left = io.len - done;
        let write = matches!(io.op, crate::BlockOp::Write);
        let rw_flags = if write && io.flags.fua {
            libc::RWF_DSYNC
        } else {
            0
        };
        let sqe = match (write, buf) {
            (false, IoBuf::User { addr, .. }) => {
                opcode::Read::new(self.file, addr.wrapping_add(done as usize), left)
                    .offset(offset)
                    .build()
            }
            (true, IoBuf::User { addr, .. }) => {
                opcode::Write::new(self.file, addr.wrapping_add(done as usize), left)
                    .offset(offset)
                    .rw_flags(rw_flags)
                    .build()
            }
            (write, IoBuf::Fixed { .. } | IoBuf::Pages { .. }) => {
                let (index, addr) = buf.registered()?;
                let at = addr + u64::from(done);
                if write {
                    opcode::WriteFixed::new(self.file, at as *const u8, left, index)
                        .offset(offset)
                        .rw_flags(rw_flags)
                        .build()
                } else {
                    opcode::ReadFixed::new(self.file, at as *mut u8, left, index)
                        .offset(offset)
                        .build()
                }
            }
            (_, IoBuf::None) => return None,
        };
        Some(sqe)
    }

    fn start_rw(&mut self, io: &IoDesc, buf: IoBuf, ring: &mut dyn Ring) -> Outcome {
        if io.len == 0 {
            return Outcome::Done(0);
        }
        self.done[usize::from(io.tag)] = 0;
        self.continue_rw(io, buf, ring)
    }

    fn continue_rw(&mut self, io: &IoDesc, buf: IoBuf, ring: &mut dyn Ring) -> Outcome {
        match self.rw_sqe(io, buf) {
            Some(sqe) => submit(ring, io, STEP_RW, sqe),
            None => Outcome::Done(-libc::EINVAL),
        }
    }

    fn fallocate(&self, io: &IoDesc, step: u16, mode: i32, ring: &mut dyn Ring) -> Outcome {
        let sqe = opcode::Fallocate::new(self.file, u64::from(io.len))
            .offset(io.offset)
            .mode(mode | libc::FALLOC_FL_KEEP_SIZE)
            .build();
        submit(ring, io, step, sqe)
    }
}

impl QueueTarget for LoopQueue {
    fn read(&mut self, io: &IoDesc, buf: IoBuf, ring: &mut dyn Ring) -> Outcome {
        self.start_rw(io, buf, ring)
    }

    fn write(&mut self, io: &IoDesc, buf: IoBuf, ring: &mut dyn Ring) -> Outcome {
        if self.read_only {
            return Outcome::Done(-libc::EROFS);
        }
        self.start_rw(io, buf, ring)
    }

    fn flush(&mut self, io: &IoDesc, ring: &mut dyn Ring) -> Outcome {
        let sqe = opcode::Fsync::new(self.file)
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        submit(ring, io, STEP_FLUSH, sqe)
    }

    fn discard(&mut self, io: &IoDesc, ring: &mut dyn Ring) -> Outcome {
        if self.read_only || !self.punch_hole {
            return Outcome::Done(-libc::EOPNOTSUPP);
        }
        self.fallocate(io, STEP_DISCARD, libc::FALLOC_FL_PUNCH_HOLE, ring)
    }

    fn write_zeroes(&mut self, io: &IoDesc, ring: &mut dyn Ring) -> Outcome {
        if self.read_only {
            return Outcome::Done(-libc::EROFS);
        }
        // NOUNMAP asks to keep the range allocated: ZERO_RANGE. Otherwise a hole reads
        // back as zeroes and frees space.
        let mode = if self.zero_range && (io.flags.no_unmap || !self.punch_hole) {
            libc::FALLOC_FL_ZERO_RANGE
        } else if self.punch_hole {
            libc::FALLOC_FL_PUNCH_HOLE
        } else {
            return Outcome::Done(-libc::EOPNOTSUPP);
        };
        self.fallocate(io, STEP_WRITE_ZEROES, mode, ring)
    }

    fn complete(
        &mut self,
        io: &IoDesc,
        buf: IoBuf,
        step: u16,
        res: i32,
        ring: &mut dyn Ring,
    ) -> Outcome {
        if res == -libc::EAGAIN {
            // Try the same operation again.
            return match step {
                STEP_RW => self.continue_rw(io, buf, ring),
                STEP_FLUSH => self.flush(io, ring),
                STEP_DISCARD => self.discard(io, ring),
                _ => self.write_zeroes(io, ring),
            };
        }
        if res < 0 {
            log::debug!(
                "tag {}: {:?} at {} failed: {}",
                io.tag,
                io.op,
                io.offset,
                io::Error::from_raw_os_error(-res)
            );
            return Outcome::Done(res);
        }
        if step != STEP_RW {
            return Outcome::Done(0);
        }
        if res == 0 {
            // The backing file ended early (it shrank under us).
            log::warn!(
                "tag {}: {:?} at {}: unexpected end of the backing file",
                io.tag,
                io.op,
                io.offset
            );
            return Outcome::Done(-libc::EIO);
        }
        let done = &mut self.done[usize::from(io.tag)];
        *done += res as u32;
        if *done >= io.len {
            Outcome::Done(io.len as i32)
        } else {
            self.continue_rw(io, buf, ring)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_ring::{decode, TestRing};
    use crate::{dispatch, BlockOp, IoFlags};
    use std::io::Write;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ublkd-loop-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("backing")
    }

    fn opts(path: &Path) -> LoopOptions {
        LoopOptions {
            path: path.into(),
            direct_io: DirectIo::Auto,
            read_only: false,
            block_size: 512,
        }
    }

    #[test]
    fn bad_backing_files_are_refused_clearly() {
        let missing = tmp("missing").with_file_name("nope");
        let e = LoopTarget::open(&opts(&missing)).err().unwrap();
        assert!(e.to_string().contains("does not exist"), "{e}");

        let dir = tmp("dir");
        let e = LoopTarget::open(&opts(dir.parent().unwrap()))
            .err()
            .unwrap();
        assert!(e.to_string().contains("is a directory"), "{e}");

        let empty = tmp("empty");
        File::create(&empty).unwrap();
        let e = LoopTarget::open(&opts(&empty)).err().unwrap();
        assert!(e.to_string().contains("is empty"), "{e}");

        let odd = tmp("odd");
        File::create(&odd).unwrap().set_len(1000).unwrap();
        let e = LoopTarget::open(&opts(&odd)).err().unwrap();
        assert!(
            e.to_string()
                .contains("not a multiple of the block size 512"),
            "{e}"
        );
        let e = LoopTarget::open(&LoopOptions {
            block_size: 4096,
            ..opts(&odd)
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("block size 4096"), "{e}");

        let e = LoopTarget::open(&opts(Path::new("/dev/null")))
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "/dev/null is a character device, not a regular file or block device"
        );
    }

    #[test]
    fn fifos_and_sockets_are_refused_without_blocking() {
        let fifo = tmp("fifo");
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // A plain open of a FIFO with no writer would block here forever.
        let e = LoopTarget::open(&opts(&fifo)).err().unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "{} is a FIFO, not a regular file or block device",
                fifo.display()
            )
        );
        let e = LoopTarget::open(&LoopOptions {
            read_only: true,
            ..opts(&fifo)
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("is a FIFO"), "{e}");

        let sock = tmp("sock");
        let _ = std::fs::remove_file(&sock);
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let e = LoopTarget::open(&opts(&sock)).err().unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "{} is a socket, not a regular file or block device",
                sock.display()
            )
        );
    }

    #[test]
    fn a_loop_device_grows_with_its_file_and_never_shrinks() {
        let path = tmp("resize");
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let t = LoopTarget::open(&opts(&path)).unwrap();
        let mib = 1u64 << 20;
        // Nothing changed: the same size.
        assert_eq!(t.resize(mib, None, false), Ok(mib));
        // The file grew: the device follows it.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(2 * mib)
            .unwrap();
        assert_eq!(t.resize(mib, None, false), Ok(2 * mib));
        // Asked for more than the file has: only with --grow-file, which grows it.
        let err = t.resize(2 * mib, Some(4 * mib), false).unwrap_err();
        assert!(err.contains("--grow-file"), "{err}");
        assert_eq!(t.resize(2 * mib, Some(4 * mib), true), Ok(4 * mib));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 * mib);
        // Less than the device or the file: refused, and the file is left alone.
        let err = t.resize(4 * mib, Some(mib), true).unwrap_err();
        assert!(err.contains("does not shrink"), "{err}");
        let err = t.resize(2 * mib, Some(3 * mib), true).unwrap_err();
        assert!(err.contains("whole size"), "{err}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 * mib);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_regular_file_is_served_and_known_by_its_inode() {
        let path = tmp("identity");
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let t = LoopTarget::open(&opts(&path)).unwrap();
        assert_eq!(t.shape().size, 1 << 20);
        let id = t.backing_id().unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        match id {
            BackingId::File { dev, ino, .. } => {
                assert_eq!((dev, ino), (meta.dev(), meta.ino()));
            }
            other => panic!("a file has a file identity, got {other:?}"),
        }
        // Reopened: the same file.
        let again = LoopTarget::open(&opts(&path)).unwrap();
        assert!(id.same_as(&again.backing_id().unwrap()));
        // Replaced by another file at the same path: another identity, even where the
        // file system reuses the inode number (the generation differs then).
        drop((t, again));
        std::fs::remove_file(&path).unwrap();
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let other = LoopTarget::open(&opts(&path)).unwrap();
        assert!(!id.same_as(&other.backing_id().unwrap()), "{id:?}");
    }

    /// Runs one request through a real io_uring against a real file.
    fn run(q: &mut dyn QueueTarget, ring: &mut TestRing, io: &IoDesc, buf: IoBuf) -> i32 {
        let mut out = dispatch(q, io, buf, ring);
        loop {
            match out {
                Outcome::Done(r) => {
                    assert!(
                        ring.finished.is_empty(),
                        "the loop target finishes by Outcome"
                    );
                    return r;
                }
                Outcome::Busy => panic!("ring full in test"),
                Outcome::Queued => {
                    ring.ring.submit_and_wait(1).unwrap();
                    let cqe = ring.ring.completion().next().unwrap();
                    let (event, step, _) = decode(cqe.user_data());
                    assert!(!event, "the loop target has no target-wide SQEs");
                    out = q.complete(io, buf, step, cqe.result(), ring);
                }
            }
        }
    }

    #[test]
    fn reads_writes_flushes_and_punches_a_file() {
        let path = tmp("rw");
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![0xab; 1 << 20]).unwrap();
        drop(f);
        let t = LoopTarget::open(&LoopOptions {
            direct_io: DirectIo::Off,
            ..opts(&path)
        })
        .unwrap();
        assert_eq!(t.shape().size, 1 << 20);
        let mut ring = TestRing::new(8);
        ring.ring.submitter().register_files(&t.files()).unwrap();
        let mut q = t
            .queue(QueueContext {
                qid: 0,
                depth: 4,
                first_file: 0,
                user_copy_fd: None,
            })
            .unwrap();

        let mut data = vec![0x5au8; 8192];
        let buf = IoBuf::User {
            addr: data.as_mut_ptr(),
            len: 8192,
        };
        let wr = IoDesc {
            tag: 1,
            op: BlockOp::Write,
            flags: IoFlags {
                fua: true,
                no_unmap: false,
            },
            offset: 4096,
            len: 8192,
        };
        assert_eq!(run(q.as_mut(), &mut ring, &wr, buf), 8192);
        let flush = IoDesc {
            op: BlockOp::Flush,
            len: 0,
            offset: 0,
            ..wr
        };
        assert_eq!(run(q.as_mut(), &mut ring, &flush, IoBuf::None), 0);

        let mut back = vec![0u8; 16384];
        let rbuf = IoBuf::User {
            addr: back.as_mut_ptr(),
            len: 16384,
        };
        let rd = IoDesc {
            tag: 2,
            op: BlockOp::Read,
            flags: IoFlags::default(),
            offset: 0,
            len: 16384,
        };
        assert_eq!(run(q.as_mut(), &mut ring, &rd, rbuf), 16384);
        assert!(back[..4096].iter().all(|&b| b == 0xab));
        assert!(back[4096..12288].iter().all(|&b| b == 0x5a));
        assert!(back[12288..].iter().all(|&b| b == 0xab));

        if t.shape().discard {
            let d = IoDesc {
                tag: 3,
                op: BlockOp::Discard,
                flags: IoFlags::default(),
                offset: 0,
                len: 65536,
            };
            assert_eq!(run(q.as_mut(), &mut ring, &d, IoBuf::None), 0);
            assert_eq!(run(q.as_mut(), &mut ring, &rd, rbuf), 16384);
            assert!(
                back.iter().all(|&b| b == 0),
                "discarded range reads back as zeroes"
            );
        }
        if t.shape().write_zeroes {
            let z = IoDesc {
                tag: 3,
                op: BlockOp::WriteZeroes,
                flags: IoFlags::default(),
                offset: 65536,
                len: 4096,
            };
            assert_eq!(run(q.as_mut(), &mut ring, &z, IoBuf::None), 0);
            let r = IoDesc {
                offset: 65536,
                len: 4096,
                ..rd
            };
            assert_eq!(
                run(
                    q.as_mut(),
                    &mut ring,
                    &r,
                    IoBuf::User {
                        addr: back.as_mut_ptr(),
                        len: 4096
                    }
                ),
                4096
            );
            assert!(back[..4096].iter().all(|&b| b == 0));
        }
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn read_only_targets_refuse_writes() {
        let path = tmp("ro");
        File::create(&path).unwrap().set_len(1 << 16).unwrap();
        let t = LoopTarget::open(&LoopOptions {
            read_only: true,
            ..opts(&path)
        })
        .unwrap();
        assert!(t.shape().read_only && !t.shape().discard);
        let mut ring = TestRing::new(8);
        let mut q = t
            .queue(QueueContext {
                qid: 0,
                depth: 1,
                first_file: 0,
                user_copy_fd: None,
            })
            .unwrap();
        let wr = IoDesc {
            tag: 0,
            op: BlockOp::Write,
            flags: IoFlags::default(),
            offset: 0,
            len: 512,
        };
        let mut data = [0u8; 512];
        let buf = IoBuf::User {
            addr: data.as_mut_ptr(),
            len: 512,
        };
        assert_eq!(run(q.as_mut(), &mut ring, &wr, buf), -libc::EROFS);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
