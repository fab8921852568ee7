//! The TLS step of a listener: the handshake on an accepted connection, bounded by the
//! listener's `header_timeout` (a client that never finishes its handshake holds a
//! connection slot exactly like one that never finishes its headers), with failures counted
//! in `spur_tls_handshake_errors_total{listener,reason}`.

use crate::http::TlsSession;
use crate::metrics::ListenerReasonLabels;
use crate::snapshot::ListenerRt;
use crate::tls::{Identity, Role, Stream};
use crate::Shared;
use http::HeaderValue;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;

/// An accepted connection, ready to serve.
pub struct Downstream {
    pub stream: Stream,
    /// The verified client's SPIFFE ID (mutual TLS only).
    pub identity: Option<Identity>,
    /// Set on a TLS listener.
    pub session: Option<TlsSession>,
}

impl Downstream {
    pub fn peer_identity(&self) -> Option<Arc<str>> {
        self.identity.as_ref().map(|i| i.as_arc().clone())
    }
}

/// Runs the listener's TLS handshake, if it has TLS. `None`: the handshake failed (counted
/// and logged); drop the connection.
pub async fn accept(
    shared: &Shared,
    lst: &ListenerRt,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<Downstream> {
    let Some(tls) = &lst.tls else {
        return Some(Downstream {
            stream: Stream::Plain(tcp),
            identity: None,
            session: None,
        });
    };
    match tls.accept(tcp, lst.limits.header_timeout.get()).await {
        Ok(a) => {
            let identity_header = a
                .peer
                .as_ref()
                .and_then(|id| HeaderValue::from_str(id.as_str()).ok());
            Some(Downstream {
                stream: a.stream,
                identity: a.peer,
                session: Some(TlsSession { identity_header }),
            })
        }
        Err(e) => {
            let reason = e.reason(Role::Server);
            shared
                .metrics
                .tls_handshake_errors
                .get_or_create(&ListenerReasonLabels {
                    listener: lst.name.clone(),
                    reason,
                })
                .inc();
            tracing::debug!(listener = &*lst.name, %peer, reason, error = %e, "TLS handshake failed");
            None
        }
    }
}
