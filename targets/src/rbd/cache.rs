//! Whether librbd may complete a write of an image before the OSDs have it, which
//! decides whether the device has a volatile write cache.
//!
//! With librbd's cache off (ublkd's default, `rados.rs`) a write completes once its
//! OSDs have committed it, as with krbd: the device is then write-through, like krbd's
//! devices, and the kernel sends it no FLUSH (an fsync of a file system on it costs no
//! round trip through ublkd and librbd) and no FUA writes. Measured: 4 KiB random
//! writes each followed by an fsync, one at a time, 16-23% faster write-through than
//! with the same device announcing a cache (`scripts/bench.sh rbd --sync`).
//!
//! librbd may complete a write early when its write-back cache is on (`rbd_cache`, set
//! by `--ceph-option`, or by the pool's or the image's own configuration, which
//! override the client's), or when a cache plugin is loaded (`rbd_plugins`: the
//! persistent write-log cache completes writes from a local log). A configuration that
//! cannot be read counts as a cache too: a volatile cache is correct whatever librbd
//! does.
//!
//! The journaling feature adds no cache: librbd's journal layer holds each object write
//! until its journal entry is safe on the OSDs (`journal::ObjectDispatch` waits for the
//! event before it lets the write go on), and the write completes when that object
//! write has; the journal's flush settings only batch entries, which the writes wait
//! for. So a completed write is in the journal and in the image (the VM test kills
//! ublkd after unflushed writes to a journaled image and reads them back; they also
//! survived with librbd's write-back cache forced on, a case this decision does not
//! rely on and that was not examined further).

use super::image::Image;

/// Why writes to `image` may complete before the OSDs have them (the device then needs
/// a volatile write cache, FLUSH and FUA), or None.
pub(super) fn write_back(image: &Image) -> Option<String> {
    match image.config() {
        Ok(config) => reason(&config),
        Err(e) => Some(format!("the image's configuration cannot be read ({e})")),
    }
}

/// [`write_back`] from an image's effective configuration.
fn reason(config: &[(String, String)]) -> Option<String> {
    let value = |name: &str| {
        config
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.trim())
    };
    match value("rbd_cache") {
        Some("false") => {}
        Some("true") => return Some("librbd's write-back cache (rbd_cache=true)".into()),
        Some(v) => return Some(format!("rbd_cache is {v:?}")),
        None => return Some("rbd_cache is not in the image's configuration".into()),
    }
    value("rbd_plugins")
        .filter(|p| !p.is_empty())
        .map(|plugins| format!("librbd plugins {plugins:?} (rbd_plugins)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn only_a_cacheless_plain_image_is_write_through() {
        let plain = config(&[("rbd_cache", "false"), ("rbd_plugins", "")]);
        assert_eq!(reason(&plain), None);
        let cached = config(&[("rbd_cache", "true"), ("rbd_plugins", "")]);
        assert!(reason(&cached).unwrap().contains("rbd_cache=true"));
        let pwl = config(&[("rbd_cache", "false"), ("rbd_plugins", "pwl_cache")]);
        assert!(reason(&pwl).unwrap().contains("pwl_cache"));
        // What cannot be told for sure counts as a cache.
        assert!(reason(&config(&[("rbd_plugins", "")])).is_some());
        assert!(reason(&config(&[("rbd_cache", "maybe")])).is_some());
    }
}
