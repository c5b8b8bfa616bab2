//! Verify: re-read packs, re-hash every blob, and say which backups a damage hurts.
//!
//! Whole vault: every pack is read in full, its trailer checked, and every blob decoded
//! and re-hashed (in parallel over packs). For chosen backups: only the packs holding
//! blobs those backups reference. Then every chosen backup's index is walked to map each
//! corrupt or missing blob to the backups and disk offsets it hurts, so the report says
//! "backup X, disk0, offset 1048576" and not just a digest.
//!
//! [`verify_paced`] adds what a service task needs: progress (bytes of packs read of the
//! bytes to read), cancel (checked between packs) and a read rate limit (each pack is
//! read no sooner than the rate allows, so a verify of a busy vault does not starve
//! backups of disk bandwidth).
//!
//! Verify holds the vault lock shared (so GC cannot delete a pack under it and have
//! it reported as damage). It also:
//! - cross-checks the lookup index against the trailers of the packs it read and heals it
//!   (`lookup::TrailerScan`): a wrong row is reported in `index_repaired` and fixed;
//! - records every rotten copy in the vault's `bad-blobs` list (see `badblobs`), so that
//!   dedup stops reusing it and the next backup that meets the same content stores a good
//!   copy. A rotten copy whose digest has a good copy elsewhere is reported under
//!   `healed_copies` and is not damage: restores read the good copy, GC drops the bad.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::chunk::{ChunkDigest, decode_blob};
use crate::error::{Error, Result};
use crate::manifest::BackupManifest;

use super::Vault;
use super::badblobs::{BadBlobs, BadCopy};
use super::lookup::{IndexRepair, LookupIndex, TrailerScan};
use super::pack::{PackId, PackInfo, read_pack_entries};
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

/// A blob that failed its check (an empty digest: the pack's trailer itself).
#[derive(Debug, Clone, Serialize)]
pub struct BadBlob {
    pub digest: String,
    pub pack: String,
    pub offset: Option<u64>,
    pub error: String,
}

/// Result of a verify run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub backups: usize,
    pub packs_checked: usize,
    pub blobs_checked: u64,
    pub bytes_checked: u64,
    /// Rotten copies with no good copy elsewhere.
    pub corrupt_blobs: Vec<BadBlob>,
    /// Rotten copies whose digest has a good copy elsewhere (no damage).
    pub healed_copies: Vec<BadBlob>,
    pub damage: Vec<Damage>,
    /// What the lookup index had wrong (fixed from the trailers).
    pub index_repaired: IndexRepair,
    /// Faults of the lock journal (`retention`): a broken or truncated chain, a locked
    /// backup whose manifest is gone.
    #[serde(default)]
    pub lock_journal: Vec<String>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.corrupt_blobs.is_empty() && self.damage.is_empty() && self.lock_journal.is_empty()
    }
}

/// Progress, cancel and rate limit of a verify run (all optional).
#[derive(Default, Clone, Copy)]
pub struct Pace<'a> {
    /// Set to the bytes of packs to read, once they are listed.
    pub bytes_total: Option<&'a AtomicU64>,
    /// Bytes of packs read so far.
    pub bytes_done: Option<&'a AtomicU64>,
    /// Raised: stop before the next pack with `Cancelled`.
    pub cancel: Option<&'a AtomicBool>,
    /// Read at most this many bytes per second (averaged from the start).
    pub bytes_per_second: Option<u64>,
}

/// Hands out reads at a rate: the read that brings the total to N bytes may start only
/// when N / rate seconds have passed since the start (so the whole run takes at least
/// total / rate).
struct Throttle {
    start: Instant,
    rate: Option<u64>,
    granted: Mutex<u64>,
}

impl Throttle {
    /// Wait until `bytes` more may be read; a raised `cancelled` ends the wait early
    /// (checked every 100 ms, so a cancel is not held up by a slow rate).
    fn take(&self, bytes: u64, cancelled: impl Fn() -> bool) {
        let Some(rate) = self.rate.filter(|r| *r > 0) else {
            return;
        };
        let due = {
            let mut g = self.granted.lock().unwrap_or_else(|p| p.into_inner());
            *g = g.saturating_add(bytes);
            self.start + Duration::from_secs_f64(*g as f64 / rate as f64)
        };
        loop {
            let now = Instant::now();
            if due <= now || cancelled() {
                return;
            }
            std::thread::sleep((due - now).min(Duration::from_millis(100)));
        }
    }
}

/// Verify the whole vault (`only = None`) or the given backups.
pub fn verify(
    vault: &Vault,
    only: Option<&[BackupManifest]>,
    threads: usize,
) -> Result<VerifyReport> {
    verify_paced(vault, only, threads, Pace::default())
}

/// [`verify`] with progress, cancel and a read rate limit.
pub fn verify_paced(
    vault: &Vault,
    only: Option<&[BackupManifest]>,
    threads: usize,
    pace: Pace<'_>,
) -> Result<VerifyReport> {
    // Without the key of an encrypted vault nothing can be checked: say so at once.
    vault.codec()?;
    let _lock = vault.lock_shared()?;
    let mut lookup = vault.lookup()?;
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
        Some(ms) => packs_of(vault, &lookup, ms)?,
    };
    let bad_before = BadBlobs::load(store.as_ref())?;
    if let Some(total) = pace.bytes_total {
        let mut sum = 0u64;
        for id in &packs {
            // A pack that cannot even be measured is reported by its check below.
            sum += store.pack_len(*id).unwrap_or(0);
        }
        total.store(sum, Ordering::Relaxed);
    }
    let throttle = Throttle {
        start: Instant::now(),
        rate: pace.bytes_per_second,
        granted: Mutex::new(0),
    };
    let cancelled = || pace.cancel.is_some_and(|c| c.load(Ordering::Relaxed));

    // Check packs in parallel; each pack's trailer is staged for the index cross-check.
    struct Shared<'a> {
        report: VerifyReport,
        found: Vec<BadBlob>,
        bad: BadBlobs,
        scan: TrailerScan<'a>,
        error: Option<crate::error::Error>,
    }
    let shared = Mutex::new(Shared {
        report: VerifyReport {
            backups: manifests.len(),
            packs_checked: packs.len(),
            ..VerifyReport::default()
        },
        found: Vec::new(),
        bad: bad_before.clone(),
        scan: lookup.trailer_scan()?,
        error: None,
    });
    let next = Mutex::new(packs.iter());
    let threads = threads.max(1);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    if cancelled() {
                        break;
                    }
                    let Some(id) = next
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .next()
                        .copied()
                    else {
                        break;
                    };
                    throttle.take(store.pack_len(id).unwrap_or(0), cancelled);
                    if cancelled() {
                        break;
                    }
                    let checked = check_pack(vault, id);
                    if let Some(done) = pace.bytes_done {
                        done.fetch_add(checked.bytes, Ordering::Relaxed);
                    }
                    let mut sh = shared.lock().unwrap_or_else(|p| p.into_inner());
                    let sh = &mut *sh;
                    sh.report.blobs_checked += checked.blobs;
                    sh.report.bytes_checked += checked.bytes;
                    for b in &checked.bad {
                        if let (Ok(digest), Some(offset)) = (b.digest.parse(), b.offset) {
                            sh.bad.insert(BadCopy {
                                digest,
                                pack: id,
                                offset,
                            });
                        }
                    }
                    sh.found.extend(checked.bad);
                    if let Some(info) = checked.info
                        && let Err(e) = sh.scan.add_pack(&info, &sh.bad)
                    {
                        sh.error.get_or_insert(e);
                    }
                }
            });
        }
    });
    let sh = shared.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = sh.error {
        return Err(e);
    }
    if cancelled() {
        return Err(Error::cancelled(
            "verify cancelled before every pack was read; no finding was recorded",
        ));
    }
    let mut report = sh.report;
    if sh.bad != bad_before {
        sh.bad.save(store.as_ref())?;
    }
    report.index_repaired = sh.scan.heal(|| store.list_packs())?;
    if !report.index_repaired.is_empty() {
        tracing::warn!(
            stale = report.index_repaired.stale_rows,
            missing = report.index_repaired.missing_rows,
            "the lookup index disagreed with the pack trailers; repaired it"
        );
    }

    // A rotten copy is damage only when no good copy of its digest exists.
    for b in sh.found {
        let healed = match (b.digest.parse::<ChunkDigest>(), b.offset) {
            (Ok(d), Some(offset)) => match lookup.get(&d)? {
                Some(loc) if (loc.pack.to_string(), loc.offset) != (b.pack.clone(), offset) => {
                    vault.read_blob_at(&loc, &d).is_ok()
                }
                _ => false,
            },
            _ => false,
        };
        if healed {
            report.healed_copies.push(b);
        } else {
            report.corrupt_blobs.push(b);
        }
    }

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
                            } else if lookup.get(d)?.is_none()
                                && vault.read_blob(&lookup, d).is_err()
                            {
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
    report.lock_journal = super::retention::check(
        store.as_ref(),
        if only.is_none() {
            Some(manifests)
        } else {
            None
        },
    )?;
    Ok(report)
}

/// The packs holding blobs that `manifests` reference.
fn packs_of(
    vault: &Vault,
    lookup: &LookupIndex,
    manifests: &[BackupManifest],
) -> Result<Vec<PackId>> {
    let existing: HashSet<PackId> = vault.store().list_packs()?.into_iter().collect();
    let mut set = HashSet::new();
    let mut visited = HashSet::new();
    for m in manifests {
        for disk in &m.disks {
            walk_disk(vault, lookup, disk, &mut visited, &mut |item| {
                let digests: Vec<ChunkDigest> = match item {
                    WalkItem::Root(d) | WalkItem::Page { digest: d, .. } => vec![d],
                    WalkItem::Chunks(c) => c.iter().map(|(_, d)| *d).collect(),
                    WalkItem::Damaged { .. } => vec![],
                };
                for d in digests {
                    // A digest without a row, or with a row into a pack that does not
                    // exist, is looked up in the trailers (which repairs the row) so that
                    // its real pack is checked.
                    let loc = match lookup.get(&d)? {
                        Some(loc) if existing.contains(&loc.pack) => Some(loc),
                        _ => {
                            let _ = vault.read_blob(lookup, &d);
                            lookup.get(&d)?
                        }
                    };
                    if let Some(loc) = loc {
                        set.insert(loc.pack);
                    }
                }
                Ok(())
            })?;
        }
    }
    let mut v: Vec<_> = set.into_iter().collect();
    v.sort();
    Ok(v)
}

/// What checking one pack found.
struct PackCheck {
    bad: Vec<BadBlob>,
    blobs: u64,
    bytes: u64,
    /// The trailer, when it could be read.
    info: Option<PackInfo>,
}

/// Read one pack whole and check every blob.
fn check_pack(vault: &Vault, id: PackId) -> PackCheck {
    let store = vault.store();
    let failed = |error: String| PackCheck {
        bad: vec![BadBlob {
            digest: String::new(),
            pack: id.to_string(),
            offset: None,
            error,
        }],
        blobs: 0,
        bytes: 0,
        info: None,
    };
    let entries = match read_pack_entries(store.as_ref(), id) {
        Ok(e) => e,
        Err(e) => return failed(e.to_string()),
    };
    let len = match store.pack_len(id) {
        Ok(l) => l,
        Err(e) => return failed(e.to_string()),
    };
    let data = match store.read_pack_range(id, 0, len as usize) {
        Ok(d) => d,
        Err(e) => return failed(e.to_string()),
    };
    let codec = match vault.codec() {
        Ok(c) => c,
        Err(e) => return failed(e.to_string()),
    };
    let mut bad = Vec::new();
    for e in &entries {
        let stored = &data[e.offset as usize..(e.offset + e.length as u64) as usize];
        if let Err(err) = decode_blob(stored, &e.digest, codec) {
            bad.push(BadBlob {
                digest: e.digest.to_string(),
                pack: id.to_string(),
                offset: Some(e.offset),
                error: err.to_string(),
            });
        }
    }
    PackCheck {
        bad,
        blobs: entries.len() as u64,
        bytes: len,
        info: Some(PackInfo {
            id,
            size: len,
            entries,
        }),
    }
}
