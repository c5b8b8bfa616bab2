//! How restores and instant access read a shared store: windows per GET, each stored
//! byte about once.

use super::*;

#[test]
fn a_restore_from_a_shared_store_reads_a_pack_in_windows_not_blob_by_blob() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryStore::new());
    let vault = vault_over(&store, &dir.path().join("state"));
    let img = image(dir.path(), 3);
    let m = backup_disk(
        &vault,
        Box::new(RawSource::open(&img).unwrap()),
        &in_order("b"),
    )
    .unwrap();
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

/// A [`MemoryStore`] that counts the bytes its ranged GETs return.
struct RangeBytes {
    inner: MemoryStore,
    bytes: std::sync::atomic::AtomicU64,
}

impl ChunkStore for RangeBytes {
    forward_to_inner!(describe, get, len, put, put_spooled, list, delete);
    fn get_range(&self, key: &str, offset: u64, len: usize) -> crate::error::Result<Vec<u8>> {
        self.bytes
            .fetch_add(len as u64, std::sync::atomic::Ordering::SeqCst);
        self.inner.get_range(key, offset, len)
    }
}

/// A vault (64 KiB chunks, zstd 1) over a [`RangeBytes`]-counting in-memory store.
fn range_counted_vault(dir: &Path) -> (Arc<RangeBytes>, Vault) {
    let store = Arc::new(RangeBytes {
        inner: MemoryStore::new(),
        bytes: std::sync::atomic::AtomicU64::new(0),
    });
    let dyn_store: Arc<dyn ChunkStore> = Arc::clone(&store) as Arc<dyn ChunkStore>;
    let vault = Vault::create_in(
        dyn_store,
        &dir.join("state"),
        true,
        ChunkSize::new(65536).unwrap(),
        1,
        None,
        None,
    )
    .unwrap();
    (store, vault)
}

#[test]
fn a_restore_from_a_shared_store_with_several_workers_reads_each_pack_byte_once_in_few_gets() {
    let dir = tempfile::tempdir().unwrap();
    let (store, vault) = range_counted_vault(dir.path());
    // 40 MiB of random data: two packs, five batches of 8 MiB.
    let img = dir.path().join("big.raw");
    let mut data = vec![0u8; 40 << 20];
    blake3::Hasher::new()
        .update(b"big")
        .finalize_xof()
        .fill(&mut data);
    std::fs::write(&img, &data).unwrap();
    let m = backup_disk(
        &vault,
        Box::new(RawSource::open(&img).unwrap()),
        &in_order("b"),
    )
    .unwrap();
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

#[test]
fn instant_access_from_a_shared_store_reads_a_window_per_get_not_a_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryStore::new());
    let vault = Arc::new(vault_over(&store, &dir.path().join("state")));
    let img = image(dir.path(), 6);
    let m = backup_disk(
        &vault,
        Box::new(RawSource::open(&img).unwrap()),
        &in_order("b"),
    )
    .unwrap();
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
fn restoring_an_incremental_from_a_shared_store_reads_each_byte_about_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, vault) = range_counted_vault(dir.path());
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
        &in_order("full"),
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
        &in_order("next"),
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

/// Backup options with one worker: blobs land in the packs in disk order, so what these
/// tests count depends only on the reads under test, not on how a loaded machine
/// scheduled the backup's workers (several workers pack in completion order).
fn in_order(name: &str) -> BackupOptions {
    BackupOptions {
        threads: 1,
        ..opts(name)
    }
}
