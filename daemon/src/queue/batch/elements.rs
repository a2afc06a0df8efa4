//! The arrays that PREP_IO_CMDS and COMMIT_IO_CMDS carry: the `struct ublk_batch_io`
//! header, the elements (tag, buffer index, result, and the buffer's address in copy
//! and fixed modes) in the layout the buffer mode asks for, the memory the driver reads
//! them from, and how far a partial commit got.

use crate::queue::uapi;
use io_uring::{opcode, squeue};
use libublk::sys;
use std::alloc::{self, Layout};
use std::io;
use std::ptr::NonNull;
use ublkd_proto::BufferMode;

/// How the elements of a PREP/COMMIT array look for a buffer mode: the header flags
/// and the element size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ElemFormat {
    pub(super) flags: u16,
    pub(super) bytes: u8,
}

impl ElemFormat {
    pub(super) fn for_mode(mode: BufferMode) -> Self {
        match mode {
            // The driver copies to and from the daemon's buffer at buf_addr.
            BufferMode::Copy | BufferMode::Fixed => ElemFormat {
                flags: sys::UBLK_BATCH_F_HAS_BUF_ADDR as u16,
                bytes: 16,
            },
            // buf_index: where the driver registers the request's pages (= tag); with
            // the fallback it delivers UBLK_IO_F_NEED_REG_BUF instead of failing.
            BufferMode::AutoZc => ElemFormat {
                flags: sys::UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK as u16,
                bytes: 8,
            },
            BufferMode::Zc => ElemFormat { flags: 0, bytes: 8 },
        }
    }

    fn has_addr(self) -> bool {
        self.flags & sys::UBLK_BATCH_F_HAS_BUF_ADDR as u16 != 0
    }
}

/// The `struct ublk_batch_io` payload of a batch command (native endian).
pub(super) fn header(q_id: u16, flags: u16, nr_elem: u16, elem_bytes: u8) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..2].copy_from_slice(&q_id.to_ne_bytes());
    h[2..4].copy_from_slice(&flags.to_ne_bytes());
    h[4..6].copy_from_slice(&nr_elem.to_ne_bytes());
    h[6] = elem_bytes;
    h
}

/// One element: `struct ublk_elem_header { u16 tag; u16 buf_index; s32 result; }`,
/// then `u64 buf_addr` when the format has it. Only `fmt.bytes` bytes are meaningful.
pub(super) fn element(
    fmt: ElemFormat,
    tag: u16,
    buf_index: u16,
    result: i32,
    addr: u64,
) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[0..2].copy_from_slice(&tag.to_ne_bytes());
    e[2..4].copy_from_slice(&buf_index.to_ne_bytes());
    e[4..8].copy_from_slice(&result.to_ne_bytes());
    if fmt.has_addr() {
        e[8..16].copy_from_slice(&addr.to_ne_bytes());
    }
    e
}

/// Heap memory handed to the kernel by address: only ever touched through raw
/// pointers, so the kernel writing part of it never aliases a Rust reference.
pub(super) struct RawBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: plain memory owned by one queue thread at a time.
unsafe impl Send for RawBuf {}

impl RawBuf {
    pub(super) fn new(len: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(8), 64)
            .map_err(|e| io::Error::other(format!("batch buffer layout: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(RawBuf { ptr, layout })
    }

    pub(super) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(super) fn region(&self) -> (*mut u8, usize) {
        (self.ptr.as_ptr(), self.layout.size())
    }
}

impl Drop for RawBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout. The command path is dropped only
        // once the kernel has released the device's char device (`queue::Retired`),
        // when no command can make the driver write here any more.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// An array of PREP/COMMIT elements.
pub(super) struct ElemArray {
    mem: RawBuf,
    pub(super) fmt: ElemFormat,
    cap: u16,
    pub(super) len: u16,
}

impl ElemArray {
    pub(super) fn new(fmt: ElemFormat, cap: u16) -> io::Result<Self> {
        Ok(ElemArray {
            mem: RawBuf::new(usize::from(cap) * usize::from(fmt.bytes))?,
            fmt,
            cap,
            len: 0,
        })
    }

    pub(super) fn region(&self) -> (*mut u8, usize) {
        self.mem.region()
    }

    pub(super) fn bytes(&self) -> usize {
        usize::from(self.len) * usize::from(self.fmt.bytes)
    }

    pub(super) fn push(&mut self, elem: &[u8; 16]) -> bool {
        if self.len == self.cap {
            return false;
        }
        let n = usize::from(self.fmt.bytes);
        // SAFETY: len < cap, so the element's n bytes lie inside the allocation; the
        // array is not with the driver while it is being filled.
        unsafe {
            std::ptr::copy_nonoverlapping(elem.as_ptr(), self.mem.ptr().add(self.bytes()), n)
        };
        self.len += 1;
        true
    }

    pub(super) fn get(&self, i: u16) -> [u8; 16] {
        let mut e = [0u8; 16];
        if i < self.len {
            let n = usize::from(self.fmt.bytes);
            // SAFETY: i < len <= cap: inside the allocation; the driver only reads it.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.mem.ptr().add(usize::from(i) * n),
                    e.as_mut_ptr(),
                    n,
                )
            };
        }
        e
    }

    pub(super) fn tag(&self, i: u16) -> u16 {
        let e = self.get(i);
        u16::from_ne_bytes([e[0], e[1]])
    }

    /// The PREP or COMMIT command for the elements, on the registered char device.
    pub(super) fn sqe(&self, op: u32, q_id: u16, user_data: u64) -> squeue::Entry {
        let h = header(q_id, self.fmt.flags, self.len, self.fmt.bytes);
        opcode::UringCmd16::new(uapi::CDEV_FIXED_FD, op)
            .cmd(h)
            .addr(Some(self.mem.ptr() as u64))
            .build()
            .user_data(user_data)
    }
}

/// The first element of an array of `n` that a COMMIT_IO_CMDS with result `res` left
/// for another commit: `n` when all were committed (res = the array's bytes), the
/// number committed when the driver stopped at a refused element (res = the bytes
/// before it), and 1 when it refused the first one (res = its errno): that element is
/// dropped, the driver does not take it.
pub(super) fn uncommitted_from(res: i32, n: u16, elem_bytes: u8) -> u16 {
    if res < 0 {
        return 1.min(n);
    }
    let done = res as usize / usize::from(elem_bytes.max(1));
    done.min(usize::from(n)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn header_matches_uapi_layout() {
        assert_eq!(size_of::<sys::ublk_batch_io>(), 16);
        let h = header(0x0102, 0x0304, 0x0506, 16);
        let at = |o: usize, n: usize| &h[o..o + n];
        assert_eq!(
            at(offset_of!(sys::ublk_batch_io, q_id), 2),
            &0x0102u16.to_ne_bytes()
        );
        assert_eq!(
            at(offset_of!(sys::ublk_batch_io, flags), 2),
            &0x0304u16.to_ne_bytes()
        );
        assert_eq!(
            at(offset_of!(sys::ublk_batch_io, nr_elem), 2),
            &0x0506u16.to_ne_bytes()
        );
        assert_eq!(h[offset_of!(sys::ublk_batch_io, elem_bytes)], 16);
        assert_eq!(h[offset_of!(sys::ublk_batch_io, reserved)], 0);
        assert_eq!(at(offset_of!(sys::ublk_batch_io, reserved2), 8), &[0; 8]);
    }

    #[test]
    fn elements_match_uapi_layout() {
        assert_eq!(size_of::<sys::ublk_elem_header>(), 8);
        let copy = ElemFormat::for_mode(BufferMode::Copy);
        assert_eq!(copy, ElemFormat::for_mode(BufferMode::Fixed));
        assert_eq!(
            (copy.flags, copy.bytes),
            (sys::UBLK_BATCH_F_HAS_BUF_ADDR as u16, 16)
        );
        let e = element(copy, 7, 0, -5, 0x1122_3344_5566_7788);
        let tag = offset_of!(sys::ublk_elem_header, tag);
        let idx = offset_of!(sys::ublk_elem_header, buf_index);
        let res = offset_of!(sys::ublk_elem_header, result);
        assert_eq!(&e[tag..tag + 2], &7u16.to_ne_bytes());
        assert_eq!(&e[idx..idx + 2], &0u16.to_ne_bytes());
        assert_eq!(&e[res..res + 4], &(-5i32).to_ne_bytes());
        // buf_addr follows the 8-byte header.
        assert_eq!(&e[8..16], &0x1122_3344_5566_7788u64.to_ne_bytes());

        let auto = ElemFormat::for_mode(BufferMode::AutoZc);
        assert_eq!(
            (auto.flags, auto.bytes),
            (sys::UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK as u16, 8)
        );
        let e = element(auto, 3, 3, 4096, 0xdead);
        assert_eq!(&e[idx..idx + 2], &3u16.to_ne_bytes());
        assert_eq!(&e[8..16], &[0; 8], "no address without HAS_BUF_ADDR");

        let zc = ElemFormat::for_mode(BufferMode::Zc);
        assert_eq!((zc.flags, zc.bytes), (0, 8));
    }

    #[test]
    fn partial_commits_leave_the_rest() {
        // All 5 of 16 bytes each.
        assert_eq!(uncommitted_from(80, 5, 16), 5);
        // Stopped at the third: the third and later go again.
        assert_eq!(uncommitted_from(32, 5, 16), 2);
        assert_eq!(uncommitted_from(0, 5, 8), 0);
        // The first refused: it is dropped, the rest go again.
        assert_eq!(uncommitted_from(-libc::EBUSY, 5, 8), 1);
        assert_eq!(uncommitted_from(-libc::EINVAL, 0, 8), 0);
        // A result beyond the array commits it all.
        assert_eq!(uncommitted_from(1 << 20, 3, 8), 3);
    }

    #[test]
    fn commit_sqe_points_at_the_elements() {
        let fmt = ElemFormat::for_mode(BufferMode::Copy);
        let mut a = ElemArray::new(fmt, 4).unwrap();
        assert!(a.push(&element(fmt, 1, 0, 512, 0x1000)));
        assert!(a.push(&element(fmt, 2, 0, -5, 0x2000)));
        assert_eq!((a.len, a.bytes(), a.tag(1)), (2, 32, 2));
        let sqe = a.sqe(uapi::COMMIT_IO_CMDS, 3, 99);
        // SAFETY: reading the bytes of a 64-byte repr(C) SQE.
        let raw: [u8; 64] = unsafe { std::mem::transmute(sqe) };
        assert_eq!(
            u64::from_ne_bytes(raw[16..24].try_into().unwrap()),
            a.mem.ptr() as u64
        );
        assert_eq!(&raw[48..64], &header(3, fmt.flags, 2, 16));
        assert!(a.push(&element(fmt, 3, 0, 0, 0x3000)));
        assert!(a.push(&element(fmt, 4, 0, 0, 0x4000)));
        assert!(
            !a.push(&element(fmt, 5, 0, 0, 0x5000)),
            "holds depth elements"
        );
    }
}
