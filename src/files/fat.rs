//! FAT12/16/32 (with VFAT long names) through `fatfs` 0.3, read directly from a
//! [`DiskView`] of the backup; nothing is mounted.
//!
//! Why `fatfs`: it is the FAT implementation the Rust ecosystem uses (pure Rust, no
//! `unsafe` in its FAT logic), and nothing else reads long names. It wants a
//! `Read + Write + Seek` volume, so it gets [`ReadOnly`], whose writes fail: `fatfs` only
//! writes when a file is changed or allocated (and on unmount only to clear a dirty flag
//! it set itself), which this reader never asks for, and access dates are not updated
//! (`update_accessed_date` stays off).
//!
//! What is mapped: names (long name when there is one, else the 8.3 name), sizes,
//! directories, the modification time (FAT stores local time to 2 s without a zone: it is
//! taken as UTC) and the access date; mode `0644`/`0755` for files/directories, `0444`
//! for read-only files; uid and gid 0. Not mapped: the hidden/system/archive attributes,
//! creation times, volume labels. FAT has no symlinks or hard links.
//!
//! Hostile metadata: a cluster chain that loops makes a directory endless, so listing
//! stops at [`super::ext4::MAX_DIR_ENTRIES`]; a file is read only up to its size, which
//! must fit in the file system; a `fatfs` panic is caught and reported as corrupt
//! metadata.

use std::io::{Read, Seek, SeekFrom, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};

use fatfs::{DirEntry, FileSystem, FsOptions};

use super::ext4::MAX_DIR_ENTRIES;
use super::{Entry, EntryKind, Volume};
use crate::disk_reader::DiskView;
use crate::error::{Error, ErrorKind, Result};

/// The backup's bytes as `fatfs` wants them: reads and seeks pass through, writes fail.
pub struct ReadOnly(DiskView);

impl Read for ReadOnly {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Seek for ReadOnly {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.0.seek(pos)
    }
}

impl Write for ReadOnly {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "file-level restore never writes to a backup",
        ))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A FAT file system.
pub struct FatVolume {
    fs: FileSystem<ReadOnly>,
    fs_bytes: u64,
}

/// Run `f`, turning an I/O error into ours and a panic inside `fatfs` into `Corrupt`.
fn guarded<T>(what: &str, f: impl FnOnce() -> std::io::Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(|e| convert(e, what)),
        Err(_) => Err(Error::corrupt(format!(
            "{what}: the FAT reader gave up on inconsistent metadata"
        ))),
    }
}

/// A `fatfs` error as ours: an error from the backup (a chunk failing verification)
/// keeps its kind.
fn convert(e: std::io::Error, what: &str) -> Error {
    let kind = e.kind();
    match e.into_inner() {
        Some(inner) => match inner.downcast::<Error>() {
            Ok(ours) => ours.context_prefix(what),
            Err(other) => match kind {
                std::io::ErrorKind::NotFound => {
                    Error::not_found(format!("{what}: no such file or directory"))
                }
                _ => Error::corrupt(format!(
                    "{what}: the FAT file system's metadata is corrupt ({other})"
                )),
            },
        },
        None => match kind {
            std::io::ErrorKind::NotFound => {
                Error::not_found(format!("{what}: no such file or directory"))
            }
            std::io::ErrorKind::UnexpectedEof => Error::corrupt(format!(
                "{what}: the FAT file system ends early (truncated or corrupt)"
            )),
            _ => Error::new(ErrorKind::Corrupt, format!("{what}: {kind}")),
        },
    }
}

/// Seconds since the epoch of a FAT date and time (taken as UTC; see the module doc).
fn unix_time(date: fatfs::Date, time: fatfs::Time) -> i64 {
    let month = time::Month::try_from(date.month as u8).unwrap_or(time::Month::January);
    let Ok(d) = time::Date::from_calendar_date(i32::from(date.year), month, date.day as u8) else {
        return 0;
    };
    let t = time::Time::from_hms(
        (time.hour as u8).min(23),
        (time.min as u8).min(59),
        (time.sec as u8).min(59),
    )
    .unwrap_or(time::Time::MIDNIGHT);
    time::PrimitiveDateTime::new(d, t)
        .assume_utc()
        .unix_timestamp()
}

impl FatVolume {
    /// Read the boot sector of the FAT file system in `view`.
    pub fn open(view: DiskView) -> Result<FatVolume> {
        let mut bs = [0u8; 512];
        view.read_exact_at(0, &mut bs)?;
        let sector = u64::from(u16::from_le_bytes([bs[11], bs[12]]));
        let small = u64::from(u16::from_le_bytes([bs[19], bs[20]]));
        let large = u64::from(u32::from_le_bytes([bs[32], bs[33], bs[34], bs[35]]));
        let fs_bytes = if small != 0 { small } else { large }.saturating_mul(sector);
        let fs = guarded("FAT file system", || {
            FileSystem::new(ReadOnly(view), FsOptions::new())
        })?;
        Ok(FatVolume { fs, fs_bytes })
    }

    /// The path inside the file system as `fatfs` takes it (no leading `/`).
    fn rel(path: &[u8]) -> Result<&str> {
        let s = std::str::from_utf8(path).map_err(|_| {
            Error::not_found(format!(
                "{}: FAT names are Unicode; no such file or directory",
                String::from_utf8_lossy(path)
            ))
        })?;
        Ok(s.trim_start_matches('/'))
    }

    /// The entries of directory `rel` ("" for the root), as `fatfs` gives them.
    fn entries(&self, rel: &str, shown: &str) -> Result<Vec<DirEntry<'_, ReadOnly>>> {
        let root = self.fs.root_dir();
        let dir = if rel.is_empty() {
            root
        } else {
            guarded(shown, || root.open_dir(rel))?
        };
        let mut out = Vec::new();
        let mut iter = dir.iter();
        loop {
            let next = guarded(shown, || iter.next().transpose())?;
            let Some(e) = next else { break };
            let name = e.file_name();
            if name == "."
                || name == ".."
                || e.attributes().contains(fatfs::FileAttributes::VOLUME_ID)
            {
                continue;
            }
            if out.len() >= MAX_DIR_ENTRIES {
                return Err(Error::corrupt(format!(
                    "{shown}: more than {MAX_DIR_ENTRIES} entries in one directory; its \
                     cluster chain loops or the directory is corrupt"
                )));
            }
            out.push(e);
        }
        Ok(out)
    }

    fn entry(&self, parent: &str, e: &DirEntry<'_, ReadOnly>) -> Entry {
        let name = e.file_name();
        let path = format!("{}/{name}", parent.trim_end_matches('/'));
        let dir = e.is_dir();
        let read_only = e.attributes().contains(fatfs::FileAttributes::READ_ONLY);
        let m = e.modified();
        let mtime = unix_time(m.date, m.time);
        let midnight = fatfs::Time {
            hour: 0,
            min: 0,
            sec: 0,
            millis: 0,
        };
        let atime = unix_time(e.accessed(), midnight);
        Entry {
            name: name.clone(),
            path,
            kind: if dir { EntryKind::Dir } else { EntryKind::File },
            size: if dir { 0 } else { e.len() },
            mode: match (dir, read_only) {
                (true, _) => 0o755,
                (false, true) => 0o444,
                (false, false) => 0o644,
            },
            uid: 0,
            gid: 0,
            mtime,
            mtime_nsec: u32::from(m.time.millis) * 1_000_000,
            atime,
            atime_nsec: 0,
            target: None,
            raw_name: name.into_bytes(),
            raw_target: None,
            identity: 0,
            precise: false,
            ino: 0,
            nlink: 0,
        }
    }

    /// The entry of `path` in its parent directory.
    fn find(&self, path: &[u8]) -> Result<Entry> {
        let shown = String::from_utf8_lossy(path).into_owned();
        let rel = Self::rel(path)?;
        let (parent, name) = match rel.rfind('/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => ("", rel),
        };
        let entries = self.entries(parent, &shown)?;
        let e = entries
            .iter()
            .find(|e| e.file_name() == name)
            .or_else(|| {
                entries
                    .iter()
                    .find(|e| e.file_name().eq_ignore_ascii_case(name))
            })
            .ok_or_else(|| Error::not_found(format!("{shown}: no such file or directory")))?;
        Ok(self.entry(&format!("/{parent}"), e))
    }
}

impl Volume for FatVolume {
    fn fs_bytes(&self) -> u64 {
        self.fs_bytes
    }

    fn stat(&self, path: &[u8]) -> Result<Entry> {
        if path == b"/" {
            return Ok(Entry {
                name: "/".into(),
                path: "/".into(),
                kind: EntryKind::Dir,
                size: 0,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                atime: 0,
                atime_nsec: 0,
                target: None,
                raw_name: b"/".to_vec(),
                raw_target: None,
                identity: 0,
                precise: false,
                ino: 0,
                nlink: 0,
            });
        }
        self.find(path)
    }

    fn list(&self, path: &[u8]) -> Result<Vec<Entry>> {
        let shown = String::from_utf8_lossy(path).into_owned();
        let rel = Self::rel(path)?;
        let parent = format!("/{rel}");
        let mut out: Vec<Entry> = self
            .entries(rel, &shown)?
            .iter()
            .map(|e| self.entry(&parent, e))
            .collect();
        out.sort_by(|a, b| a.raw_name.cmp(&b.raw_name));
        Ok(out)
    }

    fn read_file(&self, path: &[u8], sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        let shown = String::from_utf8_lossy(path).into_owned();
        let e = self.find(path)?;
        if e.kind != EntryKind::File {
            return Err(Error::config(format!("{shown}: not a regular file")));
        }
        if e.size > self.fs_bytes {
            return Err(Error::corrupt(format!(
                "{shown}: claims {} bytes, more than its file system holds ({} bytes)",
                e.size, self.fs_bytes
            )));
        }
        let rel = Self::rel(path)?;
        let root = self.fs.root_dir();
        let mut f = guarded(&shown, || root.open_file(rel))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0u64;
        loop {
            let n = guarded(&shown, || f.read(&mut buf))?;
            if n == 0 {
                break;
            }
            sink(pos, &buf[..n])?;
            pos += n as u64;
        }
        if pos != e.size {
            return Err(Error::corrupt(format!(
                "{shown}: read {pos} bytes of {}; the file's cluster chain is corrupt",
                e.size
            )));
        }
        Ok(())
    }
}
