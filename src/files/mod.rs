//! File-level restore: partitions and files read directly from a backup's chunks.
//!
//! ```text
//! vault chunks ──▶ DiskCache/DiskReader (verified, LRU) ──▶ DiskView (partition range)
//!   ──▶ table.rs (GPT | MBR | none) ──▶ detect (magic) ──▶ Volume (ext4.rs | fat.rs | ntfs.rs)
//!   ──▶ ls / stat / read_file ──▶ extract.rs (DEST on the host) | the API's stream
//! ```
//!
//! Nothing is mounted, no kernel file-system code touches backup data, and no disk image
//! is written: the pure-Rust reader asks for byte ranges and gets them from the chunks.
//! A chunk failing verification is an error for the file (or directory) that needs it.
//!
//! File systems: **ext2/3/4** through `ext4-view` (read-only, forbids `unsafe`, fuzzed
//! upstream), **FAT12/16/32** through `fatfs` (see `fat`: a write-refusing adapter) and
//! **NTFS** through `ntfs` (see `ntfs` for what is mapped). Detected and refused with a
//! clear `Unsupported` error: XFS (no well-kept pure-Rust reader exists), btrfs,
//! LUKS (encrypted: needs the guest's key), swap, and **LVM2** physical volumes (not
//! supported: logical volumes would need the LVM metadata parsed; restore the disk).
//!
//! Hostile metadata: a directory met again under itself (a directory loop made by a
//! hard link to an ancestor) is refused, and so is a directory seen twice anywhere when
//! its inode is recognisable (nanosecond creation time; see [`Entry::identity`]); every
//! walk is bounded besides — [`MAX_DEPTH`] directory levels,
//! [`MAX_WALK_ENTRIES`] entries per `get`, [`ext4::MAX_DIR_ENTRIES`] per directory, no
//! file larger than its file system (see [`Volume::read_file`]) — so a directory loop or
//! a fuzzed inode ends in an error, not a hang.

pub mod ext4;
pub mod ext4_ino;
pub mod extract;
pub mod fat;
pub mod ntfs;
pub mod table;

use std::rc::Rc;

use serde::Serialize;

use crate::disk_reader::{DiskReader, DiskView};
use crate::error::{Error, Result};
pub use table::{Scheme, TableEntry};

/// Deepest directory level a walk descends to.
pub const MAX_DEPTH: usize = 256;
/// Most entries one `get` of a directory restores.
pub const MAX_WALK_ENTRIES: usize = 2_000_000;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// Device node, FIFO or socket (listed, not restored).
    Special,
}

/// One file-system entry (what `ls --long` shows).
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Name (lossy UTF-8 for display; [`Entry::raw_name`] has the bytes).
    pub name: String,
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub atime: i64,
    pub atime_nsec: u32,
    /// A symlink's target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip)]
    pub raw_name: Vec<u8>,
    #[serde(skip)]
    pub raw_target: Option<Vec<u8>>,
    /// Hash of every attribute the inode has (times to the nanosecond where stored,
    /// creation and change times included): equal for two names of one inode.
    #[serde(skip)]
    pub identity: u64,
    /// Whether [`Entry::identity`] tells inodes apart (the inode stores nanosecond
    /// creation times, so two inodes practically never share it).
    #[serde(skip)]
    pub precise: bool,
    /// Inode number (`0`: the reader does not know it).
    #[serde(skip_serializing_if = "is_zero")]
    pub ino: u64,
    /// Names this inode has (`0`: unknown); a file with more and a known inode number
    /// is restored once and linked under its other names.
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub nlink: u32,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// A file system opened read-only.
pub trait Volume {
    /// Bytes the file system spans.
    fn fs_bytes(&self) -> u64;
    /// The entry at `path` (a symlink itself, not its target).
    fn stat(&self, path: &[u8]) -> Result<Entry>;
    /// The entries of directory `path` (without `.` and `..`), sorted by name.
    fn list(&self, path: &[u8]) -> Result<Vec<Entry>>;
    /// Hand the regular file's bytes to `sink(offset, bytes)` in order. A file whose
    /// size exceeds its file system is refused (`Unsupported`): a fuzzed size would
    /// otherwise mean terabytes of holes.
    fn read_file(&self, path: &[u8], sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()>;
}

/// What a partition (or the whole disk) holds, by its magic numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Ext4,
    Fat,
    Ntfs,
    Xfs,
    Btrfs,
    Lvm2,
    Luks,
    Swap,
    Unknown,
}

impl FsKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FsKind::Ext4 => "ext4",
            FsKind::Fat => "fat",
            FsKind::Ntfs => "ntfs",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
            FsKind::Lvm2 => "lvm2",
            FsKind::Luks => "luks",
            FsKind::Swap => "swap",
            FsKind::Unknown => "unknown",
        }
    }

    /// Whether `files ls/get` can read it.
    pub fn supported(self) -> bool {
        matches!(self, FsKind::Ext4 | FsKind::Fat | FsKind::Ntfs)
    }

    /// Why it cannot be read.
    fn refusal(self) -> String {
        match self {
            FsKind::Lvm2 => "LVM is not supported: this is an LVM2 physical volume; \
                             restore the disk and activate the volume group instead"
                .into(),
            FsKind::Xfs => "XFS is not supported (no well-kept pure-Rust XFS reader)".into(),
            FsKind::Luks => "LUKS-encrypted: file-level restore cannot decrypt it".into(),
            FsKind::Unknown => "no known file system here".into(),
            other => format!(
                "{} is not supported by file-level restore yet",
                other.as_str()
            ),
        }
    }
}

/// Sniff what `view` holds.
pub fn detect(view: &DiskView) -> Result<FsKind> {
    let mut head = vec![0u8; 4096.min(view.len()) as usize];
    view.read_exact_at(0, &mut head)?;
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(0, b"XFSB") {
        return Ok(FsKind::Xfs);
    }
    if at(0, b"LUKS\xba\xbe") {
        return Ok(FsKind::Luks);
    }
    if at(3, b"NTFS    ") {
        return Ok(FsKind::Ntfs);
    }
    if head.len() >= 1082 && head[1080] == 0x53 && head[1081] == 0xEF {
        return Ok(FsKind::Ext4);
    }
    for s in 0..4 {
        if at(s * 512, b"LABELONE") && at(s * 512 + 24, b"LVM2 001") {
            return Ok(FsKind::Lvm2);
        }
    }
    if at(510, &[0x55, 0xAA]) && (at(54, b"FAT1") || at(82, b"FAT32   ")) {
        return Ok(FsKind::Fat);
    }
    if at(4086, b"SWAPSPACE2") {
        return Ok(FsKind::Swap);
    }
    if view.len() >= 0x10048 {
        let mut b = [0u8; 8];
        view.read_exact_at(0x10040, &mut b)?;
        if &b == b"_BHRfS_M" {
            return Ok(FsKind::Btrfs);
        }
    }
    Ok(FsKind::Unknown)
}

/// A partition with what it holds (what `files partitions` shows).
#[derive(Debug, Clone, Serialize)]
pub struct Partition {
    /// `0` stands for the whole disk (no partition table).
    pub number: u32,
    pub start: u64,
    pub size: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub type_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub fs: FsKind,
    pub supported: bool,
    /// Why it cannot be read (out of the disk, unreadable chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// A disk of a backup, ready to have its partitions listed or a file system opened.
pub struct Disk {
    reader: Rc<DiskReader>,
    pub scheme: Scheme,
    pub partitions: Vec<Partition>,
}

impl Disk {
    /// Read the partition table and sniff each partition (or the whole disk).
    pub fn open(reader: DiskReader) -> Result<Disk> {
        let reader = Rc::new(reader);
        let whole = DiskView::whole(Rc::clone(&reader));
        // A file system on the whole disk wins over a "table" that is its boot sector.
        let whole_fs = detect(&whole)?;
        let (scheme, entries) = if matches!(whole_fs, FsKind::Unknown) {
            table::read_table(&whole)?
        } else {
            (Scheme::None, Vec::new())
        };
        let mut partitions = Vec::new();
        if scheme == Scheme::None {
            partitions.push(Partition {
                number: 0,
                start: 0,
                size: whole.len(),
                type_id: String::new(),
                name: String::new(),
                fs: whole_fs,
                supported: whole_fs.supported(),
                problem: None,
            });
        }
        for e in entries {
            let (fs, problem) = match DiskView::new(Rc::clone(&reader), e.start, e.size) {
                Ok(v) => match detect(&v) {
                    Ok(fs) => (fs, None),
                    Err(err) => (FsKind::Unknown, Some(err.to_string())),
                },
                Err(err) => (FsKind::Unknown, Some(err.to_string())),
            };
            partitions.push(Partition {
                number: e.number,
                start: e.start,
                size: e.size,
                type_id: e.type_id,
                name: e.name,
                fs,
                supported: fs.supported() && problem.is_none(),
                problem,
            });
        }
        Ok(Disk {
            reader,
            scheme,
            partitions,
        })
    }

    /// Open the file system of partition `number` (`None`: the whole disk's, else the
    /// only readable partition; several readable ones need a number).
    pub fn volume(&self, number: Option<u32>) -> Result<Box<dyn Volume>> {
        let p = match number {
            Some(n) => self
                .partitions
                .iter()
                .find(|p| p.number == n)
                .ok_or_else(|| {
                    Error::not_found(format!(
                        "no partition {n} on this disk (it has: {}); see `files BACKUP partitions`",
                        self.numbers()
                    ))
                })?,
            None => {
                let readable: Vec<&Partition> =
                    self.partitions.iter().filter(|p| p.supported).collect();
                match readable.as_slice() {
                    [one] => *one,
                    [] => match self.partitions.as_slice() {
                        [only] => only,
                        _ => {
                            return Err(Error::unsupported(format!(
                                "no partition with a readable file system on this disk \
                                 (partitions: {}); see `files BACKUP partitions`",
                                self.describe()
                            )));
                        }
                    },
                    _ => {
                        return Err(Error::config(format!(
                            "several partitions hold readable file systems ({}); pick one \
                             with --partition N",
                            self.describe()
                        )));
                    }
                }
            }
        };
        if let Some(problem) = &p.problem {
            return Err(Error::invalid(format!("partition {}: {problem}", p.number)));
        }
        if !p.fs.supported() {
            return Err(Error::unsupported(format!(
                "{}: {}",
                self.label(p),
                p.fs.refusal()
            )));
        }
        let view = DiskView::new(Rc::clone(&self.reader), p.start, p.size)?;
        let opened: Result<Box<dyn Volume>> = match p.fs {
            FsKind::Fat => fat::FatVolume::open(view).map(|v| Box::new(v) as Box<dyn Volume>),
            FsKind::Ntfs => ntfs::NtfsVolume::open(view).map(|v| Box::new(v) as Box<dyn Volume>),
            _ => ext4::Ext4Volume::open(view).map(|v| Box::new(v) as Box<dyn Volume>),
        };
        opened.map_err(|e| e.context_prefix(self.label(p)))
    }

    fn label(&self, p: &Partition) -> String {
        if p.number == 0 {
            "whole disk".into()
        } else {
            format!("partition {}", p.number)
        }
    }

    fn numbers(&self) -> String {
        let v: Vec<String> = self
            .partitions
            .iter()
            .map(|p| p.number.to_string())
            .collect();
        v.join(", ")
    }

    fn describe(&self) -> String {
        let v: Vec<String> = self
            .partitions
            .iter()
            .map(|p| format!("{} {}", p.number, p.fs.as_str()))
            .collect();
        v.join(", ")
    }
}

/// `path` made absolute and stripped of trailing slashes (`/` stays).
pub fn normalize(path: &str) -> Result<Vec<u8>> {
    if !path.starts_with('/') {
        return Err(Error::config(format!(
            "{path:?}: paths inside a backup start with / (e.g. /etc/hosts)"
        )));
    }
    if path.split('/').any(|c| c == "." || c == "..") || path.contains('\0') {
        return Err(Error::config(format!(
            "{path:?}: . and .. are not allowed in paths inside a backup"
        )));
    }
    let t = path.trim_end_matches('/');
    Ok(if t.is_empty() {
        b"/".to_vec()
    } else {
        t.as_bytes().to_vec()
    })
}
