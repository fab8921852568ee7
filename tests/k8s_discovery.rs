//! End-to-end: Kubernetes discovery. A fake Kubernetes API server on 127.0.0.1 serves
//! EndpointSlice lists and watch streams in the real JSON shape; the real `spur control
//! --kubernetes --kubeconfig …` watches it, and a real `spur proxy --control …` sends real
//! requests to backends on loopback addresses (127.0.0.2, .3, .4: one port, several "pods",
//! as a Service has them).

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

const NS: &str = "shop";
const SERVICE: &str = "web";
const SLICES_PATH: &str = "/apis/discovery.k8s.io/v1/endpointslices";
/// How fast a change in Kubernetes must reach a proxy's traffic (the issue's bar).
const WITHIN: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------
// The fake Kubernetes API server.

#[derive(Default)]
struct ApiState {
    /// The newest resourceVersion handed out.
    rv: u64,
    /// Current slices by name (all in namespace NS).
    slices: BTreeMap<String, Value>,
    /// Every watch event ever, with its resourceVersion.
    events: Vec<(u64, Value)>,
    /// Answer 500 to everything, and end open watch streams.
    failing: bool,
    /// Requests seen (`METHOD path?query`), for the assertions and for debugging.
    requests: Vec<String>,
}

struct FakeKube {
    addr: SocketAddr,
    /// With TLS: the PEM file of the CA that signed the server's certificate.
    ca: Option<std::path::PathBuf>,
    state: Arc<Mutex<ApiState>>,
    /// Bumped on every change, to wake the watch streams.
    bump: Arc<tokio::sync::watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap()
}

fn status_doc(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

fn query_map(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.replace("%2F", "/").replace("%2f", "/"))
        })
        .collect()
}

/// The list selector kube sends: `kubernetes.io/service-name` (the label exists).
fn selected(slice: &Value, selector: Option<&String>) -> bool {
    match selector {
        None => true,
        Some(key) => slice["metadata"]["labels"].get(key.as_str()).is_some(),
    }
}

/// A CA and a server certificate for 127.0.0.1 signed by it: the CA's PEM file, and a TLS
/// acceptor presenting the certificate.
fn tls_server() -> (std::path::PathBuf, tokio_rustls::TlsAcceptor) {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "fake kube CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "kube-apiserver");
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf
        .signed_by(&key, &rcgen::Issuer::from_params(&ca, &ca_key))
        .unwrap();
    let ca_file = temp_dir("kube-ca").join("ca.crt");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    (ca_file, tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

impl FakeKube {
    async fn start() -> FakeKube {
        FakeKube::start_with(false).await
    }

    /// With `tls`, the server speaks HTTPS with a certificate from its own CA (as a real
    /// API server does), and the kubeconfig names that CA.
    async fn start_with(tls: bool) -> FakeKube {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let (ca, acceptor) = match tls {
            true => {
                let (ca, acceptor) = tls_server();
                (Some(ca), Some(acceptor))
            }
            false => (None, None),
        };
        let state = Arc::new(Mutex::new(ApiState::default()));
        let bump = Arc::new(tokio::sync::watch::channel(0u64).0);
        let (st, b) = (state.clone(), bump.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = tcp.accept().await else {
                    continue;
                };
                let (st, b, acceptor) = (st.clone(), b.clone(), acceptor.clone());
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let (st, b) = (st.clone(), b.clone());
                        async move { Ok::<_, Infallible>(serve(st, b, req)) }
                    });
                    let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(tls) => {
                                let _ = http.serve_connection(TokioIo::new(tls), svc).await;
                            }
                            Err(e) => eprintln!("fake kube: TLS handshake failed: {e}"),
                        },
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        FakeKube {
            addr,
            ca,
            state,
            bump,
            task,
        }
    }

    /// A kubeconfig that points at this server (plain HTTP, or HTTPS trusting its CA),
    /// with a bearer token, as a service account has.
    fn kubeconfig(&self) -> std::path::PathBuf {
        self.kubeconfig_trusting(self.ca.as_deref())
    }

    /// [`FakeKube::kubeconfig`] naming `ca` as the API server's certificate authority.
    fn kubeconfig_trusting(&self, ca: Option<&std::path::Path>) -> std::path::PathBuf {
        let path = temp_dir("kubeconfig").join("config");
        let server = match ca {
            Some(ca) => format!(
                "server: https://{}\n    certificate-authority: {}",
                self.addr,
                ca.display()
            ),
            None => format!("server: http://{}", self.addr),
        };
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    {server}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {NS}\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n"
            ),
        )
        .unwrap();
        path
    }

    fn wake(&self) {
        self.bump.send_modify(|n| *n += 1);
    }

    /// Creates or replaces a slice: an ADDED or MODIFIED event.
    fn apply(&self, mut slice: Value) {
        {
            let mut st = self.state.lock().unwrap();
            st.rv += 1;
            let rv = st.rv;
            slice["metadata"]["resourceVersion"] = json!(rv.to_string());
            let name = slice["metadata"]["name"].as_str().unwrap().to_string();
            let kind = if st.slices.contains_key(&name) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            st.events
                .push((rv, json!({ "type": kind, "object": slice.clone() })));
            st.slices.insert(name, slice);
        }
        self.wake();
    }

    /// Deletes a slice: a DELETED event carrying its last state.
    fn delete(&self, name: &str) {
        {
            let mut st = self.state.lock().unwrap();
            let mut slice = st.slices.remove(name).expect("the slice exists");
            st.rv += 1;
            let rv = st.rv;
            slice["metadata"]["resourceVersion"] = json!(rv.to_string());
            st.events
                .push((rv, json!({ "type": "DELETED", "object": slice })));
        }
        self.wake();
    }

    /// From now on every request gets 500 and every open watch stream ends (or, with
    /// `false`, the server works again).
    fn set_failing(&self, failing: bool) {
        self.state.lock().unwrap().failing = failing;
        self.wake();
    }

    fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn serve(
    state: Arc<Mutex<ApiState>>,
    bump: Arc<tokio::sync::watch::Sender<u64>>,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = query_map(req.uri().query());
    let mut st = state.lock().unwrap();
    st.requests.push(format!(
        "{} {}?{} [{}]",
        req.method(),
        path,
        req.uri().query().unwrap_or(""),
        req.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    ));
    if st.failing {
        return json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &status_doc(500, "InternalError", "injected failure"),
        );
    }
    if req.method() != http::Method::GET || path != SLICES_PATH {
        eprintln!("fake kube: no such endpoint: {} {path}", req.method());
        return json_response(
            StatusCode::NOT_FOUND,
            &status_doc(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    }
    let selector = query.get("labelSelector");
    if query.get("watch").map(String::as_str) != Some("true") {
        let items: Vec<Value> = st
            .slices
            .values()
            .filter(|s| selected(s, selector))
            .map(|s| {
                // List items carry no apiVersion/kind, as the real API's do not.
                let mut item = s.clone();
                let obj = item.as_object_mut().unwrap();
                obj.remove("apiVersion");
                obj.remove("kind");
                item
            })
            .collect();
        return json_response(
            StatusCode::OK,
            &json!({
                "kind": "EndpointSliceList",
                "apiVersion": "discovery.k8s.io/v1",
                "metadata": { "resourceVersion": st.rv.to_string() },
                "items": items
            }),
        );
    }
    // A watch: the events after `resourceVersion`, then every new one, newline-delimited.
    let mut after: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(st.rv);
    let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = Duration::from_secs(
        query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(300),
    );
    let selector = selector.cloned();
    drop(st);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let mut woken = bump.subscribe();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut first = true;
        loop {
            woken.borrow_and_update();
            let lines: Vec<String> = {
                let st = state.lock().unwrap();
                if st.failing {
                    return; // the stream is cut: the client sees its end
                }
                let mut lines: Vec<String> = st
                    .events
                    .iter()
                    .filter(|(rv, e)| *rv > after && selected(&e["object"], selector.as_ref()))
                    .map(|(_, e)| e.to_string())
                    .collect();
                if first && bookmarks {
                    lines.push(
                        json!({
                            "type": "BOOKMARK",
                            "object": {
                                "kind": "EndpointSlice",
                                "apiVersion": "discovery.k8s.io/v1",
                                "metadata": { "resourceVersion": st.rv.to_string() }
                            }
                        })
                        .to_string(),
                    );
                }
                after = st.rv;
                lines
            };
            first = false;
            for line in lines {
                if tx.send(Bytes::from(line + "\n")).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                changed = woken.changed() => if changed.is_err() { return },
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    });
    let body = StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|b| Ok::<_, Infallible>(Frame::data(b))),
    );
    Response::builder()
        .header("content-type", "application/json")
        .body(body.boxed())
        .unwrap()
}

/// An EndpointSlice of Service `web` in namespace `shop`, as the EndpointSlice controller
/// writes it. Each endpoint: an IP and its `ready` condition (`None`: the condition is
/// absent, which Kubernetes reads as ready).
fn slice(name: &str, port: u16, endpoints: &[(&str, Option<bool>)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .enumerate()
        .map(|(i, (ip, ready))| {
            let conditions = match ready {
                Some(r) => json!({ "ready": r, "serving": r, "terminating": !r }),
                None => json!({}),
            };
            json!({
                "addresses": [ip],
                "conditions": conditions,
                "nodeName": "node-1",
                "targetRef": { "kind": "Pod", "namespace": NS, "name": format!("{name}-pod-{i}"), "uid": format!("0000-{i}") }
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NS,
            "generateName": format!("{SERVICE}-"),
            "labels": {
                "kubernetes.io/service-name": SERVICE,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
            },
            "ownerReferences": [{ "apiVersion": "v1", "kind": "Service", "name": SERVICE, "uid": "svc-uid", "controller": true, "blockOwnerDeletion": true }]
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{ "name": "http", "port": port, "protocol": "TCP" }]
    })
}

// ---------------------------------------------------------------------------------------
// The mesh around it.

/// Three named backends on 127.0.0.2, .3 and .4, all on one port (as pods of a Service).
async fn pods() -> (u16, Vec<Backend>) {
    for _ in 0..20 {
        let first = backend_on("127.0.0.2:0".parse().unwrap(), |_| async {
            Response::new(Full::new(Bytes::from("a")))
        })
        .await
        .expect("127.0.0.2 is a loopback address");
        let port = first.addr.port();
        let b = backend_on(format!("127.0.0.3:{port}").parse().unwrap(), |_| async {
            Response::new(Full::new(Bytes::from("b")))
        })
        .await;
        let c = backend_on(format!("127.0.0.4:{port}").parse().unwrap(), |_| async {
            Response::new(Full::new(Bytes::from("c")))
        })
        .await;
        if let (Some(b), Some(c)) = (b, c) {
            return (port, vec![first, b, c]);
        }
    }
    panic!("no port free on 127.0.0.2-4");
}

fn proxy_config(port: u16) -> String {
    format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - {{ name: web, listen: "127.0.0.1:0", cluster: web }}
clusters:
  - name: web
    k8s: "{SERVICE}.{NS}:{port}"
    lb: round_robin
    connect_timeout: 500ms
"#
    )
}

/// The control plane binary with discovery from the fake API.
fn control(kube: &FakeKube, data_dir: &std::path::Path, listen: &str) -> SpurProcess {
    control_with(&kube.kubeconfig(), data_dir, listen)
}

/// The control plane binary with discovery through `kubeconfig`.
fn control_with(
    kubeconfig: &std::path::Path,
    data_dir: &std::path::Path,
    listen: &str,
) -> SpurProcess {
    spawn_spur_control(&[
        "--listen",
        listen,
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--kubernetes",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ])
}

/// A metric of the control plane; `None` while it cannot be reached, or without the series.
async fn control_metric(c: SocketAddr, name: &str) -> Option<f64> {
    match try_call(c, "GET", "/metrics", None, None).await {
        Some(_) => metric(c, name, &[]).await,
        None => None,
    }
}

async fn wait_synced(c: SocketAddr) {
    assert!(
        eventually(Duration::from_secs(10), || async {
            control_metric(c, "spur_control_k8s_synced").await == Some(1.0)
        })
        .await,
        "the control plane never listed the EndpointSlices"
    );
}

fn proxy(c: SocketAddr, group: &str) -> SpurProcess {
    spawn_spur_with(
        &[
            "proxy",
            "--control",
            &format!("http://{c}"),
            "--node",
            "node-1",
            "--group",
            group,
        ],
        1,
        true,
    )
}

/// `n` requests through the proxy: each answer's body, or `503:<x-spur-error>`.
async fn answers(web: SocketAddr, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let a = get(web, "/", &[]).await;
        out.push(match a.status {
            200 => a.text(),
            s => format!("{s}:{}", a.header("x-spur-error").unwrap_or("")),
        });
    }
    out
}

/// Waits (at most `within`) until `n` requests in a row all get answers from `expected`
/// and together reach every one of them.
async fn served_by(web: SocketAddr, expected: &[&str], within: Duration) -> Result<(), String> {
    let want: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
    let last = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let ok = eventually(within, || {
        let (want, last) = (want.clone(), last.clone());
        async move {
            let got = answers(web, 3 * want.len().max(2)).await;
            let ok = got.iter().cloned().collect::<BTreeSet<_>>() == want;
            *last.lock().unwrap() = got;
            ok
        }
    })
    .await;
    if ok {
        Ok(())
    } else {
        Err(format!(
            "after {:?}, traffic still went to {:?}, not only and all of {want:?}",
            started.elapsed(),
            last.lock().unwrap()
        ))
    }
}

async fn version_of(c: SocketAddr, group: &str) -> u64 {
    call(c, "GET", &format!("/v1/groups/{group}/config"), None, None)
        .await
        .1["version"]
        .as_u64()
        .unwrap()
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_added_unready_and_removed_reach_the_proxy_within_2s() {
    let (port, _pods) = pods().await;
    let kube = FakeKube::start().await;
    kube.apply(slice("web-abcde", port, &[("127.0.0.2", Some(true))]));
    let data = temp_dir("k8s-data");
    let cp = control(&kube, &data, "127.0.0.1:0");
    let c = cp.control.unwrap();
    wait_synced(c).await;

    // Validation: a malformed target is refused with its path; nothing is stored.
    let bad = proxy_config(port).replace(&format!("{SERVICE}.{NS}:{port}"), "foo");
    let (s, v) = call(c, "PUT", "/v1/groups/web/config", Some(&bad), None).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["errors"][0]["path"], "clusters[0].k8s", "{v}");
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("`foo`: expected name.namespace:port"),
        "{v}"
    );

    let (s, v) = call(
        c,
        "PUT",
        "/v1/groups/web/config",
        Some(&proxy_config(port)),
        None,
    )
    .await;
    assert_eq!((s, v["version"].as_u64()), (200, Some(1)), "{v}");
    // The stored config is what the user wrote; proxies get it rendered.
    let (_, stored) = call(c, "GET", "/v1/groups/web/config", None, None).await;
    assert_eq!(
        stored["config"]["clusters"][0]["k8s"],
        format!("web.shop:{port}")
    );
    let (_, rendered) = call(c, "GET", "/v1/groups/web/config?rendered=true", None, None).await;
    assert_eq!(
        rendered["config"]["clusters"][0]["endpoints"],
        json!([format!("127.0.0.2:{port}")]),
        "{rendered}"
    );
    assert!(rendered["config"]["clusters"][0].get("k8s").is_none());

    let spur = proxy(c, "web");
    let web = spur.listeners["web"];
    served_by(web, &["a"], WITHIN).await.unwrap();

    // Added: a second ready pod (its condition absent: nil means ready).
    kube.apply(slice(
        "web-abcde",
        port,
        &[("127.0.0.2", Some(true)), ("127.0.0.3", None)],
    ));
    served_by(web, &["a", "b"], WITHIN)
        .await
        .map_err(|e| format!("added endpoint: {e}"))
        .unwrap();

    // Not ready: a goes ready: false (e.g. terminating); only b gets traffic.
    kube.apply(slice(
        "web-abcde",
        port,
        &[("127.0.0.2", Some(false)), ("127.0.0.3", Some(true))],
    ));
    served_by(web, &["b"], WITHIN)
        .await
        .map_err(|e| format!("endpoint became not ready: {e}"))
        .unwrap();

    // A second slice of the same Service adds c.
    kube.apply(slice("web-fghij", port, &[("127.0.0.4", Some(true))]));
    served_by(web, &["b", "c"], WITHIN)
        .await
        .map_err(|e| format!("second slice: {e}"))
        .unwrap();

    // Removed by deleting its slice.
    kube.delete("web-fghij");
    served_by(web, &["b"], WITHIN)
        .await
        .map_err(|e| format!("slice deleted: {e}"))
        .unwrap();

    // Removed from its slice (MODIFIED without it), while a is ready again.
    kube.apply(slice("web-abcde", port, &[("127.0.0.2", Some(true))]));
    served_by(web, &["a"], WITHIN)
        .await
        .map_err(|e| format!("endpoint removed from its slice: {e}"))
        .unwrap();

    // No ready endpoint at all: the proxy takes the empty cluster and answers 503.
    kube.apply(slice("web-abcde", port, &[("127.0.0.2", Some(false))]));
    served_by(web, &["503:no_healthy_endpoint"], WITHIN)
        .await
        .map_err(|e| format!("no ready endpoint: {e}"))
        .unwrap();
    kube.apply(slice("web-abcde", port, &[("127.0.0.2", Some(true))]));
    served_by(web, &["a"], WITHIN).await.unwrap();

    // Every change was a version with the user's config and a note; the proxy applied the
    // newest (none was rejected).
    let current = version_of(c, "web").await;
    assert!(
        current >= 8,
        "a version per change (7) after the put, got {current}"
    );
    let (_, h) = call(c, "GET", "/v1/groups/web/history", None, None).await;
    let versions = h["versions"].as_array().unwrap();
    assert_eq!(versions.len() as u64, current);
    for v in &versions[..versions.len() - 1] {
        assert!(
            v["action"]
                .as_str()
                .unwrap()
                .starts_with("discovery: web.shop:"),
            "{v}"
        );
        assert_eq!(v["config"], stored["config"], "the user's config is kept");
        assert!(v["discovered"].is_object(), "{v}");
    }
    assert_eq!(versions.last().unwrap()["action"], "put");
    assert!(
        eventually(Duration::from_secs(5), || async {
            let (_, p) = call(c, "GET", "/v1/proxies", None, None).await;
            p[0]["applied_version"].as_u64() == Some(current) && p[0]["last_error"].is_null()
        })
        .await,
        "{}",
        call(c, "GET", "/v1/proxies", None, None).await.1
    );
    assert_eq!(
        control_metric(c, "spur_control_k8s_watch_errors_total").await,
        Some(0.0)
    );

    // What the watcher asked the API for: one cluster-wide list by the service label, then
    // a watch from its resourceVersion with bookmarks.
    let requests = kube.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with(&format!("GET {SLICES_PATH}?"))
                && r.contains("labelSelector=kubernetes.io%2Fservice-name")
                && !r.contains("watch=true")),
        "{requests:#?}"
    );
    assert!(
        requests.iter().any(|r| r.contains("watch=true")
            && r.contains("resourceVersion=")
            && r.contains("allowWatchBookmarks=true")),
        "{requests:#?}"
    );
    assert!(
        requests.iter().all(|r| r.ends_with("[Bearer fake-token]")),
        "the kubeconfig's credentials are sent: {requests:#?}"
    );
    drop(spur);
    drop(cp);
}

/// As in a cluster: HTTPS, the API server's certificate checked against the kubeconfig's
/// CA (rustls with aws-lc-rs, the workspace's one crypto provider), a bearer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_over_https_checks_the_api_servers_certificate() {
    let kube = FakeKube::start_with(true).await;
    kube.apply(slice("web-abcde", 8080, &[("10.1.2.3", Some(true))]));
    let data = temp_dir("k8s-data");
    let cp = control(&kube, &data, "127.0.0.1:0");
    let c = cp.control.unwrap();
    wait_synced(c).await;
    let (s, v) = call(
        c,
        "PUT",
        "/v1/groups/web/config",
        Some(&proxy_config(8080)),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (_, rendered) = call(c, "GET", "/v1/groups/web/config?rendered=true", None, None).await;
    assert_eq!(
        rendered["config"]["clusters"][0]["endpoints"],
        json!(["10.1.2.3:8080"]),
        "{rendered}"
    );
    assert!(kube
        .requests()
        .iter()
        .any(|r| r.contains("watch=true") && r.ends_with("[Bearer fake-token]")));
}

/// The same API server, but the kubeconfig names another CA: its certificate is refused,
/// nothing is ever listed, and each failure is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_refuses_an_api_server_certificate_from_another_ca() {
    let kube = FakeKube::start_with(true).await;
    kube.apply(slice("web-abcde", 8080, &[("10.1.2.3", Some(true))]));
    let (other_ca, _) = tls_server();
    let data = temp_dir("k8s-data");
    let cp = control_with(
        &kube.kubeconfig_trusting(Some(&other_ca)),
        &data,
        "127.0.0.1:0",
    );
    let c = cp.control.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            control_metric(c, "spur_control_k8s_watch_errors_total").await >= Some(2.0)
        })
        .await,
        "refused certificates are counted as watch errors (and retried)"
    );
    assert_eq!(
        control_metric(c, "spur_control_k8s_synced").await,
        Some(0.0),
        "never synced"
    );
    assert!(
        kube.requests().is_empty(),
        "a request went through the refused handshake: {:#?}",
        kube.requests()
    );
    // A k8s: cluster PUT meanwhile has no endpoints to render.
    let (s, v) = call(
        c,
        "PUT",
        "/v1/groups/web/config",
        Some(&proxy_config(8080)),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (_, rendered) = call(c, "GET", "/v1/groups/web/config?rendered=true", None, None).await;
    let endpoints = &rendered["config"]["clusters"][0]["endpoints"];
    assert!(endpoints.is_null() || endpoints == &json!([]), "{rendered}");
}

/// A rollback restores the config as written, with the endpoints of the moment: the pods
/// that are ready now, never the ones recorded with the old version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_restores_the_config_with_the_endpoints_of_the_moment() {
    let (port, _pods) = pods().await;
    let kube = FakeKube::start().await;
    kube.apply(slice("web-abcde", port, &[("127.0.0.2", Some(true))]));
    let data = temp_dir("k8s-data");
    let cp = control(&kube, &data, "127.0.0.1:0");
    let c = cp.control.unwrap();
    wait_synced(c).await;
    // Version 1: round robin over the Service, with a as its only pod.
    let (s, v) = call(
        c,
        "PUT",
        "/v1/groups/web/config",
        Some(&proxy_config(port)),
        None,
    )
    .await;
    assert_eq!((s, v["version"].as_u64()), (200, Some(1)), "{v}");
    let spur = proxy(c, "web");
    let web = spur.listeners["web"];
    served_by(web, &["a"], WITHIN).await.unwrap();

    // The pods change (a leaves, b and c come), then the user changes the config.
    kube.apply(slice(
        "web-abcde",
        port,
        &[("127.0.0.3", Some(true)), ("127.0.0.4", Some(true))],
    ));
    served_by(web, &["b", "c"], WITHIN).await.unwrap();
    let changed = proxy_config(port).replace("lb: round_robin", "lb: least_request");
    let (s, _) = call(c, "PUT", "/v1/groups/web/config", Some(&changed), None).await;
    assert_eq!(s, 200);

    // Back to version 1: its config (round robin), today's pods (b and c, not a).
    let (s, v) = call(
        c,
        "POST",
        "/v1/groups/web/rollback",
        Some(r#"{"version": 1}"#),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let rolled = v["version"].as_u64().unwrap();
    let (_, rendered) = call(c, "GET", "/v1/groups/web/config?rendered=true", None, None).await;
    assert_eq!(rendered["version"].as_u64(), Some(rolled));
    assert_eq!(rendered["config"]["clusters"][0]["lb"], "round_robin");
    assert_eq!(
        rendered["config"]["clusters"][0]["endpoints"],
        json!([format!("127.0.0.3:{port}"), format!("127.0.0.4:{port}")]),
        "{rendered}"
    );
    let (_, history) = call(c, "GET", "/v1/groups/web/history", None, None).await;
    let newest = &history["versions"][0];
    assert_eq!(newest["version"].as_u64(), Some(rolled));
    assert_eq!(
        newest["config"]["clusters"][0]["k8s"],
        format!("web.shop:{port}"),
        "the config as written: {newest}"
    );
    served_by(web, &["b", "c"], WITHIN)
        .await
        .map_err(|e| format!("after the rollback: {e}"))
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            let (_, p) = call(c, "GET", "/v1/proxies", None, None).await;
            p[0]["applied_version"].as_u64() == Some(rolled)
        })
        .await
    );
    drop(spur);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_api_keeps_the_last_endpoints_and_discovery_recovers() {
    let (port, _pods) = pods().await;
    let kube = FakeKube::start().await;
    kube.apply(slice("web-abcde", port, &[("127.0.0.2", Some(true))]));
    let data = temp_dir("k8s-data");
    let cp = control(&kube, &data, "127.0.0.1:0");
    let c = cp.control.unwrap();
    wait_synced(c).await;
    let (s, v) = call(
        c,
        "PUT",
        "/v1/groups/web/config",
        Some(&proxy_config(port)),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let spur = proxy(c, "web");
    let web = spur.listeners["web"];
    served_by(web, &["a"], WITHIN).await.unwrap();
    let version = version_of(c, "web").await;

    // The API breaks: its watch stream is cut and every request answers 500. Meanwhile
    // the Service changes (b joins), which the control plane cannot see.
    kube.set_failing(true);
    kube.apply(slice(
        "web-abcde",
        port,
        &[("127.0.0.2", Some(true)), ("127.0.0.3", Some(true))],
    ));
    assert!(
        eventually(Duration::from_secs(10), || async {
            control_metric(c, "spur_control_k8s_watch_errors_total").await >= Some(1.0)
        })
        .await,
        "watch errors are counted"
    );
    let logged = || {
        cp.stderr_lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("EndpointSlice watch failed") && l.contains("injected failure"))
    };
    assert!(
        eventually(Duration::from_secs(5), || async { logged() }).await,
        "watch errors are logged: {:#?}",
        cp.stderr_lines.lock().unwrap()
    );
    assert_eq!(
        answers(web, 6).await,
        vec!["a"; 6],
        "the last endpoints keep serving"
    );
    assert_eq!(
        version_of(c, "web").await,
        version,
        "an error makes no version"
    );

    // The control plane restarts while the API is still down: the stored version keeps its
    // endpoints, so nothing is emptied.
    drop(cp);
    let cp = control(&kube, &data, &c.to_string());
    assert_eq!(cp.control, Some(c));
    let (_, rendered) = call(c, "GET", "/v1/groups/web/config?rendered=true", None, None).await;
    assert_eq!(rendered["version"].as_u64(), Some(version));
    assert_eq!(
        rendered["config"]["clusters"][0]["endpoints"],
        json!([format!("127.0.0.2:{port}")]),
        "{rendered}"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            control_metric(c, "spur_control_k8s_watch_errors_total").await >= Some(1.0)
        })
        .await
    );
    assert_eq!(answers(web, 6).await, vec!["a"; 6]);

    // The API comes back: after its backoff the control plane lists again, finds b and
    // pushes it.
    kube.set_failing(false);
    served_by(web, &["a", "b"], Duration::from_secs(30))
        .await
        .map_err(|e| format!("after recovery: {e}"))
        .unwrap();
    assert!(version_of(c, "web").await > version);

    // And it watches again: a later change arrives within the usual bound.
    kube.apply(slice("web-abcde", port, &[("127.0.0.3", Some(true))]));
    served_by(web, &["b"], WITHIN)
        .await
        .map_err(|e| format!("watch after recovery: {e}"))
        .unwrap();
    drop(spur);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k8s_clusters_need_a_control_plane_with_kubernetes() {
    // A control plane without --kubernetes refuses them, saying what would accept them.
    let (cp, _dir) = start_control(None).await;
    let (s, v) = call(
        cp.addr,
        "PUT",
        "/v1/groups/web/config",
        Some(&proxy_config(8080)),
        None,
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["errors"][0]["path"], "clusters[0].k8s", "{v}");
    let msg = v["errors"][0]["message"].as_str().unwrap();
    assert!(msg.contains("spur control --kubernetes"), "{msg}");
    assert_eq!(
        call(cp.addr, "GET", "/v1/groups/web/config", None, None)
            .await
            .0,
        404
    );

    // A proxy given one in a file, and `spur validate`, refuse it the same way;
    // `spur validate --kubernetes` checks as such a control plane does.
    let file = temp_dir("k8s-file").join("spur.yaml");
    std::fs::write(&file, proxy_config(8080)).unwrap();
    let file = file.to_str().unwrap();
    let spur = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_spur"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    for args in [vec!["validate", file], vec!["proxy", "--config", file]] {
        let out = spur(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("clusters[0].k8s: k8s clusters need `spur control --kubernetes`"),
            "{args:?}: {stderr}"
        );
    }
    let out = spur(&["validate", "--kubernetes", file]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Command-line mistakes are named.
    let out = spur(&["control", "--kubeconfig", file]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("--kubeconfig only applies with --kubernetes"));
    let out = spur(&[
        "control",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        temp_dir("k8s-nokube").to_str().unwrap(),
        "--kubernetes",
        "--kubeconfig",
        "/does/not/exist",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--kubeconfig /does/not/exist"), "{stderr}");
}
