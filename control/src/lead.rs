//! The work only the leader does, started when this replica becomes the leader and stopped
//! when it stops being one. With `--store dir` the one process leads from the start.
//!
//! - History trimming: at takeover, every group's surplus discovery versions (the leader
//!   also trims after each discovery version it makes, [`crate::store::Store::append`]).
//! - Kubernetes discovery renders: at takeover, every group is rendered against the
//!   endpoints as they are now (a change the old leader had not pushed yet is not lost);
//!   afterwards [`crate::k8s::run`] pushes each change, and
//!   [`crate::Control::refresh_discovery`] does nothing on other replicas.
//! - Mesh renders (`--mesh`) likewise, with [`crate::Control::refresh_mesh`].
//! - Rollouts: the stored states are loaded at takeover and the driver runs for the term
//!   ([`crate::rollout::driver::run`]); API calls answered by other replicas reach it
//!   through the store ([`crate::rollout::Rollouts::sync`]).

use crate::Control;
use std::sync::Arc;

/// Runs the leader's work for as long as the control plane runs.
pub async fn run(control: Arc<Control>) {
    let mut leadership = control.leader.subscribe();
    loop {
        let leading = *leadership.borrow_and_update();
        let work = leading.then(|| tokio::spawn(lead(control.clone())));
        let changed = leadership.changed().await;
        if let Some(w) = work {
            w.abort();
        }
        if changed.is_err() {
            return;
        }
    }
}

/// What the leader does when it takes over; tasks that last for the whole term run here
/// and are aborted when it ends.
async fn lead(control: Arc<Control>) {
    control.store.trim_all().await;
    control.refresh_discovery().await;
    // The mesh (`--mesh`) as the cluster is now; route statuses are written at the next
    // change (the old leader wrote the current ones).
    let _ = control.refresh_mesh().await;
    // Rollouts: the stored states, then every running one driven until the term ends.
    control
        .rollouts
        .takeover(&control.store, &control.metrics)
        .await;
    crate::rollout::driver::run(control).await;
    std::future::pending::<()>().await
}
