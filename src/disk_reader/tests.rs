//! Read-ahead of sequential readers over an in-memory object store: what is fetched
//! ahead, that a run that turns random stops it, and that a corrupt blob it reaches is
//! never served (the NBD read fails with EIO).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::backup::{BackupOptions, backup_disk};
use crate::chunk::ChunkSize;
use crate::manifest::BackupManifest;
use crate::source::RawSource;
use crate::vault::store::{ChunkStore, MemoryStore, ObjectMeta, pack_key};

const MIB: u64 = 1 << 20;
const CS: u64 = 64 << 10;

/// A raw image of `mib` MiB of random data with a 4 MiB hole at 8 MiB.
fn image(dir: &Path, mib: u64) -> PathBuf {
    let path = dir.join("disk.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(mib * MIB).unwrap();
    let mut data = vec![0u8; (mib * MIB) as usize];
    blake3::Hasher::new()
        .update(b"read-ahead")
        .finalize_xof()
        .fill(&mut data);
    data[(8 * MIB) as usize..(12 * MIB) as usize].fill(0);
    f.write_all_at(&data, 0).unwrap();
    path
}

fn backup_into(store: Arc<dyn ChunkStore>, dir: &Path, mib: u64) -> (Arc<Vault>, BackupManifest) {
    let vault = Vault::create_in(
        store,
        &dir.join("state"),
        true,
        ChunkSize::new(CS as u32).unwrap(),
        1,
        None,
        None,
    )
    .unwrap();
    let opts = BackupOptions {
        disk_id: Some("disk".into()),
        name: Some("b".into()),
        ..BackupOptions::default()
    };
    let img = image(dir, mib);
    let m = backup_disk(&vault, Box::new(RawSource::open(&img).unwrap()), &opts).unwrap();
    (Arc::new(vault), m)
}

/// Read the whole disk with `reader` in requests of `req` bytes.
fn read_all(reader: &DiskReader, req: u64) -> Vec<u8> {
    let mut out = vec![0u8; reader.cache().size() as usize];
    for (i, buf) in out.chunks_mut(req as usize).enumerate() {
        reader.read_at(i as u64 * req, buf).unwrap();
    }
    out
}

#[test]
fn a_sequential_reader_on_an_object_store_is_served_from_chunks_fetched_ahead_in_few_gets() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryStore::new());
    let (vault, m) = backup_into(Arc::clone(&store) as Arc<dyn ChunkStore>, dir.path(), 48);
    let cache = Arc::new(DiskCache::open(vault, &m.disks[0], CHUNK_CACHE_BYTES).unwrap());
    let gets_before = store.requests().gets;
    let reader = cache.reader().unwrap();
    let got = read_all(&reader, 2 * MIB);
    assert_eq!(got, std::fs::read(dir.path().join("disk.raw")).unwrap());
    drop(reader);
    let gets = store.requests().gets - gets_before;
    let c = cache.counts();
    // 44 MiB of data (the hole is never read): 704 chunks.
    assert_eq!(c.chunks_read, 704, "{c:?}");
    assert!(c.prefetched >= 600, "{c:?}");
    assert_eq!(c.rejected, 0, "{c:?}");
    // The reader fetched only what came before its run was noticed.
    assert!(c.reader_fetches <= 64, "{c:?}");
    // Windows of up to 4 MiB: about one GET per 64 chunks, index blobs included.
    assert!(gets <= 704 / 32, "{gets} GETs for 704 chunks: {c:?}");
}

#[test]
fn a_local_vault_reads_without_read_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let vault =
        Vault::create(&dir.path().join("v"), ChunkSize::new(CS as u32).unwrap(), 1).unwrap();
    let img = image(dir.path(), 16);
    let opts = BackupOptions {
        disk_id: Some("disk".into()),
        ..BackupOptions::default()
    };
    let m = backup_disk(&vault, Box::new(RawSource::open(&img).unwrap()), &opts).unwrap();
    let cache = Arc::new(DiskCache::open(Arc::new(vault), &m.disks[0], CHUNK_CACHE_BYTES).unwrap());
    let reader = cache.reader().unwrap();
    assert_eq!(read_all(&reader, MIB), std::fs::read(&img).unwrap());
    let c = cache.counts();
    assert_eq!((c.prefetched, c.prefetch_gets), (0, 0), "{c:?}");
    assert_eq!(c.reader_fetches, c.chunks_read);
}

/// A [`MemoryStore`] whose ranged GETs from read-ahead threads wait while it is closed
/// (up to a minute): a slow link on which read-ahead is still under way when the
/// reader's access changes.
struct Gated {
    inner: MemoryStore,
    closed: Mutex<bool>,
    opened: Condvar,
}

impl Gated {
    fn set(&self, closed: bool) {
        *self.closed.lock().unwrap() = closed;
        self.opened.notify_all();
    }
}

impl ChunkStore for Gated {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn get(&self, key: &str) -> crate::Result<Vec<u8>> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: usize) -> crate::Result<Vec<u8>> {
        if std::thread::current().name() == Some("bv-prefetch") {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut closed = self.closed.lock().unwrap();
            while *closed && Instant::now() < deadline {
                closed = self
                    .opened
                    .wait_timeout(closed, Duration::from_secs(1))
                    .unwrap()
                    .0;
            }
        }
        self.inner.get_range(key, offset, len)
    }
    fn len(&self, key: &str) -> crate::Result<u64> {
        self.inner.len(key)
    }
    fn put(&self, key: &str, bytes: &[u8]) -> crate::Result<()> {
        self.inner.put(key, bytes)
    }
    fn put_spooled(&self, key: &str, spooled: &Path) -> crate::Result<()> {
        self.inner.put_spooled(key, spooled)
    }
    fn list(&self, prefix: &str) -> crate::Result<Vec<ObjectMeta>> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> crate::Result<()> {
        self.inner.delete(key)
    }
}

#[test]
fn a_reader_whose_access_turns_random_has_its_queued_read_ahead_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Gated {
        inner: MemoryStore::new(),
        closed: Mutex::new(false),
        opened: Condvar::new(),
    });
    let (vault, m) = backup_into(Arc::clone(&store) as Arc<dyn ChunkStore>, dir.path(), 96);
    // The first 32 MiB are cached already (read without read-ahead).
    let mut cache =
        Arc::new(DiskCache::open_with(Arc::clone(&vault), &m.disks[0], 128 << 20, false).unwrap());
    let warm = cache.reader().unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..32 {
        warm.read_at(i * MIB, &mut buf).unwrap();
    }
    drop(warm);
    let shared = Arc::get_mut(&mut cache).unwrap();
    shared.prefetch = Some(Prefetcher::new(
        vault,
        Arc::clone(&shared.chunks),
        Arc::clone(&shared.counters),
    ));
    // Read-ahead cannot land now. A sequential run over the cached part schedules the
    // next PREFETCH_AHEAD bytes; then the reader jumps far away.
    store.set(true);
    let reader = cache.reader().unwrap();
    for i in 0..32 {
        reader.read_at(i * MIB, &mut buf).unwrap();
    }
    let scheduled = reader.stream.borrow().scheduled(CS);
    assert!(scheduled >= 16 * MIB, "{scheduled} bytes scheduled");
    reader.read_at(90 * MIB, &mut buf[..(64 << 10)]).unwrap();
    reader.read_at(70 * MIB, &mut buf[..(64 << 10)]).unwrap();
    assert_eq!(reader.stream.borrow().scheduled(CS), 0);
    store.set(false);
    drop(reader);
    // Stop and join the pool: the counts are final.
    drop(Arc::get_mut(&mut cache).unwrap().prefetch.take());
    let c = cache.counts();
    // What was not already on the wire when the access turned random was dropped.
    assert!(c.cancelled > 0, "{c:?}");
    assert!(
        c.prefetched + c.cancelled <= PREFETCH_AHEAD / CS + PREFETCH_BATCH / CS,
        "{c:?}"
    );
    assert!(
        c.prefetched <= (PREFETCH_THREADS as u64) * (PREFETCH_BATCH / CS),
        "{c:?}"
    );
}

#[test]
fn a_corrupt_blob_reached_by_read_ahead_is_never_served_the_nbd_read_fails_with_eio() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryStore::new());
    let (vault, m) = backup_into(Arc::clone(&store) as Arc<dyn ChunkStore>, dir.path(), 32);
    // Flip the last byte of the blob of the chunk at 20 MiB.
    let bad_offset = 20 * MIB;
    let probe = Arc::new(
        DiskCache::open_with(Arc::clone(&vault), &m.disks[0], CS as usize, false).unwrap(),
    );
    let digest = probe.reader().unwrap().digest(bad_offset / CS).unwrap();
    drop(probe);
    let loc = vault.lookup().unwrap().get(&digest).unwrap().unwrap();
    let key = pack_key(loc.pack);
    let mut pack = store.get(&key).unwrap();
    pack[(loc.offset + u64::from(loc.length) - 1) as usize] ^= 0x55;
    store.put(&key, &pack).unwrap();

    let cache =
        Arc::new(DiskCache::open(Arc::clone(&vault), &m.disks[0], CHUNK_CACHE_BYTES).unwrap());
    let sock = dir.path().join("nbd.sock");
    let listener = crate::nbd::server::Listener::bind(&format!("unix:{}", sock.display())).unwrap();
    let uri = listener.uri();
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (cache, stop) = (Arc::clone(&cache), Arc::clone(&stop));
        std::thread::spawn(move || {
            crate::instant::serve_cache(&cache, &listener, &stop, None, None)
        })
    };
    let out = dir.path().join("copy.raw");
    let convert = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&out)
        .output()
        .unwrap();
    stop.store(true, Ordering::SeqCst);
    server.join().unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&convert.stderr);
    assert!(!convert.status.success(), "the copy succeeded: {stderr}");
    assert!(stderr.contains("Input/output error"), "{stderr}");
    let c = cache.counts();
    assert!(c.prefetched > 0, "{c:?}");
    assert!(
        c.rejected >= 1,
        "read-ahead did not reach the bad blob: {c:?}"
    );
    // Never served: nor cached for the next reader, whose read fails as well.
    assert!(cache.chunks.get(&digest).is_none());
    let reader = cache.reader().unwrap();
    let mut buf = vec![0u8; CS as usize];
    let e = reader.read_at(bad_offset, &mut buf).unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::Corrupt, "{e}");
    // The chunks around it read fine.
    reader.read_at(bad_offset - CS, &mut buf).unwrap();
    reader.read_at(bad_offset + CS, &mut buf).unwrap();
}
