//! End-to-end: identity proven, not claimed (issue 14, part 1). A fake Kubernetes API
//! server on 127.0.0.1 answers TokenReviews for two service accounts (`shop/web`,
//! `pay/api`) and rejects other tokens; the control plane is the mesh CA with
//! `--kubernetes`; proxies prove who they are with a projected service-account token, or,
//! outside Kubernetes, with join tokens bound to identity patterns. Also what a CSR cannot
//! get, whatever it asks for.

mod common;
#[path = "support/fake_kube.rs"]
mod fake_kube;

use common::*;
use fake_kube::FakeKube;
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde_json::{json, Value};
use spur_proxy::tls::{Credential, Identity, WorkloadIdentity};
use std::net::SocketAddr;
use std::time::Duration;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API: &str = "spiffe://cluster.local/ns/pay/sa/api";

// ---------------------------------------------------------------------------------------

/// A mesh CA with `--kubernetes` against the fake API, in this process.
async fn ca_with_kubernetes(kube: &FakeKube, ttl: Duration) -> spur_control::ControlHandle {
    let dir = temp_dir("ca-k8s");
    spur_control::start(spur_control::Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("data"),
        ca: Some(spur_control::CaOptions {
            dir: dir.join("ca"),
            ttl,
            ..Default::default()
        }),
        kubernetes: Some(spur_control::k8s::KubernetesOptions {
            kubeconfig: Some(kube.kubeconfig(&dir)),
        }),
        ..Default::default()
    })
    .await
    .expect("control plane starts")
}

fn csr(uris: &[&str], adjust: impl FnOnce(&mut CertificateParams)) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    adjust(&mut params);
    params.serialize_request(&key).unwrap().pem().unwrap()
}

async fn certify(c: SocketAddr, body: Value) -> (u16, Value) {
    call(
        c,
        "POST",
        "/v1/identity/certify",
        Some(&body.to_string()),
        None,
    )
    .await
}

fn token_file(token: &str) -> std::path::PathBuf {
    let path = temp_dir("sa-token").join("token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

fn issued(c: &Value) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(c["certificate"].as_str().unwrap().as_bytes()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_token_obtains_its_own_identity_and_nothing_else() {
    let kube = FakeKube::start().await;
    let cp = ca_with_kubernetes(&kube, Duration::from_secs(3600)).await;
    let c = cp.addr;
    let url = format!("http://{c}");
    let client = || spur_proxy::control_client::client(None).unwrap();

    // The proxy's way: no identity asked, the token decides.
    let web = WorkloadIdentity::obtain_as(
        client(),
        &url,
        None,
        Credential::ServiceAccountTokenFile(token_file("tok-web")),
    )
    .await
    .expect("a certificate for shop/web");
    assert_eq!(web.identity().as_str(), WEB);
    let leaf = CertificateDer::from_pem_slice(&web.material().cert_pem).unwrap();
    assert_eq!(spur_proxy::tls::der::uri_sans(&leaf), vec![WEB]);
    // The review asked for audience `spur`.
    let seen = kube.reviews.lock().unwrap().seen.clone();
    assert_eq!(seen[0]["audiences"], json!(["spur"]));

    // The same token asking for its own ID: fine; for another: 403, nothing issued.
    let (s, v) = certify(
        c,
        json!({ "csr": csr(&[WEB], |_| {}), "sa_token": "tok-web" }),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["identity"], WEB);
    let before = metric(c, "spur_control_certificates_issued_total", &[])
        .await
        .unwrap_or(0.0);
    let (s, v) = certify(
        c,
        json!({ "csr": csr(&[API], |_| {}), "sa_token": "tok-web" }),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["errors"][0]["path"], "csr");
    assert!(v.get("certificate").is_none());
    let msg = v["errors"][0]["message"].as_str().unwrap();
    assert!(msg.contains("shop/web") && msg.contains(API), "{msg}");
    let wanted_api = WorkloadIdentity::obtain_as(
        client(),
        &url,
        Some(Identity::parse(API).unwrap()),
        Credential::ServiceAccountTokenFile(token_file("tok-web")),
    )
    .await;
    assert!(
        matches!(
            wanted_api,
            Err(spur_proxy::tls::CertifyError::Rejected { status: 403, .. })
        ),
        "{wanted_api:?}"
    );
    // The other service account gets its own.
    let (s, v) = certify(c, json!({ "csr": csr(&[], |_| {}), "sa_token": "tok-api" })).await;
    assert_eq!((s, v["identity"].as_str()), (200, Some(API)), "{v}");

    // Rejected tokens: 401, and the proxy says which credential failed.
    for bad in ["tok-nobody", "tok-web-default", ""] {
        let (s, v) = certify(c, json!({ "csr": csr(&[], |_| {}), "sa_token": bad })).await;
        assert_eq!(s, 401, "{bad}: {v}");
    }
    let refused = WorkloadIdentity::obtain_as(
        client(),
        &url,
        None,
        Credential::ServiceAccountTokenFile(token_file("tok-nobody")),
    )
    .await
    .unwrap_err();
    assert!(
        refused
            .to_string()
            .starts_with("service account token refused (401)"),
        "{refused}"
    );
    // A valid token that is not a service account's: 403.
    let (s, _) = certify(
        c,
        json!({ "csr": csr(&[], |_| {}), "sa_token": "tok-node" }),
    )
    .await;
    assert_eq!(s, 403);
    // Neither credential, or both: 400.
    let (s, _) = certify(c, json!({ "csr": csr(&[], |_| {}) })).await;
    assert_eq!(s, 400);
    assert_eq!(
        metric(c, "spur_control_certificates_issued_total", &[])
            .await
            .unwrap_or(0.0),
        before + 1.0,
        "only the pay/api certificate was issued since"
    );
}

/// The token file is read again at each renewal: after the kubelet rotates it (and the old
/// token stops working), the renewed certificate is obtained with the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_renewed_certificate_follows_a_rotated_token_file() {
    let kube = FakeKube::start().await;
    kube.token("tok-web-2", "system:serviceaccount:shop:web", &["spur"]);
    let cp = ca_with_kubernetes(&kube, Duration::from_secs(3600)).await;
    let file = token_file("tok-web");
    let web = WorkloadIdentity::obtain_as(
        spur_proxy::control_client::client(None).unwrap(),
        &format!("http://{}", cp.addr),
        None,
        Credential::ServiceAccountTokenFile(file.clone()),
    )
    .await
    .unwrap();
    let first = web.material().serial.clone();
    write_atomically(file.to_str().unwrap(), "tok-web-2\n");
    kube.revoke("tok-web");
    web.renew().await.expect("renewed with the rotated token");
    assert_eq!(web.generation(), 2);
    assert_ne!(web.material().serial, first);
    assert_eq!(web.identity().as_str(), WEB);
    assert_eq!(
        kube.tokens_seen().last().map(String::as_str),
        Some("tok-web-2")
    );
    // A file rotated to a token the API rejects: the renewal fails, the certificate stays.
    write_atomically(file.to_str().unwrap(), "tok-revoked\n");
    assert!(web.renew().await.is_err());
    assert_eq!(web.generation(), 2);
}

use common::pki::write_atomically;

/// A real `spur proxy --control URL --sa-token-file F` process gets its identity from the
/// service account, before it applies any config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spur_proxy_with_a_service_account_token_file() {
    let kube = FakeKube::start().await;
    let cp = ca_with_kubernetes(&kube, Duration::from_secs(3600)).await;
    let url = format!("http://{}", cp.addr);
    let file = token_file("tok-web");
    let proxy = spawn_spur_with(
        &[
            "proxy",
            "--control",
            &url,
            "--node",
            "web-1",
            "--group",
            "web",
            "--admin",
            "127.0.0.1:0",
            "--sa-token-file",
            file.to_str().unwrap(),
        ],
        0,
        true,
    );
    let lines = proxy.stderr_lines.lock().unwrap().clone();
    let obtained = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "workload certificate obtained")
        .expect("logged before the admin server started");
    assert_eq!(obtained["identity"], WEB);
    drop(proxy);

    // A token the API rejects: exit 1 at once, naming the credential.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spur"))
        .args([
            "proxy",
            "--control",
            &url,
            "--node",
            "x",
            "--group",
            "web",
            "--sa-token-file",
            token_file("tok-nobody").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("service account token refused (401)"), "{err}");
}

/// Outside Kubernetes: `spur control --join-tokens FILE` binds each token to a pattern; a
/// `ns/shop/*` token cannot obtain a `ns/pay/` identity. `--join-token-file` still works,
/// as a token for `spiffe://TD/*`, with a warning at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_obtain_only_what_their_pattern_covers() {
    let dir = temp_dir("join-tokens");
    let tokens = dir.join("join-tokens");
    std::fs::write(
        &tokens,
        "# team shop\nt-shop spiffe://cluster.local/ns/shop/*\nt-api spiffe://cluster.local/ns/pay/sa/api\n",
    )
    .unwrap();
    let any = dir.join("any-token");
    std::fs::write(&any, "t-any\n").unwrap();
    let cp = spawn_spur_control(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.join("data").to_str().unwrap(),
        "--ca-dir",
        dir.join("ca").to_str().unwrap(),
        "--join-tokens",
        tokens.to_str().unwrap(),
        "--join-token-file",
        any.to_str().unwrap(),
    ]);
    let warned = cp.stderr_lines.lock().unwrap().iter().any(|l| {
        l.contains("may obtain any identity of the trust domain (spiffe://cluster.local/*)")
    });
    assert!(warned, "{:?}", cp.stderr_lines.lock().unwrap());
    let c = cp.control.unwrap();
    let join =
        |token: &str, uris: &[&str]| json!({ "csr": csr(uris, |_| {}), "join_token": token });

    let (s, v) = certify(c, join("t-shop", &[WEB])).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(spur_proxy::tls::der::uri_sans(&issued(&v)), vec![WEB]);
    let (s, v) = certify(c, join("t-shop", &[API])).await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["errors"][0]["path"], "csr");
    let (s, _) = certify(
        c,
        join("t-shop", &["spiffe://cluster.local/ns/shopping/sa/x"]),
    )
    .await;
    assert_eq!(s, 403, "a prefix ends at a segment");
    // An exact pattern: that ID, also for a CSR that names none.
    let (s, v) = certify(c, join("t-api", &[])).await;
    assert_eq!((s, v["identity"].as_str()), (200, Some(API)), "{v}");
    let (s, _) = certify(c, join("t-api", &[WEB])).await;
    assert_eq!(s, 403);
    // A prefix pattern and no ID in the CSR: which one? 400.
    let (s, _) = certify(c, join("t-shop", &[])).await;
    assert_eq!(s, 400);
    // The old single token: anything in the trust domain.
    let (s, _) = certify(c, join("t-any", &[API])).await;
    assert_eq!(s, 200);
    let (s, _) = certify(c, join("t-wrong", &[WEB])).await;
    assert_eq!(s, 401);
    // Service-account tokens need --kubernetes.
    let (s, v) = certify(
        c,
        json!({ "csr": csr(&[WEB], |_| {}), "sa_token": "tok-web" }),
    )
    .await;
    assert_eq!(s, 400, "{v}");

    // A bad file refuses to start, naming each bad line.
    std::fs::write(&tokens, "t-x spiffe://other.org/ns/a/*\nt-y\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spur"))
        .args([
            "control",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.join("data2").to_str().unwrap(),
            "--ca-dir",
            dir.join("ca").to_str().unwrap(),
            "--join-tokens",
            tokens.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 1:") && err.contains("line 2:"), "{err}");
}

/// Whatever a CSR asks for, the certificate is a workload certificate: not a CA, key usage
/// digitalSignature, server and client auth, one URI SAN, the configured lifetime. CSRs
/// with several URI SANs or non-canonical SPIFFE IDs are refused (issue 20, item 13).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_gets_a_workload_certificate_whatever_it_asks_for() {
    let dir = temp_dir("ca-contents");
    let ttl = Duration::from_secs(600);
    let cp = spur_control::start(spur_control::Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("data"),
        ca: Some(spur_control::CaOptions {
            dir: dir.join("ca"),
            join_token: "t-any".into(),
            ttl,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = cp.addr;
    let greedy = csr(&[WEB], |p| {
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::CodeSigning];
        p.subject_alt_names
            .push(SanType::DnsName("admin.shop.svc".try_into().unwrap()));
        p.subject_alt_names
            .push(SanType::IpAddress("10.0.0.1".parse().unwrap()));
        p.not_after = rcgen::date_time_ymd(2099, 1, 1);
    });
    let (s, v) = certify(c, json!({ "csr": greedy, "join_token": "t-any" })).await;
    assert_eq!(s, 200, "{v}");
    let der = issued(&v);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let bc = cert.basic_constraints().unwrap().map(|b| b.value.ca);
    assert_ne!(bc, Some(true), "not a CA");
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature());
    assert!(!ku.key_cert_sign() && !ku.crl_sign() && !ku.key_encipherment());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.code_signing && !eku.any);
    let sans = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(
        sans.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        vec![format!("URI({WEB})")]
    );
    let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!(life <= ttl.as_secs() as i64 + 120, "lifetime {life} s");

    let (s, v) = certify(
        c,
        json!({ "csr": csr(&[WEB, API], |_| {}), "join_token": "t-any" }),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let long = format!("spiffe://cluster.local/{}", "a".repeat(8 * 1024));
    for bad in [
        "spiffe://cluster.local/ns/shop/../pay/sa/api",
        "spiffe://cluster.local/ns/./shop/sa/web",
        "spiffe://cluster.local/ns/shop/sa/web?admin=1",
        "spiffe://cluster.local/ns%2Fpay/sa/api",
        "spiffe://cluster.local/ns//shop/sa/web",
        "spiffe://cluster.local/ns/shop/sa/web/",
        "spiffe://Cluster.Local/ns/shop/sa/web",
        "spiffe://cluster.local",
        long.as_str(),
    ] {
        let (s, v) = certify(
            c,
            json!({ "csr": csr(&[bad], |_| {}), "join_token": "t-any" }),
        )
        .await;
        assert_eq!(s, 400, "{bad}: {v}");
    }
    assert_eq!(
        metric(c, "spur_control_certificates_issued_total", &[])
            .await
            .unwrap_or(0.0),
        1.0
    );
}
