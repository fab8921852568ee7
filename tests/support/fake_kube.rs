//! A fake Kubernetes API server on 127.0.0.1 for the identity and mesh tests: TokenReview
//! answers for the tokens it is given (a user name and the audiences each token is for),
//! and (section "Objects" below) lists and watches of Services, Pods, EndpointSlices,
//! HTTPRoutes and GRPCRoutes, with a `/status` subresource that records what was written.
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
