//! Image writers: where restored chunks go (a new raw, qcow2 or VMDK image).
//!
//! Writers receive chunks in ascending disk offsets (restore delivers them in order), and
//! never receive zero chunks: what is not written reads as zeros, so raw output stays
//! sparse and qcow2/VMDK output stays thin.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crossbeam_channel::bounded;

use crate::error::{Error, ErrorKind, IoContext, Result};

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
        let file = File::create_new(path).ctx(|| format!("creating {}", path.display()))?;
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
