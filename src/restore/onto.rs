//! Restore onto an existing disk over NBD (the original disk of a VM, exported by
//! qemu-nbd, qemu-storage-daemon or nbdkit): write only what differs.
//!
//! For every chunk of the backup, the target's chunk is compared first:
//! - the target reports the range as reading zeros (`base:allocation` NBD_STATE_ZERO)
//!   → nothing is read;
//! - otherwise the target's chunk is read and hashed (blake3, as the vault does);
//! - with a target bitmap (`qemu:dirty-bitmap:NAME` that has recorded every write since
//!   the backup), only chunks the bitmap marks are candidates; they are rewritten
//!   without reading, all others are known to be unchanged.
//!
//! Chunks that differ are fetched from the vault (digest verified) and written; chunks
//! that must become zero are zeroed with NBD_CMD_WRITE_ZEROES (consecutive ones in one
//! request), never by sending zeros. The target is flushed at the end. A target smaller
//! than the disk is refused; bytes beyond the disk's size on a larger target are left as
//! they are.

use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::backup::BackupOptions;
use crate::chunk::is_zero;
use crate::error::{Error, Result};
use crate::index::PAGE_ENTRIES;
use crate::manifest::DiskManifest;
use crate::nbd::proto::{STATE_DIRTY, STATE_ZERO};
use crate::nbd::{BASE_ALLOCATION, NbdClient, NbdUri, dirty_bitmap_context};
use crate::source::Extent;
use crate::vault::Vault;
use crate::vault::walk::{PageReader, load_root};

/// Chunks read from the target with one request.
const RUN: usize = 16;

/// What a restore onto a disk did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OntoStats {
    pub chunks_total: u64,
    /// Chunks read back from the target and hashed.
    pub chunks_compared: u64,
    /// Chunks found equal (or known equal) and left alone.
    pub chunks_same: u64,
    /// Chunks written with data.
    pub chunks_written: u64,
    /// Data bytes written.
    pub bytes_written: u64,
    /// Chunks zeroed with NBD_CMD_WRITE_ZEROES.
    pub chunks_zeroed: u64,
    /// Bytes read from the target to compare.
    pub bytes_compared: u64,
}

/// Restore `disk` onto the NBD export at `uri`.
pub fn restore_onto_nbd(
    vault: &Vault,
    disk: &DiskManifest,
    uri: &str,
    target_bitmap: Option<&str>,
    opts: &BackupOptions,
) -> Result<OntoStats> {
    let parsed = NbdUri::parse(uri)?;
    let mut meta = vec![BASE_ALLOCATION.to_string()];
    if let Some(b) = target_bitmap {
        meta.push(dirty_bitmap_context(b));
    }
    let mut nbd = NbdClient::connect_tls(&parsed, &meta, opts.nbd_tls.as_ref())?;
    nbd.set_cancel(opts.cancel.clone());
    if nbd.read_only() {
        return Err(Error::config(format!(
            "{uri} is read-only: export the target disk writable"
        )));
    }
    if nbd.size() < disk.size {
        return Err(Error::config(format!(
            "{uri} has {} bytes, smaller than the disk of the backup ({} bytes)",
            nbd.size(),
            disk.size
        )));
    }
    let codec = vault.codec()?;
    let lookup = vault.lookup()?;
    let root = load_root(vault, &lookup, disk)?;
    let cs = root.chunk_size.as_u64();
    // Ranges where the target holds zeros (no need to read), or with a bitmap the
    // ranges that may have changed.
    let known_zero = if nbd.has_context(BASE_ALLOCATION) {
        nbd.extents_with(BASE_ALLOCATION, STATE_ZERO, true)?
    } else {
        Vec::new()
    };
    let dirty = match target_bitmap {
        Some(b) => {
            let ctx = dirty_bitmap_context(b);
            if !nbd.has_context(&ctx) {
                return Err(Error::not_found(format!("{uri} offers no bitmap {b}")));
            }
            Some(nbd.extents_with(&ctx, STATE_DIRTY, true)?)
        }
        None => None,
    };
    let covered = |list: &[Extent], off: u64, len: u64| {
        // Is [off, off+len) entirely inside one extent of the sorted list?
        let i = list.partition_point(|e| e.end() <= off);
        list.get(i)
            .is_some_and(|e| e.offset <= off && e.end() >= off + len)
    };
    let touches = |list: &[Extent], off: u64, len: u64| {
        let i = list.partition_point(|e| e.end() <= off);
        list.get(i).is_some_and(|e| e.offset < off + len)
    };

    let mut stats = OntoStats::default();
    let mut zero_run: Option<(u64, u64)> = None; // pending write-zeroes range
    let flush_zeroes = |nbd: &mut NbdClient, run: &mut Option<(u64, u64)>| -> Result<()> {
        if let Some((off, len)) = run.take() {
            nbd.write_zeroes(off, len)?;
        }
        Ok(())
    };
    let mut buf = vec![0u8; RUN * cs as usize];
    let mut pages = PageReader::all(vault, &lookup, &root);
    for p in 0..root.pages.len() {
        let entries = pages.page(p)?;
        let mut slot = 0;
        while slot < entries.len() {
            if opts
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
            {
                return Err(Error::cancelled("restore cancelled"));
            }
            let first = (p * PAGE_ENTRIES + slot) as u64;
            let off = first * cs;
            if off >= disk.size {
                break;
            }
            // A run of chunks to compare with one read.
            let n = RUN.min(entries.len() - slot);
            let run_len = (n as u64 * cs).min(disk.size - off);
            let candidates = match &dirty {
                Some(d) => touches(d, off, run_len),
                None => !covered(&known_zero, off, run_len),
            };
            let target: Option<&[u8]> = if dirty.is_none() && candidates {
                nbd.read(off, &mut buf[..run_len as usize])?;
                stats.bytes_compared += run_len;
                Some(&buf[..run_len as usize])
            } else {
                None
            };
            for k in 0..n {
                let c_off = off + k as u64 * cs;
                if c_off >= disk.size {
                    break;
                }
                let c_len = cs.min(disk.size - c_off);
                let want = entries[slot + k];
                stats.chunks_total += 1;
                let same = match (&dirty, target) {
                    (Some(d), _) => !touches(d, c_off, c_len),
                    (None, Some(t)) => {
                        stats.chunks_compared += 1;
                        let have = &t[k * cs as usize..k * cs as usize + c_len as usize];
                        if want.is_zero() {
                            is_zero(have)
                        } else {
                            codec.digest(have) == want
                        }
                    }
                    (None, None) => want.is_zero(), // the target holds zeros here
                };
                if same {
                    stats.chunks_same += 1;
                    continue;
                }
                if want.is_zero() {
                    stats.chunks_zeroed += 1;
                    zero_run = match zero_run {
                        Some((o, l)) if o + l == c_off => Some((o, l + c_len)),
                        other => {
                            let mut old = other;
                            flush_zeroes(&mut nbd, &mut old)?;
                            Some((c_off, c_len))
                        }
                    };
                    continue;
                }
                flush_zeroes(&mut nbd, &mut zero_run)?;
                let (_, data) = vault.read_blob(&lookup, &want).map_err(|e| {
                    e.context_prefix(format!("chunk {want} at disk offset {c_off}"))
                })?;
                nbd.write(c_off, &data[..c_len as usize])?;
                stats.chunks_written += 1;
                stats.bytes_written += c_len;
                if let Some(p) = &opts.progress {
                    p.bytes_done.fetch_add(c_len, Ordering::Relaxed);
                }
            }
            slot += n;
        }
    }
    flush_zeroes(&mut nbd, &mut zero_run)?;
    nbd.flush()?;
    Ok(stats)
}
