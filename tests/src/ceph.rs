//! A single-node Ceph cluster for the rbd tests: one monitor and one OSD on 127.0.0.1,
//! memstore, no mgr, everything under one directory. Monitor commands go as JSON through
//! librados (the test VM has no Python, so no `ceph` tool); images are made with the
//! `rbd` tool. Dropping the cluster kills its daemons.
//!
//! cephx is required everywhere, as in a production cluster: the keys of `mon.`,
//! `client.admin` and `osd.0` are made here and kept in one keyring that the conf names,
//! so the daemons, the `rbd` tool, rbd-nbd and ublkd find the admin's key through the
//! conf; [`Cluster::add_user`] makes a client with narrower caps and a keyring of its own.
//!
//! `osd client watch timeout` is 10 s instead of 30 s: a client that died holding an
//! image's exclusive lock (kill -9 of ublkd) counts as gone after that long, and only then
//! may the next one break its lock and write.
//!
//! The monitor listens on the fixed ports 3300 and 6789: one cluster at a time per
//! machine (a test binary shares one, see [`shared`]).

use base64::Engine;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use ublkd_targets::rbd::rados::{ConnectOptions, Rados};

/// The monitor's address, as `mon host` and the monmap name it.
pub const MON_HOST: &str = "127.0.0.1";

pub struct Cluster {
    pub dir: PathBuf,
    /// The cluster's ceph.conf: what `ublkctl add rbd --conf` takes.
    pub conf: PathBuf,
    /// `client.admin`'s key (base64), for krbd's `secret=` and `--keyfile`.
    pub admin_key: String,
    /// The client the cluster is set up through; taken by [`Cluster::disconnect`].
    rados: Mutex<Option<Arc<Rados>>>,
    osd_uuid: String,
    mon: Option<Child>,
    osd: Mutex<Option<Child>>,
}

fn uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("read a uuid")
        .trim()
        .to_string()
}

/// A new cephx key as Ceph writes one: base64 of the key's type (1, AES), its creation
/// time (seconds, nanoseconds), its length and 16 random bytes.
pub fn new_key() -> String {
    let mut secret = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut secret))
        .expect("read 16 random bytes");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is past 1970");
    let mut raw = Vec::with_capacity(28);
    raw.extend_from_slice(&1u16.to_le_bytes());
    raw.extend_from_slice(&(now.as_secs() as u32).to_le_bytes());
    raw.extend_from_slice(&now.subsec_nanos().to_le_bytes());
    raw.extend_from_slice(&(secret.len() as u16).to_le_bytes());
    raw.extend_from_slice(&secret);
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// A keyring entry: `[ENTITY]`, its key, and its caps (`(service, cap)` pairs).
pub fn keyring_entry(entity: &str, key: &str, caps: &[(&str, &str)]) -> String {
    let mut text = format!("[{entity}]\n\tkey = {key}\n");
    for (service, cap) in caps {
        text.push_str(&format!("\tcaps {service} = \"{cap}\"\n"));
    }
    text
}

fn conf_text(dir: &Path, fsid: &str) -> String {
    let d = dir.display();
    format!(
        "[global]
fsid = {fsid}
mon host = {MON_HOST}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
osd objectstore = memstore
memstore device bytes = 536870912
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd crush chooseleaf type = 0
osd pool default pg autoscale mode = off
mon mgr mkfs grace = 86400
mon warn on insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
ms bind ipv6 = false
osd client watch timeout = 10
run dir = {d}/run
log file = {d}/log/$name.log
admin socket = {d}/run/$name.asok
mon data = {d}/mon/$cluster-$id
osd data = {d}/osd/$cluster-$id
keyring = {d}/keyring
"
    )
}

/// Runs `program args` to completion; panics with its output when it fails.
fn run(program: &str, args: &[&str]) -> String {
    run_or_explain(program, args, &String::new)
}

/// `run`, with `context()` added to the panic message when `program` fails.
fn run_or_explain(program: &str, args: &[&str], context: &dyn Fn() -> String) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e} (install ceph: tests/vm/setup-host.sh)")
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        context()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn spawn(program: &str, args: &[&str], log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("create a daemon log");
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"))
}

impl Cluster {
    /// Makes and starts a cluster in `dir` (emptied first) with pool `rbd` ready for
    /// images. Takes about 15 s.
    pub fn start(dir: &Path) -> Cluster {
        let started = Instant::now();
        let _ = std::fs::remove_dir_all(dir);
        for sub in ["run", "log", "mon", "osd/ceph-0"] {
            std::fs::create_dir_all(dir.join(sub)).expect("create the cluster's directories");
        }
        let fsid = uuid();
        let conf = dir.join("ceph.conf");
        std::fs::write(&conf, conf_text(dir, &fsid)).expect("write ceph.conf");
        let c = conf.to_str().expect("utf-8 path");
        // Every key in the conf's keyring: the monitor imports them all at --mkfs, so
        // the admin and the OSD exist with their caps from the start.
        let admin_key = new_key();
        let keyring = dir.join("keyring");
        let all = [
            keyring_entry("mon.", &new_key(), &[("mon", "allow *")]),
            keyring_entry(
                "client.admin",
                &admin_key,
                &[("mon", "allow *"), ("osd", "allow *"), ("mgr", "allow *")],
            ),
            keyring_entry(
                "osd.0",
                &new_key(),
                &[("mon", "allow profile osd"), ("osd", "allow *")],
            ),
        ];
        std::fs::write(&keyring, all.concat()).expect("write the cluster's keyring");
        let k = keyring.to_str().expect("utf-8 path");
        let monmap = dir.join("monmap");
        let m = monmap.to_str().expect("utf-8 path");
        let addrs = format!("[v2:{MON_HOST}:3300,v1:{MON_HOST}:6789]");
        run(
            "monmaptool",
            &[
                "--conf", c, "--create", "--addv", "a", &addrs, "--fsid", &fsid, m,
            ],
        );
        run(
            "ceph-mon",
            &[
                "--conf",
                c,
                "--mkfs",
                "-i",
                "a",
                "--monmap",
                m,
                "--keyring",
                k,
            ],
        );
        let mon = spawn(
            "ceph-mon",
            &["--conf", c, "-i", "a", "-f"],
            &dir.join("log/mon.out"),
        );
        let rados = Rados::connect(&ConnectOptions {
            conf: Some(c.to_string()),
            user: "admin".into(),
            keyring: None,
            mon_timeout: Duration::from_secs(30),
            osd_timeout: Duration::from_secs(60),
            options: Vec::new(),
        })
        .unwrap_or_else(|e| panic!("the test cluster's monitor does not answer: {e}"));
        let cluster = Cluster {
            dir: dir.to_path_buf(),
            conf: conf.clone(),
            admin_key,
            rados: Mutex::new(Some(rados)),
            osd_uuid: uuid(),
            mon: Some(mon),
            osd: Mutex::new(None),
        };
        let id = cluster.mon_command(json!({"prefix": "osd new", "uuid": cluster.osd_uuid}));
        assert_eq!(id.trim(), "0", "osd new gave osd {id:?}");
        run(
            "ceph-osd",
            &[
                "--conf",
                c,
                "-i",
                "0",
                "--mkfs",
                "--osd-uuid",
                &cluster.osd_uuid,
            ],
        );
        cluster.start_osd();
        cluster.mon_command(json!({"prefix": "osd pool create", "pool": "rbd", "pg_num": 8}));
        cluster.rbd(&["pool", "init", "rbd"]);
        eprintln!(
            "ceph: cluster in {} up in {:.1} s",
            dir.display(),
            started.elapsed().as_secs_f64()
        );
        cluster
    }

    /// Sends a monitor command; panics when it fails. Returns its output.
    pub fn mon_command(&self, cmd: Value) -> String {
        self.rados()
            .mon_command(&cmd.to_string())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Sets option `name` of daemon type `who` (`mon`, `osd`) in the monitors' config
    /// database, or removes it (`None`: back to Ceph's default). The daemons learn of it
    /// on their own time: see [`Cluster::wait_config`].
    pub fn set_config(&self, who: &str, name: &str, value: Option<&str>) {
        self.mon_command(match value {
            Some(v) => json!({"prefix": "config set", "who": who, "name": name, "value": v}),
            None => json!({"prefix": "config rm", "who": who, "name": name}),
        });
    }

    /// Waits up to 30 s until daemon `daemon` (`mon.a`, `osd.0`) runs with `value` for
    /// option `name`. The monitors send a `config set` to the daemons after they answer
    /// it: a client that connected right after one once met an OSD still on the old value
    /// (CI, 2026-12-07).
    pub fn wait_config(&self, daemon: &str, name: &str, value: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.daemon_config(daemon, name);
            if now == value {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{daemon} still runs with {name}={now:?}, 30 s after it was set to {value:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The value daemon `daemon` runs with for option `name`, asked of the daemon itself
    /// (`ceph tell`, so only where the `ceph` tool is: the host, not the VM).
    pub fn daemon_config(&self, daemon: &str, name: &str) -> String {
        let c = self.conf.to_str().expect("utf-8 path");
        let args = [
            "--conf", c, "tell", daemon, "config", "get", name, "--format", "json",
        ];
        let out = run("ceph", &args);
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("ceph {args:?} gave {out:?}: {e}"));
        v[name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name} in {v}"))
            .to_string()
    }

    /// Makes cephx user `client.NAME` with `caps` (`(service, cap)` pairs, such as
    /// `("osd", "profile rbd pool=rbd")`) and writes its keyring to the cluster's folder.
    /// Returns the keyring's path and the user's key.
    pub fn add_user(&self, name: &str, caps: &[(&str, &str)]) -> (PathBuf, String) {
        let entity = format!("client.{name}");
        let flat: Vec<&str> = caps.iter().flat_map(|(s, c)| [*s, *c]).collect();
        let out = self.mon_command(json!({
            "prefix": "auth get-or-create",
            "entity": entity,
            "caps": flat,
            "format": "json",
        }));
        let made: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("auth get-or-create gave {out:?}: {e}"));
        let key = made[0]["key"]
            .as_str()
            .unwrap_or_else(|| panic!("no key in {made}"))
            .to_string();
        let path = self.dir.join(format!("{entity}.keyring"));
        std::fs::write(&path, keyring_entry(&entity, &key, caps)).expect("write a keyring");
        (path, key)
    }

    /// Starts the OSD and waits until the monitor counts it up and in.
    pub fn start_osd(&self) {
        let c = self.conf.to_str().expect("utf-8 path");
        let mut osd = self.osd.lock().unwrap_or_else(|p| p.into_inner());
        assert!(osd.is_none(), "the OSD runs already");
        *osd = Some(spawn(
            "ceph-osd",
            &["--conf", c, "-i", "0", "-f"],
            &self.dir.join("log/osd.out"),
        ));
        drop(osd);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let stat: Value = serde_json::from_str(
                &self.mon_command(json!({"prefix": "osd stat", "format": "json"})),
            )
            .expect("osd stat is JSON");
            if stat["num_up_osds"] == 1 && stat["num_in_osds"] == 1 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the OSD is not up and in after 60 s: {stat}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Kills the OSD (its memstore data goes with it only if it is not restarted with
    /// the same store: memstore keeps it in memory, so a killed OSD loses its data).
    pub fn kill_osd(&self) {
        if let Some(mut child) = self.osd.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) the OSD: an OSD that does not answer for a
    /// while, without losing its memstore data as a killed one would.
    pub fn pause_osd(&self, paused: bool) {
        let osd = self.osd.lock().unwrap_or_else(|p| p.into_inner());
        let pid = osd.as_ref().expect("the OSD runs").id() as i32;
        let sig = if paused { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: sending a signal to a child process of ours.
        unsafe { libc::kill(pid, sig) };
    }

    /// Continues a paused OSD and waits until it serves a new client again (`rbd ls`,
    /// which reads the pool's directory object, within 20 s). Once in the VM, after a
    /// pause of about 13 s, it did not: a request sent before the pause was still
    /// "delayed" in the OSD's log four minutes later, and every new request waited
    /// behind it (no ublkd was involved by then). Should that happen again this says so
    /// with the end of the OSD's log, marks the OSD down so that it re-peers its
    /// placement groups (it keeps its memstore data: the process goes on), and waits
    /// once more. Whether it serves in the end.
    pub fn resume_osd(&self) -> bool {
        self.pause_osd(false);
        if self.serves(20) {
            return true;
        }
        eprintln!(
            "ceph: the OSD serves no request 20 s after SIGCONT; marking it down so that it re-peers\n{}",
            self.log_tails(20)
        );
        self.mon_command(json!({"prefix": "osd down", "ids": ["0"]}));
        let serves = self.serves(60);
        if !serves {
            eprintln!(
                "ceph: the OSD serves no request after re-peering either\n{}",
                self.log_tails(40)
            );
        }
        serves
    }

    /// Whether `rbd ls` (a read of the pool's directory object on the OSD) succeeds
    /// within `secs` seconds.
    fn serves(&self, secs: u32) -> bool {
        self.rbd_command(secs)
            .args(["ls", "rbd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The `rbd` tool on this cluster, its monitor and OSD requests bounded by `secs`.
    fn rbd_command(&self, secs: u32) -> Command {
        let secs = secs.to_string();
        let mut cmd = Command::new("rbd");
        cmd.args(["--conf", self.conf.to_str().expect("utf-8 path")])
            .args(["--rados-osd-op-timeout", &secs])
            .args(["--rados-mon-op-timeout", &secs])
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the `rbd` tool against this cluster; returns its stdout. Its requests give
    /// up after 120 s (an `rbd create` once hung in the VM), and a failure shows the
    /// end of the monitor's and the OSD's logs.
    pub fn rbd(&self, args: &[&str]) -> String {
        let mut full = vec!["--conf", self.conf.to_str().expect("utf-8 path")];
        full.extend_from_slice(&["--rados-osd-op-timeout", "120"]);
        full.extend_from_slice(&["--rados-mon-op-timeout", "120"]);
        full.extend_from_slice(&["--client-mount-timeout", "120"]);
        full.extend_from_slice(args);
        let logs = || self.log_tails(40);
        crate::traced(
            || format!("rbd {args:?}"),
            || run_or_explain("rbd", &full, &logs),
        )
    }

    /// `rbd ARGS` that may fail: whether it succeeded, and its stdout and stderr.
    pub fn try_rbd(&self, args: &[&str]) -> (bool, String) {
        let out = self
            .rbd_command(120)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run rbd: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// The last `lines` lines of the monitor's and the OSD's logs.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for name in ["mon.a.log", "osd.0.log", "osd.out"] {
            let path = self.dir.join("log").join(name);
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let tail = all[all.len().saturating_sub(lines)..].join("\n");
            out.push_str(&format!(
                "\n---- {} (last {lines} lines)\n{tail}",
                path.display()
            ));
        }
        out
    }

    /// Creates image `rbd/NAME` of `size` (an `rbd --size` value such as `64M`).
    pub fn create_image(&self, name: &str, size: &str) {
        self.rbd(&["create", "--size", size, &format!("rbd/{name}")]);
    }

    /// The librados handle the cluster was set up through.
    pub fn rados(&self) -> Arc<Rados> {
        self.rados
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .expect("the cluster's client is disconnected")
    }

    /// Shuts the cluster's librados client down (its threads joined) if nothing else
    /// holds it. Done before the daemons are killed: a client whose monitor vanishes while
    /// the process exits can abort in librados' threads (seen as `boost::bad_get` and
    /// SIGABRT after every test had passed).
    fn disconnect(&self) {
        let client = self.rados.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(client);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.disconnect();
        self.kill_osd();
        if let Some(mut mon) = self.mon.take() {
            let _ = mon.kill();
            let _ = mon.wait();
        }
    }
}

/// One cluster for the whole test binary, started by the first test that asks, in
/// `/tmp/ublkd-ceph`. It lives until the process ends; its daemons are killed then by
/// [`kill_shared_at_exit`] (a static is never dropped).
pub fn shared() -> &'static Cluster {
    SHARED.get_or_init(|| {
        let c = Cluster::start(Path::new("/tmp/ublkd-ceph"));
        kill_shared_at_exit();
        c
    })
}

static SHARED: OnceLock<Cluster> = OnceLock::new();

/// Registers an atexit handler that shuts the shared cluster's client down, then kills
/// its daemons.
fn kill_shared_at_exit() {
    extern "C" fn kill() {
        if let Some(c) = SHARED.get() {
            c.disconnect();
        }
        // The daemons' pids, from /proc: children of this process named ceph-*.
        let me = std::process::id();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
            // "pid (comm) state ppid ..."
            let Some((comm, rest)) = stat.split_once(") ") else {
                continue;
            };
            let ppid = rest.split(' ').nth(1).and_then(|s| s.parse::<u32>().ok());
            if comm.contains("(ceph-") && ppid == Some(me) {
                // SAFETY: sending a signal to a child process of ours.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    // SAFETY: registering a plain extern "C" function with no arguments.
    unsafe { libc::atexit(kill) };
}
