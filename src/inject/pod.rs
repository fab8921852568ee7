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
//! leave `admin` out); `spur-init` leaves that port out of inbound interception. Pods on the host network are skipped: the rules would rewrite the node's
//! own traffic.

use super::Options;
use serde_yaml_ng::{Mapping, Value};

pub const INJECT: &str = "spur.dev/inject";
pub const INJECTED: &str = "spur.dev/injected";
pub const INJECTED_VERSION: &str = "spur.dev/injected-version";
pub const SKIP_PORTS: &str = "spur.dev/skip-ports";
pub const PROXY: &str = "spur-proxy";
pub const INIT: &str = "spur-init";

/// What happened to one workload.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Injected,
    Skipped(String),
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
    let name = obj
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let workload_annotations = annotations(obj.get("metadata"));
    if opted_out(&workload_annotations, "metadata.annotations")? {
        return Ok(Outcome::Skipped(format!("{INJECT}: disabled")));
    }
    let workload_skip = workload_annotations.get(SKIP_PORTS).cloned();

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
    if opted_out(&meta, &field("metadata.annotations"))? {
        return Ok(Outcome::Skipped(format!("{INJECT}: disabled")));
    }
    if meta.get(INJECTED).is_some_and(|v| v == "true") {
        return Ok(Outcome::Skipped("already injected".into()));
    }
    // The pod template's annotation wins over the workload's.
    let skip_ports = match meta.get(SKIP_PORTS) {
        Some(v) => parse_ports(v, &field("metadata.annotations"))?,
        None => match &workload_skip {
            Some(v) => parse_ports(v, "metadata.annotations")?,
            None => vec![],
        },
    };
    let group = group(template, name.as_deref())?;

    let spec = template
        .get_mut("spec")
        .and_then(Value::as_mapping_mut)
        .ok_or_else(|| format!("{}: missing", field("spec")))?;
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::Skipped(
            "hostNetwork: the rules would redirect the node's own traffic".into(),
        ));
    }
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
            init_container(opts, &skip_ports),
            proxy_container(opts, &group),
        ],
    );
    let secrets = secret_mounts(opts);
    if !secrets.is_empty() {
        if let Some(Value::Sequence(existing)) = spec.get("volumes") {
            for v in existing {
                if let Some(n) = v.get("name").and_then(Value::as_str) {
                    if secrets.iter().any(|s| s.volume == n) {
                        return Err(format!(
                            "{}: already has a volume named `{n}`",
                            field("spec.volumes")
                        ));
                    }
                }
            }
        }
        let volumes = spec
            .entry("volumes".into())
            .or_insert_with(|| Value::Sequence(vec![]));
        let Value::Sequence(volumes) = volumes else {
            return Err(format!("{}: not a list", field("spec.volumes")));
        };
        for s in &secrets {
            volumes.push(map([
                ("name", s.volume.into()),
                ("secret", map([("secretName", s.secret.as_str().into())])),
            ]));
        }
    }

    let metadata = ensure_before(template, "metadata", "spec", Value::Mapping(Mapping::new()))
        .as_mapping_mut()
        .ok_or_else(|| format!("{}: not a mapping", field("metadata")))?;
    let annotations = ensure_before(metadata, "annotations", "", Value::Mapping(Mapping::new()))
        .as_mapping_mut()
        .ok_or_else(|| format!("{}: not a mapping", field("metadata.annotations")))?;
    annotations.insert(INJECTED.into(), "true".into());
    annotations.insert(INJECTED_VERSION.into(), env!("CARGO_PKG_VERSION").into());
    Ok(Outcome::Injected)
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

/// `spur.dev/inject`: `disabled` opts out, `enabled` (or no annotation) opts in. Anything
/// else is an error rather than a guess: a typo must not mesh a workload silently.
fn opted_out(annotations: &Mapping, at: &str) -> Result<bool, String> {
    match annotations.get(INJECT) {
        None => Ok(false),
        Some(v) => match v.as_str() {
            Some("disabled") => Ok(true),
            Some("enabled") => Ok(false),
            _ => Err(format!(
                "{at}.{INJECT}: {} is not `enabled` or `disabled`",
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
fn map<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    Value::Mapping(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

fn strings(items: &[&str]) -> Value {
    Value::Sequence(items.iter().map(|s| Value::from(*s)).collect())
}

fn http_probe(path: &str, port: u16, extra: Vec<(&str, Value)>) -> Value {
    let mut m = Mapping::new();
    m.insert(
        "httpGet".into(),
        map([("path", path.into()), ("port", port.into())]),
    );
    for (k, v) in extra {
        m.insert(k.into(), v);
    }
    Value::Mapping(m)
}

/// A Secret mounted into the sidecar: the volume's name, the Secret, where it is mounted,
/// and the flag and file the proxy is given.
struct SecretMount {
    volume: &'static str,
    secret: String,
    dir: &'static str,
    flag: &'static str,
    file: &'static str,
}

fn secret_mounts(opts: &Options) -> Vec<SecretMount> {
    let mut out = Vec::new();
    if let Some(secret) = &opts.token_secret {
        out.push(SecretMount {
            volume: "spur-token",
            secret: secret.clone(),
            dir: "/etc/spur/token",
            flag: "--token-file",
            file: "/etc/spur/token/token",
        });
    }
    if let Some(secret) = &opts.control_ca_secret {
        out.push(SecretMount {
            volume: "spur-control-ca",
            secret: secret.clone(),
            dir: "/etc/spur/control-ca",
            flag: "--control-ca",
            file: "/etc/spur/control-ca/ca.crt",
        });
    }
    out
}

fn proxy_container(opts: &Options, group: &str) -> Value {
    let admin = format!("0.0.0.0:{}", opts.admin_port);
    let secrets = secret_mounts(opts);
    let mut args = vec![
        "proxy",
        "--control",
        &opts.control,
        "--node",
        "$(POD_NAME)",
        "--group",
        group,
        "--admin",
        &admin,
    ];
    for s in &secrets {
        args.extend([s.flag, s.file]);
    }
    let mut c = map([
        ("name", PROXY.into()),
        ("image", opts.image.as_str().into()),
        ("args", strings(&args)),
        (
            "env",
            Value::Sequence(vec![map([
                ("name", "POD_NAME".into()),
                (
                    "valueFrom",
                    map([("fieldRef", map([("fieldPath", "metadata.name".into())]))]),
                ),
            ])]),
        ),
        (
            "ports",
            Value::Sequence(vec![map([
                ("name", "spur-admin".into()),
                ("containerPort", opts.admin_port.into()),
            ])]),
        ),
        // A native sidecar: see the module documentation.
        ("restartPolicy", "Always".into()),
        // Holds the application back until the first config is applied (2 minutes).
        (
            "startupProbe",
            http_probe(
                "/ready",
                opts.admin_port,
                vec![
                    ("periodSeconds", 1.into()),
                    ("failureThreshold", 120.into()),
                ],
            ),
        ),
        (
            "readinessProbe",
            http_probe("/ready", opts.admin_port, vec![("periodSeconds", 5.into())]),
        ),
        (
            "livenessProbe",
            http_probe("/live", opts.admin_port, vec![("periodSeconds", 10.into())]),
        ),
        (
            "resources",
            map([
                (
                    "requests",
                    map([("cpu", "50m".into()), ("memory", "32Mi".into())]),
                ),
                ("limits", map([("memory", "128Mi".into())])),
            ]),
        ),
        (
            "securityContext",
            map([
                ("runAsUser", opts.uid.into()),
                ("runAsNonRoot", true.into()),
                ("readOnlyRootFilesystem", true.into()),
                ("allowPrivilegeEscalation", false.into()),
                ("capabilities", map([("drop", strings(&["ALL"]))])),
            ]),
        ),
    ]);
    if !secrets.is_empty() {
        let mounts = secrets
            .iter()
            .map(|s| {
                map([
                    ("name", s.volume.into()),
                    ("mountPath", s.dir.into()),
                    ("readOnly", true.into()),
                ])
            })
            .collect();
        if let Value::Mapping(m) = &mut c {
            m.insert("volumeMounts".into(), Value::Sequence(mounts));
        }
    }
    c
}

fn init_container(opts: &Options, skip_ports: &[u16]) -> Value {
    let (inbound, outbound, uid, admin) = (
        opts.inbound_port.to_string(),
        opts.outbound_port.to_string(),
        opts.uid.to_string(),
        opts.admin_port.to_string(),
    );
    let mut args = vec![
        "init-iptables",
        "--inbound-port",
        &inbound,
        "--outbound-port",
        &outbound,
        "--proxy-uid",
        &uid,
        // The kubelet's probes and Prometheus reach the admin server directly.
        "--skip-inbound-ports",
        &admin,
    ];
    let skip = crate::iptables::join_ports(skip_ports);
    if !skip_ports.is_empty() {
        args.extend(["--skip-ports", &skip]);
    }
    map([
        ("name", INIT.into()),
        ("image", opts.init_image.as_str().into()),
        ("args", strings(&args)),
        (
            "resources",
            map([
                (
                    "requests",
                    map([("cpu", "10m".into()), ("memory", "16Mi".into())]),
                ),
                ("limits", map([("memory", "64Mi".into())])),
            ]),
        ),
        // Root with NET_ADMIN and NET_RAW in the pod's own network namespace, for the
        // length of one iptables-restore. The root filesystem stays writable because
        // iptables takes its lock file under /run.
        (
            "securityContext",
            map([
                ("runAsUser", 0.into()),
                ("runAsNonRoot", false.into()),
                ("allowPrivilegeEscalation", false.into()),
                (
                    "capabilities",
                    map([
                        ("add", strings(&["NET_ADMIN", "NET_RAW"])),
                        ("drop", strings(&["ALL"])),
                    ]),
                ),
            ]),
        ),
    ])
}

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
        assert_eq!(inject(&mut pod, &[], &opts).unwrap(), Outcome::Injected);
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
        assert_eq!(keys, ["restartPolicy", "initContainers", "containers"]);
    }

    #[test]
    fn an_unknown_inject_value_is_an_error() {
        let a = serde_yaml_ng::from_str::<Mapping>("spur.dev/inject: disable").unwrap();
        let e = opted_out(&a, "metadata.annotations").unwrap_err();
        assert!(
            e.contains("`disable` is not `enabled` or `disabled`"),
            "{e}"
        );
    }
}
