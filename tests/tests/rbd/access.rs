//! How an image is reached: snapshots, bad specs, cephx users, the exclusive lock and
//! encryption.

use super::*;

/// A snapshot maps read-only, refuses writes, and reads the snapshot's data while the
/// image itself has moved on; it is mapped with `--mon-host`, `--keyfile` and no conf
/// file, and by its id (`--snap-id`).
#[test]
fn a_snapshot_maps_read_only_with_its_data() {
    let c = cluster();
    c.create_image("snap", "8M");
    let d = Daemon::start("rbd-snap");
    let live = add_rbd(&d, "rbd/snap", &[]);
    let before = pattern(41, 1 << 20);
    write_direct(&live, &before);
    c.rbd(&["snap", "create", "rbd/snap@s1"]);
    let after = pattern(42, 1 << 20);
    write_direct(&live, &after);
    // Mapped by the monitors' address and the admin's bare key alone (`--mon-host` and
    // `--keyfile`, no conf file: the guest has no /etc/ceph/ceph.conf), as ceph-csi maps
    // with rbd-nbd.
    let keyfile = "/tmp/rbd-snap-admin.key";
    std::fs::write(keyfile, &c.admin_key).unwrap();
    let snap = d.add(&[
        "rbd",
        "rbd/snap@s1",
        "--mon-host",
        ceph::MON_HOST,
        "--keyfile",
        keyfile,
    ]);
    assert_eq!(d.detail(dev_id(&snap), "conf"), "none (mon_host given)");
    let show = d.show_json(dev_id(&snap));
    let ro = std::fs::read_to_string(format!("/sys/block/{}/ro", &snap[5..])).unwrap();
    assert_eq!(
        ro.trim(),
        "1",
        "the snapshot's disk is not read-only: {show}"
    );
    assert!(
        read_direct(&snap, 1 << 20) == before,
        "the snapshot reads other data"
    );
    assert!(
        read_direct(&live, 1 << 20) == after,
        "the image lost its new data"
    );
    // The kernel may let the node be opened for writing; the write itself must fail.
    if let Ok(w) = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&snap)
    {
        let e = w.write_all_at(AlignedBuf::new(&[0u8; 4096]).as_slice(), 0);
        assert!(e.is_err(), "a write to the snapshot's device succeeded");
    }
    assert!(
        read_direct(&snap, 1 << 20) == before,
        "the snapshot changed"
    );
    // The same snapshot by its id (`--snap-id`).
    let snaps = c.rbd(&["snap", "ls", "--format", "json", "rbd/snap"]);
    let snaps: serde_json::Value = serde_json::from_str(&snaps).unwrap();
    let id = snaps[0]["id"].as_u64().unwrap().to_string();
    let by_id = add_rbd(&d, "rbd/snap", &["--snap-id", &id]);
    assert_eq!(d.detail(dev_id(&by_id), "snapshot id"), id);
    assert!(
        read_direct(&by_id, 1 << 20) == before,
        "the snapshot by id reads other data"
    );
    d.del(&by_id);
    d.del(&snap);
    d.del(&live);
}

/// Bad pool, bad image, bad conf and an unreachable monitor: one clear line each, in
/// bounded time, while another rbd device keeps serving.
#[test]
fn bad_specs_fail_in_one_line_and_others_keep_serving() {
    let c = cluster();
    c.create_image("good", "8M");
    let d = Daemon::start("rbd-errors");
    let dev = add_rbd(&d, "rbd/good", &[]);
    let conf = conf();
    let e = d.ctl_err(&["add", "rbd", "nopool/img", "--conf", &conf]);
    assert!(e.contains("cannot open pool 'nopool'"), "{e}");
    let e = d.ctl_err(&["add", "rbd", "rbd/noimage", "--conf", &conf]);
    assert!(e.contains("cannot open rbd image rbd/noimage"), "{e}");
    let e = d.ctl_err(&["add", "rbd", "rbd/good", "--conf", "/nonexistent/ceph.conf"]);
    assert!(e.contains("cannot read the Ceph configuration"), "{e}");
    let e = d.ctl_err(&["add", "rbd", "rbd/good@nosnap", "--conf", &conf]);
    assert!(e.contains("cannot open rbd image rbd/good@nosnap"), "{e}");
    let unreachable = "/tmp/rbd-unreachable.conf";
    std::fs::write(unreachable, "[global]\nmon host = 127.0.0.1:6799\n").unwrap();
    let start = std::time::Instant::now();
    let e = d.ctl_err(&["add", "rbd", "rbd/good", "--conf", unreachable]);
    assert!(e.contains("cannot connect to the Ceph cluster"), "{e}");
    assert!(start.elapsed().as_secs() < 30, "took {:?}", start.elapsed());
    let bad_option = ["add", "rbd", "rbd/good", "--conf", &conf, "--ceph-option"];
    let e = d.ctl_err(&[&bad_option[..], &["rbd_cach=true"]].concat());
    assert!(e.contains("Ceph has no option of that name"), "{e}");
    let e = d.ctl_err(&[&bad_option[..], &["key=AQBsecret"]].concat());
    assert!(e.contains("--keyring") && !e.contains("AQBsecret"), "{e}");
    assert_eq!(d.list_json().len(), 1, "a failed add left a device behind");
    fio(&verify_job(&dev, "randwrite", "4k", "2M", 16));
    d.del(&dev);
}

/// A cephx user with an rbd client's caps on one pool (`mon 'profile rbd'`, `osd 'profile
/// rbd pool=rbd'`), as production clusters hand out, maps an image with `--id` and its
/// own `--keyring`, over connections encrypted with `--ms-mode secure`: fio verifies
/// through it, `show`, `list` and the log name the user and the keyring's path but never
/// the key, and after kill -9 the next ublkd reopens the image as that user, in that
/// mode. A wrong key and caps for another pool are refused in one line
/// each, within seconds, while the device keeps serving.
#[test]
fn a_cephx_user_maps_with_its_own_keyring_and_recovers_after_kill9() {
    let c = cluster();
    c.create_image("cephx", "16M");
    let rbd_caps = [("mon", "profile rbd"), ("osd", "profile rbd pool=rbd")];
    let (keyring, key) = c.add_user("ublk", &rbd_caps);
    let keyring = keyring.to_str().unwrap().to_string();
    let name = "rbd-cephx";
    let d = Daemon::start(name);
    let dev = add_rbd(
        &d,
        "rbd/cephx",
        &[
            "--user",
            "ublk",
            "--keyring",
            &keyring,
            "--ms-mode",
            "secure",
        ],
    );
    let id = dev_id(&dev);
    assert_eq!(d.detail(id, "user"), "ublk");
    assert_eq!(d.detail(id, "keyring"), keyring);
    let secure = "ms_client_mode=secure, ms_mon_client_mode=secure";
    assert_eq!(d.detail(id, "ceph options"), secure);
    fio(&verify_job(&dev, "randwrite", "4k", "4M", 16));
    let d = written_survives_kill9(d, name, &dev, pattern(91, 1 << 20));
    assert_eq!(d.detail(id, "user"), "ublk");
    assert_eq!(d.detail(id, "ceph options"), secure);

    let wrong = "/tmp/rbd-cephx-wrong.keyring";
    let wrong_key = ceph::new_key();
    std::fs::write(wrong, ceph::keyring_entry("client.ublk", &wrong_key, &[])).unwrap();
    let conf = conf();
    let add_as = |user: &str, keyring: &str| {
        let start = std::time::Instant::now();
        let e = d.ctl_err(&[
            "add",
            "rbd",
            "rbd/cephx",
            "--conf",
            &conf,
            "--user",
            user,
            "--keyring",
            keyring,
        ]);
        assert!(start.elapsed().as_secs() < 20, "took {:?}", start.elapsed());
        e
    };
    let e = add_as("ublk", wrong);
    assert!(e.contains("refused user client.ublk"), "{e}");
    let other_caps = [("mon", "profile rbd"), ("osd", "profile rbd pool=other")];
    let (other, _) = c.add_user("ublk-other", &other_caps);
    let e = add_as("ublk-other", other.to_str().unwrap());
    assert!(
        e.contains("user client.ublk-other may not open rbd image rbd/cephx"),
        "{e}"
    );
    assert_eq!(d.list_json().len(), 1, "a failed add left a device behind");

    let everything = format!(
        "{}\n{}\n{}",
        d.ctl_ok(&["show", &id.to_string(), "--json"]),
        d.ctl_ok(&["list", "--json"]),
        d.log_text()
    );
    for k in [&key, &wrong_key] {
        assert!(
            !everything.contains(k.as_str()),
            "a key shows: {everything}"
        );
    }
    let after = pattern(92, 256 << 10);
    write_direct(&dev, &after);
    assert!(
        read_direct(&dev, after.len()) == after,
        "the device stopped serving"
    );
    d.del(&dev);
}

/// A user whose mon caps are only `allow r` maps and writes, but cannot blocklist a dead
/// client: after kill -9 the restored device reads what was written, while its writes
/// (which must take the image's lock from the dead daemon's client first) fail with an
/// IO error and the log names the caps to check. `del` still works.
#[test]
fn a_user_who_may_not_blocklist_fails_writes_after_a_crash_and_the_log_says_why() {
    let c = cluster();
    c.create_image("cephx-r", "8M");
    let caps = [("mon", "allow r"), ("osd", "profile rbd pool=rbd")];
    let (keyring, _) = c.add_user("ublk-r", &caps);
    let name = "rbd-cephx-r";
    let d = Daemon::start(name);
    let keyring = keyring.to_str().unwrap();
    let dev = add_rbd(
        &d,
        "rbd/cephx-r",
        &["--user", "ublk-r", "--keyring", keyring],
    );
    let want = pattern(93, 1 << 20);
    write_direct(&dev, &want);
    let d = kill9_and_restart(d, name, dev_id(&dev));
    assert!(
        read_direct(&dev, want.len()) == want,
        "written data differs"
    );
    let f = open_direct(&dev, true);
    let start = std::time::Instant::now();
    let e = f.write_all_at(AlignedBuf::new(&[7u8; 4096]).as_slice(), 0);
    assert!(e.is_err(), "a write took the lock without blocklist caps");
    assert!(start.elapsed().as_secs() < 60, "took {:?}", start.elapsed());
    drop(f);
    let log = d.log_text();
    assert!(
        log.contains("refuses requests to this device's Ceph user")
            && log.contains("mon 'profile rbd'"),
        "{log}"
    );
    assert!(
        read_direct(&dev, want.len()) == want,
        "the refused write changed data"
    );
    d.del(&dev);
}

/// `--exclusive`: the device keeps the image's lock (`show` says so) and a second
/// exclusive mapping is refused in one line; after kill -9 of ublkd the next one
/// restores the device in the background once the dead daemon's lock can be broken
/// (its watch times out: 10 s in the test cluster), with the data written before; after
/// a restart (SIGTERM, start) the device is served again with its data.
#[test]
fn an_exclusive_device_keeps_the_lock_and_recovers_after_kill9() {
    let c = cluster();
    c.create_image("excl", "8M");
    let name = "rbd-excl";
    let d = Daemon::start(name);
    let dev = add_rbd(&d, "rbd/excl", &["--exclusive"]);
    let id = dev_id(&dev);
    let holds = |d: &Daemon| {
        assert_eq!(
            d.detail(id, "exclusive lock"),
            "held, refused to other clients"
        );
    };
    holds(&d);
    let conf = conf();
    let e = d.ctl_err(&["add", "rbd", "rbd/excl", "--conf", &conf, "--exclusive"]);
    assert!(
        e.contains("cannot take the exclusive lock of rbd image rbd/excl"),
        "{e}"
    );
    assert_eq!(d.list_json().len(), 1, "a failed add left a device behind");
    let want = pattern(81, 1 << 20);
    write_direct(&dev, &want);
    let d = kill9_and_restart(d, name, id);
    holds(&d);
    assert!(
        read_direct(&dev, want.len()) == want,
        "data differ after the restore"
    );
    let again = pattern(82, 1 << 20);
    write_direct(&dev, &again);
    // A restart hands the device over: the stopping daemon gives the lock back.
    let mut d = d;
    d.stop();
    let d = Daemon::start_with(name, &[]);
    wait_live(&d, id, "after a restart");
    holds(&d);
    assert!(
        read_direct(&dev, again.len()) == again,
        "data differ after the restart"
    );
    d.del(&dev);
}

/// A LUKS-encrypted image (`rbd encryption format`): the device is its decrypted data,
/// fio verify passes, `show` and the record name the passphrase file but never hold
/// the passphrase, kill -9 of ublkd recovers with the data (the file read again), and
/// a wrong passphrase is a one-line error.
#[test]
fn an_encrypted_image_serves_its_plaintext_and_recovers() {
    let c = cluster();
    c.create_image("luks", "32M");
    let secret = "luks passphrase in a file";
    let pass = "/tmp/rbd-luks-pass";
    std::fs::write(pass, format!("{secret}\n")).unwrap();
    c.rbd(&["encryption", "format", "rbd/luks", "luks1", pass]);
    let name = "rbd-luks";
    let d = Daemon::start(name);
    let conf = conf();
    let wrong = "/tmp/rbd-luks-wrong";
    // No final newline: one unlock attempt (one key derivation, seconds in the VM).
    std::fs::write(wrong, "not it").unwrap();
    let mut args = vec!["add", "rbd", "rbd/luks", "--conf", &conf];
    args.extend([
        "--encryption-format",
        "luks1",
        "--encryption-passphrase-file",
    ]);
    let e = d.ctl_err(&[&args[..], &[wrong]].concat());
    assert!(
        e.contains("cannot unlock the luks1 encryption of rbd image rbd/luks"),
        "{e}"
    );
    let dev = add_rbd(
        &d,
        "rbd/luks",
        &[
            "--encryption-format",
            "luks1",
            "--encryption-passphrase-file",
            pass,
        ],
    );
    let id = dev_id(&dev);
    let size: u64 = std::fs::read_to_string(format!("/sys/block/{}/size", &dev[5..]))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        size * 512 < 32 << 20,
        "the device is not the decrypted data: {size} sectors"
    );
    let show = d.show_json(id).to_string();
    assert!(
        show.contains("luks1, passphrase file /tmp/rbd-luks-pass"),
        "{show}"
    );
    let record = std::fs::read_to_string(d.record_path(id)).unwrap();
    assert!(
        !show.contains(secret) && !record.contains(secret),
        "{show} {record}"
    );
    fio(&verify_job(&dev, "randwrite", "4k", "2M", 16));
    let d = written_survives_kill9(d, name, &dev, pattern(83, 1 << 20));
    d.del(&dev);
}
