//! Kubernetes discovery (`spur control --kubernetes`): the ready endpoints of the Services
//! that `k8s:` clusters name, read from their EndpointSlices (discovery.k8s.io/v1).
//!
//! - One cluster-wide watch of every EndpointSlice that belongs to a Service (label
//!   `kubernetes.io/service-name`), through kube's `watcher` and `reflector`: a full list,
//!   then a watch from its resourceVersion; errors back off (kube's default: 0.8 s doubling
//!   to 30 s, with jitter) and the in-memory store keeps the last known slices meanwhile.
//!   Each error is logged and counted in `spur_control_k8s_watch_errors_total`.
//! - A `k8s: name.namespace:port` cluster's endpoints are the ready endpoints of the
//!   slices of Service `name` in `namespace` ([`ready_endpoints`] says exactly which).
//! - What the user wrote is stored as is; each stored version also records the endpoints it
//!   was made with ([`crate::store::Stored::discovered`]), and what proxies receive is
//!   [`render`]ed from the two: `k8s` clusters become plain `endpoints` lists. When the
//!   endpoints of a group's targets change, the group gets a new version with the same user
//!   config and the new endpoints ([`crate::Control::refresh_discovery`]), so proxies take
//!   it like any other push and report it like any other version.

use crate::Control;
use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::{watcher, WatchStreamExt};
use spur_config::{Config, EndpointSpec, K8sTarget};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_LABEL: &str = "kubernetes.io/service-name";

/// Changes that arrive within this long of each other make one version (a rollout moves
/// many endpoints one event at a time).
const COALESCE: Duration = Duration::from_millis(100);

/// The endpoints a version was made with: per target (`name.namespace:port`, as
/// [`K8sTarget`] prints it), the ready endpoints as `ip:port`, sorted.
pub type Discovered = BTreeMap<String, Vec<String>>;

/// `spur control --kubernetes [--kubeconfig PATH]`.
#[derive(Clone, Debug, Default)]
pub struct KubernetesOptions {
    /// Without it: `KUBECONFIG` or `~/.kube/config`, else the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
}

/// A client for the Kubernetes API from a kubeconfig file, or inferred as kube does it.
pub async fn client(opts: &KubernetesOptions) -> Result<kube::Client, String> {
    let config = match &opts.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("--kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| format!("--kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            format!(
                "--kubernetes: no Kubernetes API configuration found (neither a kubeconfig \
                 from KUBECONFIG or ~/.kube/config, nor an in-cluster service account): {e}"
            )
        })?,
    };
    kube::Client::try_from(config).map_err(|e| format!("--kubernetes: cannot make a client: {e}"))
}

/// The targets of a config's `k8s:` clusters (those that parse: validation refuses others).
pub fn targets(cfg: &Config) -> BTreeSet<K8sTarget> {
    cfg.clusters
        .iter()
        .filter_map(|c| c.k8s.as_deref().cloned())
        .collect()
}

/// What a proxy receives: `cfg` with each `k8s:` cluster turned into an `endpoints` list of
/// its discovered endpoints (empty when none is ready, or none is known yet). Every other
/// field is left as the user wrote it.
pub fn render(cfg: &Config, discovered: &Discovered) -> Config {
    let mut out = cfg.clone();
    for c in &mut out.clusters {
        if let Some(k8s) = c.k8s.take() {
            // Discovered endpoints are written from socket addresses (`ready_endpoints`),
            // so each reads back as one.
            c.endpoints = discovered
                .get(&k8s.get().to_string())
                .map(|eps| {
                    eps.iter()
                        .filter_map(|e| e.parse().ok())
                        .map(EndpointSpec::Address)
                        .collect()
                })
                .unwrap_or_default();
        }
    }
    out
}

/// Which of a slice's ports a target means: the TCP port whose number is the target's port;
/// else, when the slice has exactly one TCP port, that one. EndpointSlices list the ports the
/// pods serve on (a Service's `targetPort`, resolved), so `checkout.shop:8080` names the
/// pods' port 8080; for a single-port Service any number works, the Service's own port
/// (`checkout.shop:80`) included. With several ports and none of that number: none.
fn slice_port(slice: &EndpointSlice, wanted: u16) -> Option<u16> {
    let tcp: Vec<u16> = slice
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| u16::try_from(p.port?).ok())
        .filter(|p| *p > 0)
        .collect();
    if tcp.contains(&wanted) {
        Some(wanted)
    } else if let [only] = tcp[..] {
        Some(only)
    } else {
        None
    }
}

fn belongs(slice: &EndpointSlice, target: &K8sTarget) -> bool {
    slice.metadata.namespace.as_deref() == Some(target.namespace.as_str())
        && slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_LABEL))
            .is_some_and(|name| *name == target.name)
}

/// The ready endpoints of `target` among `slices`, as sorted, distinct `ip:port` strings.
///
/// A slice counts when its namespace is the target's and its `kubernetes.io/service-name`
/// label is the target's name, and its `addressType` is `IPv4` or `IPv6` (`FQDN` slices
/// name hosts, not addresses: skipped). An endpoint counts when `conditions.ready` is true
/// or absent (Kubernetes: nil means ready); terminating endpoints are not ready. Its first
/// address stands for it (the API says an endpoint's addresses are fungible). The port is
/// chosen per slice as [`slice_port`] says. An endpoint listed by two slices (they overlap
/// while the EndpointSlice controller moves endpoints) counts once.
pub fn ready_endpoints<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    target: &K8sTarget,
) -> Vec<String> {
    let mut out = BTreeSet::new();
    for slice in slices {
        if !belongs(slice, target) || !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let Some(port) = slice_port(slice, target.port) else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let ip = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok());
            if let (true, Some(ip)) = (ready, ip) {
                out.insert(SocketAddr::new(ip, port));
            }
        }
    }
    out.into_iter().map(|a| a.to_string()).collect()
}

/// A one-line history note for a discovery version: `discovery: web.shop:8080 2 -> 3
/// endpoints; ...`.
pub fn describe_change(old: &Discovered, new: &Discovered) -> String {
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let changes: Vec<String> = keys
        .into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| {
            let count = |d: &Discovered| d.get(k).map_or(0, Vec::len);
            match (old.contains_key(k), new.contains_key(k)) {
                (false, _) => format!("{k} {} endpoint(s)", count(new)),
                (true, false) => format!("{k} no longer used"),
                (true, true) => format!("{k} {} -> {} endpoint(s)", count(old), count(new)),
            }
        })
        .collect();
    format!("discovery: {}", changes.join("; "))
}

/// The watched EndpointSlices, as kube's reflector keeps them.
pub struct Discovery {
    reader: reflector::Store<EndpointSlice>,
    /// Set once the first complete list has arrived: before it, "no slices" means "not
    /// known yet", never "no endpoints".
    synced: AtomicBool,
}

impl Discovery {
    /// A discovery fed by the returned writer (see [`run`]).
    pub fn new() -> (Discovery, Writer<EndpointSlice>) {
        let (reader, writer) = reflector::store();
        let d = Discovery {
            reader,
            synced: AtomicBool::new(false),
        };
        (d, writer)
    }

    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Every watched slice as it is now.
    pub fn slices(&self) -> Vec<Arc<EndpointSlice>> {
        self.reader.state()
    }

    /// The slices as they are now, by Service; `None` until the first list is complete.
    pub fn snapshot(&self) -> Option<Slices> {
        if !self.synced() {
            return None;
        }
        let mut by_service: HashMap<(String, String), Vec<Arc<EndpointSlice>>> = HashMap::new();
        for slice in self.reader.state() {
            let ns = slice.metadata.namespace.clone().unwrap_or_default();
            let Some(name) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_LABEL))
            else {
                continue;
            };
            by_service
                .entry((ns, name.clone()))
                .or_default()
                .push(slice.clone());
        }
        Some(Slices(by_service))
    }

    /// [`Slices::lookup`] on the slices as they are now; `None` before the first list.
    pub fn lookup(&self, targets: &BTreeSet<K8sTarget>) -> Option<Discovered> {
        if targets.is_empty() {
            return self.synced().then(Discovered::new);
        }
        Some(self.snapshot()?.lookup(targets))
    }
}

/// EndpointSlices by (namespace, Service name).
pub struct Slices(HashMap<(String, String), Vec<Arc<EndpointSlice>>>);

impl Slices {
    /// Each target's ready endpoints, every target present (an empty list for a Service
    /// with none).
    pub fn lookup(&self, targets: &BTreeSet<K8sTarget>) -> Discovered {
        targets
            .iter()
            .map(|t| {
                let slices = self
                    .0
                    .get(&(t.namespace.clone(), t.name.clone()))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                (
                    t.to_string(),
                    ready_endpoints(slices.iter().map(|s| &**s), t),
                )
            })
            .collect()
    }
}

/// Whether the API refused the control plane's ServiceAccount (RBAC).
fn forbidden(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => {
            matches!(e, kube::Error::Api(status) if status.is_forbidden())
        }
        watcher::Error::WatchError(status) => status.is_forbidden(),
        watcher::Error::NoResourceVersion => false,
    }
}

/// Watches EndpointSlices for as long as the control plane runs, and makes a new version of
/// every group whose discovered endpoints changed.
pub async fn run(control: Arc<Control>, client: kube::Client, writer: Writer<EndpointSlice>) {
    let Some(discovery) = control.discovery.clone() else {
        return;
    };
    let changed = tokio::sync::Notify::new();
    let api: kube::Api<EndpointSlice> = kube::Api::all(client.clone());
    let config = watcher::Config::default().labels(SERVICE_LABEL);
    // managedFields (server-side apply bookkeeping) is most of a slice's size and of no use
    // here: dropped before the store keeps the slice.
    let slices = watcher::watcher(api, config).modify(|s| s.metadata.managed_fields = None);
    let events = reflector::reflector(writer, slices).default_backoff();
    let watch = async {
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::InitDone) => {
                    if !discovery.synced.swap(true, Ordering::AcqRel) {
                        tracing::info!(
                            slices = discovery.reader.len(),
                            "Kubernetes discovery: EndpointSlices listed, now watching"
                        );
                    }
                    control.metrics.k8s_synced.set(1);
                    changed.notify_one();
                }
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => changed.notify_one(),
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Err(e) => {
                    control.metrics.k8s_watch_errors.inc();
                    if forbidden(&e) {
                        tracing::error!(error = %e, "Kubernetes discovery: forbidden; the control plane's ServiceAccount needs get, list and watch on endpointslices (discovery.k8s.io), see deploy/control-plane.yaml; keeping the last known endpoints, retrying with backoff");
                    } else {
                        tracing::warn!(error = %e, "Kubernetes discovery: EndpointSlice watch failed; keeping the last known endpoints, retrying with backoff");
                    }
                }
            }
        }
    };
    let push = async {
        loop {
            changed.notified().await;
            tokio::time::sleep(COALESCE).await;
            control.refresh_discovery().await;
            // Endpoints are part of the rendered mesh too (`--mesh`).
            if let (Some(statuses), Some(mesh)) = (control.refresh_mesh().await, &control.mesh) {
                mesh.write_statuses(&client, statuses).await;
            }
        }
    };
    tokio::select! {
        () = watch => tracing::error!("Kubernetes discovery: the watch ended; endpoints are no longer updated"),
        () = push => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).expect("an EndpointSlice")
    }

    fn web(port: u16) -> K8sTarget {
        format!("web.shop:{port}").parse().unwrap()
    }

    /// A slice of Service `svc` in `ns` in the API's JSON shape.
    fn of(
        ns: &str,
        svc: &str,
        ports: serde_json::Value,
        endpoints: serde_json::Value,
    ) -> EndpointSlice {
        slice(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{svc}-abcde"),
                "namespace": ns,
                "labels": { "kubernetes.io/service-name": svc },
                "resourceVersion": "7"
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports
        }))
    }

    #[test]
    fn ready_true_or_absent_counts_and_false_does_not() {
        let s = of(
            "shop",
            "web",
            json!([{ "name": "http", "port": 8080, "protocol": "TCP" }]),
            json!([
                { "addresses": ["10.0.0.1"], "conditions": { "ready": true } },
                { "addresses": ["10.0.0.2"], "conditions": { "ready": false, "serving": true, "terminating": true } },
                { "addresses": ["10.0.0.3"], "conditions": {} },
                { "addresses": ["10.0.0.4"] },
                { "addresses": ["10.0.0.5", "10.0.0.6"], "conditions": { "ready": true } }
            ]),
        );
        assert_eq!(
            ready_endpoints([&s], &web(8080)),
            vec![
                "10.0.0.1:8080",
                "10.0.0.3:8080",
                "10.0.0.4:8080",
                "10.0.0.5:8080"
            ]
        );
    }

    #[test]
    fn the_port_is_matched_by_number_or_is_the_only_one() {
        let two = of(
            "shop",
            "web",
            json!([{ "name": "http", "port": 8080 }, { "name": "admin", "port": 9090, "protocol": "TCP" }]),
            json!([{ "addresses": ["10.0.0.1"] }]),
        );
        assert_eq!(ready_endpoints([&two], &web(9090)), vec!["10.0.0.1:9090"]);
        assert_eq!(ready_endpoints([&two], &web(8080)), vec!["10.0.0.1:8080"]);
        assert!(
            ready_endpoints([&two], &web(80)).is_empty(),
            "several ports, none is 80"
        );

        // One port: the Service's own port (80, target port 8080) finds it too.
        let one = of(
            "shop",
            "web",
            json!([{ "name": "http", "port": 8080, "protocol": "TCP" }]),
            json!([{ "addresses": ["10.0.0.1"] }]),
        );
        assert_eq!(ready_endpoints([&one], &web(80)), vec!["10.0.0.1:8080"]);

        // UDP ports are not Spur's: a DNS Service's 53/UDP beside 53/TCP, and a UDP-only one.
        let udp = of(
            "shop",
            "web",
            json!([{ "name": "dns", "port": 53, "protocol": "UDP" }, { "name": "dns-tcp", "port": 53, "protocol": "TCP" }]),
            json!([{ "addresses": ["10.0.0.1"] }]),
        );
        assert_eq!(ready_endpoints([&udp], &web(54)), vec!["10.0.0.1:53"]);
        let udp_only = of(
            "shop",
            "web",
            json!([{ "name": "dns", "port": 53, "protocol": "UDP" }]),
            json!([{ "addresses": ["10.0.0.1"] }]),
        );
        assert!(ready_endpoints([&udp_only], &web(53)).is_empty());
        let no_ports = of(
            "shop",
            "web",
            json!(null),
            json!([{ "addresses": ["10.0.0.1"] }]),
        );
        assert!(ready_endpoints([&no_ports], &web(80)).is_empty());
    }

    #[test]
    fn only_the_services_slices_count_and_overlaps_count_once() {
        let ports = json!([{ "port": 8080 }]);
        let a = of(
            "shop",
            "web",
            ports.clone(),
            json!([{ "addresses": ["10.0.0.2"] }, { "addresses": ["10.0.0.1"] }]),
        );
        let b = of(
            "shop",
            "web",
            ports.clone(),
            json!([{ "addresses": ["10.0.0.1"] }, { "addresses": ["10.0.0.3"] }]),
        );
        let other_ns = of(
            "prod",
            "web",
            ports.clone(),
            json!([{ "addresses": ["10.9.0.1"] }]),
        );
        let other_svc = of(
            "shop",
            "api",
            ports.clone(),
            json!([{ "addresses": ["10.9.0.2"] }]),
        );
        let mut unlabelled = of(
            "shop",
            "web",
            ports.clone(),
            json!([{ "addresses": ["10.9.0.3"] }]),
        );
        unlabelled.metadata.labels = None;
        let mut fqdn = of(
            "shop",
            "web",
            ports,
            json!([{ "addresses": ["web.example.com"] }]),
        );
        fqdn.address_type = "FQDN".into();
        assert_eq!(
            ready_endpoints(
                [&a, &b, &other_ns, &other_svc, &unlabelled, &fqdn],
                &web(8080)
            ),
            vec!["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]
        );
    }

    #[test]
    fn ipv6_endpoints_are_bracketed() {
        let mut s = of(
            "shop",
            "web",
            json!([{ "port": 8080 }]),
            json!([{ "addresses": ["fd00::1"] }, { "addresses": ["not-an-ip"] }]),
        );
        s.address_type = "IPv6".into();
        assert_eq!(ready_endpoints([&s], &web(8080)), vec!["[fd00::1]:8080"]);
    }

    #[test]
    fn render_turns_k8s_clusters_into_endpoint_lists_and_keeps_the_rest() {
        let cfg = spur_config::parse(
            r#"
listeners: [{ name: web, listen: "127.0.0.1:0", cluster: web }]
clusters:
  - { name: web, k8s: "web.shop:8080", lb: round_robin }
  - { name: empty, k8s: "api.shop:80" }
  - { name: static, endpoints: ["127.0.0.1:1"] }
"#,
            spur_config::Format::Yaml,
        )
        .unwrap();
        let discovered: Discovered = [(
            "web.shop:8080".to_string(),
            vec!["10.0.0.1:8080".to_string(), "10.0.0.2:8080".to_string()],
        )]
        .into();
        let out = render(&cfg, &discovered);
        assert_eq!(out.clusters[0].k8s, None);
        assert_eq!(
            out.clusters[0].endpoints,
            vec![
                EndpointSpec::Address("10.0.0.1:8080".parse().unwrap()),
                EndpointSpec::Address("10.0.0.2:8080".parse().unwrap())
            ]
        );
        assert_eq!(out.clusters[0].lb, spur_config::LbPolicy::RoundRobin);
        assert!(out.clusters[1].endpoints.is_empty() && out.clusters[1].k8s.is_none());
        assert_eq!(out.clusters[2], cfg.clusters[2]);
        // What a proxy checks a pushed config with: valid, the empty cluster included.
        let pushed = spur_config::Rules {
            rendered: true,
            ..Default::default()
        };
        assert_eq!(spur_config::validate_with(&out, pushed), Ok(()));
        assert!(
            spur_config::validate(&out).is_err(),
            "users cannot write an empty cluster"
        );
        assert_eq!(
            targets(&cfg)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            vec!["api.shop:80", "web.shop:8080"]
        );
    }

    #[test]
    fn history_notes_say_what_changed() {
        let d = |pairs: &[(&str, usize)]| -> Discovered {
            pairs
                .iter()
                .map(|(k, n)| {
                    (
                        k.to_string(),
                        (0..*n).map(|i| format!("10.0.0.{i}:80")).collect(),
                    )
                })
                .collect()
        };
        assert_eq!(
            describe_change(
                &d(&[("a.ns:80", 2), ("b.ns:80", 1)]),
                &d(&[("a.ns:80", 3), ("b.ns:80", 1), ("c.ns:80", 0)])
            ),
            "discovery: a.ns:80 2 -> 3 endpoint(s); c.ns:80 0 endpoint(s)"
        );
        assert_eq!(
            describe_change(&d(&[("a.ns:80", 2)]), &d(&[])),
            "discovery: a.ns:80 no longer used"
        );
    }

    #[test]
    fn nothing_is_known_before_the_first_list() {
        let (d, _writer) = Discovery::new();
        let t: BTreeSet<K8sTarget> = [web(8080)].into();
        assert_eq!(d.lookup(&t), None);
        d.synced.store(true, Ordering::Release);
        assert_eq!(
            d.lookup(&t),
            Some([("web.shop:8080".to_string(), vec![])].into())
        );
    }
}
