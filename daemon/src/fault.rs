//! Fault injection, for the tests that prove a crash at an awkward moment loses nothing.
//!
//! `ublkd --inject-fault SPEC` (hidden from `--help`; repeatable) arms one fault:
//!
//! - `crash:POINT`: the daemon aborts, as a `kill -9` would end it, when it reaches POINT:
//!   - `del-marked`: `del` has marked the record as being deleted, before STOP_DEV;
//!   - `recovering`: restore has started the kernel's user recovery of a device, before
//!     its queues run.
//! - `queue-error:N`: a queue thread fails as on an io_uring error once it has completed
//!   N requests (see `queue::spawn` for what the daemon then does).
//! - `poison-retired`: the memory ended queues' commands pointed into is filled with a
//!   pattern as each queue thread ends, and checked 2 s after the kernel has let go of
//!   it, then freed; a byte the kernel wrote in between is logged as an error
//!   (`queue::Retired`).
//!
//! Unarmed, each check is one load of an initialised `OnceLock`.

use anyhow::{bail, Result};
use std::sync::OnceLock;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Faults {
    crash_points: Vec<String>,
    queue_error_after: Option<u64>,
    poison_retired: bool,
}

const CRASH_POINTS: [&str; 2] = ["del-marked", "recovering"];

static FAULTS: OnceLock<Faults> = OnceLock::new();

/// Parses the `--inject-fault` values.
pub fn parse(specs: &[String]) -> Result<Faults> {
    let mut faults = Faults::default();
    for spec in specs {
        match spec.split_once(':') {
            Some(("crash", point)) if CRASH_POINTS.contains(&point) => {
                faults.crash_points.push(point.to_string());
            }
            Some(("queue-error", n)) if n.parse::<u64>().is_ok() => {
                faults.queue_error_after = n.parse().ok();
            }
            None if spec == "poison-retired" => faults.poison_retired = true,
            _ => bail!(
                "--inject-fault: unknown fault '{spec}' (crash:{}, queue-error:N, or poison-retired)",
                CRASH_POINTS.join("|crash:")
            ),
        }
    }
    Ok(faults)
}

/// Arms the faults; the first call wins.
pub fn arm(faults: Faults) {
    if faults != Faults::default() {
        log::warn!("fault injection armed: {faults:?}");
    }
    let _ = FAULTS.set(faults);
}

fn armed() -> &'static Faults {
    FAULTS.get_or_init(Faults::default)
}

/// Aborts the process if a crash at `point` is armed.
pub fn crash_point(point: &str) {
    if armed().crash_points.iter().any(|p| p == point) {
        log::error!("fault injection: crashing at {point}");
        std::process::abort();
    }
}

/// After how many completed requests a queue is to fail, if armed.
pub fn queue_error_after() -> Option<u64> {
    armed().queue_error_after
}

/// Whether retired queue memory is to be poisoned and watched (`queue::Retired`).
pub fn poison_retired() -> bool {
    armed().poison_retired
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_or_fail_with_the_choices() {
        let f = parse(&["crash:del-marked".into(), "queue-error:100".into()]).unwrap();
        assert_eq!(f.crash_points, vec!["del-marked".to_string()]);
        assert_eq!(f.queue_error_after, Some(100));
        assert_eq!(parse(&[]).unwrap(), Faults::default());
        assert!(parse(&["poison-retired".into()]).unwrap().poison_retired);
        for bad in ["crash:nowhere", "queue-error:x", "boom", ""] {
            let e = parse(&[bad.into()]).unwrap_err().to_string();
            assert!(e.contains("crash:del-marked|crash:recovering"), "{e}");
        }
    }
}
