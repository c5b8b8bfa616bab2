//! Replication: copying backups from one vault to another by digest.
//!
//! The engine (owned here) walks a source backup's blobs, asks the target which digests
//! it lacks, and hands it those blobs exactly as they are stored in the source packs
//! (sealed blobs stay sealed), then the manifest. A target is anything that implements
//! [`ReplicaTarget`]: another vault opened on this appliance (local or object storage),
//! or a mirror vault on a second appliance reached over its HTTPS admin API.
//!
//! Order of landing, so that a target never holds a manifest whose blobs are missing:
//! blobs first (durable when `put_blobs` returns), manifest last. Within a backup the
//! engine sends data chunks, index pages and roots in walk order, batch by batch; what a
//! killed run landed stays, unreferenced (the target's GC may collect it), and the next
//! run asks `missing` again and sends only the rest.
//!
//! What is verified where:
//!
//! | where            | what |
//! |------------------|------|
//! | engine, source   | each blob it sends decodes and matches its digest under the source vault's codec (a rotten copy is looked up again in the pack trailers; none good: `Corrupt`, no manifest); a damaged index page or root stops the replication |
//! | engine           | the target's chunk size and key (`key_check`) match the source's, before anything is sent ([`engine::check_compatible`]) |
//! | target, landing  | each blob's header names the kind it was sent as, and it decodes and matches its digest under the target's codec; a batch with one bad blob keeps nothing. A mirror of an encrypted vault holds no key: there a blob must be sealed and name its kind, and its digest is checked at restore (AEAD tag, keyed digest) |
//!
//! **Encrypted mirror.** An encrypted source pushing to an empty plaintext mirror vault
//! first sends its key material (`ReplicaTarget::adopt_encryption`: the wrappings of
//! vault.toml and the key check, bound to the source's vault id by `wrapped_for`), so
//! the mirror becomes an encrypted vault with the same vault key without ever holding
//! it; blobs go sealed as stored, manifests sealed by the source
//! (`put_manifest_sealed`). Digests are keyed blake3 of the plaintext under the vault
//! key, the same in both vaults, so dedup on the mirror holds. Restoring there needs
//! the key (`--keyfile`), as at the source. The mirror's catalog learns each backup's
//! plaintext manifest (names, sizes, times: no data).
//!
//! A replica has its own backup id ([`engine::replica_id`]: the catalog keys backups by
//! id) and records where it came from (`replica_of` in the manifest). [`VaultTarget`]
//! (`vault_target`) is a vault of this appliance; `remote` (the mirror engineer's) is a
//! mirror vault on another appliance.

pub mod engine;
pub mod remote;
pub mod vault_target;
pub mod wire;

pub use engine::{ReplicaProgress, ReplicaStats, ReplicateOptions, replicate_backup};
pub use vault_target::VaultTarget;

use crate::Result;
use crate::chunk::{BlobKind, ChunkDigest, ChunkSize};
use crate::manifest::BackupManifest;

/// One blob as stored in a source pack: header and payload bytes, sealed when the vault
/// is encrypted. The target verifies it against `digest` before keeping it.
#[derive(Debug, Clone)]
pub struct RawBlob {
    pub digest: ChunkDigest,
    pub kind: BlobKind,
    pub stored: Vec<u8>,
}

/// What a source needs to know about a target before copying anything to it: blobs are
/// only meaningful in a vault with the same chunk size and, for encrypted vaults, the
/// same vault key (digests are keyed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetInfo {
    pub vault_id: String,
    pub chunk_size: ChunkSize,
    /// `EncryptionConfig::key_check` of an encrypted target; `None` when plaintext.
    pub key_check: Option<String>,
}

/// Where replicated blobs and manifests land.
pub trait ReplicaTarget: Send + Sync {
    /// Identity and compatibility of the target vault.
    fn info(&self) -> Result<TargetInfo>;
    /// The digests of `digests` the target does not hold.
    fn missing(&self, digests: &[ChunkDigest]) -> Result<Vec<ChunkDigest>>;
    /// Land `blobs` durably (verified, packed, published) before returning; returns the
    /// bytes the target wrote.
    fn put_blobs(&self, blobs: Vec<RawBlob>) -> Result<u64>;
    /// Whether the target already holds this backup's manifest.
    fn has_manifest(&self, manifest: &BackupManifest) -> Result<bool>;
    /// Publish a manifest whose blobs have all landed.
    fn put_manifest(&self, manifest: &BackupManifest) -> Result<()>;
    /// Publish a manifest with its stored form `sealed` by the source (an encrypted
    /// source: the same vault key seals it alike). A target that holds the key seals it
    /// itself ([`ReplicaTarget::put_manifest`]); a mirror without the key stores `sealed`.
    fn put_manifest_sealed(&self, manifest: &BackupManifest, sealed: Option<&[u8]>) -> Result<()> {
        let _ = sealed;
        self.put_manifest(manifest)
    }
    /// Take an encrypted source's key material (wrappings and key check, never the key)
    /// so that an empty plaintext target becomes an encrypted vault with the same vault
    /// key. Returns whether it did. Vaults of this appliance do not (create them with
    /// `vault create NAME --replica-of SOURCE`); a mirror vault on another appliance does.
    fn adopt_encryption(&self, enc: &crate::vault::keys::EncryptionConfig) -> Result<bool> {
        let _ = enc;
        Ok(false)
    }
    /// How many `put_blobs` calls the target takes at once (1: one after the other).
    fn parallel_puts(&self) -> usize {
        1
    }
}

#[cfg(test)]
mod tests;
