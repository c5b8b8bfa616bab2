//! Backups of libvirt-managed domains (`libvirt:DOMAIN[?uri=URI]`, default
//! `qemu:///system`) through libvirt's own backup API in pull mode: libvirt owns the QMP
//! socket, so it creates the fleecing and the dirty bitmaps (checkpoints); we read its NBD
//! export and end the job.
//!
//! ```text
//!  inspect   virsh domstate / dumpxml: running? disks (target, format), QEMU's DAC user;
//!            checkpoint-list: which checkpoint of ours the previous backup left
//!  leftovers a backup job whose socket lies in a `blockvault-libvirt-<pid>-…` dir of a
//!            dead pid is aborted and the capture's steps say so (a live pid's job:
//!            refused as Conflict); checkpoints of this chain that are not the previous
//!            backup's are deleted
//!  instant   virsh backup-begin DOMAIN BACKUP.xml CHECKPOINT.xml [--quiesce]: all disks
//!            at one instant; per disk a scratch file and an NBD export named by its
//!            target on a private unix socket; a new checkpoint NEW (a bitmap per qcow2
//!            disk); an incremental disk also exports `backup-<target>`, the changes
//!            since the previous backup's checkpoint OLD (per-disk `incremental=`)
//!  read      per disk, the NBD client: OLD's changes (incremental) or all allocated
//!  end       always: virsh domjobabort (scratch files and exports go with the job);
//!            success → every other checkpoint of this chain (OLD) deleted, NEW is the
//!            next backup's base; failure → NEW deleted (libvirt merges its bitmap back)
//! ```
//! The run directory (`<scratch dir>/blockvault-libvirt-<pid>-<random>`, mode 0700) holds
//! the socket and the scratch files; it is handed to the uid:gid QEMU runs as (the
//! domain's DAC label), since QEMU creates the socket. Default scratch dir: the system
//! temp dir; QEMU must be able to reach it (`--fleece-dir`).
//!
//! Checkpoint names are `blockvault-<tag>-<stamp>`, the tag derived from the vault id and
//! the server name (as for QMP bitmaps), so two vaults protecting the same domain keep
//! two independent chains. A manifest records the checkpoint as each disk's
//! `checkpoint.bitmap` (libvirt names the qcow2 bitmap after the checkpoint). When the
//! previous backup's checkpoint is gone (deleted by hand, domain redefined), the disk is
//! read in full and the note says so; so is every disk when libvirt refuses the
//! incremental (a checkpoint's bitmap vanished from an image behind libvirt's back: the
//! job is begun again in full). A disk that is not qcow2 has no bitmap and is always read
//! in full (compared against the vault). A checkpoint libvirt cannot delete (its bitmap
//! is gone) loses its metadata only (`checkpoint-delete --metadata`).
//!
//! Consistency: when the domain has a guest-agent channel and the agent answers
//! `guest-ping`, the instant is taken with `--quiesce` (libvirt freezes and thaws the guest
//! file systems around it): application-consistent. Otherwise, or if quiescing fails
//! (then the backup is retried without it and the note says why), crash-consistent.
//! A domain that is not running is refused with the list of its disk files, to be backed
//! up offline as a server of image files under the same disk names.
//!
//! Why `virsh` rather than the libvirt C library (`virt` crate): the appliance stays free
//! of a C library binding and its ABI, libvirt's client does the connection handling
//! (auth, URIs), and every step is a command an admin can run and read by hand. The cost
//! is a process per step (milliseconds) and parsing XML answers. The NBD export is a
//! local unix socket, so the appliance must run on the libvirt host: a remote URI
//! (`qemu+ssh://host/system`) is refused.

mod run;
mod virsh;
mod xml;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backup::{BackupOptions, DiskJob, backup_resource, check_cancel};
use crate::cbt::{ChangeHint, previous};
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::{BackupManifest, Capture, Checkpoint, Consistency, ResourceKind};
use crate::source::NbdSource;
use crate::vault::Vault;

use run::{RunDir, end_dead_job, end_job};
pub use virsh::Virsh;
use xml::{BackupDisk, DomainDisk};

/// The default connection.
pub const DEFAULT_URI: &str = "qemu:///system";

/// How to reach and capture a libvirt domain.
#[derive(Debug, Clone)]
pub struct LibvirtOptions {
    pub domain: String,
    /// libvirt connection URI (default `qemu:///system`).
    pub uri: String,
    /// Where the run directory (socket, scratch files) goes (default: the temp dir).
    pub scratch_dir: Option<PathBuf>,
    /// Limit for one virsh command (default 60 s).
    pub timeout: Option<Duration>,
}

impl LibvirtOptions {
    /// Parse `libvirt:DOMAIN[?uri=URI]` (the URI may hold its own `?…`).
    pub fn parse(spec: &str) -> Result<LibvirtOptions> {
        let rest = spec.strip_prefix("libvirt:").ok_or_else(|| {
            Error::config(format!(
                "{spec}: a libvirt source is libvirt:DOMAIN[?uri=URI]"
            ))
        })?;
        let (domain, uri) = match rest.split_once("?uri=") {
            Some((d, u)) => (
                d,
                percent_encoding::percent_decode_str(u)
                    .decode_utf8_lossy()
                    .into_owned(),
            ),
            None => (rest, DEFAULT_URI.to_string()),
        };
        if domain.is_empty() || domain.contains('?') || domain.chars().any(char::is_control) {
            return Err(Error::config(format!(
                "{spec}: name the domain: libvirt:DOMAIN[?uri=qemu:///system]"
            )));
        }
        if uri.is_empty() {
            return Err(Error::config(format!("{spec}: empty ?uri=")));
        }
        // qemu:///system, qemu+unix:///system?socket=… are local; anything with a host
        // is not (the NBD export is a unix socket on the libvirt host).
        let host = uri
            .split_once("://")
            .map(|(_, r)| r.split(['/', '?']).next().unwrap_or(""))
            .unwrap_or("");
        if !host.is_empty() {
            return Err(Error::unsupported(format!(
                "{spec}: libvirt at {uri} is remote; the backup reads libvirt's NBD export \
                 over a local unix socket, so run blockvault on that host"
            )));
        }
        Ok(LibvirtOptions {
            domain: domain.to_string(),
            uri,
            scratch_dir: None,
            timeout: None,
        })
    }

    /// The server id backups of this domain are filed under by default.
    pub fn default_server_id(&self) -> String {
        format!("libvirt:{}", self.domain)
    }

    fn virsh(&self) -> Virsh {
        Virsh::new(&self.uri, self.timeout.unwrap_or(Duration::from_secs(60)))
    }
}

/// Is `spec` a libvirt source?
pub fn is_libvirt(spec: &str) -> bool {
    spec.starts_with("libvirt:")
}

/// Can the domain be reached (libvirt answers and knows it)?
pub fn probe(spec: &str) -> Result<()> {
    let o = LibvirtOptions::parse(spec)?;
    o.virsh().run(&["domstate", &o.domain]).map(|_| ())
}

/// Checkpoint-name prefix of the chain of `server` in `vault`.
fn chain_prefix(vault: &Vault, server: &str) -> String {
    let tag = hex::encode(
        &blake3::hash(format!("{}/{server}", vault.config().id).as_bytes()).as_bytes()[..4],
    );
    format!("blockvault-{tag}-")
}

/// Back up every disk of the running libvirt domain as server `server`.
pub fn backup_libvirt(
    vault: &Vault,
    server: &str,
    lv: &LibvirtOptions,
    opts: &BackupOptions,
) -> Result<BackupManifest> {
    let virsh = lv.virsh();
    let dom = lv.domain.as_str();
    let state = virsh.run(&["domstate", dom])?;
    let state = state.trim();
    if state != "running" && state != "paused" {
        return Err(not_running(&virsh, dom, state, server));
    }
    let info = xml::parse_domain(&virsh.run(&["dumpxml", dom])?)?;
    let disks: Vec<&DomainDisk> = info
        .disks
        .iter()
        .filter(|d| d.device == "disk" && d.source.is_some())
        .collect();
    if disks.is_empty() {
        return Err(Error::config(format!(
            "domain {dom} has no disks to back up"
        )));
    }
    let scratch_base = lv.scratch_dir.clone().unwrap_or_else(std::env::temp_dir);
    let leftover = end_dead_job(&virsh, dom)?;
    let prefix = chain_prefix(vault, server);
    let existing: Vec<String> = virsh
        .run(&["checkpoint-list", dom, "--name"])?
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();

    // Per disk: the previous backup's checkpoint, if it can be the incremental base.
    let mut plan: Vec<(&DomainDisk, Option<String>, Option<String>)> = Vec::new();
    for d in &disks {
        let prev = previous(vault, server, &disk_id(server, &d.target))?;
        let old = prev
            .as_ref()
            .and_then(|(_, m)| m.checkpoint.as_ref())
            .and_then(|c| c.bitmap.clone());
        let (base, note) = match old {
            _ if d.format != "qcow2" => (
                None,
                prev.is_some().then(|| {
                    format!(
                        "{} is a {} image: libvirt checkpoints need qcow2, so it is read in \
                         full and compared",
                        d.target, d.format
                    )
                }),
            ),
            None => (None, None),
            Some(c) if !existing.contains(&c) => (
                None,
                Some(format!(
                    "checkpoint {c} of the previous backup is gone from domain {dom} (deleted \
                     outside blockvault, or the domain was redefined without it): read in full"
                )),
            ),
            Some(c) => {
                let covered = xml::checkpoint_disks(&virsh.run(&[
                    "checkpoint-dumpxml",
                    dom,
                    &c,
                    "--no-domain",
                ])?)?;
                if covered.contains(&d.target) {
                    (Some(c), None)
                } else {
                    (
                        None,
                        Some(format!(
                            "checkpoint {c} has no bitmap for {} (added after the previous \
                             backup?): read in full",
                            d.target
                        )),
                    )
                }
            }
        };
        plan.push((*d, base, note));
    }
    // Checkpoints of this chain that no backup is based on: left by runs that died.
    for c in existing.iter().filter(|c| c.starts_with(&prefix)) {
        if !plan.iter().any(|(_, b, _)| b.as_ref() == Some(c)) {
            tracing::info!(domain = dom, checkpoint = c, "deleting a stale checkpoint");
            delete_checkpoint(&virsh, dom, c)?;
        }
    }
    check_cancel(opts)?;

    let run = RunDir::create(&scratch_base, info.dac_label.as_deref())?;
    let socket = run.path.join("nbd.sock");
    let request: Vec<BackupDisk> = info
        .disks
        .iter()
        .map(
            |d| match plan.iter().find(|(p, _, _)| p.target == d.target) {
                Some((_, base, _)) => BackupDisk {
                    target: d.target.clone(),
                    scratch: Some(
                        run.path
                            .join(format!("scratch-{}.qcow2", d.target))
                            .display()
                            .to_string(),
                    ),
                    incremental: base.clone(),
                },
                None => BackupDisk {
                    target: d.target.clone(),
                    scratch: None,
                    incremental: None,
                },
            },
        )
        .collect();
    let new_cp = format!("{prefix}{}", crate::manifest::new_backup_id());
    let cp_disks: Vec<(String, bool)> = info
        .disks
        .iter()
        .map(|d| {
            let in_plan = plan.iter().any(|(p, _, _)| p.target == d.target);
            (d.target.clone(), in_plan && d.format == "qcow2")
        })
        .collect();
    let with_checkpoint = cp_disks.iter().any(|(_, b)| *b);
    let backup_file = run.path.join("backup.xml");
    let cp_file = run.path.join("checkpoint.xml");
    write(
        &backup_file,
        &xml::backup_xml(&socket.display().to_string(), &request),
    )?;
    write(&cp_file, &xml::checkpoint_xml(&new_cp, &cp_disks))?;

    // The instant.
    let mut steps: Vec<String> = leftover.into_iter().collect();
    let mut quiesce = false;
    let mut consistency_note = None;
    if info.agent_channel {
        match virsh.run(&[
            "qemu-agent-command",
            dom,
            r#"{"execute":"guest-ping"}"#,
            "--timeout",
            "5",
        ]) {
            Ok(_) => quiesce = true,
            Err(e) => {
                let why = format!("guest agent does not answer ({e}): not quiesced");
                steps.push(why.clone());
                consistency_note = Some(why);
            }
        }
    } else {
        steps.push("guest agent: the domain has no agent channel".into());
    }
    let b = backup_file.display().to_string();
    let c = cp_file.display().to_string();
    let mut args = vec!["backup-begin", dom, b.as_str()];
    if with_checkpoint {
        args.push(c.as_str());
    }
    // The instant lies within backup-begin: stamp it before sending.
    let mut snapshot_at = crate::manifest::now_rfc3339_precise();
    let begun = if quiesce {
        let mut q = args.clone();
        q.push("--quiesce");
        match virsh.run(&q) {
            Ok(o) => {
                steps.push("libvirt quiesce (guest-fsfreeze-freeze/thaw): ok".into());
                Ok(o)
            }
            Err(e) => {
                let why = format!("quiescing through libvirt failed ({e})");
                tracing::warn!(domain = dom, "{why}; crash-consistent");
                steps.push(why.clone());
                consistency_note = Some(why);
                quiesce = false;
                snapshot_at = crate::manifest::now_rfc3339_precise();
                virsh.run(&args)
            }
        }
    } else {
        virsh.run(&args)
    };
    // The checkpoints this backup supersedes (deleted when it succeeds).
    let superseded: BTreeSet<String> = plan.iter().filter_map(|(_, b, _)| b.clone()).collect();
    // libvirt refuses an incremental whose bitmaps are missing or broken in the images
    // (removed by hand, the image edited offline): read in full instead of failing for
    // ever.
    let begun = match begun {
        Err(e) if !superseded.is_empty() && e.kind() != ErrorKind::Conflict => {
            let why = format!(
                "libvirt refused the incremental backup from checkpoint {} ({e})",
                superseded.iter().cloned().collect::<Vec<_>>().join(", ")
            );
            tracing::warn!(domain = dom, "{why}; reading in full");
            for p in plan.iter_mut().filter(|p| p.1.is_some()) {
                p.1 = None;
                p.2 = Some(format!("{why}: read in full"));
            }
            let full: Vec<BackupDisk> = request
                .iter()
                .map(|d| BackupDisk {
                    incremental: None,
                    ..d.clone()
                })
                .collect();
            write(
                &backup_file,
                &xml::backup_xml(&socket.display().to_string(), &full),
            )?;
            let mut a = args.clone();
            if quiesce {
                a.push("--quiesce");
            }
            snapshot_at = crate::manifest::now_rfc3339_precise();
            virsh.run(&a)
        }
        other => other,
    };
    if let Err(e) = begun {
        return Err(e.context_prefix(format!(
            "libvirt backup of domain {dom}: starting the backup job{}",
            match &info.dac_label {
                Some(l) => format!(
                    " (QEMU runs as {l} and must be able to create files in {})",
                    run.path.display()
                ),
                None => String::new(),
            }
        )));
    }

    let result = read_job(
        vault,
        server,
        lv,
        opts,
        &plan,
        &new_cp,
        with_checkpoint,
        Capture {
            method: "libvirt-backup".into(),
            consistency: if quiesce {
                Consistency::ApplicationConsistent
            } else {
                Consistency::CrashConsistent
            },
            note: consistency_note,
            snapshot_at: Some(snapshot_at),
            steps,
            hardware: None,
        },
    );
    let mut problems = Vec::new();
    if let Err(e) = end_job(&virsh, dom) {
        problems.push(format!("ending the backup job: {e}"));
    }
    drop(run);
    // The chain: on success only NEW stays; on failure NEW goes (its changes are merged
    // into OLD by libvirt, which keeps recording).
    let to_delete: Vec<String> = if result.is_ok() {
        superseded.into_iter().filter(|c| *c != new_cp).collect()
    } else if with_checkpoint {
        vec![new_cp.clone()]
    } else {
        Vec::new()
    };
    for c in to_delete {
        if let Err(e) = delete_checkpoint(&virsh, dom, &c) {
            problems.push(format!("deleting checkpoint {c}: {e}"));
        }
    }
    crate::live::with_cleanup_problems(result, &problems, server, "libvirt backup")
}

#[allow(clippy::too_many_arguments)]
fn read_job(
    vault: &Vault,
    server: &str,
    lv: &LibvirtOptions,
    opts: &BackupOptions,
    plan: &[(&DomainDisk, Option<String>, Option<String>)],
    new_cp: &str,
    with_checkpoint: bool,
    capture: Capture,
) -> Result<BackupManifest> {
    let virsh = lv.virsh();
    let dom = lv.domain.as_str();
    let (socket, exports) = xml::parse_backup_job(&virsh.run(&["backup-dumpxml", dom])?)?;
    let socket = socket.ok_or_else(|| {
        Error::invalid(format!(
            "libvirt's backup job of {dom} names no NBD socket (was it started in push mode?)"
        ))
    })?;
    check_cancel(opts)?;
    let mut jobs = Vec::new();
    for (d, base, note) in plan {
        let ex = exports
            .iter()
            .find(|e| e.target == d.target)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "libvirt's backup job of {dom} exports no disk {}",
                    d.target
                ))
            })?;
        let bitmap = if base.is_some() {
            Some(ex.bitmap.clone().ok_or_else(|| {
                Error::invalid(format!(
                    "libvirt's incremental backup job of {dom} offers no bitmap for {}",
                    d.target
                ))
            })?)
        } else {
            None
        };
        let uri = format!("nbd+unix:///{}?socket={socket}", ex.export);
        let source = NbdSource::open(&uri, bitmap.as_deref())?.described_as(format!(
            "libvirt:{dom} disk {} ({})",
            d.target,
            d.source.as_deref().unwrap_or("?")
        ));
        jobs.push(DiskJob {
            name: d.target.clone(),
            disk_id: disk_id(server, &d.target),
            source: Box::new(source),
            change: match base {
                Some(c) => ChangeHint::Bitmap(c.clone()),
                None => ChangeHint::Auto,
            },
            next_checkpoint: (with_checkpoint && d.format == "qcow2").then(|| Checkpoint {
                bitmap: Some(new_cp.to_string()),
                node: None,
            }),
            note: note.clone(),
        });
    }
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

/// Delete checkpoint `c` (libvirt merges its bitmap into its parent's); when libvirt
/// cannot (its bitmap is already gone from an image), forget its metadata only.
fn delete_checkpoint(virsh: &Virsh, dom: &str, c: &str) -> Result<()> {
    match virsh.run(&["checkpoint-delete", dom, c]) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::Conflict => Err(e),
        Err(e) => {
            tracing::warn!(
                domain = dom,
                checkpoint = c,
                "deleting the checkpoint failed ({e}); removing its metadata only (its \
                 bitmap may stay in some images: qemu-img bitmap --remove)"
            );
            virsh
                .run(&["checkpoint-delete", dom, c, "--metadata"])
                .map(|_| ())
        }
    }
}

/// Disk id of disk `target` of `server`.
pub fn disk_id(server: &str, target: &str) -> String {
    format!("{server}/{target}")
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// The error for a domain that is not running, naming its disk files.
fn not_running(virsh: &Virsh, dom: &str, state: &str, server: &str) -> Error {
    let files = virsh
        .run(&["dumpxml", dom, "--inactive"])
        .and_then(|x| xml::parse_domain(&x))
        .map(|i| {
            i.disks
                .into_iter()
                .filter(|d| d.device == "disk")
                .filter_map(|d| d.source.map(|s| format!("{}={s}", d.target)))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    Error::conflict(format!(
        "domain {dom} is {state}: libvirt's backup API needs a running domain; start it, \
         or back up its disk files offline while nothing writes them: \
         blockvault backup --vault VAULT --id {server} {files}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_default_and_own_uri() {
        let o = LibvirtOptions::parse("libvirt:web1").unwrap();
        assert_eq!((o.domain.as_str(), o.uri.as_str()), ("web1", DEFAULT_URI));
        assert_eq!(o.default_server_id(), "libvirt:web1");
        let o = LibvirtOptions::parse("libvirt:web1?uri=qemu:///system?socket=/r/s").unwrap();
        assert_eq!(o.uri, "qemu:///system?socket=/r/s");
        for bad in ["libvirt:", "libvirt:?uri=x", "web1", "libvirt:a?uri="] {
            assert_eq!(
                LibvirtOptions::parse(bad).unwrap_err().kind(),
                ErrorKind::Config,
                "{bad}"
            );
        }
        let e = LibvirtOptions::parse("libvirt:web1?uri=qemu+ssh://host/system").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
    }
}
