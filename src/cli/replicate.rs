//! `blockvault replicate`: copy backups between vaults (in-process on the data dir).

use anyhow::{Context, Result};

use super::args::{Cli, Cmd};
use super::output::*;
use blockvault::app::ReplicaSelection;
use blockvault::replicate::remote::{RemoteOptions, RemoteTarget};
use blockvault::replicate::{ReplicaProgress, ReplicateOptions};

/// What `replicate` was asked to copy: the selection, the source vault and the target
/// (a vault name, an `https://` mirror URL, or `remote NAME` for `--to-remote NAME`).
pub fn selection(cmd: &Cmd) -> Option<(ReplicaSelection, &str, String)> {
    let Cmd::Replicate {
        backup,
        resource,
        all,
        from,
        to,
        to_remote,
        ..
    } = cmd
    else {
        return None;
    };
    let sel = match (backup, resource, all) {
        (Some(b), _, _) => ReplicaSelection::Backup(b.clone()),
        (None, Some(r), _) => ReplicaSelection::Resource(r.clone()),
        _ => ReplicaSelection::All,
    };
    let to = match (to, to_remote) {
        (Some(t), _) => t.clone(),
        (None, Some(r)) => format!("remote {r}"),
        (None, None) => String::new(),
    };
    Some((sel, from.as_str(), to))
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
    let mirror = mirror_target(cli, &to)?;
    let report = match &mirror {
        Some(t) => app.replicate_to(&sel, from, t, &to, &opts),
        None => app.replicate(&sel, from, &to, &opts),
    };
    spin.finish_and_clear();
    let report = report?;
    let wire = mirror.as_ref().map(|t| {
        (
            t.stats
                .body_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            t.stats.retries.load(std::sync::atomic::Ordering::Relaxed),
        )
    });
    for w in app.take_warnings() {
        eprintln!("warning: {w}");
    }
    if cli.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some((bytes, retries)) = wire {
            v["wire_bytes"] = bytes.into();
            v["retries"] = retries.into();
        }
        outln!("{}", serde_json::to_string_pretty(&v)?);
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

/// `--bwlimit`: a size per second, `20M`, `20MiB`, `20MiB/s` (powers of 1024).
pub fn parse_rate(s: &str) -> std::result::Result<u64, String> {
    blockvault::config::parse_rate(s)
}

/// How long a failing mirror request is retried (`BLOCKVAULT_REPLICA_RETRY_SECONDS`,
/// default 300).
fn retry_for() -> std::time::Duration {
    std::time::Duration::from_secs(
        std::env::var("BLOCKVAULT_REPLICA_RETRY_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300),
    )
}

/// `--to-remote NAME`: the `[remote.NAME]` of the config file (`--config`).
fn configured_remote(cli: &Cli, name: &str) -> Result<RemoteTarget> {
    let Cmd::Replicate {
        config, bwlimit, ..
    } = &cli.cmd
    else {
        return Err(super::exit::usage("--to-remote is an option of replicate"));
    };
    if cli.fingerprint.is_some() || cli.ca.is_some() {
        return Err(super::exit::usage(
            "--to-remote takes the certificate pin from [remote.NAME] in the config file: drop --fingerprint/--ca",
        ));
    }
    let c = blockvault::config::Config::load(config).map_err(super::exit::usage)?;
    let remote = c.remotes.get(name).ok_or_else(|| {
        super::exit::usage(format!(
            "no [remote.{name}] in {}{}",
            config.display(),
            if c.remotes.is_empty() {
                String::from(" (it names no remote)")
            } else {
                format!(
                    " (it names {})",
                    c.remotes.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            }
        ))
    })?;
    let mut opts = RemoteOptions::from_config(remote)?;
    opts.retry_for = retry_for();
    if bwlimit.is_some() {
        opts.bwlimit = *bwlimit;
    }
    Ok(RemoteTarget::new(opts)?)
}

/// The mirror vault on another appliance that `--to` names (an `https://` URL), or None
/// for a vault of this appliance. The token comes from `--token-file` or
/// `BLOCKVAULT_REPLICA_TOKEN`, never from argv.
fn mirror_target(cli: &Cli, to: &str) -> Result<Option<RemoteTarget>> {
    let Cmd::Replicate {
        token_file,
        bwlimit,
        to_remote,
        ..
    } = &cli.cmd
    else {
        return Ok(None);
    };
    if let Some(name) = to_remote {
        return Ok(Some(configured_remote(cli, name)?));
    }
    if !(to.starts_with("https://") || to.starts_with("http://")) {
        if token_file.is_some() || bwlimit.is_some() {
            return Err(super::exit::usage(
                "--token-file and --bwlimit are for a mirror on another appliance (--to https://HOST:PORT/VAULT)",
            ));
        }
        return Ok(None);
    }
    let token = match token_file {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading the replication token from {}", p.display()))?,
        None => std::env::var("BLOCKVAULT_REPLICA_TOKEN").map_err(|_| {
            super::exit::usage(
                "a mirror on another appliance needs its replication token: --token-file PATH or BLOCKVAULT_REPLICA_TOKEN",
            )
        })?,
    };
    Ok(Some(RemoteTarget::new(RemoteOptions {
        url: to.to_string(),
        token,
        trust: super::client::trust(cli)?,
        bwlimit: *bwlimit,
        retry_for: retry_for(),
    })?))
}
