//! Answers Spur makes that are not plain refusals: a redirect, a CORS preflight, or a
//! refusal that carries headers of its own (a 429 with `Retry-After` and the `RateLimit`
//! headers). Rare paths: the plan boxes them, so a forwarded request carries nothing more.

use crate::exchange::{Exchange, RespBody};
use crate::reason::Reason;
use crate::snapshot::Snapshot;
use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};

pub struct Answer {
    pub status: StatusCode,
    /// An error answer's reason (`x-spur-error`, the body); `None` for a redirect or a
    /// preflight, which have no body.
    pub reason: Option<Reason>,
    pub headers: HeaderMap,
}

impl Answer {
    /// An answer without a body (a redirect, a preflight).
    pub fn empty(status: StatusCode, headers: HeaderMap) -> Box<Answer> {
        Box::new(Answer {
            status,
            reason: None,
            headers,
        })
    }
}

/// The response for an answer.
pub fn respond(a: &Answer, snap: &Snapshot, mut ex: Box<Exchange>) -> Response<RespBody> {
    let mut resp = match a.reason {
        Some(reason) => super::respond::local(
            super::plan::Refusal {
                reason,
                status: a.status,
                cluster: None,
            },
            snap,
            ex,
        ),
        None => {
            ex.status = a.status.as_u16();
            let id = ex.request_id.clone();
            let mut resp = Response::new(RespBody::local(Bytes::new(), Some(ex)));
            if let Some(id) = id {
                resp.headers_mut()
                    .insert(snap.correlation.header.clone(), id);
            }
            resp
        }
    };
    *resp.status_mut() = a.status;
    for (k, v) in &a.headers {
        resp.headers_mut().append(k, v.clone());
    }
    resp
}
