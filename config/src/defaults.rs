//! Default values, named so that the schema reads as documentation.

use crate::conditions::RetryOn;
use crate::units::{ByteSize, Duration};
use crate::values::Parsed;
use std::net::{Ipv4Addr, SocketAddr};

pub fn drain_timeout() -> Duration {
    Duration::from_secs(10)
}
pub fn admin_listen() -> Parsed<SocketAddr> {
    Parsed::from_value(SocketAddr::from((Ipv4Addr::LOCALHOST, 9901)))
}
pub fn request_id_header() -> Parsed<http::HeaderName> {
    Parsed::from_value(http::HeaderName::from_static("x-request-id"))
}
pub fn yes() -> bool {
    true
}
pub fn one() -> u32 {
    1
}
pub fn hundred() -> f64 {
    100.0
}
pub fn max_connections() -> u32 {
    10_000
}
pub fn max_header_bytes() -> ByteSize {
    ByteSize::kib(64)
}
pub fn header_timeout() -> Duration {
    Duration::from_secs(10)
}
pub fn idle_timeout() -> Duration {
    Duration::from_secs(300)
}
pub fn body_timeout() -> Duration {
    Duration::from_secs(30)
}
pub fn attempts() -> u32 {
    2
}
pub fn retry_on() -> RetryOn {
    RetryOn::default()
}
pub fn backoff_base() -> Duration {
    Duration::from_millis(25)
}
pub fn backoff_max() -> Duration {
    Duration::from_millis(250)
}
pub fn budget_ratio() -> f64 {
    0.2
}
pub fn budget_min_per_sec() -> u32 {
    10
}
pub fn max_body() -> ByteSize {
    ByteSize::kib(64)
}
pub fn connect_timeout() -> Duration {
    Duration::from_secs(1)
}
/// How long an `http3` cluster's endpoint stays on its TCP fallback before QUIC is tried
/// again.
pub fn fallback_period() -> Duration {
    Duration::from_secs(30)
}
pub fn consecutive_failures() -> u32 {
    5
}
pub fn ejection_time() -> Duration {
    Duration::from_secs(10)
}
pub fn max_ejection_percent() -> u32 {
    50
}
pub fn max_requests() -> u32 {
    1024
}
/// None wait: over `max_requests`, a request fails fast with 503 `overloaded`.
pub fn max_pending() -> u32 {
    0
}
pub fn hc_interval() -> Duration {
    Duration::from_secs(5)
}
pub fn hc_timeout() -> Duration {
    Duration::from_secs(1)
}
pub fn unhealthy_threshold() -> u32 {
    3
}
pub fn healthy_threshold() -> u32 {
    2
}
pub fn rate_per() -> Duration {
    Duration::from_secs(1)
}
pub fn limit_key() -> crate::edge::LimitKey {
    crate::edge::LimitKey::Route
}
pub fn max_keys() -> u32 {
    100_000
}
pub fn redirect_status() -> u16 {
    301
}
/// A cluster's `panic_threshold` (percent).
pub const PANIC_THRESHOLD: u32 = 50;
