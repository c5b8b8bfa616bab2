//! Storage backends of a vault: the object interface.
//!
//! [`ChunkStore`] is the seam between the vault logic (packs, index, manifests, GC) and
//! where the bytes live. It is an object store: keys are relative, `/`-separated names
//! (no empty, `.` or `..` part) mapped one to one onto objects:
//!
//! ```text
//! vault.toml                              what the vault is (see `Vault`)
//! packs/<aa>/<pack-id>.pack               immutable packs (see `pack`)
//! backups/<resource>/<backup-id>.json     manifests: written last, the commit point
//! bad-blobs                               copies verify found rotten (see `badblobs`)
//! locks/leases/<kind>-<owner>.json        GC / backup leases of object-store vaults (see `lease`)
//! ```
//!
//! Five primitives (get, ranged get, put from bytes, an owned buffer or a spooled local file, list by
//! prefix, delete) plus length; the pack and file helpers every caller uses are provided
//! methods on top of them. A put is atomic: a reader sees the old object or the whole new
//! one, never a part. Nothing here hands out local paths: staging a pack is the writer's
//! business (`pack::Staging`: a spool file or memory), and local-only state (lookup cache, flock, pins) lives
//! in the vault's local state directory, not in the store.
//!
//! Implementations: [`LocalStore`] (a directory: rename-on-publish), [`MemoryStore`]
//! (in memory, with fault injection, for tests), [`S3Store`] (S3-compatible object
//! storage behind a private tokio runtime; the trait stays synchronous).

mod local;
mod memory;
mod s3;

use std::path::Path;

pub use self::local::{LocalStore, PackId, sync_dir, write_atomic};
pub use self::memory::{Fault, MemoryStore, RequestCounts};
pub use self::s3::{S3Credentials, S3Location, S3Store};

use crate::error::{Error, Result};

/// One object listed by [`ChunkStore::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub len: u64,
}

/// The key of a pack.
pub fn pack_key(id: PackId) -> String {
    let hex = id.to_string();
    format!("packs/{}/{hex}.pack", &hex[..2])
}

/// Refuse keys that could escape a directory store or mean two things.
pub fn check_key(key: &str) -> Result<()> {
    if key.is_empty()
        || key.starts_with('/')
        || key
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err(Error::invalid(format!("bad vault key {key:?}")));
    }
    Ok(())
}

/// Where a vault's objects live.
pub trait ChunkStore: Send + Sync {
    /// Where this store is, for messages (a path or `s3://bucket/prefix`); never secrets.
    fn describe(&self) -> String;
    /// A whole object (`NotFound` when absent).
    fn get(&self, key: &str) -> Result<Vec<u8>>;
    /// Exactly `len` bytes of an object at `offset`. A shorter answer (object truncated,
    /// or a short read from the server) is `Corrupt`, never fewer bytes.
    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>>;
    /// Length of an object in bytes.
    fn len(&self, key: &str) -> Result<u64>;
    /// Store a whole object atomically.
    fn put(&self, key: &str, bytes: &[u8]) -> Result<()>;
    /// Store a whole object atomically from a fully written, fsynced local file, which the
    /// store consumes (moves or deletes) on success.
    fn put_spooled(&self, key: &str, spooled: &Path) -> Result<()>;
    /// Store a whole object atomically from a buffer the store may keep (no copy where
    /// the client can send it as is).
    fn put_owned(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        self.put(key, &bytes)
    }
    /// Every object whose key starts with `prefix/` (recursive), sorted by key.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;
    /// Remove an object (`NotFound` when absent).
    fn delete(&self, key: &str) -> Result<()>;

    // ---- packs (provided) ----

    /// Publish a fully written, fsynced staged pack under `id` (atomic).
    fn publish_pack(&self, id: PackId, staged: &Path) -> Result<()> {
        self.put_spooled(&pack_key(id), staged)
    }
    /// Publish a whole pack staged in memory under `id` (atomic).
    fn publish_pack_bytes(&self, id: PackId, bytes: Vec<u8>) -> Result<()> {
        self.put_owned(&pack_key(id), bytes)
    }
    /// Length of a pack in bytes.
    fn pack_len(&self, id: PackId) -> Result<u64> {
        self.len(&pack_key(id))
            .map_err(|e| e.context_prefix(format!("pack {id}")))
    }
    /// Read `len` bytes of a pack at `offset`.
    fn read_pack_range(&self, id: PackId, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.get_range(&pack_key(id), offset, len)
            .map_err(|e| e.context_prefix(format!("reading {len} bytes at {offset} of pack {id}")))
    }
    /// Every published pack, sorted.
    fn list_packs(&self) -> Result<Vec<PackId>> {
        let mut out: Vec<PackId> = self
            .list("packs")?
            .into_iter()
            .filter_map(|o| {
                let rest = o.key.strip_prefix("packs/")?;
                let (dir, file) = rest.split_once('/')?;
                let id: PackId = file.strip_suffix(".pack")?.parse().ok()?;
                (dir.len() == 2 && id.to_string().starts_with(dir)).then_some(id)
            })
            .collect();
        out.sort();
        Ok(out)
    }
    /// Remove a pack (GC only).
    fn remove_pack(&self, id: PackId) -> Result<()> {
        self.delete(&pack_key(id))
    }

    // ---- small files (provided) ----

    /// Write a small file atomically.
    fn put_file(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.put(key, bytes)
    }
    /// Read a small file.
    fn get_file(&self, key: &str) -> Result<Vec<u8>> {
        self.get(key)
    }
    /// Keys of the files under `prefix` (recursive), sorted.
    fn list_files(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self.list(prefix)?.into_iter().map(|o| o.key).collect())
    }
    /// Remove a file.
    fn remove_file(&self, key: &str) -> Result<()> {
        self.delete(key)
    }
}
