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

/// `POST /backups/{id}/drill` `{"check"?, "timeout_seconds"?, "accel"?, "memory_mib"?,
/// "bus"?, "cpu"?}`.
pub async fn drill_backup(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    v: Option<Json<Value>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: DrillRequest = match v {
        None | Some(Json(Value::Null)) => DrillRequest::default(),
        Some(Json(v)) => serde_json::from_value(v)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))?,
    };
    let task = st
        .run(move |st, app| {
            let backup = app.resolve_backup(&id, q.get("disk").map(String::as_str))?;
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
