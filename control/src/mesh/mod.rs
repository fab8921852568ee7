//! The mesh without YAML (`spur control --kubernetes --mesh`): every group's config is
//! rendered from the cluster — Services, EndpointSlices, Pods, HTTPRoutes and GRPCRoutes —
//! and the group's own config (what users PUT) is merged over it.
//!
//! - [`render`]: Services, their endpoints and pods into clusters and listeners.
//! - [`gateway`]: Gateway API routes (mesh profile) into Spur routes, and their status.
//! - [`merge`]: the group's own config over the rendered one; what proxies receive.
//!
//! Each version of a group records the rendered part it was made with
//! ([`crate::store::Stored::mesh`]); when the cluster changes what a group renders to, the
//! group gets a new version (`discovery: mesh ...`, pruned like discovery versions), so
//! proxies take it like any other push. Nothing renders before every watch has listed
//! once (a half-listed cluster would push a mesh without its routes). A missing Gateway
//! API CRD counts as an empty list.

pub mod gateway;
pub mod merge;
pub mod render;

use crate::Control;
use futures_util::StreamExt;
use gateway::{Kind, Refusal, RouteSpec, Source};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::{watcher, WatchStreamExt};
use serde_json::{json, Value};
use spur_config::Config;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The controller name written in route statuses.
pub const CONTROLLER: &str = "spur.dev/mesh";

const COALESCE: Duration = Duration::from_millis(100);

/// `--mesh [--mesh-namespaces a,b]`.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    /// `None`: every namespace.
    pub namespaces: Option<BTreeSet<String>>,
    /// Of the identities expected from meshed destinations (`--trust-domain`).
    pub trust_domain: String,
}

impl Default for MeshOptions {
    fn default() -> MeshOptions {
        MeshOptions {
            namespaces: None,
            trust_domain: "cluster.local".into(),
        }
    }
}

fn route_resource(kind: Kind) -> ApiResource {
    let (k, plural) = match kind {
        Kind::Http => ("HTTPRoute", "httproutes"),
        Kind::Grpc => ("GRPCRoute", "grpcroutes"),
    };
    ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: k.into(),
        plural: plural.into(),
    }
}

/// The watched objects (kube's reflector stores) and what was last written back.
pub struct Mesh {
    services: reflector::Store<Service>,
    pods: reflector::Store<Pod>,
    http: reflector::Store<DynamicObject>,
    grpc: reflector::Store<DynamicObject>,
    namespaces: render::Namespaces,
    trust_domain: String,
    /// One bit per watch that has listed (services, pods, httproutes, grpcroutes).
    listed: AtomicU8,
    /// The status last written per route (`KIND/NS/NAME`), so that only changes are.
    written: Mutex<HashMap<String, Value>>,
    /// What a group without pods renders to, as last rendered.
    last_outbound: Mutex<Option<Arc<Config>>>,
}

/// The writers feeding a [`Mesh`], for [`run`].
pub struct Writers {
    services: Writer<Service>,
    pods: Writer<Pod>,
    http: Writer<DynamicObject>,
    grpc: Writer<DynamicObject>,
}

/// A route's status: one entry per parent Service.
pub struct RouteStatus {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub status: Value,
}

/// What the cluster renders to now.
pub struct Rendered {
    /// Per group: the rendered part of its config.
    pub groups: BTreeMap<String, Arc<Config>>,
    /// The config of a group that has no pods (outbound only).
    pub outbound_only: Arc<Config>,
    pub statuses: Vec<RouteStatus>,
}

impl Rendered {
    pub fn for_group(&self, group: &str) -> Arc<Config> {
        self.groups
            .get(group)
            .cloned()
            .unwrap_or_else(|| self.outbound_only.clone())
    }
}

impl Mesh {
    pub fn new(opts: &MeshOptions) -> (Mesh, Writers) {
        let (services, sw) = reflector::store();
        let (pods, pw) = reflector::store();
        let hw = Writer::new(route_resource(Kind::Http));
        let gw = Writer::new(route_resource(Kind::Grpc));
        let mesh = Mesh {
            services,
            pods,
            http: hw.as_reader(),
            grpc: gw.as_reader(),
            namespaces: render::Namespaces(opts.namespaces.clone()),
            trust_domain: opts.trust_domain.clone(),
            listed: AtomicU8::new(0),
            written: Mutex::new(HashMap::new()),
            last_outbound: Mutex::new(None),
        };
        let writers = Writers {
            services: sw,
            pods: pw,
            http: hw,
            grpc: gw,
        };
        (mesh, writers)
    }

    pub fn last_outbound(&self) -> Option<Arc<Config>> {
        self.last_outbound.lock().unwrap().clone()
    }

    pub fn set_last_outbound(&self, c: Arc<Config>) {
        *self.last_outbound.lock().unwrap() = Some(c);
    }

    pub fn synced(&self) -> bool {
        self.listed.load(Ordering::Acquire) == 0b1111
    }

    /// Renders every group from the objects as they are now (`slices`: the EndpointSlices
    /// discovery watches).
    pub fn render(
        &self,
        slices: Vec<Arc<k8s_openapi::api::discovery::v1::EndpointSlice>>,
    ) -> Rendered {
        let objs = render::Objects {
            services: self.services.state(),
            slices,
            pods: self.pods.state(),
        };
        let ports = render::service_clusters(&objs, &self.namespaces, &self.trust_domain);
        let names: BTreeSet<String> = ports.iter().map(|p| p.name.clone()).collect();
        let (routes, statuses) = self.routes(&objs, &names);
        let clusters: Vec<Value> = ports.into_iter().map(|p| p.cluster).collect();
        let outbound = json!({
            "name": render::OUTBOUND,
            "listen": render::OUTBOUND_LISTEN,
            "original_dst": true,
            "routes": routes,
        });
        let build = |inbound: Option<&Value>| -> Arc<Config> {
            let mut listeners = vec![outbound.clone()];
            let mut all = clusters.clone();
            if let Some(i) = inbound {
                listeners.push(i["listener"].clone());
                all.push(i["cluster"].clone());
            }
            let v = json!({ "listeners": listeners, "clusters": all });
            Arc::new(serde_json::from_value(v).unwrap_or_else(|e| {
                // Every part was parsed on its own before; say so loudly if not.
                tracing::error!(error = %e, "mesh: rendered config does not parse; rendering none");
                Config::default()
            }))
        };
        let groups = render::groups(&objs, &self.namespaces)
            .into_iter()
            .map(|(g, inbound)| (g, build(inbound.as_ref())))
            .collect();
        Rendered {
            groups,
            outbound_only: build(None),
            statuses,
        }
    }

    /// The routes of every HTTPRoute and GRPCRoute whose parent is a meshed Service, in
    /// precedence order, and the status of each route object.
    fn routes(
        &self,
        objs: &render::Objects,
        clusters: &BTreeSet<String>,
    ) -> (Vec<Value>, Vec<RouteStatus>) {
        let services: BTreeMap<(String, String), Vec<u16>> = objs
            .services
            .iter()
            .filter_map(|s| {
                let ns = s.metadata.namespace.clone().unwrap_or_default();
                let ports = s.spec.as_ref()?.ports.iter().flatten();
                let ports = ports.filter_map(|p| u16::try_from(p.port).ok()).collect();
                Some(((ns, s.metadata.name.clone()?), ports))
            })
            .collect();
        let mut routes = Vec::new();
        let mut statuses = Vec::new();
        let mut objects: Vec<(Kind, Arc<DynamicObject>)> = Vec::new();
        objects.extend(self.http.state().into_iter().map(|o| (Kind::Http, o)));
        objects.extend(self.grpc.state().into_iter().map(|o| (Kind::Grpc, o)));
        // Older routes first (Gateway API: the oldest wins a tie), then by name.
        objects.sort_by_key(|(_, o)| {
            (
                o.metadata.creation_timestamp.as_ref().map(|t| t.0),
                o.metadata.namespace.clone(),
                o.metadata.name.clone(),
            )
        });
        for (kind, obj) in objects {
            let ns = obj.metadata.namespace.clone().unwrap_or_default();
            let name = obj.metadata.name.clone().unwrap_or_default();
            if !self.namespaces.contains(&ns) {
                continue;
            }
            let spec: RouteSpec = match serde_json::from_value(obj.data["spec"].clone()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(namespace = ns, name, error = %e, "mesh: unreadable route spec");
                    continue;
                }
            };
            let src = Source {
                kind,
                namespace: &ns,
                name: &name,
                spec: &spec,
            };
            let mut parents = Vec::new();
            let mut mine = Vec::new();
            for parent in spec.parent_refs.iter().filter(|p| p.is_service()) {
                let pns = parent.namespace.clone().unwrap_or_else(|| ns.clone());
                let result = match services.get(&(pns.clone(), parent.name.clone())) {
                    None => Err(Refusal {
                        condition: "Accepted",
                        reason: "NoMatchingParent",
                        message: format!("no Service {pns}/{} in the mesh", parent.name),
                    }),
                    Some(ports) => parent_routes(&src, &pns, parent, ports, clusters),
                };
                parents.push((parent.clone(), result.as_ref().err().cloned()));
                if let Ok(r) = result {
                    mine.push(r);
                }
            }
            let refused = parents.iter().any(|(_, r)| r.is_some());
            if !refused {
                routes.extend(mine.into_iter().flatten());
            }
            if !parents.is_empty() {
                let generation = obj.metadata.generation;
                statuses.push(RouteStatus {
                    kind,
                    namespace: ns,
                    name,
                    status: status_of(&parents, refused, generation),
                });
            }
        }
        routes.sort_by_key(precedence);
        (routes, statuses)
    }

    /// Writes each route's status where it changed (merge patch of `/status`).
    pub async fn write_statuses(&self, client: &kube::Client, statuses: Vec<RouteStatus>) {
        for s in statuses {
            let key = format!("{}/{}/{}", s.kind.prefix(), s.namespace, s.name);
            if self.written.lock().unwrap().get(&key) == Some(&s.status) {
                continue;
            }
            let api: kube::Api<DynamicObject> =
                kube::Api::namespaced_with(client.clone(), &s.namespace, &route_resource(s.kind));
            let mut body = s.status.clone();
            stamp(&mut body);
            let patch = json!({ "status": body });
            match api
                .patch_status(&s.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.written.lock().unwrap().insert(key, s.status);
                }
                Err(e) => {
                    tracing::warn!(route = key, error = %e, "mesh: cannot write the route's status")
                }
            }
        }
    }
}

/// `GET /v1/mesh/pods/{ns}/{name}`: what the mesh knows of a pod (for `spur explain`):
/// its group, address, service account identity and whether it has a sidecar.
pub fn pod_doc(control: &Control, ns: &str, name: &str) -> http::Response<crate::api::Body> {
    use http::StatusCode;
    let Some(mesh) = &control.mesh else {
        return crate::api::error(
            StatusCode::NOT_FOUND,
            "",
            "this control plane does not render a mesh: start it with --kubernetes --mesh",
        );
    };
    let pod = mesh.pods.state().into_iter().find(|p| {
        p.metadata.namespace.as_deref() == Some(ns) && p.metadata.name.as_deref() == Some(name)
    });
    let Some(pod) = pod else {
        return crate::api::error(StatusCode::NOT_FOUND, "pod", format!("no pod {ns}/{name}"));
    };
    crate::api::error_free(json!({
        "namespace": ns,
        "name": name,
        "group": render::group_of(&pod),
        "ip": pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
        "identity": render::identity(&pod, &mesh.trust_domain),
        "sidecar": render::meshed(&pod),
    }))
}

/// The routes of one parent Service (every port, or the one `parentRef.port` names).
fn parent_routes(
    src: &Source<'_>,
    ns: &str,
    parent: &gateway::ParentRef,
    ports: &[u16],
    clusters: &BTreeSet<String>,
) -> Result<Vec<Value>, Refusal> {
    let mut out = Vec::new();
    for port in ports
        .iter()
        .filter(|p| parent.port.is_none_or(|want| want == **p))
    {
        let cluster = gateway::cluster_name(&parent.name, ns, *port);
        for r in gateway::translate(src, &cluster, *port, clusters)? {
            // spur-config parses every value; what it refuses keeps the route out.
            if let Err(e) = serde_json::from_value::<spur_config::Route>(r.clone()) {
                return Err(Refusal {
                    condition: "Accepted",
                    reason: "UnsupportedValue",
                    message: format!("{e}"),
                });
            }
            out.push(r);
        }
    }
    Ok(out)
}

/// Gateway API precedence among routes for one destination: an exact path, then the
/// longest prefix, then more header matches, then a method; the object order otherwise.
fn precedence(r: &Value) -> (u8, std::cmp::Reverse<usize>, std::cmp::Reverse<usize>, u8) {
    let m = &r["match"];
    let exact = u8::from(m["path"].is_null() && m["grpc"]["method"].is_null());
    let prefix = m["path_prefix"]
        .as_str()
        .map_or(0, str::len)
        .max(m["grpc"]["service"].as_str().map_or(0, str::len));
    let headers = m["headers"].as_array().map_or(0, Vec::len);
    (
        exact,
        std::cmp::Reverse(prefix),
        std::cmp::Reverse(headers),
        u8::from(m["method"].is_null()),
    )
}

fn condition(kind: &str, ok: bool, reason: &str, message: &str, generation: Option<i64>) -> Value {
    json!({
        "type": kind,
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "observedGeneration": generation.unwrap_or(0),
    })
}

/// The route's `status` (without transition times: [`stamp`] adds them when written).
fn status_of(
    parents: &[(gateway::ParentRef, Option<Refusal>)],
    refused: bool,
    generation: Option<i64>,
) -> Value {
    let entries: Vec<Value> = parents
        .iter()
        .map(|(parent, refusal)| {
            let (accepted, resolved) = match refusal {
                None if refused => (
                    condition("Accepted", false, "UnsupportedValue", "another parent's part of this route cannot be honoured; the route is not applied", generation),
                    condition("ResolvedRefs", true, "ResolvedRefs", "", generation),
                ),
                None => (
                    condition("Accepted", true, "Accepted", "applied by Spur", generation),
                    condition("ResolvedRefs", true, "ResolvedRefs", "", generation),
                ),
                Some(r) if r.condition == "ResolvedRefs" => (
                    condition("Accepted", false, r.reason, &format!("not applied: {}", r.message), generation),
                    condition("ResolvedRefs", false, r.reason, &r.message, generation),
                ),
                Some(r) => (
                    condition("Accepted", false, r.reason, &format!("not applied: {}", r.message), generation),
                    condition("ResolvedRefs", true, "ResolvedRefs", "", generation),
                ),
            };
            json!({
                "parentRef": parent,
                "controllerName": CONTROLLER,
                "conditions": [accepted, resolved],
            })
        })
        .collect();
    json!({ "parents": entries })
}

/// Adds `lastTransitionTime` (required by the API) to every condition.
fn stamp(status: &mut Value) {
    let now = k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default();
    for p in status["parents"].as_array_mut().into_iter().flatten() {
        for c in p["conditions"].as_array_mut().into_iter().flatten() {
            c["lastTransitionTime"] = json!(now);
        }
    }
}

/// Whether a list failed because the resource does not exist (a CRD not installed).
fn not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s)) => s.code == 404,
        _ => false,
    }
}

/// Runs one watch into its store; sets `bit` in `listed` once it has listed (or the
/// resource does not exist), and notifies `changed` on every change.
async fn watch_into<K>(
    mesh: &Mesh,
    bit: u8,
    what: &'static str,
    api: kube::Api<K>,
    writer: Writer<K>,
    changed: &tokio::sync::Notify,
    errors: &prometheus_client::metrics::counter::Counter,
) where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let stream = watcher::watcher(api, watcher::Config::default())
        .modify(|o| o.meta_mut().managed_fields = None);
    let events = reflector::reflector(writer, stream).default_backoff();
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::InitDone) => {
                mesh.listed.fetch_or(bit, Ordering::AcqRel);
                changed.notify_one();
            }
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => changed.notify_one(),
            Ok(_) => {}
            Err(e) if not_found(&e) => {
                if mesh.listed.fetch_or(bit, Ordering::AcqRel) & bit == 0 {
                    tracing::warn!(
                        what,
                        "mesh: the API has no {what} (CRD not installed?); rendering without them"
                    );
                    changed.notify_one();
                }
            }
            Err(e) => {
                errors.inc();
                tracing::warn!(what, error = %e, "mesh: watch failed; keeping the last known objects, retrying with backoff");
            }
        }
    }
}

/// Watches Services, Pods, HTTPRoutes and GRPCRoutes for as long as the control plane
/// runs; each change renders the groups again (coalesced) and writes route statuses.
pub async fn run(control: Arc<Control>, client: kube::Client, writers: Writers) {
    let Some(mesh) = control.mesh.clone() else {
        return;
    };
    let changed = tokio::sync::Notify::new();
    let errors = &control.metrics.k8s_watch_errors;
    let Writers {
        services,
        pods,
        http,
        grpc,
    } = writers;
    let dyn_api =
        |kind| kube::Api::<DynamicObject>::all_with(client.clone(), &route_resource(kind));
    let watches = async {
        tokio::join!(
            watch_into(
                &mesh,
                0b0001,
                "services",
                kube::Api::all(client.clone()),
                services,
                &changed,
                errors
            ),
            watch_into(
                &mesh,
                0b0010,
                "pods",
                kube::Api::all(client.clone()),
                pods,
                &changed,
                errors
            ),
            watch_into(
                &mesh,
                0b0100,
                "httproutes",
                dyn_api(Kind::Http),
                http,
                &changed,
                errors
            ),
            watch_into(
                &mesh,
                0b1000,
                "grpcroutes",
                dyn_api(Kind::Grpc),
                grpc,
                &changed,
                errors
            ),
        );
    };
    let push = async {
        loop {
            changed.notified().await;
            tokio::time::sleep(COALESCE).await;
            if let Some(statuses) = control.refresh_mesh().await {
                mesh.write_statuses(&client, statuses).await;
            }
        }
    };
    tokio::select! {
        () = watches => tracing::error!("mesh: the watches ended; the mesh is no longer updated"),
        () = push => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_for_one_service_go_most_specific_first() {
        let r = |m: Value| json!({ "match": m });
        let mut routes = [
            r(json!({ "destination": "d" })),
            r(json!({ "destination": "d", "path_prefix": "/a" })),
            r(json!({ "destination": "d", "headers": [{ "name": "x", "value": "1" }] })),
            r(json!({ "destination": "d", "path_prefix": "/a/b" })),
            r(json!({ "destination": "d", "path": "/a" })),
        ];
        routes.sort_by_key(precedence);
        let order: Vec<String> = routes.iter().map(|r| r["match"].to_string()).collect();
        assert!(order[0].contains("\"path\":\"/a\""), "{order:?}");
        assert!(order[1].contains("/a/b"), "{order:?}");
        assert!(order[2].contains("\"path_prefix\":\"/a\""), "{order:?}");
        assert!(order[3].contains("headers"), "{order:?}");
    }

    #[test]
    fn statuses_say_accepted_or_why_not() {
        let parent = gateway::ParentRef {
            group: Some(String::new()),
            kind: Some("Service".into()),
            name: "web".into(),
            namespace: None,
            port: Some(80),
        };
        let ok = status_of(&[(parent.clone(), None)], false, Some(3));
        let conds = &ok["parents"][0]["conditions"];
        assert_eq!(conds[0]["type"], "Accepted");
        assert_eq!(conds[0]["status"], "True");
        assert_eq!(conds[0]["observedGeneration"], 3);
        assert_eq!(ok["parents"][0]["controllerName"], CONTROLLER);
        let missing = Refusal {
            condition: "ResolvedRefs",
            reason: "BackendNotFound",
            message: "backendRef t/x port 80: no such Service port in the mesh".into(),
        };
        let bad = status_of(&[(parent, Some(missing))], true, Some(3));
        let conds = &bad["parents"][0]["conditions"];
        assert_eq!(conds[0]["status"], "False");
        assert_eq!(conds[1]["type"], "ResolvedRefs");
        assert_eq!(conds[1]["reason"], "BackendNotFound");
        let mut stamped = bad.clone();
        stamp(&mut stamped);
        assert!(stamped["parents"][0]["conditions"][0]["lastTransitionTime"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));
    }
}
