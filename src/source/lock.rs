//! QEMU's image locks, honoured the way `qemu-img` does.
//!
//! QEMU (block/file-posix.c) locks single bytes of an image file with open-file-description
//! (OFD) fcntl locks, always as *shared* (read) locks; a conflict is found by *testing*
//! for an exclusive lock on a byte:
//!
//! ```text
//! byte 100 + p   held (F_RDLCK) by every user that has permission p
//! byte 200 + p   held (F_RDLCK) by every user that does NOT share permission p
//! p: 0 consistent-read, 1 write, 2 write-unchanged, 3 resize
//! ```
//!
//! A backup reads with permission consistent-read and shares everything except write and
//! resize (like `qemu-img convert` without `-U`). So it takes read locks on bytes 100,
//! 201 and 203, and then tests bytes 101 and 103 (someone holds write or resize) and 200
//! (someone refuses to share consistent reads). While the backup runs, its locks keep a
//! QEMU from opening the image for writing, as `qemu-img` does.
//!
//! An image locked for writing is refused by default (a copy of it would not be
//! consistent): the user should back the VM up through its QMP socket (`qmp:`), where
//! blockvault takes a copy-before-write point in time. With `--force-inconsistent` the
//! image is read anyway, without taking any lock, and the backup is labelled
//! `inconsistent`.

use std::fs::File;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};

use crate::error::{Error, ErrorKind, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERM_CONSISTENT_READ: i64 = 0;
const PERM_WRITE: i64 = 1;
const PERM_RESIZE: i64 = 3;

/// The locks a backup holds on an image file while it reads it; released when dropped.
#[derive(Debug)]
pub struct ImageLock {
    /// The open file description that owns the locks (None: no locks held).
    _file: Option<File>,
    /// Set when the image was read although another process holds it open for writing.
    pub inconsistent: Option<String>,
}

/// Take the shared locks of a reader on the image at `path`. An image that another
/// process holds for writing is refused with `Conflict`, unless `force`, when no lock is
/// taken and [`ImageLock::inconsistent`] says why the copy is not consistent.
pub fn lock_image(path: &Path, force: bool) -> Result<ImageLock> {
    let file = super::open_file(path)?;
    let holder = match conflict(&file) {
        Ok(h) => h,
        Err(e) if unsupported(e) => {
            tracing::warn!(path = %path.display(), "image locks are not supported here: {e}");
            return Ok(ImageLock {
                _file: None,
                inconsistent: None,
            });
        }
        Err(e) => return Err(lock_err(path, e)),
    };
    if let Some(what) = holder {
        if !force {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "{}: another process holds the image open with QEMU's {what} lock, so a copy \
                     of it now would not be consistent; back up the running VM through its QMP \
                     socket instead (blockvault backup qmp:/path/to/qmp.sock), shut the VM down \
                     first, or pass --force-inconsistent to copy it anyway, labelled inconsistent \
                     (nothing was stored)",
                    path.display()
                ),
            ));
        }
        return Ok(ImageLock {
            _file: None,
            inconsistent: Some(format!(
                "{} was open for writing by another process ({what} lock held); read with \
                 --force-inconsistent, so the copy may mix old and new writes",
                path.display()
            )),
        });
    }
    for byte in [
        PERM_BASE + PERM_CONSISTENT_READ,
        SHARED_BASE + PERM_WRITE,
        SHARED_BASE + PERM_RESIZE,
    ] {
        match fcntl(&file, FcntlArg::F_OFD_SETLK(&flock(libc::F_RDLCK, byte))) {
            Ok(_) => {}
            Err(e) if unsupported(e) => {}
            Err(e) => return Err(lock_err(path, e)),
        }
    }
    // A writer may have arrived between the test and our locks: test again, now that a
    // new writer would see our locks and refuse to start.
    if let Ok(Some(what)) = conflict(&file) {
        return Err(Error::conflict(format!(
            "{}: another process took QEMU's {what} lock on the image while the backup was \
             starting; try again, or back up the running VM through its QMP socket (nothing \
             was stored)",
            path.display()
        )));
    }
    Ok(ImageLock {
        _file: Some(file),
        inconsistent: None,
    })
}

/// Which conflicting lock another process holds, if any.
fn conflict(file: &File) -> std::result::Result<Option<&'static str>, Errno> {
    for (byte, what) in [
        (PERM_BASE + PERM_WRITE, "'write'"),
        (PERM_BASE + PERM_RESIZE, "'resize'"),
        (
            SHARED_BASE + PERM_CONSISTENT_READ,
            "unshared 'consistent read'",
        ),
    ] {
        let mut fl = flock(libc::F_WRLCK, byte);
        fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl))?;
        if i32::from(fl.l_type) != libc::F_UNLCK {
            return Ok(Some(what));
        }
    }
    Ok(None)
}

fn flock(kind: i32, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

fn unsupported(e: Errno) -> bool {
    matches!(e, Errno::ENOTSUP | Errno::EINVAL | Errno::ENOLCK)
}

fn lock_err(path: &Path, e: Errno) -> Error {
    Error::io(
        format!("{}: checking QEMU's image locks", path.display()),
        std::io::Error::from(e),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_does_not_block_a_reader_but_a_writer_blocks_both() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let a = lock_image(&p, false).unwrap();
        assert!(a.inconsistent.is_none());
        let b = lock_image(&p, false).unwrap();
        drop((a, b));
        // A writer as QEMU takes it: read lock on byte 101.
        let w = File::open(&p).unwrap();
        fcntl(&w, FcntlArg::F_OFD_SETLK(&flock(libc::F_RDLCK, 101))).unwrap();
        let e = lock_image(&p, false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert!(e.to_string().contains("qmp:"), "{e}");
        let forced = lock_image(&p, true).unwrap();
        assert!(forced.inconsistent.is_some());
    }
}
