//! Pure decisions, apart from I/O: each module decides one thing and is unit-tested alone.
//!
//! | decision | module |
//! |---|---|
//! | whether a peer may make a request (or open a connection) | [`authz`] |
//! | which feature flags are on for a request | [`flags`] |
//! | which route answers a request | [`route`] |
//! | which side of a weighted split | [`split`] |
//! | which endpoint of a cluster | [`balance`] |
//! | whether an endpoint is ejected, and for how long | [`breaker`] |
//! | whether health checks mark an endpoint down or up | [`health`] |
//! | whether a failed try is retried, after what pause | [`retry`] |
//! | whether the cluster can afford another retry | [`budget`] |
//! | which request ID and trace context go upstream | [`correlation`] |
//! | whether a request is over its rate limit | [`ratelimit`] |

pub mod authz;
pub mod balance;
pub mod breaker;
pub mod budget;
pub mod correlation;
pub mod flags;
pub mod health;
pub mod ratelimit;
pub mod retry;
pub mod route;
pub mod split;
