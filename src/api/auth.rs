//! Who may call what: the role each request needs (from the route table, deny by
//! default), the bearer-token check with its audit record, the failed-login limit per
//! peer, and `Cache-Control: no-store` on every answer to a token.

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::*;

/// The least role for a request, from the route table: `HEAD` takes `GET`'s role; a
/// method or path the table does not list has none (the request is refused: deny by
/// default, never "no rule, so allowed").
pub(super) fn required_role(method: &Method, path: &str) -> Option<Role> {
    let method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    if path == "/metrics" {
        // Outside /api/v1: Prometheus scrapes it with any valid token (see `metrics`).
        return (method == "GET").then_some(Role::Auditor);
    }
    let path = path.strip_prefix("/api/v1")?;
    route_of(path, |r| r.method == method).map(|r| r.role)
}

/// The first route whose path pattern matches `path` (below `/api/v1`) and that `pick`s.
pub(super) fn route_of(
    path: &str,
    pick: impl Fn(&RouteSpec) -> bool,
) -> Option<&'static RouteSpec> {
    let segs: Vec<&str> = path.split('/').collect();
    ROUTES.iter().find(|r| {
        pick(r) && {
            let pat: Vec<&str> = r.path.split('/').collect();
            pat.len() == segs.len()
                && pat
                    .iter()
                    .zip(&segs)
                    .all(|(p, s)| p.starts_with('{') || p == s)
        }
    })
}

/// Routes answered without a token (GET only), with a minimal body: `GET /health`
/// gives `{"status":"ok"}` and nothing about vaults, resources or tasks; with a
/// token it gives the full answer.
pub const ANONYMOUS: &[&str] = &["/health"];

pub(super) fn is_anonymous(path: &str) -> bool {
    path.strip_prefix("/api/v1")
        .is_some_and(|p| ANONYMOUS.contains(&p))
}

/// The token of a request, put there by [`auth`].
#[derive(Clone)]
pub struct Caller(pub TokenInfo);

pub(super) async fn auth(State(st): State<Shared>, mut req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let secret = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_owned);
    if secret.is_none() && method == Method::GET && is_anonymous(&path) {
        // Liveness probes (load balancers, monitoring) get the status and nothing else;
        // they are not audited, so a probe every second cannot grow the audit log.
        return Json(json!({"status": "ok"})).into_response();
    }
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    if st.failed.limited(peer) {
        return too_many(&st, peer, &method, &path).await;
    }
    let token = match secret {
        Some(s) => st
            .run(move |_, app| Ok(app.catalog().authenticate(&s).ok().flatten()))
            .await
            .ok()
            .flatten(),
        None => None,
    };
    let Some(token) = token else {
        if st.failed.fail(peer) != guard::Verdict::Audit {
            return too_many(&st, peer, &method, &path).await;
        }
        st.audit.record("-", "-", method.as_str(), &path, 401).await;
        return no_store(
            ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or unknown token (Authorization: Bearer TOKEN)".into(),
            )
            .into_response(),
        );
    };
    let Some(need) = required_role(&method, &path) else {
        // Not in the route table: refused before any handler runs, whatever the role.
        let known_path = path
            .strip_prefix("/api/v1")
            .and_then(|p| route_of(p, |_| true))
            .is_some();
        let (status, msg) = if known_path {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path} (see GET /api/v1/openapi.json)"),
            )
        } else {
            (
                StatusCode::NOT_FOUND,
                format!("no route {path} (see GET /api/v1/openapi.json)"),
            )
        };
        st.audit
            .record(
                &token.name,
                token.role.as_str(),
                method.as_str(),
                &path,
                status.as_u16(),
            )
            .await;
        return no_store(ApiError(status, msg).into_response());
    };
    if !token.role.may(need) {
        st.audit
            .record(
                &token.name,
                token.role.as_str(),
                method.as_str(),
                &path,
                403,
            )
            .await;
        return ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "{} {path} needs the {} role; token {} is {}",
                method,
                need.as_str(),
                token.name,
                token.role.as_str()
            ),
        )
        .into_response();
    }
    req.extensions_mut().insert(Caller(token.clone()));
    let resp = no_store(next.run(req).await);
    st.audit
        .record(
            &token.name,
            token.role.as_str(),
            method.as_str(),
            &path,
            resp.status().as_u16(),
        )
        .await;
    resp
}

/// `429` for a peer over its failed-login limit; audited once per window.
pub(super) async fn too_many(
    st: &ApiState,
    peer: std::net::IpAddr,
    method: &Method,
    path: &str,
) -> Response {
    if st.failed.fail(peer) == guard::Verdict::LimitAudit {
        st.audit.record("-", "-", method.as_str(), path, 429).await;
    }
    let wait = st.failed.retry_after(peer);
    let mut r = ApiError(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "more than {} requests without a valid token from {peer} within a minute; \
             retry in {wait} s with a valid token",
            guard::FAILED_PER_MINUTE
        ),
    )
    .into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(&wait.to_string()) {
        r.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
    }
    no_store(r)
}

/// `Cache-Control: no-store` on `r`: answers to a token (a new token's secret, the audit
/// log, host paths) are never kept by a proxy or a browser cache.
pub(super) fn no_store(mut r: Response) -> Response {
    r.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    r
}
