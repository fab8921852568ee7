//! Forwarding headers you can trust: `x-forwarded-for` and `x-forwarded-proto`.
//!
//! A client can write any `x-forwarded-for` it likes, so what a listener keeps depends on
//! who sent the request (`x_forwarded.trusted_hops`, default 0):
//!
//! - **an untrusted client** (the default): `x-forwarded-for` becomes its address alone,
//!   `x-forwarded-proto` the listener's scheme (`https` with TLS);
//! - **behind `trusted_hops: N` proxies** (a load balancer in front of an edge listener): the
//!   last N entries are kept (those the trusted proxies wrote; the one before them is the
//!   client as the outermost trusted proxy saw it), the peer's address appended, and
//!   `x-forwarded-proto` kept when it says `http` or `https`;
//! - **an mTLS peer of the mesh** (a verified identity): the whole list is kept and the peer
//!   appended, and `x-forwarded-proto` kept, so a TLS edge's `https` survives the mesh.
//!
//! So the first entry an application reads is the client as the edge saw it. Rate limits
//! keyed by `client_ip` use that same address ([`client_ip`]).

use crate::headers::{X_FORWARDED_FOR, X_FORWARDED_PROTO};
use http::{HeaderMap, HeaderValue};
use std::net::IpAddr;

/// Who sent the request, as far as forwarding headers go.
#[derive(Clone, Copy)]
pub struct Trust {
    /// The peer is an mTLS peer with a verified identity.
    pub mesh_peer: bool,
    /// At most 10 (a `u8`: the plan carries this across the whole exchange).
    pub trusted_hops: u8,
}

impl Trust {
    /// How many entries of the incoming list are kept (`usize::MAX`: all).
    fn kept(self) -> usize {
        if self.mesh_peer {
            usize::MAX
        } else {
            self.trusted_hops as usize
        }
    }
}

/// The incoming `x-forwarded-for` entries (several headers joined in order).
fn entries(h: &HeaderMap) -> impl Iterator<Item = &str> {
    h.get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
}

/// A client address as an `x-forwarded-for` element (made once per connection).
pub fn peer_value(peer: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&peer.to_string()).expect("an IP address is a valid header value")
}

/// Sets the forwarding headers for the upstream; `peer` is the client's address as made by
/// [`peer_value`].
pub fn apply(h: &mut HeaderMap, peer: &HeaderValue, listener_proto: &'static str, trust: Trust) {
    let kept = trust.kept();
    if kept == 0 || !h.contains_key(&X_FORWARDED_FOR) {
        // The common case, the client's address alone: no formatting, no copy.
        h.insert(X_FORWARDED_FOR.clone(), peer.clone());
    } else {
        append(h, peer, kept);
    }
    let keep_proto = kept > 0
        && h.get(&X_FORWARDED_PROTO)
            .is_some_and(|v| v == "https" || v == "http");
    if !keep_proto {
        h.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(listener_proto),
        );
    }
}

/// The kept entries of the incoming list, then `peer`.
fn append(h: &mut HeaderMap, peer: &HeaderValue, kept: usize) {
    let mut value = Vec::with_capacity(48);
    // Without a list of its own: a mesh peer's whole list, or the last `kept` entries.
    let skip = match kept {
        usize::MAX => 0,
        n => entries(h).count().saturating_sub(n),
    };
    for e in entries(h).skip(skip) {
        value.extend_from_slice(e.as_bytes());
        value.extend_from_slice(b", ");
    }
    value.extend_from_slice(peer.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&value) {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
}

/// The client's address as the edge saw it: the first entry [`apply`] will keep, else the
/// peer.
pub fn client_ip(h: &HeaderMap, peer: IpAddr, trust: Trust) -> IpAddr {
    let kept = trust.kept();
    if kept == 0 {
        return peer;
    }
    let skip = entries(h).count().saturating_sub(kept);
    entries(h)
        .nth(skip)
        .and_then(|e| e.parse().ok())
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(xff: &[&str], proto: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        if let Some(p) = proto {
            h.insert("x-forwarded-proto", p.parse().unwrap());
        }
        h
    }

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 9));

    #[test]
    fn an_untrusted_client_is_replaced() {
        let mut m = h(&["6.6.6.6"], Some("https"));
        let t = Trust {
            mesh_peer: false,
            trusted_hops: 0,
        };
        assert_eq!(client_ip(&m, PEER, t), PEER);
        apply(&mut m, &peer_value(PEER), "http", t);
        assert_eq!(m["x-forwarded-for"], "10.0.0.9");
        assert_eq!(m["x-forwarded-proto"], "http");
    }

    #[test]
    fn trusted_hops_keep_what_they_wrote() {
        // Client C (spoofing 6.6.6.6) -> LB (appends C) -> Spur.
        let mut m = h(&["6.6.6.6, 192.0.2.1"], Some("https"));
        let t = Trust {
            mesh_peer: false,
            trusted_hops: 1,
        };
        assert_eq!(
            client_ip(&m, PEER, t),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
        apply(&mut m, &peer_value(PEER), "http", t);
        assert_eq!(m["x-forwarded-for"], "192.0.2.1, 10.0.0.9");
        assert_eq!(m["x-forwarded-proto"], "https");
        // Two headers are joined, in order.
        let mut m = h(&["1.1.1.1", "2.2.2.2, 3.3.3.3"], None);
        apply(
            &mut m,
            &peer_value(PEER),
            "http",
            Trust {
                mesh_peer: false,
                trusted_hops: 3,
            },
        );
        assert_eq!(m["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9");
        assert_eq!(m["x-forwarded-proto"], "http", "none came: the listener's");
    }

    #[test]
    fn a_mesh_peer_keeps_everything() {
        let mut m = h(&["192.0.2.1, 10.0.0.1"], Some("https"));
        let t = Trust {
            mesh_peer: true,
            trusted_hops: 0,
        };
        assert_eq!(
            client_ip(&m, PEER, t),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
        apply(&mut m, &peer_value(PEER), "https", t);
        assert_eq!(m["x-forwarded-for"], "192.0.2.1, 10.0.0.1, 10.0.0.9");
        assert_eq!(m["x-forwarded-proto"], "https");
    }
}
