//! Leases: the vault lock of a store that several appliances can reach (object storage).
//!
//! An flock (`locks/vault.lock`) is seen only on its own machine, and S3 has no locks.
//! So on a shared store, next to the local flock, a backup or verify holds a **use**
//! lease and GC holds a **gc** lease, each one small object:
//!
//! ```text
//! locks/leases/<kind>-<owner>.json   {"version":1,"kind":"gc"|"use","owner":"<host>-<pid>-<random>",
//!                                     "host":"…","pid":4242,"expires":1795000000}   (unix seconds)
//! ```
//!
//! Protocol (write, then look): take = (1) list the leases, refuse with `Conflict` if a
//! live conflicting one is there; (2) put our own; (3) list again, and if a live
//! conflicting lease other than ours is there, delete ours and refuse. GC conflicts with
//! every live lease, a use lease only with gc leases. Two takers that race both see each
//! other in step 3 (S3 and Garage list what was written before: read-after-write
//! consistency), so at worst both refuse; never both proceed. A **journal** lease
//! (`"kind":"journal"`) guards an append to the lock journal, and a deletion checked
//! against it, across appliances: it conflicts only with another journal lease, and its
//! takers retry with jitter (see `retention`). A lease lasts [`TTL`] and
//! is renewed every [`RENEW`] from a thread; it is deleted when dropped. A lease past
//! its expiry, or one of this host whose pid is dead (killed with -9), is ignored, and
//! GC deletes it.
//!
//! Honest limits: (a) expiry is compared with this machine's clock, so appliances must
//! keep their clocks within a minute or so of each other (NTP); (b) a holder that stalls
//! longer than [`TTL`] without renewing (suspended VM, network cut longer than that) can
//! be overtaken by a GC elsewhere: its next renewal logs an error, and a backup whose
//! packs were collected meanwhile fails verify rather than restoring wrong bytes (every
//! blob is digest-checked); (c) conditional writes (If-None-Match) would make step 3
//! unnecessary but are not used, since not every S3-compatible store honours them.
//! Pins of readers (restore, serve-nbd, files, drills, replication) are files local to
//! their appliance, which a GC on another appliance does not see; so on a shared store
//! `Vault::pin` also takes a use lease, and such a GC is refused while a reader runs.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::store::ChunkStore;
use crate::error::{Error, ErrorKind, Result};

/// How long a lease is valid without renewal.
pub const TTL: Duration = Duration::from_secs(120);
/// How often a held lease is renewed.
pub const RENEW: Duration = Duration::from_secs(30);
const LEASE_DIR: &str = "locks/leases";
const LEASE_VERSION: u32 = 1;
/// Lease objects larger than this are ignored (a cap on what is read).
const MAX_LEASE: u64 = 4096;

/// What a lease is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseKind {
    /// A backup or verify: may run beside others, not beside GC.
    Use,
    /// GC: runs alone.
    Gc,
    /// An append to the lock journal (`retention`), or a deletion checked against it:
    /// one at a time across appliances; independent of use and gc leases.
    Journal,
}

/// A lease object's content.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub version: u32,
    pub kind: LeaseKind,
    pub owner: String,
    pub host: String,
    pub pid: u32,
    pub expires: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A held lease; renewed on a thread, deleted on drop.
pub struct Lease {
    store: Arc<dyn ChunkStore>,
    key: String,
    stop: Option<Sender<()>>,
    renewer: Option<JoinHandle<()>>,
}

/// Live leases by key, and the keys of expired ones.
pub type Leases = (Vec<(String, LeaseRecord)>, Vec<String>);

/// The live leases in `store` (expired ones are returned separately).
pub fn leases(store: &dyn ChunkStore) -> Result<Leases> {
    let now = unix_now();
    let host = super::pin::host_name();
    let (mut live, mut expired) = (Vec::new(), Vec::new());
    for o in store.list(LEASE_DIR)? {
        if o.len > MAX_LEASE {
            continue;
        }
        let rec: LeaseRecord = match store.get(&o.key) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("ignoring unreadable lease {}: {e}", o.key);
                    continue;
                }
            },
            // Released between the listing and the read.
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let dead_here = rec.host == host && !super::pin::pid_alive(rec.pid);
        if rec.expires < now || dead_here {
            expired.push(o.key);
        } else {
            live.push((o.key, rec));
        }
    }
    Ok((live, expired))
}

fn conflicts(mine: LeaseKind, theirs: LeaseKind) -> bool {
    match (mine, theirs) {
        (LeaseKind::Journal, LeaseKind::Journal) => true,
        (LeaseKind::Journal, _) | (_, LeaseKind::Journal) => false,
        _ => mine == LeaseKind::Gc || theirs == LeaseKind::Gc,
    }
}

fn refusal(store: &dyn ChunkStore, mine: LeaseKind, rec: &LeaseRecord) -> Error {
    let what = match (mine, rec.kind) {
        (LeaseKind::Gc, LeaseKind::Use) => "a backup or verify",
        (_, LeaseKind::Journal) => "a lock journal update",
        _ => "a GC",
    };
    Error::conflict(format!(
        "vault {} is in use by {what} on {} (pid {}, lease until unix time {}); try again when it has finished",
        store.describe(),
        rec.host,
        rec.pid,
        rec.expires
    ))
}

impl Lease {
    /// Take a lease of `kind`, or `Conflict` (see the module doc for the protocol).
    pub fn take(store: Arc<dyn ChunkStore>, kind: LeaseKind) -> Result<Lease> {
        let (live, expired) = leases(store.as_ref())?;
        if let Some((_, rec)) = live.iter().find(|(_, r)| conflicts(kind, r.kind)) {
            return Err(refusal(store.as_ref(), kind, rec));
        }
        if kind == LeaseKind::Gc {
            for key in expired {
                tracing::info!("removing expired lease {key}");
                let _ = store.delete(&key);
            }
        }
        let host = super::pin::host_name();
        let owner = format!(
            "{host}-{}-{}",
            std::process::id(),
            hex::encode(rand::random::<[u8; 6]>())
        );
        let kind_name = match kind {
            LeaseKind::Use => "use",
            LeaseKind::Gc => "gc",
            LeaseKind::Journal => "journal",
        };
        let key = format!("{LEASE_DIR}/{kind_name}-{owner}.json");
        let record = LeaseRecord {
            version: LEASE_VERSION,
            kind,
            owner,
            host,
            pid: std::process::id(),
            expires: unix_now() + TTL.as_secs(),
        };
        write_record(store.as_ref(), &key, &record)?;
        let mut lease = Lease {
            store: Arc::clone(&store),
            key: key.clone(),
            stop: None,
            renewer: None,
        };
        // Look again now that ours is visible: a racer wrote before our listing or sees ours.
        let (live, _) = leases(store.as_ref())?;
        if let Some((_, rec)) = live
            .iter()
            .find(|(k, r)| *k != key && conflicts(kind, r.kind))
        {
            return Err(refusal(store.as_ref(), kind, rec));
        }
        let (tx, rx) = mpsc::channel::<()>();
        let renew_store = Arc::clone(&store);
        let mut record = record;
        lease.renewer = Some(std::thread::spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(RENEW) {
                record.expires = unix_now() + TTL.as_secs();
                if let Err(e) = write_record(renew_store.as_ref(), &key, &record) {
                    tracing::error!("could not renew vault lease {key}: {e}");
                }
            }
        }));
        lease.stop = Some(tx);
        Ok(lease)
    }
}

fn write_record(store: &dyn ChunkStore, key: &str, rec: &LeaseRecord) -> Result<()> {
    let bytes =
        serde_json::to_vec(rec).map_err(|e| Error::invalid("encoding a lease").with_source(e))?;
    store.put(key, &bytes)
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        if let Err(e) = self.store.delete(&self.key)
            && e.kind() != ErrorKind::NotFound
        {
            tracing::warn!("could not release vault lease {}: {e}", self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::store::MemoryStore;

    #[test]
    fn gc_is_refused_while_a_backup_holds_a_use_lease_and_then_allowed() {
        let store: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
        let backup = Lease::take(Arc::clone(&store), LeaseKind::Use).unwrap();
        let second = Lease::take(Arc::clone(&store), LeaseKind::Use).unwrap();
        let err = Lease::take(Arc::clone(&store), LeaseKind::Gc)
            .err()
            .unwrap();
        assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
        drop((backup, second));
        let gc = Lease::take(Arc::clone(&store), LeaseKind::Gc).unwrap();
        let err = Lease::take(Arc::clone(&store), LeaseKind::Use)
            .err()
            .unwrap();
        assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
        drop(gc);
        assert!(
            store.list(LEASE_DIR).unwrap().is_empty(),
            "leases are deleted on drop"
        );
    }

    #[test]
    fn an_expired_lease_is_ignored_and_removed_by_gc() {
        let store: Arc<dyn ChunkStore> = Arc::new(MemoryStore::new());
        let dead = LeaseRecord {
            version: LEASE_VERSION,
            kind: LeaseKind::Use,
            owner: "crashed".into(),
            host: "other".into(),
            pid: 1,
            expires: unix_now() - 1,
        };
        write_record(store.as_ref(), "locks/leases/use-crashed.json", &dead).unwrap();
        let gc = Lease::take(Arc::clone(&store), LeaseKind::Gc).unwrap();
        let keys: Vec<String> = store.list_files(LEASE_DIR).unwrap();
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert!(keys[0].contains("/gc-"));
        drop(gc);
    }
}
