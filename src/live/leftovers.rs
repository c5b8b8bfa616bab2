//! Leftovers of live backups that died before their cleanup (SIGKILL, a crash or power
//! loss of the appliance, a VM shut down mid-backup): the temporary NBD exports,
//! snapshot-access views, backup jobs (whose copy-before-write filters sit above the
//! guest's disks and slow its writes) and fleecing nodes, all named `blockvault-…`, stay
//! in the QEMU process; the NBD server the run started keeps running; its fleecing
//! images and NBD socket stay on disk.
//!
//! A live backup holds [`VmLock`] — an exclusive file lock keyed by the QMP socket —
//! for its whole run; the kernel drops it when the process dies, however it dies. So
//! whoever holds the lock knows that no other blockvault run is using that QEMU, and
//! [`sweep`] removes every `blockvault-` object in it before anything new is made.
//! Bitmaps are not touched here: `discover` keeps the previous backup's bitmap and
//! removes only stale ones of its own vault and server.
//!
//! The lock file is also the run's owner record: what the run made outside QEMU's
//! object names, rewritten as it goes (JSON, one object):
//! ```text
//!  <data>/locks/live/<blake3(canonical QMP socket path)[..8] hex>.lock
//!  {"pid": 4242, "qmp": "/run/vm1/qmp.sock",
//!   "files": ["/tmp/blockvault-fleece-0a1b2c-0.qcow2"],   fleecing images
//!   "nbd_socket": "/tmp/blockvault-nbd-1f2e3d4c.sock"}     NBD server we started, or null
//! ```
//! An NBD server is stopped by the sweep only when the dead run's record names it and a
//! server still listens on that socket (QEMU runs one server at most, so the running one
//! is then ours); a server somebody else started is never stopped.
//! The lock lives under the data dir, not the temp dir: every blockvault process of the
//! appliance (CLI, `serve` under systemd with PrivateTmp) sees the same locks. When the
//! QEMU is gone (no QMP to sweep), [`sweep_dead_owners`] — run by every backup, live or
//! not (`live::sweep_dead_runs`) — removes the files of dead runs and their lock files,
//! and the lock files earlier versions left in the temp dir (`blockvault-live-<hex>.lock`)
//! when nobody holds them.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::wait_gone;
use crate::backup::{BackupOptions, check_cancel};
use crate::error::{Error, Result};
use crate::qmp::Qmp;

/// What a run made outside QEMU (see the module doc).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnerRecord {
    pub pid: u32,
    pub qmp: PathBuf,
    #[serde(default)]
    pub files: Vec<PathBuf>,
    #[serde(default)]
    pub nbd_socket: Option<PathBuf>,
}

/// Exclusive use of one QEMU process for a live backup (released on drop or death).
pub struct VmLock {
    file: File,
    path: PathBuf,
    record: OwnerRecord,
    /// What a run that died left in the record (taken by [`sweep`]).
    pub previous: Option<OwnerRecord>,
}

/// The lock file of the QEMU at `qmp` in `dir`.
pub fn lock_path(dir: &Path, qmp: &Path) -> PathBuf {
    let key = std::fs::canonicalize(qmp).unwrap_or_else(|_| qmp.to_path_buf());
    let hash = blake3::hash(key.as_os_str().as_encoded_bytes());
    dir.join(format!("{}.lock", hex::encode(&hash.as_bytes()[..8])))
}

/// Open and try to lock `path`. `Ok(None)`: somebody holds it. A file that was
/// removed (by a sweep) between our open and our lock is opened again.
fn try_lock_file(path: &Path) -> Result<Option<File>> {
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format!("opening the lock file {}", path.display()), e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(None),
            Err(TryLockError::Error(e)) => {
                return Err(Error::io(format!("locking {}", path.display()), e));
            }
        }
        let held = file
            .metadata()
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        match std::fs::metadata(path) {
            Ok(m) if m.ino() == held.ino() && m.dev() == held.dev() => return Ok(Some(file)),
            _ => continue, // unlinked under us: lock the file that is there now
        }
    }
}

fn read_record(file: &mut File) -> Option<OwnerRecord> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.take(1 << 20).read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

impl VmLock {
    /// Wait for the lock of the QEMU at `qmp`, kept in `dir` (another live backup of it
    /// may be running; a cancel stops the wait).
    pub fn acquire(dir: &Path, qmp: &Path, opts: &BackupOptions) -> Result<VmLock> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let path = lock_path(dir, qmp);
        let mut said = false;
        loop {
            if let Some(mut file) = try_lock_file(&path)? {
                let previous = read_record(&mut file).filter(|r| r.pid != std::process::id());
                let mut lock = VmLock {
                    file,
                    path,
                    record: OwnerRecord {
                        pid: std::process::id(),
                        qmp: qmp.to_path_buf(),
                        ..OwnerRecord::default()
                    },
                    previous,
                };
                // Keep what the dead run left until the sweep has dealt with it.
                if let Some(p) = &lock.previous {
                    lock.record.files = p.files.clone();
                    lock.record.nbd_socket = p.nbd_socket.clone();
                }
                lock.write()?;
                return Ok(lock);
            }
            if !said {
                tracing::info!(
                    qmp = %qmp.display(),
                    "waiting for another live backup of this QEMU to end"
                );
                said = true;
            }
            check_cancel(opts)?;
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn write(&mut self) -> Result<()> {
        let text = serde_json::to_vec(&self.record).map_err(|e| Error::invalid(e.to_string()))?;
        let r = (|| {
            self.file.set_len(0)?;
            self.file.rewind()?;
            self.file.write_all(&text)?;
            self.file.flush()
        })();
        r.map_err(|e| {
            Error::io(
                format!("writing the owner record {}", self.path.display()),
                e,
            )
        })
    }

    /// Record what this run has made outside QEMU right now.
    pub fn note(&mut self, files: &[PathBuf], nbd_socket: Option<&Path>) -> Result<()> {
        self.record.files = files.to_vec();
        self.record.nbd_socket = nbd_socket.map(Path::to_path_buf);
        self.write()
    }
}

/// Remove the files of runs that died while their QEMU is gone too (a VM shut down
/// mid-backup, then the appliance killed), and their lock files. A lock held by a live
/// process, or of a QEMU that still answers on its QMP socket, is left alone (the next
/// backup of that QEMU sweeps it over QMP). `mine` is the lock file of this run.
pub fn sweep_dead_owners(dir: &Path, mine: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    for path in entries.flatten().map(|e| e.path()) {
        if path == mine || path.extension().is_none_or(|x| x != "lock") {
            continue;
        }
        let Ok(Some(mut file)) = try_lock_file(&path) else {
            continue;
        };
        let record = read_record(&mut file);
        if let Some(r) = &record
            && listening(&r.qmp)
        {
            continue; // its QEMU lives: swept by the next backup of it
        }
        for f in record
            .iter()
            .flat_map(|r| r.files.iter().chain(r.nbd_socket.iter()))
        {
            if remove_ours(f) {
                removed.push(format!("{}", f.display()));
            }
        }
        if std::fs::remove_file(&path).is_ok() {
            removed.push(format!("lock file {}", path.display()));
        }
    }
    removed
}

/// Remove the lock files earlier versions kept in the temp dir
/// (`blockvault-live-<hex>.lock`) unless a running process holds one.
pub fn sweep_old_temp_locks(tmp: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for path in entries.flatten().map(|e| e.path()) {
        let old = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("blockvault-live-") && n.ends_with(".lock"));
        if old
            && let Ok(Some(_held)) = try_lock_file(&path)
            && std::fs::remove_file(&path).is_ok()
        {
            removed.push(format!("old lock file {}", path.display()));
        }
    }
    removed
}

/// Whether something listens on the unix socket `path` (a full backlog, as of a
/// monitor held by another client, counts as listening).
fn listening(path: &Path) -> bool {
    match crate::qmp::connect_within(path, Duration::from_secs(2)) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::TimedOut,
    }
}

/// Remove `f` if its name says it is ours (`blockvault-…`); true if it was there.
fn remove_ours(f: &Path) -> bool {
    if !f
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("blockvault-"))
    {
        return false;
    }
    match std::fs::remove_file(f) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            tracing::warn!("could not remove {}: {e}", f.display());
            false
        }
    }
}

fn ours(name: &str, kind: &str) -> bool {
    name.strip_prefix("blockvault-")
        .is_some_and(|rest| kind.is_empty() || rest.starts_with(kind))
}

fn names(list: &[Value], field: &str, kind: &str) -> Vec<String> {
    list.iter()
        .filter_map(|e| e.get(field).and_then(Value::as_str))
        .filter(|n| ours(n, kind))
        .map(str::to_string)
        .collect()
}

/// Remove every `blockvault-` export, view, job and fleecing node (and image file) in
/// the QEMU behind `qmp`, in the order a cleanup would, the NBD server a dead run
/// started, and the files its owner record names; returns what was removed.
/// Only call it holding the [`VmLock`] of that QEMU.
pub fn sweep(qmp: &mut Qmp, lock: &mut VmLock) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let exports: Vec<Value> = qmp.execute("query-block-exports", json!({}))?;
    for e in names(&exports, "id", "") {
        qmp.execute_value("block-export-del", json!({"id": e, "mode": "hard"}))?;
        wait_gone(qmp, "query-block-exports", "id", &e)?;
        removed.push(format!("export {e}"));
    }
    let previous = lock.previous.take().unwrap_or_default();
    if let Some(sock) = &previous.nbd_socket {
        // Still listening there: the one server QEMU runs is the one the dead run started.
        if listening(sock) {
            qmp.execute_value("nbd-server-stop", json!({}))?;
            removed.push(format!("NBD server on {}", sock.display()));
        }
        if remove_ours(sock) {
            removed.push(format!("socket {}", sock.display()));
        }
    }
    let nodes: Vec<Value> = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
    for n in names(&nodes, "node-name", "snap-") {
        qmp.execute_value("blockdev-del", json!({"node-name": n}))?;
        removed.push(format!("view {n}"));
    }
    let jobs: Vec<Value> = qmp.execute("query-block-jobs", json!({}))?;
    for j in names(&jobs, "device", "job-") {
        qmp.execute_value("block-job-cancel", json!({"device": j, "force": true}))?;
        wait_gone(qmp, "query-block-jobs", "device", &j)?;
        removed.push(format!("job {j}"));
    }
    for n in nodes
        .iter()
        .filter(|n| n["node-name"].as_str().is_some_and(|x| ours(x, "fleece-")))
    {
        let name = n["node-name"].as_str().unwrap_or_default();
        qmp.execute_value("blockdev-del", json!({"node-name": name}))?;
        removed.push(format!("fleecing node {name}"));
        // The image file is ours too when its name says so.
        if let Some(file) = n["file"].as_str().map(Path::new)
            && file
                .file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| ours(f, "fleece-") && f.ends_with(".qcow2"))
        {
            match std::fs::remove_file(file) {
                Ok(()) => removed.push(format!("fleecing image {}", file.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("could not remove {}: {e}", file.display()),
            }
        }
    }
    for f in &previous.files {
        if remove_ours(f) {
            removed.push(format!("fleecing image {}", f.display()));
        }
    }
    lock.note(&[], None)?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::ours;

    #[test]
    fn only_blockvault_objects_of_the_kind_are_ours() {
        assert!(ours("blockvault-snap-0a1b2c-0", "snap-"));
        assert!(ours("blockvault-0a1b2c-1", ""));
        assert!(!ours("blockvault-job-0a1b2c-0", "snap-"));
        assert!(!ours("drive0", ""));
        assert!(!ours("eblockvault-1", ""));
    }
}
