//! End-to-end: the control plane as the mesh CA.

mod common;

use common::*;
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::{ServerName, UnixTime};
use spur_proxy::tls::{Identity, WorkloadIdentity};
use spur_proxy::Proxy;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn csr_for(uri: &str) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

async fn control_with_ca() -> (spur_control::ControlHandle, std::path::PathBuf) {
    control_with_ca_ttl(Duration::from_secs(24 * 3600)).await
}

async fn control_with_ca_ttl(ttl: Duration) -> (spur_control::ControlHandle, std::path::PathBuf) {
    let dir = temp_dir("ca");
    let h = spur_control::start(spur_control::Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("data"),
        token: Some("api-token".into()),
        ca: Some(spur_control::CaOptions {
            dir: dir.join("ca"),
            join_token: "join-me".into(),
            trust_domain: "cluster.local".into(),
            ttl,
            ..Default::default()
        }),
        kubernetes: None,
        ..Default::default()
    })
    .await
    .unwrap();
    (h, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certify_issues_a_short_lived_spiffe_certificate_for_the_join_token_only() {
    let (cp, dir) = control_with_ca().await;
    let c = cp.addr;
    let id = "spiffe://cluster.local/ns/shop/sa/web";
    let body =
        |token: &str, csr: &str| serde_json::json!({ "csr": csr, "join_token": token }).to_string();

    for token in ["wrong", ""] {
        let (s, v) = call(
            c,
            "POST",
            "/v1/identity/certify",
            Some(&body(token, &csr_for(id))),
            None,
        )
        .await;
        assert_eq!(s, 401, "{v}");
    }
    let (s, _) = call(
        c,
        "POST",
        "/v1/identity/certify",
        Some(r#"{"csr": "x"}"#),
        None,
    )
    .await;
    assert_eq!(s, 400, "missing join token");
    let (_, m) = (0, get(c, "/metrics", &[]).await.text());
    assert_eq!(
        metric_in(&m, "spur_control_certificates_issued_total", &[]),
        0.0,
        "nothing issued"
    );

    let (s, v) = call(
        c,
        "POST",
        "/v1/identity/certify",
        Some(&body("join-me", &csr_for(id))),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let cert =
        CertificateDer::from_pem_slice(v["certificate"].as_str().unwrap().as_bytes()).unwrap();
    assert_eq!(spur_proxy::tls::der::uri_sans(&cert), vec![id]);
    let ca_pem = std::fs::read_to_string(dir.join("ca/ca.crt")).unwrap();
    assert_eq!(v["ca"].as_str().unwrap(), ca_pem);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        v["expires_at"].as_u64().unwrap().abs_diff(now + 24 * 3600) < 10,
        "24 h by default"
    );

    // Another trust domain, or no SPIFFE ID: refused.
    let (s, v) = call(
        c,
        "POST",
        "/v1/identity/certify",
        Some(&body("join-me", &csr_for("spiffe://other.org/ns/a/sa/b"))),
        None,
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(v["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("trust domain"));
    assert_eq!(
        metric(c, "spur_control_certificates_issued_total", &[]).await,
        1.0
    );
    // The API token still guards the rest of /v1/.
    assert_eq!(call(c, "GET", "/v1/proxies", None, None).await.0, 401);
}

// --- The proxy side: workload identities from the mesh CA. ---

const ID_A: &str = "spiffe://cluster.local/ns/shop/sa/a";
const ID_B: &str = "spiffe://cluster.local/ns/shop/sa/b";

async fn workload(cp: &spur_control::ControlHandle, id: &str) -> Arc<WorkloadIdentity> {
    WorkloadIdentity::obtain(
        Identity::parse(id).unwrap(),
        &format!("http://{}", cp.addr),
        "join-me",
    )
    .await
    .expect("certificate from the mesh CA")
}

/// A proxy in this process with a workload identity, serving `yaml`.
async fn proxy_with(identity: Arc<WorkloadIdentity>, yaml: &str) -> Proxy {
    let cfg = spur_config::load(yaml, Some("test.yaml")).unwrap();
    let proxy = Proxy::idle().unwrap();
    proxy.set_identity(identity).unwrap();
    proxy.apply(cfg, 1).await.expect("config applies");
    proxy
}

/// A joins as A, B as B; A's outbound cluster speaks mTLS to B's inbound listener with
/// nothing but identities in the config; B forwards to a plain app.
struct Mesh {
    cp: spur_control::ControlHandle,
    _app: Backend,
    a: Proxy,
    b: Proxy,
}

async fn mesh(ttl: Duration) -> Mesh {
    let (cp, _) = control_with_ca_ttl(ttl).await;
    let app = named_backend("app").await;
    let b = proxy_with(
        workload(&cp, ID_B).await,
        &format!(
            r#"
listeners:
  - {{ name: inbound, listen: "127.0.0.1:0", tls: {{ allow_identities: ["{ID_A}"] }}, cluster: app }}
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
"#,
            app = app.addr
        ),
    )
    .await;
    let a = proxy_with(
        workload(&cp, ID_A).await,
        &format!(
            r#"
listeners:
  - {{ name: outbound, listen: "127.0.0.1:0", cluster: b }}
clusters:
  - {{ name: b, endpoints: ["{b}"], tls: {{ expect_identities: ["{ID_B}"] }} }}
"#,
            b = b.listener_addr("inbound").unwrap()
        ),
    )
    .await;
    Mesh {
        cp,
        _app: app,
        a,
        b,
    }
}

/// Records the certificate a server presents, and accepts it: the test reads its serial.
#[derive(Debug)]
struct Recorder(Arc<std::sync::Mutex<Option<Vec<u8>>>>);

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = Some(end_entity.to_vec());
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The serial of the certificate a new TLS connection to `addr` is shown. (The server then
/// refuses this client, which has no certificate: that does not matter here.)
async fn presented_serial(addr: std::net::SocketAddr) -> Vec<u8> {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let cfg = ClientConfig::builder_with_provider(spur_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Recorder(seen.clone())))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("b.mesh").unwrap(), tcp),
    )
    .await;
    let der = seen
        .lock()
        .unwrap()
        .take()
        .expect("the server presented a certificate");
    spur_proxy::tls::der::serial(&der).unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_join_the_mesh_and_speak_mtls_with_identities_only() {
    let m = mesh(Duration::from_secs(3600)).await;
    let out = m.a.listener_addr("outbound").unwrap();
    let r = get(out, "/hello", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-backend"), Some("app"));
    assert_eq!(r.header("x-echo-x-spur-peer-identity"), Some(ID_A));

    // B's listener requires a mesh certificate: a client without one gets no answer.
    let tcp = tokio::net::TcpStream::connect(m.b.listener_addr("inbound").unwrap())
        .await
        .unwrap();
    let cfg = ClientConfig::builder_with_provider(spur_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Recorder(Arc::default())))
        .with_no_client_auth();
    let refused = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("b.mesh").unwrap(), tcp)
            .await?;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tls.write_all(b"GET / HTTP/1.1\r\nhost: b\r\n\r\n").await?;
        let mut buf = [0u8; 64];
        let n = tls.read(&mut buf).await?;
        Ok::<usize, std::io::Error>(n)
    };
    let outcome = tokio::time::timeout(Duration::from_secs(5), refused)
        .await
        .expect("bounded");
    assert!(
        !matches!(outcome, Ok(n) if n > 0),
        "answered without a client certificate"
    );
    // The certificate B presents is its own, from the mesh CA.
    let serial = presented_serial(m.b.listener_addr("inbound").unwrap()).await;
    assert!(!serial.is_empty());
    drop(m.cp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_certificates_renew_before_expiry_without_failed_requests() {
    // 6 s certificates: renewed at about 4 s, picked up by the TLS reload tick within 1 s.
    let m = mesh(Duration::from_secs(6)).await;
    let out = m.a.listener_addr("outbound").unwrap();
    let inbound = m.b.listener_addr("inbound").unwrap();
    let first = presented_serial(inbound).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut requests = 0;
    loop {
        let r = get(out, "/renewal", &[]).await;
        assert_eq!(r.status, 200, "request {requests} failed: {}", r.text());
        assert_eq!(r.header("x-echo-x-spur-peer-identity"), Some(ID_A));
        requests += 1;
        if presented_serial(inbound).await != first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B still presents its first certificate after 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(m.b.identity().unwrap().generation() >= 2);
    // And after the renewal, traffic (with A's renewed certificate too) keeps flowing.
    assert!(
        eventually(Duration::from_secs(5), || async {
            m.a.identity().unwrap().generation() >= 2
        })
        .await
    );
    for _ in 0..5 {
        assert_eq!(get(out, "/after", &[]).await.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_block_without_files_needs_a_workload_identity() {
    let yaml = r#"
listeners:
  - { name: inbound, listen: "127.0.0.1:0", tls: {}, cluster: app }
clusters:
  - { name: app, endpoints: ["127.0.0.1:9"] }
"#;
    let proxy = Proxy::idle().unwrap();
    let err = proxy
        .apply(spur_config::load(yaml, Some("t.yaml")).unwrap(), 1)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("listeners[0].tls.cert: no file given and this proxy has no workload identity (start it with --identity)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_with_a_wrong_join_token_exits_1() {
    let (cp, dir) = control_with_ca().await;
    let token = dir.join("wrong-token");
    std::fs::write(&token, "not-the-token\n").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_spur"))
        .args([
            "proxy",
            "--control",
            &format!("http://{}", cp.addr),
            "--node",
            "n1",
            "--group",
            "g",
            "--identity",
            ID_A,
            "--join-token-file",
            token.to_str().unwrap(),
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .expect("exits promptly")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("join token refused (401)"), "{stderr}");
    assert!(!stderr.contains("not-the-token"), "the token is not echoed");
}
