//! The ublk UAPI pieces a queue touches: the per-tag IO command SQE, the shared
//! descriptor table the driver fills, and the daemon-owned request buffers.
//! All of the queue's `unsafe` about kernel-shared memory lives here.

use io_uring::{opcode, squeue, types};
use libublk::sys;
use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use ublkd_targets::IoDesc;

/// Index of the ublk char device in the queue ring's registered file table.
pub const CDEV_FIXED_FD: types::Fixed = types::Fixed(0);

/// The command opcodes (ioctl-encoded, `UBLK_U_IO_*`).
pub const FETCH_REQ: u32 = sys::UBLK_U_IO_FETCH_REQ;
pub const COMMIT_AND_FETCH_REQ: u32 = sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ;
/// Batch mode (UBLK_F_BATCH_IO): register tags, commit results, fetch requests.
pub const PREP_IO_CMDS: u32 = sys::UBLK_U_IO_PREP_IO_CMDS;
pub const COMMIT_IO_CMDS: u32 = sys::UBLK_U_IO_COMMIT_IO_CMDS;
pub const FETCH_IO_CMDS: u32 = sys::UBLK_U_IO_FETCH_IO_CMDS;
/// Result of a command whose queue is going away: no new request will come on it.
pub const IO_RES_ABORT: i32 = -libc::ENODEV;
/// Result of a command that delivered a request.
pub const IO_RES_OK: i32 = sys::UBLK_IO_RES_OK as i32;
/// Zero copy: put request `tag`'s pages in the ring's buffer table at `addr`.
pub const REGISTER_IO_BUF: u32 = sys::UBLK_U_IO_REGISTER_IO_BUF;
/// Zero copy: take them out again.
pub const UNREGISTER_IO_BUF: u32 = sys::UBLK_U_IO_UNREGISTER_IO_BUF;
/// Auto buffer registration: when the driver cannot register a request's buffer, it
/// delivers the request with [`IO_F_NEED_REG_BUF`] instead of failing it.
pub const AUTO_BUF_REG_FALLBACK: u8 = sys::UBLK_AUTO_BUF_REG_FALLBACK as u8;
/// In `ublksrv_io_desc.op_flags`: register this request's buffer by hand.
pub const IO_F_NEED_REG_BUF: u32 = sys::UBLK_IO_F_NEED_REG_BUF;

/// The `sqe->addr` of a FETCH/COMMIT with UBLK_F_AUTO_BUF_REG (`struct ublk_auto_buf_reg`):
/// bits 0-15 buffer index, 16-23 flags, the rest reserved (zero).
pub fn auto_buf_reg_addr(index: u16, flags: u8) -> u64 {
    u64::from(index) | (u64::from(flags) << 16)
}

/// Byte offset of `addr` in `struct io_uring_sqe`.
const SQE_ADDR_OFFSET: usize = 16;

/// Sets the `addr` field of an SQE, which the io-uring crate's `UringCmd16` builder does
/// not expose and UBLK_F_AUTO_BUF_REG uses.
pub fn with_sqe_addr(sqe: squeue::Entry, addr: u64) -> squeue::Entry {
    const _: () = assert!(std::mem::size_of::<squeue::Entry>() == 64);
    // SAFETY: squeue::Entry is a #[repr(C)] wrapper of the 64-byte `struct io_uring_sqe`
    // (size checked above), every byte pattern is a valid SQE at the type level, and
    // bytes 16..24 are the `addr` union, which a uring_cmd leaves to the driver.
    let mut raw: [u8; 64] = unsafe { std::mem::transmute(sqe) };
    raw[SQE_ADDR_OFFSET..SQE_ADDR_OFFSET + 8].copy_from_slice(&addr.to_ne_bytes());
    // SAFETY: as above, transmuting back the same bytes with only `addr` changed.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(raw) }
}

/// Byte offsets in `struct io_uring_sqe` of `uring_cmd_flags` (u32) and `buf_index`
/// (u16, the buffer group with IOSQE_BUFFER_SELECT).
const SQE_URING_CMD_FLAGS_OFFSET: usize = 28;
const SQE_BUF_INDEX_OFFSET: usize = 40;
/// `IORING_URING_CMD_MULTISHOT`: the command completes many times (F_MORE).
const URING_CMD_MULTISHOT: u32 = 1 << 1;

/// The multishot FETCH_IO_CMDS with `header` (a `struct ublk_batch_io`), taking its
/// buffers from provided-buffer group `group`. The io-uring crate's `buf_index` setter
/// would also mark the command as using a fixed buffer, so the fields are set here.
pub fn batch_fetch_sqe(header: [u8; 16], group: u16) -> squeue::Entry {
    let sqe = opcode::UringCmd16::new(CDEV_FIXED_FD, FETCH_IO_CMDS)
        .cmd(header)
        .build()
        .flags(squeue::Flags::BUFFER_SELECT);
    // SAFETY: as in `with_sqe_addr`: a 64-byte repr(C) SQE; bytes 28..32 are the
    // `uring_cmd_flags` member of the flags union and 40..42 `buf_index`.
    let mut raw: [u8; 64] = unsafe { std::mem::transmute(sqe) };
    let f = SQE_URING_CMD_FLAGS_OFFSET;
    let flags = u32::from_ne_bytes([raw[f], raw[f + 1], raw[f + 2], raw[f + 3]]);
    raw[f..f + 4].copy_from_slice(&(flags | URING_CMD_MULTISHOT).to_ne_bytes());
    let b = SQE_BUF_INDEX_OFFSET;
    raw[b..b + 2].copy_from_slice(&group.to_ne_bytes());
    // SAFETY: transmuting back the same bytes with those two fields changed.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(raw) }
}

/// Builds the `struct ublksrv_io_cmd` payload of a FETCH/COMMIT uring_cmd:
/// `{ u16 q_id; u16 tag; s32 result; u64 addr; }`, native endian.
pub fn io_cmd_payload(q_id: u16, tag: u16, result: i32, addr: u64) -> [u8; 16] {
    let mut cmd = [0u8; 16];
    cmd[0..2].copy_from_slice(&q_id.to_ne_bytes());
    cmd[2..4].copy_from_slice(&tag.to_ne_bytes());
    cmd[4..8].copy_from_slice(&result.to_ne_bytes());
    cmd[8..16].copy_from_slice(&addr.to_ne_bytes());
    cmd
}

/// A FETCH_REQ or COMMIT_AND_FETCH_REQ for one tag, on the registered char device.
pub fn io_cmd_sqe(op: u32, q_id: u16, tag: u16, result: i32, addr: u64) -> squeue::Entry {
    opcode::UringCmd16::new(CDEV_FIXED_FD, op)
        .cmd(io_cmd_payload(q_id, tag, result, addr))
        .build()
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let sz = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if sz > 0 {
        sz as usize
    } else {
        4096
    }
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// The driver's array of `ublksrv_io_desc`, one per tag, mapped read-only from the char
/// device. The driver writes a tag's entry before it completes that tag's FETCH command.
pub struct IoDescTable {
    base: NonNull<sys::ublksrv_io_desc>,
    map_len: usize,
    depth: u16,
}

// SAFETY: the mapping is plain shared memory; the table only reads it.
unsafe impl Send for IoDescTable {}

impl IoDescTable {
    pub fn map(cdev_fd: RawFd, q_id: u16, depth: u16) -> io::Result<Self> {
        let desc_size = std::mem::size_of::<sys::ublksrv_io_desc>();
        let page = page_size();
        let map_len = round_up(usize::from(depth) * desc_size, page);
        // Each queue's area starts at a stride sized for the largest possible depth.
        let stride = round_up(sys::UBLK_MAX_QUEUE_DEPTH as usize * desc_size, page);
        let offset = sys::UBLKSRV_CMD_BUF_OFFSET as usize + usize::from(q_id) * stride;
        // SAFETY: a fresh read-only shared mapping of the char device; no Rust object
        // aliases it, and the arguments are checked by the kernel.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                cdev_fd,
                offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(addr.cast()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(IoDescTable {
            base,
            map_len,
            depth,
        })
    }

    /// The request the driver delivered on `tag`, with its raw `op_flags`. Call only
    /// after that tag's command completed with [`IO_RES_OK`].
    pub fn get(&self, tag: u16) -> (IoDesc, u32) {
        assert!(
            tag < self.depth,
            "tag {tag} beyond queue depth {}",
            self.depth
        );
        // SAFETY: tag < depth, so the element is inside the mapping; the driver wrote it
        // before posting the CQE we are handling, and a volatile read copes with the
        // memory being shared with the kernel.
        let d = unsafe { self.base.as_ptr().add(usize::from(tag)).read_volatile() };
        (
            IoDesc::from_raw(tag, d.op_flags, d.nr_sectors, d.start_sector),
            d.op_flags,
        )
    }
}

impl Drop for IoDescTable {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region `map` created; nothing refers to it after.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_len) };
    }
}

/// One buffer per tag, owned by the daemon, handed to the driver by address (`copy`
/// mode) or registered with the ring (`fixed` mode). Anonymous memory, locked.
pub struct BufferArena {
    base: NonNull<u8>,
    per_tag: usize,
    depth: u16,
}

// SAFETY: the arena is plain memory; who may touch a tag's buffer is decided by the
// queue (the driver, between FETCH completion and commit, or the target's IO).
unsafe impl Send for BufferArena {}

impl BufferArena {
    pub fn new(depth: u16, per_tag: usize) -> io::Result<Self> {
        let per_tag = round_up(per_tag.max(1), page_size());
        let len = per_tag * usize::from(depth);
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(addr.cast()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        // Locked and populated now, so serving a request never waits for memory (or, in
        // copy mode, for swap-in) while the system may be reclaiming through this device.
        // SAFETY: addr..addr+len is the mapping just made.
        if unsafe { libc::mlock(addr, len) } != 0 {
            log::warn!(
                "cannot lock {} MiB of request buffers in memory: {}; raise the memory \
                 lock limit (LimitMEMLOCK=infinity in the unit, or run as root)",
                len >> 20,
                io::Error::last_os_error()
            );
        }
        Ok(BufferArena {
            base,
            per_tag,
            depth,
        })
    }

    /// Address of `tag`'s buffer.
    pub fn addr(&self, tag: u16) -> *mut u8 {
        assert!(
            tag < self.depth,
            "tag {tag} beyond queue depth {}",
            self.depth
        );
        // SAFETY: tag < depth, so the offset stays inside the mapping.
        unsafe { self.base.as_ptr().add(usize::from(tag) * self.per_tag) }
    }

    #[cfg(test)]
    pub fn per_tag(&self) -> usize {
        self.per_tag
    }

    /// One iovec per tag, for IORING_REGISTER_BUFFERS (buffer index = tag).
    /// The whole arena, as (address, length).
    pub fn region(&self) -> (*mut u8, usize) {
        (self.base.as_ptr(), self.per_tag * usize::from(self.depth))
    }

    pub fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.depth)
            .map(|tag| libc::iovec {
                iov_base: self.addr(tag).cast(),
                iov_len: self.per_tag,
            })
            .collect()
    }
}

impl Drop for BufferArena {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region `new` created. The arena is dropped only
        // once the kernel has released the device's char device (`queue::Retired`),
        // when no command can make the driver copy into it any more.
        unsafe {
            libc::munmap(
                self.base.as_ptr().cast(),
                self.per_tag * usize::from(self.depth),
            )
        };
    }
}

/// The `/dev/ublkcN` file position of byte `offset` of request `tag` of queue `qid`,
/// for reads and writes with UBLK_F_USER_COPY.
pub fn user_copy_pos(qid: u16, tag: u16, offset: u32) -> u64 {
    debug_assert!(offset < 1 << sys::UBLK_IO_BUF_BITS);
    u64::from(sys::UBLKSRV_IO_BUF_OFFSET)
        + ((u64::from(qid) << sys::UBLK_QID_OFF)
            | (u64::from(tag) << sys::UBLK_TAG_OFF)
            | u64::from(offset))
}

/// Copies `data` into the pages of request `tag` of queue `qid` at byte `offset`
/// through the ublk char device `cdev` (UBLK_F_USER_COPY).
pub fn user_copy_write(
    cdev: RawFd,
    qid: u16,
    tag: u16,
    offset: usize,
    data: &[u8],
) -> io::Result<()> {
    let pos = user_copy_pos(qid, tag, offset as u32);
    // SAFETY: writes `data.len()` bytes from a live slice; the driver copies them into
    // the request's pages (and refuses a range beyond the request).
    let n = unsafe { libc::pwrite(cdev, data.as_ptr().cast(), data.len(), pos as i64) };
    whole(n, data.len())
}

/// A user copy's result: every byte, or an error saying what happened.
fn whole(n: isize, len: usize) -> io::Result<()> {
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != len {
        let what = format!("user copy moved {n} of {len} bytes");
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, what));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn user_copy_positions_follow_the_uapi() {
        // UBLKSRV_IO_BUF_OFFSET + (qid << UBLK_QID_OFF | tag << UBLK_TAG_OFF | offset)
        assert_eq!(user_copy_pos(0, 0, 0), 0x8000_0000);
        assert_eq!(
            user_copy_pos(3, 5, 4096),
            0x8000_0000 + (3u64 << 41) + (5u64 << 25) + 4096
        );
    }

    #[test]
    fn user_copies_go_to_the_request_position_and_must_be_whole() {
        // A plain file stands in for /dev/ublkcN: the bytes land at the request's
        // position (a sparse file's offset).
        use std::os::unix::fs::FileExt;
        let f = tempfile::tempfile().unwrap();
        use std::os::fd::AsRawFd;
        user_copy_write(f.as_raw_fd(), 0, 1, 8, b"abcd").unwrap();
        let mut back = [0u8; 4];
        f.read_exact_at(&mut back, user_copy_pos(0, 1, 8)).unwrap();
        assert_eq!(&back, b"abcd");
        // A short copy is an error.
        let e = whole(2, 4).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        assert!(whole(4, 4).is_ok());
    }

    #[test]
    fn payload_matches_uapi_layout() {
        assert_eq!(size_of::<sys::ublksrv_io_cmd>(), 16);
        let p = io_cmd_payload(0x0102, 0x0304, -5, 0x1122_3344_5566_7788);
        let q = offset_of!(sys::ublksrv_io_cmd, q_id);
        let t = offset_of!(sys::ublksrv_io_cmd, tag);
        let r = offset_of!(sys::ublksrv_io_cmd, result);
        assert_eq!(&p[q..q + 2], &0x0102u16.to_ne_bytes());
        assert_eq!(&p[t..t + 2], &0x0304u16.to_ne_bytes());
        assert_eq!(&p[r..r + 4], &(-5i32).to_ne_bytes());
        assert_eq!(&p[8..16], &0x1122_3344_5566_7788u64.to_ne_bytes());
    }

    #[test]
    fn sqe_addr_lands_in_the_addr_field() {
        let sqe = io_cmd_sqe(FETCH_REQ, 1, 2, -1, 0);
        let sqe = with_sqe_addr(sqe, auto_buf_reg_addr(7, AUTO_BUF_REG_FALLBACK));
        // SAFETY: reading the bytes of a 64-byte repr(C) SQE.
        let raw: [u8; 64] = unsafe { std::mem::transmute(sqe) };
        assert_eq!(
            u64::from_ne_bytes(raw[16..24].try_into().unwrap()),
            7 | (1 << 16)
        );
        // The command payload (bytes 48..64) is untouched.
        assert_eq!(&raw[48..64], &io_cmd_payload(1, 2, -1, 0));
    }

    #[test]
    fn fetch_sqe_is_multishot_with_a_buffer_group() {
        // The offsets are where the io-uring crate itself puts buf_index and
        // IORING_URING_CMD_FIXED (1 << 0) in uring_cmd_flags.
        let fixed = opcode::UringCmd16::new(CDEV_FIXED_FD, 0)
            .buf_index(Some(0x0909))
            .build();
        // SAFETY: reading the bytes of a 64-byte repr(C) SQE.
        let raw: [u8; 64] = unsafe { std::mem::transmute(fixed) };
        let f = SQE_URING_CMD_FLAGS_OFFSET;
        let b = SQE_BUF_INDEX_OFFSET;
        assert_eq!(u32::from_ne_bytes(raw[f..f + 4].try_into().unwrap()), 1);
        assert_eq!(
            u16::from_ne_bytes(raw[b..b + 2].try_into().unwrap()),
            0x0909
        );

        let h = [7u8; 16];
        let sqe = batch_fetch_sqe(h, 5);
        // SAFETY: reading the bytes of a 64-byte repr(C) SQE.
        let raw: [u8; 64] = unsafe { std::mem::transmute(sqe) };
        assert_eq!(raw[0], 46, "IORING_OP_URING_CMD");
        assert_eq!(
            raw[1],
            1 | (1 << 5),
            "IOSQE_FIXED_FILE | IOSQE_BUFFER_SELECT"
        );
        assert_eq!(
            u32::from_ne_bytes(raw[f..f + 4].try_into().unwrap()),
            1 << 1
        );
        assert_eq!(u16::from_ne_bytes(raw[b..b + 2].try_into().unwrap()), 5);
        // cmd_op (bytes 8..12) and the payload (48..64) are the fetch's.
        assert_eq!(
            u32::from_ne_bytes(raw[8..12].try_into().unwrap()),
            FETCH_IO_CMDS
        );
        assert_eq!(&raw[48..64], &h);
    }

    #[test]
    fn arena_buffers_are_disjoint_and_writable() {
        let arena = BufferArena::new(4, 5000).unwrap();
        assert_eq!(arena.per_tag() % page_size(), 0);
        assert!(arena.per_tag() >= 5000);
        for tag in 0..4u16 {
            let p = arena.addr(tag);
            // SAFETY: p points at per_tag writable bytes owned by this test's arena.
            unsafe { std::ptr::write_bytes(p, tag as u8, arena.per_tag()) };
        }
        for tag in 0..4u16 {
            // SAFETY: reading back bytes written above, inside the mapping.
            let b = unsafe { *arena.addr(tag).add(arena.per_tag() - 1) };
            assert_eq!(b, tag as u8);
        }
    }
}
