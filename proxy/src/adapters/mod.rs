//! I/O at the edges: listeners (and their TLS step), the admin server, connection idling.

pub mod admin;
pub mod detect;
pub mod dns;
pub mod h1_server;
pub mod h2_body;
mod h2_frame;
pub mod h2_server;
mod h2_stream;
pub mod health;
pub mod hpack;
pub mod http_conn;
pub mod idle;
mod lend;
pub mod listener;
pub mod relay;
mod stream_set;
pub mod tcp;
pub mod tls;
