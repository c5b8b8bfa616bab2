//! Restore: a backup's disk index back into a new disk image.
//!
//! The caller thread walks the index page by page and hands the non-zero slots, in
//! batches of about 1 MiB, to a pool of workers (one per core), which fetch each blob
//! from its pack (locations looked up pack by pack, see `fetch`), decompress it with a
//! reused zstd context and check its digest (end-to-end integrity). A raw target is written by the workers themselves,
//! each chunk with `pwrite` at its offset ([`ImageWriter::concurrent`]): no reordering
//! stage, no copy back to the caller. Other formats (qcow2 via imago, VMDK; neither is
//! `Send`) get the verified chunks back on the caller thread, put in disk order by a
//! bounded window. Zero chunks are never written: they stay holes.
//!
//! The output is written to a hidden staging file next to the target (named after its
//! owner, see [`partial`]; created `0600`, given the requested mode at the end) and
//! renamed into place only when every chunk has been verified and written and the file
//! is synced; on any failure (a corrupt chunk names its digest and disk offset) or
//! cancel, the partial output is removed, and partials of restores that were killed are
//! swept at the next restore into the directory. An existing target is never
//! overwritten.
//!
//! With [`RestoreOptions::keep_going`] an unreadable chunk (corrupt, missing pack, I/O
//! error on the vault) or index page does not stop the restore: its disk range stays
//! zeros, is listed in [`RestoreStats::bad_ranges`], and the image is kept (the caller
//! reports failure, like ddrescue). Failures to *write* the target always stop it.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crossbeam_channel::{bounded, unbounded};

use crate::backup::{BackupOptions, Progress};
use crate::chunk::ChunkDigest;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::index::PAGE_ENTRIES;
use crate::manifest::DiskManifest;
use crate::vault::Vault;
use crate::vault::walk::{PageReader, load_root};

mod deflate_pool;
mod fetch;
pub mod onto;
mod ovf;
pub mod partial;
pub mod server_image;
pub mod vmdk;
mod writers;

pub use vmdk::Subformat;
pub use writers::{
    ConcurrentWriter, ImageWriter, Qcow2Writer, RawWriter, VmdkImage, create_private,
};

/// Output image format of a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
    /// VMDK monolithicSparse (`vmdk`, `vmdk-sparse`) or streamOptimized (`vmdk-stream`,
    /// what OVA/ESXi import takes).
    Vmdk(Subformat),
}

impl ImageFormat {
    /// File name extension for images of this format.
    pub fn extension(&self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk(_) => "vmdk",
        }
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<ImageFormat> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            "vmdk" | "vmdk-sparse" => Ok(ImageFormat::Vmdk(Subformat::MonolithicSparse)),
            "vmdk-stream" => Ok(ImageFormat::Vmdk(Subformat::StreamOptimized)),
            other => Err(Error::config(format!(
                "unknown image format {other:?} (raw, qcow2, vmdk, vmdk-sparse or vmdk-stream)"
            ))),
        }
    }
}

/// A disk or server name as a file name (node names may hold characters paths must
/// not; never empty, never hidden).
pub fn safe_file_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches('.');
    if s.is_empty() {
        "disk".into()
    } else {
        s.into()
    }
}

/// How to restore (beyond what and where).
#[derive(Debug, Clone, Copy)]
pub struct RestoreOptions {
    /// Permission bits of the restored images and exported files (default `0o600`: a
    /// disk image holds the guest's secrets). Directories a restore creates are `0700`.
    pub mode: u32,
    /// Write everything readable, leave unreadable chunks as zeros and list them, keep
    /// the image (the caller must still report failure).
    pub keep_going: bool,
    /// Size of the new disk: may grow it beyond the backed-up size, never shrink it
    /// (that would cut off data). `None`: the backed-up size.
    pub size: Option<u64>,
    /// Replace an existing regular file at the target (raw and qcow2 only): staged
    /// beside it, renamed over it at the end.
    pub overwrite: bool,
}

impl Default for RestoreOptions {
    fn default() -> RestoreOptions {
        RestoreOptions {
            mode: DEFAULT_MODE,
            keep_going: false,
            size: None,
            overwrite: false,
        }
    }
}

/// Default permission bits of restored images.
pub const DEFAULT_MODE: u32 = 0o600;

/// Parse an octal permission mode such as `0600` or `640` (permission bits only).
pub fn parse_mode(s: &str) -> Result<u32> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err(Error::config(format!(
            "mode {s:?} must be octal permission bits such as 0600 or 0640"
        ))),
    }
}

/// A disk range a `--keep-going` restore could not read (left as zeros).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BadRange {
    pub offset: u64,
    pub length: u64,
    /// Why (the first error of the range).
    pub error: String,
}

/// Outcome of a restore.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreStats {
    pub bytes_written: u64,
    pub chunks_written: u64,
    pub chunks_zero: u64,
    /// Chunks left as zeros because they could not be read (`keep_going` only).
    pub chunks_unreadable: u64,
    /// Their disk ranges, ascending, adjacent ones merged.
    pub bad_ranges: Vec<BadRange>,
}

impl RestoreStats {
    /// Whether the image is complete (nothing was left unreadable).
    pub fn is_complete(&self) -> bool {
        self.bad_ranges.is_empty()
    }
}

/// Restore one disk of a backup into a new image at `to` with default options (mode
/// `0600`, stop at the first unreadable chunk).
pub fn restore_disk(
    vault: &Vault,
    disk: &DiskManifest,
    to: &Path,
    format: ImageFormat,
    size: Option<u64>,
    opts: &BackupOptions,
) -> Result<RestoreStats> {
    let ropts = RestoreOptions {
        size,
        ..RestoreOptions::default()
    };
    restore_disk_with(vault, disk, to, format, opts, &ropts)
}

/// Restore one disk of a backup into a new image at `to`.
pub fn restore_disk_with(
    vault: &Vault,
    disk: &DiskManifest,
    to: &Path,
    format: ImageFormat,
    opts: &BackupOptions,
    ropts: &RestoreOptions,
) -> Result<RestoreStats> {
    let size = match ropts.size {
        None => disk.size,
        Some(s) if s < disk.size => {
            return Err(Error::config(format!(
                "--size {s} is smaller than the disk ({} bytes); a restore may grow a disk, never shrink it",
                disk.size
            )));
        }
        Some(s) => s,
    };
    match fs::symlink_metadata(to) {
        Err(_) => {}
        Ok(m) if ropts.overwrite && m.file_type().is_file() => {
            if matches!(format, ImageFormat::Vmdk(_)) {
                return Err(Error::conflict(format!(
                    "{} already exists; overwrite replaces raw and qcow2 images only (a VMDK may be several files)",
                    to.display()
                )));
            }
        }
        Ok(m) if ropts.overwrite => {
            return Err(Error::conflict(format!(
                "{} exists and is not a regular file ({:?}); overwrite replaces only a regular file, never a link or directory",
                to.display(),
                m.file_type()
            )));
        }
        Ok(_) => {
            return Err(Error::conflict(format!(
                "{} already exists; restore never overwrites a file unless asked to (--overwrite)",
                to.display()
            )));
        }
    }
    partial::sweep_dir(&partial::parent_dir(to))?;
    let staging = partial::staging_path(to)?;
    let result = (|| {
        let mut writer: Box<dyn ImageWriter> = match format {
            ImageFormat::Raw => Box::new(RawWriter::create(&staging, size)?),
            ImageFormat::Qcow2 => Box::new(Qcow2Writer::create(&staging, size)?),
            ImageFormat::Vmdk(sub) => Box::new(VmdkImage::create(&staging, to, size, sub)?),
        };
        let stats = restore_into(vault, disk, writer.as_mut(), opts, ropts.keep_going)?;
        writer.finish()?;
        drop(writer);
        fs::set_permissions(&staging, fs::Permissions::from_mode(ropts.mode))
            .ctx(|| format!("setting the mode of {}", staging.display()))?;
        if ropts.overwrite {
            // rename(2) replaces the directory entry itself: a link put at `to`
            // meanwhile is replaced, never written through.
            fs::rename(&staging, to)
                .ctx(|| format!("renaming {} over {}", staging.display(), to.display()))?;
        } else {
            partial::rename_noreplace(&staging, to)?;
        }
        Ok(stats)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&staging);
    }
    result
}

/// Bytes of chunks handed to a worker at once (fewer channel round trips): 16 chunks
/// of 64 KiB, one of 1 MiB or more.
const BATCH_BYTES: u64 = 1 << 20;
/// Bytes of chunks in flight at most (sent to workers and not yet written): bounds the
/// reorder window of ordered writers, and so memory, whatever the chunk size.
const WINDOW_BYTES: u64 = 16 << 20;

/// A worker's report.
enum Msg {
    /// One chunk's verified plaintext, for the caller thread to write (ordered writers).
    Data(u64, Vec<u8>),
    /// A batch written by the worker itself (concurrent writers): chunks and bytes.
    Written { chunks: u64, bytes: u64 },
    /// The chunk at this disk offset could not be read.
    Unreadable(u64, Error),
    /// A failure that stops the restore whatever `keep_going` says (writing the target,
    /// opening the lookup index).
    Fatal(Error),
}

/// A worker: fetch and verify every chunk of each batch; write it itself when the
/// target takes concurrent writes, else hand it back.
fn restore_worker(
    vault: &Vault,
    jobs: crossbeam_channel::Receiver<Vec<(u64, ChunkDigest)>>,
    results: crossbeam_channel::Sender<Msg>,
    shared: Option<Arc<dyn ConcurrentWriter>>,
) {
    let mut fetcher = match fetch::Fetcher::new(vault) {
        Ok(f) => f,
        Err(e) => {
            let _ = results.send(Msg::Fatal(e));
            return;
        }
    };
    for batch in jobs {
        let (mut chunks, mut bytes) = (0, 0);
        fetcher.expect(batch.iter().map(|(_, d)| d));
        for (offset, digest) in batch {
            let done = fetcher.fetch(&digest, |data| match &shared {
                None => Some(Msg::Data(offset, data.to_vec())),
                Some(w) => match w.write_shared(data, offset) {
                    Ok(()) => {
                        chunks += 1;
                        bytes += data.len() as u64;
                        None
                    }
                    Err(e) => Some(Msg::Fatal(e)),
                },
            });
            let msg = match done {
                Err(e) => Msg::Unreadable(
                    offset,
                    e.context_prefix(format!("chunk {digest} at disk offset {offset}")),
                ),
                Ok(None) => continue,
                Ok(Some(msg)) => msg,
            };
            if results.send(msg).is_err() {
                return;
            }
        }
        if chunks > 0 && results.send(Msg::Written { chunks, bytes }).is_err() {
            return;
        }
    }
}

/// Fetch, verify and write every non-zero chunk of `disk` into `writer`. A writer
/// without [`ImageWriter::concurrent`] gets the chunks in ascending disk order (workers
/// fetch and decode in parallel; a bounded reorder window puts their results back in
/// order, so streaming formats such as VMDK streamOptimized can be written front to
/// back). With `keep_going`, unreadable chunks and index pages are listed in
/// [`RestoreStats::bad_ranges`] instead of failing the restore.
pub fn restore_into(
    vault: &Vault,
    disk: &DiskManifest,
    writer: &mut dyn ImageWriter,
    opts: &BackupOptions,
    keep_going: bool,
) -> Result<RestoreStats> {
    let lookup = vault.lookup()?;
    let root = load_root(vault, &lookup, disk)?;
    let cs = root.chunk_size.as_u64();
    let mut threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };
    let mut batch_len = (BATCH_BYTES / cs).clamp(1, 16) as usize;
    // Chunks in flight (sent, not yet accounted for): bounds memory.
    let mut window = ((WINDOW_BYTES / cs) as usize).max(2 * batch_len);
    if vault.is_shared_store() {
        // Object storage: each worker reads its batch with one ranged GET of about
        // READ_AHEAD bytes (see `fetch`), and at least GETS_IN_FLIGHT workers wait on
        // the network at once, ahead of the writer. In flight at most: threads + 1
        // batches of chunks, plus one window of stored bytes per worker.
        batch_len = (fetch::READ_AHEAD / cs).clamp(1, 128) as usize;
        threads = threads.max(fetch::GETS_IN_FLIGHT);
        window = window.max((threads + 1) * batch_len);
    }
    let progress: Option<&Arc<Progress>> = opts.progress.as_ref();
    if let Some(p) = progress {
        p.bytes_total.store(disk.size, Ordering::Relaxed);
    }
    let (job_tx, job_rx) = bounded::<Vec<(u64, ChunkDigest)>>(threads * 2);
    let (res_tx, res_rx) = unbounded::<Msg>();
    let shared = writer.concurrent();
    let mut state = Accounting {
        writer,
        ordered: shared.is_none(),
        keep_going,
        disk_size: disk.size,
        cs,
        progress,
        in_flight: 0,
        order: VecDeque::new(),
        ready: BTreeMap::new(),
        stats: RestoreStats::default(),
        bad: Vec::new(),
    };

    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..threads {
            let (jobs, results, shared) = (job_rx.clone(), res_tx.clone(), shared.clone());
            scope.spawn(move || restore_worker(vault, jobs, results, shared));
        }
        drop((job_rx, res_tx, shared));
        let recv = |res_rx: &crossbeam_channel::Receiver<Msg>| {
            res_rx
                .recv()
                .map_err(|_| Error::new(ErrorKind::Io, "restore workers stopped"))
        };
        let stopped = || Error::new(ErrorKind::Io, "restore workers stopped");
        let walk = (|| -> Result<()> {
            let mut batch = Vec::with_capacity(batch_len);
            let mut pages = PageReader::all(vault, &lookup, &root);
            for p in 0..root.pages.len() {
                let entries = match pages.page(p) {
                    Ok(e) => e,
                    Err(e) if keep_going => {
                        let offset = (p * PAGE_ENTRIES) as u64 * cs;
                        let length =
                            (root.page_len(p) as u64 * cs).min(disk.size.saturating_sub(offset));
                        tracing::warn!("{e}; its disk range is left as zeros (--keep-going)");
                        state.bad.push((offset, length, e.to_string()));
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                for (slot, d) in entries.iter().enumerate() {
                    let offset = (p * PAGE_ENTRIES + slot) as u64 * cs;
                    if d.is_zero() {
                        state.stats.chunks_zero += 1;
                        continue;
                    }
                    batch.push((offset, *d));
                    if batch.len() < batch_len {
                        continue;
                    }
                    if opts
                        .cancel
                        .as_ref()
                        .is_some_and(|c| c.load(Ordering::Relaxed))
                    {
                        return Err(Error::cancelled("restore cancelled"));
                    }
                    while state.in_flight + batch_len > window {
                        state.take(recv(&res_rx)?)?;
                    }
                    state.sent(&batch);
                    job_tx
                        .send(std::mem::replace(&mut batch, Vec::with_capacity(batch_len)))
                        .map_err(|_| stopped())?;
                    while let Ok(m) = res_rx.try_recv() {
                        state.take(m)?;
                    }
                }
            }
            if !batch.is_empty() {
                state.sent(&batch);
                job_tx.send(batch).map_err(|_| stopped())?;
            }
            Ok(())
        })();
        drop(job_tx);
        walk?;
        while state.in_flight > 0 {
            state.take(recv(&res_rx)?)?;
        }
        Ok(())
    })?;
    let mut stats = state.stats;
    stats.bad_ranges = merge_ranges(state.bad);
    Ok(stats)
}

/// The caller thread's side of a restore: what is in flight, the reorder window of
/// ordered writers, the outcome.
struct Accounting<'w, 'p> {
    writer: &'w mut dyn ImageWriter,
    ordered: bool,
    keep_going: bool,
    disk_size: u64,
    cs: u64,
    progress: Option<&'p Arc<Progress>>,
    in_flight: usize,
    /// Ordered writers: offsets sent and not yet written, ascending.
    order: VecDeque<u64>,
    /// Ordered writers: results that arrived ahead of their turn (`None`: unreadable).
    ready: BTreeMap<u64, Option<Vec<u8>>>,
    stats: RestoreStats,
    bad: Vec<(u64, u64, String)>,
}

impl Accounting<'_, '_> {
    fn sent(&mut self, batch: &[(u64, ChunkDigest)]) {
        self.in_flight += batch.len();
        if self.ordered {
            self.order.extend(batch.iter().map(|(o, _)| *o));
        }
    }

    fn take(&mut self, m: Msg) -> Result<()> {
        match m {
            Msg::Fatal(e) => Err(e),
            Msg::Written { chunks, bytes } => {
                self.in_flight -= chunks as usize;
                self.count(chunks, bytes);
                Ok(())
            }
            Msg::Unreadable(offset, e) => {
                if !self.keep_going {
                    return Err(e);
                }
                tracing::warn!("{e}; left as zeros (--keep-going)");
                self.stats.chunks_unreadable += 1;
                let len = self.cs.min(self.disk_size.saturating_sub(offset));
                self.bad.push((offset, len, e.to_string()));
                if self.ordered {
                    self.ready.insert(offset, None);
                    self.drain()
                } else {
                    self.in_flight -= 1;
                    Ok(())
                }
            }
            Msg::Data(offset, data) => {
                self.ready.insert(offset, Some(data));
                self.drain()
            }
        }
    }

    /// Write the results that are next in disk order.
    fn drain(&mut self) -> Result<()> {
        while let Some(front) = self.order.front()
            && let Some(r) = self.ready.remove(front)
        {
            if let Some(data) = r {
                self.writer.write_at(&data, *front)?;
                self.count(1, data.len() as u64);
            }
            self.order.pop_front();
            self.in_flight -= 1;
        }
        Ok(())
    }

    fn count(&mut self, chunks: u64, bytes: u64) {
        self.stats.chunks_written += chunks;
        self.stats.bytes_written += bytes;
        if let Some(p) = self.progress {
            p.bytes_done.fetch_add(bytes, Ordering::Relaxed);
        }
    }
}

/// Sort bad ranges and merge adjacent ones (keeping the first error).
fn merge_ranges(mut bad: Vec<(u64, u64, String)>) -> Vec<BadRange> {
    bad.sort_by_key(|b| b.0);
    let mut out: Vec<BadRange> = Vec::new();
    for (offset, length, error) in bad {
        if let Some(last) = out.last_mut()
            && last.offset + last.length == offset
        {
            last.length += length;
            continue;
        }
        out.push(BadRange {
            offset,
            length,
            error,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_bad_chunks_merge_into_one_range() {
        let r = merge_ranges(vec![
            (131072, 65536, "b".into()),
            (0, 65536, "a".into()),
            (65536, 65536, "c".into()),
            (1 << 20, 100, "d".into()),
        ]);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].offset, r[0].length, r[0].error.as_str()),
            (0, 196608, "a")
        );
        assert_eq!((r[1].offset, r[1].length), (1 << 20, 100));
    }

    #[test]
    fn modes_are_octal_permission_bits() {
        assert_eq!(parse_mode("0600").unwrap(), 0o600);
        assert_eq!(parse_mode("640").unwrap(), 0o640);
        assert!(parse_mode("0800").is_err());
        assert!(parse_mode("1777").is_err());
        assert!(parse_mode("").is_err());
    }
}
