//! ext2/3/4 through `ext4-view` (read-only, `#![forbid(unsafe_code)]`, checked
//! arithmetic, metadata checksums verified, journal replayed in memory): the blocks it asks
//! for come from a [`DiskView`] of the backup, nothing is mounted or written.
//!
//! `ext4-view` reads ahead up to 32 KiB from the block it needs and keeps a small block
//! cache; a read that meets a chunk failing verification fails as a whole (never wrong
//! bytes), so a file ending within 32 KiB before a damaged chunk fails with it.
//! `ext4-view` exposes no inode numbers nor link counts: [`super::ext4_ino`] reads them
//! from the raw inode table and directory blocks, and an entry gets them only when the raw
//! inode's mode and size agree with what `ext4-view` read (else the inode is unknown and a
//! hard-linked file comes back as a copy). An `ext4-view` panic (none known) is caught and reported as corrupt
//! metadata rather than taking the process down.

use std::panic::{AssertUnwindSafe, catch_unwind};

use ext4_view::{Ext4, Ext4Error, Ext4Read, Metadata};

use super::ext4_ino::Inodes;
use super::{Entry, EntryKind, Volume};
use crate::disk_reader::DiskView;
use crate::error::{Error, ErrorKind, Result};

/// Entries read from one directory at most.
pub const MAX_DIR_ENTRIES: usize = 1_000_000;

struct Source(DiskView);

impl Ext4Read for Source {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.0.read_exact_at(start_byte, dst).map_err(|e| e.into())
    }
}

/// An ext2/3/4 file system.
pub struct Ext4Volume {
    fs: Ext4,
    /// Bytes the file system spans (block count × block size).
    fs_bytes: u64,
    /// Inode numbers and link counts (`None`: the raw superblock did not parse).
    inodes: Option<Inodes>,
}

/// Run `f`, turning a panic inside `ext4-view` into a `Corrupt` error.
fn guarded<T>(what: &str, f: impl FnOnce() -> std::result::Result<T, Ext4Error>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| convert(e, what)),
        Err(_) => Err(Error::corrupt(format!(
            "{what}: the ext4 reader gave up on inconsistent metadata"
        ))),
    }
}

/// An `ext4-view` error as ours: an I/O error from the backup keeps its kind (a chunk
/// that failed verification stays `Corrupt`).
fn convert(e: Ext4Error, what: &str) -> Error {
    let msg = e.to_string();
    match e {
        Ext4Error::Io(inner) => match inner.downcast::<Error>() {
            Ok(ours) => ours.context_prefix(what),
            Err(other) => Error::new(ErrorKind::Io, what.to_string()).with_source(other),
        },
        Ext4Error::NotFound => Error::not_found(format!("{what}: no such file or directory")),
        Ext4Error::NotADirectory => Error::config(format!("{what}: not a directory")),
        Ext4Error::IsADirectory => Error::config(format!("{what}: is a directory")),
        Ext4Error::IsASpecialFile => Error::config(format!("{what}: is a special file")),
        Ext4Error::NotAbsolute | Ext4Error::MalformedPath | Ext4Error::PathTooLong => {
            Error::config(format!("{what}: bad path ({msg}); paths start with /"))
        }
        Ext4Error::Encrypted => Error::unsupported(format!(
            "{what}: encrypted with fscrypt; file-level restore cannot decrypt it"
        )),
        Ext4Error::Incompatible(_) | Ext4Error::FileTooLarge => {
            Error::unsupported(format!("{what}: {msg}"))
        }
        _ => Error::corrupt(format!(
            "{what}: the file system's metadata is corrupt ({msg})"
        )),
    }
}

impl Ext4Volume {
    /// Load the superblock, group descriptors and journal of the file system in `view`.
    pub fn open(view: DiskView) -> Result<Ext4Volume> {
        let mut sb = [0u8; 1024];
        view.read_exact_at(1024, &mut sb)?;
        let blocks = u32::from_le_bytes([sb[4], sb[5], sb[6], sb[7]]) as u64
            | (u32::from_le_bytes([sb[0x150], sb[0x151], sb[0x152], sb[0x153]]) as u64) << 32;
        let log = u32::from_le_bytes([sb[24], sb[25], sb[26], sb[27]]);
        let bs = 1024u64.checked_shl(log.min(16)).unwrap_or(1024);
        let fs_bytes = blocks.saturating_mul(bs);
        let inodes = Inodes::open(view.reopen()).ok();
        let fs = guarded("ext4 file system", || Ext4::load(Box::new(Source(view))))?;
        Ok(Ext4Volume {
            fs,
            fs_bytes,
            inodes,
        })
    }
}

fn kind_of(m: &Metadata) -> EntryKind {
    let t = m.file_type();
    if t.is_dir() {
        EntryKind::Dir
    } else if t.is_regular_file() {
        EntryKind::File
    } else if t.is_symlink() {
        EntryKind::Symlink
    } else {
        EntryKind::Special
    }
}

impl Ext4Volume {
    /// Inode number and link count of the entry `ino` names, when the raw inode agrees
    /// with `m` (mode and size); `(0, 0)` when unknown.
    fn links(&self, ino: Option<u32>, m: &Metadata) -> (u64, u32) {
        let (Some(inodes), Some(ino)) = (&self.inodes, ino) else {
            return (0, 0);
        };
        match inodes.inode(ino) {
            Ok(raw)
                if raw.mode & 0o7777 == m.mode() && raw.size == m.len() && {
                    let t = raw.mode & 0o170000;
                    match kind_of(m) {
                        EntryKind::Dir => t == 0o040000,
                        EntryKind::File => t == 0o100000,
                        EntryKind::Symlink => t == 0o120000,
                        EntryKind::Special => true,
                    }
                } =>
            {
                (ino as u64, raw.links as u32)
            }
            _ => (0, 0),
        }
    }

    /// Raw names → inode numbers of directory `path` (empty when unknown).
    fn raw_dir(&self, path: &[u8]) -> std::collections::HashMap<Vec<u8>, u32> {
        self.inodes
            .as_ref()
            .and_then(|i| i.dir_ino(path).and_then(|d| i.entries(d)).ok())
            .unwrap_or_default()
    }

    fn entry(&self, path: &[u8], name: &[u8], m: &Metadata) -> Result<Entry> {
        let ino = if path == b"/" {
            Some(2)
        } else {
            let cut = path.iter().rposition(|&b| b == b'/').unwrap_or(0);
            let parent: &[u8] = if cut == 0 { b"/" } else { &path[..cut] };
            self.raw_dir(parent).get(base_name(path)).copied()
        };
        self.entry_with(path, name, m, ino)
    }

    fn entry_with(
        &self,
        path: &[u8],
        name: &[u8],
        m: &Metadata,
        ino: Option<u32>,
    ) -> Result<Entry> {
        let kind = kind_of(m);
        let target = if kind == EntryKind::Symlink {
            let shown = String::from_utf8_lossy(path);
            let t = guarded(&shown, || self.fs.read_link(path))?;
            Some(t.as_ref().to_vec())
        } else {
            None
        };
        let mut e = Entry::new(path, name, kind, m, target);
        (e.ino, e.nlink) = self.links(ino, m);
        if e.ino != 0 {
            // The inode number tells inodes apart for sure.
            e.identity = e.ino;
            e.precise = true;
        }
        Ok(e)
    }
}

impl Entry {
    fn new(
        path: &[u8],
        name: &[u8],
        kind: EntryKind,
        m: &Metadata,
        target: Option<Vec<u8>>,
    ) -> Entry {
        Entry {
            name: String::from_utf8_lossy(name).into_owned(),
            path: String::from_utf8_lossy(path).into_owned(),
            kind,
            size: m.len(),
            mode: m.mode() as u32,
            uid: m.uid(),
            gid: m.gid(),
            mtime: m.modified().seconds(),
            mtime_nsec: m.modified().nanoseconds(),
            atime: m.accessed().seconds(),
            atime_nsec: m.accessed().nanoseconds(),
            target: target
                .as_ref()
                .map(|t| String::from_utf8_lossy(t).into_owned()),
            raw_name: name.to_vec(),
            raw_target: target,
            identity: {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                m.hash(&mut h);
                h.finish()
            },
            precise: m.created().is_some_and(|c| c.nanoseconds() != 0),
            ino: 0,
            nlink: 0,
        }
    }
}

fn base_name(path: &[u8]) -> &[u8] {
    let trimmed = path.strip_suffix(b"/").unwrap_or(path);
    match trimmed.iter().rposition(|&b| b == b'/') {
        Some(i) => &trimmed[i + 1..],
        None => trimmed,
    }
}

impl Volume for Ext4Volume {
    fn fs_bytes(&self) -> u64 {
        self.fs_bytes
    }

    fn stat(&self, path: &[u8]) -> Result<Entry> {
        let shown = String::from_utf8_lossy(path).into_owned();
        let m = guarded(&shown, || self.fs.symlink_metadata(path))?;
        self.entry(path, base_name(path), &m)
    }

    fn list(&self, path: &[u8]) -> Result<Vec<Entry>> {
        let shown = String::from_utf8_lossy(path).into_owned();
        let dir = guarded(&shown, || self.fs.read_dir(path))?;
        let raw = self.raw_dir(path);
        let mut out = Vec::new();
        let mut iter = dir;
        loop {
            let next = guarded(&shown, || iter.next().transpose())?;
            let Some(e) = next else { break };
            let name = e.file_name().as_ref().to_vec();
            if name == b"." || name == b".." {
                continue;
            }
            if out.len() >= MAX_DIR_ENTRIES {
                return Err(Error::corrupt(format!(
                    "{shown}: more than {MAX_DIR_ENTRIES} entries in one directory; \
                     the directory is corrupt or too large for file-level restore"
                )));
            }
            let p = e.path();
            let child: &[u8] = p.as_ref();
            let child_shown = String::from_utf8_lossy(child).into_owned();
            let m = guarded(&child_shown, || e.metadata())?;
            out.push(self.entry_with(child, &name, &m, raw.get(&name).copied())?);
        }
        out.sort_by(|a, b| a.raw_name.cmp(&b.raw_name));
        Ok(out)
    }

    fn read_file(&self, path: &[u8], sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        let shown = String::from_utf8_lossy(path).into_owned();
        let m = guarded(&shown, || self.fs.symlink_metadata(path))?;
        if kind_of(&m) != EntryKind::File {
            return Err(Error::config(format!("{shown}: not a regular file")));
        }
        if m.len() > self.fs_bytes {
            return Err(Error::unsupported(format!(
                "{shown}: claims {} bytes, more than its file system holds ({} bytes); \
                 file-level restore does not write such a sparse file (restore the disk)",
                m.len(),
                self.fs_bytes
            )));
        }
        let mut f = guarded(&shown, || self.fs.open(path))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0u64;
        loop {
            // Fill the buffer (ext4-view gives at most one block per call).
            let mut got = 0usize;
            while got < buf.len() {
                let n = guarded(&shown, || f.read_bytes(&mut buf[got..]))?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            if got == 0 {
                break;
            }
            sink(pos, &buf[..got])?;
            pos += got as u64;
        }
        if pos != m.len() {
            return Err(Error::corrupt(format!(
                "{shown}: read {pos} bytes of {}; the file's block map is corrupt",
                m.len()
            )));
        }
        Ok(())
    }
}
