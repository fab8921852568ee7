//! Enforcing rate limits: the pure [`Limiter`] with its key, mode, counters and 429 answer,
//! resolved when a snapshot is compiled (as [`crate::authorize`] does for policies).
//!
//! A limit's buckets outlive config pushes while its settings stay ([`LimitRegistry`]), so
//! a push does not hand every client a fresh burst. A `scope: group` limit also counts its
//! demand (requests that reached it, admitted or not) and takes the share of the group's
//! rate the control plane assigns it (see [`crate::group_share`]); until the first share
//! arrives, and whenever the control plane is away, it keeps the last one (at first: the
//! whole rate).

use crate::metrics::{LimitLabels, Metrics};
use crate::policy::ratelimit::{Limiter, Verdict};
use crate::reason::Reason;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use spur_config::{LimitKey, LimitMode, LimitScope, RateLimit};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The settings that make a limit's buckets; a change of any starts them afresh.
#[derive(Clone, Debug, PartialEq)]
struct Settings {
    requests: u32,
    per: Duration,
    burst: u32,
    keyed: Option<u32>,
    scope: LimitScope,
}

/// A limit's state that outlives snapshots.
pub struct LimitState {
    settings: Settings,
    pub limiter: Limiter,
    /// `scope: group`: requests that reached the limit since the last demand report.
    pub demand: AtomicU64,
    /// `scope: group`: this proxy's share of the group's rate (f64 bits).
    share: AtomicU64,
    /// `spur_rate_limit_share{listener,route}`.
    share_gauge: Mutex<Option<Gauge<f64, AtomicU64>>>,
}

impl LimitState {
    pub fn share(&self) -> f64 {
        f64::from_bits(self.share.load(Ordering::Relaxed))
    }

    /// Takes a new share of the group's rate (0 < share <= 1).
    pub fn set_share(&self, share: f64) {
        let share = share.clamp(1e-6, 1.0);
        self.share.store(share.to_bits(), Ordering::Relaxed);
        let s = &self.settings;
        let burst = ((f64::from(s.burst) * share).round() as u32).max(1);
        self.limiter
            .set_rate(f64::from(s.requests) * share, s.per, burst);
        if let Some(g) = self.share_gauge.lock().unwrap().as_ref() {
            g.set(share);
        }
    }

    pub fn is_group(&self) -> bool {
        self.settings.scope == LimitScope::Group
    }
}

/// Limit state by `listener/route` (the same name every proxy of a group gives it).
#[derive(Default)]
pub struct LimitRegistry {
    map: Mutex<HashMap<Arc<str>, Arc<LimitState>>>,
}

impl LimitRegistry {
    fn get(&self, name: &Arc<str>, s: Settings) -> Arc<LimitState> {
        let mut map = self.map.lock().unwrap();
        if let Some(l) = map.get(name) {
            if l.settings == s {
                return l.clone();
            }
        }
        let limiter = Limiter::new(f64::from(s.requests), s.per, s.burst, s.keyed);
        let state = Arc::new(LimitState {
            settings: s,
            limiter,
            demand: AtomicU64::new(0),
            share: AtomicU64::new(1f64.to_bits()),
            share_gauge: Mutex::new(None),
        });
        map.insert(name.clone(), state.clone());
        state
    }

    /// Keeps only the limits in `names` (those of the snapshot now serving).
    pub fn retain(&self, names: &std::collections::HashSet<Arc<str>>) {
        self.map.lock().unwrap().retain(|k, _| names.contains(k));
    }

    /// The group limits, by name.
    pub fn groups(&self) -> Vec<(Arc<str>, Arc<LimitState>)> {
        let map = self.map.lock().unwrap();
        map.iter()
            .filter(|(_, l)| l.is_group())
            .map(|(k, l)| (k.clone(), l.clone()))
            .collect()
    }
}

/// A compiled `rate_limit`.
pub struct RateLimitRt {
    /// `listener/route` (`listener` for a listener's own limit).
    pub name: Arc<str>,
    pub state: Arc<LimitState>,
    key: LimitKey,
    pub mode: LimitMode,
    /// `RateLimit-Policy` of 429 answers, and the policy's quoted name for `RateLimit`.
    policy: HeaderValue,
    quoted: String,
    /// `spur_rate_limited_total{listener, route, mode}`.
    limited: Counter,
}

/// What the request brings that a key may read.
pub struct Keys<'a> {
    pub identity: Option<&'a str>,
    pub client_ip: IpAddr,
    pub headers: &'a HeaderMap,
}

impl RateLimitRt {
    /// `route` is `None` for a listener's own limit (its `route` label is empty).
    pub fn compile(
        listener: &Arc<str>,
        route: Option<&Arc<str>>,
        r: &RateLimit,
        registry: &LimitRegistry,
        metrics: &Metrics,
    ) -> RateLimitRt {
        let name: Arc<str> = match route {
            Some(route) => format!("{listener}/{route}").into(),
            None => listener.clone(),
        };
        let keyed = match r.key {
            LimitKey::Route => None,
            _ => Some(r.max_keys),
        };
        let settings = Settings {
            requests: r.requests,
            per: r.per.get(),
            burst: r.burst(),
            keyed,
            scope: r.scope,
        };
        let state = registry.get(&name, settings);
        let route_label: Arc<str> = route.cloned().unwrap_or_else(|| "".into());
        if r.scope == LimitScope::Group {
            let g = metrics
                .rate_limit_share
                .get_or_create(&crate::metrics::LimitShareLabels {
                    listener: listener.clone(),
                    route: route_label.clone(),
                })
                .clone();
            g.set(state.share());
            *state.share_gauge.lock().unwrap() = Some(g);
        }
        let mode = match r.mode {
            LimitMode::Enforce => "enforce",
            LimitMode::Shadow => "shadow",
        };
        let limited = metrics
            .rate_limited
            .get_or_create(&LimitLabels {
                listener: listener.clone(),
                route: route_label.clone(),
                mode,
            })
            .clone();
        let policy_name = route.unwrap_or(listener);
        let quoted = format!("\"{}\"", policy_name.replace(['"', '\\'], "_"));
        let window = r.per.get().as_secs_f64().ceil().max(1.0) as u64;
        let policy = HeaderValue::from_str(&format!("{quoted};q={};w={window}", r.requests))
            .expect("names are tokens");
        RateLimitRt {
            name,
            state,
            key: r.key.clone(),
            mode: r.mode,
            policy,
            quoted,
            limited,
        }
    }

    /// Checks a request: `None` to go on, or the 429 to answer (enforce mode). Over the
    /// limit is counted either way.
    pub fn check(&self, keys: &Keys<'_>, now: Instant) -> Option<Limited<'_>> {
        if self.state.is_group() {
            self.state.demand.fetch_add(1, Ordering::Relaxed);
        }
        let ip;
        let key: &[u8] = match &self.key {
            LimitKey::Route => b"",
            LimitKey::ClientId => keys.identity.unwrap_or_default().as_bytes(),
            LimitKey::ClientIp => {
                ip = match keys.client_ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                    IpAddr::V6(v6) => v6.octets(),
                };
                &ip
            }
            LimitKey::Header(h) => keys.headers.get(h).map_or(&[][..], |v| v.as_bytes()),
        };
        match self.state.limiter.check(key, now) {
            Verdict::Allow { .. } => None,
            Verdict::Deny { wait } => {
                self.limited.inc();
                (self.mode == LimitMode::Enforce).then_some(Limited { rt: self, wait })
            }
        }
    }
}

/// A request over an enforced limit.
pub struct Limited<'a> {
    rt: &'a RateLimitRt,
    wait: Duration,
}

impl Limited<'_> {
    /// The 429 answer's status, reason and headers: `Retry-After` (whole seconds, at least
    /// 1), `RateLimit-Policy` and `RateLimit` (IETF draft-ietf-httpapi-ratelimit-headers).
    pub fn answer(&self) -> crate::http::answer::Answer {
        let secs = self.wait.as_secs() + u64::from(self.wait.subsec_nanos() > 0);
        let secs = secs.max(1);
        let mut headers = HeaderMap::with_capacity(3);
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        headers.insert(RATELIMIT_POLICY.clone(), self.rt.policy.clone());
        if let Ok(v) = HeaderValue::from_str(&format!("{};r=0;t={secs}", self.rt.quoted)) {
            headers.insert(RATELIMIT.clone(), v);
        }
        crate::http::answer::Answer {
            status: StatusCode::TOO_MANY_REQUESTS,
            reason: Some(Reason::RateLimited),
            headers,
        }
    }
}
