//! The web console: its built assets (`console/dist/`, built from `console/src/` by
//! `npm run build`, committed and embedded here so that `cargo build` needs no node)
//! served at `/` without a token (they hold no data: every figure they show comes
//! from `/api/v1` with the token the user typed, kept in the tab's sessionStorage);
//! plus the two API routes the console needs that are not about one resource:
//! `GET /api/v1/whoami` (the caller's token name and role, so views show only what the
//! role may do) and `GET /api/v1/schedules/next` (the next fire times of a cron
//! expression, for the policy editor).

use axum::Json;
use axum::extract::{Extension, Query};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{ApiError, Caller};
use crate::policy::Schedule;

/// The embedded files: (path, content type, bytes).
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_bytes!("../../console/dist/index.html"),
    ),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/dist/app.js"),
    ),
    (
        "/app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../console/dist/app.css"),
    ),
];

/// Serve an embedded asset (`/index.html` is `/`); 404 for anything else.
pub async fn asset(uri: axum::http::Uri) -> Response {
    let path = match uri.path() {
        "/index.html" => "/",
        p => p,
    };
    match ASSETS.iter().find(|(p, _, _)| *p == path) {
        Some((_, ty, body)) => (
            [
                (header::CONTENT_TYPE, *ty),
                (header::CACHE_CONTROL, "no-cache"),
                // Nothing from elsewhere: no CDN, no inline script, no framing. Images may
                // be blob: URLs (drill screenshots, fetched with the token in a header).
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'",
                ),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}

/// The caller's token: `{"name", "role"}`.
pub async fn whoami(Extension(Caller(t)): Extension<Caller>) -> Json<Value> {
    Json(json!({"name": t.name, "role": t.role.as_str()}))
}

/// `?cron=&count=` (any other name is refused, naming it).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NextQuery {
    cron: Option<String>,
    count: Option<String>,
}

/// `?cron=EXPR[&count=N]` (N ≤ 20, default 5): the next N fire times after now (UTC,
/// RFC 3339), or 400 naming what is wrong with the expression.
pub async fn next_runs(Query(q): Query<NextQuery>) -> Result<Json<Value>, ApiError> {
    let expr = q.cron.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "give the cron expression as ?cron=EXPR".into(),
        )
    })?;
    let count: usize = match &q.count {
        None => 5,
        Some(c) => c
            .parse()
            .ok()
            .filter(|n| (1..=20).contains(n))
            .ok_or_else(|| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("count {c:?} is not a number from 1 to 20"),
                )
            })?,
    };
    let s = Schedule::parse(expr).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("cron expression {expr:?}: {e}"),
        )
    })?;
    let mut at = OffsetDateTime::now_utc();
    let mut out = Vec::new();
    while out.len() < count {
        let Some(n) = s.next_after(at) else { break };
        out.push(n.format(&Rfc3339).unwrap_or_default());
        at = n;
    }
    Ok(Json(json!({"cron": expr, "next": out})))
}
