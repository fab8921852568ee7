//! The rollout calls of the control API (token as for every `/v1/` call):
//! `POST /v1/groups/{group}/rollouts/{name}/start|pause|resume|abort` and
//! `GET /v1/groups/{group}/rollouts/{name}` (one rollout's status with every verdict),
//! `GET /v1/groups/{group}/rollouts` (every rollout of the group's config).
//!
//! A change answers the new status, or 404 (no such rollout in the current config) or 409
//! (not from this state, with the state named). Start and abort write a config version
//! (the split at step 1, or the canary at 0%); pause and resume change only the state,
//! except that resuming over weights a user changed writes the step's weights again.

use super::driver::{set_weight, step_action, write};
use super::judge;
use super::{now_ms, Phase, RolloutState};
use crate::api::{error, error_free, Body};
use crate::store::Stored;
use crate::Control;
use http::{Method, Response, StatusCode};
use serde_json::{json, Value};
use spur_config::Rollout;
use std::sync::Arc;

/// Whether `rest` (after `/v1/groups/{group}/`) is a rollout call.
pub fn is_rollout_call(rest: &[&str]) -> bool {
    rest.first() == Some(&"rollouts")
}

pub async fn call(
    control: &Arc<Control>,
    group: &str,
    m: &Method,
    rest: &[&str],
) -> Response<Body> {
    // With several control-plane replicas the leader drives rollouts: read what it (or
    // another replica) stored last before answering or changing a state here.
    if is_rollout_call(rest) && !control.leader.is_leader() {
        control.rollouts.sync(&control.store).await;
    }
    match (m.as_str(), rest) {
        ("GET", ["rollouts"]) => list(control, group),
        ("GET", ["rollouts", name]) => status(control, group, name),
        ("POST", ["rollouts", name, action]) => {
            let _write = control.write_lock.lock().await;
            change(control, group, name, action).await
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "",
            format!(
                "no such endpoint: {m} .../rollouts/{} (use GET .../rollouts/NAME, POST .../rollouts/NAME/start|pause|resume|abort)",
                rest[1..].join("/")
            ),
        ),
    }
}

/// A rollout's status as the API, the CLI and the console show it.
pub fn doc(control: &Control, group: &str, name: &str, current: Option<&Stored>) -> Value {
    let spec = current.and_then(|c| c.config.rollouts.get(name));
    let st = control.rollouts.get(group, name);
    let mut v = match &st {
        Some(st) => json!({
            "state": st.state.as_str(),
            "step": st.step,
            "weight": st.weight,
            "started_at": st.started_at,
            "step_started_at": st.step_started_ms / 1000,
            "verdicts": st.verdicts,
        }),
        None => {
            let weight = current
                .zip(spec)
                .and_then(|(c, s)| {
                    let (l, r, side) = spur_config::rollout::locate(&c.config, s)?;
                    let split = &c.config.listeners[l].routes[r].split;
                    let w: Vec<u32> = split.iter().map(|s| s.weight).collect();
                    Some(judge::canary_percent(&w, side))
                })
                .unwrap_or(0);
            json!({ "state": "idle", "step": 0, "weight": weight, "verdicts": [] })
        }
    };
    v["group"] = json!(group);
    v["name"] = json!(name);
    if let Some(reason) = st.as_ref().and_then(|s| s.reason.as_ref()) {
        v["reason"] = json!(reason);
    }
    if let Some(spec) = spec {
        v["route"] = json!(spec.route);
        v["canary"] = json!(spec.canary);
        v["steps"] = json!(spec.steps);
        v["interval"] = json!(spec.interval.to_string());
        v["min_requests"] = json!(spec.min_requests);
    } else {
        v["removed"] = json!(true);
    }
    if st.as_ref().is_some_and(|s| s.state == Phase::Running) {
        if let Some(n) = control.rollouts.waiting(group, name) {
            v["waiting_for_requests"] = json!({ "canary_requests": n });
        }
    }
    v
}

fn list(control: &Control, group: &str) -> Response<Body> {
    let current = control.store.current(group);
    let mut names: Vec<String> = current
        .as_ref()
        .map(|c| c.config.rollouts.keys().cloned().collect())
        .unwrap_or_default();
    for (g, n, _) in control.rollouts.all() {
        if g == group && !names.contains(&n) {
            names.push(n);
        }
    }
    let docs: Vec<Value> = names
        .iter()
        .map(|n| doc(control, group, n, current.as_deref()))
        .collect();
    error_free(json!({ "group": group, "rollouts": docs }))
}

fn status(control: &Control, group: &str, name: &str) -> Response<Body> {
    let current = control.store.current(group);
    let known = current
        .as_ref()
        .is_some_and(|c| c.config.rollouts.contains_key(name))
        || control.rollouts.get(group, name).is_some();
    if !known {
        return no_such(group, name, current.as_deref());
    }
    error_free(doc(control, group, name, current.as_deref()))
}

fn no_such(group: &str, name: &str, current: Option<&Stored>) -> Response<Body> {
    let names: Vec<&str> = current
        .map(|c| c.config.rollouts.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let known = if names.is_empty() {
        "it has none".to_string()
    } else {
        format!("its rollouts: {}", names.join(", "))
    };
    error(
        StatusCode::NOT_FOUND,
        "rollout",
        format!("group `{group}` has no rollout `{name}` in its config ({known}); add one under `rollouts:` with PUT .../config"),
    )
}

fn conflict(name: &str, st: &RolloutState, what: &str) -> Response<Body> {
    error(
        StatusCode::CONFLICT,
        "state",
        format!(
            "rollout `{name}` is {} (step {}, {}%): {what}",
            st.state.as_str(),
            st.step,
            st.weight
        ),
    )
}

/// start, pause, resume or abort (write lock held).
async fn change(control: &Control, group: &str, name: &str, action: &str) -> Response<Body> {
    if !matches!(action, "start" | "pause" | "resume" | "abort") {
        return error(
            StatusCode::NOT_FOUND,
            "",
            format!("no such rollout action `{action}` (start, pause, resume, abort)"),
        );
    }
    let current = control.store.current(group);
    let Some((current, spec)) = current.as_ref().and_then(|c| {
        let spec = c.config.rollouts.get(name)?.clone();
        Some((c.clone(), spec))
    }) else {
        return no_such(group, name, current.as_deref());
    };
    let st = control.rollouts.get(group, name);
    let result = match (action, st) {
        ("start", Some(st)) if matches!(st.state, Phase::Running | Phase::Paused) => {
            return conflict(name, &st, "pause or abort it first, or resume it")
        }
        ("start", _) => start(control, group, name, &spec, &current).await,
        ("pause", Some(mut st)) if st.state == Phase::Running => {
            st.state = Phase::Paused;
            st.reason = Some("paused through the API".into());
            control
                .rollouts
                .set(control, group, name, st)
                .await
                .map_err(|e| e.to_string())
        }
        ("resume", Some(st)) if st.state == Phase::Paused => {
            resume(control, group, name, &spec, &current, st).await
        }
        ("abort", Some(mut st)) if matches!(st.state, Phase::Running | Phase::Paused) => {
            st.state = Phase::Aborted;
            st.reason = Some("aborted through the API".into());
            set_weight(&mut st, &spec, &current, 0);
            let action = format!("rollout {name}: aborted — canary at 0%");
            write(control, group, name, st, &current, action)
                .await
                .map_err(|()| "cannot store".into())
        }
        (_, Some(st)) => return conflict(name, &st, &format!("cannot {action} it")),
        (_, None) => {
            return error(
                StatusCode::CONFLICT,
                "state",
                format!("rollout `{name}` is idle (never started): cannot {action} it"),
            )
        }
    };
    match result {
        Ok(()) => {
            let current = control.store.current(group);
            error_free(doc(control, group, name, current.as_deref()))
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "", e),
    }
}

async fn start(
    control: &Control,
    group: &str,
    name: &str,
    spec: &Rollout,
    current: &Stored,
) -> Result<(), String> {
    let (l, r, _) = spur_config::rollout::locate(&current.config, spec)
        .ok_or_else(|| format!("route `{}` does not split to `{}`", spec.route, spec.canary))?;
    let baseline: Vec<u32> = current.config.listeners[l].routes[r]
        .split
        .iter()
        .map(|s| s.weight)
        .collect();
    let now = now_ms();
    let mut st = RolloutState {
        updated_ms: 0,
        state: Phase::Running,
        step: 1,
        weight: 0,
        weights: Vec::new(),
        baseline,
        version: current.version,
        started_at: now / 1000,
        step_started_ms: now,
        reason: None,
        verdicts: Vec::new(),
    };
    set_weight(
        &mut st,
        spec,
        current,
        spec.steps.first().copied().unwrap_or(100),
    );
    if st.weight >= 100 {
        st.state = Phase::Succeeded;
    }
    let action = step_action(name, spec, &st);
    write(control, group, name, st, current, action)
        .await
        .map_err(|()| "cannot store".into())
}

async fn resume(
    control: &Control,
    group: &str,
    name: &str,
    spec: &Rollout,
    current: &Stored,
    mut st: RolloutState,
) -> Result<(), String> {
    let (l, r, _) = spur_config::rollout::locate(&current.config, spec)
        .ok_or_else(|| format!("route `{}` does not split to `{}`", spec.route, spec.canary))?;
    let split = &current.config.listeners[l].routes[r].split;
    if split.len() != st.baseline.len() {
        // The user changed the split's sides: the baseline shares are theirs now.
        st.baseline = split.iter().map(|s| s.weight).collect();
    }
    st.state = Phase::Running;
    st.reason = None;
    st.step_started_ms = now_ms();
    let weight = st.weight;
    set_weight(&mut st, spec, current, weight);
    let unchanged = split
        .iter()
        .map(|s| s.weight)
        .eq(st.weights.iter().copied());
    if unchanged {
        st.version = current.version;
        return control
            .rollouts
            .set(control, group, name, st)
            .await
            .map_err(|e| e.to_string());
    }
    let action = format!("{} (resumed)", step_action(name, spec, &st));
    write(control, group, name, st, current, action)
        .await
        .map_err(|()| "cannot store".into())
}
