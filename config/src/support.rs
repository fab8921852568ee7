//! Fields that are part of the schema but whose behaviour is not built yet.
//!
//! A proxy that silently ignores a retry or TLS setting is worse than one that refuses to
//! start, so each such field is rejected with "not supported yet" and its path. As features
//! land, their lines leave this file.

use crate::types::*;
use crate::validate::Errors;

const NOT_YET: &str = "not supported yet";

pub(crate) fn check(cfg: &Config, e: &mut Errors) {
    for (i, l) in cfg.listeners.iter().enumerate() {
        let p = format!("listeners[{i}]");
        if l.protocol == ListenerProtocol::Http3 {
            e.push(format!("{p}.protocol"), format!("http3: {NOT_YET}"));
        }
        if l.alt_svc_h3.is_some() {
            e.push(format!("{p}.alt_svc_h3"), NOT_YET);
        }
    }
    for (i, c) in cfg.clusters.iter().enumerate() {
        let p = format!("clusters[{i}]");
        if c.protocol == UpstreamProtocol::Http3 {
            e.push(format!("{p}.protocol"), format!("http3: {NOT_YET}"));
        }
        if c.fallback.is_some() {
            e.push(format!("{p}.fallback"), NOT_YET);
        }
    }
}
