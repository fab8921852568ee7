//! The control API: JSON over HTTP, per SPEC's table. Handlers validate with spur-config
//! before anything is stored, and answer errors as `{"errors": [{"path", "message"}]}`.

use crate::store::{valid_group, Stored};
use crate::Control;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{json, Value};
use spur_config::{Config, FieldError, FlagRule, Format};
use std::sync::Arc;

pub type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// Largest request body accepted (a config).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

fn full(status: StatusCode, value: &Value) -> Response<Body> {
    let mut text = serde_json::to_vec(value).unwrap_or_default();
    text.push(b'\n');
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(
            Full::new(Bytes::from(text))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("static parts are valid")
}

/// A 200 answer with this JSON document.
pub fn error_free(value: Value) -> Response<Body> {
    full(StatusCode::OK, &value)
}

pub fn error(status: StatusCode, path: &str, message: impl Into<String>) -> Response<Body> {
    full(
        status,
        &json!({ "errors": [{ "path": path, "message": message.into() }] }),
    )
}

fn errors(status: StatusCode, errs: &[FieldError]) -> Response<Body> {
    full(status, &json!({ "errors": errs }))
}

fn config_doc(s: &Stored) -> Value {
    json!({ "version": s.version, "config": s.config })
}

/// What the group's proxies receive for this version: `k8s:` clusters rendered to
/// endpoint lists.
fn rendered_doc(s: &Stored) -> Value {
    json!({ "version": s.version, "config": crate::mesh::merge::rendered(s) })
}

/// `?rendered=true` (or `1`) asks for the config as proxies receive it.
fn wants_rendered(query: Option<&str>) -> bool {
    query
        .unwrap_or("")
        .split('&')
        .any(|p| matches!(p.split_once('='), Some(("rendered", "true" | "1"))) || p == "rendered")
}

/// Whether the query has `key=value` (`value` also as `1` when it is `true`).
fn query_has(query: Option<&str>, key: &str, value: &str) -> bool {
    query.unwrap_or("").split('&').any(|p| {
        p.split_once('=')
            .is_some_and(|(k, v)| k == key && (v == value || (value == "true" && v == "1")))
    })
}

fn authorized(control: &Control, req: &Request<Incoming>) -> bool {
    let Some(token) = &control.token else {
        return true;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    crate::join::same_token(given.trim().as_bytes(), token.as_bytes())
}

pub(crate) async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "",
            format!("body larger than {MAX_BODY} bytes, or unreadable"),
        )),
    }
}

/// Runs a parse of a request body on the blocking pool, at most as many at once as the
/// machine has cores: a YAML document can be slow to parse (deep nesting, many aliases),
/// and on the request threads two such bodies would stall every other call, `/healthz`
/// and the watch streams included. Waiting bodies queue here; each is at most
/// [`MAX_BODY`] and each connection sends one at a time.
async fn off_thread<T: Send + 'static>(
    control: &Control,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response<Body>> {
    let _slot = control
        .parse_slots
        .acquire()
        .await
        .map_err(|_| error(StatusCode::SERVICE_UNAVAILABLE, "", "shutting down"))?;
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        tracing::error!(error = %e, "a request body parse failed");
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "",
            "the body could not be parsed",
        )
    })
}

fn parse_config(
    text: &str,
    json_type: bool,
    rules: spur_config::Rules,
) -> Result<Config, Vec<FieldError>> {
    let format = if json_type {
        Format::Json
    } else {
        Format::detect(None, text)
    };
    spur_config::load_text(text, format, rules).map_err(|e| e.errors)
}

fn is_json(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"))
}

/// A body field that a JSON or YAML document carries.
fn parse_doc<T: for<'de> Deserialize<'de>>(text: &[u8], json_type: bool) -> Result<T, String> {
    let s = std::str::from_utf8(text).map_err(|_| "body is not UTF-8".to_string())?;
    let format = if json_type || s.trim_start().starts_with('{') {
        Format::Json
    } else {
        Format::Yaml
    };
    spur_config::check_depth(s, format)?;
    if format == Format::Json {
        serde_json::from_str(s).map_err(|e| e.to_string())
    } else {
        serde_yaml_ng::from_str(s).map_err(|e| e.to_string())
    }
}

/// Answers one call of the control API (or the console), with the security headers.
pub async fn route(control: Arc<Control>, req: Request<Incoming>) -> Response<Body> {
    crate::console::secure(dispatch(control, req).await)
}

async fn dispatch(control: Arc<Control>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), segs.as_slice()) {
        ("GET", ["healthz"]) => {
            let health = json!({
                "status": "ok",
                "leader": control.leader.is_leader(),
                "store": control.store.kind(),
                "synced": control.store.synced(),
            });
            return full(StatusCode::OK, &health);
        }
        // Readiness: a replica serves reads and watches once its store has every version.
        ("GET", ["readyz"]) => {
            let synced = control.store.synced();
            let status = if synced {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            return full(status, &json!({ "synced": synced }));
        }
        ("GET", ["metrics"]) => {
            return Response::builder()
                .header(
                    header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
                .body(
                    Full::new(Bytes::from(control.metrics.encode()))
                        .map_err(|never| match never {})
                        .boxed(),
                )
                .expect("static parts are valid")
        }
        ("GET", ["ui", ..]) => {
            if let Some(page) = crate::console::ui(&path) {
                return page;
            }
        }
        _ => {}
    }
    if segs.first() != Some(&"v1") {
        return error(
            StatusCode::NOT_FOUND,
            "",
            format!("no such endpoint: {method} {path}"),
        );
    }
    // Proxies joining the mesh have a join token, not the API token.
    if method == Method::POST && segs == ["v1", "identity", "certify"] {
        return crate::certify::certify(&control, req).await;
    }
    if !authorized(&control, &req) {
        control.metrics.unauthorized.inc();
        return error(
            StatusCode::UNAUTHORIZED,
            "",
            "missing or wrong bearer token",
        );
    }
    match (method.clone(), &segs[1..]) {
        (Method::GET, ["proxies"]) => {
            full(StatusCode::OK, &crate::shared_proxies::merged(&control))
        }
        (Method::GET, ["groups"]) => crate::console::groups(&control),
        (Method::GET, ["mesh", "pods", ns, name]) => crate::mesh::pod_doc(&control, ns, name),
        (Method::POST, ["identity", "certify"]) => error(
            StatusCode::NOT_FOUND,
            "",
            "this control plane is not a mesh CA: start it with --ca-dir DIR",
        ),
        (m, ["groups", group, rest @ ..]) => {
            if !valid_group(group) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "group",
                    format!("`{group}` is not a group name (letters, digits, -, _, .)"),
                );
            }
            let group = group.to_string();
            match (m, rest) {
                (Method::PUT, ["config"]) => put_config(&control, &group, req).await,
                (Method::GET, ["config"]) => match control.store.current(&group) {
                    Some(s) if wants_rendered(req.uri().query()) => {
                        full(StatusCode::OK, &rendered_doc(&s))
                    }
                    Some(s) if query_has(req.uri().query(), "format", "yaml") => full(
                        StatusCode::OK,
                        &json!({ "version": s.version, "yaml": crate::console::yaml(&s.config) }),
                    ),
                    Some(s) => full(StatusCode::OK, &config_doc(&s)),
                    None => error(
                        StatusCode::NOT_FOUND,
                        "",
                        format!("group `{group}` has no config"),
                    ),
                },
                (Method::GET, ["history"]) => {
                    let versions: Vec<Value> = control
                        .store
                        .history(&group)
                        .iter()
                        .map(|s| {
                            let mut v = json!({ "version": s.version, "created_at": s.created_at, "action": s.action, "config": s.config });
                            if !s.discovered.is_empty() {
                                v["discovered"] = json!(s.discovered);
                            }
                            v
                        })
                        .collect();
                    full(
                        StatusCode::OK,
                        &json!({ "group": group, "versions": versions }),
                    )
                }
                (Method::POST, ["rollback"]) => rollback(&control, &group, req).await,
                (Method::PATCH, ["flags", flag]) => {
                    let flag = flag.to_string();
                    patch_flag(&control, &group, &flag, req).await
                }
                (Method::GET, ["watch"]) => {
                    crate::watch::watch(&control, &group, req.uri().query())
                }
                (Method::POST, ["proxies", node, "status"]) => {
                    let node = node.to_string();
                    report_status(&control, &group, &node, req).await
                }
                (m, rest) if crate::rollout::api::is_rollout_call(rest) => {
                    crate::rollout::api::call(&control, &group, &m, rest).await
                }
                (m, rest) if crate::console::is_console_call(&m, rest) => {
                    crate::console::call(&control, &group, &m, rest, req).await
                }
                _ => error(
                    StatusCode::NOT_FOUND,
                    "",
                    format!("no such endpoint: {method} {path}"),
                ),
            }
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "",
            format!("no such endpoint: {method} {path}"),
        ),
    }
}

async fn put_config(control: &Arc<Control>, group: &str, req: Request<Incoming>) -> Response<Body> {
    let json_type = is_json(&req);
    let dry_run = query_has(req.uri().query(), "dry_run", "true");
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Ok(text) = String::from_utf8(body.to_vec()) else {
        return error(StatusCode::BAD_REQUEST, "", "body is not UTF-8");
    };
    let rules = control.rules();
    let (c, g) = (control.clone(), group.to_string());
    let parsed = match off_thread(control, move || {
        if c.mesh.is_some() {
            // Mesh mode: what the user writes may use the rendered clusters; the config the
            // proxies will receive (theirs merged over the mesh) is what must be valid.
            let format = if json_type {
                Format::Json
            } else {
                Format::detect(None, &text)
            };
            spur_config::parse(&text, format)
                .map_err(|e| e.errors)
                .and_then(|cfg| c.check(&g, &cfg).map(|()| cfg))
        } else {
            parse_config(&text, json_type, rules)
        }
    })
    .await
    {
        Ok(p) => p,
        Err(r) => return r,
    };
    match parsed {
        Ok(cfg) if dry_run => full(
            StatusCode::OK,
            &json!({ "valid": true, "summary": spur_config::summary(&cfg) }),
        ),
        Ok(cfg) => control.commit(group, "put".into(), cfg).await,
        Err(errs) => {
            control.metrics.writes_rejected.inc();
            errors(StatusCode::BAD_REQUEST, &errs)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    version: u64,
}

async fn rollback(control: &Arc<Control>, group: &str, req: Request<Incoming>) -> Response<Body> {
    let json_type = is_json(&req);
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let rb = off_thread(control, move || parse_doc::<RollbackBody>(&body, json_type)).await;
    let rb = match rb {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, "version", e),
        Err(r) => return r,
    };
    let Some(old) = control.store.get(group, rb.version) else {
        return error(
            StatusCode::NOT_FOUND,
            "version",
            format!("group `{group}` has no version {}", rb.version),
        );
    };
    // A config valid when stored may not be under today's rules; check again. Its `k8s:`
    // clusters get today's endpoints: a rollback restores what the user wrote.
    if let Err(e) = control.check(group, &old.config) {
        return errors(StatusCode::BAD_REQUEST, &e);
    }
    control
        .commit(
            group,
            format!("rollback to {}", rb.version),
            old.config.clone(),
        )
        .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlagPatch {
    enabled: Option<bool>,
    rules: Option<Vec<FlagRule>>,
}

async fn patch_flag(
    control: &Arc<Control>,
    group: &str,
    flag: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let json_type = is_json(&req);
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let patch = off_thread(control, move || parse_doc::<FlagPatch>(&body, json_type)).await;
    let patch = match patch {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, "", e),
        Err(r) => return r,
    };
    if patch.enabled.is_none() && patch.rules.is_none() {
        return error(StatusCode::BAD_REQUEST, "", "give `enabled` and/or `rules`");
    }
    // A read-modify-write of the newest version, built again if another replica wrote a
    // newer one first: two patches never lose each other.
    control
        .commit_with(group, |current| {
            let cfg = flag_patched(control, group, flag, current, &patch)?;
            Ok((format!("flag {flag}"), cfg))
        })
        .await
}

/// The config of `current` with the flag changed as `patch` says, validated.
fn flag_patched(
    control: &Control,
    group: &str,
    flag: &str,
    current: Option<&Stored>,
    patch: &FlagPatch,
) -> Result<spur_config::Config, Box<Response<Body>>> {
    let Some(current) = current else {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            "",
            format!("group `{group}` has no config"),
        )));
    };
    let mut cfg = current.config.clone();
    // A typo must not "succeed" by creating a flag nothing uses: flags are made by PUT.
    let Some(entry) = cfg.flags.get_mut(flag) else {
        let known: Vec<&str> = current.config.flags.keys().map(String::as_str).collect();
        let known = if known.is_empty() {
            "it has none".to_string()
        } else {
            format!("its flags: {}", known.join(", "))
        };
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            "flag",
            format!(
                "group `{group}` has no flag `{flag}` ({known}); add a flag with PUT .../config"
            ),
        )));
    };
    if let Some(e) = patch.enabled {
        entry.enabled = e;
    }
    if let Some(r) = &patch.rules {
        entry.rules = r.clone();
    }
    if let Err(e) = control.check(group, &cfg) {
        control.metrics.writes_rejected.inc();
        return Err(Box::new(errors(StatusCode::BAD_REQUEST, &e)));
    }
    Ok(cfg)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusReport {
    /// The version the proxy now serves.
    applied_version: Option<u64>,
    /// The version it rejected, and why.
    rejected_version: Option<u64>,
    error: Option<String>,
    /// Requests per second that reached each `scope: group` rate limit (see
    /// [`crate::group_limits`]).
    demand: Option<std::collections::BTreeMap<String, f64>>,
    /// What the proxy's traffic did since its previous report.
    traffic: Option<spur_config::report::Traffic>,
    /// When its workload certificate expires (Unix seconds), when it has one.
    certificate_expires_at: Option<u64>,
}

async fn report_status(
    control: &Arc<Control>,
    group: &str,
    node: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let report: StatusReport = match parse_doc(&body, true) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "", e),
    };
    if let Some(demand) = report.demand {
        control.group_limits.report(group, node, demand);
        if report.applied_version.is_none() && report.error.is_none() {
            // A demand report alone says nothing of versions or errors.
            control.proxies.seen(group, node);
            return full(StatusCode::OK, &json!({ "ok": true }));
        }
    }
    let error_text = match (report.rejected_version, report.error) {
        (Some(v), Some(e)) => Some(format!("version {v} rejected: {e}")),
        (None, Some(e)) => Some(e),
        _ => None,
    };
    control
        .proxies
        .status(group, node, report.applied_version, error_text);
    if let Some(at) = report.certificate_expires_at {
        control.proxies.certificate(group, node, at);
    }
    if let Some(t) = &report.traffic {
        control
            .traffic
            .ingest(group, node, t, crate::traffic::now_secs());
    }
    full(StatusCode::OK, &json!({ "ok": true }))
}
