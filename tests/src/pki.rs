//! X.509 certificates for the TLS tests, made at test time with rcgen: a CA, a server
//! certificate and a client certificate, in the directory layout qemu and nbdkit read
//! (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, and for qemu `dh-params.pem`)
//! and ublkd reads (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).

use rcgen::{
    date_time_ymd, BasicConstraints, Certificate, CertificateParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// What is wrong with the server's certificate, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerCert {
    /// For localhost and 127.0.0.1, signed by the CA the client trusts.
    Good,
    /// For another host name only.
    OtherHost,
    /// Expired in 2020.
    Expired,
    /// Signed by a CA the client does not know.
    OtherCa,
}

/// The two directories: the server's (`--tls-certificates` for nbdkit, `dir=` for
/// qemu-nbd) and the client's (`tls-certificates=` in the URI).
pub struct Pki {
    pub server: PathBuf,
    pub client: PathBuf,
}

fn ca(name: &str) -> (Certificate, KeyPair) {
    let key = KeyPair::generate().expect("CA key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (p.self_signed(&key).expect("CA certificate"), key)
}

fn leaf(
    names: &[&str],
    purpose: ExtendedKeyUsagePurpose,
    expired: bool,
    issuer: &(Certificate, KeyPair),
) -> (Certificate, KeyPair) {
    let key = KeyPair::generate().expect("key");
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut p = CertificateParams::new(names.clone()).expect("params");
    p.distinguished_name
        .push(DnType::CommonName, names[0].clone());
    p.extended_key_usages = vec![purpose];
    if expired {
        p.not_before = date_time_ymd(2019, 1, 1);
        p.not_after = date_time_ymd(2020, 1, 1);
    } else {
        p.not_before = date_time_ymd(2024, 1, 1);
        p.not_after = date_time_ymd(2100, 1, 1);
    }
    let cert = p.signed_by(&key, &issuer.0, &issuer.1).expect("sign");
    (cert, key)
}

/// The RFC 7919 group ffdhe2048 as PKCS#3 DH parameters (public, the same everywhere).
const FFDHE2048: &str = "-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
";

/// Writes `dh-params.pem` into a qemu TLS credentials directory (x509 or psk). Without
/// it qemu generates 2048-bit DH parameters each time it starts: 0.2-0.35 s on the host
/// and 3-15 s in the test VM (measured: the gaps before each qemu-nbd TLS server
/// answered).
pub fn write_dh_params(dir: &Path) {
    write(dir, "dh-params.pem", FFDHE2048);
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("{name}: {e}"));
}

/// Makes a CA, a server certificate as `server` says, and (with `client_auth`) a client
/// certificate, under `dir` (made anew).
pub fn make(dir: &str, server: ServerCert, client_auth: bool) -> Pki {
    let dir = PathBuf::from(dir);
    let _ = std::fs::remove_dir_all(&dir);
    let pki = Pki {
        server: dir.join("server"),
        client: dir.join("client"),
    };
    std::fs::create_dir_all(&pki.server).expect("mkdir server");
    std::fs::create_dir_all(&pki.client).expect("mkdir client");
    let trusted = ca("ublkd test CA");
    let other = ca("some other CA");
    let issuer = if server == ServerCert::OtherCa {
        &other
    } else {
        &trusted
    };
    let names: &[&str] = if server == ServerCert::OtherHost {
        &["other.example"]
    } else {
        &["localhost", "127.0.0.1"]
    };
    let srv = leaf(
        names,
        ExtendedKeyUsagePurpose::ServerAuth,
        server == ServerCert::Expired,
        issuer,
    );
    // The server trusts the CA that signed its own certificate and the client's.
    write(&pki.server, "ca-cert.pem", &trusted.0.pem());
    write(&pki.server, "server-cert.pem", &srv.0.pem());
    write(&pki.server, "server-key.pem", &srv.1.serialize_pem());
    write_dh_params(&pki.server);
    write(&pki.client, "ca-cert.pem", &trusted.0.pem());
    if client_auth {
        let cli = leaf(
            &["ublkd-client"],
            ExtendedKeyUsagePurpose::ClientAuth,
            false,
            &trusted,
        );
        write(&pki.client, "client-cert.pem", &cli.0.pem());
        write(&pki.client, "client-key.pem", &cli.1.serialize_pem());
    }
    pki
}

/// `uri` (nbd:// or nbd+unix://) as nbds with the client's certificates.
pub fn tls_uri(uri: &str, client: &Path) -> String {
    let uri = uri.replacen("nbd", "nbds", 1);
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}tls-certificates={}", client.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_the_layout_servers_read() {
        let dir = std::env::temp_dir().join(format!("ublkd-pki-{}", std::process::id()));
        let pki = make(dir.to_str().unwrap(), ServerCert::Good, true);
        for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
            let text = std::fs::read_to_string(pki.server.join(f)).unwrap();
            assert!(text.starts_with("-----BEGIN "), "{f}");
        }
        for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
            assert!(pki.client.join(f).exists(), "{f}");
        }
        assert_eq!(
            tls_uri("nbd+unix:///?socket=/s", &pki.client),
            format!(
                "nbds+unix:///?socket=/s&tls-certificates={}",
                pki.client.display()
            )
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
