//! File-level restore on a data dir: a backup's disk opened for `files` (CLI and API).

use std::sync::Arc;

use super::{App, pick_disk};
use crate::disk_reader::{CHUNK_CACHE_BYTES, DiskCache};
use crate::error::Result;
use crate::files::Disk;
use crate::vault::pin::PinGuard;

/// One disk of a backup, open for `files`: partitions known, the backup pinned (GC
/// keeps its chunks) until dropped.
pub struct FilesSession {
    pub backup_id: String,
    pub disk_name: String,
    pub disk: Disk,
    _pin: PinGuard,
}

impl App {
    /// Open disk `disk` (default: the first) of a backup for file-level restore.
    pub fn open_files(&self, id_or_name: &str, disk: Option<&str>) -> Result<FilesSession> {
        let entry = self.resolve_backup(id_or_name, disk)?;
        let vault = Arc::new(self.open_vault(&entry.vault)?);
        let d = pick_disk(&entry.manifest, disk)?;
        let pin = vault.pin(&[&entry.manifest])?;
        let cache = Arc::new(DiskCache::open(vault, d, CHUNK_CACHE_BYTES)?);
        let disk_name = d.name.clone();
        let opened = Disk::open(cache.reader()?)
            .map_err(|e| e.context_prefix(format!("disk {disk_name}")))?;
        Ok(FilesSession {
            backup_id: entry.manifest.id.clone(),
            disk_name,
            disk: opened,
            _pin: pin,
        })
    }
}
