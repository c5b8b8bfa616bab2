//! The receiving side of a mirror vault: another appliance pushes backups here over the
//! HTTPS API (`replicate --to https://HOST:PORT/VAULT`; the client is
//! `replicate::remote`). Routes, all under `/api/v1/vaults/{name}/replica/`, for tokens
//! of the `replication` role (and admins), which may call nothing else:
//!
//! | route | body in | answer |
//! |---|---|---|
//! | `GET info` | — | `{"vault_id", "chunk_size", "key_check"}` (`TargetInfo`) |
//! | `POST missing` | `{"digests": [hex, …]}` (≤ [`MAX_ASK`]) | `{"missing": [hex, …]}` |
//! | `PUT blobs` | binary batch (`replicate::wire`, ≤ 32 MiB) | `{"blobs", "bytes_written"}` once durable |
//! | `POST manifest/present` | manifest JSON | `{"present": bool}` |
//! | `PUT manifest` | manifest JSON | `{"id"}` once published and in the catalog |
//! | `PUT manifest/sealed` | `{"manifest", "sealed": hex}` | `{"id"}`: an encrypted mirror stores the source's sealed form |
//! | `PUT encryption` | `[encryption]` of the source's vault.toml (wrappings, key check, `wrapped_for`) | `{"adopted": bool}` |
//!
//! Only vaults listed in the config file's `[server] mirror_vaults` accept these calls
//! (403 otherwise): a replication token cannot write into an appliance's own backup
//! vaults. Each blob is verified against its digest with the vault's codec before it is
//! kept (`VaultTarget::put_blobs`; one bad blob: the batch is refused, 422, nothing
//! kept); a manifest lands only when every blob it reaches is present
//! (`App::land_replica_manifest`, 409 otherwise). Calls are audited like all others.
//!
//! An encrypted source makes an empty mirror vault encrypted with its own key material
//! (`PUT encryption`; the vault key itself never leaves the source): the mirror opens
//! the vault without a key, keeps sealed blobs after checking their header, and stores
//! manifests sealed by the source (`PUT manifest/sealed`), publishing one when each of
//! its disks' index roots has landed (`App::land_sealed_replica_manifest`). Restoring
//! there needs the key.

use std::sync::RwLock;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{ApiError, Shared};
use crate::app::App;
use crate::chunk::ChunkDigest;
use crate::error::ErrorKind;
use crate::manifest::BackupManifest;
use crate::replicate::{ReplicaTarget, VaultTarget, wire};

/// Digests asked about in one `missing` call at most.
pub const MAX_ASK: usize = 16_384;

static MIRRORS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// The vaults that accept replication (`[server] mirror_vaults`).
pub fn configure(vaults: &[String]) {
    *MIRRORS.write().unwrap_or_else(|e| e.into_inner()) = vaults.to_vec();
}

/// A blob that does not verify is the sender's fault: 422, not 500.
fn refused(e: crate::Error) -> ApiError {
    match e.kind() {
        ErrorKind::Corrupt | ErrorKind::InvalidFormat => {
            ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
        }
        _ => e.into(),
    }
}

/// Mirror vault `name` opened as a target, or 403 when it is not one.
fn target(app: &App, name: &str) -> Result<VaultTarget, ApiError> {
    let listed = MIRRORS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|v| v == name);
    if !listed {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "vault {name} does not accept replication: list it in the config file's [server] mirror_vaults on this appliance and restart it"
            ),
        ));
    }
    // Opened without a key: an encrypted mirror never holds one.
    let vault = crate::vault::Vault::open(&app.catalog().vault(name)?.path)?;
    Ok(VaultTarget::new(vault)?)
}

/// `GET /vaults/{name}/replica/info`.
pub async fn info(
    State(st): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let i = st
        .run(move |_, app| Ok(target(app, &name)?.info()?))
        .await?;
    Ok(Json(json!({
        "vault_id": i.vault_id,
        "chunk_size": i.chunk_size.bytes(),
        "key_check": i.key_check,
    })))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ask {
    digests: Vec<ChunkDigest>,
}

/// `POST /vaults/{name}/replica/missing`.
pub async fn missing(
    State(st): State<Shared>,
    Path(name): Path<String>,
    Json(ask): Json<Ask>,
) -> Result<Json<Value>, ApiError> {
    if ask.digests.len() > MAX_ASK {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "{} digests asked at once; at most {MAX_ASK}",
                ask.digests.len()
            ),
        ));
    }
    let m = st
        .run(move |_, app| Ok(target(app, &name)?.missing(&ask.digests)?))
        .await?;
    Ok(Json(json!({"missing": m})))
}

/// `PUT /vaults/{name}/replica/blobs`.
pub async fn put_blobs(
    State(st): State<Shared>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let bytes = axum::body::to_bytes(body, wire::MAX_BODY)
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "blob batch unreadable or over {} bytes: {e}",
                    wire::MAX_BODY
                ),
            )
        })?;
    let (n, written) = st
        .run(move |_, app| {
            let blobs = wire::decode(&bytes).map_err(refused)?;
            let n = blobs.len();
            let t = target(app, &name)?;
            Ok((n, t.put_blobs(blobs).map_err(refused)?))
        })
        .await?;
    Ok(Json(json!({"blobs": n, "bytes_written": written})))
}

/// `POST /vaults/{name}/replica/manifest/present`.
pub async fn has_manifest(
    State(st): State<Shared>,
    Path(name): Path<String>,
    Json(m): Json<BackupManifest>,
) -> Result<Json<Value>, ApiError> {
    let p = st
        .run(move |_, app| Ok(target(app, &name)?.has_manifest(&m)?))
        .await?;
    Ok(Json(json!({"present": p})))
}

/// `PUT /vaults/{name}/replica/manifest`.
pub async fn put_manifest(
    State(st): State<Shared>,
    Path(name): Path<String>,
    Json(m): Json<BackupManifest>,
) -> Result<Json<Value>, ApiError> {
    let id = m.id.clone();
    st.run(move |_, app| {
        let t = target(app, &name)?;
        app.land_replica_manifest(&name, &t, &m).map_err(refused)
    })
    .await?;
    Ok(Json(json!({"id": id})))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedManifest {
    manifest: BackupManifest,
    /// The manifest as stored, sealed by the source (hex).
    sealed: String,
}

/// `PUT /vaults/{name}/replica/manifest/sealed`.
pub async fn put_sealed_manifest(
    State(st): State<Shared>,
    Path(name): Path<String>,
    Json(m): Json<SealedManifest>,
) -> Result<Json<Value>, ApiError> {
    let id = m.manifest.id.clone();
    let sealed = hex::decode(&m.sealed).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("\"sealed\" is not hex: {e}"),
        )
    })?;
    st.run(move |_, app| {
        let t = target(app, &name)?;
        app.land_sealed_replica_manifest(&name, &t, &m.manifest, &sealed)
            .map_err(refused)
    })
    .await?;
    Ok(Json(json!({"id": id})))
}

/// `PUT /vaults/{name}/replica/encryption`.
pub async fn put_encryption(
    State(st): State<Shared>,
    Path(name): Path<String>,
    Json(enc): Json<crate::vault::keys::EncryptionConfig>,
) -> Result<Json<Value>, ApiError> {
    let adopted = st
        .run(move |_, app| {
            // Only a vault listed as a mirror vault.
            drop(target(app, &name)?);
            let mut vault = crate::vault::Vault::open(&app.catalog().vault(&name)?.path)?;
            Ok(vault.adopt_encryption(&enc)?)
        })
        .await?;
    Ok(Json(json!({"adopted": adopted})))
}
