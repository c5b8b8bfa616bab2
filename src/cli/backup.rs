//! `blockvault backup`: a disk, a server of image files, a live QEMU over QMP, or a
//! libvirt domain.
//!
//! Every local backup, good or not, is recorded afterwards in the data dir's task list
//! as an ended task (kind `backup`, by `cli`, with its times, bytes and result or
//! error), so that the appliance's `GET /tasks` shows what was run beside it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};

use super::args::{BackupArgs, Cli};
use super::exit::usage;
use super::output::{finish_bar, print_backup, progress_bar};
use super::{cancel_on_signals, options};
use blockvault::app::App;
use blockvault::backup::{BackupOptions, Progress};
use blockvault::cbt::{ChangeHint, parse_change_list};
use blockvault::manifest::BackupManifest;
use blockvault::service::named_disk;

pub fn run(cli: &Cli, a: &BackupArgs) -> Result<i32> {
    let BackupArgs {
        ref sources,
        ref vault,
        ref id,
        ref name,
        ref bitmap,
        since_base,
        ref changed_extents,
        ref since,
        ref secret_file,
        force_inconsistent,
        format_change,
        ref nbd_tls,
        ref server,
    } = *a;
    let app = super::open_app(cli)?;
    let started = blockvault::manifest::now_rfc3339_precise();
    let clock = std::time::Instant::now();
    let mut o = options(cli, name.clone(), id.clone());
    o.progress = Some(Arc::new(Progress::default()));
    o.cancel = Some(cancel_on_signals()?);
    o.secret_file = secret_file.clone();
    o.nbd_tls = nbd_tls.settings();
    o.force_inconsistent = force_inconsistent;
    o.format_change = format_change;
    o.change = if let Some(b) = bitmap {
        ChangeHint::Bitmap(b.clone())
    } else if since_base {
        ChangeHint::SinceBase
    } else if let Some(f) = changed_extents {
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        let list = parse_change_list(&bytes, None)
            .with_context(|| format!("change list {}", f.display()))?;
        ChangeHint::ChangeList {
            extents: list.extents,
            since: since.clone().or(list.since),
            covers: list.covers,
        }
    } else {
        ChangeHint::Auto
    };
    let bar = progress_bar(cli, &mut o, "backup");
    let live = sources.len() == 1 && sources[0].starts_with("qmp:");
    let libvirt = sources.len() == 1 && blockvault::libvirt::is_libvirt(&sources[0]);
    let m = if libvirt {
        if !server.hooks().is_empty() || !server.nodes.is_empty() || server.nbd_server.is_some() {
            return Err(usage(
                "libvirt: sources take no --freeze/--thaw/--qga (libvirt quiesces through the \
                 guest agent itself), --nodes or --nbd-server",
            ));
        }
        let mut l = blockvault::libvirt::LibvirtOptions::parse(&sources[0])?;
        l.scratch_dir = server.fleece_dir.clone();
        let server_id = id.clone().unwrap_or_else(|| l.default_server_id());
        app.backup_libvirt(&server_id, vault, &l, &o)
    } else if live {
        let sock = &sources[0]["qmp:".len()..];
        let server_id = match id {
            Some(i) => i.clone(),
            None => format!("qmp:{}", blockvault::app::default_disk_id(sock)),
        };
        let l = blockvault::live::LiveOptions {
            qmp: PathBuf::from(sock),
            nodes: server.nodes.clone(),
            nbd_server: server.nbd_server.clone(),
            fleece_dir: server.fleece_dir.clone(),
            hooks: server.hooks(),
            timeout: None,
            lock_dir: None,
        };
        app.backup_live(&server_id, vault, &l, &o)
    } else if sources.len() > 1 {
        let Some(server_id) = id else {
            return Err(usage(
                "a backup of several disks is a server backup: name it with --id",
            ));
        };
        let disks: Vec<(String, String)> = sources
            .iter()
            .enumerate()
            .map(|(i, a)| named_disk(i, a))
            .collect();
        app.backup_server_files(server_id, vault, &disks, &server.hooks(), &o)
    } else {
        if !server.hooks().is_empty() || server.require_app_consistent {
            return Err(usage(
                "--freeze, --thaw, --qga and --require-app-consistent apply to server backups \
                 (qmp: or several disks)",
            ));
        }
        app.backup(&sources[0], vault, &o)
    };
    finish_bar(bar);
    let target = match (id, live) {
        (Some(i), _) => i.clone(),
        (None, true) => format!(
            "qmp:{}",
            blockvault::app::default_disk_id(&sources[0]["qmp:".len()..])
        ),
        (None, false) => blockvault::app::default_disk_id(&sources[0]),
    };
    record_task(&app, &target, &started, clock, &o, &m);
    let m = m?;
    let mut v = app.backup_view(vault, &m);
    let warnings = app.take_warnings();
    if !warnings.is_empty() {
        v["warning"] = serde_json::json!(warnings.join("; "));
    }
    print_backup(cli, &v)?;
    Ok(0)
}

/// Record the backup that just ended in the catalog's task list (a failure to record is
/// a warning: the backup itself is what the user asked for).
fn record_task(
    app: &App,
    target: &str,
    started: &str,
    clock: std::time::Instant,
    o: &BackupOptions,
    m: &blockvault::Result<BackupManifest>,
) {
    let seconds = clock.elapsed().as_secs_f64();
    let (done, total) = o.progress.as_ref().map_or((0, 0), |p| {
        (
            p.bytes_done.load(Ordering::Relaxed),
            p.bytes_total.load(Ordering::Relaxed),
        )
    });
    let outcome = m.as_ref().map(|m| {
        serde_json::json!({
            "backup": m.id, "name": m.name, "bytes_stored": m.bytes_stored(),
            "seconds": seconds, "source": "cli",
        })
    });
    let log = vec![format!(
        "run by the command line (pid {}) in {seconds:.1}s; recorded after it ended",
        std::process::id()
    )];
    let job = blockvault::task::Ended {
        kind: "backup",
        target,
        by: "cli",
        started,
        bytes: (done, total),
        log,
    };
    if let Err(e) = blockvault::task::record_ended(app.catalog(), job, outcome) {
        tracing::warn!("the backup could not be recorded in the task list: {e}");
    }
}
