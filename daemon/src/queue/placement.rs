//! Where queue threads run.
//!
//! The kernel maps every CPU to one hardware queue of a device: a request submitted on a
//! CPU goes to that CPU's queue (UBLK_U_CMD_GET_QUEUE_AFFINITY reports the CPUs of a
//! queue). A queue thread that stays on one CPU of that set keeps its ring, its caches
//! and its wake-ups in one place; left to the scheduler it follows whoever woke it, and
//! then often shares a CPU with the very process submitting the IO (see the README's
//! Performance section for what that costs).
//!
//! With [`QueueAffinity::Cpu`] each queue thread is pinned to the CPU of its queue's set
//! that carries the fewest of this daemon's pinned queue threads, so the queues of
//! several devices spread over the CPUs instead of piling up on the first one. Only CPUs
//! the daemon itself may use (its affinity at start, e.g. systemd's `CPUAffinity=`) are
//! considered.

use std::io;
use std::sync::{Mutex, OnceLock};
use ublkd_proto::QueueAffinity;

/// Pinned queue threads per CPU, for the whole daemon.
fn load() -> &'static Mutex<Vec<u32>> {
    static LOAD: OnceLock<Mutex<Vec<u32>>> = OnceLock::new();
    LOAD.get_or_init(|| Mutex::new(Vec::new()))
}

/// The CPUs this daemon may run on, as it was started.
pub fn allowed_cpus() -> &'static [usize] {
    static ALLOWED: OnceLock<Vec<usize>> = OnceLock::new();
    ALLOWED.get_or_init(|| current_cpus().unwrap_or_default())
}

fn current_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t and its size is passed with it.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let max = 8 * std::mem::size_of_val(&set);
    // SAFETY: CPU_ISSET reads the set within its size (cpu < CPU_SETSIZE).
    Ok((0..max)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// The CPUs a queue thread runs on, and its share of the daemon-wide count.
#[derive(Debug, Default)]
pub struct Placement {
    /// Empty: not pinned.
    pub cpus: Vec<usize>,
    /// The CPU counted in [`load`] (affinity `cpu`), released on drop.
    claimed: Option<usize>,
}

impl Drop for Placement {
    fn drop(&mut self) {
        if let Some(cpu) = self.claimed {
            let mut load = load().lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = load.get_mut(cpu) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

/// The CPU of `usable` with the fewest pinned queue threads (the lowest on a tie).
fn least_loaded(load: &[u32], usable: &[usize]) -> Option<usize> {
    usable
        .iter()
        .copied()
        .min_by_key(|&c| (load.get(c).copied().unwrap_or(0), c))
}

/// Where a queue whose kernel CPU set is `queue_cpus` runs under `mode`, among the CPUs
/// in `allowed`.
pub fn place(mode: QueueAffinity, queue_cpus: &[usize], allowed: &[usize]) -> Placement {
    let usable: Vec<usize> = queue_cpus
        .iter()
        .copied()
        .filter(|c| allowed.contains(c))
        .collect();
    match mode {
        QueueAffinity::Off => Placement::default(),
        // A queue with none of its CPUs usable runs where the daemon may run.
        _ if usable.is_empty() => Placement::default(),
        QueueAffinity::Set => Placement {
            cpus: usable,
            claimed: None,
        },
        QueueAffinity::Cpu => {
            let mut load = load().lock().unwrap_or_else(|e| e.into_inner());
            let Some(cpu) = least_loaded(&load, &usable) else {
                return Placement::default();
            };
            if load.len() <= cpu {
                load.resize(cpu + 1, 0);
            }
            load[cpu] += 1;
            Placement {
                cpus: vec![cpu],
                claimed: Some(cpu),
            }
        }
    }
}

/// Restricts the calling thread to `cpus` (nothing to do when empty).
pub fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let max = 8 * std::mem::size_of_val(&set);
    for &c in cpus.iter().filter(|&&c| c < max) {
        // SAFETY: c < CPU_SETSIZE, checked above.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a live cpu_set_t and its size is passed with it.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `cpus` (sorted) as a kernel CPU list: `0-3,8`.
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        while i + 1 < cpus.len() && cpus[i + 1] == cpus[i] + 1 {
            i += 1;
        }
        out.push(if cpus[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", cpus[i])
        });
        i += 1;
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_read_like_the_kernels() {
        assert_eq!(cpu_list(&[]), "");
        assert_eq!(cpu_list(&[3]), "3");
        assert_eq!(cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
    }

    #[test]
    fn the_least_loaded_cpu_wins_and_ties_go_low() {
        assert_eq!(least_loaded(&[], &[2, 3]), Some(2));
        assert_eq!(least_loaded(&[0, 0, 2, 1], &[2, 3]), Some(3));
        assert_eq!(least_loaded(&[5, 5], &[]), None);
    }

    // One test owns the daemon-wide count, so no other test races with it.
    #[test]
    fn placements_follow_the_mode_and_spread_over_the_set() {
        let queue = [6, 7];
        let allowed = [0, 1, 2, 3, 4, 5, 6, 7];
        assert!(place(QueueAffinity::Off, &queue, &allowed).cpus.is_empty());
        assert_eq!(place(QueueAffinity::Set, &queue, &allowed).cpus, vec![6, 7]);
        // The daemon may not use the queue's CPUs: not pinned at all.
        assert!(place(QueueAffinity::Cpu, &queue, &[0, 1]).cpus.is_empty());
        assert_eq!(place(QueueAffinity::Set, &queue, &[7]).cpus, vec![7]);

        let a = place(QueueAffinity::Cpu, &queue, &allowed);
        let b = place(QueueAffinity::Cpu, &queue, &allowed);
        assert_eq!((a.cpus.clone(), b.cpus.clone()), (vec![6], vec![7]));
        let c = place(QueueAffinity::Cpu, &queue, &allowed);
        assert_eq!(c.cpus, vec![6]);
        drop(a);
        drop(c);
        // CPU 6 is free again, 7 still holds b.
        assert_eq!(place(QueueAffinity::Cpu, &queue, &allowed).cpus, vec![6]);
    }

    #[test]
    fn a_thread_can_be_pinned_to_a_cpu_it_may_use() {
        let cpus = current_cpus().unwrap();
        std::thread::spawn(move || {
            pin_current_thread(&cpus[..1]).unwrap();
            assert_eq!(current_cpus().unwrap(), cpus[..1].to_vec());
        })
        .join()
        .unwrap();
    }
}
