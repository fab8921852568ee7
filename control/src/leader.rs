//! Leader election among replicas (`--store kubernetes`): a `coordination.k8s.io/v1` Lease
//! named `spur-control` in the store's namespace. The leader does the work that must happen
//! once: Kubernetes discovery renders, history trimming, rollouts ([`crate::lead`]); every
//! replica answers reads, watches, writes and `certify`.
//!
//! The loop, every quarter of the lease duration:
//! - no Lease: create it naming this replica (409: another replica was first);
//! - this replica holds it: renew (`renewTime`), replaced with the `resourceVersion` just
//!   read as precondition; a 409 means another replica took it;
//! - another replica holds it: take it over (same precondition) only once its record has
//!   not changed for the lease duration *as measured here* since this replica first saw
//!   that record, so clocks that disagree between nodes do not matter; an empty holder (a
//!   leader that stopped cleanly, [`release`]) is taken at once.
//!
//! A leader that cannot renew (API unreachable) steps down after two thirds of the lease
//! duration without a renewal, before any other replica may take over.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The Lease's name.
pub const LEASE: &str = "spur-control";

/// The lease duration by default (`--lease-duration`).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);

/// Whether this replica leads now, and its changes.
pub struct Leadership {
    tx: watch::Sender<bool>,
}

impl Leadership {
    /// The one process of the directory store: the leader from the start.
    pub fn always() -> Arc<Leadership> {
        Arc::new(Leadership {
            tx: watch::channel(true).0,
        })
    }

    /// A replica that leads once [`run`] wins the Lease.
    pub fn elected() -> Arc<Leadership> {
        Arc::new(Leadership {
            tx: watch::channel(false).0,
        })
    }

    pub fn is_leader(&self) -> bool {
        *self.tx.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    fn set(&self, leader: bool, identity: &str) {
        let was = self.tx.send_replace(leader);
        if was != leader {
            if leader {
                tracing::info!(identity, "this replica is now the leader");
            } else {
                tracing::warn!(identity, "this replica is no longer the leader");
            }
        }
    }
}

/// This replica's name in the Lease: the host (pod) name and a random suffix, so a
/// restarted pod is a new holder.
pub fn identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "spur-control".into());
    format!("{host}-{:08x}", fastrand::u32(..))
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// The Lease record last seen held by another replica, and when this replica first saw it.
struct Observed {
    resource_version: Option<String>,
    since: Instant,
}

/// Campaigns for and renews the Lease for as long as the control plane runs.
pub async fn run(
    api: Api<Lease>,
    identity: String,
    duration: Duration,
    leadership: Arc<Leadership>,
) {
    let period = (duration / 4).max(Duration::from_millis(100));
    let mut observed: Option<Observed> = None;
    let mut renewed_at: Option<Instant> = None;
    loop {
        let attempt = tokio::time::timeout(period, step(&api, &identity, duration, &mut observed));
        match attempt.await {
            Ok(Ok(true)) => {
                renewed_at = Some(Instant::now());
                leadership.set(true, &identity);
            }
            Ok(Ok(false)) => leadership.set(false, &identity),
            failed => {
                match failed {
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "leader election: cannot read or write the Lease")
                    }
                    _ => tracing::warn!("leader election: the API did not answer in time"),
                }
                if renewed_at.is_none_or(|t| t.elapsed() >= duration * 2 / 3) {
                    leadership.set(false, &identity);
                }
            }
        }
        tokio::time::sleep(period).await;
    }
}

fn spec_for(identity: &str, duration: Duration, transitions: i32) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(duration.as_secs().max(1) as i32),
        acquire_time: Some(now()),
        renew_time: Some(now()),
        lease_transitions: Some(transitions),
        ..Default::default()
    }
}

/// One round: whether this replica holds the Lease afterwards.
async fn step(
    api: &Api<Lease>,
    identity: &str,
    duration: Duration,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let pp = PostParams::default();
    let Some(mut lease) = api.get_opt(LEASE).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE.into()),
                ..Default::default()
            },
            spec: Some(spec_for(identity, duration, 0)),
        };
        return won(api.create(&pp, &lease).await);
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    if holder.as_deref() == Some(identity) {
        let mut renewed = spec;
        renewed.renew_time = Some(now());
        lease.spec = Some(renewed);
        return won(api.replace(LEASE, &pp, &lease).await);
    }
    let rv = lease.metadata.resource_version.clone();
    if observed.as_ref().is_none_or(|o| o.resource_version != rv) {
        *observed = Some(Observed {
            resource_version: rv,
            since: Instant::now(),
        });
    }
    let theirs = spec
        .lease_duration_seconds
        .map_or(duration, |s| Duration::from_secs(s.max(1) as u64));
    let expired = observed
        .as_ref()
        .is_some_and(|o| o.since.elapsed() >= theirs);
    if holder.is_some() && !expired {
        return Ok(false);
    }
    let transitions = spec.lease_transitions.unwrap_or(0) + 1;
    lease.spec = Some(spec_for(identity, duration, transitions));
    tracing::info!(
        previous = holder.as_deref().unwrap_or(""),
        "leader election: taking over the Lease"
    );
    won(api.replace(LEASE, &pp, &lease).await)
}

/// A write of the Lease: won, lost to another replica (409), or failed.
fn won(result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up (a clean stop), so another replica takes over at once rather than
/// after the lease duration.
pub async fn release(api: &Api<Lease>, identity: &str) {
    let Ok(Some(mut lease)) = api.get_opt(LEASE).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(identity) {
        return;
    }
    spec.holder_identity = None;
    if let Err(e) = api.replace(LEASE, &PostParams::default(), &lease).await {
        tracing::warn!(error = %e, "leader election: cannot release the Lease");
    }
}
