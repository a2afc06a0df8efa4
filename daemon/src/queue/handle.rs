//! The daemon's side of a queue thread: starting it (`spawn`, pinned to its CPUs), asking
//! it to stop, detach or log its state, and joining it.

use super::retired::Retired;
use super::*;

/// Asks every queue thread to log its state (SIGUSR1; the VM tests' hang watchdog sends
/// it): requests in the target, tags in flight, the command path's counters.
pub fn request_dump() {
    DUMP_GENERATION.fetch_add(1, Ordering::AcqRel);
    let wakes = QUEUE_WAKES.lock().unwrap_or_else(|e| e.into_inner());
    for wake in wakes.iter().filter_map(std::sync::Weak::upgrade) {
        wake_fd(&wake);
    }
}

pub(super) static DUMP_GENERATION: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);
/// The wake-up eventfds of the queues, for [`request_dump`].
static QUEUE_WAKES: std::sync::Mutex<Vec<std::sync::Weak<OwnedFd>>> =
    std::sync::Mutex::new(Vec::new());

pub(super) fn wake_fd(fd: &OwnedFd) -> bool {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writing 8 bytes from a live buffer to an eventfd we own.
    let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    n == 8
}

/// The daemon's side of a running queue thread.
pub struct QueueHandle {
    pub counters: Arc<QueueCounters>,
    stop: Arc<AtomicBool>,
    detach: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<Option<setup::KernelShared>>>,
    /// Keeps the thread's CPU counted as used while the queue runs.
    _placement: Placement,
}

impl QueueHandle {
    /// Asks the queue to finish: it exits once no request is left in its target.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake();
    }

    /// Asks the queue to hand its device over to a later ublkd: it stops taking new
    /// requests (the driver keeps them and gives them to the next server, with
    /// UBLK_F_USER_RECOVERY_REISSUE), completes what its target has in flight, and
    /// exits.
    pub fn request_detach(&self) {
        self.detach.store(true, Ordering::Release);
        self.request_stop();
    }

    /// Whether the queue thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    fn wake(&self) {
        if !wake_fd(&self.wake) {
            log::warn!("queue wake-up failed: {}", io::Error::last_os_error());
        }
    }

    /// Waits for the queue thread to end, and keeps the memory its ring's commands
    /// pointed into in `retired` (see [`Retired`]).
    pub fn join(&mut self, retired: &mut Retired) {
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(shared) => shared.into_iter().for_each(|s| retired.keep(s)),
                Err(_) => log::error!("a queue thread panicked"),
            }
        }
    }
}

impl Drop for QueueHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.request_stop();
            // Nobody here can tell when the kernel is done with the memory: leaked.
            self.join(&mut Retired::default());
        }
    }
}

/// Starts the thread of one queue on the CPUs of `placement`. The thread sets itself up,
/// hands every tag to the driver (FETCH_REQ, or PREP_IO_CMDS in batch mode), and then
/// reports on `ready` (its thread id, or why it failed) before serving.
pub fn spawn(
    spec: QueueSpec,
    target: Arc<dyn Target>,
    placement: Placement,
    ready: mpsc::Sender<Result<i32, String>>,
) -> io::Result<QueueHandle> {
    let counters = Arc::new(QueueCounters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let detach = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(eventfd()?);
    {
        let mut wakes = QUEUE_WAKES.lock().unwrap_or_else(|e| e.into_inner());
        wakes.retain(|w| w.strong_count() > 0);
        wakes.push(Arc::downgrade(&wake));
    }
    let (c, s, d, w) = (counters.clone(), stop.clone(), detach.clone(), wake.clone());
    let name = format!("ublk{}q{}", spec.dev_id, spec.qid);
    let cpus = placement.cpus.clone();
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        c.set_tid(tid);
        let (dev, q) = (spec.dev_id, spec.qid);
        // Pinned before the ring exists, so its memory and the kernel's work for it start
        // out on the queue's CPU.
        match placement::pin_current_thread(&cpus) {
            Ok(()) => c.set_cpus(placement::cpu_list(&cpus)),
            Err(e) => log::warn!(
                "dev {dev} queue {q}: cannot pin the queue thread to CPUs {}: {e}; it runs unpinned",
                placement::cpu_list(&cpus)
            ),
        }
        if let Err(e) = ublkd_targets::io_flusher() {
            log::warn!("dev {dev} queue {q}: {e}");
        }
        let mut queue = match Queue::new(spec, target, c, s, d, w) {
            Ok(q) => q,
            Err(e) => {
                log::error!("dev {dev} queue {q}: {e}");
                let _ = ready.send(Err(e));
                return None;
            }
        };
        if let Err(e) = queue.fetch_all() {
            let e = format!("cannot hand the tags to the driver: {e}");
            log::error!("dev {dev} queue {q}: {e}");
            let _ = ready.send(Err(e));
            return Some(queue.close());
        }
        let _ = ready.send(Ok(tid));
        log::debug!("dev {dev} queue {q}: serving (tid {tid})");
        match queue.run() {
            Ok(()) => log::debug!("dev {dev} queue {q}: done"),
            // A queue that cannot go on would leave its device looking live while its IO
            // hangs, and the kernel does not let a live device be recovered. Ending the
            // process hands every device to the kernel's user recovery instead: it holds
            // their IO, and the next ublkd (systemd restarts it) recovers them and gets
            // the held requests reissued. Panics end the process the same way
            // (panic = "abort").
            Err(e) => {
                log::error!(
                    "dev {dev} queue {q}: stopped on ring error: {e}; aborting so that \
                     the devices are recovered by the next ublkd"
                );
                std::process::abort();
            }
        }
        // Kept by `join` until the kernel has ended the commands (see `Retired`).
        Some(queue.close())
    })?;
    Ok(QueueHandle {
        counters,
        stop,
        detach,
        wake,
        thread: Some(thread),
        _placement: placement,
    })
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory preconditions; a non-negative result is a new fd
    // that nothing else owns.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
