//! A set of digests on disk, so that GC's live set does not grow RAM with the vault.
//!
//! A private temporary SQLite database (`Connection::open("")`: a file SQLite deletes
//! when the set is dropped) with one `WITHOUT ROWID` table keyed by the digest: a sorted
//! B-tree on disk, read through a page cache of fixed size ([`CACHE_KIB`]). Inserts go
//! into one open transaction (nothing here needs durability).

use rusqlite::{Connection, params};

use crate::chunk::ChunkDigest;
use crate::error::Result;

/// Page cache of one set, in KiB: the set's whole memory budget.
pub const CACHE_KIB: i64 = 32 << 10;

/// A set of digests kept on disk.
pub struct DigestSet {
    conn: Connection,
    len: u64,
}

impl DigestSet {
    pub fn new() -> Result<DigestSet> {
        let conn = Connection::open("")?;
        conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
        conn.pragma_update(None, "journal_mode", "OFF")?;
        conn.pragma_update(None, "synchronous", "OFF")?;
        conn.execute_batch("CREATE TABLE set_ (d BLOB PRIMARY KEY) WITHOUT ROWID; BEGIN;")?;
        Ok(DigestSet { conn, len: 0 })
    }

    /// Add `d`; true if it was not there yet.
    pub fn insert(&mut self, d: &ChunkDigest) -> Result<bool> {
        let mut st = self
            .conn
            .prepare_cached("INSERT OR IGNORE INTO set_ (d) VALUES (?1)")?;
        let added = st.execute(params![&d.0[..]])? == 1;
        self.len += added as u64;
        Ok(added)
    }

    pub fn contains(&self, d: &ChunkDigest) -> Result<bool> {
        let mut st = self
            .conn
            .prepare_cached("SELECT 1 FROM set_ WHERE d = ?1")?;
        Ok(st.exists(params![&d.0[..]])?)
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_and_contains() {
        let mut s = DigestSet::new().unwrap();
        let a = ChunkDigest::of(b"a");
        let b = ChunkDigest::of(b"b");
        assert!(s.insert(&a).unwrap());
        assert!(!s.insert(&a).unwrap());
        assert!(s.contains(&a).unwrap());
        assert!(!s.contains(&b).unwrap());
        assert_eq!(s.len(), 1);
    }
}
