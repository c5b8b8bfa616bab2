//! What the contract enforces before any handler runs: a request to `/api/v1` may carry
//! only the query parameters its route's line in [`super::openapi::SHAPES`] names (plus
//! `limit` and `offset` on a paginated list). Any other name is refused with `400
//! bad_request` naming it and what the route takes, whatever the route — also one that
//! takes no query at all — so a misspelt filter (`?resorce=web`) never widens a list or
//! a delete, and the document is the list of what each route reads.
//!
//! Handlers still read their query into typed structs that refuse unknown names
//! (`deny_unknown_fields`), for the values' types; this check is the one place that
//! holds every route to the document. Request bodies are refused field by field by
//! their types (`deny_unknown_fields` on every body type; see `schema`).

use axum::extract::Request;
use axum::http::{Method, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use percent_encoding::percent_decode_str;

use super::ApiError;
use super::openapi::{Answer, shape_of};

/// The middleware: refuse a request whose query names a parameter its route does not
/// take.
pub(super) async fn known_query(req: Request, next: Next) -> Response {
    if let Some(e) = unknown_query(req.method(), req.uri()) {
        return e.into_response();
    }
    next.run(req).await
}

/// The parameters route `method path` (below `/api/v1`) takes, or None when the table
/// does not know it (the auth layer refuses those).
fn taken(method: &str, path: &str) -> Option<(String, Vec<&'static str>)> {
    let route = super::route_of(path, |r| r.method == method)?;
    let shape = shape_of(route.method, route.path)?;
    let mut names: Vec<&'static str> = shape.query.iter().map(|(n, _)| *n).collect();
    if let Answer::List(_) = shape.answer {
        names.extend(["limit", "offset"]);
    }
    Some((format!("{} /api/v1{}", route.method, route.path), names))
}

/// The refusal of the first parameter of `uri`'s query that its route does not take.
pub fn unknown_query(method: &Method, uri: &Uri) -> Option<ApiError> {
    let query = uri.query().filter(|q| !q.is_empty())?;
    let path = uri.path().strip_prefix("/api/v1")?;
    let method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    let (route, names) = taken(method, path)?;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let raw = pair.split('=').next().unwrap_or_default().replace('+', " ");
        let name = percent_decode_str(&raw).decode_utf8_lossy();
        if names.iter().any(|n| *n == name) {
            continue;
        }
        let takes = if names.is_empty() {
            "it takes none".to_string()
        } else {
            format!("it takes {}", names.join(", "))
        };
        return Some(ApiError::bad_request(format!(
            "unknown query parameter {name:?} on {route}: {takes} (see GET /api/v1/openapi.json)"
        )));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(method: Method, uri: &str) -> Option<String> {
        unknown_query(&method, &uri.parse().unwrap()).map(|e| e.message)
    }

    #[test]
    fn a_route_takes_the_parameters_its_shape_names_and_nothing_else() {
        assert_eq!(
            refused(Method::GET, "/api/v1/backups?vault=v&limit=2"),
            None
        );
        assert_eq!(refused(Method::HEAD, "/api/v1/tasks?state=running"), None);
        assert_eq!(
            refused(Method::GET, "/api/v1/backups/latest?disk=web"),
            None
        );
        assert_eq!(
            refused(Method::GET, "/api/v1/schedules/next?cron=*+*+*+*+*&count=2"),
            None
        );
        let m = refused(Method::GET, "/api/v1/backups?resorce=web").unwrap();
        assert!(m.contains("\"resorce\"") && m.contains("vault, resource, limit, offset"));
        // A route without a query refuses any, and names none it takes.
        let m = refused(Method::DELETE, "/api/v1/backups/b1?force=1").unwrap();
        assert!(m.contains("\"force\"") && m.contains("takes none"), "{m}");
        // A name is compared decoded; a paginated route takes limit and offset only.
        let m = refused(Method::GET, "/api/v1/vaults?li%6Dit=1&x%20y=2").unwrap();
        assert!(m.contains("\"x y\""), "{m}");
        assert!(refused(Method::GET, "/api/v1/vaults/v?limit=1").is_some());
        // Outside /api/v1, and routes the table does not know, are not this check's.
        assert_eq!(refused(Method::GET, "/metrics?x=1"), None);
        assert_eq!(refused(Method::GET, "/api/v1/nothing?x=1"), None);
    }
}
