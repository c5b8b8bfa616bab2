//! Token routes (admin only): list, create (the secret is shown once), delete.

use super::*;
use crate::api::schema::NewToken;

pub async fn list_tokens(
    State(st): State<Shared>,
    uri: Uri,
    Query(q): Query<PageQuery>,
) -> R<Response> {
    let page = page_of(q)?;
    st.run(move |_, app| Ok(page.answer(&uri, &app.catalog().tokens()?)))
        .await
}

pub async fn create_token(
    State(st): State<Shared>,
    Json(v): Json<Value>,
) -> R<(StatusCode, Json<Value>)> {
    let t: NewToken = body(v)?;
    let (name, role, expires) = (t.name, t.role, t.expires);
    let (info, secret) = st
        .run(move |_, app| {
            Ok(app
                .catalog()
                .create_token_until(&name, role, expires.as_deref())?)
        })
        .await?;
    let mut out = serde_json::to_value(info).unwrap_or_default();
    out["secret"] = json!(secret);
    Ok((StatusCode::CREATED, Json(out)))
}

pub async fn delete_token(State(st): State<Shared>, Path(name): Path<String>) -> R<Json<Value>> {
    st.run(move |_, app| {
        if !app.catalog().delete_token(&name)? {
            return Err(Error::not_found(format!("no token named {name:?}")).into());
        }
        Ok(Json(json!({"deleted": name})))
    })
    .await
}
