//! Task routes (list, show, cancel), the audit log and alert history, and the alerts a finished task raises.

use super::*;

// ---- tasks, audit, alerts, tokens ----

/// `GET /tasks?state=&limit=&offset=`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TasksQuery {
    state: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

pub async fn list_tasks(
    State(st): State<Shared>,
    uri: Uri,
    Query(q): Query<TasksQuery>,
) -> R<Response> {
    let page = Page::new(q.limit, q.offset)?;
    let state = match &q.state {
        None => None,
        Some(s) => Some(
            serde_json::from_value::<TaskState>(json!(s))
                .map_err(|_| bad(format!("unknown task state {s:?}")))?,
        ),
    };
    st.run(move |st, _| Ok(page.answer(&uri, &st.tasks.list(state)?)))
        .await
}

pub async fn get_task(State(st): State<Shared>, Path(id): Path<String>) -> R<Json<Value>> {
    st.run(move |st, _| {
        Ok(Json(
            serde_json::to_value(st.tasks.get(&id)?).unwrap_or_default(),
        ))
    })
    .await
}

pub async fn cancel_task(State(st): State<Shared>, Path(id): Path<String>) -> R<Json<Value>> {
    st.run(move |st, _| {
        Ok(Json(
            serde_json::to_value(st.tasks.cancel(&id)?).unwrap_or_default(),
        ))
    })
    .await
}

/// The newest 1,000 audit records (newest first), a page at a time.
pub async fn audit(State(st): State<Shared>, uri: Uri, Query(q): Query<PageQuery>) -> R<Response> {
    let page = page_of(q)?;
    st.run(move |st, app| {
        st.flush_audit();
        Ok(page.answer(&uri, &app.catalog().audit_log(1000)?))
    })
    .await
}

/// The newest 1,000 alerts, a page at a time.
pub async fn alerts(
    State(st): State<Shared>,
    uri: Uri,
    Query(q): Query<PageQuery>,
) -> R<([(&'static str, String); 1], Response)> {
    let page = page_of(q)?;
    // Webhook deliveries dropped by a full queue (see crate::alerts).
    let dropped = st.alerts.stats().dropped.to_string();
    st.run(move |_, app| {
        Ok((
            [("blockvault-alerts-dropped", dropped)],
            page.answer(&uri, &app.catalog().alerts(1000)?),
        ))
    })
    .await
}

/// Raise the alerts a finished task calls for, chosen by the failure's kind (never by
/// its message); a backup that succeeded raises `backup_succeeded` (webhooks get it only
/// when they list it). Runs on its own thread (see `run_appliance`), not on the runtime.
pub fn alerts_for(st: &Shared, t: &crate::task::TaskInfo) {
    if t.state != TaskState::Failed && t.state != TaskState::Succeeded {
        return;
    }
    let err = t.error.clone().unwrap_or_default();
    let is_backup = t.kind == "backup";
    // The resource's vault, and the vault's usage as recorded by the backup.
    let usage = is_backup
        .then(|| {
            let app = st.apps.get().ok()?;
            let res = resource_of(&app, &t.target).ok()?;
            let info = app.vault_info_cached(&res.vault).ok();
            Some((res.vault, info))
        })
        .flatten();
    let result_str = |k: &str| {
        t.result
            .as_ref()
            .and_then(|r| r.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let details = crate::alerts::AlertDetails {
        resource: is_backup.then(|| t.target.clone()),
        vault: usage.as_ref().map(|(v, _)| v.clone()),
        backup: result_str("backup"),
        backup_name: result_str("name"),
        task: Some(t.id.clone()),
        ..Default::default()
    };
    let raise = |k: AlertKind, subject: &str, msg: &str| {
        if let Err(e) = st.alerts.raise_with(k, subject, msg, &details) {
            tracing::error!("raising an alert: {e}");
        }
    };
    if t.state == TaskState::Failed {
        match t.error_kind {
            Some(ErrorKind::Unreachable) => raise(AlertKind::SourceUnreachable, &t.target, &err),
            Some(ErrorKind::Full) => raise(AlertKind::VaultFull, &t.target, &err),
            _ => {}
        }
        raise(
            AlertKind::TaskFailed,
            &format!("{} {}", t.kind, t.target),
            &err,
        );
    }
    if is_backup && t.state == TaskState::Succeeded {
        let name = details.backup_name.clone().unwrap_or_default();
        let vault = details.vault.clone().unwrap_or_default();
        raise(
            AlertKind::BackupSucceeded,
            &t.target,
            &format!("backup {name} of {} stored in vault {vault}", t.target),
        );
    }
    if let Some((vault, Some(info))) = usage
        && let Some(cap) = info.capacity
        && cap > 0
        && info.pack_bytes * 100 >= cap * u64::from(st.capacity_warn_percent)
    {
        raise(
            AlertKind::VaultCapacity,
            &vault,
            &format!(
                "vault {} holds {} of its {} byte limit ({}%)",
                vault,
                info.pack_bytes,
                cap,
                info.pack_bytes * 100 / cap
            ),
        );
    }
}
