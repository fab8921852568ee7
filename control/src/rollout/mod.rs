//! Rollouts on autopilot: the control plane ramps a canary through the steps of a
//! config's `rollouts.NAME`, judges each step on the whole group's reported traffic, and
//! moves on, rolls back or pauses (SPEC, "Rollouts").
//!
//! Why in the control plane and not a controller beside it: it already holds the versions
//! (each step is one, with a history action that says why), the proxies' traffic merged
//! across the group ([`crate::traffic`], the same totals the console shows), and the
//! rollback. Nothing else needs installing, and nothing can disagree about the numbers.
//!
//! - [`judge`]: the pure decisions (weights at a percent, a step's verdict).
//! - [`driver`]: one task per running rollout, started and stopped from one place
//!   ([`driver::run`], run by the leader: [`crate::lead`]).
//! - [`api`]: `POST .../rollouts/{name}/start|pause|resume|abort`, `GET .../rollouts[/{name}]`.
//!
//! A rollout's state lives in the group's store documents ([`crate::store::Store::save_rollout_state`])
//! and is written before the config version it implies, so a control plane killed at any
//! moment resumes the same step: if the version did not land, the driver writes it again.
//! Every change of state (driver or API) happens under the control plane's write lock, so
//! a user's write and a step change never interleave.

pub mod api;
pub mod driver;
pub mod judge;

use crate::store::Store;
use judge::Figures;
use prometheus_client::encoding::EncodeLabelSet;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;

/// Where a rollout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Idle,
    Running,
    Paused,
    Succeeded,
    RolledBack,
    Aborted,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Running => "running",
            Phase::Paused => "paused",
            Phase::Succeeded => "succeeded",
            Phase::RolledBack => "rolled_back",
            Phase::Aborted => "aborted",
        }
    }
}

/// The judgement of one step, with the numbers it was made on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub step: usize,
    pub weight: u32,
    pub canary: Figures,
    pub baseline: Figures,
    /// `pass` or `fail`.
    pub result: String,
    pub reason: String,
    /// Unix seconds.
    pub at: u64,
}

/// A rollout's state: what is stored, and what `GET .../rollouts/{name}` shows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutState {
    pub state: Phase,
    /// 1-based; 0 before the first start.
    pub step: usize,
    /// The canary's percent now.
    pub weight: u32,
    /// The split's weights as the rollout last wrote them.
    pub weights: Vec<u32>,
    /// The split's weights when the rollout started: the baseline sides share what the
    /// canary leaves in these proportions.
    pub baseline: Vec<u32>,
    /// The newest config version known to carry [`RolloutState::weights`] (or to be about
    /// to: the state is saved before the version is written).
    pub version: u64,
    /// Unix seconds.
    pub started_at: u64,
    /// When the current step's window began, Unix milliseconds. Reset when a stopped
    /// control plane resumes (the traffic of its down time was never reported to it).
    pub step_started_ms: u64,
    /// Why it paused, rolled back or was aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default)]
    pub verdicts: Vec<Verdict>,
    /// When this state was stored, Unix milliseconds: with several control-plane
    /// replicas, the leader takes a state another replica stored (an API call it answered)
    /// when it is newer than its own ([`Rollouts::sync`]).
    #[serde(default)]
    pub updated_ms: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutLabels {
    pub group: String,
    pub rollout: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub group: String,
    pub rollout: String,
    pub verdict: String,
}

type Key = (String, String);

/// Every rollout's state (in [`crate::Control`]), and a signal for the driver.
pub struct Rollouts {
    states: Mutex<HashMap<Key, RolloutState>>,
    /// Canary requests so far in a step still short of `min_requests` (not stored).
    waiting: Mutex<HashMap<Key, u64>>,
    /// Bumped at every change of state: the driver starts tasks for running rollouts and
    /// the tasks look again.
    changed: tokio::sync::watch::Sender<u64>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// No state yet: the leader loads the stored ones when it takes over ([`Rollouts::takeover`]).
impl Default for Rollouts {
    fn default() -> Rollouts {
        Rollouts {
            states: Mutex::default(),
            waiting: Mutex::default(),
            changed: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Rollouts {
    /// The stored states, as this replica starts to lead (at start with `--store dir`). A
    /// rollout that was running resumes its step with a new window (the traffic of the
    /// time without a driver is not in this replica's reports).
    pub async fn takeover(&self, store: &Store, metrics: &crate::Metrics) {
        let now = now_ms();
        let states = store
            .load_rollout_states()
            .await
            .into_iter()
            .map(|(group, name, mut st)| {
                if st.state == Phase::Running {
                    st.step_started_ms = now;
                    tracing::info!(
                        group,
                        rollout = name,
                        step = st.step,
                        weight = st.weight,
                        "rollout resumes its step"
                    );
                }
                ((group, name), st)
            })
            .collect();
        *self.states.lock().unwrap() = states;
        self.publish(metrics);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Takes the stored states newer than this replica's (written by another replica that
    /// answered an API call); announces a change when there was one.
    pub async fn sync(&self, store: &Store) {
        let stored = store.load_rollout_states().await;
        let mut changed = false;
        {
            let mut states = self.states.lock().unwrap();
            for (group, name, st) in stored {
                let key = (group, name);
                if states
                    .get(&key)
                    .is_none_or(|mine| st.updated_ms > mine.updated_ms)
                {
                    states.insert(key, st);
                    changed = true;
                }
            }
        }
        if changed {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    pub fn get(&self, group: &str, name: &str) -> Option<RolloutState> {
        self.states
            .lock()
            .unwrap()
            .get(&(group.to_string(), name.to_string()))
            .cloned()
    }

    /// Every rollout with a state: `(group, name, state)`.
    pub fn all(&self) -> Vec<(String, String, RolloutState)> {
        let mut v: Vec<_> = self
            .states
            .lock()
            .unwrap()
            .iter()
            .map(|((g, n), s)| (g.clone(), n.clone(), s.clone()))
            .collect();
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Stores a new state (durably, first) and announces it. Callers hold the write lock.
    pub(crate) async fn set(
        &self,
        control: &crate::Control,
        group: &str,
        name: &str,
        mut st: RolloutState,
    ) -> Result<(), crate::store::StoreError> {
        st.updated_ms = now_ms().max(st.updated_ms + 1);
        control.store.save_rollout_state(group, name, &st).await?;
        let labels = RolloutLabels {
            group: group.to_string(),
            rollout: name.to_string(),
        };
        control
            .metrics
            .rollout_step
            .get_or_create(&labels)
            .set(st.step as i64);
        let key = (group.to_string(), name.to_string());
        self.waiting.lock().unwrap().remove(&key);
        self.states.lock().unwrap().insert(key, st);
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Canary requests so far in a step still short of `min_requests`.
    fn set_waiting(&self, group: &str, name: &str, requests: u64) {
        self.waiting
            .lock()
            .unwrap()
            .insert((group.to_string(), name.to_string()), requests);
    }

    pub fn waiting(&self, group: &str, name: &str) -> Option<u64> {
        self.waiting
            .lock()
            .unwrap()
            .get(&(group.to_string(), name.to_string()))
            .copied()
    }

    /// Sets the step gauges of the loaded states (when this replica starts to lead).
    pub(crate) fn publish(&self, metrics: &crate::Metrics) {
        for (group, rollout, st) in self.all() {
            metrics
                .rollout_step
                .get_or_create(&RolloutLabels { group, rollout })
                .set(st.step as i64);
        }
    }
}
