//! Pure decisions, apart from I/O: each module decides one thing and is unit-tested alone.
//!
//! | decision | module |
//! |---|---|
//! | which route answers a request | [`route`] |
//! | which side of a weighted split | [`split`] |
//! | which endpoint of a cluster | [`balance`] |
//! | which request ID and trace context go upstream | [`correlation`] |

pub mod balance;
pub mod correlation;
pub mod route;
pub mod split;
