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
//! persistent write-log cache completes writes from a local log). The journaling
//! feature is counted with them: its writes wait for their journal entries, but that
//! path was not examined here, and a volatile cache is correct whatever librbd does.
//! So is a configuration that cannot be read.

use super::image::Image;
use super::sys;

/// Why writes to `image` may complete before the OSDs have them (the device then needs
/// a volatile write cache, FLUSH and FUA), or None.
pub(super) fn write_back(image: &Image) -> Option<String> {
    let features = match image.features() {
        Ok(f) => f,
        Err(e) => return Some(format!("the image's features cannot be read ({e})")),
    };
    match image.config() {
        Ok(config) => reason(&config, features),
        Err(e) => Some(format!("the image's configuration cannot be read ({e})")),
    }
}

/// [`write_back`] from an image's effective configuration and its features.
fn reason(config: &[(String, String)], features: u64) -> Option<String> {
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
    if let Some(plugins) = value("rbd_plugins").filter(|p| !p.is_empty()) {
        return Some(format!("librbd plugins {plugins:?} (rbd_plugins)"));
    }
    if features & sys::RBD_FEATURE_JOURNALING != 0 {
        return Some("the image journals its writes (journaling feature)".into());
    }
    None
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
        assert_eq!(reason(&plain, 0), None);
        let cached = config(&[("rbd_cache", "true"), ("rbd_plugins", "")]);
        assert!(reason(&cached, 0).unwrap().contains("rbd_cache=true"));
        let pwl = config(&[("rbd_cache", "false"), ("rbd_plugins", "pwl_cache")]);
        assert!(reason(&pwl, 0).unwrap().contains("pwl_cache"));
        let journaled = reason(&plain, sys::RBD_FEATURE_JOURNALING).unwrap();
        assert!(journaled.contains("journal"));
        // What cannot be told for sure counts as a cache.
        assert!(reason(&config(&[("rbd_plugins", "")]), 0).is_some());
        assert!(reason(&config(&[("rbd_cache", "maybe")]), 0).is_some());
    }
}
