//! End-to-end (issue 20, item 12): a certificate with more than one URI SAN is refused in
//! both directions, counted as `bad_certificate`, whatever the order of its SANs. An
//! X.509-SVID carries exactly one; with two, `[web, admin]` used to pass an allow list as
//! `web` where `[admin, web]` failed.

mod common;

use bytes::Bytes;
use common::pki::*;
use common::*;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::sync::Arc;

fn id(sa: &str) -> String {
    format!("spiffe://test.local/ns/shop/sa/{sa}")
}

/// A leaf with these URI SANs, in this order.
fn leaf_with(pki: &Pki, name: &str, serial: u64, uris: &[String]) -> Leaf {
    let uris = uris.to_vec();
    pki.issue_with(name, None, serial, move |p| {
        for u in &uris {
            p.subject_alt_names.push(rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(u.as_str()).unwrap(),
            ));
        }
    })
}

fn chain(leaf: &Leaf) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let certs = CertificateDer::pem_file_iter(&leaf.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    (certs, PrivateKeyDer::from_pem_file(&leaf.key).unwrap())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// One HTTP/1.1 GET over mutual TLS with `client`'s certificate: the status, or the error.
async fn get_with_cert(addr: SocketAddr, ca: &str, client: &Leaf) -> Result<u16, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let (certs, key) = chain(client);
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get("/")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_with_two_uri_sans_is_refused_in_any_order() {
    let pki = Pki::new("svid-client");
    let server = pki.issue("server", Some(&id("b")), 1);
    let app = named_backend("app").await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: in
    listen: "127.0.0.1:0"
    tls: {{ cert: "{}", key: "{}", client_ca: "{}", allow_identities: ["{}"] }}
    cluster: app
clusters:
  - {{ name: app, endpoints: ["{}"] }}
"#,
        server.cert,
        server.key,
        pki.ca_path,
        id("web"),
        app.addr
    ))
    .await;
    let addr = proxy.listener_addr("in").unwrap();
    let admin = proxy.admin_addr().unwrap();
    let web = leaf_with(&pki, "web", 2, &[id("web")]);
    let web_admin = leaf_with(&pki, "web-admin", 3, &[id("web"), id("admin")]);
    let admin_web = leaf_with(&pki, "admin-web", 4, &[id("admin"), id("web")]);

    assert_eq!(get_with_cert(addr, &pki.ca_path, &web).await, Ok(200));
    for two in [&web_admin, &admin_web] {
        let got = get_with_cert(addr, &pki.ca_path, two).await;
        assert!(got.is_err(), "{}: {got:?}", two.cert);
    }
    let refused = eventually(std::time::Duration::from_secs(5), || async {
        metric(
            admin,
            "spur_tls_handshake_errors_total",
            &[("listener", "in"), ("reason", "bad_certificate")],
        )
        .await
        .unwrap_or(0.0)
            == 2.0
    })
    .await;
    assert!(refused, "{}", get(admin, "/metrics", &[]).await.text());
}

/// A TLS backend presenting `leaf`, answering 200 to every request.
async fn tls_backend(leaf: &Leaf) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let (certs, key) = chain(leaf);
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = tcp.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                        "ok",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_with_two_uri_sans_is_refused() {
    let pki = Pki::new("svid-server");
    let one = leaf_with(&pki, "one", 1, &[id("b")]);
    let two = leaf_with(&pki, "two", 2, &[id("b"), id("admin")]);
    let (good, _g) = tls_backend(&one).await;
    let (bad, _b) = tls_backend(&two).await;
    let cluster = |name: &str, addr: SocketAddr| {
        format!(
            "  - {{ name: {name}, endpoints: [\"{addr}\"], tls: {{ ca: \"{}\", expect_identities: [\"{}\"] }} }}\n",
            pki.ca_path,
            id("b")
        )
    };
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: out
    listen: "127.0.0.1:0"
    routes:
      - {{ match: {{ path_prefix: /good }}, cluster: good }}
      - {{ match: {{ path_prefix: /bad }}, cluster: bad }}
clusters:
{}{}"#,
        cluster("good", good),
        cluster("bad", bad)
    ))
    .await;
    let out = proxy.listener_addr("out").unwrap();
    let admin = proxy.admin_addr().unwrap();
    assert_eq!(get(out, "/good", &[]).await.status, 200);
    let refused = get(out, "/bad", &[]).await;
    assert_eq!(refused.status, 502);
    assert_eq!(
        metric(
            admin,
            "spur_upstream_tls_handshake_errors_total",
            &[("cluster", "bad"), ("reason", "bad_certificate")],
        )
        .await
        .unwrap_or(0.0),
        1.0,
        "{}",
        get(admin, "/metrics", &[]).await.text()
    );
}
