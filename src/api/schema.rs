//! Shapes of the API's requests and answers that have no home in the core: the
//! answers handlers build by hand (`{"task": ID}`, `{"deleted": NAME}`, a backup's view)
//! and the error body. They exist for the OpenAPI document (`openapi`); their field
//! names are the ones the handlers send. The request bodies here are the types the
//! handlers read (`deny_unknown_fields`: an unknown field is refused, naming it), so
//! the document and the check cannot drift apart.

#![allow(dead_code)]

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every 4xx/5xx answer: `{"error": {"kind", "message"}}`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// The failure's class (`not_found`, `conflict`, `config`, …).
    pub kind: String,
    /// What failed, where, and what to do.
    pub message: String,
}

/// `202`: the long work was queued as this task (`GET /tasks/{id}`).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct TaskAccepted {
    pub task: String,
}

/// `202`: a policy run queued these tasks.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct TasksAccepted {
    pub tasks: Vec<String>,
}

/// A resource, policy or token deleted: its name.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Deleted {
    pub deleted: String,
}

/// A backup deleted: its id and name.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct DeletedBackup {
    pub deleted: String,
    pub name: String,
}

/// A vault forgotten (its files stay).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Forgotten {
    pub forgotten: String,
    pub note: String,
}

/// `GET /health`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`; without a token this is the only field.
    pub status: String,
    pub version: Option<String>,
    pub tasks_running: Option<u64>,
    pub tasks_queued: Option<u64>,
    /// Webhook delivery figures.
    #[schema(value_type = Option<Object>)]
    pub alerts: Option<serde_json::Value>,
}

/// `GET /whoami`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    pub name: String,
    pub role: crate::catalog::Role,
}

/// `GET /schedules/next`: fire times (UTC, RFC 3339).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct NextRuns {
    pub cron: String,
    pub next: Vec<String>,
}

/// `PATCH /vaults/{name}`.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchVault {
    /// Bytes, or null for no limit.
    pub capacity: Option<u64>,
}

/// `POST /vaults`.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewVault {
    pub name: String,
    /// Absolute; default `<data>/vaults/NAME`.
    pub path: Option<String>,
    /// `16K` to `4M`, power of two (default 64K).
    pub chunk_size: Option<String>,
    pub zstd_level: Option<i32>,
    pub capacity: Option<u64>,
    /// Compliance mode: every backup locked at least this many days (fixed for life).
    pub compliance_days: Option<u32>,
}

/// `POST /backups`.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewBackup {
    pub resource: String,
    pub name: Option<String>,
}

/// `POST /tokens`.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    pub name: String,
    pub role: crate::catalog::Role,
    /// RFC 3339 instant after which the token is refused.
    pub expires: Option<String>,
}

/// `201` of `POST /tokens`: the token and its secret (shown this once).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    pub id: String,
    pub name: String,
    pub role: crate::catalog::Role,
    pub created: String,
    pub expires: Option<String>,
    pub last_used: Option<String>,
    pub secret: String,
}

/// `POST /backups/{id}/protect`.
#[derive(Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ProtectBody {
    /// Default true.
    pub protected: Option<bool>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Protected {
    pub id: String,
    pub protected: bool,
}

/// `POST /backups/{id}/lock`.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LockBody {
    /// `YYYY-MM-DD` or an RFC 3339 time; never earlier than the backup's lock.
    pub until: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Locked {
    pub id: String,
    pub name: String,
    pub locked_until: Option<String>,
    pub lock_reason: Option<String>,
}

/// A backup as listed (`GET /backups`); `GET /backups/{id}` adds the bytes only it holds.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct BackupView {
    pub id: String,
    pub name: String,
    pub vault: String,
    pub resource: String,
    pub disk_id: String,
    pub resource_kind: crate::manifest::ResourceKind,
    /// RFC 3339.
    pub created: String,
    pub logical_size: u64,
    pub bytes_allocated: u64,
    pub bytes_read: u64,
    pub bytes_new: u64,
    pub bytes_stored: u64,
    pub chunks_total: u64,
    pub chunks_read: u64,
    pub chunks_new: u64,
    /// `full` or `incremental` (first disk).
    pub kind: Option<String>,
    /// Change tracking used (first disk).
    pub strategy: Option<String>,
    pub format: Option<String>,
    pub reader: Option<String>,
    pub encryption: Option<String>,
    pub parent: Option<String>,
    pub note: Option<String>,
    pub seconds: Option<f64>,
    pub protected: bool,
    /// The last drill's verdict, or null.
    #[schema(value_type = Option<Object>)]
    pub verified_boot: Option<serde_json::Value>,
    /// How the instant was captured (servers).
    #[schema(value_type = Option<Object>)]
    pub capture: Option<serde_json::Value>,
    /// Per disk: its index root, sizes, strategy.
    #[schema(value_type = Vec<Object>)]
    pub disks: Vec<serde_json::Value>,
}

/// `GET /backups/{id}/files`: the disk's partitions and, with `path`, that directory.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct FileListing {
    pub backup: String,
    pub disk: String,
    pub scheme: Option<String>,
    #[schema(value_type = Vec<Object>)]
    pub partitions: Vec<serde_json::Value>,
    pub path: Option<String>,
    #[schema(value_type = Option<Vec<Object>>)]
    pub entries: Option<Vec<serde_json::Value>>,
}

/// `POST /policies/{name}/preview`: per resource, what retention would delete now.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct RetentionPreview {
    /// Backup ids retention would delete.
    pub delete: Vec<String>,
    /// Every backup with keep or delete and why.
    #[schema(value_type = Vec<Object>)]
    pub decisions: Vec<serde_json::Value>,
}

/// `GET /openapi.json`: this document.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct OpenApiDocument {
    pub openapi: String,
    #[schema(value_type = Object)]
    pub info: serde_json::Value,
    #[schema(value_type = Object)]
    pub paths: serde_json::Value,
    #[schema(value_type = Object)]
    pub components: serde_json::Value,
}

/// `PATCH /resources/{name}`: the fields to change (the name cannot change).
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(value_type = Object)]
pub struct ResourcePatch(serde_json::Value);

/// `PATCH /policies/{name}`: the fields to change (the name cannot change).
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(value_type = Object)]
pub struct PolicyPatch(serde_json::Value);

/// A JSON object whose fields are described by its route's summary (instant access,
/// mirror-vault and webhook answers; not yet typed).
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(value_type = Object)]
pub struct LooseObject(serde_json::Value);

/// A JSON array of objects (not paginated).
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(value_type = Vec<Object>)]
pub struct LooseList(serde_json::Value);
