//! End-to-end: the control plane as the mesh CA.

mod common;

use common::*;
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::time::Duration;

fn csr_for(uri: &str) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

async fn control_with_ca() -> (spur_control::ControlHandle, std::path::PathBuf) {
    let dir = temp_dir("ca");
    let h = spur_control::start(spur_control::Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("data"),
        token: Some("api-token".into()),
        ca: Some(spur_control::CaOptions {
            dir: dir.join("ca"),
            join_token: "join-me".into(),
            trust_domain: "cluster.local".into(),
            ttl: Duration::from_secs(24 * 3600),
        }),
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
