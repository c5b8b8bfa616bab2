//! The lock journal's bytes: the record format, its hash chain and the check of a
//! journal against its head (the layout is drawn in the parent module's doc).

use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, Result};

use super::super::store::ChunkStore;

/// Key of the journal in the vault's store.
pub const JOURNAL_KEY: &str = "locks/retention.journal";
/// Key of the head (the last record's seq and hash).
pub const HEAD_KEY: &str = "locks/retention.head";
/// Prefix of every record's hash input.
const HASH_DOMAIN: &[u8] = b"blockvault retention journal v1\n";
/// Record format version.
pub(super) const RECORD_VERSION: u32 = 1;
/// The journal is read whole; refuse one this large (about 2 million records).
const MAX_JOURNAL_BYTES: usize = 512 << 20;

/// What a record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    Protect,
    Unprotect,
    Lock,
    Compliance,
}

/// One line of the journal (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub v: u32,
    pub seq: u64,
    pub kind: RecordKind,
    pub backup: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<u32>,
    pub at: String,
    pub actor: String,
    pub prev: String,
    pub hash: String,
}

impl Record {
    /// The hash this record must carry.
    pub(super) fn compute_hash(&self) -> String {
        let mut r = self.clone();
        r.hash = String::new();
        let body = serde_json::to_vec(&r).unwrap_or_default();
        let mut h = blake3::Hasher::new();
        h.update(HASH_DOMAIN);
        h.update(&body);
        h.finalize().to_hex().to_string()
    }
}

/// `retention.head`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Head {
    pub(super) seq: u64,
    pub(super) hash: String,
}

/// Parse every line; return the records that parsed and every fault of the chain.
pub(super) fn read_records(store: &dyn ChunkStore) -> Result<(Vec<Record>, Vec<String>)> {
    let bytes = match store.get_file(JOURNAL_KEY) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let head = match store.get_file(HEAD_KEY) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    Ok(check_bytes(&bytes, head.as_deref()))
}

/// The chain check of a journal's bytes against its head (see the module doc).
pub(super) fn check_bytes(bytes: &[u8], head: Option<&[u8]>) -> (Vec<Record>, Vec<String>) {
    let mut problems = Vec::new();
    let mut records: Vec<Record> = Vec::new();
    if bytes.len() > MAX_JOURNAL_BYTES {
        problems.push(format!(
            "it is {} bytes, over the {MAX_JOURNAL_BYTES} byte limit",
            bytes.len()
        ));
        return (records, problems);
    }
    if !bytes.is_empty() && !bytes.ends_with(b"\n") {
        problems.push(format!(
            "it ends inside a record (byte {}): truncated",
            bytes.len()
        ));
    }
    let mut prev = "0".repeat(64);
    let mut offset = 0usize;
    for (i, line) in bytes.split_inclusive(|b| *b == b'\n').enumerate() {
        let line_no = i + 1;
        let at = offset;
        offset += line.len();
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let r: Record = match serde_json::from_slice(text) {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!(
                    "record on line {line_no} (byte {at}) does not parse: {e}"
                ));
                // The chain is broken from here on; later records cannot be trusted.
                return (records, problems);
            }
        };
        let expected_seq = records.len() as u64 + 1;
        if r.v != RECORD_VERSION {
            problems.push(format!(
                "record {} (line {line_no}) has version {}",
                r.seq, r.v
            ));
        }
        if r.seq != expected_seq {
            problems.push(format!(
                "line {line_no} holds record {} where record {expected_seq} belongs (a record was removed or inserted)",
                r.seq
            ));
        }
        if r.prev != prev {
            problems.push(format!(
                "record {} (line {line_no}) does not chain to the record before it",
                r.seq
            ));
        }
        if r.compute_hash() != r.hash {
            problems.push(format!(
                "record {} (line {line_no}) was altered: its hash does not match its content",
                r.seq
            ));
        }
        prev = r.hash.clone();
        records.push(r);
    }
    match head {
        None if !records.is_empty() => problems.push(format!(
            "{HEAD_KEY} is missing while the journal holds {} records",
            records.len()
        )),
        None => {}
        Some(h) => match serde_json::from_slice::<Head>(h) {
            Err(e) => problems.push(format!("{HEAD_KEY} does not parse: {e}")),
            Ok(h) => {
                let last = records.last();
                let n = records.len() as u64;
                if h.seq > n {
                    problems.push(format!(
                        "the head names record {} but the journal ends at record {n}: truncated",
                        h.seq
                    ));
                } else if h.seq < n {
                    problems.push(format!(
                        "the journal holds {n} records but its head names record {}",
                        h.seq
                    ));
                } else if last.is_some_and(|l| l.hash != h.hash) {
                    problems.push(format!(
                        "the last record's hash differs from the head's: record {n} was rewritten"
                    ));
                }
            }
        },
    }
    (records, problems)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn rec(seq: u64, prev: &str, kind: RecordKind, backup: &str, until: Option<&str>) -> Record {
        let mut r = Record {
            v: 1,
            seq,
            kind,
            backup: backup.into(),
            until: until.map(Into::into),
            days: None,
            at: "2026-01-01T00:00:00Z".into(),
            actor: "test".into(),
            prev: prev.into(),
            hash: String::new(),
        };
        r.hash = r.compute_hash();
        r
    }

    fn journal_bytes(recs: &[Record]) -> (Vec<u8>, Vec<u8>) {
        let mut b = Vec::new();
        for r in recs {
            b.extend(serde_json::to_vec(r).unwrap());
            b.push(b'\n');
        }
        let last = recs.last().unwrap();
        let head = serde_json::to_vec(&Head {
            seq: last.seq,
            hash: last.hash.clone(),
        })
        .unwrap();
        (b, head)
    }

    pub(in crate::vault::retention) fn chain() -> Vec<Record> {
        let r1 = rec(1, &"0".repeat(64), RecordKind::Protect, "b1", None);
        let r2 = rec(
            2,
            &r1.hash,
            RecordKind::Lock,
            "b1",
            Some("2030-01-01T00:00:00Z"),
        );
        let r3 = rec(
            3,
            &r2.hash,
            RecordKind::Lock,
            "b2",
            Some("2031-01-01T00:00:00Z"),
        );
        vec![r1, r2, r3]
    }

    #[test]
    fn a_whole_chain_checks() {
        let (b, h) = journal_bytes(&chain());
        let (recs, problems) = check_bytes(&b, Some(&h));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(recs.len(), 3);
    }

    #[test]
    fn an_edited_record_is_named() {
        let (b, h) = journal_bytes(&chain());
        let text = String::from_utf8(b)
            .unwrap()
            .replacen("2030-01-01", "2020-01-01", 1);
        let (_, problems) = check_bytes(text.as_bytes(), Some(&h));
        assert!(
            problems
                .iter()
                .any(|p| p.contains("record 2") && p.contains("altered")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_dropped_last_record_is_named_truncated() {
        let recs = chain();
        let (b, h) = journal_bytes(&recs);
        let (b2, _) = journal_bytes(&recs[..2]);
        assert!(b.starts_with(&b2));
        let (_, problems) = check_bytes(&b2, Some(&h));
        assert!(
            problems.iter().any(|p| p.contains("truncated")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_removed_middle_record_breaks_the_chain() {
        let recs = chain();
        let (b, h) = journal_bytes(&[recs[0].clone(), recs[2].clone()]);
        let (_, problems) = check_bytes(&b, Some(&h));
        assert!(
            problems.iter().any(|p| p.contains("does not chain")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_cut_inside_a_record_is_named() {
        let (b, h) = journal_bytes(&chain());
        let (_, problems) = check_bytes(&b[..b.len() - 10], Some(&h));
        assert!(
            problems.iter().any(|p| p.contains("truncated")),
            "{problems:?}"
        );
    }

    proptest::proptest! {
        #[test]
        fn check_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = check_bytes(&bytes, Some(&bytes));
        }
    }
}
