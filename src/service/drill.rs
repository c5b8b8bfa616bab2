//! Recovery drills as tasks, for the API (`POST /backups/{id}/drill`) and drill
//! policies alike, and the alert a failed drill raises.
//!
//! Task: kind `drill`, target the backup's resource, lock key `drill` — one drill VM at
//! a time on the appliance (each holds guest RAM and a CPU). Cancel stops the VM. A guest
//! that does not pass fails the task with `InvalidFormat` (the backup does not hold a
//! system that boots as checked), after its `verified_boot` record is written; the task
//! log has the reason and where the console log and screenshot are. Such a failure raises
//! `drill_failed` for the resource (besides `task_failed`).
//!
//! A drill policy (`kind: "drill"`) drills the latest backup of each of its `resources`
//! (every server resource when the list is empty) with its `check` (default `agent`)
//! and `timeout_seconds` (default 300). A resource without a backup is skipped, and
//! the skip logged.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::app::App;
use crate::drill::{Accel, DrillOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::task::{TaskCtx, TaskState, Tasks};

/// What `POST /backups/{id}/drill` asks for (all optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DrillRequest {
    /// `agent` (default), `console:REGEX` or `port:N`.
    #[serde(default)]
    pub check: Option<String>,
    /// Seconds from the VM's start to the signal (default 300).
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
    #[serde(default)]
    pub accel: Option<Accel>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub bus: Option<String>,
    #[serde(default)]
    pub cpu: Option<String>,
}

impl DrillRequest {
    /// The drill's options, checked.
    pub fn options(&self) -> Result<DrillOptions> {
        let timeout = self.timeout_seconds.unwrap_or(300.0);
        if !(timeout.is_finite() && timeout > 0.0 && timeout <= 86_400.0) {
            return Err(Error::config(format!(
                "drill: timeout_seconds must be more than 0 and at most 86400, got {timeout}"
            )));
        }
        Ok(DrillOptions {
            timeout: Duration::from_secs_f64(timeout),
            check: self.check.as_deref().unwrap_or("agent").parse()?,
            accel: self.accel.unwrap_or_default(),
            memory_mib: self.memory_mib,
            bus: self.bus.clone(),
            cpu: self.cpu.clone(),
        })
    }
}

/// Drill `backup` (id, prefix, name) as the task's job: the record, or a failure.
pub fn drill_backup(app: &App, backup: &str, opts: &DrillOptions, ctx: &TaskCtx) -> Result<Value> {
    let log = |m: &str| ctx.log(m.to_string());
    let r = app.drill(backup, None, opts, &ctx.cancel, &log)?;
    if let Some(n) = &r.note {
        ctx.log(n.clone());
    }
    let v = serde_json::to_value(&r)
        .map_err(|e| Error::invalid("encoding the drill record").with_source(e))?;
    if !r.ok {
        let why = r.reason.as_deref().unwrap_or("the check did not pass");
        if !r.console_tail.trim().is_empty() {
            ctx.log(format!("console tail:\n{}", r.console_tail));
        }
        return Err(Error::new(
            ErrorKind::InvalidFormat,
            format!(
                "drill of backup {} failed under {} after {:.1} s: {why}; console log and \
                 screenshot in {}",
                r.backup,
                r.accel,
                r.seconds,
                r.dir.display()
            ),
        ));
    }
    ctx.log(format!(
        "backup {} booted ({}) in {:.1} s under {}",
        r.backup, r.check, r.seconds, r.accel
    ));
    Ok(v)
}

/// Queue a drill of `backup` (checked now: the backup and the options). Returns the id.
pub fn submit_drill(
    app: &App,
    tasks: &Tasks,
    data: &Path,
    backup: &str,
    req: &DrillRequest,
    by: &str,
) -> Result<String> {
    let opts = req.options()?;
    let entry = app.find_backup(backup)?;
    let (data, id) = (data.to_path_buf(), entry.manifest.id.clone());
    tasks.submit(
        "drill",
        &entry.manifest.resource,
        Some("drill".into()),
        by,
        Box::new(move |ctx| drill_backup(&App::open(&data)?, &id, &opts, ctx)),
    )
}

/// Queue the drills of a drill policy: the latest backup of each resource (every server
/// resource when `resources` is empty). Returns the task ids.
pub fn submit_policy_drills(
    app: &App,
    tasks: &Tasks,
    data: &Path,
    resources: &[String],
    req: &DrillRequest,
    by: &str,
) -> Result<Vec<String>> {
    let names: Vec<String> = if resources.is_empty() {
        app.catalog()
            .list_named::<super::Resource>(crate::catalog::Table::Resources)?
            .into_iter()
            .filter(|r| r.kind == crate::manifest::ResourceKind::Server)
            .map(|r| r.name)
            .collect()
    } else {
        resources.to_vec()
    };
    let mut ids = Vec::new();
    for r in &names {
        match app.resolve_backup("latest", Some(r)) {
            Ok(b) => ids.push(submit_drill(app, tasks, data, &b.manifest.id, req, by)?),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                tracing::info!("drill policy: resource {r} has no backup yet; skipped");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(ids)
}

/// The alert a finished drill task calls for: `drill_failed` for its resource when the
/// guest did not pass.
pub fn drill_alert(
    t: &crate::task::TaskInfo,
) -> Option<(crate::config::AlertKind, String, String)> {
    (t.kind == "drill"
        && t.state == TaskState::Failed
        && t.error_kind == Some(ErrorKind::InvalidFormat))
    .then(|| {
        (
            crate::config::AlertKind::DrillFailed,
            t.target.clone(),
            t.error.clone().unwrap_or_default(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drill_requests_are_checked() {
        let ok: DrillRequest =
            serde_json::from_str(r#"{"check":"console:login:","timeout_seconds":60}"#).unwrap();
        let o = ok.options().unwrap();
        assert_eq!(o.timeout, Duration::from_secs(60));
        assert_eq!(o.check.to_string(), "console:login:");
        assert_eq!(
            DrillRequest::default().options().unwrap().check.to_string(),
            "agent"
        );
        for bad in [
            r#"{"check":"ping"}"#,
            r#"{"timeout_seconds":0}"#,
            r#"{"timeout_seconds":-1}"#,
        ] {
            let r: DrillRequest = serde_json::from_str(bad).unwrap();
            assert_eq!(r.options().unwrap_err().kind(), ErrorKind::Config, "{bad}");
        }
        assert!(serde_json::from_str::<DrillRequest>(r#"{"nope":1}"#).is_err());
    }
}
