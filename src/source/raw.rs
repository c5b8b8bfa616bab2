//! Raw image files and block devices.
//!
//! Reads with `pread`; finds the allocated extents with `SEEK_DATA`/`SEEK_HOLE` so holes
//! are never read (a file system without support reports the whole file as data, which
//! is a correct over-approximation). Block devices have no holes: their size comes from
//! seeking to the end.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Whence, lseek};

use super::{BlockSource, Extent, MAX_DISK_SIZE, SourceFormat, check_read, open_file, push_extent};
use crate::error::{Error, IoContext, Result};

/// A raw disk image (or block device).
pub struct RawSource {
    file: File,
    path: PathBuf,
    size: u64,
}

impl RawSource {
    pub fn open(path: &Path) -> Result<RawSource> {
        let mut file = open_file(path)?;
        let size = file
            .seek(SeekFrom::End(0))
            .ctx(|| format!("finding the size of {}", path.display()))?;
        if size > MAX_DISK_SIZE {
            return Err(Error::unsupported(format!(
                "{}: disk size {size} exceeds the limit of {MAX_DISK_SIZE} bytes",
                path.display()
            )));
        }
        Ok(RawSource {
            file,
            path: path.to_path_buf(),
            size,
        })
    }
}

impl BlockSource for RawSource {
    fn format(&self) -> SourceFormat {
        SourceFormat::Raw
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_read(&self.path.display(), self.size, offset, buf.len())?;
        self.file.read_exact_at(buf, offset).ctx(|| {
            format!(
                "reading {} bytes at offset {offset} of {}",
                buf.len(),
                self.path.display()
            )
        })
    }

    fn allocated_extents(&mut self) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        let fd = self.file.as_fd();
        let mut pos: u64 = 0;
        while pos < self.size {
            let data = match lseek(fd, pos as i64, Whence::SeekData) {
                Ok(d) => d as u64,
                Err(nix::errno::Errno::ENXIO) => break, // no data after pos
                Err(nix::errno::Errno::EINVAL) if pos == 0 => {
                    // SEEK_DATA unsupported: everything counts as data.
                    return Ok(vec![Extent {
                        offset: 0,
                        length: self.size,
                    }]);
                }
                Err(e) => {
                    return Err(Error::io(
                        format!("SEEK_DATA in {}", self.path.display()),
                        std::io::Error::from(e),
                    ));
                }
            };
            if data >= self.size {
                break;
            }
            let hole = match lseek(fd, data as i64, Whence::SeekHole) {
                Ok(h) => (h as u64).min(self.size),
                Err(_) => self.size,
            };
            if hole <= data {
                break;
            }
            push_extent(&mut out, data, hole - data);
            pos = hole;
        }
        Ok(out)
    }
}
