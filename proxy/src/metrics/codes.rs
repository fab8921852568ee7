//! Counters by status code, resolved once per label set and code.
//!
//! `Family::get_or_create` hashes the whole label set and takes a read lock on every call.
//! The request path instead keeps, per route target and per endpoint, the counters of the
//! common status codes in `OnceLock`s: after the first request with a code, counting one is
//! a pointer read and an atomic add. Rarer codes go through the family, and every code ever
//! used is remembered so that the series can be removed when their owner goes (see
//! [`CodeCounters::remove_all`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::hash::Hash;
use std::sync::{Mutex, OnceLock};

/// A label set that carries a status code.
pub trait WithCode: Clone + Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync {
    fn with_code(&self, code: u16) -> Self;
}

/// The codes with a slot of their own (0: no response at all).
const COMMON: [u16; 27] = [
    0, 200, 201, 202, 204, 206, 301, 302, 304, 307, 308, 400, 401, 403, 404, 405, 408, 409, 413,
    422, 429, 431, 500, 501, 502, 503, 504,
];

fn slot(code: u16) -> Option<usize> {
    COMMON.binary_search(&code).ok()
}

pub struct CodeCounters<L: WithCode> {
    family: Family<L, Counter>,
    base: L,
    common: [OnceLock<Counter>; COMMON.len()],
    /// Codes outside [`COMMON`] that were counted.
    rare: Mutex<Vec<u16>>,
}

impl<L: WithCode> CodeCounters<L> {
    pub fn new(family: &Family<L, Counter>, base: L) -> CodeCounters<L> {
        CodeCounters {
            family: family.clone(),
            base,
            common: Default::default(),
            rare: Mutex::new(Vec::new()),
        }
    }

    /// Counts one more with this status code.
    pub fn inc(&self, code: u16) {
        match slot(code) {
            Some(i) => {
                self.common[i]
                    .get_or_init(|| {
                        self.family
                            .get_or_create(&self.base.with_code(code))
                            .clone()
                    })
                    .inc();
            }
            None => {
                self.family.get_or_create(&self.base.with_code(code)).inc();
                let mut rare = self.rare.lock().unwrap();
                if !rare.contains(&code) {
                    rare.push(code);
                }
            }
        };
    }

    /// Removes every series this counted into from the family.
    pub fn remove_all(&self) {
        for (i, code) in COMMON.iter().enumerate() {
            if self.common[i].get().is_some() {
                self.family.remove(&self.base.with_code(*code));
            }
        }
        for code in self.rare.lock().unwrap().iter() {
            self.family.remove(&self.base.with_code(*code));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::UpstreamLabels;

    #[test]
    fn counts_into_the_family_and_removes_what_it_made() {
        let family = Family::<UpstreamLabels, Counter>::default();
        let labels = |code| UpstreamLabels {
            cluster: "c".into(),
            endpoint: "e".into(),
            code,
        };
        let c = CodeCounters::new(&family, labels(0));
        c.inc(200);
        c.inc(200);
        c.inc(599);
        c.inc(0);
        assert_eq!(family.get_or_create(&labels(200)).get(), 2);
        assert_eq!(family.get_or_create(&labels(599)).get(), 1);
        assert_eq!(family.get_or_create(&labels(0)).get(), 1);
        c.remove_all();
        let mut text = String::new();
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register("t", "t", family.clone());
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(!text.contains("endpoint=\"e\""), "{text}");
        for code in COMMON.windows(2) {
            assert!(code[0] < code[1], "COMMON must stay sorted");
        }
    }
}
