//! NBD wire format: constants and the parsers of what a server sends.
//!
//! From the NBD protocol document (fixed newstyle negotiation, structured replies, meta
//! contexts). All integers are big-endian. Every parser takes untrusted bytes and
//! returns an error for anything out of shape; none allocates more than the caller's
//! bound. Layouts:
//!
//! ```text
//! option reply:      magic u64 0x3e889045565a9 | option u32 | type u32 | length u32 | data
//! simple reply:      magic u32 0x67446698 | error u32 | cookie u64 | (read data)
//! structured reply:  magic u32 0x668e33ef | flags u16 | type u16 | cookie u64 | length u32 | payload
//!   OFFSET_DATA (1):  offset u64 | data
//!   OFFSET_HOLE (2):  offset u64 | length u32
//!   BLOCK_STATUS (5): context id u32 | (length u32, flags u32)*
//!   ERROR (0x8001):   error u32 | msg len u16 | msg        ERROR_OFFSET (0x8002): … | offset u64
//! request:           magic u32 0x25609513 | flags u16 | type u16 | cookie u64 | offset u64 | length u32
//! ```

use crate::error::{Error, Result};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_C_NO_ZEROES: u32 = 2;

pub const OPT_ABORT: u32 = 2;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_BIT: u32 = 1 << 31;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT | 5;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const TFLAG_HAS_FLAGS: u16 = 1;
pub const TFLAG_READ_ONLY: u16 = 2;
pub const TFLAG_SEND_FLUSH: u16 = 4;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 64;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_NONE: u16 = 0;
pub const REPLY_OFFSET_DATA: u16 = 1;
pub const REPLY_OFFSET_HOLE: u16 = 2;
pub const REPLY_BLOCK_STATUS: u16 = 5;
pub const REPLY_ERROR: u16 = 0x8001;
pub const REPLY_ERROR_OFFSET: u16 = 0x8002;

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:NAME` flag.
pub const STATE_DIRTY: u32 = 1;

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

/// Header of a reply to an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub length: u32,
}

pub fn parse_opt_reply(b: &[u8; 20]) -> Result<OptReply> {
    if be64(b, 0) != OPT_REPLY_MAGIC {
        return Err(Error::invalid("NBD server sent a bad option-reply magic"));
    }
    Ok(OptReply {
        option: be32(b, 8),
        kind: be32(b, 12),
        length: be32(b, 16),
    })
}

/// Name of an option error reply type, for messages.
pub fn rep_error_name(kind: u32) -> &'static str {
    match kind & !REP_ERR_BIT {
        1 => "unsupported",
        2 => "forbidden by policy",
        3 => "invalid",
        4 => "unsupported on this platform",
        5 => "TLS required",
        6 => "unknown export",
        7 => "server shutting down",
        8 => "block size negotiation required",
        9 => "request too big",
        _ => "error",
    }
}

/// Header of a transmission-phase reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// Simple reply (12 more bytes were read: error, cookie).
    Simple { error: u32, cookie: u64 },
    /// Structured reply chunk (16 more bytes: flags, type, cookie, length).
    Structured {
        flags: u16,
        kind: u16,
        cookie: u64,
        length: u32,
    },
}

/// Length of the rest of a reply header after its 4-byte magic.
pub fn reply_rest_len(magic: u32) -> Result<usize> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(12),
        STRUCTURED_REPLY_MAGIC => Ok(16),
        m => Err(Error::invalid(format!(
            "NBD server sent a bad reply magic {m:#x}"
        ))),
    }
}

/// Parse a reply header given its magic and the following bytes.
pub fn parse_reply_header(magic: u32, rest: &[u8]) -> Result<ReplyHeader> {
    match (magic, rest.len()) {
        (SIMPLE_REPLY_MAGIC, 12) => Ok(ReplyHeader::Simple {
            error: be32(rest, 0),
            cookie: be64(rest, 4),
        }),
        (STRUCTURED_REPLY_MAGIC, 16) => Ok(ReplyHeader::Structured {
            flags: be16(rest, 0),
            kind: be16(rest, 2),
            cookie: be64(rest, 4),
            length: be32(rest, 12),
        }),
        _ => Err(Error::invalid(format!(
            "NBD server sent a bad reply header (magic {magic:#x})"
        ))),
    }
}

/// An error chunk's payload: (errno, message).
pub fn parse_error_payload(p: &[u8]) -> Result<(u32, String)> {
    if p.len() < 6 {
        return Err(Error::invalid("NBD error chunk too short"));
    }
    let err = be32(p, 0);
    let mlen = be16(p, 4) as usize;
    if 6 + mlen > p.len() {
        return Err(Error::invalid("NBD error chunk message overruns the chunk"));
    }
    Ok((err, String::from_utf8_lossy(&p[6..6 + mlen]).into_owned()))
}

/// A block-status chunk: context id and (length, flags) descriptors.
pub fn parse_block_status(p: &[u8]) -> Result<(u32, Vec<(u32, u32)>)> {
    if p.len() < 12 || !(p.len() - 4).is_multiple_of(8) {
        return Err(Error::invalid(format!(
            "NBD block-status chunk of {} bytes",
            p.len()
        )));
    }
    let id = be32(p, 0);
    let descs = p[4..]
        .chunks_exact(8)
        .map(|d| (be32(d, 0), be32(d, 4)))
        .collect();
    Ok((id, descs))
}

/// Encode a transmission request.
pub fn encode_request(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut r = [0u8; 28];
    r[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    r[4..6].copy_from_slice(&flags.to_be_bytes());
    r[6..8].copy_from_slice(&kind.to_be_bytes());
    r[8..16].copy_from_slice(&cookie.to_be_bytes());
    r[16..24].copy_from_slice(&offset.to_be_bytes());
    r[24..28].copy_from_slice(&length.to_be_bytes());
    r
}

/// Errno names for messages.
pub fn errno_name(e: u32) -> &'static str {
    match e {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn reply_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64), magic in any::<u32>()) {
            let _ = parse_reply_header(magic, &bytes);
            let _ = parse_error_payload(&bytes);
            let _ = parse_block_status(&bytes);
            let _ = reply_rest_len(magic);
            if bytes.len() >= 20 {
                let mut a = [0u8; 20];
                a.copy_from_slice(&bytes[..20]);
                let _ = parse_opt_reply(&a);
            }
        }

        #[test]
        fn block_status_round_trips(id in any::<u32>(), descs in proptest::collection::vec((any::<u32>(), any::<u32>()), 1..20)) {
            let mut p = id.to_be_bytes().to_vec();
            for (l, f) in &descs {
                p.extend_from_slice(&l.to_be_bytes());
                p.extend_from_slice(&f.to_be_bytes());
            }
            prop_assert_eq!(parse_block_status(&p).unwrap(), (id, descs));
        }
    }

    #[test]
    fn error_message_must_fit() {
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&10u16.to_be_bytes());
        p.extend_from_slice(b"short");
        assert!(parse_error_payload(&p).is_err());
    }
}
