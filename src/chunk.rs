//! Chunks and blobs: the unit of storage.
//!
//! A disk is cut into fixed-size chunks aligned to absolute disk offsets (chunk `n` covers
//! `n * chunk_size .. (n + 1) * chunk_size`; the last one may be short). Each chunk is
//! addressed by the blake3 [`ChunkDigest`] of its plaintext (keyed blake3 in an
//! encrypted vault: see [`seal`]). All-zero chunks are never
//! stored: they get the reserved digest [`ChunkDigest::ZERO`].
//!
//! Everything in a vault (data chunks, index pages, index roots) is stored as a *blob*:
//!
//! ```text
//! offset size  field
//! 0      3     magic "BVB"
//! 3      1     version (1)
//! 4      1     kind: 0 data chunk, 1 index page, 2 index root
//! 5      1     codec: 0 stored as is, 1 zstd
//! 6      2     flags, u16 LE: bit 0 sealed (encrypted vault); other bits reserved, 0
//! 8      4     plaintext length, u32 LE
//! 12     ...   payload (sealed: nonce ‖ AES-256-GCM ciphertext ‖ tag, see [`seal`])
//! ```
//!
//! All hashing, sealing and opening goes through a [`BlobCodec`] (the vault's: plain, or
//! sealed under its key): [`Encoder`], [`Decoder`] and [`decode_blob`] take one, so no
//! path can write a plaintext blob into an encrypted vault or read one from it.
//!
//! Decoding checks the header, bounds the plaintext length (no allocation sized by an
//! untrusted length beyond [`MAX_BLOB_PLAIN`]), decompresses and re-hashes: a blob whose
//! digest does not match is `Corrupt`. This is the end-to-end integrity check every read
//! goes through.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

pub mod seal;
use seal::FLAG_SEALED;
pub use seal::{BlobCodec, VaultKey};

/// Smallest chunk size a vault accepts.
pub const MIN_CHUNK_SIZE: u32 = 16 << 10;
/// Largest chunk size a vault accepts.
pub const MAX_CHUNK_SIZE: u32 = 4 << 20;
/// Default chunk size: 64 KiB (QEMU's dirty-bitmap and qcow2 cluster granularity).
pub const DEFAULT_CHUNK_SIZE: u32 = 64 << 10;
/// Largest plaintext a blob may declare (an index root of a 64 TiB disk at 16 KiB chunks
/// is 128 MiB).
pub const MAX_BLOB_PLAIN: usize = 256 << 20;
/// Size of the blob header.
pub const BLOB_HEADER_LEN: usize = 12;

const BLOB_MAGIC: &[u8; 3] = b"BVB";
const BLOB_VERSION: u8 = 1;

/// blake3 digest of a chunk's (or blob's) plaintext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkDigest(pub [u8; 32]);

impl ChunkDigest {
    /// Reserved digest of an all-zero chunk (and of an index page that holds only zero
    /// chunks). Never stored.
    pub const ZERO: ChunkDigest = ChunkDigest([0; 32]);

    /// Unkeyed digest of `data`: a plaintext vault's digest. Code that may run on an
    /// encrypted vault uses [`BlobCodec::digest`].
    pub fn of(data: &[u8]) -> ChunkDigest {
        ChunkDigest(*blake3::hash(data).as_bytes())
    }

    pub fn is_zero(&self) -> bool {
        *self == ChunkDigest::ZERO
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parse from a 32-byte slice.
    pub fn from_slice(b: &[u8]) -> Result<ChunkDigest> {
        let arr: [u8; 32] = b
            .try_into()
            .map_err(|_| Error::invalid(format!("digest must be 32 bytes, got {}", b.len())))?;
        Ok(ChunkDigest(arr))
    }

    /// First 8 hex digits, for messages.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Display for ChunkDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChunkDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkDigest({})", self.short())
    }
}

impl FromStr for ChunkDigest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bytes = hex::decode(s).map_err(|_| Error::invalid(format!("bad digest {s:?}")))?;
        ChunkDigest::from_slice(&bytes)
    }
}

impl Serialize for ChunkDigest {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ChunkDigest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A vault's chunk size: a power of two between 16 KiB and 4 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct ChunkSize(u32);

impl ChunkSize {
    pub fn new(bytes: u32) -> Result<ChunkSize> {
        if !bytes.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&bytes) {
            return Err(Error::config(format!(
                "chunk size {bytes} must be a power of two from 16K to 4M"
            )));
        }
        Ok(ChunkSize(bytes))
    }

    /// Parse "64K", "1M", "65536".
    pub fn parse(s: &str) -> Result<ChunkSize> {
        let s = s.trim();
        let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
            Some('K') => (&s[..s.len() - 1], 1u64 << 10),
            Some('M') => (&s[..s.len() - 1], 1u64 << 20),
            _ => (s, 1),
        };
        let n: u64 = num
            .parse()
            .map_err(|_| Error::config(format!("bad chunk size {s:?}")))?;
        let bytes = u32::try_from(n.saturating_mul(mult))
            .map_err(|_| Error::config(format!("chunk size {s:?} too large")))?;
        ChunkSize::new(bytes)
    }

    pub fn bytes(&self) -> u32 {
        self.0
    }

    pub fn as_u64(&self) -> u64 {
        self.0 as u64
    }

    /// Number of chunks covering a disk of `disk_size` bytes.
    pub fn chunks_for(&self, disk_size: u64) -> u64 {
        disk_size.div_ceil(self.as_u64())
    }
}

impl TryFrom<u32> for ChunkSize {
    type Error = Error;
    fn try_from(v: u32) -> Result<Self> {
        ChunkSize::new(v)
    }
}

impl From<ChunkSize> for u32 {
    fn from(c: ChunkSize) -> u32 {
        c.0
    }
}

/// True when every byte of `buf` is zero. Checks 256-byte blocks with a branch-free OR
/// (vectorised) and stops at the first non-zero block.
pub fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(256)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// What a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlobKind {
    Data = 0,
    IndexPage = 1,
    IndexRoot = 2,
}

impl BlobKind {
    pub fn from_u8(v: u8) -> Result<BlobKind> {
        match v {
            0 => Ok(BlobKind::Data),
            1 => Ok(BlobKind::IndexPage),
            2 => Ok(BlobKind::IndexRoot),
            _ => Err(Error::corrupt(format!("unknown blob kind {v}"))),
        }
    }
}

/// Codec of a stored blob payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Stored = 0,
    Zstd = 1,
}

/// Header of an encoded blob (without its payload).
pub fn blob_header(
    kind: BlobKind,
    compressed: bool,
    sealed: bool,
    plain_len: usize,
) -> [u8; BLOB_HEADER_LEN] {
    let mut h = [0u8; BLOB_HEADER_LEN];
    h[..3].copy_from_slice(BLOB_MAGIC);
    h[3] = BLOB_VERSION;
    h[4] = kind as u8;
    h[5] = if compressed {
        Codec::Zstd as u8
    } else {
        Codec::Stored as u8
    };
    let flags = if sealed { FLAG_SEALED } else { 0 };
    h[6..8].copy_from_slice(&flags.to_le_bytes());
    h[8..12].copy_from_slice(&(plain_len as u32).to_le_bytes());
    h
}

/// A blob ready to be written: header + payload (the payload is either the compressed
/// bytes or, when compression does not pay, the plaintext buffer itself: no copy).
pub struct EncodedBlob {
    pub digest: ChunkDigest,
    pub kind: BlobKind,
    pub header: [u8; BLOB_HEADER_LEN],
    pub payload: Vec<u8>,
}

impl EncodedBlob {
    /// Stored length (header + payload).
    pub fn stored_len(&self) -> usize {
        BLOB_HEADER_LEN + self.payload.len()
    }
}

/// Compressor state reused across chunks by one worker thread, and the vault's codec.
pub struct Encoder {
    cctx: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
    codec: BlobCodec,
}

impl Encoder {
    pub fn new(level: i32, codec: &BlobCodec) -> Result<Encoder> {
        let cctx = zstd::bulk::Compressor::new(level)
            .map_err(|e| Error::config(format!("zstd level {level}")).with_source(e))?;
        Ok(Encoder {
            cctx,
            scratch: Vec::new(),
            codec: codec.clone(),
        })
    }

    /// Encode `plain` (whose digest is already known), sealing it in an encrypted
    /// vault. Takes ownership of the buffer so that an incompressible chunk of a
    /// plaintext vault is stored without a copy.
    pub fn encode(
        &mut self,
        kind: BlobKind,
        digest: ChunkDigest,
        plain: Vec<u8>,
    ) -> Result<EncodedBlob> {
        if !self.codec.is_sealed() {
            return Ok(self.compress(kind, digest, plain));
        }
        // Sealed: seal straight from the compressor's buffer (or the plaintext), one copy.
        let compressed = !self.looks_incompressible(&plain) && self.compress_to_scratch(&plain);
        let header = blob_header(kind, compressed, true, plain.len());
        let src: &[u8] = if compressed { &self.scratch } else { &plain };
        let payload = self.codec.seal_payload(&header, src)?;
        Ok(EncodedBlob {
            digest,
            kind,
            header,
            payload,
        })
    }

    /// Compress `plain` into the scratch buffer; true when compression pays (it saves
    /// at least 1/32 of the chunk).
    fn compress_to_scratch(&mut self, plain: &[u8]) -> bool {
        let bound = zstd::zstd_safe::compress_bound(plain.len());
        self.scratch.clear();
        self.scratch.reserve(bound);
        matches!(
            self.cctx.compress_to_buffer(plain, &mut self.scratch),
            Ok(n) if n < plain.len() - plain.len() / 32
        )
    }

    fn compress(&mut self, kind: BlobKind, digest: ChunkDigest, plain: Vec<u8>) -> EncodedBlob {
        if self.looks_incompressible(&plain) {
            return EncodedBlob {
                digest,
                kind,
                header: blob_header(kind, false, false, plain.len()),
                payload: plain,
            };
        }
        let compressed = self.compress_to_scratch(&plain);
        let header = blob_header(kind, compressed, false, plain.len());
        let payload = if compressed {
            self.scratch.clone()
        } else {
            plain
        };
        EncodedBlob {
            digest,
            kind,
            header,
            payload,
        }
    }
}

impl Encoder {
    /// Already-compressed or encrypted data (random-looking) costs zstd time and saves
    /// nothing. Like borg's "auto" mode, compress a 4 KiB sample from the middle of a
    /// large chunk first; if that does not shrink by 3%, store the chunk as is. A wrong
    /// guess costs only space, never correctness.
    fn looks_incompressible(&mut self, plain: &[u8]) -> bool {
        const SAMPLE: usize = 4096;
        if plain.len() < 4 * SAMPLE {
            return false;
        }
        let mid = plain.len() / 2;
        let sample = &plain[mid - SAMPLE / 2..mid + SAMPLE / 2];
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(SAMPLE));
        match self.cctx.compress_to_buffer(sample, &mut self.scratch) {
            Ok(n) => n > SAMPLE - SAMPLE * 3 / 100,
            Err(_) => false,
        }
    }
}

/// Hash and encode a blob in one step (index pages, roots).
pub fn encode_blob(
    kind: BlobKind,
    plain: Vec<u8>,
    level: i32,
    codec: &BlobCodec,
) -> Result<EncodedBlob> {
    let digest = codec.digest(&plain);
    Encoder::new(level, codec)?.encode(kind, digest, plain)
}

/// Parsed blob header.
#[derive(Debug, Clone, Copy)]
pub struct BlobHeader {
    pub kind: BlobKind,
    pub compressed: bool,
    /// The payload is sealed (encrypted vault).
    pub sealed: bool,
    pub plain_len: usize,
}

/// Parse and check a blob header.
pub fn parse_blob_header(stored: &[u8]) -> Result<BlobHeader> {
    if stored.len() < BLOB_HEADER_LEN {
        return Err(Error::corrupt(format!(
            "blob of {} bytes is shorter than its header",
            stored.len()
        )));
    }
    if &stored[..3] != BLOB_MAGIC {
        return Err(Error::corrupt("blob has a bad magic"));
    }
    if stored[3] != BLOB_VERSION {
        return Err(Error::unsupported(format!(
            "blob version {} (this build reads version {BLOB_VERSION})",
            stored[3]
        )));
    }
    let kind = BlobKind::from_u8(stored[4])?;
    let compressed = match stored[5] {
        0 => false,
        1 => true,
        c => return Err(Error::corrupt(format!("unknown blob codec {c}"))),
    };
    let flags = u16::from_le_bytes([stored[6], stored[7]]);
    if flags & !FLAG_SEALED != 0 {
        return Err(Error::unsupported(format!(
            "blob flags {flags:#06x} (this build knows only bit 0, sealed)"
        )));
    }
    let plain_len = u32::from_le_bytes([stored[8], stored[9], stored[10], stored[11]]) as usize;
    if plain_len > MAX_BLOB_PLAIN {
        return Err(Error::corrupt(format!(
            "blob declares {plain_len} bytes of plaintext (limit {MAX_BLOB_PLAIN})"
        )));
    }
    Ok(BlobHeader {
        kind,
        compressed,
        sealed: flags & FLAG_SEALED != 0,
        plain_len,
    })
}

/// Decode a stored blob of a vault with `codec` and check it against `expected`. Any
/// mismatch is `Corrupt`; a sealed blob without a key is `KeyRequired`.
pub fn decode_blob(
    stored: &[u8],
    expected: &ChunkDigest,
    codec: &BlobCodec,
) -> Result<(BlobKind, Vec<u8>)> {
    let mut scratch = Vec::new();
    let mut opened = Vec::new();
    let (kind, at) = decode_checked(
        stored,
        expected,
        codec,
        &mut scratch,
        &mut opened,
        |payload, out| {
            *out = zstd::bulk::decompress(payload, out.capacity())?;
            Ok(())
        },
    )?;
    Ok(match at {
        Plain::Scratch => (kind, scratch),
        Plain::Opened => (kind, opened),
        Plain::Stored => (kind, stored[BLOB_HEADER_LEN..].to_vec()),
    })
}

/// Blob decoding state reused by one thread: a zstd context, output buffers and the
/// vault's codec (a restore decodes thousands of chunks per second; a fresh context
/// each costs more than a tenth of the decompression).
pub struct Decoder {
    dctx: zstd::bulk::Decompressor<'static>,
    scratch: Vec<u8>,
    opened: Vec<u8>,
    codec: BlobCodec,
}

impl Decoder {
    pub fn new(codec: &BlobCodec) -> Result<Decoder> {
        Ok(Decoder {
            dctx: zstd::bulk::Decompressor::new().map_err(|e| {
                Error::new(crate::ErrorKind::Io, "creating a zstd context").with_source(e)
            })?,
            scratch: Vec::new(),
            opened: Vec::new(),
            codec: codec.clone(),
        })
    }

    /// Like [`decode_blob`], without copies: the plaintext is borrowed from `stored`
    /// (stored raw) or from this decoder's buffers (valid until the next call).
    pub fn decode<'s>(
        &'s mut self,
        stored: &'s [u8],
        expected: &ChunkDigest,
    ) -> Result<(BlobKind, &'s [u8])> {
        let dctx = &mut self.dctx;
        let (kind, at) = decode_checked(
            stored,
            expected,
            &self.codec,
            &mut self.scratch,
            &mut self.opened,
            |payload, out| dctx.decompress_to_buffer(payload, out).map(|_| ()),
        )?;
        Ok(match at {
            Plain::Scratch => (kind, &self.scratch),
            Plain::Opened => (kind, &self.opened),
            Plain::Stored => (kind, &stored[BLOB_HEADER_LEN..]),
        })
    }
}

/// Where a decoded blob's plaintext is.
enum Plain {
    /// The stored payload itself (plaintext vault, stored raw).
    Stored,
    /// The decompression buffer.
    Scratch,
    /// The opened (decrypted) payload (sealed, stored raw).
    Opened,
}

/// The checks of every blob decode: header, seal, lengths, digest. `decompress` fills
/// `out` (empty, with capacity for the declared plaintext). Returns the kind and where
/// the plaintext is.
fn decode_checked(
    stored: &[u8],
    expected: &ChunkDigest,
    codec: &BlobCodec,
    scratch: &mut Vec<u8>,
    opened: &mut Vec<u8>,
    decompress: impl FnOnce(&[u8], &mut Vec<u8>) -> std::io::Result<()>,
) -> Result<(BlobKind, Plain)> {
    let h = parse_blob_header(stored)?;
    let mut payload = &stored[BLOB_HEADER_LEN..];
    if h.sealed {
        codec.open_payload(&stored[..BLOB_HEADER_LEN], payload, opened, expected)?;
        payload = opened;
    } else if codec.is_sealed() {
        return Err(Error::corrupt(format!(
            "blob {} is not sealed, but the vault is encrypted: it was not written with this vault's key",
            expected.short()
        )));
    }
    let (plain, at): (&[u8], Plain) = if h.compressed {
        scratch.clear();
        scratch.reserve(h.plain_len);
        decompress(payload, scratch).map_err(|e| {
            Error::corrupt(format!("blob {} does not decompress", expected.short())).with_source(e)
        })?;
        if scratch.len() != h.plain_len {
            return Err(Error::corrupt(format!(
                "blob {} decompressed to {} bytes, header says {}",
                expected.short(),
                scratch.len(),
                h.plain_len
            )));
        }
        (scratch, Plain::Scratch)
    } else {
        if payload.len() != h.plain_len {
            return Err(Error::corrupt(format!(
                "blob {} holds {} bytes, header says {}",
                expected.short(),
                payload.len(),
                h.plain_len
            )));
        }
        let at = if h.sealed {
            Plain::Opened
        } else {
            Plain::Stored
        };
        (payload, at)
    };
    let actual = codec.digest(plain);
    if actual != *expected {
        return Err(Error::corrupt(format!(
            "blob {} fails its digest check (content hashes to {})",
            expected.short(),
            actual.short()
        )));
    }
    Ok((h.kind, at))
}

#[cfg(test)]
mod tests;
