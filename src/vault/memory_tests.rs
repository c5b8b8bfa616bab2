//! The vault logic over [`MemoryStore`] with injected faults: what a failed put, a short
//! read or a listing that misses an object does to a backup, a restore and GC.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::backup::{BackupOptions, backup_disk};
use crate::chunk::ChunkSize;
use crate::error::ErrorKind;
use crate::restore::{ImageFormat, restore_disk};
use crate::source::RawSource;
use crate::vault::Vault;
use crate::vault::gc::gc;
use crate::vault::lookup::BlobLocation;
use crate::vault::store::{ChunkStore, Fault, MemoryStore};

/// A 4 MiB raw image: random data with a hole, written where `dir` says.
fn image(dir: &Path, seed: u8) -> std::path::PathBuf {
    let path = dir.join(format!("disk{seed}.raw"));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(4 << 20).unwrap();
    let mut data = vec![0u8; 3 << 20];
    blake3::Hasher::new()
        .update(&[seed])
        .finalize_xof()
        .fill(&mut data);
    f.write_all_at(&data, 1 << 20).unwrap();
    path
}

fn vault_over(store: &Arc<MemoryStore>, state: &Path) -> Vault {
    let dyn_store: Arc<dyn ChunkStore> = Arc::clone(store) as Arc<dyn ChunkStore>;
    Vault::create_in(
        dyn_store,
        state,
        true,
        ChunkSize::new(65536).unwrap(),
        1,
        None,
        None,
    )
    .unwrap()
}

fn opts(name: &str) -> BackupOptions {
    BackupOptions {
        disk_id: Some("disk".into()),
        name: Some(name.into()),
        ..BackupOptions::default()
    }
}

fn keys_under(store: &MemoryStore, prefix: &str) -> Vec<String> {
    store
        .keys()
        .into_iter()
        .filter(|k| k.starts_with(prefix))
        .collect()
}

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
    let spool: Vec<_> = std::fs::read_dir(vault.spool_dir()).unwrap().collect();
    assert!(spool.is_empty(), "the spooled pack is removed: {spool:?}");

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

#[test]
fn gc_after_delete_frees_every_pack_object() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryStore::new());
    let vault = vault_over(&store, &dir.path().join("state"));
    let img = image(dir.path(), 4);
    let m = backup_disk(&vault, Box::new(RawSource::open(&img).unwrap()), &opts("b")).unwrap();
    assert!(!keys_under(&store, "packs/").is_empty());
    vault.delete_manifest(&m).unwrap();
    let stats = gc(&vault, 50).unwrap();
    assert!(stats.packs_deleted > 0);
    assert_eq!(keys_under(&store, "packs/"), Vec::<String>::new());
    assert_eq!(store.keys(), vec!["vault.toml".to_string()]);
}

#[test]
fn a_restore_from_a_shared_store_reads_a_pack_in_windows_not_blob_by_blob() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryStore::new());
    let vault = vault_over(&store, &dir.path().join("state"));
    let img = image(dir.path(), 3);
    let m = backup_disk(&vault, Box::new(RawSource::open(&img).unwrap()), &opts("b")).unwrap();
    let chunks = m.disks[0].chunks_new;
    assert!(chunks >= 48, "3 MiB of random data: {chunks} chunks");
    let before = store.requests().gets;
    let out = dir.path().join("restored.raw");
    let ropts = BackupOptions {
        threads: 1,
        ..opts("r")
    };
    restore_disk(&vault, &m.disks[0], &out, ImageFormat::Raw, None, &ropts).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
    let gets = store.requests().gets - before;
    // One window (up to READ_AHEAD bytes) per pack run, plus the manifest and index
    // reads: far fewer than one GET per chunk.
    assert!(gets * 4 < chunks, "{gets} GETs for {chunks} chunks");
}

/// A [`MemoryStore`] whose pack uploads wait (up to a deadline) for a second upload to be
/// in flight, and which records how many were in flight at once: a slow link where only
/// parallel uploads keep up.
struct ConcurrentPuts {
    inner: MemoryStore,
    state: std::sync::Mutex<(usize, usize, bool)>, // (in flight, most at once, gave up)
    changed: std::sync::Condvar,
}

impl ConcurrentPuts {
    fn most_at_once(&self) -> usize {
        self.state.lock().unwrap().1
    }
}

impl ChunkStore for ConcurrentPuts {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn get(&self, key: &str) -> crate::error::Result<Vec<u8>> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: usize) -> crate::error::Result<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }
    fn len(&self, key: &str) -> crate::error::Result<u64> {
        self.inner.len(key)
    }
    fn put(&self, key: &str, bytes: &[u8]) -> crate::error::Result<()> {
        self.inner.put(key, bytes)
    }
    fn put_spooled(&self, key: &str, spooled: &Path) -> crate::error::Result<()> {
        let mut s = self.state.lock().unwrap();
        s.0 += 1;
        s.1 = s.1.max(s.0);
        self.changed.notify_all();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while s.0 < 2 && !s.2 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                s.2 = true; // never two at once: stop waiting for good
                break;
            }
            s = self.changed.wait_timeout(s, left).unwrap().0;
        }
        drop(s);
        let r = self.inner.put_spooled(key, spooled);
        self.state.lock().unwrap().0 -= 1;
        r
    }
    fn list(&self, prefix: &str) -> crate::error::Result<Vec<crate::vault::store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> crate::error::Result<()> {
        self.inner.delete(key)
    }
}

#[test]
fn a_backup_uploads_several_packs_at_once_and_records_its_manifest_after_all_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ConcurrentPuts {
        inner: MemoryStore::new(),
        state: std::sync::Mutex::new((0, 0, false)),
        changed: std::sync::Condvar::new(),
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
    let most = store.most_at_once();
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

/// A [`MemoryStore`] that counts the bytes its ranged GETs return.
struct RangeBytes {
    inner: MemoryStore,
    bytes: std::sync::atomic::AtomicU64,
}

impl ChunkStore for RangeBytes {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn get(&self, key: &str) -> crate::error::Result<Vec<u8>> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: usize) -> crate::error::Result<Vec<u8>> {
        self.bytes
            .fetch_add(len as u64, std::sync::atomic::Ordering::SeqCst);
        self.inner.get_range(key, offset, len)
    }
    fn len(&self, key: &str) -> crate::error::Result<u64> {
        self.inner.len(key)
    }
    fn put(&self, key: &str, bytes: &[u8]) -> crate::error::Result<()> {
        self.inner.put(key, bytes)
    }
    fn put_spooled(&self, key: &str, spooled: &Path) -> crate::error::Result<()> {
        self.inner.put_spooled(key, spooled)
    }
    fn list(&self, prefix: &str) -> crate::error::Result<Vec<crate::vault::store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> crate::error::Result<()> {
        self.inner.delete(key)
    }
}

#[test]
fn a_restore_from_a_shared_store_with_several_workers_reads_each_pack_byte_once_in_few_gets() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RangeBytes {
        inner: MemoryStore::new(),
        bytes: std::sync::atomic::AtomicU64::new(0),
    });
    let dyn_store: Arc<dyn ChunkStore> = Arc::clone(&store) as Arc<dyn ChunkStore>;
    let vault = Vault::create_in(
        dyn_store,
        &dir.path().join("state"),
        true,
        ChunkSize::new(65536).unwrap(),
        1,
        None,
        None,
    )
    .unwrap();
    // 40 MiB of random data: two packs, five batches of 8 MiB.
    let img = dir.path().join("big.raw");
    let mut data = vec![0u8; 40 << 20];
    blake3::Hasher::new()
        .update(b"big")
        .finalize_xof()
        .fill(&mut data);
    std::fs::write(&img, &data).unwrap();
    let m = backup_disk(&vault, Box::new(RawSource::open(&img).unwrap()), &opts("b")).unwrap();
    let packs: u64 = store
        .inner
        .list("packs")
        .unwrap()
        .iter()
        .map(|o| o.len)
        .sum();
    let gets_before = store.inner.requests().gets;
    store.bytes.store(0, std::sync::atomic::Ordering::SeqCst);
    let out = dir.path().join("restored.raw");
    let ropts = BackupOptions {
        threads: 4,
        ..opts("r")
    };
    restore_disk(&vault, &m.disks[0], &out, ImageFormat::Raw, None, &ropts).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), data);
    let read = store.bytes.load(std::sync::atomic::Ordering::SeqCst);
    let gets = store.inner.requests().gets - gets_before;
    // Workers read disjoint windows: every stored byte about once (index blobs aside).
    assert!(
        read <= packs + packs / 50,
        "{read} bytes read for {packs} bytes of packs"
    );
    assert!(gets <= 16, "{gets} GETs for 640 chunks");
}

/// A [`MemoryStore`] where each pack is already gone when GC's DELETE arrives (another
/// party removed it in between).
struct PacksVanish {
    inner: MemoryStore,
}

impl ChunkStore for PacksVanish {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn get(&self, key: &str) -> crate::error::Result<Vec<u8>> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: usize) -> crate::error::Result<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }
    fn len(&self, key: &str) -> crate::error::Result<u64> {
        self.inner.len(key)
    }
    fn put(&self, key: &str, bytes: &[u8]) -> crate::error::Result<()> {
        self.inner.put(key, bytes)
    }
    fn put_spooled(&self, key: &str, spooled: &Path) -> crate::error::Result<()> {
        self.inner.put_spooled(key, spooled)
    }
    fn list(&self, prefix: &str) -> crate::error::Result<Vec<crate::vault::store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> crate::error::Result<()> {
        if key.starts_with("packs/") {
            self.inner.delete(key)?;
        }
        self.inner.delete(key)
    }
}

#[derive(Clone, Default)]
struct LogBuf(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn gc_logs_a_pack_already_gone_at_warn_with_its_key_and_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(PacksVanish {
        inner: MemoryStore::new(),
    });
    let dyn_store: Arc<dyn ChunkStore> = Arc::clone(&store) as Arc<dyn ChunkStore>;
    let vault = Vault::create_in(
        dyn_store,
        &dir.path().join("state"),
        true,
        ChunkSize::new(65536).unwrap(),
        1,
        None,
        None,
    )
    .unwrap();
    let img = image(dir.path(), 5);
    let m = backup_disk(&vault, Box::new(RawSource::open(&img).unwrap()), &opts("b")).unwrap();
    let packs = keys_under(&store.inner, "packs/");
    assert!(!packs.is_empty());
    vault.delete_manifest(&m).unwrap();

    let log = LogBuf::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let stats = tracing::subscriber::with_default(subscriber, || gc(&vault, 50)).unwrap();
    assert!(stats.packs_deleted > 0);
    assert!(keys_under(&store.inner, "packs/").is_empty());
    let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    for key in &packs {
        assert!(
            log.contains("WARN") && log.contains(key.as_str()),
            "{key} not in the log: {log}"
        );
    }
}

#[test]
fn instant_access_from_a_shared_store_reads_a_window_per_get_not_a_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryStore::new());
    let vault = Arc::new(vault_over(&store, &dir.path().join("state")));
    let img = image(dir.path(), 6);
    let m = backup_disk(&vault, Box::new(RawSource::open(&img).unwrap()), &opts("b")).unwrap();
    let chunks = m.disks[0].chunks_new;
    assert!(chunks >= 48);
    let before = store.requests().gets;
    let cache = Arc::new(
        crate::disk_reader::DiskCache::open(Arc::clone(&vault), &m.disks[0], 8 << 20).unwrap(),
    );
    let reader = cache.reader().unwrap();
    let mut got = vec![0u8; 4 << 20];
    for (i, buf) in got.chunks_mut(64 << 10).enumerate() {
        reader.read_at((i as u64) << 16, buf).unwrap();
    }
    assert_eq!(got, std::fs::read(&img).unwrap());
    let gets = store.requests().gets - before;
    // 3 MiB of chunks in windows of up to 4 MiB, plus index root and page.
    assert!(gets <= 6, "{gets} GETs for {chunks} chunks");
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
        state: std::sync::Mutex::new((0, 0, false)),
        changed: std::sync::Condvar::new(),
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
    let most = store.most_at_once();
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

#[test]
fn restoring_an_incremental_from_a_shared_store_reads_each_byte_about_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RangeBytes {
        inner: MemoryStore::new(),
        bytes: std::sync::atomic::AtomicU64::new(0),
    });
    let dyn_store: Arc<dyn ChunkStore> = Arc::clone(&store) as Arc<dyn ChunkStore>;
    let vault = Vault::create_in(
        dyn_store,
        &dir.path().join("state"),
        true,
        ChunkSize::new(65536).unwrap(),
        1,
        None,
        None,
    )
    .unwrap();
    let img = dir.path().join("disk.raw");
    let mut data = vec![0u8; 24 << 20];
    blake3::Hasher::new()
        .update(b"incr")
        .finalize_xof()
        .fill(&mut data);
    std::fs::write(&img, &data).unwrap();
    backup_disk(
        &vault,
        Box::new(RawSource::open(&img).unwrap()),
        &opts("full"),
    )
    .unwrap();
    // One chunk in every 16 changes: the next backup's chunks alternate between the full's
    // packs and its own.
    for c in (0..data.len() / 65536).step_by(16) {
        data[c * 65536] ^= 0xff;
    }
    std::fs::write(&img, &data).unwrap();
    let m = backup_disk(
        &vault,
        Box::new(RawSource::open(&img).unwrap()),
        &opts("next"),
    )
    .unwrap();
    assert_eq!(m.disks[0].chunks_new, 24);
    let packs: u64 = store
        .inner
        .list("packs")
        .unwrap()
        .iter()
        .map(|o| o.len)
        .sum();
    store.bytes.store(0, std::sync::atomic::Ordering::SeqCst);
    let out = dir.path().join("restored.raw");
    let ropts = BackupOptions {
        threads: 4,
        ..opts("r")
    };
    restore_disk(&vault, &m.disks[0], &out, ImageFormat::Raw, None, &ropts).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), data);
    let read = store.bytes.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        read <= packs + packs / 20,
        "{read} bytes read for {packs} bytes of packs"
    );
}
