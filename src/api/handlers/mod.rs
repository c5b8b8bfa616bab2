//! Route handlers, one submodule per resource: input checks, calls into the
//! appliance, JSON out. Everything that touches the catalog, the file system or a vault
//! runs inside [`super::ApiState::run`] (the blocking boundary, with a pooled `App`);
//! only in-memory work (the task registry's counts, input parsing) stays on the async
//! side. This module holds what the submodules share (error helpers, JSON merge).

mod backups;
pub(crate) mod page;
mod policies;
mod resources;
mod tasks;
mod tokens;
mod vaults;

pub use backups::*;
pub use policies::*;
pub use resources::*;
pub use tasks::*;
pub use tokens::*;
pub use vaults::*;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, Caller, Shared};
use crate::app::RestoreRequest;
use crate::backup::BackupOptions;
use crate::catalog::Table;
use crate::chunk::ChunkSize;
use crate::config::AlertKind;
use crate::error::{Error, ErrorKind};
use crate::restore::ImageFormat;
use crate::service::{Policy, Resource, backup_resource, prune, resource_of};
use crate::task::TaskState;
use page::{Page, PageQuery, page_of};

type R<T> = Result<T, ApiError>;

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn body<T: serde::de::DeserializeOwned>(v: Value) -> R<T> {
    serde_json::from_value(v).map_err(|e| bad(format!("bad request body: {e}")))
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
