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

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{ApiError, Shared};
use crate::app::App;
use crate::catalog::Table;
use crate::policy::Schedule;
use crate::service::{Policy, Resource};

/// The text exposition of the appliance's figures.
pub async fn metrics(State(st): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    let body = st
        .run(|st, app| {
            let (queued, running) = st.tasks.counts();
            Ok(render(app, queued, running)?)
        })
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

fn render(app: &App, queued: usize, running: usize) -> crate::Result<String> {
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
    let mut tasks = vec![
        ("queued".to_string(), queued as f64),
        ("running".to_string(), running as f64),
    ];
    for s in ["succeeded", "failed", "cancelled"] {
        tasks.push((s.to_string(), cat.count_tasks(s)? as f64));
    }
    family(
        &mut out,
        "blockvault_tasks",
        "Tasks by state (ended ones as long as the task history keeps them).",
        &tasks,
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
