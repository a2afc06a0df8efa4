//! Network devices come back in the background at start: their servers may answer
//! only once the network is up (or later), and waiting for them would hold up the
//! local devices, READY=1 and systemd's start timeout. Each waits as `connecting`,
//! with the last error, and is tried again with a growing pause (1 s doubling to
//! 30 s) until its server answers, the device is deleted, or ublkd stops.

use super::{Daemon, Entry};
use crate::device::Device;
use crate::state::Record;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ublkd_proto::TargetSpec;

const FIRST_PAUSE: Duration = Duration::from_secs(1);
const LONGEST_PAUSE: Duration = Duration::from_secs(30);

/// Whether the device's backend is reached over the network (its restore waits for a
/// server, not for a local file).
pub(super) fn is_network(record: &Record) -> bool {
    matches!(
        record.add.target,
        TargetSpec::Nbd { .. } | TargetSpec::Rbd { .. }
    )
}

impl Daemon {
    /// Lists `record`'s device as connecting and starts its retry thread.
    pub(super) fn connect_in_background(self: &Arc<Self>, record: Record) {
        let id = record.id;
        self.devices().insert(
            id,
            Entry::Connecting {
                record,
                error: "not tried yet".into(),
            },
        );
        let daemon = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("ublkd-connect{id}"))
            .spawn(move || daemon.keep_connecting(id));
        if let Err(e) = spawned {
            let error = format!("cannot start its connect thread: {e}");
            log::error!("dev {id}: {error}");
            let record = self.devices().get(&id).and_then(|e| e.record().cloned());
            self.fail(id, record, error);
        }
    }

    fn keep_connecting(&self, id: u32) {
        let mut pause = Duration::ZERO;
        let mut attempts = 0u32;
        loop {
            if !self.pause_while_connecting(id, pause) {
                return;
            }
            // Counted as an add, so a shutdown waits for the attempt.
            let (count, cv) = &self.adding;
            *count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            let record = {
                let mut devices = self.devices();
                let record = match devices.get(&id) {
                    Some(Entry::Connecting { record, .. })
                        if !self.shutting_down.load(Ordering::Acquire) =>
                    {
                        Some(record.clone())
                    }
                    _ => None,
                };
                if let Some(r) = &record {
                    // While the attempt runs, `del` and `recover` wait for it.
                    devices.insert(id, Entry::Recovering(r.clone()));
                }
                record
            };
            let result = record
                .as_ref()
                .map(|r| Device::restore(r, &self.kernel, &self.state));
            // The device is entered before the attempt stops counting as an add, so a
            // shutdown that waited for it finds it in the table.
            let done = |count: &std::sync::Mutex<usize>| {
                *count.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
                cv.notify_all();
            };
            let (Some(record), Some(result)) = (record, result) else {
                done(count);
                return;
            };
            attempts += 1;
            match result {
                Ok(dev) => {
                    log::info!("dev {id}: its server answered; served again (attempt {attempts})");
                    self.insert_live(dev, None);
                    done(count);
                    return;
                }
                Err(e) => {
                    let error = format!("{e:#}");
                    // The first failure, then one in ten, so a long outage does not
                    // flood the journal.
                    if attempts == 1 || attempts.is_multiple_of(10) {
                        log::warn!(
                            "dev {id}: cannot reach its server yet (attempt {attempts}): {error}; \
                             trying again"
                        );
                    }
                    self.devices()
                        .insert(id, Entry::Connecting { record, error });
                    done(count);
                    pause = (pause * 2).clamp(FIRST_PAUSE, LONGEST_PAUSE);
                }
            }
        }
    }

    /// Sleeps `pause` in short steps; false when the device stopped connecting meanwhile
    /// (deleted) or ublkd is stopping.
    fn pause_while_connecting(&self, id: u32, pause: Duration) -> bool {
        let until = Instant::now() + pause;
        loop {
            if self.shutting_down.load(Ordering::Acquire)
                || !matches!(self.devices().get(&id), Some(Entry::Connecting { .. }))
            {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            std::thread::sleep((until - now).min(Duration::from_millis(200)));
        }
    }
}
