//! Replication as tasks, for the API (`POST /replications`) and replication policies
//! alike. The copying is `replicate`'s; which backups, and the target's retention, are
//! decided here.
//!
//! Task: kind `replicate`, target the target vault, lock key `replicate:<to>` (one
//! replication into a vault at a time). Progress: `bytes_total` grows by the stored bytes
//! the target lacks as they are found, `bytes_done` by what was sent. Cancel stops before
//! the next batch; a failed replication raises `task_failed` like any task.
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

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::app::App;
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::BackupManifest;
use crate::policy::{Candidate, Retention, plan};
use crate::replicate::ReplicateOptions;
use crate::replicate::engine::replica_id;
use crate::task::{TaskCtx, Tasks};

/// What `POST /replications` asks for (and what a replication policy does each run).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplicateRequest {
    /// Source vault.
    pub from: String,
    /// Target vault.
    pub to: String,
    /// Only this backup (id, unique id prefix or name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// Only the backups of these resources (disk ids or server names); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
}

impl ReplicateRequest {
    /// Check the request against the catalog (both vaults exist and differ).
    pub fn validate(&self, app: &App) -> Result<()> {
        if self.from == self.to {
            return Err(Error::config(format!(
                "replicate: \"from\" and \"to\" both name vault {}",
                self.from
            )));
        }
        if self.backup.is_some() && !self.resources.is_empty() {
            return Err(Error::config(
                "replicate: give either a backup or resources, not both",
            ));
        }
        app.catalog().vault(&self.from)?;
        app.catalog().vault(&self.to)?;
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
    let (from, to) = (req.from.as_str(), req.to.as_str());
    let target_id = app.catalog().vault(to)?.vault_id;
    let source_backups: Vec<BackupManifest> = match &req.backup {
        Some(b) => vec![app.find_backup(b)?.manifest],
        None => app
            .catalog()
            .backups(Some(from), None)?
            .into_iter()
            .map(|b| b.manifest)
            .filter(|m| req.resources.is_empty() || req.resources.contains(&m.resource))
            .collect(),
    };
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
    let opts = ReplicateOptions {
        cancel: Some(Arc::clone(&ctx.cancel)),
        progress: None,
        task: Some(Arc::clone(&ctx.progress)),
    };
    let report = app.replicate_manifests(&source, &chosen, from, to, &opts)?;
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

/// The lock key of replications into vault `to`.
fn replicate_lock(to: &str) -> String {
    format!("replicate:{to}")
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
    let data = data.to_path_buf();
    let to = req.to.clone();
    tasks.submit(
        "replicate",
        &to,
        Some(replicate_lock(&to)),
        by,
        Box::new(move |ctx| replicate_job(&App::open(&data)?, &req, retention.as_ref(), ctx)),
    )
}
