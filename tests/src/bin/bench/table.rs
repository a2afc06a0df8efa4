//! The tables: every row measured on every device over rotating rounds, medians with
//! their spread and ratios to the reference devices, the paired ratios, and (`--profile`)
//! the CPU time per IO.

use super::measure::{measure, server_pid, Cost, Sample};
use super::{paired, Row, Settings};
use ublkd_tests::thread_cpus;

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Measures every row on every device (`(label, path)`) and prints the table, with the
/// ratio of each device's median to that of every device in `refs` (`(index, column
/// name)`).
pub(crate) fn compare(
    devices: &[(String, String)],
    refs: &[(usize, &str)],
    rows: &[Row],
    s: &Settings,
) {
    let rows = s.rows(rows);
    let n = devices.len();
    // samples[row][dev] = one Sample per round
    let mut samples = vec![vec![Vec::new(); n]; rows.len()];
    for round in 0..s.rounds {
        eprintln!("round {}/{}", round + 1, s.rounds);
        for (r, row) in rows.iter().enumerate() {
            // Each round starts one device later, so no device always runs first.
            for i in 0..n {
                let d = (i + round) % n;
                let sample = measure(&devices[d].1, row, s);
                // Each round's result as it comes (stderr, beside the tables): the
                // spread of a cell is only its min and max, this shows every round.
                let cost = if s.profile {
                    let c = sample.cost;
                    format!(
                        ", server {:.1} us {:.2} cs, fio {:.1} us, idle {:.0}%",
                        c.server_us, c.server_switches, c.fio_us, c.idle_pct
                    )
                } else {
                    String::new()
                };
                eprintln!(
                    "  {:<18} {:<16} {:>9.0} IOPS{cost}",
                    row.name, devices[d].0, sample.iops
                );
                samples[r][d].push(sample);
            }
        }
    }
    let mut header = format!(
        "| {:<18} | {:<16} | {:>9} | {:>15} | {:>9} |",
        "workload", "device", "IOPS", "IOPS min-max", "MB/s"
    );
    let mut rule = format!(
        "|{:-<20}|{:-<18}|{:->10}:|{:->16}:|{:->10}:|",
        "", "", "", "", ""
    );
    for (_, name) in refs {
        header.push_str(&format!(" {name:>9} |"));
        rule.push_str(&format!("{:->10}:|", ""));
    }
    println!("{header}");
    println!("{rule}");
    for (r, row) in rows.iter().enumerate() {
        let medians: Vec<(f64, f64)> = samples[r]
            .iter()
            .map(|v| {
                let mut iops: Vec<f64> = v.iter().map(|x| x.iops).collect();
                let mut mbps: Vec<f64> = v.iter().map(|x| x.mbps).collect();
                (median(&mut iops), median(&mut mbps))
            })
            .collect();
        for (d, (label, _)) in devices.iter().enumerate() {
            let iops = samples[r][d].iter().map(|x| x.iops);
            let (lo, hi) = (
                iops.clone().fold(f64::INFINITY, f64::min),
                iops.fold(0.0, f64::max),
            );
            let (mi, mb) = medians[d];
            let spread = format!("{lo:.0}-{hi:.0}");
            let mut line = format!(
                "| {:<18} | {label:<16} | {mi:>9.0} | {spread:>15} | {mb:>9.1} |",
                row.name
            );
            for (i, _) in refs {
                line.push_str(&format!(" {:>9} |", format!("{:.2}x", mi / medians[*i].0)));
            }
            println!("{line}");
        }
    }
    if s.rounds > 1 {
        let labels: Vec<&str> = devices.iter().map(|(l, _)| l.as_str()).collect();
        let names: Vec<&str> = rows.iter().map(|r| r.name).collect();
        let iops: Vec<Vec<Vec<f64>>> = samples
            .iter()
            .map(|row| {
                row.iter()
                    .map(|v| v.iter().map(|x| x.iops).collect())
                    .collect()
            })
            .collect();
        paired::print(&labels, &names, &iops, refs);
    }
    let placed: Vec<String> = devices
        .iter()
        .filter_map(|(label, dev)| Some(format!("{label} {}", queue_cpus(dev)?)))
        .collect();
    if !placed.is_empty() {
        println!();
        println!("queue threads' CPUs: {}", placed.join("; "));
    }
    if s.profile {
        println!();
        print_costs(devices, &rows, &samples);
    }
}

/// The CPUs the queue threads of ublk device `dev` may run on (their Cpus_allowed_list,
/// one entry per queue): ublkd names its queue threads `ublk<dev>q<queue>`; for another
/// server (rublk) they are its threads pinned to a single CPU. The CPU a queue is pinned
/// to moves some rows by several percent in the VM, and rublk picks it at random, so the
/// tables say where each one ran. None for a kernel device or an unpinned peer.
fn queue_cpus(dev: &str) -> Option<String> {
    let id = dev.strip_prefix("/dev/ublkb")?;
    let pid = server_pid(dev)?;
    let prefix = format!("ublk{id}q");
    let (mut named, mut pinned) = (Vec::new(), Vec::new());
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let tid = t.file_name().to_str().and_then(|n| n.parse().ok());
        let Some(cpus) = tid.and_then(thread_cpus) else {
            continue;
        };
        if comm.trim().starts_with(&prefix) {
            named.push(cpus);
        } else if !cpus.contains([',', '-']) {
            pinned.push(cpus);
        }
    }
    let list = if named.is_empty() { pinned } else { named };
    (!list.is_empty()).then(|| format!("CPU {}", list.join(" ")))
}

/// The `--profile` table: medians over the rounds of each device's CPU time per IO.
fn print_costs(devices: &[(String, String)], rows: &[&Row], samples: &[Vec<Vec<Sample>>]) {
    println!(
        "| {:<18} | {:<16} | {:>10} | {:>10} | {:>10} | {:>10} | {:>10} | {:>10} |",
        "workload",
        "device",
        "server us",
        "server cs",
        "io-wq us",
        "fio us",
        "fio cs",
        "guest idle"
    );
    println!(
        "|{:-<20}|{:-<18}|{:->11}:|{:->11}:|{:->11}:|{:->11}:|{:->11}:|{:->11}:|",
        "", "", "", "", "", "", "", ""
    );
    for (r, row) in rows.iter().enumerate() {
        for (d, (label, _)) in devices.iter().enumerate() {
            let v = &samples[r][d];
            let med = |f: fn(&Cost) -> f64| {
                let mut x: Vec<f64> = v.iter().map(|s| f(&s.cost)).collect();
                median(&mut x)
            };
            println!(
                "| {:<18} | {label:<16} | {:>10.1} | {:>10.2} | {:>10.1} | {:>10.1} | {:>10.2} | {:>9.0}% |",
                row.name,
                med(|c| c.server_us),
                med(|c| c.server_switches),
                med(|c| c.iowq_us),
                med(|c| c.fio_us),
                med(|c| c.fio_switches),
                med(|c| c.idle_pct),
            );
        }
    }
    println!("per IO, medians: CPU microseconds of the ublk server's threads (not io-wq), its context switches, CPU microseconds of its io-wq workers (iou-wrk), and of fio (user + system), and fio's context switches; the share of the guest's CPU time that was idle during the fio command (every CPU, fio's start and ramp included)");
}
