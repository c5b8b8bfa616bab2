//! Leftovers of live backups that died before their cleanup (SIGKILL, a crash or power
//! loss of the appliance): the temporary NBD exports, snapshot-access views, backup jobs
//! (whose copy-before-write filters sit above the guest's disks and slow its writes)
//! and fleecing images, all named `blockvault-…`, stay in the QEMU process.
//!
//! A live backup holds [`VmLock`] — an exclusive file lock keyed by the QMP socket —
//! for its whole run; the kernel drops it when the process dies, however it dies. So
//! whoever holds the lock knows that no other blockvault run is using that QEMU, and
//! [`sweep`] removes every `blockvault-` object in it before anything new is made.
//! Bitmaps are not touched here: `discover` keeps the previous backup's bitmap and
//! removes only stale ones of its own vault and server.
//!
//! Not swept: an NBD server a dead run started (QMP cannot tell whose it is; the next
//! run's `nbd-server-start` then fails with QEMU's message, and `--nbd-server` names
//! the running one). The lock file lives in the system temp dir: processes with
//! different private temp dirs (systemd PrivateTmp) do not see each other's locks.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use super::wait_gone;
use crate::backup::{BackupOptions, check_cancel};
use crate::error::{Error, Result};
use crate::qmp::Qmp;

/// Exclusive use of one QEMU process for a live backup (released on drop or death).
pub struct VmLock {
    _file: File,
}

impl VmLock {
    /// Wait for the lock of the QEMU at `qmp` (another live backup of it may be running;
    /// a cancel stops the wait).
    pub fn acquire(qmp: &Path, opts: &BackupOptions) -> Result<VmLock> {
        let key = std::fs::canonicalize(qmp).unwrap_or_else(|_| qmp.to_path_buf());
        let hash = blake3::hash(key.as_os_str().as_encoded_bytes());
        let path = std::env::temp_dir().join(format!(
            "blockvault-live-{}.lock",
            hex::encode(&hash.as_bytes()[..8])
        ));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening the lock file {}", path.display()), e))?;
        let mut said = false;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(VmLock { _file: file }),
                Err(TryLockError::WouldBlock) => {
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
                Err(TryLockError::Error(e)) => {
                    return Err(Error::io(format!("locking {}", path.display()), e));
                }
            }
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
/// the QEMU behind `qmp`, in the order a cleanup would; returns what was removed.
/// Only call it holding the [`VmLock`] of that QEMU.
pub fn sweep(qmp: &mut Qmp) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let exports: Vec<Value> = qmp.execute("query-block-exports", json!({}))?;
    for e in names(&exports, "id", "") {
        qmp.execute_value("block-export-del", json!({"id": e, "mode": "hard"}))?;
        wait_gone(qmp, "query-block-exports", "id", &e)?;
        removed.push(format!("export {e}"));
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
