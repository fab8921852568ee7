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
    (ca_at("127.0.0.1:0".parse().unwrap(), &dir, ttl).await, dir)
}

/// The control plane as mesh CA at `listen`, on the CA (and data) in `dir`: API token
/// `api-token`, join token `join-me`, trust domain `cluster.local`.
async fn ca_at(
    listen: std::net::SocketAddr,
    dir: &std::path::Path,
    ttl: Duration,
) -> spur_control::ControlHandle {
    spur_control::start(spur_control::Options {
        listen,
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
    .unwrap()
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
        Some(0.0),
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
        Some(1.0)
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
    /// The mesh CA's directory (`ca.crt` in it).
    ca_dir: std::path::PathBuf,
    _app: Backend,
    a: Proxy,
    b: Proxy,
}

async fn mesh(ttl: Duration) -> Mesh {
    let (cp, dir) = control_with_ca_ttl(ttl).await;
    mesh_with(cp, &dir).await
}

/// [`mesh`] with the mesh CA `cp`, whose directory is `dir`.
async fn mesh_with(cp: spur_control::ControlHandle, dir: &std::path::Path) -> Mesh {
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
        ca_dir: dir.join("ca"),
        _app: app,
        a,
        b,
    }
}

/// The certificate a server presented, and the intermediates it sent with it (DER).
type Presented = (Vec<u8>, Vec<Vec<u8>>);

/// Records the certificates a server presents, and accepts them: the test checks them.
#[derive(Debug)]
struct Recorder(Arc<std::sync::Mutex<Option<Presented>>>);

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = intermediates.iter().map(|c| c.to_vec()).collect();
        *self.0.lock().unwrap() = Some((end_entity.to_vec(), chain));
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

/// The serial of the certificate a new TLS connection to `addr` is shown.
async fn presented_serial(addr: std::net::SocketAddr) -> Vec<u8> {
    let (der, _) = presented_chain(addr).await;
    spur_proxy::tls::der::serial(&der).unwrap().to_vec()
}

/// The certificate (and intermediates) a new TLS connection to `addr` is shown. (The
/// server then refuses this client, which has no certificate: that does not matter here.)
async fn presented_chain(addr: std::net::SocketAddr) -> Presented {
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
    let taken = seen.lock().unwrap().take();
    taken.expect("the server presented a certificate")
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
    // The certificate B presents is its own, from the mesh CA: it chains to the CA the
    // control plane wrote, and its only URI SAN is B's SPIFFE ID.
    let (leaf, intermediates) = presented_chain(m.b.listener_addr("inbound").unwrap()).await;
    assert_eq!(spur_proxy::tls::der::uri_sans(&leaf), vec![ID_B]);
    let ca = CertificateDer::from_pem_file(m.ca_dir.join("ca.crt")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let leaf = CertificateDer::from(leaf);
    let chain: Vec<CertificateDer> = intermediates
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &rustls::server::ParsedCertificate::try_from(&leaf).unwrap(),
        &roots,
        &chain,
        UnixTime::now(),
        spur_proxy::tls::provider()
            .signature_verification_algorithms
            .all,
    )
    .expect("B's certificate chains to the mesh CA");
    // Another mesh CA's certificate does not verify it.
    let (other, other_dir) = control_with_ca().await;
    let mut foreign = rustls::RootCertStore::empty();
    foreign
        .add(CertificateDer::from_pem_file(other_dir.join("ca/ca.crt")).unwrap())
        .unwrap();
    assert!(rustls::client::verify_server_cert_signed_by_trust_anchor(
        &rustls::server::ParsedCertificate::try_from(&leaf).unwrap(),
        &foreign,
        &chain,
        UnixTime::now(),
        spur_proxy::tls::provider()
            .signature_verification_algorithms
            .all,
    )
    .is_err());
    drop(other);
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

/// A mesh CA that fails while a renewal is due: the proxies keep their current
/// certificates (and the mTLS hop keeps working), retry, and renew once the CA is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_renewal_keeps_the_current_certificate_and_retries() {
    // 12 s certificates: renewed from 8 s on, expired at 12 s.
    let ttl = Duration::from_secs(12);
    let dir = temp_dir("renew-fails");
    let cp = ca_at("127.0.0.1:0".parse().unwrap(), &dir, ttl).await;
    let ca_addr = cp.addr;
    let m = mesh_with(cp, &dir).await;
    let out = m.a.listener_addr("outbound").unwrap();
    let inbound = m.b.listener_addr("inbound").unwrap();
    let first = presented_serial(inbound).await;

    // The CA goes away; in its place, one that answers 503 to everything.
    m.cp.stop();
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(5);
    let failing = loop {
        let counter = asked.clone();
        let bound = backend_on(ca_addr, move |_req| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {
                http::Response::builder()
                    .status(503)
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap()
            }
        })
        .await;
        if let Some(b) = bound {
            break b;
        }
        assert!(Instant::now() < deadline, "the CA's port was not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Renewals are due at 8 s: both proxies ask, fail, and ask again.
    assert!(
        eventually(Duration::from_secs(15), || async {
            asked.load(std::sync::atomic::Ordering::SeqCst) >= 3
        })
        .await,
        "no renewal was attempted"
    );
    assert_eq!(m.b.identity().unwrap().generation(), 1);
    assert_eq!(
        presented_serial(inbound).await,
        first,
        "B kept its certificate"
    );
    for _ in 0..5 {
        let r = get(out, "/while-the-ca-fails", &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-echo-x-spur-peer-identity"), Some(ID_A));
    }

    // The CA is back (the same CA): the next retry renews, before the certificates expire.
    failing.kill();
    drop(failing);
    let deadline = Instant::now() + Duration::from_secs(3);
    let _back = loop {
        let started = {
            let dir = dir.clone();
            tokio::spawn(async move { ca_at(ca_addr, &dir, ttl).await })
        };
        if let Ok(cp) = started.await {
            break cp;
        }
        assert!(Instant::now() < deadline, "the CA could not listen again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            m.b.identity().unwrap().generation() >= 2 && presented_serial(inbound).await != first
        })
        .await,
        "B did not renew once the CA was back"
    );
    assert_eq!(get(out, "/after", &[]).await.status, 200);
}

/// `spur proxy --identity` with no mesh CA reachable: it retries for 30 s
/// (`CERTIFY_START_LIMIT`), then exits 1 saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_mesh_ca_is_retried_for_30_s_then_the_proxy_exits_1() {
    // Nothing listens there, and nothing can while the test runs.
    let held = refusing_addr();
    let port = held.port();
    let token = temp_dir("no-ca").join("token");
    std::fs::write(&token, "join-me\n").unwrap();
    let started = Instant::now();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_spur"))
        .args([
            "proxy",
            "--control",
            &format!("http://127.0.0.1:{port}"),
            "--node",
            "n1",
            "--group",
            "g",
            "--identity",
            ID_A,
            "--join-token-file",
            token.to_str().unwrap(),
            "--log-format",
            "json",
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("exits within 60 s")
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        (Duration::from_secs(30)..Duration::from_secs(40)).contains(&took),
        "exited after {took:?}"
    );
    let retries = stderr
        .lines()
        .filter(|l| l.contains("no workload certificate yet"))
        .count();
    assert!(retries >= 5, "{retries} retries in 30 s:\n{stderr}");
    assert!(
        stderr.contains("no workload certificate: cannot start"),
        "{stderr}"
    );
}

/// The same, with the mesh CA coming up a few seconds later: the proxy gets its
/// certificate and carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_ca_that_comes_up_within_30_s_certifies_the_waiting_proxy() {
    // Held until the mesh CA binds it.
    let held = reserved_port();
    let port = held.port();
    let dir = temp_dir("late-ca");
    let token = dir.join("token");
    std::fs::write(&token, "join-me\n").unwrap();
    let spur = spawn_spur_with(
        &[
            "proxy",
            "--control",
            &format!("http://127.0.0.1:{port}"),
            "--node",
            "n1",
            "--group",
            "g",
            "--identity",
            ID_A,
            "--join-token-file",
            token.to_str().unwrap(),
        ],
        0,
        false,
    );
    let said = |what: &'static str| {
        let lines = spur.stderr_lines.clone();
        move || {
            let n = lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(what))
                .count();
            async move { n }
        }
    };
    let retried = said("no workload certificate yet");
    assert!(
        eventually(Duration::from_secs(10), || {
            let n = retried();
            async move { n.await >= 2 }
        })
        .await
    );
    let cp = ca_at(
        format!("127.0.0.1:{port}").parse().unwrap(),
        &dir,
        Duration::from_secs(3600),
    )
    .await;
    let obtained = said("workload certificate obtained");
    assert!(
        eventually(Duration::from_secs(15), || {
            let n = obtained();
            async move { n.await >= 1 }
        })
        .await,
        "{:#?}",
        spur.stderr_lines.lock().unwrap()
    );
    assert_eq!(
        metric(cp.addr, "spur_control_certificates_issued_total", &[]).await,
        Some(1.0)
    );
    drop(spur);
}
