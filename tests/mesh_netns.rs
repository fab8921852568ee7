//! The mesh without YAML, end to end (issue 18): `spur control --kubernetes --mesh`
//! against the fake API server, two pods as network namespaces with `spur init-iptables`,
//! sidecars run with the arguments `spur inject` gives them, and not one line of Spur
//! config written for them.
//!
//! ```text
//!  namespace A (client pod, 10.213.N.1)                 namespace B (echo pod, 10.213.N.2)
//!  python3 → 10.96.N.10:80 (Service echo's ClusterIP)   python3 http.server 127.0.0.1:8080
//!    │ OUTPUT: REDIRECT :15001                                 ▲
//!  spur (group client) outbound ── mTLS ── veth ──►  spur (group echo) inbound :15006
//!  spur control --mesh :7070 ◄──────────────────────  (B's sidecar gets its config here)
//!  fake Kubernetes API (this test's process; its socket is bound inside A)
//!  unmeshed backends on 10.213.N.3 (on A's lo): v1, v2, a server-speaks-first echo, TLS
//! ```
//!
//! Steps: a Service by its ClusterIP over mTLS; a new Service reachable within 2 s and a
//! deleted one refused; an HTTPRoute with a header match and a 90/10 split, its status
//! Accepted; a route with an unsupported filter not applied, its status saying why; a
//! server-speaks-first connection and a TLS connection through detection untouched;
//! `egress: allow` then `deny` (a group's own config merged over the mesh); `spur explain`
//! agreeing with the sidecar on a table of cases.
//!
//! Needs root, `ip`, iptables, `setpriv` and `python3`; skipped otherwise (a failure under
//! `SPUR_REQUIRE_NETNS=1`), like tests/netns.rs.

mod common;
#[path = "support/fake_kube.rs"]
mod fake_kube;

use fake_kube::{FakeKube, HTTPROUTES, PODS, SERVICES, SLICES};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PEERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mesh/peers.py");

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
            "{args:?}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn skip(why: &str) {
    if std::env::var("SPUR_REQUIRE_NETNS").is_ok_and(|v| v == "1") {
        panic!("SPUR_REQUIRE_NETNS=1, but the mesh namespace test cannot run: {why}");
    }
    eprintln!("skipped: {why}");
}

fn runnable() -> Result<(), String> {
    let root = run(&["id", "-u"]).is_ok_and(|u| u.trim() == "0");
    if !root {
        return Err("needs root (network namespaces and iptables)".into());
    }
    for cmd in [
        "ip",
        "iptables-restore",
        "ip6tables-restore",
        "setpriv",
        "python3",
    ] {
        if run(&["sh", "-c", &format!("command -v {cmd}")]).is_err() {
            return Err(format!("missing command: {cmd}"));
        }
    }
    Ok(())
}

/// The namespaces and the processes in them; removed on drop.
struct Lab {
    a: String,
    b: String,
    /// The third octet of every address of this run.
    n: u32,
    procs: Vec<Child>,
    dir: PathBuf,
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
    fn ip_a(&self) -> String {
        format!("10.213.{}.1", self.n)
    }
    fn ip_b(&self) -> String {
        format!("10.213.{}.2", self.n)
    }
    /// Unmeshed backends, on A's loopback.
    fn ip_c(&self) -> String {
        format!("10.213.{}.3", self.n)
    }
    /// A ClusterIP of this run.
    fn vip(&self, last: u8) -> String {
        format!("10.96.{}.{last}", self.n)
    }

    fn exec(&self, ns: &str, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["ip", "netns", "exec", ns];
        all.extend_from_slice(args);
        run(&all)
    }

    fn spawn(&mut self, ns: &str, args: &[&str], log: &str) {
        let log = std::fs::File::create(self.dir.join(log)).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.procs.push(child);
    }

    /// `peers.py` as a client in A (the client pod).
    fn client(&self, args: &[&str]) -> String {
        let mut all = vec!["python3", PEERS];
        all.extend_from_slice(args);
        self.exec(&self.a, &all).unwrap_or_else(|e| e)
    }

    /// N GETs of `url` from A: the answers counted by body.
    fn get(&self, url: &str, n: u32, headers: &[&str]) -> serde_json::Map<String, Value> {
        let n = n.to_string();
        let mut args = vec!["get", url, &n];
        args.extend_from_slice(headers);
        let out = self.client(&args);
        serde_json::from_str::<Value>(out.trim())
            .ok()
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_else(|| panic!("client said: {out}\nlogs in {}", self.dir.display()))
    }

    /// Polls `check` for at most `within`; returns how long it took.
    fn until(&self, within: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
        let start = Instant::now();
        while !check() {
            assert!(
                start.elapsed() < within,
                "{what}: not within {within:?}; logs in {}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        start.elapsed()
    }

    fn metrics(&self, ns: &str) -> String {
        let url = "http://127.0.0.1:9901/metrics";
        let script = format!("import urllib.request; print(urllib.request.urlopen({url:?}, timeout=5).read().decode())");
        self.exec(ns, &["python3", "-c", &script])
            .unwrap_or_default()
    }
}

/// Binds a TCP socket inside network namespace `ns` (a thread enters it; the socket keeps
/// it after the thread is gone).
fn bind_in(ns: &str) -> std::net::TcpListener {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on a valid namespace fd changes this thread's namespace only.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        std::net::TcpListener::bind("127.0.0.1:0").unwrap()
    })
    .join()
    .unwrap()
}

fn setup(lab: &Lab) {
    run(&["ip", "netns", "add", &lab.a]).unwrap();
    run(&["ip", "netns", "add", &lab.b]).unwrap();
    let pid = std::process::id();
    let (va, vb) = (format!("sma{pid}"), format!("smb{pid}"));
    run(&[
        "ip", "-n", &lab.a, "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns",
        &lab.b,
    ])
    .unwrap();
    for (ns, dev, addr) in [(&lab.a, &va, lab.ip_a()), (&lab.b, &vb, lab.ip_b())] {
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
        // ClusterIPs and outside addresses need a route for connect() to start at all.
        run(&["ip", "-n", ns, "route", "add", "default", "dev", dev]).unwrap();
    }
    let c = format!("{}/32", lab.ip_c());
    run(&["ip", "-n", &lab.a, "addr", "add", &c, "dev", "lo"]).unwrap();
    // Interception as spur-init does it. Ports left alone: admin 9901, the control plane
    // 7070 (A), the unmeshed backends (A), the egress target 9005 (B).
    for (ns, skip) in [
        (&lab.a, "9901,7070,9001,9002,3306,8443"),
        (&lab.b, "9901,9005"),
    ] {
        lab.exec(
            ns,
            &[
                env!("CARGO_BIN_EXE_spur"),
                "init-iptables",
                "--proxy-uid",
                "1337",
                "--skip-inbound-ports",
                skip,
            ],
        )
        .unwrap();
    }
}

/// A Service with one TCP port named `p`, and its EndpointSlice.
fn service(kube: &FakeKube, name: &str, vip: &str, port: u16, endpoints: &[(&str, u16)]) {
    let ann = if name == "db-opaque" {
        json!({ "spur.dev/opaque-ports": port.to_string() })
    } else {
        json!({})
    };
    kube.objects.apply(
        SERVICES,
        json!({
            "metadata": { "name": name, "namespace": "t", "annotations": ann },
            "spec": { "clusterIP": vip, "clusterIPs": [vip], "ports": [{ "name": "p", "port": port }] }
        }),
    );
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(ip, _)| json!({ "addresses": [ip], "conditions": { "ready": true } }))
        .collect();
    let target = endpoints.first().map_or(port, |e| e.1);
    kube.objects.apply(
        SLICES,
        json!({
            "metadata": { "name": format!("{name}-x"), "namespace": "t",
                          "labels": { "kubernetes.io/service-name": name } },
            "addressType": "IPv4",
            "endpoints": eps,
            "ports": [{ "name": "p", "port": target, "protocol": "TCP" }]
        }),
    );
}

fn pod(kube: &FakeKube, name: &str, app: &str, ip: &str, port: Option<u16>) {
    let ports = port.map_or(json!([]), |p| json!([{ "containerPort": p }]));
    kube.objects.apply(
        PODS,
        json!({
            "metadata": { "name": name, "namespace": "t", "labels": { "app": app },
                          "annotations": { "spur.dev/injected": "true" } },
            "spec": { "serviceAccountName": app,
                      "containers": [{ "name": app, "ports": ports }, { "name": "spur-proxy" }] },
            "status": { "podIP": ip }
        }),
    );
}

/// A TLS server certificate for `tls.t.svc.cluster.local` from a CA of its own.
fn tls_files(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "the app's own CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf =
        rcgen::CertificateParams::new(vec!["tls.t.svc.cluster.local".to_string()]).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "tls.t.svc.cluster.local");
    let leaf = leaf
        .signed_by(&key, &rcgen::Issuer::from_params(&ca, &ca_key))
        .unwrap();
    std::fs::write(dir.join("app-ca.crt"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("app.crt"), leaf.pem()).unwrap();
    std::fs::write(dir.join("app.key"), key.serialize_pem()).unwrap();
}

/// The control plane in A and both sidecars, as `spur inject` starts them.
fn start_mesh(lab: &mut Lab, kubeconfig: &Path) {
    let dir = lab.dir.clone();
    let (a, b) = (lab.a.clone(), lab.b.clone());
    let data = dir.join("data");
    let ca = dir.join("ca");
    lab.spawn(
        &a,
        &[
            env!("CARGO_BIN_EXE_spur"),
            "control",
            "--listen",
            "0.0.0.0:7070",
            "--insecure-no-token",
            "--data-dir",
            data.to_str().unwrap(),
            "--ca-dir",
            ca.to_str().unwrap(),
            "--kubernetes",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--mesh",
            "--mesh-namespaces",
            "t",
            "--log-format",
            "text",
        ],
        "control.log",
    );
    let control_b = format!("http://{}:7070", lab.ip_a());
    for (ns, group, control, token) in [
        (&a, "client", "http://127.0.0.1:7070", "tok-client"),
        (&b, "echo", control_b.as_str(), "tok-echo"),
    ] {
        let token_file = dir.join(format!("{group}.token"));
        std::fs::write(&token_file, token).unwrap();
        let node = format!("{group}-pod");
        lab.spawn(
            ns,
            &[
                "setpriv",
                "--reuid=1337",
                "--regid=1337",
                "--clear-groups",
                env!("CARGO_BIN_EXE_spur"),
                "proxy",
                "--control",
                control,
                "--node",
                &node,
                "--group",
                group,
                "--sa-token-file",
                token_file.to_str().unwrap(),
                "--admin",
                "127.0.0.1:9901",
                "--log-format",
                "text",
            ],
            &format!("{group}.log"),
        );
    }
}

fn start_apps(lab: &mut Lab) {
    let (a, b) = (lab.a.clone(), lab.b.clone());
    let c = lab.ip_c();
    let dir = lab.dir.clone();
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from b\n").unwrap();
    let www = www.to_str().unwrap().to_string();
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
            &www,
        ],
        "app.log",
    );
    let ip_b = lab.ip_b();
    lab.spawn(
        &b,
        &["python3", PEERS, "http", "outside", &ip_b, "9005"],
        "outside.log",
    );
    lab.spawn(&a, &["python3", PEERS, "http", "v1", &c, "9001"], "v1.log");
    lab.spawn(&a, &["python3", PEERS, "http", "v2", &c, "9002"], "v2.log");
    lab.spawn(
        &a,
        &["python3", PEERS, "serve-greet", &c, "3306"],
        "greet.log",
    );
    tls_files(&dir);
    let (crt, key) = (dir.join("app.crt"), dir.join("app.key"));
    lab.spawn(
        &a,
        &[
            "python3",
            PEERS,
            "serve-tls",
            &c,
            "8443",
            crt.to_str().unwrap(),
            key.to_str().unwrap(),
        ],
        "tls.log",
    );
}

fn status_of(kube: &FakeKube, name: &str) -> Value {
    kube.objects
        .get(HTTPROUTES, "t", name)
        .map(|o| o["status"]["parents"][0]["conditions"].clone())
        .unwrap_or(Value::Null)
}

fn condition<'a>(conds: &'a Value, kind: &str) -> Option<&'a Value> {
    conds.as_array()?.iter().find(|c| c["type"] == kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshed_app_without_spur_yaml() {
    if let Err(why) = runnable() {
        return skip(&why);
    }
    let pid = std::process::id();
    let n = (pid % 200) + 20;
    let mut lab = Lab {
        a: format!("spur-m-{pid}-a"),
        b: format!("spur-m-{pid}-b"),
        n,
        procs: vec![],
        dir: std::env::temp_dir().join(format!("spur-mesh-netns-{pid}")),
    };
    std::fs::create_dir_all(&lab.dir).unwrap();
    if run(&["ip", "netns", "add", "spur-m-probe"]).is_err() {
        return skip("cannot create a network namespace");
    }
    let _ = run(&["ip", "netns", "del", "spur-m-probe"]);
    setup(&lab);

    let kube = FakeKube::start_on(bind_in(&lab.a)).await;
    kube.token("tok-client", "system:serviceaccount:t:client", &["spur"]);
    kube.token("tok-echo", "system:serviceaccount:t:echo", &["spur"]);
    let (ip_a, ip_b, c) = (lab.ip_a(), lab.ip_b(), lab.ip_c());
    pod(&kube, "client-pod", "client", &ip_a, None);
    pod(&kube, "echo-pod", "echo", &ip_b, Some(8080));
    service(&kube, "echo", &lab.vip(10), 80, &[(&ip_b, 8080)]);
    let kubeconfig = kube.kubeconfig(&lab.dir);

    start_apps(&mut lab);
    start_mesh(&mut lab, &kubeconfig);
    let l = &lab;

    // 1. The Service by its ClusterIP, through both sidecars, over mTLS.
    let echo = format!("http://{}/", l.vip(10));
    l.until(Duration::from_secs(30), "echo by its ClusterIP", || {
        l.get(&echo, 1, &[]).contains_key("hello from b\n")
    });
    let b_metrics = l.metrics(&l.b);
    assert!(
        b_metrics
            .lines()
            .any(|line| line.starts_with("spur_requests_total{")
                && line.contains("listener=\"inbound\"")
                && line.contains("client_id=\"spiffe://cluster.local/ns/t/sa/client\"")),
        "the echo sidecar did not see the client's identity:\n{b_metrics}"
    );

    // 2. A new Service is reachable within 2 s; once deleted, it is refused. A connection
    // made before the client's sidecar has the config naming the new ClusterIP is egress,
    // passed through to an address nothing answers here (~3 s of ARP, then a reset): so
    // the check connects only once that config is applied, within the same 2 s.
    let web2 = format!("http://{}/", l.vip(11));
    let version = || common::metric_in(&l.metrics(&l.a), "spur_config_version", &[]);
    let before = version();
    service(&kube, "web2", &l.vip(11), 80, &[(&ip_b, 8080)]);
    let took = l.until(Duration::from_secs(2), "a new Service", || {
        version() > before && l.get(&web2, 1, &[]).contains_key("hello from b\n")
    });
    eprintln!("new Service reachable after {took:?}");
    kube.objects.delete(SERVICES, "t", "web2");
    kube.objects.delete(SLICES, "t", "web2-x");
    l.until(Duration::from_secs(5), "a deleted Service refused", || {
        l.get(&web2, 1, &[]).keys().all(|k| k.starts_with("error"))
    });

    gateway_routes(l, &kube, &c);
    opaque_and_tls(l, &kube, &c);
    egress(l);
    explain_agrees(l);
    let _ = std::fs::remove_dir_all(&lab.dir);
}

/// 3 and 4: an HTTPRoute with a header match and a 90/10 split; one with an unsupported
/// filter.
fn gateway_routes(l: &Lab, kube: &FakeKube, c: &str) {
    service(kube, "shop", &l.vip(12), 80, &[]);
    service(kube, "shop-v1", &l.vip(13), 80, &[(c, 9001)]);
    service(kube, "shop-v2", &l.vip(14), 80, &[(c, 9002)]);
    let parent = json!([{ "group": "", "kind": "Service", "name": "shop", "port": 80 }]);
    kube.objects.apply(
        HTTPROUTES,
        json!({
            "metadata": { "name": "shop-split", "namespace": "t" },
            "spec": { "parentRefs": parent, "rules": [
                { "matches": [{ "headers": [{ "name": "x-canary", "value": "1" }] }],
                  "backendRefs": [{ "name": "shop-v2", "port": 80 }] },
                { "backendRefs": [{ "name": "shop-v1", "port": 80, "weight": 90 },
                                  { "name": "shop-v2", "port": 80, "weight": 10 }] }
            ]}
        }),
    );
    let shop = format!("http://{}/", l.vip(12));
    l.until(Duration::from_secs(10), "the split route applied", || {
        l.get(&shop, 1, &["x-canary:1"]).contains_key("v2 x-bad=-")
    });
    let canary = l.get(&shop, 20, &["x-canary:1"]);
    assert_eq!(canary.get("v2 x-bad=-"), Some(&json!(20)), "{canary:?}");
    let split = l.get(&shop, 200, &[]);
    let v1 = split.get("v1 x-bad=-").and_then(Value::as_u64).unwrap_or(0);
    let v2 = split.get("v2 x-bad=-").and_then(Value::as_u64).unwrap_or(0);
    assert_eq!(v1 + v2, 200, "{split:?}");
    assert!((6..=40).contains(&v2), "90/10 split: {split:?}");
    let accepted = status_of(kube, "shop-split");
    assert_eq!(
        condition(&accepted, "Accepted").map(|c| c["status"].clone()),
        Some(json!("True")),
        "{accepted}"
    );

    // A route with a filter Spur does not have: nothing of it applies, its status says why.
    kube.objects.apply(
        HTTPROUTES,
        json!({
            "metadata": { "name": "shop-bad", "namespace": "t" },
            "spec": { "parentRefs": parent, "rules": [{
                "matches": [{ "path": { "type": "PathPrefix", "value": "/bad" } }],
                "filters": [
                    { "type": "RequestHeaderModifier", "requestHeaderModifier": { "set": [{ "name": "x-bad", "value": "yes" }] } },
                    { "type": "ExtensionRef", "extensionRef": { "group": "example.com", "kind": "Magic", "name": "m" } }
                ],
                "backendRefs": [{ "name": "shop-v2", "port": 80 }]
            }]}
        }),
    );
    l.until(Duration::from_secs(10), "the bad route's status", || {
        condition(&status_of(kube, "shop-bad"), "Accepted").is_some()
    });
    let refused = status_of(kube, "shop-bad");
    let accepted = condition(&refused, "Accepted").unwrap();
    assert_eq!(accepted["status"], "False", "{refused}");
    assert_eq!(accepted["reason"], "UnsupportedValue", "{refused}");
    assert!(
        accepted["message"]
            .as_str()
            .unwrap()
            .contains("example.com/Magic"),
        "{refused}"
    );
    let bad = l.get(&format!("http://{}/bad", l.vip(12)), 20, &[]);
    assert!(
        bad.keys().all(|k| k.ends_with("x-bad=-")) && bad.contains_key("v1 x-bad=-"),
        "the refused route was applied (in part): {bad:?}"
    );
}

/// 5: a server-speaks-first protocol and TLS pass through detection untouched.
fn opaque_and_tls(l: &Lab, kube: &FakeKube, c: &str) {
    service(kube, "db", &l.vip(20), 3306, &[(c, 3306)]);
    service(kube, "tls", &l.vip(21), 443, &[(c, 8443)]);
    let vip = l.vip(20);
    l.until(Duration::from_secs(10), "server-speaks-first", || {
        l.client(&["greet", &vip, "3306"]).trim() == "GREETING ping"
    });
    let ca = l.dir.join("app-ca.crt");
    let answer = l.client(&[
        "tls",
        &l.vip(21),
        "443",
        "tls.t.svc.cluster.local",
        ca.to_str().unwrap(),
    ]);
    assert_eq!(
        answer.trim(),
        "tls-ok hello",
        "TLS end to end through the sidecar"
    );
    let m = l.metrics(&l.a);
    for proto in ["opaque", "tls", "http1"] {
        assert!(
            m.lines()
                .any(|line| line.starts_with("spur_protocol_detected_total{")
                    && line.contains(&format!("protocol=\"{proto}\""))),
            "no {proto} detected:\n{m}"
        );
    }
}

/// 6: egress is allowed by default; the group's own config (merged over the mesh) denies it.
fn egress(l: &Lab) {
    let outside = format!("http://{}:9005/", l.ip_b());
    let allowed = l.get(&outside, 1, &[]);
    assert!(allowed.contains_key("outside x-bad=-"), "{allowed:?}");
    let put = l.client(&[
        "put",
        "http://127.0.0.1:7070/v1/groups/client/config",
        "egress: deny\n",
    ]);
    assert!(put.contains("version"), "{put}");
    l.until(Duration::from_secs(10), "egress: deny", || {
        l.get(&outside, 1, &[]).contains_key("404 no_route")
    });
    let m = l.metrics(&l.a);
    assert!(m.contains("spur_egress_total{decision=\"allow\"}"), "{m}");
    assert!(m.contains("spur_egress_total{decision=\"deny\"}"), "{m}");
    // The mesh still applies under the group's own config.
    assert!(l
        .get(&format!("http://{}/", l.vip(10)), 1, &[])
        .contains_key("hello from b\n"));
}

/// 7: `spur explain` says what the client pod's sidecar does, on a table of cases.
fn explain_agrees(l: &Lab) {
    let control = "http://127.0.0.1:7070";
    let cases: [(String, &[&str], &str, &str); 4] = [
        (
            format!("http://{}/", l.vip(10)),
            &[],
            "cluster: echo.t.80",
            "hello from b\n",
        ),
        (
            format!("http://{}/", l.vip(12)),
            &["x-canary:1"],
            "cluster: shop-v2.t.80",
            "v2 x-bad=-",
        ),
        (
            format!("http://{}/bad", l.vip(12)),
            &[],
            "route: httproute.t.shop-split.r1.m0.80",
            "x-bad=-",
        ),
        (
            format!("http://{}:9005/", l.ip_b()),
            &[],
            "egress: deny",
            "404 no_route",
        ),
    ];
    for (url, headers, said, seen) in cases {
        let mut args = vec![
            env!("CARGO_BIN_EXE_spur"),
            "explain",
            "--control",
            control,
            "--pod",
            "t/client-pod",
        ];
        for h in headers {
            args.extend(["--header", h]);
        }
        args.push(&url);
        let out = l.exec(&l.a, &args).unwrap_or_else(|e| e);
        eprintln!("spur explain {url}:\n{out}");
        assert!(out.contains(said), "explain {url}: {out}");
        let got = l.get(&url, 1, headers);
        assert!(
            got.keys().any(|k| k.contains(seen)),
            "the sidecar for {url}: {got:?}, explain said: {out}"
        );
    }
}
