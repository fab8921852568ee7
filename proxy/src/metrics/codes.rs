//! Counters by status code (and gRPC status), resolved once per label set and code.
//!
//! `Family::get_or_create` hashes the whole label set and takes a read lock on every call.
//! The request path instead keeps, per route target and per endpoint, the counters of the
//! common status codes in `OnceLock`s: after the first request with a code, counting one is
//! a pointer read and an atomic add. gRPC calls (HTTP 200 and a `grpc-status`) have a slot
//! per gRPC code the same way. Rarer pairs go through the family, and every pair ever used
//! is remembered so that the series can be removed when their owner goes (see
//! [`CodeCounters::remove_all`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::hash::Hash;
use std::sync::{Mutex, OnceLock};

/// A label set that carries a status code and a gRPC status (`None`: not gRPC).
pub trait WithCode: Clone + Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync {
    fn with_code(&self, code: u16, grpc: Option<u8>) -> Self;
}

/// gRPC codes 0-16 have a slot each (with HTTP 200).
const GRPC_CODES: usize = 17;

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
    /// HTTP 200 with each gRPC status.
    grpc: [OnceLock<Counter>; GRPC_CODES],
    /// Pairs outside those slots that were counted.
    rare: Mutex<Vec<(u16, Option<u8>)>>,
}

impl<L: WithCode> CodeCounters<L> {
    pub fn new(family: &Family<L, Counter>, base: L) -> CodeCounters<L> {
        CodeCounters {
            family: family.clone(),
            base,
            common: Default::default(),
            grpc: Default::default(),
            rare: Mutex::new(Vec::new()),
        }
    }

    /// Counts one more with this status code (not a gRPC call).
    pub fn inc(&self, code: u16) {
        match slot(code) {
            Some(i) => {
                self.resolved(&self.common[i], code, None).inc();
            }
            None => self.rare(code, None),
        }
    }

    /// Counts one more with this status code and gRPC status (`None`: not gRPC).
    pub fn inc_grpc(&self, code: u16, grpc: Option<u8>) {
        match grpc {
            None => self.inc(code),
            Some(g) if code == 200 && usize::from(g) < GRPC_CODES => {
                self.resolved(&self.grpc[usize::from(g)], code, grpc).inc();
            }
            Some(_) => self.rare(code, grpc),
        }
    }

    fn resolved<'a>(
        &self,
        slot: &'a OnceLock<Counter>,
        code: u16,
        grpc: Option<u8>,
    ) -> &'a Counter {
        slot.get_or_init(|| {
            self.family
                .get_or_create(&self.base.with_code(code, grpc))
                .clone()
        })
    }

    fn rare(&self, code: u16, grpc: Option<u8>) {
        self.family
            .get_or_create(&self.base.with_code(code, grpc))
            .inc();
        let mut rare = self.rare.lock().unwrap();
        if !rare.contains(&(code, grpc)) {
            rare.push((code, grpc));
        }
    }

    /// Removes every series this counted into from the family.
    pub fn remove_all(&self) {
        for (i, code) in COMMON.iter().enumerate() {
            if self.common[i].get().is_some() {
                self.family.remove(&self.base.with_code(*code, None));
            }
        }
        for (g, slot) in self.grpc.iter().enumerate() {
            if slot.get().is_some() {
                self.family.remove(&self.base.with_code(200, Some(g as u8)));
            }
        }
        for (code, grpc) in self.rare.lock().unwrap().iter() {
            self.family.remove(&self.base.with_code(*code, *grpc));
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
        let labels = |code, grpc_status| UpstreamLabels {
            cluster: "c".into(),
            endpoint: "e".into(),
            code,
            grpc_status,
        };
        let c = CodeCounters::new(&family, labels(0, None));
        c.inc(200);
        c.inc(200);
        c.inc(599);
        c.inc(0);
        c.inc_grpc(200, Some(14));
        c.inc_grpc(200, None);
        c.inc_grpc(503, Some(14));
        assert_eq!(family.get_or_create(&labels(200, None)).get(), 3);
        assert_eq!(family.get_or_create(&labels(599, None)).get(), 1);
        assert_eq!(family.get_or_create(&labels(0, None)).get(), 1);
        assert_eq!(family.get_or_create(&labels(200, Some(14))).get(), 1);
        assert_eq!(family.get_or_create(&labels(503, Some(14))).get(), 1);
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
