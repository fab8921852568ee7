//! Tap on the control plane: who watches a group's sampled requests, what the group's
//! proxies are asked to sample, and the fan-out of the lines they send.
//!
//! Each `GET /v1/groups/{group}/tap` registers its filter while its client reads. The
//! union of the filters is the group's [`TapOrder`], published on a `watch` channel that
//! every watch stream of the group forwards to its proxy ([`crate::watch`]); when the last
//! watcher goes, the order turns off, and proxies stop sampling. Lines proxies post
//! (`POST .../proxies/{node}/tap`) are dropped at once when nobody watches, capped per
//! proxy by a token bucket of [`MAX_PER_SEC`] a second with a burst of [`BURST`] (a proxy
//! keeps [`MAX_PER_SEC`] in its own one-second windows and posts in batches, so a compliant
//! proxy may look burstier here; the bucket bounds one that does not comply), and broadcast
//! to the watchers, each of which applies its own filter. A watcher too slow to keep up
//! loses lines, never holds others.

use crate::api::{error, Body};
use crate::watch::ChannelBody;
use crate::Control;
use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::BodyExt;
use spur_config::report::{StatusFilter, TapFilter, TapLine, TapOrder};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, watch};

/// Lines accepted from one proxy per second, on average.
pub const MAX_PER_SEC: u32 = 100;
/// Lines accepted from one proxy at once (its windows and batches are not ours).
pub const BURST: f64 = 300.0;
/// How long proxies sample after an order, unless it is renewed (every watch heartbeat).
pub const ORDER_TTL: Duration = Duration::from_secs(30);
/// A line every so often keeps the stream alive, and shows a gone client quickly.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// Longest string field kept from a proxy's line.
const MAX_FIELD: usize = 512;

struct GroupTap {
    lines: broadcast::Sender<Arc<TapLine>>,
    watchers: HashMap<u64, TapFilter>,
    order: watch::Sender<TapOrder>,
    /// Per proxy: (tokens left, when they were counted).
    rate: HashMap<String, (f64, Instant)>,
}

impl GroupTap {
    fn new() -> GroupTap {
        GroupTap {
            lines: broadcast::channel(1024).0,
            watchers: HashMap::new(),
            order: watch::channel(TapOrder::default()).0,
            rate: HashMap::new(),
        }
    }

    /// The order for the current watchers: every request if any watcher filters nothing.
    fn publish_order(&self) {
        let mut filters: Vec<TapFilter> = Vec::new();
        let mut everything = false;
        for f in self.watchers.values() {
            if f.route.is_none() && f.status.is_none() {
                everything = true;
            } else if !filters.contains(f) {
                filters.push(f.clone());
            }
        }
        let order = TapOrder {
            on: !self.watchers.is_empty(),
            filters: if everything { Vec::new() } else { filters },
            ttl_ms: ORDER_TTL.as_millis() as u64,
        };
        self.order.send_if_modified(|o| {
            let changed = *o != order;
            *o = order;
            changed
        });
    }
}

#[derive(Default)]
pub struct Taps {
    groups: Mutex<HashMap<String, GroupTap>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// One open tap stream; dropping it withdraws its filter.
pub struct TapGuard {
    control: Arc<Control>,
    group: String,
    id: u64,
}

impl Drop for TapGuard {
    fn drop(&mut self) {
        let mut groups = self.control.traffic.taps.groups.lock().unwrap();
        if let Some(g) = groups.get_mut(&self.group) {
            g.watchers.remove(&self.id);
            g.publish_order();
        }
    }
}

impl Taps {
    /// What the group's proxies are asked to sample (for the watch streams).
    pub fn orders(&self, group: &str) -> watch::Receiver<TapOrder> {
        let mut groups = self.groups.lock().unwrap();
        groups
            .entry(group.to_string())
            .or_insert_with(GroupTap::new)
            .order
            .subscribe()
    }

    fn open(
        control: &Arc<Control>,
        group: &str,
        filter: TapFilter,
    ) -> (TapGuard, broadcast::Receiver<Arc<TapLine>>) {
        let taps = &control.traffic.taps;
        let id = taps
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut groups = taps.groups.lock().unwrap();
        let g = groups
            .entry(group.to_string())
            .or_insert_with(GroupTap::new);
        g.watchers.insert(id, filter);
        g.publish_order();
        let rx = g.lines.subscribe();
        let guard = TapGuard {
            control: control.clone(),
            group: group.to_string(),
            id,
        };
        (guard, rx)
    }

    /// Lines a proxy posted (NDJSON). Answers how many were taken, and how many were
    /// dropped for going over [`MAX_PER_SEC`].
    pub fn publish(&self, group: &str, node: &str, body: &[u8], now: Instant) -> (u64, u64) {
        let mut groups = self.groups.lock().unwrap();
        let Some(g) = groups.get_mut(group) else {
            return (0, 0);
        };
        if g.watchers.is_empty() {
            return (0, 0);
        }
        let (mut taken, mut over) = (0, 0);
        for raw in body.split(|b| *b == b'\n') {
            if raw.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let Ok(mut line) = serde_json::from_slice::<TapLine>(raw) else {
                continue;
            };
            let (tokens, at) = g.rate.entry(node.to_string()).or_insert((BURST, now));
            let refill = now.saturating_duration_since(*at).as_secs_f64() * f64::from(MAX_PER_SEC);
            (*tokens, *at) = ((*tokens + refill).min(BURST), now);
            if *tokens < 1.0 {
                over += 1;
                continue;
            }
            *tokens -= 1.0;
            line.node = node.to_string();
            for s in [
                &mut line.method,
                &mut line.path,
                &mut line.route,
                &mut line.cluster,
                &mut line.endpoint,
            ] {
                truncate(s);
            }
            line.flags.truncate(64);
            line.flags.iter_mut().for_each(truncate);
            if let Some(e) = line.error.as_mut() {
                truncate(e);
            }
            let _ = g.lines.send(Arc::new(line));
            taken += 1;
        }
        if g.rate.len() > 10_000 {
            g.rate
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < Duration::from_secs(5));
        }
        (taken, over)
    }
}

fn truncate(s: &mut String) {
    if s.len() > MAX_FIELD {
        let mut end = MAX_FIELD;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// `route=R&status=5xx` (both optional).
fn filter(query: Option<&str>) -> Result<TapFilter, String> {
    let mut f = TapFilter::default();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = crate::console::percent_decode(v);
        match k {
            "route" if !v.is_empty() => f.route = Some(v),
            "status" if !v.is_empty() => f.status = Some(v.parse::<StatusFilter>()?),
            _ => {}
        }
    }
    Ok(f)
}

/// `GET /v1/groups/{group}/tap?route=R&status=5xx`: the group's sampled requests as
/// newline-delimited JSON, for as long as the client reads.
pub fn stream(control: &Arc<Control>, group: &str, query: Option<&str>) -> Response<Body> {
    let filter = match filter(query) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, "status", e),
    };
    let (guard, mut lines) = Taps::open(control, group, filter.clone());
    let (tx, body_rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let _guard = guard;
        loop {
            let out = tokio::select! {
                got = lines.recv() => match got {
                    Ok(line) if filter.matches(&line.route, line.status) => {
                        let mut v = serde_json::to_vec(&*line).unwrap_or_default();
                        v.push(b'\n');
                        Bytes::from(v)
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = tokio::time::sleep(HEARTBEAT) => Bytes::from_static(b"\n"),
            };
            if tx.send(out).await.is_err() {
                break;
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-store")
        .body(ChannelBody(body_rx).boxed())
        .expect("static parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_from_the_query() {
        let f = filter(Some("route=checkout&status=5xx")).ok().unwrap();
        assert_eq!(f.route.as_deref(), Some("checkout"));
        assert!(f.matches("checkout", 503) && !f.matches("checkout", 200));
        assert!(!f.matches("other", 503));
        assert!(filter(Some("status=nope")).is_err());
        assert_eq!(filter(None).ok().unwrap(), TapFilter::default());
    }

    #[test]
    fn the_order_is_the_union_of_the_watchers_filters() {
        let mut g = GroupTap::new();
        let rx = g.order.subscribe();
        let five = TapFilter {
            route: None,
            status: Some(StatusFilter::Class(5)),
        };
        g.watchers.insert(1, five.clone());
        g.publish_order();
        assert_eq!(rx.borrow().filters, vec![five.clone()]);
        assert!(rx.borrow().on);
        g.watchers.insert(2, TapFilter::default());
        g.publish_order();
        assert!(
            rx.borrow().filters.is_empty(),
            "one watcher wants every request"
        );
        g.watchers.clear();
        g.publish_order();
        assert!(!rx.borrow().on);
    }
}
