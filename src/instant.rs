//! Instant access: one disk of a backup served read-only over NBD (`serve-nbd`), so that
//! `qemu-img convert`, `qemu-nbd --connect`-style tools or a VM booting from a qcow2
//! overlay on top of it can use the backup at once, without restoring it first.
//!
//! Chunks are fetched from the vault on demand, verified (digest) and kept in a shared
//! LRU cache (decoded chunks, bounded by bytes), index pages in a second small LRU
//! ([`crate::disk_reader`]). On object storage a connection that reads sequentially gets
//! the chunks ahead of it fetched on a small pool (coalesced ranged GETs) while it is
//! served; what it read and what was fetched ahead is logged when the export ends
//! ("disk reads", at info).
//! Allocation is answered from the index alone: a `ZERO` slot is a hole that reads as
//! zeros, so clients skip it without reading. A chunk that fails verification makes the
//! NBD read covering it fail with EIO; it is never cached and never served.
//!
//! While serving, the vault is held with a shared lock: GC cannot remove what the served
//! backup needs. Nothing in the vault is written.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::disk_reader::{CHUNK_CACHE_BYTES, DiskCache, DiskReader};
use crate::error::Result;
use crate::manifest::DiskManifest;
use crate::nbd::proto::{STATE_HOLE, STATE_ZERO};
use crate::nbd::server::{ExportInfo, ExportReader, Listener};
use crate::vault::Vault;

/// A connection's reader: its own lookup index handle, the shared caches
/// ([`crate::disk_reader`]).
struct Reader(DiskReader);

impl ExportReader for Reader {
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.read_at(offset, buf)
    }

    fn allocation(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>> {
        let cs = self.0.cache().chunk_size();
        let end = offset.saturating_add(len).min(self.0.cache().size());
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < 1024 {
            let slot = pos / cs;
            let next = ((slot + 1) * cs).min(end);
            let flags = if self.0.digest(slot)?.is_zero() {
                STATE_HOLE | STATE_ZERO
            } else {
                0
            };
            match out.last_mut() {
                Some((l, f)) if *f == flags => *l += next - pos,
                _ => out.push((next - pos, flags)),
            }
            pos = next;
        }
        Ok(out)
    }
}

/// Serve `disk` (of a backup in `vault`) on `listener` until `stop` is set, as the
/// export named after the disk.
pub fn serve_backup(
    vault: Arc<Vault>,
    disk: &DiskManifest,
    listener: &Listener,
    stop: &AtomicBool,
    tls: Option<&crate::nbd::NbdTlsServer>,
) -> Result<()> {
    serve_backup_as(vault, disk, listener, stop, tls, None)
}

/// [`serve_backup`]; with `secret`, the export's name is that secret and nothing else
/// opens it (`Limits::secret_name`: no default export, an empty LIST).
pub fn serve_backup_as(
    vault: Arc<Vault>,
    disk: &DiskManifest,
    listener: &Listener,
    stop: &AtomicBool,
    tls: Option<&crate::nbd::NbdTlsServer>,
    secret: Option<&str>,
) -> Result<()> {
    let shared = Arc::new(DiskCache::open(vault, disk, CHUNK_CACHE_BYTES)?);
    serve_cache(&shared, listener, stop, tls, secret)
}

/// Serve the disk of `shared` on `listener` until `stop` is set (named `secret` when
/// given, as in [`serve_backup_as`]); the caller keeps `shared` to read its counters
/// ([`DiskCache::counts`]) afterwards.
pub fn serve_cache(
    shared: &Arc<DiskCache>,
    listener: &Listener,
    stop: &AtomicBool,
    tls: Option<&crate::nbd::NbdTlsServer>,
    secret: Option<&str>,
) -> Result<()> {
    let limits = crate::nbd::server::Limits {
        tls: tls.map(|t| t.config()).transpose()?,
        secret_name: secret.is_some(),
        ..Default::default()
    };
    let info = ExportInfo {
        name: secret.unwrap_or(shared.name()).to_owned(),
        size: shared.size(),
        preferred_block: shared.chunk_size() as u32,
    };
    let s = Arc::clone(shared);
    let open =
        Arc::new(move || -> Result<Box<dyn ExportReader>> { Ok(Box::new(Reader(s.reader()?))) });
    crate::nbd::server::serve_with(listener, &info, open, stop, &limits)
}
