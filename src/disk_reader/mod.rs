//! A random-access, read-only view of one disk of a backup: offset → bytes, straight
//! from the vault's chunks. Used by instant access (`serve-nbd`, one reader per NBD
//! connection) and by file-level restore (`files`, through [`DiskView`]).
//!
//! [`DiskCache`] holds what readers share: the disk's index root, an LRU of index pages
//! and an LRU of decoded, verified chunks (bounded by bytes). A [`DiskReader`] is one
//! thread's handle on it (it owns a SQLite lookup handle, which is not `Sync`). Every
//! chunk is verified against its digest when it is fetched ([`Vault::read_blob`]); a
//! chunk that fails is an error for the read that needs it, never cached, never zeros.
//! A `ZERO` slot reads as zeros without touching the vault; the last chunk of a disk may
//! be short, the rest of it reads as zeros.
//!
//! On object storage (a shared store) every read is a request, so a chunk missing from
//! the cache is fetched with the blobs that follow it in its pack, up to
//! [`READ_AHEAD_BYTES`] of stored bytes (and at most that much plaintext), in one ranged
//! GET; each is verified and put in the chunk cache, so a sequential reader costs one GET
//! per window instead of one per chunk. Memory stays bounded by the chunk cache
//! ([`CHUNK_CACHE_BYTES`] by default) plus one window per reader being fetched.
//!
//! A reader that reads sequentially on object storage does not wait for those windows
//! one at a time: [`prefetch`] notices the run and fetches the data chunks ahead of it
//! on a small pool, into the same cache, verified the same way.

use std::io::{Read, Seek, SeekFrom};
use std::num::NonZeroUsize;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

mod prefetch;
mod stream;
#[cfg(test)]
mod tests;

use self::prefetch::{ChunkCache, Counters, Prefetcher};
pub use self::prefetch::{
    MAX_GAP, PREFETCH_AHEAD, PREFETCH_BATCH, PREFETCH_QUEUE, PREFETCH_THREADS, ReadCounts,
    SEQ_SLACK,
};
use self::stream::Stream;

use lru::LruCache;

use crate::chunk::{ChunkDigest, Decoder};
use crate::error::{Error, ErrorKind, Result};
use crate::index::{IndexRoot, PAGE_ENTRIES};
use crate::manifest::DiskManifest;
use crate::vault::Vault;
use crate::vault::lookup::LookupIndex;
use crate::vault::walk::{load_page, load_root};

/// Bytes of decoded chunks kept in memory by default.
pub const CHUNK_CACHE_BYTES: usize = 64 << 20;
/// Stored bytes one ranged GET fetches at most for a reader of a shared store.
pub const READ_AHEAD_BYTES: u64 = 4 << 20;
/// Index pages kept in memory (each 32 KiB: covers 64 MiB at 64 KiB chunks).
pub const PAGE_CACHE: usize = 64;

/// What the readers of one disk share: index root, caches, read-ahead pool, counters.
pub struct DiskCache {
    vault: Arc<Vault>,
    name: String,
    root: IndexRoot,
    size: u64,
    pages: Mutex<LruCache<usize, Arc<Vec<ChunkDigest>>>>,
    chunks: Arc<ChunkCache>,
    counters: Arc<Counters>,
    /// Sequential read-ahead (see [`prefetch`]); on object storage only.
    prefetch: Option<Prefetcher>,
}

impl DiskCache {
    /// Load `disk`'s index root from `vault`; caches of `chunk_bytes` decoded chunk bytes.
    /// Sequential readers get read-ahead when the vault is on object storage.
    pub fn open(vault: Arc<Vault>, disk: &DiskManifest, chunk_bytes: usize) -> Result<DiskCache> {
        let prefetch = vault.is_shared_store();
        DiskCache::open_with(vault, disk, chunk_bytes, prefetch)
    }

    /// [`DiskCache::open`], with read-ahead for sequential readers or without.
    pub fn open_with(
        vault: Arc<Vault>,
        disk: &DiskManifest,
        chunk_bytes: usize,
        prefetch: bool,
    ) -> Result<DiskCache> {
        let lookup = vault.lookup()?;
        let root = load_root(&vault, &lookup, disk)?;
        drop(lookup);
        let cs = root.chunk_size.as_u64() as usize;
        let chunks = Arc::new(ChunkCache::new((chunk_bytes / cs).max(1)));
        let counters = Arc::new(Counters::default());
        let prefetch = prefetch.then(|| {
            Prefetcher::new(
                Arc::clone(&vault),
                Arc::clone(&chunks),
                Arc::clone(&counters),
            )
        });
        Ok(DiskCache {
            size: disk.size,
            name: disk.name.clone(),
            pages: Mutex::new(LruCache::new(
                NonZeroUsize::new(PAGE_CACHE).unwrap_or(NonZeroUsize::MIN),
            )),
            chunks,
            counters,
            prefetch,
            vault,
            root,
        })
    }

    /// What the readers of this disk did so far.
    pub fn counts(&self) -> ReadCounts {
        self.counters.snapshot()
    }

    /// The disk's name in its backup.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Virtual size of the disk in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunk size of the vault in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.root.chunk_size.as_u64()
    }

    /// The vault the chunks come from.
    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }

    /// A reader for this thread.
    pub fn reader(self: &Arc<Self>) -> Result<DiskReader> {
        let decoder = if self.vault.is_shared_store() {
            Some(std::cell::RefCell::new(Decoder::new(self.vault.codec()?)?))
        } else {
            None
        };
        Ok(DiskReader {
            lookup: self.vault.lookup()?,
            cache: Arc::clone(self),
            decoder,
            stream: std::cell::RefCell::new(Stream::new()),
        })
    }
}

impl Drop for DiskCache {
    fn drop(&mut self) {
        // Stop the pool first: its counts are final after that.
        drop(self.prefetch.take());
        let c = self.counters.snapshot();
        if c.chunks_read > 0 {
            tracing::info!(
                disk = %self.name,
                chunks_read = c.chunks_read,
                reader_fetches = c.reader_fetches,
                waited = c.waited,
                prefetched = c.prefetched,
                prefetch_gets = c.prefetch_gets,
                rejected = c.rejected,
                cancelled = c.cancelled,
                "disk reads"
            );
        }
    }
}

/// One thread's reader of a disk: its own lookup index handle, the shared caches.
pub struct DiskReader {
    cache: Arc<DiskCache>,
    lookup: LookupIndex,
    /// Shared store only: decodes the blobs of a read-ahead window.
    decoder: Option<std::cell::RefCell<Decoder>>,
    /// This reader's access pattern, for read-ahead.
    stream: std::cell::RefCell<Stream>,
}

impl DiskReader {
    /// The shared part.
    pub fn cache(&self) -> &Arc<DiskCache> {
        &self.cache
    }

    fn page(&self, p: usize) -> Result<Arc<Vec<ChunkDigest>>> {
        let s = &self.cache;
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

    /// The digest of chunk slot `slot` (`ZERO` for a hole).
    pub fn digest(&self, slot: u64) -> Result<ChunkDigest> {
        let p = (slot / PAGE_ENTRIES as u64) as usize;
        let i = (slot % PAGE_ENTRIES as u64) as usize;
        if p >= self.cache.root.pages.len() {
            return Ok(ChunkDigest::ZERO);
        }
        Ok(self.page(p)?.get(i).copied().unwrap_or(ChunkDigest::ZERO))
    }

    fn chunk(&self, d: &ChunkDigest, offset: u64) -> Result<Arc<Vec<u8>>> {
        let s = &self.cache;
        s.counters.chunk_read();
        if let Some(c) = s.chunks.get(d) {
            return Ok(c);
        }
        if s.chunks.wait_landed(d) {
            s.counters.waited();
            if let Some(c) = s.chunks.get(d) {
                return Ok(c);
            }
        }
        s.counters.reader_fetch();
        if let Some(data) = self.read_ahead(d) {
            return Ok(data);
        }
        let (_, data) = s.vault.read_blob(&self.lookup, d).map_err(|e| {
            e.context_prefix(format!(
                "disk {}: chunk {d} at disk offset {offset}",
                s.name
            ))
        })?;
        let data = Arc::new(data);
        s.chunks.put(*d, Arc::clone(&data));
        Ok(data)
    }

    /// Note a read of `len` bytes at `offset`; when it continues a sequential run, queue
    /// the data chunks from it onward for the read-ahead pool (see [`prefetch`]).
    fn schedule_read_ahead(&self, offset: u64, len: u64) {
        let Some(prefetcher) = &self.cache.prefetch else {
            return;
        };
        let Ok(mut stream) = self.stream.try_borrow_mut() else {
            return;
        };
        let cs = self.cache.chunk_size();
        let Some(ahead) = stream.note(offset, len, cs) else {
            return;
        };
        let slots = self.cache.size.div_ceil(cs);
        let batch = (PREFETCH_BATCH / cs).max(1) as usize;
        // Top up in whole batches (fewer, larger GETs), not by each read's few chunks.
        let step = PREFETCH_BATCH.min(ahead).max(cs);
        let mut scanned = 0;
        while stream.scheduled(cs) + step <= ahead && scanned < Stream::max_scan() {
            let mut slot = stream.frontier_slot(cs);
            if slot >= slots {
                break;
            }
            let (mut data_slots, mut digests) = (Vec::new(), Vec::new());
            while slot < slots
                && scanned < Stream::max_scan()
                && data_slots.len() < batch
                && stream.scheduled(cs) + (data_slots.len() as u64) * cs < ahead
            {
                // An index page that cannot be read: the read itself says why.
                let Ok(d) = self.digest(slot) else {
                    return;
                };
                scanned += 1;
                if !d.is_zero() {
                    data_slots.push(slot);
                    digests.push(d);
                }
                slot += 1;
            }
            if !digests.is_empty() && !prefetcher.schedule(&stream, &digests) {
                break;
            }
            stream.advance(slot, &data_slots, cs);
        }
    }

    /// Shared store: fetch `d` and the blobs after it in its pack with one ranged GET,
    /// verify each and cache them; `None` (the caller then reads `d` alone through the
    /// vault's own path, whose errors say what is wrong) when anything fails.
    fn read_ahead(&self, d: &ChunkDigest) -> Option<Arc<Vec<u8>>> {
        let mut decoder = self.decoder.as_ref()?.try_borrow_mut().ok()?;
        let loc = self.lookup.get(d).ok()??;
        let entries = self.lookup.entries_in_pack(loc.pack).ok()?;
        let first = entries.iter().position(|e| e.offset == loc.offset)?;
        let max_plain = (READ_AHEAD_BYTES / self.cache.chunk_size()).max(1) as usize;
        let mut end = loc.offset + u64::from(loc.length);
        let mut last = first;
        for (i, e) in entries.iter().enumerate().skip(first + 1) {
            let e_end = e.offset + u64::from(e.length);
            if e.offset != end || e_end - loc.offset > READ_AHEAD_BYTES || i - first >= max_plain {
                break;
            }
            end = e_end;
            last = i;
        }
        let bytes = self
            .cache
            .vault
            .store()
            .read_pack_range(loc.pack, loc.offset, (end - loc.offset) as usize)
            .ok()?;
        let mut wanted = None;
        let mut others = Vec::new();
        for e in &entries[first..=last] {
            let at = (e.offset - loc.offset) as usize;
            let Some(stored) = bytes.get(at..at + e.length as usize) else {
                break;
            };
            let Ok((_, plain)) = decoder.decode(stored, &e.digest) else {
                continue; // not cached: a later read of it fails (or heals) on its own
            };
            let plain = Arc::new(plain.to_vec());
            if e.digest == *d {
                wanted = Some(plain);
            } else {
                others.push((e.digest, plain));
            }
        }
        self.cache.chunks.put_if_absent(others);
        let wanted = wanted?;
        self.cache.chunks.put(*d, Arc::clone(&wanted));
        Some(wanted)
    }

    /// Fill `buf` with the disk's bytes at `offset`. A read past the end of the disk is
    /// an `InvalidFormat` error (whoever asked believed a wrong size).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.cache.size) {
            return Err(Error::invalid(format!(
                "disk {}: read of {} bytes at offset {offset} passes its end ({} bytes)",
                self.cache.name,
                buf.len(),
                self.cache.size
            )));
        }
        self.schedule_read_ahead(offset, buf.len() as u64);
        let cs = self.cache.chunk_size();
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
}

/// A byte range of a disk (a partition, or the whole disk) as a file: `Read + Seek`,
/// and positioned reads with [`DiskView::read_exact_at`]. One thread's (its reader holds
/// a SQLite handle); several views share one reader through an `Rc`.
pub struct DiskView {
    reader: Rc<DiskReader>,
    start: u64,
    len: u64,
    pos: u64,
}

impl DiskView {
    /// `len` bytes from `start`; the range must lie within the disk.
    pub fn new(reader: Rc<DiskReader>, start: u64, len: u64) -> Result<DiskView> {
        let size = reader.cache.size;
        if start.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::invalid(format!(
                "range of {len} bytes at offset {start} passes the end of the disk ({size} bytes)"
            )));
        }
        Ok(DiskView {
            reader,
            start,
            len,
            pos: 0,
        })
    }

    /// The whole disk.
    pub fn whole(reader: Rc<DiskReader>) -> DiskView {
        let len = reader.cache.size;
        DiskView {
            reader,
            start: 0,
            len,
            pos: 0,
        }
    }

    /// Length of the range in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the range starts on the disk.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Another view of the same range (its own position).
    pub fn reopen(&self) -> DiskView {
        DiskView {
            reader: Rc::clone(&self.reader),
            start: self.start,
            len: self.len,
            pos: 0,
        }
    }

    /// Fill `buf` from `offset` within the range; past its end is `InvalidFormat`.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.len)
        {
            return Err(Error::invalid(format!(
                "read of {} bytes at offset {offset} passes the end of the partition \
                 ({} bytes at disk offset {})",
                buf.len(),
                self.len,
                self.start
            )));
        }
        self.reader.read_at(self.start + offset, buf)
    }
}

impl Read for DiskView {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        self.read_exact_at(self.pos, &mut buf[..n])
            .map_err(into_io)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for DiskView {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the start of the partition",
            )),
        }
    }
}

/// Our error inside an `io::Error`, so that its kind survives (see [`from_io`]).
fn into_io(e: Error) -> std::io::Error {
    std::io::Error::other(e)
}

/// Recover an [`Error`] wrapped by [`DiskView`]'s `Read` impl (other I/O errors become
/// `Io`).
pub fn from_io(e: std::io::Error, what: &str) -> Error {
    if e.get_ref().is_some_and(|r| r.is::<Error>()) {
        match e.into_inner().map(|b| b.downcast::<Error>()) {
            Some(Ok(inner)) => return inner.context_prefix(what.to_string()),
            Some(Err(other)) => return Error::new(ErrorKind::Io, what).with_source(other),
            None => return Error::new(ErrorKind::Io, what),
        }
    }
    Error::io(what, e)
}
