//! The rbd target's librbd layer against a real single-node cluster on the host (no
//! ublk): asynchronous IO through the completion eventfd, and the errors `add rbd`
//! gives for a bad pool, image, conf or an unreachable monitor.

use std::time::{Duration, Instant};
use ublkd_proto::ceph_option::MsMode;
use ublkd_targets::rbd::rados::{AioOp, Completions, ConnectOptions, Image, Rados};
use ublkd_targets::rbd::{ImageSpec, RbdOptions, RbdTarget};
use ublkd_targets::Target;
use ublkd_tests::ceph;

fn options(conf: &str, mon_secs: u64) -> ConnectOptions {
    ConnectOptions {
        conf: Some(conf.to_string()),
        user: "admin".into(),
        keyring: None,
        mon_timeout: Duration::from_secs(mon_secs),
        osd_timeout: Duration::from_secs(30),
        options: Vec::new(),
    }
}

fn rbd_options(spec: &str, conf: &str, mon_secs: u64) -> RbdOptions {
    RbdOptions {
        spec: spec.parse().unwrap(),
        snap_id: None,
        connect: options(conf, mon_secs),
        read_only: false,
        exclusive: false,
        encryption: None,
        quiesce: None,
        block_size: 512,
    }
}

fn conf() -> String {
    ceph::shared().conf.to_str().unwrap().to_string()
}

/// Runs one request and waits for its result.
fn io(image: &Image, sink: &std::sync::Arc<Completions>, op: AioOp) -> i64 {
    // SAFETY: the buffers in `op` outlive the call, which waits for the result.
    unsafe { image.aio(op, sink, 7) }.expect("librbd takes the request");
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.is_empty() {
        assert!(Instant::now() < deadline, "no result within 30 s");
        sink.wait(Duration::from_millis(500), &mut done);
    }
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].0, 7);
    done[0].1
}

#[test]
fn async_io_reports_on_the_eventfd() {
    let c = ceph::shared();
    c.create_image("host-io", "8M");
    let rados = Rados::connect(&options(&conf(), 10)).unwrap();
    let ioctx = rados.ioctx("rbd", None).unwrap();
    let spec: ImageSpec = "rbd/host-io".parse().unwrap();
    let image = Image::open(&ioctx, &spec, false).unwrap();
    assert_eq!(image.size().unwrap(), 8 << 20);
    let sink = Completions::new().unwrap();
    let data: Vec<u8> = (0..1 << 20).map(|i| (i * 7 + 3) as u8).collect();
    let w = AioOp::Write {
        off: 1 << 20,
        buf: data.as_ptr(),
        len: data.len(),
    };
    assert!(io(&image, &sink, w) >= 0);
    assert_eq!(io(&image, &sink, AioOp::Flush), 0);
    let mut back = vec![0u8; data.len()];
    let r = AioOp::Read {
        off: 1 << 20,
        buf: back.as_mut_ptr(),
        len: back.len(),
    };
    assert_eq!(io(&image, &sink, r), data.len() as i64);
    assert!(back == data, "read back differs from what was written");
    let z = AioOp::WriteZeroes {
        off: 1 << 20,
        len: 4096,
    };
    assert_eq!(io(&image, &sink, z), 0);
    let d = AioOp::Discard {
        off: (1 << 20) + 8192,
        len: 4096,
    };
    assert_eq!(io(&image, &sink, d), 0);
    let r = AioOp::Read {
        off: 1 << 20,
        buf: back.as_mut_ptr(),
        len: 16384,
    };
    assert_eq!(io(&image, &sink, r), 16384);
    assert!(
        back[..4096].iter().all(|&b| b == 0),
        "write-zeroes left data"
    );
    // A discard below librbd's discard granularity (64 KiB) may leave the data: only
    // write-zeroes promises zeroes.
    assert!(back[4096..8192] == data[4096..8192]);
    assert!(back[12288..16384] == data[12288..16384]);
}

#[test]
fn a_snapshot_opens_read_only_with_its_data() {
    let c = ceph::shared();
    c.create_image("host-snap", "4M");
    let t = RbdTarget::open(&rbd_options("rbd/host-snap", &conf(), 10)).unwrap();
    assert_eq!(t.shape().size, 4 << 20);
    assert!(!t.shape().read_only);
    c.rbd(&["snap", "create", "rbd/host-snap@s1"]);
    let t = RbdTarget::open(&rbd_options("rbd/host-snap@s1", &conf(), 10)).unwrap();
    assert!(t.shape().read_only, "a snapshot maps read-only");
    assert!(!t.shape().discard);
    let details = format!("{:?}", t.details());
    assert!(details.contains("rbd/host-snap@s1"), "{details}");
}

/// The error `RbdTarget::open` gives, which must be one line.
fn open_error(opts: &RbdOptions) -> (String, Duration) {
    let start = Instant::now();
    let e = match RbdTarget::open(opts) {
        Ok(_) => panic!("{:?} opened", opts.spec),
        Err(e) => e.to_string(),
    };
    assert!(!e.contains('\n'), "more than one line: {e}");
    (e, start.elapsed())
}

#[test]
fn bad_pool_image_and_conf_are_one_line_errors() {
    let conf = conf();
    let (e, _) = open_error(&rbd_options("nopool/img", &conf, 10));
    assert!(e.contains("cannot open pool 'nopool'"), "{e}");
    let (e, _) = open_error(&rbd_options("rbd/noimage", &conf, 10));
    assert!(e.contains("cannot open rbd image rbd/noimage"), "{e}");
    let (e, _) = open_error(&rbd_options("rbd/img", "/nonexistent/ceph.conf", 10));
    assert!(
        e.contains("cannot read the Ceph configuration /nonexistent/ceph.conf"),
        "{e}"
    );
}

#[test]
fn ceph_options_override_the_defaults_and_bad_ones_are_one_line_errors() {
    let conf = conf();
    let with = |pairs: &[(&str, &str)]| {
        let mut o = rbd_options("rbd/host-opts", &conf, 10);
        o.connect.options = pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        o
    };
    ceph::shared().create_image("host-opts", "4M");
    let good = with(&[("rbd_cache", "true"), ("rbd_qos_iops_limit", "1000")]);
    // librados has the values: the options come after ublkd's rbd_cache=false.
    let rados = Rados::connect(&good.connect).unwrap();
    assert_eq!(rados.conf_get("rbd_cache").unwrap(), "true");
    assert_eq!(rados.conf_get("rbd_qos_iops_limit").unwrap(), "1000");
    assert_eq!(rados.conf_get("rbd_non_blocking_aio").unwrap(), "false");
    let t = RbdTarget::open(&good).unwrap();
    let details: std::collections::HashMap<_, _> = t.details().into_iter().collect();
    assert_eq!(
        details["librbd"], "rbd_non_blocking_aio=false, rbd_io_scheduler=none",
        "a default the device overrides is not listed as in effect"
    );
    assert_eq!(
        details["ceph options"],
        "rbd_cache=true, rbd_qos_iops_limit=1000"
    );

    let (e, _) = open_error(&with(&[("no_such_option", "1")]));
    assert!(
        e.contains("--ceph-option no_such_option: Ceph has no option"),
        "{e}"
    );
    let (e, _) = open_error(&with(&[("rbd_cache", "maybe")]));
    assert!(
        e.contains("--ceph-option rbd_cache=maybe: Ceph refused the value"),
        "{e}"
    );
    let (e, _) = open_error(&with(&[("key", "AQBsecret")]));
    assert!(e.contains("--keyring") && !e.contains("AQBsecret"), "{e}");
    let (e, _) = open_error(&with(&[("rados_osd_op_timeout", "0")]));
    assert!(e.contains("use --osd-timeout"), "{e}");
}

#[test]
fn an_unreachable_monitor_fails_within_the_timeout() {
    // A monitor address where nothing listens.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("ceph.conf");
    std::fs::write(
        &conf,
        "[global]\nmon host = 127.0.0.1:6799\nauth client required = none\n",
    )
    .unwrap();
    let (e, took) = open_error(&rbd_options("rbd/img", conf.to_str().unwrap(), 3));
    assert!(e.contains("cannot connect to the Ceph cluster"), "{e}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

/// Two clients writing one image (the exclusive-lock feature is on by default): librbd
/// passes the lock to whoever writes, so both writes succeed, in order.
#[test]
fn another_client_takes_the_exclusive_lock_in_turn() {
    let c = ceph::shared();
    c.create_image("host-lock", "4M");
    let spec: ImageSpec = "rbd/host-lock".parse().unwrap();
    let open = || {
        let rados = Rados::connect(&options(&conf(), 10)).unwrap();
        Image::open(&rados.ioctx("rbd", None).unwrap(), &spec, false).unwrap()
    };
    let (a, b) = (open(), open());
    let sink = Completions::new().unwrap();
    for (n, image) in [(1u8, &a), (2, &b), (3, &a)] {
        let data = vec![n; 4096];
        let w = AioOp::Write {
            off: 0,
            buf: data.as_ptr(),
            len: data.len(),
        };
        assert!(io(image, &sink, w) >= 0, "write {n} failed");
        assert_eq!(io(image, &sink, AioOp::Flush), 0);
    }
    let mut back = vec![0u8; 4096];
    let r = AioOp::Read {
        off: 0,
        buf: back.as_mut_ptr(),
        len: back.len(),
    };
    assert_eq!(io(&b, &sink, r), 4096);
    assert!(
        back.iter().all(|&x| x == 3),
        "the last write is not what reads back"
    );
}

/// `--exclusive`: the target takes the image's lock and keeps it, so another client's
/// write fails with EROFS and another exclusive open fails in one line; once the target
/// is closed the other client writes. Refused on an image without the exclusive-lock
/// feature and on a snapshot, each in one line.
#[test]
fn an_exclusive_target_keeps_the_lock_from_other_clients() {
    let c = ceph::shared();
    c.create_image("host-excl", "4M");
    let mut opts = rbd_options("rbd/host-excl", &conf(), 10);
    opts.exclusive = true;
    let t = RbdTarget::open(&opts).unwrap();
    let details = format!("{:?}", t.details());
    assert!(details.contains("exclusive lock"), "{details}");

    let rados = Rados::connect(&options(&conf(), 10)).unwrap();
    let spec: ImageSpec = "rbd/host-excl".parse().unwrap();
    let other = Image::open(&rados.ioctx("rbd", None).unwrap(), &spec, false).unwrap();
    let sink = Completions::new().unwrap();
    let data = vec![9u8; 4096];
    let write = || AioOp::Write {
        off: 0,
        buf: data.as_ptr(),
        len: data.len(),
    };
    assert_eq!(io(&other, &sink, write()), -i64::from(libc::EROFS));
    let (e, _) = open_error(&opts);
    assert!(
        e.contains("cannot take the exclusive lock of rbd image rbd/host-excl")
            && e.contains("another client keeps it"),
        "{e}"
    );
    drop(t);
    assert!(io(&other, &sink, write()) >= 0, "the lock was not released");
    drop(other);

    c.rbd(&[
        "create",
        "--size",
        "4M",
        "--image-feature",
        "layering",
        "rbd/host-nolock",
    ]);
    let mut nolock = rbd_options("rbd/host-nolock", &conf(), 10);
    nolock.exclusive = true;
    let (e, _) = open_error(&nolock);
    assert!(e.contains("lacks the exclusive-lock feature"), "{e}");
    c.rbd(&["snap", "create", "rbd/host-excl@s1"]);
    let mut snap = rbd_options("rbd/host-excl@s1", &conf(), 10);
    snap.exclusive = true;
    let (e, _) = open_error(&snap);
    assert!(e.contains("a snapshot takes none"), "{e}");
}

/// A LUKS-formatted image (`rbd encryption format`) opens with its passphrase file:
/// the target's size is the image's data, what is written through an unlocked handle
/// reads back, and the image itself holds no plaintext. A wrong passphrase, the wrong
/// format and a missing file are one-line errors that never show the passphrase.
#[test]
fn an_encrypted_image_opens_with_its_passphrase_only() {
    use ublkd_targets::rbd::{EncryptionFormat, RbdEncryption};
    let c = ceph::shared();
    c.create_image("host-luks", "32M");
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "correct horse battery\n").unwrap();
    let pass = pass.to_str().unwrap().to_string();
    c.rbd(&["encryption", "format", "rbd/host-luks", "luks1", &pass]);
    let with = |format, file: &str| {
        let mut o = rbd_options("rbd/host-luks", &conf(), 10);
        o.encryption = Some(RbdEncryption {
            format,
            passphrase_file: file.into(),
        });
        o
    };
    let t = RbdTarget::open(&with(EncryptionFormat::Luks1, &pass)).unwrap();
    let size = t.shape().size;
    assert!((24 << 20..32 << 20).contains(&size), "size {size}");
    let details = format!("{:?}", t.details());
    assert!(details.contains("luks1, passphrase file"), "{details}");
    drop(t);

    let rados = Rados::connect(&options(&conf(), 10)).unwrap();
    let spec: ImageSpec = "rbd/host-luks".parse().unwrap();
    let io_ctx = rados.ioctx("rbd", None).unwrap();
    let sink = Completions::new().unwrap();
    let data = ublkd_tests::pattern(91, 64 << 10);
    {
        let plain = Image::open(&io_ctx, &spec, false).unwrap();
        plain
            .load_encryption(EncryptionFormat::Luks1, &pass)
            .unwrap();
        let w = AioOp::Write {
            off: 0,
            buf: data.as_ptr(),
            len: data.len(),
        };
        assert!(io(&plain, &sink, w) >= 0);
        assert_eq!(io(&plain, &sink, AioOp::Flush), 0);
        let mut back = vec![0u8; data.len()];
        let r = AioOp::Read {
            off: 0,
            buf: back.as_mut_ptr(),
            len: back.len(),
        };
        assert_eq!(io(&plain, &sink, r), data.len() as i64);
        assert!(back == data, "decrypted data differ");
    }
    let raw = Image::open(&io_ctx, &spec, true).unwrap();
    let mut all = vec![0u8; 32 << 20];
    let r = AioOp::Read {
        off: 0,
        buf: all.as_mut_ptr(),
        len: all.len(),
    };
    assert_eq!(io(&raw, &sink, r), all.len() as i64);
    assert!(
        !all.chunks(512).any(|s| s == &data[..512]),
        "the plaintext is in the image"
    );

    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "wrong horse\n").unwrap();
    let (e, _) = open_error(&with(EncryptionFormat::Luks1, wrong.to_str().unwrap()));
    assert!(
        e.contains("cannot unlock the luks1 encryption of rbd image rbd/host-luks")
            && !e.contains("wrong horse"),
        "{e}"
    );
    let (e, _) = open_error(&with(EncryptionFormat::Luks2, &pass));
    assert!(e.contains("cannot unlock the luks2 encryption"), "{e}");
    let (e, _) = open_error(&with(EncryptionFormat::Luks1, "/nonexistent/pass"));
    assert!(
        e.contains("cannot read the passphrase file /nonexistent/pass"),
        "{e}"
    );

    // A passphrase that ends with a newline (Ceph 16's tool drops one final newline
    // from the file, so "p\n\n" formats with "p\n"): the file "p\n" opens it, tried
    // without its newline first, then as it is.
    let nl = dir.path().join("nl");
    std::fs::write(&nl, "newline horse\n\n").unwrap();
    c.rbd(&[
        "encryption",
        "format",
        "rbd/host-luks",
        "luks1",
        nl.to_str().unwrap(),
    ]);
    std::fs::write(&nl, "newline horse\n").unwrap();
    RbdTarget::open(&with(EncryptionFormat::Luks1, nl.to_str().unwrap())).unwrap();
}

/// LUKS2 as LUKS1 (the same call with the other format; its header takes 16 MiB).
#[test]
fn a_luks2_image_opens_with_its_passphrase() {
    use ublkd_targets::rbd::{EncryptionFormat, RbdEncryption};
    let c = ceph::shared();
    c.create_image("host-luks2", "32M");
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "luks two\n").unwrap();
    let pass = pass.to_str().unwrap().to_string();
    c.rbd(&["encryption", "format", "rbd/host-luks2", "luks2", &pass]);
    let mut opts = rbd_options("rbd/host-luks2", &conf(), 10);
    opts.encryption = Some(RbdEncryption {
        format: EncryptionFormat::Luks2,
        passphrase_file: pass,
    });
    let t = RbdTarget::open(&opts).unwrap();
    assert_eq!(t.shape().size, 16 << 20);
}

/// `--quiesce-hook`: `rbd snap create` runs the hook with `DEVICE quiesce` before the
/// snapshot and `DEVICE unquiesce` after it; a hook that fails fails the snapshot (and
/// is told to unquiesce), and the watch serves the next one; a marker left by a daemon
/// that died while the hook had quiesced has the new watch unquiesce first. `--quiesce`
/// (freeze) with nothing mounted answers at once. (Freezing a mounted file system, and
/// thawing one a dead daemon left frozen, are tested in the VM.)
#[test]
fn snapshots_run_the_quiesce_hook_and_a_failing_hook_fails_them() {
    use ublkd_targets::rbd::RbdQuiesce;
    let c = ceph::shared();
    c.create_image("host-quiesce", "4M");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let fail = dir.path().join("fail");
    let hook = dir.path().join("hook");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$1 $2\" >> {log}\nif [ -e {fail} ]; then echo 'nothing to freeze here' >&2; exit 3; fi\n",
            log = log.display(),
            fail = fail.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut opts = rbd_options("rbd/host-quiesce", &conf(), 10);
    opts.quiesce = Some(RbdQuiesce::Hook(hook.to_str().unwrap().into()));
    let t = RbdTarget::open(&opts).unwrap();
    assert!(format!("{:?}", t.details()).contains("quiesce"));
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let marker = dir.path().join("quiesced/77");
    let spot = |device: &str| ublkd_targets::QuiesceSpot {
        device: device.into(),
        dev_id: 77,
        marker: marker.clone(),
    };
    // What a daemon that died between the hook's quiesce and unquiesce leaves: the new
    // watch runs the recorded hook with `unquiesce` first.
    std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
    std::fs::write(&marker, format!("{{\"hook\":\"{}\"}}", hook.display())).unwrap();
    let watch = t.watch_quiesce(spot("/dev/ublkb77")).unwrap().unwrap();
    assert_eq!(read_log(), "/dev/ublkb77 unquiesce\n");
    assert!(!marker.exists());
    std::fs::remove_file(&log).unwrap();
    let wait_log = |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while read_log() != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(read_log(), want);
    };

    c.rbd(&["snap", "create", "rbd/host-quiesce@q1"]);
    wait_log("/dev/ublkb77 quiesce\n/dev/ublkb77 unquiesce\n");

    std::fs::write(&fail, "").unwrap();
    let (ok, out) = c.try_rbd(&["snap", "create", "rbd/host-quiesce@q2"]);
    assert!(!ok, "a snapshot whose quiesce hook failed was taken: {out}");
    // After a failed quiesce the hook is told to undo what it may have done.
    let two = "/dev/ublkb77 quiesce\n/dev/ublkb77 unquiesce\n".repeat(2);
    wait_log(&two);
    let snaps = c.rbd(&["snap", "ls", "rbd/host-quiesce"]);
    assert!(snaps.contains("q1") && !snaps.contains("q2"), "{snaps}");

    std::fs::remove_file(&fail).unwrap();
    c.rbd(&["snap", "create", "rbd/host-quiesce@q3"]);
    wait_log(&"/dev/ublkb77 quiesce\n/dev/ublkb77 unquiesce\n".repeat(3));

    let unmarked = || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while marker.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!marker.exists(), "the marker outlived the snapshot");
    };
    unmarked();
    // Unwatched: snapshots no longer wait for this client.
    drop(watch);
    c.rbd(&["snap", "create", "rbd/host-quiesce@q4"]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(read_log().lines().count(), 6);
    assert_eq!(
        t.counters(),
        vec![("snapshots_quiesced", 2), ("quiesce_failures", 1)]
    );

    // Freeze with nothing mounted from the device: the snapshot is taken.
    let mut opts = rbd_options("rbd/host-quiesce", &conf(), 10);
    opts.quiesce = Some(RbdQuiesce::Freeze);
    let t = RbdTarget::open(&opts).unwrap();
    let _watch = t.watch_quiesce(spot("/dev/null")).unwrap().unwrap();
    c.rbd(&["snap", "create", "rbd/host-quiesce@q5"]);
    unmarked();

    // A snapshot mapping has nothing to quiesce; a hook path must be absolute.
    let mut opts = rbd_options("rbd/host-quiesce@q1", &conf(), 10);
    opts.quiesce = Some(RbdQuiesce::Freeze);
    let e = open_error(&opts).0;
    assert!(e.contains("--quiesce"), "{e}");
    let mut opts = rbd_options("rbd/host-quiesce", &conf(), 10);
    opts.quiesce = Some(RbdQuiesce::Hook("hook.sh".into()));
    let e = open_error(&opts).0;
    assert!(e.contains("must be absolute"), "{e}");
}

/// `--mon-host` and `--keyfile` without a conf file (as ceph-csi maps with rbd-nbd): the
/// image opens with only the monitors' address and the key; without the key, the error
/// says that one is needed; without either address, the error names both flags.
#[test]
fn a_cluster_is_reached_by_its_monitors_without_a_conf_file() {
    use ublkd_targets::rbd::DEFAULT_CONF;
    assert!(
        !std::path::Path::new(DEFAULT_CONF).exists(),
        "this test needs a host without {DEFAULT_CONF} (it would be read)"
    );
    let c = ceph::shared();
    c.create_image("host-monhost", "4M");
    let mut opts = rbd_options("rbd/host-monhost", &conf(), 10);
    opts.connect.conf = None;
    let dir = tempfile::tempdir().unwrap();
    let keyfile = dir.path().join("admin.key");
    std::fs::write(&keyfile, &c.admin_key).unwrap();
    opts.connect.options = vec![
        ("mon_host".into(), ceph::MON_HOST.into()),
        ("keyfile".into(), keyfile.to_str().unwrap().into()),
    ];
    let t = RbdTarget::open(&opts).unwrap();
    assert_eq!(t.shape().size, 4 << 20);
    let details = format!("{:?}", t.details());
    assert!(details.contains("none (mon_host given)"), "{details}");
    assert!(!details.contains(&c.admin_key), "{details}");
    drop(t);
    opts.connect.options.pop();
    let (e, took) = open_error(&opts);
    assert!(
        e.contains("no key for user client.admin in keyring") && e.contains("--keyfile"),
        "{e}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
    opts.connect.options.clear();
    let (e, _) = open_error(&opts);
    assert!(
        e.contains(DEFAULT_CONF) && e.contains("--conf") && e.contains("--mon-host"),
        "{e}"
    );
}

/// `--snap-id`: a snapshot opened by its id (as `rbd snap ls --format json` gives it)
/// is read-only and reads the snapshot's data, not the image's newer data; an unknown
/// id and a spec that names a snapshot as well are one-line errors.
#[test]
fn a_snapshot_opens_by_its_id() {
    let c = ceph::shared();
    c.create_image("host-snapid", "4M");
    let rados = Rados::connect(&options(&conf(), 10)).unwrap();
    let ioctx = rados.ioctx("rbd", None).unwrap();
    let spec: ImageSpec = "rbd/host-snapid".parse().unwrap();
    let sink = Completions::new().unwrap();
    let write = |image: &Image, byte: u8| {
        let data = vec![byte; 4096];
        let w = AioOp::Write {
            off: 0,
            buf: data.as_ptr(),
            len: data.len(),
        };
        assert_eq!(io(image, &sink, w), 0);
    };
    let read = |image: &Image| {
        let mut back = vec![0u8; 4096];
        let r = AioOp::Read {
            off: 0,
            buf: back.as_mut_ptr(),
            len: back.len(),
        };
        assert_eq!(io(image, &sink, r), 4096);
        back[0]
    };
    let live = Image::open(&ioctx, &spec, false).unwrap();
    write(&live, 0x51);
    c.rbd(&["snap", "create", "rbd/host-snapid@s1"]);
    write(&live, 0x52);
    let snaps: serde_json::Value =
        serde_json::from_str(&c.rbd(&["snap", "ls", "--format", "json", "rbd/host-snapid"]))
            .unwrap();
    let id = snaps[0]["id"].as_u64().unwrap();
    let mut by_id = Image::open(&ioctx, &spec, true).unwrap();
    by_id.set_snap_by_id(id).unwrap();
    assert_eq!((read(&by_id), read(&live)), (0x51, 0x52));

    let mut opts = rbd_options("rbd/host-snapid", &conf(), 10);
    opts.snap_id = Some(id);
    let t = RbdTarget::open(&opts).unwrap();
    assert!(t.shape().read_only, "a snapshot by id maps read-only");
    let details = format!("{:?}", t.details());
    assert!(
        details.contains(&format!("(\"snapshot id\", \"{id}\")")),
        "{details}"
    );
    opts.snap_id = Some(id + 1000);
    let e = open_error(&opts).0;
    assert!(e.contains(&format!("snapshot id {}", id + 1000)), "{e}");
    let mut opts = rbd_options("rbd/host-snapid@s1", &conf(), 10);
    opts.snap_id = Some(id);
    let e = open_error(&opts).0;
    assert!(e.contains("--snap-id"), "{e}");
}

/// A cephx user with narrower caps than the admin's (as `rbd`'s users are set up:
/// `profile rbd` on one pool) opens the image with its own keyring, or with a file of
/// its bare key and the monitors' address instead of a conf; a wrong key and a user
/// whose caps name another pool each fail in one line within seconds, without the key.
#[test]
fn a_cephx_user_opens_with_its_keyring_or_key_file_and_wrong_keys_fail_in_one_line() {
    let c = ceph::shared();
    c.create_image("host-cephx", "4M");
    let (keyring, key) = c.add_user(
        "host-ublk",
        &[("mon", "profile rbd"), ("osd", "profile rbd pool=rbd")],
    );
    let as_user = |keyring: &std::path::Path| {
        let mut o = rbd_options("rbd/host-cephx", &conf(), 10);
        o.connect.user = "host-ublk".into();
        o.connect.keyring = Some(keyring.to_str().unwrap().into());
        o
    };
    let t = RbdTarget::open(&as_user(&keyring)).unwrap();
    assert_eq!(t.shape().size, 4 << 20);
    drop(t);

    // A key file and the monitors' address, no conf (as ceph-csi maps).
    let dir = tempfile::tempdir().unwrap();
    let keyfile = dir.path().join("key");
    std::fs::write(&keyfile, &key).unwrap();
    let mut o = rbd_options("rbd/host-cephx", "", 10);
    o.connect.conf = None;
    o.connect.user = "host-ublk".into();
    o.connect.options = vec![
        ("mon_host".into(), ceph::MON_HOST.into()),
        ("keyfile".into(), keyfile.to_str().unwrap().into()),
    ];
    let t = RbdTarget::open(&o).unwrap();
    assert_eq!(t.shape().size, 4 << 20);
    drop(t);

    let wrong_key = ceph::new_key();
    let wrong = dir.path().join("wrong.keyring");
    std::fs::write(
        &wrong,
        ceph::keyring_entry("client.host-ublk", &wrong_key, &[]),
    )
    .unwrap();
    let (e, took) = open_error(&as_user(&wrong));
    assert!(
        e.contains("refused user client.host-ublk") && e.contains("--keyring or --keyfile"),
        "{e}"
    );
    assert!(!e.contains(&wrong_key) && !e.contains(&key), "{e}");
    assert!(took < Duration::from_secs(15), "took {took:?}");

    // A key, but a conf (here an option) that does not let the client use cephx.
    let mut o = as_user(&keyring);
    o.connect.options = vec![("auth_client_required".into(), "none".into())];
    let (e, took) = open_error(&o);
    assert!(
        e.contains("no authentication method in common") && e.contains("auth client required"),
        "{e}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");

    let missing = dir.path().join("missing.keyring");
    let (e, took) = open_error(&as_user(&missing));
    assert!(
        e.contains("no key for user client.host-ublk in keyring")
            && e.contains(missing.to_str().unwrap()),
        "{e}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");

    let (other_pool, _) = c.add_user(
        "host-other",
        &[("mon", "profile rbd"), ("osd", "profile rbd pool=other")],
    );
    let mut o = as_user(&other_pool);
    o.connect.user = "host-other".into();
    let (e, took) = open_error(&o);
    assert!(
        e.contains("user client.host-other may not open rbd image rbd/host-cephx")
            && e.contains("profile rbd pool=rbd"),
        "{e}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

/// A user with `profile rbd-read-only` caps opens an image read-only (`--read-only`),
/// and is refused in one line, naming the caps, when it asks to write.
#[test]
fn a_read_only_cephx_user_opens_read_only_and_is_refused_for_writing() {
    let c = ceph::shared();
    c.create_image("host-ro", "4M");
    let (keyring, _) = c.add_user(
        "host-ro",
        &[
            ("mon", "profile rbd"),
            ("osd", "profile rbd-read-only pool=rbd"),
        ],
    );
    let mut o = rbd_options("rbd/host-ro", &conf(), 10);
    o.connect.user = "host-ro".into();
    o.connect.keyring = Some(keyring.to_str().unwrap().into());
    o.read_only = true;
    let t = RbdTarget::open(&o).unwrap();
    assert!(t.shape().read_only);
    drop(t);
    o.read_only = false;
    let (e, _) = open_error(&o);
    assert!(
        e.contains("user client.host-ro may not open rbd image rbd/host-ro")
            && e.contains("rbd-read-only pool=rbd' with --read-only"),
        "{e}"
    );
}

/// The cluster's monitors and OSDs accept only crc-mode connections from clients while
/// this lives, and run with it before `new` returns; its drop gives them back the values
/// they had.
struct CrcOnlyCluster {
    /// The value each of `OPTIONS` had in its daemon before.
    before: Vec<String>,
}

impl CrcOnlyCluster {
    /// (daemon type, daemon, option)
    const OPTIONS: [(&'static str, &'static str, &'static str); 2] = [
        ("mon", "mon.a", "ms_mon_service_mode"),
        ("osd", "osd.0", "ms_service_mode"),
    ];

    fn new() -> CrcOnlyCluster {
        let c = ceph::shared();
        let mut guard = CrcOnlyCluster { before: Vec::new() };
        // The guard first, so that a failure half-way restores the values too.
        for (who, daemon, name) in Self::OPTIONS {
            guard.before.push(c.daemon_config(daemon, name));
            c.set_config(who, name, Some("crc"));
        }
        for (_, daemon, name) in Self::OPTIONS {
            c.wait_config(daemon, name, "crc");
        }
        guard
    }
}

impl Drop for CrcOnlyCluster {
    fn drop(&mut self) {
        let c = ceph::shared();
        let set = &Self::OPTIONS[..self.before.len()];
        for (who, _, name) in set {
            c.set_config(who, name, None);
        }
        if std::thread::panicking() {
            return; // a second panic would abort the test binary
        }
        for ((_, daemon, name), was) in set.iter().zip(&self.before) {
            c.wait_config(daemon, name, was);
        }
    }
}

/// `--ms-mode secure` (msgr2's encrypted mode, the options ms_client_mode and
/// ms_mon_client_mode): IO works over it; a cluster that allows only crc refuses it,
/// and each side's refusal is a one-line error that names the mode, within bounded time,
/// where librados gives a wrong key's errno (the monitors) or only a timeout (the
/// OSDs); prefer-secure then falls back to crc.
#[test]
fn a_secure_connection_serves_io_and_a_cluster_that_refuses_it_says_so() {
    let c = ceph::shared();
    c.create_image("host-secure", "4M");
    let with = |mode: MsMode, osd_secs: u64| {
        let mut o = options(&conf(), 10);
        o.osd_timeout = Duration::from_secs(osd_secs);
        o.options = mode.options().to_vec();
        o
    };
    let spec: ImageSpec = "rbd/host-secure".parse().unwrap();
    {
        let rados = Rados::connect(&with(MsMode::Secure, 30)).unwrap();
        let ioctx = rados.ioctx("rbd", None).unwrap();
        let image = Image::open(&ioctx, &spec, false).unwrap();
        let sink = Completions::new().unwrap();
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 13 + 1) as u8).collect();
        let w = AioOp::Write {
            off: 8192,
            buf: data.as_ptr(),
            len: data.len(),
        };
        assert!(io(&image, &sink, w) >= 0);
        let mut back = vec![0u8; data.len()];
        let r = AioOp::Read {
            off: 8192,
            buf: back.as_mut_ptr(),
            len: back.len(),
        };
        assert_eq!(io(&image, &sink, r), data.len() as i64);
        assert!(back == data, "read back over a secure connection differs");
    }

    let _crc_only = CrcOnlyCluster::new();
    let target = |connect: ConnectOptions| {
        let mut o = rbd_options("rbd/host-secure", &conf(), 10);
        o.connect = connect;
        o
    };
    // The monitors refuse: librados says EACCES, as for a wrong key.
    let (e, took) = open_error(&target(with(MsMode::Secure, 30)));
    assert!(
        e.contains("refuse messenger mode 'secure'") && e.contains("--ms-mode prefer-secure"),
        "{e}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
    // Only the OSDs refuse: the image's open times out after --osd-timeout.
    let mut osd_only = with(MsMode::Secure, 5);
    osd_only.options.truncate(1);
    let (e, took) = open_error(&target(osd_only));
    assert!(
        e.contains("no OSD answered within 5 s") && e.contains("accept messenger mode 'secure'"),
        "{e}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let t = RbdTarget::open(&target(with(MsMode::PreferSecure, 10))).unwrap();
    assert_eq!(t.shape().size, 4 << 20);
}
