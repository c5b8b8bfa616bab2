//! Several uploads at once: a backup's packs, a replication's replica packs.

use super::*;

/// A [`MemoryStore`] whose pack uploads wait (up to a deadline) for a second upload to be
/// in flight, and which records how many were in flight at once: a slow link where only
/// parallel uploads keep up.
struct ConcurrentPuts {
    inner: MemoryStore,
    puts: AtOnce,
}

impl ChunkStore for ConcurrentPuts {
    forward_to_inner!(describe, get, get_range, len, put, list, delete);
    fn put_spooled(&self, key: &str, spooled: &Path) -> crate::error::Result<()> {
        self.puts.run(|| self.inner.put_spooled(key, spooled))
    }
    fn put_owned(&self, key: &str, bytes: Vec<u8>) -> crate::error::Result<()> {
        self.puts.run(|| self.inner.put_owned(key, bytes))
    }
}

#[test]
fn a_backup_uploads_several_packs_at_once_and_records_its_manifest_after_all_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ConcurrentPuts {
        inner: MemoryStore::new(),
        puts: AtOnce::default(),
    });
    let dyn_store: Arc<dyn ChunkStore> = Arc::clone(&store) as Arc<dyn ChunkStore>;
    let state = dir.path().join("state");
    Vault::create_in(
        Arc::clone(&dyn_store),
        &state,
        true,
        ChunkSize::new(65536).unwrap(),
        1,
        None,
        None,
    )
    .unwrap();
    // 256 KiB packs: the 3 MiB of data make a dozen packs.
    let toml = String::from_utf8(store.get("vault.toml").unwrap()).unwrap();
    assert!(toml.contains("pack_target = 33554432"), "{toml}");
    store
        .put(
            "vault.toml",
            toml.replace("pack_target = 33554432", "pack_target = 262144")
                .as_bytes(),
        )
        .unwrap();
    let vault = Vault::open_in(dyn_store, &state, true).unwrap();
    let img = image(dir.path(), 7);

    let m = backup_disk(
        &vault,
        Box::new(RawSource::open(&img).unwrap()),
        &opts("b1"),
    )
    .unwrap();
    let packs = keys_under(&store.inner, "packs/").len();
    assert!(packs >= 8, "{packs} packs");
    let most = store.puts.most().0;
    assert!(
        (2..=crate::backup::pipeline::UPLOADS_IN_FLIGHT).contains(&most),
        "{most} pack uploads in flight at once"
    );
    // The manifest names only durable packs: the restore is byte-exact.
    assert_eq!(keys_under(&store.inner, "backups/").len(), 1);
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
fn replication_onto_an_object_store_lands_several_packs_at_once_and_restores_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let source = Vault::create(&dir.path().join("src"), ChunkSize::new(65536).unwrap(), 1).unwrap();
    // 24 MiB of random data: three send batches of 8 MiB, one pack each.
    let img = dir.path().join("big.raw");
    let mut data = vec![0u8; 24 << 20];
    blake3::Hasher::new()
        .update(b"replica")
        .finalize_xof()
        .fill(&mut data);
    std::fs::write(&img, &data).unwrap();
    let m = backup_disk(
        &source,
        Box::new(RawSource::open(&img).unwrap()),
        &opts("b"),
    )
    .unwrap();

    let store = Arc::new(ConcurrentPuts {
        inner: MemoryStore::new(),
        puts: AtOnce::default(),
    });
    let dyn_store: Arc<dyn ChunkStore> = Arc::clone(&store) as Arc<dyn ChunkStore>;
    let state = dir.path().join("target-state");
    let target = Vault::create_in(
        dyn_store,
        &state,
        true,
        ChunkSize::new(65536).unwrap(),
        1,
        None,
        None,
    )
    .unwrap();
    let t = crate::replicate::VaultTarget::new(target).unwrap();
    crate::replicate::replicate_backup(
        &source,
        &m,
        &t,
        &crate::replicate::ReplicateOptions::default(),
    )
    .unwrap();
    let most = store.puts.most().0;
    assert!(
        (2..=crate::replicate::engine::MAX_PUTS_IN_FLIGHT).contains(&most),
        "{most} replica packs in flight at once"
    );
    let target = t.vault();
    let replicas = target.manifests().unwrap();
    assert_eq!(replicas.len(), 1);
    let out = dir.path().join("restored.raw");
    restore_disk(
        target,
        &replicas[0].disks[0],
        &out,
        ImageFormat::Raw,
        None,
        &opts("r"),
    )
    .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), data);
}
