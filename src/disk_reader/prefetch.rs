//! Read-ahead for sequential readers of a disk on object storage: the shared chunk cache,
//! the per-reader sequence detector and the small pool that fetches ahead.
//!
//! An NBD client (`qemu-img convert`, a booting guest) reads in 64 KiB–2 MiB requests,
//! one at a time per connection; on an object store every chunk missing from the cache
//! is a GET round trip on the reader's thread. So each reader keeps a [`Stream`]: a read
//! that starts near where the previous one ended (within [`SEQ_SLACK`], or anywhere up
//! to what was already scheduled, so a jump over a hole the scan skipped still counts) is
//! sequential. From the second sequential read on, the reader schedules the data chunks
//! from its read onward — zero slots are skipped, they cost nothing — in batches of
//! [`PREFETCH_BATCH`], until twice the bytes of the run so far lie scheduled past its
//! position: at least one batch (what one cache miss fetches anyway), at most
//! [`PREFETCH_AHEAD`] (a long `convert`). A read that jumps elsewhere ends the run: the
//! reader's generation is bumped, and queued work of the old run is dropped unfetched.
//!
//! ```text
//! reader thread                          prefetch pool (PREFETCH_THREADS, started on first use)
//!   note(offset, len) ─ sequential? ─┐
//!   claim digests (in_flight) ◀──────┘   task: digests of ≤ PREFETCH_BATCH plaintext
//!   try_send(task) ── bounded queue ───▶ locate (lookup index), sort by (pack, offset),
//!   serve the read: cache hit,            coalesce adjacent blobs (gaps ≤ MAX_GAP) into
//!     or wait while in_flight,            ranged GETs of ≤ 2 × PREFETCH_BATCH, decode +
//!     or fetch it itself                  verify each, put in the LRU, release, notify
//! ```
//!
//! A chunk is put in the cache only after it decoded and matched its digest, exactly as
//! on the reader's own path; one that fails is counted ([`ReadCounts::rejected`]), left
//! out, and released, so the reader fetches it itself through the vault's read path and
//! the NBD read fails (EIO) with that path's error. A claimed chunk is always released —
//! fetched, failed, cancelled, or its task dropped unread (the task's `Drop`) — so a
//! reader never waits for a fetch that will not come.
//!
//! Memory: the chunk cache's byte bound (shared by every reader of the disk), plus per
//! pool thread one GET buffer (≤ 2 × [`PREFETCH_BATCH`]) and its decoded chunks, plus at
//! most [`PREFETCH_QUEUE`] queued tasks of digests. [`PREFETCH_AHEAD`] stays well under
//! the cache so prefetched chunks are not evicted before they are read.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use lru::LruCache;

use crate::chunk::{ChunkDigest, Decoder};
use crate::vault::Vault;
use crate::vault::lookup::{BlobLocation, LookupIndex};

use super::stream::Stream;

/// Bytes of data (plaintext) a sequential reader keeps scheduled past its position.
pub const PREFETCH_AHEAD: u64 = 24 << 20;
/// Plaintext bytes of one prefetch task (its blobs are fetched in as few GETs as they
/// lie in packs).
pub const PREFETCH_BATCH: u64 = 4 << 20;
/// Threads (so GETs in flight) fetching ahead, per served disk.
pub const PREFETCH_THREADS: usize = 4;
/// Tasks queued at most per served disk; past it, scheduling waits for the next read.
pub const PREFETCH_QUEUE: usize = 8;
/// How far before the previous read's end, or past what was scheduled, a read may start
/// and still count as sequential (a client with several requests in flight sends them
/// slightly out of order).
pub const SEQ_SLACK: u64 = 16 << 20;
/// Bytes between two blobs of a pack that one GET still reads through (cheaper than a
/// second round trip).
pub const MAX_GAP: u64 = 256 << 10;

/// Per-disk counters of reads and read-ahead (see [`ReadCounts`]).
#[derive(Default)]
pub(crate) struct Counters {
    chunks_read: AtomicU64,
    reader_fetches: AtomicU64,
    waited: AtomicU64,
    prefetched: AtomicU64,
    prefetch_gets: AtomicU64,
    rejected: AtomicU64,
    cancelled: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn chunk_read(&self) {
        add(&self.chunks_read, 1);
    }
    pub(crate) fn reader_fetch(&self) {
        add(&self.reader_fetches, 1);
    }
    pub(crate) fn waited(&self) {
        add(&self.waited, 1);
    }
    pub(crate) fn snapshot(&self) -> ReadCounts {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ReadCounts {
            chunks_read: v(&self.chunks_read),
            reader_fetches: v(&self.reader_fetches),
            waited: v(&self.waited),
            prefetched: v(&self.prefetched),
            prefetch_gets: v(&self.prefetch_gets),
            rejected: v(&self.rejected),
            cancelled: v(&self.cancelled),
        }
    }
}

/// What the readers of one disk did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadCounts {
    /// Data (non-zero) chunk slots readers read, cache hits included.
    pub chunks_read: u64,
    /// Chunks a reader had to fetch itself (not cached, not being prefetched).
    pub reader_fetches: u64,
    /// Chunks a reader waited for while the pool fetched them.
    pub waited: u64,
    /// Chunks the pool fetched, verified and cached.
    pub prefetched: u64,
    /// Ranged GETs (reads of a pack range) the pool sent.
    pub prefetch_gets: u64,
    /// Chunks the pool fetched that failed verification (never cached or served).
    pub rejected: u64,
    /// Chunks dropped unfetched because their reader's access turned random.
    pub cancelled: u64,
}

/// Decoded, verified chunks shared by the readers of a disk (an LRU bounded by bytes),
/// and the chunks the pool is fetching.
pub(crate) struct ChunkCache {
    lru: Mutex<LruCache<ChunkDigest, Arc<Vec<u8>>>>,
    in_flight: Mutex<HashSet<ChunkDigest>>,
    landed: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ChunkCache {
    /// A cache of at most `entries` chunks.
    pub(crate) fn new(entries: usize) -> ChunkCache {
        ChunkCache {
            lru: Mutex::new(LruCache::new(
                NonZeroUsize::new(entries).unwrap_or(NonZeroUsize::MIN),
            )),
            in_flight: Mutex::new(HashSet::new()),
            landed: Condvar::new(),
        }
    }

    pub(crate) fn get(&self, d: &ChunkDigest) -> Option<Arc<Vec<u8>>> {
        lock(&self.lru).get(d).cloned()
    }

    pub(crate) fn put(&self, d: ChunkDigest, data: Arc<Vec<u8>>) {
        lock(&self.lru).put(d, data);
    }

    /// Put what is not cached yet, without making what is more recent.
    pub(crate) fn put_if_absent(&self, chunks: Vec<(ChunkDigest, Arc<Vec<u8>>)>) {
        let mut lru = lock(&self.lru);
        for (d, data) in chunks {
            if !lru.contains(&d) {
                lru.put(d, data);
            }
        }
    }

    /// Wait while the pool fetches `d`; whether it was being fetched.
    pub(crate) fn wait_landed(&self, d: &ChunkDigest) -> bool {
        let mut set = lock(&self.in_flight);
        let mut waited = false;
        while set.contains(d) {
            waited = true;
            set = self.landed.wait(set).unwrap_or_else(|e| e.into_inner());
        }
        waited
    }

    /// Mark `d` as being fetched, unless it is cached or already being fetched.
    fn claim(&self, d: &ChunkDigest) -> bool {
        if lock(&self.lru).contains(d) {
            return false;
        }
        lock(&self.in_flight).insert(*d)
    }

    /// Cache `landed` (verified chunks), then release every digest of `done`.
    fn land(&self, landed: Vec<(ChunkDigest, Arc<Vec<u8>>)>, done: &[ChunkDigest]) {
        self.put_if_absent(landed);
        self.release(done);
    }

    fn release(&self, done: &[ChunkDigest]) {
        if done.is_empty() {
            return;
        }
        let mut set = lock(&self.in_flight);
        for d in done {
            set.remove(d);
        }
        drop(set);
        self.landed.notify_all();
    }
}

/// Claimed chunks to fetch for one run; whatever is left unfetched is released on drop.
struct Task {
    cache: Arc<ChunkCache>,
    generation: u64,
    current: Arc<AtomicU64>,
    digests: Vec<ChunkDigest>,
}

impl Task {
    fn cancelled(&self) -> bool {
        self.current.load(Ordering::SeqCst) != self.generation
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.cache.release(&self.digests);
    }
}

/// The running pool: its queue and threads.
type Pool = (Sender<Task>, Vec<JoinHandle<()>>);

/// The pool of one served disk, started on first use and stopped on drop.
pub(crate) struct Prefetcher {
    vault: Arc<Vault>,
    cache: Arc<ChunkCache>,
    counters: Arc<Counters>,
    closing: Arc<AtomicBool>,
    pool: Mutex<Option<Pool>>,
}

impl Prefetcher {
    pub(crate) fn new(
        vault: Arc<Vault>,
        cache: Arc<ChunkCache>,
        counters: Arc<Counters>,
    ) -> Prefetcher {
        Prefetcher {
            vault,
            cache,
            counters,
            closing: Arc::new(AtomicBool::new(false)),
            pool: Mutex::new(None),
        }
    }

    /// Claim the digests of `batch` not cached or in flight and queue them for the pool.
    /// False when the queue is full (nothing claimed: the caller tries on its next read).
    pub(crate) fn schedule(&self, stream: &Stream, batch: &[ChunkDigest]) -> bool {
        let mut pool = lock(&self.pool);
        if pool.is_none() {
            *pool = Some(self.start());
        }
        let Some((tx, _)) = pool.as_ref() else {
            return false;
        };
        if tx.is_full() {
            return false;
        }
        let digests: Vec<ChunkDigest> = batch
            .iter()
            .filter(|d| self.cache.claim(d))
            .copied()
            .collect();
        if digests.is_empty() {
            return true;
        }
        let (generation, current) = stream.generation();
        let task = Task {
            cache: Arc::clone(&self.cache),
            generation,
            current,
            digests,
        };
        match tx.try_send(task) {
            Ok(()) => true,
            // The task is dropped here: its claims are released.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    fn start(&self) -> Pool {
        let (tx, rx) = crossbeam_channel::bounded::<Task>(PREFETCH_QUEUE);
        let mut threads = Vec::new();
        for _ in 0..PREFETCH_THREADS {
            let worker = Worker {
                vault: Arc::clone(&self.vault),
                cache: Arc::clone(&self.cache),
                counters: Arc::clone(&self.counters),
                closing: Arc::clone(&self.closing),
            };
            let rx = rx.clone();
            match std::thread::Builder::new()
                .name("bv-prefetch".into())
                .spawn(move || worker.run(&rx))
            {
                Ok(h) => threads.push(h),
                Err(e) => tracing::warn!("cannot start a read-ahead thread: {e}"),
            }
        }
        // With no thread at all the receiver is gone with `rx`: every send then fails
        // (and releases its claims), reads go on without read-ahead.
        (tx, threads)
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
        let pool = lock(&self.pool).take();
        if let Some((tx, threads)) = pool {
            drop(tx);
            for t in threads {
                let _ = t.join();
            }
        }
    }
}

/// One pool thread: its own lookup handle and decoder.
struct Worker {
    vault: Arc<Vault>,
    cache: Arc<ChunkCache>,
    counters: Arc<Counters>,
    closing: Arc<AtomicBool>,
}

impl Worker {
    fn run(self, rx: &Receiver<Task>) {
        let mut state: Option<(LookupIndex, Decoder)> = None;
        let mut warned = false;
        while let Ok(mut task) = rx.recv() {
            if self.closing.load(Ordering::SeqCst) || task.cancelled() {
                add(&self.counters.cancelled, task.digests.len() as u64);
                continue;
            }
            if state.is_none() {
                match self
                    .vault
                    .lookup()
                    .and_then(|l| Ok((l, Decoder::new(self.vault.codec()?)?)))
                {
                    Ok(s) => state = Some(s),
                    Err(e) => {
                        if !warned {
                            tracing::warn!("read-ahead disabled on this thread: {e}");
                            warned = true;
                        }
                        continue;
                    }
                }
            }
            if let Some((lookup, decoder)) = state.as_mut() {
                self.fetch(&mut task, lookup, decoder);
            }
        }
    }

    /// Fetch a task's chunks in as few ranged GETs as their places in packs allow.
    fn fetch(&self, task: &mut Task, lookup: &LookupIndex, decoder: &mut Decoder) {
        let mut located: Vec<(BlobLocation, ChunkDigest)> = Vec::new();
        for d in std::mem::take(&mut task.digests) {
            match lookup.get(&d) {
                Ok(Some(loc)) => located.push((loc, d)),
                // Not indexed: the reader's own path says what is wrong.
                _ => self.cache.release(&[d]),
            }
        }
        located.sort_by_key(|(l, _)| (l.pack, l.offset));
        task.digests = located.iter().map(|(_, d)| *d).collect();
        let mut rest: &[(BlobLocation, ChunkDigest)] = &located;
        while !rest.is_empty() {
            let n = run_len(rest);
            let (run, after) = rest.split_at(n);
            rest = after;
            if task.cancelled() || self.closing.load(Ordering::SeqCst) {
                break;
            }
            self.fetch_run(run, decoder);
            // The run's digests are released by fetch_run; forget them.
            task.digests.drain(..n);
        }
        add(&self.counters.cancelled, task.digests.len() as u64);
    }

    /// One ranged GET over the blobs of `run` (one pack, ascending); cache the good ones.
    fn fetch_run(&self, run: &[(BlobLocation, ChunkDigest)], decoder: &mut Decoder) {
        let digests: Vec<ChunkDigest> = run.iter().map(|(_, d)| *d).collect();
        let (Some((first, _)), Some((last, _))) = (run.first(), run.last()) else {
            return;
        };
        let start = first.offset;
        let end = last.offset + u64::from(last.length);
        add(&self.counters.prefetch_gets, 1);
        let bytes =
            match self
                .vault
                .store()
                .read_pack_range(first.pack, start, (end - start) as usize)
            {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!("read-ahead: {e}");
                    self.cache.release(&digests);
                    return;
                }
            };
        let mut landed = Vec::with_capacity(run.len());
        for (loc, d) in run {
            let at = (loc.offset - start) as usize;
            let Some(stored) = bytes.get(at..at + loc.length as usize) else {
                continue;
            };
            match decoder.decode(stored, d) {
                Ok((_, plain)) => {
                    add(&self.counters.prefetched, 1);
                    landed.push((*d, Arc::new(plain.to_vec())));
                }
                Err(e) => {
                    add(&self.counters.rejected, 1);
                    tracing::debug!(
                        "read-ahead: blob {d} at pack {} offset {}: {e}",
                        loc.pack,
                        loc.offset
                    );
                }
            }
        }
        self.cache.land(landed, &digests);
    }
}

/// How many of `located` (sorted by pack and offset) one GET covers: same pack, gaps of
/// at most [`MAX_GAP`], at most twice [`PREFETCH_BATCH`] in all (a batch stored raw is
/// a little more than its plaintext: still one GET).
fn run_len(located: &[(BlobLocation, ChunkDigest)]) -> usize {
    let Some((first, _)) = located.first() else {
        return 0;
    };
    let mut end = first.offset + u64::from(first.length);
    let mut n = 1;
    for (l, _) in &located[1..] {
        let l_end = l.offset + u64::from(l.length);
        if l.pack != first.pack
            || l.offset < end
            || l.offset - end > MAX_GAP
            || l_end - first.offset > 2 * PREFETCH_BATCH
        {
            break;
        }
        end = l_end;
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_coalesce_adjacent_blobs_of_one_pack_only() {
        use crate::chunk::BlobKind;
        use crate::vault::pack::PackId;
        let p1 = PackId([1; 16]);
        let p2 = PackId([2; 16]);
        let at = |pack, offset, length| {
            (
                BlobLocation {
                    pack,
                    offset,
                    length,
                    kind: BlobKind::Data,
                },
                ChunkDigest::ZERO,
            )
        };
        let located = vec![
            at(p1, 0, 100),
            at(p1, 100, 100),
            at(p1, 200 + MAX_GAP, 10),
            at(p1, 210 + 2 * MAX_GAP + 1, 10),
            at(p2, 0, 10),
        ];
        assert_eq!(run_len(&located), 3);
        assert_eq!(run_len(&located[3..]), 1);
        assert_eq!(run_len(&located[4..]), 1);
        assert_eq!(run_len(&[]), 0);
    }
}
