//! Walking a backup's disk index: root → pages → chunk slots.
//!
//! Shared by restore, GC (mark) and verify (map damage to backups and disk offsets).
//! A page already visited (same digest, e.g. unchanged between backups) is not walked
//! twice when the caller passes the same `visited` set.

use std::collections::HashSet;

use crate::chunk::ChunkDigest;
use crate::error::{Error, Result};
use crate::index::{IndexRoot, PAGE_ENTRIES, decode_page};
use crate::manifest::DiskManifest;

use super::Vault;
use super::lookup::LookupIndex;

/// Load and check a disk's index root.
pub fn load_root(vault: &Vault, lookup: &LookupIndex, disk: &DiskManifest) -> Result<IndexRoot> {
    let (_, bytes) = vault
        .read_blob(lookup, &disk.index_root)
        .map_err(|e| e.context_prefix(format!("index root of disk {}", disk.name)))?;
    let root = IndexRoot::decode(&bytes)?;
    if root.disk_size != disk.size {
        return Err(Error::corrupt(format!(
            "index of disk {} says {} bytes, manifest says {}",
            disk.name, root.disk_size, disk.size
        )));
    }
    Ok(root)
}

/// Load page `p` of an index (all-zero pages are not stored).
pub fn load_page(
    vault: &Vault,
    lookup: &LookupIndex,
    root: &IndexRoot,
    p: usize,
) -> Result<Vec<ChunkDigest>> {
    let n = root.page_len(p);
    let d = root.pages[p];
    if d.is_zero() {
        return Ok(vec![ChunkDigest::ZERO; n]);
    }
    let (_, bytes) = vault.read_blob(lookup, &d).map_err(|e| {
        e.context_prefix(format!(
            "index page {p} (disk offsets from {})",
            p as u64 * PAGE_ENTRIES as u64 * root.chunk_size.as_u64()
        ))
    })?;
    decode_page(&bytes, n)
}

/// What a walk reports.
pub enum WalkItem<'a> {
    /// The root blob.
    Root(ChunkDigest),
    /// An index page blob (first visit only).
    Page { page: usize, digest: ChunkDigest },
    /// The non-zero chunks of a page (first visit only): `(disk offset, digest)`.
    Chunks(&'a [(u64, ChunkDigest)]),
    /// A page or the root could not be read; the walk goes on without it.
    Damaged { what: String, error: Error },
}

/// Walk one disk. Errors from `f` stop the walk; unreadable index blobs are reported as
/// [`WalkItem::Damaged`] so that verify can list them.
pub fn walk_disk(
    vault: &Vault,
    lookup: &LookupIndex,
    disk: &DiskManifest,
    visited: &mut HashSet<ChunkDigest>,
    f: &mut dyn FnMut(WalkItem<'_>) -> Result<()>,
) -> Result<()> {
    f(WalkItem::Root(disk.index_root))?;
    let root = match load_root(vault, lookup, disk) {
        Ok(r) => r,
        Err(error) => {
            return f(WalkItem::Damaged {
                what: format!("index root {}", disk.index_root),
                error,
            });
        }
    };
    let cs = root.chunk_size.as_u64();
    let mut chunks = Vec::with_capacity(PAGE_ENTRIES);
    for (p, d) in root.pages.iter().enumerate() {
        if d.is_zero() || !visited.insert(*d) {
            continue;
        }
        f(WalkItem::Page {
            page: p,
            digest: *d,
        })?;
        match load_page(vault, lookup, &root, p) {
            Ok(entries) => {
                chunks.clear();
                chunks.extend(
                    entries
                        .iter()
                        .enumerate()
                        .filter(|(_, d)| !d.is_zero())
                        .map(|(i, d)| ((p * PAGE_ENTRIES + i) as u64 * cs, *d)),
                );
                f(WalkItem::Chunks(&chunks))?;
            }
            Err(error) => f(WalkItem::Damaged {
                what: format!("index page {d}"),
                error,
            })?,
        }
    }
    Ok(())
}
