//! SPIFFE identities: `spiffe://trust-domain/path`, carried as the URI SAN of a workload
//! certificate (`spiffe://cluster.local/ns/shop/sa/web`). The type lives in spur-config
//! ([`spur_config::SpiffeId`]), shared with the config and the mesh CA; this module reads
//! it from certificates.

pub use spur_config::{SpiffeId as Identity, SpiffeIdError as IdentityError};

/// The SPIFFE identity of a certificate: its first URI SAN that is a SPIFFE ID.
pub fn from_cert(der: &[u8]) -> Option<Identity> {
    super::der::uri_sans(der)
        .into_iter()
        .find_map(|uri| Identity::parse(uri).ok())
}
