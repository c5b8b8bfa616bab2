//! Handler of `POST /replications` (`202 {"task": ID}`): a one-off replication as a
//! task, into another vault of this appliance (`"to"`) or a mirror vault on another
//! appliance named by its `[remote.NAME]` in the config file (`"to_remote"`; a URL or
//! token in the body is an unknown field, refused). Thin glue: the work and its checks are in
//! [`crate::service`] ([`submit_replicate`]). Replication policies go through the policy
//! routes (`kind: "replicate"`).

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{ApiError, Caller, Shared};
use crate::service::{ReplicateRequest, submit_replicate};

/// `POST /replications` `{"from", "to" | "to_remote", "backup"?, "resources"?}`.
pub async fn create_replication(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Json(v): Json<Value>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: ReplicateRequest = serde_json::from_value(v)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))?;
    let task = st
        .run(move |st, app| {
            Ok(submit_replicate(
                app,
                &st.tasks,
                &st.data,
                req,
                None,
                &caller.0.name,
            )?)
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"task": task}))))
}
