//! What every thread that serves block IO sets up first.

use std::io;

/// `PR_SET_IO_FLUSHER` (Linux 5.6, include/uapi/linux/prctl.h); the libc crate does not
/// export it for glibc targets.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Marks the calling thread as one that block IO depends on (`PR_SET_IO_FLUSHER`): its
/// memory allocations never start IO to free memory (PF_MEMALLOC_NOIO), and it is not
/// throttled for dirty pages of other devices (PF_LOCAL_THROTTLE). Without it, reclaim
/// under memory pressure could write back dirty pages of a ublk device from inside the
/// very thread that has to serve that writeback: a deadlock. Needs CAP_SYS_RESOURCE.
pub fn io_flusher() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only; it changes flags of this thread.
    let r = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!(
                "cannot mark the thread as an IO flusher (PR_SET_IO_FLUSHER: {e}); \
                 memory reclaim may then wait on this daemon's own devices \
                 (ublkd needs CAP_SYS_RESOURCE)"
            ),
        ));
    }
    Ok(())
}
