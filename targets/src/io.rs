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
}
