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
//!
//! A target whose backend reads and writes process memory (librbd) while the requests'
//! buffers are their own pages (zc, auto-zc) stages every request's data in such a
//! buffer too ([`Staging::for_requests`]), one slot per tag: a write's data goes from the
//! request's registered pages into the memfd with WRITE_FIXED, a read's from the memfd
//! into the request's pages with READ_FIXED. io_uring runs a buffered write inline only
//! for files that promise not to block on it, which tmpfs does not; it runs "direct"
//! writes inline, and tmpfs (Linux 6.6 and later) takes O_DIRECT as an ordinary write
//! into its pages. So the memfd is opened a second time, through /proc, with O_DIRECT
//! for those writes ([`Staging::writer`]); where that fails they still work, from an
//! io-wq worker.

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
    /// The same file opened O_DIRECT | O_NONBLOCK, for writes io_uring runs inline
    /// ([`Staging::for_requests`] only).
    writer: Option<OwnedFd>,
    /// Whether the queue registers the buffer in its ring (a receive buffer); request
    /// slots are only ever reached through the file.
    register: bool,
}

// SAFETY: the mapping is owned by this value alone (nothing else has its address but
// the ring the queue registers it in, on the thread that owns the value).
unsafe impl Send for Staging {}

impl Staging {
    /// A staging buffer of `len` bytes (rounded up to pages), filled with zeros; an
    /// error only when not even anonymous memory can be mapped.
    pub fn new(len: usize) -> io::Result<Staging> {
        let len = len.max(1).next_multiple_of(page_size());
        match Self::with_memfd(len, true) {
            Ok(s) => Ok(s),
            Err(e) => {
                log::warn!(
                    "cannot back a {len}-byte staging buffer with a memfd ({e}): read payloads are copied into requests with a user copy"
                );
                Self::anonymous(len)
            }
        }
    }

    /// Staging for requests' data, `slots` slots of `slot` bytes (rounded up to pages),
    /// for a target whose backend works in process memory while the requests' buffers
    /// are their own pages (see the module's comment). A memfd (there is no anonymous
    /// fallback: without a file the data could not reach the requests' pages), not
    /// registered in the ring, locked in memory as the daemon's request buffers of copy
    /// mode are, so that serving a request never waits for memory.
    pub fn for_requests(slots: u16, slot: usize) -> io::Result<Staging> {
        let slot = slot.max(1).next_multiple_of(page_size());
        let len = slot * usize::from(slots.max(1));
        let mut s = Self::with_memfd(len, false)?;
        s.register = false;
        s.writer = s.file().and_then(|fd| match reopen_direct(fd) {
            Ok(w) => Some(w),
            Err(e) => {
                log::warn!(
                    "cannot open the staging memfd for direct writes ({e}): writes are staged by io-wq workers"
                );
                None
            }
        });
        // SAFETY: the mapping just made, `len` bytes.
        if unsafe { libc::mlock(s.addr.as_ptr().cast(), len) } != 0 {
            log::warn!(
                "cannot lock {} MiB of request staging in memory: {}; raise the memory \
                 lock limit (LimitMEMLOCK=infinity in the unit, or run as root)",
                len >> 20,
                io::Error::last_os_error()
            );
        }
        Ok(s)
    }

    /// The memfd behind the buffer, if there is one.
    pub fn file(&self) -> Option<RawFd> {
        self.file.as_ref().map(|f| f.as_raw_fd())
    }

    /// The descriptor to write the memfd through: opened O_DIRECT where that could be
    /// done, so io_uring runs the write inline; the memfd itself otherwise.
    pub fn writer(&self) -> Option<RawFd> {
        self.writer.as_ref().map(|f| f.as_raw_fd()).or(self.file())
    }

    /// Whether the queue registers the buffer in its ring.
    pub fn registered(&self) -> bool {
        self.register
    }

    fn with_memfd(len: usize, populate: bool) -> io::Result<Staging> {
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
        let populate = if populate { libc::MAP_POPULATE } else { 0 };
        let addr = map(len, libc::MAP_SHARED | populate, fd)?;
        Ok(Staging {
            addr,
            len,
            file: Some(file),
            writer: None,
            register: true,
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
            writer: None,
            register: true,
        })
    }
}

/// `fd` (a memfd) opened again, read/write, O_DIRECT and non-blocking.
fn reopen_direct(fd: RawFd) -> io::Result<OwnedFd> {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}"))
        .map_err(|_| io::Error::other("descriptor path with a NUL"))?;
    let flags = libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_DIRECT;
    // SAFETY: a NUL-terminated path; the result is checked.
    let w = unsafe { libc::open(path.as_ptr(), flags) };
    if w < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(w) })
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

    /// What the rbd target does with a request's pages, with a registered buffer of the
    /// test's own standing in for them: WRITE_FIXED into a slot through `writer` shows
    /// in the mapping, READ_FIXED of the slot through `file` returns the mapping's bytes,
    /// and the write ran inline where the direct descriptor could be opened.
    #[test]
    fn request_slots_take_fixed_writes_and_give_fixed_reads() {
        use io_uring::{opcode, types, IoUring};
        let mut s = Staging::for_requests(2, 5000).unwrap();
        assert_eq!(s.len(), 2 * 8192, "two slots rounded up to pages");
        assert!(!s.registered());
        let mut ring = IoUring::new(4).unwrap();
        let mut pages = vec![0u8; 8192];
        pages[..512].fill(0xa5);
        pages[512..1024].fill(0x5a);
        let iov = libc::iovec {
            iov_base: pages.as_mut_ptr().cast(),
            iov_len: pages.len(),
        };
        // SAFETY: `pages` outlives the ring (dropped after it, declared before).
        unsafe { ring.submitter().register_buffers(&[iov]).unwrap() };
        let mut run = |sqe: io_uring::squeue::Entry| {
            // SAFETY: the SQE points into `pages`, registered and alive.
            unsafe { ring.submission().push(&sqe).unwrap() };
            ring.submit_and_wait(1).unwrap();
            ring.completion().next().map(|c| c.result()).unwrap()
        };
        let writer = types::Fd(s.writer().unwrap());
        let w = opcode::WriteFixed::new(writer, pages.as_ptr(), 1024, 0)
            .offset(8192)
            .build();
        assert_eq!(run(w), 1024);
        assert!(s[8192..8704].iter().all(|&b| b == 0xa5));
        assert!(s[8704..9216].iter().all(|&b| b == 0x5a));
        assert!(
            s[..8192].iter().all(|&b| b == 0),
            "the other slot untouched"
        );
        s[4096..4608].fill(0x3c);
        let r = opcode::ReadFixed::new(types::Fd(s.file().unwrap()), pages.as_mut_ptr(), 512, 0)
            .offset(4096)
            .build();
        assert_eq!(run(r), 512);
        drop(ring);
        assert!(pages[..512].iter().all(|&b| b == 0x3c));
        let inline = s.writer.is_some();
        // This thread's io-wq workers (other tests run beside it).
        // SAFETY: no arguments, no memory.
        let mine = format!("iou-wrk-{}", unsafe { libc::gettid() });
        let workers = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
            .filter(|c| c.trim_end() == mine)
            .count();
        if inline {
            assert_eq!(
                workers, 0,
                "a direct write to the memfd ran in an io-wq worker"
            );
        }
    }
}
