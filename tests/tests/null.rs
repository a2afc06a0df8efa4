//! Real-kernel tests of the daemon, the control tool and the null target. They run inside
//! the test VM (tests/run-vm-tests.sh); without /dev/ublk-control they fail, never skip.

use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use ublkd_tests::*;

fn require_ublk() {
    assert!(
        Path::new("/dev/ublk-control").exists(),
        "/dev/ublk-control is missing: these tests must run in the test VM (tests/run-vm-tests.sh)"
    );
}

#[test]
fn null_device_serves_fio_and_is_deleted() {
    require_ublk();
    let d = Daemon::start("basic");
    let dev = d.add(&["null", "--size", "1G"]);
    let id = dev_id(&dev);

    let rd = fio(&fio_job(&dev, "randread", "4k", 32, 3));
    let wr = fio(&fio_job(&dev, "randwrite", "4k", 32, 3));
    eprintln!(
        "null 4k randread {:.0} IOPS, randwrite {:.0} IOPS",
        rd.iops(0, "read"),
        wr.iops(0, "write")
    );

    // The daemon's counters saw that IO, with no errors.
    let show = d.show_json(id);
    let q = &show["queue_stats"][0];
    assert!(q["reads"].as_u64().unwrap() >= rd.total_ios(), "{show}");
    assert!(q["writes"].as_u64().unwrap() >= wr.total_ios(), "{show}");
    assert_eq!(q["errors"].as_u64(), Some(0), "{show}");
    assert_eq!(q["inflight"].as_u64(), Some(0), "{show}");

    d.ctl_ok(&["del", &id.to_string()]);
    assert!(
        wait_gone(&dev, Duration::from_secs(5)),
        "{dev} still exists after del"
    );
    assert!(
        !Path::new(&format!("/dev/ublkc{id}")).exists(),
        "char device still exists after del"
    );
    assert!(d.list_json().is_empty());
}

#[test]
fn two_devices_with_two_queues_serve_concurrently() {
    require_ublk();
    let d = Daemon::start("two");
    let cpus = possible_cpus().min(2);
    let queues = cpus.to_string();
    let a = d.add(&["null", "--size", "512M", "--queues", &queues]);
    let b = d.add(&["null", "--size", "512M", "--queues", &queues]);
    assert_ne!(a, b);

    // One job per CPU, each hitting both devices, so every hardware queue of both
    // devices (queue N serves CPU N) gets requests at the same time.
    let files = format!("--filename={a}:{b}");
    let mut cmd: Vec<String> = vec![
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        "--rw=randrw".into(),
        "--bs=4k".into(),
        "--iodepth=32".into(),
        "--time_based".into(),
        "--runtime=3".into(),
    ];
    for cpu in 0..cpus {
        cmd.push(format!("--name=cpu{cpu}"));
        cmd.push(files.clone());
        cmd.push(format!("--cpus_allowed={cpu}"));
    }
    fio(&cmd);
    for dev in [&a, &b] {
        let show = d.show_json(dev_id(dev));
        let stats = show["queue_stats"].as_array().unwrap();
        assert_eq!(stats.len(), cpus as usize, "{show}");
        for q in stats {
            assert!(q["requests"].as_u64().unwrap() > 0, "queue idle: {show}");
            assert_eq!(q["errors"].as_u64(), Some(0), "{show}");
        }
    }

    // Deleting one leaves the other serving.
    d.ctl_ok(&["del", &dev_id(&a).to_string()]);
    assert!(wait_gone(&a, Duration::from_secs(5)));
    fio(&fio_job(&b, "randrw", "4k", 32, 2));
    let list = d.list_json();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["path"].as_str(), Some(b.as_str()));
}

#[test]
fn list_and_show_describe_devices() {
    require_ublk();
    let d = Daemon::start("list");
    let a = d.add(&[
        "null",
        "--size",
        "64M",
        "--block-size",
        "4096",
        "--depth",
        "64",
    ]);
    let b = d.add(&["null"]);

    let list = d.list_json();
    assert_eq!(list.len(), 2);
    let row = |path: &str| {
        list.iter()
            .find(|r| r["path"].as_str() == Some(path))
            .cloned()
            .unwrap()
    };
    let ra = row(&a);
    assert_eq!(ra["id"].as_u64(), Some(dev_id(&a)));
    assert_eq!(ra["target"].as_str(), Some("null"));
    assert_eq!(ra["size"].as_u64(), Some(64 << 20));
    assert_eq!(ra["block_size"].as_u64(), Some(4096));
    assert_eq!(ra["queues"].as_u64(), Some(1));
    assert_eq!(ra["depth"].as_u64(), Some(64));
    assert_eq!(ra["state"].as_str(), Some("live"));
    assert_eq!(ra["spec"]["type"].as_str(), Some("null"), "{ra}");
    assert_eq!(ra["spec"]["size"].as_u64(), Some(64 << 20), "{ra}");
    let best = if d.ctl_ok(&["features"]).contains("AUTO_BUF_REG") {
        "auto-zc"
    } else {
        "zc"
    };
    assert_eq!(ra["buffer"].as_str(), Some(best), "default buffer mode");
    let rb = row(&b);
    assert_eq!(rb["size"].as_u64(), Some(1 << 30), "default size is 1G");
    assert_eq!(rb["depth"].as_u64(), Some(128), "default depth is 128");
    assert_eq!(rb["block_size"].as_u64(), Some(512));

    // What the kernel exports matches what list says.
    let sys = format!("/sys/block/ublkb{}", dev_id(&a));
    let lbs = std::fs::read_to_string(format!("{sys}/queue/logical_block_size")).unwrap();
    assert_eq!(lbs.trim(), "4096");
    let sectors: u64 = std::fs::read_to_string(format!("{sys}/size"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(sectors * 512, 64 << 20);

    let show = d.show_json(dev_id(&a));
    assert_eq!(show["path"].as_str(), Some(a.as_str()));
    assert_eq!(
        show["char_path"].as_str(),
        Some(format!("/dev/ublkc{}", dev_id(&a)).as_str())
    );
    assert_eq!(show["kernel"]["state"].as_str(), Some("live"));
    assert_eq!(show["kernel"]["nr_hw_queues"].as_u64(), Some(1));
    assert_eq!(show["kernel"]["queue_depth"].as_u64(), Some(64));
    assert_eq!(
        show["kernel"]["ublksrv_pid"].as_i64(),
        Some(i64::from(d.pid()))
    );
    let flags: Vec<&str> = show["kernel"]["flag_names"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(flags.contains(&"CMD_IOCTL_ENCODE"), "{show}");
    assert_eq!(show["queue_stats"].as_array().unwrap().len(), 1);
    assert!(show["queue_stats"][0]["tid"].as_i64().unwrap() > 0);

    // The human forms: a table with a header and a row per device; show's key lines.
    let table = d.ctl_ok(&["list"]);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.lines().next().unwrap().starts_with("ID"));
    let text = d.ctl_ok(&["show", &dev_id(&a).to_string()]);
    assert!(
        text.contains(&a) && text.contains("live") && text.contains("REQUESTS"),
        "{text}"
    );

    let features: Value = serde_json::from_str(&d.ctl_ok(&["features", "--json"])).unwrap();
    let names: Vec<&str> = features["names"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        names.contains(&"CMD_IOCTL_ENCODE") && names.contains(&"USER_RECOVERY"),
        "{features}"
    );
    assert!(features["bits"].as_u64().unwrap() > 0);
    assert!(d.ctl_ok(&["features"]).contains("CMD_IOCTL_ENCODE"));
}

/// `features` lists BATCH_IO (the test VM's kernel has it); a device takes the per-tag
/// command path by default and with --no-batch, the batch one with --batch, and `show`
/// (text and JSON) and `list --json` say which; both serve IO.
/// Every command that takes an id takes a device's name too; names that read as ids
/// are refused.
#[test]
fn names_are_handles() {
    require_ublk();
    let d = Daemon::start("names");
    let db = d.add(&["null", "--size", "16M", "--name", "db"]);
    let other = d.add(&["null", "--size", "16M", "--name", "scratch"]);
    let show = d.ctl_ok(&["show", "db"]);
    assert!(show.contains(&db) && show.contains("db"), "{show}");
    let json: Value = serde_json::from_str(&d.ctl_ok(&["show", "db", "--json"])).unwrap();
    assert_eq!(json["id"].as_u64(), Some(dev_id(&db)), "{json}");
    assert_eq!(json["name"], "db", "{json}");

    let err = d.ctl_err(&["show", "nope"]);
    assert!(err.contains("no device named 'nope'"), "{err}");
    let err = d.ctl_err(&["add", "null", "--name", "42"]);
    assert!(err.contains("all digits"), "{err}");
    // A name that does not exist deletes nothing, not even the devices named with it.
    let err = d.ctl_err(&["del", "db", "nope"]);
    assert!(err.contains("no device named 'nope'"), "{err}");
    assert_eq!(d.list_json().len(), 2);
    let err = d.ctl_err(&["recover", "db"]);
    assert!(err.contains("already served"), "{err}");

    d.ctl_ok(&["del", "db"]);
    assert!(
        wait_gone(&db, Duration::from_secs(10)),
        "{db} is still there"
    );
    let list = d.list_json();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["name"], "scratch");
    d.ctl_ok(&["del", "scratch"]);
    assert!(wait_gone(&other, Duration::from_secs(10)));
}

/// `stats --prometheus` is well-formed and counts what `show` counts.
/// `ublkd --device-ids FIRST-LAST`: `add` without `--id` picks the lowest free id of the
/// range and says so when none is left; `--id` may still name any id.
#[test]
fn added_devices_get_ids_from_the_daemons_range() {
    require_ublk();
    let d = Daemon::start_clean("id-range", &["--device-ids", "300-301"]);
    let a = d.add(&["null", "--size", "16M"]);
    let b = d.add(&["null", "--size", "16M"]);
    assert_eq!((a.as_str(), b.as_str()), ("/dev/ublkb300", "/dev/ublkb301"));
    let err = d.ctl_err(&["add", "null", "--size", "16M"]);
    assert!(
        err.contains("every device id from 300 to 301 is in use"),
        "{err}"
    );
    let named = d.add(&["null", "--size", "16M", "--id", "302"]);
    assert_eq!(named, "/dev/ublkb302");
    d.del(&a);
    assert_eq!(d.add(&["null", "--size", "16M"]), "/dev/ublkb300");
}

#[test]
fn stats_in_the_prometheus_format() {
    require_ublk();
    let d = Daemon::start("null-stats");
    let dev = d.add(&["null", "--size", "64M", "--name", "metered"]);
    let id = dev_id(&dev);
    fio(&fio_job(&dev, "randrw", "4k", 16, 1));
    let text = d.ctl_ok(&["stats", "--prometheus"]);
    let samples = prometheus_samples(&text);
    let value = |metric: &str, extra: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .find(|(name, labels, _)| {
                name == metric
                    && labels.contains(&("id".into(), id.to_string()))
                    && extra
                        .iter()
                        .all(|(k, v)| labels.contains(&(k.to_string(), v.to_string())))
            })
            .unwrap_or_else(|| panic!("no {metric} for device {id} in:\n{text}"))
            .2
    };
    let q = &d.show_json(id)["queue_stats"][0];
    assert_eq!(value("ublkd_device_up", &[("name", "metered")]), 1.0);
    assert_eq!(value("ublkd_device_size_bytes", &[]), (64u64 << 20) as f64);
    let requests = value("ublkd_queue_requests_total", &[("queue", "0")]);
    assert!(requests > 0.0, "{text}");
    assert_eq!(Some(requests as u64), q["requests"].as_u64(), "{q}");
    assert_eq!(
        Some(value("ublkd_queue_requests_by_op_total", &[("op", "read")]) as u64),
        q["reads"].as_u64()
    );
    assert_eq!(value("ublkd_queue_errors_total", &[]), 0.0);
    let table = d.ctl_ok(&["stats"]);
    assert!(table.contains("metered"), "{table}");
    d.del(&dev);
}

/// `resize` grows and shrinks a null device in place; the new size is in the record, so
/// a restarted daemon brings the device back with it.
#[test]
fn resize_changes_the_size_and_the_record() {
    require_ublk();
    let test = "null-resize";
    let mut d = Daemon::start(test);
    let dev = d.add(&["null", "--size", "64M", "--name", "grow"]);
    let id = dev_id(&dev);
    let sectors = || -> u64 {
        std::fs::read_to_string(format!("/sys/block/ublkb{id}/size"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let out = d.ctl_ok(&["resize", "grow", "1G"]);
    assert_eq!(out.trim(), format!("{dev} {}", 1u64 << 30));
    assert_eq!(sectors() * 512, 1 << 30);
    fio(&fio_job(&dev, "randrw", "4k", 16, 1));
    d.ctl_ok(&["resize", &id.to_string(), "32M"]);
    assert_eq!(sectors() * 512, 32 << 20);
    assert_eq!(d.show_json(id)["size"].as_u64(), Some(32 << 20));

    let err = d.ctl_err(&["resize", "grow", "1000"]);
    assert!(err.contains("not a multiple"), "{err}");
    let err = d.ctl_err(&["resize", "grow"]);
    assert!(err.contains("needs the new size"), "{err}");
    // Open by a process: a shrink is refused, a grow is fine.
    let held = std::fs::File::open(&dev).unwrap();
    let err = d.ctl_err(&["resize", "grow", "16M"]);
    assert!(err.contains("open by pid"), "{err}");
    d.ctl_ok(&["resize", "grow", "48M"]);
    drop(held);

    assert_eq!(d.stop(), Some(0));
    let d = Daemon::start_with(test, &[]);
    assert_eq!(d.show_json(id)["size"].as_u64(), Some(48 << 20));
    assert_eq!(sectors() * 512, 48 << 20);
    d.del(&dev);
}

#[test]
fn show_and_features_name_the_command_path() {
    require_ublk();
    let d = Daemon::start("commands");
    let features: Value = serde_json::from_str(&d.ctl_ok(&["features", "--json"])).unwrap();
    assert!(
        features["names"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "BATCH_IO"),
        "{features}"
    );
    assert!(d.ctl_ok(&["features"]).contains("BATCH_IO"));
    let default = d.add(&["null", "--size", "64M"]);
    let batch = d.add(&["null", "--size", "64M", "--batch"]);
    let per_tag = d.add(&["null", "--size", "64M", "--no-batch"]);
    for (dev, want) in [
        (&default, DEFAULT_COMMANDS),
        (&batch, "batch"),
        (&per_tag, "per-tag"),
    ] {
        let id = dev_id(dev);
        assert_commands(&d.show_json(id), want);
        assert_eq!(list_entry(&d, id)["commands"], want);
        let text = d.ctl_ok(&["show", &id.to_string()]);
        assert!(
            text.lines()
                .any(|l| l.starts_with("commands") && l.trim_end().ends_with(want)),
            "{text}"
        );
        let run = fio(&fio_job(dev, "randrw", "4k", 16, 2));
        assert!(run.total_ios() > 1000, "{dev}: {}", run.total_ios());
        let show = d.show_json(id);
        assert_eq!(show["queue_stats"][0]["errors"].as_u64(), Some(0), "{show}");
    }
    d.ctl_ok(&["del", "--all"]);
}

#[test]
fn discard_write_zeroes_and_flush_complete() {
    require_ublk();
    let d = Daemon::start("discard");
    let dev = d.add(&["null", "--size", "256M"]);
    let id = dev_id(&dev);
    let sys = format!("/sys/block/ublkb{id}/queue");
    let max_discard: u64 = std::fs::read_to_string(format!("{sys}/discard_max_bytes"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(max_discard > 0, "discard not advertised");
    let max_wz: u64 = std::fs::read_to_string(format!("{sys}/write_zeroes_max_bytes"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(max_wz > 0, "write-zeroes not advertised");

    for args in [vec![dev.as_str()], vec!["-z", dev.as_str()]] {
        let out = Command::new("/usr/sbin/blkdiscard")
            .args(&args)
            .output()
            .expect("blkdiscard");
        assert!(
            out.status.success(),
            "blkdiscard {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let q = &d.show_json(id)["queue_stats"][0];
    assert!(q["discards"].as_u64().unwrap() > 0, "{q}");
    assert!(q["write_zeroes"].as_u64().unwrap() > 0, "{q}");
    assert_eq!(q["errors"].as_u64(), Some(0), "{q}");
}

#[test]
fn bad_input_gets_one_clear_line_and_the_daemon_keeps_serving() {
    require_ublk();
    let d = Daemon::start("bad");
    let dev = d.add(&["null", "--size", "128M"]);
    let too_many = (possible_cpus() + 1).to_string();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["add", "tape"], "unrecognized subcommand 'tape'"),
        (
            vec!["add", "null", "--size", "0"],
            "size must be greater than 0",
        ),
        (
            vec!["add", "null", "--size", "1000"],
            "not a multiple of the block size 512",
        ),
        (
            vec!["add", "null", "--size", "6k", "--block-size", "4096"],
            "not a multiple of the block size 4096",
        ),
        (vec!["add", "null", "--size", "lots"], "invalid size 'lots'"),
        (
            vec!["add", "null", "--block-size", "1024"],
            "block size 1024 is not supported",
        ),
        (
            vec!["add", "null", "--queues", "0"],
            "queues must be at least 1",
        ),
        (
            vec!["add", "null", "--queues", &too_many],
            "above the kernel's limit",
        ),
        (
            vec!["add", "null", "--queues", "5000"],
            "above the kernel's limit",
        ),
        (
            vec!["add", "null", "--depth", "0"],
            "depth must be at least 1",
        ),
        (
            vec!["add", "null", "--depth", "4097"],
            "depth 4097 is above the ublk driver's limit of 4096",
        ),
        (
            vec!["add", "null", "--buffer", "magic"],
            "unknown buffer mode 'magic'",
        ),
        (vec!["del", "999"], "no device with id 999"),
        (vec!["show", "999"], "no device with id 999"),
        (vec!["del", "abc"], "no device named 'abc'"),
    ];
    for (args, expect) in &cases {
        let line = d.ctl_err(args);
        assert!(
            line.contains(expect),
            "ublkctl {args:?}: expected {expect:?} in {line:?}"
        );
    }
    // A failed del of several ids deletes none of them.
    let id = dev_id(&dev).to_string();
    let line = d.ctl_err(&["del", &id, "999"]);
    assert!(line.contains("no device with id 999"), "{line}");
    assert!(Path::new(&dev).exists(), "partial del removed a device");

    // Malformed requests written straight to the socket get an error answer.
    let big = format!("{{\"cmd\":\"list\",\"pad\":\"{}\"}}\n", "x".repeat(100_000));
    for (raw, expect) in [
        (b"hello\n".to_vec(), "malformed request"),
        (b"{\"cmd\":\"add\"}\n".to_vec(), "malformed request"),
        (
            b"{\"cmd\":\"add\",\"target\":{\"type\":\"tape\",\"size\":1}}\n".to_vec(),
            "unknown variant `tape`",
        ),
        (
            b"{\"cmd\":\"add\",\"target\":{\"type\":\"null\",\"size\":0}}\n".to_vec(),
            "size must be greater than 0",
        ),
        (
            b"{\"cmd\":\"del\",\"ids\":[-1]}\n".to_vec(),
            "malformed request",
        ),
        (vec![0xff, 0xfe, b'\n'], "not UTF-8"),
        (b"\n".to_vec(), "empty"),
        (b"{\"cmd\":\"li".to_vec(), "malformed request"),
        (big.into_bytes(), "longer than"),
    ] {
        let answer = d.raw_request(&raw);
        let v: Value =
            serde_json::from_str(&answer).unwrap_or_else(|e| panic!("answer {answer:?}: {e}"));
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error in {answer}"));
        assert!(msg.contains(expect), "expected {expect:?} in {msg:?}");
    }
    // A client that connects and leaves without a word.
    drop(std::os::unix::net::UnixStream::connect(&d.socket).unwrap());

    // Still serving: the device is listed, does IO, and new devices can be added.
    assert_eq!(d.list_json().len(), 1);
    fio(&fio_job(&dev, "randrw", "4k", 32, 2));
    let second = d.add(&["null", "--size", "64M"]);
    assert_eq!(d.list_json().len(), 2);
    d.ctl_ok(&["del", "--all"]);
    assert!(wait_gone(&dev, Duration::from_secs(5)) && wait_gone(&second, Duration::from_secs(5)));
    assert!(d.list_json().is_empty());

    // No daemon at all.
    let out = ctl_at(Path::new("/tmp/no-such-ublkd.sock"), &["list"]);
    let line = expect_one_line_error(&out, "ublkctl without a daemon");
    assert!(
        line.contains("cannot connect to ublkd at /tmp/no-such-ublkd.sock"),
        "{line}"
    );
    assert!(line.contains("is ublkd running?"), "{line}");

    // A second daemon on the same socket refuses to start and leaves the first alone.
    let out = Command::new(std::env::var("UBLKD_BIN").unwrap_or_else(|_| "ublkd".into()))
        .arg("--socket")
        .arg(&d.socket)
        .arg("--state-dir")
        .arg(&d.state_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already serving"));
    assert!(d.list_json().is_empty());
}

#[test]
fn extreme_depths_and_block_sizes_work() {
    require_ublk();
    let d = Daemon::start("depths");
    for (depth, bs) in [("1", "512"), ("4096", "4096")] {
        let dev = d.add(&[
            "null",
            "--size",
            "64M",
            "--depth",
            depth,
            "--block-size",
            bs,
        ]);
        fio(&fio_job(&dev, "randrw", "4k", 32, 2));
        d.ctl_ok(&["del", &dev_id(&dev).to_string()]);
        assert!(wait_gone(&dev, Duration::from_secs(5)));
    }
}

#[test]
fn sigterm_deletes_devices_and_exits_zero() {
    require_ublk();
    let mut d = Daemon::start("sigterm");
    let a = d.add(&["null", "--size", "64M"]);
    let b = d.add(&[
        "null",
        "--size",
        "64M",
        "--queues",
        &possible_cpus().min(2).to_string(),
    ]);
    assert_eq!(
        d.stop(),
        Some(0),
        "ublkd exit code after SIGTERM\n{}",
        d.log_text()
    );
    assert!(
        !Path::new(&a).exists() && !Path::new(&b).exists(),
        "devices survived SIGTERM"
    );
    assert!(!d.socket.exists(), "socket left behind");
}

#[test]
fn queue_threads_are_placed_as_asked() {
    require_ublk();
    let cpus = possible_cpus() as usize;
    assert!(
        cpus >= 2,
        "the test VM has {cpus} CPU(s); this test needs 2"
    );
    let all = format!("0-{}", cpus - 1);
    let d = Daemon::start("affinity");
    // One queue: the kernel maps every CPU to it.
    let pinned: Vec<String> = (0..2)
        .map(|_| d.add(&["null", "--size", "1G", "--queues", "1"]))
        .collect();
    let set = d.add(&["null", "--size", "1G", "--affinity", "set"]);
    let off = d.add(&["null", "--size", "1G", "--affinity", "off"]);

    let queue = |dev: &str| {
        let show = d.show_json(dev_id(dev));
        let q = show["queue_stats"][0].clone();
        let tid = q["tid"].as_i64().unwrap();
        (
            show,
            q["cpus"].as_str().unwrap().to_string(),
            thread_cpus(tid).expect("the queue thread's Cpus_allowed_list"),
        )
    };
    let mut chosen = Vec::new();
    for dev in &pinned {
        let (show, listed, actual) = queue(dev);
        assert_eq!(show["affinity"], "cpu", "{show}");
        assert!(listed.parse::<usize>().is_ok_and(|c| c < cpus), "{show}");
        assert_eq!(listed, actual, "show says {listed}, /proc says {actual}");
        chosen.push(listed);
    }
    // The second device's queue goes to the CPU the first one left free.
    assert_ne!(
        chosen[0], chosen[1],
        "both queues pinned to CPU {}",
        chosen[0]
    );

    let (show, listed, actual) = queue(&set);
    assert_eq!(show["affinity"], "set", "{show}");
    assert_eq!(
        (listed.as_str(), actual.as_str()),
        (all.as_str(), all.as_str())
    );
    let (show, listed, actual) = queue(&off);
    assert_eq!(show["affinity"], "off", "{show}");
    assert_eq!((listed.as_str(), actual.as_str()), ("", all.as_str()));
    let text = d.ctl_ok(&["show", &dev_id(&pinned[0]).to_string()]);
    assert!(text.contains("affinity       cpu"), "{text}");

    // Every placement serves IO.
    for dev in pinned.iter().chain([&set, &off]) {
        fio(&fio_job(dev, "randrw", "4k", 16, 1));
    }
}
