//! NBD: the client blockvault uses to reach live disks, and the read-only server that
//! gives instant access to backups.
//!
//! `proto` holds the wire format and its parsers, `uri` the libnbd URI forms, `client`
//! the negotiating, pipelining client (see its doc for why we do not use the `nbd` crate),
//! `server` the fixed-newstyle server with structured replies and `base:allocation`,
//! `tls` the x509 settings of NBD over TLS (STARTTLS; `nbds://`).

pub mod client;
pub mod proto;
pub mod server;
pub mod tls;
pub mod uri;

pub use client::{NbdClient, StatusExtent};
pub use tls::{NbdTlsClient, NbdTlsServer};
pub use uri::NbdUri;

/// Meta context name of the allocation map.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Meta context name of a QEMU dirty bitmap.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}
