//! Policy routes: schedules with retention, their preview and manual runs.

use super::*;

// ---- policies ----

pub async fn list_policies(
    State(st): State<Shared>,
    uri: Uri,
    Query(q): Query<PageQuery>,
) -> R<Response> {
    let page = page_of(q)?;
    st.run(move |_, app| {
        let ps: Vec<Policy> = app.catalog().list_named(Table::Policies)?;
        Ok(page.answer(&uri, &ps))
    })
    .await
}

pub async fn create_policy(
    State(st): State<Shared>,
    Json(v): Json<Value>,
) -> R<(StatusCode, Json<Policy>)> {
    let p: Policy = body(v)?;
    st.run(move |_, app| {
        crate::name::Name::parse(&p.name, "policy")?;
        p.validate(app)?;
        app.catalog()
            .put_named(Table::Policies, &p.name, &p, true)?;
        Ok((StatusCode::CREATED, Json(p)))
    })
    .await
}

pub async fn get_policy(State(st): State<Shared>, Path(name): Path<String>) -> R<Json<Policy>> {
    st.run(move |_, app| Ok(Json(app.catalog().get_named(Table::Policies, &name)?)))
        .await
}

pub async fn patch_policy(
    State(st): State<Shared>,
    Path(name): Path<String>,
    Json(p): Json<Value>,
) -> R<Json<Policy>> {
    st.run(move |_, app| {
        let cur: Policy = app.catalog().get_named(Table::Policies, &name)?;
        let p: Policy = merge(&cur, p)?;
        p.validate(app)?;
        app.catalog().put_named(Table::Policies, &name, &p, false)?;
        Ok(Json(p))
    })
    .await
}

pub async fn delete_policy(State(st): State<Shared>, Path(name): Path<String>) -> R<Json<Value>> {
    st.run(move |_, app| {
        app.catalog().delete_named(Table::Policies, &name)?;
        Ok(Json(json!({"deleted": name})))
    })
    .await
}

pub async fn preview_policy(State(st): State<Shared>, Path(name): Path<String>) -> R<Json<Value>> {
    st.run(move |_, app| {
        let p: Policy = app.catalog().get_named(Table::Policies, &name)?;
        if p.kind == crate::service::PolicyKind::Replicate {
            return Err(crate::Error::unsupported(format!(
                "policy {name} is a {} policy: preview shows what a backup policy's retention would delete; a replication applies its retention on the target when it runs",
                p.kind.as_str()
            ))
            .into());
        }
        let mut out = serde_json::Map::new();
        for r in &p.resources {
            let res = resource_of(app, r)?;
            let d = prune(app, &res, &p.retention, false)?;
            let delete: Vec<&str> = d
                .iter()
                .filter(|d| !d.keep)
                .map(|d| d.id.as_str())
                .collect();
            out.insert(r.clone(), json!({"delete": delete, "decisions": d}));
        }
        Ok(Json(Value::Object(out)))
    })
    .await
}

pub async fn run_policy(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> R<(StatusCode, Json<Value>)> {
    st.run(move |st, app| {
        let p: Policy = app.catalog().get_named(Table::Policies, &name)?;
        let ids = crate::scheduler::run_policy(&st.data, &st.tasks, &p, &caller.0.name)?;
        Ok((StatusCode::ACCEPTED, Json(json!({"tasks": ids}))))
    })
    .await
}
