//! `files get`: a file, symlink or directory tree out of a [`Volume`] onto the host.
//!
//! DEST must not exist (it becomes the copy), or be an existing directory (the copy goes
//! in under the source's name, which must not exist there); nothing is ever overwritten:
//! files are created with `O_EXCL`, directories with `mkdir`, so a name that appears
//! twice in a hostile directory, or a symlink placed before a directory of the same name,
//! fails that entry instead of writing through the link.
//!
//! Kept: permission bits, mtime and atime (nanoseconds), symlink targets (never
//! followed), owner and group when running as root. Hard links: a file with more than one
//! name and a known inode number is restored once, and its other names inside the same
//! `get` become hard links to that copy (`links` in the report); where the reader does
//! not know the inode, they come back as separate copies. Device nodes, FIFOs and sockets are skipped and
//! listed. Sparse: 4 KiB blocks of zeros are not written (holes), the length is set at
//! the end. A file that cannot be read (a chunk failing verification, corrupt metadata)
//! is removed, listed under `failed`, and the walk goes on with the next entry.

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;
use serde::Serialize;

use super::{Entry, EntryKind, MAX_DEPTH, MAX_WALK_ENTRIES, Volume};
use crate::error::{Error, ErrorKind, Result};

/// Zero blocks of this size become holes.
const HOLE_BLOCK: usize = 4096;

/// What a `get` did.
#[derive(Debug, Default, Serialize)]
pub struct GetReport {
    /// Where the copy is.
    pub to: PathBuf,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Names restored as hard links to a file restored earlier in this `get`.
    pub links: u64,
    /// Bytes of file content restored (holes included).
    pub bytes: u64,
    /// Entries not restored on purpose (special files).
    pub skipped: Vec<Problem>,
    /// Entries that could not be restored.
    pub failed: Vec<Problem>,
}

/// One entry that did not come back.
#[derive(Debug, Serialize)]
pub struct Problem {
    pub path: String,
    pub kind: ErrorKind,
    pub error: String,
}

struct Walk<'a> {
    vol: &'a dyn Volume,
    /// Signatures (inode attributes + listing) of the directories on the current path.
    ancestors: Vec<u64>,
    /// Directories already restored whose inode is recognisable: identity → path.
    seen: std::collections::HashMap<u64, String>,
    /// Files with several names already restored: inode number → where.
    linked: std::collections::HashMap<u64, PathBuf>,
    as_root: bool,
    entries: usize,
    report: GetReport,
}

/// Restore `path` of `vol` to `dest` (see the module doc for DEST's rules).
pub fn get(vol: &dyn Volume, path: &[u8], dest: &Path) -> Result<GetReport> {
    let top = vol.stat(path)?;
    let to = match fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => {
            if top.raw_name.is_empty() || path == b"/" {
                return Err(Error::conflict(format!(
                    "{} exists; to restore the whole file system give a DEST that does not \
                     exist yet",
                    dest.display()
                )));
            }
            dest.join(OsStr::from_bytes(&top.raw_name))
        }
        Ok(_) => {
            return Err(Error::conflict(format!(
                "{} already exists; files get never overwrites (give a new path or a directory)",
                dest.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => dest.to_path_buf(),
        Err(e) => return Err(Error::io(format!("checking {}", dest.display()), e)),
    };
    if fs::symlink_metadata(&to).is_ok() {
        return Err(Error::conflict(format!(
            "{} already exists; files get never overwrites",
            to.display()
        )));
    }
    let mut w = Walk {
        vol,
        ancestors: Vec::new(),
        seen: Default::default(),
        linked: Default::default(),
        as_root: nix::unistd::geteuid().is_root(),
        entries: 0,
        report: GetReport {
            to: to.clone(),
            ..Default::default()
        },
    };
    match top.kind {
        EntryKind::File => w.file(&top, path, &to)?,
        EntryKind::Symlink => w.symlink(&top, &to)?,
        EntryKind::Dir => w.dir(&top, path, &to, 0)?,
        EntryKind::Special => {
            return Err(Error::unsupported(format!(
                "{}: a device node, FIFO or socket; only files, directories and symlinks \
                 are restored",
                top.path
            )));
        }
    }
    Ok(w.report)
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = parent.to_vec();
    if !p.ends_with(b"/") {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

impl Walk<'_> {
    fn fail(&mut self, path: &str, e: &Error) {
        self.report.failed.push(Problem {
            path: path.to_string(),
            kind: e.kind(),
            error: e.to_string(),
        });
    }

    fn file(&mut self, e: &Entry, src: &[u8], to: &Path) -> Result<()> {
        let several = e.ino != 0 && e.nlink > 1;
        if several && let Some(first) = self.linked.get(&e.ino) {
            fs::hard_link(first, to).map_err(|err| {
                Error::io(
                    format!("linking {} to {}", to.display(), first.display()),
                    err,
                )
            })?;
            self.report.links += 1;
            return Ok(());
        }
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(to)
            .map_err(|err| {
                let kind = if err.kind() == std::io::ErrorKind::AlreadyExists {
                    ErrorKind::Conflict
                } else {
                    ErrorKind::Io
                };
                Error::new(kind, format!("creating {}", to.display())).with_source(err)
            })?;
        let mut written = 0u64;
        let r = self.vol.read_file(src, &mut |off, bytes| {
            for (i, block) in bytes.chunks(HOLE_BLOCK).enumerate() {
                if block.iter().all(|&b| b == 0) {
                    continue;
                }
                f.write_all_at(block, off + (i * HOLE_BLOCK) as u64)
                    .map_err(|err| Error::io(format!("writing {}", to.display()), err))?;
            }
            written = off + bytes.len() as u64;
            Ok(())
        });
        let r = r.and_then(|()| {
            f.set_len(written)
                .map_err(|err| Error::io(format!("sizing {}", to.display()), err))
        });
        drop(f);
        if let Err(err) = r {
            let _ = fs::remove_file(to);
            return Err(err);
        }
        self.report.files += 1;
        self.report.bytes += written;
        self.attrs(e, to)?;
        if several {
            self.linked.insert(e.ino, to.to_path_buf());
        }
        Ok(())
    }

    fn symlink(&mut self, e: &Entry, to: &Path) -> Result<()> {
        let target = e.raw_target.clone().unwrap_or_default();
        std::os::unix::fs::symlink(OsStr::from_bytes(&target), to)
            .map_err(|err| Error::io(format!("creating symlink {}", to.display()), err))?;
        self.report.symlinks += 1;
        self.attrs(e, to)
    }

    fn dir(&mut self, e: &Entry, src: &[u8], to: &Path, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(Error::corrupt(format!(
                "{}: more than {MAX_DEPTH} directory levels (a directory loop?); not descended",
                e.path
            )));
        }
        if e.precise
            && let Some(first) = self.seen.insert(e.identity, e.path.clone())
        {
            return Err(Error::corrupt(format!(
                "{}: the same directory as {first} (a hard-linked directory or a directory \
                 loop); not restored twice",
                e.path
            )));
        }
        let children = self.vol.list(src)?;
        let signature = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            e.identity.hash(&mut h);
            for c in &children {
                (&c.raw_name, c.identity).hash(&mut h);
            }
            h.finish()
        };
        // Three equal directories on one path: a loop (seconds-only time stamps can make
        // two nested look-alikes, not three in a row).
        if self.ancestors.iter().filter(|&&a| a == signature).count() >= 2 {
            return Err(Error::corrupt(format!(
                "{}: a directory loop (this directory contains itself); not descended",
                e.path
            )));
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(to)
            .map_err(|err| Error::io(format!("creating directory {}", to.display()), err))?;
        self.report.dirs += 1;
        self.ancestors.push(signature);
        let r = self.children(src, to, &children, depth, &e.path);
        self.ancestors.pop();
        r?;
        self.attrs(e, to)
    }

    fn children(
        &mut self,
        src: &[u8],
        to: &Path,
        children: &[Entry],
        depth: usize,
        dir: &str,
    ) -> Result<()> {
        for c in children {
            self.entries += 1;
            if self.entries > MAX_WALK_ENTRIES {
                return Err(Error::new(
                    ErrorKind::Full,
                    format!("more than {MAX_WALK_ENTRIES} entries under {dir}; get a subdirectory"),
                ));
            }
            if c.raw_name.is_empty() || c.raw_name.contains(&b'/') {
                let err = Error::corrupt(format!("{}: a bad name in its directory", c.path));
                self.fail(&c.path, &err);
                continue;
            }
            let child_src = join(src, &c.raw_name);
            let child_to = to.join(OsStr::from_bytes(&c.raw_name));
            let r = match c.kind {
                EntryKind::File => self.file(c, &child_src, &child_to),
                EntryKind::Symlink => self.symlink(c, &child_to),
                EntryKind::Dir => self.dir(c, &child_src, &child_to, depth + 1),
                EntryKind::Special => {
                    self.report.skipped.push(Problem {
                        path: c.path.clone(),
                        kind: ErrorKind::Unsupported,
                        error: "device node, FIFO or socket: not restored".into(),
                    });
                    Ok(())
                }
            };
            if let Err(err) = r {
                if err.kind() == ErrorKind::Full {
                    return Err(err);
                }
                self.fail(&c.path, &err);
            }
        }
        Ok(())
    }

    /// Owner (as root), mode and times; never through a symlink.
    fn attrs(&mut self, e: &Entry, to: &Path) -> Result<()> {
        let what = || format!("setting owner, mode and times of {}", to.display());
        if self.as_root {
            std::os::unix::fs::lchown(to, Some(e.uid), Some(e.gid))
                .map_err(|err| Error::io(what(), err))?;
        }
        if e.kind != EntryKind::Symlink {
            fs::set_permissions(to, fs::Permissions::from_mode(e.mode & 0o7777))
                .map_err(|err| Error::io(what(), err))?;
        }
        let ts = |s: i64, ns: u32| TimeSpec::new(s, ns.min(999_999_999) as _);
        utimensat(
            nix::fcntl::AT_FDCWD,
            to,
            &ts(e.atime, e.atime_nsec),
            &ts(e.mtime, e.mtime_nsec),
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|err| Error::io(what(), err.into()))
    }
}
