//! Block sources: everything blockvault can read a virtual disk from.
//!
//! A [`BlockSource`] is a read-only view of one virtual disk: its size, random reads, and
//! its allocation map so that unallocated space is never read. Native formats: raw files
//! (holes via SEEK_DATA/SEEK_HOLE), qcow2 (imago; plain, compressed clusters, backing
//! chains) and VMDK (vmdk-core; monolithicSparse, streamOptimized, monolithicFlat,
//! twoGbMaxExtentSparse). Every other format QEMU reads is detected by its magic
//! (`detect`) and read through a private qemu-storage-daemon (`qemu`). [`open_source`]
//! detects the format, or takes a forced one from a `FORMAT:` prefix (never sniffed),
//! and holds QEMU's image locks on the file while it is read (`lock`). Each source says
//! which reader it is ([`BlockSource::reader`]) for the manifest.
//!
//! Sources never write into the image they read. They are not required to be `Send`
//! (imago's qcow2 driver is not): the backup pipeline reads on the thread that opened the
//! source and hands chunk buffers to worker threads. A source that is `Send` (NBD) says
//! so through [`BlockSource::as_send`], and the disks of a server are then read in
//! parallel, one thread each.

use crate::error::Result;

pub use crate::extent::{Extent, MAX_DISK_SIZE, push_extent};

/// Resolve `file` (a backing file, a parent or data file named inside an image), after
/// following symlinks, and refuse it (`Config`) unless it lies in `root`'s directory tree
/// (`root`: the canonical directory of the image the user named). An image must not make
/// us read an arbitrary host file such as `/etc/shadow` into a backup.
pub(crate) fn confine(
    root: &std::path::Path,
    image: &std::path::Path,
    what: &str,
    file: &std::path::Path,
) -> Result<std::path::PathBuf> {
    let canon = std::fs::canonicalize(file).map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound {
            crate::ErrorKind::NotFound
        } else {
            crate::ErrorKind::Io
        };
        crate::Error::new(
            kind,
            format!("{}: {what} {}", image.display(), file.display()),
        )
        .with_source(e)
    })?;
    if !canon.starts_with(root) {
        return Err(crate::Error::config(format!(
            "{}: {what} {} (resolved to {}) lies outside the image's directory tree {}; \
             refusing to read it. Keep the whole chain under {} (copy the file there and \
             `qemu-img rebase -u`)",
            image.display(),
            file.display(),
            canon.display(),
            root.display(),
            root.display()
        )));
    }
    Ok(canon)
}

/// The canonical directory of the image at `path`: the tree its backing and data files
/// must lie in.
pub(crate) fn image_root(path: &std::path::Path) -> Result<std::path::PathBuf> {
    let canon = std::fs::canonicalize(path)
        .map_err(|e| crate::Error::io(format!("resolving {}", path.display()), e))?;
    Ok(canon
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| std::path::PathBuf::from("/")))
}

/// Refuse a read that does not lie within a disk of `size` bytes.
pub(crate) fn check_read(
    what: &dyn std::fmt::Display,
    size: u64,
    offset: u64,
    len: usize,
) -> Result<()> {
    if offset.saturating_add(len as u64) > size {
        return Err(crate::Error::invalid(format!(
            "{what}: read of {len} bytes at {offset} past the disk end ({size} bytes)"
        )));
    }
    Ok(())
}

/// The on-disk format a source was opened as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    Raw,
    Qcow2,
    Vmdk,
    Nbd,
    /// Read through a private qemu-storage-daemon with this QEMU block driver.
    Qemu(&'static str),
}

impl SourceFormat {
    pub fn as_str(&self) -> &'static str {
        match self {
            SourceFormat::Raw => "raw",
            SourceFormat::Qcow2 => "qcow2",
            SourceFormat::Vmdk => "vmdk",
            SourceFormat::Nbd => "nbd",
            SourceFormat::Qemu(driver) => driver,
        }
    }
}

/// A read-only virtual disk.
pub trait BlockSource {
    /// Format the source was opened as.
    fn format(&self) -> SourceFormat;

    /// Which reader reads the disk, for the manifest: `raw`, `native-qcow2`,
    /// `native-vmdk`, `nbd`, `qemu-storage-daemon:<driver>`.
    fn reader(&self) -> String {
        match self.format() {
            SourceFormat::Raw => "raw".into(),
            SourceFormat::Qcow2 => "native-qcow2".into(),
            SourceFormat::Vmdk => "native-vmdk".into(),
            SourceFormat::Nbd => "nbd".into(),
            SourceFormat::Qemu(d) => format!("qemu-storage-daemon:{d}"),
        }
    }

    /// How an encrypted source was read ("encrypted source, decrypted with a user
    /// secret"); None for a plain one.
    fn encryption(&self) -> Option<String> {
        None
    }

    /// Why a copy of this source is not consistent (it was open for writing elsewhere
    /// and read with `--force-inconsistent`); None normally.
    fn inconsistent(&self) -> Option<String> {
        None
    }

    /// Human description (path or URI) for logs and manifests.
    fn describe(&self) -> String;

    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// Fill `buf` with the disk's bytes at `offset`. Unallocated ranges read as zeros.
    /// `offset + buf.len()` must not exceed [`size`](Self::size).
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// The allocated extents: sorted, non-overlapping, adjacent ones merged, clipped to
    /// the disk size. May over-approximate (say "allocated" for zeros), never
    /// under-approximate. For an image with a backing chain this covers every layer.
    fn allocated_extents(&mut self) -> Result<Vec<Extent>>;

    /// For an overlay (qcow2 with a backing file, VMDK delta disk): the image it is
    /// layered on. None for a self-contained disk.
    fn backing(&self) -> Option<std::path::PathBuf> {
        None
    }

    /// Extents allocated in this layer alone: for an overlay, exactly what changed since
    /// its base was taken. Defaults to the whole allocation map.
    fn top_layer_extents(&mut self) -> Result<Vec<Extent>> {
        self.allocated_extents()
    }

    /// True when each read has a round-trip cost (network), so that the pipeline should
    /// read runs of consecutive chunks with one request.
    fn prefers_large_reads(&self) -> bool {
        false
    }

    /// Extents a dirty bitmap marks as changed; None when the source has no bitmap.
    fn dirty_extents(&mut self) -> Option<Result<Vec<Extent>>> {
        None
    }

    /// A hint: the next reads will cover `ranges` (sorted, not overlapping), in order.
    /// A network source keeps requests in flight ahead of the reader across ranges, so
    /// that scattered chunks do not cost one round trip each. Reads elsewhere still work.
    fn will_read(&mut self, _ranges: &[Extent]) {}

    /// The task's cancel flag: a network source looks at it while it waits on its peer,
    /// so that a cancel is honoured within a fraction of a second even mid-request.
    fn set_cancel(&mut self, _cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>) {}

    /// This source as one that may be read on another thread, when it can be (so that
    /// the disks of a server are read in parallel). None by default (imago's qcow2
    /// driver is not `Send`).
    fn as_send(&mut self) -> Option<&mut (dyn BlockSource + Send)> {
        None
    }
}

pub mod detect;
pub mod lock;
mod locked;
mod nbd;
mod qcow2;
mod qemu;
mod raw;
mod vmdk;

pub use self::nbd::NbdSource;
pub use self::qcow2::Qcow2Source;
pub use self::qemu::{QemuImage, QemuSource};
pub use self::raw::RawSource;
pub use self::vmdk::VmdkSource;
mod open;

pub use self::open::{OpenOptions, open_source, open_source_opts, open_source_with, split_spec};

/// Open an image file read-only; a missing file is `NotFound` and names the path.
pub(crate) fn open_file(path: &std::path::Path) -> Result<std::fs::File> {
    std::fs::File::open(path).map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound {
            crate::ErrorKind::NotFound
        } else {
            crate::ErrorKind::Io
        };
        crate::Error::new(kind, format!("opening {}", path.display())).with_source(e)
    })
}
