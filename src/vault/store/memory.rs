//! [`MemoryStore`]: a vault's objects in memory, with fault injection, for tests of the
//! vault logic (what a failed put, a short read or a stale listing does to a backup,
//! a restore or GC) without a server that can be made to misbehave on cue.
//!
//! Faults are armed with [`MemoryStore::inject`] and fire once each:
//! - [`Fault::FailPut`]`(n)`: the n-th put from now (1 = the next) fails with `Io` and
//!   stores nothing;
//! - [`Fault::TruncateGet`]`(key part)`: the next get or ranged get of a key containing
//!   the part returns one byte less than asked (the store then reports it as `Corrupt`,
//!   as every store must report a short answer);
//! - [`Fault::DropListEntry`]`(key part)`: the next listing omits the first key containing
//!   the part (an eventually consistent listing).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{ChunkStore, ObjectMeta, check_key};
use crate::error::{Error, ErrorKind, IoContext, Result};

/// A fault to inject once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    FailPut(u64),
    TruncateGet(String),
    DropListEntry(String),
}

/// Counts of the requests a store served (compare with S3 request counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    pub gets: u64,
    pub puts: u64,
    pub lists: u64,
    pub deletes: u64,
}

/// Objects in memory.
#[derive(Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
    faults: Mutex<Vec<(Fault, u64)>>,
    gets: AtomicU64,
    puts: AtomicU64,
    lists: AtomicU64,
    deletes: AtomicU64,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Arm a fault (fires once).
    pub fn inject(&self, fault: Fault) {
        let puts = self.puts.load(Ordering::SeqCst);
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((fault, puts));
    }

    /// Keys stored, sorted.
    pub fn keys(&self) -> Vec<String> {
        self.objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Requests served so far.
    pub fn requests(&self) -> RequestCounts {
        RequestCounts {
            gets: self.gets.load(Ordering::SeqCst),
            puts: self.puts.load(Ordering::SeqCst),
            lists: self.lists.load(Ordering::SeqCst),
            deletes: self.deletes.load(Ordering::SeqCst),
        }
    }

    /// Take the first armed fault that `fires` says fires now.
    fn take_fault(&self, fires: impl Fn(&Fault, u64) -> bool) -> Option<Fault> {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        let i = faults.iter().position(|(f, at)| fires(f, *at))?;
        Some(faults.remove(i).0)
    }

    fn truncated(&self, key: &str) -> bool {
        self.take_fault(|f, _| matches!(f, Fault::TruncateGet(part) if key.contains(part.as_str())))
            .is_some()
    }

    fn store(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        check_key(key)?;
        let n = self.puts.fetch_add(1, Ordering::SeqCst) + 1;
        if self
            .take_fault(|f, armed_at| matches!(f, Fault::FailPut(k) if armed_at + k == n))
            .is_some()
        {
            return Err(Error::new(
                ErrorKind::Io,
                format!("memory store: injected failure of put #{n} ({key})"),
            ));
        }
        self.objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned(), bytes);
        Ok(())
    }

    fn object(&self, key: &str) -> Result<Vec<u8>> {
        check_key(key)?;
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("memory store: no object {key}")))
    }
}

impl ChunkStore for MemoryStore {
    fn describe(&self) -> String {
        "memory store".into()
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let mut bytes = self.object(key)?;
        if self.truncated(key) {
            bytes.pop();
        }
        Ok(bytes)
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let bytes = self.object(key)?;
        let start = (offset as usize).min(bytes.len());
        let mut end = start.saturating_add(len).min(bytes.len());
        if self.truncated(key) {
            end = end.saturating_sub(1).max(start);
        }
        if end - start != len {
            return Err(Error::corrupt(format!(
                "memory store: {key} gave {} of the {len} bytes asked at offset {offset}",
                end - start
            )));
        }
        Ok(bytes[start..end].to_vec())
    }

    fn len(&self, key: &str) -> Result<u64> {
        check_key(key)?;
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .map(|b| b.len() as u64)
            .ok_or_else(|| Error::not_found(format!("memory store: no object {key}")))
    }

    fn put(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.store(key, bytes.to_vec())
    }

    fn put_owned(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        self.store(key, bytes)
    }

    fn put_spooled(&self, key: &str, spooled: &Path) -> Result<()> {
        let bytes = std::fs::read(spooled).ctx(|| format!("reading {}", spooled.display()))?;
        self.store(key, bytes)?;
        std::fs::remove_file(spooled).ctx(|| format!("removing {}", spooled.display()))
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        check_key(prefix)?;
        self.lists.fetch_add(1, Ordering::SeqCst);
        let dir = format!("{prefix}/");
        let mut out: Vec<ObjectMeta> = self
            .objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .range(dir.clone()..)
            .take_while(|(k, _)| k.starts_with(&dir))
            .map(|(k, v)| ObjectMeta {
                key: k.clone(),
                len: v.len() as u64,
            })
            .collect();
        let dropped = self.take_fault(|f, _| {
            matches!(f, Fault::DropListEntry(part) if out.iter().any(|o| o.key.contains(part.as_str())))
        });
        if let Some(Fault::DropListEntry(part)) = dropped
            && let Some(i) = out.iter().position(|o| o.key.contains(part.as_str()))
        {
            out.remove(i);
        }
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        check_key(key)?;
        self.deletes.fetch_add(1, Ordering::SeqCst);
        self.objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key)
            .map(|_| ())
            .ok_or_else(|| Error::not_found(format!("memory store: no object {key}")))
    }
}
