//! Index pages read ahead on a shared store (`walk::PageReader`): a backup reads its
//! base's pages several GETs at once, and a page whose read-ahead failed is read again on
//! the caller's own path.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::error::Error;
use crate::vault::walk::load_root;

/// A [`MemoryStore`] whose ranged GETs of the chosen blobs (the index pages) wait (up to
/// a deadline) for a second one to be in flight and record the most at once; one chosen
/// read can fail once.
struct SlowPages {
    inner: MemoryStore,
    pages: Mutex<Vec<(u64, usize)>>,
    gets: AtOnce,
    fail_once: Mutex<Option<(u64, usize)>>,
    failed: AtomicU64,
}

impl ChunkStore for SlowPages {
    forward_to_inner!(describe, get, len, put, put_spooled, list, delete);
    fn get_range(&self, key: &str, offset: u64, len: usize) -> crate::error::Result<Vec<u8>> {
        {
            let mut f = self.fail_once.lock().unwrap();
            if *f == Some((offset, len)) {
                *f = None;
                self.failed.fetch_add(1, Ordering::SeqCst);
                return Err(Error::corrupt("injected short read"));
            }
        }
        if !self.pages.lock().unwrap().contains(&(offset, len)) {
            return self.inner.get_range(key, offset, len);
        }
        self.gets.run(|| self.inner.get_range(key, offset, len))
    }
}

/// 64 MiB of disk per index page (1024 chunks of 64 KiB).
const PAGE_SPAN: u64 = 64 << 20;

#[test]
fn a_backup_reads_its_bases_index_pages_several_at_once_and_rereads_a_page_that_failed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SlowPages {
        inner: MemoryStore::new(),
        pages: Mutex::new(Vec::new()),
        gets: AtOnce::default(),
        fail_once: Mutex::new(None),
        failed: AtomicU64::new(0),
    });
    let vault = vault_over(&store, &dir.path().join("state"));
    // A sparse 256 MiB disk: one 64 KiB chunk of data in each page's span.
    let img = dir.path().join("disk.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(4 * PAGE_SPAN).unwrap();
    let mut chunk = vec![0u8; 65536];
    let write_all = |salt: &[u8], chunk: &mut Vec<u8>| {
        for p in 0..4u64 {
            blake3::Hasher::new()
                .update(salt)
                .update(&p.to_le_bytes())
                .finalize_xof()
                .fill(chunk);
            f.write_all_at(chunk, p * PAGE_SPAN + (p + 1) * 65536)
                .unwrap();
        }
    };
    write_all(b"full", &mut chunk);
    let full = backup_disk(
        &vault,
        Box::new(RawSource::open(&img).unwrap()),
        &opts("full"),
    )
    .unwrap();

    // The next backup is given its change list against the full: it opens the full's 4
    // pages. Page 2's read-ahead fails once.
    let lookup = vault.lookup().unwrap();
    let root = load_root(&vault, &lookup, &full.disks[0]).unwrap();
    assert!(root.pages.iter().all(|d| !d.is_zero()));
    let loc = lookup.get(&root.pages[2]).unwrap().unwrap();
    *store.fail_once.lock().unwrap() = Some((loc.offset, loc.length as usize));
    write_all(b"next", &mut chunk);
    *store.pages.lock().unwrap() = root
        .pages
        .iter()
        .map(|d| lookup.get(d).unwrap().unwrap())
        .map(|l| (l.offset, l.length as usize))
        .collect();
    let changed = (0..4u64)
        .map(|p| crate::source::Extent {
            offset: p * PAGE_SPAN + (p + 1) * 65536,
            length: 65536,
        })
        .collect();
    let next_opts = BackupOptions {
        change: crate::cbt::ChangeHint::ChangeList {
            extents: changed,
            since: None,
            covers: None,
        },
        ..opts("next")
    };
    let next = backup_disk(&vault, Box::new(RawSource::open(&img).unwrap()), &next_opts).unwrap();
    assert_eq!(
        next.disks[0].chunks_read, 4,
        "a change list: only the 4 chunks read"
    );
    store.pages.lock().unwrap().clear();
    let (most, gave_up) = store.gets.most();
    assert!(
        most >= 2 && !gave_up,
        "the base's pages are read several at once (at most {most} GETs at once)"
    );
    assert_eq!(
        store.failed.load(Ordering::SeqCst),
        1,
        "the injected failure fired"
    );
    assert_eq!(next.disks[0].chunks_new, 4);

    // The page read again after its failed read-ahead is right: the backup restores.
    let out = dir.path().join("restored.raw");
    restore_disk(
        &vault,
        &next.disks[0],
        &out,
        ImageFormat::Raw,
        None,
        &opts("r"),
    )
    .unwrap();
    let (a, b) = (std::fs::read(&out).unwrap(), std::fs::read(&img).unwrap());
    assert!(a == b, "restored image differs from the disk");
}
