//! The vault logic over [`MemoryStore`] with injected faults: what a failed put, a short
//! read or a listing that misses an object does to a backup, a restore and GC.
//!
//! Shared helpers here; the tests by what they cover: [`faults`] (injected put, get and
//! list faults), [`gc`] (what GC frees and logs), [`pages`] (index pages read ahead), [`reads`] (how restores and instant
//! access read a shared store: windows, GETs, bytes), [`uploads`] (packs and replicas
//! uploaded several at once).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::backup::{BackupOptions, backup_disk};
use crate::chunk::ChunkSize;
use crate::error::ErrorKind;
use crate::restore::{ImageFormat, restore_disk};
use crate::source::RawSource;
use crate::vault::Vault;
use crate::vault::lookup::BlobLocation;
use crate::vault::store::{ChunkStore, Fault, MemoryStore};

/// Inside `impl ChunkStore for X` of a test store with an `inner` store: the methods
/// named, passed to `inner` as they are (the test store writes only what it changes).
macro_rules! forward_to_inner {
    ($($method:ident),* $(,)?) => { $(forward_to_inner!(@one $method);)* };
    (@one describe) => {
        fn describe(&self) -> String { self.inner.describe() }
    };
    (@one get) => {
        fn get(&self, key: &str) -> crate::error::Result<Vec<u8>> { self.inner.get(key) }
    };
    (@one get_range) => {
        fn get_range(&self, key: &str, offset: u64, len: usize) -> crate::error::Result<Vec<u8>> {
            self.inner.get_range(key, offset, len)
        }
    };
    (@one len) => {
        fn len(&self, key: &str) -> crate::error::Result<u64> { self.inner.len(key) }
    };
    (@one put) => {
        fn put(&self, key: &str, bytes: &[u8]) -> crate::error::Result<()> {
            self.inner.put(key, bytes)
        }
    };
    (@one put_spooled) => {
        fn put_spooled(&self, key: &str, spooled: &std::path::Path) -> crate::error::Result<()> {
            self.inner.put_spooled(key, spooled)
        }
    };
    (@one put_owned) => {
        fn put_owned(&self, key: &str, bytes: Vec<u8>) -> crate::error::Result<()> {
            self.inner.put_owned(key, bytes)
        }
    };
    (@one list) => {
        fn list(&self, prefix: &str) -> crate::error::Result<Vec<crate::vault::store::ObjectMeta>> {
            self.inner.list(prefix)
        }
    };
    (@one delete) => {
        fn delete(&self, key: &str) -> crate::error::Result<()> { self.inner.delete(key) }
    };
}

/// Counts the calls in flight at once. Each call first waits (up to 10 s) for a second
/// one to be in flight, until two have been seen together: a slow link where only
/// requests sent in parallel keep up.
#[derive(Default)]
struct AtOnce {
    state: std::sync::Mutex<(usize, usize, bool)>, // (in flight, most at once, gave up)
    changed: std::sync::Condvar,
}

impl AtOnce {
    fn run<T>(&self, call: impl FnOnce() -> T) -> T {
        let mut s = self.state.lock().unwrap();
        s.0 += 1;
        s.1 = s.1.max(s.0);
        self.changed.notify_all();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while s.0 < 2 && s.1 < 2 && !s.2 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                s.2 = true; // never two at once: stop waiting for good
                break;
            }
            s = self.changed.wait_timeout(s, left).unwrap().0;
        }
        drop(s);
        let r = call();
        self.state.lock().unwrap().0 -= 1;
        r
    }

    /// Most calls seen in flight at once, and whether a call gave up waiting.
    fn most(&self) -> (usize, bool) {
        let s = self.state.lock().unwrap();
        (s.1, s.2)
    }
}

mod faults;
mod gc;
mod pages;
mod reads;
mod uploads;

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

/// A shared-store vault (64 KiB chunks, zstd 1) over `store`, its local state in `state`.
fn vault_over<S: ChunkStore + 'static>(store: &Arc<S>, state: &Path) -> Vault {
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
