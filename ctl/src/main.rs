//! ublkctl: the control tool for ublkd.

mod add;
mod client;
mod generate;
mod output;
mod prometheus;

use add::{add_request, size_arg, AddTarget};
use anyhow::{bail, Result};
use clap::{CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use ublkd_proto::size::parse_size;
use ublkd_proto::{DeviceRef, Request, Response};

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

// Parsed once per run: `Add`'s size costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
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
            let args: Vec<String> = std::env::args().collect();
            eprintln!(
                "ublkctl: {} ({})",
                output::one_line(&e.to_string()),
                usage_hint(&args)
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = run(cli) {
        eprintln!("ublkctl: {e:#}");
        std::process::exit(1);
    }
}

/// Where a user whose command line was refused looks next: the usage of the deepest
/// (sub)command the line names and that command's help, e.g. `usage: ublkctl add loop
/// [OPTIONS] --file <FILE>; see 'ublkctl add loop --help'`.
fn usage_hint(args: &[String]) -> String {
    let mut cmd = Cli::command();
    cmd.build();
    let mut sub = &mut cmd;
    for arg in args.iter().skip(1) {
        if sub.find_subcommand(arg).is_some() {
            sub = sub.find_subcommand_mut(arg).expect("found just above");
        }
    }
    let usage = sub.render_usage().to_string();
    let usage = usage.trim().trim_start_matches("Usage:").trim();
    let name = sub.get_bin_name().unwrap_or("ublkctl");
    format!("usage: {usage}; see '{name} --help'")
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
    use ublkd_proto::validate::DEFAULT_NULL_SIZE;
    use ublkd_proto::{
        BufferMode, DirectIo, EncryptionFormat, QueueAffinity, RbdEncryption, RbdQuiesce,
        TargetSpec,
    };

    #[test]
    fn a_refused_command_line_points_at_the_subcommand_it_names() {
        let args =
            |line: &str| -> Vec<String> { line.split_whitespace().map(String::from).collect() };
        let refused = |line: &str| {
            let e = Cli::try_parse_from(args(line)).expect_err(line);
            format!(
                "{} ({})",
                output::one_line(&e.to_string()),
                usage_hint(&args(line))
            )
        };
        assert_eq!(
            refused("ublkctl --socket /x add loop disk.img"),
            "unexpected argument 'disk.img' found (usage: ublkctl add loop [OPTIONS] \
             --file <FILE>; see 'ublkctl add loop --help')"
        );
        assert_eq!(
            refused("ublkctl add null --size 1x"),
            "invalid value '1x' for '--size <SIZE>': invalid size '1x': expected a number \
             with an optional K, M, G or T suffix (e.g. 512, 4k, 1G) (usage: ublkctl add \
             null [OPTIONS]; see 'ublkctl add null --help')"
        );
        assert_eq!(
            refused("ublkctl tape"),
            "unrecognized subcommand 'tape' (usage: ublkctl [OPTIONS] <COMMAND>; see \
             'ublkctl --help')"
        );
    }

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
            "--exclusive",
            "--quiesce",
            "--encryption-format",
            "luks2",
            "--encryption-passphrase-file",
            "/pass",
            "--ceph-option",
            "rbd-cache=true",
            "--ceph-option",
            "rbd_qos_iops_limit=100",
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
                snap_id: None,
                conf: Some("/etc/c.conf".into()),
                user: Some("u".into()),
                keyring: Some("/k".into()),
                read_only: false,
                exclusive: true,
                encryption: Some(RbdEncryption {
                    format: EncryptionFormat::Luks2,
                    passphrase_file: "/pass".into(),
                }),
                quiesce: Some(RbdQuiesce::Freeze),
                osd_timeout: Some(60),
                options: vec![
                    ("rbd_cache".into(), "true".into()),
                    ("rbd_qos_iops_limit".into(), "100".into()),
                ],
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
        // --mon-host, --keyfile and --ms-mode become Ceph options, before --ceph-option's; the conf
        // is then read only if it exists.
        let Command::Add { target } = parse(&[
            "add",
            "rbd",
            "img",
            "--mon-host",
            "10.0.0.1,10.0.0.2:6789",
            "--keyfile",
            "/etc/key",
            "--ms-mode",
            "secure",
            "--ceph-option",
            "rbd_cache=true",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        let TargetSpec::Rbd { conf, options, .. } = add_request(target).unwrap().target else {
            panic!()
        };
        assert_eq!(conf, None);
        let Command::Add { target } = parse(&["add", "rbd", "img", "--snap-id", "12"])
            .unwrap()
            .command
        else {
            panic!()
        };
        let TargetSpec::Rbd { snap_id, .. } = add_request(target).unwrap().target else {
            panic!()
        };
        assert_eq!(snap_id, Some(12));
        assert_eq!(
            options,
            vec![
                ("mon_host".into(), "10.0.0.1,10.0.0.2:6789".into()),
                ("keyfile".into(), "/etc/key".into()),
                ("ms_client_mode".into(), "secure".into()),
                ("ms_mon_client_mode".into(), "secure".into()),
                ("rbd_cache".into(), "true".into()),
            ]
        );
        let e = parse(&["add", "rbd", "img", "--ms-mode", "tls"]).unwrap_err();
        assert!(e.to_string().contains("prefer-secure"), "{e}");
        let e = parse(&["add", "rbd", "img", "--encryption-format", "luks1"]).unwrap_err();
        assert!(
            e.to_string().contains("--encryption-passphrase-file"),
            "{e}"
        );
        let e = parse(&["add", "rbd", "img", "--ceph-option", "rbd_cache"]).unwrap_err();
        assert!(e.to_string().contains("NAME=VALUE"), "{e}");
    }

    #[test]
    fn add_rbd_quiesce_hook_must_be_an_executable_file() {
        let hook = |args: &[&str]| -> Result<TargetSpec, String> {
            let mut all = vec!["add", "rbd", "img"];
            all.extend_from_slice(args);
            let cli = parse(&all).map_err(|e| e.to_string())?;
            let Command::Add { target } = cli.command else {
                panic!()
            };
            add_request(target)
                .map(|r| r.target)
                .map_err(|e| format!("{e:#}"))
        };
        let TargetSpec::Rbd { quiesce, .. } =
            hook(&["--quiesce", "--quiesce-hook", "/bin/sh"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(quiesce, Some(RbdQuiesce::Hook("/bin/sh".into())));
        let TargetSpec::Rbd { quiesce, .. } = hook(&[]).unwrap() else {
            panic!()
        };
        assert_eq!(quiesce, None);
        let e = hook(&["--quiesce-hook", "/bin/sh"]).unwrap_err();
        assert!(e.contains("--quiesce"), "{e}");
        let e = hook(&["--quiesce", "--quiesce-hook", "/etc/passwd"]).unwrap_err();
        assert!(e.contains("not an executable file"), "{e}");
        let e = hook(&["--quiesce", "--quiesce-hook", "/no/such/hook"]).unwrap_err();
        assert!(
            e.contains("/no/such/hook") && e.contains("No such file"),
            "{e}"
        );
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
