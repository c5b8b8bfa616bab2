//! Pack files: immutable files of blobs that describe themselves.
//!
//! Small chunks stored one file each would mean millions of files per terabyte (slow GC,
//! slow verify, millions of S3 objects), so blobs are appended to packs of ~32 MiB.
//!
//! ```text
//! offset          size   field
//! 0               8      magic "BVPACK\0\x01"
//! 8               ...    blobs, back to back (each: 12-byte blob header + payload)
//! E               48*n   trailer entries: digest[32], offset u64 LE, length u32 LE, kind u8, 3 pad
//! E+48n           56     footer: count u32, version u16, reserved u16, entries offset E u64,
//!                        checksum[32] = blake3(entries ‖ first 16 footer bytes), magic "BVPKEND1"
//! ```
//!
//! The trailer makes the lookup index rebuildable from the packs alone. A pack is staged,
//! then handed to the [`ChunkStore`](super::store::ChunkStore), which publishes it
//! atomically: a pack either exists whole or not at all. Where it is staged depends on
//! the store ([`Staging`]): for a local vault in a spool file next to the packs, fsynced,
//! then renamed into place; for an object store in memory, then sent with one PUT from
//! that buffer (no spool file: writing, fsyncing and reading back each pack cost a
//! third of a backup's system time and a second stream of disk writes, and the PUT is
//! what makes it durable). A staged pack holds at most the target plus one blob.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::chunk::{BlobKind, ChunkDigest, EncodedBlob};
use crate::error::{Error, IoContext, Result};

use super::store::ChunkStore;

/// Magic at the start of every pack.
pub const PACK_MAGIC: &[u8; 8] = b"BVPACK\0\x01";
const FOOTER_MAGIC: &[u8; 8] = b"BVPKEND1";
const PACK_VERSION: u16 = 1;
/// Size of one trailer entry.
pub const ENTRY_LEN: usize = 48;
/// Size of the footer.
pub const FOOTER_LEN: usize = 56;
/// Default target size of a pack.
pub const DEFAULT_PACK_TARGET: u64 = 32 << 20;

pub use super::store::PackId;

/// One blob's place in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub digest: ChunkDigest,
    pub offset: u64,
    pub length: u32,
    pub kind: BlobKind,
}

/// A finished, durable pack.
#[derive(Debug, Clone)]
pub struct PackInfo {
    pub id: PackId,
    pub size: u64,
    pub entries: Vec<PackEntry>,
}

/// Encode trailer entries and footer for `entries` starting at `entries_offset`.
fn encode_trailer(entries: &[PackEntry], entries_offset: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY_LEN + FOOTER_LEN);
    for e in entries {
        out.extend_from_slice(e.digest.as_bytes());
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.length.to_le_bytes());
        out.push(e.kind as u8);
        out.extend_from_slice(&[0; 3]);
    }
    let mut footer_head = [0u8; 16];
    footer_head[..4].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    footer_head[4..6].copy_from_slice(&PACK_VERSION.to_le_bytes());
    footer_head[8..16].copy_from_slice(&entries_offset.to_le_bytes());
    let mut hasher = blake3::Hasher::new();
    hasher.update(&out);
    hasher.update(&footer_head);
    out.extend_from_slice(&footer_head);
    out.extend_from_slice(hasher.finalize().as_bytes());
    out.extend_from_slice(FOOTER_MAGIC);
    out
}

/// Where the trailer of a pack of `pack_len` bytes starts, from its footer.
pub fn parse_footer(footer: &[u8], pack_len: u64) -> Result<(u64, usize)> {
    if footer.len() != FOOTER_LEN || &footer[48..56] != FOOTER_MAGIC {
        return Err(Error::corrupt("pack footer has a bad magic"));
    }
    let count = u32::from_le_bytes([footer[0], footer[1], footer[2], footer[3]]) as u64;
    let version = u16::from_le_bytes([footer[4], footer[5]]);
    if version != PACK_VERSION {
        return Err(Error::unsupported(format!("pack version {version}")));
    }
    let mut off = [0u8; 8];
    off.copy_from_slice(&footer[8..16]);
    let entries_offset = u64::from_le_bytes(off);
    let expected_len = (PACK_MAGIC.len() as u64)
        .max(entries_offset)
        .checked_add(count * ENTRY_LEN as u64 + FOOTER_LEN as u64);
    if entries_offset < PACK_MAGIC.len() as u64 || expected_len != Some(pack_len) {
        return Err(Error::corrupt(format!(
            "pack footer says {count} entries at offset {entries_offset}, which does not fit a pack of {pack_len} bytes"
        )));
    }
    Ok((entries_offset, count as usize))
}

/// Parse and check a pack's trailer (entries + footer, i.e. the pack's last bytes from
/// `entries_offset`).
pub fn parse_trailer(trailer: &[u8], entries_offset: u64) -> Result<Vec<PackEntry>> {
    if trailer.len() < FOOTER_LEN || !(trailer.len() - FOOTER_LEN).is_multiple_of(ENTRY_LEN) {
        return Err(Error::corrupt("pack trailer has a bad length"));
    }
    let (body, footer) = trailer.split_at(trailer.len() - FOOTER_LEN);
    let mut hasher = blake3::Hasher::new();
    hasher.update(body);
    hasher.update(&footer[..16]);
    if hasher.finalize().as_bytes() != &footer[16..48] {
        return Err(Error::corrupt("pack trailer fails its checksum"));
    }
    let mut entries = Vec::with_capacity(body.len() / ENTRY_LEN);
    for raw in body.chunks_exact(ENTRY_LEN) {
        let digest = ChunkDigest::from_slice(&raw[..32])?;
        let mut o = [0u8; 8];
        o.copy_from_slice(&raw[32..40]);
        let offset = u64::from_le_bytes(o);
        let length = u32::from_le_bytes([raw[40], raw[41], raw[42], raw[43]]);
        let kind = BlobKind::from_u8(raw[44])?;
        let end = offset.checked_add(length as u64);
        if offset < PACK_MAGIC.len() as u64 || end.is_none_or(|e| e > entries_offset) {
            return Err(Error::corrupt(format!(
                "pack entry for blob {} points outside the pack's data",
                digest.short()
            )));
        }
        entries.push(PackEntry {
            digest,
            offset,
            length,
            kind,
        });
    }
    Ok(entries)
}

/// Read and check the trailer of one pack through a store.
pub fn read_pack_entries(store: &dyn ChunkStore, id: PackId) -> Result<Vec<PackEntry>> {
    let len = store.pack_len(id)?;
    if len < (PACK_MAGIC.len() + FOOTER_LEN) as u64 {
        return Err(Error::corrupt(format!(
            "pack {id} is truncated ({len} bytes)"
        )));
    }
    let footer = store.read_pack_range(id, len - FOOTER_LEN as u64, FOOTER_LEN)?;
    let (entries_offset, _count) =
        parse_footer(&footer, len).map_err(|e| e.context_prefix(format!("pack {id}")))?;
    let trailer = store.read_pack_range(id, entries_offset, (len - entries_offset) as usize)?;
    parse_trailer(&trailer, entries_offset).map_err(|e| e.context_prefix(format!("pack {id}")))
}

/// Where a pack is staged before it is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Staging {
    /// A spool file in this local directory, fsynced before publishing.
    Spool(PathBuf),
    /// A buffer in memory, published with [`ChunkStore::put_owned`].
    Memory,
}

/// Appends blobs to packs and publishes each pack once it reaches its target size.
pub struct PackWriter {
    store: Arc<dyn ChunkStore>,
    staging: Staging,
    target: u64,
    current: Option<OpenPack>,
}

struct OpenPack {
    id: PackId,
    sink: Sink,
    offset: u64,
    entries: Vec<PackEntry>,
}

enum Sink {
    File { path: PathBuf, out: BufWriter<File> },
    Memory(Vec<u8>),
}

impl Sink {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        match self {
            Sink::File { path, out } => out
                .write_all(bytes)
                .ctx(|| format!("writing pack {}", path.display())),
            Sink::Memory(buf) => {
                buf.extend_from_slice(bytes);
                Ok(())
            }
        }
    }
}

impl PackWriter {
    /// A writer that spools packs in the local directory `spool`.
    pub fn new(store: Arc<dyn ChunkStore>, spool: &Path, target: u64) -> PackWriter {
        PackWriter::staged(store, Staging::Spool(spool.to_path_buf()), target)
    }

    /// A writer that stages packs as `staging` says (see `Vault::pack_writer`, which
    /// gives the vault's own).
    pub fn staged(store: Arc<dyn ChunkStore>, staging: Staging, target: u64) -> PackWriter {
        PackWriter {
            store,
            staging,
            target,
            current: None,
        }
    }

    /// Bytes in the open pack (not yet durable).
    pub fn pending_bytes(&self) -> u64 {
        self.current.as_ref().map_or(0, |p| p.offset)
    }

    /// Append a blob. Returns the pack it filled, sealed and ready to publish (which the
    /// caller may do on another thread while this writer fills the next pack).
    pub fn add(&mut self, blob: &EncodedBlob) -> Result<Option<SealedPack>> {
        if self.current.is_none() {
            let id = PackId::random();
            let mut sink = match &self.staging {
                Staging::Spool(dir) => {
                    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
                    let path = dir.join(format!("{id}.tmp"));
                    let file =
                        File::create(&path).ctx(|| format!("creating pack {}", path.display()))?;
                    let out = BufWriter::with_capacity(1 << 20, file);
                    Sink::File { path, out }
                }
                // Room for the target, one more blob and the trailer: no regrowth.
                Staging::Memory => Sink::Memory(Vec::with_capacity(
                    (self.target as usize).saturating_add(256 << 10),
                )),
            };
            sink.write(PACK_MAGIC)?;
            self.current = Some(OpenPack {
                id,
                sink,
                offset: PACK_MAGIC.len() as u64,
                entries: Vec::new(),
            });
        }
        let Some(pack) = self.current.as_mut() else {
            return Ok(None);
        };
        let len = blob.stored_len();
        pack.sink.write(&blob.header)?;
        pack.sink.write(&blob.payload)?;
        pack.entries.push(PackEntry {
            digest: blob.digest,
            offset: pack.offset,
            length: len as u32,
            kind: blob.kind,
        });
        pack.offset += len as u64;
        if pack.offset >= self.target {
            return Ok(self.seal());
        }
        Ok(None)
    }

    /// Append an already-encoded stored blob (GC repacking: no re-encoding).
    pub fn add_raw(&mut self, entry: &PackEntry, stored: &[u8]) -> Result<Option<SealedPack>> {
        let (header, payload) = stored.split_at(crate::chunk::BLOB_HEADER_LEN.min(stored.len()));
        let mut h = [0u8; crate::chunk::BLOB_HEADER_LEN];
        h[..header.len()].copy_from_slice(header);
        let blob = EncodedBlob {
            digest: entry.digest,
            kind: entry.kind,
            header: h,
            payload: payload.to_vec(),
        };
        self.add(&blob)
    }

    /// Seal the open pack, if any, for publishing.
    pub fn seal(&mut self) -> Option<SealedPack> {
        self.current.take().map(|pack| SealedPack {
            store: Arc::clone(&self.store),
            pack: Some(pack),
        })
    }

    /// Seal and publish the open pack, if any, on this thread.
    pub fn finish_current(&mut self) -> Result<Option<PackInfo>> {
        self.seal().map(SealedPack::publish).transpose()
    }

    /// Drop the open pack without publishing it (cancel, error).
    pub fn abort(&mut self) {
        drop(self.seal());
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        self.abort();
    }
}

/// A full pack, not yet durable. Publishing writes its trailer (and fsyncs a spool file)
/// and hands it to the store; dropping it unpublished removes the spool file.
pub struct SealedPack {
    store: Arc<dyn ChunkStore>,
    pack: Option<OpenPack>,
}

impl SealedPack {
    pub fn publish(mut self) -> Result<PackInfo> {
        let Some(pack) = self.pack.take() else {
            return Err(Error::new(crate::ErrorKind::Io, "pack already published"));
        };
        let trailer = encode_trailer(&pack.entries, pack.offset);
        let size = pack.offset + trailer.len() as u64;
        match pack.sink {
            Sink::File { path, mut out } => {
                let written = out
                    .write_all(&trailer)
                    .and_then(|_| out.flush())
                    .and_then(|_| out.get_ref().sync_all())
                    .ctx(|| format!("writing pack {}", path.display()))
                    .and_then(|_| {
                        drop(out);
                        self.store.publish_pack(pack.id, &path)
                    });
                if let Err(e) = written {
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
            }
            Sink::Memory(mut buf) => {
                buf.extend_from_slice(&trailer);
                self.store.publish_pack_bytes(pack.id, buf)?;
            }
        }
        Ok(PackInfo {
            id: pack.id,
            size,
            entries: pack.entries,
        })
    }
}

impl Drop for SealedPack {
    fn drop(&mut self) {
        if let Some(OpenPack {
            sink: Sink::File { path, out },
            ..
        }) = self.pack.take()
        {
            drop(out);
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(i: u8, offset: u64, length: u32) -> PackEntry {
        PackEntry {
            digest: ChunkDigest([i; 32]),
            offset,
            length,
            kind: BlobKind::Data,
        }
    }

    #[test]
    fn trailer_round_trip() {
        let entries = vec![entry(1, 8, 100), entry(2, 108, 50)];
        let t = encode_trailer(&entries, 158);
        let pack_len = 158 + t.len() as u64;
        let (off, n) = parse_footer(&t[t.len() - FOOTER_LEN..], pack_len).unwrap();
        assert_eq!((off, n), (158, 2));
        assert_eq!(parse_trailer(&t, off).unwrap(), entries);
    }

    #[test]
    fn trailer_rejects_entry_outside_data() {
        let t = encode_trailer(&[entry(1, 8, 1000)], 158);
        assert!(parse_trailer(&t, 158).is_err());
    }

    proptest! {
        #[test]
        fn footer_and_trailer_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), len in any::<u64>()) {
            if bytes.len() >= FOOTER_LEN {
                let _ = parse_footer(&bytes[bytes.len() - FOOTER_LEN..], len);
            }
            let _ = parse_trailer(&bytes, len);
        }

        #[test]
        fn trailer_detects_any_flip(pos in 0usize..(2 * ENTRY_LEN + FOOTER_LEN), bit in 0u8..8) {
            let mut t = encode_trailer(&[entry(1, 8, 100), entry(2, 108, 50)], 158);
            t[pos] ^= 1 << bit;
            let len = 158 + t.len() as u64;
            let ok = parse_footer(&t[t.len() - FOOTER_LEN..], len).and_then(|(off, _)| parse_trailer(&t[(off - 158) as usize..], off));
            prop_assert!(ok.is_err());
        }
    }
}
