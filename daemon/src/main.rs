//! ublkd: serves ublk block devices; controlled by `ublkctl` over a Unix socket.

mod control;
mod daemon;
mod device;
mod kernel;
mod queue;

use anyhow::{Context, Result};
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::path::PathBuf;
use std::sync::Arc;

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
    /// Directory for the daemon's state (device records).
    #[arg(long, default_value = "/var/lib/ublkd")]
    state_dir: PathBuf,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    if let Err(e) = run(&args) {
        log::error!("{e:#}");
        eprintln!("ublkd: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    let kernel = kernel::KernelInfo::probe()?;
    let (names, _) = ublkd_proto::features::decode(kernel.features);
    log::info!(
        "ublk driver features {:#x} ({}); up to {} queues per device",
        kernel.features,
        names.join(" "),
        kernel.max_queues
    );
    std::fs::create_dir_all(&args.state_dir).with_context(|| {
        format!(
            "cannot create the state directory {}",
            args.state_dir.display()
        )
    })?;

    let mut signals = Signals::new([SIGTERM, SIGINT]).context("cannot install signal handlers")?;
    let daemon = Arc::new(daemon::Daemon::new(kernel));
    let listener = control::bind(&args.socket)?;
    log::info!("listening on {}", args.socket.display());
    {
        let daemon = daemon.clone();
        let path = args.socket.clone();
        std::thread::Builder::new()
            .name("ublkd-accept".into())
            .spawn(move || control::serve(listener, daemon, path))
            .context("cannot start the accept thread")?;
    }

    let signal = signals.forever().next();
    log::info!(
        "signal {}: deleting devices and exiting",
        signal.unwrap_or(0)
    );
    daemon.shutdown();
    if let Err(e) = std::fs::remove_file(&args.socket) {
        log::warn!("cannot remove {}: {e}", args.socket.display());
    }
    log::info!("exit");
    Ok(())
}
