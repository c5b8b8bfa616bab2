//! Cleanup after a failed or cancelled backup: remove the packs it published.
//!
//! A backup publishes packs as they fill and writes its manifest last; when it fails
//! (disk full, source error, capacity, cancel) its published packs would stay until the
//! next GC — a 32 MiB pack on a small, already full vault disk. They are not simply
//! deleted, because under the shared vault lock another backup may have found one of
//! their blobs through the lookup index (dedup) and referenced it, and that backup may
//! be running still or may have committed since. The rule:
//!
//! 1. The failed backup lets go of its shared vault lock and tries the exclusive one
//!    without waiting. If anything else holds the vault (a backup that may have deduped
//!    against these packs and not committed yet, GC, a verify), or a reader has live
//!    pins on the vault (a pinned backup may have deduplicated against these packs and
//!    been deleted since; only GC honours pins), nothing is removed: the packs are left
//!    for GC, which is always safe (duplicates or garbage, never a hole).
//! 2. Holding the vault alone, no other backup is in flight. A backup that committed
//!    while this one ran wrote its manifest after this backup started, so only
//!    manifests created since (less a margin for clocks of appliances sharing a vault)
//!    are walked: a pack holding a blob that such a manifest reaches (a root, a page or
//!    a chunk whose indexed location is that pack) is kept.
//! 3. Every other pack of the failed backup is forgotten by the lookup index and
//!    removed from the store. Staged (unpublished) packs were already removed by the
//!    pack writer.
//!
//! Cleanup never hides the backup's own error: its failures are logged and leave the
//! packs to GC.

use std::collections::HashSet;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::{Error, Result};
use crate::vault::Vault;
use crate::vault::pack::PackId;
use crate::vault::walk::{WalkItem, walk_disk};

/// Manifests created up to this long before the backup started are still checked.
const CLOCK_MARGIN: time::Duration = time::Duration::minutes(15);

/// What cleanup did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Discarded {
    pub removed: usize,
    /// Kept because a committed backup references them.
    pub shared: usize,
    /// Left for GC because the vault was busy (or cleanup failed).
    pub left: usize,
}

/// Remove the packs a failed backup (started at `started`) published, as the module
/// doc says. Call without holding the vault lock.
pub fn discard_packs(vault: &Vault, packs: Vec<PackId>, started: OffsetDateTime) -> Discarded {
    if packs.is_empty() {
        return Discarded::default();
    }
    let n = packs.len();
    let Ok(_lock) = vault.try_lock_exclusive() else {
        tracing::warn!(
            packs = n,
            "the failed backup's packs are left for GC: another job holds the vault and may have deduplicated against them"
        );
        return Discarded {
            left: n,
            ..Default::default()
        };
    };
    // A reader (restore, export, serve-nbd) holds pins, not the lock: a pinned backup
    // may have deduplicated against these packs and been deleted since. Leave them to GC,
    // which keeps what pins reach.
    if !crate::vault::pin::live_pins(vault.root()).is_ok_and(|p| p.is_empty()) {
        tracing::warn!(
            packs = n,
            "the failed backup's packs are left for GC: a reader has pinned backups of this vault"
        );
        return Discarded {
            left: n,
            ..Default::default()
        };
    }
    match discard_locked(vault, packs, started) {
        Ok(d) => {
            tracing::info!(
                removed = d.removed,
                kept_shared = d.shared,
                "removed the packs of the failed backup"
            );
            d
        }
        Err(e) => {
            tracing::warn!("cleanup of the failed backup's packs stopped ({e}); GC will free them");
            Discarded {
                left: n,
                ..Default::default()
            }
        }
    }
}

fn discard_locked(vault: &Vault, packs: Vec<PackId>, started: OffsetDateTime) -> Result<Discarded> {
    let mut lookup = vault.lookup()?;
    let ours: HashSet<PackId> = packs.iter().copied().collect();
    let mut shared: HashSet<PackId> = HashSet::new();
    let since = started - CLOCK_MARGIN;
    let mut visited = HashSet::new();
    for m in vault.manifests()? {
        // Unparsable times count as recent.
        if OffsetDateTime::parse(&m.created, &Rfc3339).is_ok_and(|t| t < since) {
            continue;
        }
        for disk in &m.disks {
            let mut mark = |d: &crate::chunk::ChunkDigest| -> Result<()> {
                if let Some(loc) = lookup.get(d)?
                    && ours.contains(&loc.pack)
                {
                    shared.insert(loc.pack);
                }
                Ok(())
            };
            walk_disk(vault, &lookup, disk, &mut visited, &mut |item| match item {
                WalkItem::Root(d) | WalkItem::Page { digest: d, .. } => mark(&d),
                WalkItem::Chunks(chunks) => chunks.iter().try_for_each(|(_, d)| mark(d)),
                // What cannot be read cannot be checked: keep everything.
                WalkItem::Damaged { what, error } => Err(Error::corrupt(format!(
                    "backup {} ({what}) cannot be walked: {error}",
                    m.id
                ))),
            })?;
        }
    }
    let mut done = Discarded {
        shared: shared.len(),
        ..Default::default()
    };
    for id in packs {
        if shared.contains(&id) {
            continue;
        }
        lookup.remove_pack(id)?;
        vault.store().remove_pack(id)?;
        done.removed += 1;
    }
    Ok(done)
}
