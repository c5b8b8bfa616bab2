//! Instant access: one disk of a backup served read-only over NBD (`serve-nbd`), so that
//! `qemu-img convert`, `qemu-nbd --connect`-style tools or a VM booting from a qcow2
//! overlay on top of it can use the backup at once, without restoring it first.
//!
//! Chunks are fetched from the vault on demand, verified (digest) and kept in a shared
//! LRU cache (decoded chunks, bounded by bytes), index pages in a second small LRU.
//! Allocation is answered from the index alone: a `ZERO` slot is a hole that reads as
//! zeros, so clients skip it without reading. A chunk that fails verification makes the
//! NBD read covering it fail with EIO; it is never cached and never served.
//!
//! While serving, the vault is held with a shared lock: GC cannot remove what the served
//! backup needs. Nothing in the vault is written.

use std::num::NonZeroUsize;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::chunk::ChunkDigest;
use crate::error::Result;
use crate::index::{IndexRoot, PAGE_ENTRIES};
use crate::manifest::DiskManifest;
use crate::nbd::proto::{STATE_HOLE, STATE_ZERO};
use crate::nbd::server::{ExportInfo, ExportReader, Listener};
use crate::vault::Vault;
use crate::vault::lookup::LookupIndex;
use crate::vault::walk::{load_page, load_root};

/// Bytes of decoded chunks kept in memory.
const CHUNK_CACHE_BYTES: usize = 64 << 20;
/// Index pages kept in memory (each 32 KiB: covers 64 MiB at 64 KiB chunks).
const PAGE_CACHE: usize = 64;

struct Shared {
    vault: Arc<Vault>,
    root: IndexRoot,
    size: u64,
    pages: Mutex<LruCache<usize, Arc<Vec<ChunkDigest>>>>,
    chunks: Mutex<LruCache<ChunkDigest, Arc<Vec<u8>>>>,
}

/// A connection's reader: its own lookup index handle, the shared caches.
struct Reader {
    shared: Arc<Shared>,
    lookup: LookupIndex,
}

impl Reader {
    fn page(&self, p: usize) -> Result<Arc<Vec<ChunkDigest>>> {
        let s = &self.shared;
        if let Some(e) = s.pages.lock().unwrap_or_else(|e| e.into_inner()).get(&p) {
            return Ok(Arc::clone(e));
        }
        let entries = Arc::new(load_page(&s.vault, &self.lookup, &s.root, p)?);
        s.pages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(p, Arc::clone(&entries));
        Ok(entries)
    }

    fn digest(&self, slot: u64) -> Result<ChunkDigest> {
        let p = (slot / PAGE_ENTRIES as u64) as usize;
        let i = (slot % PAGE_ENTRIES as u64) as usize;
        Ok(self.page(p)?.get(i).copied().unwrap_or(ChunkDigest::ZERO))
    }

    fn chunk(&self, d: &ChunkDigest, offset: u64) -> Result<Arc<Vec<u8>>> {
        let s = &self.shared;
        if let Some(c) = s.chunks.lock().unwrap_or_else(|e| e.into_inner()).get(d) {
            return Ok(Arc::clone(c));
        }
        let (_, data) = s
            .vault
            .read_blob(&self.lookup, d)
            .map_err(|e| e.context_prefix(format!("chunk {d} at disk offset {offset}")))?;
        let data = Arc::new(data);
        s.chunks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(*d, Arc::clone(&data));
        Ok(data)
    }
}

impl ExportReader for Reader {
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cs = self.shared.root.chunk_size.as_u64();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let slot = pos / cs;
            let within = (pos % cs) as usize;
            let n = (cs as usize - within).min(buf.len() - done);
            let d = self.digest(slot)?;
            let out = &mut buf[done..done + n];
            if d.is_zero() {
                out.fill(0);
            } else {
                let c = self.chunk(&d, slot * cs)?;
                match c.get(within..within + n) {
                    Some(src) => out.copy_from_slice(src),
                    None => {
                        // The last chunk of a disk may be short: the rest reads as zeros.
                        let avail = c.len().saturating_sub(within).min(n);
                        out[..avail].copy_from_slice(&c[within..within + avail]);
                        out[avail..].fill(0);
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    fn allocation(&mut self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>> {
        let cs = self.shared.root.chunk_size.as_u64();
        let end = offset.saturating_add(len).min(self.shared.size);
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < 1024 {
            let slot = pos / cs;
            let next = ((slot + 1) * cs).min(end);
            let flags = if self.digest(slot)?.is_zero() {
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

/// Serve `disk` (of a backup in `vault`) on `listener` until `stop` is set.
pub fn serve_backup(
    vault: Arc<Vault>,
    disk: &DiskManifest,
    listener: &Listener,
    stop: &AtomicBool,
    tls: Option<&crate::nbd::NbdTlsServer>,
) -> Result<()> {
    let limits = crate::nbd::server::Limits {
        tls: tls.map(|t| t.config()).transpose()?,
        ..Default::default()
    };
    let lookup = vault.lookup()?;
    let root = load_root(&vault, &lookup, disk)?;
    drop(lookup);
    let cs = root.chunk_size.as_u64() as usize;
    let shared = Arc::new(Shared {
        size: disk.size,
        pages: Mutex::new(LruCache::new(
            NonZeroUsize::new(PAGE_CACHE).unwrap_or(NonZeroUsize::MIN),
        )),
        chunks: Mutex::new(LruCache::new(
            NonZeroUsize::new((CHUNK_CACHE_BYTES / cs).max(1)).unwrap_or(NonZeroUsize::MIN),
        )),
        vault,
        root,
    });
    let info = ExportInfo {
        name: disk.name.clone(),
        size: disk.size,
        preferred_block: cs as u32,
    };
    let s = Arc::clone(&shared);
    let open = Arc::new(move || -> Result<Box<dyn ExportReader>> {
        Ok(Box::new(Reader {
            shared: Arc::clone(&s),
            lookup: s.vault.lookup()?,
        }))
    });
    crate::nbd::server::serve_with(listener, &info, open, stop, &limits)
}
