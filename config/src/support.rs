//! Fields that are part of the schema but whose behaviour is not built yet.
//!
//! A proxy that silently ignores a retry or TLS setting is worse than one that refuses to
//! start, so each such field is rejected with "not supported yet" and its path. As features
//! land, their lines leave this file.

use crate::types::*;
use crate::validate::Errors;

const NOT_YET: &str = "not supported yet";

pub(crate) fn check(cfg: &Config, e: &mut Errors) {
    for (i, c) in cfg.clusters.iter().enumerate() {
        let p = format!("clusters[{i}]");
        if c.k8s.is_some() {
            e.push(format!("{p}.k8s"), NOT_YET);
        }
    }
}
