//! The chunk lookup index: digest → (pack, offset, length).
//!
//! Used for dedup (does the vault already hold this blob?) and restore (where is it?).
//! It is a cache inside the vault (`cache/lookup.sqlite`, SQLite WAL, `WITHOUT ROWID`
//! keyed by digest) and can always be rebuilt from the pack trailers: memory stays
//! bounded however large the vault grows (SQLite pages, not a hash map of every digest).
//! Each thread opens its own connection; WAL lets readers run beside the one writer.
//!
//! The pack trailers are the authority; this index is only a cache of them:
//! - [`LookupIndex::reconcile`] indexes packs the index has not seen (a crashed writer's,
//!   or copied in). It reads the index's own pack list *before* listing the store, so a
//!   pack published in between by a parallel backup is never taken for vanished; it
//!   forgets vanished packs only when asked to, which only GC (exclusive lock) does.
//! - [`TrailerScan`] cross-checks the index against the trailers of the packs scanned
//!   (verify, GC) and heals it in one transaction: rows that match no trailer entry, or
//!   that point at a known-bad copy (see `badblobs`), or into a pack that no longer
//!   exists, are dropped; digests the trailers hold but the index lacks are added. The
//!   trailer entries are staged in a TEMP table, so memory stays bounded.
//! - A read whose cached location fails falls back to the trailers and repairs the row
//!   ([`LookupIndex::set_location`], used by `Vault::read_blob`).

use std::collections::HashSet;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::chunk::{BlobKind, ChunkDigest};
use crate::error::Result;

use super::badblobs::BadBlobs;
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

    /// Bring the index in line with the store: index unseen packs and, when `forget` is
    /// set (only under the exclusive vault lock), forget vanished ones. Returns (packs
    /// added, packs removed). A pack whose trailer is corrupt is skipped and reported in
    /// the log; `verify` names it.
    pub fn reconcile(&mut self, store: &dyn ChunkStore, forget: bool) -> Result<(usize, usize)> {
        // The index's own list first: a pack published after this read is then merely
        // "unseen" (indexed twice, harmless), never "vanished".
        let known: HashSet<PackId> = self.packs()?.into_iter().map(|(id, _)| id).collect();
        let on_disk: HashSet<PackId> = store.list_packs()?.into_iter().collect();
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
        if forget {
            for id in known.difference(&on_disk) {
                self.remove_pack(*id)?;
                removed += 1;
            }
        }
        Ok((added, removed))
    }

    /// Point `digest` at `loc` (a copy found in the trailers after the cached location
    /// failed).
    pub fn set_location(&self, digest: &ChunkDigest, loc: &BlobLocation) -> Result<()> {
        self.conn.execute(
            "INSERT OR REPLACE INTO blobs (digest, pack, offset, length, kind) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                &digest.0[..],
                &loc.pack.0[..],
                loc.offset as i64,
                loc.length as i64,
                loc.kind as i64
            ],
        )?;
        Ok(())
    }

    /// Forget `digest`'s row if it points at `pack`/`offset` (a copy found bad).
    pub fn forget_copy(&self, digest: &ChunkDigest, pack: PackId, offset: u64) -> Result<bool> {
        let n = self.conn.execute(
            "DELETE FROM blobs WHERE digest = ?1 AND pack = ?2 AND offset = ?3",
            params![&digest.0[..], &pack.0[..], offset as i64],
        )?;
        Ok(n > 0)
    }

    /// Start cross-checking this index against pack trailers (see [`TrailerScan`]).
    pub fn trailer_scan(&mut self) -> Result<TrailerScan<'_>> {
        self.conn.execute_batch(
            "CREATE TEMP TABLE IF NOT EXISTS scan_entries (
                 digest BLOB NOT NULL, pack BLOB NOT NULL, offset INTEGER NOT NULL,
                 length INTEGER NOT NULL, kind INTEGER NOT NULL, bad INTEGER NOT NULL,
                 PRIMARY KEY (digest, pack, offset)) WITHOUT ROWID;
             CREATE INDEX IF NOT EXISTS temp.scan_entries_by_pack ON scan_entries(pack);
             CREATE TEMP TABLE IF NOT EXISTS scan_packs (
                 id BLOB PRIMARY KEY, size INTEGER NOT NULL, blobs INTEGER NOT NULL,
                 blob_bytes INTEGER NOT NULL) WITHOUT ROWID;
             CREATE TEMP TABLE IF NOT EXISTS scan_existing (id BLOB PRIMARY KEY) WITHOUT ROWID;
             DELETE FROM scan_entries; DELETE FROM scan_packs; DELETE FROM scan_existing;",
        )?;
        Ok(TrailerScan { index: self })
    }

    /// Drop everything and rebuild from the pack trailers.
    pub fn rebuild(&mut self, store: &dyn ChunkStore) -> Result<(usize, usize)> {
        self.conn
            .execute_batch("DELETE FROM blobs; DELETE FROM packs;")?;
        let (added, removed) = self.reconcile(store, true)?;
        // Known-bad copies must not come back through the rebuild.
        for c in BadBlobs::load(store)?.iter() {
            self.forget_copy(&c.digest, c.pack, c.offset)?;
        }
        Ok((added, removed))
    }
}

/// What a [`TrailerScan`] found wrong in the index (and fixed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IndexRepair {
    /// Rows dropped: wrong pack/offset/length/kind, a known-bad copy, or a gone pack.
    pub stale_rows: u64,
    /// Rows added for digests the trailers hold but the index lacked.
    pub missing_rows: u64,
}

impl IndexRepair {
    pub fn is_empty(&self) -> bool {
        self.stale_rows == 0 && self.missing_rows == 0
    }
}

/// A cross-check of the index against pack trailers. Feed it every scanned pack with
/// [`add_pack`](Self::add_pack), then [`heal`](Self::heal).
pub struct TrailerScan<'a> {
    index: &'a mut LookupIndex,
}

impl TrailerScan<'_> {
    /// The index being checked (for updates that must precede [`heal`](Self::heal)).
    pub fn index(&mut self) -> &mut LookupIndex {
        self.index
    }

    /// Stage one pack's trailer; copies listed in `bad` are staged as bad.
    pub fn add_pack(&mut self, pack: &PackInfo, bad: &BadBlobs) -> Result<()> {
        let tx = self.index.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO scan_entries (digest, pack, offset, length, kind, bad) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for e in &pack.entries {
                st.execute(params![
                    &e.digest.0[..],
                    &pack.id.0[..],
                    e.offset as i64,
                    e.length as i64,
                    e.kind as i64,
                    bad.contains(&e.digest, pack.id, e.offset) as i64
                ])?;
            }
            let blob_bytes: u64 = pack.entries.iter().map(|e| e.length as u64).sum();
            tx.execute(
                "INSERT OR REPLACE INTO scan_packs (id, size, blobs, blob_bytes) VALUES (?1, ?2, ?3, ?4)",
                params![&pack.id.0[..], pack.size as i64, pack.entries.len() as i64, blob_bytes as i64],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Make the index agree with the staged trailers, in one transaction. `existing` is
    /// called inside the transaction (so no writer can index a pack between the two) and
    /// returns every pack that exists now; rows pointing elsewhere are dropped. Rows in
    /// packs that exist but were not scanned are left alone.
    pub fn heal(self, existing: impl FnOnce() -> Result<Vec<PackId>>) -> Result<IndexRepair> {
        let conn = &mut self.index.conn;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut st = tx.prepare("INSERT OR IGNORE INTO scan_existing (id) VALUES (?1)")?;
            for id in existing()? {
                st.execute(params![&id.0[..]])?;
            }
        }
        let stale = tx.execute(
            "DELETE FROM blobs WHERE
                 pack NOT IN (SELECT id FROM scan_existing)
              OR (pack IN (SELECT id FROM scan_packs) AND NOT EXISTS (
                     SELECT 1 FROM scan_entries t WHERE t.digest = blobs.digest
                       AND t.pack = blobs.pack AND t.offset = blobs.offset
                       AND t.length = blobs.length AND t.kind = blobs.kind AND t.bad = 0))",
            [],
        )?;
        let missing = tx.execute(
            "INSERT OR IGNORE INTO blobs (digest, pack, offset, length, kind)
                 SELECT digest, pack, offset, length, kind FROM scan_entries
                 WHERE bad = 0 AND pack IN (SELECT id FROM scan_existing)",
            [],
        )?;
        tx.execute(
            "DELETE FROM packs WHERE id NOT IN (SELECT id FROM scan_existing)",
            [],
        )?;
        tx.execute(
            "INSERT OR REPLACE INTO packs (id, size, blobs, blob_bytes)
                 SELECT id, size, blobs, blob_bytes FROM scan_packs
                 WHERE id IN (SELECT id FROM scan_existing)",
            [],
        )?;
        tx.execute_batch(
            "DELETE FROM scan_entries; DELETE FROM scan_packs; DELETE FROM scan_existing;",
        )?;
        tx.commit()?;
        Ok(IndexRepair {
            stale_rows: stale as u64,
            missing_rows: missing as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::chunk::encode_blob;
    use crate::vault::pack::PackWriter;
    use crate::vault::store::{LocalStore, ObjectMeta};

    type Hook = Box<dyn FnOnce() + Send>;

    /// A store whose pack listing is followed, before it returns, by a parallel backup
    /// publishing and indexing a pack (the window the reconcile must not misread).
    struct RacingStore {
        inner: Arc<LocalStore>,
        after_list: Mutex<Option<Hook>>,
    }

    impl ChunkStore for RacingStore {
        fn describe(&self) -> String {
            self.inner.describe()
        }
        fn get(&self, key: &str) -> Result<Vec<u8>> {
            self.inner.get(key)
        }
        fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
            self.inner.get_range(key, offset, len)
        }
        fn len(&self, key: &str) -> Result<u64> {
            self.inner.len(key)
        }
        fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
            self.inner.put(key, bytes)
        }
        fn put_spooled(&self, key: &str, spooled: &Path) -> Result<()> {
            self.inner.put_spooled(key, spooled)
        }
        fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
            let listed = self.inner.list(prefix);
            if prefix == "packs"
                && let Some(hook) = self.after_list.lock().unwrap().take()
            {
                hook();
            }
            listed
        }
        fn delete(&self, key: &str) -> Result<()> {
            self.inner.delete(key)
        }
    }

    fn write_pack(store: Arc<LocalStore>, content: &[u8]) -> PackInfo {
        let spool = PathBuf::from(store.describe()).join("spool");
        let mut w = PackWriter::new(store, &spool, 1 << 20);
        let blob = encode_blob(
            BlobKind::Data,
            content.to_vec(),
            1,
            &crate::chunk::BlobCodec::plain(),
        )
        .unwrap();
        assert!(w.add(&blob).unwrap().is_none());
        w.finish_current().unwrap().unwrap()
    }

    #[test]
    fn a_pack_published_while_reconciling_is_not_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("lookup.sqlite");
        let inner = Arc::new(LocalStore::new(dir.path()));
        let first = write_pack(Arc::clone(&inner), b"first");
        let mut index = LookupIndex::open(&db).unwrap();
        index.insert_pack(&first).unwrap();

        let (hook_store, hook_db) = (Arc::clone(&inner), db.clone());
        let published = Arc::new(Mutex::new(None));
        let out = Arc::clone(&published);
        let store = RacingStore {
            inner,
            after_list: Mutex::new(Some(Box::new(move || {
                let p = write_pack(hook_store, b"parallel backup");
                LookupIndex::open(&hook_db)
                    .unwrap()
                    .insert_pack(&p)
                    .unwrap();
                *out.lock().unwrap() = Some(p);
            }))),
        };
        // Even when allowed to forget vanished packs, the parallel one stays indexed.
        index.reconcile(&store, true).unwrap();
        let p = published.lock().unwrap().clone().unwrap();
        let indexed: Vec<PackId> = index
            .packs()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert!(indexed.contains(&p.id), "the parallel pack was forgotten");
        assert!(indexed.contains(&first.id));
        assert!(index.get(&p.entries[0].digest).unwrap().is_some());
    }
}
