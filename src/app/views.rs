//! The JSON shapes of the appliance's objects, one per object, shared by the HTTP API
//! and the command line's `--json` (local and `--server`), so that a script sees the
//! same fields whichever way it asked.

use serde_json::{Value, json};

use super::App;
use crate::manifest::BackupManifest;

impl App {
    /// A backup as `GET /api/v1/backups` and `blockvault --json backups list` show it
    /// (`backups show` adds `bytes_freed_if_deleted`). `bytes_new` and `bytes_stored`
    /// are the same figure: the stored bytes this backup added to its vault.
    /// `verified_boot` is the backup's last recovery drill (null when never drilled).
    pub fn backup_view(&self, vault: &str, m: &BackupManifest) -> Value {
        let d = m.disks.first();
        json!({
            "id": m.id,
            "name": m.name,
            "vault": vault,
            "resource": m.resource,
            "disk_id": m.resource,
            "resource_kind": m.resource_kind,
            "created": m.created,
            "logical_size": m.logical_size(),
            "bytes_allocated": m.disks.iter().map(|d| d.bytes_allocated).sum::<u64>(),
            "bytes_read": m.disks.iter().map(|d| d.bytes_read).sum::<u64>(),
            "bytes_new": m.bytes_stored(),
            "bytes_stored": m.bytes_stored(),
            "chunks_total": m.disks.iter().map(|d| d.chunks_total).sum::<u64>(),
            "chunks_read": m.disks.iter().map(|d| d.chunks_read).sum::<u64>(),
            "chunks_new": m.disks.iter().map(|d| d.chunks_new).sum::<u64>(),
            "kind": d.map(|d| d.kind),
            "strategy": d.map(|d| d.strategy.clone()),
            "format": d.map(|d| d.format.clone()),
            "reader": d.and_then(|d| d.reader.clone()),
            "encryption": d.and_then(|d| d.encryption.clone()),
            "parent": d.and_then(|d| d.parent.clone()),
            "note": d.and_then(|d| d.note.clone()),
            "seconds": m.seconds,
            "protected": self.catalog().is_protected(&m.id).unwrap_or(false),
            "verified_boot": self.catalog().last_drill(&m.id).ok().flatten(),
            "capture": m.capture,
            "disks": m.disks,
        })
    }

    /// One backup in full (`blockvault backups show`): [`App::backup_detail_cached`],
    /// with the figures computed now if the cache is stale.
    pub fn backup_detail(&self, entry: &crate::catalog::BackupEntry) -> crate::Result<Value> {
        self.exclusive_bytes(entry)?;
        Ok(self.backup_detail_cached(entry)?.0)
    }

    /// One backup as `GET /api/v1/backups/{id}` shows it: [`App::backup_view`] plus the
    /// cached stored bytes only it references, when they were computed
    /// (`bytes_freed_computed_at`) and whether a backup was added or deleted since
    /// (`bytes_freed_stale`: then a refresh is due, and the figure may be null). Never
    /// walks the vault; the caller schedules the refresh.
    pub fn backup_detail_cached(
        &self,
        entry: &crate::catalog::BackupEntry,
    ) -> crate::Result<(Value, super::Freshness)> {
        let mut v = self.backup_view(&entry.vault, &entry.manifest);
        let (bytes, at, fresh) = self.exclusive_bytes_cached(entry)?;
        v["bytes_freed_if_deleted"] = json!(bytes);
        v["bytes_freed_computed_at"] = json!(at);
        v["bytes_freed_stale"] = json!(fresh == super::Freshness::Stale);
        // The lock journal is the truth for protection and locks (`locks.rs`).
        match self.lock_status(entry) {
            Ok(st) => {
                v["protected"] = json!(st.protected);
                v["locked_until"] =
                    json!(st.locked_until().map(crate::vault::retention::format_time));
                v["lock_reason"] = json!(st.locked_until().and(st.reason));
            }
            Err(e) => v["lock_error"] = json!(e.to_string()),
        }
        Ok((v, fresh))
    }
}
