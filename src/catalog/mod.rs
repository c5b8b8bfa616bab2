//! The appliance's catalog: SQLite (WAL) in the data dir.
//!
//! It records which vaults exist (name → path) and caches every backup manifest so that
//! listings do not walk the vaults. Everything it holds about backups can be rebuilt
//! from the vaults (`vault rescan`): the vault is the truth, the catalog a cache.
//! The schema is versioned with `PRAGMA user_version` and migrated by the embedded,
//! ordered [`MIGRATIONS`]; a catalog newer than this build is refused.
//!
//! The service's own state (tokens, resources, policies, tasks, audit, alerts) lives here
//! too (`service`; the webhook outbox and stale-backup episodes in `outbox`); that part is not in any vault. The backups' protected flag here is a
//! cache of the vault's lock journal (`vault::retention`), synced at rescan/attach.
//! `figures` caches what is costly to compute from a vault (usage, the bytes only one
//! backup references) so that the API serves them without walking the vault.
//!
//! One `Catalog` is one SQLite connection. WAL lets several connections read while one
//! writes, so the service keeps a small pool of them (see `app::AppPool`) rather than one
//! connection behind a global lock.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{Error, Result};
use crate::manifest::BackupManifest;

/// Ordered schema migrations; migration `i` brings the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE vaults (
    name       TEXT PRIMARY KEY,
    path       TEXT NOT NULL,
    vault_id   TEXT NOT NULL,
    chunk_size INTEGER NOT NULL,
    created    TEXT NOT NULL
);
CREATE TABLE backups (
    id           TEXT PRIMARY KEY,
    vault        TEXT NOT NULL REFERENCES vaults(name) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    resource     TEXT NOT NULL,
    created      TEXT NOT NULL,
    logical_size INTEGER NOT NULL,
    bytes_stored INTEGER NOT NULL,
    manifest     TEXT NOT NULL
);
CREATE INDEX backups_by_resource ON backups(vault, resource, created);
CREATE INDEX backups_by_name ON backups(name);
",
    "
ALTER TABLE backups ADD COLUMN protected INTEGER NOT NULL DEFAULT 0;
CREATE TABLE tokens (
    id      TEXT PRIMARY KEY,
    name    TEXT NOT NULL UNIQUE,
    role    TEXT NOT NULL,
    hash    TEXT NOT NULL UNIQUE,
    created TEXT NOT NULL
);
CREATE TABLE resources (
    name    TEXT PRIMARY KEY,
    body    TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE policies (
    name     TEXT PRIMARY KEY,
    body     TEXT NOT NULL,
    last_run TEXT,
    created  TEXT NOT NULL
);
CREATE TABLE tasks (
    id       TEXT PRIMARY KEY,
    body     TEXT NOT NULL,
    state    TEXT NOT NULL,
    created  TEXT NOT NULL
);
CREATE INDEX tasks_by_state ON tasks(state, created);
CREATE TABLE audit (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    at     TEXT NOT NULL,
    token  TEXT NOT NULL,
    role   TEXT NOT NULL,
    method TEXT NOT NULL,
    path   TEXT NOT NULL,
    status INTEGER NOT NULL
);
CREATE TABLE alerts (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TEXT NOT NULL,
    kind    TEXT NOT NULL,
    subject TEXT NOT NULL,
    message TEXT NOT NULL
);
",
    "
CREATE INDEX tasks_by_created ON tasks(created);
CREATE TABLE vault_figures (
    vault       TEXT PRIMARY KEY,
    body        TEXT NOT NULL,
    computed_at TEXT NOT NULL
);
CREATE TABLE backup_figures (
    id              TEXT PRIMARY KEY,
    vault           TEXT NOT NULL,
    exclusive_bytes INTEGER NOT NULL,
    backups_key     TEXT NOT NULL,
    computed_at     TEXT NOT NULL
);
",
    "
CREATE TABLE drills (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    backup_id TEXT NOT NULL,
    vault     TEXT NOT NULL,
    resource  TEXT NOT NULL,
    at        TEXT NOT NULL,
    ok        INTEGER NOT NULL,
    body      TEXT NOT NULL
);
CREATE INDEX drills_by_backup ON drills(backup_id, seq);
CREATE INDEX drills_by_resource ON drills(resource, seq);
",
    // Token expiry and last use (issue 16 item 4).
    "
ALTER TABLE tokens ADD COLUMN expires TEXT;
ALTER TABLE tokens ADD COLUMN last_used TEXT;
",
    // An alert's typed details (resource, vault, backup, task …) as JSON.
    "
ALTER TABLE alerts ADD COLUMN details TEXT NOT NULL DEFAULT '{}';
",
    // Webhook deliveries that survive a restart, and stale-backup episodes (`outbox`).
    "
CREATE TABLE alert_outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    url        TEXT NOT NULL,
    kind       TEXT NOT NULL,
    body       TEXT NOT NULL,
    created    TEXT NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_try   INTEGER NOT NULL,
    state      TEXT NOT NULL,
    last_error TEXT,
    updated    TEXT NOT NULL
);
CREATE INDEX alert_outbox_due ON alert_outbox(state, next_try);
CREATE TABLE stale_watch (
    resource      TEXT NOT NULL,
    policy        TEXT NOT NULL,
    watched_since TEXT NOT NULL,
    stale_since   TEXT,
    PRIMARY KEY (resource, policy)
);
",
];

/// A vault known to the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultEntry {
    pub name: String,
    pub path: PathBuf,
    pub vault_id: String,
    pub chunk_size: u32,
    pub created: String,
}

/// What of a backup can change after it was made, as the catalog knows it (see
/// [`Catalog::backup_ids`]): a list view rendered for one state is stale for another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupState {
    pub id: String,
    pub protected: bool,
    /// Sequence number of its last drill (None: never drilled).
    pub last_drill: Option<i64>,
}

/// A backup as the catalog knows it.
#[derive(Debug, Clone)]
pub struct BackupEntry {
    pub vault: String,
    pub manifest: BackupManifest,
}

mod drills;
mod figures;
mod outbox;
mod pool;
mod service;

pub use figures::{BackupFigure, VaultFigures};
pub use outbox::{
    DeliveryRecord, DeliveryState, LastBackup, NewDelivery, OutboxRow, StaleWatch, Trimmed,
};
pub use pool::{Lent, Pool};
pub use service::{AlertRecord, AuditRecord, Role, Table, TokenInfo};

/// An open catalog.
pub struct Catalog {
    conn: Connection,
}

impl Catalog {
    /// Open (creating and migrating as needed) the catalog in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Catalog> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| Error::io(format!("creating data dir {}", data_dir.display()), e))?;
        let conn = Connection::open(data_dir.join("catalog.sqlite"))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut cat = Catalog { conn };
        cat.migrate()?;
        Ok(cat)
    }

    fn migrate(&mut self) -> Result<()> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version as usize > MIGRATIONS.len() {
            return Err(Error::unsupported(format!(
                "catalog schema version {version} is newer than this build ({})",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Schema version in use.
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    pub fn add_vault(&self, v: &VaultEntry) -> Result<()> {
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO vaults (name, path, vault_id, chunk_size, created) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![v.name, v.path.to_string_lossy(), v.vault_id, v.chunk_size as i64, v.created],
        )?;
        if n == 0 {
            return Err(Error::conflict(format!(
                "a vault named {:?} already exists",
                v.name
            )));
        }
        Ok(())
    }

    pub fn vaults(&self) -> Result<Vec<VaultEntry>> {
        let mut st = self.conn.prepare(
            "SELECT name, path, vault_id, chunk_size, created FROM vaults ORDER BY name",
        )?;
        let rows = st.query_map([], |r| {
            Ok(VaultEntry {
                name: r.get(0)?,
                path: PathBuf::from(r.get::<_, String>(1)?),
                vault_id: r.get(2)?,
                chunk_size: r.get::<_, i64>(3)? as u32,
                created: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn remove_vault(&self, name: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM backups WHERE vault = ?1", params![name])?;
        self.conn
            .execute("DELETE FROM backup_figures WHERE vault = ?1", params![name])?;
        self.conn
            .execute("DELETE FROM vault_figures WHERE vault = ?1", params![name])?;
        self.conn
            .execute("DELETE FROM vaults WHERE name = ?1", params![name])?;
        Ok(())
    }

    pub fn vault(&self, name: &str) -> Result<VaultEntry> {
        self.vaults()?
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| {
                Error::not_found(format!(
                    "no vault named {name:?} (see `blockvault vault list`)"
                ))
            })
    }

    /// Record (or refresh) a backup.
    pub fn put_backup(&self, vault: &str, m: &BackupManifest) -> Result<()> {
        let json = serde_json::to_string(m)
            .map_err(|e| Error::invalid("encoding manifest").with_source(e))?;
        self.conn.execute(
            "INSERT INTO backups (id, vault, name, resource, created, logical_size, bytes_stored, manifest)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(id) DO UPDATE SET vault = ?2, name = ?3, resource = ?4, created = ?5,
                 logical_size = ?6, bytes_stored = ?7, manifest = ?8",
            params![
                m.id,
                vault,
                m.name,
                m.resource,
                m.created,
                m.logical_size() as i64,
                m.bytes_stored() as i64,
                json
            ],
        )?;
        Ok(())
    }

    /// Backups, oldest first, optionally filtered by vault and resource (disk id).
    pub fn backups(&self, vault: Option<&str>, resource: Option<&str>) -> Result<Vec<BackupEntry>> {
        let mut st = self.conn.prepare(
            "SELECT vault, manifest FROM backups
             WHERE (?1 IS NULL OR vault = ?1) AND (?2 IS NULL OR resource = ?2)
             ORDER BY created, id",
        )?;
        let rows = st.query_map(params![vault, resource], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (vault, json) = row?;
            let manifest = BackupManifest::from_json(json.as_bytes())?;
            out.push(BackupEntry { vault, manifest });
        }
        Ok(out)
    }

    /// Ids and changeable state (protected flag, last drill) of the backups
    /// [`Catalog::backups`] would list, in the same order, without reading their
    /// manifests.
    pub fn backup_ids(
        &self,
        vault: Option<&str>,
        resource: Option<&str>,
    ) -> Result<Vec<BackupState>> {
        // The last drill's seq: one seek per backup in drills_by_backup.
        let mut st = self.conn.prepare_cached(
            "SELECT id, protected,
                    (SELECT MAX(seq) FROM drills d WHERE d.backup_id = backups.id)
             FROM backups
             WHERE (?1 IS NULL OR vault = ?1) AND (?2 IS NULL OR resource = ?2)
             ORDER BY created, id",
        )?;
        let rows = st.query_map(params![vault, resource], |r| {
            Ok(BackupState {
                id: r.get::<_, String>(0)?,
                protected: r.get::<_, i64>(1)? != 0,
                last_drill: r.get::<_, Option<i64>>(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Find a backup by id or by name; a name shared by several backups is ambiguous.
    pub fn find_backup(&self, id_or_name: &str) -> Result<BackupEntry> {
        let by_id: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT vault, manifest FROM backups WHERE id = ?1",
                params![id_or_name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((vault, json)) = by_id {
            return Ok(BackupEntry {
                vault,
                manifest: BackupManifest::from_json(json.as_bytes())?,
            });
        }
        let mut st = self
            .conn
            .prepare("SELECT vault, manifest FROM backups WHERE name = ?1")?;
        let rows: Vec<(String, String)> = st
            .query_map(params![id_or_name], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        match rows.len() {
            0 => self.find_backup_by_prefix(id_or_name),
            1 => {
                let (vault, json) = rows.into_iter().next().unwrap_or_default();
                Ok(BackupEntry {
                    vault,
                    manifest: BackupManifest::from_json(json.as_bytes())?,
                })
            }
            n => Err(Error::conflict(format!(
                "{n} backups are named {id_or_name:?}; use the backup id instead"
            ))),
        }
    }

    /// The one backup whose id starts with `prefix`; several are a conflict that lists
    /// them, none is not found.
    fn find_backup_by_prefix(&self, prefix: &str) -> Result<BackupEntry> {
        let none = || Error::not_found(format!("no backup with id, id prefix or name {prefix:?}"));
        if prefix.is_empty() {
            return Err(none());
        }
        let mut st = self.conn.prepare(
            "SELECT vault, manifest, id, name, resource FROM backups
             WHERE substr(id, 1, length(?1)) = ?1 ORDER BY created, id",
        )?;
        let rows: Vec<(String, String, String, String, String)> = st
            .query_map(params![prefix], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        match rows.as_slice() {
            [] => Err(none()),
            [(vault, json, ..)] => Ok(BackupEntry {
                vault: vault.clone(),
                manifest: BackupManifest::from_json(json.as_bytes())?,
            }),
            many => {
                let list: Vec<String> = many
                    .iter()
                    .take(10)
                    .map(|(_, _, id, name, res)| format!("{id} ({name} of {res})"))
                    .collect();
                Err(Error::conflict(format!(
                    "id prefix {prefix:?} matches {} backups: {}{}; give more of the id",
                    many.len(),
                    list.join(", "),
                    if many.len() > 10 { ", …" } else { "" }
                )))
            }
        }
    }

    /// Is `name` already used by a backup of `resource` in `vault`?
    pub fn name_taken(&self, vault: &str, resource: &str, name: &str) -> Result<bool> {
        let mut st = self.conn.prepare_cached(
            "SELECT 1 FROM backups WHERE vault = ?1 AND resource = ?2 AND name = ?3",
        )?;
        Ok(st.exists(params![vault, resource, name])?)
    }

    pub fn remove_backup(&self, id: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM backups WHERE id = ?1", params![id])?;
        self.conn
            .execute("DELETE FROM backup_figures WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// Replace the catalog's backups of `vault` with `manifests` (rescan).
    pub fn replace_backups(&mut self, vault: &str, manifests: &[BackupManifest]) -> Result<()> {
        let protected = self.protected_ids(vault)?;
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM backups WHERE vault = ?1", params![vault])?;
        tx.commit()?;
        for m in manifests {
            self.put_backup(vault, m)?;
            if protected.contains(&m.id) {
                self.set_protected(&m.id, true)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_once_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(dir.path()).unwrap();
        assert_eq!(c.schema_version().unwrap(), MIGRATIONS.len() as i64);
        drop(c);
        let c = Catalog::open(dir.path()).unwrap();
        assert_eq!(c.schema_version().unwrap(), MIGRATIONS.len() as i64);
        let v = VaultEntry {
            name: "v".into(),
            path: dir.path().join("v"),
            vault_id: "x".into(),
            chunk_size: 65536,
            created: "now".into(),
        };
        c.add_vault(&v).unwrap();
        assert!(c.add_vault(&v).is_err());
        assert_eq!(c.vault("v").unwrap(), v);
        assert!(c.vault("w").is_err());
    }
}
