//! Block sources: everything blockvault can read a virtual disk from.
//!
//! A [`BlockSource`] is a read-only view of one virtual disk: its size, random reads, and
//! its allocation map so that unallocated space is never read. Formats: raw files (holes
//! via SEEK_DATA/SEEK_HOLE), qcow2 (imago; plain, compressed clusters, backing chains) and
//! VMDK (vmdk-core; monolithicSparse, streamOptimized, monolithicFlat,
//! twoGbMaxExtentSparse). [`open_source`] sniffs the format from the magic bytes, or takes
//! a forced one from a `raw:`/`qcow2:`/`vmdk:` prefix.
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
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Append `[offset, offset + length)` to a sorted extent list, merging it with the last
/// extent when they touch or overlap. Every source builds its allocation map with this.
pub fn push_extent(out: &mut Vec<Extent>, offset: u64, length: u64) {
    if length == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.end() >= offset => {
            let end = last.end().max(offset + length);
            last.length = end - last.offset;
        }
        _ => out.push(Extent { offset, length }),
    }
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
}

impl SourceFormat {
    pub fn as_str(&self) -> &'static str {
        match self {
            SourceFormat::Raw => "raw",
            SourceFormat::Qcow2 => "qcow2",
            SourceFormat::Vmdk => "vmdk",
            SourceFormat::Nbd => "nbd",
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

mod nbd;
mod qcow2;
mod raw;
mod vmdk;

pub use self::nbd::NbdSource;
pub use self::qcow2::Qcow2Source;
pub use self::raw::RawSource;
pub use self::vmdk::VmdkSource;
mod open;

pub use self::open::{open_source, open_source_with};

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
