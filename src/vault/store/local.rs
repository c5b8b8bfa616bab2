//! [`LocalStore`]: a vault in a local directory (or a mounted NAS), keys as relative paths.
//!
//! Every write is atomic: a staging file is fsynced, renamed into place, and the directory
//! fsynced, so a crash leaves either the old state or the new one. Staging files are
//! hidden (`.name.tmp-…`) or end in `.tmp` (`packs/tmp/`), and listings skip them.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use super::{ChunkStore, ObjectMeta, check_key};
use crate::error::{Error, ErrorKind, IoContext, Result};

/// How many file handles a [`LocalStore`] keeps open for ranged reads.
const OPEN_FILE_CACHE: usize = 256;

/// A vault in a local directory (or a mounted NAS).
pub struct LocalStore {
    root: PathBuf,
    open: Mutex<HashMap<String, Arc<File>>>,
}

fn not_found_or_io(k: std::io::ErrorKind) -> ErrorKind {
    if k == std::io::ErrorKind::NotFound {
        ErrorKind::NotFound
    } else {
        ErrorKind::Io
    }
}

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> LocalStore {
        LocalStore {
            root: root.into(),
            open: Mutex::new(HashMap::new()),
        }
    }

    fn key_path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    fn open_file(&self, key: &str) -> Result<Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = open.get(key) {
            return Ok(Arc::clone(f));
        }
        let path = self.key_path(key)?;
        let file = File::open(&path).map_err(|e| {
            Error::new(
                not_found_or_io(e.kind()),
                format!("opening {}", path.display()),
            )
            .with_source(e)
        })?;
        if open.len() >= OPEN_FILE_CACHE {
            open.clear();
        }
        let file = Arc::new(file);
        open.insert(key.to_owned(), Arc::clone(&file));
        Ok(file)
    }

    fn forget_open(&self, key: &str) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// fsync a directory so that a rename in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("syncing directory {}", dir.display()))
}

/// Write `bytes` to `path` atomically (staging file, fsync, rename, fsync dir).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::invalid(format!("no parent directory for {}", path.display())))?;
    fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(
        ".{name}.tmp-{}",
        hex::encode(rand::random::<[u8; 6]>())
    ));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(format!("writing {}", path.display()), e));
    }
    sync_dir(dir)
}

impl ChunkStore for LocalStore {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let path = self.key_path(key)?;
        fs::read(&path).map_err(|e| {
            Error::new(
                not_found_or_io(e.kind()),
                format!("reading {}", path.display()),
            )
            .with_source(e)
        })
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let file = self.open_file(key)?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ErrorKind::Corrupt
            } else {
                ErrorKind::Io
            };
            Error::new(
                kind,
                format!(
                    "reading {len} bytes at {offset} of {}",
                    self.root.join(key).display()
                ),
            )
            .with_source(e)
        })?;
        Ok(buf)
    }

    fn len(&self, key: &str) -> Result<u64> {
        Ok(self
            .open_file(key)?
            .metadata()
            .ctx(|| format!("stat of {}", self.root.join(key).display()))?
            .len())
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.forget_open(key);
        write_atomic(&self.key_path(key)?, bytes)
    }

    fn put_spooled(&self, key: &str, spooled: &Path) -> Result<()> {
        let path = self.key_path(key)?;
        let dir = path.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        self.forget_open(key);
        match fs::rename(spooled, &path) {
            Ok(()) => sync_dir(dir),
            // Spooled on another file system: copy it (atomically), then drop the spool.
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                let bytes = fs::read(spooled).ctx(|| format!("reading {}", spooled.display()))?;
                write_atomic(&path, &bytes)?;
                fs::remove_file(spooled).ctx(|| format!("removing {}", spooled.display()))
            }
            Err(e) => Err(Error::io(format!("publishing {}", path.display()), e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        fn walk(dir: &Path, key: &str, out: &mut Vec<ObjectMeta>) -> std::io::Result<()> {
            let entries = match fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            for e in entries {
                let e = e?;
                let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                // Staging files: hidden ones (write_atomic) and spooled packs.
                if name.starts_with('.') || name.ends_with(".tmp") {
                    continue;
                }
                let k = format!("{key}/{name}");
                let ft = e.file_type()?;
                if ft.is_dir() {
                    walk(&e.path(), &k, out)?;
                } else if ft.is_file() {
                    let len = e.metadata()?.len();
                    out.push(ObjectMeta { key: k, len });
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        walk(&self.key_path(prefix)?, prefix, &mut out)
            .ctx(|| format!("listing {prefix} in {}", self.root.display()))?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.forget_open(key);
        let path = self.key_path(key)?;
        fs::remove_file(&path).map_err(|e| {
            Error::new(
                not_found_or_io(e.kind()),
                format!("removing {}", path.display()),
            )
            .with_source(e)
        })?;
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        Ok(())
    }
}

/// Identifier of a pack: 16 random bytes, hex in file names.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    pub fn random() -> PackId {
        PackId(rand::random())
    }

    pub fn from_slice(b: &[u8]) -> Result<PackId> {
        let arr: [u8; 16] = b
            .try_into()
            .map_err(|_| Error::corrupt(format!("pack id must be 16 bytes, got {}", b.len())))?;
        Ok(PackId(arr))
    }
}

impl fmt::Display for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackId({self})")
    }
}

impl FromStr for PackId {
    type Err = Error;
    fn from_str(s: &str) -> Result<PackId> {
        let b = hex::decode(s).map_err(|_| Error::invalid(format!("bad pack id {s:?}")))?;
        PackId::from_slice(&b)
    }
}
