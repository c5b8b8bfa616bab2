//! Protection and retention locks over the API: `POST /backups/{id}/protect` and
//! `POST /backups/{id}/lock` (recorded in the vault's lock journal, see
//! `vault::retention`; the caller's token name is the journal's actor).

use axum::Json;
use axum::extract::{Extension, Path, State};
use serde_json::{Value, json};

use super::schema::{LockBody, ProtectBody};
use super::{ApiError, Caller, Shared};
use crate::vault::retention::{format_time, parse_until};

type R<T> = Result<T, ApiError>;

/// `POST /backups/{id}/protect` `{"protected": bool}` (default true).
pub async fn protect_backup(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body_v: Option<Json<Value>>,
) -> R<Json<Value>> {
    // No body, `null` or `{}`: protect. A field it does not know (or `"protected":
    // "yes"`) is refused, never read as true.
    let protect = match body_v {
        Some(Json(Value::Null)) | None => ProtectBody::default(),
        Some(Json(v)) => serde_json::from_value(v)
            .map_err(|e| ApiError::bad_request(format!("bad request body: {e}")))?,
    }
    .protected
    .unwrap_or(true);
    let actor = format!("token {}", caller.0.name);
    st.run(move |_, app| {
        let entry = app.set_protected(&id, protect, &actor)?;
        Ok(Json(json!({"id": entry.manifest.id, "protected": protect})))
    })
    .await
}

/// `POST /backups/{id}/lock` `{"until": "YYYY-MM-DD" | RFC 3339}`: lock or extend; an
/// earlier date than the backup's lock is refused with 409.
pub async fn lock_backup(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Json(v): Json<Value>,
) -> R<Json<Value>> {
    let body: LockBody = serde_json::from_value(v).map_err(|e| {
        ApiError::bad_request(format!(
            "bad request body: {e} (give {{\"until\": \"YYYY-MM-DD\" or an RFC 3339 time}})"
        ))
    })?;
    let until = parse_until(&body.until)?;
    let actor = format!("token {}", caller.0.name);
    st.run(move |_, app| {
        let (entry, lock) = app.lock_backup(&id, until, &actor)?;
        Ok(Json(json!({
            "id": entry.manifest.id,
            "name": entry.manifest.name,
            "locked_until": lock.until.map(format_time),
            "lock_reason": lock.reason,
        })))
    })
    .await
}
