//! Cached figures of the vaults: what is costly to compute (pack directory listings,
//! index walks) and cheap to keep. The API serves these with their age; the service
//! refreshes them off the request path after a backup, a delete, a prune or a GC.
//!
//! ```text
//! vault_figures  (vault PK, body JSON VaultFigures, computed_at)
//! backup_figures (id PK, vault, exclusive_bytes, backups_key, computed_at)
//! ```
//! `backups_key` is the blake3 of the sorted ids of the vault's backups when the figure
//! was computed: the bytes only one backup references change exactly when that set
//! changes, so a figure whose key differs from the vault's current key is stale.

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use super::Catalog;
use crate::error::{Error, Result};

/// A vault's usage as last computed from its files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaultFigures {
    pub id: String,
    pub chunk_size: u32,
    pub zstd_level: i32,
    /// Stored (compressed) blob bytes.
    pub stored_bytes: u64,
    /// Bytes of pack files on disk.
    pub pack_bytes: u64,
    pub packs: usize,
    pub capacity: Option<u64>,
    /// When these were computed (RFC 3339); filled from the row.
    #[serde(default)]
    pub computed_at: String,
}

/// The stored bytes only one backup references, as last computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupFigure {
    pub exclusive_bytes: u64,
    pub backups_key: String,
    pub computed_at: String,
}

impl Catalog {
    /// The key of the current set of backups of `vault` (see the module doc).
    pub fn backups_key(&self, vault: &str) -> Result<String> {
        let mut st = self
            .conn
            .prepare_cached("SELECT id FROM backups WHERE vault = ?1 ORDER BY id")?;
        let mut h = blake3::Hasher::new();
        let mut rows = st.query(params![vault])?;
        while let Some(r) = rows.next()? {
            let id: String = r.get(0)?;
            h.update(id.as_bytes());
            h.update(b"\n");
        }
        Ok(h.finalize().to_hex()[..32].to_string())
    }

    pub fn put_vault_figures(&self, vault: &str, f: &VaultFigures, at: &str) -> Result<()> {
        let body = serde_json::to_string(f)
            .map_err(|e| Error::invalid("encoding vault figures").with_source(e))?;
        self.conn.execute(
            "INSERT INTO vault_figures (vault, body, computed_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(vault) DO UPDATE SET body = ?2, computed_at = ?3",
            params![vault, body, at],
        )?;
        Ok(())
    }

    pub fn vault_figures(&self, vault: &str) -> Result<Option<VaultFigures>> {
        let row: Option<(String, String)> = self
            .conn
            .prepare_cached("SELECT body, computed_at FROM vault_figures WHERE vault = ?1")?
            .query_row(params![vault], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        row.map(|(body, at)| {
            let mut f: VaultFigures = serde_json::from_str(&body)
                .map_err(|e| Error::invalid("cached vault figures").with_source(e))?;
            f.computed_at = at;
            Ok(f)
        })
        .transpose()
    }

    /// Store the exclusive bytes of every backup of `vault` in one transaction.
    pub fn put_backup_figures(
        &self,
        vault: &str,
        key: &str,
        at: &str,
        figures: &[(String, u64)],
    ) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        tx.execute(
            "DELETE FROM backup_figures WHERE vault = ?1",
            params![vault],
        )?;
        {
            let mut st = tx.prepare(
                "INSERT OR REPLACE INTO backup_figures (id, vault, exclusive_bytes, backups_key, computed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for (id, bytes) in figures {
                st.execute(params![id, vault, *bytes as i64, key, at])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn backup_figure(&self, id: &str) -> Result<Option<BackupFigure>> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT exclusive_bytes, backups_key, computed_at FROM backup_figures WHERE id = ?1",
            )?
            .query_row(params![id], |r| {
                Ok(BackupFigure {
                    exclusive_bytes: r.get::<_, i64>(0)? as u64,
                    backups_key: r.get(1)?,
                    computed_at: r.get(2)?,
                })
            })
            .optional()?)
    }

    /// Sum of the virtual sizes and the number of the backups of `vault`, in SQL.
    pub fn vault_backup_totals(&self, vault: &str) -> Result<(usize, u64)> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(logical_size), 0) FROM backups WHERE vault = ?1",
            )?
            .query_row(params![vault], |r| {
                Ok((r.get::<_, i64>(0)? as usize, r.get::<_, i64>(1)? as u64))
            })?)
    }
}
