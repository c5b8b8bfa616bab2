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

/// A byte range of the virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

impl Extent {
    /// `[offset, offset + length)`, refused (`InvalidFormat`) when the end overflows u64.
    pub fn new(offset: u64, length: u64) -> Result<Extent> {
        let e = Extent { offset, length };
        e.checked_end()?;
        Ok(e)
    }

    /// The first byte after the extent. Saturates at `u64::MAX` for an extent whose end
    /// overflows: input from outside is checked with [`checked_end`](Self::checked_end)
    /// or [`check_within`](Self::check_within) where it enters.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }

    /// The first byte after the extent; an overflowing end is refused.
    pub fn checked_end(&self) -> Result<u64> {
        self.offset.checked_add(self.length).ok_or_else(|| {
            crate::Error::invalid(format!(
                "extent of {} bytes at offset {} ends past 2^64",
                self.length, self.offset
            ))
        })
    }

    /// Refuse an extent that overflows or ends past a disk of `size` bytes.
    pub fn check_within(&self, size: u64) -> Result<()> {
        if self.checked_end()? > size {
            return Err(crate::Error::invalid(format!(
                "extent {}+{} (bytes {}..{}) lies past the disk end ({size} bytes)",
                self.offset,
                self.length,
                self.offset,
                self.end()
            )));
        }
        Ok(())
    }
}

/// Append `[offset, offset + length)` to a sorted extent list, merging it with the last
/// extent when they touch or overlap. Every source builds its allocation map with this.
/// An end past 2^64 saturates; callers check untrusted extents before (see [`Extent`]).
pub fn push_extent(out: &mut Vec<Extent>, offset: u64, length: u64) {
    if length == 0 {
        return;
    }
    let new_end = offset.saturating_add(length);
    let length = new_end - offset;
    match out.last_mut() {
        Some(last) if last.end() >= offset => {
            let end = last.end().max(new_end);
            last.length = end - last.offset;
        }
        _ => out.push(Extent { offset, length }),
    }
}

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

/// The largest virtual disk we accept (64 TiB). A larger size in a header is treated as
/// hostile or broken input: it would make the disk index itself huge.
pub const MAX_DISK_SIZE: u64 = 64 << 40;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_that_overflow_or_pass_the_end_are_refused() {
        assert!(Extent::new(u64::MAX, 1).is_err());
        assert_eq!(Extent::new(u64::MAX - 1, 1).unwrap().end(), u64::MAX);
        let e = Extent {
            offset: u64::MAX,
            length: 2,
        };
        assert_eq!(e.end(), u64::MAX, "end saturates instead of wrapping");
        assert_eq!(
            e.checked_end().unwrap_err().kind(),
            crate::ErrorKind::InvalidFormat
        );
        assert!(e.check_within(u64::MAX).is_err());
        let e = Extent::new(4096, 4096).unwrap();
        e.check_within(8192).unwrap();
        assert!(e.check_within(8191).is_err());
        let mut out = Vec::new();
        push_extent(&mut out, 0, 10);
        push_extent(&mut out, u64::MAX - 5, 100);
        assert_eq!(out.last().unwrap().end(), u64::MAX);
    }
}
