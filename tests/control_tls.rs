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
