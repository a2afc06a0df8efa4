//! Human-readable and JSON output.

use anyhow::Result;
use std::fmt::Write;
use ublkd_proto::size::format_size;
use ublkd_proto::{DeviceDetail, DeviceInfo, FeatureReport, TargetSpec};

/// A clap error as one line: its message lines up to the usage block, joined, without
/// the `error: ` prefix (for a missing argument the name is on the second line).
pub fn one_line(text: &str) -> String {
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    // A line that introduces a list (ends in ':') runs on into it; other lines
    // (clap's "tip: ...") are separate sentences.
    let mut line = String::new();
    for part in parts {
        if !line.is_empty() {
            line.push_str(if line.ends_with(':') { " " } else { "; " });
        }
        line.push_str(part);
    }
    line.strip_prefix("error: ").unwrap_or(&line).to_string()
}

pub fn json<T: serde::Serialize>(value: &T) -> Result<String> {
    Ok(serde_json::to_string_pretty(value)? + "\n")
}

/// One row per device; a device that is not served gets its reason on a line below.
pub fn device_table(devs: &[DeviceInfo]) -> String {
    let mut out = format!(
        "{:<4} {:<10} {:<6} {:>8} {:>6} {:>6} {:<7} {:<9} {}\n",
        "ID", "NAME", "TARGET", "SIZE", "QUEUES", "DEPTH", "BUFFER", "STATE", "PATH"
    );
    for d in devs {
        let _ = writeln!(
            out,
            "{:<4} {:<10} {:<6} {:>8} {:>6} {:>6} {:<7} {:<9} {}",
            d.id,
            d.name.as_deref().unwrap_or("-"),
            d.target,
            format_size(d.size),
            d.queues,
            d.depth,
            d.buffer.name(),
            d.state,
            d.path
        );
        if let Some(e) = &d.error {
            let _ = writeln!(out, "     error: {e}");
        }
    }
    out
}

/// What a device was added with, for one that is not served (a served device's target
/// reports its own details).
fn spec_rows(spec: Option<&TargetSpec>) -> Vec<(&'static str, String)> {
    match spec {
        None => Vec::new(),
        Some(TargetSpec::Null { .. }) => Vec::new(),
        Some(TargetSpec::Loop {
            file,
            direct_io,
            read_only,
        }) => vec![
            ("file", file.clone()),
            ("direct io", format!("{direct_io:?}").to_lowercase()),
            ("read only", read_only.to_string()),
        ],
        Some(TargetSpec::Rbd {
            image,
            snap_id,
            conf,
            user,
            keyring,
            read_only,
            exclusive,
            encryption,
            quiesce,
            osd_timeout,
            options,
        }) => {
            let mut rows = vec![("image", image.clone())];
            if let Some(id) = snap_id {
                rows.push(("snapshot id", id.to_string()));
            }
            rows.extend([
                (
                    "conf",
                    conf.clone().unwrap_or_else(|| {
                        format!("{} if present", ublkd_proto::DEFAULT_CEPH_CONF)
                    }),
                ),
                ("user", user.clone().unwrap_or_else(|| "admin".into())),
            ]);
            if let Some(k) = keyring {
                rows.push(("keyring", k.clone()));
            }
            rows.push(("read only", read_only.to_string()));
            if *exclusive {
                rows.push(("exclusive", "true".into()));
            }
            if let Some(e) = encryption {
                rows.push(("encryption", e.to_string()));
            }
            if let Some(q) = quiesce {
                rows.push(("quiesce", q.to_string()));
            }
            rows.push(("osd op timeout", format!("{} s", osd_timeout.unwrap_or(60))));
            if !options.is_empty() {
                rows.push(("ceph options", ublkd_proto::ceph_option::list(options)));
            }
            rows
        }
        Some(TargetSpec::Nbd {
            uri,
            reconnect_timeout,
            request_timeout,
        }) => vec![
            ("uri", uri.clone()),
            (
                "reconnect",
                format!("{} s", reconnect_timeout.unwrap_or(DEFAULT_NBD_TIMEOUT)),
            ),
            (
                "req. timeout",
                format!("{} s", request_timeout.unwrap_or(DEFAULT_NBD_TIMEOUT)),
            ),
        ],
    }
}

/// The nbd target's reconnect and request timeouts when the record leaves them out.
const DEFAULT_NBD_TIMEOUT: u32 = 30;

/// `stats`: one line per device, its queues summed.
pub fn stats_table(devs: &[DeviceDetail]) -> String {
    let mut out = format!(
        "{:>4} {:<12} {:<8} {:>10} {:>12} {:>12} {:>7} {:>8}\n",
        "ID", "NAME", "STATE", "REQUESTS", "READ", "WRITTEN", "ERRORS", "INFLIGHT"
    );
    for d in devs {
        let sum = |f: fn(&ublkd_proto::QueueStats) -> u64| d.queue_stats.iter().map(f).sum::<u64>();
        let _ = writeln!(
            out,
            "{:>4} {:<12} {:<8} {:>10} {:>12} {:>12} {:>7} {:>8}",
            d.info.id,
            d.info.name.as_deref().unwrap_or("-"),
            d.info.state,
            sum(|q| q.requests),
            format_size(sum(|q| q.bytes_read)),
            format_size(sum(|q| q.bytes_written)),
            sum(|q| q.errors),
            sum(|q| q.inflight)
        );
    }
    out
}

pub fn device_detail(d: &DeviceDetail) -> String {
    let i = &d.info;
    let mut out = String::new();
    let mut row = |k: &str, v: String| {
        let _ = writeln!(out, "{k:<14} {v}");
    };
    row("id", i.id.to_string());
    if let Some(name) = &i.name {
        row("name", name.clone());
    }
    row("path", i.path.clone());
    row("char device", d.char_path.clone());
    row("target", i.target.clone());
    row(
        "size",
        format!("{} ({} bytes)", format_size(i.size), i.size),
    );
    row("block size", i.block_size.to_string());
    row("queues", i.queues.to_string());
    row("depth", i.depth.to_string());
    row("buffer", i.buffer.name().to_string());
    if let Some(c) = i.commands {
        row("commands", c.name().to_string());
    }
    row("affinity", i.affinity.name().to_string());
    match &d.kernel {
        Some(k) => {
            row("state", k.state.clone());
            row(
                "kernel flags",
                format!("{:#x} {}", k.flags, k.flag_names.join(" ")),
            );
            row("daemon pid", k.ublksrv_pid.to_string());
        }
        None => row("state", i.state.clone()),
    }
    if let Some(e) = &i.error {
        row("error", e.clone());
    }
    if d.target_details.is_empty() {
        for (k, v) in spec_rows(i.spec.as_ref()) {
            row(k, v);
        }
    }
    for (k, v) in &d.target_details {
        row(k, v.clone());
    }
    if d.kernel.is_none() && d.queue_stats.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "\n{:>5} {:>8} {:>5} {:>10} {:>9} {:>9} {:>7} {:>9} {:>12} {:>12} {:>6} {:>8}",
        "QUEUE",
        "TID",
        "CPUS",
        "REQUESTS",
        "READS",
        "WRITES",
        "FLUSHES",
        "DISCARDS",
        "READ",
        "WRITTEN",
        "ERRORS",
        "INFLIGHT"
    );
    for q in &d.queue_stats {
        let _ = writeln!(
            out,
            "{:>5} {:>8} {:>5} {:>10} {:>9} {:>9} {:>7} {:>9} {:>12} {:>12} {:>6} {:>8}",
            q.queue,
            q.tid,
            if q.cpus.is_empty() { "any" } else { &q.cpus },
            q.requests,
            q.reads,
            q.writes,
            q.flushes,
            q.discards + q.write_zeroes,
            q.bytes_read,
            q.bytes_written,
            q.errors,
            q.inflight
        );
    }
    out
}

pub fn features(f: &FeatureReport) -> String {
    let mut out = format!("features {:#x}\n", f.bits);
    for name in &f.names {
        let _ = writeln!(out, "  {name}");
    }
    if f.unknown_bits != 0 {
        let _ = writeln!(out, "  unknown bits {:#x}", f.unknown_bits);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_keeps_the_whole_message() {
        assert_eq!(
            one_line("error: unrecognized subcommand 'tape'\n\nUsage: ublkctl add <COMMAND>\n"),
            "unrecognized subcommand 'tape'"
        );
        assert_eq!(
            one_line(
                "error: the following required arguments were not provided:\n  --file <FILE>\n\n\
                 Usage: ublkctl add loop --file <FILE>\n\nFor more information, try '--help'.\n"
            ),
            "the following required arguments were not provided: --file <FILE>"
        );
        assert_eq!(
            one_line(
                "error: unexpected argument '--jsn' found\n\n  \
                 tip: a similar argument exists: '--json'\n\nUsage: ublkctl list --json\n"
            ),
            "unexpected argument '--jsn' found; tip: a similar argument exists: '--json'"
        );
    }

    #[test]
    fn table_has_a_row_per_device() {
        let d = DeviceInfo {
            id: 3,
            target: "null".into(),
            size: 1 << 30,
            block_size: 512,
            queues: 2,
            depth: 64,
            buffer: ublkd_proto::BufferMode::Copy,
            commands: None,
            affinity: ublkd_proto::QueueAffinity::Cpu,
            state: "live".into(),
            path: "/dev/ublkb3".into(),
            name: None,
            error: None,
            spec: None,
        };
        let failed = DeviceInfo {
            id: 4,
            name: Some("db".into()),
            state: "failed".into(),
            error: Some("cannot open /x: No such file or directory".into()),
            ..d.clone()
        };
        let t = device_table(&[d, failed]);
        assert_eq!(t.lines().count(), 4);
        assert!(t.lines().nth(1).unwrap().contains("/dev/ublkb3"));
        assert!(t.contains("1G"));
        assert!(t.lines().nth(2).unwrap().contains("db"));
        assert!(t.lines().nth(3).unwrap().contains("error: cannot open /x"));
    }

    #[test]
    fn detail_of_a_failed_device_shows_its_record_and_why() {
        let info = DeviceInfo {
            id: 5,
            target: "loop".into(),
            size: 0,
            block_size: 512,
            queues: 1,
            depth: 128,
            buffer: ublkd_proto::BufferMode::AutoZc,
            commands: None,
            affinity: ublkd_proto::QueueAffinity::Cpu,
            state: "failed".into(),
            path: "/dev/ublkb5".into(),
            name: Some("db".into()),
            error: Some("cannot open /srv/db.img: No such file or directory".into()),
            spec: Some(TargetSpec::Loop {
                file: "/srv/db.img".into(),
                direct_io: ublkd_proto::DirectIo::Auto,
                read_only: false,
            }),
        };
        let d = DeviceDetail {
            info,
            char_path: "/dev/ublkc5".into(),
            target_details: vec![],
            kernel: None,
            queue_stats: vec![],
            target_counters: vec![],
        };
        let text = device_detail(&d);
        for line in [
            "state          failed",
            "error          cannot open /srv/db.img",
            "file           /srv/db.img",
            "direct io      auto",
        ] {
            assert!(text.contains(line), "no '{line}' in:\n{text}");
        }
        assert!(!text.contains("QUEUE"), "{text}");
    }

    #[test]
    fn detail_names_the_command_mode() {
        let info = DeviceInfo {
            id: 0,
            target: "null".into(),
            size: 1 << 30,
            block_size: 512,
            queues: 1,
            depth: 64,
            buffer: ublkd_proto::BufferMode::AutoZc,
            commands: Some(ublkd_proto::CommandMode::Batch),
            affinity: ublkd_proto::QueueAffinity::Cpu,
            state: "live".into(),
            path: "/dev/ublkb0".into(),
            name: None,
            error: None,
            spec: None,
        };
        let d = DeviceDetail {
            info,
            char_path: "/dev/ublkc0".into(),
            target_details: vec![],
            kernel: Some(ublkd_proto::KernelDeviceInfo {
                state: "live".into(),
                flags: 1 << 15,
                flag_names: vec!["BATCH_IO".into()],
                ublksrv_pid: 1,
                max_io_buf_bytes: 524288,
                nr_hw_queues: 1,
                queue_depth: 64,
            }),
            queue_stats: vec![],
            target_counters: vec![],
        };
        let text = device_detail(&d);
        assert!(
            text.lines()
                .any(|l| l.starts_with("commands") && l.ends_with(" batch")),
            "{text}"
        );
        assert!(text.contains("BATCH_IO"), "{text}");
    }
}
