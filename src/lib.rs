//! blockvault: a block-level backup appliance for virtual machine disks.
//!
//! Data path (see `DESIGN.md`): a [`source::BlockSource`] yields the disk's allocated
//! extents, cut into fixed-size chunks aligned to disk offsets ([`chunk`]); workers hash
//! (blake3) and compress (zstd) them in parallel ([`backup`]); new blobs are appended to
//! immutable pack files in a [`vault::Vault`]; each backup's disk index is a two-level
//! tree of index pages ([`index`]) referenced by a JSON [`manifest`]. [`restore`] walks the
//! index back into a new image. The [`catalog`] (SQLite) caches manifests and names the
//! vaults; [`app`] ties catalog and vaults together for the CLI and the service.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod api;
pub mod app;
pub mod backup;
pub mod benchmark;
pub mod catalog;
pub mod cbt;
pub mod chunk;
pub mod config;
pub mod disk_reader;
pub mod drill;
pub mod error;
pub mod extent;
pub mod files;
pub mod freeze;
pub mod index;
pub mod instant;
pub mod libvirt;
pub mod live;
pub mod manifest;
pub mod name;
pub mod nbd;
pub mod policy;
pub mod qmp;
pub mod replicate;
pub mod restore;
pub mod scheduler;
pub mod service;
pub mod source;
pub mod task;
pub mod tls;
pub mod vault;

pub use error::{Error, ErrorKind, Result};
