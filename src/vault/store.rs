//! Storage backends of a vault.
//!
//! [`ChunkStore`] is the seam between the vault logic (packs, index, manifests, GC) and
//! where the bytes live. It knows two kinds of objects: immutable packs (by [`PackId`]) and
//! small named files (manifests, keyed by a relative path such as
//! `backups/<disk>/<backup>.json`). [`LocalStore`] keeps them in a directory; an S3 store
//! maps the same keys to objects.
//!
//! Every write is atomic: a staging file is fsynced, renamed into place, and the directory
//! fsynced, so a crash leaves either the old state or the new one.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use crate::error::{Error, ErrorKind, IoContext, Result};

/// Where a vault's packs and manifests live.
pub trait ChunkStore: Send + Sync {
    /// A local path where a new pack may be staged before [`publish_pack`](Self::publish_pack).
    fn staging_path(&self, id: PackId) -> Result<PathBuf>;
    /// Remove staged packs left behind by crashed writers (only under the exclusive
    /// vault lock, when no writer can be running). Returns how many were removed.
    fn clean_staging(&self) -> Result<usize>;
    /// Publish a fully written, fsynced staged pack under `id` (atomic).
    fn publish_pack(&self, id: PackId, staged: &Path) -> Result<()>;
    /// Length of a pack in bytes.
    fn pack_len(&self, id: PackId) -> Result<u64>;
    /// Read `len` bytes of a pack at `offset`.
    fn read_pack_range(&self, id: PackId, offset: u64, len: usize) -> Result<Vec<u8>>;
    /// Every published pack.
    fn list_packs(&self) -> Result<Vec<PackId>>;
    /// Remove a pack (GC only).
    fn remove_pack(&self, id: PackId) -> Result<()>;
    /// Write a small file atomically.
    fn put_file(&self, key: &str, bytes: &[u8]) -> Result<()>;
    /// Read a small file.
    fn get_file(&self, key: &str) -> Result<Vec<u8>>;
    /// Keys of the files under `prefix` (recursive), sorted.
    fn list_files(&self, prefix: &str) -> Result<Vec<String>>;
    /// Remove a file.
    fn remove_file(&self, key: &str) -> Result<()>;
}

/// How many pack file handles a [`LocalStore`] keeps open for reads.
const OPEN_PACK_CACHE: usize = 256;

/// A vault in a local directory (or a mounted NAS).
pub struct LocalStore {
    root: PathBuf,
    open: Mutex<HashMap<PackId, Arc<File>>>,
}

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> LocalStore {
        LocalStore {
            root: root.into(),
            open: Mutex::new(HashMap::new()),
        }
    }

    fn pack_path(&self, id: PackId) -> PathBuf {
        let hex = id.to_string();
        self.root
            .join("packs")
            .join(&hex[..2])
            .join(format!("{hex}.pack"))
    }

    fn key_path(&self, key: &str) -> Result<PathBuf> {
        if key
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
            || key.starts_with('/')
        {
            return Err(Error::invalid(format!("bad vault key {key:?}")));
        }
        Ok(self.root.join(key))
    }

    fn open_pack(&self, id: PackId) -> Result<Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = open.get(&id) {
            return Ok(Arc::clone(f));
        }
        let path = self.pack_path(id);
        let file = File::open(&path).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound {
                ErrorKind::NotFound
            } else {
                ErrorKind::Io
            };
            Error::new(kind, format!("opening pack {}", path.display())).with_source(e)
        })?;
        if open.len() >= OPEN_PACK_CACHE {
            open.clear();
        }
        let file = Arc::new(file);
        open.insert(id, Arc::clone(&file));
        Ok(file)
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
    fn staging_path(&self, id: PackId) -> Result<PathBuf> {
        let dir = self.root.join("packs").join("tmp");
        fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        Ok(dir.join(format!("{id}.tmp")))
    }

    fn clean_staging(&self) -> Result<usize> {
        let dir = self.root.join("packs").join("tmp");
        let mut n = 0;
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                fs::remove_file(e.path()).ctx(|| format!("removing {}", e.path().display()))?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn publish_pack(&self, id: PackId, staged: &Path) -> Result<()> {
        let path = self.pack_path(id);
        let dir = path.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        fs::rename(staged, &path).ctx(|| format!("publishing pack {}", path.display()))?;
        sync_dir(dir)
    }

    fn pack_len(&self, id: PackId) -> Result<u64> {
        Ok(self
            .open_pack(id)?
            .metadata()
            .ctx(|| format!("stat of pack {id}"))?
            .len())
    }

    fn read_pack_range(&self, id: PackId, offset: u64, len: usize) -> Result<Vec<u8>> {
        let file = self.open_pack(id)?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ErrorKind::Corrupt
            } else {
                ErrorKind::Io
            };
            Error::new(
                kind,
                format!("reading {len} bytes at {offset} of pack {id}"),
            )
            .with_source(e)
        })?;
        Ok(buf)
    }

    fn list_packs(&self) -> Result<Vec<PackId>> {
        let packs = self.root.join("packs");
        let mut out = Vec::new();
        let dirs = match fs::read_dir(&packs) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io(format!("listing {}", packs.display()), e)),
        };
        for d in dirs {
            let d = d.ctx(|| format!("listing {}", packs.display()))?;
            let name = d.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.len() != 2 {
                continue;
            }
            for f in fs::read_dir(d.path()).ctx(|| format!("listing {}", d.path().display()))? {
                let f = f.ctx(|| format!("listing {}", d.path().display()))?;
                let fname = f.file_name();
                if let Some(id) = fname.to_str().and_then(|n| n.strip_suffix(".pack"))
                    && let Ok(id) = id.parse()
                {
                    out.push(id);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn remove_pack(&self, id: PackId) -> Result<()> {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let path = self.pack_path(id);
        fs::remove_file(&path).ctx(|| format!("removing pack {}", path.display()))
    }

    fn put_file(&self, key: &str, bytes: &[u8]) -> Result<()> {
        write_atomic(&self.key_path(key)?, bytes)
    }

    fn get_file(&self, key: &str) -> Result<Vec<u8>> {
        let path = self.key_path(key)?;
        fs::read(&path).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound {
                ErrorKind::NotFound
            } else {
                ErrorKind::Io
            };
            Error::new(kind, format!("reading {}", path.display())).with_source(e)
        })
    }

    fn list_files(&self, prefix: &str) -> Result<Vec<String>> {
        fn walk(dir: &Path, key: &str, out: &mut Vec<String>) -> std::io::Result<()> {
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
                if name.starts_with('.') {
                    continue;
                }
                let k = format!("{key}/{name}");
                if e.file_type()?.is_dir() {
                    walk(&e.path(), &k, out)?;
                } else {
                    out.push(k);
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        walk(&self.key_path(prefix)?, prefix, &mut out)
            .ctx(|| format!("listing {prefix} in {}", self.root.display()))?;
        out.sort();
        Ok(out)
    }

    fn remove_file(&self, key: &str) -> Result<()> {
        let path = self.key_path(key)?;
        fs::remove_file(&path).ctx(|| format!("removing {}", path.display()))?;
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
