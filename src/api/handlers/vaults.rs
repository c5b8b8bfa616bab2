//! Vault routes: list, create or attach, show, change, forget.

use super::*;
use crate::api::schema::{NewVault, PatchVault};

// ---- vaults ----

/// Vaults with their usage as last computed (`usage_computed_at`); no pack directory is
/// listed here.
pub async fn list_vaults(
    State(st): State<Shared>,
    uri: Uri,
    Query(q): Query<PageQuery>,
) -> R<Response> {
    let page = page_of(q)?;
    st.run(move |_, app| {
        let all = app.catalog().vaults()?;
        let mut out = Vec::new();
        for v in page.slice(&all) {
            out.push(serde_json::to_value(app.vault_info_cached(&v.name)?).unwrap_or_default());
        }
        Ok(page.headers(&uri, all.len(), Json(out).into_response()))
    })
    .await
}

pub async fn create_vault(
    State(st): State<Shared>,
    Json(v): Json<Value>,
) -> R<(StatusCode, Json<Value>)> {
    let v: NewVault = body(v)?;
    crate::name::Name::parse(&v.name, "vault")?;
    let path = v.path.as_ref().map(PathBuf::from);
    if let Some(p) = &path
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
        app.create_vault_with(&v.name, path.as_deref(), cs, zstd, v.compliance_days, None)?;
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
    // Only the capacity changes: bytes, or null (or left out) for no limit.
    let cap = body::<PatchVault>(v)?.capacity;
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
