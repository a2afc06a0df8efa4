//! Ceph configuration options given per device (`ublkctl add rbd --ceph-option
//! NAME=VALUE`), as `rbd-nbd map --NAME=VALUE` takes them: set on the device's cluster
//! connection after the conf file and after ublkd's own librbd defaults (the rbd
//! target's `LIBRBD_SETTINGS`), so they override both.
//!
//! A few names are refused: the key (a secret on a command line shows in every process
//! listing and would be recorded; it belongs in the keyring file), and what ublkd sets
//! from its own flags and bounds (the keyring's path and the timeouts, which keep `add`
//! and every request bounded in time).

/// Why `--ceph-option` pairs were refused before reaching librados.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CephOptionError {
    #[error("--ceph-option {name} cannot be set per device: {hint}")]
    Reserved { name: String, hint: String },
    #[error("--ceph-option \"{0}\": an option name must be non-empty and without NUL bytes or line breaks, as must its value")]
    Malformed(String),
}

/// Names `--ceph-option` may not set, and what to do instead.
const RESERVED: [(&str, &str); 5] = [
    (
        "key",
        "a key on the command line is seen by every user of the host; put it in a keyring file and pass --keyring",
    ),
    ("keyring", "pass the keyring file with --keyring"),
    ("rados_osd_op_timeout", "use --osd-timeout"),
    (
        "rados_mon_op_timeout",
        "ublkd bounds every monitor request itself, so that add fails in bounded time",
    ),
    (
        "client_mount_timeout",
        "ublkd bounds reaching the monitors itself, so that add fails in bounded time",
    ),
];

/// A Ceph option name as Ceph reads it: `-` and ` ` are the same as `_`.
pub fn normalize(name: &str) -> String {
    name.trim().replace(['-', ' '], "_")
}

/// Parses `NAME=VALUE` (the value may be empty and may contain `=`), with the name
/// normalized.
pub fn parse(arg: &str) -> Result<(String, String), String> {
    let Some((name, value)) = arg.split_once('=') else {
        return Err(format!(
            "'{arg}' is not NAME=VALUE (for example rbd_cache=true)"
        ));
    };
    let name = normalize(name);
    if name.is_empty() {
        return Err(format!("'{arg}' has no option name before '='"));
    }
    Ok((name, value.to_string()))
}

/// Refuses an empty or reserved name, and a name or value with a NUL byte or a line
/// break (they could not be set, or would split a log line).
pub fn check(options: &[(String, String)]) -> Result<(), CephOptionError> {
    for (name, value) in options {
        let norm = normalize(name);
        if norm.is_empty() || [name, value].iter().any(|s| s.contains(['\0', '\n', '\r'])) {
            return Err(CephOptionError::Malformed(name.escape_debug().to_string()));
        }
        if let Some((_, hint)) = RESERVED.iter().find(|(r, _)| *r == norm) {
            return Err(CephOptionError::Reserved {
                name: norm,
                hint: hint.to_string(),
            });
        }
    }
    Ok(())
}

/// The pairs as `show` lists them: `NAME=VALUE, ...`.
pub fn list(options: &[(String, String)]) -> String {
    let pairs: Vec<String> = options.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.join(", ")
}

/// Whether `options` sets `name` (compared normalized).
pub fn sets(options: &[(String, String)], name: &str) -> bool {
    options.iter().any(|(n, _)| normalize(n) == name)
}

/// The msgr2 mode of a device's connections to the cluster (`ublkctl add rbd
/// --ms-mode`, named as krbd's `-o ms_mode=`): `secure` encrypts every frame (AES-GCM)
/// between ublkd and the monitors and OSDs, `crc` only checksums it; the `prefer-` modes
/// take the other one when the cluster refuses the first. Without it, the conf decides
/// (Ceph's defaults: crc first towards the OSDs, secure first towards the monitors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsMode {
    Crc,
    Secure,
    PreferCrc,
    PreferSecure,
}

impl MsMode {
    pub const ALL: [MsMode; 4] = [
        MsMode::Crc,
        MsMode::Secure,
        MsMode::PreferCrc,
        MsMode::PreferSecure,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MsMode::Crc => "crc",
            MsMode::Secure => "secure",
            MsMode::PreferCrc => "prefer-crc",
            MsMode::PreferSecure => "prefer-secure",
        }
    }

    /// The Ceph options that ask for this mode, towards the OSDs (`ms_client_mode`) and
    /// the monitors (`ms_mon_client_mode`): the modes the client accepts, the preferred
    /// first.
    pub fn options(self) -> [(String, String); 2] {
        let modes = match self {
            MsMode::Crc => "crc",
            MsMode::Secure => "secure",
            MsMode::PreferCrc => "crc secure",
            MsMode::PreferSecure => "secure crc",
        };
        ["ms_client_mode", "ms_mon_client_mode"].map(|n| (n.to_string(), modes.to_string()))
    }
}

impl std::str::FromStr for MsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MsMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!("unknown messenger mode '{s}' (expected crc, secure, prefer-crc or prefer-secure)")
            })
    }
}

/// The items of a Ceph list setting (`keyring`'s paths, `ms_client_mode`'s modes): Ceph
/// separates them with commas, semicolons or blanks, and may leave a trailing one.
pub fn list_items(value: &str) -> impl Iterator<Item = &str> {
    value.split([',', ';', ' ', '\t']).filter(|i| !i.is_empty())
}

/// Whether a Ceph messenger mode setting (`ms_client_mode`'s value, such as `secure` or
/// `crc secure`) allows only one mode: a cluster that refuses it cannot be reached.
pub fn single_mode(modes: &str) -> Option<&str> {
    let mut all = list_items(modes);
    match (all.next(), all.next()) {
        (Some(m), None) => Some(m),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn name_value_pairs_parse_with_ceph_spellings_normalized() {
        assert_eq!(
            parse("rbd_cache=true"),
            Ok(("rbd_cache".into(), "true".into()))
        );
        assert_eq!(
            parse("rbd-qos-iops-limit=500"),
            Ok(("rbd_qos_iops_limit".into(), "500".into()))
        );
        assert_eq!(parse("log_file="), Ok(("log_file".into(), String::new())));
        assert_eq!(parse("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse("rbd_cache").unwrap_err().contains("NAME=VALUE"));
        assert!(parse("=1").unwrap_err().contains("no option name"));
    }

    #[test]
    fn the_key_and_ublkds_own_settings_are_refused() {
        assert!(check(&opts(&[("rbd_cache", "true"), ("rbd-qos-iops-limit", "9")])).is_ok());
        for name in [
            "key",
            "keyring",
            "rados-osd-op-timeout",
            "client_mount_timeout",
        ] {
            let e = check(&opts(&[("rbd_cache", "true"), (name, "x")])).unwrap_err();
            assert!(e.to_string().contains(&normalize(name)), "{e}");
        }
        let e = check(&opts(&[("key", "AQB...")])).unwrap_err().to_string();
        assert!(e.contains("--keyring") && !e.contains("AQB"), "{e}");
        assert!(check(&opts(&[("", "1")])).is_err());
        assert!(check(&opts(&[("a\nb", "1")])).is_err());
        assert!(check(&opts(&[("log_file", "x\0y")])).is_err());
    }

    #[test]
    fn ms_modes_parse_by_krbds_names_and_set_both_directions() {
        for m in MsMode::ALL {
            assert_eq!(m.name().parse::<MsMode>(), Ok(m));
        }
        assert!("tls"
            .parse::<MsMode>()
            .unwrap_err()
            .contains("prefer-secure"));
        assert_eq!(
            MsMode::PreferSecure.options(),
            [
                ("ms_client_mode".into(), "secure crc".into()),
                ("ms_mon_client_mode".into(), "secure crc".into())
            ]
        );
        assert_eq!(MsMode::Secure.options()[0].1, "secure");
        assert_eq!(
            list_items("/etc/a.keyring,/etc/b; c,").collect::<Vec<_>>(),
            ["/etc/a.keyring", "/etc/b", "c"]
        );
        assert_eq!(single_mode("secure"), Some("secure"));
        assert_eq!(single_mode(" crc "), Some("crc"));
        assert_eq!(single_mode("crc secure"), None);
        assert_eq!(single_mode(""), None);
    }

    #[test]
    fn list_shows_the_pairs_in_order() {
        assert_eq!(list(&opts(&[("b", "1"), ("a", "x=y")])), "b=1, a=x=y");
        assert_eq!(list(&[]), "");
    }

    #[test]
    fn sets_compares_normalized_names() {
        let o = opts(&[("rbd-cache", "true")]);
        assert!(sets(&o, "rbd_cache"));
        assert!(!sets(&o, "rbd_io_scheduler"));
    }
}
