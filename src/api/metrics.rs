//! `GET /metrics`: the appliance's figures in the Prometheus text format (version
//! 0.0.4), for any valid token (auditor and up; the route is outside `/api/v1`, so
//! the auth layer asks for a token but no particular role).
//!
//! ```text
//! blockvault_resource_last_success_timestamp_seconds{resource}  newest backup's creation time
//! blockvault_resource_last_backup_duration_seconds{resource}    how long that backup took
//! blockvault_resource_last_backup_read_bytes{resource}          bytes it read from the source
//! blockvault_resource_last_backup_stored_bytes{resource}        new bytes it wrote to the vault
//! blockvault_vault_logical_bytes{vault}                         sum of its backups' sizes
//! blockvault_vault_stored_bytes{vault}                          bytes its packs hold
//! blockvault_vault_capacity_bytes{vault}                        its limit (absent: none)
//! blockvault_vault_backups{vault}                               backups it holds
//! blockvault_tasks{state}                                       tasks by state (queued…cancelled)
//! blockvault_scheduler_lag_seconds{policy}                      now − a due fire time not yet queued (0: on time)
//! ```
//!
//! Vault figures are the cached ones (`usage_computed_at`, as `GET /api/v1/vaults`).
//! Task counts are the registry's: the catalog's records, except that a task the
//! registry still holds in memory counts in its in-memory state — the task writer
//! records states a moment later, so a task `GET /tasks/{id}` shows as succeeded is
//! never missing from `blockvault_tasks{state="succeeded"}` ([`task_counts`]).

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{ApiError, Shared};
use crate::app::App;
use crate::catalog::{Catalog, Table};
use crate::policy::Schedule;
use crate::service::{Policy, Resource};
use crate::task::{TaskState, Tasks};

/// The text exposition of the appliance's figures.
pub async fn metrics(State(st): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    let body = st
        .run(|st, app| Ok(render(app, &task_counts(&st.tasks, app.catalog())?)?))
        .await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    ))
}

/// A label value escaped as the text format asks (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, help: &str, samples: &[(String, f64)], key: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    for (l, v) in samples {
        let _ = writeln!(out, "{name}{{{key}=\"{}\"}} {v}", label(l));
    }
}

/// Tasks by state: queued and running ones from the registry's memory; ended ones from
/// the catalog's records, except those the registry still holds (their record may not
/// be written yet), which count in their in-memory state.
fn task_counts(tasks: &Tasks, cat: &Catalog) -> crate::Result<Vec<(String, f64)>> {
    let live = tasks.live_states();
    let ids: Vec<String> = live.iter().map(|(id, _)| id.clone()).collect();
    let mut out = Vec::new();
    for s in [
        TaskState::Queued,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
    ] {
        let held = live.iter().filter(|(_, t)| *t == s).count() as u64;
        let recorded = if s.done() {
            cat.count_tasks_except(s.as_str(), &ids)?
        } else {
            0
        };
        out.push((s.as_str().to_string(), (held + recorded) as f64));
    }
    Ok(out)
}

fn render(app: &App, tasks: &[(String, f64)]) -> crate::Result<String> {
    let cat = app.catalog();
    let mut out = String::new();
    let resources: Vec<Resource> = cat.list_named(Table::Resources)?;
    let (mut ts, mut dur, mut read, mut stored) = (vec![], vec![], vec![], vec![]);
    for r in &resources {
        let newest = cat
            .backups(None, Some(&r.name))?
            .into_iter()
            .filter_map(|e| {
                let t = OffsetDateTime::parse(&e.manifest.created, &Rfc3339).ok()?;
                Some((t, e.manifest))
            })
            .max_by_key(|(t, _)| *t);
        if let Some((t, m)) = newest {
            ts.push((r.name.clone(), t.unix_timestamp() as f64));
            dur.push((r.name.clone(), m.seconds));
            read.push((
                r.name.clone(),
                m.disks.iter().map(|d| d.bytes_read).sum::<u64>() as f64,
            ));
            stored.push((r.name.clone(), m.bytes_stored() as f64));
        }
    }
    family(
        &mut out,
        "blockvault_resource_last_success_timestamp_seconds",
        "Creation time of the resource's newest backup (Unix seconds).",
        &ts,
        "resource",
    );
    family(
        &mut out,
        "blockvault_resource_last_backup_duration_seconds",
        "How long the resource's newest backup took.",
        &dur,
        "resource",
    );
    family(
        &mut out,
        "blockvault_resource_last_backup_read_bytes",
        "Bytes the resource's newest backup read from its source.",
        &read,
        "resource",
    );
    family(
        &mut out,
        "blockvault_resource_last_backup_stored_bytes",
        "New bytes the resource's newest backup wrote to its vault.",
        &stored,
        "resource",
    );
    let (mut logical, mut st, mut cap, mut count) = (vec![], vec![], vec![], vec![]);
    for v in cat.vaults()? {
        let i = app.vault_info_cached(&v.name)?;
        logical.push((i.name.clone(), i.logical_bytes as f64));
        st.push((i.name.clone(), i.stored_bytes as f64));
        if let Some(c) = i.capacity {
            cap.push((i.name.clone(), c as f64));
        }
        count.push((i.name.clone(), i.backups as f64));
    }
    family(
        &mut out,
        "blockvault_vault_logical_bytes",
        "Sum of the logical sizes of the vault's backups.",
        &logical,
        "vault",
    );
    family(
        &mut out,
        "blockvault_vault_stored_bytes",
        "Bytes the vault's backups hold after dedup and compression.",
        &st,
        "vault",
    );
    family(
        &mut out,
        "blockvault_vault_capacity_bytes",
        "The vault's capacity limit (absent when it has none).",
        &cap,
        "vault",
    );
    family(
        &mut out,
        "blockvault_vault_backups",
        "Backups in the vault.",
        &count,
        "vault",
    );
    family(
        &mut out,
        "blockvault_tasks",
        "Tasks by state (ended ones as long as the task history keeps them).",
        tasks,
        "state",
    );
    let now = OffsetDateTime::now_utc();
    let mut lag = vec![];
    let policies: Vec<Policy> = cat.list_named(Table::Policies)?;
    for p in policies.iter().filter(|p| p.enabled) {
        let Ok(s) = Schedule::parse(&p.schedule) else {
            continue;
        };
        let since = cat
            .policy_last_run(&p.name)?
            .and_then(|t| OffsetDateTime::parse(&t, &Rfc3339).ok());
        // A policy that never ran starts with its next slot: no lag.
        let late = since
            .and_then(|since| s.missed(since, now))
            .map(|due| (now - due).as_seconds_f64().max(0.0))
            .unwrap_or(0.0);
        lag.push((p.name.clone(), late));
    }
    family(
        &mut out,
        "blockvault_scheduler_lag_seconds",
        "How long a due run of the policy has waited to be queued (0: on time).",
        &lag,
        "policy",
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The race `console::metrics…` lost under load: the task writer had not recorded
    /// a task's end when `/metrics` counted ended tasks in the catalog. With the writer
    /// held off by a lock, a task that ended still counts as succeeded.
    #[test]
    fn a_task_that_ended_counts_before_its_record_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let tasks = Tasks::start(dir.path(), 1, Default::default()).unwrap();
        let cat = Catalog::open(dir.path()).unwrap();
        let blocker = rusqlite::Connection::open(dir.path().join("catalog.sqlite")).unwrap();
        blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let id = tasks
            .submit(
                "backup",
                "d",
                None,
                "test",
                Box::new(|_| Ok(serde_json::json!({}))),
            )
            .unwrap();
        let done = tasks.wait(&id, Duration::from_secs(30)).unwrap();
        assert_eq!(done.state, TaskState::Succeeded);
        assert_eq!(cat.count_tasks("succeeded").unwrap(), 0, "not written yet");
        let counts = task_counts(&tasks, &cat).unwrap();
        let of = |s: &str| counts.iter().find(|(n, _)| n == s).unwrap().1;
        assert_eq!(of("succeeded"), 1.0, "{counts:?}");
        assert_eq!(
            of("queued") + of("running") + of("failed"),
            0.0,
            "{counts:?}"
        );
        blocker.execute_batch("COMMIT").unwrap();
        assert!(tasks.flush(Duration::from_secs(60)));
        // Written and forgotten by the registry: counted once, from the catalog.
        let counts = task_counts(&tasks, &cat).unwrap();
        assert_eq!(
            counts.iter().map(|(_, n)| n).sum::<f64>(),
            1.0,
            "{counts:?}"
        );
    }
}
