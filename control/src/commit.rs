//! Writes of new versions: the next version after the newest this replica knows, built
//! again when another replica made that one first ([`crate::store::StoreError::Conflict`]),
//! and the versions Kubernetes discovery makes (on the leader only).

use crate::store::{StoreError, Stored};
use crate::{api, k8s, Control};
use serde_json::json;
use spur_config::Config;
use std::sync::Arc;

/// How often a write is built again on a newer version after another replica made the
/// one it was for (each retry means another write succeeded, so this bounds only bursts).
const MAX_WRITE_ATTEMPTS: usize = 200;

impl Control {
    /// Stores a validated config as the next version and announces it.
    pub async fn commit(
        &self,
        group: &str,
        action: String,
        cfg: Config,
    ) -> http::Response<api::Body> {
        self.commit_with(group, |_| Ok((action.clone(), cfg.clone())))
            .await
    }

    /// Stores the config `make` builds from the group's newest version (`None`: the group
    /// has none) as the next version. When another replica made that version first, `make`
    /// runs again on the new newest one, so a read-modify-write never loses another's
    /// write. `make` answers an error response to store nothing.
    pub async fn commit_with<F>(&self, group: &str, mut make: F) -> http::Response<api::Body>
    where
        F: FnMut(Option<&Stored>) -> Result<(String, Config), Box<http::Response<api::Body>>>,
    {
        let _write = self.write_lock.lock().await;
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let previous = self.store.current(group);
            let (action, cfg) = match make(previous.as_deref()) {
                Ok(w) => w,
                Err(response) => return *response,
            };
            let discovered = self.discovered_for(&cfg, previous.as_deref());
            let mesh = previous.as_ref().and_then(|p| p.mesh.clone());
            match self
                .append(group, previous.as_deref(), action, cfg, discovered, mesh)
                .await
            {
                Ok(Some(stored)) => return api::error_free(json!({ "version": stored.version })),
                Ok(None) => continue,
                Err(e) => {
                    return api::error(http::StatusCode::INTERNAL_SERVER_ERROR, "", e.to_string())
                }
            }
        }
        api::error(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "",
            "other replicas kept writing this group first; try again",
        )
    }

    /// Stores the version after `previous` (write lock held). `Ok(None)`: another replica
    /// made that version first; the store has caught up, build the write again.
    pub(crate) async fn append(
        &self,
        group: &str,
        previous: Option<&Stored>,
        action: String,
        cfg: Config,
        discovered: k8s::Discovered,
        mesh: Option<Arc<Config>>,
    ) -> Result<Option<Arc<Stored>>, StoreError> {
        let next = previous.map_or(1, |p| p.version + 1);
        match self
            .store
            .append(group, next, action, cfg, discovered, mesh)
            .await
        {
            Ok(stored) => {
                self.metrics.writes.inc();
                let action = stored.action.as_str();
                tracing::info!(group, version = stored.version, action, "config stored");
                Ok(Some(stored))
            }
            Err(StoreError::Conflict { .. }) => {
                tracing::debug!(
                    group,
                    version = next,
                    "another replica wrote this version first"
                );
                self.store.catch_up(group).await?;
                Ok(None)
            }
            Err(e) => {
                tracing::error!(group, error = %e, "cannot store config");
                Err(e)
            }
        }
    }

    /// The endpoints a new version of `cfg` is made with: what discovery knows now; before
    /// its first complete list (or without discovery), the previous version's endpoints of
    /// the targets it still has, so a restart or a broken API never empties a cluster.
    pub(crate) fn discovered_for(
        &self,
        cfg: &Config,
        previous: Option<&Stored>,
    ) -> k8s::Discovered {
        let targets = k8s::targets(cfg);
        if targets.is_empty() {
            return k8s::Discovered::new();
        }
        if let Some(found) = self.discovery.as_ref().and_then(|d| d.lookup(&targets)) {
            return found;
        }
        let Some(previous) = previous else {
            return k8s::Discovered::new();
        };
        targets
            .iter()
            .filter_map(|t| {
                let key = t.to_string();
                let eps = previous.discovered.get(&key)?.clone();
                Some((key, eps))
            })
            .collect()
    }

    /// Makes a new version of every group whose discovered endpoints differ from its current
    /// version's: the same user config, the new endpoints, a history note saying what
    /// changed. Nothing happens before discovery's first complete list.
    /// Only the leader does this: every replica would otherwise make the same version.
    pub async fn refresh_discovery(&self) {
        let Some(discovery) = &self.discovery else {
            return;
        };
        if !self.leader.is_leader() {
            return;
        }
        let _write = self.write_lock.lock().await;
        let Some(slices) = discovery.snapshot() else {
            return;
        };
        for group in self.store.groups() {
            for _ in 0..MAX_WRITE_ATTEMPTS {
                let Some(current) = self.store.current(&group) else {
                    break;
                };
                let targets = k8s::targets(&current.config);
                if targets.is_empty() && current.discovered.is_empty() {
                    break;
                }
                let found = slices.lookup(&targets);
                if found == current.discovered {
                    break;
                }
                let action = k8s::describe_change(&current.discovered, &found);
                let config = current.config.clone();
                let mesh = current.mesh.clone();
                let made = self
                    .append(&group, Some(&current), action, config, found, mesh)
                    .await;
                if self.discovery_write_done(made) {
                    break;
                }
            }
        }
    }

    /// `--mesh`: renders every group again and makes a new version of each whose rendered
    /// part changed (groups with pods, and groups with a config). Returns the route
    /// statuses to write, or `None` before every watch has listed. Only the leader does
    /// this (as discovery renders); a follower answers `None`.
    pub async fn refresh_mesh(&self) -> Option<Vec<crate::mesh::RouteStatus>> {
        let mesh = self.mesh.as_ref()?;
        let slices = self.discovery.as_ref()?;
        if !mesh.synced() || !slices.synced() {
            return None;
        }
        let rendered = mesh.render(slices.slices());
        mesh.set_last_outbound(rendered.outbound_only.clone());
        if !self.leader.is_leader() {
            return None;
        }
        let _write = self.write_lock.lock().await;
        let mut groups: std::collections::BTreeSet<String> =
            self.store.groups().into_iter().collect();
        groups.extend(rendered.groups.keys().cloned());
        for group in groups {
            let wanted = rendered.for_group(&group);
            for _ in 0..MAX_WRITE_ATTEMPTS {
                let current = self.store.current(&group);
                if current.as_ref().and_then(|c| c.mesh.as_ref()) == Some(&wanted) {
                    break;
                }
                let user = current
                    .as_ref()
                    .map(|c| c.config.clone())
                    .unwrap_or_default();
                let discovered = self.discovered_for(&user, current.as_deref());
                let routes: usize = wanted.listeners.iter().map(|l| l.routes.len()).sum();
                let action = format!(
                    "discovery: mesh ({} clusters, {routes} routes)",
                    wanted.clusters.len()
                );
                let made = self
                    .append(
                        &group,
                        current.as_deref(),
                        action,
                        user,
                        discovered,
                        Some(wanted.clone()),
                    )
                    .await;
                if self.discovery_write_done(made) {
                    break;
                }
            }
        }
        Some(rendered.statuses)
    }

    /// Whether a write of Kubernetes discovery is over: made (counted), or failed (logged by
    /// [`Control::append`]; the next change tries again). `false`: another replica wrote
    /// first, build it again.
    fn discovery_write_done(&self, made: Result<Option<Arc<Stored>>, StoreError>) -> bool {
        match made {
            Ok(Some(_)) => {
                self.metrics.k8s_versions.inc();
                true
            }
            Ok(None) => false,
            Err(_) => true,
        }
    }
}
