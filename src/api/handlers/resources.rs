//! Resource routes: the disks and servers the appliance backs up.

use super::*;

// ---- resources ----

/// A resource as the API shows it: its settings plus `last_drill` (its latest backup
/// drill's `verified_boot`, or null).
pub(super) fn resource_view(app: &crate::app::App, r: &Resource) -> Value {
    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
    v["last_drill"] = json!(app.catalog().last_drill_of_resource(&r.name).ok().flatten());
    v
}

pub async fn list_resources(
    State(st): State<Shared>,
    uri: Uri,
    Query(q): Query<PageQuery>,
) -> R<Response> {
    let page = page_of(q)?;
    st.run(move |_, app| {
        let rs: Vec<Resource> = app.catalog().list_named(Table::Resources)?;
        let views: Vec<Value> = page
            .slice(&rs)
            .iter()
            .map(|r| resource_view(app, r))
            .collect();
        let resp = Json(views).into_response();
        Ok(page.headers(&uri, rs.len(), resp))
    })
    .await
}

/// Every host path, socket and NBD server `r` names must be allowed (`[paths]`; see
/// `confine`); checked before anything is opened.
pub(super) fn confine_resource(st: &crate::api::ApiState, r: &Resource) -> R<()> {
    for (i, s) in r.sources.iter().enumerate() {
        let (_, spec) = crate::service::named_disk(i, s);
        st.confine.check_source(&spec)?;
    }
    if let Some(q) = &r.qga {
        st.confine.check_qga(q)?;
    }
    Ok(())
}

pub async fn create_resource(
    State(st): State<Shared>,
    Json(v): Json<Value>,
) -> R<(StatusCode, Json<Resource>)> {
    let r: Resource = body(v)?;
    st.run(move |st, app| {
        crate::name::Name::parse(&r.name, "resource")?;
        confine_resource(st, &r)?;
        r.validate(app)?;
        app.catalog()
            .put_named(Table::Resources, &r.name, &r, true)?;
        Ok((StatusCode::CREATED, Json(r)))
    })
    .await
}

pub async fn get_resource(State(st): State<Shared>, Path(name): Path<String>) -> R<Json<Value>> {
    st.run(move |_, app| Ok(Json(resource_view(app, &resource_of(app, &name)?))))
        .await
}

pub async fn patch_resource(
    State(st): State<Shared>,
    Path(name): Path<String>,
    Json(p): Json<Value>,
) -> R<Json<Resource>> {
    st.run(move |st, app| {
        let r: Resource = merge(&resource_of(app, &name)?, p)?;
        confine_resource(st, &r)?;
        r.validate(app)?;
        app.catalog()
            .put_named(Table::Resources, &name, &r, false)?;
        Ok(Json(r))
    })
    .await
}

pub async fn delete_resource(State(st): State<Shared>, Path(name): Path<String>) -> R<Json<Value>> {
    st.run(move |_, app| {
        let users: Vec<String> = app
            .catalog()
            .list_named::<Policy>(Table::Policies)?
            .into_iter()
            .filter(|p| p.resources.contains(&name))
            .map(|p| p.name)
            .collect();
        if !users.is_empty() {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("resource {name} is used by policies {}", users.join(", ")),
            ));
        }
        app.catalog().delete_named(Table::Resources, &name)?;
        Ok(Json(json!({"deleted": name})))
    })
    .await
}
