//! End-to-end: the control API over HTTPS (`spur control --tls-cert --tls-key`) and proxies
//! that watch it (`spur proxy --control https://… --control-ca`), as real processes.

mod common;

use bytes::Bytes;
use common::pki::*;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use std::time::Duration;

fn control_with_tls(pki: &Pki, data: &std::path::Path) -> SpurProcess {
    let server = pki.issue("control", None, 1);
    spawn_spur_control(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--tls-cert",
        &server.cert,
        "--tls-key",
        &server.key,
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_take_their_config_from_an_https_control_plane() {
    let pki = Pki::new("control-tls");
    let data = temp_dir("control-tls");
    let control = control_with_tls(&pki, &data);
    let api = control.control.unwrap();
    let app = named_backend("app").await;

    // A PUT over HTTPS, verified against the test CA.
    let client =
        spur_proxy::control_client::client(Some(std::path::Path::new(&pki.ca_path))).unwrap();
    let yaml = format!(
        "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    cluster: app\nclusters:\n  - name: app\n    endpoints: [\"{}\"]\n",
        app.addr
    );
    let put = Request::put(format!(
        "https://127.0.0.1:{}/v1/groups/shop/config",
        api.port()
    ))
    .body(Full::new(Bytes::from(yaml)))
    .unwrap();
    let resp = client.request(put).await.expect("HTTPS reaches the API");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"{\"version\":1}\n");

    // The same port does not speak plain HTTP.
    let plain = h1_client()
        .request(
            Request::get(format!("http://127.0.0.1:{}/healthz", api.port()))
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert!(plain.is_err(), "plain HTTP to the HTTPS API: {plain:?}");

    // A proxy with the CA gets version 1 and serves it.
    let url = format!("https://127.0.0.1:{}", api.port());
    let proxy = spawn_spur_with(
        &[
            "proxy",
            "--control",
            &url,
            "--control-ca",
            &pki.ca_path,
            "--node",
            "shop-1",
            "--group",
            "shop",
        ],
        1,
        false,
    );
    let r = get(proxy.listeners["web"], "/", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "app"));

    // A proxy that trusts another CA refuses the control plane's certificate and stays
    // unconfigured (not ready), saying why.
    let other = Pki::new("control-tls-other");
    let wary = spawn_spur_with(
        &[
            "proxy",
            "--control",
            &url,
            "--control-ca",
            &other.ca_path,
            "--node",
            "shop-2",
            "--group",
            "shop",
            "--admin",
            "127.0.0.1:0",
        ],
        0,
        true,
    );
    let admin = wary.admin.unwrap();
    let said = eventually(Duration::from_secs(5), || async {
        wary.stderr_lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("TLS handshake with the control plane failed"))
    })
    .await;
    assert!(said, "{:#?}", wary.stderr_lines.lock().unwrap());
    assert_eq!(get(admin, "/ready", &[]).await.status, 503);
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn tls_flags_are_checked() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_spur"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["control", "--tls-cert", "x.pem"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert and --tls-key go together"));

    let pki = Pki::new("control-tls-bad");
    let leaf = pki.issue("control", None, 1);
    let other = pki.issue("other", None, 2);
    let data = temp_dir("control-tls-bad");
    let out = run(&[
        "control",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--tls-cert",
        &leaf.cert,
        "--tls-key",
        &other.key,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not match the certificate"),
        "{stderr}"
    );
    assert!(!stderr.contains("PRIVATE KEY"), "no key material in errors");

    let out = run(&[
        "proxy",
        "--control",
        "https://127.0.0.1:1",
        "--control-ca",
        "/nonexistent/ca.pem",
        "--node",
        "n",
        "--group",
        "g",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("--control-ca: cannot read /nonexistent/ca.pem"));

    let out = run(&[
        "proxy",
        "--control",
        "http://127.0.0.1:1",
        "--control-ca",
        &pki.ca_path,
        "--node",
        "n",
        "--group",
        "g",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("--control-ca goes with an https:// control URL"));
    let _ = std::fs::remove_dir_all(&data);
}

/// The serial of the certificate a new TLS connection to `addr` is shown, verified against
/// `pki`'s CA as `localhost`.
async fn presented_serial(addr: std::net::SocketAddr, pki: &Pki) -> Option<u64> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(&pki.ca_path).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(spur_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)).connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        ),
    )
    .await
    .ok()?
    .ok()?;
    let der = tls.get_ref().1.peer_certificates()?[0].to_vec();
    let serial = spur_proxy::tls::der::serial(&der)?;
    Some(
        serial
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_api_certificate_is_re_read_when_its_files_change() {
    let pki = Pki::new("control-rotate");
    let data = temp_dir("control-rotate");
    let control = control_with_tls(&pki, &data);
    let api = control.control.unwrap();
    assert_eq!(presented_serial(api, &pki).await, Some(1));

    // New files in place (each replaced by rename): new handshakes get the new certificate.
    pki.issue("control", None, 2);
    assert!(
        eventually(Duration::from_secs(5), || async {
            presented_serial(api, &pki).await == Some(2)
        })
        .await,
        "the control plane still presents its first certificate"
    );
    // And the API works on it for a proxy's client.
    let client =
        spur_proxy::control_client::client(Some(std::path::Path::new(&pki.ca_path))).unwrap();
    let resp = client
        .request(
            Request::get(format!("https://127.0.0.1:{}/healthz", api.port()))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .expect("HTTPS with the new certificate");
    assert_eq!(resp.status(), 200);
    let _ = std::fs::remove_dir_all(&data);
}

/// The control plane's certificate must be valid for the host of the `--control` URL, not
/// only signed by the CA: one from the right CA for another name is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_certificate_for_another_name_is_refused() {
    let pki = Pki::new("control-name");
    let elsewhere = pki.issue_with("control", None, 1, |p| {
        p.subject_alt_names = vec![rcgen::SanType::DnsName(
            "control.spur.test".try_into().unwrap(),
        )];
    });
    let data = temp_dir("control-name");
    let control = spawn_spur_control(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--tls-cert",
        &elsewhere.cert,
        "--tls-key",
        &elsewhere.key,
    ]);
    let api = control.control.unwrap();
    let client =
        spur_proxy::control_client::client(Some(std::path::Path::new(&pki.ca_path))).unwrap();
    for host in ["127.0.0.1".to_string(), "localhost".to_string()] {
        let err = client
            .request(
                Request::get(format!("https://{host}:{}/healthz", api.port()))
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .expect_err("a certificate for control.spur.test accepted for another host");
        let chain = spur_proxy::control_client::error_chain(&err);
        assert!(
            chain.contains("TLS handshake with the control plane failed")
                && chain.contains("not valid for name"),
            "{host}: {chain}"
        );
    }
    let _ = std::fs::remove_dir_all(&data);
}
