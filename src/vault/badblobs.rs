//! Known-bad blob copies: what `verify` found rotten, recorded in the vault itself.
//!
//! A copy is one blob at one place (digest, pack, offset). Once a copy is listed here:
//! the lookup index never points at it (so dedup stops reusing it and the next backup
//! that meets the same content stores a good copy in a new pack, healing every backup
//! that references the digest), restore falls back to another copy, and GC never keeps
//! it when a good copy exists. Entries whose pack is gone are dropped by GC.
//!
//! File `<vault>/bad-blobs` (written atomically through the store; small, text):
//!
//! ```text
//! blockvault bad-blobs 1                      magic and version
//! <digest hex> <pack hex> <offset decimal>    one line per bad copy, sorted
//! ...
//! end <blake3 hex of every byte above this line>
//! ```
//!
//! A missing file means "no known bad copy". A damaged file is a `Corrupt` error naming
//! the file: delete it and run `verify` again to rebuild it.

use std::collections::BTreeSet;

use crate::chunk::ChunkDigest;
use crate::error::{Error, ErrorKind, Result};

use super::pack::PackId;
use super::store::ChunkStore;

/// Store key of the list.
pub const BAD_BLOBS_KEY: &str = "bad-blobs";
const HEADER: &str = "blockvault bad-blobs 1\n";
/// Refuse lists larger than this (a sanity cap on a file read from disk).
const MAX_FILE: usize = 64 << 20;

/// One bad copy of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BadCopy {
    pub digest: ChunkDigest,
    pub pack: PackId,
    pub offset: u64,
}

/// The set of known-bad copies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BadBlobs {
    copies: BTreeSet<BadCopy>,
}

impl BadBlobs {
    /// Load the list (empty when the vault has none).
    pub fn load(store: &dyn ChunkStore) -> Result<BadBlobs> {
        match store.get_file(BAD_BLOBS_KEY) {
            Ok(bytes) => BadBlobs::decode(&bytes).map_err(|e| {
                e.context_prefix(format!(
                    "vault file {BAD_BLOBS_KEY} (delete it and run `verify` to rebuild it)"
                ))
            }),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(BadBlobs::default()),
            Err(e) => Err(e),
        }
    }

    /// Write the list atomically (removes the file when empty).
    pub fn save(&self, store: &dyn ChunkStore) -> Result<()> {
        if self.copies.is_empty() {
            return match store.get_file(BAD_BLOBS_KEY) {
                Ok(_) => store.remove_file(BAD_BLOBS_KEY),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            };
        }
        store.put_file(BAD_BLOBS_KEY, &self.encode())
    }

    pub fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }

    pub fn len(&self) -> usize {
        self.copies.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &BadCopy> {
        self.copies.iter()
    }

    /// Is this copy known bad?
    pub fn contains(&self, digest: &ChunkDigest, pack: PackId, offset: u64) -> bool {
        self.copies.contains(&BadCopy {
            digest: *digest,
            pack,
            offset,
        })
    }

    /// Record a bad copy; true if it was new.
    pub fn insert(&mut self, copy: BadCopy) -> bool {
        self.copies.insert(copy)
    }

    /// Keep only the copies for which `keep` says true; returns how many were dropped.
    pub fn retain(&mut self, mut keep: impl FnMut(&BadCopy) -> bool) -> usize {
        let before = self.copies.len();
        self.copies.retain(|c| keep(c));
        before - self.copies.len()
    }

    fn encode(&self) -> Vec<u8> {
        let mut body = String::from(HEADER);
        for c in &self.copies {
            body.push_str(&format!("{} {} {}\n", c.digest, c.pack, c.offset));
        }
        let sum = blake3::hash(body.as_bytes());
        body.push_str(&format!("end {}\n", sum.to_hex()));
        body.into_bytes()
    }

    fn decode(bytes: &[u8]) -> Result<BadBlobs> {
        if bytes.len() > MAX_FILE {
            return Err(Error::corrupt(format!(
                "is {} bytes, more than the {MAX_FILE} allowed",
                bytes.len()
            )));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| Error::corrupt("is not UTF-8"))?;
        let body_end = text
            .trim_end_matches('\n')
            .rfind('\n')
            .map(|i| i + 1)
            .ok_or_else(|| Error::corrupt("is truncated"))?;
        let (body, end) = text.split_at(body_end);
        let sum = end
            .trim_end()
            .strip_prefix("end ")
            .ok_or_else(|| Error::corrupt("has no end line (truncated?)"))?;
        if blake3::hash(body.as_bytes()).to_hex().as_str() != sum {
            return Err(Error::corrupt("fails its checksum"));
        }
        let rest = body
            .strip_prefix(HEADER)
            .ok_or_else(|| Error::unsupported("has an unknown header or version"))?;
        let mut copies = BTreeSet::new();
        for (n, line) in rest.lines().enumerate() {
            let mut f = line.split(' ');
            let (Some(d), Some(p), Some(o), None) = (f.next(), f.next(), f.next(), f.next()) else {
                return Err(Error::corrupt(format!("line {} is malformed", n + 2)));
            };
            let bad = |_| Error::corrupt(format!("line {} is malformed", n + 2));
            copies.insert(BadCopy {
                digest: d.parse().map_err(bad)?,
                pack: p.parse().map_err(bad)?,
                offset: o
                    .parse()
                    .map_err(|_| Error::corrupt(format!("line {} is malformed", n + 2)))?,
            });
        }
        Ok(BadBlobs { copies })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> BadBlobs {
        let mut b = BadBlobs::default();
        b.insert(BadCopy {
            digest: ChunkDigest([7; 32]),
            pack: PackId([1; 16]),
            offset: 8,
        });
        b.insert(BadCopy {
            digest: ChunkDigest([9; 32]),
            pack: PackId([2; 16]),
            offset: 4096,
        });
        b
    }

    #[test]
    fn round_trip() {
        let b = sample();
        assert_eq!(BadBlobs::decode(&b.encode()).unwrap(), b);
        let empty = BadBlobs::default();
        assert_eq!(BadBlobs::decode(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn a_flipped_byte_is_refused() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x04;
            assert!(BadBlobs::decode(&b).is_err(), "flip at {i} accepted");
        }
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = BadBlobs::decode(&bytes);
        }
    }
}
