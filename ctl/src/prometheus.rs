//! `ublkctl stats --prometheus`: the devices' counters in the Prometheus text exposition
//! format (version 0.0.4), for node_exporter's textfile collector.

use std::fmt::Write;
use ublkd_proto::DeviceDetail;

/// One metric: its name, type, help, and how to read its value per device or queue.
struct Metric {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
}

fn header(out: &mut String, m: &Metric) {
    let _ = writeln!(out, "# HELP {} {}", m.name, m.help);
    let _ = writeln!(out, "# TYPE {} {}", m.name, m.kind);
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn device_labels(d: &DeviceDetail) -> String {
    let i = &d.info;
    format!(
        "id=\"{}\",name=\"{}\",target=\"{}\"",
        i.id,
        escape(i.name.as_deref().unwrap_or("")),
        escape(&i.target)
    )
}

/// Every device's and queue's counters, each metric's samples under one HELP/TYPE.
pub fn render(devices: &[DeviceDetail]) -> String {
    let mut out = String::new();
    let up = Metric {
        name: "ublkd_device_up",
        kind: "gauge",
        help: "1 while the device is served, 0 while it is not (failed, restoring).",
    };
    header(&mut out, &up);
    for d in devices {
        let served = d.kernel.is_some() || !d.queue_stats.is_empty();
        let _ = writeln!(
            out,
            "{}{{{},state=\"{}\"}} {}",
            up.name,
            device_labels(d),
            escape(&d.info.state),
            u8::from(served && d.info.error.is_none())
        );
    }
    let size = Metric {
        name: "ublkd_device_size_bytes",
        kind: "gauge",
        help: "The device's size in bytes.",
    };
    header(&mut out, &size);
    for d in devices {
        let _ = writeln!(out, "{}{{{}}} {}", size.name, device_labels(d), d.info.size);
    }
    type Read = fn(&ublkd_proto::QueueStats) -> u64;
    let per_queue: [(Metric, Read); 6] = [
        (
            Metric {
                name: "ublkd_queue_requests_total",
                kind: "counter",
                help: "Requests the queue completed.",
            },
            |q| q.requests,
        ),
        (
            Metric {
                name: "ublkd_queue_read_bytes_total",
                kind: "counter",
                help: "Bytes the queue read for the device.",
            },
            |q| q.bytes_read,
        ),
        (
            Metric {
                name: "ublkd_queue_written_bytes_total",
                kind: "counter",
                help: "Bytes the queue wrote for the device.",
            },
            |q| q.bytes_written,
        ),
        (
            Metric {
                name: "ublkd_queue_errors_total",
                kind: "counter",
                help: "Requests the queue completed with an error.",
            },
            |q| q.errors,
        ),
        (
            Metric {
                name: "ublkd_queue_inflight_requests",
                kind: "gauge",
                help: "Requests with the target and not yet completed.",
            },
            |q| q.inflight,
        ),
        (
            Metric {
                name: "ublkd_queue_flushes_total",
                kind: "counter",
                help: "Flush requests the queue completed.",
            },
            |q| q.flushes,
        ),
    ];
    for (m, read) in &per_queue {
        header(&mut out, m);
        for d in devices {
            for q in &d.queue_stats {
                let _ = writeln!(
                    out,
                    "{}{{{},queue=\"{}\"}} {}",
                    m.name,
                    device_labels(d),
                    q.queue,
                    read(q)
                );
            }
        }
    }
    // Per request type, as one metric with an `op` label.
    let ops = Metric {
        name: "ublkd_queue_requests_by_op_total",
        kind: "counter",
        help: "Requests the queue completed, by operation.",
    };
    header(&mut out, &ops);
    for d in devices {
        for q in &d.queue_stats {
            for (op, n) in [
                ("read", q.reads),
                ("write", q.writes),
                ("flush", q.flushes),
                ("discard", q.discards),
                ("write_zeroes", q.write_zeroes),
            ] {
                let _ = writeln!(
                    out,
                    "{}{{{},queue=\"{}\",op=\"{op}\"}} {n}",
                    ops.name,
                    device_labels(d),
                    q.queue
                );
            }
        }
    }
    // The targets' own counters: ublkd_<target>_<name>_total.
    let mut names: Vec<(String, String)> = devices
        .iter()
        .flat_map(|d| {
            d.target_counters
                .iter()
                .map(|(k, _)| (d.info.target.clone(), k.clone()))
        })
        .collect();
    names.sort();
    names.dedup();
    for (target, counter) in names {
        let name = format!("ublkd_{target}_{counter}_total");
        let _ = writeln!(out, "# HELP {name} The {target} target's {counter}.");
        let _ = writeln!(out, "# TYPE {name} counter");
        for d in devices.iter().filter(|d| d.info.target == target) {
            if let Some((_, v)) = d.target_counters.iter().find(|(k, _)| *k == counter) {
                let _ = writeln!(out, "{name}{{{}}} {v}", device_labels(d));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ublkd_proto::{BufferMode, DeviceInfo, QueueAffinity, QueueStats};

    fn device(id: u32, name: Option<&str>, target: &str, served: bool) -> DeviceDetail {
        DeviceDetail {
            info: DeviceInfo {
                id,
                target: target.into(),
                size: 1 << 20,
                block_size: 512,
                queues: 1,
                depth: 64,
                buffer: BufferMode::AutoZc,
                commands: None,
                affinity: QueueAffinity::Cpu,
                state: if served { "live" } else { "failed" }.into(),
                path: format!("/dev/ublkb{id}"),
                name: name.map(String::from),
                error: (!served).then(|| "cannot open \"x\"".into()),
                spec: None,
            },
            char_path: format!("/dev/ublkc{id}"),
            target_details: vec![],
            kernel: None,
            queue_stats: if served {
                vec![QueueStats {
                    queue: 0,
                    requests: 10,
                    reads: 6,
                    writes: 3,
                    flushes: 1,
                    bytes_read: 24576,
                    bytes_written: 12288,
                    inflight: 2,
                    ..Default::default()
                }]
            } else {
                vec![]
            },
            target_counters: if target == "nbd" {
                vec![("reconnects".into(), 3)]
            } else {
                vec![]
            },
        }
    }

    #[test]
    fn every_sample_has_its_help_and_type_and_the_counters_are_right() {
        let text = render(&[
            device(0, Some("db"), "nbd", true),
            device(4, None, "loop", false),
        ]);
        let expect = [
            "# TYPE ublkd_device_up gauge",
            "ublkd_device_up{id=\"0\",name=\"db\",target=\"nbd\",state=\"live\"} 1",
            "ublkd_device_up{id=\"4\",name=\"\",target=\"loop\",state=\"failed\"} 0",
            "ublkd_device_size_bytes{id=\"0\",name=\"db\",target=\"nbd\"} 1048576",
            "# TYPE ublkd_queue_requests_total counter",
            "ublkd_queue_requests_total{id=\"0\",name=\"db\",target=\"nbd\",queue=\"0\"} 10",
            "ublkd_queue_read_bytes_total{id=\"0\",name=\"db\",target=\"nbd\",queue=\"0\"} 24576",
            "ublkd_queue_inflight_requests{id=\"0\",name=\"db\",target=\"nbd\",queue=\"0\"} 2",
            "ublkd_queue_requests_by_op_total{id=\"0\",name=\"db\",target=\"nbd\",queue=\"0\",op=\"read\"} 6",
            "# TYPE ublkd_nbd_reconnects_total counter",
            "ublkd_nbd_reconnects_total{id=\"0\",name=\"db\",target=\"nbd\"} 3",
        ];
        for line in expect {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line} in:\n{text}"
            );
        }
        // Each metric's samples follow its one HELP and TYPE.
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(typed.insert(name.to_string()), "{name} typed twice");
            } else if !line.starts_with("# HELP ") {
                let name = line.split('{').next().unwrap();
                assert!(typed.contains(name), "{name} has no TYPE before it");
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
