//! `blockvault replicate`: copy backups between vaults (in-process on the data dir).

use anyhow::Result;

use super::args::{Cli, Cmd};
use super::output::*;
use blockvault::app::ReplicaSelection;
use blockvault::replicate::{ReplicaProgress, ReplicateOptions};

/// What `replicate` was asked to copy.
pub fn selection(cmd: &Cmd) -> Option<(ReplicaSelection, &str, &str)> {
    let Cmd::Replicate {
        backup,
        resource,
        all,
        from,
        to,
    } = cmd
    else {
        return None;
    };
    let sel = match (backup, resource, all) {
        (Some(b), _, _) => ReplicaSelection::Backup(b.clone()),
        (None, Some(r), _) => ReplicaSelection::Resource(r.clone()),
        _ => ReplicaSelection::All,
    };
    Some((sel, from.as_str(), to.as_str()))
}

pub fn local(cli: &Cli) -> Result<()> {
    let Some((sel, from, to)) = selection(&cli.cmd) else {
        return Ok(());
    };
    let app = super::open_app(cli)?;
    let progress = std::sync::Arc::new(ReplicaProgress::default());
    let opts = ReplicateOptions {
        cancel: Some(super::cancel_on_signals()?),
        progress: Some(progress),
        task: None,
    };
    let spin = spinner(cli, &format!("replicating {from} → {to}"));
    let report = app.replicate(&sel, from, to, &opts);
    spin.finish_and_clear();
    let report = report?;
    for w in app.take_warnings() {
        eprintln!("warning: {w}");
    }
    if cli.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else if !cli.quiet {
        for b in &report.backups {
            outln!(
                "{} {} → {}: {} ({} blobs sent, {} already there)",
                b.name,
                b.source_id,
                b.replica_id,
                if b.stats.manifest_sent {
                    human(b.stats.bytes_sent)
                } else {
                    "already replicated".to_string()
                },
                b.stats.blobs_sent,
                b.stats.blobs_skipped
            );
        }
        outln!(
            "replicated {} backups from {from} to {to}: {} new, {} sent in {:.1} s",
            report.backups.len(),
            report.backups_sent,
            human(report.bytes_sent),
            report.seconds
        );
    }
    Ok(())
}
