//! Tap: a live sample of this proxy's requests for whoever watches the group in the console
//! or with `spur tap`.
//!
//! Opt-in, and free when off: the control plane asks over the watch stream (a `tap` line,
//! see [`TapOrder`]), and until it does, a finished request costs one relaxed atomic load
//! here. While on, a request matching the order's filters becomes a [`TapLine`] (its method,
//! path without the query, route, cluster, endpoint, status, duration, flags, split side,
//! tries and Spur's error: never a header value or a body), at most [`MAX_PER_SEC`] a
//! second; lines go through a bounded queue (dropped when full, never waited for) to a task
//! that posts them to the control plane in small batches. The order lapses after its
//! `ttl_ms` unless renewed, and stops with the watch stream, so a control plane that went
//! away never leaves a proxy sampling.

use crate::exchange::Exchange;
use crate::reload::ControlSource;
use arc_swap::ArcSwapOption;
use bytes::Bytes;
use spur_config::report::{TapFilter, TapLine, TapOrder};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Lines a proxy sends at most each second.
pub const MAX_PER_SEC: u32 = 100;
/// Lines waiting to be posted; more are dropped.
const QUEUE: usize = 256;
/// How long lines gather before a batch is posted.
const BATCH_EVERY: Duration = Duration::from_millis(200);

struct Order {
    filters: Vec<TapFilter>,
    until: Instant,
    tx: mpsc::Sender<TapLine>,
}

/// The tap state of one proxy (in [`crate::Shared`]).
pub struct Tap {
    on: AtomicBool,
    order: ArcSwapOption<Order>,
    /// The rate limit: the current second (since `base`) in the high 32 bits, lines sent in
    /// it in the low 32.
    window: AtomicU64,
    base: Instant,
}

impl Default for Tap {
    fn default() -> Tap {
        Tap {
            on: AtomicBool::new(false),
            order: ArcSwapOption::empty(),
            window: AtomicU64::new(0),
            base: Instant::now(),
        }
    }
}

impl Tap {
    /// Whether requests are being sampled (the request path's only cost when not).
    #[inline]
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Follows an order from the control plane: start (or renew, or change the filters of)
    /// sampling, posting to `src`; or stop.
    pub fn order(&self, order: TapOrder, src: &ControlSource) {
        if !order.on {
            self.stop();
            return;
        }
        let ttl = Duration::from_millis(order.ttl_ms.clamp(1_000, 120_000));
        let tx = match self.order.load().as_ref() {
            Some(current) if !current.tx.is_closed() => current.tx.clone(),
            _ => {
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(post_lines(rx, src.clone()));
                tx
            }
        };
        self.order.store(Some(Arc::new(Order {
            filters: order.filters,
            until: Instant::now() + ttl,
            tx,
        })));
        self.on.store(true, Ordering::Relaxed);
    }

    /// Stops sampling (the poster ends once its queue is empty).
    pub fn stop(&self) {
        self.on.store(false, Ordering::Relaxed);
        self.order.store(None);
    }

    /// A finished request, while on: sampled if it matches, within the rate.
    pub fn offer(&self, ex: &Exchange, elapsed: Duration) {
        let guard = self.order.load();
        let Some(order) = guard.as_ref() else {
            return;
        };
        if Instant::now() >= order.until {
            drop(guard);
            self.stop();
            return;
        }
        let matches = order.filters.is_empty()
            || order
                .filters
                .iter()
                .any(|f| f.matches(&ex.route, ex.status));
        if !matches || !self.take_one() {
            return;
        }
        let _ = order.tx.try_send(line(ex, elapsed));
    }

    /// One line of this second's [`MAX_PER_SEC`], if any is left.
    fn take_one(&self) -> bool {
        let second = self.base.elapsed().as_secs() & 0xffff_ffff;
        let mut cur = self.window.load(Ordering::Relaxed);
        loop {
            let (s, n) = (cur >> 32, cur & 0xffff_ffff);
            let next = if s == second {
                if n >= u64::from(MAX_PER_SEC) {
                    return false;
                }
                cur + 1
            } else {
                (second << 32) | 1
            };
            match self
                .window
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(seen) => cur = seen,
            }
        }
    }
}

fn line(ex: &Exchange, elapsed: Duration) -> TapLine {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let flags = ex
        .flags
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    TapLine {
        ts,
        node: String::new(),
        method: ex.method.as_str().to_string(),
        path: ex.path.path().to_string(),
        route: ex.route.to_string(),
        cluster: ex.cluster.to_string(),
        endpoint: ex
            .endpoint
            .as_ref()
            .map_or_else(|| "-".to_string(), |e| e.endpoint.label.to_string()),
        status: ex.status,
        grpc_status: ex.grpc_label().map(u16::from),
        duration_ms: elapsed.as_secs_f64() * 1e3,
        flags,
        split: ex.live.as_ref().and_then(|t| t.key.side),
        attempts: ex.attempts,
        error: ex.error.map(String::from),
    }
}

/// Posts queued lines to the control plane in batches until the queue closes.
async fn post_lines(mut rx: mpsc::Receiver<TapLine>, src: ControlSource) {
    let path = format!("/v1/groups/{}/proxies/{}/tap", src.group, src.node);
    while let Some(first) = rx.recv().await {
        let mut body = Vec::with_capacity(4096);
        push(&mut body, &first);
        let gather = tokio::time::sleep(BATCH_EVERY);
        tokio::pin!(gather);
        loop {
            tokio::select! {
                more = rx.recv() => match more {
                    Some(l) => push(&mut body, &l),
                    None => break,
                },
                _ = &mut gather => break,
            }
        }
        let Ok(req) = crate::reload::request(&src, http::Method::POST, &path, Bytes::from(body))
        else {
            return;
        };
        match tokio::time::timeout(Duration::from_secs(3), src.client.request(req)).await {
            Ok(Ok(r)) if r.status().is_success() => {}
            Ok(Ok(r)) => tracing::debug!(status = %r.status(), "tap lines refused"),
            Ok(Err(e)) => tracing::debug!(error = %e, "tap lines not sent"),
            Err(_) => tracing::debug!("tap lines timed out"),
        }
    }
}

fn push(body: &mut Vec<u8>, line: &TapLine) {
    if serde_json::to_writer(&mut *body, line).is_ok() {
        body.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_max_per_sec_lines_a_second() {
        let tap = Tap::default();
        // A burst within one second (tried again in the rare case it straddled two).
        let taken = loop {
            tap.window.store(0, Ordering::Relaxed);
            let second = tap.base.elapsed().as_secs();
            let taken = (0..250).filter(|_| tap.take_one()).count();
            if tap.base.elapsed().as_secs() == second {
                break taken;
            }
        };
        assert_eq!(
            taken, MAX_PER_SEC as usize,
            "one second's worth, the rest refused"
        );
        // A window of an earlier second does not count against this one.
        let now = tap.base.elapsed().as_secs();
        tap.window.store(
            (now.wrapping_sub(1) << 32) | u64::from(MAX_PER_SEC),
            Ordering::Relaxed,
        );
        assert!(tap.take_one());
    }

    #[test]
    fn off_until_ordered() {
        let tap = Tap::default();
        assert!(!tap.is_on());
        tap.stop();
        assert!(!tap.is_on());
    }
}
