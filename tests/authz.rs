//! End-to-end: authorization policies through real mTLS connections with two (and more)
//! SPIFFE identities — allow and deny by identity, namespace, path prefix, method, header
//! and gRPC call; deny beating allow; `default: deny`; audit counting without denying; a
//! tcp listener refusing an identity at accept; HTTP/3 through the same plan; a policy
//! pushed live through the control plane (the rollout: audit, watch, deny) under load; and
//! `spur authz explain` agreeing with the running proxy.

mod common;
#[path = "common/h3.rs"]
mod h3c;

use bytes::Bytes;
use common::pki::*;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use spur_proxy::reload::{spawn_control, ControlSource};
use spur_proxy::Proxy;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WEB: &str = "spiffe://test.local/ns/shop/sa/web";
const LEGACY: &str = "spiffe://test.local/ns/shop/sa/legacy";
const API: &str = "spiffe://test.local/ns/pay/sa/api";

/// Who connects: a SPIFFE identity, or a certificate without one.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Web,
    Legacy,
    Api,
    Anonymous,
}

impl Who {
    fn id(self) -> Option<&'static str> {
        match self {
            Who::Web => Some(WEB),
            Who::Legacy => Some(LEGACY),
            Who::Api => Some(API),
            Who::Anonymous => None,
        }
    }
}

/// A test CA, the proxy's server certificate and one client certificate per [`Who`].
struct Certs {
    pki: Pki,
    server: Leaf,
    clients: Vec<(Who, Leaf)>,
}

impl Certs {
    fn new(tag: &str) -> Certs {
        let pki = Pki::new(tag);
        let server = pki.issue("server", Some("spiffe://test.local/ns/shop/sa/app"), 1);
        let clients = [Who::Web, Who::Legacy, Who::Api, Who::Anonymous]
            .into_iter()
            .enumerate()
            .map(|(i, w)| (w, pki.issue(&format!("{w:?}"), w.id(), 10 + i as u64)))
            .collect();
        Certs {
            pki,
            server,
            clients,
        }
    }

    fn leaf(&self, who: Who) -> &Leaf {
        &self.clients.iter().find(|(w, _)| *w == who).unwrap().1
    }

    fn client(&self, who: Who, alpn: &[u8]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.pki.ca_path).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let leaf = self.leaf(who);
        let chain = CertificateDer::pem_file_iter(&leaf.cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&leaf.key).unwrap();
        let mut cfg = ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
        if !alpn.is_empty() {
            cfg.alpn_protocols = vec![alpn.to_vec()];
        }
        Arc::new(cfg)
    }

    /// `tls:` of a listener that requires client certificates from this CA.
    fn listener_tls(&self) -> String {
        format!(
            r#"{{ cert: "{}", key: "{}", client_ca: "{}" }}"#,
            self.server.cert, self.server.key, self.pki.ca_path
        )
    }
}

/// One HTTP/1.1 keep-alive connection over mutual TLS.
struct MtlsConn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl MtlsConn {
    async fn open(addr: SocketAddr, cfg: Arc<ClientConfig>) -> Result<MtlsConn, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(MtlsConn { sender })
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Answer, String> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::new())).unwrap();
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }
}

/// A TCP server that echoes what it reads.
async fn tcp_echo() -> SocketAddr {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = tcp.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// An mTLS `http` listener and an mTLS `tcp` listener, each with a policy.
fn policy_yaml(certs: &Certs, app: SocketAddr, echo: SocketAddr) -> String {
    let tls = certs.listener_tls();
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: inbound
    listen: 127.0.0.1:0
    tls: {tls}
    cluster: app
    authz:
      default: deny
      rules:
        - name: web-reads
          action: allow
          from: {{ identities: ["{WEB}"] }}
          to: {{ path_prefixes: [/api/], methods: [GET, HEAD] }}
        - name: pay-all
          action: allow
          from: {{ namespaces: [pay] }}
        - name: no-admin
          action: deny
          to: {{ path_prefixes: [/api/admin] }}
        - name: probes
          action: allow
          from: {{ cidrs: ["127.0.0.0/8"] }}
          to: {{ paths: [/healthz] }}
        - name: tenant-a
          action: allow
          from: {{ identities: ["spiffe://test.local/ns/shop/*"] }}
          to: {{ headers: [{{ name: x-tenant, value: a }}] }}
        - name: cart-get
          action: allow
          from: {{ identities: ["spiffe://test.local/ns/shop/*"] }}
          to: {{ grpc: [{{ service: shop.Cart, method: Get }}] }}
        - name: pay-deletes
          action: audit
          from: {{ namespaces: [pay] }}
          to: {{ methods: [DELETE] }}
  - name: raw
    listen: 127.0.0.1:0
    protocol: tcp
    tls: {tls}
    cluster: echo
    authz:
      default: deny
      rules:
        - {{ name: shop, action: allow, from: {{ identities: ["spiffe://test.local/ns/shop/*"] }} }}
        - {{ name: no-legacy, action: deny, from: {{ identities: ["{LEGACY}"] }} }}
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
  - {{ name: echo, endpoints: ["{echo}"] }}
"#
    )
}

/// A request of the table: who, method, path, headers; the status and deciding rule
/// expected.
type Row = (
    Who,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    u16,
    &'static str,
);

/// Method, path and headers.
type Asked<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

fn table() -> Vec<Row> {
    vec![
        (Who::Web, "GET", "/api/items", &[], 200, "web-reads"),
        (Who::Web, "HEAD", "/api/items", &[], 200, "web-reads"),
        (Who::Web, "POST", "/api/items", &[], 403, "default"),
        (Who::Web, "GET", "/cart", &[], 403, "default"),
        // Deny beats allow: web-reads and pay-all match too.
        (Who::Web, "GET", "/api/admin/users", &[], 403, "no-admin"),
        (Who::Api, "POST", "/orders", &[], 200, "pay-all"),
        (Who::Api, "GET", "/api/admin", &[], 403, "no-admin"),
        // Audited, not denied.
        (Who::Api, "DELETE", "/orders/1", &[], 200, "pay-all"),
        (Who::Anonymous, "GET", "/healthz", &[], 200, "probes"),
        (Who::Anonymous, "GET", "/api/items", &[], 403, "default"),
        (
            Who::Legacy,
            "GET",
            "/x",
            &[("x-tenant", "a")],
            200,
            "tenant-a",
        ),
        (
            Who::Legacy,
            "GET",
            "/x",
            &[("x-tenant", "b")],
            403,
            "default",
        ),
        (Who::Web, "POST", "/shop.Cart/Get", &[], 200, "cart-get"),
        (Who::Web, "POST", "/shop.Cart/Put", &[], 403, "default"),
        (Who::Api, "POST", "/shop.Cart/Get", &[], 200, "pay-all"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_allowed_and_denied_by_identity_path_method_header_and_call() {
    let certs = Certs::new("authz-table");
    let app = named_backend("app").await;
    let echo = tcp_echo().await;
    let proxy = start_proxy(&policy_yaml(&certs, app.addr, echo)).await;
    let inbound = proxy.listener_addr("inbound").unwrap();
    let admin = proxy.admin_addr().unwrap();
    for (who, method, path, headers, status, rule) in table() {
        let mut conn = MtlsConn::open(inbound, certs.client(who, b"http/1.1"))
            .await
            .unwrap();
        let mut hs = vec![("x-request-id", "authz-1")];
        hs.extend_from_slice(headers);
        let r = conn.send(method, path, &hs).await.unwrap();
        let case = format!("{who:?} {method} {path} {headers:?} (rule {rule})");
        assert_eq!(r.status, status, "{case}");
        if status == 403 {
            assert_eq!(r.header("x-spur-error"), Some("forbidden"), "{case}");
            assert_eq!(r.header("x-request-id"), Some("authz-1"), "{case}");
            assert_eq!(r.header("x-backend"), None, "{case}: reached the app");
        } else {
            assert_eq!(r.header("x-backend"), Some("app"), "{case}");
        }
    }
    // Each request counted once, under the rule that decided it; the audit rule counted
    // the one allowed DELETE it would deny, which still went through.
    let text = get(admin, "/metrics", &[]).await.text();
    let count = |rule: &str, decision: &str| {
        metric_in(
            &text,
            "spur_authz_decisions_total",
            &[
                ("listener", "inbound"),
                ("rule", rule),
                ("decision", decision),
            ],
        )
    };
    for (rule, decision, n) in [
        ("web-reads", "allow", 2.0),
        ("pay-all", "allow", 3.0),
        ("no-admin", "deny", 2.0),
        ("probes", "allow", 1.0),
        ("tenant-a", "allow", 1.0),
        ("cart-get", "allow", 1.0),
        ("default", "deny", 5.0),
        ("pay-deletes", "audit_would_deny", 1.0),
    ] {
        assert_eq!(count(rule, decision), Some(n), "{rule} {decision}");
    }
    assert_eq!(
        metric_in(
            &text,
            "spur_downstream_rejected_total",
            &[("listener", "inbound"), ("reason", "forbidden")]
        ),
        Some(7.0)
    );
    proxy.shutdown().await;
}

/// Opens a TLS connection to a `tcp` listener, sends a line and reads until it is echoed
/// or the proxy closes the connection: the bytes that came back.
async fn tcp_round_trip(addr: SocketAddr, cfg: Arc<ClientConfig>) -> Vec<u8> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let outcome = async {
        let mut s = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        s.write_all(b"ping\n").await?;
        // Until the echo is back, or the proxy closes the connection.
        let mut back = Vec::new();
        let mut buf = [0u8; 16];
        while back.len() < 5 {
            match s.read(&mut buf).await? {
                0 => break,
                n => back.extend_from_slice(&buf[..n]),
            }
        }
        Ok::<_, std::io::Error>(back)
    };
    tokio::time::timeout(Duration::from_secs(10), outcome)
        .await
        .expect("the connection ends")
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_listener_refuses_an_identity_at_accept() {
    let certs = Certs::new("authz-tcp");
    let app = named_backend("app").await;
    let echo = tcp_echo().await;
    let proxy = start_proxy(&policy_yaml(&certs, app.addr, echo)).await;
    let raw = proxy.listener_addr("raw").unwrap();
    let admin = proxy.admin_addr().unwrap();

    assert_eq!(
        tcp_round_trip(raw, certs.client(Who::Web, b"")).await,
        b"ping\n"
    );
    // Allowed by `shop` but denied by `no-legacy`; `pay` matches nothing: default deny.
    for who in [Who::Legacy, Who::Api] {
        let back = tcp_round_trip(raw, certs.client(who, b"")).await;
        assert!(back.is_empty(), "{who:?} got {back:?} through");
    }
    let labels = |rule, decision| [("listener", "raw"), ("rule", rule), ("decision", decision)];
    assert!(
        eventually(Duration::from_secs(5), || async {
            let text = get(admin, "/metrics", &[]).await.text();
            let m = |l: &[(&str, &str)]| metric_in(&text, "spur_authz_decisions_total", l);
            m(&labels("shop", "allow")) == Some(1.0)
                && m(&labels("no-legacy", "deny")) == Some(1.0)
                && m(&labels("default", "deny")) == Some(1.0)
                && metric_in(
                    &text,
                    "spur_downstream_rejected_total",
                    &[("listener", "raw"), ("reason", "forbidden")],
                ) == Some(2.0)
        })
        .await,
        "{}",
        get(admin, "/metrics", &[]).await.text()
    );
    // The denied connections never reached the echo: one connect in all.
    let connected = metric(
        admin,
        "spur_tcp_connections_total",
        &[
            ("listener", "raw"),
            ("cluster", "echo"),
            ("endpoint", &echo.to_string()),
            ("result", "connected"),
        ],
    )
    .await;
    assert_eq!(connected, Some(1.0));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_requests_meet_the_same_policy() {
    let certs = Certs::new("authz-h3");
    let app = named_backend("app").await;
    let proxy = start_proxy(&format!(
        r#"
listeners:
  - name: h3
    listen: 127.0.0.1:0
    protocol: http3
    tls: {tls}
    cluster: app
    authz:
      default: deny
      rules:
        - {{ name: shop, action: allow, from: {{ namespaces: [shop] }} }}
        - {{ name: no-admin, action: deny, to: {{ path_prefixes: [/admin] }} }}
clusters: [{{ name: app, endpoints: ["{app}"] }}]
"#,
        tls = certs.listener_tls(),
        app = app.addr,
    ))
    .await;
    let addr = proxy.listener_addr("h3").unwrap();
    let conn = |who| {
        let leaf = certs.leaf(who);
        h3c::H3Conn::open(addr, h3c::client_tls(&certs.pki.ca_path, Some(leaf)))
    };
    let web = conn(Who::Web).await.unwrap();
    let (r, _) = web.get("/api").await.unwrap();
    assert_eq!(r.status(), 200);
    let (r, _) = web.get("/admin/x").await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(h3c::header(&r, "x-spur-error"), "forbidden");
    let api = conn(Who::Api).await.unwrap();
    let (r, _) = api.get("/api").await.unwrap();
    assert_eq!(r.status(), 403, "default: deny");
    proxy.shutdown().await;
}

// ------------------------------------------------ spur authz explain --

/// Runs `spur authz explain FILE --listener L ...`: the exit code and the deciding rule it
/// printed (`default` for the default).
fn explain(file: &str, listener: &str, who: Who, request: Option<Asked>) -> (i32, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_spur"));
    cmd.args(["authz", "explain", file, "--listener", listener]);
    if let Some(id) = who.id() {
        cmd.args(["--identity", id]);
    }
    if let Some((method, path, headers)) = request {
        cmd.args(["--method", method, "--path", path]);
        for (k, v) in headers {
            cmd.args(["--header", &format!("{k}: {v}")]);
        }
    }
    let out = cmd.output().expect("spur runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let verdict = stdout
        .lines()
        .find(|l| l.starts_with("allow: ") || l.starts_with("deny: "))
        .unwrap_or_else(|| {
            panic!(
                "no verdict in {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let rule = match verdict.split_once("rule `") {
        Some((_, rest)) => rest.split('`').next().unwrap().to_string(),
        None => "default".to_string(),
    };
    (out.status.code().unwrap_or(-1), rule)
}

/// The `authz_rule` of the access line with this request ID (polled: lines are written when
/// the response ends).
async fn logged_rule(p: &SpurProcess, request_id: &str) -> String {
    let find = || {
        p.stderr_lines.lock().unwrap().iter().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["message"] == "access" && v["request_id"] == request_id)
                .then(|| v["authz_rule"].as_str().unwrap_or("").to_string())
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || async { find().is_some() }).await,
        "no access line for {request_id}"
    );
    find().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spur_authz_explain_agrees_with_the_running_proxy() {
    let certs = Certs::new("authz-explain");
    let app = named_backend("app").await;
    let echo = tcp_echo().await;
    let dir = temp_dir("authz-explain");
    let file = dir.join("spur.yaml").display().to_string();
    std::fs::write(&file, policy_yaml(&certs, app.addr, echo)).unwrap();
    let proxy = spawn_spur_with(&["proxy", "--config", &file], 2, true);
    let inbound = proxy.listeners["inbound"];

    for (i, (who, method, path, headers, status, rule)) in table().into_iter().enumerate() {
        let case = format!("{who:?} {method} {path} {headers:?}");
        let (code, explained) = explain(&file, "inbound", who, Some((method, path, headers)));
        let mut conn = MtlsConn::open(inbound, certs.client(who, b"http/1.1"))
            .await
            .unwrap();
        let rid = format!("explain-{i}");
        let mut hs = vec![("x-request-id", rid.as_str())];
        hs.extend_from_slice(headers);
        let r = conn.send(method, path, &hs).await.unwrap();
        // The CLI and the proxy agree: on the decision, and on the rule that made it.
        assert_eq!(
            code == 0,
            r.status != 403,
            "{case}: exit {code}, status {}",
            r.status
        );
        assert_eq!(code, if r.status == 403 { 1 } else { 0 }, "{case}");
        assert_eq!(explained, logged_rule(&proxy, &rid).await, "{case}");
        // And both say what the table says.
        assert_eq!((r.status, explained.as_str()), (status, rule), "{case}");
    }

    // The tcp listener: per connection, from the identity.
    for (who, passes) in [(Who::Web, true), (Who::Legacy, false), (Who::Api, false)] {
        let (code, _) = explain(&file, "raw", who, None);
        let back = tcp_round_trip(proxy.listeners["raw"], certs.client(who, b"")).await;
        assert_eq!(code == 0, passes, "{who:?}: explain exit {code}");
        assert_eq!(!back.is_empty(), passes, "{who:?}: proxy");
    }

    // Usage and config errors exit 2.
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_spur"))
            .args(args)
            .output()
            .unwrap()
    };
    for args in [
        &["authz", "explain", &file][..],
        &["authz", "explain", &file, "--listener", "nope"],
        &[
            "authz",
            "explain",
            &file,
            "--listener",
            "raw",
            "--path",
            "/x",
        ],
        &[
            "authz",
            "explain",
            &file,
            "--listener",
            "inbound",
            "--identity",
            "web",
        ],
        &[
            "authz",
            "explain",
            &file,
            "--listener",
            "inbound",
            "--method",
            "get",
        ],
        &[
            "authz",
            "explain",
            "/nonexistent/spur.yaml",
            "--listener",
            "inbound",
        ],
        &["authz", "judge"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}: says why");
    }
    let out = run(&[
        "authz",
        "explain",
        &file,
        "--listener",
        "inbound",
        "--identity",
        "web",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--identity: `web` is not a SPIFFE ID"),
        "{err}"
    );

    // A group's config for a control plane with Kubernetes discovery is explained too.
    let k8s = dir.join("group.yaml").display().to_string();
    std::fs::write(
        &k8s,
        "listeners:\n  - name: web\n    listen: 127.0.0.1:1\n    cluster: api\n    authz: { rules: [{ name: no-admin, action: deny, to: { path_prefixes: [/admin] } }] }\nclusters: [{ name: api, k8s: \"api.shop:8080\" }]\n",
    )
    .unwrap();
    let out = run(&[
        "authz",
        "explain",
        &k8s,
        "--listener",
        "web",
        "--path",
        "/admin",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ------------------------------------------- live pushes and the rollout --

/// The inbound config at `listen`; `admin_rule` is the `no-admin` rule's action (or none).
fn pushed_yaml(certs: &Certs, listen: &str, app: SocketAddr, admin_rule: Option<&str>) -> String {
    let admin_rule = match admin_rule {
        Some(action) => format!(
            "\n        - {{ name: no-admin, action: {action}, to: {{ path_prefixes: [/admin] }} }}"
        ),
        None => String::new(),
    };
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: inbound
    listen: "{listen}"
    tls: {tls}
    cluster: app
    authz:
      default: deny
      rules:
        - {{ name: mesh, action: allow, from: {{ identities: ["spiffe://test.local/*"] }} }}{admin_rule}
clusters: [{{ name: app, endpoints: ["{app}"] }}]
"#,
        tls = certs.listener_tls(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_policy_rolls_out_from_audit_to_deny_live_without_failing_allowed_requests() {
    let certs = Certs::new("authz-push");
    let app = named_backend("app").await;
    let (cp, _dir) = start_control(Some("tok")).await;
    let c = cp.addr;
    // Held for the test: every pushed version names it, and it must not be taken before
    // the proxy binds it.
    let held = reserved_port();
    let listen = held.addr.to_string();
    let put = |action: Option<&'static str>| {
        let body = pushed_yaml(&certs, &listen, app.addr, action);
        async move {
            let (s, v) = call(c, "PUT", "/v1/groups/shop/config", Some(&body), Some("tok")).await;
            assert_eq!(s, 200, "{v}");
            v["version"].as_u64().unwrap()
        }
    };
    let v1 = put(None).await;
    let proxy = Arc::new(Proxy::idle().unwrap());
    spawn_control(
        proxy.clone(),
        ControlSource {
            client: spur_proxy::control_client::client(None).expect("a control client"),
            url: format!("http://{c}"),
            node: "p1".into(),
            group: "shop".into(),
            token: Some("tok".into()),
        },
    );
    let inbound = applied(&proxy, v1, "inbound").await;
    let admin = proxy.admin_addr().unwrap();

    // Load the policy allows throughout: web reads over kept-alive and fresh connections.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for w in 0..3 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let cfg = certs.client(Who::Web, b"http/1.1");
        workers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut conn: Option<MtlsConn> = None;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                n += 1;
                // Worker 0 opens a new connection for every request.
                if w == 0 || conn.is_none() {
                    conn = MtlsConn::open(inbound, cfg.clone()).await.ok();
                }
                let answer = match conn.as_mut() {
                    Some(c) => c.send("GET", "/api/items", &[]).await.ok(),
                    None => None,
                };
                match answer {
                    Some(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("worker {w} request {n}: {:?}", other.map(|r| r.status));
                        conn = None;
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    // The API identity keeps one connection open across every push.
    let mut api = MtlsConn::open(inbound, certs.client(Who::Api, b"http/1.1"))
        .await
        .unwrap();
    let admin_status = |r: Result<Answer, String>| r.expect("the connection stays open").status;
    assert_eq!(admin_status(api.send("GET", "/admin/x", &[]).await), 200);

    let mut pushes = Vec::new();
    for (action, expect) in [
        (Some("audit"), 200),
        (Some("deny"), 403),
        (None, 200),
        (Some("deny"), 403),
    ] {
        let before = ok.load(Ordering::Relaxed);
        let version = put(action).await;
        assert!(
            eventually(Duration::from_secs(5), || async {
                proxy.version() == version
            })
            .await,
            "version {version} not applied"
        );
        // The next request on the same open connection meets the new policy.
        assert_eq!(
            admin_status(api.send("GET", "/admin/x", &[]).await),
            expect,
            "after pushing no-admin as {action:?}"
        );
        if action == Some("audit") {
            // Rollout step 1: watch the audit rule count what it would deny.
            for _ in 0..4 {
                assert_eq!(admin_status(api.send("GET", "/admin/x", &[]).await), 200);
            }
            let labels = [
                ("listener", "inbound"),
                ("rule", "no-admin"),
                ("decision", "audit_would_deny"),
            ];
            assert_eq!(
                metric(admin, "spur_authz_decisions_total", &labels).await,
                Some(5.0)
            );
        }
        // The load went on across the push.
        assert!(
            eventually(Duration::from_secs(5), || async {
                ok.load(Ordering::Relaxed) >= before + 20
            })
            .await,
            "no load around the push of {action:?}"
        );
        pushes.push(version);
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("pushes {pushes:?} under load: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "requests the policy allows failed during pushes");
    // Rollout step 2: denied once pushed as deny (two pushes did), counted under the rule.
    let labels = [
        ("listener", "inbound"),
        ("rule", "no-admin"),
        ("decision", "deny"),
    ];
    assert_eq!(
        metric(admin, "spur_authz_decisions_total", &labels).await,
        Some(2.0)
    );
    let labels = [
        ("listener", "inbound"),
        ("rule", "mesh"),
        ("decision", "allow"),
    ];
    assert!(metric(admin, "spur_authz_decisions_total", &labels).await >= Some(ok as f64));
    proxy.shutdown().await;
}
