//! A vault of this appliance (local directory or object storage) as a replication target.
//!
//! While a [`VaultTarget`] lives it holds the target vault's lock shared (plus a use
//! lease on a shared store), as a backup does: the target's GC cannot collect blobs that
//! landed but that no manifest references yet. Each blob is verified as it lands: its
//! header must name the kind it was sent as, and it must decode and match its digest
//! under the *target's* codec (so a blob that would not restore there is refused, never
//! stored). Landed blobs are packed with `PackWriter::add_raw` (stored bytes unchanged),
//! each pack published (durable) and indexed in the target's lookup cache before
//! `put_blobs` returns. On object storage several `put_blobs` run at once
//! (`parallel_puts`); the capacity check of concurrent batches may then overshoot by
//! those batches (a few × 8 MiB). The manifest is written last, atomically (`Vault::put_manifest`).
//!
//! A vault that is encrypted and locked (the mirror of an encrypted vault on another
//! appliance, which never holds the key) takes sealed blobs after checking their header
//! only, and manifests sealed by the source (`put_sealed_manifest`).
//!
//! Retention: the manifest is copied as it is; protection locks and retention journal
//! records of the source are **not** copied — the target's own policy (its compliance
//! mode, a replication policy's retention) decides how long a replica is kept.

use std::sync::Mutex;

use crate::chunk::{ChunkDigest, decode_blob, parse_blob_header};
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::BackupManifest;
use crate::vault::lookup::LookupIndex;
use crate::vault::pack::{PackEntry, PackInfo};
use crate::vault::{Vault, VaultLock};

use super::{RawBlob, ReplicaTarget, TargetInfo};

/// A vault opened (and unlocked, if encrypted) as a replication target.
pub struct VaultTarget {
    vault: Vault,
    lookup: Mutex<LookupIndex>,
    _lock: VaultLock,
}

impl VaultTarget {
    /// Take `vault` as a target: its shared lock (and lease) is held until drop.
    pub fn new(vault: Vault) -> Result<VaultTarget> {
        let lock = vault.lock_shared()?;
        let lookup = vault.lookup_reconciled()?;
        Ok(VaultTarget {
            vault,
            lookup: Mutex::new(lookup),
            _lock: lock,
        })
    }

    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    fn lookup(&self) -> Result<std::sync::MutexGuard<'_, LookupIndex>> {
        self.lookup
            .lock()
            .map_err(|_| Error::new(ErrorKind::Io, "the target's lookup index lock is poisoned"))
    }

    fn check_capacity(&self, incoming: u64) -> Result<()> {
        let Some(cap) = self.vault.config().capacity else {
            return Ok(());
        };
        let used = self.vault.stored_bytes(&*self.lookup()?)?.0;
        if used + incoming > cap {
            return Err(Error::new(
                ErrorKind::Full,
                format!(
                    "target vault {} would exceed its capacity of {cap} bytes ({used} used, {incoming} incoming); raise it with `vault set-capacity` or free space",
                    self.vault.root().display()
                ),
            ));
        }
        Ok(())
    }
}

/// A received blob is what it claims: its header names its kind, it is not oversized,
/// and it decodes and matches its digest under the target's codec. Without a codec (a
/// mirror of an encrypted vault, which never holds the key) it must be sealed: its
/// digest and seal are checked where the key is, at restore.
fn check_blob(b: &RawBlob, codec: Option<&crate::chunk::BlobCodec>) -> Result<()> {
    let header = parse_blob_header(&b.stored)
        .map_err(|e| e.context_prefix(format!("received blob {}", b.digest)))?;
    if header.kind != b.kind {
        return Err(Error::corrupt(format!(
            "received blob {} is sent as {:?} but its header says {:?}",
            b.digest, b.kind, header.kind
        )));
    }
    if b.stored.len() > u32::MAX as usize {
        return Err(Error::invalid(format!(
            "received blob {} is {} bytes long",
            b.digest,
            b.stored.len()
        )));
    }
    let Some(codec) = codec else {
        if !header.sealed {
            return Err(Error::corrupt(format!(
                "received blob {} is not sealed, but this mirror vault is encrypted: it takes the sealed blobs of its encrypted source only (nothing of this batch was kept)",
                b.digest
            )));
        }
        return Ok(());
    };
    decode_blob(&b.stored, &b.digest, codec).map_err(|e| {
        e.context_prefix(format!(
            "received blob {} does not verify in the target vault (nothing of this batch was kept)",
            b.digest
        ))
    })?;
    Ok(())
}

impl VaultTarget {
    /// Store `sealed`, the stored form of `manifest` sealed by an encrypted source with
    /// the vault key this (locked) vault shares, as it is.
    pub fn put_sealed_manifest(&self, manifest: &BackupManifest, sealed: &[u8]) -> Result<()> {
        self.vault.store().put_file(&manifest.key(), sealed)
    }
}

impl ReplicaTarget for VaultTarget {
    fn info(&self) -> Result<TargetInfo> {
        let c = self.vault.config();
        Ok(TargetInfo {
            vault_id: c.id.clone(),
            chunk_size: c.chunk_size,
            key_check: c.encryption.as_ref().map(|e| e.key_check.clone()),
        })
    }

    fn missing(&self, digests: &[ChunkDigest]) -> Result<Vec<ChunkDigest>> {
        let lookup = self.lookup()?;
        let mut out = Vec::new();
        for d in digests {
            if !lookup.contains(d)? {
                out.push(*d);
            }
        }
        Ok(out)
    }

    fn put_blobs(&self, blobs: Vec<RawBlob>) -> Result<u64> {
        // A mirror of an encrypted vault is encrypted and locked: it has no key.
        let codec = if self.vault.is_encrypted() && !self.vault.is_unlocked() {
            None
        } else {
            Some(self.vault.codec()?)
        };
        // Verified on a few threads: decoding (decrypt, decompress, hash) is the cost.
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 4);
        let per = blobs.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let checks: Vec<_> = blobs
                .chunks(per)
                .map(|part| s.spawn(move || part.iter().try_for_each(|b| check_blob(b, codec))))
                .collect();
            checks.into_iter().try_for_each(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::new(ErrorKind::Io, "a verifying thread panicked"))
                })
            })
        })?;
        let incoming: u64 = blobs.iter().map(|b| b.stored.len() as u64).sum();
        self.check_capacity(incoming)?;
        let mut writer = self.vault.pack_writer();
        let mut packs: Vec<PackInfo> = Vec::new();
        for b in &blobs {
            let entry = PackEntry {
                digest: b.digest,
                offset: 0,
                length: b.stored.len() as u32,
                kind: b.kind,
            };
            if let Some(sealed) = writer.add_raw(&entry, &b.stored)? {
                packs.push(sealed.publish()?);
            }
        }
        if let Some(p) = writer.finish_current()? {
            packs.push(p);
        }
        let mut lookup = self.lookup()?;
        let mut written = 0;
        for p in &packs {
            lookup.insert_pack(p)?;
            written += p.size;
        }
        Ok(written)
    }

    fn has_manifest(&self, manifest: &BackupManifest) -> Result<bool> {
        match self.vault.store().len(&manifest.key()) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn put_manifest(&self, manifest: &BackupManifest) -> Result<()> {
        self.vault.put_manifest(manifest)
    }

    /// An object store takes one PUT per connection at a time: several batches (each
    /// about one pack) land at once. A local vault is bounded by its disk: one.
    fn parallel_puts(&self) -> usize {
        if self.vault.is_shared_store() {
            super::engine::MAX_PUTS_IN_FLIGHT
        } else {
            1
        }
    }
}
