//! The engine and a vault target on real local vaults (temporary directories).

use super::*;
use crate::chunk::{BlobCodec, encode_blob};
use crate::vault::Vault;

fn vault(dir: &std::path::Path, name: &str, chunk: u32) -> Vault {
    Vault::create(&dir.join(name), ChunkSize::new(chunk).unwrap(), 1).unwrap()
}

fn raw(kind: BlobKind, plain: &[u8]) -> RawBlob {
    let b = encode_blob(kind, plain.to_vec(), 1, &BlobCodec::plain()).unwrap();
    let mut stored = b.header.to_vec();
    stored.extend_from_slice(&b.payload);
    RawBlob {
        digest: b.digest,
        kind,
        stored,
    }
}

#[test]
fn a_target_refuses_a_blob_that_does_not_match_its_digest_and_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let t = VaultTarget::new(vault(dir.path(), "t", 65536)).unwrap();
    let good = raw(BlobKind::Data, &[7u8; 5000]);
    let mut bad = raw(BlobKind::Data, &[8u8; 5000]);
    let n = bad.stored.len();
    bad.stored[n - 1] ^= 1;
    let e = t.put_blobs(vec![good.clone(), bad]).unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::Corrupt, "{e}");
    assert!(t.vault().store().list_packs().unwrap().is_empty());
    assert_eq!(t.missing(&[good.digest]).unwrap(), vec![good.digest]);
    // A blob sent as another kind than its header says is refused too.
    let mut wrong = raw(BlobKind::Data, &[9u8; 100]);
    wrong.kind = BlobKind::IndexPage;
    assert!(t.put_blobs(vec![wrong]).is_err());
    // The good one alone lands, durable and indexed.
    assert!(t.put_blobs(vec![good.clone()]).unwrap() > 0);
    assert!(t.missing(&[good.digest]).unwrap().is_empty());
    assert_eq!(t.vault().store().list_packs().unwrap().len(), 1);
}

#[test]
fn incompatible_targets_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let src = vault(dir.path(), "s", 65536);
    let info = |chunk: u32, key: Option<&str>| TargetInfo {
        vault_id: "other".into(),
        chunk_size: ChunkSize::new(chunk).unwrap(),
        key_check: key.map(str::to_owned),
    };
    assert!(engine::check_compatible(&src, &info(65536, None)).is_ok());
    let e = engine::check_compatible(&src, &info(131072, None)).unwrap_err();
    assert!(e.to_string().contains("chunk size"), "{e}");
    let e = engine::check_compatible(&src, &info(65536, Some("abc"))).unwrap_err();
    assert!(e.to_string().contains("plaintext"), "{e}");
    let mut same = info(65536, None);
    same.vault_id = src.config().id.clone();
    assert!(engine::check_compatible(&src, &same).is_err());
}

#[test]
fn replica_ids_are_stable_per_target_and_keep_the_time_prefix() {
    let a = engine::replica_id("20261128T101010-abcdef01", "vault-a");
    assert_eq!(a, engine::replica_id("20261128T101010-abcdef01", "vault-a"));
    assert_ne!(a, engine::replica_id("20261128T101010-abcdef01", "vault-b"));
    assert_ne!(a, "20261128T101010-abcdef01");
    assert!(a.starts_with("20261128T101010-"), "{a}");
}
