//! Live capture of a running QEMU VM or qemu-storage-daemon over QMP: all disks of a
//! server at one instant, read while the guest keeps writing (DESIGN §4).
//!
//! ```text
//!  prepare   per disk: temporary qcow2 "fleecing" image (blockdev-add); this chain's
//!            bitmaps left by crashed runs merged back or removed
//!  freeze    optional hooks (`freeze`): scripts, guest-agent fsfreeze
//!  instant   ONE `transaction`: per disk blockdev-backup sync=none (copy-before-write
//!            into the fleecing image), block-dirty-bitmap-add NEW, and
//!            block-dirty-bitmap-disable OLD (the bitmap of the previous backup)
//!  thaw      at once, whatever the transaction did
//!  read      per disk a `snapshot-access` node on the job's copy-before-write filter
//!            (the race-free fleecing read path: it reads the old data from the
//!            fleecing image or the disk, whichever holds it, under the filter's
//!            locks), exported read-only over NBD with OLD, read with the NBD client:
//!            OLD's dirty extents (incremental) or everything allocated
//!  cleanup   always: exports, jobs, fleecing nodes and files, the NBD server if we
//!            started it; bitmaps: success → OLD removed, NEW is the next checkpoint;
//!            failure/cancel → NEW merged back into OLD, OLD re-enabled, NEW removed
//! ```
//! A run killed before its cleanup (SIGKILL, a crash of the appliance) leaves its
//! objects in QEMU, maybe its NBD server, and files; the next run on that QEMU removes
//! them first, and every live backup removes the files of dead runs whose QEMU is gone
//! ([`leftovers`]: the per-QEMU lock under `<data>/locks/live` is also the owner record).
//! Disks are named stably (the device id, else the node name: [`disks`]). Bitmap names
//! are `blockvault-<tag>-<time>` where the tag is derived from the vault id and the
//! server name, so two vaults or servers protecting the same VM never consume each
//! other's bitmaps ([`bitmaps`]: the lifecycle). Bitmaps are persistent on qcow2 nodes
//! (they survive a clean VM restart); when the previous backup's bitmap cannot be used,
//! that disk is read in full and compared, and the manifest says why (not found on the
//! node, found on another node, disabled by a run that died).
//!
//! The NBD server: QEMU runs at most one. Without `nbd_server`, we start one on a private
//! unix socket and stop it afterwards; with it (e.g. qemu-storage-daemon started with
//! `--nbd-server`), the temporary exports are added to that server (which is never
//! stopped: `nbd-server-stop` would remove every export, the guest's own included).
//! When one runs and `nbd_server` is not set, the error names the flag, the resource
//! setting and, when QEMU's command line shows it, the address ([`nbd_server`]).

mod bitmaps;
mod disks;
mod hardware;
mod leftovers;
mod nbd_server;

pub use bitmaps::{chain_tag, tag_of};

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::backup::{BackupOptions, DiskJob, backup_resource, check_cancel};
use crate::cbt::ChangeHint;
use crate::error::{Error, ErrorKind, Result};
use crate::freeze::FreezeHooks;
use crate::manifest::{BackupManifest, Capture, Checkpoint, ResourceKind, now_rfc3339_precise};
use crate::qmp::Qmp;
use crate::restore::{ImageWriter, Qcow2Writer};
use crate::source::NbdSource;
use crate::vault::Vault;
use disks::Disk;

/// How to reach and capture a live QEMU process.
#[derive(Debug, Clone, Default)]
pub struct LiveOptions {
    /// QMP unix socket.
    pub qmp: PathBuf,
    /// Disks to capture: node names or device names (default: every disk of the VM, or
    /// every exported node of a qemu-storage-daemon).
    pub nodes: Vec<String>,
    /// Address of an NBD server QEMU already runs: a unix socket path or HOST:PORT.
    pub nbd_server: Option<String>,
    /// Where fleecing images go (default: the system temp dir). QEMU must be able to
    /// create and write files there.
    pub fleece_dir: Option<PathBuf>,
    pub hooks: FreezeHooks,
    /// Limit for one QMP command (default 30 s).
    pub timeout: Option<Duration>,
    /// Where the per-QEMU locks and owner records live (the appliance uses
    /// `<data>/locks/live`; default: `blockvault-live-locks` in the temp dir).
    pub lock_dir: Option<PathBuf>,
}

/// What exists and must be undone.
#[derive(Default)]
struct Undo {
    files: Vec<PathBuf>,
    nodes: Vec<String>,
    /// snapshot-access nodes: removed before the jobs whose filters they read.
    views: Vec<String>,
    jobs: Vec<String>,
    exports: Vec<String>,
    nbd_started: Option<PathBuf>,
    /// Transaction done: bitmaps rotated.
    rotated: bool,
}

/// Back up the disks of the live QEMU at `live.qmp` as server `server`.
pub fn backup_live(
    vault: &Vault,
    server: &str,
    live: &LiveOptions,
    opts: &BackupOptions,
) -> Result<BackupManifest> {
    // `seconds` is the wall time of the whole backup, freeze and capture included.
    let mut opts = opts.clone();
    opts.started.get_or_insert_with(std::time::Instant::now);
    let opts = &opts;
    let timeout = live.timeout.unwrap_or(Duration::from_secs(30));
    // One live backup per QEMU at a time; whoever holds the lock owns every
    // `blockvault-` object in it, so those of a run that died are removed first.
    let lock_dir = live
        .lock_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("blockvault-live-locks"));
    let mut lock = leftovers::VmLock::acquire(&lock_dir, &live.qmp, opts)?;
    for what in leftovers::sweep_dead_owners(&lock_dir, &leftovers::lock_path(&lock_dir, &live.qmp))
    {
        tracing::warn!("removed a leftover of a backup that died with its QEMU: {what}");
    }
    let mut qmp = Qmp::connect(&live.qmp, timeout)
        .map_err(|e| e.context_prefix(format!("live backup of {server}")))?;
    let tag = chain_tag(&vault.config().id, server);
    let run = hex::encode(rand::random::<[u8; 3]>());
    for what in leftovers::sweep(&mut qmp, &mut lock)? {
        tracing::warn!(server, "removed a leftover of a backup that died: {what}");
    }
    let mut disks = disks::discover(&mut qmp, vault, server, live, &tag, &run)?;
    let mut undo = Undo::default();
    let result = capture_and_read(
        &mut qmp, &mut lock, vault, server, live, opts, &mut disks, &mut undo,
    );
    // After an I/O failure the QMP connection itself may be dead or out of step: clean up
    // over a fresh one (the monitor serves one client, so the old one goes first).
    if result.as_ref().is_err_and(|e| e.kind() == ErrorKind::Io) {
        drop(qmp);
        qmp = match Qmp::connect(&live.qmp, timeout) {
            Ok(q) => q,
            Err(c) => {
                let why = c.to_string();
                let e = result.err().unwrap_or(c);
                return Err(e.context_prefix(format!(
                    "live backup of {server} failed and QEMU could not be reached to clean up \
                     ({why}; the next backup of this QEMU removes what is left)"
                )));
            }
        };
    }
    let problems = cleanup(&mut qmp, &disks, &mut undo, result.is_ok());
    if problems.is_empty() {
        // Nothing of this run is left: the owner record says so.
        if let Err(e) = lock.note(&[], None) {
            tracing::warn!("{e}");
        }
    }
    with_cleanup_problems(result, &problems, server, "live backup")
}

/// The outcome of a live capture after its cleanup: a success keeps its result (cleanup
/// problems are logged: the next run of this VM retries them); a failure names them.
pub(crate) fn with_cleanup_problems<T>(
    result: Result<T>,
    problems: &[String],
    server: &str,
    what: &str,
) -> Result<T> {
    match result {
        Ok(m) => {
            for p in problems {
                tracing::warn!(server, "cleanup after the backup: {p}");
            }
            Ok(m)
        }
        Err(e) if problems.is_empty() => Err(e),
        Err(e) => Err(e.context_prefix(format!(
            "{what} failed and cleanup left work to do ({}; the next backup of this VM \
             retries it)",
            problems.join("; ")
        ))),
    }
}

/// Remove the files and lock files that live backups which died with their QEMU left
/// under `lock_dir` (`<data>/locks/live`); any backup may call it. Returns what it removed.
pub fn sweep_dead_runs(lock_dir: &Path) -> Vec<String> {
    let mut removed = leftovers::sweep_dead_owners(lock_dir, Path::new(""));
    removed.extend(leftovers::sweep_old_temp_locks(&std::env::temp_dir()));
    removed
}

/// Disk id of disk `name` of `server`.
pub fn disk_id(server: &str, name: &str) -> String {
    format!("{server}/{name}")
}

#[allow(clippy::too_many_arguments)]
fn capture_and_read(
    qmp: &mut Qmp,
    lock: &mut leftovers::VmLock,
    vault: &Vault,
    server: &str,
    live: &LiveOptions,
    opts: &BackupOptions,
    disks: &mut [Disk],
    undo: &mut Undo,
) -> Result<BackupManifest> {
    // Prepare the fleecing images before freezing, so that the freeze is short.
    for d in disks.iter() {
        // Recorded before it exists: a run killed in between leaves nothing unnamed.
        let mut files = undo.files.clone();
        files.push(d.fleece_file.clone());
        lock.note(&files, None)?;
        let mut w = Qcow2Writer::create(&d.fleece_file, d.size)
            .map_err(|e| e.context_prefix("creating a fleecing image"))?;
        undo.files.push(d.fleece_file.clone());
        w.finish()?;
        drop(w);
        qmp.execute_value(
            "blockdev-add",
            json!({
                "driver": "qcow2",
                "node-name": d.fleece_node,
                "file": {"driver": "file", "filename": d.fleece_file},
            }),
        )?;
        undo.nodes.push(d.fleece_node.clone());
    }
    check_cancel(opts)?;

    let mut actions = Vec::new();
    for d in disks.iter() {
        actions.push(json!({"type": "blockdev-backup", "data": {
            "job-id": d.job, "device": d.node, "target": d.fleece_node, "sync": "none",
            "filter-node-name": d.cbw_node,
        }}));
        actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
            "node": d.node, "name": d.new, "persistent": d.driver == "qcow2",
        }}));
        if let Some(old) = &d.old {
            actions.push(json!({"type": "block-dirty-bitmap-disable", "data": {
                "node": d.node, "name": old,
            }}));
        }
    }
    let mut frozen = live.hooks.freeze(server, opts.cancel.as_deref());
    if let Err(e) = check_cancel(opts) {
        frozen.thaw();
        frozen
            .check_thawed()
            .map_err(|t| t.context_prefix("backup cancelled"))?;
        return Err(e);
    }
    if frozen.failed() {
        frozen.thaw(); // (done already by the failed freeze)
    }
    // Fail now if a thaw is unconfirmed, or if consistency is required and not reached.
    frozen.check()?;
    // The instant lies between sending the transaction and its reply: stamp it before
    // sending, so every freeze step is provably earlier and every thaw step later.
    let snapshot_at = now_rfc3339_precise();
    let instant = qmp.execute_value("transaction", json!({"actions": actions}));
    if let Err(e) = &instant {
        frozen.capture_failed(&e.to_string());
    }
    frozen.thaw();
    let (consistency, note, steps) = frozen.outcome();
    let thawed = frozen.check_thawed();
    drop(frozen);
    instant.map_err(|e| e.context_prefix("taking the point in time"))?;
    undo.rotated = true;
    undo.jobs = disks.iter().map(|d| d.job.clone()).collect();
    thawed?;
    check_cancel(opts)?;

    let socket = match &live.nbd_server {
        Some(addr) => addr.clone(),
        None => {
            let dir = live.fleece_dir.clone().unwrap_or_else(std::env::temp_dir);
            let path = dir.join(format!(
                "blockvault-nbd-{}.sock",
                hex::encode(rand::random::<[u8; 4]>())
            ));
            lock.note(&undo.files, Some(&path))?;
            nbd_server::start_private(qmp, &live.qmp, &path)?;
            undo.nbd_started = Some(path.clone());
            path.display().to_string()
        }
    };
    let mut jobs = Vec::new();
    for d in disks.iter() {
        qmp.execute_value(
            "blockdev-add",
            json!({"driver": "snapshot-access", "node-name": d.snap_node, "file": d.cbw_node}),
        )?;
        undo.views.push(d.snap_node.clone());
        let mut args = json!({
            "type": "nbd", "id": d.export, "node-name": d.snap_node,
            "name": d.export, "writable": false,
        });
        if let Some(old) = &d.old {
            args["bitmaps"] = json!([{"node": d.node, "name": old}]);
        }
        qmp.execute_value("block-export-add", args)?;
        undo.exports.push(d.export.clone());
        let uri = nbd_uri(&socket, &d.export);
        let source = NbdSource::open(&uri, d.old.as_deref())?.described_as(format!(
            "qmp:{} node {} (point in time {snapshot_at})",
            live.qmp.display(),
            d.node
        ));
        jobs.push(DiskJob {
            name: d.name.clone(),
            disk_id: disk_id(server, &d.name),
            source: Box::new(source),
            change: match &d.old {
                Some(b) => ChangeHint::Bitmap(b.clone()),
                None => ChangeHint::Auto,
            },
            next_checkpoint: Some(Checkpoint {
                bitmap: Some(d.new.clone()),
                node: Some(d.node.clone()),
            }),
            note: d.note.clone(),
        });
    }
    let capture = Capture {
        method: "qmp-fleecing".into(),
        consistency,
        note,
        snapshot_at: Some(snapshot_at),
        steps,
        hardware: hardware::probe(qmp, disks),
    };
    let mut capture = Some(capture);
    backup_resource(
        vault,
        server,
        ResourceKind::Server,
        jobs,
        &mut || capture.take(),
        opts,
    )
}

/// `nbd+unix` URI for a socket path, `nbd://` for HOST:PORT.
fn nbd_uri(server: &str, export: &str) -> String {
    let path = server.strip_prefix("unix:").unwrap_or(server);
    if Path::new(path).is_absolute() || !path.contains(':') {
        format!("nbd+unix:///{export}?socket={path}")
    } else {
        format!("nbd://{path}/{export}")
    }
}

/// Undo everything in `undo`; returns what could not be undone.
fn cleanup(qmp: &mut Qmp, disks: &[Disk], undo: &mut Undo, success: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let mut note = |what: String, r: Result<Value>| {
        if let Err(e) = r {
            problems.push(format!("{what}: {e}"));
        }
    };
    for e in undo.exports.drain(..) {
        let r = qmp.execute_value("block-export-del", json!({"id": e, "mode": "hard"}));
        note(format!("removing export {e}"), r);
        let r = wait_gone(qmp, "query-block-exports", "id", &e);
        note(format!("waiting for export {e} to go"), r);
    }
    if let Some(sock) = undo.nbd_started.take() {
        note(
            "stopping the NBD server".into(),
            qmp.execute_value("nbd-server-stop", json!({})),
        );
        let _ = std::fs::remove_file(sock);
    }
    for n in undo.views.drain(..) {
        let r = qmp.execute_value("blockdev-del", json!({"node-name": n}));
        note(format!("removing node {n}"), r);
    }
    for j in undo.jobs.drain(..) {
        let r = qmp.execute_value("block-job-cancel", json!({"device": j, "force": true}));
        note(format!("cancelling job {j}"), r);
        let r = wait_gone(qmp, "query-block-jobs", "device", &j);
        note(format!("waiting for job {j} to end"), r);
    }
    for n in undo.nodes.drain(..).rev() {
        let r = qmp.execute_value("blockdev-del", json!({"node-name": n}));
        note(format!("removing node {n}"), r);
    }
    for f in undo.files.drain(..) {
        let r = match std::fs::remove_file(&f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(format!("removing {}", f.display()), e))
            }
            _ => Ok(Value::Null),
        };
        note("removing a fleecing image".into(), r);
    }
    if std::mem::take(&mut undo.rotated) {
        for d in disks {
            match (&d.old, success) {
                (Some(old), true) => {
                    let r = qmp.execute_value(
                        "block-dirty-bitmap-remove",
                        json!({"node": d.node, "name": old}),
                    );
                    note(format!("removing bitmap {old}"), r);
                }
                (Some(old), false) => {
                    // Keep every change since the previous backup in OLD, tracking on.
                    let r = qmp.execute_value(
                        "block-dirty-bitmap-merge",
                        json!({"node": d.node, "target": old, "bitmaps": [d.new]}),
                    );
                    note(format!("merging bitmap {} into {old}", d.new), r);
                    let r = qmp.execute_value(
                        "block-dirty-bitmap-enable",
                        json!({"node": d.node, "name": old}),
                    );
                    note(format!("re-enabling bitmap {old}"), r);
                    let r = qmp.execute_value(
                        "block-dirty-bitmap-remove",
                        json!({"node": d.node, "name": d.new}),
                    );
                    note(format!("removing bitmap {}", d.new), r);
                }
                (None, true) => {}
                (None, false) => {
                    let r = qmp.execute_value(
                        "block-dirty-bitmap-remove",
                        json!({"node": d.node, "name": d.new}),
                    );
                    note(format!("removing bitmap {}", d.new), r);
                }
            }
        }
    }
    problems
}

/// Poll `query` until no entry has `field == value` (at most 30 s).
pub(crate) fn wait_gone(qmp: &mut Qmp, query: &str, field: &str, value: &str) -> Result<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let list: Vec<Value> = qmp.execute(query, json!({}))?;
        if !list
            .iter()
            .any(|e| e.get(field).and_then(Value::as_str) == Some(value))
        {
            return Ok(Value::Null);
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::new(
                ErrorKind::Io,
                format!("{value} still listed by {query} after 30 s"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
