use super::*;
use std::path::PathBuf;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!(
            "spur-tls-unit-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn write(&self, name: &str, content: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, content).unwrap();
        p.display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Ca {
    cert: rcgen::Certificate,
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
}

fn ca() -> Ca {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, params, key }
}

/// A leaf with a SPIFFE URI SAN; answers (cert PEM, key PEM).
fn leaf(ca: &Ca, id: &str, serial: u64) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(id).unwrap(),
    ));
    params.serial_number = Some(rcgen::SerialNumber::from(serial));
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let issuer = rcgen::Issuer::from_params(&ca.params, &ca.key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn server_cfg(cert: &str, key: &str, ca: Option<&str>) -> spur_config::ServerTls {
    spur_config::ServerTls {
        cert: Some(cert.into()),
        key: Some(key.into()),
        client_ca: ca.map(Into::into),
        allow_identities: vec![],
    }
}

#[test]
fn a_missing_file_is_named_with_its_field() {
    let err = ServerTls::load(
        "in",
        &server_cfg("/nonexistent/spur/tls.crt", "/nonexistent/k", None),
        ListenerProtocol::Http,
    )
    .err()
    .expect("missing file refused");
    assert_eq!(err.field, "cert");
    let msg = err.error.to_string();
    assert!(
        msg.starts_with("cannot read /nonexistent/spur/tls.crt: No such file"),
        "{msg}"
    );
}

#[test]
fn errors_about_keys_never_show_the_key() {
    let ca = ca();
    let dir = Dir::new("keys");
    let (cert, key) = leaf(&ca, "spiffe://td/ns/a/sa/b", 1);
    let cert_path = dir.write("tls.crt", &cert);
    let key_body: String = key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .join("");

    // A key whose base64 is broken half-way.
    let broken = key.replacen(&key_body[..40], &format!("{}!!!!", &key_body[..36]), 1);
    let broken_path = dir.write("broken.key", &broken);
    // A key of another pair.
    let (_, other_key) = leaf(&ca, "spiffe://td/ns/a/sa/c", 2);
    let other_path = dir.write("other.key", &other_key);
    // No key at all, only the certificate.
    let none_path = dir.write("none.key", &cert);

    for (path, expect) in [
        (&broken_path, "not a valid PEM file"),
        (&other_path, "does not match the certificate"),
        (&none_path, "no PEM private key"),
    ] {
        let err = ServerTls::load(
            "in",
            &server_cfg(&cert_path, path, None),
            ListenerProtocol::Http,
        )
        .err()
        .unwrap_or_else(|| panic!("{path} accepted"));
        let msg = format!("{err} / {err:?}");
        assert_eq!(err.field, "key", "{msg}");
        assert!(msg.contains(expect), "{msg}");
        for chunk in key_body.as_bytes().chunks(16) {
            let chunk = std::str::from_utf8(chunk).unwrap();
            assert!(!msg.contains(chunk), "key material in error: {msg}");
        }
        assert!(
            !msg.contains(&other_key[30..60]),
            "key material in error: {msg}"
        );
    }
}

#[test]
fn reload_swaps_on_change_and_keeps_the_old_config_on_bad_files() {
    let ca = ca();
    let dir = Dir::new("reload");
    let (cert, key) = leaf(&ca, "spiffe://td/ns/a/sa/b", 1);
    let cert_path = dir.write("tls.crt", &cert);
    let key_path = dir.write("tls.key", &key);
    let tls = ServerTls::load(
        "in",
        &server_cfg(&cert_path, &key_path, None),
        ListenerProtocol::Http,
    )
    .unwrap();
    let first = tls.config.current();
    assert_eq!(tls.config.reload().unwrap(), None, "nothing changed");
    assert!(Arc::ptr_eq(&first, &tls.config.current()));

    // Half-way through a rotation: a new certificate beside the old key. Refused, kept.
    let (cert2, key2) = leaf(&ca, "spiffe://td/ns/a/sa/b", 2);
    dir.write("tls.crt", &cert2);
    let err = tls.config.reload().unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    assert!(Arc::ptr_eq(&first, &tls.config.current()));

    // The key arrives: swapped in, and the log line names the new serial.
    dir.write("tls.key", &key2);
    let summary = tls.config.reload().unwrap().expect("swapped");
    assert_eq!(summary, "serial 02, identity spiffe://td/ns/a/sa/b");
    assert!(!Arc::ptr_eq(&first, &tls.config.current()));
}

/// `allow_identities` is a handshake check on `tcp` listeners only: an `http` listener
/// completes the handshake and leaves the decision to its authorization policy.
#[tokio::test]
async fn allow_lists_refuse_in_the_handshake_on_tcp_only() {
    use rustls::pki_types::pem::PemObject;
    let ca = ca();
    let dir = Dir::new("allow");
    let (cert, key) = leaf(&ca, "spiffe://td/ns/a/sa/server", 1);
    let (other_cert, other_key) = leaf(&ca, "spiffe://td/ns/a/sa/other", 2);
    let mut cfg = server_cfg(
        &dir.write("c", &cert),
        &dir.write("k", &key),
        Some(&dir.write("ca", &ca.cert.pem())),
    );
    cfg.allow_identities = vec![Identity::parse("spiffe://td/ns/a/sa/web").unwrap()];
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let chain = vec![CertificateDer::from_pem_slice(other_cert.as_bytes()).unwrap()];
    let client_key = PrivateKeyDer::from_pem_slice(other_key.as_bytes()).unwrap();
    let client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, client_key)
        .unwrap();
    let client = tokio_rustls::TlsConnector::from(Arc::new(client));
    for (protocol, accepted) in [
        (ListenerProtocol::Http, true),
        (ListenerProtocol::Tcp, false),
    ] {
        let tls = ServerTls::load("in", &cfg, protocol).unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let (decided, wait) = tokio::sync::oneshot::channel::<()>();
        let dial = {
            let client = client.clone();
            tokio::spawn(async move {
                let s = TcpStream::connect(addr).await.unwrap();
                let name = ServerName::try_from("localhost").unwrap();
                // Kept open until the server has decided.
                let conn = client.connect(name, s).await;
                let _ = wait.await;
                drop(conn);
            })
        };
        let (s, _) = tcp.accept().await.unwrap();
        let outcome = tls.accept(s, Duration::from_secs(5)).await;
        let _ = decided.send(());
        match outcome {
            Ok(a) => {
                assert!(
                    accepted,
                    "{protocol:?}: accepted an identity outside the list"
                );
                assert_eq!(a.peer.unwrap().as_str(), "spiffe://td/ns/a/sa/other");
            }
            Err(e) => {
                assert!(!accepted, "{protocol:?}: refused: {e}");
                assert_eq!(e.reason(Role::Server), "identity_not_allowed");
            }
        }
        dial.await.unwrap();
    }
}

#[test]
fn handshake_failures_have_short_reasons() {
    use rustls::CertificateError as C;
    let io = |e: rustls::Error| HandshakeError::Io(io::Error::new(io::ErrorKind::InvalidData, e));
    let cases = [
        (
            rustls::Error::NoCertificatesPresented,
            Role::Server,
            "no_client_cert",
        ),
        (
            rustls::Error::InvalidCertificate(C::UnknownIssuer),
            Role::Server,
            "unknown_ca",
        ),
        (
            rustls::Error::InvalidCertificate(C::Expired),
            Role::Server,
            "expired",
        ),
        (
            rustls::Error::InvalidCertificate(C::NotValidYet),
            Role::Client,
            "not_yet_valid",
        ),
        (
            rustls::Error::InvalidCertificate(C::ApplicationVerificationFailure),
            Role::Server,
            "identity_not_allowed",
        ),
        (
            rustls::Error::InvalidCertificate(C::ApplicationVerificationFailure),
            Role::Client,
            "identity_not_expected",
        ),
        (
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
            Role::Client,
            "peer_alert",
        ),
    ];
    for (e, role, want) in cases {
        assert_eq!(io(e).reason(role), want);
    }
    assert_eq!(HandshakeError::Timeout.reason(Role::Server), "timeout");
    let eof = HandshakeError::Io(io::Error::from(io::ErrorKind::UnexpectedEof));
    assert_eq!(eof.reason(Role::Server), "eof");
}
