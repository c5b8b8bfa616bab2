//! Verify: re-read packs, re-hash every blob, and say which backups a damage hurts.
//!
//! Whole vault: every pack is read in full, its trailer checked, and every blob decoded
//! and re-hashed (in parallel over packs). For chosen backups: only the packs holding
//! blobs those backups reference. Then every chosen backup's index is walked to map each
//! corrupt or missing blob to the backups and disk offsets it hurts, so the report says
//! "backup X, disk0, offset 1048576" and not just a digest.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use serde::Serialize;

use crate::chunk::{ChunkDigest, decode_blob};
use crate::error::Result;
use crate::manifest::BackupManifest;

use super::Vault;
use super::pack::{PackId, read_pack_entries};
use super::walk::{WalkItem, walk_disk};

/// A damaged place in a backup.
#[derive(Debug, Clone, Serialize)]
pub struct Damage {
    pub backup_id: String,
    pub backup_name: String,
    pub disk: String,
    /// Disk offset of the damaged chunk (None: an index blob, which hurts a whole range).
    pub offset: Option<u64>,
    pub what: String,
}

/// A blob that failed its check.
#[derive(Debug, Clone, Serialize)]
pub struct BadBlob {
    pub digest: String,
    pub pack: String,
    pub error: String,
}

/// Result of a verify run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub backups: usize,
    pub packs_checked: usize,
    pub blobs_checked: u64,
    pub bytes_checked: u64,
    pub corrupt_blobs: Vec<BadBlob>,
    pub damage: Vec<Damage>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.corrupt_blobs.is_empty() && self.damage.is_empty()
    }
}

/// Verify the whole vault (`only = None`) or the given backups.
pub fn verify(
    vault: &Vault,
    only: Option<&[BackupManifest]>,
    threads: usize,
) -> Result<VerifyReport> {
    let lookup = vault.lookup_reconciled()?;
    let all;
    let manifests: &[BackupManifest] = match only {
        Some(m) => m,
        None => {
            all = vault.manifests()?;
            &all
        }
    };
    let store = vault.store();
    let packs: Vec<PackId> = match only {
        None => store.list_packs()?,
        Some(ms) => {
            let mut set = HashSet::new();
            let mut visited = HashSet::new();
            for m in ms {
                for disk in &m.disks {
                    walk_disk(vault, &lookup, disk, &mut visited, &mut |item| {
                        let digests: Vec<ChunkDigest> = match item {
                            WalkItem::Root(d) | WalkItem::Page { digest: d, .. } => vec![d],
                            WalkItem::Chunks(c) => c.iter().map(|(_, d)| *d).collect(),
                            WalkItem::Damaged { .. } => vec![],
                        };
                        for d in digests {
                            if let Some(loc) = lookup.get(&d)? {
                                set.insert(loc.pack);
                            }
                        }
                        Ok(())
                    })?;
                }
            }
            let mut v: Vec<_> = set.into_iter().collect();
            v.sort();
            v
        }
    };

    // Check packs in parallel.
    let report = Mutex::new(VerifyReport {
        backups: manifests.len(),
        packs_checked: packs.len(),
        ..VerifyReport::default()
    });
    let next = Mutex::new(packs.iter());
    let threads = threads.max(1);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let Some(id) = next
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .next()
                        .copied()
                    else {
                        break;
                    };
                    let (bad, blobs, bytes) = check_pack(vault, id);
                    let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
                    r.blobs_checked += blobs;
                    r.bytes_checked += bytes;
                    r.corrupt_blobs.extend(bad);
                }
            });
        }
    });
    let mut report = report.into_inner().unwrap_or_else(|p| p.into_inner());

    // Map damage to backups and offsets.
    let bad: HashMap<ChunkDigest, String> = report
        .corrupt_blobs
        .iter()
        .filter_map(|b| b.digest.parse().ok().map(|d| (d, b.error.clone())))
        .collect();
    let mut damage = Vec::new();
    for m in manifests {
        for disk in &m.disks {
            let mut visited = HashSet::new();
            let hurt = |offset: Option<u64>, what: String| Damage {
                backup_id: m.id.clone(),
                backup_name: m.name.clone(),
                disk: disk.name.clone(),
                offset,
                what,
            };
            walk_disk(vault, &lookup, disk, &mut visited, &mut |item| {
                match item {
                    WalkItem::Damaged { what, error } => {
                        damage.push(hurt(None, format!("{what}: {error}")))
                    }
                    WalkItem::Chunks(chunks) => {
                        for (off, d) in chunks {
                            if let Some(e) = bad.get(d) {
                                damage.push(hurt(Some(*off), format!("chunk {d}: {e}")));
                            } else if lookup.get(d)?.is_none() {
                                damage.push(hurt(Some(*off), format!("chunk {d} is missing")));
                            }
                        }
                    }
                    _ => {}
                }
                Ok(())
            })?;
        }
    }
    report.damage = damage;
    Ok(report)
}

/// Read one pack whole and check every blob: (bad blobs, blobs checked, bytes read).
fn check_pack(vault: &Vault, id: PackId) -> (Vec<BadBlob>, u64, u64) {
    let store = vault.store();
    let bad = |digest: String, error: String| BadBlob {
        digest,
        pack: id.to_string(),
        error,
    };
    let entries = match read_pack_entries(store.as_ref(), id) {
        Ok(e) => e,
        Err(e) => return (vec![bad(String::new(), e.to_string())], 0, 0),
    };
    let len = match store.pack_len(id) {
        Ok(l) => l,
        Err(e) => return (vec![bad(String::new(), e.to_string())], 0, 0),
    };
    let data = match store.read_pack_range(id, 0, len as usize) {
        Ok(d) => d,
        Err(e) => return (vec![bad(String::new(), e.to_string())], 0, 0),
    };
    let mut out = Vec::new();
    for e in &entries {
        let stored = &data[e.offset as usize..(e.offset + e.length as u64) as usize];
        if let Err(err) = decode_blob(stored, &e.digest) {
            out.push(bad(e.digest.to_string(), err.to_string()));
        }
    }
    (out, entries.len() as u64, len)
}
