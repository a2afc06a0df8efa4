//! Life under systemd: readiness and watchdog notifications, and telling a stop from a
//! restart. Outside systemd every function here does nothing (or says "stop").

use std::process::Command;
use std::time::Duration;

/// Sends one notification to the service manager; a no-op outside systemd.
pub fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        log::warn!("cannot notify systemd: {e}");
    }
}

/// Asks systemd for `by` more time to start (EXTEND_TIMEOUT_USEC), while the restore
/// at start is still working; a no-op outside systemd or once ready.
pub fn extend_start_timeout(by: Duration) {
    let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
    notify(&[sd_notify::NotifyState::ExtendTimeoutUsec(usec)]);
}

/// How often to send WATCHDOG=1: half the unit's WatchdogSec, or None without one.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2))
}

/// Whether systemd is stopping this service as part of a restart (`systemctl
/// restart`, `try-restart`, `reload-or-restart`): then the devices are handed over to
/// the next process instead of being removed. The stop signal is the same for a stop
/// and a restart, so the job systemd is running for the unit tells them apart.
pub fn stopping_for_restart() -> bool {
    let Some(unit) = own_unit() else {
        return false;
    };
    let out = match Command::new("systemctl")
        .args([
            "list-jobs",
            "--no-legend",
            "--plain",
            "--no-pager",
            "--full",
        ])
        .arg(&unit)
        .output()
    {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            log::warn!(
                "systemctl list-jobs failed ({}): {}; treating the stop as a stop",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return false;
        }
        Err(e) => {
            log::warn!("cannot run systemctl: {e}; treating the stop as a stop");
            return false;
        }
    };
    let jobs = String::from_utf8_lossy(&out.stdout);
    let job = job_type(&jobs, &unit);
    log::info!("systemd job for {unit}: {}", job.unwrap_or("none"));
    job.is_some_and(|t| t.contains("restart"))
}

/// The unit this process runs in, from its cgroup path (`0::/system.slice/ublkd.service`).
fn own_unit() -> Option<String> {
    std::env::var_os("INVOCATION_ID")?;
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    unit_of_cgroup(&cgroup)
}

fn unit_of_cgroup(cgroup: &str) -> Option<String> {
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    path.split('/')
        .rev()
        .find(|c| c.ends_with(".service"))
        .map(str::to_string)
}

/// The type of `unit`'s job in `systemctl list-jobs --plain` output
/// ("JOB UNIT TYPE STATE" lines).
fn job_type<'a>(jobs: &'a str, unit: &str) -> Option<&'a str> {
    jobs.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() >= 4 && f[1] == unit).then_some(f[2])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_from_cgroup() {
        assert_eq!(
            unit_of_cgroup("0::/system.slice/ublkd.service\n").as_deref(),
            Some("ublkd.service")
        );
        assert_eq!(
            unit_of_cgroup("0::/system.slice/ublkd.service/queues\n").as_deref(),
            Some("ublkd.service")
        );
        assert_eq!(unit_of_cgroup("0::/user.slice/session-1.scope\n"), None);
        assert_eq!(unit_of_cgroup("1:name=systemd:/x\n"), None);
    }

    #[test]
    fn job_type_of_the_unit() {
        let out = "1234 ublkd.service restart running\n1240 fio.service start waiting\n";
        assert_eq!(job_type(out, "ublkd.service"), Some("restart"));
        assert_eq!(job_type(out, "fio.service"), Some("start"));
        assert_eq!(job_type(out, "other.service"), None);
        assert_eq!(job_type("", "ublkd.service"), None);
    }
}
