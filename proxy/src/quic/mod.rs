//! QUIC and HTTP/3 (quinn and h3): `http3` listeners ([`server`]) and `http3` clusters
//! ([`client`]). Both ends hand requests to the same request path as HTTP/1.1 and HTTP/2
//! ([`crate::http`]); only the framing differs.
//!
//! TLS is the listener's or cluster's own ([`crate::tls`]) with ALPN `h3`: the same
//! certificates, client CA, SPIFFE verifiers and rotation. Each new connection takes the
//! rustls config current at that moment, so rotated files apply to QUIC exactly as to TCP.
//! 0-RTT is not offered (rustls' `max_early_data_size` stays 0 and clients send no early
//! data): a replayable first flight is only safe for idempotent requests, and Spur does not
//! take that risk by default.

pub mod client;
mod encoder_stream;
pub mod server;
mod uni_streams;

use crate::tls::Role;
use quinn::ConnectionError;
use std::sync::Arc;
use std::time::Duration;

/// The short reason for a failed QUIC handshake, named like TLS handshake failures:
/// `no_client_cert`, `unknown_ca`, `expired`, `identity_not_allowed` (server) /
/// `identity_not_expected` (client), `bad_certificate`, `alpn`, `peer_alert` (the other
/// end refused us), `timeout`, `reset`, `protocol`, `io`.
pub fn handshake_reason(e: &ConnectionError, role: Role) -> &'static str {
    match (e, tls_alert(e)) {
        (ConnectionError::TransportError(te), Some(alert)) => alert_reason(alert, &te.reason, role),
        (ConnectionError::ConnectionClosed(_), Some(_)) => "peer_alert",
        (ConnectionError::TimedOut, _) => "timeout",
        (ConnectionError::Reset, _) => "reset",
        (
            ConnectionError::TransportError(_)
            | ConnectionError::ConnectionClosed(_)
            | ConnectionError::VersionMismatch,
            _,
        ) => "protocol",
        _ => "io",
    }
}

/// The TLS alert behind a failed handshake (QUIC's CRYPTO_ERROR codes 0x100–0x1ff), raised
/// here or by the peer: a certificate or TLS refusal, which TCP + TLS would meet too.
pub fn tls_alert(e: &ConnectionError) -> Option<u8> {
    let code = match e {
        ConnectionError::TransportError(te) => u64::from(te.code),
        ConnectionError::ConnectionClosed(c) => u64::from(c.error_code),
        _ => return None,
    };
    code.checked_sub(0x100)
        .filter(|a| *a < 0x100)
        .map(|a| a as u8)
}

/// TLS alert numbers (RFC 8446 §6) as QUIC carries them in CRYPTO_ERROR codes.
fn alert_reason(alert: u8, text: &str, role: Role) -> &'static str {
    match alert {
        116 => "no_client_cert",
        48 => "unknown_ca",
        45 if text.contains("not valid yet") || text.contains("NotValidYet") => "not_yet_valid",
        45 => "expired",
        49 if role == Role::Server => "identity_not_allowed",
        49 => "identity_not_expected",
        42 => "bad_certificate",
        120 => "alpn",
        _ => "protocol",
    }
}

/// Transport settings for both ends: enough concurrent streams for a busy sidecar hop, and
/// the idle timeout (the listener's, or the client's keep-alive that keeps pooled
/// connections open).
fn transport(idle: Duration, keep_alive: Option<Duration>) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1024u32.into())
        .max_concurrent_uni_streams(16u32.into())
        .keep_alive_interval(keep_alive);
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}
