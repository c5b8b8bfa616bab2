//! Backups of disks and servers: decide per disk what to read (`cbt`), run the
//! pipeline (`pipeline`), write one manifest for the whole resource.
//!
//! A backup of a **disk** and of a **server** (N disks at one point in time) are the same
//! operation here: a list of [`DiskJob`]s, each with its source and change hint, becomes
//! one manifest that lists every disk with the root of its index. How the point in time
//! was taken (image files as they are, or a live copy-before-write capture, see `live`)
//! is the caller's business; it is recorded in the manifest's `capture`.
//!
//! Every backup's index is complete: an incremental is "previous index + changed slots",
//! so every backup restores on its own.
//!
//! Crash safety: the vault lock is held shared; packs are published atomically as they
//! fill; the manifest is written last, after every disk is done. A crash leaves only
//! packs that no manifest reaches (GC's to collect), never a partial backup. A backup
//! that fails or is cancelled removes the packs it published unless another job may be
//! using them (`cleanup`).

pub mod cleanup;
pub mod pipeline;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::cbt::{ChangeHint, Decision, decide};
use crate::chunk::ChunkDigest;
use crate::error::{Error, Result};
use crate::index::IndexRoot;
use crate::manifest::{
    BackupKind, BackupManifest, Capture, Checkpoint, Consistency, DiskManifest, MANIFEST_VERSION,
    ResourceKind, manual_name, new_backup_id, now_rfc3339,
};
use crate::source::{BlockSource, Extent};
use crate::vault::Vault;

pub use pipeline::run_disk;

/// Live counters of a running job, for progress display and the task API.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub bytes_stored: AtomicU64,
}

/// How to run a backup.
#[derive(Clone, Default)]
pub struct BackupOptions {
    /// Stable id of the disk across backups (default: the source description).
    pub disk_id: Option<String>,
    /// Backup name (default `manualbk_<time>`).
    pub name: Option<String>,
    /// Worker threads (0: one per core).
    pub threads: usize,
    /// Set to stop the backup; it then fails with `Cancelled` and records nothing.
    pub cancel: Option<Arc<AtomicBool>>,
    pub progress: Option<Arc<Progress>>,
    /// What is known about changes since the previous backup (see `cbt`).
    pub change: ChangeHint,
    /// Passphrase file of encrypted sources (LUKS, encrypted qcow2).
    pub secret_file: Option<std::path::PathBuf>,
    /// Read image files that another process holds open for writing, labelling the
    /// backup `inconsistent`, instead of refusing them.
    pub force_inconsistent: bool,
    /// Accept a source whose format differs from the previous backup of its disk id.
    pub format_change: bool,
}

impl BackupOptions {
    /// How to open sources for this backup (`bitmap` for an NBD source).
    pub fn open_options(&self, bitmap: Option<&str>) -> crate::source::OpenOptions {
        crate::source::OpenOptions {
            bitmap: bitmap.map(str::to_owned),
            secret_file: self.secret_file.clone(),
            force_inconsistent: self.force_inconsistent,
            cancel: self.cancel.clone(),
        }
    }
}

/// What to read and what to start from.
pub struct ReadPlan {
    /// Extents to read (sorted, non-overlapping).
    pub extents: Vec<Extent>,
    /// Previous index whose unread slots are kept (incremental), or None (full).
    pub base: Option<IndexRoot>,
    pub kind: BackupKind,
    pub strategy: String,
    pub parent: Option<String>,
}

/// Outcome of one disk's pipeline run.
pub struct DiskOutcome {
    pub index_root: ChunkDigest,
    pub bytes_allocated: u64,
    pub bytes_read: u64,
    pub bytes_stored: u64,
    pub chunks_read: u64,
    pub chunks_new: u64,
}

/// One disk of a backup being taken.
pub struct DiskJob {
    /// Name of the disk within the backup ("disk0", a node name, ...).
    pub name: String,
    /// Stable id of the disk across backups (its previous backups are found by it).
    pub disk_id: String,
    pub source: Box<dyn BlockSource>,
    pub change: ChangeHint,
    /// Checkpoint to record instead of the one the hint implies (live capture rotates
    /// bitmaps: it reads with the old one and records the new one).
    pub next_checkpoint: Option<Checkpoint>,
    /// Why change tracking is unavailable, when only the caller knows (e.g. the VM lost
    /// its bitmap); recorded when the disk is read in full.
    pub note: Option<String>,
}

/// Back up one disk into `vault` as a new backup; returns its manifest (already written).
pub fn backup_disk(
    vault: &Vault,
    source: Box<dyn BlockSource>,
    opts: &BackupOptions,
) -> Result<BackupManifest> {
    let disk_id = opts.disk_id.clone().unwrap_or_else(|| source.describe());
    let job = DiskJob {
        name: "disk0".into(),
        disk_id: disk_id.clone(),
        source,
        change: opts.change.clone(),
        next_checkpoint: None,
        note: None,
    };
    let method = match job.source.format() {
        crate::source::SourceFormat::Nbd => "nbd-export",
        _ => "image-file",
    };
    let mut capture = || {
        Some(Capture {
            method: method.into(),
            consistency: Consistency::CrashConsistent,
            note: None,
            snapshot_at: None,
            steps: Vec::new(),
        })
    };
    backup_resource(
        vault,
        &disk_id,
        ResourceKind::Disk,
        vec![job],
        &mut capture,
        opts,
    )
}

/// Back up the disks of one resource (a disk, or all disks of a server) as one backup;
/// returns its manifest (already written). Nothing is recorded unless every disk made it.
/// `capture` is asked, after the last disk was read and before the manifest is written,
/// how the point in time was taken (file-based servers thaw their hooks only then).
pub fn backup_resource(
    vault: &Vault,
    resource: &str,
    kind: ResourceKind,
    jobs: Vec<DiskJob>,
    capture: &mut dyn FnMut() -> Option<Capture>,
    opts: &BackupOptions,
) -> Result<BackupManifest> {
    if jobs.is_empty() {
        return Err(Error::config(format!("{resource}: no disks to back up")));
    }
    let mut names = std::collections::HashSet::new();
    for j in &jobs {
        if !names.insert(j.name.as_str()) {
            return Err(Error::config(format!(
                "{resource}: two disks are named {}",
                j.name
            )));
        }
    }
    let lock = vault.lock_shared()?;
    let published = Mutex::new(Vec::new());
    let started_at = time::OffsetDateTime::now_utc();
    let result = backup_locked(vault, resource, kind, jobs, capture, opts, &published);
    if result.is_err() {
        drop(lock);
        let packs = std::mem::take(&mut *published.lock().unwrap_or_else(|p| p.into_inner()));
        cleanup::discard_packs(vault, packs, started_at);
    }
    result
}

/// [`backup_resource`] under the shared vault lock; packs published go to `published`.
fn backup_locked(
    vault: &Vault,
    resource: &str,
    kind: ResourceKind,
    mut jobs: Vec<DiskJob>,
    capture: &mut dyn FnMut() -> Option<Capture>,
    opts: &BackupOptions,
    published: &Mutex<Vec<crate::vault::pack::PackId>>,
) -> Result<BackupManifest> {
    let started = Instant::now();
    for job in &jobs {
        check_format(vault, resource, job, opts)?;
    }
    let lookup = vault.lookup_reconciled()?;
    let mut decisions = Vec::with_capacity(jobs.len());
    for job in &mut jobs {
        let what = job.source.describe();
        let mut d = decide(
            vault,
            &lookup,
            job.source.as_mut(),
            resource,
            &job.disk_id,
            &job.change,
        )
        .map_err(|e| e.context_prefix(format!("backup of {what}")))?;
        if let Some(c) = &job.next_checkpoint {
            d.checkpoint = Some(c.clone());
        }
        if d.plan.kind == BackupKind::Full
            && let Some(n) = &job.note
        {
            tracing::warn!(disk = job.disk_id, "{n}");
            d.note = Some(match d.note.take() {
                Some(old) => format!("{n}; {old}"),
                None => n.clone(),
            });
        }
        decisions.push(d);
    }
    drop(lookup);
    if let Some(p) = &opts.progress {
        let total: u64 = decisions
            .iter()
            .flat_map(|d| d.plan.extents.iter().map(|e| e.length))
            .sum();
        p.bytes_total.store(total, Ordering::Relaxed);
    }
    let mut disks = Vec::with_capacity(jobs.len());
    for (
        job,
        Decision {
            plan,
            checkpoint,
            note,
        },
    ) in jobs.iter_mut().zip(decisions)
    {
        let source = job.source.as_mut();
        let what = source.describe();
        let outcome = run_disk(vault, source, &plan, opts, published)
            .map_err(|e| e.context_prefix(format!("backup of {what}")))?;
        disks.push(DiskManifest {
            name: job.name.clone(),
            disk_id: job.disk_id.clone(),
            source: what,
            format: source.format().as_str().into(),
            reader: Some(source.reader()),
            encryption: source.encryption(),
            size: source.size(),
            index_root: outcome.index_root,
            kind: plan.kind,
            strategy: plan.strategy,
            parent: plan.parent,
            checkpoint,
            note,
            bytes_allocated: outcome.bytes_allocated,
            bytes_read: outcome.bytes_read,
            bytes_stored: outcome.bytes_stored,
            chunks_total: vault.chunk_size().chunks_for(source.size()),
            chunks_read: outcome.chunks_read,
            chunks_new: outcome.chunks_new,
        });
    }
    let manifest = BackupManifest {
        version: MANIFEST_VERSION,
        id: new_backup_id(),
        name: opts.name.clone().unwrap_or_else(manual_name),
        resource: resource.to_string(),
        resource_kind: kind,
        created: now_rfc3339(),
        vault_id: vault.config().id.clone(),
        chunk_size: vault.chunk_size().bytes(),
        seconds: started.elapsed().as_secs_f64(),
        capture: inconsistent_capture(capture(), &jobs),
        disks,
    };
    check_cancel(opts)?;
    vault.put_manifest(&manifest)?;
    Ok(manifest)
}

/// A disk id keeps the format of its backups: a source that now looks like another
/// format (a guest that wrote a qcow2 header into its raw disk, a file replaced by
/// another) is refused unless `opts.format_change`. NBD exports carry no format of their
/// own and are not compared.
fn check_format(vault: &Vault, resource: &str, job: &DiskJob, opts: &BackupOptions) -> Result<()> {
    let now = job.source.format().as_str();
    if opts.format_change || now == "nbd" {
        return Ok(());
    }
    let Some((m, d)) = crate::cbt::previous(vault, resource, &job.disk_id)? else {
        return Ok(());
    };
    if d.format == now || d.format == "nbd" {
        return Ok(());
    }
    Err(Error::conflict(format!(
        "{}: disk {} was backed up as {} (backup {}), but its source {} now reads as {now};          if the image itself was converted, pass --format-change; otherwise name the format          explicitly ({}:PATH) so that data inside the disk is never taken for a container          (nothing was stored)",
        resource,
        job.disk_id,
        d.format,
        m.name,
        job.source.describe(),
        d.format
    )))
}

/// The capture, downgraded to `inconsistent` when a disk was read while another process
/// had it open for writing (`--force-inconsistent`).
fn inconsistent_capture(capture: Option<Capture>, jobs: &[DiskJob]) -> Option<Capture> {
    let reasons: Vec<String> = jobs
        .iter()
        .filter_map(|j| j.source.inconsistent())
        .collect();
    if reasons.is_empty() {
        return capture;
    }
    let mut c = capture.unwrap_or(Capture {
        method: "image-files".into(),
        consistency: Consistency::Inconsistent,
        note: None,
        snapshot_at: None,
        steps: Vec::new(),
    });
    c.consistency = Consistency::Inconsistent;
    let why = reasons.join("; ");
    c.note = Some(match c.note.take() {
        Some(old) => format!("{why}; {old}"),
        None => why,
    });
    Some(c)
}

pub(crate) fn check_cancel(opts: &BackupOptions) -> Result<()> {
    if opts
        .cancel
        .as_ref()
        .is_some_and(|c| c.load(Ordering::Relaxed))
    {
        return Err(Error::cancelled("backup cancelled"));
    }
    Ok(())
}
