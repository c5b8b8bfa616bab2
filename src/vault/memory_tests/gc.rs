//! GC over an object store: what it frees, and a pack already gone when it deletes it.

use super::*;
use crate::vault::gc::gc;

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

/// A [`MemoryStore`] where each pack is already gone when GC's DELETE arrives (another
/// party removed it in between).
struct PacksVanish {
    inner: MemoryStore,
}

impl ChunkStore for PacksVanish {
    forward_to_inner!(describe, get, get_range, len, put, put_spooled, list);
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
    let vault = vault_over(&store, &dir.path().join("state"));
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
