//! Handler of `POST /backups/{id}/drill` (`202 {"task": ID}`): a recovery drill of a
//! backup as a task. `{id}` may be `latest` with `?disk=RESOURCE`. Thin glue: the work and
//! its checks are in [`crate::service`] ([`submit_drill`]); the backup and resource views
//! show the last drill (`verified_boot`, `last_drill`).

use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{ApiError, Caller, Shared};
use crate::service::{DrillRequest, submit_drill};

/// `?disk=`: with `latest` as id, the resource whose latest backup to drill.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillQuery {
    disk: Option<String>,
}

/// `POST /backups/{id}/drill` `{"check"?, "timeout_seconds"?, "accel"?, "memory_mib"?,
/// "bus"?, "cpu"?}`.
pub async fn drill_backup(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<DrillQuery>,
    v: Option<Json<Value>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: DrillRequest = match v {
        None | Some(Json(Value::Null)) => DrillRequest::default(),
        Some(Json(v)) => serde_json::from_value(v)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))?,
    };
    let task = st
        .run(move |st, app| {
            let backup = app.resolve_backup(&id, q.disk.as_deref())?;
            Ok(submit_drill(
                app,
                &st.tasks,
                &st.data,
                &backup.manifest.id,
                &req,
                &caller.0.name,
            )?)
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"task": task}))))
}

/// Largest screenshot served (a VGA screendump is a few hundred KiB at most).
const MAX_SCREENSHOT: u64 = 16 << 20;

/// `GET /backups/{id}/drill/screenshot`: the PNG the backup's last drill took of the
/// guest's screen. 404 when the backup was never drilled, its last drill took no PNG
/// (QEMU had ended, or wrote PPM) or the file was removed. Only a `.png` file under
/// `<data>/drills/` is served, whatever the catalog's record says.
pub async fn screenshot(
    State(st): State<Shared>,
    Path(id): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let bytes = st
        .run(move |_, app| {
            let entry = app.find_backup(&id)?;
            let none = || {
                crate::Error::not_found(format!(
                    "backup {} has no drill screenshot (drill it: POST /api/v1/backups/{}/drill)",
                    entry.manifest.id, entry.manifest.id
                ))
            };
            let rec = app
                .catalog()
                .last_drill(&entry.manifest.id)?
                .ok_or_else(none)?;
            let path = rec["screenshot"]
                .as_str()
                .map(std::path::PathBuf::from)
                .ok_or_else(none)?;
            let root = app.drills_dir();
            let (Ok(real), Ok(root)) = (path.canonicalize(), root.canonicalize()) else {
                return Err(none().into());
            };
            if !real.starts_with(&root) || real.extension().is_none_or(|e| e != "png") {
                return Err(none().into());
            }
            let meta = std::fs::metadata(&real)
                .map_err(|e| crate::Error::io(format!("reading {}", real.display()), e))?;
            if !meta.is_file() || meta.len() > MAX_SCREENSHOT {
                return Err(none().into());
            }
            std::fs::read(&real)
                .map_err(|e| crate::Error::io(format!("reading {}", real.display()), e).into())
        })
        .await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "image/png")], bytes).into_response())
}
