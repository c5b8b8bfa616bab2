//! Image writers: where restored chunks go (a new raw, qcow2 or VMDK image).
//!
//! Writers receive chunks in ascending disk offsets (restore delivers them in order), and
//! never receive zero chunks: what is not written reads as zeros, so raw output stays
//! sparse and qcow2/VMDK output stays thin. A writer whose target takes writes at any
//! offset from any thread (raw) offers a [`ConcurrentWriter`] instead, and the restore
//! workers write into it directly. Every file is created `0600` ([`create_private`]).

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::bounded;

use crate::error::{Error, ErrorKind, IoContext, Result};

/// Where restored chunks go.
pub trait ImageWriter {
    /// Write `data` at disk `offset`.
    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()>;
    /// Flush and make durable.
    fn finish(&mut self) -> Result<()>;
    /// A handle that takes writes at any offset, in any order, from many threads at
    /// once; `None` (the default) when chunks must come in order on one thread.
    fn concurrent(&self) -> Option<Arc<dyn ConcurrentWriter>> {
        None
    }
}

/// A target written by many threads at once, each chunk at its own offset.
pub trait ConcurrentWriter: Send + Sync {
    /// Write `data` at disk `offset`.
    fn write_shared(&self, data: &[u8], offset: u64) -> Result<()>;
}

/// Create a new file (never an existing one) readable and writable by its owner only:
/// a partial disk image is as secret as the finished one.
pub fn create_private(path: &Path) -> Result<File> {
    File::options()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .ctx(|| format!("creating {}", path.display()))
}

/// A sparse raw file, written at chunk offsets by the restore workers themselves. A
/// helper thread flushes written data to disk while restoring goes on (every
/// [`RawWriter::FLUSH_EVERY`] bytes), so the final sync does not have to write the whole
/// image at the end: restore time approaches max(decode, disk write) instead of the sum
/// of the two.
pub struct RawWriter {
    shared: Arc<RawShared>,
    flusher: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

struct RawShared {
    file: Arc<File>,
    unflushed: AtomicU64,
    /// Wakes the flusher; taken (closing the channel) by `finish`.
    flush: Mutex<Option<crossbeam_channel::Sender<()>>>,
}

impl RawWriter {
    const FLUSH_EVERY: u64 = 64 << 20;

    pub fn create(path: &Path, size: u64) -> Result<RawWriter> {
        let file = create_private(path)?;
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
            shared: Arc::new(RawShared {
                file,
                unflushed: AtomicU64::new(0),
                flush: Mutex::new(Some(tx)),
            }),
            flusher: Some(handle),
        })
    }
}

impl ConcurrentWriter for RawShared {
    fn write_shared(&self, data: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(data, offset)
            .ctx(|| format!("writing restored data at offset {offset}"))?;
        let n = data.len() as u64;
        if self.unflushed.fetch_add(n, Ordering::Relaxed) + n >= RawWriter::FLUSH_EVERY {
            let flush = self.flush.lock().unwrap_or_else(|p| p.into_inner());
            // If the flusher is still busy, keep counting and ask again later.
            if let Some(tx) = flush.as_ref()
                && tx.try_send(()).is_ok()
            {
                self.unflushed.store(0, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

impl ImageWriter for RawWriter {
    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        self.shared.write_shared(data, offset)
    }
    fn finish(&mut self) -> Result<()> {
        drop(
            self.shared
                .flush
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        if let Some(handle) = self.flusher.take() {
            handle
                .join()
                .map_err(|_| Error::new(ErrorKind::Io, "flusher thread panicked"))?
                .ctx(|| "syncing restored image")?;
        }
        self.shared.file.sync_all().ctx(|| "syncing restored image")
    }
    fn concurrent(&self) -> Option<Arc<dyn ConcurrentWriter>> {
        Some(Arc::clone(&self.shared) as Arc<dyn ConcurrentWriter>)
    }
}

impl Drop for RawWriter {
    fn drop(&mut self) {
        // Let the flusher end (on error paths `finish` was not called).
        drop(
            self.shared
                .flush
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
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
        // Created 0600 here first; imago then opens (and truncates) it.
        drop(create_private(path)?);
        let storage = imago::file::File::create_open(
            StorageCreateOptions::new()
                .filename(path.to_string_lossy().to_string())
                .overwrite(true),
        )
        .map_err(io_err)?;
        // qcow2 sizes are whole sectors (imago would round down and cut off the tail):
        // round up like qemu-img; the tail reads as zeros.
        let qcow2 = imago::qcow2::Qcow2::<imago::file::File>::create_builder(storage)
            .size(size.checked_next_multiple_of(512).unwrap_or(size))
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

/// A new VMDK image (see [`super::vmdk`]).
pub struct VmdkImage {
    inner: Option<super::vmdk::VmdkWriter>,
    path: std::path::PathBuf,
}

impl VmdkImage {
    /// Create at `path` an image that will be known as `final_name` (its descriptor's
    /// extent line names the file).
    pub fn create(
        path: &Path,
        final_name: &Path,
        size: u64,
        sub: super::vmdk::Subformat,
    ) -> Result<VmdkImage> {
        let file = create_private(path)?;
        let info = super::vmdk::DescriptorInfo {
            extent_name: final_name
                .file_name()
                .map_or_else(|| "disk.vmdk".into(), |n| n.to_string_lossy().into_owned()),
            ..Default::default()
        };
        let w = super::vmdk::VmdkWriter::create(file, size, sub, info)
            .ctx(|| format!("creating VMDK image {}", path.display()))?;
        Ok(VmdkImage {
            inner: Some(w),
            path: path.to_path_buf(),
        })
    }
}

impl ImageWriter for VmdkImage {
    fn write_at(&mut self, data: &[u8], offset: u64) -> Result<()> {
        match &mut self.inner {
            Some(w) => w
                .write_at(data, offset)
                .ctx(|| format!("writing VMDK data at offset {offset}")),
            None => Err(Error::new(ErrorKind::Io, "VMDK image already finished")),
        }
    }
    fn finish(&mut self) -> Result<()> {
        if let Some(w) = self.inner.take() {
            w.finish()
                .ctx(|| format!("finishing VMDK image {}", self.path.display()))?;
        }
        Ok(())
    }
}
