//! Block requests as targets see them, decoded from the driver's `ublksrv_io_desc`.

/// Operation codes of `ublksrv_io_desc.op_flags` bits 0-7 (UAPI `UBLK_IO_OP_*`).
mod op {
    pub const READ: u8 = 0;
    pub const WRITE: u8 = 1;
    pub const FLUSH: u8 = 2;
    pub const DISCARD: u8 = 3;
    pub const WRITE_ZEROES: u8 = 5;
}

/// Request flags of `ublksrv_io_desc.op_flags` bits 8-31 (UAPI `UBLK_IO_F_*`).
mod flag {
    pub const FUA: u32 = 1 << 13;
    pub const NOUNMAP: u32 = 1 << 15;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOp {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    /// Anything else the driver may send (zoned ops, WRITE_SAME): not supported.
    Other(u8),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoFlags {
    /// Forced unit access: the write must be durable before it completes.
    pub fua: bool,
    /// For WRITE_ZEROES: keep the range allocated (do not punch a hole).
    pub no_unmap: bool,
}

/// One block request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoDesc {
    pub tag: u16,
    pub op: BlockOp,
    pub flags: IoFlags,
    /// Byte offset on the device.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

impl IoDesc {
    /// Decodes the fields of a `ublksrv_io_desc`.
    pub fn from_raw(tag: u16, op_flags: u32, nr_sectors: u32, start_sector: u64) -> Self {
        let op = match (op_flags & 0xff) as u8 {
            op::READ => BlockOp::Read,
            op::WRITE => BlockOp::Write,
            op::FLUSH => BlockOp::Flush,
            op::DISCARD => BlockOp::Discard,
            op::WRITE_ZEROES => BlockOp::WriteZeroes,
            other => BlockOp::Other(other),
        };
        let flags = IoFlags {
            fua: op_flags & flag::FUA != 0,
            no_unmap: op_flags & flag::NOUNMAP != 0,
        };
        IoDesc {
            tag,
            op,
            flags,
            offset: start_sector.saturating_mul(512),
            // A request is at most max_io_buf_bytes (< 4 GiB), so this cannot truncate.
            len: nr_sectors.saturating_mul(512),
        }
    }
}

/// Where a request's data is, for the duration of that request.
///
/// Request memory is shared with the kernel, so it is passed as a raw address, never as
/// a slice: a target hands it to io_uring, which reads or writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBuf {
    /// The request carries no data (flush, discard, write-zeroes).
    None,
    /// A daemon-owned buffer (`copy` mode): the driver copies write data into it before
    /// the request reaches the target, and copies read data out of it at commit. Use
    /// plain READ/WRITE on `addr`.
    User { addr: *mut u8, len: usize },
    /// A daemon buffer at `addr`, registered in the queue ring's buffer table at `index`
    /// (`fixed` mode). Use READ_FIXED/WRITE_FIXED (or a fixed-buffer SEND) with
    /// `buf_index = index` and addresses `addr + offset`, or plain memory access.
    Fixed { addr: u64, index: u16, len: usize },
    /// The request's own pages, registered in the queue ring's buffer table at `index`
    /// (`zc`/`auto-zc` modes): not mapped into the daemon. Use READ_FIXED/WRITE_FIXED
    /// (or a fixed-buffer SEND) with `buf_index = index` and addresses `0 + offset`.
    Pages { index: u16, len: usize },
}

impl IoBuf {
    /// The buffer's length in bytes (0 for `None`).
    pub fn len(&self) -> usize {
        match *self {
            IoBuf::None => 0,
            IoBuf::User { len, .. } | IoBuf::Fixed { len, .. } | IoBuf::Pages { len, .. } => len,
        }
    }

    /// For a registered buffer (`Fixed`, `Pages`): its index in the ring's buffer table
    /// and the address its first byte has for READ_FIXED/WRITE_FIXED.
    pub fn registered(&self) -> Option<(u16, u64)> {
        match *self {
            IoBuf::Fixed { addr, index, .. } => Some((index, addr)),
            IoBuf::Pages { index, .. } => Some((index, 0)),
            IoBuf::None | IoBuf::User { .. } => None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `len` bytes from `offset` lie inside the buffer (`InvalidInput` if not).
    pub fn check_range(&self, offset: usize, len: usize) -> std::io::Result<()> {
        let size = self.len();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{len} bytes at {offset} are beyond a {size}-byte request buffer"),
            )),
        }
    }

    /// The daemon memory of a `User` or `Fixed` buffer, checked to hold `len` bytes from
    /// `offset`. Errors: a request's own pages or no data (`Unsupported`), a range
    /// beyond the buffer (`InvalidInput`).
    fn daemon_range(&self, offset: usize, len: usize) -> std::io::Result<*mut u8> {
        let addr = match *self {
            IoBuf::User { addr, .. } => addr,
            IoBuf::Fixed { addr, .. } => addr as *mut u8,
            IoBuf::Pages { .. } | IoBuf::None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "the request's pages are not daemon memory",
                ))
            }
        };
        self.check_range(offset, len)?;
        Ok(addr)
    }

    /// Copies `data` into a daemon buffer (`User`, `Fixed`) at byte `offset`: what a
    /// queue's [`Ring::copy_to_request`](crate::Ring::copy_to_request) does for those
    /// modes.
    ///
    /// # Safety
    /// The buffer must be valid for its `len` bytes, and nothing else (no SQE in flight)
    /// may access the range while the copy runs: true for a request's buffer while the
    /// request is in its target and no SQE of its own reads or writes there.
    pub unsafe fn copy_in(&self, offset: usize, data: &[u8]) -> std::io::Result<()> {
        let addr = self.daemon_range(offset, data.len())?;
        // SAFETY: in bounds (checked above), valid and unaliased (the caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr.add(offset), data.len()) };
        Ok(())
    }

    /// Copies `into.len()` bytes of a daemon buffer (`User`, `Fixed`) from byte
    /// `offset` into `into`.
    ///
    /// # Safety
    /// As for [`IoBuf::copy_in`].
    pub unsafe fn copy_out(&self, offset: usize, into: &mut [u8]) -> std::io::Result<()> {
        let addr = self.daemon_range(offset, into.len())?;
        // SAFETY: as in `copy_in`.
        unsafe { std::ptr::copy_nonoverlapping(addr.add(offset), into.as_mut_ptr(), into.len()) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_ops_and_flags() {
        let d = IoDesc::from_raw(5, 1 | flag::FUA, 8, 16);
        assert_eq!(d.tag, 5);
        assert_eq!(d.op, BlockOp::Write);
        assert!(d.flags.fua);
        assert!(!d.flags.no_unmap);
        assert_eq!(d.offset, 8192);
        assert_eq!(d.len, 4096);

        assert_eq!(IoDesc::from_raw(0, 0, 1, 0).op, BlockOp::Read);
        assert_eq!(IoDesc::from_raw(0, 2, 0, 0).op, BlockOp::Flush);
        assert_eq!(IoDesc::from_raw(0, 3, 1, 0).op, BlockOp::Discard);
        let wz = IoDesc::from_raw(0, 5 | flag::NOUNMAP, 1, 0);
        assert_eq!(wz.op, BlockOp::WriteZeroes);
        assert!(wz.flags.no_unmap);
        assert_eq!(IoDesc::from_raw(0, 13, 1, 0).op, BlockOp::Other(13));
    }

    #[test]
    fn copies_stay_inside_daemon_buffers() {
        let mut mem = vec![0u8; 16];
        // SAFETY: every buffer below points into `mem`, which outlives the copies and
        // holds more than each buffer's 8 bytes; nothing else accesses it meanwhile.
        let put = |b: IoBuf, at: usize, data: &[u8]| unsafe { b.copy_in(at, data) };
        // SAFETY: as for `put`.
        let get = |b: IoBuf, at: usize, into: &mut [u8]| unsafe { b.copy_out(at, into) };
        let user = IoBuf::User {
            addr: mem.as_mut_ptr(),
            len: 8,
        };
        let fixed = IoBuf::Fixed {
            addr: mem.as_mut_ptr() as u64,
            index: 0,
            len: 8,
        };
        put(user, 2, b"abc").unwrap();
        let mut back = [0u8; 4];
        get(user, 1, &mut back).unwrap();
        assert_eq!(&back, b"\0abc");
        let beyond = put(user, 6, b"abc").unwrap_err();
        assert_eq!(beyond.kind(), std::io::ErrorKind::InvalidInput);
        put(fixed, 7, b"z").unwrap();
        let pages = IoBuf::Pages { index: 0, len: 8 };
        let e = put(pages, 0, b"a").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::Unsupported);
        let e = get(IoBuf::None, 0, &mut back).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::Unsupported);
        assert_eq!(&mem[..8], b"\0\0abc\0\0z");
        assert_eq!(mem[8..], [0u8; 8], "a copy past the buffer wrote");
    }
}
