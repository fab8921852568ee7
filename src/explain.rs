//! `spur explain --control URL --pod NS/POD URL`: what that pod's sidecar would do with a
//! request to URL, without sending one.
//!
//! It asks the control plane for the pod's group (`GET /v1/mesh/pods/NS/POD`) and the
//! group's config as its proxies receive it (`GET .../config?rendered=true`), compiles
//! that config into the proxy's own snapshot, and asks the proxy's own decisions: the
//! transparent listener's [`detect::decide`] (opaque, HTTP or egress) and, for HTTP,
//! [`plan::plan`] (route, flags, split side, cluster). Nothing is matched here, so what it
//! prints is what the sidecar does with the same config.
//!
//! The only thing it cannot reproduce is chance: a split side is drawn at random per
//! request (as the proxy draws it), so the side printed is one draw, with the weights.

use crate::live::Remote;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use spur_config::args::Flags;
use spur_config::Config;
use spur_proxy::adapters::detect::{self, Detected, Next};
use spur_proxy::http::plan::{self, Action, Peer};
use spur_proxy::snapshot::{ClusterRt, Snapshot, Target};
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;

const USAGE: &str =
    "usage: spur explain --control URL --pod NS/POD [--token-file F] [--control-ca F]
                    [--method M] [--header NAME:VALUE]... URL

Prints what the sidecar of pod NS/POD would do with a request to URL (http:// or https://,
a Service by name `svc.ns[.svc.cluster.local]` or an address): the listener, what protocol
detection decides, the route (and the HTTPRoute or GRPCRoute it came from), the flags on,
the split side, the cluster, its endpoints, the identity expected from them, and the
egress policy. It uses the control plane of `spur control --kubernetes --mesh` and the
proxy's own decision code on the group's rendered config.";

struct Args {
    control: String,
    token_file: Option<String>,
    ca: Option<String>,
    pod: (String, String),
    method: Method,
    headers: HeaderMap,
    url: http::Uri,
}

pub fn main(args: &[String]) -> ExitCode {
    let a = match crate::args_or_exit("explain", USAGE, parse(args)) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let rt = crate::client_runtime();
    match rt.block_on(explain(&a)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("spur explain: {e}");
            ExitCode::from(1)
        }
    }
}

fn parse(args: &[String]) -> Result<Args, String> {
    let (mut control, mut token_file, mut ca, mut pod, mut url) = (None, None, None, None, None);
    let mut method = Method::GET;
    let mut headers = HeaderMap::new();
    let mut f = Flags::new(args);
    while let Some(flag) = f.next_flag() {
        match flag {
            "--control" => control = Some(f.value(flag)?.trim_end_matches('/').to_string()),
            "--token-file" => token_file = Some(f.value(flag)?),
            "--control-ca" => ca = Some(f.value(flag)?),
            "--pod" => {
                let v = f.value(flag)?;
                let (ns, name) = v
                    .split_once('/')
                    .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
                    .ok_or_else(|| format!("--pod: `{v}` is not NAMESPACE/POD"))?;
                pod = Some((ns.to_string(), name.to_string()));
            }
            "--method" => {
                let v = f.value(flag)?;
                method = Method::from_bytes(v.as_bytes())
                    .map_err(|_| format!("--method: `{v}` is not a method"))?;
            }
            "--header" => {
                let v = f.value(flag)?;
                let (name, val) = v
                    .split_once(':')
                    .ok_or_else(|| format!("--header: `{v}` is not NAME:VALUE"))?;
                let name = HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|_| format!("--header: `{name}` is not a header name"))?;
                let val = HeaderValue::from_str(val.trim())
                    .map_err(|_| format!("--header: the value of `{name}` is not valid"))?;
                headers.append(name, val);
            }
            "-h" | "--help" => return Err(String::new()),
            other if other.starts_with('-') => return Err(format!("unknown option `{other}`")),
            positional => {
                let u: http::Uri = positional
                    .parse()
                    .map_err(|_| format!("`{positional}` is not a URL"))?;
                if !matches!(u.scheme_str(), Some("http" | "https")) || u.host().is_none() {
                    return Err(format!("`{positional}` is not an http:// or https:// URL"));
                }
                if url.replace(u).is_some() {
                    return Err("one URL only".into());
                }
            }
        }
    }
    Ok(Args {
        control: control.ok_or("--control URL is required")?,
        token_file,
        ca,
        pod: pod.ok_or("--pod NS/POD is required")?,
        method,
        headers,
        url: url.ok_or("the URL is required")?,
    })
}

async fn explain(a: &Args) -> Result<String, String> {
    let token = match &a.token_file {
        Some(p) => Some(spur_config::read_token_file(std::path::Path::new(p))?),
        None => None,
    };
    let client = spur_proxy::control_client::client(a.ca.as_deref().map(std::path::Path::new))?;
    let remote = Remote {
        url: a.control.clone(),
        group: String::new(),
        token,
        client,
    };
    let (ns, name) = &a.pod;
    let pod = remote.json(&format!("/v1/mesh/pods/{ns}/{name}")).await?;
    let group = pod["group"]
        .as_str()
        .ok_or_else(|| format!("pod {ns}/{name} has no group (no `app` label)"))?;
    let doc = remote
        .json(&format!("/v1/groups/{group}/config?rendered=true"))
        .await?;
    let cfg: Config = serde_json::from_value(doc["config"].clone())
        .map_err(|e| format!("group {group}: the rendered config does not parse: {e}"))?;
    let mut out = format!(
        "pod: {ns}/{name}, group {group} (version {}), identity {}\n",
        doc["version"],
        pod["identity"].as_str().unwrap_or("-")
    );
    let ip: IpAddr = pod["ip"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    decide(&cfg, a, ip, &mut out)?;
    Ok(out)
}

/// The original destination URL stands for: an address, or a Service's ClusterIP.
fn destination(cfg: &Config, url: &http::Uri) -> Result<SocketAddr, String> {
    let https = url.scheme_str() == Some("https");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let host = url.host().unwrap_or_default().trim_matches(['[', ']']);
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let mut labels = host.split('.');
    let (svc, ns) = match (labels.next(), labels.next()) {
        (Some(s), Some(n)) => (s, n),
        _ => return Err(format!("`{host}`: name a Service as svc.namespace (an app's short names depend on its namespace)")),
    };
    let cluster = format!("{svc}.{ns}.{port}");
    cfg.clusters
        .iter()
        .find(|c| c.name == cluster)
        .and_then(|c| c.service_addresses.first())
        .map(|a| **a)
        .ok_or_else(|| format!("no Service {svc}.{ns} with port {port} in the mesh"))
}

fn decide(cfg: &Config, a: &Args, ip: IpAddr, out: &mut String) -> Result<(), String> {
    let dst = destination(cfg, &a.url)?;
    // TLS material is the sidecar's own: the decisions do not need it.
    let mut bare = cfg.clone();
    for c in &mut bare.clusters {
        c.tls = None;
    }
    for l in &mut bare.listeners {
        l.tls = None;
    }
    let registry = spur_proxy::registry::Registry::default();
    let metrics = spur_proxy::metrics::Metrics::new();
    let snap = Snapshot::compile(Arc::new(bare), 0, &registry, &metrics, None)
        .map_err(|e| format!("the rendered config does not compile: {e:?}"))?;
    let lst = cfg
        .listeners
        .iter()
        .find(|l| l.original_dst)
        .and_then(|l| snap.listeners.get(&l.name))
        .ok_or("the group's config has no transparent (original_dst) listener")?;
    out.push_str(&format!(
        "listener: {} (original destination {dst})\n",
        lst.name
    ));
    let detected = match (a.url.scheme_str(), a.url.host()) {
        (Some("https"), Some(h)) if h.parse::<IpAddr>().is_err() => {
            Detected::Tls(Some(h.to_ascii_lowercase()))
        }
        (Some("https"), _) => Detected::Tls(None),
        _ => Detected::Http1,
    };
    let owner = snap.cluster_for_addr(dst);
    let skipped = owner.as_ref().is_some_and(|c| c.skip_detection);
    let det = (!skipped).then_some(detected);
    out.push_str(&format!(
        "detected: {}\n",
        match &det {
            None => "skipped (opaque port)".to_string(),
            Some(Detected::Tls(Some(sni))) =>
                format!("tls, SNI {sni} (passed through, not terminated)"),
            Some(d) => format!("{d:?}").to_lowercase(),
        }
    ));
    match detect::decide(&snap, lst, Some(dst), owner, det.as_ref()) {
        Next::Http => http_plan(cfg, &snap, lst, a, ip, dst, out),
        Next::Opaque(c) => {
            out.push_str("route: none (opaque TCP)\n");
            cluster_lines(cfg, &c, out);
        }
        Next::Egress(e, dst) => match e {
            spur_config::Egress::Allow => out.push_str(&format!(
                "egress: allow (no cluster owns {dst}: passed through as opaque bytes)\n"
            )),
            spur_config::Egress::Deny => out.push_str(&format!(
                "egress: deny (no cluster owns {dst}: refused; HTTP gets 404 no_route)\n"
            )),
        },
        Next::Close => out.push_str("closed: nothing owns the destination\n"),
    }
    Ok(())
}

fn http_plan(
    cfg: &Config,
    snap: &Snapshot,
    lst: &spur_proxy::snapshot::ListenerRt,
    a: &Args,
    ip: IpAddr,
    dst: SocketAddr,
    out: &mut String,
) {
    let path = a.url.path_and_query().map_or("/", |p| p.as_str());
    let mut req = http::Request::builder()
        .method(a.method.clone())
        .uri(path)
        .body(())
        .expect("a path and a method");
    *req.headers_mut() = a.headers.clone();
    if let Some(host) = a.url.authority() {
        if let Ok(v) = HeaderValue::from_str(host.as_str()) {
            req.headers_mut().entry(http::header::HOST).or_insert(v);
        }
    }
    let (mut head, ()) = req.into_parts();
    let peer = Peer {
        addr: SocketAddr::new(ip, 0),
        identity: None,
        original_dst: Some(dst),
    };
    let mut rng = fastrand::Rng::new();
    let p = plan::plan(
        snap,
        lst,
        peer,
        &mut head,
        std::time::Instant::now(),
        &mut rng,
    );
    let on: Vec<&str> = snap
        .flags
        .iter()
        .zip(&p.flags_on)
        .filter(|(_, on)| **on)
        .map(|(f, _)| &*f.name)
        .collect();
    match (&p.route, &p.route_name) {
        (Some(r), _) => out.push_str(&format!("route: {}{}\n", r.name, source(&r.name))),
        (None, Some(n)) => out.push_str(&format!(
            "route: none matched ({n}: the cluster owning the destination)\n"
        )),
        (None, None) => out.push_str("route: none\n"),
    }
    out.push_str(&format!(
        "flags on: {}\n",
        if on.is_empty() {
            "none".to_string()
        } else {
            on.join(", ")
        }
    ));
    match &p.action {
        Action::Forward(f) => {
            if let (
                Some(side),
                Some(Target::Split {
                    clusters,
                    weights,
                    total,
                    ..
                }),
            ) = (f.split_side, p.route.map(|r| &r.target))
            {
                let sides: Vec<String> = clusters
                    .iter()
                    .zip(weights)
                    .map(|(c, w)| format!("{} {w}/{total}", c.name))
                    .collect();
                out.push_str(&format!(
                    "split: side {} of {} drawn ({})\n",
                    side + 1,
                    clusters.len(),
                    sides.join(", ")
                ));
            }
            cluster_lines(cfg, &f.cluster, out);
        }
        Action::Refuse(r) => out.push_str(&format!(
            "refused: {} {}{}\n",
            r.status.as_u16(),
            r.reason.as_str(),
            if cfg.egress == Some(spur_config::Egress::Deny) {
                " (egress: deny)"
            } else {
                ""
            }
        )),
        Action::Answer(ans) => {
            out.push_str(&format!("answered by Spur: {}\n", ans.status.as_u16()))
        }
    }
    let policy = match &lst.authz {
        Some(_) => "the listener's authz policy applies",
        None => {
            "no authorization policy on this listener (the destination's sidecar applies its own)"
        }
    };
    out.push_str(&format!("policy: {policy}\n"));
}

/// A Spur route name made from a Gateway API route: where it came from.
fn source(route: &str) -> String {
    for (prefix, kind) in [("httproute.", "HTTPRoute"), ("grpcroute.", "GRPCRoute")] {
        let Some(rest) = route.strip_prefix(prefix) else {
            continue;
        };
        let parts: Vec<&str> = rest.rsplitn(4, '.').collect();
        if let [port, m, r, nsname] = parts[..] {
            if let Some((ns, name)) = nsname.split_once('.') {
                return format!(
                    " ({kind} {ns}/{name}, rule {}, match {}, port {port})",
                    r.trim_start_matches('r'),
                    m.trim_start_matches('m')
                );
            }
        }
    }
    String::new()
}

fn cluster_lines(cfg: &Config, c: &ClusterRt, out: &mut String) {
    out.push_str(&format!("cluster: {}\n", c.name));
    let eps: Vec<String> = c
        .members
        .load()
        .endpoints
        .iter()
        .map(|e| e.addr.to_string())
        .collect();
    out.push_str(&format!(
        "endpoints: {}\n",
        if eps.is_empty() {
            "none ready".to_string()
        } else {
            eps.join(", ")
        }
    ));
    let ids = cfg
        .clusters
        .iter()
        .find(|k| *k.name == *c.name)
        .and_then(|k| k.tls.as_ref())
        .map(|t| {
            t.expect_identities
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
        });
    out.push_str(&match ids {
        Some(ids) if !ids.is_empty() => {
            format!("identity expected: {} (mutual TLS)\n", ids.join(", "))
        }
        Some(_) => "identity expected: any the CA signed (TLS)\n".to_string(),
        None => "identity expected: none (plain: the destination has no sidecar)\n".to_string(),
    });
}
