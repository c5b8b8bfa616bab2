//! The chunk lookup index: digest → (pack, offset, length).
//!
//! Used for dedup (does the vault already hold this blob?) and restore (where is it?).
//! It is a cache inside the vault (`cache/lookup.sqlite`, SQLite WAL, `WITHOUT ROWID`
//! keyed by digest) and can always be rebuilt from the pack trailers: memory stays
//! bounded however large the vault grows (SQLite pages, not a hash map of every digest).
//! Each thread opens its own connection; WAL lets readers run beside the one writer.
//!
//! On open, [`LookupIndex::reconcile`] compares the packs table with the store's packs and
//! indexes packs it has not seen (written by a crashed process, or copied in) and forgets
//! packs that are gone.

use std::collections::HashSet;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::chunk::{BlobKind, ChunkDigest};
use crate::error::Result;

use super::pack::{PackEntry, PackId, PackInfo, read_pack_entries};
use super::store::ChunkStore;

/// Where a blob is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLocation {
    pub pack: PackId,
    pub offset: u64,
    pub length: u32,
    pub kind: BlobKind,
}

fn insert_pack_row(tx: &rusqlite::Transaction<'_>, pack: &PackInfo) -> Result<()> {
    let blob_bytes: u64 = pack.entries.iter().map(|e| e.length as u64).sum();
    tx.execute(
        "INSERT OR REPLACE INTO packs (id, size, blobs, blob_bytes) VALUES (?1, ?2, ?3, ?4)",
        params![
            &pack.id.0[..],
            pack.size as i64,
            pack.entries.len() as i64,
            blob_bytes as i64
        ],
    )?;
    Ok(())
}

/// One connection to a vault's lookup index.
pub struct LookupIndex {
    conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS blobs (
    digest BLOB PRIMARY KEY,
    pack   BLOB NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    kind   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs(pack);
CREATE TABLE IF NOT EXISTS packs (
    id    BLOB PRIMARY KEY,
    size  INTEGER NOT NULL,
    blobs INTEGER NOT NULL,
    blob_bytes INTEGER NOT NULL
) WITHOUT ROWID;
";

impl LookupIndex {
    /// Open (creating if needed) the index at `path`.
    pub fn open(path: &Path) -> Result<LookupIndex> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(60))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(LookupIndex { conn })
    }

    /// Is this blob stored in the vault?
    pub fn contains(&self, digest: &ChunkDigest) -> Result<bool> {
        let mut st = self
            .conn
            .prepare_cached("SELECT 1 FROM blobs WHERE digest = ?1")?;
        Ok(st.exists(params![&digest.0[..]])?)
    }

    /// Where is this blob?
    pub fn get(&self, digest: &ChunkDigest) -> Result<Option<BlobLocation>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT pack, offset, length, kind FROM blobs WHERE digest = ?1")?;
        let row = st
            .query_row(params![&digest.0[..]], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .optional()?;
        let Some((pack, offset, length, kind)) = row else {
            return Ok(None);
        };
        Ok(Some(BlobLocation {
            pack: PackId::from_slice(&pack)?,
            offset: offset as u64,
            length: length as u32,
            kind: BlobKind::from_u8(kind as u8)?,
        }))
    }

    /// Record a durable pack. A digest already indexed elsewhere keeps its first location.
    pub fn insert_pack(&mut self, pack: &PackInfo) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO blobs (digest, pack, offset, length, kind) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for e in &pack.entries {
                st.execute(params![
                    &e.digest.0[..],
                    &pack.id.0[..],
                    e.offset as i64,
                    e.length as i64,
                    e.kind as i64
                ])?;
            }
            insert_pack_row(&tx, pack)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Forget a pack and every blob location that points into it.
    pub fn remove_pack(&mut self, id: PackId) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM blobs WHERE pack = ?1", params![&id.0[..]])?;
        tx.execute("DELETE FROM packs WHERE id = ?1", params![&id.0[..]])?;
        tx.commit()?;
        Ok(())
    }

    /// Point `entries` (moved by GC) at their new pack, and forget `old` packs, in one
    /// transaction.
    pub fn replace_packs(&mut self, old: &[PackId], new: &[PackInfo]) -> Result<()> {
        let tx = self.conn.transaction()?;
        for id in old {
            tx.execute("DELETE FROM blobs WHERE pack = ?1", params![&id.0[..]])?;
            tx.execute("DELETE FROM packs WHERE id = ?1", params![&id.0[..]])?;
        }
        for pack in new {
            for e in &pack.entries {
                tx.execute(
                    "INSERT OR REPLACE INTO blobs (digest, pack, offset, length, kind) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![&e.digest.0[..], &pack.id.0[..], e.offset as i64, e.length as i64, e.kind as i64],
                )?;
            }
            insert_pack_row(&tx, pack)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Packs known to the index.
    pub fn packs(&self) -> Result<Vec<(PackId, u64)>> {
        let mut st = self.conn.prepare_cached("SELECT id, size FROM packs")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, size) = row?;
            out.push((PackId::from_slice(&id)?, size as u64));
        }
        Ok(out)
    }

    /// Sum of the stored (compressed) lengths of every blob in every pack.
    pub fn stored_blob_bytes(&self) -> Result<u64> {
        let n: i64 =
            self.conn
                .query_row("SELECT COALESCE(SUM(blob_bytes), 0) FROM packs", [], |r| {
                    r.get(0)
                })?;
        Ok(n as u64)
    }

    /// Blobs whose indexed location is in `pack`.
    pub fn entries_in_pack(&self, pack: PackId) -> Result<Vec<PackEntry>> {
        let mut st = self.conn.prepare_cached(
            "SELECT digest, offset, length, kind FROM blobs WHERE pack = ?1 ORDER BY offset",
        )?;
        let rows = st.query_map(params![&pack.0[..]], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (d, offset, length, kind) = row?;
            out.push(PackEntry {
                digest: ChunkDigest::from_slice(&d)?,
                offset: offset as u64,
                length: length as u32,
                kind: BlobKind::from_u8(kind as u8)?,
            });
        }
        Ok(out)
    }

    /// Bring the index in line with the store: index unseen packs, forget vanished ones.
    /// Returns (packs added, packs removed). A pack whose trailer is corrupt is skipped
    /// and reported in the log; `verify` names it.
    pub fn reconcile(&mut self, store: &dyn ChunkStore) -> Result<(usize, usize)> {
        let on_disk: HashSet<PackId> = store.list_packs()?.into_iter().collect();
        let known: HashSet<PackId> = self.packs()?.into_iter().map(|(id, _)| id).collect();
        let mut added = 0;
        for id in on_disk.difference(&known) {
            match read_pack_entries(store, *id) {
                Ok(entries) => {
                    let size = store.pack_len(*id)?;
                    self.insert_pack(&PackInfo {
                        id: *id,
                        size,
                        entries,
                    })?;
                    added += 1;
                }
                Err(e) => tracing::warn!("not indexing pack {id}: {e}"),
            }
        }
        let mut removed = 0;
        for id in known.difference(&on_disk) {
            self.remove_pack(*id)?;
            removed += 1;
        }
        Ok((added, removed))
    }

    /// Drop everything and rebuild from the pack trailers.
    pub fn rebuild(&mut self, store: &dyn ChunkStore) -> Result<(usize, usize)> {
        self.conn
            .execute_batch("DELETE FROM blobs; DELETE FROM packs;")?;
        self.reconcile(store)
    }
}
