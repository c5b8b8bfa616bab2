//! The per-disk pipeline: read → zero check → blake3 → dedup → zstd → pack.
//!
//! ```text
//!  caller thread (owns the source; sources need not be Send)
//!    reads the chunks of the read plan, in disk order ──jobs (bounded)──▶ N workers
//!    builds index pages from the results  ◀──results──  zero check, blake3, dedup lookup,
//!    stores pages and the root                           zstd (only for new chunks)
//!                                                              │ new blobs (bounded)
//!                                                              ▼
//!                                                       writer thread: PackWriter
//!                                                         ──sealed packs──▶ 4 publishers:
//!                                                       upload pack → lookup index
//! ```
//!
//! A page with nothing to read keeps the previous backup's page digest (or `ZERO`); a
//! page with something to read starts from the previous page's entries and overwrites the
//! slots read. Memory is bounded: the job queue holds a few chunks per worker, only the
//! pages being filled are in memory, and dedup state lives in the SQLite lookup index
//! (plus a set of digests claimed by this backup and not yet indexed, at most about
//! [`UPLOADS_IN_FLIGHT`] + 2 packs' worth).
//!
//! Every pack published is recorded in the caller's `published` list, so that a backup
//! that fails later removes them (see `cleanup`); a pack still being filled when the
//! pipeline fails is removed by the pack writer.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};

use super::{BackupOptions, DiskOutcome, ReadPlan, check_cancel};
use crate::chunk::{BlobKind, ChunkDigest, EncodedBlob, Encoder, encode_blob, is_zero};
use crate::error::{Error, ErrorKind, Result};
use crate::index::{IndexRoot, PAGE_ENTRIES, encode_page, page_len, pages_for};
use crate::source::{BlockSource, Extent};
use crate::vault::Vault;
use crate::vault::lookup::LookupIndex;
use crate::vault::pack::{PackId, SealedPack};
use crate::vault::walk::PageReader;

/// Consecutive chunks read with one request.
const READ_RUN: usize = 16;

struct Job {
    page: usize,
    slot: usize,
    buf: Vec<u8>,
}

struct JobResult {
    page: usize,
    slot: usize,
    digest: ChunkDigest,
    new: bool,
}

/// Digests this backup decided to store and that are not indexed yet.
type Claimed = Mutex<HashSet<ChunkDigest>>;

/// Returns true when the caller should store `digest` (it is neither in the vault nor
/// claimed by another worker of this backup).
fn claim(lookup: &LookupIndex, claimed: &Claimed, digest: &ChunkDigest) -> Result<bool> {
    if claimed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(digest)
    {
        return Ok(false);
    }
    if lookup.contains(digest)? {
        return Ok(false);
    }
    Ok(claimed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(*digest))
}

/// A page being filled.
struct PageState {
    entries: Vec<ChunkDigest>,
    outstanding: usize,
    all_sent: bool,
}

/// Chunk numbers covered by `extents` (sorted), each once.
fn plan_chunks(extents: &[Extent], chunk: u64, disk_size: u64) -> impl Iterator<Item = u64> + '_ {
    let mut next = 0u64;
    extents.iter().flat_map(move |e| {
        let end = e.end().min(disk_size);
        if e.length == 0 || e.offset >= end {
            return 0..0;
        }
        let first = (e.offset / chunk).max(next);
        let last = (end - 1) / chunk + 1;
        next = next.max(last);
        first..last.max(first)
    })
}

/// The index pages the chunks of `extents` fall in, ascending.
fn plan_pages(extents: &[Extent], chunk: u64, disk_size: u64) -> Vec<usize> {
    let per_page = chunk * PAGE_ENTRIES as u64;
    let mut pages: Vec<usize> = Vec::new();
    for e in extents {
        let end = e.end().min(disk_size);
        if e.length == 0 || e.offset >= end {
            continue;
        }
        let (first, last) = (
            (e.offset / per_page) as usize,
            ((end - 1) / per_page) as usize,
        );
        let from = pages.last().map_or(first, |&l| first.max(l + 1));
        pages.extend(from..=last);
    }
    pages
}

/// Run the pipeline for one disk according to `plan`; every pack published is pushed
/// onto `published` (also when the run then fails).
pub fn run_disk(
    vault: &Vault,
    source: &mut dyn BlockSource,
    plan: &ReadPlan,
    opts: &BackupOptions,
    published: &Mutex<Vec<PackId>>,
) -> Result<DiskOutcome> {
    let cs = vault.chunk_size().as_u64();
    source.set_cancel(opts.cancel.clone());
    let size = source.size();
    let chunks = cs_chunks(size, cs);
    let npages = pages_for(chunks);
    if let Some(base) = &plan.base
        && (base.disk_size != size || base.chunk_size != vault.chunk_size())
    {
        return Err(Error::invalid(format!(
            "previous index is for a disk of {} bytes, this disk has {size}",
            base.disk_size
        )));
    }
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };
    let level = vault.config().zstd_level;
    // An encrypted vault without its key: fail before reading anything.
    vault.codec()?;
    let bytes_allocated: u64 = plan.extents.iter().map(|e| e.length).sum();
    let main_lookup = vault.lookup_reconciled()?;
    let claimed: Claimed = Mutex::new(HashSet::new());
    let failed = AtomicBool::new(false);
    let stored = AtomicU64::new(0);
    let capacity_left = match vault.config().capacity {
        Some(cap) => Some(cap.saturating_sub(vault.stored_bytes(&main_lookup)?.0)),
        None => None,
    };

    let (job_tx, job_rx) = bounded::<Job>(threads * 4);
    let (res_tx, res_rx) = unbounded::<Result<JobResult>>();
    let (blob_tx, blob_rx) = bounded::<EncodedBlob>(threads * 4);

    std::thread::scope(|scope| -> Result<DiskOutcome> {
        let writer = scope.spawn(|| {
            let r = write_blobs(
                vault,
                blob_rx,
                &claimed,
                &stored,
                capacity_left,
                opts,
                published,
            );
            if r.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            r
        });
        for _ in 0..threads {
            let (job_rx, res_tx, blob_tx) = (job_rx.clone(), res_tx.clone(), blob_tx.clone());
            let (claimed, failed) = (&claimed, &failed);
            scope.spawn(move || {
                if let Err(e) = hash_worker(vault, level, job_rx, &res_tx, blob_tx, claimed) {
                    failed.store(true, Ordering::Relaxed);
                    let _ = res_tx.send(Err(e));
                }
            });
        }
        drop((job_rx, res_tx));

        let mut reader = Reader {
            vault,
            lookup: &main_lookup,
            claimed: &claimed,
            level,
            base: plan.base.as_ref().map(|b| {
                PageReader::new(vault, &main_lookup, b, plan_pages(&plan.extents, cs, size))
            }),
            chunks,
            pages: HashMap::new(),
            root_pages: match &plan.base {
                Some(b) => b.pages.clone(),
                None => vec![ChunkDigest::ZERO; npages],
            },
            blob_tx: blob_tx.clone(),
            new_chunks: 0,
        };
        let read = reader.read_all(source, plan, &job_tx, &res_rx, opts, &failed);
        drop(job_tx);
        let result = read.and_then(|(bytes_read, chunks_read)| {
            while reader
                .pages
                .values()
                .any(|p| p.outstanding > 0 || !p.all_sent)
            {
                let r = res_rx.recv().map_err(|_| {
                    Error::new(ErrorKind::Io, "backup workers stopped unexpectedly")
                })?;
                reader.apply(r?)?;
            }
            let root = IndexRoot {
                disk_size: size,
                chunk_size: vault.chunk_size(),
                pages: std::mem::take(&mut reader.root_pages),
            };
            let root_digest = reader.store_blob(BlobKind::IndexRoot, root.encode())?;
            Ok((bytes_read, chunks_read, root_digest))
        });
        let new_chunks = reader.new_chunks;
        drop(reader);
        drop(blob_tx);
        if result.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        // Drain results so that workers can finish, then collect the writer.
        while res_rx.recv().is_ok() {}
        let written = writer
            .join()
            .map_err(|_| Error::new(ErrorKind::Io, "pack writer thread panicked"))?;
        // The writer's own failure (capacity, disk full) is the cause when both failed:
        // the reader then only saw the writer go away.
        written?;
        let (bytes_read, chunks_read, index_root) = result?;
        Ok(DiskOutcome {
            index_root,
            bytes_allocated,
            bytes_read,
            bytes_stored: stored.load(Ordering::Relaxed),
            chunks_read,
            chunks_new: new_chunks,
        })
    })
}

fn cs_chunks(size: u64, cs: u64) -> u64 {
    size.div_ceil(cs)
}

/// The caller-thread side: reads chunks, collects results, builds pages.
struct Reader<'a> {
    vault: &'a Vault,
    lookup: &'a LookupIndex,
    claimed: &'a Claimed,
    level: i32,
    /// The previous backup's pages (read ahead on object storage).
    base: Option<PageReader<'a>>,
    chunks: u64,
    pages: HashMap<usize, PageState>,
    root_pages: Vec<ChunkDigest>,
    blob_tx: Sender<EncodedBlob>,
    new_chunks: u64,
}

impl Reader<'_> {
    fn read_all(
        &mut self,
        source: &mut dyn BlockSource,
        plan: &ReadPlan,
        job_tx: &Sender<Job>,
        res_rx: &Receiver<Result<JobResult>>,
        opts: &BackupOptions,
        failed: &AtomicBool,
    ) -> Result<(u64, u64)> {
        let cs = self.vault.chunk_size().as_u64();
        let size = source.size();
        let mut bytes_read = 0u64;
        let mut chunks_read = 0u64;
        let mut current: Option<usize> = None;
        let mut planned = plan_chunks(&plan.extents, cs, size).peekable();
        let max_run = if source.prefers_large_reads() {
            READ_RUN
        } else {
            1
        };
        let mut run: Vec<u64> = Vec::with_capacity(READ_RUN);
        let mut big: Vec<u8> = Vec::new();
        while let Some(first) = planned.next() {
            check_cancel(opts)?;
            if failed.load(Ordering::Relaxed) {
                break;
            }
            // Sources with a per-request cost (NBD) get runs of consecutive chunks (up to
            // 1 MiB) in one request; files are read chunk by chunk, without a copy.
            run.clear();
            run.push(first);
            while run.len() < max_run
                && planned.peek() == Some(&(first + run.len() as u64))
                && !(first + run.len() as u64).is_multiple_of(PAGE_ENTRIES as u64)
            {
                run.extend(planned.next());
            }
            let off = first * cs;
            let end = ((first + run.len() as u64) * cs).min(size);
            big.clear();
            big.resize((end - off) as usize, 0);
            source
                .read_at(&mut big, off)
                .map_err(|e| e.context_prefix(format!("reading disk offset {off}")))?;
            bytes_read += end - off;
            chunks_read += run.len() as u64;
            if let Some(p) = &opts.progress {
                p.bytes_done.fetch_add(end - off, Ordering::Relaxed);
            }
            let page = (first / PAGE_ENTRIES as u64) as usize;
            if current != Some(page) {
                if let Some(prev) = current {
                    self.page_sent(prev)?;
                }
                self.open_page(page)?;
                current = Some(page);
            }
            for (i, c) in run.iter().enumerate() {
                let start = i * cs as usize;
                let buf = if run.len() == 1 {
                    std::mem::take(&mut big)
                } else {
                    big[start..(start + cs as usize).min(big.len())].to_vec()
                };
                if let Some(st) = self.pages.get_mut(&page) {
                    st.outstanding += 1;
                }
                let slot = (c % PAGE_ENTRIES as u64) as usize;
                if job_tx.send(Job { page, slot, buf }).is_err() {
                    return Ok((bytes_read, chunks_read));
                }
            }
            while let Ok(r) = res_rx.try_recv() {
                self.apply(r?)?;
            }
        }
        if let Some(prev) = current {
            self.page_sent(prev)?;
        }
        Ok((bytes_read, chunks_read))
    }

    fn open_page(&mut self, page: usize) -> Result<()> {
        let n = page_len(self.chunks, page);
        let entries = match &mut self.base {
            // Same disk size as this backup (checked), so the same page lengths.
            Some(b) => b.page(page)?,
            None => vec![ChunkDigest::ZERO; n],
        };
        self.pages.insert(
            page,
            PageState {
                entries,
                outstanding: 0,
                all_sent: false,
            },
        );
        Ok(())
    }

    fn page_sent(&mut self, page: usize) -> Result<()> {
        if let Some(st) = self.pages.get_mut(&page) {
            st.all_sent = true;
        }
        self.maybe_finish(page)
    }

    fn apply(&mut self, r: JobResult) -> Result<()> {
        if r.new {
            self.new_chunks += 1;
        }
        if let Some(st) = self.pages.get_mut(&r.page) {
            st.entries[r.slot] = r.digest;
            st.outstanding -= 1;
        }
        self.maybe_finish(r.page)
    }

    fn maybe_finish(&mut self, page: usize) -> Result<()> {
        let done = self
            .pages
            .get(&page)
            .is_some_and(|st| st.all_sent && st.outstanding == 0);
        if !done {
            return Ok(());
        }
        let Some(st) = self.pages.remove(&page) else {
            return Ok(());
        };
        self.root_pages[page] = match encode_page(&st.entries) {
            None => ChunkDigest::ZERO,
            Some(bytes) => self.store_blob(BlobKind::IndexPage, bytes)?,
        };
        Ok(())
    }

    /// Store an index blob unless the vault already has it.
    fn store_blob(&mut self, kind: BlobKind, plain: Vec<u8>) -> Result<ChunkDigest> {
        let digest = self.vault.codec()?.digest(&plain);
        if claim(self.lookup, self.claimed, &digest)? {
            let blob = encode_blob(kind, plain, self.level, self.vault.codec()?)?;
            self.blob_tx
                .send(blob)
                .map_err(|_| Error::new(ErrorKind::Io, "pack writer stopped"))?;
        }
        Ok(digest)
    }
}

/// A worker: zero check, hash, dedup, compress.
fn hash_worker(
    vault: &Vault,
    level: i32,
    jobs: Receiver<Job>,
    results: &Sender<Result<JobResult>>,
    blobs: Sender<EncodedBlob>,
    claimed: &Claimed,
) -> Result<()> {
    let lookup = vault.lookup()?;
    let codec = vault.codec()?;
    let mut encoder = Encoder::new(level, codec)?;
    for Job { page, slot, buf } in jobs {
        let (digest, new) = if is_zero(&buf) {
            (ChunkDigest::ZERO, false)
        } else {
            let digest = codec.digest(&buf);
            if claim(&lookup, claimed, &digest)? {
                let blob = encoder.encode(BlobKind::Data, digest, buf)?;
                if blobs.send(blob).is_err() {
                    return Err(Error::new(ErrorKind::Io, "pack writer stopped"));
                }
                (digest, true)
            } else {
                (digest, false)
            }
        };
        if results
            .send(Ok(JobResult {
                page,
                slot,
                digest,
                new,
            }))
            .is_err()
        {
            break;
        }
    }
    Ok(())
}

/// Packs of one disk backup uploaded at once. An object store takes one PUT at a time
/// per connection, so a single publisher left the hash workers waiting on each 32 MiB
/// upload; several in flight keep the link busy while the writer fills the next pack.
pub const UPLOADS_IN_FLIGHT: usize = 4;

/// The writer thread: packs blobs; [`UPLOADS_IN_FLIGHT`] publisher threads beside it make
/// full packs durable and index them while the writer fills the next one. Bounds: one
/// open pack, one sealed pack waiting and one per publisher, each spooled on local disk
/// (an object store's PUT holds the pack in memory: at most `UPLOADS_IN_FLIGHT` × 32 MiB).
/// The manifest is written by the caller after this returns, that is after every
/// publisher has finished: never before each pack it references is durable.
fn write_blobs(
    vault: &Vault,
    blobs: Receiver<EncodedBlob>,
    claimed: &Claimed,
    stored: &AtomicU64,
    capacity_left: Option<u64>,
    opts: &BackupOptions,
    published: &Mutex<Vec<PackId>>,
) -> Result<()> {
    let lookup = Mutex::new(vault.lookup()?);
    let upload_failed = AtomicBool::new(false);
    let (sealed_tx, sealed_rx) = bounded::<SealedPack>(1);
    std::thread::scope(|scope| {
        let publishers: Vec<_> = (0..UPLOADS_IN_FLIGHT)
            .map(|_| {
                let sealed_rx = sealed_rx.clone();
                let (lookup, upload_failed) = (&lookup, &upload_failed);
                scope.spawn(move || -> Result<()> {
                    let r = (|| {
                        for sealed in sealed_rx {
                            let info = sealed.publish()?;
                            published
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(info.id);
                            lookup
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert_pack(&info)?;
                            let mut c = claimed.lock().unwrap_or_else(|p| p.into_inner());
                            for e in &info.entries {
                                c.remove(&e.digest);
                            }
                        }
                        Ok(())
                    })();
                    if r.is_err() {
                        upload_failed.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        drop(sealed_rx);
        let written = (|| -> Result<()> {
            let mut writer = vault.pack_writer();
            for blob in blobs {
                if upload_failed.load(Ordering::Relaxed) {
                    break;
                }
                let total = stored.load(Ordering::Relaxed) + blob.stored_len() as u64;
                if let Some(left) = capacity_left
                    && total > left
                {
                    return Err(Error::new(
                        ErrorKind::Full,
                        format!(
                            "vault {} would exceed its capacity limit ({left} bytes left); nothing was recorded",
                            vault.root().display()
                        ),
                    ));
                }
                let sealed = writer.add(&blob)?;
                stored.store(total, Ordering::Relaxed);
                if let Some(p) = &opts.progress {
                    p.bytes_stored.store(total, Ordering::Relaxed);
                }
                if let Some(s) = sealed
                    && sealed_tx.send(s).is_err()
                {
                    break;
                }
            }
            if !upload_failed.load(Ordering::Relaxed)
                && let Some(s) = writer.seal()
            {
                let _ = sealed_tx.send(s);
            }
            Ok(())
        })();
        drop(sealed_tx);
        let mut published = Ok(());
        for p in publishers {
            let r = p
                .join()
                .map_err(|_| Error::new(ErrorKind::Io, "pack publisher thread panicked"))
                .and_then(|r| r);
            if published.is_ok() {
                published = r;
            }
        }
        written.and(published)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_chunks_covers_each_chunk_once() {
        let ext = [
            Extent {
                offset: 0,
                length: 10,
            },
            Extent {
                offset: 100,
                length: 200,
            },
            Extent {
                offset: 300,
                length: 1,
            },
            Extent {
                offset: 1000,
                length: 100,
            },
        ];
        let v: Vec<u64> = plan_chunks(&ext, 128, 1050).collect();
        assert_eq!(v, vec![0, 1, 2, 7, 8]);
    }

    #[test]
    fn plan_pages_lists_each_touched_page_once_in_order() {
        let per_page = 128 * PAGE_ENTRIES as u64;
        let ext = |offset, length| Extent { offset, length };
        let plan = [
            ext(0, 10),
            ext(per_page - 1, 2),
            ext(per_page + 5, 1),
            ext(5 * per_page, 0),
            ext(7 * per_page, 3 * per_page),
        ];
        assert_eq!(plan_pages(&plan, 128, 9 * per_page), vec![0, 1, 7, 8]);
    }
}
