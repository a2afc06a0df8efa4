//! `make install` and `make uninstall` on the host, staged into a temporary directory
//! (scripts/install.sh and scripts/uninstall.sh with --destdir): every file is listed in
//! the manifest, the man pages render with man(1), the completions load, and uninstall
//! removes exactly what install put there. Needs the release binaries, so
//! tests/run-vm-tests.sh runs it after building them (feature "install").

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn script(name: &str, stage: &Path) -> Command {
    let mut cmd = Command::new(repo().join("scripts").join(name));
    cmd.args(["--prefix", "/usr/local", "--destdir"]).arg(stage);
    cmd
}

/// Every regular file under `dir`, as paths relative to it.
fn files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                found.push(format!("/{}", p.strip_prefix(dir).unwrap().display()));
            }
        }
    }
    found.sort();
    found
}

#[test]
fn install_puts_man_pages_and_completions_in_place_and_uninstall_takes_all_back() {
    let stage = tempfile();
    run(script("install.sh", &stage).arg("--no-build"));

    let manifest = stage.join("usr/local/share/ublkd/installed-files");
    let mut listed: Vec<String> = std::fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        files(&stage),
        "the manifest lists every installed file"
    );

    // A page for ublkd, ublkctl and each of its subcommands, and man renders each.
    let man8 = stage.join("usr/local/share/man/man8");
    for page in [
        "ublkd.8",
        "ublkctl.8",
        "ublkctl-add.8",
        "ublkctl-add-null.8",
        "ublkctl-add-loop.8",
        "ublkctl-add-nbd.8",
        "ublkctl-add-rbd.8",
        "ublkctl-del.8",
        "ublkctl-list.8",
        "ublkctl-show.8",
        "ublkctl-features.8",
        "ublkctl-recover.8",
    ] {
        let out = run(Command::new("man")
            .arg("-l")
            .arg(man8.join(page))
            .env("MANWIDTH", "80"));
        let text = String::from_utf8_lossy(&out.stdout);
        let name = page.trim_end_matches(".8");
        assert!(
            text.contains("NAME") && text.contains(name),
            "{page}:\n{text}"
        );
        assert!(text.contains("OPTIONS"), "{page} has no OPTIONS:\n{text}");
    }

    // bash loads the completion and binds it to ublkctl; zsh and fish name the commands.
    let bash = stage.join("usr/local/share/bash-completion/completions/ublkctl");
    let out = run(Command::new("bash").arg("-c").arg(format!(
        "source '{}' && complete -p ublkctl",
        bash.display()
    )));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ublkctl"));
    for f in [
        "usr/local/share/zsh/site-functions/_ublkctl",
        "usr/local/share/fish/vendor_completions.d/ublkctl.fish",
    ] {
        let text = std::fs::read_to_string(stage.join(f)).unwrap();
        for word in ["add", "del", "recover", "uri", "file", "buffer"] {
            assert!(text.contains(word), "{f} does not complete {word}");
        }
        assert!(
            !text.contains("__generate"),
            "{f} offers the hidden command"
        );
    }

    run(&mut script("uninstall.sh", &stage));
    assert_eq!(
        files(&stage),
        Vec::<String>::new(),
        "uninstall leaves no file behind"
    );

    // A second uninstall finds no manifest and says so in one line.
    let out = script("uninstall.sh", &stage).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("installed-files is missing"), "{err}");
    std::fs::remove_dir_all(&stage).unwrap();
}

fn tempfile() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ublkd-install-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
