//! Man pages and shell completions, generated from the clap definitions by
//! `ublkctl __generate` (scripts/install.sh installs what it writes).

use anyhow::{Context, Result};
use clap::{Command, ValueEnum};
use std::path::{Path, PathBuf};

/// The shells `ublkctl generate completions` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Writes the section 8 page of `cmd` into `dir` as `NAME.8`, and one page per
/// subcommand as `NAME-SUB.8` (`ublkctl-add-nbd.8`), as git and systemd tools lay
/// theirs out. Returns the files written.
pub fn man_pages(cmd: Command, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    write_pages(cmd.clone(), cmd.get_name().to_string(), dir, &mut written)?;
    Ok(written)
}

fn write_pages(cmd: Command, name: String, dir: &Path, written: &mut Vec<PathBuf>) -> Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let sub_name = format!("{name}-{}", sub.get_name());
        write_pages(sub.clone(), sub_name, dir, written)?;
    }
    // The page's title and synopsis name the whole command line: "ublkctl add nbd".
    let bin_name = name.replace('-', " ");
    let cmd = cmd.name(name.clone()).bin_name(bin_name);
    let path = dir.join(format!("{name}.8"));
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd)
        .section("8")
        .manual("ublkd")
        .render(&mut page)
        .context("cannot render the man page")?;
    std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
    written.push(path);
    Ok(())
}

/// Writes the completion script of `cmd` for `shell` to `out`.
pub fn completions(mut cmd: Command, shell: Shell, out: &mut dyn std::io::Write) {
    let name = cmd.get_name().to_string();
    match shell {
        Shell::Bash => clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, name, out),
        Shell::Zsh => clap_complete::generate(clap_complete::Shell::Zsh, &mut cmd, name, out),
        Shell::Fish => clap_complete::generate(clap_complete::Shell::Fish, &mut cmd, name, out),
    }
}
