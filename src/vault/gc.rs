//! Garbage collection: free the blobs that no backup needs.
//!
//! 1. Take the vault lock exclusively (fails with `Conflict` while a backup runs, so a
//!    blob that a running backup deduplicated against is never removed).
//! 2. Mark: walk every manifest's index (root → pages → chunks; a page already visited is
//!    not walked twice) into a live set. An unreadable index stops GC: it must never act
//!    on a partial view of what is live.
//! 3. Sweep each pack (its trailer is the authority on what it holds): a blob is live in
//!    a pack when it is marked and the lookup index points at this copy. A pack with
//!    nothing live is deleted; a pack whose live share of blob bytes fell below
//!    `repack_below` percent is rewritten: its live blobs are copied, as stored, into new
//!    packs, which are published and indexed before the old packs are deleted. A crash in
//!    between leaves duplicates, never a hole.
//!
//! Weak spot (noted for later): the live set is an in-memory hash set of digests, about
//! 50 bytes per unique live blob (≈ 800 MiB for 16 M chunks = 1 TiB of unique data).

use std::collections::HashSet;
use std::sync::Arc;

use serde::Serialize;

use crate::chunk::ChunkDigest;
use crate::error::Result;

use super::Vault;
use super::pack::{PackId, PackInfo, PackWriter, read_pack_entries};
use super::walk::{WalkItem, walk_disk};

/// What a GC run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcStats {
    pub backups: usize,
    pub live_blobs: usize,
    pub packs_before: usize,
    pub packs_after: usize,
    pub packs_deleted: usize,
    pub packs_rewritten: usize,
    pub blobs_removed: u64,
    /// Blob bytes (stored, compressed) before and after.
    pub stored_before: u64,
    pub stored_after: u64,
    /// Bytes of pack files before and after.
    pub pack_bytes_before: u64,
    pub pack_bytes_after: u64,
    pub bytes_freed: u64,
}

/// Run GC on `vault`.
pub fn gc(vault: &Vault, repack_below: u8) -> Result<GcStats> {
    let _lock = vault.try_lock_exclusive()?;
    let staged = vault.store().clean_staging()?;
    if staged > 0 {
        tracing::info!(staged, "removed staged packs of crashed writers");
    }
    let mut lookup = vault.lookup_reconciled()?;
    let manifests = vault.manifests()?;

    let mut live: HashSet<ChunkDigest> = HashSet::new();
    let mut visited = HashSet::new();
    for m in &manifests {
        for disk in &m.disks {
            walk_disk(vault, &lookup, disk, &mut visited, &mut |item| match item {
                WalkItem::Root(d) | WalkItem::Page { digest: d, .. } => {
                    live.insert(d);
                    Ok(())
                }
                WalkItem::Chunks(chunks) => {
                    live.extend(chunks.iter().map(|(_, d)| *d));
                    Ok(())
                }
                WalkItem::Damaged { what, error } => Err(error.context_prefix(format!(
                    "GC stopped: backup {} ({}) has an unreadable {what}; run `verify`",
                    m.name, m.id
                ))),
            })?;
        }
    }

    let mut stats = GcStats {
        backups: manifests.len(),
        live_blobs: live.len(),
        ..GcStats::default()
    };
    let store = Arc::clone(vault.store());
    let mut writer = PackWriter::new(Arc::clone(&store), vault.config().pack_target);
    let mut new_packs: Vec<PackInfo> = Vec::new();
    let mut old_packs: Vec<PackId> = Vec::new();
    for (id, size) in lookup.packs()? {
        stats.packs_before += 1;
        stats.pack_bytes_before += size;
        let entries = read_pack_entries(store.as_ref(), id)?;
        let indexed: HashSet<ChunkDigest> = lookup
            .entries_in_pack(id)?
            .into_iter()
            .map(|e| e.digest)
            .collect();
        let total: u64 = entries.iter().map(|e| e.length as u64).sum();
        stats.stored_before += total;
        let keep: Vec<_> = entries
            .iter()
            .filter(|e| live.contains(&e.digest) && indexed.contains(&e.digest))
            .collect();
        let live_bytes: u64 = keep.iter().map(|e| e.length as u64).sum();
        if keep.is_empty() {
            stats.packs_deleted += 1;
            stats.blobs_removed += entries.len() as u64;
            old_packs.push(id);
        } else if live_bytes * 100 < total * repack_below as u64 {
            for e in &keep {
                let stored = store.read_pack_range(id, e.offset, e.length as usize)?;
                if let Some(sealed) = writer.add_raw(e, &stored)? {
                    new_packs.push(sealed.publish()?);
                }
            }
            stats.packs_rewritten += 1;
            stats.blobs_removed += (entries.len() - keep.len()) as u64;
            old_packs.push(id);
        }
    }
    if let Some(info) = writer.finish_current()? {
        new_packs.push(info);
    }
    // New packs are durable; switch the index over, then delete the old packs.
    lookup.replace_packs(&old_packs, &new_packs)?;
    for id in &old_packs {
        store.remove_pack(*id)?;
    }
    for (id, size) in lookup.packs()? {
        stats.packs_after += 1;
        stats.pack_bytes_after += size;
        let _ = id;
    }
    stats.stored_after = lookup.stored_blob_bytes()?;
    stats.bytes_freed = stats
        .pack_bytes_before
        .saturating_sub(stats.pack_bytes_after);
    Ok(stats)
}
