//! The names udev links devices by: for a device added with `--name NAME`, the file
//! /run/ublkd/names/ublkbID holds NAME, written before the device starts (so it is
//! there when the kernel announces the disk) and removed when the device is deleted.
//! The rule systemd/60-ublkd.rules reads it and links /dev/ublkd/NAME and
//! /dev/disk/by-id/ublkd-NAME to the disk. A file that cannot be written only costs the
//! link: the device is served either way.

use std::path::PathBuf;

/// Where the names are; the udev rule names this directory too.
pub const NAMES_DIR: &str = "/run/ublkd/names";

fn path(id: u32) -> PathBuf {
    PathBuf::from(NAMES_DIR).join(format!("ublkb{id}"))
}

/// Records `name` (or its absence) for device `id`.
pub fn publish(id: u32, name: Option<&str>) {
    let Some(name) = name else {
        forget(id);
        return;
    };
    let write = std::fs::create_dir_all(NAMES_DIR)
        .and_then(|()| std::fs::write(path(id), format!("{name}\n")));
    if let Err(e) = write {
        log::warn!(
            "dev {id}: cannot write {}: {e}; udev will not link /dev/ublkd/{name}",
            path(id).display()
        );
    }
}

/// Removes device `id`'s name.
pub fn forget(id: u32) {
    match std::fs::remove_file(path(id)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("dev {id}: cannot remove {}: {e}", path(id).display()),
    }
}
