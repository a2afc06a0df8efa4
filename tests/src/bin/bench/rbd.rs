//! The rbd benchmark: ublkd's rbd target against rbd-nbd (librbd behind the kernel's nbd
//! client) and krbd (the kernel's own rbd driver, `drivers/block/rbd` on
//! `net/ceph/libceph`), each on its own 64 MiB image of the single-node test cluster
//! (tests/src/ceph.rs): one image each, so no two take an image's exclusive lock from
//! each other.
//!
//! krbd needs the `rbd` module (scripts/bench.sh has tests/vm/kernel.sh extract it and
//! libceph for this benchmark); when it cannot be loaded or the image cannot be mapped,
//! the benchmark says why in one line and goes on without it.
//!
//! A `--ublkd` variant may carry two options of the benchmark's own, which it does not
//! pass to `ublkctl add`:
//! - `--image-feature FEATURES` (as `rbd create` takes it, e.g. `layering`): the
//!   benchmark creates that variant's image with those features instead of the
//!   cluster's defaults;
//! - `--daemon-env NAME=VALUE[,NAME=VALUE...]`: the variant's device is served by a
//!   second ublkd started with that environment (an allocator setting such as
//!   `MALLOC_ARENA_MAX=4`), so that it is compared with the default in one VM run.

use super::table::compare;
use super::{add_ublkd, Settings, LOOP_ROWS};
use std::process::Command;
use ublkd_proto::ceph_option::MsMode;
use ublkd_tests::{fio, run_ok, Daemon};

/// The benchmark's own options in a `--ublkd` variant: the features of its image, and
/// the environment of the ublkd that serves it.
const IMAGE_FEATURE: &str = "--image-feature";
const DAEMON_ENV: &str = "--daemon-env";

/// Fills `dev` once with 512 KiB writes, so reads find written objects (librbd and krbd
/// answer reads of objects that were never written without asking an OSD).
fn fill(dev: &str, size: &str) {
    fio(&[
        "--name=fill",
        &format!("--filename={dev}"),
        "--ioengine=io_uring",
        "--direct=1",
        "--rw=write",
        "--bs=512k",
        "--iodepth=8",
        &format!("--size={size}"),
    ]);
}

/// A `--ublkd` variant: its `ublkctl add` arguments, and the benchmark's own options
/// split off them.
struct Variant {
    args: Vec<String>,
    features: Option<String>,
    /// `--daemon-env`, as given (NAME=VALUE,...); None for the default daemon.
    env: Option<String>,
}

impl Variant {
    fn parse(extra: &[String]) -> Variant {
        let mut v = Variant {
            args: Vec::new(),
            features: None,
            env: None,
        };
        let mut it = extra.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                IMAGE_FEATURE => v.features = it.next().cloned(),
                DAEMON_ENV => v.env = it.next().cloned(),
                _ => v.args.push(a.clone()),
            }
        }
        v
    }

    /// The `--daemon-env` variables as (name, value) pairs.
    fn env_pairs(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .flat_map(|e| e.split(','))
            .map(|kv| {
                kv.split_once('=')
                    .unwrap_or_else(|| panic!("{DAEMON_ENV} takes NAME=VALUE, not {kv:?}"))
            })
            .collect()
    }
}

/// A krbd mapping: its id under /sys/bus/rbd/devices and its `/dev/rbdN`.
struct Krbd {
    id: String,
    dev: String,
}

/// Loads the rbd module (and libceph with it) and maps `rbd/IMAGE` of the test cluster
/// with krbd as `client.admin`, whose cephx key is `key`, in msgr2 mode `ms_mode` if
/// given (else msgr1, krbd's default). Err says why not, in one line.
fn krbd_map(image: &str, key: &str, ms_mode: Option<MsMode>) -> Result<Krbd, String> {
    load_module("rbd")?;
    let ids = || -> Vec<String> {
        std::fs::read_dir("/sys/bus/rbd/devices")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let before = ids();
    let add = "/sys/bus/rbd/add_single_major";
    let (port, mode) = match ms_mode {
        Some(m) => (3300, format!(",ms_mode={}", m.name())),
        None => (6789, String::new()),
    };
    let spec = format!(
        "{}:{port} name=admin,secret={key}{mode} rbd {image}",
        ublkd_tests::ceph::MON_HOST
    );
    if let Err(e) = std::fs::write(add, &spec) {
        return Err(format!(
            "mapping rbd/{image} through {add} failed: {e}; kernel: {}",
            last_rbd_message()
        ));
    }
    let id = ids()
        .into_iter()
        .find(|i| !before.contains(i))
        .ok_or("mapped, but no new device under /sys/bus/rbd/devices")?;
    let dev = format!("/dev/rbd{id}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::path::Path::new(&dev).exists() {
        if std::time::Instant::now() > deadline {
            return Err(format!("mapped as id {id}, but {dev} did not appear"));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(Krbd { id, dev })
}

/// Loads module `name` from /lib/modules after the modules it depends on, as
/// /lib/modules/modules.dep lists them (tests/vm/kernel.sh writes it; busybox modprobe
/// loaded libceph before its dependency krb5). Err says which insmod failed and why.
fn load_module(name: &str) -> Result<(), String> {
    if std::path::Path::new(&format!("/sys/module/{name}")).exists() {
        return Ok(());
    }
    let dep = std::fs::read_to_string("/lib/modules/modules.dep")
        .map_err(|e| format!("cannot read /lib/modules/modules.dep: {e}"))?;
    let prefix = format!("{name}.ko:");
    let line = dep
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .ok_or_else(|| {
            format!("module {name} is not in the guest (tests/vm/kernel.sh extracts it when UBLKD_VM_EXTRA_MODULES names it)")
        })?;
    for d in line.split_whitespace() {
        load_module(d.trim_end_matches(".ko"))?;
    }
    let out = Command::new("insmod")
        .arg(format!("/lib/modules/{name}.ko"))
        .output()
        .map_err(|e| format!("cannot run insmod: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "insmod {name}.ko failed: {}; kernel: {}",
            String::from_utf8_lossy(&out.stderr).trim(),
            last_rbd_message()
        ));
    }
    Ok(())
}

/// The kernel's last message from rbd, libceph or a module load: why a map or load failed.
fn last_rbd_message() -> String {
    Command::new("dmesg")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .rev()
                .find(|l| {
                    ["rbd", "libceph", "module", "symbol"]
                        .iter()
                        .any(|w| l.contains(w))
                })
                .map(str::to_string)
        })
        .unwrap_or_else(|| "no message".into())
}

fn krbd_unmap(k: &Krbd) {
    if let Err(e) = std::fs::write("/sys/bus/rbd/remove_single_major", &k.id) {
        eprintln!("krbd: unmapping {} failed: {e}", k.dev);
    }
}

pub(super) fn bench(s: &Settings) {
    let c = ublkd_tests::ceph::shared();
    let conf = c.conf.to_str().expect("utf-8 conf path").to_string();
    let ms_mode: Option<MsMode> = s
        .ms_mode
        .as_ref()
        .map(|m| m.parse().unwrap_or_else(|e| panic!("--ms-mode: {e}")));
    c.create_image("bench-nbd", "64M");
    let mut nbd_args = vec!["--conf".to_string(), conf.clone()];
    for (name, modes) in ms_mode.iter().flat_map(|m| m.options()) {
        nbd_args.push(format!("--{name}={modes}"));
    }
    nbd_args.extend(["map".to_string(), "rbd/bench-nbd".to_string()]);
    let nbd_args: Vec<&str> = nbd_args.iter().map(String::as_str).collect();
    let nbd = run_ok("/usr/bin/rbd-nbd", &nbd_args).trim().to_string();
    let mut devices = vec![("rbd-nbd".to_string(), nbd.clone())];
    c.create_image("bench-krbd", "64M");
    let krbd = match krbd_map("bench-krbd", &c.admin_key, ms_mode) {
        Ok(k) => {
            devices.push(("krbd".to_string(), k.dev.clone()));
            Some(k)
        }
        Err(e) => {
            println!("krbd: not measured: {e}");
            None
        }
    };
    let d = Daemon::start("bench-rbd");
    // One more daemon per distinct `--daemon-env`, with its devices.
    let mut others: Vec<(String, Daemon)> = Vec::new();
    let mut added: Vec<(Option<usize>, String)> = Vec::new();
    for (n, extra) in s.variants.iter().enumerate() {
        let v = Variant::parse(extra);
        let image = format!("bench-ublkd{n}");
        let size = "64M".to_string();
        let mut create = vec!["create", "--size", &size];
        if let Some(f) = &v.features {
            create.extend([IMAGE_FEATURE, f]);
        }
        let spec = format!("rbd/{image}");
        create.push(&spec);
        c.rbd(&create);
        // The daemon that serves it: None for `d`, else its index in `others`.
        let slot = v.env.as_ref().map(|env| {
            others
                .iter()
                .position(|(e, _)| e == env)
                .unwrap_or_else(|| {
                    let name = format!("bench-rbd-env{}", others.len());
                    let mut other = Daemon::spawn_with_env(&name, &[], &v.env_pairs());
                    other.wait_ready();
                    others.push((env.clone(), other));
                    others.len() - 1
                })
        });
        let served_by = slot.map_or(&d, |i| &others[i].1);
        let mut args = vec!["rbd", &spec, "--conf", &conf, "--depth", "128"];
        if let Some(m) = &ms_mode {
            if !v.args.iter().any(|a| a == "--ms-mode") {
                args.extend(["--ms-mode", m.name()]);
            }
        }
        let (mut label, dev) = add_ublkd(served_by, args, &v.args);
        if let Some(f) = &v.features {
            label.push_str(&format!(" img {f}"));
        }
        if let Some(env) = &v.env {
            label.push_str(&format!(" {env}"));
        }
        added.push((slot, dev.clone()));
        devices.push((label, dev));
    }
    for (_, dev) in &devices {
        fill(dev, "64M");
    }
    let krbd_text = match &krbd {
        Some(k) => format!(
            " vs krbd ({}: rbd module, queue depth {})",
            k.dev,
            std::fs::read_to_string(format!("/sys/block/rbd{}/queue/nr_requests", k.id))
                .unwrap_or_default()
                .trim()
        ),
        None => String::new(),
    };
    let mode_text = match ms_mode {
        Some(m) => format!("; every client in msgr2 mode {} (--ms-mode)", m.name()),
        None => "; Ceph's default msgr modes (krbd: msgr1)".to_string(),
    };
    println!(
        "rbd: rbd-nbd ({nbd}){krbd_text} vs ublkd rbd (depth 128; one queue unless --queues), each on its own 64 MiB image of a one-OSD memstore cluster in the VM{mode_text}"
    );
    let mut refs = vec![(0, "vs rbd-nbd")];
    if krbd.is_some() {
        refs.push((1, "vs krbd"));
    }
    println!(
        "fio io_uring, direct, {} job(s) sharing the queue depth, {} s per run (+1 s ramp), {} rounds, median shown; ratios = device / rbd-nbd{}",
        s.jobs,
        s.runtime,
        s.rounds,
        if krbd.is_some() { ", device / krbd" } else { "" }
    );
    println!();
    compare(&devices, &refs, &LOOP_ROWS, s);
    let _ = Command::new("/usr/bin/rbd-nbd")
        .args(["--conf", &conf, "unmap", &nbd])
        .status();
    if let Some(k) = &krbd {
        krbd_unmap(k);
    }
    for (slot, udev) in &added {
        let served_by = slot.map_or(&d, |i| &others[i].1);
        served_by.ctl_ok(&["del", &ublkd_tests::dev_id(udev).to_string()]);
    }
}

#[cfg(test)]
mod tests {
    use super::Variant;

    #[test]
    fn the_benchmarks_own_options_are_split_off() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let parsed = Variant::parse(&v(&[
            "--queues",
            "2",
            "--image-feature",
            "layering",
            "--daemon-env",
            "MALLOC_ARENA_MAX=4,A=b=c",
        ]));
        assert_eq!(parsed.args, v(&["--queues", "2"]));
        assert_eq!(parsed.features.as_deref(), Some("layering"));
        assert_eq!(
            parsed.env_pairs(),
            vec![("MALLOC_ARENA_MAX", "4"), ("A", "b=c")]
        );
        let plain = Variant::parse(&v(&[]));
        assert_eq!(
            (plain.args.len(), plain.features, plain.env),
            (0, None, None)
        );
    }
}
