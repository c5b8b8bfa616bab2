//! Backups of disks and servers: decide per disk what to read (`cbt`), run the
//! pipeline (`pipeline`), write one manifest for the whole resource.
//!
//! A backup of a **disk** and of a **server** (N disks at one point in time) are the same
//! operation here: a list of [`DiskJob`]s, each with its source and change hint, becomes
//! one manifest that lists every disk with the root of its index. How the point in time
//! was taken (image files as they are, or a live copy-before-write capture, see `live`)
//! is the caller's business; it is recorded in the manifest's `capture`.
//!
//! The disks of a server are read in parallel (one thread per disk) when every source
//! can move to another thread (the NBD exports of a live capture); each source is told
//! beforehand which chunks will be read, so that NBD reads run ahead of the reader.
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
    /// NBD over TLS settings for `nbds://` sources.
    pub nbd_tls: Option<crate::nbd::NbdTlsClient>,
    /// Read image files that another process holds open for writing, labelling the
    /// backup `inconsistent`, instead of refusing them.
    pub force_inconsistent: bool,
    /// Accept a source whose format differs from the previous backup of its disk id.
    pub format_change: bool,
    /// When the whole backup began (a live capture: before the freeze), for `seconds`;
    /// default: when reading begins.
    pub started: Option<Instant>,
}

impl BackupOptions {
    /// How to open sources for this backup (`bitmap` for an NBD source).
    pub fn open_options(&self, bitmap: Option<&str>) -> crate::source::OpenOptions {
        crate::source::OpenOptions {
            bitmap: bitmap.map(str::to_owned),
            secret_file: self.secret_file.clone(),
            force_inconsistent: self.force_inconsistent,
            nbd_tls: self.nbd_tls.clone(),
            cancel: self.cancel.clone(),
        }
    }
}

pub use crate::cbt::ReadPlan;

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
            hardware: None,
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
    let started = opts.started.unwrap_or_else(Instant::now);
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
    let outcomes = read_disks(vault, &mut jobs, &decisions, opts, published)?;
    let mut disks = Vec::with_capacity(jobs.len());
    for ((job, d), outcome) in jobs.iter_mut().zip(decisions).zip(outcomes) {
        let Decision {
            plan,
            checkpoint,
            note,
        } = d;
        let source = job.source.as_mut();
        disks.push(DiskManifest {
            name: job.name.clone(),
            disk_id: job.disk_id.clone(),
            source: source.describe(),
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
        replica_of: None,
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
        hardware: None,
    });
    c.consistency = Consistency::Inconsistent;
    let why = reasons.join("; ");
    c.note = Some(match c.note.take() {
        Some(old) => format!("{why}; {old}"),
        None => why,
    });
    Some(c)
}

/// Run the pipeline of every disk. Each source first learns what will be read (so that
/// an NBD source reads ahead across scattered chunks). When there are several disks and
/// every source can be read on another thread (NBD exports of a live capture), the disks
/// are read in parallel, one thread each; the first failure stops the others. Otherwise
/// they are read one after the other on this thread (imago's qcow2 is not `Send`).
fn read_disks(
    vault: &Vault,
    jobs: &mut [DiskJob],
    decisions: &[Decision],
    opts: &BackupOptions,
    published: &Mutex<Vec<crate::vault::pack::PackId>>,
) -> Result<Vec<DiskOutcome>> {
    let cs = vault.chunk_size().as_u64();
    for (job, d) in jobs.iter_mut().zip(decisions) {
        let size = job.source.size();
        job.source
            .will_read(&chunk_ranges(&d.plan.extents, cs, size));
    }
    let run = |source: &mut dyn BlockSource, plan: &ReadPlan, opts: &BackupOptions| {
        let what = source.describe();
        run_disk(vault, source, plan, opts, published)
            .map_err(|e| e.context_prefix(format!("backup of {what}")))
    };
    let parallel = jobs.len() > 1 && jobs.iter_mut().all(|j| j.source.as_send().is_some());
    if !parallel {
        return jobs
            .iter_mut()
            .zip(decisions)
            .map(|(job, d)| run(job.source.as_mut(), &d.plan, opts))
            .collect();
    }
    // One stop flag for all disks: set by the first failure, or relayed from the
    // caller's cancel flag by this thread while it waits.
    let stop = Arc::new(AtomicBool::new(false));
    let mut inner = opts.clone();
    inner.cancel = Some(Arc::clone(&stop));
    let inner = &inner;
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<(usize, Result<DiskOutcome>)>();
    let n = jobs.len();
    std::thread::scope(|scope| {
        for (i, (job, d)) in jobs.iter_mut().zip(decisions).enumerate() {
            let Some(source) = job.source.as_send() else {
                continue;
            };
            let (done_tx, stop, run) = (done_tx.clone(), &stop, &run);
            scope.spawn(move || {
                let r = run(source, &d.plan, inner);
                if r.is_err() {
                    stop.store(true, Ordering::Relaxed);
                }
                let _ = done_tx.send((i, r));
            });
        }
        drop(done_tx);
        let mut results: Vec<Option<Result<DiskOutcome>>> = (0..n).map(|_| None).collect();
        loop {
            match done_rx.recv_timeout(std::time::Duration::from_millis(100)) {
                Ok((i, r)) => results[i] = Some(r),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if check_cancel(opts).is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
        }
        check_cancel(opts)?;
        // The first real failure is the cause; the others only saw the stop flag.
        let mut out = Vec::with_capacity(results.len());
        let mut first_err: Option<Error> = None;
        for r in results {
            match r {
                Some(Ok(o)) => out.push(o),
                Some(Err(e)) => {
                    let better = first_err
                        .as_ref()
                        .is_none_or(|f| f.kind() == crate::ErrorKind::Cancelled);
                    if better {
                        first_err = Some(e);
                    }
                }
                None => {
                    first_err.get_or_insert_with(|| {
                        Error::new(
                            crate::ErrorKind::Io,
                            "a disk reader thread stopped unexpectedly",
                        )
                    });
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    })
}

/// `extents` widened to whole chunks (what the pipeline reads), clipped to the disk.
fn chunk_ranges(extents: &[Extent], cs: u64, size: u64) -> Vec<Extent> {
    let mut out = Vec::new();
    for e in extents {
        let start = e.offset / cs * cs;
        let end = e.end().div_ceil(cs).saturating_mul(cs).min(size);
        if end > start {
            crate::source::push_extent(&mut out, start, end - start);
        }
    }
    out
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
