//! NTFS through the `ntfs` crate (pure Rust, read-only by design, by the ReactOS
//! developer who wrote it from the on-disk format), read directly from a [`DiskView`]
//! of the backup; nothing is mounted.
//!
//! What is mapped: names (the Win32/POSIX name; the extra DOS 8.3 name of a file is
//! skipped), the unnamed `$DATA` stream's bytes (resident, non-resident and sparse),
//! directories, the modification and access times of `$STANDARD_INFORMATION` (100 ns
//! since 1601, UTC), mode `0644`/`0755` for files/directories and `0444` for read-only
//! files; uid and gid 0. The file record number is the entry's identity, so a directory
//! reached twice (a loop) is refused. Not mapped: ACLs and owners (security
//! descriptors), alternate data streams, reparse points (junctions and symlinks come
//! back as what their record holds), compression and EFS encryption (a compressed or
//! encrypted file is an error, never wrong bytes). The record number is also the inode
//! number, so names of one record within a `get` come back as hard links.
//! The root's `$` system files are not listed.
//!
//! Hostile metadata: `ntfs` checks record signatures and fixups and bounds its reads;
//! its errors become `Corrupt`, a panic is caught, listing stops at
//! [`super::ext4::MAX_DIR_ENTRIES`] and a file is read only up to its size, which must
//! fit in the file system.

use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind};

use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::{NtfsFileAttributeFlags, NtfsFileNamespace};

use ntfs::{Ntfs, NtfsError, NtfsFile, NtfsReadSeek, NtfsTime};

use super::ext4::MAX_DIR_ENTRIES;
use super::{Entry, EntryKind, Volume};
use crate::disk_reader::DiskView;
use crate::error::{Error, Result};

/// NTFS time of the Unix epoch (100 ns intervals since 1601-01-01).
const EPOCH_1970: u64 = 116_444_736_000_000_000;

/// An NTFS file system.
pub struct NtfsVolume {
    fs: RefCell<DiskView>,
    ntfs: Ntfs,
}

/// Run `f`, turning an `ntfs` error into ours and a panic inside it into `Corrupt`.
fn guarded<T>(what: &str, f: impl FnOnce() -> std::result::Result<T, NtfsError>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| convert(e, what)),
        Err(_) => Err(Error::corrupt(format!(
            "{what}: the NTFS reader gave up on inconsistent metadata"
        ))),
    }
}

/// An `ntfs` error as ours: an error from the backup (a chunk failing verification)
/// keeps its kind; anything else is corrupt metadata.
fn convert(e: NtfsError, what: &str) -> Error {
    if let NtfsError::Io(io) = e {
        return match io.into_inner().map(|inner| inner.downcast::<Error>()) {
            Some(Ok(ours)) => ours.context_prefix(what),
            Some(Err(other)) => Error::corrupt(format!("{what}: reading NTFS: {other}")),
            None => Error::corrupt(format!("{what}: the NTFS file system ends early")),
        };
    }
    Error::corrupt(format!(
        "{what}: the NTFS file system's metadata is corrupt ({e})"
    ))
}

/// Seconds and nanoseconds since the Unix epoch.
fn unix(t: NtfsTime) -> (i64, u32) {
    let t = t.nt_timestamp();
    if t < EPOCH_1970 {
        return (0, 0);
    }
    let d = t - EPOCH_1970;
    ((d / 10_000_000) as i64, ((d % 10_000_000) * 100) as u32)
}

/// Path components of `path` (absolute, normalized).
fn components(path: &[u8]) -> Result<Vec<&str>> {
    let s = std::str::from_utf8(path).map_err(|_| {
        Error::not_found(format!(
            "{}: NTFS names are Unicode; no such file or directory",
            String::from_utf8_lossy(path)
        ))
    })?;
    Ok(s.split('/').filter(|c| !c.is_empty()).collect())
}

impl NtfsVolume {
    /// Read the boot sector and the upcase table of the NTFS in `view`.
    pub fn open(view: DiskView) -> Result<NtfsVolume> {
        let mut view = view;
        let ntfs = guarded("NTFS file system", || {
            let mut n = Ntfs::new(&mut view)?;
            n.read_upcase_table(&mut view)?;
            Ok(n)
        })?;
        Ok(NtfsVolume {
            fs: RefCell::new(view),
            ntfs,
        })
    }

    /// The file at `path`.
    fn file(&self, path: &[u8]) -> Result<NtfsFile<'_>> {
        let shown = String::from_utf8_lossy(path).into_owned();
        let fs = &mut *self.fs.borrow_mut();
        let mut file = guarded(&shown, || self.ntfs.root_directory(fs))?;
        for c in components(path)? {
            if !file.is_directory() {
                return Err(Error::config(format!(
                    "{shown}: not a directory on the way"
                )));
            }
            let index = guarded(&shown, || file.directory_index(fs))?;
            let mut finder = index.finder();
            let found = NtfsFileNameIndex::find(&mut finder, &self.ntfs, fs, c)
                .ok_or_else(|| Error::not_found(format!("{shown}: no such file or directory")))?;
            let entry = guarded(&shown, || found)?;
            file = guarded(&shown, || entry.to_file(&self.ntfs, fs))?;
        }
        Ok(file)
    }

    /// The entry for `file` named `name` at `path`.
    fn entry(&self, path: &str, name: &str, file: &NtfsFile<'_>) -> Result<Entry> {
        let fs = &mut *self.fs.borrow_mut();
        let dir = file.is_directory();
        let info = guarded(path, || file.info())?;
        let read_only = info
            .file_attributes()
            .contains(NtfsFileAttributeFlags::READ_ONLY);
        let size = if dir {
            0
        } else {
            match file.data(fs, "") {
                None => 0,
                Some(item) => {
                    let item = guarded(path, || item)?;
                    let attr = guarded(path, || item.to_attribute())?;
                    attr.value_length()
                }
            }
        };
        let (mtime, mtime_nsec) = unix(info.modification_time());
        let (atime, atime_nsec) = unix(info.access_time());
        Ok(Entry {
            name: name.to_string(),
            path: path.to_string(),
            kind: if dir { EntryKind::Dir } else { EntryKind::File },
            size,
            mode: match (dir, read_only) {
                (true, _) => 0o755,
                (false, true) => 0o444,
                (false, false) => 0o644,
            },
            uid: 0,
            gid: 0,
            mtime,
            mtime_nsec,
            atime,
            atime_nsec,
            target: None,
            raw_name: name.as_bytes().to_vec(),
            raw_target: None,
            identity: file.file_record_number(),
            precise: true,
            ino: file.file_record_number(),
            nlink: u32::from(file.hard_link_count()),
        })
    }
}

impl Volume for NtfsVolume {
    fn fs_bytes(&self) -> u64 {
        self.ntfs.size()
    }

    fn stat(&self, path: &[u8]) -> Result<Entry> {
        let shown = String::from_utf8_lossy(path).into_owned();
        let file = self.file(path)?;
        let name = components(path)?.last().copied().unwrap_or("/").to_string();
        self.entry(&shown, &name, &file)
    }

    fn list(&self, path: &[u8]) -> Result<Vec<Entry>> {
        let shown = String::from_utf8_lossy(path).into_owned();
        let dir = self.file(path)?;
        if !dir.is_directory() {
            return Err(Error::config(format!("{shown}: not a directory")));
        }
        let root = components(path)?.is_empty();
        let mut names = Vec::new();
        {
            let fs = &mut *self.fs.borrow_mut();
            let index = guarded(&shown, || dir.directory_index(fs))?;
            let mut iter = index.entries();
            while let Some(next) = iter.next(fs) {
                let e = guarded(&shown, || next)?;
                let Some(key) = e.key() else { continue };
                let key = guarded(&shown, || key)?;
                if key.namespace() == NtfsFileNamespace::Dos {
                    continue;
                }
                let name = key.name().to_string_lossy();
                if name == "." || (root && name.starts_with('$')) {
                    continue;
                }
                if names.len() >= MAX_DIR_ENTRIES {
                    return Err(Error::corrupt(format!(
                        "{shown}: more than {MAX_DIR_ENTRIES} entries in one directory; \
                         the directory is corrupt or too large for file-level restore"
                    )));
                }
                let file = guarded(&shown, || e.to_file(&self.ntfs, fs))?;
                names.push((name, file));
            }
        }
        let base = shown.trim_end_matches('/');
        let mut out = Vec::new();
        for (name, file) in names {
            out.push(self.entry(&format!("{base}/{name}"), &name, &file)?);
        }
        out.sort_by(|a, b| a.raw_name.cmp(&b.raw_name));
        Ok(out)
    }

    fn read_file(&self, path: &[u8], sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        let shown = String::from_utf8_lossy(path).into_owned();
        let file = self.file(path)?;
        if file.is_directory() {
            return Err(Error::config(format!("{shown}: not a regular file")));
        }
        let fs = &mut *self.fs.borrow_mut();
        let Some(item) = file.data(fs, "") else {
            return Ok(()); // no data stream: an empty file
        };
        let item = guarded(&shown, || item)?;
        let attr = guarded(&shown, || item.to_attribute())?;
        let flags = attr.flags();
        if flags
            .intersects(ntfs::NtfsAttributeFlags::COMPRESSED | ntfs::NtfsAttributeFlags::ENCRYPTED)
        {
            return Err(Error::unsupported(format!(
                "{shown}: NTFS-compressed or EFS-encrypted; file-level restore cannot \
                 read it (restore the disk)"
            )));
        }
        let mut value = guarded(&shown, || attr.value(fs))?;
        let len = value.len();
        if len > self.ntfs.size() {
            return Err(Error::corrupt(format!(
                "{shown}: claims {len} bytes, more than its file system holds ({} bytes)",
                self.ntfs.size()
            )));
        }
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0u64;
        while pos < len {
            let n = guarded(&shown, || value.read(fs, &mut buf))?;
            if n == 0 {
                break;
            }
            sink(pos, &buf[..n])?;
            pos += n as u64;
        }
        if pos != len {
            return Err(Error::corrupt(format!(
                "{shown}: read {pos} bytes of {len}; the file's run list is corrupt"
            )));
        }
        Ok(())
    }
}
