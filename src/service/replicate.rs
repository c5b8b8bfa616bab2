//! Replication as tasks, for the API (`POST /replications`) and replication policies
//! alike. The copying is `replicate`'s; which backups, and the target's retention, are
//! decided here.
//!
//! Task: kind `replicate`, target the target vault, lock key `replicate:<to>` (one
//! replication into a vault at a time). Progress: `bytes_total` grows by the stored bytes
//! the target lacks as they are found, `bytes_done` by what was sent. Cancel stops before
//! the next batch; a failed replication raises `task_failed` like any task.
//!
//! A target is a vault of this appliance (`to`) or a mirror vault on another appliance
//! (`to_remote`: the name of a `[remote.NAME]` of the config file, whose URL, token file,
//! pin and bandwidth limit are used; an API caller can only name it). A push to a mirror
//! has no retention here: what the mirror keeps is the mirror appliance's own policy (a
//! `replication` token can add backups there, never delete), so `retention` together
//! with `to_remote` is refused. Its task result adds `wire_bytes` (blob bodies the
//! mirror answered) and `retries`.
//!
//! A replication policy (`kind: "replicate"`) copies the backups of `resources` (every
//! resource of the source vault when empty) from vault `from` to vault `to`, and applies
//! its own `retention` on the target — so the target may keep longer than the source.
//! Retention is planned over what the target could hold: the source's `autobk_` backups
//! (as their replicas) plus the replicas whose source is gone already. What it keeps is
//! replicated (if not there yet); a replica it does not keep is deleted from the target
//! (unless protected or locked there), and its source backup is not copied again. Other
//! backups (`manualbk_…`, named) are always replicated and never pruned. Without
//! retention rules everything is kept.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::app::App;
use crate::config::RemoteConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::BackupManifest;
use crate::policy::{Candidate, Retention, plan};
use crate::replicate::ReplicateOptions;
use crate::replicate::engine::replica_id;
use crate::replicate::remote::{RemoteOptions, RemoteTarget};
use crate::task::{TaskCtx, Tasks};

/// The `[remote.NAME]` tables of the config file (set by `service::configure`).
static REMOTES: RwLock<BTreeMap<String, RemoteConfig>> = RwLock::new(BTreeMap::new());

/// Take the config file's remotes (at service start).
pub fn configure_remotes(remotes: &BTreeMap<String, RemoteConfig>) {
    *REMOTES.write().unwrap_or_else(|e| e.into_inner()) = remotes.clone();
}

/// The configured remote `name`, or a `Config` error naming the known ones.
fn remote(name: &str) -> Result<RemoteConfig> {
    let all = REMOTES.read().unwrap_or_else(|e| e.into_inner());
    all.get(name).cloned().ok_or_else(|| {
        let known: Vec<&str> = all.keys().map(String::as_str).collect();
        Error::config(format!(
            "no remote {name:?} in the appliance's config file (known: {}); add [remote.{name}] with url, token_file and fingerprint there and restart the service",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))
    })
}

/// What `POST /replications` asks for (and what a replication policy does each run).
/// The target is exactly one of `to` (a vault of this appliance) and `to_remote` (a
/// mirror vault on another appliance, by the name of its `[remote.NAME]` in the config
/// file: a caller never passes a URL or a token).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplicateRequest {
    /// Source vault.
    pub from: String,
    /// Target vault of this appliance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Target: a mirror vault on another appliance, by its `[remote.NAME]` in the
    /// appliance's config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_remote: Option<String>,
    /// Only this backup (id, unique id prefix or name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// Only the backups of these resources (disk ids or server names); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
}

/// Where a replication goes.
enum Target<'a> {
    Vault(&'a str),
    Remote(&'a str),
}

impl ReplicateRequest {
    fn target(&self) -> Result<Target<'_>> {
        match (&self.to, &self.to_remote) {
            (Some(t), None) => Ok(Target::Vault(t)),
            (None, Some(r)) => Ok(Target::Remote(r)),
            _ => Err(Error::config(
                "replicate: give exactly one target: \"to\": VAULT (of this appliance) or \"to_remote\": NAME (a [remote.NAME] of the config file)",
            )),
        }
    }

    /// The target as tasks and reports name it: the vault, or `remote NAME`.
    pub fn target_label(&self) -> String {
        match self.target() {
            Ok(Target::Vault(v)) => v.to_string(),
            Ok(Target::Remote(r)) => format!("remote {r}"),
            Err(_) => String::new(),
        }
    }

    /// Check the request against the catalog and the config (both vaults exist and
    /// differ; a remote is configured).
    pub fn validate(&self, app: &App) -> Result<()> {
        match self.target()? {
            Target::Vault(to) => {
                if self.from == to {
                    return Err(Error::config(format!(
                        "replicate: \"from\" and \"to\" both name vault {}",
                        self.from
                    )));
                }
                app.catalog().vault(to)?;
            }
            Target::Remote(name) => {
                remote(name)?;
            }
        }
        if self.backup.is_some() && !self.resources.is_empty() {
            return Err(Error::config(
                "replicate: give either a backup or resources, not both",
            ));
        }
        app.catalog().vault(&self.from)?;
        if let Some(b) = &self.backup {
            let e = app.find_backup(b)?;
            if e.vault != self.from {
                return Err(Error::config(format!(
                    "backup {b} is in vault {}, not in {}",
                    e.vault, self.from
                )));
            }
        }
        Ok(())
    }

    /// Retention applies on a vault of this appliance only: a mirror vault on another
    /// appliance keeps its backups by that appliance's own policies (a `replication`
    /// token can add, never delete).
    pub fn check_retention(&self, retention: Option<&Retention>) -> Result<()> {
        if self.to_remote.is_some() && retention.is_some_and(|r| !r.is_empty()) {
            return Err(Error::config(
                "replicate: \"retention\" cannot go with \"to_remote\": what a mirror vault on another appliance keeps is that appliance's own policy (a replication token may add backups, never delete them); drop retention, or set a backup policy's retention on the mirror appliance",
            ));
        }
        Ok(())
    }
}

/// The backups of `req.from` that `req` selects, oldest first.
fn source_backups(app: &App, req: &ReplicateRequest) -> Result<Vec<BackupManifest>> {
    Ok(match &req.backup {
        Some(b) => vec![app.find_backup(b)?.manifest],
        None => app
            .catalog()
            .backups(Some(&req.from), None)?
            .into_iter()
            .map(|b| b.manifest)
            .filter(|m| req.resources.is_empty() || req.resources.contains(&m.resource))
            .collect(),
    })
}

/// Push the backups `req` selects to the mirror vault of remote `name`.
fn replicate_remote_job(
    app: &App,
    req: &ReplicateRequest,
    name: &str,
    opts: &ReplicateOptions,
    ctx: &TaskCtx,
) -> Result<Value> {
    let r = remote(name)?;
    let target = RemoteTarget::new(RemoteOptions::from_config(&r)?)?;
    let chosen = source_backups(app, req)?;
    ctx.log(format!(
        "replicating {} backup(s) from vault {} to the mirror vault of remote {name}",
        chosen.len(),
        req.from
    ));
    let source = app.open_vault(&req.from)?;
    let label = format!("remote {name}");
    let report = app.replicate_manifests_to(&source, &chosen, &req.from, &target, &label, opts)?;
    log_report(ctx, &report);
    let mut out = serde_json::to_value(&report)
        .map_err(|e| Error::invalid("encoding the replication report").with_source(e))?;
    out["wire_bytes"] = json!(target.stats.body_bytes.load(Ordering::Relaxed));
    out["retries"] = json!(target.stats.retries.load(Ordering::Relaxed));
    Ok(out)
}

fn log_report(ctx: &TaskCtx, report: &crate::app::ReplicateReport) {
    for b in &report.backups {
        ctx.log(format!(
            "{} ({} → {}): {}",
            b.name,
            b.source_id,
            b.replica_id,
            if b.stats.manifest_sent {
                format!(
                    "{} blobs, {} bytes sent, {} blobs already there",
                    b.stats.blobs_sent, b.stats.bytes_sent, b.stats.blobs_skipped
                )
            } else {
                "already replicated".to_string()
            }
        ));
    }
}

fn parse_time(m: &BackupManifest) -> Result<OffsetDateTime> {
    OffsetDateTime::parse(&m.created, &Rfc3339)
        .map_err(|e| Error::invalid(format!("backup {} has a bad time", m.id)).with_source(e))
}

/// Run `req` with the target `retention` (a policy's; None for a one-off) as the task's
/// job. Returns the report (with the replicas pruned on the target).
pub fn replicate_job(
    app: &App,
    req: &ReplicateRequest,
    retention: Option<&Retention>,
    ctx: &TaskCtx,
) -> Result<Value> {
    let opts = ReplicateOptions {
        cancel: Some(Arc::clone(&ctx.cancel)),
        progress: None,
        task: Some(Arc::clone(&ctx.progress)),
    };
    let to = match req.target()? {
        Target::Remote(name) => return replicate_remote_job(app, req, name, &opts, ctx),
        Target::Vault(to) => to,
    };
    let from = req.from.as_str();
    let target_id = app.catalog().vault(to)?.vault_id;
    let source_backups = source_backups(app, req)?;
    let mut chosen = source_backups.clone();
    let mut prune: Vec<String> = Vec::new();
    if let Some(ret) = retention.filter(|r| !r.is_empty()) {
        let (keep, drop) = plan_target(app, ret, &source_backups, to, &target_id, req)?;
        chosen.retain(|m| {
            !m.name.starts_with("autobk_") || keep.contains(&replica_id(&m.id, &target_id))
        });
        prune = drop;
    }
    ctx.log(format!(
        "replicating {} backup(s) from vault {from} to vault {to}",
        chosen.len()
    ));
    let source = app.open_vault(from)?;
    let report = app.replicate_manifests(&source, &chosen, from, to, &opts)?;
    log_report(ctx, &report);
    let mut pruned = Vec::new();
    let mut kept_locked = Vec::new();
    for id in &prune {
        match app.delete_backup(id) {
            Ok(m) => {
                ctx.log(format!(
                    "retention on {to}: deleted replica {} ({id})",
                    m.name
                ));
                pruned.push(id.clone());
            }
            Err(e) if e.kind() == ErrorKind::Conflict => {
                ctx.log(format!(
                    "retention on {to}: kept replica {id}: {}",
                    e.context()
                ));
                kept_locked.push(id.clone());
            }
            Err(e) => return Err(e),
        }
    }
    let mut out = serde_json::to_value(&report)
        .map_err(|e| Error::invalid("encoding the replication report").with_source(e))?;
    out["pruned"] = json!(pruned);
    out["kept_locked"] = json!(kept_locked);
    Ok(out)
}

/// The replica ids the target keeps under `ret`, and the replicas on the target to delete.
fn plan_target(
    app: &App,
    ret: &Retention,
    source: &[BackupManifest],
    to: &str,
    target_id: &str,
    req: &ReplicateRequest,
) -> Result<(HashSet<String>, Vec<String>)> {
    let replicas: Vec<BackupManifest> = app
        .catalog()
        .backups(Some(to), None)?
        .into_iter()
        .map(|b| b.manifest)
        .filter(|m| m.replica_of.is_some() && m.name.starts_with("autobk_"))
        .filter(|m| req.resources.is_empty() || req.resources.contains(&m.resource))
        .collect();
    let resources: BTreeSet<&str> = source
        .iter()
        .chain(replicas.iter())
        .map(|m| m.resource.as_str())
        .collect();
    let mut keep = HashSet::new();
    let mut drop = Vec::new();
    let now = OffsetDateTime::now_utc();
    for r in resources {
        let mut candidates = Vec::new();
        let mut seen = HashSet::new();
        for m in source
            .iter()
            .filter(|m| m.resource == r && m.name.starts_with("autobk_"))
        {
            let id = replica_id(&m.id, target_id);
            seen.insert(id.clone());
            candidates.push(Candidate {
                protected: app.catalog().is_protected(&id)?,
                id,
                created: parse_time(m)?,
            });
        }
        for m in replicas
            .iter()
            .filter(|m| m.resource == r && !seen.contains(&m.id))
        {
            candidates.push(Candidate {
                id: m.id.clone(),
                created: parse_time(m)?,
                protected: app.catalog().is_protected(&m.id)?,
            });
        }
        for d in plan(ret, &candidates, now) {
            if d.keep {
                keep.insert(d.id);
            } else if replicas.iter().any(|m| m.id == d.id) {
                drop.push(d.id);
            }
        }
    }
    Ok((keep, drop))
}

/// The lock key of replications into target `label` (a vault, or `remote NAME`).
fn replicate_lock(label: &str) -> String {
    format!("replicate:{label}")
}

/// Queue a replication (checked now). Returns the task id.
pub fn submit_replicate(
    app: &App,
    tasks: &Tasks,
    data: &Path,
    req: ReplicateRequest,
    retention: Option<Retention>,
    by: &str,
) -> Result<String> {
    req.validate(app)?;
    req.check_retention(retention.as_ref())?;
    let data = data.to_path_buf();
    let to = req.target_label();
    tasks.submit(
        "replicate",
        &to,
        Some(replicate_lock(&to)),
        by,
        Box::new(move |ctx| replicate_job(&App::open(&data)?, &req, retention.as_ref(), ctx)),
    )
}
