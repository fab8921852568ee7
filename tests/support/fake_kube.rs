//! A fake Kubernetes API server on 127.0.0.1 for the identity, mesh and store tests:
//! TokenReview answers for the tokens it is given (a user name and the audiences each token
//! is for); (section "Objects") lists and watches of Services, Pods, EndpointSlices,
//! HTTPRoutes and GRPCRoutes, with a `/status` subresource that records what was written;
//! and (section "Store objects", at the end) ConfigMaps, Secrets and Leases with
//! resourceVersions, conflicts and watches for the control-plane store.

#![allow(dead_code)]

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct Reviews {
    /// token -> (user name, audiences the token is for)
    tokens: BTreeMap<String, (String, Vec<String>)>,
    /// Every TokenReview spec received.
    pub seen: Vec<Value>,
    /// ConfigMaps, Secrets and Leases (the control-plane store; see the section at the end).
    pub objects: StoreObjects,
}

pub struct FakeKube {
    pub addr: SocketAddr,
    pub reviews: Arc<Mutex<Reviews>>,
    /// Services, Pods, EndpointSlices and routes, with their watch events.
    pub objects: Arc<Objects>,
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

async fn serve(
    reviews: Arc<Mutex<Reviews>>,
    objects: Arc<Objects>,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    if object_path(&path).is_some() {
        return serve_object(reviews, req).await;
    }
    if let Some(answer) = objects.serve(&req).await {
        return answer;
    }
    if req.method() == http::Method::PATCH || req.method() == http::Method::PUT {
        let method = req.method().clone();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        return objects.write_status(&method, &path, &body);
    }
    match (req.method().as_str(), path.as_str()) {
        ("POST", "/apis/authentication.k8s.io/v1/tokenreviews") => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let review: Value = serde_json::from_slice(&body).unwrap();
            let mut r = reviews.lock().unwrap();
            r.seen.push(review["spec"].clone());
            let token = review["spec"]["token"].as_str().unwrap_or("");
            let asked: Vec<String> =
                serde_json::from_value(review["spec"]["audiences"].clone()).unwrap_or_default();
            let status = match r.tokens.get(token) {
                Some((user, audiences)) => {
                    let both: Vec<&String> =
                        asked.iter().filter(|a| audiences.contains(a)).collect();
                    if both.is_empty() {
                        json!({ "authenticated": false, "error": "token audiences do not match" })
                    } else {
                        json!({
                            "authenticated": true,
                            "user": { "username": user, "uid": "u-1", "groups": ["system:serviceaccounts"] },
                            "audiences": both,
                        })
                    }
                }
                None => json!({ "authenticated": false, "error": "invalid bearer token" }),
            };
            json_response(
                StatusCode::CREATED,
                &json!({
                    "kind": "TokenReview",
                    "apiVersion": "authentication.k8s.io/v1",
                    "metadata": { "creationTimestamp": null },
                    "spec": review["spec"],
                    "status": status,
                }),
            )
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound" }),
        ),
    }
}

impl FakeKube {
    /// Serves TokenReviews for `tok-web` (shop/web), `tok-api` (pay/api), `tok-web-default`
    /// (shop/web, but for the API server's audience) and `tok-node` (a node, not a service
    /// account); more with [`FakeKube::token`].
    pub async fn start() -> FakeKube {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        FakeKube::start_on(tcp).await
    }

    /// [`FakeKube::start`] on a socket bound already (in another network namespace, say).
    pub async fn start_on(tcp: std::net::TcpListener) -> FakeKube {
        tcp.set_nonblocking(true).unwrap();
        let tcp = tokio::net::TcpListener::from_std(tcp).unwrap();
        let addr = tcp.local_addr().unwrap();
        let reviews = Arc::new(Mutex::new(Reviews::default()));
        let objects = Arc::new(Objects::default());
        let (r, o) = (reviews.clone(), objects.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = tcp.accept().await else {
                    continue;
                };
                let (r, o) = (r.clone(), o.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let (r, o) = (r.clone(), o.clone());
                        async move { Ok::<_, Infallible>(serve(r, o, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let kube = FakeKube {
            addr,
            reviews,
            objects,
            task,
        };
        kube.token("tok-web", "system:serviceaccount:shop:web", &["spur"]);
        kube.token("tok-api", "system:serviceaccount:pay:api", &["spur"]);
        kube.token(
            "tok-web-default",
            "system:serviceaccount:shop:web",
            &["https://kubernetes.default.svc"],
        );
        kube.token("tok-node", "system:node:node-1", &["spur"]);
        kube
    }

    pub fn token(&self, token: &str, user: &str, audiences: &[&str]) {
        self.reviews.lock().unwrap().tokens.insert(
            token.into(),
            (
                user.into(),
                audiences.iter().map(|s| s.to_string()).collect(),
            ),
        );
    }

    /// One EndpointSlice of Service `service` in `namespace`, with one ready endpoint per
    /// address and the single port `port` (named `http`).
    pub fn slice(&self, namespace: &str, service: &str, addresses: &[&str], port: u16) {
        let endpoints: Vec<Value> = addresses
            .iter()
            .map(|a| json!({ "addresses": [a], "conditions": { "ready": true } }))
            .collect();
        self.objects.apply(
            SLICES,
            json!({
                "metadata": {
                    "name": format!("{service}-abcde"),
                    "namespace": namespace,
                    "labels": { "kubernetes.io/service-name": service }
                },
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": [{ "name": "http", "port": port, "protocol": "TCP" }]
            }),
        );
    }

    pub fn revoke(&self, token: &str) {
        self.reviews.lock().unwrap().tokens.remove(token);
    }

    pub fn tokens_seen(&self) -> Vec<String> {
        let r = self.reviews.lock().unwrap();
        r.seen
            .iter()
            .map(|s| s["token"].as_str().unwrap_or("").to_string())
            .collect()
    }

    /// A kubeconfig for this server, written under `dir`.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: control-plane-token\n",
                self.addr
            ),
        )
        .unwrap();
        path
    }
}

// ---------------------------------------------------------------------------------------
// Objects: lists and watches of namespaced objects, with resourceVersions, and a `/status`
// subresource (merge patch or replace) that records each write.

pub const SERVICES: &str = "/api/v1/services";
pub const PODS: &str = "/api/v1/pods";
pub const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub const HTTPROUTES: &str = "/apis/gateway.networking.k8s.io/v1/httproutes";
pub const GRPCROUTES: &str = "/apis/gateway.networking.k8s.io/v1/grpcroutes";
const COLLECTIONS: [&str; 5] = [SERVICES, PODS, SLICES, HTTPROUTES, GRPCROUTES];

#[derive(Default)]
pub struct ObjectState {
    rv: u64,
    /// collection -> "ns/name" -> object
    items: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// (resourceVersion, collection, event)
    events: Vec<(u64, &'static str, Value)>,
    /// Every status write: (collection, "ns/name", the body sent).
    pub status_writes: Vec<(&'static str, String, Value)>,
}

pub struct Objects {
    pub state: Mutex<ObjectState>,
    bump: tokio::sync::watch::Sender<u64>,
}

impl Default for Objects {
    fn default() -> Objects {
        Objects {
            state: Mutex::new(ObjectState::default()),
            bump: tokio::sync::watch::channel(0).0,
        }
    }
}

fn key_of(obj: &Value) -> String {
    format!(
        "{}/{}",
        obj["metadata"]["namespace"].as_str().unwrap_or("default"),
        obj["metadata"]["name"].as_str().unwrap_or("")
    )
}

fn collection(path: &str) -> Option<&'static str> {
    COLLECTIONS.iter().copied().find(|c| *c == path)
}

impl Objects {
    /// Creates or replaces an object of `coll` (an ADDED or MODIFIED event).
    pub fn apply(&self, coll: &'static str, mut obj: Value) {
        {
            let mut st = self.state.lock().unwrap();
            st.rv += 1;
            let rv = st.rv;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            if obj["metadata"]["generation"].is_null() {
                obj["metadata"]["generation"] = json!(1);
            }
            let key = key_of(&obj);
            let items = st.items.entry(coll).or_default();
            let kind = if items.contains_key(&key) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            if let Some(old) = items.get(&key) {
                if obj.get("status").is_none() && old.get("status").is_some() {
                    obj["status"] = old["status"].clone();
                }
            }
            items.insert(key, obj.clone());
            st.events
                .push((rv, coll, json!({ "type": kind, "object": obj })));
        }
        self.bump.send_modify(|n| *n += 1);
    }

    /// Deletes `namespace/name` of `coll` (a DELETED event).
    pub fn delete(&self, coll: &'static str, namespace: &str, name: &str) {
        {
            let mut st = self.state.lock().unwrap();
            let Some(mut obj) = st
                .items
                .entry(coll)
                .or_default()
                .remove(&format!("{namespace}/{name}"))
            else {
                return;
            };
            st.rv += 1;
            let rv = st.rv;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            st.events
                .push((rv, coll, json!({ "type": "DELETED", "object": obj })));
        }
        self.bump.send_modify(|n| *n += 1);
    }

    /// The object as the API has it now (its status included).
    pub fn get(&self, coll: &'static str, namespace: &str, name: &str) -> Option<Value> {
        let st = self.state.lock().unwrap();
        st.items
            .get(coll)?
            .get(&format!("{namespace}/{name}"))
            .cloned()
    }

    /// GET of a collection: a list, or (`watch=true`) a watch stream; `None` for any other
    /// request.
    async fn serve(self: &Arc<Self>, req: &Request<Incoming>) -> Option<Response<Body>> {
        if req.method() != http::Method::GET {
            return None;
        }
        let coll = collection(req.uri().path())?;
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if query.get("watch").map(String::as_str) != Some("true") {
            let st = self.state.lock().unwrap();
            let items: Vec<Value> = st
                .items
                .get(coll)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            return Some(json_response(
                StatusCode::OK,
                &json!({ "metadata": { "resourceVersion": st.rv.to_string() }, "items": items }),
            ));
        }
        let mut after: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        let mut woken = self.bump.subscribe();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                woken.borrow_and_update();
                let lines: Vec<String> = {
                    let st = me.state.lock().unwrap();
                    let lines = st
                        .events
                        .iter()
                        .filter(|(rv, c, _)| *rv > after && *c == coll)
                        .map(|(_, _, e)| e.to_string())
                        .collect();
                    after = st.rv;
                    lines
                };
                for line in lines {
                    if tx.send(Bytes::from(line + "\n")).await.is_err() {
                        return;
                    }
                }
                if woken.changed().await.is_err() {
                    return;
                }
            }
        });
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            let b = rx.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        Some(
            Response::builder()
                .header("content-type", "application/json")
                .body(StreamBody::new(frames).boxed())
                .unwrap(),
        )
    }

    /// PATCH (merge) or PUT of `/apis/.../namespaces/NS/RESOURCE/NAME/status`: recorded,
    /// and applied to the object (a MODIFIED event, as the API makes).
    fn write_status(&self, method: &http::Method, path: &str, body: &[u8]) -> Response<Body> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let found = match parts.as_slice() {
            ["apis", g, v, "namespaces", ns, res, name, "status"] => {
                let coll_path = format!("/apis/{g}/{v}/{res}");
                collection(&coll_path).map(|c| (c, ns.to_string(), name.to_string()))
            }
            _ => None,
        };
        let Some((coll, ns, name)) = found else {
            return json_response(
                StatusCode::NOT_FOUND,
                &json!({ "kind": "Status", "code": 404, "reason": "NotFound" }),
            );
        };
        let sent: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let Some(mut obj) = self.get(coll, &ns, &name) else {
            return json_response(
                StatusCode::NOT_FOUND,
                &json!({ "kind": "Status", "code": 404, "reason": "NotFound" }),
            );
        };
        self.state
            .lock()
            .unwrap()
            .status_writes
            .push((coll, format!("{ns}/{name}"), sent.clone()));
        let _ = method; // merge patch and replace both set `status` wholesale here
        obj["status"] = sent["status"].clone();
        self.apply(coll, obj.clone());
        json_response(StatusCode::OK, &obj)
    }

    /// Every status written to `namespace/name` of `coll`, oldest first.
    pub fn status_writes(&self, coll: &'static str, namespace: &str, name: &str) -> Vec<Value> {
        let key = format!("{namespace}/{name}");
        self.state
            .lock()
            .unwrap()
            .status_writes
            .iter()
            .filter(|(c, k, _)| *c == coll && *k == key)
            .map(|(_, _, v)| v.clone())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// Store objects: generic namespaced objects, for the control-plane store (issue 23): ConfigMaps, Secrets
// and coordination.k8s.io/v1 Leases. Get, list (label selectors `k=v,...`), create (409
// AlreadyExists), replace with a `resourceVersion` precondition (409 Conflict), delete, and
// watches from a resourceVersion that stream every later change. One resourceVersion
// counter for everything, as in a real API server.

/// The kinds stored: (path prefix before the namespace, plural, kind, apiVersion).
const OBJECT_KINDS: &[(&str, &str, &str, &str)] = &[
    ("/api/v1/namespaces/", "configmaps", "ConfigMap", "v1"),
    ("/api/v1/namespaces/", "secrets", "Secret", "v1"),
    (
        "/apis/coordination.k8s.io/v1/namespaces/",
        "leases",
        "Lease",
        "coordination.k8s.io/v1",
    ),
];

pub struct StoreObjects {
    rv: u64,
    /// (plural, namespace, name) -> object
    items: BTreeMap<(String, String, String), Value>,
    /// Every change: resourceVersion, plural, namespace, event type, object.
    events: Vec<(u64, String, String, &'static str, Value)>,
    /// The newest resourceVersion, for watches to wait on.
    changed: tokio::sync::watch::Sender<u64>,
    /// Writes answered so far, by method (`POST`, `PUT`, `DELETE`) and status code.
    pub writes: BTreeMap<(String, u16), usize>,
}

impl Default for StoreObjects {
    fn default() -> StoreObjects {
        StoreObjects {
            rv: 1,
            items: BTreeMap::new(),
            events: Vec::new(),
            changed: tokio::sync::watch::channel(1).0,
            writes: BTreeMap::new(),
        }
    }
}

/// (plural, kind, apiVersion, namespace, name) of an object path.
fn object_path(
    path: &str,
) -> Option<(
    &'static str,
    &'static str,
    &'static str,
    String,
    Option<String>,
)> {
    for (prefix, plural, kind, api_version) in OBJECT_KINDS {
        let Some(rest) = path.strip_prefix(prefix) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        match parts[..] {
            [ns, p] if p == *plural => return Some((plural, kind, api_version, ns.into(), None)),
            [ns, p, name] if p == *plural => {
                return Some((plural, kind, api_version, ns.into(), Some(name.into())))
            }
            _ => {}
        }
    }
    None
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or(""), 16)
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| percent_decode(v))
}

/// Whether `obj` matches a label selector of `k=v` and `k` terms.
fn selects(selector: Option<&str>, obj: &Value) -> bool {
    let labels = &obj["metadata"]["labels"];
    selector
        .unwrap_or("")
        .split(',')
        .filter(|t| !t.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => labels[k].as_str() == Some(v),
            None => labels.get(term).is_some(),
        })
}

fn status_error(code: u16, reason: &str, message: String) -> Response<Body> {
    json_response(
        StatusCode::from_u16(code).unwrap(),
        &json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                 "message": message, "reason": reason, "code": code }),
    )
}

impl StoreObjects {
    /// Records a change under a new resourceVersion and wakes the watches.
    fn record(&mut self, plural: &str, ns: &str, kind: &'static str, mut obj: Value) -> Value {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.events
            .push((self.rv, plural.into(), ns.into(), kind, obj.clone()));
        self.changed.send_replace(self.rv);
        obj
    }

    /// The objects of one plural (any namespace), for assertions.
    pub fn list(&self, plural: &str) -> Vec<Value> {
        self.items
            .iter()
            .filter(|((p, _, _), _)| p == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

async fn serve_object(reviews: Arc<Mutex<Reviews>>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let (plural, kind, api_version, ns, name) = object_path(&path).unwrap();
    let method = req.method().as_str().to_string();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let key = |name: &str| (plural.to_string(), ns.clone(), name.to_string());
    let mut r = reviews.lock().unwrap();
    let o = &mut r.objects;
    let response = match (method.as_str(), name) {
        ("GET", Some(name)) => match o.items.get(&key(&name)) {
            Some(obj) => json_response(StatusCode::OK, obj),
            None => status_error(404, "NotFound", format!("{plural} \"{name}\" not found")),
        },
        ("GET", None) if query_param(&query, "watch").as_deref() == Some("true") => {
            let from = query_param(&query, "resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let selector = query_param(&query, "labelSelector");
            drop(r);
            return watch_objects(reviews, plural, ns, selector, from);
        }
        ("GET", None) => {
            let selector = query_param(&query, "labelSelector");
            let items: Vec<Value> = o
                .items
                .iter()
                .filter(|((p, n, _), v)| {
                    *p == plural && *n == ns && selects(selector.as_deref(), v)
                })
                .map(|(_, v)| v.clone())
                .collect();
            json_response(
                StatusCode::OK,
                &json!({ "kind": format!("{kind}List"), "apiVersion": api_version,
                         "metadata": { "resourceVersion": o.rv.to_string() }, "items": items }),
            )
        }
        ("POST", None) => {
            let mut obj: Value = serde_json::from_slice(&body).unwrap();
            let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
            if o.items.contains_key(&key(&name)) {
                status_error(
                    409,
                    "AlreadyExists",
                    format!("{plural} \"{name}\" already exists"),
                )
            } else {
                obj["kind"] = json!(kind);
                obj["apiVersion"] = json!(api_version);
                obj["metadata"]["namespace"] = json!(ns);
                obj["metadata"]["uid"] = json!(format!("uid-{}", o.rv + 1));
                obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                let obj = o.record(plural, &ns, "ADDED", obj);
                o.items.insert(key(&name), obj.clone());
                json_response(StatusCode::CREATED, &obj)
            }
        }
        ("PUT", Some(name)) => {
            let mut obj: Value = serde_json::from_slice(&body).unwrap();
            match o.items.get(&key(&name)) {
                None => status_error(404, "NotFound", format!("{plural} \"{name}\" not found")),
                Some(old)
                    if obj["metadata"]["resourceVersion"].is_string()
                        && obj["metadata"]["resourceVersion"] != old["metadata"]["resourceVersion"] =>
                {
                    status_error(409, "Conflict", format!("Operation cannot be fulfilled on {plural} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"))
                }
                Some(old) => {
                    obj["kind"] = json!(kind);
                    obj["apiVersion"] = json!(api_version);
                    obj["metadata"]["namespace"] = json!(ns);
                    obj["metadata"]["uid"] = old["metadata"]["uid"].clone();
                    obj["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
                    let obj = o.record(plural, &ns, "MODIFIED", obj);
                    o.items.insert(key(&name), obj.clone());
                    json_response(StatusCode::OK, &obj)
                }
            }
        }
        ("DELETE", Some(name)) => match o.items.remove(&key(&name)) {
            None => status_error(404, "NotFound", format!("{plural} \"{name}\" not found")),
            Some(obj) => {
                let obj = o.record(plural, &ns, "DELETED", obj);
                json_response(StatusCode::OK, &obj)
            }
        },
        _ => status_error(405, "MethodNotAllowed", format!("{method} {path}")),
    };
    if method != "GET" {
        *o.writes
            .entry((method, response.status().as_u16()))
            .or_default() += 1;
    }
    response
}

/// A watch: every change after `from` to objects of `plural` in `ns` that the selector
/// picks, one JSON line each, for as long as the client stays.
fn watch_objects(
    reviews: Arc<Mutex<Reviews>>,
    plural: &'static str,
    ns: String,
    selector: Option<String>,
    from: u64,
) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let mut changed = reviews.lock().unwrap().objects.changed.subscribe();
    tokio::spawn(async move {
        let mut last = from;
        loop {
            let lines: Vec<(u64, String)> = {
                let r = reviews.lock().unwrap();
                r.objects
                    .events
                    .iter()
                    .filter(|(rv, p, n, _, obj)| {
                        *rv > last && *p == plural && *n == ns && selects(selector.as_deref(), obj)
                    })
                    .map(|(rv, _, _, t, obj)| {
                        (*rv, format!("{}\n", json!({ "type": t, "object": obj })))
                    })
                    .collect()
            };
            for (rv, line) in lines {
                last = rv;
                if tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                    return;
                }
            }
            if changed.changed().await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(StreamBody::new(tokio_stream_from(rx)).boxed())
        .unwrap()
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

impl FakeKube {
    /// The stored objects of one kind (`configmaps`, `secrets`, `leases`).
    pub fn objects(&self, plural: &str) -> Vec<Value> {
        self.reviews.lock().unwrap().objects.list(plural)
    }

    /// How many writes were answered with this method and status (409s: conflicts).
    pub fn writes(&self, method: &str, status: u16) -> usize {
        let r = self.reviews.lock().unwrap();
        r.objects
            .writes
            .get(&(method.to_string(), status))
            .copied()
            .unwrap_or(0)
    }

    /// The holder of the Lease `name` in `namespace`, if any.
    pub fn lease_holder(&self, namespace: &str, name: &str) -> Option<String> {
        let r = self.reviews.lock().unwrap();
        let lease = r
            .objects
            .items
            .get(&("leases".into(), namespace.into(), name.into()))?;
        lease["spec"]["holderIdentity"].as_str().map(str::to_string)
    }
}
