//! Unit tests of `psk.rs`.

use super::*;

fn parse_err(text: &str, user: &str) -> String {
    parse(text, Path::new("/k.psk"), user)
        .unwrap_err()
        .to_string()
}

#[test]
fn psk_files_as_psktool_writes_them() {
    let text = "# keys\n\nbob:0a0B\r\nalice:00ff10\nalice:1111\n";
    let p = parse(text, Path::new("/k.psk"), "alice").unwrap();
    assert_eq!(
        (p.identity.as_str(), p.key.as_slice()),
        ("alice", &[0, 0xff, 0x10][..])
    );
    let p = parse(text, Path::new("/k.psk"), "bob").unwrap();
    assert_eq!(p.key, [0x0a, 0x0b]);
    assert_eq!(format!("{p:?}"), "Psk(bob, 2 bytes)");
}

#[test]
fn bad_psk_lines_name_the_cause_not_the_key() {
    let e = parse_err("alice:00ff\n", "qemu");
    assert!(e.contains("/k.psk has no key for user 'qemu'"), "{e}");
    let e = parse_err("alice:00fg\n", "alice");
    assert!(
        e.contains("the key of user 'alice' in /k.psk is bad: it is not hexadecimal"),
        "{e}"
    );
    assert!(!e.contains("00fg"), "{e}");
    let e = parse_err("alice:00f\n", "alice");
    assert!(e.contains("odd number of hex digits"), "{e}");
    let e = parse_err("alice:\n", "alice");
    assert!(e.contains("it is empty"), "{e}");
    let e = parse_err(&format!("alice:{}\n", "00".repeat(257)), "alice");
    assert!(e.contains("longer than 256 bytes"), "{e}");
    // Another user's bad line is not looked at.
    assert!(parse("bob:zz\nalice:01\n", Path::new("/k"), "alice").is_ok());
}

#[test]
fn the_default_user_is_qemus() {
    let dir = std::env::temp_dir().join(format!("ublkd-psk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("k.psk");
    std::fs::write(&file, "qemu:0102\n").unwrap();
    assert_eq!(read(&file, None).unwrap().identity, "qemu");
    let e = read(&dir.join("none"), None).unwrap_err().to_string();
    assert!(e.starts_with("cannot read the PSK file "), "{e}");
}

#[test]
fn records_are_counted_across_reads() {
    // A plaintext handshake record (22), then two encrypted ones, the second with an
    // empty body, fed in pieces that split headers and bodies.
    let mut bytes = vec![22, 3, 3, 0, 3, 1, 2, 3];
    bytes.extend_from_slice(&[23, 3, 3, 0, 2, 9, 9, 23, 3, 3, 0, 0]);
    for split in 0..bytes.len() {
        let mut r = Records::default();
        r.feed(&bytes[..split]);
        r.feed(&bytes[split..]);
        assert!(r.at_boundary(), "{split}");
        assert_eq!((r.plain, r.encrypted), (1, 2), "{split}");
    }
    let mut r = Records::default();
    r.feed(&bytes[..10]);
    assert!(!r.at_boundary());
}

/// RFC 8448 section 3 (a simple 1-RTT handshake): the server's handshake traffic
/// secret and the key and iv derived from it.
#[test]
fn traffic_keys_follow_rfc_8448() {
    let hex = |s: &str| -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    };
    let secret = hex(
        "b6 7b 7d 69 0c c1 6c 4e 75 e5 42 13 cb 2d 37 b4 e9 c9 12 bc de d9 10 5d 42 be fd 59 d3 91 ad 38",
    );
    let k = traffic_keys(Cipher::Aes128Gcm, &secret, 7).unwrap();
    assert_eq!(
        k.key,
        hex("3f ce 51 60 09 c2 17 27 d0 f2 e4 e8 6e e4 03 bc")
    );
    assert_eq!(k.iv, hex("5d 31 3e b2 67 12 76 ee 13 00 0b 30"));
    assert_eq!(k.seq, 7);
}
