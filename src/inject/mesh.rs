//! The group configs `spur inject --config-dir DIR` writes: for every group it injected, a
//! config that makes the pod part of the mesh, ready to PUT to the control plane.
//!
//! - **Inbound** (`0.0.0.0:INBOUND`, where `spur-init` sends every connection into the
//!   pod): to the app's first container port on `127.0.0.1`. For a meshed workload the
//!   listener has `tls: {}`: mutual TLS with the workload's certificate from the mesh CA,
//!   and every caller must present one too (any identity of the mesh, for now; who may
//!   call whom is authorization policy, not built yet).
//! - **Outbound** (`127.0.0.1:OUTBOUND`, where every connection out of the pod goes): a
//!   route per name of each Service in the same input that selects injected pods
//!   (`NAME.NS.svc.cluster.local`, `NAME.NS.svc`, `NAME.NS`, and `NAME` from its own
//!   namespace), to a `k8s: NAME.NS:PORT` cluster (the control plane fills it with the
//!   Service's ready pods). When every pod it selects is meshed, the cluster originates
//!   mutual TLS and expects their service accounts' identities; otherwise it speaks plain
//!   HTTP, as those pods do.
//!
//! Only what the input shows is known: Services and workloads of other inputs are not
//! routed (PUT a config of your own for them). A Service's first TCP port is used; its
//! `targetPort` is resolved against the selected pods' container ports.

use super::pod::Workload;
use serde_yaml_ng::{Mapping, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A Service of the input, as far as routing to it goes.
#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    selector: Mapping,
    /// The first TCP port's `targetPort`: a number, a container port's name, or absent
    /// (then the port itself).
    port: u16,
    target: Option<Value>,
}

impl Service {
    /// A `v1` Service with a selector and a TCP port; `None` for anything else.
    pub fn from_object(obj: &Mapping) -> Option<Service> {
        if obj.get("kind").and_then(Value::as_str) != Some("Service") {
            return None;
        }
        let meta = obj.get("metadata")?;
        let spec = obj.get("spec")?;
        let selector = spec.get("selector")?.as_mapping()?.clone();
        if selector.is_empty() {
            return None;
        }
        let port = spec.get("ports")?.as_sequence()?.iter().find(|p| {
            p.get("protocol")
                .and_then(Value::as_str)
                .is_none_or(|proto| proto == "TCP")
        })?;
        Some(Service {
            name: meta.get("name")?.as_str()?.to_string(),
            namespace: meta
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_string(),
            selector,
            port: u16::try_from(port.get("port")?.as_u64()?).ok()?,
            target: port.get("targetPort").cloned(),
        })
    }

    fn selects(&self, w: &Workload) -> bool {
        w.namespace == self.namespace
            && self
                .selector
                .iter()
                .all(|(k, v)| w.labels.get(k) == Some(v))
    }

    /// The pods' port the Service sends to, for workload `w`.
    fn target_port(&self, w: &Workload) -> Option<u16> {
        match &self.target {
            None => Some(self.port),
            Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            Some(Value::String(s)) => s.parse().ok().or_else(|| {
                w.ports
                    .iter()
                    .find(|(name, _)| name.as_deref() == Some(s.as_str()))
                    .map(|(_, n)| *n)
            }),
            Some(_) => None,
        }
    }
}

/// Where outbound traffic may go: a Service that selects injected pods.
struct Destination {
    name: String,
    namespace: String,
    port: u16,
    /// The SPIFFE IDs its pods have, when all of them are meshed.
    identities: Option<Vec<String>>,
}

fn destinations(
    workloads: &[Workload],
    services: &[Service],
    trust_domain: &str,
    notes: &mut Vec<String>,
) -> Vec<Destination> {
    let mut out = Vec::new();
    for s in services {
        let selected: Vec<&Workload> = workloads.iter().filter(|w| s.selects(w)).collect();
        let Some(first) = selected.first() else {
            continue;
        };
        let Some(port) = s.target_port(first) else {
            notes.push(format!(
                "Service {}/{}: its targetPort names no container port; not routed",
                s.namespace, s.name
            ));
            continue;
        };
        let identities = selected.iter().all(|w| w.meshed).then(|| {
            let mut ids: Vec<String> = selected
                .iter()
                .map(|w| {
                    format!(
                        "spiffe://{trust_domain}/ns/{}/sa/{}",
                        w.namespace, w.service_account
                    )
                })
                .collect();
            ids.sort();
            ids.dedup();
            ids
        });
        if identities.is_none() && selected.iter().any(|w| w.meshed) {
            notes.push(format!(
                "Service {}/{} selects meshed and unmeshed pods: called in plain HTTP",
                s.namespace, s.name
            ));
        }
        out.push(Destination {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            port,
            identities,
        });
    }
    out
}

/// The listener and cluster ports of the sidecar.
pub struct Ports {
    pub inbound: u16,
    pub outbound: u16,
}

/// Each injected group's config, by group; errors when two workloads of one group would
/// need different configs. `notes` gets what the configs leave out, for stderr.
pub fn configs(
    workloads: &[Workload],
    services: &[Service],
    ports: &Ports,
    trust_domain: &str,
    notes: &mut Vec<String>,
) -> Result<BTreeMap<String, String>, Vec<String>> {
    let dests = destinations(workloads, services, trust_domain, notes);
    let mut out: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut errors = Vec::new();
    for w in workloads {
        // The config of the group's first workload, as this one would have it: the same
        // text but for the workload named in its header comment.
        let first = out
            .get(&w.group)
            .map_or(w.label.as_str(), |(l, _)| l.as_str());
        let as_first = Workload {
            label: first.to_string(),
            ..w.clone()
        };
        let text = config(&as_first, &dests, ports, trust_domain);
        match out.get(&w.group) {
            Some((label, other)) if *other != text => errors.push(format!(
                "group `{}`: {label} and {} need different configs (namespace, service account, ports or mTLS differ): give them different `app` labels",
                w.group, w.label
            )),
            Some(_) => {}
            None => {
                out.insert(w.group.clone(), (w.label.clone(), text));
            }
        }
    }
    if errors.is_empty() {
        Ok(out.into_iter().map(|(g, (_, text))| (g, text)).collect())
    } else {
        Err(errors)
    }
}

fn config(w: &Workload, dests: &[Destination], ports: &Ports, trust_domain: &str) -> String {
    let mut y = String::new();
    let _ = writeln!(
        y,
        "# Generated by `spur inject` for group `{g}`: {label} in namespace {ns}, service\n\
         # account {sa}{mesh}.\n\
         # PUT it to the control plane before applying the workload:\n\
         #   curl -X PUT -H \"authorization: Bearer $(cat token)\" --data-binary @spur-{g}.yaml \\\n\
         #     http://127.0.0.1:7070/v1/groups/{g}/config",
        g = w.group,
        label = w.label,
        ns = w.namespace,
        sa = w.service_account,
        mesh = if w.meshed {
            format!(
                ", identity spiffe://{trust_domain}/ns/{}/sa/{}",
                w.namespace, w.service_account
            )
        } else {
            " (spur.dev/mtls: disabled: no identity, plain HTTP)".to_string()
        }
    );
    y.push_str("listeners:\n");
    let app = w.ports.first().map(|(_, p)| *p);
    if let Some(port) = app {
        let _ = writeln!(
            y,
            "  # Every connection into the pod (spur-init redirects it here), to the app's port {port}."
        );
        y.push_str("  - name: inbound\n");
        let _ = writeln!(y, "    listen: 0.0.0.0:{}", ports.inbound);
        if w.meshed {
            y.push_str("    tls: {}                  # mutual TLS: the workload certificate; callers need one from the mesh CA\n");
        }
        y.push_str("    cluster: app\n");
    }
    y.push_str("  # Every connection out of the pod: routed by Host to the Services below.\n");
    y.push_str("  - name: outbound\n");
    let _ = writeln!(y, "    listen: 127.0.0.1:{}", ports.outbound);
    if dests.is_empty() {
        y.push_str(
            "    routes: []               # no Service of the input selects injected pods\n",
        );
    } else {
        y.push_str("    routes:\n");
    }
    for d in dests {
        let cluster = format!("{}.{}", d.name, d.namespace);
        let mut hosts = vec![
            format!("{cluster}.svc.cluster.local"),
            format!("{cluster}.svc"),
            cluster.clone(),
        ];
        if d.namespace == w.namespace {
            hosts.push(d.name.clone());
        }
        for h in hosts {
            let _ = writeln!(
                y,
                "      - {{ name: {h}, match: {{ host: {h} }}, cluster: {cluster} }}"
            );
        }
    }
    y.push_str("clusters:\n");
    if let Some(port) = app {
        let _ = writeln!(y, "  - {{ name: app, endpoints: [\"127.0.0.1:{port}\"] }}");
    }
    if app.is_none() && dests.is_empty() {
        y.truncate(y.len() - "clusters:\n".len());
        y.push_str("clusters: []\n");
    }
    for d in dests {
        let cluster = format!("{}.{}", d.name, d.namespace);
        let _ = writeln!(y, "  - name: {cluster}");
        let _ = writeln!(y, "    k8s: {}:{}", cluster, d.port);
        match &d.identities {
            Some(ids) => {
                let list: Vec<String> = ids.iter().map(|i| format!("\"{i}\"")).collect();
                let _ = writeln!(y, "    tls: {{ expect_identities: [{}] }}", list.join(", "));
            }
            None => y.push_str("    # its pods are not meshed: plain HTTP\n"),
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(group: &str, ns: &str, meshed: bool, ports: &[(&str, u16)]) -> Workload {
        Workload {
            label: format!("Deployment/{group}"),
            group: group.into(),
            namespace: ns.into(),
            service_account: group.into(),
            meshed,
            labels: serde_yaml_ng::from_str(&format!("app: {group}")).unwrap(),
            ports: ports
                .iter()
                .map(|(n, p)| (Some(n.to_string()), *p))
                .collect(),
            probe_ports: vec![],
        }
    }

    fn service(yaml: &str) -> Service {
        Service::from_object(&serde_yaml_ng::from_str(yaml).unwrap()).unwrap()
    }

    #[test]
    fn meshed_services_get_mtls_clusters_and_host_routes() {
        let ws = [
            workload("echo", "demo", true, &[("http", 5678)]),
            workload("client", "demo", true, &[]),
            workload("legacy", "old", false, &[("web", 80)]),
        ];
        let svcs = [
            service("kind: Service\nmetadata: {name: echo, namespace: demo}\nspec: {selector: {app: echo}, ports: [{port: 80, targetPort: http}]}"),
            service("kind: Service\nmetadata: {name: legacy, namespace: old}\nspec: {selector: {app: legacy}, ports: [{port: 8080}]}"),
            service("kind: Service\nmetadata: {name: other, namespace: demo}\nspec: {selector: {app: nobody}, ports: [{port: 80}]}"),
        ];
        let mut notes = vec![];
        let ports = Ports {
            inbound: 15006,
            outbound: 15001,
        };
        let c = configs(&ws, &svcs, &ports, "cluster.local", &mut notes).unwrap();
        let client = &c["client"];
        assert!(!client.contains("name: inbound"), "{client}");
        assert!(client.contains("{ name: echo, match: { host: echo }, cluster: echo.demo }"));
        assert!(
            !client.contains("host: legacy }"),
            "another namespace: no short name"
        );
        assert!(client.contains("k8s: echo.demo:5678\n    tls: { expect_identities: [\"spiffe://cluster.local/ns/demo/sa/echo\"] }"));
        assert!(client.contains("k8s: legacy.old:8080\n    # its pods are not meshed"));
        assert!(!client.contains("other"));
        assert!(c["echo"].contains("    tls: {}"));
        assert!(c["echo"].contains("endpoints: [\"127.0.0.1:5678\"]"));
        assert!(!c["legacy"].contains("tls: {}"));
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn one_group_one_config() {
        let a = workload("web", "shop", true, &[("http", 8080)]);
        let mut b = a.clone();
        b.label = "Deployment/web-canary".into();
        let ports = Ports {
            inbound: 1,
            outbound: 2,
        };
        assert_eq!(
            configs(&[a.clone(), b.clone()], &[], &ports, "td", &mut vec![])
                .unwrap()
                .len(),
            1
        );
        b.ports = vec![(None, 9090)];
        let e = configs(&[a, b], &[], &ports, "td", &mut vec![]).unwrap_err();
        assert!(
            e[0].contains("Deployment/web and Deployment/web-canary"),
            "{e:?}"
        );
    }
}
