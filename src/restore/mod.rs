//! Restore: a backup's disk index back into a new disk image.
//!
//! The caller thread walks the index page by page and hands every non-zero slot to a pool
//! of workers, which fetch the blob from its pack, decompress it and check its digest
//! (end-to-end integrity). The verified chunks come back to the caller thread, which
//! writes them through an [`ImageWriter`] (raw sparse file or qcow2 via imago; neither
//! needs to be `Send`). Zero chunks are never written: they stay holes.
//!
//! The output is written to a hidden staging file next to the target and renamed into
//! place only when every chunk has been verified and written and the file is synced; on
//! any failure (a corrupt chunk names its digest and disk offset) or cancel, the partial
//! output is removed. An existing target is never overwritten.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crossbeam_channel::{bounded, unbounded};

use crate::backup::{BackupOptions, Progress};
use crate::chunk::ChunkDigest;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::index::PAGE_ENTRIES;
use crate::manifest::DiskManifest;
use crate::vault::Vault;
use crate::vault::walk::{load_page, load_root};

mod deflate_pool;
pub mod onto;
pub mod server_image;
pub mod vmdk;
mod writers;

pub use vmdk::Subformat;
pub use writers::{ImageWriter, Qcow2Writer, RawWriter, VmdkImage};

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

/// Outcome of a restore.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RestoreStats {
    pub bytes_written: u64,
    pub chunks_written: u64,
    pub chunks_zero: u64,
}

/// Restore one disk of a backup into a new image at `to`.
///
/// `size` may grow the new disk beyond the backed-up size (never shrink it: that would
/// cut off data).
pub fn restore_disk(
    vault: &Vault,
    disk: &DiskManifest,
    to: &Path,
    format: ImageFormat,
    size: Option<u64>,
    opts: &BackupOptions,
) -> Result<RestoreStats> {
    let size = match size {
        None => disk.size,
        Some(s) if s < disk.size => {
            return Err(Error::config(format!(
                "--size {s} is smaller than the disk ({} bytes); a restore may grow a disk, never shrink it",
                disk.size
            )));
        }
        Some(s) => s,
    };
    if to.exists() {
        return Err(Error::conflict(format!(
            "{} already exists; restore never overwrites a file",
            to.display()
        )));
    }
    let staging = staging_path(to)?;
    let result = (|| {
        let mut writer: Box<dyn ImageWriter> = match format {
            ImageFormat::Raw => Box::new(RawWriter::create(&staging, size)?),
            ImageFormat::Qcow2 => Box::new(Qcow2Writer::create(&staging, size)?),
            ImageFormat::Vmdk(sub) => Box::new(VmdkImage::create(&staging, to, size, sub)?),
        };
        let stats = restore_into(vault, disk, writer.as_mut(), opts)?;
        writer.finish()?;
        drop(writer);
        fs::rename(&staging, to).ctx(|| format!("renaming restored image to {}", to.display()))?;
        Ok(stats)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&staging);
    }
    result
}

fn staging_path(to: &Path) -> Result<PathBuf> {
    let name = to
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::config(format!("bad restore target {}", to.display())))?;
    let dir = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(dir.join(format!(
        ".{name}.partial-{}",
        hex::encode(rand::random::<[u8; 4]>())
    )))
}

/// Fetch, verify and write every non-zero chunk of `disk` into `writer`, in ascending
/// disk order (workers fetch and decode in parallel; a bounded reorder window puts their
/// results back in order, so streaming formats such as VMDK streamOptimized can be
/// written front to back).
pub fn restore_into(
    vault: &Vault,
    disk: &DiskManifest,
    writer: &mut dyn ImageWriter,
    opts: &BackupOptions,
) -> Result<RestoreStats> {
    let lookup = vault.lookup()?;
    let root = load_root(vault, &lookup, disk)?;
    let cs = root.chunk_size.as_u64();
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };
    let window = threads * 8;
    let progress: Option<&Arc<Progress>> = opts.progress.as_ref();
    if let Some(p) = progress {
        p.bytes_total.store(disk.size, Ordering::Relaxed);
    }
    let (job_tx, job_rx) = bounded::<(u64, ChunkDigest)>(threads * 4);
    let (res_tx, res_rx) = unbounded::<Result<(u64, Vec<u8>)>>();
    let mut stats = RestoreStats::default();

    std::thread::scope(|scope| -> Result<RestoreStats> {
        for _ in 0..threads {
            let (job_rx, res_tx) = (job_rx.clone(), res_tx.clone());
            scope.spawn(move || {
                let lookup = match vault.lookup() {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = res_tx.send(Err(e));
                        return;
                    }
                };
                for (offset, digest) in job_rx {
                    let r = vault
                        .read_blob(&lookup, &digest)
                        .map(|(_, d)| (offset, d))
                        .map_err(|e| {
                            e.context_prefix(format!("chunk {digest} at disk offset {offset}"))
                        });
                    if res_tx.send(r).is_err() {
                        break;
                    }
                }
            });
        }
        drop((job_rx, res_tx));
        // Offsets sent, in order; results that arrived ahead of their turn.
        let mut order: VecDeque<u64> = VecDeque::new();
        let mut ready: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut take = |r: Result<(u64, Vec<u8>)>,
                        order: &mut VecDeque<u64>,
                        stats: &mut RestoreStats|
         -> Result<()> {
            let (offset, data) = r?;
            ready.insert(offset, data);
            while let Some(front) = order.front()
                && let Some(data) = ready.remove(front)
            {
                writer.write_at(&data, *front)?;
                order.pop_front();
                stats.bytes_written += data.len() as u64;
                stats.chunks_written += 1;
                if let Some(p) = progress {
                    p.bytes_done.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            Ok(())
        };
        let recv = |res_rx: &crossbeam_channel::Receiver<Result<(u64, Vec<u8>)>>| {
            res_rx
                .recv()
                .map_err(|_| Error::new(ErrorKind::Io, "restore workers stopped"))
        };
        let walk = (|| -> Result<()> {
            for p in 0..root.pages.len() {
                let entries = load_page(vault, &lookup, &root, p)?;
                for (slot, d) in entries.iter().enumerate() {
                    let offset = (p * PAGE_ENTRIES + slot) as u64 * cs;
                    if d.is_zero() {
                        stats.chunks_zero += 1;
                        continue;
                    }
                    if opts
                        .cancel
                        .as_ref()
                        .is_some_and(|c| c.load(Ordering::Relaxed))
                    {
                        return Err(Error::cancelled("restore cancelled"));
                    }
                    while order.len() >= window {
                        take(recv(&res_rx)?, &mut order, &mut stats)?;
                    }
                    job_tx
                        .send((offset, *d))
                        .map_err(|_| Error::new(ErrorKind::Io, "restore workers stopped"))?;
                    order.push_back(offset);
                    while let Ok(r) = res_rx.try_recv() {
                        take(r, &mut order, &mut stats)?;
                    }
                }
            }
            Ok(())
        })();
        drop(job_tx);
        walk?;
        while !order.is_empty() {
            take(recv(&res_rx)?, &mut order, &mut stats)?;
        }
        Ok(stats)
    })
}
