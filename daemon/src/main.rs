//! ublkd: serves ublk block devices; controlled by `ublkctl` over a Unix socket.

mod control;
mod daemon;
mod device;
mod fault;
mod kernel;
mod logging;
mod queue;
mod service;
mod state;
mod writeback;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, ValueEnum};
use daemon::ExitMode;
use sd_notify::NotifyState;
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "ublkd",
    version,
    about = "Userspace block device daemon (Linux ublk)"
)]
struct Args {
    /// Control socket that ublkctl connects to.
    #[arg(long, default_value = ublkd_proto::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Let the members of GROUP use the control socket too (it is then mode 0660 with
    /// that group); without it only root may.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Directory for the daemon's state (device records).
    #[arg(long, default_value = "/var/lib/ublkd")]
    state_dir: PathBuf,
    /// What SIGTERM does to the devices: `remove` them from the kernel (records stay),
    /// `hand-over` (leave them, IO held, for the next ublkd to recover), or `auto`:
    /// hand-over when systemd stops the service to restart it, remove otherwise.
    #[arg(long, value_enum, default_value_t = OnExit::Auto)]
    on_exit: OnExit,
    /// The ids a device added without `--id` may get: FIRST-LAST, both included. Give
    /// each ublk server on a host a range of its own, so none takes an id that another
    /// one has recorded for a device it restores at its next start.
    #[arg(long, value_name = "FIRST-LAST", default_value = "0-1048575",
          value_parser = |s: &str| ublkd_proto::validate::device_id_range(s).map_err(|e| e.to_string()))]
    device_ids: std::ops::RangeInclusive<u32>,
    /// Act as if the ublk driver lacked these features (names as `ublkctl features`
    /// prints them, comma-separated, e.g. USER_COPY,AUTO_BUF_REG): to try the fallbacks
    /// for older kernels.
    #[arg(long, value_delimiter = ',', value_name = "FEATURES")]
    without_features: Vec<String>,
    /// Test hook: make the daemon fail at a chosen point (see daemon/src/fault.rs).
    #[arg(long, hide = true, value_name = "FAULT")]
    inject_fault: Vec<String>,
    /// Write the ublkd(8) man page to standard output and exit (scripts/install.sh).
    #[arg(long, hide = true)]
    generate_man: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnExit {
    Auto,
    Remove,
    HandOver,
}

fn main() {
    logging::init();
    let args = Args::parse();
    if args.generate_man {
        let man = clap_mangen::Man::new(Args::command())
            .section("8")
            .manual("ublkd");
        if let Err(e) = man.render(&mut std::io::stdout()) {
            eprintln!("ublkd: cannot write the man page: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = run(&args) {
        log::error!("{e:#}");
        eprintln!("ublkd: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    fault::arm(fault::parse(&args.inject_fault)?);
    let mut hidden = 0u64;
    for name in &args.without_features {
        let Some(&(bit, _)) = ublkd_proto::features::FEATURES
            .iter()
            .find(|(_, n)| n.eq_ignore_ascii_case(name.trim_start_matches("UBLK_F_")))
        else {
            bail!("--without-features: unknown feature '{name}' (see 'ublkctl features')");
        };
        hidden |= 1u64 << bit;
    }
    let group = match &args.socket_group {
        Some(name) => Some(control::SocketGroup::lookup(name)?),
        None => None,
    };
    let mut kernel = kernel::KernelInfo::probe()?;
    kernel.features &= !hidden;
    let (names, _) = ublkd_proto::features::decode(kernel.features);
    log::info!(
        "ublk driver features {:#x} ({}); up to {} queues per device",
        kernel.features,
        names.join(" "),
        kernel.max_queues
    );
    lock_memory();
    // Read before any thread is pinned: the CPUs queue threads may be placed on.
    let _ = queue::allowed_cpus();
    let state = state::StateDir::open(&args.state_dir)?;

    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGUSR1]).context("cannot install signal handlers")?;
    let daemon = Arc::new(daemon::Daemon::new(kernel, state, args.device_ids.clone()));
    let listener = control::bind(&args.socket, group.as_ref())?;
    match &group {
        Some(g) => log::info!(
            "listening on {} (root and group '{}')",
            args.socket.display(),
            g.name
        ),
        None => log::info!("listening on {} (root only)", args.socket.display()),
    }
    {
        let daemon = daemon.clone();
        let path = args.socket.clone();
        std::thread::Builder::new()
            .name("ublkd-accept".into())
            .spawn(move || control::serve(listener, daemon, path, group))
            .context("cannot start the accept thread")?;
    }

    // Ready only once every recorded device is served again (or known to fail).
    let (served, failed) = daemon.restore_all()?;
    log::info!("ready: {served} devices restored, {failed} failed");
    service::notify(&[NotifyState::Ready, NotifyState::Status(&status(&daemon))]);

    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("ublkd-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGUSR1 {
                    // A state dump into the log, for a hang: the process goes on.
                    log::warn!("signal {sig}: every queue logs its state");
                    queue::request_dump();
                    continue;
                }
                if tx.send(sig).is_err() {
                    break;
                }
            }
        })
        .context("cannot start the signal thread")?;
    // The watchdog is fed from here, and only while the device table can be taken:
    // a daemon stuck on it stops feeding, and systemd restarts it (devices recover).
    let interval = service::watchdog_interval();
    let signal = loop {
        match rx.recv_timeout(interval.unwrap_or(Duration::from_secs(3600))) {
            Ok(sig) => break sig,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if interval.is_some() && daemon.responsive() {
                    let status = status(&daemon);
                    service::notify(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break 0,
        }
    };

    let mode = match args.on_exit {
        OnExit::Remove => ExitMode::RemoveDevices,
        OnExit::HandOver => ExitMode::HandOver,
        OnExit::Auto if service::stopping_for_restart() => ExitMode::HandOver,
        OnExit::Auto => ExitMode::RemoveDevices,
    };
    log::info!(
        "signal {signal}: {}",
        match mode {
            ExitMode::RemoveDevices => "removing the devices (their records stay) and exiting",
            ExitMode::HandOver => "leaving the devices to the next ublkd and exiting",
        }
    );
    service::notify(&[NotifyState::Stopping]);
    daemon.shutdown(mode);
    if let Err(e) = std::fs::remove_file(&args.socket) {
        log::warn!("cannot remove {}: {e}", args.socket.display());
    }
    log::info!("exit");
    Ok(())
}

/// Keeps the daemon's memory resident: a page of ublkd's swapped out, or its code
/// dropped from the page cache, could need IO that waits on one of its own devices under
/// memory pressure. Pages are locked as they are first touched (MCL_ONFAULT), so thread
/// stacks and unused heap cost nothing; the request buffers are locked whole when a
/// queue starts.
fn lock_memory() {
    // SAFETY: mlockall takes flags only.
    let r = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
    if r != 0 {
        log::warn!(
            "cannot lock the daemon's memory (mlockall: {}); raise the memory lock limit \
             (LimitMEMLOCK=infinity in the unit, or run as root)",
            std::io::Error::last_os_error()
        );
    }
}

/// The service's status line (`systemctl status ublkd`).
fn status(daemon: &daemon::Daemon) -> String {
    let (live, failed, connecting) = daemon.counts();
    let mut text = format!("serving {live} devices");
    if connecting > 0 {
        text += &format!(", {connecting} connecting");
    }
    if failed > 0 {
        text += &format!(", {failed} failed");
    }
    if connecting + failed > 0 {
        text += " (see 'ublkctl list')";
    }
    text
}
