//! The Grafana dashboard (`deploy/grafana/spur.json`) and the Prometheus rules
//! (`deploy/prometheus/spur-rules.yaml`) against what Spur really exposes: a proxy and a
//! control plane run, serve traffic (a retry, a flag, a breaker), and are scraped; every
//! query of the dashboard and every rule expression may name only metrics found there, and
//! only labels those metrics carry (or that Prometheus adds: `job`, `instance`, `le`). The
//! rules file must parse as Prometheus reads it: groups of rules, each alert with an
//! expression, a `for` duration, a severity and a summary.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use std::collections::{BTreeMap, BTreeSet};

/// Metric names as queries see them, with the label names seen on their samples.
type Exposed = BTreeMap<String, BTreeSet<String>>;

/// Reads a Prometheus/OpenMetrics text exposition.
fn exposed(text: &str, into: &mut Exposed) {
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut w = rest.split_whitespace();
            let (Some(name), Some(kind)) = (w.next(), w.next()) else {
                continue;
            };
            let names: Vec<String> = match kind {
                "counter" => vec![format!("{name}_total")],
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect(),
                "info" => vec![format!("{name}_info")],
                _ => vec![name.to_string()],
            };
            for n in names {
                into.entry(n).or_default();
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let Some((name, labels)) = line.split_once('{') else {
                continue;
            };
            let set = into.entry(name.to_string()).or_default();
            let mut rest = labels;
            while let Some((key, after)) = rest.split_once("=\"") {
                set.insert(key.trim_start_matches(',').to_string());
                // Skip the value (no escaped quotes in Spur's label values).
                rest = after.split_once('"').map_or("", |(_, r)| r);
            }
        }
    }
}

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    Punct(char),
    Var(String),
}

fn tokens(expr: &str) -> Result<Vec<Tok>, String> {
    let c: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut depth = [0i32; 3];
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            q @ ('"' | '\'' | '`') => {
                i += 1;
                while i < c.len() && c[i] != q {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
                if i >= c.len() {
                    return Err("an unclosed string".into());
                }
            }
            '[' => {
                // A range or subquery: `[5m]`, `[$__rate_interval]`.
                let end = c[i..]
                    .iter()
                    .position(|x| *x == ']')
                    .ok_or("an unclosed [")?;
                let inside: String = c[i + 1..i + end].iter().collect();
                if inside.trim().is_empty() {
                    return Err("an empty range []".into());
                }
                if let Some(v) = inside.trim().strip_prefix('$') {
                    out.push(Tok::Var(v.to_string()));
                }
                i += end;
            }
            '$' => {
                let start = i + 1;
                while i + 1 < c.len() && (c[i + 1].is_alphanumeric() || c[i + 1] == '_') {
                    i += 1;
                }
                out.push(Tok::Var(c[start..=i].iter().collect()));
            }
            x if x.is_alphabetic() || x == '_' || x == ':' => {
                let start = i;
                while i + 1 < c.len()
                    && (c[i + 1].is_alphanumeric() || matches!(c[i + 1], '_' | ':'))
                {
                    i += 1;
                }
                out.push(Tok::Ident(c[start..=i].iter().collect()));
            }
            p @ ('(' | ')' | '{' | '}' | ']') => {
                let (k, d) = match p {
                    '(' => (0, 1),
                    ')' => (0, -1),
                    '{' => (1, 1),
                    '}' => (1, -1),
                    _ => (2, -1),
                };
                depth[k] += d;
                if depth[k] < 0 {
                    return Err(format!("an unmatched `{p}`"));
                }
                out.push(Tok::Punct(p));
            }
            p if !p.is_whitespace() => out.push(Tok::Punct(p)),
            _ => {}
        }
        i += 1;
    }
    if depth != [0, 0, 0] {
        return Err("unbalanced brackets".into());
    }
    Ok(out)
}

/// What is wrong with a PromQL expression against what Spur exposes (empty: nothing).
fn check(expr: &str, exposed: &Exposed, vars: &[&str]) -> Vec<String> {
    let toks = match tokens(expr) {
        Ok(t) => t,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    let mut metrics = Vec::new();
    let mut labels = BTreeSet::new();
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Var(v) if !vars.contains(&v.as_str()) => {
                problems.push(format!("unknown variable ${v}"))
            }
            Tok::Ident(name) if name.starts_with("spur_") => {
                if !exposed.contains_key(name) {
                    problems.push(format!("`{name}` is not a metric Spur exposes"));
                }
                metrics.push(name.clone());
                if toks.get(i + 1) == Some(&Tok::Punct('{')) {
                    i += 2;
                    while i < toks.len() && toks[i] != Tok::Punct('}') {
                        if let (Tok::Ident(l), Some(Tok::Punct('=' | '!'))) =
                            (&toks[i], toks.get(i + 1))
                        {
                            labels.insert(l.clone());
                        }
                        i += 1;
                    }
                }
            }
            Tok::Ident(kw)
                if matches!(kw.as_str(), "by" | "without" | "on" | "ignoring")
                    && toks.get(i + 1) == Some(&Tok::Punct('(')) =>
            {
                i += 2;
                while i < toks.len() && toks[i] != Tok::Punct(')') {
                    if let Tok::Ident(l) = &toks[i] {
                        labels.insert(l.clone());
                    }
                    i += 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    if metrics.is_empty() {
        problems.push("names no Spur metric".into());
    }
    let known: BTreeSet<&String> = metrics
        .iter()
        .filter_map(|m| exposed.get(m))
        .flatten()
        .collect();
    for l in &labels {
        if !known.contains(l) && !matches!(l.as_str(), "job" | "instance" | "le") {
            problems.push(format!("label `{l}` is on none of {metrics:?}"));
        }
    }
    problems
}

/// The proxy's metric families as `proxy/src/metrics/mod.rs` declares them (a family with
/// no series yet, such as TLS handshake errors on a proxy without TLS, is not in a scrape):
/// each name with its type's suffixes and its label set's fields.
fn declared(into: &mut Exposed) {
    let src = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy/src/metrics/mod.rs"),
    )
    .unwrap();
    let mut structs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current = None;
    for line in src.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("pub struct ") {
            current = rest.split_whitespace().next().map(String::from);
            continue;
        }
        if line == "}" {
            current = None;
        }
        if let (Some(name), Some(field)) = (&current, line.strip_prefix("pub ")) {
            if let Some((f, _)) = field.split_once(':') {
                structs
                    .entry(name.clone())
                    .or_default()
                    .insert(f.to_string());
            }
        }
    }
    structs.insert(
        "Side".into(),
        ["listener", "cluster"].map(String::from).into(),
    );
    structs.insert(
        "SideReasonLabels".into(),
        ["listener", "cluster", "reason"].map(String::from).into(),
    );
    let body = src
        .split("define_metrics! {")
        .nth(1)
        .expect("the metrics table");
    let mut decl: Option<(String, String)> = None;
    for line in body.lines().map(str::trim) {
        if line.starts_with("///") {
            continue;
        }
        if let Some(name) = line.strip_prefix('"').and_then(|l| l.split('"').next()) {
            let Some((labels, kind)) = decl.take() else {
                continue;
            };
            let names: Vec<String> = if kind.starts_with("Counter") {
                vec![format!("{name}_total")]
            } else if kind.starts_with("Histogram") {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .map(|s| format!("{name}{s}"))
                    .collect()
            } else {
                vec![name.to_string()]
            };
            let set = structs.get(&labels).cloned().unwrap_or_default();
            for n in names {
                let entry = into.entry(n).or_default();
                if entry.is_empty() {
                    entry.extend(set.iter().cloned());
                }
            }
        } else if let Some((_, ty)) = line.split_once(": ") {
            let ty = ty.split(" = ").next().unwrap_or("");
            decl = Some(match ty.strip_prefix("Family<") {
                Some(inner) => {
                    let (l, k) = inner.split_once(", ").unwrap_or((inner, ""));
                    (l.to_string(), k.to_string())
                }
                None => (String::new(), ty.to_string()),
            });
        }
    }
}

/// Scrapes a proxy (with traffic that fills its series) and a control plane.
async fn scrape_spur() -> Exposed {
    let app = backend(|req: Request<Incoming>| async move {
        let status = if req.uri().path().starts_with("/fail") {
            503
        } else {
            200
        };
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap()
    })
    .await;
    let proxy = start_proxy(&format!(
        r#"
admin: {{ listen: "127.0.0.1:0" }}
listeners:
  - name: web
    listen: "127.0.0.1:0"
    routes:
      - name: api
        match: {{ path_prefix: / }}
        cluster: app
        retry: {{ attempts: 2, retry_on: ["503"] }}
clusters:
  - name: app
    endpoints: ["{}"]
    circuit_breaker: {{ consecutive_failures: 100 }}
flags:
  beta: {{ enabled: true }}
"#,
        app.addr
    ))
    .await;
    let web = proxy.listener_addr("web").unwrap();
    for path in ["/ok", "/fail", "/ok"] {
        get(web, path, &[]).await;
    }
    let mut all = Exposed::new();
    exposed(
        &get(proxy.admin_addr().unwrap(), "/metrics", &[])
            .await
            .text(),
        &mut all,
    );

    let (cp, _dir) = start_control(None).await;
    let report = r#"{"applied_version": 0, "certificate_expires_at": 2000000000}"#;
    let (s, _) = call(
        cp.addr,
        "POST",
        "/v1/groups/g/proxies/n/status",
        Some(report),
        None,
    )
    .await;
    assert_eq!(s, 200);
    exposed(&get(cp.addr, "/metrics", &[]).await.text(), &mut all);
    declared(&mut all);
    assert!(
        all["spur_tls_handshake_errors_total"].contains("reason"),
        "{all:?}"
    );
    assert!(
        all["spur_requests_total"].contains("route"),
        "{:?}",
        all["spur_requests_total"]
    );
    assert!(all["spur_control_proxy_certificate_expiry_timestamp_seconds"].contains("node"));
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_rules_name_only_what_spur_exposes() {
    let all = scrape_spur().await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));

    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/spur.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    assert_eq!(dash["uid"], "spur-mesh");
    let vars: Vec<String> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    let mut known_vars: Vec<&str> = vars.iter().map(String::as_str).collect();
    known_vars.extend(["__rate_interval", "__interval", "__range"]);
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            let metric = q
                .trim_start_matches("label_values(")
                .split(',')
                .next()
                .unwrap();
            assert!(
                all.contains_key(metric),
                "variable {}: `{metric}` not exposed",
                v["name"]
            );
        }
    }
    let mut exprs = Vec::new();
    let mut titles = BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().unwrap();
        for t in p["targets"].as_array().expect("every panel has queries") {
            exprs.push((title.to_string(), t["expr"].as_str().unwrap().to_string()));
        }
        titles.insert(title.to_string());
    }
    let mut problems = Vec::new();
    for (title, e) in &exprs {
        for p in check(e, &all, &known_vars) {
            problems.push(format!("panel `{title}`: {p}\n  {e}"));
        }
    }
    // What the dashboard is for: each of these is charted.
    let text = exprs
        .iter()
        .map(|(_, e)| e.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for needed in [
        "spur_requests_total",
        "spur_request_duration_seconds_bucket",
        "spur_retries_total",
        "spur_endpoint_ejected",
        "spur_circuit_open_total",
        "spur_config_version",
        "spur_flag_evaluations_total",
        "spur_tls_handshake_errors_total",
    ] {
        if !text.contains(needed) {
            problems.push(format!("the dashboard charts no `{needed}`"));
        }
    }

    let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root.join("deploy/prometheus/spur-rules.yaml")).unwrap(),
    )
    .expect("the rules file is YAML");
    let mut alerts = BTreeMap::new();
    for g in rules["groups"].as_sequence().expect("groups: [...]") {
        let group = g["name"].as_str().expect("each group has a name");
        for r in g["rules"].as_sequence().expect("each group has rules") {
            let name = r["alert"]
                .as_str()
                .expect("each rule is an alert")
                .to_string();
            let expr = r["expr"]
                .as_str()
                .expect("each alert has an expr")
                .to_string();
            if let Some(f) = r.get("for") {
                let f = f.as_str().unwrap();
                assert!(
                    f.parse::<spur_config::Duration>().is_ok(),
                    "{name}: `for: {f}` is not a duration"
                );
            }
            assert!(r["labels"]["severity"].is_string(), "{name}: no severity");
            assert!(
                r["annotations"]["summary"].is_string(),
                "{name}: no summary"
            );
            for p in check(&expr, &all, &[]) {
                problems.push(format!("rule `{group}/{name}`: {p}\n  {expr}"));
            }
            assert!(
                alerts.insert(name, expr).is_none(),
                "alert names are unique"
            );
        }
    }
    // What the rules are for.
    for (what, needle) in [
        ("success rate", "spur_requests_total{code=~\"5..|0\"}"),
        ("p99", "histogram_quantile(0.99"),
        ("ejected endpoints", "spur_endpoint_ejected"),
        (
            "rejected configs",
            "spur_config_updates_total{result=\"rejected\"}",
        ),
        (
            "certificates near expiry",
            "spur_control_proxy_certificate_expiry_timestamp_seconds",
        ),
    ] {
        if !alerts.values().any(|e| e.contains(needle)) {
            problems.push(format!("no alert on {what} (`{needle}`)"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_checker_catches_what_it_must() {
    let mut all = Exposed::new();
    exposed(
        "# TYPE spur_requests counter\nspur_requests_total{listener=\"w\",route=\"r\",cluster=\"c\",code=\"200\"} 1\n",
        &mut all,
    );
    let ok = "sum by (route) (rate(spur_requests_total{code=~\"5..\"}[5m]))";
    assert!(
        check(ok, &all, &[]).is_empty(),
        "{:?}",
        check(ok, &all, &[])
    );
    let bad = [
        ("rate(spur_request_total[5m])", "not a metric"),
        (
            "sum by (rout) (rate(spur_requests_total[5m]))",
            "label `rout`",
        ),
        ("rate(spur_requests_total{node=\"a\"}[5m])", "label `node`"),
        ("sum(rate(spur_requests_total[5m])", "unbalanced"),
        ("rate(spur_requests_total[$nope])", ""),
        ("up", "names no Spur metric"),
    ];
    for (e, why) in bad {
        let p = check(e, &all, &[]);
        assert!(
            p.iter().any(|p| p.contains(why)) || (why.is_empty() && !p.is_empty()),
            "{e}: {p:?}"
        );
    }
}
