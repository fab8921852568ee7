//! Traffic mirroring (parallel run): a copy of a share of a route's requests goes to another
//! cluster, and the two answers are compared.
//!
//! The copy is fire-and-forget: it is sent from its own task, never delays the client's
//! request, and is never answered from. Copies are bounded: at most [`MAX_IN_FLIGHT`] at
//! once for the whole proxy, and only requests whose body is at most [`MAX_BODY`] (so the
//! copy can be sent without holding the original); anything else is dropped and counted.
//!
//! The comparison is the status code and a hash of the body (its first [`MAX_COMPARED`]
//! bytes). `spur_mirror_requests_total{outcome}` counts `same`, `differ`, `error` and
//! `dropped`; each differing request gets an access-log line (`mirror_differs`) with its
//! request ID, so a team can see where the new version disagrees before switching to it.

use crate::access::{self, Val};
use crate::attempt::{Attempt, Tried};
use crate::metrics::MirrorLabels;
use crate::policy::retry::Outcome;
use crate::snapshot::ClusterRt;
use crate::upstream::ReqBody;
use crate::Shared;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Uri};
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

pub const MAX_IN_FLIGHT: usize = 256;
pub const MAX_BODY: u64 = 64 * 1024;
pub const MAX_COMPARED: usize = 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(30);

/// An incremental FNV-1a over a body's first [`MAX_COMPARED`] bytes.
#[derive(Clone, Copy, Debug)]
pub struct BodyHash {
    hash: u64,
    seen: usize,
}

impl Default for BodyHash {
    fn default() -> Self {
        BodyHash {
            hash: 0xcbf2_9ce4_8422_2325,
            seen: 0,
        }
    }
}

impl BodyHash {
    pub fn update(&mut self, data: &[u8]) {
        let take = data.len().min(MAX_COMPARED - self.seen);
        for b in &data[..take] {
            self.hash ^= u64::from(*b);
            self.hash = self.hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.seen += take;
    }

    pub fn value(&self) -> u64 {
        self.hash
    }
}

/// What the primary (client-facing) exchange came to: status and body hash; `None` status
/// when it failed before a response.
pub type PrimaryResult = (u16, u64);

fn count(shared: &Shared, cluster: &Arc<str>, outcome: &'static str) {
    shared
        .metrics
        .mirror_requests
        .get_or_create(&MirrorLabels {
            cluster: cluster.clone(),
            outcome,
        })
        .inc();
}

/// Counts a copy that could not be made.
pub fn dropped(shared: &Shared, cluster: &Arc<str>) {
    count(shared, cluster, "dropped");
}

/// Starts the copy of a request; returns the sender through which the primary exchange
/// reports its result, or `None` when the copy was dropped (too many in flight).
pub fn spawn(
    shared: Arc<Shared>,
    cluster: Arc<ClusterRt>,
    parts: &http::request::Parts,
    path: http::uri::PathAndQuery,
    body: (Bytes, Option<HeaderMap>),
    request_id: Option<HeaderValue>,
    span: Option<crate::trace::span::MirrorSpan>,
) -> Option<oneshot::Sender<PrimaryResult>> {
    let Ok(permit) = shared.mirror_slots.clone().try_acquire_owned() else {
        dropped(&shared, &cluster.name);
        return None;
    };
    let (tx, rx) = oneshot::channel();
    let mut head = Request::new(());
    *head.method_mut() = parts.method.clone();
    *head.version_mut() = parts.version;
    *head.headers_mut() = parts.headers.clone();
    head.headers_mut().insert(
        crate::http::X_SPUR_MIRROR.clone(),
        HeaderValue::from_static("1"),
    );
    if let Some(s) = &span {
        // A trace of its own, linked to the request it copies.
        s.write(head.headers_mut());
    }
    let (head, ()) = head.into_parts();
    tokio::spawn(async move {
        let _permit = permit;
        let started = std::time::SystemTime::now();
        let mirrored = send(&shared, &cluster, head, path.clone(), body).await;
        if let Some(s) = span {
            s.finish(
                &cluster.name,
                started,
                mirrored.ok().map(|(status, _)| status),
            );
        }
        let primary = tokio::time::timeout(TIMEOUT, rx).await;
        let outcome = match (mirrored, primary) {
            (Ok(m), Ok(Ok(p))) if m == p => "same",
            (Ok(m), Ok(Ok(p))) => {
                if access::enabled() {
                    let logged = if shared.snapshot.load().log_query {
                        path.as_str()
                    } else {
                        path.path()
                    };
                    let rid = request_id
                        .as_ref()
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    access::emit(
                        "mirror_differs",
                        &[
                            ("request_id", Val::Str(rid)),
                            ("cluster", Val::Str(&cluster.name)),
                            ("path", Val::Str(logged)),
                            ("status", Val::U64(u64::from(p.0))),
                            ("mirror_status", Val::U64(u64::from(m.0))),
                            ("body_differs", Val::Bool(m.1 != p.1)),
                        ],
                    );
                }
                "differ"
            }
            _ => "error",
        };
        count(&shared, &cluster.name, outcome);
    });
    Some(tx)
}

/// Sends the copy and reads its answer: status and body hash. The copy is a try like any
/// other for the mirror cluster: it respects ejections, and what the endpoint did counts.
async fn send(
    shared: &Shared,
    cluster: &Arc<ClusterRt>,
    mut head: http::request::Parts,
    path: http::uri::PathAndQuery,
    (data, trailers): (Bytes, Option<HeaderMap>),
) -> Result<PrimaryResult, ()> {
    let attempt = Attempt::pick(cluster, &Tried::default(), None, crate::clock::now()).ok_or(())?;
    head.uri = if cluster.protocol == spur_config::UpstreamProtocol::Http1 {
        Uri::from(path)
    } else {
        Uri::builder()
            .scheme(cluster.scheme())
            .authority(attempt.endpoint().authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|_| ())?
    };
    head.version = cluster.http_version();
    if head.version == http::Version::HTTP_2 {
        head.headers.remove(http::header::HOST);
    }
    let req = Request::from_parts(head, ReqBody::replay(&data, &trailers));
    let sent = tokio::time::timeout(TIMEOUT, cluster.client.send(attempt.endpoint(), req)).await;
    let resp = match sent {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            attempt.record(e.failure.outcome(), false, &shared.metrics);
            return Err(());
        }
        Err(_) => {
            attempt.record(Outcome::Timeout, false, &shared.metrics);
            return Err(());
        }
    };
    let status = resp.status().as_u16();
    attempt.record(Outcome::Status(status), false, &shared.metrics);
    let mut hash = BodyHash::default();
    let mut body = resp.into_body();
    while let Some(frame) = tokio::time::timeout(TIMEOUT, body.frame())
        .await
        .map_err(|_| ())?
    {
        if let Ok(d) = frame.map_err(|_| ())?.into_data() {
            hash.update(&d);
        }
    }
    Ok((status, hash.value()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_chunking_independent_and_bounded() {
        let mut a = BodyHash::default();
        a.update(b"hello world");
        let mut b = BodyHash::default();
        b.update(b"hello ");
        b.update(b"world");
        assert_eq!(a.value(), b.value());
        let mut c = BodyHash::default();
        c.update(b"hello worle");
        assert_ne!(a.value(), c.value());
        let big = vec![1u8; MAX_COMPARED];
        let mut d = BodyHash::default();
        d.update(&big);
        let before = d.value();
        d.update(b"more");
        assert_eq!(d.value(), before, "only the first MAX_COMPARED bytes count");
    }
}
