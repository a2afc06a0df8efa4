//! rublk, the peer ublk daemon the null and loop benchmarks measure beside ublkd.

use super::Settings;
use std::process::Command;
use ublkd_tests::run_ok;

/// rublk, the peer daemon (`/usr/local/bin/rublk`): its devices get fixed ids from
/// `RUBLK_FIRST_ID` on, clear of the ids ublkd assigns (from 0) in these runs.
const RUBLK: &str = "/usr/local/bin/rublk";
const RUBLK_FIRST_ID: u32 = 10;

/// Creates rublk devices of `target` (`null`, or `loop` with `extra` = `-f FILE`):
/// 1 queue, depth 128, auto-buf-reg zero copy (`-z`, rublk's fastest mode), pinned (its
/// default), and with `--rublk-multi-cpus` also one unpinned. Returns `(label, path)`.
pub(crate) fn rublk_add(target: &str, extra: &[&str], s: &Settings) -> Vec<(String, String)> {
    let mut kinds = vec![("rublk -z", false)];
    if s.rublk_multi {
        kinds.push(("rublk -z multi", true));
    }
    let mut devices = Vec::new();
    for (n, (label, multi)) in kinds.into_iter().enumerate() {
        let id = (RUBLK_FIRST_ID + n as u32).to_string();
        let mut args = vec![
            "add", target, "-n", &id, "-q", "1", "-d", "128", "-z", "--quiet",
        ];
        if multi {
            args.push("--multi-cpus-affinity");
        }
        args.extend_from_slice(extra);
        run_ok(RUBLK, &args);
        let path = format!("/dev/ublkb{id}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !std::path::Path::new(&path).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "rublk {}: {path} did not appear",
                args.join(" ")
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        devices.push((label.to_string(), path));
    }
    devices
}

/// Deletes the rublk devices `rublk_add` made.
pub(crate) fn rublk_del(devices: &[(String, String)]) {
    for (_, path) in devices {
        if let Some(id) = path.strip_prefix("/dev/ublkb") {
            let _ = Command::new(RUBLK).args(["del", "-n", id]).status();
        }
    }
}
