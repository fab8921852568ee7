//! What injection does to one workload: find its pod template, decide whether to inject,
//! and add the two Spur containers.
//!
//! The proxy is added as a Kubernetes *native sidecar* (an init container with
//! `restartPolicy: Always`, on by default since Kubernetes 1.29) rather than as one more
//! entry of `containers`, because interception makes ordering matter:
//!
//! - **Start.** `spur-init` redirects every TCP connection of the pod to the proxy, so an
//!   application that starts before its proxy has a config cannot reach anything. The
//!   kubelet starts the application containers only once the sidecar's startup probe
//!   (`/ready`: first config applied, listeners bound) passes.
//! - **Stop.** The kubelet stops a native sidecar after the application containers have
//!   exited, so the proxy drains (SIGTERM: stop accepting, finish in-flight requests for
//!   `drain_timeout`) while nothing depends on it any more. This is why there is no
//!   `preStop` hook: the image has no shell to run `sleep` in, and none is needed. Keep
//!   the pod's `terminationGracePeriodSeconds` (default 30 s) above the application's
//!   own shutdown plus the proxy's `drain_timeout` (default 10 s).
//! - **Jobs.** A plain sidecar container never exits, so a Job would never complete; a
//!   native sidecar is stopped when the Job's containers finish.
//!
//! The sidecar runs with `--admin 0.0.0.0:<admin port>`, so the probes reach `/live` and
//! `/ready` on the pod IP from the start, before the first config arrives (group configs
//! leave `admin` out); `spur-init` leaves that port out of inbound interception, and the
//! pod template gets `prometheus.io/scrape`, `prometheus.io/port` and `prometheus.io/path`
//! annotations for it (unless it has its own). Pods on the host network are skipped: the
//! rules would rewrite the node's own traffic.
//!
//! **Meshed by default.** Unless `spur.dev/mtls: disabled` says otherwise, the sidecar
//! proves its service account to the mesh CA (see [`super::containers`]) and the group's
//! generated config ([`super::mesh`]) terminates mutual TLS inbound. The ports the
//! kubelet probes the app on bypass the proxy inbound: the kubelet has no mesh
//! certificate, and a probe refused by TLS would keep the pod from ever being ready.

use super::containers::{self, INIT, PROXY};
use super::Options;
use serde_yaml_ng::{Mapping, Value};

pub const INJECT: &str = "spur.dev/inject";
pub const MTLS: &str = "spur.dev/mtls";
pub const INJECTED: &str = "spur.dev/injected";
pub const INJECTED_VERSION: &str = "spur.dev/injected-version";
pub const SKIP_PORTS: &str = "spur.dev/skip-ports";

/// What happened to one workload.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Injected(Workload),
    Skipped(String),
}

/// What the generated config of an injected workload needs to know of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// `Deployment/echo`, for messages.
    pub label: String,
    pub group: String,
    /// `metadata.namespace` of the workload, else `default`.
    pub namespace: String,
    /// `spec.serviceAccountName` of the pod, else `default`.
    pub service_account: String,
    /// Whether its sidecar has a workload identity and speaks mTLS inbound.
    pub meshed: bool,
    /// The pod template's labels (what Services select).
    pub labels: Mapping,
    /// The containers' ports: name (if any) and number, in order.
    pub ports: Vec<(Option<String>, u16)>,
    /// Ports the kubelet probes, which bypass the proxy inbound.
    pub probe_ports: Vec<u16>,
}

/// Where a kind keeps its pod template, as mapping keys from the object's root; `None`
/// for kinds that have no pods (they pass through). The API group must match too, so a
/// custom resource that happens to be called `Deployment` is left alone.
pub fn template_path(api_version: Option<&str>, kind: &str) -> Option<&'static [&'static str]> {
    let group = api_version.map(|v| v.rsplit_once('/').map_or("", |(g, _)| g));
    let group_is = |want: &[&str]| group.is_none_or(|g| want.contains(&g));
    match kind {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet"
            if group_is(&["apps", "extensions"]) =>
        {
            Some(&["spec", "template"])
        }
        "Job" if group_is(&["batch"]) => Some(&["spec", "template"]),
        "CronJob" if group_is(&["batch"]) => Some(&["spec", "jobTemplate", "spec", "template"]),
        "Pod" if group_is(&[""]) => Some(&[]),
        _ => None,
    }
}

/// Injects the pod template found at `path` inside `obj` (a workload or a Pod).
pub fn inject(obj: &mut Mapping, path: &[&str], opts: &Options) -> Result<Outcome, String> {
    let meta = obj.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("Pod");
    let label = format!("{kind}/{}", name.as_deref().unwrap_or("(unnamed)"));
    let workload_annotations = annotations(obj.get("metadata"));
    if switched_off(&workload_annotations, INJECT, "metadata.annotations")? {
        return Ok(Outcome::Skipped(format!("{INJECT}: disabled")));
    }
    let workload_skip = workload_annotations.get(SKIP_PORTS).cloned();
    let workload_mtls_off = switched_off(&workload_annotations, MTLS, "metadata.annotations")?;

    let at = path.join(".");
    let field = |f: &str| {
        if at.is_empty() {
            f.to_string()
        } else {
            format!("{at}.{f}")
        }
    };
    let mut template = &mut *obj;
    for key in path {
        template = template
            .get_mut(*key)
            .and_then(Value::as_mapping_mut)
            .ok_or_else(|| format!("{at}: missing"))?;
    }
    let meta = annotations(template.get("metadata"));
    if switched_off(&meta, INJECT, &field("metadata.annotations"))? {
        return Ok(Outcome::Skipped(format!("{INJECT}: disabled")));
    }
    if meta.get(INJECTED).is_some_and(|v| v == "true") {
        return Ok(Outcome::Skipped("already injected".into()));
    }
    // The pod template's annotations win over the workload's.
    let skip_ports = match meta.get(SKIP_PORTS) {
        Some(v) => parse_ports(v, &field("metadata.annotations"))?,
        None => match &workload_skip {
            Some(v) => parse_ports(v, "metadata.annotations")?,
            None => vec![],
        },
    };
    let meshed = match meta.get(MTLS) {
        Some(_) => !switched_off(&meta, MTLS, &field("metadata.annotations"))?,
        None => !workload_mtls_off,
    };
    let group = group(template, name.as_deref())?;
    let labels = template
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_mapping)
        .cloned()
        .unwrap_or_default();

    let spec = template
        .get_mut("spec")
        .and_then(Value::as_mapping_mut)
        .ok_or_else(|| format!("{}: missing", field("spec")))?;
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::Skipped(
            "hostNetwork: the rules would redirect the node's own traffic".into(),
        ));
    }
    check_containers(spec, &field)?;
    let service_account = ["serviceAccountName", "serviceAccount"]
        .iter()
        .find_map(|k| spec.get(*k)?.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
        .to_string();
    let ports = container_ports(spec);
    let probe_ports = if meshed {
        probe_ports(spec, &ports)
    } else {
        Vec::new()
    };
    add_containers(
        spec,
        opts,
        &group,
        &skip_ports,
        &probe_ports,
        meshed,
        &field,
    )?;

    let metadata = ensure_before(template, "metadata", "spec", Value::Mapping(Mapping::new()))
        .as_mapping_mut()
        .ok_or_else(|| format!("{}: not a mapping", field("metadata")))?;
    let annotations = ensure_before(metadata, "annotations", "", Value::Mapping(Mapping::new()))
        .as_mapping_mut()
        .ok_or_else(|| format!("{}: not a mapping", field("metadata.annotations")))?;
    annotations.insert(INJECTED.into(), "true".into());
    annotations.insert(INJECTED_VERSION.into(), env!("CARGO_PKG_VERSION").into());
    // Prometheus' usual pod annotations, for the sidecar's admin port, unless the app has
    // claimed them for its own metrics.
    if !annotations.contains_key("prometheus.io/scrape") {
        annotations.insert("prometheus.io/scrape".into(), "true".into());
        annotations.insert(
            "prometheus.io/port".into(),
            opts.admin_port.to_string().into(),
        );
        annotations.insert("prometheus.io/path".into(), "/metrics".into());
    }
    Ok(Outcome::Injected(Workload {
        label,
        group,
        namespace,
        service_account,
        meshed,
        labels,
        ports,
        probe_ports,
    }))
}

/// The pod must have containers, and none of Spur's names unless it says it is injected.
fn check_containers(spec: &Mapping, field: &dyn Fn(&str) -> String) -> Result<(), String> {
    if spec
        .get("containers")
        .and_then(Value::as_sequence)
        .is_none_or(Vec::is_empty)
    {
        return Err(format!("{}: missing or empty", field("spec.containers")));
    }
    for list in ["containers", "initContainers"] {
        let names = spec.get(list).and_then(Value::as_sequence);
        for c in names.into_iter().flatten() {
            if let Some(n) = c.get("name").and_then(Value::as_str) {
                if n == PROXY || n == INIT {
                    return Err(format!(
                        "{}: already has a container named `{n}` but no `{INJECTED}: \"true\"` annotation; remove it or add the annotation",
                        field(&format!("spec.{list}"))
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Adds the two containers (first among the init containers) and the sidecar's volumes.
fn add_containers(
    spec: &mut Mapping,
    opts: &Options,
    group: &str,
    skip_ports: &[u16],
    probe_ports: &[u16],
    meshed: bool,
    field: &dyn Fn(&str) -> String,
) -> Result<(), String> {
    let mounts = containers::mounts(opts, meshed);
    if let Some(Value::Sequence(existing)) = spec.get("volumes") {
        for v in existing {
            if let Some(n) = v.get("name").and_then(Value::as_str) {
                if mounts.iter().any(|s| s.volume == n) {
                    return Err(format!(
                        "{}: already has a volume named `{n}`",
                        field("spec.volumes")
                    ));
                }
            }
        }
    }
    let init = ensure_before(
        spec,
        "initContainers",
        "containers",
        Value::Sequence(vec![]),
    );
    let Value::Sequence(init) = init else {
        return Err(format!("{}: not a list", field("spec.initContainers")));
    };
    init.splice(
        0..0,
        [
            containers::init_container(opts, skip_ports, probe_ports),
            containers::proxy_container(opts, group, &mounts),
        ],
    );
    if !mounts.is_empty() {
        let volumes = spec
            .entry("volumes".into())
            .or_insert_with(|| Value::Sequence(vec![]));
        let Value::Sequence(volumes) = volumes else {
            return Err(format!("{}: not a list", field("spec.volumes")));
        };
        volumes.extend(mounts.iter().map(containers::Mount::volume));
    }
    Ok(())
}

/// Every container's ports (TCP; UDP and SCTP are never intercepted), in order.
fn container_ports(spec: &Mapping) -> Vec<(Option<String>, u16)> {
    let containers = spec.get("containers").and_then(Value::as_sequence);
    let mut out = Vec::new();
    for c in containers.into_iter().flatten() {
        for p in c
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let tcp = p
                .get("protocol")
                .and_then(Value::as_str)
                .is_none_or(|proto| proto == "TCP");
            let number = p
                .get("containerPort")
                .and_then(Value::as_u64)
                .and_then(|n| u16::try_from(n).ok());
            if let (true, Some(n)) = (tcp, number) {
                let name = p.get("name").and_then(Value::as_str).map(str::to_owned);
                out.push((name, n));
            }
        }
    }
    out
}

/// The ports of the containers' liveness, readiness and startup probes (`httpGet`,
/// `tcpSocket`, `grpc`), named ports resolved, sorted and distinct.
fn probe_ports(spec: &Mapping, ports: &[(Option<String>, u16)]) -> Vec<u16> {
    let containers = spec.get("containers").and_then(Value::as_sequence);
    let mut out = Vec::new();
    for c in containers.into_iter().flatten() {
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let Some(p) = c.get(probe) else { continue };
            for kind in ["httpGet", "tcpSocket", "grpc"] {
                let port = p.get(kind).and_then(|k| k.get("port"));
                let number = match port {
                    Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                    Some(Value::String(s)) => s.parse().ok().or_else(|| {
                        ports
                            .iter()
                            .find(|(name, _)| name.as_deref() == Some(s.as_str()))
                            .map(|(_, n)| *n)
                    }),
                    _ => None,
                };
                out.extend(number);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The value at `key`, inserted first if missing: just before `before` (where a person
/// would write it: `metadata` above `spec`, `initContainers` above `containers`). A key
/// written with no value (`annotations:`) is null, and takes `value` too.
fn ensure_before<'m>(map: &'m mut Mapping, key: &str, before: &str, value: Value) -> &'m mut Value {
    if let Some(v @ Value::Null) = map.get_mut(key) {
        *v = value;
    } else if !map.contains_key(key) {
        let mut old = std::mem::take(map).into_iter().peekable();
        while let Some((k, v)) = old.next_if(|(k, _)| k.as_str() != Some(before)) {
            map.insert(k, v);
        }
        map.insert(key.into(), value);
        map.extend(old);
    }
    map.get_mut(key).expect("inserted above")
}

/// The string annotations of a `metadata` mapping (others are ignored).
fn annotations(metadata: Option<&Value>) -> Mapping {
    metadata
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_mapping)
        .cloned()
        .unwrap_or_default()
}

/// `spur.dev/inject` or `spur.dev/mtls`: `disabled` opts out, `enabled` (or no
/// annotation) opts in. Anything else is an error rather than a guess: a typo must not
/// mesh (or unmesh) a workload silently.
fn switched_off(annotations: &Mapping, key: &str, at: &str) -> Result<bool, String> {
    match annotations.get(key) {
        None => Ok(false),
        Some(v) => match v.as_str() {
            Some("disabled") => Ok(true),
            Some("enabled") => Ok(false),
            _ => Err(format!(
                "{at}.{key}: {} is not `enabled` or `disabled`",
                describe(v)
            )),
        },
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("`{s}`"),
        other => format!(
            "`{}`",
            serde_yaml_ng::to_string(other).unwrap_or_default().trim()
        ),
    }
}

/// `spur.dev/skip-ports: "5432, 6379"`: ports whose traffic bypasses the proxy both ways.
fn parse_ports(value: &Value, at: &str) -> Result<Vec<u16>, String> {
    let text = value.as_str().ok_or_else(|| {
        format!(
            "{at}.{SKIP_PORTS}: {} must be a quoted string like \"5432,6379\"",
            describe(value)
        )
    })?;
    crate::iptables::parse_port_list(text).map_err(|e| format!("{at}.{SKIP_PORTS}: {e}"))
}

/// The proxy's `--group`: the pod's `app` label, else `app.kubernetes.io/name`, else the
/// workload's name. Proxies of one group share one config on the control plane.
fn group(template: &Mapping, workload: Option<&str>) -> Result<String, String> {
    let labels = template
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_mapping);
    ["app", "app.kubernetes.io/name"]
        .iter()
        .find_map(|k| labels?.get(*k)?.as_str())
        .or(workload)
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| {
            "cannot choose the proxy's group: give the pod template an `app` label".into()
        })
}

/// Builds a mapping from `(key, value)` pairs, in order.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_paths_follow_kind_and_group() {
        assert_eq!(
            template_path(Some("apps/v1"), "Deployment"),
            Some(&["spec", "template"][..])
        );
        assert_eq!(
            template_path(Some("batch/v1"), "CronJob").map(|p| p.len()),
            Some(4)
        );
        assert_eq!(template_path(Some("v1"), "Pod"), Some(&[][..] as &[&str]));
        for kind in ["StatefulSet", "DaemonSet", "ReplicaSet"] {
            assert_eq!(
                template_path(Some("apps/v1"), kind),
                Some(&["spec", "template"][..])
            );
        }
        assert_eq!(template_path(Some("example.com/v1"), "Deployment"), None);
        assert_eq!(template_path(Some("v1"), "Service"), None);
        assert_eq!(template_path(None, "Job"), Some(&["spec", "template"][..]));
    }

    #[test]
    fn group_prefers_app_then_app_kubernetes_io_name_then_name() {
        let t = |y: &str| serde_yaml_ng::from_str::<Mapping>(y).unwrap();
        let both = t("metadata: {labels: {app: a, app.kubernetes.io/name: b}}");
        assert_eq!(group(&both, Some("w")).unwrap(), "a");
        let name = t("metadata: {labels: {app.kubernetes.io/name: b}}");
        assert_eq!(group(&name, Some("w")).unwrap(), "b");
        assert_eq!(group(&t("spec: {}"), Some("w")).unwrap(), "w");
        assert!(group(&t("spec: {}"), None)
            .unwrap_err()
            .contains("`app` label"));
    }

    #[test]
    fn empty_keys_are_filled_in_place_and_missing_ones_placed_before_their_neighbour() {
        let opts = super::super::tests::options();
        let mut pod: Mapping = serde_yaml_ng::from_str(
            "kind: Pod\nmetadata:\n  name: p\n  annotations:\nspec:\n  initContainers:\n  containers: [{name: a}]\n",
        )
        .unwrap();
        assert!(matches!(
            inject(&mut pod, &[], &opts).unwrap(),
            Outcome::Injected(_)
        ));
        assert_eq!(pod["metadata"]["annotations"]["spur.dev/injected"], "true");
        assert_eq!(
            pod["spec"]["initContainers"].as_sequence().unwrap().len(),
            2
        );

        let mut job: Mapping = serde_yaml_ng::from_str(
            "metadata: {name: j}\nspec:\n  template:\n    spec:\n      restartPolicy: Never\n      containers: [{name: a}]\n",
        )
        .unwrap();
        inject(&mut job, &["spec", "template"], &opts).unwrap();
        let template = job["spec"]["template"].as_mapping().unwrap();
        let keys: Vec<_> = template.keys().filter_map(Value::as_str).collect();
        assert_eq!(keys, ["metadata", "spec"]);
        let spec = template["spec"].as_mapping().unwrap();
        let keys: Vec<_> = spec.keys().filter_map(Value::as_str).collect();
        assert_eq!(
            keys,
            ["restartPolicy", "initContainers", "containers", "volumes"]
        );
    }

    #[test]
    fn an_unknown_inject_value_is_an_error() {
        let a = serde_yaml_ng::from_str::<Mapping>("spur.dev/inject: disable").unwrap();
        let e = switched_off(&a, INJECT, "metadata.annotations").unwrap_err();
        assert!(
            e.contains("`disable` is not `enabled` or `disabled`"),
            "{e}"
        );
    }
}
