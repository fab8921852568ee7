//! Gateway API routes of the mesh profile (GAMMA): `HTTPRoute` and `GRPCRoute` objects
//! whose `parentRefs` name a Service, turned into Spur routes on the outbound listener.
//!
//! The types here are minimal serde types for the fields Spur reads, not the
//! `gateway-api` crate's: its releases are built on kube 3.x/4.x and k8s-openapi
//! 0.27/0.28, while Spur is on kube 5 and k8s-openapi 0.29, so its types would not work
//! with Spur's `kube::Api` (and would build a second kube). The objects are read as
//! `DynamicObject`s and their `spec` deserialized into these types.
//!
//! A route is applied whole or not at all: a part Spur cannot honour (an unknown filter,
//! a query-parameter match, a backend that is not a known Service port) keeps the whole
//! route out, and its status says why (`Accepted: False`, reason `UnsupportedValue`, or
//! `ResolvedRefs: False`, reason `BackendNotFound` / `InvalidKind` / `RefNotPermitted`).
//!
//! A Gateway API route becomes one Spur route per (parent port, rule, match), each matching
//! `destination: <the parent Service's cluster>` so that it applies to the traffic for that
//! Service alone; its name is `KIND.NS.NAME.rRULE.mMATCH.PORT`, which `spur explain` and the
//! metrics show.

use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl ParentRef {
    /// A Service in the core group (GAMMA); Gateways are not Spur's.
    pub fn is_service(&self) -> bool {
        matches!(self.group.as_deref(), Some("" | "core"))
            && self.kind.as_deref() == Some("Service")
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default)]
    pub matches: Vec<Value>,
    #[serde(default)]
    pub filters: Vec<Value>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    /// Experimental channel (GEP-1731).
    #[serde(default)]
    pub retry: Option<RetrySpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub filters: Vec<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Timeouts {
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default, rename = "backendRequest")]
    pub backend_request: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct RetrySpec {
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub codes: Vec<u16>,
    #[serde(default)]
    pub backoff: Option<String>,
}

/// Which kind of route: the translation differs in matches only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Http,
    Grpc,
}

impl Kind {
    pub fn prefix(self) -> &'static str {
        match self {
            Kind::Http => "httproute",
            Kind::Grpc => "grpcroute",
        }
    }
}

/// Why a route (or part of it) is not applied: the condition type and reason of the
/// route's status, and a message for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub condition: &'static str,
    pub reason: &'static str,
    pub message: String,
}

fn unsupported(message: impl Into<String>) -> Refusal {
    Refusal {
        condition: "Accepted",
        reason: "UnsupportedValue",
        message: message.into(),
    }
}

fn unresolved(reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        condition: "ResolvedRefs",
        reason,
        message: message.into(),
    }
}

/// The cluster name of a Service port in a rendered config: `NAME.NS.PORT`.
pub fn cluster_name(name: &str, ns: &str, port: u16) -> String {
    format!("{name}.{ns}.{port}")
}

/// One route object to translate.
pub struct Source<'a> {
    pub kind: Kind,
    pub namespace: &'a str,
    pub name: &'a str,
    pub spec: &'a RouteSpec,
}

/// Translates one route for one parent Service port (whose cluster is `parent`) into Spur
/// routes as JSON values (deserialized by the caller, so that spur-config parses every
/// value). `clusters` are the rendered cluster names (backends must be among them).
pub fn translate(
    src: &Source<'_>,
    parent: &str,
    port: u16,
    clusters: &BTreeSet<String>,
) -> Result<Vec<Value>, Refusal> {
    let mut out = Vec::new();
    for (i, rule) in src.spec.rules.iter().enumerate() {
        let mut base = Map::new();
        base.insert("destination".into(), json!(parent));
        let target = backends(src, rule, port, clusters)?;
        let mut extra = Map::new();
        for f in &rule.filters {
            filter(src, f, port, clusters, &mut extra, &mut base)?;
        }
        if let Some(t) = &rule.timeouts {
            if let Some(r) = t.request.as_ref().or(t.backend_request.as_ref()) {
                extra.insert("timeout".into(), json!(gateway_duration(r)?));
            }
        }
        if let Some(r) = &rule.retry {
            extra.insert("retry".into(), retry(r)?);
        }
        let matches: Vec<Map<String, Value>> = if rule.matches.is_empty() {
            vec![Map::new()]
        } else {
            rule.matches
                .iter()
                .map(|m| match_of(src.kind, m))
                .collect::<Result<_, _>>()?
        };
        for (j, m) in matches.into_iter().enumerate() {
            let mut matched = base.clone();
            matched.extend(m);
            let mut route = Map::new();
            route.insert(
                "name".into(),
                json!(format!(
                    "{}.{}.{}.r{i}.m{j}.{port}",
                    src.kind.prefix(),
                    src.namespace,
                    src.name
                )),
            );
            route.insert("match".into(), Value::Object(matched));
            route.extend(target.clone());
            route.extend(extra.clone());
            out.push(Value::Object(route));
        }
    }
    Ok(out)
}

/// `backendRefs` as `cluster` or `split`.
fn backends(
    src: &Source<'_>,
    rule: &Rule,
    port: u16,
    clusters: &BTreeSet<String>,
) -> Result<Map<String, Value>, Refusal> {
    let mut split = Vec::new();
    for b in &rule.backend_refs {
        if !b.filters.is_empty() {
            return Err(unsupported(
                "backendRefs[].filters: not supported yet (use the rule's filters)",
            ));
        }
        let cluster = backend_cluster(src, b, port, clusters)?;
        split.push(json!({ "cluster": cluster, "weight": b.weight.unwrap_or(1) }));
    }
    let mut out = Map::new();
    match split.len() {
        0 => {
            // Only a redirect may go without backends; `filter` adds it.
        }
        1 if split[0]["weight"] != 0 => {
            out.insert("cluster".into(), split[0]["cluster"].clone());
        }
        _ => {
            if split.iter().all(|s| s["weight"] == 0) {
                return Err(unsupported(
                    "every backendRef has weight 0: Spur has no backend to send to",
                ));
            }
            out.insert("split".into(), Value::Array(split));
        }
    }
    Ok(out)
}

fn backend_cluster(
    src: &Source<'_>,
    b: &BackendRef,
    port: u16,
    clusters: &BTreeSet<String>,
) -> Result<String, Refusal> {
    if !matches!(b.group.as_deref(), None | Some("" | "core"))
        || !matches!(b.kind.as_deref(), None | Some("Service"))
    {
        return Err(unresolved(
            "InvalidKind",
            format!("backendRef {}: only Services are supported", b.name),
        ));
    }
    let ns = b.namespace.as_deref().unwrap_or(src.namespace);
    if ns != src.namespace {
        return Err(unresolved(
            "RefNotPermitted",
            format!(
                "backendRef {ns}/{}: cross-namespace backends (ReferenceGrant) are not supported yet",
                b.name
            ),
        ));
    }
    let name = cluster_name(&b.name, ns, b.port.unwrap_or(port));
    if clusters.contains(&name) {
        Ok(name)
    } else {
        Err(unresolved(
            "BackendNotFound",
            format!(
                "backendRef {ns}/{} port {}: no such Service port in the mesh",
                b.name,
                b.port.unwrap_or(port)
            ),
        ))
    }
}

/// One `matches[]` entry: path, headers, method (HTTPRoute) or method {service, method}
/// and headers (GRPCRoute). Query parameters are not supported yet.
fn match_of(kind: Kind, m: &Value) -> Result<Map<String, Value>, Refusal> {
    let mut out = Map::new();
    let headers = m["headers"].as_array().cloned().unwrap_or_default();
    let mut hs = Vec::new();
    for h in headers {
        let name = h["name"].as_str().unwrap_or_default().to_ascii_lowercase();
        let value = h["value"].clone();
        match h["type"].as_str().unwrap_or("Exact") {
            "Exact" => hs.push(json!({ "name": name, "value": value })),
            "RegularExpression" => hs.push(json!({ "name": name, "regex": value })),
            t => return Err(unsupported(format!("headers[].type {t}: not supported"))),
        }
    }
    if !hs.is_empty() {
        out.insert("headers".into(), Value::Array(hs));
    }
    if m.get("queryParams").is_some_and(|q| !q.is_null()) {
        return Err(unsupported(
            "matches[].queryParams: not supported yet by Spur",
        ));
    }
    match kind {
        Kind::Http => {
            if let Some(p) = m.get("path").filter(|p| !p.is_null()) {
                let value = p["value"].as_str().unwrap_or("/");
                match p["type"].as_str().unwrap_or("PathPrefix") {
                    "Exact" => out.insert("path".into(), json!(value)),
                    "PathPrefix" => out.insert("path_prefix".into(), json!(value)),
                    t => return Err(unsupported(format!("path.type {t}: not supported yet"))),
                };
            }
            if let Some(method) = m["method"].as_str() {
                out.insert("method".into(), json!(method));
            }
        }
        Kind::Grpc => {
            if let Some(method) = m.get("method").filter(|p| !p.is_null()) {
                if method["type"].as_str().unwrap_or("Exact") != "Exact" {
                    return Err(unsupported(
                        "method.type RegularExpression: not supported yet",
                    ));
                }
                let Some(service) = method["service"].as_str() else {
                    return Err(unsupported("method without a service: not supported yet"));
                };
                let mut g = json!({ "service": service });
                if let Some(name) = method["method"].as_str() {
                    g["method"] = json!(name);
                }
                out.insert("grpc".into(), g);
            }
        }
    }
    Ok(out)
}

/// One rule filter, into the route's fields (`out`) or its match (`matched`).
fn filter(
    src: &Source<'_>,
    f: &Value,
    port: u16,
    clusters: &BTreeSet<String>,
    out: &mut Map<String, Value>,
    matched: &mut Map<String, Value>,
) -> Result<(), Refusal> {
    let kind = f["type"].as_str().unwrap_or_default();
    match kind {
        "RequestHeaderModifier" => {
            out.insert(
                "request_headers".into(),
                header_rules(&f["requestHeaderModifier"]),
            );
        }
        "ResponseHeaderModifier" => {
            out.insert(
                "response_headers".into(),
                header_rules(&f["responseHeaderModifier"]),
            );
        }
        "URLRewrite" if src.kind == Kind::Http => {
            let r = &f["urlRewrite"];
            let mut rw = Map::new();
            if let Some(h) = r["hostname"].as_str() {
                rw.insert("host".into(), json!(h));
            }
            if let Some(p) = r.get("path").filter(|p| !p.is_null()) {
                match p["type"].as_str() {
                    Some("ReplacePrefixMatch") => {
                        rw.insert("path_prefix".into(), p["replacePrefixMatch"].clone());
                    }
                    t => {
                        return Err(unsupported(format!(
                            "urlRewrite.path.type {}: not supported yet",
                            t.unwrap_or("-")
                        )))
                    }
                }
            }
            out.insert("rewrite".into(), Value::Object(rw));
        }
        "RequestRedirect" if src.kind == Kind::Http => {
            let r = &f["requestRedirect"];
            let mut rd = Map::new();
            rd.insert(
                "status".into(),
                json!(r["statusCode"].as_u64().unwrap_or(302)),
            );
            for (from, to) in [("scheme", "scheme"), ("hostname", "host"), ("port", "port")] {
                if !r[from].is_null() {
                    rd.insert(to.into(), r[from].clone());
                }
            }
            if let Some(p) = r.get("path").filter(|p| !p.is_null()) {
                match p["type"].as_str() {
                    Some("ReplaceFullPath") => {
                        rd.insert("path".into(), p["replaceFullPath"].clone())
                    }
                    Some("ReplacePrefixMatch") => {
                        rd.insert("path_prefix".into(), p["replacePrefixMatch"].clone())
                    }
                    _ => return Err(unsupported("requestRedirect.path.type: not supported")),
                };
            }
            out.remove("cluster");
            out.remove("split");
            out.insert("redirect".into(), Value::Object(rd));
        }
        "RequestMirror" => {
            let m = &f["requestMirror"];
            let b: BackendRef = serde_json::from_value(m["backendRef"].clone())
                .map_err(|e| unsupported(format!("requestMirror.backendRef: {e}")))?;
            let cluster = backend_cluster(src, &b, port, clusters)?;
            let percent = m["percent"].as_f64().unwrap_or(100.0);
            out.insert(
                "mirror".into(),
                json!({ "cluster": cluster, "percent": percent }),
            );
        }
        "ExtensionRef" => {
            let e = &f["extensionRef"];
            let (group, ext_kind) = (e["group"].as_str(), e["kind"].as_str());
            match (group, ext_kind) {
                (Some("spur.dev"), Some("Flag")) => {
                    matched.insert("flag".into(), e["name"].clone());
                }
                _ => {
                    return Err(unsupported(format!(
                        "extensionRef {}/{}: Spur knows group spur.dev, kind Flag",
                        group.unwrap_or("-"),
                        ext_kind.unwrap_or("-")
                    )))
                }
            }
        }
        other => {
            return Err(unsupported(format!(
                "filter type {other}: not supported by Spur"
            )))
        }
    }
    Ok(())
}

/// `{set: [{name, value}], add: [...], remove: [names]}` as Spur's header rules.
fn header_rules(m: &Value) -> Value {
    let pairs = |key: &str| -> Map<String, Value> {
        m[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| Some((h["name"].as_str()?.to_ascii_lowercase(), h["value"].clone())))
            .collect()
    };
    let mut out = Map::new();
    for key in ["set", "add"] {
        let p = pairs(key);
        if !p.is_empty() {
            out.insert(key.into(), Value::Object(p));
        }
    }
    if let Some(r) = m["remove"].as_array() {
        out.insert("remove".into(), Value::Array(r.clone()));
    }
    Value::Object(out)
}

fn retry(r: &RetrySpec) -> Result<Value, Refusal> {
    let mut out = json!({ "attempts": r.attempts.unwrap_or(1) + 1 });
    if !r.codes.is_empty() {
        out["retry_on"] = json!(r.codes.iter().map(|c| c.to_string()).collect::<Vec<_>>());
    }
    if let Some(b) = &r.backoff {
        out["backoff"] = json!({ "base": gateway_duration(b)?, "max": gateway_duration(b)? });
    }
    Ok(out)
}

/// A Gateway API duration (GEP-2257: `1h`, `30s`, `500ms`, and combinations such as
/// `1m30s`) in milliseconds, as a Spur duration string.
pub fn gateway_duration(s: &str) -> Result<String, Refusal> {
    let bad = || unsupported(format!("duration `{s}` is not a Gateway API duration"));
    let mut ms: u64 = 0;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('s') {
            (1000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else {
            return Err(bad());
        };
        ms = ms.saturating_add(n.saturating_mul(unit));
        rest = &rest[len..];
    }
    if ms == 0 {
        return Err(unsupported(
            "a zero timeout (no timeout) is not supported yet",
        ));
    }
    Ok(format!("{ms}ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: Value) -> RouteSpec {
        serde_json::from_value(v).unwrap()
    }

    fn clusters() -> BTreeSet<String> {
        ["web.shop.80", "web-v1.shop.80", "web-v2.shop.80"]
            .map(String::from)
            .into()
    }

    fn run(kind: Kind, v: Value) -> Result<Vec<Value>, Refusal> {
        let s = spec(v);
        let src = Source {
            kind,
            namespace: "shop",
            name: "web",
            spec: &s,
        };
        translate(&src, "web.shop.80", 80, &clusters())
    }

    #[test]
    fn a_split_with_a_header_match_and_filters() {
        let routes = run(
            Kind::Http,
            json!({
                "parentRefs": [{ "group": "", "kind": "Service", "name": "web", "port": 80 }],
                "rules": [{
                    "matches": [{ "path": { "type": "PathPrefix", "value": "/api" },
                                  "headers": [{ "name": "X-Canary", "value": "1" }] }],
                    "filters": [{ "type": "RequestHeaderModifier",
                                  "requestHeaderModifier": { "set": [{ "name": "X-Via", "value": "spur" }], "remove": ["x-debug"] } }],
                    "backendRefs": [{ "name": "web-v1", "port": 80, "weight": 90 },
                                    { "name": "web-v2", "port": 80, "weight": 10 }],
                    "timeouts": { "request": "1m30s" }
                }]
            }),
        )
        .unwrap();
        assert_eq!(
            routes,
            vec![json!({
                "name": "httproute.shop.web.r0.m0.80",
                "match": { "destination": "web.shop.80", "path_prefix": "/api",
                           "headers": [{ "name": "x-canary", "value": "1" }] },
                "split": [{ "cluster": "web-v1.shop.80", "weight": 90 },
                          { "cluster": "web-v2.shop.80", "weight": 10 }],
                "request_headers": { "set": { "x-via": "spur" }, "remove": ["x-debug"] },
                "timeout": "90000ms"
            })]
        );
        // What spur-config makes of it.
        let route: spur_config::Route = serde_json::from_value(routes[0].clone()).unwrap();
        assert_eq!(route.split.len(), 2);
    }

    #[test]
    fn unsupported_parts_refuse_the_whole_route_with_a_reason() {
        let err = run(
            Kind::Http,
            json!({ "rules": [
                { "backendRefs": [{ "name": "web-v1", "port": 80 }] },
                { "filters": [{ "type": "CORS" }], "backendRefs": [{ "name": "web-v1", "port": 80 }] }
            ]}),
        )
        .unwrap_err();
        assert_eq!(
            (err.condition, err.reason),
            ("Accepted", "UnsupportedValue")
        );
        assert!(err.message.contains("CORS"), "{}", err.message);
        let err = run(
            Kind::Http,
            json!({ "rules": [{ "backendRefs": [{ "name": "nope", "port": 80 }] }] }),
        )
        .unwrap_err();
        assert_eq!(
            (err.condition, err.reason),
            ("ResolvedRefs", "BackendNotFound")
        );
        let err = run(
            Kind::Http,
            json!({ "rules": [{ "matches": [{ "queryParams": [{ "name": "a", "value": "b" }] }],
                                "backendRefs": [{ "name": "web-v1", "port": 80 }] }] }),
        )
        .unwrap_err();
        assert!(err.message.contains("queryParams"));
    }

    #[test]
    fn grpc_methods_mirror_and_flags() {
        let routes = run(
            Kind::Grpc,
            json!({ "rules": [{
                "matches": [{ "method": { "service": "shop.Cart", "method": "Get" } }],
                "filters": [{ "type": "RequestMirror", "requestMirror": { "backendRef": { "name": "web-v2", "port": 80 } } },
                            { "type": "ExtensionRef", "extensionRef": { "group": "spur.dev", "kind": "Flag", "name": "beta" } }],
                "backendRefs": [{ "name": "web-v1", "port": 80 }]
            }]}),
        )
        .unwrap();
        assert_eq!(
            routes[0]["match"],
            json!({ "destination": "web.shop.80", "grpc": { "service": "shop.Cart", "method": "Get" }, "flag": "beta" })
        );
        assert_eq!(routes[0]["cluster"], "web-v1.shop.80");
        assert_eq!(
            routes[0]["mirror"],
            json!({ "cluster": "web-v2.shop.80", "percent": 100.0 })
        );
    }

    #[test]
    fn durations() {
        assert_eq!(gateway_duration("500ms").unwrap(), "500ms");
        assert_eq!(gateway_duration("1h").unwrap(), "3600000ms");
        assert!(gateway_duration("1.5s").is_err());
        assert!(gateway_duration("0s").is_err());
    }
}
