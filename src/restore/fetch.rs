//! Fetching chunks for a restore worker: blob locations by pack, not by chunk.
//!
//! Asking the SQLite lookup index once per chunk costs a read transaction each (file
//! locks and stats: two thirds of a restore's system time measured here). A backup
//! writes a disk's chunks into packs in disk order, so a restore meets them pack by pack:
//! the first chunk of a pack costs one query for its location and one for every location
//! in that pack ([`LookupIndex::entries_in_pack`]); the rest of the pack is served from
//! memory. At most [`CACHED_PACKS`] packs' locations are kept per worker (a few hundred
//! KiB), evicted oldest first.
//!
//! On object storage (a vault whose store is shared, e.g. S3) every read is a request, so
//! a blob's read also fetches the blobs that follow it in its pack, up to
//! [`READ_AHEAD`] bytes, in the same ranged GET; the next blobs of the disk are then
//! served from that window (a worker keeps the last [`WINDOWS`]). A worker is told the chunks of its batch first
//! ([`Fetcher::expect`]): the window then stops at the last of them in that pack, so
//! workers that share a pack read disjoint ranges, never the same bytes twice. A restore
//! from object storage hands each worker batches of about [`READ_AHEAD`] bytes and runs
//! at least [`GETS_IN_FLIGHT`] workers, so that many GETs are in flight ahead of the
//! writer. A local vault reads each blob with its own `pread` (the page cache does the
//! read-ahead).
//!
//! Any failure on this fast path (missing pack, bad blob) is retried through
//! [`Vault::read_blob`], the vault's own read path, so that errors read the same as
//! everywhere else and whatever that path does to recover applies to restores too.

use std::collections::{HashMap, VecDeque};

use crate::chunk::{ChunkDigest, Decoder};
use crate::error::Result;
use crate::vault::Vault;
use crate::vault::lookup::LookupIndex;
use crate::vault::pack::PackId;

/// Packs whose blob locations one worker keeps.
pub const CACHED_PACKS: usize = 16;

/// Bytes one ranged read of a shared (object) store covers at most.
pub const READ_AHEAD: u64 = 8 << 20;

/// Windows one worker keeps: an incremental's batch alternates between the full's packs
/// and the incremental's own, and one window would be read again after each switch.
pub const WINDOWS: usize = 2;

/// Restore workers (so ranged GETs in flight) at least, on a shared (object) store.
pub const GETS_IN_FLIGHT: usize = 4;

/// One worker's view of the vault.
pub struct Fetcher<'a> {
    vault: &'a Vault,
    lookup: LookupIndex,
    /// digest → (pack, offset, stored length) for the cached packs.
    locations: HashMap<ChunkDigest, (PackId, u64, u32)>,
    /// Cached packs, oldest first, with their digests (for eviction).
    packs: VecDeque<(PackId, Vec<ChunkDigest>)>,
    decoder: Decoder,
    capacity: usize,
    /// Shared store: the last [`WINDOWS`] windows read, newest last, (pack, offset of
    /// its first byte, bytes).
    windows: VecDeque<(PackId, u64, Vec<u8>)>,
    read_ahead: bool,
    /// The end of the last blob of the current batch in each of its packs.
    expected_end: HashMap<PackId, u64>,
}

impl<'a> Fetcher<'a> {
    pub fn new(vault: &'a Vault) -> Result<Fetcher<'a>> {
        Fetcher::with_capacity(vault, CACHED_PACKS)
    }

    /// A fetcher that keeps the locations of at most `packs` packs.
    pub fn with_capacity(vault: &'a Vault, packs: usize) -> Result<Fetcher<'a>> {
        Ok(Fetcher {
            capacity: packs.max(1),
            vault,
            lookup: vault.lookup()?,
            locations: HashMap::new(),
            packs: VecDeque::new(),
            decoder: Decoder::new(vault.codec()?)?,
            windows: VecDeque::new(),
            read_ahead: vault.is_shared_store(),
            expected_end: HashMap::new(),
        })
    }

    /// The chunks this worker fetches next: a window read for one of them stops at the
    /// last of them in its pack (other workers read what follows). Chunks not indexed
    /// are skipped here (their fetch fails as the vault says).
    pub fn expect<'d>(&mut self, digests: impl Iterator<Item = &'d ChunkDigest>) {
        self.expected_end.clear();
        if !self.read_ahead {
            return;
        }
        for d in digests {
            let loc = match self.locations.get(d) {
                Some(&l) => Some(l),
                None => match self.lookup.get(d) {
                    Ok(Some(loc)) => {
                        if self.cache_pack(loc.pack).is_err() {
                            continue;
                        }
                        Some((loc.pack, loc.offset, loc.length))
                    }
                    _ => None,
                },
            };
            if let Some((pack, offset, length)) = loc {
                let end = self.expected_end.entry(pack).or_insert(0);
                *end = (*end).max(offset + u64::from(length));
            }
        }
    }

    /// Hand the verified plaintext of `digest` to `f` (without copying it when the
    /// blob is stored raw); `f`'s error is returned as is.
    pub fn fetch<T>(
        &mut self,
        digest: &ChunkDigest,
        f: impl FnOnce(&[u8]) -> T,
    ) -> std::result::Result<T, crate::Error> {
        let stored = match self.fast(digest) {
            Ok(Some(stored)) => stored,
            Ok(None) | Err(_) => {
                let (_, plain) = self.vault.read_blob(&self.lookup, digest)?;
                return Ok(f(&plain));
            }
        };
        match self.decoder.decode(&stored, digest) {
            Ok((_, plain)) => Ok(f(plain)),
            Err(_) => {
                let (_, plain) = self.vault.read_blob(&self.lookup, digest)?;
                Ok(f(&plain))
            }
        }
    }

    /// The stored bytes of `digest` by the cached locations, `None` if not indexed.
    fn fast(&mut self, digest: &ChunkDigest) -> Result<Option<Vec<u8>>> {
        let (pack, offset, length) = match self.locations.get(digest) {
            Some(l) => *l,
            None => {
                let Some(loc) = self.lookup.get(digest)? else {
                    return Ok(None);
                };
                self.cache_pack(loc.pack)?;
                (loc.pack, loc.offset, loc.length)
            }
        };
        if !self.read_ahead {
            return self
                .vault
                .store()
                .read_pack_range(pack, offset, length as usize)
                .map(Some);
        }
        let end = offset + u64::from(length);
        if let Some((_, start, bytes)) = self.windows.iter().find(|(p, start, bytes)| {
            *p == pack && offset >= *start && end <= *start + bytes.len() as u64
        }) {
            let at = (offset - start) as usize;
            return Ok(Some(bytes[at..at + length as usize].to_vec()));
        }
        // The window: this blob and the known blobs that follow it, up to READ_AHEAD
        // bytes (never past the last indexed blob, so never past the pack's end) and
        // never past the last blob of this pack the batch needs.
        let mut limit = offset + READ_AHEAD.max(u64::from(length));
        if let Some(&want) = self.expected_end.get(&pack) {
            limit = limit.min(want.max(end));
        }
        let window_end = self
            .packs
            .iter()
            .find(|(p, _)| *p == pack)
            .into_iter()
            .flat_map(|(_, digests)| digests.iter())
            .filter_map(|d| self.locations.get(d))
            .map(|&(_, o, l)| (o, o + u64::from(l)))
            .filter(|&(o, e)| o >= offset && e <= limit)
            .map(|(_, e)| e)
            .max()
            .unwrap_or(end)
            .max(end);
        let bytes =
            self.vault
                .store()
                .read_pack_range(pack, offset, (window_end - offset) as usize)?;
        let Some(blob) = bytes.get(..length as usize).map(<[u8]>::to_vec) else {
            return Err(crate::Error::corrupt(format!(
                "pack {pack}: {} bytes read at offset {offset}, {length} expected",
                bytes.len()
            )));
        };
        if self.windows.len() >= WINDOWS {
            self.windows.pop_front();
        }
        self.windows.push_back((pack, offset, bytes));
        Ok(Some(blob))
    }

    fn cache_pack(&mut self, pack: PackId) -> Result<()> {
        if self.packs.iter().any(|(p, _)| *p == pack) {
            return Ok(());
        }
        let entries = self.lookup.entries_in_pack(pack)?;
        if self.packs.len() >= self.capacity
            && let Some((_, old)) = self.packs.pop_front()
        {
            for d in old {
                self.locations.remove(&d);
            }
        }
        let mut digests = Vec::with_capacity(entries.len());
        for e in entries {
            self.locations.insert(e.digest, (pack, e.offset, e.length));
            digests.push(e.digest);
        }
        self.packs.push_back((pack, digests));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{BlobKind, ChunkSize, Encoder};
    use crate::error::ErrorKind;

    #[test]
    fn chunks_are_found_pack_by_pack_across_evictions_and_missing_ones_fail_as_the_vault_says() {
        let dir = tempfile::tempdir().unwrap();
        let vault =
            Vault::create(&dir.path().join("v"), ChunkSize::new(65536).unwrap(), 1).unwrap();
        let mut lookup = vault.lookup().unwrap();
        // Packs of a few blobs; text-like (compressed) and random (stored) chunks.
        let mut w = vault.pack_writer_with_target(2 * 65536);
        let mut enc = Encoder::new(1, &crate::chunk::BlobCodec::plain()).unwrap();
        let mut blobs = Vec::new();
        for i in 0..14u8 {
            let data: Vec<u8> = if i % 2 == 0 {
                format!("chunk {i} ").repeat(7000).into_bytes()
            } else {
                let mut v = vec![0u8; 65536];
                blake3::Hasher::new()
                    .update(&[i])
                    .finalize_xof()
                    .fill(&mut v);
                v
            };
            let d = ChunkDigest::of(&data);
            if let Some(sealed) = w
                .add(&enc.encode(BlobKind::Data, d, data.clone()).unwrap())
                .unwrap()
            {
                lookup.insert_pack(&sealed.publish().unwrap()).unwrap();
            }
            blobs.push((d, data));
        }
        if let Some(sealed) = w.seal() {
            lookup.insert_pack(&sealed.publish().unwrap()).unwrap();
        }
        assert!(lookup.packs().unwrap().len() >= 3);
        // One cached pack: going forward, then backward, evicts all the time.
        let mut f = Fetcher::with_capacity(&vault, 1).unwrap();
        for (d, data) in blobs.iter().chain(blobs.iter().rev()) {
            assert!(f.fetch(d, |p| p == &data[..]).unwrap());
        }
        let e = f
            .fetch(&ChunkDigest::of(b"not stored"), |_| ())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
