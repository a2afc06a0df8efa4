//! What the running kernel offers, and the glue to libublk's control commands.

use anyhow::{bail, Context, Result};
use io_uring::{squeue, IoUring};
use libublk::ctrl::UblkCtrl;
use libublk::UblkError;
use std::io;
use std::path::Path;

pub const CONTROL_DEVICE: &str = "/dev/ublk-control";

/// Facts about the kernel, probed once at daemon start.
#[derive(Debug, Clone, Copy)]
pub struct KernelInfo {
    /// UBLK_F_* bits of the driver (UBLK_U_CMD_GET_FEATURES).
    pub features: u64,
    /// Most hardware queues a device may have here (the driver's limit is the number of
    /// possible CPUs).
    pub max_queues: u32,
}

impl KernelInfo {
    pub fn probe() -> Result<Self> {
        if !Path::new(CONTROL_DEVICE).exists() {
            bail!(
                "{CONTROL_DEVICE} does not exist: the ublk driver is not loaded \
                 (run 'modprobe ublk_drv'; ublk needs Linux 6.0 or later, 6.5+ for this daemon)"
            );
        }
        ensure_ctrl_ring()?;
        let features = UblkCtrl::get_features().with_context(|| {
            format!(
                "cannot read the ublk driver's features through {CONTROL_DEVICE} (are you root?)"
            )
        })?;
        if features & u64::from(libublk::sys::UBLK_F_CMD_IOCTL_ENCODE) == 0 {
            bail!("the ublk driver lacks UBLK_F_CMD_IOCTL_ENCODE: ublkd needs Linux 6.5 or later");
        }
        let possible = std::fs::read_to_string("/sys/devices/system/cpu/possible")
            .context("cannot read /sys/devices/system/cpu/possible")?;
        let max_queues = count_cpus(&possible)
            .with_context(|| format!("cannot parse the possible CPU list '{}'", possible.trim()))?;
        Ok(KernelInfo {
            features,
            max_queues,
        })
    }
}

/// Counts the CPUs in a kernel CPU list such as `0-3,8,10-11`.
pub fn count_cpus(list: &str) -> Option<u32> {
    let mut n = 0u32;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                n += b.checked_sub(a)? + 1;
            }
            None => {
                part.parse::<u32>().ok()?;
                n += 1;
            }
        }
    }
    (n > 0).then_some(n)
}

/// libublk sends control commands on a per-thread ring that must exist before any
/// `UblkCtrl` method runs on that thread; connection threads call this first.
pub fn ensure_ctrl_ring() -> Result<()> {
    libublk::ublk_init_ctrl_task_ring(|ring| {
        if ring.is_none() {
            *ring = Some(IoUring::<squeue::Entry128>::builder().build(16)?);
        }
        Ok(())
    })
    .map_err(|e| anyhow::anyhow!("cannot create the control io_uring: {}", describe(&e)))
}

/// A libublk error in words, with the errno's meaning where there is one.
pub fn describe(e: &UblkError) -> String {
    let errno = |n: i32| io::Error::from_raw_os_error(n.abs()).to_string();
    match e {
        UblkError::OtherError(n) | UblkError::UringIOError(n) => errno(*n),
        UblkError::IOError(e) => e.to_string(),
        other => other.to_string(),
    }
}

/// The errno of a failed control command, when it has one.
pub fn errno(e: &UblkError) -> Option<i32> {
    match e {
        UblkError::OtherError(n) | UblkError::UringIOError(n) => Some(n.abs()),
        UblkError::IOError(e) => e.raw_os_error(),
        _ => None,
    }
}

/// The driver's device state in words.
pub fn state_name(state: u16) -> &'static str {
    match u32::from(state) {
        libublk::sys::UBLK_S_DEV_DEAD => "dead",
        libublk::sys::UBLK_S_DEV_LIVE => "live",
        libublk::sys::UBLK_S_DEV_QUIESCED => "quiesced",
        libublk::sys::UBLK_S_DEV_FAIL_IO => "fail_io",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpus("0\n"), Some(1));
        assert_eq!(count_cpus("0-1\n"), Some(2));
        assert_eq!(count_cpus("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpus(""), None);
        assert_eq!(count_cpus("3-1"), None);
        assert_eq!(count_cpus("x"), None);
    }

    #[test]
    fn errors_name_the_errno() {
        assert_eq!(
            describe(&UblkError::OtherError(-libc::EINVAL)),
            "Invalid argument (os error 22)"
        );
        assert_eq!(state_name(1), "live");
        assert_eq!(state_name(9), "unknown");
    }
}
