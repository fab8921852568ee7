//! Transparent mode end to end, in real network namespaces with `spur init-iptables`.
//!
//! ```text
//!  namespace A (client pod)                       namespace B (server pod)
//!  python3 urllib → http://10.211.N.2:8080/       python3 http.server 127.0.0.1:8080
//!     │ iptables OUTPUT: REDIRECT :15001                    ▲ 127.0.0.1 (proxy uid: not redirected)
//!     ▼                                                     │
//!  spur (uid 1337) outbound 127.0.0.1:15001  ── veth ──►  spur (uid 1337) inbound 0.0.0.0:15006
//!   original_dst 10.211.N.2:8080 → cluster `b`          ▲ iptables PREROUTING: REDIRECT :15006
//!   (endpoint 10.211.N.2:8080; uid 1337: not redirected)  original_dst not owned → cluster `app`
//!   mTLS origination (A's cert) ───────────────────────►  mTLS termination, allow_identities [A]
//! ```
//!
//! The client and the app are unmodified: neither knows a proxy is there. Both sidecars
//! must count the request in `spur_requests_total`. With `egress: deny`, an original
//! destination that no cluster owns is refused (404 `no_route`).
//!
//! Needs root, `ip` (iproute2), `iptables-restore`/`iptables-save`, `setpriv` and `python3`;
//! without them the test says "skipped: ..." and passes, unless `SPUR_REQUIRE_NETNS=1`
//! (set by `.ci/run`, which installs them): then a skip is a failure, so that CI cannot
//! pass without running it.
//!
//! `an_unredirected_connection_to_a_transparent_listener_is_refused` needs none of that
//! and always runs.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Reports why the namespace test cannot run: a failure under `SPUR_REQUIRE_NETNS=1`, a
/// skip (on stderr, shown by `cargo test -- --nocapture`) otherwise.
fn skip(why: &str) {
    if std::env::var("SPUR_REQUIRE_NETNS").is_ok_and(|v| v == "1") {
        panic!("SPUR_REQUIRE_NETNS=1, but the namespace test cannot run: {why}");
    }
    eprintln!("skipped: {why}");
}

const PROXY_UID: &str = "1337";

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two namespaces and everything started in them; all of it goes away on drop, panic or not.
struct Lab {
    a: String,
    b: String,
    procs: Vec<Child>,
    /// Configs, certificates and the processes' logs (kept when the test fails).
    dir: std::path::PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Lab {
    fn exec(&self, ns: &str, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["ip", "netns", "exec", ns];
        all.extend_from_slice(args);
        run(&all)
    }

    fn spawn(&mut self, ns: &str, args: &[&str], log: &std::path::Path) {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {args:?} in {ns}: {e}"));
        self.procs.push(child);
    }

    /// GET `url` from inside `ns` with python3 (an unmodified client): "STATUS\nBODY".
    fn get(&self, ns: &str, url: &str) -> Result<String, String> {
        let script = format!(
            "import urllib.request, urllib.error\n\
             try:\n    r = urllib.request.urlopen({url:?}, timeout=5)\n    print(r.status); print(r.read().decode())\n\
             except urllib.error.HTTPError as e:\n    print(e.code); print(e.read().decode())\n"
        );
        self.exec(ns, &["python3", "-c", &script])
    }

    /// Polls `url` in `ns` until it answers `status`, for at most `within`.
    fn wait_status(&self, ns: &str, url: &str, status: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let r = self.get(ns, url);
            if let Ok(text) = &r {
                if text.lines().next() == Some(status) {
                    return text.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "{url} in {ns} did not answer {status} within {within:?}: {r:?}\nlogs in {}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A test CA and one workload certificate per sidecar (SPIFFE URI SAN, DNS name
/// `NAME.spur.test`), written as PEM files into `dir`; returns the CA file.
fn write_pki(dir: &std::path::Path) -> String {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "spur netns test CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.crt"), ca_cert.pem()).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    for name in ["a", "b"] {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![format!("{name}.spur.test")]).unwrap();
        p.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(format!("spiffe://spur.test/ns/t/sa/{name}"))
                .unwrap(),
        ));
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
    dir.join("ca.crt").display().to_string()
}

/// The value of the series `name{...}` whose labels include every pair in `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[test]
fn original_dst_through_two_sidecars_in_namespaces() {
    let missing: Vec<&str> = [
        "ip",
        "iptables-restore",
        "iptables-save",
        "ip6tables-restore",
        "ip6tables-save",
        "setpriv",
        "python3",
    ]
    .into_iter()
    .filter(|c| !have(c))
    .collect();
    if !is_root() {
        return skip("needs root (network namespaces and iptables)");
    }
    if !missing.is_empty() {
        return skip(&format!("missing commands: {}", missing.join(", ")));
    }
    let pid = std::process::id();
    let n = (pid as u128
        ^ std::time::SystemTime::UNIX_EPOCH
            .elapsed()
            .unwrap()
            .as_nanos())
        % 200
        + 20;
    let mut lab = Lab {
        a: format!("spur-t-{pid}-a"),
        b: format!("spur-t-{pid}-b"),
        procs: vec![],
        dir: std::env::temp_dir().join(format!("spur-netns-{pid}-{n}")),
    };
    if let Err(e) = run(&["ip", "netns", "add", &lab.a]) {
        return skip(&format!("cannot create a network namespace: {e}"));
    }
    run(&["ip", "netns", "add", &lab.b]).unwrap();
    let (va, vb) = (format!("spa{pid}"), format!("spb{pid}"));
    let (ip_a, ip_b) = (format!("10.211.{n}.1"), format!("10.211.{n}.2"));
    // Dual stack: a global (ULA) IPv6 address beside each IPv4 one.
    let (ip6_a, ip6_b) = (format!("fd00:211:{n}::1"), format!("fd00:211:{n}::2"));
    run(&[
        "ip", "-n", &lab.a, "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns",
        &lab.b,
    ])
    .unwrap();
    for (ns, dev, addr) in [(&lab.a, &va, &ip_a), (&lab.b, &vb, &ip_b)] {
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            dev,
        ])
        .unwrap();
        run(&["ip", "-n", ns, "link", "set", dev, "up"]).unwrap();
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]).unwrap();
    }
    for (ns, dev, addr) in [(&lab.a, &va, &ip6_a), (&lab.b, &vb, &ip6_b)] {
        run(&[
            "ip",
            "-n",
            ns,
            "-6",
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            dev,
            "nodad",
        ])
        .unwrap();
    }

    let dir = lab.dir.clone();
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(dir.join("www/index.html"), "hello from b\n").unwrap();
    let ca = write_pki(&dir);
    let pem = |f: &str| dir.join(f).display().to_string();
    let a_cfg = dir.join("a.yaml");
    let b_cfg = dir.join("b.yaml");
    // A: no routes, no default cluster: only destinations a cluster owns get through. The
    // cluster `b` is keyed by the address the app calls (B's 8080) and connects to it with
    // mTLS: B's own iptables send that connection to B's inbound sidecar, as in a mesh.
    std::fs::write(
        &a_cfg,
        format!(
            r#"node: a
egress: deny
admin: {{ listen: 127.0.0.1:9901 }}
listeners:
  - name: outbound
    listen: "[::]:15001"
    original_dst: true
clusters:
  - name: b
    endpoints: ["{ip_b}:8080", "[{ip6_b}]:8080"]
    tls:
      ca: "{ca}"
      cert: "{a_crt}"
      key: "{a_key}"
      server_name: b.spur.test
      expect_identities: ["spiffe://spur.test/ns/t/sa/b"]
"#,
            a_crt = pem("a.crt"),
            a_key = pem("a.key"),
        ),
    )
    .unwrap();
    std::fs::write(
        &b_cfg,
        format!(
            r#"node: b
admin: {{ listen: 127.0.0.1:9901 }}
listeners:
  - name: inbound
    listen: "[::]:15006"
    original_dst: true
    cluster: app
    tls:
      cert: "{b_crt}"
      key: "{b_key}"
      client_ca: "{ca}"
      allow_identities: ["spiffe://spur.test/ns/t/sa/a"]
clusters:
  - name: app
    endpoints: ["127.0.0.1:8080"]
"#,
            b_crt = pem("b.crt"),
            b_key = pem("b.key"),
        ),
    )
    .unwrap();

    // Interception in both namespaces (the admin port bypasses the inbound redirect).
    for ns in [lab.a.clone(), lab.b.clone()] {
        lab.exec(
            &ns,
            &[
                env!("CARGO_BIN_EXE_spur"),
                "init-iptables",
                "--inbound-port",
                "15006",
                "--outbound-port",
                "15001",
                "--proxy-uid",
                PROXY_UID,
                "--skip-inbound-ports",
                "9901",
            ],
        )
        .unwrap();
    }

    // The app in B, on loopback only: reachable from A through B's sidecar alone.
    let www = dir.join("www");
    let b = lab.b.clone();
    lab.spawn(
        &b,
        &[
            "python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            "127.0.0.1",
            "--directory",
            www.to_str().unwrap(),
        ],
        &dir.join("app.log"),
    );
    // The sidecars, as the proxy uid, so that their own connections are not redirected.
    let reuid = format!("--reuid={PROXY_UID}");
    let regid = format!("--regid={PROXY_UID}");
    for (ns, cfg, log) in [
        (lab.a.clone(), &a_cfg, "a.log"),
        (lab.b.clone(), &b_cfg, "b.log"),
    ] {
        lab.spawn(
            &ns,
            &[
                "setpriv",
                &reuid,
                &regid,
                "--clear-groups",
                env!("CARGO_BIN_EXE_spur"),
                "proxy",
                "--config",
                cfg.to_str().unwrap(),
                "--log-format",
                "text",
            ],
            &dir.join(log),
        );
    }
    let up = Duration::from_secs(20);
    lab.wait_status(&lab.a, "http://127.0.0.1:9901/ready", "200", up);
    lab.wait_status(&lab.b, "http://127.0.0.1:9901/ready", "200", up);
    lab.wait_status(&lab.b, "http://127.0.0.1:8080/", "200", up);

    // The unmodified client in A calls B by its address and port.
    let answer = lab.wait_status(&lab.a, &format!("http://{ip_b}:8080/"), "200", up);
    let logs = || {
        ["a.log", "b.log", "app.log"]
            .map(|f| std::fs::read_to_string(dir.join(f)).unwrap_or_default())
            .join("\n---\n")
    };
    assert!(
        answer.contains("hello from b"),
        "answer: {answer}\n{}",
        logs()
    );

    // The same over IPv6: init-iptables saw the global IPv6 address and installed the
    // ip6tables rules too, so the call cannot bypass the sidecars.
    let answer6 = lab.wait_status(&lab.a, &format!("http://[{ip6_b}]:8080/"), "200", up);
    assert!(
        answer6.contains("hello from b"),
        "answer: {answer6}\n{}",
        logs()
    );

    // Both sidecars saw both.
    let scrape = |ns: &str| lab.get(ns, "http://127.0.0.1:9901/metrics").unwrap();
    let a_metrics = scrape(&lab.a);
    let b_metrics = scrape(&lab.b);
    let a_count = metric(
        &a_metrics,
        "spur_requests_total",
        &[("listener", "outbound"), ("cluster", "b"), ("code", "200")],
    );
    let b_count = metric(
        &b_metrics,
        "spur_requests_total",
        &[("listener", "inbound"), ("cluster", "app"), ("code", "200")],
    );
    assert!(
        a_count >= 2.0,
        "A did not count both:\n{a_metrics}\n{}",
        logs()
    );
    assert!(
        b_count >= 2.0,
        "B did not count both:\n{b_metrics}\n{}",
        logs()
    );
    let ip6tables = lab.exec(&lab.a, &["ip6tables-save", "-t", "nat"]).unwrap();
    assert!(
        ip6tables.contains("-A SPUR_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 15001"),
        "{ip6tables}"
    );

    // egress: deny: a destination no cluster owns is refused, not forwarded as is.
    let refused = lab
        .get(&lab.a, &format!("http://{ip_b}:9999/"))
        .unwrap_or_else(|e| e);
    assert!(
        refused.starts_with("404") && refused.contains("no_route"),
        "unknown destination: {refused}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without a redirect, a connection's original destination is the address it reached: the
/// transparent listener itself, which no cluster owns. It is refused (HTTP: 404
/// `no_route`; TCP: closed), never forwarded, even with a cluster configured: the outbound
/// listener is not an open proxy. No namespace or root needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unredirected_connection_to_a_transparent_listener_is_refused() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = common::backend(move |_req| {
        h.fetch_add(1, Ordering::SeqCst);
        async { http::Response::new(http_body_util::Full::new(bytes::Bytes::from("app"))) }
    })
    .await;
    let raw = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let raw_addr = raw.local_addr().unwrap();
    let raw_accepts = Arc::new(AtomicUsize::new(0));
    let accepts = raw_accepts.clone();
    tokio::spawn(async move {
        while raw.accept().await.is_ok() {
            accepts.fetch_add(1, Ordering::SeqCst);
        }
    });
    let proxy = common::start_proxy(&format!(
        r#"
listeners:
  - {{ name: out, listen: "127.0.0.1:0", original_dst: true }}
  - {{ name: out-tcp, listen: "127.0.0.1:0", protocol: tcp, original_dst: true }}
clusters:
  - {{ name: app, endpoints: ["{app}"] }}
  - {{ name: raw, endpoints: ["{raw_addr}"] }}
"#,
        app = app.addr
    ))
    .await;

    let a = common::get(
        proxy.listener_addr("out").unwrap(),
        "/",
        &[("host", &app.addr.to_string())],
    )
    .await;
    assert_eq!(
        (a.status, a.header("x-spur-error")),
        (404, Some("no_route")),
        "{}",
        a.text()
    );

    let mut s = tokio::net::TcpStream::connect(proxy.listener_addr("out-tcp").unwrap())
        .await
        .unwrap();
    let _ = s.write_all(b"hello").await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the unowned TCP connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "bytes came back on an unowned TCP connection");

    assert_eq!(hits.load(Ordering::SeqCst), 0, "forwarded to the app");
    assert_eq!(
        raw_accepts.load(Ordering::SeqCst),
        0,
        "forwarded to the TCP backend"
    );
    proxy.shutdown().await;
}
