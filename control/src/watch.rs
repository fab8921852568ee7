//! Fan-out of new versions to watching proxies.
//!
//! Each group has a `tokio::sync::watch` channel holding its newest version, kept by the
//! store ([`crate::store::Store::subscribe`]): a version written on this replica or, with
//! `--store kubernetes`, on any other (the store watches the cluster). A watcher's
//! task sends every version newer than the one it last sent; a slow watcher simply skips to
//! the newest (proxies only ever need the latest config), so it never holds up the others
//! and never makes the control plane buffer more than a few lines for it. A line every
//! [`HEARTBEAT`] keeps idle streams alive and lets both ends notice a dead peer.

use crate::api::{error, Body};
use crate::store::Stored;
use crate::Control;
use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// A streamed response body fed by a channel.
pub(crate) struct ChannelBody(pub(crate) mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// One version as proxies receive it: `k8s:` clusters rendered to the endpoints that
/// version was made with.
fn line(s: &Stored) -> Bytes {
    let config = crate::mesh::merge::rendered(s);
    let mut v = serde_json::to_vec(&serde_json::json!({ "version": s.version, "config": config }))
        .unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// A tap order as a line of the stream.
fn tap_line(order: &spur_config::report::TapOrder) -> Bytes {
    let mut v = serde_json::to_vec(&serde_json::json!({ "tap": order })).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// `GET /v1/groups/{group}/watch?after=N[&node=NAME]`: newline-delimited JSON, one line
/// per version after N, for as long as the client stays.
pub fn watch(control: &Arc<Control>, group: &str, query: Option<&str>) -> Response<Body> {
    let mut after = 0u64;
    let mut node = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("after", v)) => match v.parse() {
                Ok(n) => after = n,
                Err(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "after",
                        format!("`{v}` is not a version number"),
                    )
                }
            },
            Some(("node", v)) => node = Some(v.to_string()),
            _ => {}
        }
    }
    // The proxy counts as watching (and is never forgotten) while the stream is open.
    let watching = node.as_ref().map(|n| control.proxies.watching(group, n));
    let mut rx = control.subscribe(group);
    // Shares of group rate limits, for a proxy that names itself.
    let mut shares = node
        .as_ref()
        .map(|n| control.group_limits.subscribe(group, n));
    // Tap orders for the group's proxies ride the same stream (see crate::traffic::tap).
    let mut tap = control.traffic.taps.orders(group);
    if tap.borrow().on {
        tap.mark_changed();
    }
    let (tx, body_rx) = mpsc::channel::<Bytes>(4);
    let control = control.clone();
    let group = group.to_string();
    tokio::spawn(async move {
        let _watching = watching;
        control.metrics.watchers.inc();
        let mut last = after;
        loop {
            let newest = rx.borrow_and_update().clone();
            if let Some(s) = newest {
                if s.version > last {
                    last = s.version;
                    if tx.send(line(&s)).await.is_err() {
                        break;
                    }
                }
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { break },
                line = crate::group_limits::next_line(&mut shares) => {
                    if let Some(line) = line {
                        if tx.send(line).await.is_err() {
                            break;
                        }
                    }
                }
                changed = tap.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let line = tap_line(&tap.borrow_and_update());
                    if tx.send(line).await.is_err() {
                        break;
                    }
                }
                _ = tokio::time::sleep(HEARTBEAT) => {
                    if tx.send(Bytes::from_static(b"\n")).await.is_err() {
                        break;
                    }
                    // Renews a running tap before it lapses on the proxy.
                    let order = tap.borrow().clone();
                    if order.on && tx.send(tap_line(&order)).await.is_err() {
                        break;
                    }
                    if let Some(n) = &node {
                        control.proxies.seen(&group, n);
                    }
                }
            }
        }
        control.metrics.watchers.dec();
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-store")
        .body(ChannelBody(body_rx).boxed())
        .expect("static parts are valid")
}
