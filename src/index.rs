//! Disk index: which chunk digest sits at each chunk slot of a disk, as a two-level tree.
//!
//! The digests of a disk are cut into pages of [`PAGE_ENTRIES`] (1,024) entries; a page
//! covers 64 MiB of disk at 64 KiB chunks. Each page is a blob (kind `IndexPage`) addressed
//! by its digest; a root blob (kind `IndexRoot`) lists the page digests. A page whose
//! entries are all [`ChunkDigest::ZERO`] is not stored: the root records `ZERO` for it.
//! An incremental backup rewrites only the pages holding changed slots; unchanged pages
//! are the same blobs (dedup for free), so a backup of a 1 TiB disk where little changed
//! costs a few KiB of index. The root digest doubles as the index checksum.
//!
//! ```text
//! page plaintext:  n × digest[32]           (n = 1024, the last page may be shorter)
//! root plaintext:  magic "BVIX" | version u8 (1) | 3 pad | chunk_size u32 LE |
//!                  disk_size u64 LE | page_count u32 LE | 4 reserved |
//!                  page_count × digest[32]
//! ```

use crate::chunk::{ChunkDigest, ChunkSize};
use crate::error::{Error, Result};

/// Entries per index page.
pub const PAGE_ENTRIES: usize = 1024;
const ROOT_MAGIC: &[u8; 4] = b"BVIX";
const ROOT_VERSION: u8 = 1;
const ROOT_HEADER_LEN: usize = 28;

/// The root of a disk index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexRoot {
    pub disk_size: u64,
    pub chunk_size: ChunkSize,
    /// One digest per page (`ZERO` for an all-zero page).
    pub pages: Vec<ChunkDigest>,
}

impl IndexRoot {
    /// Number of chunk slots.
    pub fn chunk_count(&self) -> u64 {
        self.chunk_size.chunks_for(self.disk_size)
    }

    /// Number of entries page `p` holds.
    pub fn page_len(&self, p: usize) -> usize {
        page_len(self.chunk_count(), p)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ROOT_HEADER_LEN + self.pages.len() * 32);
        out.extend_from_slice(ROOT_MAGIC);
        out.push(ROOT_VERSION);
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&self.chunk_size.bytes().to_le_bytes());
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        for p in &self.pages {
            out.extend_from_slice(p.as_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<IndexRoot> {
        if bytes.len() < ROOT_HEADER_LEN || &bytes[..4] != ROOT_MAGIC {
            return Err(Error::corrupt("disk index root has a bad header"));
        }
        if bytes[4] != ROOT_VERSION {
            return Err(Error::unsupported(format!(
                "disk index version {}",
                bytes[4]
            )));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let chunk_size = ChunkSize::new(u32_at(8))
            .map_err(|e| Error::corrupt(format!("disk index root: {}", e.context())))?;
        let mut sz = [0u8; 8];
        sz.copy_from_slice(&bytes[12..20]);
        let disk_size = u64::from_le_bytes(sz);
        let page_count = u32_at(20) as usize;
        let expected_pages = pages_for(chunk_size.chunks_for(disk_size));
        if page_count != expected_pages || bytes.len() != ROOT_HEADER_LEN + page_count * 32 {
            return Err(Error::corrupt(format!(
                "disk index root lists {page_count} pages for a disk of {disk_size} bytes"
            )));
        }
        let pages = bytes[ROOT_HEADER_LEN..]
            .chunks_exact(32)
            .map(ChunkDigest::from_slice)
            .collect::<Result<Vec<_>>>()?;
        Ok(IndexRoot {
            disk_size,
            chunk_size,
            pages,
        })
    }
}

/// Pages needed for `chunks` slots.
pub fn pages_for(chunks: u64) -> usize {
    chunks.div_ceil(PAGE_ENTRIES as u64) as usize
}

/// Entries in page `p` of an index with `chunks` slots.
pub fn page_len(chunks: u64, p: usize) -> usize {
    let start = p as u64 * PAGE_ENTRIES as u64;
    chunks.saturating_sub(start).min(PAGE_ENTRIES as u64) as usize
}

/// Encode a page (None when all entries are zero: such a page is not stored).
pub fn encode_page(entries: &[ChunkDigest]) -> Option<Vec<u8>> {
    if entries.iter().all(ChunkDigest::is_zero) {
        return None;
    }
    let mut out = Vec::with_capacity(entries.len() * 32);
    for d in entries {
        out.extend_from_slice(d.as_bytes());
    }
    Some(out)
}

/// Decode a page that must hold exactly `expected` entries.
pub fn decode_page(bytes: &[u8], expected: usize) -> Result<Vec<ChunkDigest>> {
    if bytes.len() != expected * 32 {
        return Err(Error::corrupt(format!(
            "disk index page holds {} bytes, expected {} entries",
            bytes.len(),
            expected
        )));
    }
    bytes
        .chunks_exact(32)
        .map(ChunkDigest::from_slice)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn root_round_trip_and_page_lengths() {
        let cs = ChunkSize::new(65536).unwrap();
        let disk_size = 1024 * 65536 * 2 + 100;
        let root = IndexRoot {
            disk_size,
            chunk_size: cs,
            pages: vec![
                ChunkDigest([1; 32]),
                ChunkDigest::ZERO,
                ChunkDigest([3; 32]),
            ],
        };
        assert_eq!(root.chunk_count(), 2049);
        assert_eq!(root.page_len(0), 1024);
        assert_eq!(root.page_len(2), 1);
        assert_eq!(IndexRoot::decode(&root.encode()).unwrap(), root);
    }

    #[test]
    fn zero_pages_are_not_encoded() {
        assert!(encode_page(&[ChunkDigest::ZERO; 10]).is_none());
        let mut e = vec![ChunkDigest::ZERO; 10];
        e[9] = ChunkDigest([7; 32]);
        let b = encode_page(&e).unwrap();
        assert_eq!(decode_page(&b, 10).unwrap(), e);
        assert!(decode_page(&b, 9).is_err());
    }

    proptest! {
        #[test]
        fn root_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = IndexRoot::decode(&bytes);
        }
    }
}
