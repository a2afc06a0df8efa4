//! Setting a queue up and taking it down: its ring, the files and buffers registered in
//! it (the request buffers of fixed mode, the zero-copy table, the target's staging
//! buffer), the request descriptors, the commands, and the target's handler.

use super::*;

impl Queue {
    pub(super) fn new(
        spec: QueueSpec,
        target: Arc<dyn Target>,
        counters: Arc<QueueCounters>,
        stop: Arc<AtomicBool>,
        detach: Arc<AtomicBool>,
        wake: Arc<OwnedFd>,
    ) -> Result<Self, String> {
        let fail = |what: &str, e: io::Error| format!("{what}: {e}");
        let depth = u32::from(spec.depth);
        // Each tag has at most its command, a buffer (un)registration and a few target
        // SQEs in flight.
        let sq_entries = (depth * 4 + 8).next_power_of_two().min(32768);
        let ring = IoUring::builder()
            .setup_cqsize(sq_entries * 2)
            // Completion work runs when this thread enters the kernel, without an
            // interrupt (COOP_TASKRUN); only this thread submits (SINGLE_ISSUER). Not
            // DEFER_TASKRUN: there, the completion of a backing-file write that io-wq
            // ran goes back to this thread as task work and wakes it, and 4k random
            // writes of the loop target measured 6-7% slower with it (0.95x of rublk,
            // which uses COOP_TASKRUN, against 1.02x with these flags; issue-12-speed.md 7.3).
            .setup_coop_taskrun()
            .setup_single_issuer()
            .build(sq_entries)
            .map_err(|e| fail("cannot create the io_uring", e))?;
        if spec.user_copy {
            // io_uring runs a read or write of a file inline only when the file says it
            // will not block (FMODE_NOWAIT, or O_NONBLOCK), and reads that when the file
            // is registered: without it, the user copies the queue pushes on the char
            // device (`Ring::push_staged_copy`) would each go to an io-wq worker. The
            // driver's copies never block, and nothing else of it looks at the flag.
            set_nonblocking(spec.cdev_fd)
                .map_err(|e| fail("cannot make the char device non-blocking", e))?;
        }
        let mut files = vec![spec.cdev_fd];
        files.extend(target.files());
        ring.submitter()
            .register_files(&files)
            .map_err(|e| fail("cannot register files in the ring", e))?;
        let iods = uapi::IoDescTable::map(spec.cdev_fd, spec.qid, spec.depth)
            .map_err(|e| fail("cannot map the request descriptors", e))?;
        let bufs = match spec.buffer {
            BufferMode::Copy | BufferMode::Fixed => Some(
                uapi::BufferArena::new(spec.depth, spec.max_io_bytes as usize)
                    .map_err(|e| fail("cannot allocate request buffers", e))?,
            ),
            BufferMode::Zc | BufferMode::AutoZc => None,
        };
        let addrs = (0..spec.depth)
            .map(|tag| bufs.as_ref().map_or(0, |b| b.addr(tag) as u64))
            .collect();
        let cmds = Commands::new(
            spec.batch,
            spec.dev_id,
            spec.qid,
            spec.depth,
            spec.buffer,
            addrs,
        )
        .map_err(|e| fail("cannot allocate the batch command buffers", e))?;
        let ctx = QueueContext {
            qid: spec.qid,
            depth: spec.depth,
            first_file: 1,
            user_copy: spec.user_copy,
            // The slot after the requests' (fixed: their buffers; zc: their pages).
            staging_index: Some(spec.depth),
            own_pages: matches!(spec.buffer, BufferMode::Zc | BufferMode::AutoZc),
            max_io_bytes: spec.max_io_bytes,
        };
        let mut handler = target
            .queue(ctx)
            .map_err(|e| fail("target setup failed", e))?;
        let staging = handler.staging_buffer().map(|b| StagingArea {
            addr: b.as_mut_ptr() as u64,
            len: b.len(),
            file: b.file(),
            writer: b.writer(),
            registered: b.registered(),
        });
        let staging_iov = staging.filter(|s| s.registered).map(|s| libc::iovec {
            iov_base: s.addr as *mut libc::c_void,
            iov_len: s.len,
        });
        register_buffers(&ring, spec.buffer, bufs.as_ref(), depth, staging_iov)
            .map_err(|e| fail("cannot register buffers in the ring", e))?;
        Ok(Queue {
            ring,
            handler,
            _target: target,
            iods,
            bufs,
            tags: vec![TagState::default(); usize::from(spec.depth)],
            retry: VecDeque::new(),
            cmds,
            // A fetch completion carries at most 128 tags.
            delivered: Vec::with_capacity(usize::from(spec.depth).max(128)),
            counters,
            stop,
            detach,
            wake,
            wake_buf: Box::new(0),
            dumped: DUMP_GENERATION.load(Ordering::Acquire),
            cqes: Vec::with_capacity(sq_entries as usize * 2),
            finished: Vec::new(),
            in_target: 0,
            fail_after: crate::fault::queue_error_after(),
            staging,
            failures: failures::FailureLog::new(spec.dev_id, spec.qid),
            spec,
        })
    }
}

/// The memory a queue's ublk commands point into by address: the request buffers of
/// copy and fixed mode (the driver copies a write's data into them when it delivers
/// the request), the batch path's fetch buffers (the driver writes each list of
/// delivered tags into one) and commit arrays, and the wake-up's read buffer.
///
/// Closing the ring does not end those commands: the kernel cancels them later, and
/// until then it may still write into this memory, from the queue thread's task work
/// or after the thread is gone. A hand-over and `del` (which first lets the device go
/// quiet, `Device::release`) leave the fetch commands armed, with requests arriving.
/// Freed at that point, the memory is reused by the allocator and overwritten: the
/// batch fetch buffers were, and glibc aborted the daemon ("corrupted double-linked
/// list"), first as it exited after a hand-over, later after a `del` under load (the
/// thread had exited and been joined; a canary in the freed buffer showed the tags).
/// So this memory leaves the thread with its result and waits in [`super::Retired`]
/// until the kernel has released the device's char device.
pub(crate) struct KernelShared {
    bufs: Option<uapi::BufferArena>,
    cmds: Commands,
    wake_buf: Box<u64>,
    /// The target may still use the request buffers: never freed.
    pub(super) leak: bool,
}

impl KernelShared {
    /// The memory, as (address, length) regions.
    pub(super) fn regions(&self) -> Vec<(*mut u8, usize)> {
        let mut r = self.cmds.regions();
        r.extend(self.bufs.as_ref().map(uapi::BufferArena::region));
        r.push((std::ptr::from_ref(&*self.wake_buf).cast_mut().cast(), 8));
        r
    }
}

impl Queue {
    /// Takes the queue down on its own thread and returns the memory that must outlive
    /// the thread ([`KernelShared`]). Every path out of a queue that got its ring goes
    /// through here.
    pub(super) fn close(mut self) -> KernelShared {
        let (dev, q) = (self.spec.dev_id, self.spec.qid);
        self.failures.end();
        self.cmds.withdraw(&mut self.ring);
        let submitter = self.ring.submitter();
        // The target's own SQEs still armed (a socket receive, an eventfd read) point
        // into its memory, which is dropped on this thread below: cancel them and wait.
        // ublk's commands are not cancelled this way; they are what `KernelShared` is for.
        let timeout = types::Timespec::new().sec(1);
        let mut handler_in_use = false;
        match submitter.register_sync_cancel(Some(timeout), types::CancelBuilder::any()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                log::error!(
                    "dev {dev} queue {q}: requests of the target still in the ring 1 s \
                     after cancelling them; its handler and the request buffers are \
                     kept (their memory and descriptors are not released) so that they \
                     cannot complete into freed memory"
                );
                handler_in_use = true;
            }
            // Kernels before 6.0 cannot cancel this way.
            Err(e) => log::debug!("dev {dev} queue {q}: cancelling the ring's requests: {e}"),
        }
        // Closing a ring releases its registered files and buffers later, from a kernel
        // worker. Unregistering them here releases them now, on this thread, so that
        // once `del` returns the backing file is closed (its file system can be
        // unmounted).
        if let Err(e) = submitter.unregister_files() {
            log::debug!("dev {dev} queue {q}: unregister files: {e}");
        }
        // A copy-mode ring without a staging buffer has no table: nothing to undo.
        let _ = submitter.unregister_buffers();
        let Queue {
            ring,
            handler,
            bufs,
            cmds,
            wake_buf,
            ..
        } = self;
        drop(ring);
        let mut handler = handler;
        // A library may still hold requests, and pointers into their buffers, outside
        // the ring (the target logs it): the handler and the buffers are leaked.
        let in_use = handler_in_use || !handler.settle();
        if in_use {
            std::mem::forget(handler);
        } else {
            drop(handler);
        }
        KernelShared {
            bufs,
            cmds,
            wake_buf,
            leak: in_use,
        }
    }
}

/// Registers the ring's buffer table: in fixed mode the daemon's request buffers at
/// their tags, in the zero-copy modes an empty slot per tag for the requests' pages;
/// and the target's `staging` buffer, if any, at index `depth`.
fn register_buffers(
    ring: &IoUring,
    buffer: BufferMode,
    bufs: Option<&uapi::BufferArena>,
    depth: u32,
    staging: Option<libc::iovec>,
) -> io::Result<()> {
    let submitter = ring.submitter();
    match (buffer, bufs) {
        (BufferMode::Fixed, Some(arena)) => {
            let mut iovecs = arena.iovecs();
            iovecs.extend(staging);
            // SAFETY: the iovecs describe the arena and the target's staging buffer,
            // which the queue keeps until after the ring's registrations are gone.
            return unsafe { submitter.register_buffers(&iovecs) };
        }
        (BufferMode::Copy, _) if staging.is_none() => return Ok(()),
        _ => submitter.register_buffers_sparse(depth + 1)?,
    }
    if let Some(iov) = staging {
        // SAFETY: as above: the staging buffer outlives the registration.
        unsafe { submitter.register_buffers_update(depth, &[iov], None) }?;
    }
    Ok(())
}

/// Sets O_NONBLOCK on `fd`'s open file.
fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
