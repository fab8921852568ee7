//! A fake Kubernetes API server on 127.0.0.1 for the identity tests: TokenReview answers
//! for the tokens it is given (a user name and the audiences each token is for), and an
//! EndpointSlice list (with a watch that stays open and quiet) for discovery.
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
    /// The EndpointSlices listed.
    slices: Vec<Value>,
}

pub struct FakeKube {
    pub addr: SocketAddr,
    pub reviews: Arc<Mutex<Reviews>>,
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

async fn serve(reviews: Arc<Mutex<Reviews>>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let watch = req.uri().query().unwrap_or("").contains("watch=true");
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
        ("GET", "/apis/discovery.k8s.io/v1/endpointslices") if !watch => json_response(
            StatusCode::OK,
            &json!({
                "kind": "EndpointSliceList",
                "apiVersion": "discovery.k8s.io/v1",
                "metadata": { "resourceVersion": "1" },
                "items": reviews.lock().unwrap().slices.clone()
            }),
        ),
        // A watch that stays open and quiet.
        ("GET", "/apis/discovery.k8s.io/v1/endpointslices") => Response::builder()
            .header("content-type", "application/json")
            .body(
                StreamBody::new(futures_util::stream::pending::<
                    Result<Frame<Bytes>, Infallible>,
                >())
                .boxed(),
            )
            .unwrap(),
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
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let reviews = Arc::new(Mutex::new(Reviews::default()));
        let r = reviews.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = tcp.accept().await else {
                    continue;
                };
                let r = r.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let r = r.clone();
                        async move { Ok::<_, Infallible>(serve(r, req).await) }
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
    /// address and the single port `port`; listed from the start (set it before the
    /// control plane starts).
    pub fn slice(&self, namespace: &str, service: &str, addresses: &[&str], port: u16) {
        let endpoints: Vec<Value> = addresses
            .iter()
            .map(|a| json!({ "addresses": [a], "conditions": { "ready": true } }))
            .collect();
        self.reviews.lock().unwrap().slices.push(json!({
            "metadata": {
                "name": format!("{service}-abcde"),
                "namespace": namespace,
                "resourceVersion": "1",
                "labels": { "kubernetes.io/service-name": service }
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{ "name": "http", "port": port, "protocol": "TCP" }]
        }));
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
