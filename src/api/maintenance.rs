//! Handlers of the maintenance routes: verify and GC of a vault as tasks
//! (`POST /vaults/{name}/verify`, `POST /vaults/{name}/gc`, both `202 {"task": ID}`),
//! and the alert hook for what those tasks find. Thin glue: the work and its checks are
//! in [`crate::service`] ([`submit_verify`], [`submit_gc`], [`maintenance_alert`]).

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{ApiError, Caller, Shared};
use crate::alerts::Alerter;
use crate::service::{GcRequest, VerifyRequest, maintenance_alert, submit_gc, submit_verify};
use crate::task::Hook;

type R<T> = Result<T, ApiError>;

/// An optional JSON body as `T` (no body: `T::default()`).
fn body_or_default<T: serde::de::DeserializeOwned + Default>(v: Option<Json<Value>>) -> R<T> {
    match v {
        None | Some(Json(Value::Null)) => Ok(T::default()),
        Some(Json(v)) => serde_json::from_value(v)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad request body: {e}"))),
    }
}

/// `POST /vaults/{name}/verify` `{"sample": PERCENT?, "backups": [IDS]?, "rate_mb_s": N?}`.
pub async fn verify_vault(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    v: Option<Json<Value>>,
) -> R<(StatusCode, Json<Value>)> {
    let req: VerifyRequest = body_or_default(v)?;
    let id = st
        .run(move |st, app| {
            Ok(submit_verify(
                app,
                &st.tasks,
                &st.data,
                &name,
                req,
                &caller.0.name,
            )?)
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"task": id}))))
}

/// `POST /vaults/{name}/gc` `{"repack_below": PERCENT?}`.
pub async fn gc_vault(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    v: Option<Json<Value>>,
) -> R<(StatusCode, Json<Value>)> {
    let req: GcRequest = body_or_default(v)?;
    let id = st
        .run(move |st, app| {
            Ok(submit_gc(
                app,
                &st.tasks,
                &st.data,
                &name,
                req,
                &caller.0.name,
            )?)
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"task": id}))))
}

/// Raises `vault_damaged` when a verify task (from the API or the scheduler) found damage.
pub fn alert_hook(alerts: Alerter) -> Hook {
    std::sync::Arc::new(move |t| {
        if let Some((kind, subject, message, details)) = maintenance_alert(t) {
            let alerts = alerts.clone();
            // Alerts open the catalog and talk to webhooks: off the worker's path.
            std::thread::spawn(move || {
                if let Err(e) = alerts.raise_with(kind, &subject, &message, &details) {
                    tracing::error!("raising an alert: {e}");
                }
            });
        }
    })
}
