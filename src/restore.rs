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

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
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

/// Output image format of a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// File name extension for images of this format.
    pub fn extension(&self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<ImageFormat> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(Error::config(format!(
                "unknown image format {other:?} (raw or qcow2)"
            ))),
        }
    }
}

/// Where restored chunks go.
pub trait ImageWriter {
    /// Write `data` at disk `offset`.
    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()>;
    /// Flush and make durable.
    fn finish(&mut self) -> Result<()>;
}

/// A sparse raw file. A helper thread flushes written data to disk while restoring goes
/// on (every [`RawWriter::FLUSH_EVERY`] bytes), so the final sync does not have to write the
/// whole image at the end: restore time approaches max(decode, disk write) instead of the
/// sum of the two.
pub struct RawWriter {
    file: Arc<File>,
    unflushed: u64,
    flusher: Option<(
        crossbeam_channel::Sender<()>,
        std::thread::JoinHandle<std::io::Result<()>>,
    )>,
}

impl RawWriter {
    const FLUSH_EVERY: u64 = 64 << 20;

    pub fn create(path: &Path, size: u64) -> Result<RawWriter> {
        let file = File::create_new(path).ctx(|| format!("creating {}", path.display()))?;
        file.set_len(size)
            .ctx(|| format!("sizing {} to {size} bytes", path.display()))?;
        let file = Arc::new(file);
        let (tx, rx) = bounded::<()>(1);
        let f = Arc::clone(&file);
        let handle = std::thread::spawn(move || {
            for () in rx {
                f.sync_data()?;
            }
            Ok(())
        });
        Ok(RawWriter {
            file,
            unflushed: 0,
            flusher: Some((tx, handle)),
        })
    }
}

impl ImageWriter for RawWriter {
    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(data, offset)
            .ctx(|| format!("writing restored data at offset {offset}"))?;
        self.unflushed += data.len() as u64;
        if self.unflushed >= Self::FLUSH_EVERY
            && let Some((tx, _)) = &self.flusher
        {
            // If the flusher is still busy, keep counting and ask again later.
            if tx.try_send(()).is_ok() {
                self.unflushed = 0;
            }
        }
        Ok(())
    }
    fn finish(&mut self) -> Result<()> {
        if let Some((tx, handle)) = self.flusher.take() {
            drop(tx);
            handle
                .join()
                .map_err(|_| Error::new(ErrorKind::Io, "flusher thread panicked"))?
                .ctx(|| "syncing restored image")?;
        }
        self.file.sync_all().ctx(|| "syncing restored image")
    }
}

/// A new qcow2 image written with imago (thin: only written clusters are allocated).
pub struct Qcow2Writer {
    image: imago::FormatAccess<imago::file::File>,
}

impl Qcow2Writer {
    pub fn create(path: &Path, size: u64) -> Result<Qcow2Writer> {
        use imago::{
            FormatCreateBuilder, FormatDriverBuilder, PermissiveImplicitOpenGate, Storage,
            StorageCreateOptions,
        };
        let io_err =
            |e: std::io::Error| Error::io(format!("creating qcow2 image {}", path.display()), e);
        let storage = imago::file::File::create_open(
            StorageCreateOptions::new().filename(path.to_string_lossy().to_string()),
        )
        .map_err(io_err)?;
        let qcow2 = imago::qcow2::Qcow2::<imago::file::File>::create_builder(storage)
            .size(size)
            .create_open(PermissiveImplicitOpenGate::default(), |s| {
                Ok(imago::qcow2::Qcow2::builder(s).write(true))
            })
            .map_err(io_err)?;
        Ok(Qcow2Writer {
            image: imago::FormatAccess::new(qcow2),
        })
    }
}

impl ImageWriter for Qcow2Writer {
    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        self.image
            .write(data, offset)
            .ctx(|| format!("writing restored data at offset {offset} (qcow2)"))
    }
    fn finish(&mut self) -> Result<()> {
        self.image.flush().ctx(|| "flushing qcow2 image")?;
        self.image.sync().ctx(|| "syncing qcow2 image")
    }
}

/// Outcome of a restore.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreStats {
    pub bytes_written: u64,
    pub chunks_written: u64,
    pub chunks_zero: u64,
}

/// Restore one disk of a backup into a new image at `to`.
pub fn restore_disk(
    vault: &Vault,
    disk: &DiskManifest,
    to: &Path,
    format: ImageFormat,
    opts: &BackupOptions,
) -> Result<RestoreStats> {
    if to.exists() {
        return Err(Error::conflict(format!(
            "{} already exists; restore never overwrites a file",
            to.display()
        )));
    }
    let staging = staging_path(to)?;
    let result = (|| {
        let mut writer: Box<dyn ImageWriter> = match format {
            ImageFormat::Raw => Box::new(RawWriter::create(&staging, disk.size)?),
            ImageFormat::Qcow2 => Box::new(Qcow2Writer::create(&staging, disk.size)?),
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

/// Fetch, verify and write every non-zero chunk of `disk` into `writer`.
pub fn restore_into(
    vault: &Vault,
    disk: &DiskManifest,
    writer: &mut dyn ImageWriter,
    opts: &BackupOptions,
) -> Result<RestoreStats> {
    let lookup = vault.lookup_reconciled()?;
    let root = load_root(vault, &lookup, disk)?;
    let cs = root.chunk_size.as_u64();
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };
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
        let mut write = |r: Result<(u64, Vec<u8>)>, stats: &mut RestoreStats| -> Result<()> {
            let (offset, data) = r?;
            writer.write_at(&data, offset)?;
            stats.bytes_written += data.len() as u64;
            stats.chunks_written += 1;
            if let Some(p) = progress {
                p.bytes_done.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            Ok(())
        };
        let mut sent = 0u64;
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
                    job_tx
                        .send((offset, *d))
                        .map_err(|_| Error::new(ErrorKind::Io, "restore workers stopped"))?;
                    sent += 1;
                    while let Ok(r) = res_rx.try_recv() {
                        write(r, &mut stats)?;
                    }
                }
            }
            Ok(())
        })();
        drop(job_tx);
        walk?;
        while stats.chunks_written < sent {
            let r = res_rx
                .recv()
                .map_err(|_| Error::new(ErrorKind::Io, "restore workers stopped"))?;
            write(r, &mut stats)?;
        }
        Ok(stats)
    })
}
