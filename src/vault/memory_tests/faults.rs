//! Injected faults: a failed pack put, a truncated get, a listing that misses a pack.

use super::*;
use crate::vault::gc::gc;

#[test]
fn a_failed_pack_put_leaves_no_manifest_and_the_next_backup_restores_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryStore::new());
    let vault = vault_over(&store, &dir.path().join("state"));
    let img = image(dir.path(), 1);

    // Put 1 is the backup's lease, put 2 its first pack.
    store.inject(Fault::FailPut(2));
    let err = backup_disk(
        &vault,
        Box::new(RawSource::open(&img).unwrap()),
        &opts("b1"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert!(
        keys_under(&store, "backups/").is_empty(),
        "no manifest after a failed put"
    );
    assert!(vault.manifests().unwrap().is_empty());
    assert!(
        keys_under(&store, "locks/").is_empty(),
        "the lease is released"
    );
    // Packs of an object store are staged in memory: no spool file, none left behind.
    let spool: Vec<_> = std::fs::read_dir(vault.spool_dir())
        .map(|d| d.collect())
        .unwrap_or_default();
    assert!(spool.is_empty(), "no staged pack is left: {spool:?}");

    // The next backup is whole, GC keeps what it needs, the restore is byte-exact.
    let m = backup_disk(
        &vault,
        Box::new(RawSource::open(&img).unwrap()),
        &opts("b2"),
    )
    .unwrap();
    assert_eq!(keys_under(&store, "backups/").len(), 1);
    gc(&vault, 50).unwrap();
    let out = dir.path().join("restored.raw");
    restore_disk(
        &vault,
        &m.disks[0],
        &out,
        ImageFormat::Raw,
        None,
        &opts("r"),
    )
    .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
}

#[test]
fn a_truncated_get_is_a_corruption_error_and_a_restore_never_returns_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryStore::new());
    let vault = vault_over(&store, &dir.path().join("state"));
    let img = image(dir.path(), 2);
    let m = backup_disk(&vault, Box::new(RawSource::open(&img).unwrap()), &opts("b")).unwrap();

    // One blob read through its location: the short answer is Corrupt, naming the pack.
    let lookup = vault.lookup().unwrap();
    let root = m.disks[0].index_root;
    let loc: BlobLocation = lookup.get(&root).unwrap().unwrap();
    store.inject(Fault::TruncateGet(".pack".into()));
    let err = vault.read_blob_at(&loc, &root).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains(&loc.pack.to_string()), "{err}");

    // A restore whose first read (the index root) comes back short fails with
    // Corrupt and leaves no image; the next one is byte-exact.
    store.inject(Fault::TruncateGet(".pack".into()));
    let out = dir.path().join("restored.raw");
    let err = restore_disk(
        &vault,
        &m.disks[0],
        &out,
        ImageFormat::Raw,
        None,
        &opts("r"),
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(!out.exists(), "a failed restore leaves no image");
    restore_disk(
        &vault,
        &m.disks[0],
        &out,
        ImageFormat::Raw,
        None,
        &opts("r"),
    )
    .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
}

#[test]
fn a_listing_that_misses_a_pack_loses_nothing_the_cache_is_rebuilt_from_trailers() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryStore::new());
    let vault = vault_over(&store, &dir.path().join("state"));
    let img = image(dir.path(), 3);
    let m = backup_disk(&vault, Box::new(RawSource::open(&img).unwrap()), &opts("b")).unwrap();

    // The lookup cache is lost and rebuilt from a listing that misses a pack.
    std::fs::remove_file(dir.path().join("state/cache/lookup.sqlite")).unwrap();
    store.inject(Fault::DropListEntry(".pack".into()));
    let before = store.requests();
    vault.lookup().unwrap().rebuild(store.as_ref()).unwrap();
    let after = store.requests();
    assert!(after.lists > before.lists);
    // The restore finds the missed pack's blobs through the trailers: byte-exact.
    let out = dir.path().join("restored.raw");
    restore_disk(
        &vault,
        &m.disks[0],
        &out,
        ImageFormat::Raw,
        None,
        &opts("r"),
    )
    .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
}
