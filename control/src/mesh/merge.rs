//! The group's own config merged over the rendered mesh, and what proxies receive.
//!
//! What the user wrote wins: their top-level settings, flags, listeners and clusters are
//! kept as written. A rendered listener of the same name as one of theirs adds its routes
//! after the user's (so hand-written routes match first); other rendered listeners and
//! clusters are added after the user's. Rendered routes that name a flag the group does
//! not define (`ExtensionRef` of kind `Flag`) are left out, since a proxy would refuse the
//! whole config for them.

use crate::store::Stored;
use spur_config::Config;

/// `user` over `mesh`.
pub fn merge(mesh: &Config, user: &Config) -> Config {
    let mut out = user.clone();
    for l in &mesh.listeners {
        let routes = l
            .routes
            .iter()
            .filter(|r| {
                r.matches
                    .flag
                    .as_ref()
                    .is_none_or(|f| user.flags.contains_key(f))
            })
            .cloned();
        match out.listeners.iter_mut().find(|u| u.name == l.name) {
            Some(mine) => mine.routes.extend(routes),
            None => {
                let mut l = l.clone();
                l.routes = routes.collect();
                out.listeners.push(l);
            }
        }
    }
    for c in &mesh.clusters {
        if !out.clusters.iter().any(|u| u.name == c.name) {
            out.clusters.push(c.clone());
        }
    }
    out
}

/// What the group's proxies receive for this version: `k8s:` clusters rendered to their
/// endpoints, and the user's config merged over the rendered mesh (when there is one).
pub fn rendered(s: &Stored) -> Config {
    let own = crate::k8s::render(&s.config, &s.discovered);
    match &s.mesh {
        Some(mesh) => merge(mesh, &own),
        None => own,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> Config {
        spur_config::parse(yaml, spur_config::Format::Yaml).unwrap()
    }

    #[test]
    fn the_users_routes_come_first_and_their_clusters_win() {
        let mesh = cfg(r#"
listeners:
  - name: outbound
    listen: 127.0.0.1:15001
    original_dst: true
    routes:
      - { name: gw, match: { destination: web.shop.80 }, cluster: web.shop.80 }
      - { name: gated, match: { flag: beta }, cluster: web.shop.80 }
clusters:
  - { name: web.shop.80, endpoints: ["10.0.0.1:80"], service_addresses: ["10.96.0.1:80"] }
"#);
        let user = cfg(r#"
egress: deny
listeners:
  - name: outbound
    listen: 127.0.0.1:15001
    original_dst: true
    routes: [{ name: mine, match: { path_prefix: /x }, cluster: web.shop.80 }]
clusters:
  - { name: web.shop.80, endpoints: ["10.0.0.9:80"] }
"#);
        let m = merge(&mesh, &user);
        let names: Vec<_> = m.listeners[0]
            .routes
            .iter()
            .map(|r| r.name.clone().unwrap())
            .collect();
        assert_eq!(
            names,
            ["mine", "gw"],
            "no flag `beta` here: the gated route is left out"
        );
        assert_eq!(m.clusters.len(), 1);
        assert_eq!(m.clusters[0].endpoints[0].addr().to_string(), "10.0.0.9:80");
        assert_eq!(m.egress, Some(spur_config::Egress::Deny));
        // Nothing of their own: the mesh as rendered (minus the ungated-flag route).
        let m = merge(&mesh, &Config::default());
        assert_eq!(m.listeners[0].routes.len(), 1);
        assert_eq!(m.clusters, mesh.clusters);
    }
}
