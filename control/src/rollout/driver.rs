//! The rollout driver: one task per running rollout, each a loop of "look, then wait".
//!
//! A look ([`tick`]) runs under the control plane's write lock and decides from what is
//! stored now: the rollout's state, the group's current config and the reported traffic.
//! It checks first that the split still carries the weights the rollout wrote (a user's
//! version that changed them wins: the rollout pauses and says which version did it; a
//! version of the rollout's own that never landed, after a crash, is written again), then
//! whether the step's interval is over, then the verdict. Between looks the task waits for
//! the step's end, a new config version or a change of state from the API, whichever
//! comes first.
//!
//! [`run`] is the one place that starts and stops every task: the leader runs it for its
//! term ([`crate::lead`]) and ending it aborts them all; state set through the API on
//! another replica meanwhile is stored and picked up within [`SYNC_EVERY`].

use super::judge::{self, Judgement};
use super::{now_ms, Phase, RolloutState, Verdict, VerdictLabels};
use crate::store::Stored;
use crate::traffic::Totals;
use crate::Control;
use spur_config::{Config, Rollout};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// How often the leader reads the states other control-plane replicas stored.
const SYNC_EVERY: Duration = Duration::from_secs(2);

/// How often a step still short of `min_requests` looks again.
const RECHECK: Duration = Duration::from_millis(500);

/// Starts a task for every running rollout, now and whenever one starts or resumes; ends
/// (with every task) when aborted.
pub async fn run(control: Arc<Control>) {
    let mut changed = control.rollouts.subscribe();
    let mut tasks = JoinSet::new();
    let mut running: HashMap<(String, String), tokio::task::AbortHandle> = HashMap::new();
    let mut sync = tokio::time::interval(SYNC_EVERY);
    sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        running.retain(|_, h| !h.is_finished());
        for (group, name, st) in control.rollouts.all() {
            let key = (group.clone(), name.clone());
            if st.state == Phase::Running && !running.contains_key(&key) {
                let h = tasks.spawn(drive(control.clone(), group, name));
                running.insert(key, h);
            }
        }
        tokio::select! {
            c = changed.changed() => if c.is_err() { return },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            // States other replicas stored (API calls they answered).
            _ = sync.tick() => control.rollouts.sync(&control.store).await,
        }
    }
}

/// What a look decided.
enum Next {
    /// Look again after this long (or sooner, on a change).
    Wait(Duration),
    /// The rollout is no longer running: the task ends.
    Stop,
}

async fn drive(control: Arc<Control>, group: String, name: String) {
    let mut changed = control.rollouts.subscribe();
    let mut versions = control.subscribe(&group);
    loop {
        // Seen before the look: a change made during or after it wakes the next one.
        changed.borrow_and_update();
        versions.borrow_and_update();
        let next = {
            let _write = control.write_lock.lock().await;
            tick(&control, &group, &name).await
        };
        let wait = match next {
            Next::Stop => return,
            Next::Wait(d) => d,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            c = changed.changed() => if c.is_err() { return },
            v = versions.changed() => if v.is_err() { return },
        }
    }
}

/// One look at a running rollout (write lock held).
async fn tick(control: &Control, group: &str, name: &str) -> Next {
    let Some(mut st) = control.rollouts.get(group, name) else {
        return Next::Stop;
    };
    if st.state != Phase::Running {
        return Next::Stop;
    }
    let Some(current) = control.store.current(group) else {
        return Next::Wait(RECHECK); // cannot happen once started: a start writes a version
    };
    let Some(spec) = current.config.rollouts.get(name).cloned() else {
        let reason = format!(
            "version {} ({}) removed the rollout from the config",
            current.version, current.action
        );
        return finish(control, group, name, st, Phase::Aborted, reason).await;
    };
    let Some((l, r, canary)) = spur_config::rollout::locate(&current.config, &spec) else {
        let reason = format!(
            "version {} ({}): route `{}` no longer splits to `{}`",
            current.version, current.action, spec.route, spec.canary
        );
        return finish(control, group, name, st, Phase::Paused, reason).await;
    };
    let split = &current.config.listeners[l].routes[r].split;
    let now_weights: Vec<u32> = split.iter().map(|s| s.weight).collect();
    if now_weights != st.weights {
        if current.version > st.version {
            let shown: Vec<String> = now_weights.iter().map(u32::to_string).collect();
            let reason = format!(
                "version {} ({}) changed route `{}`'s split to {}: the user's change wins; \
                 resume to go on from step {} ({}%)",
                current.version,
                current.action,
                spec.route,
                shown.join("/"),
                st.step,
                st.weight
            );
            return finish(control, group, name, st, Phase::Paused, reason).await;
        }
        // The rollout's own version never landed (a crash between state and config).
        let action = step_action(name, &spec, &st);
        return match write(control, group, name, st, &current, action).await {
            Ok(()) => Next::Wait(Duration::ZERO),
            Err(()) => Next::Wait(RECHECK),
        };
    }
    if current.version > st.version {
        st.version = current.version; // a version that kept the weights (in memory only)
    }
    let now = now_ms();
    let ends = st.step_started_ms + spec.interval.get().as_millis() as u64;
    if now < ends {
        return Next::Wait(Duration::from_millis(ends - now));
    }
    let listener = &current.config.listeners[l].name;
    let (c, b) = sides(control, group, listener, &spec.route, canary, &st, now);
    let Some(j) = judge::judge(&spec, &c, &b) else {
        control.rollouts.set_waiting(group, name, c.requests);
        return Next::Wait(RECHECK);
    };
    verdict(control, group, name, &spec, st, &current, j).await
}

/// The canary's and the baseline's totals since the step began, all proxies merged.
fn sides(
    control: &Control,
    group: &str,
    listener: &str,
    route: &str,
    canary: usize,
    st: &RolloutState,
    now_ms: u64,
) -> (Totals, Totals) {
    let from = st.step_started_ms / 1000;
    let to = now_ms / 1000 + 1;
    let (mut c, mut b) = (Totals::default(), Totals::default());
    for (k, t) in control.traffic.totals(group, from, to) {
        if k.listener != listener || k.route != route {
            continue;
        }
        match k.side {
            Some(s) if s as usize == canary => c.add(&t),
            Some(_) => b.add(&t),
            None => {}
        }
    }
    (c, b)
}

/// Records a verdict and acts on it: the next step, success, or the failure policy.
async fn verdict(
    control: &Control,
    group: &str,
    name: &str,
    spec: &Rollout,
    mut st: RolloutState,
    current: &Stored,
    j: Judgement,
) -> Next {
    let result = if j.pass { "pass" } else { "fail" };
    control
        .metrics
        .rollout_verdicts
        .get_or_create(&VerdictLabels {
            group: group.to_string(),
            rollout: name.to_string(),
            verdict: result.to_string(),
        })
        .inc();
    tracing::info!(
        group,
        rollout = name,
        step = st.step,
        result,
        reason = j.reason,
        "rollout verdict"
    );
    st.verdicts.push(Verdict {
        step: st.step,
        weight: st.weight,
        canary: j.canary,
        baseline: j.baseline,
        result: result.into(),
        reason: j.reason.clone(),
        at: now_ms() / 1000,
    });
    if !j.pass {
        return match spec.on_failure {
            spur_config::OnFailure::Rollback => {
                st.state = Phase::RolledBack;
                st.reason = Some(j.reason.clone());
                set_weight(&mut st, spec, current, 0);
                let action = format!("rollout {name}: rolled back — {}", j.reason);
                match write(control, group, name, st, current, action).await {
                    Ok(()) => Next::Stop,
                    Err(()) => Next::Wait(RECHECK),
                }
            }
            spur_config::OnFailure::Pause => {
                finish(control, group, name, st, Phase::Paused, j.reason).await
            }
        };
    }
    st.step += 1;
    let weight = spec.steps.get(st.step - 1).copied().unwrap_or(100);
    set_weight(&mut st, spec, current, weight);
    st.step_started_ms = now_ms();
    let action = step_action(name, spec, &st);
    if weight >= 100 {
        st.state = Phase::Succeeded;
    }
    match write(control, group, name, st, current, action).await {
        Ok(()) if weight >= 100 => Next::Stop,
        _ => Next::Wait(Duration::ZERO),
    }
}

/// The history action of entering the state's step.
pub(super) fn step_action(name: &str, spec: &Rollout, st: &RolloutState) -> String {
    let step = format!("step {}/{} ({}%)", st.step, spec.steps.len(), st.weight);
    if st.weight >= 100 {
        format!("rollout {name}: succeeded — {step}")
    } else {
        format!("rollout {name}: {step}")
    }
}

/// Sets the canary's percent and the split's weights that follow from it.
pub(super) fn set_weight(st: &mut RolloutState, spec: &Rollout, current: &Stored, weight: u32) {
    let canary = spur_config::rollout::locate(&current.config, spec).map_or(0, |(_, _, c)| c);
    st.weight = weight;
    st.weights = judge::weights(&st.baseline, canary, weight);
}

/// Ends or pauses a rollout without touching the config.
async fn finish(
    control: &Control,
    group: &str,
    name: &str,
    mut st: RolloutState,
    phase: Phase,
    reason: String,
) -> Next {
    tracing::warn!(
        group,
        rollout = name,
        state = phase.as_str(),
        reason,
        "rollout stopped"
    );
    st.state = phase;
    st.reason = Some(reason);
    match control.rollouts.set(control, group, name, st).await {
        Ok(()) => Next::Stop,
        Err(e) => {
            tracing::error!(group, rollout = name, error = %e, "cannot store the rollout state");
            Next::Wait(RECHECK)
        }
    }
}

/// Stores the state, then the config version with the state's weights (write lock held).
pub(super) async fn write(
    control: &Control,
    group: &str,
    name: &str,
    mut st: RolloutState,
    current: &Stored,
    action: String,
) -> Result<(), ()> {
    let Some(cfg) = with_weights(&current.config, name, &st.weights) else {
        return Err(());
    };
    st.version = current.version + 1;
    if let Err(e) = control.rollouts.set(control, group, name, st).await {
        tracing::error!(group, rollout = name, error = %e, "cannot store the rollout state");
        return Err(());
    }
    let discovered = control.discovered_for(&cfg, Some(current));
    let mesh = current.mesh.clone();
    // Another replica's version first (`Ok(None)`): the next look sees it and writes the
    // rollout's version again on top of it.
    match control
        .append(group, Some(current), action, cfg, discovered, mesh)
        .await
    {
        Ok(Some(_)) => Ok(()),
        Ok(None) | Err(_) => Err(()),
    }
}

/// The config with the rollout's split set to `weights`.
fn with_weights(cfg: &Config, name: &str, weights: &[u32]) -> Option<Config> {
    let spec = cfg.rollouts.get(name)?;
    let (l, r, _) = spur_config::rollout::locate(cfg, spec)?;
    let mut cfg = cfg.clone();
    let split = &mut cfg.listeners[l].routes[r].split;
    if split.len() != weights.len() {
        return None;
    }
    for (s, w) in split.iter_mut().zip(weights) {
        s.weight = *w;
    }
    Some(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    const CONFIG: &str = r#"
listeners:
  - name: web
    listen: 127.0.0.1:0
    routes:
      - name: r
        split: [{ cluster: a, weight: WA }, { cluster: b, weight: WB }]
clusters:
  - { name: a, endpoints: ["127.0.0.1:1"] }
  - { name: b, endpoints: ["127.0.0.1:2"] }
rollouts:
  ramp: { route: r, canary: b, steps: [20, 100], interval: 2s }
"#;

    fn config(a: u32, b: u32) -> Config {
        let text = CONFIG
            .replace("WA", &a.to_string())
            .replace("WB", &b.to_string());
        spur_config::load(&text, Some("c.yaml")).unwrap()
    }

    fn split(control: &Control) -> Vec<u32> {
        let cur = control.store.current("g").unwrap();
        let s = &cur.config.listeners[0].routes[0].split;
        s.iter().map(|s| s.weight).collect()
    }

    #[tokio::test]
    async fn a_version_lost_in_a_crash_is_written_again_and_a_users_change_pauses() {
        let dir = std::env::temp_dir().join(format!("spur-rollout-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let control = Control::new(Store::open(&dir).unwrap(), None);
        let put = |version: u64, cfg| {
            control
                .store
                .append("g", version, "put".into(), cfg, Default::default(), None)
        };
        put(1, config(90, 10)).await.unwrap();
        // Saved just before a crash: step 1 at 20%, whose version 2 never landed.
        let st = RolloutState {
            state: Phase::Running,
            step: 1,
            weight: 20,
            weights: vec![80, 20],
            baseline: vec![90, 10],
            version: 2,
            started_at: 0,
            step_started_ms: now_ms(),
            reason: None,
            verdicts: Vec::new(),
            updated_ms: 0,
        };
        control
            .rollouts
            .set(&control, "g", "ramp", st)
            .await
            .unwrap();
        // A restarted control plane finds it running at step 1, its window starting anew.
        let before = now_ms();
        let reloaded = super::super::Rollouts::default();
        reloaded.takeover(&control.store, &control.metrics).await;
        let again = reloaded.get("g", "ramp").unwrap();
        assert_eq!(
            (again.state, again.step, again.version),
            (Phase::Running, 1, 2)
        );
        assert!(again.step_started_ms >= before);

        assert!(matches!(tick(&control, "g", "ramp").await, Next::Wait(_)));
        let cur = control.store.current("g").unwrap();
        assert_eq!(
            (cur.version, cur.action.as_str()),
            (2, "rollout ramp: step 1/2 (20%)")
        );
        assert_eq!(split(&control), vec![80, 20]);
        // Nothing to write twice; the step waits for its interval.
        assert!(matches!(tick(&control, "g", "ramp").await, Next::Wait(d) if d > Duration::ZERO));
        assert_eq!(control.store.current("g").unwrap().version, 2);

        // A user's version with other weights wins.
        put(3, config(60, 40)).await.unwrap();
        assert!(matches!(tick(&control, "g", "ramp").await, Next::Stop));
        let st = control.rollouts.get("g", "ramp").unwrap();
        assert_eq!(st.state, Phase::Paused);
        assert_eq!(
            st.reason.unwrap(),
            "version 3 (put) changed route `r`'s split to 60/40: the user's change wins; \
             resume to go on from step 1 (20%)"
        );
        assert_eq!(split(&control), vec![60, 40]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
