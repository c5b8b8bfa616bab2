//! The body of `PUT /api/v1/vaults/{name}/replica/blobs`: a batch of [`RawBlob`]s as
//! one binary message, written by `remote` and read by the receiving appliance
//! (`api::replica`). Version 1, all integers little-endian:
//!
//! ```text
//! offset  size  field
//! 0       4     magic "BVRB"
//! 4       1     version = 1
//! 5       4     count n (≤ MAX_BLOBS)
//! 9       ...   n records:
//!                 32  digest (the blob's ChunkDigest)
//!                  1  kind (BlobKind: 0 data, 1 index page, 2 index root)
//!                  4  length L (≤ MAX_BLOB)
//!                  L  stored bytes (blob header + payload, as in a pack; sealed stays sealed)
//! end-32  32    blake3 of every byte before it
//! ```
//!
//! The checksum only catches a damaged or truncated body; what makes a blob acceptable is
//! the receiver's own check of each blob against its digest under its vault's codec
//! (`VaultTarget::put_blobs`). The decoder never allocates by an untrusted length beyond
//! the body it holds: lengths are checked against what is left first.

use crate::chunk::{BlobKind, ChunkDigest};
use crate::error::{Error, Result};

use super::RawBlob;

const MAGIC: &[u8; 4] = b"BVRB";
const VERSION: u8 = 1;
/// Blobs in one body at most.
pub const MAX_BLOBS: usize = 65_536;
/// One stored blob at most (a 4 MiB chunk, stored raw, plus its header and seal).
pub const MAX_BLOB: usize = (4 << 20) + 4096;
/// One body at most (the sender's batches are `engine::SEND_BATCH`, 8 MiB, plus one blob).
pub const MAX_BODY: usize = 32 << 20;

/// Encode `blobs` as one body.
pub fn encode(blobs: &[RawBlob]) -> Vec<u8> {
    let len: usize = blobs.iter().map(|b| 37 + b.stored.len()).sum();
    let mut out = Vec::with_capacity(9 + len + 32);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&(blobs.len() as u32).to_le_bytes());
    for b in blobs {
        out.extend_from_slice(&b.digest.0);
        out.push(b.kind as u8);
        out.extend_from_slice(&(b.stored.len() as u32).to_le_bytes());
        out.extend_from_slice(&b.stored);
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::invalid(format!(
        "replication body: {what}; nothing of it was kept (the sender retries the batch)"
    ))
}

/// Decode a body; any fault (magic, version, checksum, counts, lengths, trailing bytes)
/// refuses the whole body.
pub fn decode(body: &[u8]) -> Result<Vec<RawBlob>> {
    if body.len() > MAX_BODY {
        return Err(bad(format!("{} bytes, over {MAX_BODY}", body.len())));
    }
    if body.len() < 9 + 32 {
        return Err(bad(format!("{} bytes is too short", body.len())));
    }
    let (msg, sum) = body.split_at(body.len() - 32);
    if blake3::hash(msg).as_bytes() != sum {
        return Err(bad("checksum mismatch (damaged or truncated in transit)"));
    }
    if &msg[..4] != MAGIC {
        return Err(bad("bad magic"));
    }
    if msg[4] != VERSION {
        return Err(bad(format!(
            "version {} (this appliance reads {VERSION})",
            msg[4]
        )));
    }
    let count = u32::from_le_bytes([msg[5], msg[6], msg[7], msg[8]]) as usize;
    if count > MAX_BLOBS {
        return Err(bad(format!("{count} blobs, over {MAX_BLOBS}")));
    }
    let mut rest = &msg[9..];
    let mut out = Vec::with_capacity(count.min(rest.len() / 37));
    for i in 0..count {
        if rest.len() < 37 {
            return Err(bad(format!("record {i} is cut short")));
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&rest[..32]);
        let kind = BlobKind::from_u8(rest[32]).map_err(|e| bad(format!("record {i}: {e}")))?;
        let len = u32::from_le_bytes([rest[33], rest[34], rest[35], rest[36]]) as usize;
        rest = &rest[37..];
        if len > MAX_BLOB || len > rest.len() {
            return Err(bad(format!(
                "record {i} claims {len} bytes, {} left",
                rest.len()
            )));
        }
        out.push(RawBlob {
            digest: ChunkDigest(digest),
            kind,
            stored: rest[..len].to_vec(),
        });
        rest = &rest[len..];
    }
    if !rest.is_empty() {
        return Err(bad(format!("{} bytes after the last record", rest.len())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs() -> Vec<RawBlob> {
        (0..3u8)
            .map(|i| RawBlob {
                digest: ChunkDigest([i; 32]),
                kind: BlobKind::from_u8(i).unwrap(),
                stored: vec![i; 100 * i as usize],
            })
            .collect()
    }

    #[test]
    fn a_body_decodes_to_the_blobs_encoded() {
        let b = blobs();
        let d = decode(&encode(&b)).unwrap();
        assert_eq!(d.len(), 3);
        for (x, y) in b.iter().zip(&d) {
            assert_eq!((x.digest, x.kind, &x.stored), (y.digest, y.kind, &y.stored));
        }
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused_without_panic() {
        let body = encode(&blobs());
        for n in 0..body.len() {
            assert!(decode(&body[..n]).is_err(), "truncated to {n}");
        }
        for i in 0..body.len() {
            let mut b = body.clone();
            b[i] ^= 0x40;
            assert!(decode(&b).is_err(), "byte {i} flipped");
        }
    }
}
