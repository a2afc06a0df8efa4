//! ublkctl: the control tool for ublkd.

mod client;
mod generate;
mod output;
mod prometheus;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use ublkd_proto::size::parse_size;
use ublkd_proto::validate::{DEFAULT_DEPTH, DEFAULT_NULL_SIZE, DEFAULT_QUEUES};
use ublkd_proto::{
    AddDevice, BufferMode, DeviceRef, DirectIo, QueueAffinity, Request, Response, TargetSpec,
};

#[derive(Debug, Parser)]
#[command(
    name = "ublkctl",
    version,
    about = "Control ublkd, the userspace block device daemon"
)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, default_value = ublkd_proto::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a device; prints its block device path once it serves IO.
    Add {
        #[command(subcommand)]
        target: AddTarget,
    },
    /// Delete devices.
    ///
    /// Each device's dirty pages are written back and its requests drained first. An nbd
    /// device waits for a connected server up to its request timeout (30 s by default),
    /// and not at all for one that is unreachable; what is left then fails with EIO.
    Del {
        /// The devices to delete, by id or name.
        #[arg(
            required_unless_present = "all",
            conflicts_with = "all",
            value_name = "ID|NAME"
        )]
        ids: Vec<DeviceRef>,
        /// Delete every device.
        #[arg(long)]
        all: bool,
        /// Delete devices that are mounted or open too: what is still sent to them
        /// fails with EIO. Without it, del refuses such a device and names who holds it.
        #[arg(long)]
        force: bool,
    },
    /// List devices.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one device in detail, with per-queue counters; for a device that is not
    /// served, what its record says and why.
    Show {
        /// The device, by id or name.
        #[arg(value_name = "ID|NAME")]
        id: DeviceRef,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Counters of every device and queue: requests, bytes, errors, in flight, and the
    /// target's own (nbd reconnects).
    Stats {
        /// Print them in the Prometheus text format, for node_exporter's textfile
        /// collector.
        #[arg(long, conflicts_with = "json")]
        prometheus: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the ublk driver's feature bits.
    Features {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve a device again from its record: one the kernel still holds after a crash,
    /// or one whose restore failed (after fixing the cause shown by 'ublkctl list').
    Recover {
        /// The device, by id or name.
        #[arg(value_name = "ID|NAME")]
        id: DeviceRef,
    },
    /// Give a device a new size (Linux 6.16+): a null device any size; a loop device
    /// its backing file's size after the file grew (SIZE left out), or SIZE with
    /// --grow-file, which grows the file first. Loop devices never shrink; nbd devices
    /// take their export's size.
    Resize {
        /// The device, by id or name.
        #[arg(value_name = "ID|NAME")]
        id: DeviceRef,
        /// The new size: bytes, or with a K, M, G or T suffix (1024-based).
        #[arg(value_parser = size_arg)]
        size: Option<String>,
        /// Loop: grow the backing file to SIZE first.
        #[arg(long, requires = "size")]
        grow_file: bool,
    },
}

/// `ublkctl __generate ...`, which scripts/install.sh runs: a parser of its own rather
/// than a hidden subcommand, which the completions would still offer.
#[derive(Debug, Parser)]
#[command(name = "ublkctl __generate")]
enum Generate {
    /// The section 8 pages, ublkctl.8 and one per subcommand, into DIR.
    Man { dir: PathBuf },
    /// The completion script for SHELL, on standard output.
    Completions { shell: generate::Shell },
}

#[derive(Debug, Subcommand)]
enum AddTarget {
    /// A device that completes every request at once and stores nothing.
    Null {
        /// Device size: bytes, or with a K, M, G or T suffix (1024-based).
        #[arg(long, default_value_t = DEFAULT_NULL_SIZE.to_string(), value_parser = size_arg)]
        size: String,
        #[command(flatten)]
        common: CommonAddArgs,
    },
    /// A device backed by an NBD export; its size and capabilities are the server's.
    Nbd {
        /// nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (port 10809 by default);
        /// nbds:// and nbds+unix:// with tls-certificates=DIR for TLS.
        #[arg(long)]
        uri: String,
        /// Connections to the server, one per queue (more than one needs multi-conn);
        /// the same as --queues.
        #[arg(long)]
        connections: Option<u32>,
        /// Seconds to keep reconnecting after the connection drops; requests wait and are
        /// sent again, then fail with EIO. 0 fails them at once.
        #[arg(long, default_value_t = 30)]
        reconnect_timeout: u32,
        /// Seconds a request may wait for its reply; a server that stays connected but
        /// does not answer in time counts as lost (reconnect and resend). 0: no limit.
        /// Also the longest `del` waits for a connected server (30 s when 0).
        #[arg(long, default_value_t = 30)]
        request_timeout: u32,
        #[command(flatten)]
        common: CommonAddArgs,
    },
    /// A device backed by a Ceph RBD image (through librbd); its size is the image's.
    /// A snapshot maps read-only.
    Rbd {
        /// [POOL/[NAMESPACE/]]IMAGE[@SNAP], as for the rbd tool (pool rbd by default).
        #[arg(value_name = "POOL/[NAMESPACE/]IMAGE[@SNAP]")]
        image: String,
        /// The cluster's ceph.conf.
        #[arg(long, default_value = "/etc/ceph/ceph.conf")]
        conf: PathBuf,
        /// The Ceph user, without "client." (the rbd tool's --id/--user; ublkctl's --id
        /// is the device id).
        #[arg(long, default_value = "admin")]
        user: String,
        /// The keyring file with the user's key (read by the daemon; never shown).
        #[arg(long)]
        keyring: Option<PathBuf>,
        /// Map the image read-only.
        #[arg(long)]
        read_only: bool,
        /// Seconds a request waits for its OSD before it fails with EIO; also the
        /// longest `del` waits for requests an unreachable cluster holds.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
        osd_timeout: u32,
        #[command(flatten)]
        common: CommonAddArgs,
    },
    /// A device backed by a regular file or a block device; its size is the file's.
    Loop {
        /// The backing file or block device.
        #[arg(long)]
        file: PathBuf,
        /// O_DIRECT on the backing file: auto (when possible), on (or fail), off.
        #[arg(long, default_value = "auto")]
        direct_io: DirectIo,
        /// Export the file read-only.
        #[arg(long)]
        read_only: bool,
        #[command(flatten)]
        common: CommonAddArgs,
    },
}

/// Options every target takes.
#[derive(Debug, Args)]
struct CommonAddArgs {
    /// Device id, so the device is /dev/ublkbID [default: the first free one].
    #[arg(long)]
    id: Option<u32>,
    /// A label for the device, unique among the daemon's devices.
    #[arg(long)]
    name: Option<String>,
    /// Hardware queues, one daemon thread each [default: 1].
    #[arg(long, help = format!("Hardware queues, one daemon thread each [default: {DEFAULT_QUEUES}]"))]
    queues: Option<u32>,
    /// Requests in flight per queue, 1-4096.
    #[arg(long, help = format!("Requests in flight per queue, 1-4096 [default: {DEFAULT_DEPTH}]"))]
    depth: Option<u32>,
    /// Logical block size: 512 or 4096 [default: 512].
    #[arg(long)]
    block_size: Option<u32>,
    /// How request data moves: copy, fixed, zc, auto-zc [default: the best the kernel supports].
    #[arg(long)]
    buffer: Option<BufferMode>,
    /// Fetch and commit requests in batches (UBLK_F_BATCH_IO, Linux 7.0) [default: off].
    #[arg(long, conflicts_with = "no_batch")]
    batch: bool,
    /// One command per request: the per-tag path (the default).
    #[arg(long)]
    no_batch: bool,
    /// Where the queue threads run: cpu (each pinned to one CPU of the CPUs the kernel
    /// maps to its queue), set (any of those CPUs) or off (not pinned) [default: cpu].
    #[arg(long)]
    affinity: Option<QueueAffinity>,
}

fn size_arg(s: &str) -> Result<String, String> {
    parse_size(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// `path` made absolute (the daemon has its own working directory), as UTF-8.
fn absolute_utf8(path: &std::path::Path) -> Result<String> {
    let abs =
        std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    Ok(abs
        .to_str()
        .ok_or_else(|| anyhow!("{} is not valid UTF-8", abs.display()))?
        .to_string())
}

fn add_request(target: AddTarget) -> Result<AddDevice> {
    let (target, common) = match target {
        AddTarget::Null { size, common } => (
            TargetSpec::Null {
                size: parse_size(&size)?,
            },
            common,
        ),
        AddTarget::Loop {
            file,
            direct_io,
            read_only,
            common,
        } => {
            let file = absolute_utf8(&file)?;
            (
                TargetSpec::Loop {
                    file,
                    direct_io,
                    read_only,
                },
                common,
            )
        }
        AddTarget::Rbd {
            image,
            conf,
            user,
            keyring,
            read_only,
            osd_timeout,
            common,
        } => (
            TargetSpec::Rbd {
                image,
                conf: Some(absolute_utf8(&conf)?),
                user: Some(user),
                keyring: keyring.as_deref().map(absolute_utf8).transpose()?,
                read_only,
                osd_timeout: Some(osd_timeout),
            },
            common,
        ),
        AddTarget::Nbd {
            uri,
            connections,
            reconnect_timeout,
            request_timeout,
            mut common,
        } => {
            match (connections, common.queues) {
                (Some(c), Some(q)) if c != q => {
                    bail!("--connections {c} and --queues {q} disagree: there is one connection per queue")
                }
                (Some(c), _) => common.queues = Some(c),
                _ => {}
            }
            (
                TargetSpec::Nbd {
                    uri,
                    reconnect_timeout: Some(reconnect_timeout),
                    request_timeout: Some(request_timeout),
                },
                common,
            )
        }
    };
    Ok(AddDevice {
        target,
        id: common.id,
        name: common.name,
        queues: common.queues,
        depth: common.depth,
        block_size: common.block_size,
        buffer: common.buffer,
        batch: match (common.batch, common.no_batch) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        affinity: common.affinity,
    })
}

fn main() {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "__generate")
    {
        let what = Generate::parse_from(std::env::args_os().skip(1));
        if let Err(e) = generate(what) {
            eprintln!("ublkctl: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                std::process::exit(0);
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                std::process::exit(2);
            }
            eprintln!(
                "ublkctl: {} (see 'ublkctl --help')",
                output::one_line(&e.to_string())
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = run(cli) {
        eprintln!("ublkctl: {e:#}");
        std::process::exit(1);
    }
}

fn generate(what: Generate) -> Result<()> {
    match what {
        Generate::Man { dir } => {
            for page in generate::man_pages(Cli::command(), &dir)? {
                println!("{}", page.display());
            }
        }
        Generate::Completions { shell } => {
            generate::completions(Cli::command(), shell, &mut std::io::stdout())
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let (request, json) = match cli.command {
        Command::Add { target } => (Request::Add(add_request(target)?), false),
        Command::Del {
            all: true, force, ..
        } => (Request::DelAll { force }, false),
        Command::Del { ids, force, .. } => (Request::Del { ids, force }, false),
        Command::List { json } => (Request::List, json),
        Command::Show { id, json } => (Request::Show { id }, json),
        Command::Features { json } => (Request::Features, json),
        Command::Stats { prometheus, json } => {
            let response = client::call(&cli.socket, &Request::Stats)?;
            let text = match response {
                Response::Stats(devs) if prometheus => prometheus::render(&devs),
                Response::Stats(devs) if json => output::json(&devs)?,
                Response::Stats(devs) => output::stats_table(&devs),
                Response::Error(msg) => bail!("{msg}"),
                other => bail!("unexpected answer from ublkd: {other:?}"),
            };
            print!("{text}");
            return Ok(());
        }
        Command::Recover { id } => (Request::Recover { id }, false),
        Command::Resize {
            id,
            size,
            grow_file,
        } => {
            let size = size.map(|s| parse_size(&s)).transpose()?;
            (
                Request::Resize {
                    id,
                    size,
                    grow_file,
                },
                false,
            )
        }
    };
    let response = client::call(&cli.socket, &request)?;
    let text = match (response, json) {
        (Response::Error(msg), _) => bail!("{msg}"),
        (Response::Added(info), _) | (Response::Recovered(info), _) => {
            format!("{}\n", info.path)
        }
        (Response::Resized(info), _) => format!("{} {}\n", info.path, info.size),
        (Response::Deleted { .. }, _) => String::new(),
        (Response::Devices(devs), true) => output::json(&devs)?,
        (Response::Devices(devs), false) => output::device_table(&devs),
        (Response::Device(d), true) => output::json(&d)?,
        (Response::Device(d), false) => output::device_detail(&d),
        (Response::Features(f), true) => output::json(&f)?,
        (Response::Features(f), false) => output::features(&f),
        (Response::Stats(_), _) => bail!("unexpected answer from ublkd"),
    };
    print!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ublkctl").chain(args.iter().copied()))
    }

    #[test]
    fn add_null_defaults_and_options() {
        let cli = parse(&["add", "null"]).unwrap();
        let Command::Add { target } = cli.command else {
            panic!()
        };
        let req = add_request(target).unwrap();
        assert_eq!(
            req.target,
            TargetSpec::Null {
                size: DEFAULT_NULL_SIZE
            }
        );
        assert_eq!(
            (req.queues, req.depth, req.block_size, req.buffer),
            (None, None, None, None)
        );

        let cli = parse(&[
            "--socket",
            "/tmp/s",
            "add",
            "null",
            "--size",
            "10G",
            "--queues",
            "2",
            "--depth",
            "64",
            "--block-size",
            "4096",
            "--buffer",
            "copy",
            "--affinity",
            "set",
        ])
        .unwrap();
        assert_eq!(cli.socket, PathBuf::from("/tmp/s"));
        let Command::Add { target } = cli.command else {
            panic!()
        };
        let req = add_request(target).unwrap();
        assert_eq!(req.target, TargetSpec::Null { size: 10 << 30 });
        assert_eq!(
            (req.queues, req.depth, req.block_size),
            (Some(2), Some(64), Some(4096))
        );
        assert_eq!(req.buffer, Some(BufferMode::Copy));
        assert_eq!(req.affinity, Some(QueueAffinity::Set));
    }

    #[test]
    fn add_rbd_takes_the_image_spec_and_ceph_options() {
        let cli = parse(&[
            "add",
            "rbd",
            "rbd/ns/img@s1",
            "--conf",
            "/etc/c.conf",
            "--user",
            "u",
            "--keyring",
            "/k",
            "--id",
            "5",
            "--queues",
            "2",
        ])
        .unwrap();
        let Command::Add { target } = cli.command else {
            panic!()
        };
        let req = add_request(target).unwrap();
        assert_eq!(
            req.target,
            TargetSpec::Rbd {
                image: "rbd/ns/img@s1".into(),
                conf: Some("/etc/c.conf".into()),
                user: Some("u".into()),
                keyring: Some("/k".into()),
                read_only: false,
                osd_timeout: Some(60),
            }
        );
        assert_eq!((req.id, req.queues), (Some(5), Some(2)));
        let Command::Add { target } = parse(&["add", "rbd", "img"]).unwrap().command else {
            panic!()
        };
        let TargetSpec::Rbd { conf, user, .. } = add_request(target).unwrap().target else {
            panic!()
        };
        assert_eq!(conf.as_deref(), Some("/etc/ceph/ceph.conf"));
        assert_eq!(user.as_deref(), Some("admin"));
    }

    #[test]
    fn add_loop_makes_the_path_absolute() {
        let cli = parse(&[
            "add",
            "loop",
            "--file",
            "disk.img",
            "--direct-io",
            "off",
            "--read-only",
            "--buffer",
            "zc",
        ])
        .unwrap();
        let Command::Add { target } = cli.command else {
            panic!()
        };
        let req = add_request(target).unwrap();
        let TargetSpec::Loop {
            file,
            direct_io,
            read_only,
        } = req.target
        else {
            panic!()
        };
        assert!(
            file.starts_with('/') && file.ends_with("/disk.img"),
            "{file}"
        );
        assert_eq!((direct_io, read_only), (DirectIo::Off, true));
        assert_eq!(req.buffer, Some(BufferMode::Zc));
        assert!(parse(&["add", "loop"]).is_err(), "--file is required");
        assert!(parse(&["add", "loop", "--file", "x", "--direct-io", "maybe"]).is_err());
    }

    #[test]
    fn bad_arguments_are_rejected() {
        assert!(parse(&["add", "tape"]).is_err());
        assert!(parse(&["add", "null", "--size", "1Q"]).is_err());
        assert!(parse(&["add", "null", "--queues", "-1"]).is_err());
        assert!(parse(&["add", "null", "--buffer", "magic"]).is_err());
        assert!(parse(&["del"]).is_err());
        assert!(parse(&["del", "1", "--all"]).is_err());
        assert!(parse(&["show"]).is_err());
        assert!(parse(&["add", "null", "--batch", "--no-batch"]).is_err());
    }

    #[test]
    fn batch_flags() {
        for (args, want) in [
            (&["add", "null"][..], None),
            (&["add", "null", "--no-batch"][..], Some(false)),
            (&["add", "null", "--batch"][..], Some(true)),
        ] {
            let Command::Add { target } = parse(args).unwrap().command else {
                panic!()
            };
            assert_eq!(add_request(target).unwrap().batch, want, "{args:?}");
        }
    }

    #[test]
    fn del_forms() {
        let Command::Del { ids, all, .. } = parse(&["del", "1", "2"]).unwrap().command else {
            panic!()
        };
        assert_eq!((ids, all), (vec![1.into(), 2.into()], false));
        let Command::Del { ids, .. } = parse(&["del", "db", "3"]).unwrap().command else {
            panic!()
        };
        assert_eq!(ids, [DeviceRef::Name("db".into()), DeviceRef::Id(3)]);
        let Command::Show { id, .. } = parse(&["show", "db"]).unwrap().command else {
            panic!()
        };
        assert_eq!(id, DeviceRef::Name("db".into()));
        let Command::Del { ids, all, .. } = parse(&["del", "--all"]).unwrap().command else {
            panic!()
        };
        assert!(ids.is_empty() && all);
    }
}
