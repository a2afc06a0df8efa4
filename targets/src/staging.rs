//! A target's staging buffer (a network target's receive buffer) that is also a file:
//! the pages of a memfd, mapped shared. The queue registers the mapping in its ring, so
//! the socket receives into it with READ_FIXED, and reads parts of the file with
//! READ_FIXED into a request's own registered pages (zc, auto-zc): both copies are the
//! kernel's memcpy. A user copy through the ublk char device, the only other way into
//! those pages, copies with `copy_to_user`'s string instruction, which costs far more
//! under an emulated CPU (docs/research/issue-12-speed.md, section 6).
//!
//! Where a memfd cannot be had, the buffer is anonymous memory without a file, and the
//! queue falls back to the user copy.

use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

/// Memory of `len` bytes, page-aligned, backed by a memfd where one could be made.
pub struct Staging {
    addr: NonNull<u8>,
    len: usize,
    /// The memfd whose pages the mapping shows: reads of it at byte `at` return the
    /// buffer's bytes from `at` (non-blocking, so io_uring reads it inline).
    file: Option<OwnedFd>,
}

// SAFETY: the mapping is owned by this value alone (nothing else has its address but
// the ring the queue registers it in, on the thread that owns the value).
unsafe impl Send for Staging {}

impl Staging {
    /// A staging buffer of `len` bytes (rounded up to pages), filled with zeros; an
    /// error only when not even anonymous memory can be mapped.
    pub fn new(len: usize) -> io::Result<Staging> {
        let len = len.max(1).next_multiple_of(page_size());
        match Self::with_memfd(len) {
            Ok(s) => Ok(s),
            Err(e) => {
                log::warn!(
                    "cannot back a {len}-byte staging buffer with a memfd ({e}): read payloads are copied into requests with a user copy"
                );
                Self::anonymous(len)
            }
        }
    }

    /// The memfd behind the buffer, if there is one.
    pub fn file(&self) -> Option<RawFd> {
        self.file.as_ref().map(|f| f.as_raw_fd())
    }

    fn with_memfd(len: usize) -> io::Result<Staging> {
        let name = c"ublkd-staging";
        // SAFETY: a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        let file = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a plain call on a descriptor owned here; the result is checked.
        if unsafe { libc::ftruncate(fd, len as libc::off_t) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = libc::MAP_SHARED | libc::MAP_POPULATE;
        let addr = map(len, flags, fd)?;
        Ok(Staging {
            addr,
            len,
            file: Some(file),
        })
    }

    fn anonymous(len: usize) -> io::Result<Staging> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
        let addr = map(len, flags, -1).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot map {len} bytes of staging memory: {e}"),
            )
        })?;
        Ok(Staging {
            addr,
            len,
            file: None,
        })
    }
}

/// mmap of `len` bytes read/write with `flags` (of `fd`, or anonymous with -1).
fn map(len: usize, flags: libc::c_int, fd: RawFd) -> io::Result<NonNull<u8>> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: a new mapping at an address the kernel picks; the result is checked.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned a null address"))
}

fn page_size() -> usize {
    // SAFETY: sysconf takes no memory.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096).max(4096)
}

impl Deref for Staging {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` bytes mapped read/write for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.addr.as_ptr(), self.len) }
    }
}

impl DerefMut for Staging {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, borrowed exclusively through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.addr.as_ptr(), self.len) }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer borrowed (and no longer
        // registered: the queue drops its ring first).
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn the_file_reads_what_the_buffer_holds() {
        let mut s = Staging::new(10_000).unwrap();
        assert_eq!(s.len(), 12_288, "rounded up to pages");
        assert!(s.iter().all(|&b| b == 0));
        s[4096..4100].copy_from_slice(b"abcd");
        let fd = s.file().expect("a memfd on Linux");
        // SAFETY: borrowed for the read only; `s` keeps owning the descriptor.
        let f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
        let mut back = [0u8; 4];
        f.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(&back, b"abcd");
    }
}
