//! Garbage collection: free the blobs that no backup needs.
//!
//! 1. Take the vault lock exclusively (fails with `Conflict` while a backup runs, so a
//!    blob that a running backup deduplicated against is never removed).
//! 2. Mark: walk every manifest's index, then every pinned backup's (see `pin`; root →
//!    pages → chunks; a page already visited is not walked twice) into a live set. An unreadable index stops GC: it must never act
//!    on a partial view of what is live.
//! 3. Sweep every pack the store lists. The pack trailers are the only authority on
//!    what exists; the lookup index (a cache) is never asked where a blob lives. Packs
//!    are visited in id order and each live digest keeps exactly one copy: the first
//!    one met that is not listed in `bad-blobs` (a listed copy is kept only when the
//!    digest has no other copy). A pack whose trailer cannot be read is left alone.
//!    A pack with no kept copy is deleted; a pack whose kept share of blob bytes fell
//!    below `repack_below` percent is rewritten: each kept blob is decoded and its digest
//!    checked as it is copied (a rotten blob is not carried forward; it is reported with
//!    the backups that reach it) into new packs.
//!    A pack that holds a blob of a locked backup (see `retention`: a lock date after
//!    now, or compliance mode) is neither deleted nor rewritten: a locked backup's
//!    blobs stay in place, byte for byte, until its date. A lock recorded in the
//!    journal for a backup whose manifest is gone stops GC (`Corrupt`): something
//!    deleted it outside blockvault, and GC frees nothing until that is looked at.
//!    The journal is read once, at the start: a lock recorded while GC runs keeps its
//!    backup's packs in place from the next GC on (this one may still move them; their
//!    blobs are copied, never lost).
//! 4. New packs are durable, then the lookup index is switched to them and made to agree
//!    with the trailers of every surviving pack (`lookup::TrailerScan`; rows it still has
//!    to fix are reported as `index_repaired`), then the old packs are deleted. A crash
//!    in between leaves duplicates, never a hole.
//!
//! [`gc_with_progress`] reports the sweep's progress (pack bytes visited of the pack bytes
//! listed) for a service task.
//!
//! Memory stays bounded however large the vault: the live set and the set of digests
//! already kept are on-disk sorted sets (`digestset`, SQLite B-trees behind a fixed
//! page cache). What still grows with the vault: the set of index pages visited (one
//! digest per 1,024 chunks) and the list of packs.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::chunk::{ChunkDigest, decode_blob};
use crate::error::{ErrorKind, Result};

use super::Vault;
use super::badblobs::BadBlobs;
use super::digestset::DigestSet;
use super::lookup::IndexRepair;
use super::pack::{PackEntry, PackId, PackInfo, read_pack_entries};
use super::store::{ChunkStore, pack_key};
use super::walk::{WalkItem, walk_disk};

/// A blob GC found rotten while copying it (not carried forward).
#[derive(Debug, Clone, Serialize)]
pub struct RottenBlob {
    pub digest: String,
    pub pack: String,
    pub offset: u64,
    pub error: String,
    /// Backups (names) that reference it, with the disk offsets where known.
    pub backups: Vec<String>,
}

/// What a GC run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcStats {
    pub backups: usize,
    /// Backups pinned by running readers (marked live even if deleted).
    pub pinned_backups: usize,
    /// Backups under a retention lock (their packs are left as they are).
    pub locked_backups: usize,
    /// Packs kept as they are because they hold blobs of locked backups.
    pub packs_kept_locked: usize,
    pub live_blobs: usize,
    pub packs_before: usize,
    pub packs_after: usize,
    pub packs_deleted: usize,
    pub packs_rewritten: usize,
    /// Packs whose trailer could not be read (left in place; run `verify`).
    pub packs_unreadable: usize,
    pub blobs_removed: u64,
    /// Blobs decoded and digest-checked while being copied.
    pub blobs_copied: u64,
    /// Stored blob bytes (compressed) before and after.
    pub stored_before: u64,
    pub stored_after: u64,
    /// Bytes of pack files before and after.
    pub pack_bytes_before: u64,
    pub pack_bytes_after: u64,
    pub bytes_freed: u64,
    /// What the lookup index had wrong (fixed from the trailers).
    pub index_repaired: IndexRepair,
    pub rotten: Vec<RottenBlob>,
}

/// Run GC on `vault`.
pub fn gc(vault: &Vault, repack_below: u8) -> Result<GcStats> {
    gc_with_progress(vault, repack_below, None)
}

/// [`gc`], setting `progress` = (bytes total, bytes done) of the packs swept.
pub fn gc_with_progress(
    vault: &Vault,
    repack_below: u8,
    progress: Option<(&AtomicU64, &AtomicU64)>,
) -> Result<GcStats> {
    let _lock = vault.try_lock_exclusive()?;
    // GC reads manifests and index pages: an encrypted vault must be unlocked.
    let codec = vault.codec()?;
    let store = Arc::clone(vault.store());
    let staged = vault.clean_spool()?;
    if staged > 0 {
        tracing::info!(staged, "removed staged packs of crashed writers");
    }
    let mut lookup = vault.lookup()?;
    let manifests = vault.manifests()?;

    let mut live = DigestSet::new()?;
    let mut visited = HashSet::new();
    for m in &manifests {
        let who = || format!("backup {} ({})", m.name, m.id);
        mark(vault, &lookup, &m.disks, &mut visited, &mut live, &who)?;
    }
    // Blobs of locked backups: their packs stay as they are.
    let journal = super::retention::Journal::load(store.as_ref())?;
    let now = super::retention::now();
    let ids: HashSet<&str> = manifests.iter().map(|m| m.id.as_str()).collect();
    if let Some((id, until)) = journal
        .locked_ids(now)
        .into_iter()
        .find(|(id, _)| !ids.contains(id.as_str()))
    {
        return Err(crate::error::Error::corrupt(format!(
            "GC stopped: backup {id} is locked until {} but its manifest is gone from the              vault (deleted outside blockvault?); restore the manifest from a copy of the              vault, or run GC after that date",
            super::retention::format_time(until)
        )));
    }
    let mut locked = DigestSet::new()?;
    let mut locked_backups = 0;
    let mut locked_visited = HashSet::new();
    for m in &manifests {
        if journal
            .status(m, vault.config().compliance_days)
            .locked_at(now)
        {
            locked_backups += 1;
            let who = || format!("locked backup {} ({})", m.name, m.id);
            mark(
                vault,
                &lookup,
                &m.disks,
                &mut locked_visited,
                &mut locked,
                &who,
            )?;
        }
    }
    // Pins second (after the manifests: see `pin`): pinned backups stay live even when
    // their manifests were deleted.
    let pins = super::pin::live_pins(vault.root())?;
    for p in &pins {
        for b in &p.backups {
            let who = || {
                format!(
                    "pinned backup {} ({}, pid {} on {})",
                    b.name, b.id, p.pid, p.host
                )
            };
            mark(vault, &lookup, &b.disks, &mut visited, &mut live, &who)?;
        }
    }

    let mut stats = GcStats {
        pinned_backups: pins.iter().map(|p| p.backups.len()).sum(),
        locked_backups,
        backups: manifests.len(),
        live_blobs: live.len() as usize,
        ..GcStats::default()
    };
    let mut bad = BadBlobs::load(store.as_ref())?;
    let packs = store.list_packs()?;

    // Digests with a copy not known to be bad (only needed when some copies are bad).
    let mut has_good_copy = DigestSet::new()?;
    if !bad.is_empty() {
        for id in &packs {
            if let Ok(entries) = read_pack_entries(store.as_ref(), *id) {
                for e in entries {
                    if !bad.contains(&e.digest, *id, e.offset) && live.contains(&e.digest)? {
                        has_good_copy.insert(&e.digest)?;
                    }
                }
            }
        }
    }

    let mut writer = vault.pack_writer();
    let mut new_packs: Vec<PackInfo> = Vec::new();
    let mut old_packs: Vec<PackId> = Vec::new();
    let mut surviving: Vec<PackId> = Vec::new();
    let mut kept = DigestSet::new()?;
    let mut rotten: Vec<(PackId, PackEntry, String)> = Vec::new();
    let mut scan = lookup.trailer_scan()?;
    if let Some((total, _)) = progress {
        let mut sum = 0u64;
        for id in &packs {
            sum += store.pack_len(*id)?;
        }
        total.store(sum, Ordering::Relaxed);
    }
    for id in packs {
        let size = store.pack_len(id)?;
        if let Some((_, done)) = progress {
            done.fetch_add(size, Ordering::Relaxed);
        }
        stats.packs_before += 1;
        stats.pack_bytes_before += size;
        let entries = match read_pack_entries(store.as_ref(), id) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("GC leaves pack {id} alone: its trailer cannot be read: {e}");
                stats.packs_unreadable += 1;
                surviving.push(id);
                continue;
            }
        };
        let total: u64 = entries.iter().map(|e| e.length as u64).sum();
        stats.stored_before += total;
        let mut keep: Vec<&PackEntry> = Vec::new();
        let mut chosen: HashSet<ChunkDigest> = HashSet::new();
        for e in &entries {
            let usable = live.contains(&e.digest)?
                && !kept.contains(&e.digest)?
                && (!bad.contains(&e.digest, id, e.offset)
                    || !has_good_copy.contains(&e.digest)?);
            if usable && chosen.insert(e.digest) {
                keep.push(e);
            }
        }
        let live_bytes: u64 = keep.iter().map(|e| e.length as u64).sum();
        let mut holds_locked = false;
        if locked_backups > 0 {
            for e in &entries {
                if locked.contains(&e.digest)? {
                    holds_locked = true;
                    break;
                }
            }
        }
        if holds_locked {
            // A locked backup's blobs stay where they are (see the module doc).
            if keep.is_empty() || live_bytes * 100 < total * repack_below as u64 {
                stats.packs_kept_locked += 1;
            }
            for e in &keep {
                kept.insert(&e.digest)?;
            }
            scan.add_pack(&PackInfo { id, size, entries }, &bad)?;
            surviving.push(id);
        } else if keep.is_empty() {
            stats.packs_deleted += 1;
            stats.blobs_removed += entries.len() as u64;
            old_packs.push(id);
        } else if live_bytes * 100 < total * repack_below as u64 {
            let mut carried = 0u64;
            for e in keep {
                let stored = store.read_pack_range(id, e.offset, e.length as usize)?;
                if let Err(err) = decode_blob(&stored, &e.digest, codec) {
                    tracing::error!(
                        "GC does not carry rotten blob {} (pack {id} offset {}) forward: {err}",
                        e.digest,
                        e.offset
                    );
                    rotten.push((id, *e, err.to_string()));
                    continue;
                }
                if let Some(sealed) = writer.add_raw(e, &stored)? {
                    new_packs.push(sealed.publish()?);
                }
                kept.insert(&e.digest)?;
                carried += 1;
            }
            stats.blobs_copied += carried;
            stats.packs_rewritten += 1;
            stats.blobs_removed += entries.len() as u64 - carried;
            old_packs.push(id);
        } else {
            for e in &keep {
                kept.insert(&e.digest)?;
            }
            scan.add_pack(&PackInfo { id, size, entries }, &bad)?;
            surviving.push(id);
        }
    }
    if let Some(info) = writer.finish_current()? {
        new_packs.push(info);
    }
    for p in &new_packs {
        scan.add_pack(p, &bad)?;
        surviving.push(p.id);
    }
    // New packs are durable: switch the index over to them, make it agree with the
    // surviving trailers (what is still wrong after the switch was wrong before), then
    // delete the old packs.
    scan.index().replace_packs(&old_packs, &new_packs)?;
    stats.index_repaired = scan.heal(|| Ok(surviving.clone()))?;
    for id in &old_packs {
        remove_pack_once(store.as_ref(), *id)?;
    }
    let gone: HashSet<PackId> = old_packs.iter().copied().collect();
    if bad.retain(|c| !gone.contains(&c.pack)) > 0 {
        bad.save(store.as_ref())?;
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
    stats.rotten = name_rotten(vault, &lookup, &manifests, rotten)?;
    Ok(stats)
}

/// Name the backups (and disk offsets) that reach each rotten blob.
fn name_rotten(
    vault: &Vault,
    lookup: &super::lookup::LookupIndex,
    manifests: &[crate::manifest::BackupManifest],
    rotten: Vec<(PackId, PackEntry, String)>,
) -> Result<Vec<RottenBlob>> {
    if rotten.is_empty() {
        return Ok(Vec::new());
    }
    let mut reached: HashMap<ChunkDigest, Vec<String>> = rotten
        .iter()
        .map(|(_, e, _)| (e.digest, Vec::new()))
        .collect();
    for m in manifests {
        for disk in &m.disks {
            let mut visited = HashSet::new();
            walk_disk(vault, lookup, disk, &mut visited, &mut |item| {
                match item {
                    WalkItem::Root(d) | WalkItem::Page { digest: d, .. } => {
                        if let Some(v) = reached.get_mut(&d) {
                            v.push(format!("{} {} (index)", m.name, disk.name));
                        }
                    }
                    WalkItem::Chunks(chunks) => {
                        for (off, d) in chunks {
                            if let Some(v) = reached.get_mut(d) {
                                v.push(format!("{} {} offset {off}", m.name, disk.name));
                            }
                        }
                    }
                    WalkItem::Damaged { .. } => {}
                }
                Ok(())
            })?;
        }
    }
    Ok(rotten
        .into_iter()
        .map(|(pack, e, error)| RottenBlob {
            digest: e.digest.to_string(),
            pack: pack.to_string(),
            offset: e.offset,
            error,
            backups: reached.get(&e.digest).cloned().unwrap_or_default(),
        })
        .collect())
}

/// Mark every blob that `disks` reach (roots, pages, chunks) in `live`. An unreadable
/// index stops GC: it must never act on a partial view of what is live.
fn mark(
    vault: &Vault,
    lookup: &super::lookup::LookupIndex,
    disks: &[crate::manifest::DiskManifest],
    visited: &mut HashSet<ChunkDigest>,
    live: &mut DigestSet,
    who: &dyn Fn() -> String,
) -> Result<()> {
    for disk in disks {
        walk_disk(vault, lookup, disk, visited, &mut |item| match item {
            WalkItem::Root(d) | WalkItem::Page { digest: d, .. } => live.insert(&d).map(drop),
            WalkItem::Chunks(chunks) => chunks
                .iter()
                .try_for_each(|(_, d)| live.insert(d).map(drop)),
            WalkItem::Damaged { what, error } => Err(error.context_prefix(format!(
                "GC stopped: {} has an unreadable {what}; run `verify`",
                who()
            ))),
        })?;
    }
    Ok(())
}

/// Delete a pack GC found dead. One already gone (another GC, an operator, a bucket
/// lifecycle rule) is logged at warn with its key and skipped: not silent, not an error.
/// An S3 DELETE of a missing object succeeds, so the pack's length is asked first.
fn remove_pack_once(store: &dyn ChunkStore, id: PackId) -> Result<()> {
    match store.pack_len(id).and_then(|_| store.remove_pack(id)) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            tracing::warn!(
                key = %pack_key(id),
                store = %store.describe(),
                "GC: a pack to delete was already gone"
            );
            Ok(())
        }
        other => other,
    }
}
