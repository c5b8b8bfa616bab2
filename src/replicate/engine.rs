//! The replication engine: one backup of a source vault onto a [`ReplicaTarget`].
//!
//! Steps, in this order:
//! 1. compatibility ([`check_compatible`]): same chunk size; an encrypted source needs a
//!    target with the same vault key (same `key_check`); a plaintext source is never
//!    copied into an encrypted target (its blobs would land unsealed) — nothing is sent
//!    when they do not fit. Before that check, an encrypted source offers a plaintext
//!    target its key material ([`ReplicaTarget::adopt_encryption`]): an empty mirror
//!    vault on another appliance takes it and becomes encrypted with the same key;
//! 2. the replica's manifest is derived ([`replica_manifest`]: its own id, stable across
//!    runs, and `replica_of` naming the source backup); a target that already holds it
//!    is skipped;
//! 3. the source backup is pinned (GC on the source keeps it live meanwhile);
//! 4. the backup's disk indexes are walked (`vault::walk`: roots, pages, data chunks; a
//!    page shared by two disks is visited once) and the digests are asked of the target
//!    in batches of [`ASK_BATCH`] (`missing`). The pages of a parent backup whose replica
//!    the target holds are skipped with their chunks: a complete replica (its manifest
//!    landed last, and the target's GC cannot run while a target holds its lock) has
//!    them all, so an incremental asks about the pages it changed only;
//! 5. the missing blobs are read as stored in the source packs — no decryption or
//!    re-encoding: sealed blobs stay sealed — with neighbouring blobs of a pack read in
//!    one ranged read, on [`READ_THREADS`] threads; each is verified at the source with
//!    the source vault's codec (decode + digest) before it is sent; a copy that fails is
//!    looked up again in the pack trailers (`Vault::read_blob`), and a blob with no good
//!    copy stops the replication (`Corrupt`) before the manifest is sent;
//! 6. blobs go to the target in batches of about [`SEND_BATCH`] bytes (`put_blobs`,
//!    durable when it returns), so a batch asked later sees what earlier ones landed; the
//!    next batches are read while the target lands the current ones: up to
//!    [`ReplicaTarget::parallel_puts`] batches (at most [`MAX_PUTS_IN_FLIGHT`]) land at
//!    once, e.g. several packs uploaded to an object store at a time (at most that many
//!    batches + 2 in memory: 48 MiB);
//! 7. the manifest last (`put_manifest_sealed`: an encrypted source seals it itself, so
//!    a mirror without the key can store it).
//!
//! Memory is bounded by the batch sizes, not by the disk size: no set of every digest is
//! kept (a digest repeated in a later batch is simply reported present by the target).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::chunk::{BlobKind, ChunkDigest, decode_blob};
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::BackupManifest;
use crate::vault::Vault;
use crate::vault::lookup::{BlobLocation, LookupIndex};
use crate::vault::walk::{WalkItem, walk_disk};

use super::{RawBlob, ReplicaTarget, TargetInfo};

/// Digests asked of the target at once.
pub const ASK_BATCH: usize = 4096;
/// Bytes of stored blobs sent to the target at once.
pub const SEND_BATCH: u64 = 8 << 20;
/// Threads reading blobs from the source packs.
pub const READ_THREADS: usize = 4;
/// Send batches landing on the target at once at most (see
/// [`ReplicaTarget::parallel_puts`]).
pub const MAX_PUTS_IN_FLIGHT: usize = 4;
/// Neighbouring blobs of one pack are read in one range when the gap between them is at
/// most this many bytes.
const MERGE_GAP: u64 = 64 << 10;

/// Live counters of a running replication, for progress display and the task API.
#[derive(Debug, Default)]
pub struct ReplicaProgress {
    /// Digests of the backup looked at so far.
    pub blobs_seen: AtomicU64,
    pub blobs_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Backups finished (of a replication of several).
    pub backups_done: AtomicU64,
}

/// How to replicate.
#[derive(Clone, Default)]
pub struct ReplicateOptions {
    /// Set to stop; the replication then fails with `Cancelled` before the manifest is
    /// sent (blobs already landed stay, unreferenced, for the next run or the target's GC).
    pub cancel: Option<Arc<AtomicBool>>,
    pub progress: Option<Arc<ReplicaProgress>>,
    /// A task's byte counters: `bytes_total` grows by the stored bytes of each batch the
    /// target lacks as it is found, `bytes_done` by what was sent.
    pub task: Option<Arc<crate::backup::Progress>>,
}

/// What one replication did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReplicaStats {
    /// Blobs the target lacked and received.
    pub blobs_sent: u64,
    /// Stored bytes of those blobs.
    pub bytes_sent: u64,
    /// Blobs the target already held.
    pub blobs_skipped: u64,
    /// Whether the manifest was sent (false: the target already had this backup).
    pub manifest_sent: bool,
}

impl ReplicaStats {
    pub fn add(&mut self, other: &ReplicaStats) {
        self.blobs_sent += other.blobs_sent;
        self.bytes_sent += other.bytes_sent;
        self.blobs_skipped += other.blobs_skipped;
        self.manifest_sent |= other.manifest_sent;
    }
}

/// Refuse a target whose blobs could not be the source's: another chunk size, another
/// vault key, or plaintext ↔ encrypted.
pub fn check_compatible(source: &Vault, target: &TargetInfo) -> Result<()> {
    if target.vault_id == source.config().id {
        return Err(Error::config(format!(
            "the target is the source vault itself (vault id {})",
            target.vault_id
        )));
    }
    if target.chunk_size != source.chunk_size() {
        return Err(Error::config(format!(
            "the target vault has {} byte chunks, the source {}: blobs only mean something in a vault with the same chunk size; create the target with `vault create NAME --replica-of SOURCE`",
            target.chunk_size.bytes(),
            source.chunk_size().bytes()
        )));
    }
    let source_check = source.config().encryption.as_ref().map(|e| &e.key_check);
    match (source_check, &target.key_check) {
        (None, None) => Ok(()),
        (Some(s), Some(t)) if s == t => Ok(()),
        (Some(_), Some(_)) => Err(Error::config(
            "the target vault is encrypted with another vault key: sealed blobs and keyed digests of the source mean nothing there (re-keying during replication is not supported); create the target with `vault create NAME --replica-of SOURCE`",
        )),
        (Some(_), None) => Err(Error::config(
            "the source vault is encrypted and the target is not: its sealed blobs would be unreadable there; create the target with `vault create NAME --replica-of SOURCE`",
        )),
        (None, Some(_)) => Err(Error::config(
            "the source vault is plaintext and the target is encrypted: replication copies blobs as they are stored and would land them unsealed (encrypting while replicating is not supported); replicate into a plaintext vault",
        )),
    }
}

fn check_cancel(opts: &ReplicateOptions) -> Result<()> {
    if opts
        .cancel
        .as_ref()
        .is_some_and(|c| c.load(Ordering::Relaxed))
    {
        return Err(Error::cancelled("replication cancelled"));
    }
    Ok(())
}

/// The id a backup gets in the vault `target_vault_id`: the catalog keys backups by id,
/// so a replica needs its own. It keeps the source id's time prefix (ids sort by time)
/// and is derived from the source id and the target vault, so a rerun finds it.
pub fn replica_id(source_id: &str, target_vault_id: &str) -> String {
    let time = source_id.split('-').next().unwrap_or(source_id);
    let mut h = blake3::Hasher::new_derive_key("blockvault 2026-11 replica id");
    h.update(source_id.as_bytes());
    h.update(&[0]);
    h.update(target_vault_id.as_bytes());
    format!("{time}-{}", hex::encode(&h.finalize().as_bytes()[..4]))
}

/// The manifest a backup has in the target vault: its own id (see [`replica_id`]), the
/// target's vault id, parents renamed the same way, and where it came from. Disks,
/// index roots, sizes and the name are the source's.
pub fn replica_manifest(m: &BackupManifest, target_vault_id: &str) -> BackupManifest {
    let mut r = m.clone();
    r.id = replica_id(&m.id, target_vault_id);
    r.vault_id = target_vault_id.to_string();
    for d in &mut r.disks {
        if let Some(p) = &d.parent {
            d.parent = Some(replica_id(p, target_vault_id));
        }
    }
    r.replica_of = Some(crate::manifest::ReplicaOf {
        backup: m.id.clone(),
        vault_id: m.vault_id.clone(),
        replicated: crate::manifest::now_rfc3339(),
    });
    r
}

/// Copy one backup of `source` onto `target`: the blobs it lacks, then the manifest.
pub fn replicate_backup(
    source: &Vault,
    manifest: &BackupManifest,
    target: &dyn ReplicaTarget,
    opts: &ReplicateOptions,
) -> Result<ReplicaStats> {
    let mut info = target.info()?;
    // An encrypted source and a plaintext target of the same chunk size: a mirror vault
    // may take the source's key material (only while empty) and become its encrypted
    // mirror. Anything else is refused by `check_compatible` below.
    if let (Some(enc), None) = (&source.config().encryption, &info.key_check)
        && info.chunk_size == source.chunk_size()
        && info.vault_id != source.config().id
    {
        let mut enc = enc.clone();
        enc.wrapped_for = Some(enc.wrap_id(&source.config().id).to_string());
        if target.adopt_encryption(&enc)? {
            let passphrases = enc
                .keys
                .iter()
                .filter(|w| w.kind == crate::vault::keys::WrappingKind::Passphrase)
                .count();
            if passphrases > 0 {
                // Said once, when the mirror takes the key material: whoever reads the
                // mirror's vault.toml can try passphrases offline (argon2id slows each
                // guess, nothing stops them).
                tracing::warn!(
                    target_vault = %info.vault_id,
                    "the mirror took {passphrases} passphrase wrapping(s) of the data key with the key material; anyone who can read its vault.toml can guess those passphrases offline (argon2id makes each guess slow): prefer key files (`vault key add NAME --new-keyfile PATH`) and long passphrases for vaults that are mirrored"
                );
            }
            info = target.info()?;
        }
    }
    check_compatible(source, &info)?;
    source.codec()?;
    let mut stats = ReplicaStats::default();
    let replica = replica_manifest(manifest, &info.vault_id);
    if target.has_manifest(&replica)? {
        tracing::info!(backup = %manifest.id, "target already holds this backup");
        return Ok(stats);
    }
    let _pin = source.pin(&[manifest])?;
    let lookup = source.lookup()?;
    let mut batch = Batch::default();
    // Pages of a parent whose replica is complete on the target are there with all
    // their chunks (manifest last): walking skips them, so an incremental asks about
    // the pages it changed, not about the whole disk.
    let mut visited = replicated_parent_pages(source, &lookup, manifest, target, &info)?;
    for disk in &manifest.disks {
        walk_disk(source, &lookup, disk, &mut visited, &mut |item| {
            match item {
                WalkItem::Root(d) | WalkItem::Page { digest: d, .. } => batch.push(d),
                WalkItem::Chunks(chunks) => {
                    for (_, d) in chunks {
                        batch.push(*d);
                    }
                }
                WalkItem::Damaged { what, error } => {
                    return Err(error.context_prefix(format!(
                        "backup {} ({}) is damaged at the source, disk {}: {what}; run `verify` on the source vault",
                        manifest.name, manifest.id, disk.name
                    )));
                }
            }
            if batch.digests.len() >= ASK_BATCH {
                batch.flush(source, target, opts, &mut stats)?;
            }
            Ok(())
        })?;
    }
    batch.flush(source, target, opts, &mut stats)?;
    check_cancel(opts)?;
    let sealed = if source.is_encrypted() {
        Some(source.seal_manifest(&replica)?)
    } else {
        None
    };
    target.put_manifest_sealed(&replica, sealed.as_deref())?;
    stats.manifest_sent = true;
    if let Some(p) = &opts.progress {
        p.backups_done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(stats)
}

/// The index pages of each disk's parent backup (in the source) whose replica the
/// target holds. A parent that is gone from the source, or not replicated, adds nothing.
fn replicated_parent_pages(
    source: &Vault,
    lookup: &LookupIndex,
    manifest: &BackupManifest,
    target: &dyn ReplicaTarget,
    info: &TargetInfo,
) -> Result<HashSet<ChunkDigest>> {
    let mut pages = HashSet::new();
    for disk in &manifest.disks {
        let Some(parent_id) = &disk.parent else {
            continue;
        };
        let mut key = manifest.clone();
        key.id = parent_id.clone();
        let parent = match source.read_manifest(&key.key()) {
            Ok(p) => p,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if !target.has_manifest(&replica_manifest(&parent, &info.vault_id))? {
            continue;
        }
        if let Some(pd) = parent.disks.iter().find(|d| d.disk_id == disk.disk_id) {
            let root = crate::vault::walk::load_root(source, lookup, pd)?;
            pages.extend(root.pages.iter().filter(|d| !d.is_zero()));
        }
    }
    Ok(pages)
}

/// Digests waiting to be asked of the target.
#[derive(Default)]
struct Batch {
    digests: Vec<ChunkDigest>,
    seen: HashSet<ChunkDigest>,
}

impl Batch {
    fn push(&mut self, d: ChunkDigest) {
        if !d.is_zero() && self.seen.insert(d) {
            self.digests.push(d);
        }
    }

    fn flush(
        &mut self,
        source: &Vault,
        target: &dyn ReplicaTarget,
        opts: &ReplicateOptions,
        stats: &mut ReplicaStats,
    ) -> Result<()> {
        if self.digests.is_empty() {
            return Ok(());
        }
        check_cancel(opts)?;
        let asked = std::mem::take(&mut self.digests);
        self.seen.clear();
        if let Some(p) = &opts.progress {
            p.blobs_seen
                .fetch_add(asked.len() as u64, Ordering::Relaxed);
        }
        let missing = target.missing(&asked)?;
        let asked_set: HashSet<_> = asked.iter().collect();
        if let Some(d) = missing.iter().find(|d| !asked_set.contains(d)) {
            return Err(Error::invalid(format!(
                "the target reported blob {d} missing, which was not asked about"
            )));
        }
        stats.blobs_skipped += (asked.len() - missing.len()) as u64;
        send_missing(source, target, &missing, opts, stats)
    }
}

/// Read (verified) and send `missing` in batches of about [`SEND_BATCH`] bytes.
fn send_missing(
    source: &Vault,
    target: &dyn ReplicaTarget,
    missing: &[ChunkDigest],
    opts: &ReplicateOptions,
    stats: &mut ReplicaStats,
) -> Result<()> {
    let lookup = source.lookup()?;
    // Locations from the lookup cache; blobs it does not know are read through
    // `Vault::read_blob`, which searches the trailers and repairs the row.
    let mut located = Vec::with_capacity(missing.len());
    for d in missing {
        let loc = match lookup.get(d)? {
            Some(loc) => loc,
            None => relocate(source, &lookup, d)?,
        };
        located.push((*d, loc));
    }
    located.sort_by_key(|(_, l)| (l.pack.0, l.offset));
    if let Some(t) = &opts.task {
        let total: u64 = located.iter().map(|(_, l)| l.length as u64).sum();
        t.bytes_total.fetch_add(total, Ordering::Relaxed);
    }
    // Cut into send batches of about SEND_BATCH bytes.
    let mut batches = Vec::new();
    let mut start = 0;
    while start < located.len() {
        let mut end = start;
        let mut bytes = 0u64;
        while end < located.len() && (end == start || bytes < SEND_BATCH) {
            bytes += located[end].1.length as u64;
            end += 1;
        }
        batches.push(&located[start..end]);
        start = end;
    }
    // The next batches are read (and verified) while the target lands the current ones,
    // up to `target.parallel_puts()` at once.
    let senders = target.parallel_puts().clamp(1, MAX_PUTS_IN_FLIGHT);
    let failed = AtomicBool::new(false);
    let (sent_blobs, sent_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let send = |rx: crossbeam_channel::Receiver<Result<Vec<RawBlob>>>| -> Result<()> {
        for blobs in rx {
            let landed = blobs.and_then(|blobs| {
                let n = blobs.len() as u64;
                let sent: u64 = blobs.iter().map(|b| b.stored.len() as u64).sum();
                target.put_blobs(blobs)?;
                Ok((n, sent))
            });
            let (n, sent) = match landed {
                Ok(x) => x,
                Err(e) => {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            };
            sent_blobs.fetch_add(n, Ordering::Relaxed);
            sent_bytes.fetch_add(sent, Ordering::Relaxed);
            if let Some(p) = &opts.progress {
                p.blobs_sent.fetch_add(n, Ordering::Relaxed);
                p.bytes_sent.fetch_add(sent, Ordering::Relaxed);
            }
            if let Some(t) = &opts.task {
                t.bytes_done.fetch_add(sent, Ordering::Relaxed);
            }
        }
        Ok(())
    };
    let send = &send;
    let result = std::thread::scope(|s| {
        let (tx, rx) = crossbeam_channel::bounded::<Result<Vec<RawBlob>>>(1);
        let failed = &failed;
        s.spawn(move || {
            for b in batches {
                if failed.load(Ordering::Relaxed) {
                    break;
                }
                let r = check_cancel(opts).and_then(|()| read_verified(source, b));
                let stop = r.is_err();
                if tx.send(r).is_err() || stop {
                    break;
                }
            }
        });
        let others: Vec<_> = (1..senders)
            .map(|_| {
                let rx = rx.clone();
                s.spawn(move || send(rx))
            })
            .collect();
        let mut result = send(rx);
        for h in others {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "a sending thread panicked")));
            if result.is_ok() {
                result = r;
            }
        }
        result
    });
    stats.blobs_sent += sent_blobs.load(Ordering::Relaxed);
    stats.bytes_sent += sent_bytes.load(Ordering::Relaxed);
    result
}

/// Find a good copy of `d` through the trailers and return its (repaired) location.
fn relocate(source: &Vault, lookup: &LookupIndex, d: &ChunkDigest) -> Result<BlobLocation> {
    source.read_blob(lookup, d)?;
    lookup.get(d)?.ok_or_else(|| {
        Error::corrupt(format!(
            "blob {d} was found in the source's pack trailers but its location was not recorded"
        ))
    })
}

/// One ranged read of a source pack covering several blobs.
struct Range<'a> {
    blobs: &'a [(ChunkDigest, BlobLocation)],
}

/// Read and verify `located` (sorted by pack and offset) on up to [`READ_THREADS`]
/// threads, neighbours in one range; the result keeps the input order.
fn read_verified(source: &Vault, located: &[(ChunkDigest, BlobLocation)]) -> Result<Vec<RawBlob>> {
    let mut ranges = Vec::new();
    let mut i = 0;
    while i < located.len() {
        let mut j = i + 1;
        let mut end = located[i].1.offset + located[i].1.length as u64;
        while j < located.len() {
            let l = &located[j].1;
            if l.pack != located[i].1.pack
                || l.offset < end
                || l.offset - end > MERGE_GAP
                || l.offset + l.length as u64 - located[i].1.offset > SEND_BATCH
            {
                break;
            }
            end = l.offset + l.length as u64;
            j += 1;
        }
        ranges.push(Range {
            blobs: &located[i..j],
        });
        i = j;
    }
    let threads = READ_THREADS.min(ranges.len()).max(1);
    let per = ranges.len().div_ceil(threads);
    let results: Vec<Result<Vec<RawBlob>>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranges
            .chunks(per.max(1))
            .map(|group| s.spawn(move || read_group(source, group)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "a reader thread panicked")))
            })
            .collect()
    });
    let mut out = Vec::with_capacity(located.len());
    for r in results {
        out.extend(r?);
    }
    Ok(out)
}

fn read_group(source: &Vault, ranges: &[Range<'_>]) -> Result<Vec<RawBlob>> {
    let codec = source.codec()?;
    let mut lookup: Option<LookupIndex> = None;
    let mut out = Vec::new();
    for range in ranges {
        let first = &range.blobs[0].1;
        let last = &range.blobs[range.blobs.len() - 1].1;
        let len = (last.offset + last.length as u64 - first.offset) as usize;
        let bytes = source
            .store()
            .read_pack_range(first.pack, first.offset, len)
            .ok();
        for (d, loc) in range.blobs {
            let at = (loc.offset - first.offset) as usize;
            let stored = bytes
                .as_ref()
                .and_then(|b| b.get(at..at + loc.length as usize));
            let good = stored.filter(|s| decode_blob(s, d, codec).is_ok());
            let (stored, kind) = match good {
                Some(s) => (s.to_vec(), loc.kind),
                None => {
                    // Rot, a short read, or a pack GC moved: find another copy.
                    let l = match &lookup {
                        Some(l) => l,
                        None => lookup.insert(source.lookup()?),
                    };
                    reread(source, l, d)?
                }
            };
            out.push(RawBlob {
                digest: *d,
                kind,
                stored,
            });
        }
    }
    Ok(out)
}

/// The stored bytes of a good copy of `d`, found through the trailers when the cached
/// location is wrong; verified.
fn reread(source: &Vault, lookup: &LookupIndex, d: &ChunkDigest) -> Result<(Vec<u8>, BlobKind)> {
    let loc = relocate(source, lookup, d)
        .map_err(|e| e.context_prefix(format!("reading blob {d} from the source vault")))?;
    let stored = source
        .store()
        .read_pack_range(loc.pack, loc.offset, loc.length as usize)?;
    decode_blob(&stored, d, source.codec()?)
        .map_err(|e| e.context_prefix(format!("blob {d} at the source")))?;
    Ok((stored, loc.kind))
}
