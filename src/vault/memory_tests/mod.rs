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

mod faults;
mod gc;
mod pages;
mod reads;
mod uploads;

use crate::backup::{BackupOptions, backup_disk};
use crate::chunk::ChunkSize;
use crate::error::ErrorKind;
use crate::restore::{ImageFormat, restore_disk};
use crate::source::RawSource;
use crate::vault::Vault;
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
