//! What `spur control --kubernetes --mesh` renders from the cluster's objects, before any
//! group's own config is merged over it (pure: objects in, a config out).
//!
//! - Every TCP port of every Service with a ClusterIP in the meshed namespaces is a
//!   cluster `NAME.NS.PORT`: `service_addresses` is the ClusterIP and port (what a meshed
//!   app's connection is going to, read by the outbound listener with `original_dst`), the
//!   endpoints are the ready endpoints of its EndpointSlices on the port the Service's
//!   port targets. `spur.dev/opaque-ports` on the Service marks ports `opaque`.
//! - When every ready endpoint is a pod with a Spur sidecar (`spur.dev/injected: "true"`,
//!   and not `spur.dev/mtls: disabled`), the cluster originates mutual TLS and expects the
//!   SPIFFE identities of those pods' ServiceAccounts; else it speaks plain TCP/HTTP.
//! - The outbound listener `outbound` (127.0.0.1:15001, `spur inject`'s default) routes by
//!   original destination; HTTPRoutes and GRPCRoutes add routes to it ([`super::gateway`]).
//! - A group (the `app` label of its pods, else `app.kubernetes.io/name`, as `spur inject`
//!   names it) whose pods carry a sidecar also gets the inbound listener `inbound`
//!   (0.0.0.0:15006, mutual TLS with the workload certificate unless mTLS is disabled) to
//!   the first container port of its pods, as cluster `app`.

use super::gateway::cluster_name;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

pub const INJECTED: &str = "spur.dev/injected";
pub const MTLS: &str = "spur.dev/mtls";
pub const OPAQUE_PORTS: &str = "spur.dev/opaque-ports";
pub const OUTBOUND: &str = "outbound";
pub const OUTBOUND_LISTEN: &str = "127.0.0.1:15001";
pub const INBOUND: &str = "inbound";
pub const INBOUND_LISTEN: &str = "0.0.0.0:15006";

/// The objects the mesh is rendered from.
#[derive(Default)]
pub struct Objects {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub pods: Vec<Arc<Pod>>,
}

/// Which namespaces are meshed: all, or those of `--mesh-namespaces`.
#[derive(Clone, Debug, Default)]
pub struct Namespaces(pub Option<BTreeSet<String>>);

impl Namespaces {
    pub fn contains(&self, ns: &str) -> bool {
        self.0.as_ref().is_none_or(|s| s.contains(ns))
    }
}

fn ns_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    m.namespace.as_deref().unwrap_or("default")
}

fn annotation<'a>(
    m: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
) -> Option<&'a str> {
    m.annotations.as_ref()?.get(key).map(String::as_str)
}

/// Whether the pod has a Spur sidecar that speaks mutual TLS.
pub fn meshed(pod: &Pod) -> bool {
    annotation(&pod.metadata, INJECTED) == Some("true")
        && annotation(&pod.metadata, MTLS) != Some("disabled")
}

/// The pod's group, as `spur inject` chose it.
pub fn group_of(pod: &Pod) -> Option<&str> {
    let labels = pod.metadata.labels.as_ref()?;
    labels
        .get("app")
        .or_else(|| labels.get("app.kubernetes.io/name"))
        .map(String::as_str)
}

/// The SPIFFE ID of a pod's ServiceAccount.
pub fn identity(pod: &Pod, trust_domain: &str) -> String {
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default");
    format!(
        "spiffe://{trust_domain}/ns/{}/sa/{sa}",
        ns_of(&pod.metadata)
    )
}

/// One Service port as a rendered cluster, with what `spur explain` and the routes need.
pub struct ServicePort {
    pub cluster: Value,
    pub name: String,
}

/// The clusters of every Service port in the meshed namespaces, sorted by name.
pub fn service_clusters(objs: &Objects, namespaces: &Namespaces, td: &str) -> Vec<ServicePort> {
    let pods_by_ip: HashMap<IpAddr, &Pod> = objs
        .pods
        .iter()
        .filter_map(|p| {
            let ip = p.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
            Some((ip, &**p))
        })
        .collect();
    let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for s in &objs.slices {
        if let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(crate::k8s::SERVICE_LABEL))
        {
            slices
                .entry((ns_of(&s.metadata), svc.as_str()))
                .or_default()
                .push(s);
        }
    }
    let mut out = Vec::new();
    for svc in &objs.services {
        let ns = ns_of(&svc.metadata);
        let Some(name) = svc.metadata.name.as_deref() else {
            continue;
        };
        let Some(spec) = &svc.spec else { continue };
        if !namespaces.contains(ns) {
            continue;
        }
        let ips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let opaque: BTreeSet<u16> = annotation(&svc.metadata, OPAQUE_PORTS)
            .unwrap_or("")
            .split(',')
            .filter_map(|p| p.trim().parse().ok())
            .collect();
        let own = slices
            .get(&(ns, name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            let endpoints = ready(own, port.name.as_deref());
            let cluster = cluster_name(name, ns, number);
            let mut c = json!({
                "name": cluster,
                "endpoints": endpoints.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "service_addresses": ips.iter().map(|ip| SocketAddr::new(*ip, number).to_string()).collect::<Vec<_>>(),
            });
            if opaque.contains(&number) {
                c["opaque"] = json!(true);
            }
            if let Some(ids) = expected_identities(&endpoints, &pods_by_ip, td) {
                c["tls"] = json!({ "expect_identities": ids });
            }
            out.push(ServicePort {
                cluster: c,
                name: cluster,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The ready endpoints of a Service port among its slices: the slice port of the same name
/// (EndpointSlices name their ports after the Service's), as sorted addresses.
fn ready(slices: &[&EndpointSlice], port_name: Option<&str>) -> Vec<SocketAddr> {
    let mut out = BTreeSet::new();
    for s in slices {
        if !matches!(s.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let want = port_name.unwrap_or("");
        let Some(port) = s
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == want)
            .and_then(|p| u16::try_from(p.port?).ok())
        else {
            continue;
        };
        for ep in s.endpoints.iter().flatten() {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if let (true, Some(ip)) = (ready, ep.addresses.first().and_then(|a| a.parse().ok())) {
                out.insert(SocketAddr::new(ip, port));
            }
        }
    }
    out.into_iter().collect()
}

/// mTLS when every endpoint is a pod with a sidecar: the identities of their
/// ServiceAccounts. `None` for plain traffic (no endpoint, or one without a sidecar).
fn expected_identities(
    endpoints: &[SocketAddr],
    pods: &HashMap<IpAddr, &Pod>,
    td: &str,
) -> Option<Vec<String>> {
    if endpoints.is_empty() {
        return None;
    }
    let mut ids = BTreeSet::new();
    for e in endpoints {
        let pod = pods.get(&e.ip())?;
        if !meshed(pod) {
            return None;
        }
        ids.insert(identity(pod, td));
    }
    Some(ids.into_iter().collect())
}

/// The groups of the meshed namespaces' pods with a sidecar, and for each the inbound part
/// of its config (listener and `app` cluster), when its pods declare a port.
pub fn groups(objs: &Objects, namespaces: &Namespaces) -> BTreeMap<String, Option<Value>> {
    let mut out = BTreeMap::new();
    for pod in &objs.pods {
        if annotation(&pod.metadata, INJECTED) != Some("true")
            || !namespaces.contains(ns_of(&pod.metadata))
        {
            continue;
        }
        let Some(group) = group_of(pod) else { continue };
        let inbound = app_port(pod).map(|port| {
            let mut listener =
                json!({ "name": INBOUND, "listen": INBOUND_LISTEN, "cluster": "app" });
            if meshed(pod) {
                listener["tls"] = json!({});
            }
            json!({
                "listener": listener,
                "cluster": { "name": "app", "endpoints": [format!("127.0.0.1:{port}")] },
            })
        });
        let entry = out.entry(group.to_string()).or_insert(None);
        if entry.is_none() {
            *entry = inbound;
        }
    }
    out
}

/// The first port of the pod's first container that is not Spur's.
fn app_port(pod: &Pod) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .filter(|c| !c.name.starts_with("spur-"))
        .flat_map(|c| c.ports.iter().flatten())
        .find_map(|p| u16::try_from(p.container_port).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj<T: serde::de::DeserializeOwned>(v: Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    fn objects() -> Objects {
        Objects {
            services: vec![
                obj(json!({ "metadata": { "name": "web", "namespace": "shop",
                                          "annotations": { "spur.dev/opaque-ports": "3306" } },
                            "spec": { "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                                      "ports": [{ "name": "http", "port": 80, "targetPort": 8080 },
                                                { "name": "db", "port": 3306 },
                                                { "name": "dns", "port": 53, "protocol": "UDP" }] } })),
                obj(
                    json!({ "metadata": { "name": "headless", "namespace": "shop" },
                            "spec": { "clusterIP": "None", "ports": [{ "port": 80 }] } }),
                ),
                obj(
                    json!({ "metadata": { "name": "other", "namespace": "kube-system" },
                            "spec": { "clusterIP": "10.96.0.2", "ports": [{ "port": 80 }] } }),
                ),
            ],
            slices: vec![obj(json!({
                "metadata": { "name": "web-1", "namespace": "shop",
                              "labels": { "kubernetes.io/service-name": "web" } },
                "addressType": "IPv4",
                "endpoints": [{ "addresses": ["10.0.0.5"], "conditions": { "ready": true } },
                              { "addresses": ["10.0.0.6"], "conditions": { "ready": false } }],
                "ports": [{ "name": "http", "port": 8080 }, { "name": "db", "port": 3306 }]
            }))],
            pods: vec![obj(json!({
                "metadata": { "name": "web-x", "namespace": "shop", "labels": { "app": "web" },
                              "annotations": { "spur.dev/injected": "true" } },
                "spec": { "serviceAccountName": "web-sa",
                          "containers": [{ "name": "web", "ports": [{ "containerPort": 8080 }] },
                                         { "name": "spur-proxy" }] },
                "status": { "podIP": "10.0.0.5" }
            }))],
        }
    }

    #[test]
    fn service_ports_become_clusters_with_mtls_to_sidecars() {
        let only_shop = Namespaces(Some(["shop".to_string()].into()));
        let got = service_clusters(&objects(), &only_shop, "cluster.local");
        let names: Vec<&str> = got.iter().map(|p| p.name.as_str()).collect();
        // Headless (no ClusterIP) has its cluster but no service address; UDP is skipped;
        // kube-system is not meshed.
        assert_eq!(names, ["headless.shop.80", "web.shop.3306", "web.shop.80"]);
        assert_eq!(
            got[2].cluster,
            json!({
                "name": "web.shop.80",
                "endpoints": ["10.0.0.5:8080"],
                "service_addresses": ["10.96.0.10:80"],
                "tls": { "expect_identities": ["spiffe://cluster.local/ns/shop/sa/web-sa"] }
            })
        );
        assert_eq!(got[1].cluster["opaque"], true);
        assert_eq!(got[0].cluster["service_addresses"], json!([]));
    }

    #[test]
    fn groups_get_an_inbound_listener_to_their_port() {
        let g = groups(&objects(), &Namespaces::default());
        let inbound = g["web"].as_ref().unwrap();
        assert_eq!(inbound["listener"]["tls"], json!({}));
        assert_eq!(inbound["cluster"]["endpoints"], json!(["127.0.0.1:8080"]));
    }
}
