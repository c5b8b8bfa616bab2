//! Backup and restore routes: start a backup, list, show, delete, restore.

use super::*;
use crate::api::schema::NewBackup;

// ---- backups ----

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

/// `GET /backups?vault=&resource=&limit=&offset=`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupsQuery {
    vault: Option<String>,
    resource: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

/// `GET /backups/{id}?disk=`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupQuery {
    disk: Option<String>,
}

/// `GET /backups`: ids from SQL, each backup's view from [`super::ApiState::backup_view_text`]
/// (manifests are parsed once per backup, not once per request).
pub async fn list_backups(
    State(st): State<Shared>,
    uri: Uri,
    Query(q): Query<BackupsQuery>,
) -> R<Response> {
    let page = Page::new(q.limit, q.offset)?;
    st.run(move |st, app| {
        let ids = app
            .catalog()
            .backup_ids(q.vault.as_deref(), q.resource.as_deref())?;
        // Only this page's views are rendered: the ids are cheap, the views are not.
        let shown = page.slice(&ids);
        let mut body = String::with_capacity(shown.len() * 1536 + 2);
        body.push('[');
        for state in shown {
            let text = match st.backup_view_text(app, state) {
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
        let resp = ([(header::CONTENT_TYPE, "application/json")], body).into_response();
        Ok(page.headers(&uri, ids.len(), resp))
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
    Query(q): Query<BackupQuery>,
) -> R<Json<Value>> {
    st.run(move |st, app| {
        let entry = app.resolve_backup(&id, q.disk.as_deref())?;
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
