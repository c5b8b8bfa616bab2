//! Route handlers: input checks, calls into the appliance, JSON out. Everything that
//! touches the catalog, the file system or a vault runs inside [`super::ApiState::run`]
//! (the blocking boundary, with a pooled `App`); only in-memory work (the task
//! registry's counts, input parsing) stays on the async side.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, Caller, Shared};
use crate::app::RestoreRequest;
use crate::backup::BackupOptions;
use crate::catalog::{Role, Table};
use crate::chunk::ChunkSize;
use crate::config::AlertKind;
use crate::error::{Error, ErrorKind};
use crate::restore::ImageFormat;
use crate::service::{Policy, Resource, backup_resource, prune, resource_of};
use crate::task::TaskState;

type R<T> = Result<T, ApiError>;

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn body<T: serde::de::DeserializeOwned>(v: Value) -> R<T> {
    serde_json::from_value(v).map_err(|e| bad(format!("bad request body: {e}")))
}

/// Health: counts from the task registry's memory; no SQL, no file system, so its cost
/// does not grow with the task history.
pub async fn health(State(st): State<Shared>) -> R<Json<Value>> {
    let (queued, running) = st.tasks.counts();
    Ok(Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "tasks_running": running,
        "tasks_queued": queued,
        "alerts": st.alerts.stats(),
    })))
}

// ---- vaults ----

/// Vaults with their usage as last computed (`usage_computed_at`); no pack directory is
/// listed here.
pub async fn list_vaults(State(st): State<Shared>) -> R<Json<Value>> {
    st.run(|_, app| {
        let mut out = Vec::new();
        for v in app.catalog().vaults()? {
            out.push(serde_json::to_value(app.vault_info_cached(&v.name)?).unwrap_or_default());
        }
        Ok(Json(Value::Array(out)))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewVault {
    name: String,
    path: Option<PathBuf>,
    chunk_size: Option<String>,
    zstd_level: Option<i32>,
    capacity: Option<u64>,
    /// Compliance mode: every backup locked at least this many days (fixed for life).
    compliance_days: Option<u32>,
}

pub async fn create_vault(
    State(st): State<Shared>,
    Json(v): Json<Value>,
) -> R<(StatusCode, Json<Value>)> {
    let v: NewVault = body(v)?;
    crate::name::Name::parse(&v.name, "vault")?;
    if let Some(p) = &v.path
        && !p.is_absolute()
    {
        return Err(bad(format!(
            "vault {}: path {:?} must be absolute (or leave it out for <data>/vaults/{})",
            v.name,
            p.display(),
            v.name
        )));
    }
    let cs = match &v.chunk_size {
        Some(c) => ChunkSize::parse(c)?,
        None => ChunkSize::new(crate::chunk::DEFAULT_CHUNK_SIZE)?,
    };
    st.run(move |_, app| {
        let zstd = v.zstd_level.unwrap_or(1);
        app.create_vault_with(
            &v.name,
            v.path.as_deref(),
            cs,
            zstd,
            v.compliance_days,
            None,
        )?;
        if v.capacity.is_some() {
            app.set_capacity(&v.name, v.capacity)?;
        }
        let info = app.vault_info(&v.name)?;
        Ok((
            StatusCode::CREATED,
            Json(serde_json::to_value(info).unwrap_or_default()),
        ))
    })
    .await
}

pub async fn get_vault(State(st): State<Shared>, Path(name): Path<String>) -> R<Json<Value>> {
    st.run(move |_, app| {
        let info = app.vault_info_cached(&name)?;
        Ok(Json(serde_json::to_value(info).unwrap_or_default()))
    })
    .await
}

pub async fn patch_vault(
    State(st): State<Shared>,
    Path(name): Path<String>,
    Json(v): Json<Value>,
) -> R<Json<Value>> {
    let obj = v.as_object().ok_or_else(|| bad("expected a JSON object"))?;
    if obj.keys().any(|k| k != "capacity") {
        return Err(bad("only \"capacity\" (bytes or null) can be changed"));
    }
    let cap = match obj.get("capacity") {
        Some(Value::Null) | None => None,
        Some(c) => Some(
            c.as_u64()
                .ok_or_else(|| bad("capacity must be bytes or null"))?,
        ),
    };
    st.run(move |_, app| {
        app.set_capacity(&name, cap)?;
        Ok(Json(
            serde_json::to_value(app.vault_info_cached(&name)?).unwrap_or_default(),
        ))
    })
    .await
}

pub async fn delete_vault(State(st): State<Shared>, Path(name): Path<String>) -> R<Json<Value>> {
    st.run(move |_, app| {
        app.forget_vault(&name)?;
        Ok(Json(
            json!({"forgotten": name, "note": "the vault's files were not deleted"}),
        ))
    })
    .await
}

// ---- resources ----

/// A resource as the API shows it: its settings plus `last_drill` (its latest backup
/// drill's `verified_boot`, or null).
fn resource_view(app: &crate::app::App, r: &Resource) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    v["last_drill"] = json!(app.catalog().last_drill_of_resource(&r.name).ok().flatten());
    v
}

pub async fn list_resources(State(st): State<Shared>) -> R<Json<Vec<Value>>> {
    st.run(|_, app| {
        let rs: Vec<Resource> = app.catalog().list_named(Table::Resources)?;
        Ok(Json(rs.iter().map(|r| resource_view(app, r)).collect()))
    })
    .await
}

/// Every host path, socket and NBD server `r` names must be allowed (`[paths]`; see
/// `confine`); checked before anything is opened.
fn confine_resource(st: &super::ApiState, r: &Resource) -> R<()> {
    for (i, s) in r.sources.iter().enumerate() {
        let (_, spec) = crate::service::named_disk(i, s);
        st.confine.check_source(&spec)?;
    }
    if let Some(q) = &r.qga {
        st.confine.check_qga(q)?;
    }
    Ok(())
}

pub async fn create_resource(
    State(st): State<Shared>,
    Json(v): Json<Value>,
) -> R<(StatusCode, Json<Resource>)> {
    let r: Resource = body(v)?;
    st.run(move |st, app| {
        crate::name::Name::parse(&r.name, "resource")?;
        confine_resource(st, &r)?;
        r.validate(app)?;
        app.catalog()
            .put_named(Table::Resources, &r.name, &r, true)?;
        Ok((StatusCode::CREATED, Json(r)))
    })
    .await
}

pub async fn get_resource(State(st): State<Shared>, Path(name): Path<String>) -> R<Json<Value>> {
    st.run(move |_, app| Ok(Json(resource_view(app, &resource_of(app, &name)?))))
        .await
}

/// Merge a JSON patch object into `current` (top-level keys; `name` cannot change).
fn merge<T: serde::Serialize + serde::de::DeserializeOwned>(current: &T, patch: Value) -> R<T> {
    let mut v = serde_json::to_value(current).map_err(|e| bad(e.to_string()))?;
    let p = patch
        .as_object()
        .ok_or_else(|| bad("expected a JSON object"))?;
    if p.get("name").is_some_and(|n| Some(n) != v.get("name")) {
        return Err(bad("the name cannot be changed"));
    }
    for (k, val) in p {
        v[k] = val.clone();
    }
    body(v)
}

pub async fn patch_resource(
    State(st): State<Shared>,
    Path(name): Path<String>,
    Json(p): Json<Value>,
) -> R<Json<Resource>> {
    st.run(move |st, app| {
        let r: Resource = merge(&resource_of(app, &name)?, p)?;
        confine_resource(st, &r)?;
        r.validate(app)?;
        app.catalog()
            .put_named(Table::Resources, &name, &r, false)?;
        Ok(Json(r))
    })
    .await
}

pub async fn delete_resource(State(st): State<Shared>, Path(name): Path<String>) -> R<Json<Value>> {
    st.run(move |_, app| {
        let users: Vec<String> = app
            .catalog()
            .list_named::<Policy>(Table::Policies)?
            .into_iter()
            .filter(|p| p.resources.contains(&name))
            .map(|p| p.name)
            .collect();
        if !users.is_empty() {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("resource {name} is used by policies {}", users.join(", ")),
            ));
        }
        app.catalog().delete_named(Table::Resources, &name)?;
        Ok(Json(json!({"deleted": name})))
    })
    .await
}

// ---- backups ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBackup {
    resource: String,
    name: Option<String>,
}

pub async fn create_backup(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Json(v): Json<Value>,
) -> R<(StatusCode, Json<Value>)> {
    let b: NewBackup = body(v)?;
    let wanted = b.resource.clone();
    // A resource saved before `[paths]` was tightened is checked again here.
    let res = st
        .run(move |st, app| {
            let res = resource_of(app, &wanted)?;
            confine_resource(st, &res)?;
            Ok(res)
        })
        .await?;
    let data = st.data.clone();
    let name = b.name.clone();
    let target = res.name.clone();
    let id = st.tasks.submit(
        "backup",
        &target,
        Some(target.clone()),
        &caller.0.name,
        Box::new(move |ctx| {
            let opts = BackupOptions {
                name,
                cancel: Some(Arc::clone(&ctx.cancel)),
                progress: Some(Arc::clone(&ctx.progress)),
                ..Default::default()
            };
            ctx.log(format!("backing up {}", res.name));
            let m = backup_resource(&data, &res, &opts)?;
            ctx.log(format!("backup {} ({}) done", m.name, m.id));
            Ok(json!({"backup": m.id, "name": m.name, "bytes_stored": m.bytes_stored()}))
        }),
    )?;
    Ok((StatusCode::ACCEPTED, Json(json!({"task": id}))))
}

/// `GET /backups`: ids from SQL, each backup's view from [`super::ApiState::backup_view_text`]
/// (manifests are parsed once per backup, not once per request).
pub async fn list_backups(
    State(st): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> R<Response> {
    st.run(move |st, app| {
        let ids = app.catalog().backup_ids(
            q.get("vault").map(String::as_str),
            q.get("resource").map(String::as_str),
        )?;
        let mut body = String::with_capacity(ids.len() * 1536 + 2);
        body.push('[');
        for (id, protected) in &ids {
            let text = match st.backup_view_text(app, id, *protected) {
                Ok(t) => t,
                // Deleted since the ids were read.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            if body.len() > 1 {
                body.push(',');
            }
            body.push_str(&text);
        }
        body.push(']');
        Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
    })
    .await
}

/// `GET /backups/{id}`: an id, a unique id prefix, a name, or `latest?disk=ID`. The
/// bytes only this backup holds come from the catalog's cache with their age; a stale
/// figure is served as such (`bytes_freed_stale`) while a refresh is queued. Only a
/// backup that never had a figure (the cache is new) is computed here, once.
pub async fn get_backup(
    State(st): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> R<Json<Value>> {
    st.run(move |st, app| {
        let entry = app.resolve_backup(&id, q.get("disk").map(String::as_str))?;
        let (v, fresh) = app.backup_detail_cached(&entry)?;
        if fresh == crate::app::Freshness::Fresh {
            return Ok(Json(v));
        }
        if v["bytes_freed_if_deleted"].is_null() {
            return Ok(Json(app.backup_detail(&entry)?));
        }
        st.figures.request(Some(&entry.vault));
        Ok(Json(v))
    })
    .await
}

pub async fn delete_backup(State(st): State<Shared>, Path(id): Path<String>) -> R<Json<Value>> {
    st.run(move |st, app| {
        let entry = app.find_backup(&id)?;
        let m = app.delete_backup(&entry.manifest.id)?;
        st.figures.request(Some(&entry.vault));
        Ok(Json(json!({"deleted": m.id, "name": m.name})))
    })
    .await
}

pub async fn create_restore(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Json(v): Json<Value>,
) -> R<(StatusCode, Json<Value>)> {
    let r: RestoreRequest = body(v)?;
    // Refuse a bad request now, not in the task: resolve `latest` and id prefixes,
    // and the image format from the target's extension.
    let (r, entry) = st
        .run(move |st, app| {
            if r.overwrite && caller.0.role < crate::catalog::Role::Admin {
                return Err(ApiError(
                    StatusCode::FORBIDDEN,
                    "overwrite replaces a host file: only an admin token may ask for it".into(),
                ));
            }
            if let Some(tls) = &r.nbd_tls {
                st.confine.check_nbd_tls(tls)?;
            }
            st.confine.check_target(&r.to, r.overwrite)?;
            let r = app.resolve_restore(&r)?;
            if let Some(f) = &r.format {
                f.parse::<ImageFormat>()?;
            }
            let entry = app.find_backup(&r.backup)?;
            Ok((r, entry))
        })
        .await?;
    let data = st.data.clone();
    let target = entry.manifest.id.clone();
    let id = st.tasks.submit(
        "restore",
        &target,
        None,
        &caller.0.name,
        Box::new(move |ctx| {
            let app = crate::app::App::open(&data)?;
            let opts = BackupOptions {
                cancel: Some(Arc::clone(&ctx.cancel)),
                progress: Some(Arc::clone(&ctx.progress)),
                ..Default::default()
            };
            ctx.log(format!("restoring {} to {}", entry.manifest.id, r.to));
            let t = std::time::Instant::now();
            let req = RestoreRequest {
                backup: entry.manifest.id.clone(),
                ..r
            };
            let outcome = app.run_restore(&req, &opts)?;
            // keep_going: the image is kept, the task still fails (like the CLI's exit 1).
            let bad = outcome.bad_ranges();
            if !bad.is_empty() {
                for (to, r) in &bad {
                    ctx.log(format!(
                        "{}: offset {} length {} left as zeros: {}",
                        to.display(),
                        r.offset,
                        r.length,
                        r.error
                    ));
                }
                return Err(Error::corrupt(format!(
                    "{} unreadable range(s) were left as zeros; the image is kept (see the task log)",
                    bad.len()
                )));
            }
            let mut v = serde_json::to_value(outcome)
                .map_err(|e| Error::invalid("restore outcome").with_source(e))?;
            v["backup"] = json!(entry.manifest.id);
            v["seconds"] = json!(t.elapsed().as_secs_f64());
            Ok(v)
        }),
    )?;
    Ok((StatusCode::ACCEPTED, Json(json!({"task": id}))))
}

// ---- policies ----

pub async fn list_policies(State(st): State<Shared>) -> R<Json<Vec<Policy>>> {
    st.run(|_, app| Ok(Json(app.catalog().list_named(Table::Policies)?)))
        .await
}

pub async fn create_policy(
    State(st): State<Shared>,
    Json(v): Json<Value>,
) -> R<(StatusCode, Json<Policy>)> {
    let p: Policy = body(v)?;
    st.run(move |_, app| {
        crate::name::Name::parse(&p.name, "policy")?;
        p.validate(app)?;
        app.catalog()
            .put_named(Table::Policies, &p.name, &p, true)?;
        Ok((StatusCode::CREATED, Json(p)))
    })
    .await
}

pub async fn get_policy(State(st): State<Shared>, Path(name): Path<String>) -> R<Json<Policy>> {
    st.run(move |_, app| Ok(Json(app.catalog().get_named(Table::Policies, &name)?)))
        .await
}

pub async fn patch_policy(
    State(st): State<Shared>,
    Path(name): Path<String>,
    Json(p): Json<Value>,
) -> R<Json<Policy>> {
    st.run(move |_, app| {
        let cur: Policy = app.catalog().get_named(Table::Policies, &name)?;
        let p: Policy = merge(&cur, p)?;
        p.validate(app)?;
        app.catalog().put_named(Table::Policies, &name, &p, false)?;
        Ok(Json(p))
    })
    .await
}

pub async fn delete_policy(State(st): State<Shared>, Path(name): Path<String>) -> R<Json<Value>> {
    st.run(move |_, app| {
        app.catalog().delete_named(Table::Policies, &name)?;
        Ok(Json(json!({"deleted": name})))
    })
    .await
}

pub async fn preview_policy(State(st): State<Shared>, Path(name): Path<String>) -> R<Json<Value>> {
    st.run(move |_, app| {
        let p: Policy = app.catalog().get_named(Table::Policies, &name)?;
        if p.kind == crate::service::PolicyKind::Replicate {
            return Err(crate::Error::unsupported(format!(
                "policy {name} is a {} policy: preview shows what a backup policy's retention would delete; a replication applies its retention on the target when it runs",
                p.kind.as_str()
            ))
            .into());
        }
        let mut out = serde_json::Map::new();
        for r in &p.resources {
            let res = resource_of(app, r)?;
            let d = prune(app, &res, &p.retention, false)?;
            let delete: Vec<&str> = d
                .iter()
                .filter(|d| !d.keep)
                .map(|d| d.id.as_str())
                .collect();
            out.insert(r.clone(), json!({"delete": delete, "decisions": d}));
        }
        Ok(Json(Value::Object(out)))
    })
    .await
}

pub async fn run_policy(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> R<(StatusCode, Json<Value>)> {
    st.run(move |st, app| {
        let p: Policy = app.catalog().get_named(Table::Policies, &name)?;
        let ids = crate::scheduler::run_policy(&st.data, &st.tasks, &p, &caller.0.name)?;
        Ok((StatusCode::ACCEPTED, Json(json!({"tasks": ids}))))
    })
    .await
}

// ---- tasks, audit, alerts, tokens ----

pub async fn list_tasks(
    State(st): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> R<Json<Value>> {
    let state = match q.get("state") {
        None => None,
        Some(s) => Some(
            serde_json::from_value::<TaskState>(json!(s))
                .map_err(|_| bad(format!("unknown task state {s:?}")))?,
        ),
    };
    st.run(move |st, _| {
        Ok(Json(
            serde_json::to_value(st.tasks.list(state)?).unwrap_or_default(),
        ))
    })
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

pub async fn audit(State(st): State<Shared>) -> R<Json<Value>> {
    st.run(|st, app| {
        st.flush_audit();
        Ok(Json(
            serde_json::to_value(app.catalog().audit_log(1000)?).unwrap_or_default(),
        ))
    })
    .await
}

pub async fn alerts(State(st): State<Shared>) -> R<([(&'static str, String); 1], Json<Value>)> {
    // Webhook deliveries dropped by a full queue (see crate::alerts).
    let dropped = st.alerts.stats().dropped.to_string();
    st.run(move |_, app| {
        Ok((
            [("blockvault-alerts-dropped", dropped)],
            Json(serde_json::to_value(app.catalog().alerts(1000)?).unwrap_or_default()),
        ))
    })
    .await
}

pub async fn list_tokens(State(st): State<Shared>) -> R<Json<Value>> {
    st.run(|_, app| {
        Ok(Json(
            serde_json::to_value(app.catalog().tokens()?).unwrap_or_default(),
        ))
    })
    .await
}

pub async fn create_token(
    State(st): State<Shared>,
    Json(v): Json<Value>,
) -> R<(StatusCode, Json<Value>)> {
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("a token needs a name"))?;
    let role: Role = v
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("a token needs a role"))?
        .parse()?;
    let expires = match v.get("expires") {
        None | Some(Value::Null) => None,
        Some(Value::String(e)) => Some(e.clone()),
        Some(_) => return Err(bad("expires is an RFC 3339 instant (2030-01-31T00:00:00Z)")),
    };
    let name = name.to_owned();
    let (info, secret) = st
        .run(move |_, app| {
            Ok(app
                .catalog()
                .create_token_until(&name, role, expires.as_deref())?)
        })
        .await?;
    let mut out = serde_json::to_value(info).unwrap_or_default();
    out["secret"] = json!(secret);
    Ok((StatusCode::CREATED, Json(out)))
}

pub async fn delete_token(State(st): State<Shared>, Path(name): Path<String>) -> R<Json<Value>> {
    st.run(move |_, app| {
        if !app.catalog().delete_token(&name)? {
            return Err(Error::not_found(format!("no token named {name:?}")).into());
        }
        Ok(Json(json!({"deleted": name})))
    })
    .await
}

/// Raise the alerts a finished task calls for, chosen by the failure's kind (never by
/// its message). Runs on its own thread (see `run_appliance`), not on the runtime.
pub fn alerts_for(st: &Shared, t: &crate::task::TaskInfo) {
    if t.state != TaskState::Failed && t.state != TaskState::Succeeded {
        return;
    }
    let err = t.error.clone().unwrap_or_default();
    let raise = |k: AlertKind, subject: &str, msg: &str| {
        if let Err(e) = st.alerts.raise(k, subject, msg) {
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
    if t.kind == "backup" {
        // Capacity warning for the resource's vault (usage as recorded by the backup).
        let usage = st.apps.get().ok().and_then(|app| {
            let res = resource_of(&app, &t.target).ok()?;
            let info = app.vault_info_cached(&res.vault).ok()?;
            Some((res.vault, info))
        });
        if let Some((vault, info)) = usage
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
}
