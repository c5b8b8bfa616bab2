//! A small pool of open handles (catalog connections, or `App`s that own one).
//!
//! SQLite in WAL mode lets any number of connections read while one writes, so the
//! service keeps a few connections and hands one to each request for its duration,
//! instead of one connection behind a global mutex. Hand-rolled (a `Mutex<Vec<T>>` and a
//! `Condvar`, ~80 lines) rather than r2d2/r2d2_sqlite: what is pooled is our own
//! `Catalog`/`App` (which run migrations and set pragmas when opened), not a bare
//! `rusqlite::Connection`, and the pool needs nothing else r2d2 offers (health checks,
//! timeouts, reaping). At most `max` handles exist; a caller beyond that waits for one
//! to come back. A handle is opened lazily, the first time the pool is short of one.

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use super::Catalog;
use crate::error::Result;

type Factory<T> = Box<dyn Fn() -> Result<T> + Send + Sync>;

struct Slots<T> {
    idle: Vec<T>,
    /// Handles in existence (idle + lent).
    open: usize,
}

/// A pool of at most `max` handles made by a factory.
pub struct Pool<T = Catalog> {
    slots: Mutex<Slots<T>>,
    back: Condvar,
    max: usize,
    factory: Factory<T>,
}

impl Pool<Catalog> {
    /// A pool of at most `max` connections to the catalog in `data`.
    pub fn new(data: &Path, max: usize) -> Pool<Catalog> {
        let data: PathBuf = data.to_path_buf();
        Pool::with(max, move || Catalog::open(&data))
    }
}

impl<T> Pool<T> {
    pub fn with(max: usize, factory: impl Fn() -> Result<T> + Send + Sync + 'static) -> Pool<T> {
        Pool {
            slots: Mutex::new(Slots {
                idle: Vec::new(),
                open: 0,
            }),
            back: Condvar::new(),
            max: max.max(1),
            factory: Box::new(factory),
        }
    }

    /// Put a handle opened elsewhere into the pool (it counts towards `max`).
    pub fn give(&self, t: T) {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        s.open += 1;
        s.idle.push(t);
        drop(s);
        self.back.notify_one();
    }

    /// A handle, opening one if none is idle and fewer than `max` exist, else waiting
    /// for one. Blocks: call it from a blocking thread, never on the async runtime.
    pub fn get(&self) -> Result<Lent<'_, T>> {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(t) = s.idle.pop() {
                return Ok(Lent {
                    pool: self,
                    t: Some(t),
                });
            }
            if s.open < self.max {
                s.open += 1;
                drop(s);
                return match (self.factory)() {
                    Ok(t) => Ok(Lent {
                        pool: self,
                        t: Some(t),
                    }),
                    Err(e) => {
                        self.slots.lock().unwrap_or_else(|e| e.into_inner()).open -= 1;
                        self.back.notify_one();
                        Err(e)
                    }
                };
            }
            s = self.back.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A handle lent by a [`Pool`]; it goes back when dropped.
pub struct Lent<'p, T> {
    pool: &'p Pool<T>,
    t: Option<T>,
}

impl<T> Deref for Lent<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.t
            .as_ref()
            .unwrap_or_else(|| unreachable!("a lent handle is present until drop"))
    }
}

impl<T> DerefMut for Lent<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.t
            .as_mut()
            .unwrap_or_else(|| unreachable!("a lent handle is present until drop"))
    }
}

impl<T> Drop for Lent<'_, T> {
    fn drop(&mut self) {
        if let Some(t) = self.t.take() {
            let mut s = self.pool.slots.lock().unwrap_or_else(|e| e.into_inner());
            // A handle whose holder panicked mid-use may be in any state: drop it.
            if std::thread::panicking() {
                s.open -= 1;
            } else {
                s.idle.push(t);
            }
            drop(s);
            self.pool.back.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn opens_at_most_max_and_reuses_what_comes_back() {
        let opened = Arc::new(AtomicUsize::new(0));
        let o = Arc::clone(&opened);
        let pool = Arc::new(Pool::with(2, move || Ok(o.fetch_add(1, Ordering::SeqCst))));
        let a = pool.get().unwrap();
        let b = pool.get().unwrap();
        assert_ne!(*a, *b);
        // A third caller waits until one comes back.
        let p = Arc::clone(&pool);
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            let c = p.get().unwrap();
            tx.send(*c).unwrap();
        });
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err()
        );
        let first = *a;
        drop(a);
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap(),
            first
        );
        h.join().unwrap();
        drop(b);
        assert_eq!(opened.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn catalog_connections_read_side_by_side() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::new(dir.path(), 3);
        let a = pool.get().unwrap();
        let b = pool.get().unwrap();
        a.put_task(
            "t1",
            "running",
            "2026-01-01T00:00:00Z",
            &serde_json::json!({"id": "t1"}),
        )
        .unwrap();
        assert_eq!(b.count_tasks("running").unwrap(), 1);
    }
}
