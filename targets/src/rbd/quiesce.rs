//! Quiescing the device when a snapshot of its image is taken (`--quiesce`, as rbd-nbd's).
//!
//! `rbd snap create` (or any librbd client taking a snapshot) notifies every client that
//! registered a quiesce watch (`rbd_quiesce_watch`) and waits for each to answer
//! (`rbd_quiesce_complete`) before it takes the snapshot; after it, it notifies them
//! again to unquiesce. ublkd answers from a thread of its own, `ublkNquiesce`: it freezes
//! the file systems mounted from the device (or runs the user's hook), flushes librbd's
//! cache, answers, and after the snapshot thaws them (or runs the hook again). A freeze
//! or hook that fails is answered with EIO, which fails the snapshot (unless `rbd snap
//! create --ignore-quiesce-error`), and nothing stays frozen.
//!
//! librbd's callbacks only flag the request and wake the thread: they run on librbd's
//! threads, which the freeze's own writes through the device need.

use super::image::Image;
use super::{sys, RbdError};
use crate::fsfreeze::Frozen;
use crate::QuiesceSpot;
use serde::{Deserialize, Serialize};
use std::ffi::c_void;
use std::io;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use ublkd_proto::RbdQuiesce;

/// How long a hook may run before it is killed and the snapshot fails.
const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// A registered quiesce watch and its thread; dropping it thaws what is frozen and
/// unregisters the watch.
pub struct QuiesceWatch {
    image: Arc<Image>,
    handle: u64,
    /// The callbacks' argument, freed in `drop` after the unwatch.
    shared: *const Shared,
    worker: Option<JoinHandle<()>>,
}

// SAFETY: `shared` points to a `Shared` (Send + Sync) that the watch frees once, in drop;
// librbd's handle is thread safe.
unsafe impl Send for QuiesceWatch {}

/// A device's quiesce counts (`ublkctl stats`), from its start.
#[derive(Debug, Default)]
pub struct QuiesceCounts {
    /// Snapshots this device was quiesced for.
    pub quiesced: AtomicU64,
    /// Quiesces that failed (and failed their snapshot).
    pub failed: AtomicU64,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    cond: Condvar,
}

#[derive(Default)]
struct State {
    /// librbd asked to quiesce and has not yet asked to unquiesce.
    asked: bool,
    /// The watch is being dropped.
    end: bool,
}

impl Shared {
    fn set(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
        self.cond.notify_all();
    }

    /// Waits until `until` holds or the watch ends; false when it ended.
    fn wait(&self, until: impl Fn(&State) -> bool) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while !until(&s) && !s.end {
            s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        !s.end
    }

    fn ended(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).end
    }
}

impl QuiesceWatch {
    /// Undoes what a daemon that ended during a snapshot left quiesced (its marker),
    /// then registers the watch for the device of `spot` and starts its thread.
    pub fn new(
        image: &Arc<Image>,
        how: RbdQuiesce,
        spot: QuiesceSpot,
        counts: Arc<QuiesceCounts>,
    ) -> Result<QuiesceWatch, RbdError> {
        undo_leftover(&spot.marker, &spot.device);
        let shared = Arc::into_raw(Arc::new(Shared::default()));
        let mut handle = 0u64;
        // SAFETY: an open image, a valid out pointer, and an argument that stays valid
        // until after rbd_quiesce_unwatch (`drop`), or is freed below if librbd refuses.
        let r = unsafe {
            sys::rbd_quiesce_watch(
                image.raw(),
                quiesce,
                unquiesce,
                shared.cast_mut().cast(),
                &mut handle,
            )
        };
        if r < 0 {
            // SAFETY: librbd did not take `shared`.
            drop(unsafe { Arc::from_raw(shared) });
            return Err(RbdError::Watch {
                spec: image.spec().to_string(),
                source: io::Error::from_raw_os_error(-r),
            });
        }
        let mut watch = QuiesceWatch {
            image: image.clone(),
            handle,
            shared,
            worker: None,
        };
        // SAFETY: `shared` lives until `drop`, which joins the thread first.
        let arc = unsafe {
            Arc::increment_strong_count(shared);
            Arc::from_raw(shared)
        };
        let image = image.clone();
        let worker = std::thread::Builder::new()
            .name(format!("ublk{}quiesce", spot.dev_id))
            .spawn(move || serve(&image, handle, &how, &spot, &arc, &counts))
            .map_err(|e| RbdError::Watch {
                spec: watch.image.spec().to_string(),
                source: e,
            })?;
        watch.worker = Some(worker);
        Ok(watch)
    }
}

impl Drop for QuiesceWatch {
    fn drop(&mut self) {
        // SAFETY: `shared` is live until the end of this function.
        let shared = unsafe { &*self.shared };
        shared.set(|s| s.end = true);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        // SAFETY: the image is open (held by `self.image`) and `handle` is this watch's.
        let r = unsafe { sys::rbd_quiesce_unwatch(self.image.raw(), self.handle) };
        if r < 0 {
            log::warn!(
                "rbd {}: unregistering the quiesce watch failed: errno {}",
                self.image.spec(),
                -r
            );
        }
        // SAFETY: the unwatch has returned, so no callback runs now or later with this
        // argument; the reference `new` leaked is given back once, here.
        drop(unsafe { Arc::from_raw(self.shared) });
    }
}

/// librbd's quiesce callback, on one of librbd's threads.
extern "C" fn quiesce(arg: *mut c_void) {
    // SAFETY: `arg` is the `Shared` of a registered watch, freed only after the unwatch,
    // which waits for this call to return.
    let shared = unsafe { &*arg.cast::<Shared>() };
    shared.set(|s| s.asked = true);
}

/// librbd's unquiesce callback, as [`quiesce`].
extern "C" fn unquiesce(arg: *mut c_void) {
    // SAFETY: as in `quiesce`.
    let shared = unsafe { &*arg.cast::<Shared>() };
    shared.set(|s| s.asked = false);
}

/// What a marker file says was quiesced.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Marker {
    /// These file systems were (being) frozen.
    Frozen(Vec<String>),
    /// This hook ran with `quiesce`.
    Hook(String),
}

fn mark(marker: &Path, what: &Marker) {
    let write = || -> io::Result<()> {
        if let Some(dir) = marker.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(marker, serde_json::to_vec(what).map_err(io::Error::other)?)
    };
    if let Err(e) = write() {
        log::warn!(
            "cannot write {}: {e}; should ublkd end before the snapshot is taken, undo the quiesce by hand",
            marker.display()
        );
    }
}

fn unmark(marker: &Path) {
    match std::fs::remove_file(marker) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            log::warn!("cannot remove {}: {e}", marker.display())
        }
        _ => {}
    }
}

/// Undoes what the marker says a daemon that ended during a snapshot left quiesced: the
/// kernel keeps a file system frozen after the process that froze it is gone. Thaws the
/// file systems it lists (those no longer frozen are left alone) or runs its hook with
/// `unquiesce`, then removes it.
pub(super) fn undo_leftover(marker: &Path, device: &str) {
    let Ok(text) = std::fs::read(marker) else {
        return;
    };
    match serde_json::from_slice::<Marker>(&text) {
        Ok(Marker::Frozen(points)) => {
            for p in points {
                match crate::fsfreeze::thaw(&p) {
                    Ok(true) => log::warn!(
                        "{device}: thawed the file system on {p}, which a ublkd that ended during a snapshot left frozen"
                    ),
                    Ok(false) => {}
                    Err(e) => log::error!(
                        "{device}: cannot thaw the file system on {p} that a ublkd that ended during a snapshot may have left frozen: {e}; run 'fsfreeze -u {p}'"
                    ),
                }
            }
        }
        Ok(Marker::Hook(hook)) => {
            log::warn!("{device}: a ublkd ended during a snapshot: running '{hook} {device} unquiesce'");
            let shared = Shared::default();
            if let Err(e) = run_hook(&hook, device, "unquiesce", &shared) {
                log::error!("{device}: {e}");
            }
        }
        Err(e) => log::error!(
            "{device}: {} cannot be read ({e}); if a file system of the device is frozen, run 'fsfreeze -u MOUNTPOINT'",
            marker.display()
        ),
    }
    unmark(marker);
}

/// The watch's thread: one quiesce and unquiesce per snapshot, until the watch ends.
fn serve(
    image: &Image,
    handle: u64,
    how: &RbdQuiesce,
    spot: &QuiesceSpot,
    shared: &Shared,
    counts: &QuiesceCounts,
) {
    let device = spot.device.as_str();
    while shared.wait(|s| s.asked) {
        // Noted before anything is quiesced, so a crash at any point leaves a marker.
        let quiesced = match how {
            RbdQuiesce::Freeze => Frozen::mounts_of(device).and_then(|points| {
                mark(&spot.marker, &Marker::Frozen(points.clone()));
                Frozen::freeze(&points).map(Some)
            }),
            RbdQuiesce::Hook(hook) => {
                mark(&spot.marker, &Marker::Hook(hook.clone()));
                run_hook(hook, device, "quiesce", shared).map(|()| None)
            }
        }
        .and_then(|frozen| {
            image
                .flush_for_snapshot()
                .map_err(|e| format!("cannot flush librbd's cache: {e}"))?;
            Ok(frozen)
        });
        let r = match &quiesced {
            Ok(_) => {
                counts.quiesced.fetch_add(1, Ordering::Relaxed);
                0
            }
            Err(e) => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                log::error!(
                    "{device}: cannot quiesce for a snapshot of rbd image {}: {e}; the snapshot fails",
                    image.spec()
                );
                -libc::EIO
            }
        };
        // SAFETY: an open image and this watch's handle.
        unsafe { sys::rbd_quiesce_complete(image.raw(), handle, r) };
        let frozen = match quiesced {
            Ok(frozen) => frozen,
            Err(_) => {
                // A freeze that failed thawed what it froze; a hook that failed is
                // told to undo what it did, as after a snapshot.
                if let RbdQuiesce::Hook(hook) = how {
                    if let Err(e) = run_hook(hook, device, "unquiesce", shared) {
                        log::error!("{device}: {e}");
                    }
                }
                unmark(&spot.marker);
                shared.set(|s| s.asked = false);
                continue;
            }
        };
        if let Some(f) = &frozen {
            log::info!(
                "{device}: quiesced for a snapshot of rbd image {} ({} frozen)",
                image.spec(),
                f.mount_points().len()
            );
        }
        // Thawed when librbd says the snapshot is taken, or when the watch ends.
        shared.wait(|s| !s.asked);
        match (how, frozen) {
            (_, Some(f)) => f.thaw(),
            (RbdQuiesce::Hook(hook), None) => {
                if let Err(e) = run_hook(hook, device, "unquiesce", shared) {
                    log::error!("{device}: {e}");
                }
            }
            (RbdQuiesce::Freeze, None) => {}
        }
        unmark(&spot.marker);
    }
}

/// Refuses a relative hook path. A hook that is not (or no longer) an executable file
/// is only warned about: it fails snapshots, not the device, which must come back after
/// a restart whatever became of the hook.
pub(super) fn check_hook(hook: &str) -> Result<(), RbdError> {
    use std::os::unix::fs::PermissionsExt;
    if !hook.starts_with('/') {
        return Err(RbdError::QuiesceHookPath(hook.to_string()));
    }
    match std::fs::metadata(hook) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
        Ok(_) => log::warn!("quiesce hook {hook} is not an executable file: snapshots of the image fail until it is"),
        Err(e) => log::warn!("quiesce hook {hook}: {e}: snapshots of the image fail until it is there"),
    }
    Ok(())
}

/// Runs `hook DEVICE COMMAND` to its end, within [`HOOK_TIMEOUT`] (killed after, or
/// when the watch ends while it runs a quiesce).
fn run_hook(hook: &str, device: &str, command: &str, shared: &Shared) -> Result<(), String> {
    let mut child = Command::new(hook)
        .args([device, command])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run the quiesce hook {hook}: {e}"))?;
    // Read as it comes, so that a talkative hook never blocks on a full pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(mut e) = child.stderr.take() {
        std::thread::spawn(move || {
            let mut err = String::new();
            let _ = io::Read::read_to_string(&mut e, &mut err);
            let _ = tx.send(err);
        });
    }
    let deadline = Instant::now() + HOOK_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                kill(&mut child);
                return Err(format!(
                    "the quiesce hook '{hook} {device} {command}' did not end within {} s and was killed",
                    HOOK_TIMEOUT.as_secs()
                ));
            }
            Ok(None) if command == "quiesce" && shared.ended() => {
                kill(&mut child);
                return Err(format!(
                    "the device went away while '{hook} {device} {command}' ran"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("cannot wait for the quiesce hook {hook}: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    // (A process the hook left running may hold the pipe open: not waited for.)
    let err = rx.recv_timeout(Duration::from_secs(1)).unwrap_or_default();
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    Err(format!(
        "the quiesce hook '{hook} {device} {command}' failed ({status}){}{last}",
        if last.is_empty() { "" } else { ": " }
    ))
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}
